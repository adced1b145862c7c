"""Turning an image into model input: one module owns it, for serving, evaluation, calibration and training's final
scores alike.

`decode` (the safe decoder of the data layer, shorter side brought near the training images'), `centre_band` for
absurd strips, `match_detail` (the training images' level of detail), the model's colour constancy
(`shades_of_gray`) and eval preset (`eval_input`), all in `to_model_input`; the eight `image_views`, and
`square_crop` (the shape of the external test sets).

Everything here is numpy and Pillow, no PyTorch: a serving install without it preprocesses exactly as training's
evaluation does. (`transforms.EvalPreset`, torchvision's version of `eval_input` for training's validation batches,
gives the same pixels up to rounding: at most 2/255 on a few pixels, `tests/unit/test_transforms.py`.)"""

from __future__ import annotations

import io
import math
import os
from typing import TypeAlias

import numpy as np
from PIL import Image

from dermsight.data.images import ImageError, kept_as_decoded, load_rgb, target_size
from dermsight.inference.quality import ANALYSIS_SIDE, QUALITY_THRESHOLDS, QualityThresholds
from dermsight.models.meta import ModelMeta


def square_crop(image: np.ndarray, size: int = 224) -> np.ndarray:
    """The centre square of ``image`` resized to ``size``: how the external test data was made from 4:3 frames."""
    h, w = image.shape[:2]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    return np.array(Image.fromarray(image[y0 : y0 + s, x0 : x0 + s]).resize((size, size), Image.Resampling.BICUBIC))


def dermatoscope_field(image: np.ndarray, diameter: float = 1.1) -> np.ndarray:
    """``image`` as a contact dermatoscope shows it: black outside a centred disc ``diameter`` times the shorter side
    across (corners black on a square crop; the sides and corners on a whole 4:3 frame). Many clinics' dermoscopy
    looks like this, HAM10000's rarely does, so the not-a-lesion threshold is set on such views too
    (`posthoc.calibrate`)."""
    h, w = image.shape[:2]
    yy, xx = np.ogrid[:h, :w]
    r = diameter * min(h, w) / 2
    outside = (yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2 > r * r
    out = np.array(image, copy=True)
    out[outside] = 0
    return out


Source: TypeAlias = str | os.PathLike | bytes | np.ndarray


# Filter for every serving-time downscale (decode, `match_detail`). Measured with `bench/detail.py` on the 124
# HAM10000 originals at 600x450 against the 200x150 files the model trained on (no labels read): two bilinear steps
# (to the eval size, then to the training size) served 224 px centre crops of them at 0.83 of the training files'
# high-frequency share and moved the model's probabilities by 0.060 (total variation) from its output on the training
# file, changing the top class of 5.6%; one Lanczos step from the file serves them at 1.04, 0.037 and 1.6% (600x450
# uploads: 0.053 and 4.8% with two steps, 0.022 and 0% with one), for 1-5% more decode time on such images; large
# files without draft decoding (a 4000x3000 PNG) take about 20% longer to decode.
SERVE_RESAMPLE = Image.Resampling.LANCZOS


# A decoded image up to this many times the decode side is kept as decoded (see `decode`). Resampling it to exactly
# the decode side first made blurred photos look sharper to the quality gate: with a Lanczos step to 150 px, 65 of the
# 124 600x450 originals blurred by a Gaussian of sigma 5 px passed it (37 with a bilinear decode to 192 px); measured
# on the draft decode as it is, 38.
DECODE_SLACK = 2


def _symmetries(image: np.ndarray) -> list[np.ndarray]:
    """The eight symmetries of an HxWx3 image as numpy views (no copies), identity first: `image_views`' order."""
    return [np.rot90(v, k, axes=(0, 1)) for v in (image, image[:, ::-1]) for k in range(4)]


def image_views(image: np.ndarray) -> list[np.ndarray]:
    """The eight symmetries of an HxWx3 image (rotations by 0/90/180/270 degrees, with and without a mirror), identity
    first, each made contiguous. Made from the decoded image, before the model's preprocessing (the JPEG round trip
    of `match_detail` and the eval preset are not exactly equivariant), so that a turned or mirrored photo yields the
    same eight model inputs, and the answers averaged over them are the same (`scoring.score_images`)."""
    return [np.ascontiguousarray(v) for v in _symmetries(image)]


def canonical(image: np.ndarray) -> np.ndarray:
    """``image`` turned and mirrored to a canonical orientation: of its eight `image_views`, the one whose shape and
    pixel bytes come first. A turned or mirrored copy of a photo has the same eight views, so it gets the same
    canonical image, and everything computed from that (the quality gate, one model view) cannot depend on how the
    photo was turned: rotation invariance by construction, at the cost of one view instead of eight. Dermoscopy has
    no up, and the networks train with random turns and mirrors, so any orientation is one they know."""
    # The same choice as min(image_views(image), key=lambda v: (v.shape, v.tobytes())), without copying eight
    # images: the bytes compare row by row, and the first row almost always decides.
    views = _symmetries(image)
    shape = min(v.shape for v in views)
    candidates = [v for v in views if v.shape == shape]
    for r in range(shape[0]):
        rows = [v[r].tobytes() for v in candidates]
        first = min(rows)
        candidates = [v for v, row in zip(candidates, rows, strict=True) if row == first]
        if len(candidates) == 1:
            break
    return np.ascontiguousarray(candidates[0])  # several left: the image is symmetric, and they are equal


def decode_side(meta: ModelMeta, quality: QualityThresholds = QUALITY_THRESHOLDS) -> int:
    """Shorter side images are decoded to (`decode` may keep up to twice as much): the training images' shorter side
    when the model records one below its eval resize (else the eval resize), so that a large image reaches the
    training detail in one resampling step (see `match_detail`); JPEG draft mode then skips most of the work on big
    photos, as `dermsight evaluate` does.
    Never below what the quality gate needs to see: its analysis size, and its minimum size (an image decoded
    smaller than that was smaller than that)."""
    target = meta.resize_size
    if meta.source_short_side:
        target = min(target, meta.source_short_side)
    return max(target, ANALYSIS_SIDE, quality.min_side)


def shrink(image: np.ndarray, side: int) -> np.ndarray:
    """``image`` with its shorter side scaled down (never up) to ``side`` in one `SERVE_RESAMPLE` step: the one
    serving-time downscale, for `decode` and `match_detail`."""
    h, w = image.shape[:2]
    size = target_size(w, h, side)
    if size == (w, h):
        return image
    return np.array(Image.fromarray(image).resize(size, SERVE_RESAMPLE, reducing_gap=None))


def decode(source: Source, side: int) -> np.ndarray:
    """HxWx3 uint8 RGB with the shorter side between ``side`` (never enlarged) and twice ``side``; raises
    `ImageError`.

    Files and bytes go through `load_rgb`, the decoder of the training data. Up to twice ``side`` the image is kept
    as decoded (JPEG draft mode lands there), and only larger ones are scaled down to ``side`` (Lanczos): the quality
    gate then measures sharpness on an image no resampling filter has touched, and `match_detail` takes the model's
    view down to the training detail in one step. Arrays (HxWx3 or HxW uint8) get the same rule.

    Images more than `MAX_ASPECT` times as long as wide are cut to that around their centre (`centre_band`) before
    anything else looks at them: the model sees the centre square only, and a 150x400000 strip held whole through
    the quality gate took `predict` to 2.1 GB.
    """
    if isinstance(source, np.ndarray):
        a = source
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        if a.ndim != 3 or a.shape[2] not in (3, 4) or a.dtype != np.uint8 or min(a.shape[:2]) < 1:
            raise ImageError(f"expected an HxWx3 uint8 RGB array, got shape {source.shape} of {source.dtype}")
        a = np.ascontiguousarray(centre_band(a)[..., :3])
        return a if kept_as_decoded(min(a.shape[:2]), side, DECODE_SLACK) else shrink(a, side)
    if isinstance(source, bytearray | memoryview):
        source = bytes(source)
    if not isinstance(source, bytes | str | os.PathLike):
        raise ImageError(f"cannot read an image from a {type(source).__name__}")
    image = load_rgb(source, short_side=side, resample=SERVE_RESAMPLE, slack=DECODE_SLACK)
    band = centre_band(image)
    return image if band is image else band.copy()  # a copy, so the whole strip is freed


# The longest side kept, in multiples of the shorter one (see `centre_band`).
MAX_ASPECT = 4


def centre_band(image: np.ndarray) -> np.ndarray:
    """``image`` cut to at most `MAX_ASPECT` times as long as it is wide, around its centre.

    The model sees only the centre square of an image (its eval preset resizes the shorter side and crops the
    centre, ``crop_pct`` <= 1), so this removes nothing it looks at; its pixels may still differ a little for such
    strips, since the JPEG round trip's 8x8 grid and the resampling grid start elsewhere (a mean of 0.05-0.2 in
    normalised units on noise, measured). It keeps absurd strips within what the JPEG round trip of `match_detail`
    can encode (65,500 px a side), which a 100000x128 PNG would exceed. Images up to 4:1 are returned as they are."""
    h, w = image.shape[:2]
    longest = min(h, w) * MAX_ASPECT
    if w > longest:
        x0 = (w - longest) // 2
        return image[:, x0 : x0 + longest]
    if h > longest:
        y0 = (h - longest) // 2
        return image[y0 : y0 + longest]
    return image


def match_detail(image: np.ndarray, meta: ModelMeta) -> np.ndarray:
    """Bring ``image`` to the level of detail of the model's training images: shorter side scaled down (never up) to
    ``meta.source_short_side``, then a JPEG round trip at ``meta.source_jpeg_quality`` (each step skipped when 0).

    Why: HAM10000's images are 200x150 JPEGs (quality 75), and a CNN trained on them learns their softness and their
    8x8 compression artefacts as part of what skin looks like. The same lesions at 600x450, or as 224 px crops of
    the originals, gave features far from those of their own 200x150 versions (an early checkpoint rejected 17% of
    them as not lesions, against 2% of validation images, and changed the top class of a third); after this step,
    2.4% and the same top class as the 200x150 file for most. The model never saw finer detail, so none is lost.
    The downscale is one Lanczos step from the decoded file (`decode`, `SERVE_RESAMPLE`): see there for why.
    """
    side, quality = meta.source_short_side, meta.source_jpeg_quality
    image = centre_band(image)
    if side:
        image = shrink(image, side)
    if quality:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
        with Image.open(buf) as im:
            image = np.array(im.convert("RGB"))
    return image


def shades_of_gray(image: np.ndarray, p: int) -> np.ndarray:
    """Shades of Gray colour constancy (Finlayson & Trezzi, 2004): estimate the light's colour as the p-norm of each
    channel and rescale the channels so that it becomes neutral grey, keeping its intensity. ``p`` 0 returns the
    image unchanged; 1 is Grey World, large p approaches max-RGB. HxWx3 uint8 in and out.

    Why: a network trained on one clinic's cameras learns their white balance as a cue (bench/robustness.py: the
    bundled model loses up to 0.1 balanced accuracy to a 10% cast). Applied to every image, in training and in
    serving alike (`ModelMeta.colour_constancy`), it removes any per-channel cast before the network sees the image.
    ISIC 2019's winning entry (Gessert et al., 2020) preprocessed this way, with p = 6.
    """
    if not p:
        return image
    x = image.astype(np.float32)
    light = np.power(np.power(x / 255.0, p).reshape(-1, 3).mean(0), 1.0 / p)
    norm = float(np.linalg.norm(light))
    if norm < 1e-6:  # an all-black image has no light to correct
        return image
    gains = norm / (np.maximum(light, 1e-6) * math.sqrt(3.0))
    return np.clip(x * gains.astype(np.float32) + 0.5, 0, 255).astype(np.uint8)


# Pillow's filters for the eval preset's resize, by the torchvision name a model records (`ModelMeta.interpolation`).
# With antialiasing torchvision resizes uint8 images as Pillow does.
_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


def eval_input(image: np.ndarray, meta: ModelMeta) -> np.ndarray:
    """The model's eval preset on an HxWx3 uint8 image: shorter side resized to round(input_size / crop_pct) (the
    longer side in proportion, rounded down, as torchvision's Resize does), the centre input_size square, scaled to
    0..1 and normalised with the model's mean and std. Returns (3, S, S) float32."""
    size = meta.input_size
    side = round(size / meta.crop_pct)
    h, w = image.shape[:2]
    new = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)
    if new != (w, h):
        image = np.asarray(Image.fromarray(image).resize(new, _FILTERS[meta.interpolation]))
    h, w = image.shape[:2]
    y0, x0 = round((h - size) / 2), round((w - size) / 2)
    crop = image[y0 : y0 + size, x0 : x0 + size].astype(np.float32) / 255.0
    mean, std = np.asarray(meta.mean, np.float32), np.asarray(meta.std, np.float32)
    return np.ascontiguousarray(((crop - mean) / std).transpose(2, 0, 1), dtype=np.float32)


def to_model_input(image: np.ndarray, meta: ModelMeta) -> np.ndarray:
    """A decoded image -> the normalised (3, S, S) float32 model input: detail matched to the training images, the
    model's colour constancy (if any), then its eval preset (`eval_input`). The one serving path; `dermsight
    evaluate` and the export's parity check call it too."""
    return eval_input(shades_of_gray(match_detail(image, meta), meta.colour_constancy), meta)


def synthetic_images(n: int = 4, size: tuple[int, int] = (200, 150), seed: int = 0) -> list[np.ndarray]:
    """Lesion-like test pictures (a dark irregular blob on skin-coloured texture): parity inputs when no real images
    are at hand. They exercise the same preprocessing and value ranges as photos; real images are better."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(n):
        skin = rng.uniform([170, 110, 90], [230, 170, 150])
        img = skin + rng.normal(0, 10, (h, w, 3))
        cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
        ry, rx = rng.uniform(0.15, 0.3) * h, rng.uniform(0.15, 0.3) * w
        r = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        blob = np.clip(1.3 - r, 0, 1)[..., None]
        img = img * (1 - 0.7 * blob) + rng.uniform([40, 20, 10], [120, 80, 60]) * 0.7 * blob
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def model_inputs(meta: ModelMeta, sources: list[Source]) -> np.ndarray:
    """Decode and preprocess ``sources`` exactly as serving does: (N, 3, S, S) float32. Raises `ImageError`."""
    side = decode_side(meta)
    return np.stack([to_model_input(decode(s, side), meta) for s in sources])
