"""The decision rule: test-time augmentation and a prior correction, chosen on the validation split.

A class-weighted loss trains the network as if every class were equally common, which is what balanced accuracy
rewards but costs plain accuracy: nevi (67% of HAM10000) get called rarer classes (for the default model, val
accuracy 0.74 under plain argmax, 0.79 with the correction). Adding ``tau * log(prior)`` to the
logits (logit adjustment, Menon et al. 2021) moves the decision back towards the real class frequencies: tau = 0
keeps the balanced rule, tau = 1 restores the frequency-weighted one. We pick tau, and whether averaging the eight
flips/rotations helps, on the validation split by the sum of balanced accuracy and accuracy (both are what the field
reports), refit the temperature for that rule, then score val and test once with it. The test split is measured, never
used to choose.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score

from dermsight.data.manifest import LABEL_COLUMNS, read_labels, read_split_manifest, sources_of
from dermsight.data.problems import DataError
from dermsight.evaluation.metrics import headline, summary
from dermsight.evaluation.run import evaluate
from dermsight.inference.scoring import score_images, softmax, tta_for
from dermsight.models.bundle import load_model, update_meta
from dermsight.models.meta import ModelMeta
from dermsight.posthoc.referral import fit_referral
from dermsight.posthoc.referral import report_line as referral_line
from dermsight.posthoc.temperature import fit_temperature

TAUS = tuple(round(t, 2) for t in np.arange(0.0, 1.0001, 0.05))


def choose(logits: np.ndarray, y: np.ndarray, log_prior: np.ndarray) -> tuple[float, float, float]:
    """The tau maximising balanced accuracy + accuracy on (logits, y); returns (tau, balanced acc., accuracy)."""
    best = (-1.0, 0.0, 0.0, 0.0)
    for tau in TAUS:
        pred = (logits + tau * log_prior).argmax(1)
        ba, acc = float(balanced_accuracy_score(y, pred)), float((pred == y).mean())
        # Ties go to the smaller tau (kept closer to the balanced rule the network was trained for).
        if ba + acc > best[0] + 1e-12:
            best = (ba + acc, tau, ba, acc)
    return best[1], best[2], best[3]


def train_prior(train: pd.DataFrame, meta: ModelMeta) -> tuple[np.ndarray, np.ndarray]:
    """Class frequencies of the training split in the model's class order, and their logs (floored at 1e-6)."""
    col = LABEL_COLUMNS[meta.taxonomy]
    prior = train[col].value_counts(normalize=True).reindex(list(meta.classes)).fillna(0).to_numpy()
    return prior, np.log(np.maximum(prior, 1e-6))


def _summary(metrics: dict) -> dict:
    """What the model records of a scored split: the headline figures, the advice's referral of melanomas and nevi,
    and, for a split of several sources, the same per source."""
    out = summary(metrics) | {
        "ece_before_temperature": metrics.get("extra", {}).get("ece_before_temperature"),
        "mel_vs_nv_auc": metrics.get("mel_vs_nv_auc"),
        "referral": _referral(metrics.get("referral")),
    }
    if metrics.get("by_source"):
        # `evaluate` already summarises each source (`run.source_metrics`): only the referral is condensed here.
        out["by_source"] = {
            src: {k: v for k, v in m.items() if k not in ("referral", "app_referral")}
            | {"referral": _referral(m.get("referral"))}
            for src, m in metrics["by_source"].items()
        }
    return out


def _referral(rates: dict | None) -> dict:
    """Share of each true class the advice sends to a doctor, and of all images (`metrics.referral_rates`)."""
    if not rates:
        return {}
    return {c: round(v["referred"], 4) for c, v in rates["per_class"].items()} | {"all": rates["all"]}


def tune_decision(
    model_path: str | os.PathLike,
    manifest: str | os.PathLike | pd.DataFrame,
    out_path: str | os.PathLike | None = None,
    report_dir: str | os.PathLike | None = None,
    progress: bool = True,
    views: int = 8,
) -> dict[str, Any]:
    """Choose tau on the val split (with ``views`` views per image, as served: `scoring.tta_for`), refit the
    temperature and the referral threshold, re-score val and test; store all in the model."""
    served_tta = tta_for(views)  # a bad value fails here, before val is scored
    df = manifest if isinstance(manifest, pd.DataFrame) else read_split_manifest(manifest)
    # A reports' folder given first: one that cannot be made fails here, before the model is rewritten. (A temporary
    # one is made only once there is something to write, so a failed run leaves none behind.)
    reports = Path(report_dir) if report_dir else None
    if reports is not None:
        reports.mkdir(parents=True, exist_ok=True)
    model_path = Path(model_path)
    model, meta = load_model(model_path)
    train, val = df[df["split"] == "train"], df[df["split"] == "val"]
    if val.empty or train.empty:
        raise DataError("the manifest needs `train` (for the class prior) and `val` splits")
    prior, log_prior = train_prior(train, meta)
    y = read_labels(val, meta)
    paths = [str(p) for p in val["path"]]

    candidates, unreadable = {}, []
    for tta in (False, True):
        scored = score_images(model, meta, paths, tta=tta, progress=progress, desc="val")
        unreadable = scored.require_usable(paths, "val split")  # the same images either way
        logits = scored.logits
        ok = ~np.isnan(logits).any(axis=1)
        tau, ba, acc = choose(logits[ok], y[ok], log_prior)
        candidates[tta] = {
            "tau": tau, "balanced_accuracy": ba, "accuracy": acc, "logits": logits[ok], "y": y[ok], "ok": ok,
        }  # fmt: skip
    # Not chosen here: ``views`` is a serving requirement (eight views, or one in the canonical orientation; either
    # way answers do not depend on how a photo is turned), and the not-a-lesion gate's threshold was set on features
    # of the same views (`calibrate`). The grid of the other is kept for comparison.
    tta = served_tta
    pick = candidates[tta]
    biased = replace(meta, logit_bias=tuple(float(b) for b in pick["tau"] * log_prior))
    # The temperature is fitted to the logits as they will be served: with the decision bias added.
    temperature = fit_temperature(biased.adjust(pick["logits"]), pick["y"])
    decision = {
        "tta": bool(tta),
        "tau": pick["tau"],
        "chosen_on": f"val split ({len(pick['y'])} images, {'eight views each' if tta else 'one view each'}), "
        "maximising balanced accuracy + accuracy",
        "val_grid_best": {
            ("tta" if k else "no_tta"): {
                "tau": v["tau"],
                "balanced_accuracy": round(v["balanced_accuracy"], 4),
                "accuracy": round(v["accuracy"], 4),
            }
            for k, v in candidates.items()
        },
        "train_prior": {c: round(float(p), 4) for c, p in zip(meta.classes, prior, strict=True)},
    }
    # The referral threshold on the probabilities as served with this rule, every source's melanomas pooled.
    sources = sources_of(val)
    sources = None if sources is None else sources[pick["ok"]]
    served = softmax(biased.adjust(pick["logits"]), temperature)
    codes = [meta.classes[i] for i in pick["y"]]
    # Without validation melanomas there is nothing to fit: the model keeps the threshold it has.
    referral = fit_referral(served, codes, meta.classes, sources) if "mel" in codes else None
    decision["referral"] = referral
    refer_from = referral["refer_from"] if referral else meta.refer_from
    new = replace(biased, tta=bool(tta), temperature=temperature, refer_from=refer_from)
    out = update_meta(model_path, new, out_path)

    # Score val and test once with the chosen rule (through `evaluate`, i.e. the serving preprocessing).
    metrics = dict(new.metrics)
    reports = reports or Path(tempfile.mkdtemp(prefix="dermsight-decision-"))
    with tempfile.TemporaryDirectory() as tmp:
        split_csv = Path(tmp) / "split.csv"
        df.to_csv(split_csv, index=False)
        for name in ("val", "test"):
            if (df["split"] == name).any():
                ev = evaluate(split_csv, reports / name, out, split=name, progress=progress)
                metrics[name] = _summary(ev.metrics)
    metrics["decision"] = decision
    update_meta(out, replace(new, metrics=metrics))
    return {
        "model": str(out),
        "decision": decision,
        "temperature": temperature,
        "metrics": metrics,
        "reports": str(reports),
        "unreadable": unreadable,  # (path, reason): left out of the choice
    }


def report_lines(report: dict[str, Any]) -> list[str]:
    d = report["decision"]
    lines = [
        f"decision rule: tta {'on' if d['tta'] else 'off'}, tau {d['tau']} (chosen on the {d['chosen_on']}); "
        f"temperature {report['temperature']:.4f}"
    ]
    if d.get("referral"):
        lines.append(referral_line(d["referral"]))
    for name in ("val", "test"):
        m = report["metrics"].get(name)
        if m:
            lines.append(f"  {name}: {headline(m)}")
    lines.append(f"written to {report['model']}; reports in {report['reports']}")
    return lines
