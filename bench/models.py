"""Backbone comparison on one lesion-grouped split: quality, size, CPU latency, training time, weight source.

    .venv/bin/python bench/models.py --out bench/models.md                       # train + score every backbone
    .venv/bin/python bench/models.py --out bench/models.md --epochs 12 --device cuda
    .venv/bin/python bench/models.py --measure-only --out bench/models.md        # params and CPU latency only
    .venv/bin/python bench/models.py --collect runs/compare --out bench/models.md  # table from finished runs

Every backbone is trained by the same `dermsight.training.fit` with the same split (seed), input size, schedule and
class-weighted loss; it is selected on validation balanced accuracy and scored once on the test split. The weights
each run started from are read back from the saved model, so the table says honestly whether a backbone had ImageNet
weights (hub or offline) or started from random initialisation because no weights were reachable.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from dermsight.models.bundle import load_model
from dermsight.models.factory import WeightsError, create_model
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


def train_one(arch: str, base: TrainConfig, root: Path) -> Path:
    cfg = replace(base, arch=arch, out=str(root / arch))
    try:
        create_model(arch, 7, weights=cfg.weights)
    except WeightsError as e:
        print(f"{arch}: {e}; training from random initialisation instead (recorded in the table)")
        cfg = replace(cfg, weights="none")
    t0 = time.perf_counter()
    fit(cfg)
    (root / arch / "train_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    return root / arch


def row_from_run(run: Path, size: int, threads: int = 1) -> dict:
    _, meta = load_model(run / "model.safetensors")
    test = json.loads((run / "test" / "metrics.json").read_text())
    secs = float((run / "train_seconds.txt").read_text()) if (run / "train_seconds.txt").exists() else float("nan")
    ci = test.get("ci95", {})
    return {
        "arch": meta.architecture,
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


def markdown(rows: list[dict], note: str) -> str:
    out = [
        "# Backbone comparison",
        "",
        note,
        "",
        "| backbone | balanced acc. (95% CI) | accuracy | macro AUC | params (M) | CPU latency, batch 1 (ms) "
        "| training (min) | input | starting weights |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in sorted(rows, key=lambda r: -(r.get("balanced_accuracy") or -1)):
        if r.get("balanced_accuracy") is None:
            q = "not trained | | "
        else:
            ci = r["bacc_ci"]
            q = f"{r['balanced_accuracy']:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
            q += f" | {r['accuracy']:.3f} | {r['macro_auc']:.3f}"
        minutes = r.get("train_min", float("nan"))
        train = "" if math.isnan(minutes) else f"{minutes:.0f}"
        out.append(
            f"| {r['arch']} | {q} | {r['params_m']:.1f} | {r['latency_ms']:.0f} | {train} | "
            f"{r.get('input_size', '')} | {r.get('weights', '')} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path("configs/default.yaml"), help="base training config")
    ap.add_argument("--archs", nargs="+", default=list(BACKBONES))
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
    args = ap.parse_args()

    base = TrainConfig.from_yaml(args.config, epochs=args.epochs, input_size=args.input_size, device=args.device)
    size = base.input_size
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
        if args.collect is None:
            for arch in args.archs:
                train_one(arch, base, args.root)
        root = args.collect or args.root
        runs = [root / a for a in args.archs if (root / a / "model.safetensors").exists()]
        rows = [row_from_run(r, size, args.threads) for r in runs]
        note = (
            f"Same lesion-grouped split (seed {base.split_seed}), schedule and class-weighted loss for every backbone "
            f"(base config {args.config}); selected on validation balanced accuracy, scored once on the test split. "
            f"CPU latency: PyTorch eager, batch 1, {args.threads} thread(s), median of 20, measured in the same run."
        )
    args.out.write_text(markdown(rows, note))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
