"""Photometric shifts for robustness checks: how much a model's scores fall when the same lesions are photographed
under another light, white balance or exposure.

Images from another clinic differ from HAM10000's in ways a held-out split of HAM10000 cannot show: a dermatoscope's
light and a camera's white balance tint the whole picture, and exposure brightens or darkens it. Each shift here is a
fixed, mild version of one such change (a 10% tint is well within what two cameras disagree by), applied to the
decoded image before the model's own preprocessing, so the scores say how much of a model's quality rests on the
colour balance of its training images. `bench/robustness.py` tabulates them for one or more models.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from sklearn.metrics import balanced_accuracy_score

Shift = Callable[[np.ndarray], np.ndarray]


def channel_gain(r: float, g: float, b: float) -> Shift:
    """Scale the red, green and blue channels: a white-balance cast (unequal) or an exposure change (equal)."""
    gains = np.array([r, g, b], np.float32)

    def shift(image: np.ndarray) -> np.ndarray:
        return np.clip(image.astype(np.float32) * gains + 0.5, 0, 255).astype(np.uint8)

    return shift


def gamma(value: float) -> Shift:
    """A tone curve: ``value`` < 1 lifts the mid-tones (a flatter, brighter picture), > 1 deepens them."""
    table = np.clip(255 * (np.arange(256) / 255.0) ** value + 0.5, 0, 255).astype(np.uint8)

    def shift(image: np.ndarray) -> np.ndarray:
        return table[image]

    return shift


# Name -> (what it imitates, the shift). "none" is the baseline every other row is compared with.
SHIFTS: dict[str, tuple[str, Shift]] = {
    "none": ("the images as they are", channel_gain(1, 1, 1)),
    "warm": ("warmer white balance (R x1.1, B x0.9)", channel_gain(1.1, 1.0, 0.9)),
    "cool": ("cooler white balance (R x0.9, B x1.1)", channel_gain(0.9, 1.0, 1.1)),
    "green": ("green tint (G x1.05, R and B x0.95)", channel_gain(0.95, 1.05, 0.95)),
    "magenta": ("magenta tint (G x0.93, R and B x1.05)", channel_gain(1.05, 0.93, 1.05)),
    "dark": ("under-exposed (x0.8)", channel_gain(0.8, 0.8, 0.8)),
    "bright": ("over-exposed (x1.15)", channel_gain(1.15, 1.15, 1.15)),
    "gamma0.8": ("flatter tone curve (gamma 0.8)", gamma(0.8)),
    "gamma1.25": ("deeper tone curve (gamma 1.25)", gamma(1.25)),
}


# ------------------------------------------------------------------------------------------- dermoscopy artefacts
# What the not-a-lesion gate must let through: dermoscopy as other clinics take it. Drawn on the decoded image,
# reproducibly (the random generator is seeded from the image's own pixels, so one image always gets the same hairs).


def _rng_of(image: np.ndarray, salt: int) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(np.ascontiguousarray(image[::7, ::7]).tobytes()), salt])


def hair(image: np.ndarray, strands: tuple[int, int] = (6, 14)) -> np.ndarray:
    """``image`` with dark hairs across it: ``strands`` (a range) gently curved strands, each from edge to edge or
    from a point inside, about 1/100 of the shorter side thick, dark brown to black, as shaving-free skin shows
    under a dermatoscope."""
    rng = _rng_of(image, 1)
    h, w = image.shape[:2]
    side = min(h, w)
    out = Image.fromarray(np.ascontiguousarray(image))
    draw = ImageDraw.Draw(out)
    for _ in range(int(rng.integers(strands[0], strands[1] + 1))):
        start = rng.uniform((0, 0), (w, h))
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(0.4, 1.2) * max(h, w)
        bend = rng.normal(0, 0.15) * length  # a quadratic curve: the control point off the chord by this much
        end = start + length * np.array([np.cos(angle), np.sin(angle)])
        mid = (start + end) / 2 + bend * np.array([-np.sin(angle), np.cos(angle)])
        t = np.linspace(0, 1, 40)[:, None]
        points = (1 - t) ** 2 * start + 2 * (1 - t) * t * mid + t**2 * end
        shade = int(rng.integers(10, 60))
        colour = (shade + int(rng.integers(0, 25)), shade + int(rng.integers(0, 12)), shade)
        width = max(1, round(side * rng.uniform(0.006, 0.014)))
        draw.line([tuple(p) for p in points], fill=colour, width=width, joint="curve")
    return np.asarray(out)


def air_bubbles(image: np.ndarray, bubbles: tuple[int, int] = (2, 6)) -> np.ndarray:
    """``image`` with ``bubbles`` (a range) air bubbles in the immersion fluid: discs 3-12% of the shorter side
    across, a little brighter inside, with a thin bright rim and a small highlight, as contact dermoscopy shows them."""
    rng = _rng_of(image, 2)
    h, w = image.shape[:2]
    side = min(h, w)
    out = image.astype(np.float32)
    yy, xx = np.ogrid[:h, :w]
    for _ in range(int(rng.integers(bubbles[0], bubbles[1] + 1))):
        r = side * rng.uniform(0.03, 0.12) / 2 + 1
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        inside = d < r
        rim = np.abs(d - r) < max(1.0, r * 0.12)
        spot = np.sqrt((yy - cy + r / 2.5) ** 2 + (xx - cx + r / 2.5) ** 2) < max(1.0, r / 5)
        out[inside] = out[inside] * 0.85 + 255 * 0.15
        out[rim] = out[rim] * 0.3 + 255 * 0.7
        out[spot] = 250
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def compose(*steps: Shift | None) -> Shift:
    """The shifts applied in order (``None`` steps skipped)."""
    kept = [s for s in steps if s is not None]

    def shift(image: np.ndarray) -> np.ndarray:
        for s in kept:
            image = s(image)
        return image

    return shift


def shift_scores(
    model_path: str | Path,
    manifest: pd.DataFrame,
    names: list[str] | None = None,
    square: bool = True,
    rule: str = "model",
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Balanced accuracy and accuracy of one model on ``manifest`` (a labelled manifest, e.g. one split) under each
    named shift. ``square``: score 224 px square centre crops first (the external test set's shape). ``rule``:
    "model" applies the model's decision rule (prior correction, TTA) as serving does; "argmax" the plain one."""
    import torch

    from dermsight.data.manifest import read_labels
    from dermsight.inference.preprocess import square_crop
    from dermsight.inference.scoring import score_images
    from dermsight.models.bundle import load_model

    if rule not in ("model", "argmax"):
        raise ValueError(f"rule must be model or argmax, got {rule!r}")
    unknown = [n for n in names or () if n not in SHIFTS]
    if unknown:
        raise ValueError(f"unknown shift(s) {', '.join(unknown)}: expected some of {', '.join(SHIFTS)}")
    model, meta = load_model(model_path)
    model = model.to(memory_format=torch.channels_last)
    y = read_labels(manifest, meta)
    paths = [str(p) for p in manifest["path"]]
    rows = []
    for name in names or list(SHIFTS):
        what, shift = SHIFTS[name]
        scored = score_images(
            model,
            meta,
            paths,
            tta=meta.tta and rule == "model",
            progress=progress,
            view=compose(square_crop if square else None, shift),
        )
        logits, failed = scored.logits, scored.failures()
        ok = ~np.isnan(logits).any(axis=1)
        pred = (meta.adjust(logits[ok]) if rule == "model" else logits[ok]).argmax(1)
        rows.append(
            {
                "shift": name,
                "what": what,
                "n": int(ok.sum()),
                "balanced_accuracy": float(balanced_accuracy_score(y[ok], pred)),
                "accuracy": float((pred == y[ok]).mean()),
                "failed": len(failed),
            }
        )
    return rows
