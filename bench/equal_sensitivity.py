"""Models compared at the same share of melanomas sent to a doctor: how many nevi each sends to get there.

    .venv/bin/python bench/equal_sensitivity.py --data ../shared/data/isic_archive_val224 \
        "M1 (bundled)=src/dermsight/assets/default.safetensors" "M6=runs/m6_weighted/model.safetensors"

The first model is the reference. Its share of melanomas sent to a doctor as the app answers (its referral threshold,
a concerning top class or an uncertain answer; a refused image is not sent) fixes the operating point, unless
``--share`` fixes it (``--share 0.82``: the sensitivity at which a published reader study compared algorithms with
dermatologists on ISIC Archive images). Every model is
then ranked by the app's concerning probability alone (the served probabilities of the classes that send people to a
doctor, summed; a refused image scores lowest and is never sent), and the threshold put at the highest value that
still sends at least that share of its melanomas (`evaluation.metrics.others_sent_at`); for the reference too, so
its two nevus columns can differ. The nevi sent there compare how well the models rank that set as the app answers
it, leaving aside where each one's threshold, fitted on its own validation split, happens to fall on it. Refusals
count: a nevus a model refuses is not sent, so the refused columns are shown beside.

Differences from the reference carry a paired 95% bootstrap interval: 1,000 resamples of the images (not lesions:
for sets with one image a lesion), the operating point held at the reference's share on the whole set, resamples in
which a model cannot reach that share left out (their number is printed). Each model is scored with `dermsight
evaluate --gates` (its predictions.csv carries ``sent`` and ``refused``), in its own taxonomy's labels.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from dermsight.data.problems import DataError
from dermsight.domain.classes import CONDITIONS
from dermsight.evaluation.metrics import others_sent_at
from dermsight.evaluation.run import evaluate

N_BOOT = 1000


def scored(model: Path, data: Path, work: Path) -> pd.DataFrame:
    """One row per melanoma or nevus: ``image``, ``mel`` (bool), ``sent`` (as the app answers) and ``score`` (the
    concerning probability, -inf where the app refused the image)."""
    evaluate(data, work, model, gates=True, progress=False)
    pred = pd.read_csv(work / "predictions.csv")
    concerning = [c for c in pred.columns if c in CONDITIONS and CONDITIONS[c].is_concerning]
    label = pred["label"].astype(str).str.lower()  # ISIC 2019's taxonomy writes MEL and NV
    pred, label = pred[label.isin(["mel", "nv"])], label[label.isin(["mel", "nv"])]
    if label.nunique() < 2:
        raise DataError(f"{data}: the comparison needs melanomas and nevi, and it holds {label.nunique()} of the two")
    score = pred[concerning].sum(axis=1).where(~pred["refused"], -np.inf)
    return pd.DataFrame(
        {
            "image": pred["image"],
            "mel": label.eq("mel"),
            "sent": pred["sent"],
            "refused": pred["refused"],
            "score": score,
        }
    ).reset_index(drop=True)


def auc(mel: np.ndarray, score: np.ndarray) -> float:
    # A refused image (-inf) ranks below every answered one; roc_auc_score needs finite numbers.
    return float(roc_auc_score(mel, np.where(np.isfinite(score), score, -1.0)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="a labelled set holding melanomas and nevi")
    ap.add_argument("models", nargs="+", metavar="NAME=FILE", help="model files; the first is the reference")
    ap.add_argument(
        "--share", type=float, help="share of melanomas to send, 0-1 (default: the reference's, as the app answers)"
    )
    args = ap.parse_args(argv)
    if args.share is not None and not 0 < args.share <= 1:
        ap.error(f"--share {args.share}: expected a share of melanomas above 0 and at most 1")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for j, spec in enumerate(args.models):
            name, sep, file = spec.partition("=")
            if not sep or not name or not file:
                ap.error(f"{spec!r}: expected NAME=FILE")
            try:
                runs.append((name, scored(Path(file), args.data, Path(tmp) / str(j))))
            except DataError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
    ref_name, ref = runs[0]
    for name, df in runs[1:]:
        if not df["image"].equals(ref["image"]):
            print(f"error: {name} scored other images than {ref_name}", file=sys.stderr)
            return 2
    mel = ref["mel"].to_numpy()
    share = float(ref["sent"][mel].mean()) if args.share is None else args.share
    point = f"{ref_name}'s share of melanomas sent as the app answers" if args.share is None else "the share asked"
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, len(ref), len(ref)) for _ in range(N_BOOT)]
    base = ref["score"].to_numpy()
    # The reference's side of every comparison, once: its nevi sent on the whole set and on each resample.
    ref_at = others_sent_at(base, mel, share)
    ref_draws = [others_sent_at(base[i], mel[i], share) for i in draws]
    print(f"{args.data}: {mel.sum()} melanomas, {(~mel).sum()} nevi. Operating point: {point}, {share:.1%}.\n")
    print(
        "| model | melanomas sent (app) | nevi sent (app) | melanomas / nevi refused | nevi sent at the same melanoma "
        f"share | difference from {ref_name} (95% CI) | concerning-probability AUC, mel vs nv |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, df in runs:
        score = df["score"].to_numpy()
        at = others_sent_at(score, mel, share)
        diffs = [
            a - b
            for i, b in zip(draws, ref_draws, strict=True)
            if b is not None and (a := others_sent_at(score[i], mel[i], share)) is not None
        ]
        lo, hi = np.percentile(diffs, [2.5, 97.5]) if diffs else (np.nan, np.nan)
        left_out = f"; {N_BOOT - len(diffs)} resamples left out" if len(diffs) < N_BOOT else ""
        diff = (
            ""
            if df is ref or at is None or ref_at is None
            else f"{at - ref_at:+.1%} ({lo:+.1%} to {hi:+.1%}{left_out})"
        )
        refused = df["refused"].to_numpy()
        print(
            f"| {name} | {df['sent'][mel].mean():.1%} | {df['sent'][~mel].mean():.1%} | "
            f"{refused[mel].mean():.1%} / {refused[~mel].mean():.1%} | "
            f"{'-' if at is None else f'{at:.1%}'} | {diff} | {auc(mel, score):.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
