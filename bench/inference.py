"""Serving speed of a model: PyTorch eager vs ONNX Runtime fp32 vs ONNX Runtime int8 (dynamic and static), in one run.

    .venv/bin/python bench/inference.py                        # default model, all cores, real images if present
    .venv/bin/python bench/inference.py --threads 1 --data ../shared/data/ham10000   # + scores on held-out images
    .venv/bin/python bench/inference.py --threads 1 --model runs/ms_plain/best.safetensors --data runs/ms_plain \\
        --split test

For each backend: batch-1 latency (p50 and p95 over --repeats calls) and throughput at --batch images per call, of the
network alone on preprocessed inputs (the part the backends differ in), with ratios to eager and to ONNX Runtime
fp32. The backends are timed in turns (a slice of each backend's calls per round), so a change in the machine's load
during the run falls on all of them alike. One more row times `Predictor.predict` end to end (decode, quality gate,
preprocessing, network, OOD gate) with the default backend.

The int8 models: onnxruntime's dynamic quantisation of the fp32 export, and its static QDQ quantisation
(`export.quantize_static_int8`), calibrated on --calibration images that are never scored: with --data, images the
model was trained on (the `train` split of a manifest or run, or the model's held-in images of a dataset folder);
without, other images of --images (or synthetic ones).

With --data (labelled images: a split manifest or training run folder, scored on its --split, default val; or a
dataset folder / labels.csv, scored on the images the model was neither trained nor selected on): each backend's
accuracy, balanced accuracy and top-1 agreement with eager and with fp32, how far the int8 models move the
``features`` output, and, for a model with an out-of-distribution gate, its score and decisions. The last lines say
whether static int8 meets the bar for serving it (`BAR_*`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import balanced_accuracy_score

from dermsight.data.manifest import image_ids, read_labels, run_split
from dermsight.evaluation.run import read_labelled
from dermsight.inference.backends import OnnxRunner, TorchRunner
from dermsight.inference.export import (
    CALIBRATION_IMAGES,
    export_onnx,
    model_inputs,
    quantize_int8,
    quantize_static_int8,
    synthetic_images,
)
from dermsight.inference.predictor import Predictor, resolve_threads
from dermsight.models.bundle import default_model_path, load_model
from dermsight.models.meta import ModelMeta

REAL_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000_fullres_sample" / "images"
EAGER, FP32, DYNAMIC, STATIC = (
    "PyTorch eager",
    "ONNX Runtime fp32",
    "ONNX Runtime int8 dynamic",
    "ONNX Runtime int8 static",
)
# What static int8 must show against fp32 before it could serve: the same top class on this share of images, balanced
# accuracy within this much, and a faster batch-1 p50.
BAR_AGREEMENT = 0.99
BAR_BALANCED_ACCURACY = 0.005
ROUNDS = 5


def timed(fn: Callable[[], object], calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def interleaved(fns: dict[str, Callable[[], object]], calls: int, warmup: int) -> dict[str, list[float]]:
    """``calls`` timings of each function, taken in ROUNDS turns (every function's slice in each round) after
    ``warmup`` untimed calls each (the first calls pay for kernel selection and memory pools)."""
    for fn in fns.values():
        timed(fn, warmup)
    out: dict[str, list[float]] = {name: [] for name in fns}
    per_round = max(1, -(-calls // ROUNDS))
    for _ in range(ROUNDS):
        for name, fn in fns.items():
            out[name] += timed(fn, per_round)
    return out


def p95(xs: list[float]) -> float:
    return float(np.percentile(xs, 95))


def data_split(
    data: str, split: str | None, meta: ModelMeta, max_data: int, n_calibration: int
) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """The labelled images to score and the (disjoint) images to calibrate static int8 on, and a description.

    A manifest or run with a `split` column: score ``split`` (default val), calibrate on `train`. A dataset folder
    or labels.csv: score the images the model was neither trained nor selected on, calibrate on some it was trained
    or selected on (`SplitRecord.held_in`)."""
    source = run_split(data) or Path(data)
    if source.suffix == ".csv" and source.is_file() and {"path", "split"} <= set(pd.read_csv(source, nrows=0)):
        scored, _ = read_labelled(Path(data), split or "val")
        pool, _ = read_labelled(Path(data), "train")
        how = f"scored on its {split or 'val'} split, calibrated on {{n}} of its train split"
    else:
        whole, _ = read_labelled(Path(data))
        held = set(meta.split.overlap(image_ids(whole))) if meta.split is not None else set()
        inside = np.array([i in held for i in image_ids(whole)], bool)
        scored, pool = whole[~inside], whole[inside]
        how = "scored on the images the model was not trained or selected on, calibrated on {n} it was trained on"
        if pool.empty:  # a model without a record of its split: calibrate on a part of the data kept out of scoring
            pool = whole.sample(min(n_calibration, len(whole) // 4), random_state=1)
            scored = whole.drop(pool.index)
            how = "scored on images of it, calibrated on {n} others of it (the model records no split)"
    calibration = pool.sample(min(n_calibration, len(pool)), random_state=1)
    scored = scored[~scored["path"].astype(str).isin(set(calibration["path"].astype(str)))]
    scored = scored.sample(min(max_data, len(scored)), random_state=0)
    return scored.reset_index(drop=True), calibration.reset_index(drop=True), how.format(n=len(calibration))


def scores(run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    outs = [run(x[i : i + 32]) for i in range(0, len(x), 32)]
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model file (default: the bundled default model)")
    ap.add_argument("--threads", type=int, help="intra-op threads for every backend (default: all cores)")
    ap.add_argument("--repeats", type=int, default=50, help="batch-1 calls timed per backend (default 50)")
    ap.add_argument("--batch", type=int, default=16, help="images per call for throughput (default 16)")
    ap.add_argument("--images", default=str(REAL_IMAGES), help="folder of images to time on (default: synthetic "
                    "if the full-resolution sample is absent)")  # fmt: skip
    ap.add_argument("--data", help="labelled images: report each backend's scores on them (see above)")
    ap.add_argument("--split", help="the split of a --data manifest or run to score (default val)")
    ap.add_argument("--max-data", type=int, default=500, help="at most this many --data images (default 500)")
    ap.add_argument("--calibration", type=int, default=CALIBRATION_IMAGES,
                    help=f"images static int8 is calibrated on (default {CALIBRATION_IMAGES})")  # fmt: skip
    args = ap.parse_args()

    load = os.getloadavg()[0]
    threads = resolve_threads(args.threads)
    torch.set_num_threads(threads)
    model_path = Path(args.model) if args.model else default_model_path()
    model, meta = load_model(model_path)
    folder = Path(args.images)
    all_files = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
    files = all_files[: args.batch]
    sources = files or list(synthetic_images(args.batch, size=(600, 450)))
    x = model_inputs(meta, sources)
    batch = np.concatenate([x] * (args.batch // len(x) + 1))[: args.batch]
    what = f"{len(files)} real images from {folder}" if files else "synthetic images"

    scored = None
    if args.data:
        scored, calibration, how = data_split(args.data, args.split, meta, args.max_data, args.calibration)
        xc = model_inputs(meta, list(calibration["path"]))
    elif all_files[args.batch :]:
        xc = model_inputs(meta, all_files[args.batch :][: args.calibration])
        how = f"calibrated on {len(xc)} images of {folder} other than those timed"
    else:
        xc = model_inputs(meta, list(synthetic_images(args.calibration, size=(600, 450), seed=1)))
        how = f"calibrated on {len(xc)} synthetic images other than those timed"

    tmp = Path(tempfile.mkdtemp(prefix="dermsight-bench-"))
    fp32 = export_onnx(model, meta, tmp / "model.onnx")
    t0 = time.perf_counter()
    static = quantize_static_int8(fp32, tmp / "model.static.onnx", xc)
    quantise_s = time.perf_counter() - t0
    runners = {
        EAGER: TorchRunner(model),
        FP32: OnnxRunner(fp32, threads),
        DYNAMIC: OnnxRunner(quantize_int8(fp32, tmp / "model.int8.onnx"), threads),
        STATIC: OnnxRunner(static, threads),
    }
    lat = interleaved({n: (lambda r=r: r(x[:1])) for n, r in runners.items()}, args.repeats, warmup=5)
    thr = interleaved({n: (lambda r=r: r(batch)) for n, r in runners.items()}, max(ROUNDS, args.repeats // 10), 2)
    rows = {
        n: (1000 * statistics.median(lat[n]), 1000 * p95(lat[n]), args.batch / statistics.median(thr[n]))
        for n in runners
    }

    predictor = Predictor.from_path(model_path, threads=threads)
    timed(lambda: predictor.predict(sources[0]), 3)
    e2e = timed(lambda: predictor.predict(sources[0]), max(10, args.repeats // 2))

    print(
        f"\nmodel: {model_path.name} ({meta.network}, input {meta.input_size} px); {threads} thread(s), "
        f"{os.cpu_count()} CPU(s) visible, load average {load:.1f} at the start (other work on the machine slows "
        f"every row, eager PyTorch with more than one thread most); torch {torch.__version__}; timed on {what}; "
        f"static int8 {how} ({quantise_s:.0f} s to quantise)"
    )
    e, f = rows[EAGER], rows[FP32]
    print(
        "\n| backend | batch-1 p50 ms | p95 ms | p50 vs eager | p50 vs fp32 "
        f"| images/s at batch {args.batch} | vs eager | vs fp32 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, (p50, p95_, ips) in rows.items():
        print(
            f"| {name} | {p50:.1f} | {p95_:.1f} | {p50 / e[0]:.2f}x | {p50 / f[0]:.2f}x "
            f"| {ips:.0f} | {ips / e[2]:.2f}x | {ips / f[2]:.2f}x |"
        )
    print(
        f"| predict() end to end ({predictor.backend}, decode + gates + network) | "
        f"{1000 * statistics.median(e2e):.1f} | {1000 * p95(e2e):.1f} | | | | | |"
    )

    if scored is None:
        return 0
    y = read_labels(scored, meta)
    xv = model_inputs(meta, list(scored["path"]))
    outs = {name: scores(run, xv) for name, run in runners.items()}
    top = {name: logits.argmax(1) for name, (logits, _) in outs.items()}
    with warnings.catch_warnings():  # a class no image of the sample has, predicted for one: its recall is left out
        warnings.simplefilter("ignore", UserWarning)
        bacc = {name: balanced_accuracy_score(y, p) for name, p in top.items()}
    print(f"\nscores on {len(scored)} images of {args.data} ({how})")
    print("\n| backend | accuracy | balanced accuracy | vs fp32 | top-1 agreement with eager | with fp32 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, p in top.items():
        print(
            f"| {name} | {np.mean(p == y):.4f} | {bacc[name]:.4f} | {bacc[name] - bacc[FP32]:+.4f} | "
            f"{np.mean(p == top[EAGER]):.4f} | {np.mean(p == top[FP32]):.4f} |"
        )
    features = outs[FP32][1]
    norm = np.maximum(np.linalg.norm(features, axis=1), 1e-12)
    gate = predictor.gate
    base = gate.score(features) if gate is not None else np.zeros(len(features))
    head = "\n| backend | features: relative change vs fp32, mean | max |"
    if gate is not None:
        head += (
            f" OOD score: median | mean abs change vs fp32 | max | lesions the gate refuses (score > "
            f"{gate.threshold:.1f}) | decisions changed vs fp32 |"
        )
    print(head)
    print("|---|---:|---:|" + ("---:|---:|---:|---:|---:|" if gate is not None else ""))
    for name in (FP32, EAGER, DYNAMIC, STATIC):
        rel = np.linalg.norm(outs[name][1] - features, axis=1) / norm
        line = f"| {name} | {rel.mean():.4f} | {rel.max():.4f} |"
        if gate is not None:
            s = gate.score(outs[name][1])
            change = np.abs(s - base)
            refused = s > gate.threshold
            line += (
                f" {np.median(s):.1f} | {change.mean():.2f} | {change.max():.2f} | {refused.sum()} of {len(s)} | "
                f"{np.sum(refused != (base > gate.threshold))} |"
            )
        print(line)

    agreement = float(np.mean(top[STATIC] == top[FP32]))
    delta = bacc[STATIC] - bacc[FP32]
    faster = rows[STATIC][0] < rows[FP32][0]
    meets = agreement >= BAR_AGREEMENT and abs(delta) <= BAR_BALANCED_ACCURACY and faster
    print(
        f"\nstatic int8 vs fp32: top-1 agreement {agreement:.4f} (bar >= {BAR_AGREEMENT}), balanced accuracy "
        f"{delta:+.4f} (bar within {BAR_BALANCED_ACCURACY}), batch-1 p50 {rows[STATIC][0] / rows[FP32][0]:.2f}x fp32 "
        f"(bar < 1): {'MEETS' if meets else 'does NOT meet'} the bar for serving"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
