"""Image-quality gate: refuse images that cannot be assessed before the model is asked anything.

The checks look at pixels only (no model): too small, nearly uniform, black-and-white, blurred, under- or
over-exposed. They run on the luminance of the image scaled to a fixed analysis size, so a 200x150 HAM10000 frame, a
224x224 centre crop and a 600x450 phone upload are judged at the same scale (sharpness measures depend strongly on
resolution).

The thresholds were set on real dermoscopy (HAM10000, all 10,015 images at 200x150, the 124 images of the 600x450
sample, and 224x224 square centre crops of both) so that the gate alone rejects almost none of them (see
`QUALITY_THRESHOLDS`), and checked against synthetic failures (flat frames, Gaussian blur, dark and blown-out frames)
in tests/test_inference.py. Whether an image shows a skin lesion at all is a different question, answered in
feature space by `dermsight.inference.ood`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

# Every image is scaled so that its shorter side is this many pixels before measuring. Smaller than every image we
# accept (see min_side), so all inputs are downscaled, never enlarged: enlarging would make any image look blurred.
ANALYSIS_SIDE = 128


@dataclass(frozen=True)
class QualityThresholds:
    # Shorter side in pixels. Below this a lesion is a few dozen pixels across: too little detail to judge, and the
    # model would upscale the frame. The external test data (224x224) and HAM10000 (200x150) pass.
    min_side: int = 128
    # Standard deviation of luminance (0..255). A flat frame (lens cap, wall, blank page) has almost none; the least
    # contrasted of the 10,015 HAM10000 images has 4.8, their 0.1th percentile is 6.6.
    min_contrast: float = 3.0
    # `sharpness`: 99th percentile of |Laplacian| over the luminance range. HAM10000's minimum is 0.063 (0.1th
    # percentile 0.080, 224 px centre crops and the 600x450 sample alike); a 600x450 photo blurred by a Gaussian of
    # sigma 8 px, measured straight from the full-resolution array, stays below 0.051, sigma 5 px below 0.12 (median
    # 0.036). Served uploads are measured on their (JPEG draft) decode, which is sharper per pixel: there about 10%
    # of the 124 sample originals blurred by sigma 8 px and 31% by sigma 5 px still pass (pinned by
    # tests/test_inference.py::test_the_quality_gate_on_served_photos_still_rejects_blur). A stricter threshold would
    # leave little margin above HAM10000's minimum, so this gate catches badly blurred photos, not every soft one.
    min_sharpness: float = 0.055
    # Mean luminance. HAM10000 runs from 46 to 230 (dark vignetted corners included).
    min_brightness: float = 25.0
    max_brightness: float = 240.0
    # Share of pixels at or above 250 (blown out by flash or glare) / at or below 5 (black). HAM10000 reaches 0.26
    # and 0.13; dermoscopes with a round field of view leave black corners (about 0.25).
    max_clipped_bright: float = 0.6
    max_clipped_dark: float = 0.7
    # `colourfulness`: mean chroma, max(R, G, B) - min(R, G, B), in grey levels. A black-and-white photo has none
    # (0.0 for the sample's originals made grey and saved as colour JPEGs), and the network cannot read one: colour
    # is part of what tells the classes apart (blue-white veil, red vessels), and 20 of 21 HAM10000 melanomas turned
    # grey were accepted, none as melanoma, most at 80-95% for a benign class. HAM10000's least colourful image has
    # 5.2 (0.1th percentile 11.2, median 53; the 600x450 sample 19 and up). Only nearly grey images are refused: at a
    # tenth of their saturation the sample's originals still measure 7.3 (median), and such are left to the model.
    min_colour: float = 3.0


QUALITY_THRESHOLDS = QualityThresholds()


@dataclass(frozen=True)
class QualityReport:
    width: int
    height: int
    contrast: float
    sharpness: float
    brightness: float
    clipped_bright: float
    clipped_dark: float
    colour: float
    reason: str | None  # None: the image passed every check

    @property
    def ok(self) -> bool:
        return self.reason is None

    def scores(self) -> dict[str, float]:
        return {
            "contrast": round(self.contrast, 3),
            "sharpness": round(self.sharpness, 5),
            "brightness": round(self.brightness, 2),
            "colour": round(self.colour, 2),
        }


def luminance(image: np.ndarray, side: int = ANALYSIS_SIDE) -> np.ndarray:
    """Rec. 601 luma of an HxWx3 uint8 image as float32, shorter side scaled (down only) to ``side``.

    Kept in float: rounding to 8 bits adds noise of about 0.3 grey levels, which the Laplacian amplifies into a
    false "sharp" signal on low-contrast images.
    """
    h, w = image.shape[:2]
    luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    if min(h, w) > side:
        scale = side / min(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        # Box filter: an area average, so the downscale itself neither aliases nor blurs beyond averaging.
        luma = np.asarray(Image.fromarray(luma, mode="F").resize(size, Image.Resampling.BOX))
    return luma


def sharpness(gray: np.ndarray) -> float:
    """99th percentile of the 4-neighbour Laplacian's magnitude over the 1-99th percentile luminance range.

    A focus measure that does not depend on exposure or contrast: a blurred edge of height H and width sigma peaks
    near H / sigma^2 in the Laplacian, so the ratio falls with blur whatever H is. The variance of the Laplacian
    (the classic measure) separated blurred from sharp dermoscopy less well: dermoscopy is smooth by nature, and
    the variance is dominated by the large, soft structures of the frame rather than by its sharpest edges.
    """
    if gray.shape[0] < 3 or gray.shape[1] < 3:
        return 0.0
    lap = gray[:-2, 1:-1] + gray[2:, 1:-1] + gray[1:-1, :-2] + gray[1:-1, 2:] - 4.0 * gray[1:-1, 1:-1]
    lo, hi = np.percentile(gray, [1, 99])
    return float(np.percentile(np.abs(lap), 99) / max(hi - lo, 1e-6))


def high_freq_share(image: np.ndarray) -> float:
    """Share of the grey-level amplitude spectrum at or above a quarter of the sampling rate, over the centre square
    of an HxWx3 image: how much fine detail it holds, whatever its contrast (`bench/detail.py` compares served
    uploads with the training files by it)."""
    h, w = image.shape[:2]
    s = min(h, w)
    g = image[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s].astype(np.float64).mean(2)
    amp = np.abs(np.fft.fftshift(np.fft.fft2(g - g.mean())))
    yy, xx = np.mgrid[:s, :s] - s // 2
    return float(amp[np.hypot(yy, xx) > s / 4].sum() / amp.sum())


def colourfulness(image: np.ndarray) -> float:
    """Mean chroma (max minus min of R, G, B; 0..255) of an HxWx3 uint8 image, over every fourth pixel each way: on
    HAM10000 within 0.9 of the value from every other pixel, at a quarter of the cost (0.19 against 0.71 ms on a
    300x225 decode, against 0.8 ms for the rest of the gate)."""
    a = image[::4, ::4].astype(np.int16)
    return float((a.max(2) - a.min(2)).mean())


def check_quality(image: np.ndarray, thresholds: QualityThresholds = QUALITY_THRESHOLDS) -> QualityReport:
    """Measure ``image`` (HxWx3 uint8 RGB, as decoded by `load_rgb`) and say why it cannot be assessed, if it can't.

    Checks run from the most to the least fundamental, and the first failure is the reason given: a black frame is
    reported as under-exposed, not as blurred.
    """
    t = thresholds
    h, w = image.shape[:2]
    gray = luminance(image)
    contrast = float(gray.std())
    brightness = float(gray.mean())
    clipped_bright = float((gray >= 250).mean())
    clipped_dark = float((gray <= 5).mean())
    sharp = sharpness(gray)
    colour = colourfulness(image)

    reason = None
    if min(h, w) < t.min_side:
        # The shorter side only: it is what is too small, and it is the uploaded one (decoding never scales such an
        # image, while a long strip's far ends are cut before this check, see `preprocess.centre_band`).
        reason = (
            f"the image is too small to assess (its shorter side is {min(h, w)} pixels); use a photo at least "
            f"{t.min_side} pixels on its shorter side"
        )
    elif brightness < t.min_brightness or clipped_dark > t.max_clipped_dark:
        reason = "the image is too dark (under-exposed); take the photo in better light"
    elif brightness > t.max_brightness or clipped_bright > t.max_clipped_bright:
        # A page of text or a screenshot lands here too (mostly white), so the message covers both.
        reason = (
            "the image is mostly white or over-exposed (washed out); for a photo of a spot, avoid direct flash and "
            "glare (only close-up photos of a skin spot can be assessed)"
        )
    elif contrast < t.min_contrast:
        reason = "the image is nearly uniform: no lesion or detail is visible"
    elif colour < t.min_colour:
        reason = (
            "the photo is black and white; the model needs a colour photo, because colour is part of what "
            "tells skin conditions apart"
        )
    elif sharp < t.min_sharpness:
        reason = "the image is too blurred to assess; hold the camera steady and focus on the lesion"
    return QualityReport(w, h, contrast, sharp, brightness, clipped_bright, clipped_dark, colour, reason)
