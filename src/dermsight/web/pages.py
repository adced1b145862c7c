"""HTML pages. The core flow (choose a photo, submit, read the result) is one form POST that renders the result
directly, so it works without JavaScript and the upload never has to be stored between two requests."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, current_app, redirect, render_template, request, url_for

from dermsight.domain.results import UNCERTAIN_BELOW
from dermsight.domain.triage import advise, worth_naming
from dermsight.web.security import check_csrf, enforce_rate_limit
from dermsight.web.service import ACCEPT, analyse, read_upload, refuse_unreadable_form

pages = Blueprint("pages", __name__)

# Cards on the result page: the top class always, then others at least this probable, at most three in all.
CARD_MIN_PROBABILITY = 0.05
MAX_CARDS = 3


def _knowledge():
    return current_app.extensions["dermsight.knowledge"]


def _model():
    return current_app.extensions["dermsight.model"]


@pages.get("/")
def index():
    return render_template("index.html", accept=ACCEPT, tips=_knowledge().photo_tips)


@pages.post("/analyse")
def analyse_page():
    refuse_unreadable_form(request)
    # The form's own token first: a post forged by another site is refused without using up the visitor's budget.
    check_csrf(request.form)
    enforce_rate_limit()
    data = read_upload(request.files, current_app.config["MAX_CONTENT_LENGTH"], request.form)
    analysis = analyse(_model(), data, explain=True)
    result = analysis.result
    knowledge = _knowledge()
    # The top class, every cancer or pre-cancer the advice names (its heading may come from one that ranks fourth),
    # then the other likely classes, up to MAX_CARDS unless the named ones need more.
    named = worth_naming(result)
    likely = [p for p in result.predictions if p.probability >= CARD_MIN_PROBABILITY]
    order = list(dict.fromkeys(p.code for p in [*result.predictions[:1], *named, *likely]))
    cards = [knowledge.get(code) for code in order[: max(MAX_CARDS, 1 + len(named))]]
    return render_template(
        "result.html",
        result=result,
        advice=advise(result, knowledge),
        photo_uri=analysis.photo_uri,
        heatmap_uri=analysis.heatmap_uri,
        cards=[c for c in cards if c is not None],
        tips=knowledge.photo_tips,
        uncertain_below=UNCERTAIN_BELOW,
    )


@pages.get("/analyse")
def analyse_get():
    # A bookmarked or reloaded result: results are never stored, so start again.
    return redirect(url_for("pages.index"))


@pages.get("/conditions")
def conditions():
    model_codes = _model_codes()
    # ISIC 2019 and HAM10000 codes of the same condition share one entry: list it once.
    entries, seen = [], set()
    for info in _knowledge().conditions.values():
        if info.codes not in seen:
            seen.add(info.codes)
            entries.append(info)
    return render_template("conditions.html", entries=entries, model_codes=model_codes)


@pages.get("/conditions/<code>")
def condition(code: str):
    info = _knowledge().get(code)
    if info is None:
        abort(404)
    return render_template("condition.html", info=info)


@pages.get("/about")
def about():
    model = _model()
    meta = model.meta
    return render_template(
        "about.html",
        meta=meta,
        info=model.info(),
        metrics=_metrics_view(meta.metrics),
        external=meta.metrics.get("external") or {},
        knowledge=_knowledge(),
    )


def _model_codes() -> tuple[str, ...]:
    # The list page marks the classes the served model can name; it must not fail when the model cannot load.
    try:
        return tuple(_model().meta.classes)
    except Exception:
        return ()


_HEADLINE = {
    "balanced_accuracy": "Balanced accuracy",
    "accuracy": "Accuracy",
    "macro_auc": "Macro AUC",
    "ece": "Calibration error (ECE)",
}


def _metrics_view(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for the about page: one per evaluated split (test first), headline numbers with their 95% intervals."""
    rows = []
    order = {"test": 0, "val": 2}
    for split in sorted(metrics, key=lambda k: (order.get(k, 1), k)):
        m = metrics[split]
        if split == "external":  # sets from other sources: a table of their own
            continue
        if not isinstance(m, dict) or not any(key in m for key in _HEADLINE):
            continue
        ci = m.get("ci95") or {}
        rows.append(
            {
                "split": split,
                "n": m.get("n"),
                "values": [
                    (label, m.get(key), ci.get(key))
                    for key, label in _HEADLINE.items()
                    if isinstance(m.get(key), int | float)
                ],
                "recall": m.get("recall") or {},
            }
        )
    return rows
