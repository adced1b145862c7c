"""Shared fixtures. Real data is in ../shared/data (read-only, CC BY-NC); tests needing it skip clearly without it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DERMSIGHT_SHARED_DATA", ROOT.parent / "shared" / "data"))
HAM = SHARED_DATA / "ham10000"
HAM_FULLRES = SHARED_DATA / "ham10000_fullres_sample"
ISIC2019_META = SHARED_DATA / "isic2019_metadata"

needs_ham = pytest.mark.skipif(
    not (HAM / "labels.csv").is_file(),
    reason=f"real HAM10000 data not found at {HAM} (set DERMSIGHT_SHARED_DATA)",
)
needs_isic2019 = pytest.mark.skipif(
    not ISIC2019_META.is_dir(), reason=f"ISIC 2019 metadata CSVs not found at {ISIC2019_META}"
)
needs_fullres = pytest.mark.skipif(
    not (HAM_FULLRES / "labels.csv").is_file(), reason=f"full-resolution sample not found at {HAM_FULLRES}"
)


def make_image(path: Path, size=(64, 48), color=(180, 120, 90), fmt: str | None = None, seed: int = 0) -> Path:
    """A small synthetic 'lesion': a dark blob on skin-coloured noise (pixels only; no real data needed)."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = np.clip(rng.normal(color, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    blob = ((yy - h / 2) ** 2 / (h / 4) ** 2 + (xx - w / 2) ** 2 / (w / 4) ** 2) < 1
    arr[blob] = arr[blob] // 3
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Never write caches into the user's home or ../shared during tests.
    monkeypatch.setenv("DERMSIGHT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # Tiny test models gain nothing from intra-op threads, and on a loaded 2-core machine thread contention made
    # small ops ten times slower.
    import torch

    torch.set_num_threads(1)
