"""Does an exponential moving average of the weights (`ema_decay`) help? Both checkpoints of the same runs compared.

    python bench/ema.py --score runs/ema/*_seed*/             # write each run's scores.npz (GPU or CPU)
    .venv/bin/python bench/ema.py --report runs/ema --out bench/ema.md

A run trained with ``ema_decay`` keeps two checkpoints of one trajectory (the average does not change training):
``best.safetensors``, the average at its best val epoch (what the run serves), and ``best_raw.safetensors``, the raw
weights at theirs (what it would have kept without the average). ``--score`` computes the val and test logits of
both, with the model's own eval preprocessing, into ``RUN/scores.npz``. ``--report`` then tabulates, under plain
argmax, each run and the ensembles (mean of logits) of each seed's runs across backbones, for both checkpoints. The
test columns are for the record; any choice between them is made on val.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

CHECKPOINTS = ("best", "best_raw")
SPLITS = ("val", "test")


def score(run: Path) -> Path:
    """Val/test logits of both checkpoints of ``run`` into ``run/scores.npz``."""
    import pandas as pd
    import torch
    from torch.utils.data import DataLoader

    from dermsight.data.split import split_changes
    from dermsight.inference.transforms import EvalPreset
    from dermsight.models.bundle import load_model
    from dermsight.training import TrainConfig, predict, prepare_data
    from dermsight.training.data import CachedImages, subset

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = TrainConfig.from_yaml(run / "config.yaml")
    data = prepare_data(cfg, progress=False)  # draws the split again from the config: it must be the run's own
    changes = split_changes(pd.read_csv(run / "split.csv", dtype=str), data.manifest)
    if changes["moved"] or changes["added"]:
        raise SystemExit(f"{run}: the data no longer gives the run's split ({changes}); restore it to score the run")
    out: dict[str, np.ndarray] = {}
    for ck in CHECKPOINTS:
        path = run / f"{ck}.safetensors"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: was {run} trained with ema_decay?")
        model, meta = load_model(path, device=dev)
        model = model.to(memory_format=torch.channels_last)
        tf = EvalPreset.from_meta(meta)
        for split in SPLITS:
            df = subset(data, split)
            rows, y = df["cache_row"].to_numpy(), df["target"].to_numpy()
            loader = DataLoader(CachedImages(data.cache, rows, y, tf, cfg.colour_constancy), batch_size=128)
            logits, targets = predict(model, loader, dev, cfg.amp, False)
            out[f"{ck}_{split}_logits"], out[f"{split}_y"] = logits, targets
            out[f"{split}_images"] = df["image_id"].to_numpy(dtype=str)
    np.savez_compressed(run / "scores.npz", **out)
    return run / "scores.npz"


def metrics(logits: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(balanced accuracy, accuracy, macro one-vs-rest AUC) under plain argmax."""
    from scipy.special import softmax
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

    pred = logits.argmax(1)
    auc = roc_auc_score(y, softmax(logits, 1), multi_class="ovr", average="macro")
    return float(balanced_accuracy_score(y, pred)), float(accuracy_score(y, pred)), float(auc)


def _cells(m: tuple[float, float, float]) -> str:
    return " | ".join(f"{v:.3f}" for v in m)


def report(root: Path) -> str:
    runs = {}
    for f in sorted(root.glob("*_seed*/scores.npz")):
        found = re.fullmatch(r"(.+)_seed(\d+)", f.parent.name)
        if found:
            runs[(found[1], int(found[2]))] = dict(np.load(f))
    if not runs:
        raise SystemExit(f"no <arch>_seed<N>/scores.npz under {root}: run --score first")
    any_run = next(iter(runs.values()))
    for split in SPLITS:  # ensembles average logits row by row: every run must list the same images in order
        ids = any_run[f"{split}_images"]
        if any(not np.array_equal(r[f"{split}_images"], ids) for r in runs.values()):
            raise SystemExit(f"the runs under {root} were scored on different {split} splits")
    head = (
        "| {} | checkpoint | val balanced acc. | val accuracy | val macro AUC | test balanced acc. | test accuracy "
        "| test macro AUC |"
    )
    rule = "|---|---|---:|---:|---:|---:|---:|---:|"
    lines = [head.format("run"), rule]
    for (arch, seed), r in runs.items():
        for ck in CHECKPOINTS:
            row = [metrics(r[f"{ck}_{s}_logits"], r[f"{s}_y"]) for s in SPLITS]
            lines.append(f"| {arch} seed {seed} | {ck} | {_cells(row[0])} | {_cells(row[1])} |")
    lines += ["", head.format("ensemble (mean of logits)"), rule]
    seeds = sorted({s for _, s in runs})
    for group in [[s] for s in seeds] + ([seeds] if len(seeds) > 1 else []):
        members = [r for (_, s), r in runs.items() if s in group]
        archs = sorted({a for a, s in runs if s in group})
        name = f"{len(members)} runs, seed{'s' if len(group) > 1 else ''} {', '.join(map(str, group))}"
        for ck in CHECKPOINTS:
            row = [metrics(np.mean([r[f"{ck}_{s}_logits"] for r in members], 0), any_run[f"{s}_y"]) for s in SPLITS]
            lines.append(f"| {name} ({' + '.join(archs)}) | {ck} | {_cells(row[0])} | {_cells(row[1])} |")
    diffs = {
        s: [
            metrics(r[f"best_{s}_logits"], r[f"{s}_y"])[0] - metrics(r[f"best_raw_{s}_logits"], r[f"{s}_y"])[0]
            for r in runs.values()
        ]
        for s in SPLITS
    }
    summary = (
        f"Average minus raw weights, balanced accuracy, over the {len(runs)} runs: val mean "
        f"{np.mean(diffs['val']):+.3f} (higher in {sum(d > 0 for d in diffs['val'])} of {len(runs)}), test mean "
        f"{np.mean(diffs['test']):+.3f} (higher in {sum(d > 0 for d in diffs['test'])} of {len(runs)})."
    )
    return "\n".join(lines) + "\n\n" + summary + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--score", nargs="+", type=Path, metavar="RUN", help="write RUN/scores.npz for each run")
    ap.add_argument("--report", type=Path, metavar="DIR", help="tabulate DIR/<arch>_seed<N>/scores.npz")
    ap.add_argument("--out", type=Path, help="write the report here (default: print it)")
    ap.add_argument("--preamble", default="", help="text put above the tables")
    args = ap.parse_args()
    if not args.score and not args.report:
        ap.error("give --score RUN... and/or --report DIR")
    for run in args.score or ():
        print(score(run), flush=True)
    if args.report:
        text = report(args.report)
        text = (args.preamble.strip() + "\n\n" if args.preamble.strip() else "") + text
        if args.out:
            args.out.write_text(text)
        print(text)


if __name__ == "__main__":
    main()
