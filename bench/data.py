"""Data-layer throughput: manifest building and the decode-once cache, draft-mode decoding against a plain full
decode-then-resize, measured in one run so the ratio is meaningful on a shared, noisy machine.

    .venv/bin/python bench/data.py [--data ../shared/data] [--repeats 3]

Prints a Markdown table (images/s, median of repeats) with each draft figure's speed-up over plain decoding.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from dermsight.data.cache import build_cache
from dermsight.data.manifest import build_manifest


def make_image(path: Path, size: tuple[int, int], seed: int, fmt: str) -> Path:
    """Smooth noise, compressible like a photo (pure noise would make unrealistically large JPEGs)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(60, 220, (size[1] // 50, size[0] // 50, 3), dtype=np.uint8)
    Image.fromarray(small).resize(size, Image.Resampling.BICUBIC).save(path, format=fmt, quality=90)
    return path


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ham, full = args.data / "ham10000", args.data / "ham10000_fullres_sample"

    rows = []
    t = timed(lambda: build_manifest(ham, verify="full", progress=False), args.repeats)
    ham_m = build_manifest(ham, verify="none", progress=False).manifest
    rows.append(("manifest, full check (decode at 1/8)", "HAM10000 200x150", len(ham_m), t, None))
    t = timed(lambda: build_manifest(ham, verify="header", progress=False), args.repeats)
    rows.append(("manifest, headers only", "HAM10000 200x150", len(ham_m), t, None))

    full_m = build_manifest(full, verify="none", progress=False).manifest
    # The 124 full-resolution images are repeated so each timing covers a few seconds of work.
    full_many = full_m.loc[full_m.index.repeat(20)].reset_index(drop=True)
    full_many["path"] = full_many["path"].astype(str)
    # Phone photos are far larger than dermoscopy exports; there JPEG draft mode decodes at 1/8 scale.
    tmp = tempfile.TemporaryDirectory()
    big = [str(make_image(Path(tmp.name) / f"{i}.jpg", size=(4000, 3000), seed=i, fmt="JPEG")) for i in range(40)]
    big_m = pd.DataFrame({"path": big, "label": "nv"})
    cases = [
        ("HAM10000 200x150", ham_m, 224),
        ("HAM10000 200x150", ham_m, 64),
        ("600x450 originals", full_many, 224),
        ("synthetic 4000x3000 photos", big_m, 224),
    ]
    for name, m, size in cases:
        per = {}
        for draft in (False, True):

            def run(m=m, size=size, draft=draft) -> None:
                with tempfile.TemporaryDirectory() as d:
                    build_cache(m, size, root=Path(d), draft=draft, progress=False)

            per[draft] = timed(run, args.repeats)
        rows.append((f"cache at {size}px, plain decode+resize", name, len(m), per[False], None))
        rows.append((f"cache at {size}px, draft decode", name, len(m), per[True], per[False] / per[True]))

    print("| step | images | n | seconds | images/s | speed-up vs plain |")
    print("|---|---|---:|---:|---:|---:|")
    for step, name, n, t, ratio in rows:
        r = f"{ratio:.2f}x" if ratio else ""
        print(f"| {step} | {name} | {n} | {t:.2f} | {n / t:,.0f} | {r} |")


if __name__ == "__main__":
    main()
