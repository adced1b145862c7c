"""A decode-once preprocessing cache: every image of a manifest resized once and kept in one uint8 memory map.

Decoding JPEGs dominates CPU training time; each epoch re-decoding 10,000 files costs more than the augmentations.
The cache stores each image with its shorter side scaled to ``size`` (aspect ratio kept, never enlarged) back to back
in ``pixels.u8``, with ``index.csv`` giving each image's offset and shape, so reading one is a zero-copy slice of a
memory map. A cache is keyed by the manifest's files (path, size, mtime) and the size, and written to a temporary
folder that is renamed into place only when complete: re-running reuses it, an interrupted run never leaves a half
cache behind that would be reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from dermsight.data.images import ImageError, load_rgb, probe, target_size
from dermsight.data.problems import Problem
from dermsight.files import temp_folder_beside

CACHE_VERSION = 1


def default_cache_root() -> Path:
    env = os.environ.get("DERMSIGHT_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dermsight"


def cache_key(paths: list[str], size: int) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}:{size}".encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()[:16]


@dataclass
class CacheResult:
    cache: ImageCache
    problems: list[Problem]
    reused: bool
    seconds: float


class ImageCache:
    """Read side of the cache: ``cache[i]`` is an HxWx3 uint8 view; ``cache.row_of(path)`` finds an image."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.index = pd.read_csv(self.folder / "index.csv", dtype={"path": str})
        nbytes = int(self.meta["nbytes"])
        self._pixels = (
            np.memmap(self.folder / "pixels.u8", dtype=np.uint8, mode="r", shape=(nbytes,))
            if nbytes
            else np.zeros(0, np.uint8)
        )
        self._offset = self.index["offset"].to_numpy(np.int64)
        self._h = self.index["height"].to_numpy(np.int64)
        self._w = self.index["width"].to_numpy(np.int64)
        self._rows = {p: i for i, p in enumerate(self.index["path"])}

    @property
    def size(self) -> int:
        return int(self.meta["size"])

    def __len__(self) -> int:
        return len(self.index)

    def ok(self, i: int) -> bool:
        return bool(self._offset[i] >= 0)

    def __getitem__(self, i: int) -> np.ndarray:
        o = self._offset[i]
        if o < 0:
            raise KeyError(f"image {self.index['path'].iat[i]} failed to decode when the cache was built")
        h, w = self._h[i], self._w[i]
        return self._pixels[o : o + h * w * 3].reshape(h, w, 3)

    def row_of(self, path: str) -> int:
        return self._rows[str(path)]


def build_cache(
    manifest: pd.DataFrame,
    size: int,
    root: Path | None = None,
    workers: int | None = None,
    draft: bool = True,
    progress: bool = True,
) -> CacheResult:
    """Decode and resize every image of ``manifest`` once (threads: Pillow releases the GIL while decoding)."""
    t0 = time.perf_counter()
    paths = [str(p) for p in manifest["path"]]
    root = Path(root) if root else default_cache_root()
    folder = root / f"{size}px-{cache_key(paths, size)}"
    if (folder / "meta.json").is_file():
        return CacheResult(ImageCache(folder), _stored_problems(folder), True, time.perf_counter() - t0)

    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    problems: list[Problem] = []

    # Output shapes are known from headers, so the whole memory map is laid out before any pixel is decoded and
    # workers write straight into their slice.
    w_known = _int_col(manifest, "width")
    h_known = _int_col(manifest, "height")

    def dims(i: int) -> tuple[int, int] | str:
        if w_known[i] > 0 and h_known[i] > 0:
            return target_size(int(w_known[i]), int(h_known[i]), size)
        try:
            info = probe(paths[i])
        except ImageError as e:
            return str(e)
        return target_size(info.width, info.height, size)

    with ThreadPoolExecutor(workers) as pool:
        shapes = list(pool.map(dims, range(len(paths))))
    offsets = np.full(len(paths), -1, np.int64)
    hw = np.zeros((len(paths), 2), np.int64)
    nbytes = 0
    for i, s in enumerate(shapes):
        if isinstance(s, str):
            problems.append(Problem(paths[i], s, "cache"))
            continue
        offsets[i] = nbytes
        hw[i] = (s[1], s[0])
        nbytes += s[0] * s[1] * 3

    root.mkdir(parents=True, exist_ok=True)
    tmp = temp_folder_beside(folder)
    try:
        pixels = np.memmap(tmp / "pixels.u8", dtype=np.uint8, mode="w+", shape=(max(nbytes, 1),))

        def work(i: int) -> str | None:
            if offsets[i] < 0:
                return None
            try:
                arr = load_rgb(paths[i], short_side=size, draft=draft)
            except ImageError as e:
                return str(e)
            h, w = hw[i]
            if arr.shape != (h, w, 3):
                return f"decoded to {arr.shape[1]}x{arr.shape[0]}, header said {w}x{h}"
            pixels[offsets[i] : offsets[i] + arr.size] = arr.reshape(-1)
            return None

        with ThreadPoolExecutor(workers) as pool:
            errors = list(
                tqdm(
                    pool.map(work, range(len(paths))),
                    total=len(paths),
                    desc=f"caching at {size}px",
                    unit="img",
                    disable=not progress or None,
                )
            )
        pixels.flush()
        for i, err in enumerate(errors):
            if err is not None:
                problems.append(Problem(paths[i], err, "cache"))
                offsets[i] = -1
        pd.DataFrame({"path": paths, "offset": offsets, "height": hw[:, 0], "width": hw[:, 1]}).to_csv(
            tmp / "index.csv", index=False
        )
        pd.DataFrame([p.__dict__ for p in problems], columns=["item", "reason", "stage"]).to_csv(
            tmp / "problems.csv", index=False
        )
        meta = {
            "version": CACHE_VERSION,
            "size": size,
            "n": len(paths),
            "nbytes": nbytes,
            "draft": draft,
            "failed": len(problems),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            tmp.rename(folder)
        except OSError:
            # Another process finished the same cache first; theirs is identical.
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CacheResult(ImageCache(folder), problems, False, time.perf_counter() - t0)


def _int_col(df: pd.DataFrame, col: str) -> np.ndarray:
    if col not in df:
        return np.zeros(len(df), np.int64)
    return pd.to_numeric(df[col], errors="coerce").fillna(0).to_numpy(np.int64)


def _stored_problems(folder: Path) -> list[Problem]:
    f = folder / "problems.csv"
    if not f.is_file():
        return []
    df = pd.read_csv(f, dtype=str).fillna("")
    return [Problem(r.item, r.reason, r.stage) for r in df.itertuples()]
