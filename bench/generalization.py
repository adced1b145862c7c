"""How models hold up on images from other sources: the app's answers and the model's ranking, set by set.

    .venv/bin/python bench/generalization.py \
        --model src/dermsight/assets/default.safetensors \
        --set "HAM10000 test=runs/default/split.csv:test" --set "ISIC Archive=../shared/data/isic_archive_val224" \
        --out bench/generalization.md

For each model and each labelled set (a folder or CSV any reader understands, or a split manifest with ``:SPLIT``):
- what the app tells people (`Predictor.predict_batch`, then the app's advice, `domain.triage.advise`): the share of
  melanomas and of nevi sent to a doctor, and the share of all images refused (image quality or not a lesion). A
  refused melanoma is not counted as sent to a doctor: the app gave no diagnosis for it;
- what the model ranks (`dermsight evaluate`, every image it can decode scored; the images counted are those):
  balanced accuracy and the melanoma-vs-nevus AUC.
Shares carry Wilson 95% intervals, balanced accuracy evaluate's lesion-grouped bootstrap interval, the AUC a
bootstrap interval over images. `evaluate` warns when a set holds images a model was trained or validated on.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from dermsight.data.images import ImageError
from dermsight.domain.knowledge import load_knowledge
from dermsight.domain.triage import advise
from dermsight.evaluation.metrics import mel_vs_nv_auc
from dermsight.evaluation.run import evaluate
from dermsight.inference.predictor import Predictor

BATCH = 32


def wilson(k: int, n: int) -> str:
    if not n:
        return "-"
    ci = binomtest(k, n).proportion_ci(method="wilson")
    return f"{k / n:.1%} ({ci.low:.0%}-{ci.high:.0%})"


def share(hit: np.ndarray, among: np.ndarray) -> str:
    return wilson(int((hit & among).sum()), int(among.sum()))


def auc_interval(y: np.ndarray, probs: np.ndarray, labels: list[str], n_boot: int = 1000, seed: int = 0) -> str:
    """`metrics.mel_vs_nv_auc` with a bootstrap interval over the melanoma and nevus images."""
    point = mel_vs_nv_auc(y, probs, labels)
    if point is None:
        return "-"
    pair = np.isin(y, [labels.index("mel"), labels.index("nv")])
    y, probs = y[pair], probs[pair]
    rng, draws = np.random.default_rng(seed), []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        if (auc := mel_vs_nv_auc(y[i], probs[i], labels)) is not None:
            draws.append(auc)
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return f"{point:.3f} ({lo:.3f}-{hi:.3f})"


def app_answers(model: Path, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(refused, sent to a doctor) per image, as the app answers it."""
    predictor, knowledge = Predictor.from_path(model), load_knowledge()
    refused, referred = np.zeros(len(paths), bool), np.zeros(len(paths), bool)
    for start in range(0, len(paths), BATCH):
        for j, r in enumerate(predictor.predict_batch(paths[start : start + BATCH])):
            i = start + j
            if isinstance(r, ImageError) or r.status != "ok":
                refused[i] = True
            else:
                referred[i] = advise(r, knowledge).level == "see_doctor"
    return refused, referred


def row(name: str, model: Path, data: str, split: str | None, work: Path, label: str) -> list[str]:
    """The set's line, then one per source when it holds several (a multi-folder split's test part)."""
    m = evaluate(Path(data), work, model, split=split, progress=False).metrics
    # The images evaluate scored, with their labels in its scoring taxonomy: read once, for both halves of the row.
    pred = pd.read_csv(work / "predictions.csv")
    labels = m["labels"]
    y = pred["label"].map({c: i for i, c in enumerate(labels)}).to_numpy()
    refused, referred = app_answers(model, [str(p) for p in pred["path"]])
    held = m["extra"].get("held_in_images", 0)

    def line(what: str, rows: np.ndarray, figures: dict) -> str:
        mel, nv = (pred["label"] == "mel").to_numpy() & rows, (pred["label"] == "nv").to_numpy() & rows
        ci = (figures.get("ci95") or {}).get("balanced_accuracy")
        ba = f"{figures['balanced_accuracy']:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
        auc = auc_interval(y[rows], pred.loc[rows, labels].to_numpy(), labels)
        return (
            f"| {label} | {what} | {rows.sum()} ({mel.sum()} mel, {nv.sum()} nv) | "
            f"{share(referred, mel)} | {share(referred, nv)} | {share(refused, rows)} | "
            f"{ba} | {auc} | {held or ''} |"
        )

    lines = [line(name, np.ones(len(pred), bool), m)]
    for source, figures in (m.get("by_source") or {}).items():
        lines.append(line(f"{name}: {source}", (pred["source"].astype(str) == source).to_numpy(), figures))
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", action="append", required=True, metavar="[NAME=]FILE", help="a model file (repeat for several)"
    )
    ap.add_argument(
        "--set", action="append", required=True, metavar="NAME=DATA[:SPLIT]", help="a labelled set (repeat)"
    )
    ap.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = ap.parse_args(argv)
    sets = []
    for spec in args.set:
        name, sep, data = spec.partition("=")
        if not sep:
            ap.error(f"--set {spec!r}: expected NAME=DATA[:SPLIT]")
        path, _, split = data.rpartition(":")
        if split not in ("train", "val", "test"):
            path, split = data, ""
        sets.append((name, path, split or None))
    lines = [
        "# Generalization: the app's answers and the model's ranking, set by set",
        "",
        "`bench/generalization.py`. Melanomas and nevi *sent to a doctor* follow the app's own advice on the images "
        "it answers (a refused image is not sent); *refused*: image quality or not a lesion. Balanced accuracy and the "
        "melanoma-vs-nevus AUC score every image (`dermsight evaluate`). 95% intervals: Wilson for shares, "
        "lesion-grouped bootstrap for balanced accuracy, bootstrap over images for the AUC. *Trained-on*: images of "
        "the set in the model's own training or validation split.",
        "",
        "| model | set | images | melanomas sent to a doctor | nevi sent to a doctor | refused | balanced accuracy "
        "| mel vs nv AUC | trained-on |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for j, spec in enumerate(args.model):
            label, sep, file = spec.partition("=")
            model = Path(file if sep else spec)
            label = label if sep else model.name
            for k, (name, data, split) in enumerate(sets):
                for text in row(name, model, data, split, Path(tmp) / f"{j}_{k}", label):
                    lines.append(text)
                    print(text, flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
