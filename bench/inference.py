"""Serving speed of the default model: PyTorch eager vs ONNX Runtime fp32 vs ONNX Runtime int8, in one run.

    .venv/bin/python bench/inference.py                        # default model, all cores, real images if present
    .venv/bin/python bench/inference.py --threads 1 --model runs/default/model.safetensors
    .venv/bin/python bench/inference.py --data runs/default/split.csv   # + accuracy of each backend on val images

For each backend: batch-1 latency (p50 and p95 over --repeats calls) and throughput at --batch images per call, of the
network alone on preprocessed inputs (the part the backends differ in), with ratios to eager. One more row times
`Predictor.predict` end to end (decode, quality gate, preprocessing, network, OOD gate) with the default backend. The
int8 model is onnxruntime's dynamic quantisation of the fp32 export; its accuracy change is printed when --data is
given (the model's `val` split, or any labelled manifest).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dermsight.data.manifest import read_labels
from dermsight.inference.backends import OnnxRunner, TorchRunner
from dermsight.inference.export import export_onnx, model_inputs, quantize_int8, synthetic_images
from dermsight.inference.predictor import Predictor, resolve_threads
from dermsight.models.bundle import default_model_path, load_model

REAL_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000_fullres_sample" / "images"


def timings(fn: Callable[[], object], repeats: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):  # the first calls pay for kernel selection and memory pools
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def p95(xs: list[float]) -> float:
    return float(np.percentile(xs, 95))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model file (default: the bundled default model)")
    ap.add_argument("--threads", type=int, help="intra-op threads for every backend (default: all cores)")
    ap.add_argument("--repeats", type=int, default=50, help="batch-1 calls timed per backend (default 50)")
    ap.add_argument("--batch", type=int, default=16, help="images per call for throughput (default 16)")
    ap.add_argument("--images", default=str(REAL_IMAGES), help="folder of images to time on (default: synthetic "
                    "if the full-resolution sample is absent)")  # fmt: skip
    ap.add_argument("--data", help="labelled manifest: report each backend's accuracy on its val split")
    ap.add_argument("--max-data", type=int, default=500, help="at most this many --data images (default 500)")
    args = ap.parse_args()

    load = os.getloadavg()[0]
    threads = resolve_threads(args.threads)
    torch.set_num_threads(threads)
    model_path = Path(args.model) if args.model else default_model_path()
    model, meta = load_model(model_path)
    folder = Path(args.images)
    files = sorted(folder.glob("*.jpg"))[: args.batch] if folder.is_dir() else []
    sources = files or list(synthetic_images(args.batch, size=(600, 450)))
    x = model_inputs(meta, sources)
    batch = np.concatenate([x] * (args.batch // len(x) + 1))[: args.batch]
    what = f"{len(files)} real images from {folder}" if files else "synthetic images"

    tmp = Path(tempfile.mkdtemp(prefix="dermsight-bench-"))
    fp32 = export_onnx(model, meta, tmp / "model.onnx")
    int8 = quantize_int8(fp32, tmp / "model.int8.onnx")
    runners = {
        "PyTorch eager": TorchRunner(model),
        "ONNX Runtime fp32": OnnxRunner(fp32, threads),
        "ONNX Runtime int8": OnnxRunner(int8, threads),
    }
    rows = []
    for name, run in runners.items():
        lat = timings(lambda run=run: run(x[:1]), args.repeats)
        thr = timings(lambda run=run: run(batch), max(3, args.repeats // 10), warmup=2)
        rows.append((name, 1000 * statistics.median(lat), 1000 * p95(lat), args.batch / statistics.median(thr)))

    predictor = Predictor.from_path(model_path, threads=threads)
    e2e = timings(lambda: predictor.predict(sources[0]), max(10, args.repeats // 2), warmup=3)

    print(
        f"\nmodel: {model_path.name} ({meta.network}, "
        f"input {meta.input_size} px); {threads} thread(s), "
        f"{os.cpu_count()} CPU(s) visible, load average {load:.1f} at the start (other work on the machine slows "
        f"every row, eager PyTorch with more than one thread most); torch {torch.__version__}; timed on {what}"
    )
    eager = rows[0]
    print(f"\n| backend | batch-1 p50 ms | p95 ms | p50 vs eager | images/s at batch {args.batch} | vs eager |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, p50, p95_, ips in rows:
        print(f"| {name} | {p50:.1f} | {p95_:.1f} | {p50 / eager[1]:.2f}x | {ips:.0f} | {ips / eager[3]:.2f}x |")
    print(
        f"| predict() end to end ({predictor.backend}, decode + gates + network) | "
        f"{1000 * statistics.median(e2e):.1f} | {1000 * p95(e2e):.1f} | | | |"
    )

    if args.data:
        df = pd.read_csv(args.data, dtype={"path": str})
        if "split" in df.columns:
            df = df[df["split"] == "val"]
        df = df.sample(min(args.max_data, len(df)), random_state=0)
        y = read_labels(df, meta)
        xv = model_inputs(meta, list(df["path"]))
        preds = {name: np.concatenate([run(xv[i : i + 64])[0] for i in range(0, len(xv), 64)]).argmax(1)
                 for name, run in runners.items()}  # fmt: skip
        base = preds["PyTorch eager"]
        print(f"\naccuracy on {len(df)} images of {args.data}:")
        for name, p in preds.items():
            print(f"- {name}: accuracy {np.mean(p == y):.4f}, top-1 agreement with eager {np.mean(p == base):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
