"""The web app's advice rule on labelled images: how many skin cancers it sends to a doctor, how many harmless spots.

    .venv/bin/dermsight evaluate --data runs/gpu_ema/split.csv --split val --out /tmp/val
    .venv/bin/dermsight evaluate --data runs/gpu_ema/split.csv --split test --out /tmp/test
    .venv/bin/python bench/triage.py --val /tmp/val --test /tmp/test --out bench/triage.md

Each row of evaluate's predictions.csv (the served, calibrated probabilities) goes through the app's own advice
(`dermsight.domain.triage.referred`) at each candidate threshold for "skin cancers and pre-cancers together"
(``--thresholds``). The threshold is chosen on ``--val`` alone: the highest candidate that sends at least
``--target`` of its melanomas to a doctor. ``--test`` is scored afterwards, for the record. "Referred" means the
advice says to see a doctor: a malignant or pre-malignant top class, an uncertain model, or the share above.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from dermsight.domain.classes import CONDITIONS
from dermsight.domain.knowledge import load_knowledge
from dermsight.domain.triage import CONCERN_PROBABILITY, referred

# Predictions.csv columns that are not class probabilities.
_NOT_CLASSES = {"image", "path", "source", "label", "predicted", "correct", "sent", "refused"}


def referrals(predictions: Path, thresholds: list[float]) -> tuple[pd.Series, dict[float, np.ndarray]]:
    """(label of each row, {threshold: whether the advice sends that row to a doctor})."""
    path = predictions / "predictions.csv" if predictions.is_dir() else predictions
    df = pd.read_csv(path)
    classes = [c for c in df.columns if c not in _NOT_CLASSES]
    unknown = [c for c in classes if c not in CONDITIONS]
    if "label" not in df or not classes or unknown:
        raise SystemExit(f"{path}: not a dermsight evaluate predictions.csv (columns {list(df.columns)})")
    probs, knowledge = df[classes].to_numpy(np.float64), load_knowledge()
    return df["label"], {t: referred(probs, classes, concern_at=t, knowledge=knowledge) for t in thresholds}


def table(labels: pd.Series, referred: dict[float, np.ndarray], chosen: float, split: str) -> list[str]:
    concerning = labels.map(lambda c: CONDITIONS[c].is_concerning).to_numpy()
    groups = {c: labels.eq(c).to_numpy() for c in ("mel", "bcc", "akiec")}
    groups |= {"cancers and pre-cancers": concerning, "harmless": ~concerning, "nv": labels.eq("nv").to_numpy()}
    groups["every image"] = np.ones(len(labels), bool)
    head = "| threshold | " + " | ".join(f"{g} (n={m.sum()})" for g, m in groups.items()) + " |"
    rows = [f"**{split}** referred to a doctor, by true class", "", head, "|" + "---|" * (len(groups) + 1)]
    for t, ref in referred.items():
        mark = " (chosen)" if t == chosen else ""
        cells = [f"{ref[m].mean():.1%}" if m.any() else "-" for m in groups.values()]
        rows.append(f"| {t:.0%}{mark} | " + " | ".join(cells) + " |")
    return [*rows, ""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--val", required=True, type=Path, help="evaluate's output folder (or predictions.csv) on val")
    ap.add_argument("--test", type=Path, help="the same on test, scored after the choice")
    ap.add_argument("--thresholds", default="0.30,0.25,0.20,0.15,0.10", help="candidates, comma-separated")
    ap.add_argument("--target", type=float, default=0.9, help="share of val melanomas to refer (default 0.9)")
    ap.add_argument("--out", type=Path, help="also write the tables to this Markdown file")
    args = ap.parse_args(argv)
    thresholds = sorted((float(t) for t in args.thresholds.split(",")), reverse=True)
    labels, referred = referrals(args.val, thresholds)
    mel = labels.eq("mel").to_numpy()
    if not mel.any():
        raise SystemExit(f"{args.val}: no melanoma to choose a threshold on")
    meeting = [t for t in thresholds if referred[t][mel].mean() >= args.target]
    chosen = meeting[0] if meeting else thresholds[-1]
    lines = [
        "# The web app's advice rule on labelled images",
        "",
        f"`bench/triage.py`: rows of `dermsight evaluate`'s predictions.csv through `dermsight.domain.triage.advise`. "
        f"Chosen on val: the highest threshold that refers at least {args.target:.0%} of melanomas: "
        f"**{chosen:.0%}** (the app uses {CONCERN_PROBABILITY:.0%}).",
        "",
        *table(labels, referred, chosen, f"val ({args.val})"),
    ]
    if args.test:
        lines += table(*referrals(args.test, thresholds), chosen, f"test ({args.test}), scored after the choice")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
