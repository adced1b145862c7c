"""Does the serving path show the model large images the way it saw its training images? Label-free, in one run.

    .venv/bin/python bench/detail.py --out bench/detail.md

The model trained on HAM10000's 200x150 JPEGs; people (and the external test set: 224 px square centre crops of the
600x450 originals) send larger images. `ham10000_fullres_sample` holds 124 of the training images at 600x450, so each
can be served from its original and compared with the model's own view of its 200x150 file (centre square straight
into the eval preset). For two inputs, the 224 px centre crops (made as `preprocess.square_crop` makes them, saved
as PNG) and the 600x450 files as uploaded, and two paths:

- ``before``: the serving path until 2026-11-27 (the baseline): decode to the eval size with a bilinear filter, then
  a second bilinear step to the training size, then the JPEG round trip (`match_detail`);
- ``serving``: the path as it is now (`preprocess.decode` at `decode_side`, then `to_model_input`).

Measured: the high-frequency share of the image the eval preset receives, as a ratio to the 200x150 file's (1.0 =
as sharp as the training images; quarter-Nyquist and up, grey level); total variation between the model's
probabilities and those on the 200x150 file (mean, with a paired 95% bootstrap interval of the change); how often
the top class differs; decode + preprocessing time per image (ratio to ``before``). No labels are read: most of these
images are training images, so their labels would say nothing.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from dermsight.data.images import load_rgb
from dermsight.data.problems import DataError
from dermsight.inference.preprocess import decode, decode_side, match_detail, square_crop
from dermsight.inference.quality import high_freq_share
from dermsight.inference.scoring import softmax
from dermsight.inference.transforms import EvalPreset, shades_of_gray
from dermsight.models.bundle import ModelLoadError, default_model_path, load_model
from dermsight.models.meta import ModelMeta

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def centre(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    return image[y0 : y0 + s, x0 : x0 + s]


def before(path: str, meta: ModelMeta) -> np.ndarray:
    """The previous serving path up to the eval preset: two bilinear steps, then the JPEG round trip."""
    image = load_rgb(path, short_side=max(meta.resize_size, 128), resample=Image.Resampling.BILINEAR)
    h, w = image.shape[:2]
    side = meta.source_short_side
    if side and min(h, w) > side:
        s = side / min(h, w)
        image = np.array(
            Image.fromarray(image).resize((round(w * s), round(h * s)), Image.Resampling.BILINEAR, reducing_gap=None)
        )
    if meta.source_jpeg_quality:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=int(meta.source_jpeg_quality))
        with Image.open(buf) as im:
            image = np.array(im.convert("RGB"))
    return shades_of_gray(image, meta.colour_constancy)


def serving(path: str, meta: ModelMeta) -> np.ndarray:
    """The serving path up to the eval preset, as it is: `preprocess.to_model_input` without its last step."""
    return shades_of_gray(match_detail(decode(path, decode_side(meta)), meta), meta.colour_constancy)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SHARED, help="folder holding ham10000/ and ham10000_fullres_sample/")
    ap.add_argument("--model", type=Path, help="model file (default: the bundled one)")
    ap.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    try:
        model, meta = load_model(args.model or default_model_path())
        full = pd.read_csv(args.data / "ham10000_fullres_sample" / "labels.csv")
    except (ModelLoadError, OSError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not meta.source_short_side:
        print("error: this model records no training-image size (source_short_side): nothing to match", file=sys.stderr)
        return 2
    model.eval()
    preset = EvalPreset.from_meta(meta)
    ids = list(full["image_id"])

    @torch.inference_mode()
    def probs(images: list[np.ndarray]) -> np.ndarray:
        x = torch.stack([preset(i) for i in images]).contiguous(memory_format=torch.channels_last)
        return softmax(model(x).float().numpy())

    small = [load_rgb(args.data / "ham10000" / "images" / f"{i}.jpg") for i in ids]
    reference = probs([centre(i) for i in small])
    ref_hf = np.array([high_freq_share(i) for i in small])
    uploads = [str(args.data / "ham10000_fullres_sample" / p) for p in full.image]
    paths: dict[str, list[str]] = {"600x450 files": uploads}
    tmp = tempfile.TemporaryDirectory()
    crops = []
    for i, p in zip(ids, paths["600x450 files"], strict=True):
        out = f"{tmp.name}/{i}.png"
        Image.fromarray(square_crop(load_rgb(p, draft=False))).save(out)
        crops.append(out)
    paths = {"224 px centre crops (PNG)": crops} | paths

    rng = np.random.default_rng(0)
    lines = [
        "| input | path | sharpness vs training file | prob. change (TV) | top class differs | time per image |",
        "|---|---|---|---|---|---|",
    ]
    for label, files in paths.items():
        tv: dict[str, np.ndarray] = {}
        times: dict[str, float] = {}
        for name, fn in (("before", before), ("serving", serving)):
            runs = []
            for _ in range(3):  # best of three: the machines are shared
                t = time.perf_counter()
                images = [fn(f, meta) for f in files]
                runs.append((time.perf_counter() - t) / len(files))
            times[name] = min(runs)
            p = probs(images)
            tv[name] = 0.5 * np.abs(p - reference).sum(1)
            sharp = statistics.fmean(np.array([high_freq_share(i) for i in images]) / ref_hf)
            differs = float((p.argmax(1) != reference.argmax(1)).mean())
            change = ""
            if name == "serving":
                d = tv[name] - tv["before"]
                boot = [d[rng.integers(0, len(d), len(d))].mean() for _ in range(2000)]
                lo, hi = np.percentile(boot, [2.5, 97.5])
                change = f" ({d.mean():+.3f}, 95% CI {lo:+.3f} to {hi:+.3f})"
            lines.append(
                f"| {label} | {name} | {sharp:.2f} | {tv[name].mean():.3f}{change} | {differs:.1%} "
                f"| {times[name] * 1e3:.1f} ms ({times[name] / times['before']:.2f}x) |"
            )
    footer = (
        f"\n{len(ids)} images of `ham10000_fullres_sample`; model `{(args.model or default_model_path()).name}` "
        f"({meta.network}, input {meta.input_size} px, training images' shorter side {meta.source_short_side} px, "
        f"JPEG quality {meta.source_jpeg_quality}); decode side {decode_side(meta)} px; one thread. Reference: the "
        "model's output on the centre square of each image's 200x150 file.\n"
    )
    table = "\n".join(lines) + "\n" + footer
    print(table)
    if args.out:
        args.out.write_text("# Serving-path detail against the training images (`bench/detail.py`)\n\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
