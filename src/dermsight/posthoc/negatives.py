"""Images that are not skin lesions, available on every machine dermsight installs on, to measure the
not-a-lesion gate: real photos shipped inside dependencies, crops of them, and synthetic everyday pictures.

- scikit-learn's ``china.jpg`` (a building) and ``flower.jpg`` (CC BY 2.0, see sklearn/datasets/images/README.txt)
- matplotlib's ``grace_hopper.jpg`` (a portrait; US Navy photo, public domain)
- synthetic: a page of text, a street/landscape-like scene, a screenshot-like layout, a checkerboard
- the real photos inside a dermatoscope's round black field (`preprocess.dermatoscope_field`): the not-a-lesion
  threshold is set on lesions seen that way too, and a dark round border alone must not make a photo pass

They are few and not a benchmark; `dermsight calibrate` measures them on every model so that its card always carries
some catch rate, and ``--negatives DIR`` adds any photos you have the right to use.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from dermsight.inference.preprocess import dermatoscope_field


def document(seed: int = 0) -> np.ndarray:
    """A page of text."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (480, 640), (250, 250, 246))
    d = ImageDraw.Draw(im)
    for line in range(24):
        words = " ".join("".join(chr(int(c)) for c in rng.integers(97, 123, rng.integers(2, 9))) for _ in range(7))
        d.text((30, 24 + 24 * line), words, fill=(20, 20, 20))
    return np.array(im)


def scene(seed: int = 0) -> np.ndarray:
    """Sky, ground and a few hard-edged coloured objects: the layout of a street or landscape snapshot."""
    rng = np.random.default_rng(seed)
    h, w = 360, 480
    yy = np.linspace(0, 1, h)[:, None, None]
    sky = np.array([90, 150, 230]) * (1 - yy) + np.array([200, 220, 250]) * yy
    img = np.broadcast_to(sky, (h, w, 3)).copy()
    img[h // 2 :] = np.array([90, 90, 95]) + rng.normal(0, 8, (h - h // 2, w, 3))
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(8):
        x0, y0 = int(rng.integers(0, w - 60)), int(rng.integers(h // 4, h - 60))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        d.rectangle((x0, y0, x0 + int(rng.integers(20, 120)), y0 + int(rng.integers(20, 100))), fill=colour)
    return np.array(im)


def screenshot(seed: int = 0) -> np.ndarray:
    """Flat panels, buttons and labels."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (800, 500), tuple(int(v) for v in rng.integers(200, 255, 3)))
    d = ImageDraw.Draw(im)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, 700)), int(rng.integers(0, 450))
        box = (x0, y0, x0 + int(rng.integers(40, 300)), y0 + int(rng.integers(20, 120)))
        d.rectangle(box, fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        d.text((x0 + 5, y0 + 5), "OK  Cancel  Settings", fill=(0, 0, 0))
    return np.array(im)


def checkerboard() -> np.ndarray:
    yy, xx = np.mgrid[0:300, 0:400]
    board = (((yy // 25) + (xx // 25)) % 2 * 200 + 30).astype(np.uint8)
    return np.stack([board, board, board // 2], axis=2)


def package_photos() -> dict[str, np.ndarray]:
    """The real photos above that are installed here (a stripped install may lack package data)."""
    out: dict[str, np.ndarray] = {}
    try:
        from sklearn.datasets import load_sample_images

        data = load_sample_images()
        for name, image in zip(data.filenames, data.images, strict=True):
            out[name.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0]] = np.asarray(image)
    except Exception:  # missing package data must not break calibration
        pass
    try:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f, Image.open(f) as im:
            out["grace_hopper"] = np.array(im.convert("RGB"))
    except Exception:
        pass
    return out


def _crops(image: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` random crops covering 30-70% of each side: close-ups, as a phone user might frame them."""
    h, w = image.shape[:2]
    out = []
    for _ in range(n):
        f = rng.uniform(0.3, 0.7)
        ch, cw = max(160, int(h * f)), max(160, int(w * f))
        ch, cw = min(ch, h), min(cw, w)
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        out.append(np.ascontiguousarray(image[y0 : y0 + ch, x0 : x0 + cw]))
    return out


def everyday_images(crops_per_photo: int = 3) -> dict[str, np.ndarray]:
    """Named non-lesion pictures: the package photos, random crops of them, and the synthetic ones."""
    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {}
    for name, photo in package_photos().items():
        out[name] = photo
        out[f"{name}_round_field"] = dermatoscope_field(photo)
        for i, crop in enumerate(_crops(photo, crops_per_photo, rng)):
            out[f"{name}_crop{i}"] = crop
    for i in range(2):
        out[f"document{i}"], out[f"scene{i}"], out[f"screenshot{i}"] = document(i), scene(i), screenshot(i)
    out["checkerboard"] = checkerboard()
    return out
