"""The evaluation report: metrics.json, three figures and a short Markdown summary in one folder."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from dermsight.domain.classes import CONDITIONS
from dermsight.evaluation.metrics import check_probabilities, reliability_bins

_DPI = 120
_CAUTION = (
    "These are research metrics on retrospective dermoscopic images, not a clinical validation: "
    "they do not show that the model is safe or useful for diagnosing anyone."
)


def _display_name(code: str, width: int) -> str:
    return "\n".join(textwrap.wrap(f"{CONDITIONS[code].name} ({code})", width, break_long_words=False))


# Figures are built on matplotlib.figure.Figure rather than pyplot: nothing is registered with a GUI backend
# or pyplot's figure manager, so there is no display to open and no figure left open after a call (PNG output
# uses Agg). That keeps the library safe to call in a loop or from a server.
def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=_DPI)
    return path


def plot_confusion_matrix(cm: np.ndarray, labels: list[str], path: Path) -> Path:
    cm = np.asarray(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = cm / cm.sum(axis=1, keepdims=True)
    side = 2.0 + 0.9 * len(labels)
    fig = Figure(figsize=(2 * side + 2.5, side + 0.5), layout="constrained")
    axes = fig.subplots(1, 2)
    panels = (
        (cm, "Counts", "d"),
        (np.nan_to_num(normalised), "Row-normalised (recall on the diagonal)", ".2f"),
    )
    for ax, (values, subtitle, fmt) in zip(axes, panels, strict=True):
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=values.max() or 1)
        fig.colorbar(image, ax=ax, shrink=0.75)
        ax.set_title(subtitle)
        ax.set_xticks(range(len(labels)), [_display_name(c, 12) for c in labels], fontsize=7)
        ax.set_yticks(range(len(labels)), [_display_name(c, 22) for c in labels], fontsize=8)
        ax.set_xlabel("Predicted")
        ax.set_ylabel("True")
        threshold = values.max() / 2
        for i in range(len(labels)):
            for j in range(len(labels)):
                colour = "white" if values[i, j] > threshold else "black"
                ax.text(j, i, format(values[i, j], fmt), ha="center", va="center", color=colour, fontsize=8)
    return _save(fig, path)


def plot_roc_curves(probs: np.ndarray, y_true: np.ndarray, metrics: dict, path: Path) -> Path:
    fig = Figure(figsize=(7.5, 6.5), layout="constrained")
    ax = fig.subplots()
    for k, code in enumerate(metrics["labels"]):
        auc = metrics["per_class"][code]["auc"]
        if auc is None:  # no cases (or only cases) of this class: no curve to draw
            continue
        fpr, tpr, _ = roc_curve(y_true == k, probs[:, k])
        ax.plot(fpr, tpr, lw=1.5, label=f"{CONDITIONS[code].name} ({code}): AUC {auc:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="Chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), aspect="equal")
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    macro = metrics.get("macro_auc")
    ax.set_title("One-vs-rest ROC" + (f", macro AUC {macro:.3f}" if macro is not None else ""))
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_reliability(probs: np.ndarray, y_true: np.ndarray, path: Path, n_bins: int = 15) -> Path:
    bins = reliability_bins(probs, y_true, n_bins)
    centres = (bins.edges[:-1] + bins.edges[1:]) / 2
    width = bins.edges[1] - bins.edges[0]
    fig = Figure(figsize=(6.5, 7.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    filled = bins.counts > 0
    top.bar(centres[filled], bins.accuracy[filled], width=width, edgecolor="black", label="Accuracy in bin")
    # Hatched, unfilled gap bars stay readable whether the model is over- or under-confident in a bin.
    top.bar(
        centres[filled],
        bins.confidence[filled] - bins.accuracy[filled],
        bottom=bins.accuracy[filled],
        width=width,
        fill=False,
        hatch="//",
        edgecolor="tab:red",
        label="Gap to mean confidence",
    )
    top.plot([0, 1], [0, 1], ls="--", color="grey", label="Perfect calibration")
    top.set(xlim=(0, 1), ylim=(0, 1))
    top.set_ylabel("Accuracy of top-1 prediction")
    top.set_title(f"Reliability (top-1 confidence, {n_bins} bins): ECE {bins.ece:.3f}")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, bins.counts, width=width, color="tab:grey", edgecolor="black")
    bottom.set_xlabel("Top-1 confidence")
    bottom.set_ylabel("Cases")
    return _save(fig, path)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _referral_lines(metrics: dict) -> list[str]:
    referral = metrics.get("referral")
    if not referral:
        return []
    cells = ", ".join(f"{c} {_pct(v['referred'])} of {v['n']}" for c, v in referral["per_class"].items())
    lines = ["", "## Referred to a doctor by the app's advice", "", f"By true class: {cells}."]
    if metrics.get("mel_vs_nv_auc") is not None:
        lines.append(f"Melanoma vs nevus AUC (melanoma probability): {_fmt(metrics['mel_vs_nv_auc'])}.")
    return lines


def _source_lines(metrics: dict) -> list[str]:
    by_source = metrics.get("by_source")
    if not by_source:
        return []
    lines = [
        "",
        "## By source",
        "",
        "| Source | n | Balanced accuracy (95% CI) | Accuracy | Macro AUC | Mel vs nv AUC | Melanomas referred "
        "| Nevi referred |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in by_source.items():
        ci = (m.get("ci95") or {}).get("balanced_accuracy")
        ba = _fmt(m["balanced_accuracy"]) + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "")
        per_class = m["referral"]["per_class"]
        mel, nv = (_pct(per_class[c]["referred"]) if c in per_class else "-" for c in ("mel", "nv"))
        lines.append(
            f"| {name} | {m['n']} | {ba} | {_fmt(m['accuracy'])} | {_fmt(m['macro_auc'])} | "
            f"{_fmt(m['mel_vs_nv_auc'])} | {mel} | {nv} |"
        )
    return lines


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _markdown(metrics: dict, title: str, extra: dict | None, figures: dict[str, Path]) -> str:
    labels = metrics["labels"]
    ci = metrics.get("ci95") or {}
    lines = [f"# {title}", "", f"> {_CAUTION}", ""]
    if metrics.get("warnings"):
        lines += ["## Warnings", "", *(f"- **{note}**" for note in metrics["warnings"]), ""]
    if extra:
        rows = (f"| {_cell(key)} | {_cell(value)} |" for key, value in extra.items())
        lines += ["| | |", "|---|---|", *rows, ""]
    lines += [f"{metrics['n']} cases, {len(labels)} classes.", "", "## Headline metrics", ""]
    lines += ["| Metric | Value | 95% CI |", "|---|---|---|"]
    headline = (
        ("Balanced accuracy (mean recall, ISIC metric)", "balanced_accuracy"),
        ("Accuracy", "accuracy"),
        ("Macro ROC AUC (one-vs-rest)", "macro_auc"),
    )
    for name, key in headline:
        interval = ci.get(key)
        bounds = f"{interval[0]:.3f} – {interval[1]:.3f}" if interval else "n/a"
        lines.append(f"| {name} | {_fmt(metrics.get(key))} | {bounds} |")
    n_bins = metrics.get("ece_bins", 15)
    lines.append(f"| Expected calibration error ({n_bins} bins) | {_fmt(metrics['ece'])} | |")
    for name, key in (("Negative log-likelihood", "nll"), ("Brier score (multiclass, 0–2)", "brier")):
        if key in metrics:
            lines.append(f"| {name} | {_fmt(metrics[key])} | |")
    if "bootstrap" in metrics:
        boot = metrics["bootstrap"]
        lines += [
            "",
            f"CIs: {boot['n_resamples']} bootstrap resamples (seed {boot['seed']}), {boot['method']}.",
        ]
    concerning = metrics.get("concerning")
    if concerning:
        lines += [
            "",
            f"Malignant or pre-malignant ({', '.join(concerning['classes'])}) vs benign, by top-1 class: "
            f"sensitivity {_fmt(concerning['sensitivity'])}, specificity {_fmt(concerning['specificity'])}, "
            f"AUC of the summed probability {_fmt(concerning['auc'])}.",
        ]

    lines += ["", "## Per class", ""]
    lines += [
        "| Class | Code | Support | Precision | Recall | Specificity | F1 | AUC |",
        "|---|---|" + "---:|" * 6,
    ]
    for code in labels:
        row = metrics["per_class"][code]
        values = " | ".join(_fmt(row[key]) for key in ("precision", "recall", "specificity", "f1", "auc"))
        lines.append(f"| {row['name']} | {code} | {row['support']} | {values} |")

    lines += ["", "## Confusion matrix", "", "Rows are the true class, columns the predicted class.", ""]
    lines += ["| true \\ predicted | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for code, row in zip(labels, metrics["confusion_matrix"], strict=True):
        lines.append(f"| **{code}** | " + " | ".join(str(v) for v in row) + " |")

    lines += _referral_lines(metrics)
    lines += _source_lines(metrics)
    lines += ["", "## Figures", ""]
    captions = {
        "confusion_matrix": "Confusion matrix",
        "roc_curves": "ROC curves",
        "reliability": "Reliability",
    }
    for key, caption in captions.items():
        lines.append(f"![{caption}]({figures[key].name})")
        lines.append("")
    return "\n".join(lines)


def write_report(
    metrics: dict,
    probs: np.ndarray,
    y_true: np.ndarray,
    out_dir: Path,
    title: str,
    extra: dict | None = None,
) -> dict[str, Path]:
    """Write metrics.json, confusion_matrix.png, roc_curves.png, reliability.png and report.md to ``out_dir``.

    ``metrics`` comes from `compute_metrics` on the same ``probs`` and ``y_true``. ``extra`` (model,
    checkpoint, dataset, split...) is stored under ``"extra"`` in metrics.json and listed at the top of the
    report. Returns the written paths keyed ``metrics``, ``confusion_matrix``, ``roc_curves``, ``reliability``
    and ``report``.
    """
    p, _ = check_probabilities(probs, len(metrics["labels"]))
    y = np.asarray(y_true)
    if len(y) != metrics["n"] or len(p) != metrics["n"]:
        raise ValueError(f"metrics are for {metrics['n']} cases but got {len(p)} probs and {len(y)} labels")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "confusion_matrix": plot_confusion_matrix(
            np.array(metrics["confusion_matrix"]), metrics["labels"], out_dir / "confusion_matrix.png"
        ),
        "roc_curves": plot_roc_curves(p, y, metrics, out_dir / "roc_curves.png"),
        "reliability": plot_reliability(p, y, out_dir / "reliability.png", metrics.get("ece_bins", 15)),
    }
    document = {"title": title, **metrics}
    if extra:
        document["extra"] = extra
    paths["metrics"] = out_dir / "metrics.json"
    # allow_nan=False: a NaN would make the file unreadable to strict JSON parsers; metrics use null instead.
    paths["metrics"].write_text(json.dumps(document, indent=2, allow_nan=False, default=str) + "\n")
    paths["report"] = out_dir / "report.md"
    paths["report"].write_text(_markdown(metrics, title, extra, paths))
    return paths
