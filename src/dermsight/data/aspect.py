"""Images stored squashed, shown at their true shape again.

Some published copies of dermoscopy archives resized every whole frame to a square (`isic2017_256`: 4:3 frames
squashed to 256x256). Trained on as they are, the network sees that source's lesions narrowed by a quarter, while
the same archive's images reach it elsewhere at their true shape (`isic_archive_val224`: centre squares of the 4:3
frames; users' photos), and the shape alone tells the source apart. `restore_aspect` writes each such image once,
stretched back to a given width:height, and points the manifest at the copies, so the cache, the split and every
scoring step that reads files see the same corrected images.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from dermsight.data.cache import default_cache_root
from dermsight.data.images import ImageError, load_rgb
from dermsight.data.manifest import Ingest, per_image
from dermsight.data.problems import Problem
from dermsight.files import written_atomically


def parse_aspect(text: str | float) -> float:
    """A width:height ratio from "4:3", "4/3" or "1.333" (a number passes through); it must be positive."""
    if isinstance(text, int | float):
        value = float(text)
    else:
        sep = ":" if ":" in text else "/" if "/" in text else None
        try:
            if sep:
                w, h = text.split(sep)
                value = float(w) / float(h)
            else:
                value = float(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"{text!r} is not an aspect ratio: write width:height, e.g. 4:3") from None
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{text!r} is not an aspect ratio: it must be a positive width:height, e.g. 4:3")
    return value


def restored_size(width: int, height: int, aspect: float) -> tuple[int, int]:
    """The size an image of ``width`` x ``height`` is shown at with width:height ``aspect``: the longer side kept, the
    other one stretched (a square of 256 at 4:3 becomes 341x256; detail is never thrown away)."""
    if width >= height * aspect:
        return width, max(1, round(width / aspect))
    return max(1, round(height * aspect)), height


def restore_aspect(
    manifest: pd.DataFrame, aspect: float, root: Path, progress: bool = True
) -> tuple[pd.DataFrame, list[Problem]]:
    """``manifest`` with every image stretched to width:height ``aspect``: copies written (lossless PNG, Lanczos)
    under ``root`` the first time and reused after, ``path``, ``width`` and ``height`` pointing at them. Rows whose
    image cannot be read are dropped with a `Problem`."""
    folder = Path(root) / f"aspect-{aspect:.4f}"
    folder.mkdir(parents=True, exist_ok=True)

    def target(p: str) -> Path:
        # The source's path and its size and time: an edited original gets a new copy, never a stale one.
        st = os.stat(p)
        key = hashlib.sha256(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
        return folder / f"{Path(p).stem}-{key}.png"

    def work(p: str) -> tuple[str, int, int] | str:
        try:
            out = target(p)
            if out.is_file():
                with Image.open(out) as im:
                    return str(out), im.width, im.height
            rgb = load_rgb(p)
            w, h = restored_size(rgb.shape[1], rgb.shape[0], aspect)
            im = Image.fromarray(rgb).resize((w, h), Image.Resampling.LANCZOS)
            with written_atomically(out, suffix=".png") as tmp:
                im.save(tmp, format="PNG", compress_level=1)
            return str(out), w, h
        except ImageError as e:
            return str(e)
        except OSError as e:
            return f"cannot write its {aspect:.3g}:1 copy: {e}"

    out, kept, problems = per_image(manifest, work, "aspect", f"showing at {aspect:.3g}:1", progress)
    out["path"] = [r[0] for r in kept]
    out["width"] = [r[1] for r in kept]
    out["height"] = [r[2] for r in kept]
    return out, problems


def restore_sources(
    sources: Sequence[Path],
    ingests: Sequence[Ingest],
    aspects: Mapping[str, float],
    root: str | os.PathLike | None,
    progress: bool,
) -> list[Ingest]:
    """``ingests`` (one per source folder, in order) with the images of every folder named in ``aspects`` stretched
    to its ratio (`restore_aspect`; copies under ``root``, or the cache's default root), their problems added."""
    root = Path(root) if root else default_cache_root()
    out = []
    for source, ingest in zip(sources, ingests, strict=True):
        name = Path(source).name
        if name in aspects and len(ingest.manifest):
            rows, bad = restore_aspect(ingest.manifest, aspects[name], root, progress)
            ingest = replace(ingest, manifest=rows, problems=[*ingest.problems, *bad])
        out.append(ingest)
    return out
