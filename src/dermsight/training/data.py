"""A run's data: the manifest, its lesion-grouped split and the decode-once cache (`prepare_data`), and the batches
training and per-epoch scoring read from that cache (`make_loaders`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

from dermsight.data.aspect import restore_sources
from dermsight.data.cache import ImageCache, build_cache
from dermsight.data.manifest import LABEL_COLUMNS, build_manifest, combine, load_manifest, run_split
from dermsight.data.problems import DataError
from dermsight.data.split import SplitConfig, check_split, split_manifest
from dermsight.domain.classes import TAXONOMIES
from dermsight.inference.transforms import BatchTrainAugment, EvalPreset, TrainPreset, shades_of_gray
from dermsight.models.meta import ModelMeta
from dermsight.training.config import TrainConfig
from dermsight.training.distributed import Dist


class CachedImages(Dataset):
    """Images from the decode-once cache with a transform; targets are class indices. ``colour_constancy``: the
    Shades of Gray p applied to each image first (`ModelMeta.colour_constancy`; 0 = none)."""

    def __init__(
        self, cache: ImageCache, rows: np.ndarray, targets: np.ndarray, transform, colour_constancy: int = 0
    ) -> None:
        self.cache, self.rows, self.targets, self.transform = cache, rows, targets, transform
        self.colour_constancy = colour_constancy

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        # Copy out of the read-only memory map: torch wants writable memory and augmentations may work in place.
        img = np.array(self.cache[int(self.rows[i])])
        return self.transform(shades_of_gray(img, self.colour_constancy)), int(self.targets[i])


class DeviceBatches:
    """Training batches made on the training device (`TrainConfig.augment: device`): the split's images are copied
    there once from the decode-once cache as one uint8 tensor, and each batch is indexed out of it and augmented by
    `BatchTrainAugment`, every image with its own parameters. No loader workers, no per-image Python work and no
    host-to-device copies of pixels: on a GPU, the per-process data path (workers, collation, copies) is otherwise
    what limits training (about 500 images/s a process on an H200, whatever the GPU's load).

    The batch order comes from the same sampler as the loader path's (plain shuffle, class-balanced, or DDP's
    shard), iterated once per epoch, so seeds, resumption and DDP behave the same. Images of different sizes are
    turned to landscape and padded to the largest (repeating their edges); `BatchTrainAugment` crops each within its
    own size. Memory: 3 * H * W bytes per image (HAM10000's 7,010 training images at 150 x 200: 0.6 GB).
    """

    def __init__(
        self,
        cache: ImageCache,
        rows: np.ndarray,
        targets: np.ndarray,
        sampler: Sampler[int],
        batch_size: int,
        augment: BatchTrainAugment,
        device: torch.device,
        drop_last: bool,
        colour_constancy: int = 0,
    ) -> None:
        # Portrait images are stored turned to landscape (transposed), so one tall image does not pad every slot to
        # its height. The augmentation is unchanged in distribution: its aspect-ratio range is symmetric and its
        # flips and quarter turns are uniform, so a transposed source is as likely as the original.
        # Colour constancy once per image here, as `CachedImages` does per sample: it is fixed, not augmentation.
        images = (shades_of_gray(cache[int(r)], colour_constancy) for r in rows)
        views = [v if v.shape[0] <= v.shape[1] else v.transpose(1, 0, 2) for v in images]
        sizes = np.array([v.shape[:2] for v in views], dtype=np.int64).reshape(-1, 2)
        h, w = (int(sizes[:, 0].max()), int(sizes[:, 1].max())) if len(views) else (1, 1)
        # Assembled in numpy: thousands of small torch copies are slow where several training processes share the
        # CPU cores (each torch op wakes its thread pool).
        store = np.empty((len(views), h, w, 3), dtype=np.uint8)
        for i, v in enumerate(views):
            ih, iw = v.shape[:2]
            store[i, :ih, :iw] = v
            # Pad by repeating the last row and column (see BatchTrainAugment: sampling reaches one pixel past).
            store[i, ih:, :iw] = v[ih - 1 : ih]
            store[i, :, iw:] = store[i, :, iw - 1 : iw]
        self.images = torch.from_numpy(store).permute(0, 3, 1, 2).to(device)
        self.sizes = torch.from_numpy(sizes)
        self.targets = torch.as_tensor(np.array(targets), dtype=torch.long, device=device)
        self.sampler, self.batch_size, self.augment, self.drop_last = sampler, batch_size, augment, drop_last

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor(list(self.sampler), dtype=torch.long)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            dev_idx = idx.to(self.images.device, non_blocking=True)
            yield self.augment(self.images[dev_idx], self.sizes[idx]), self.targets[dev_idx]


class WeightedSampler(Sampler[int]):
    """Class-balanced sampling with replacement, split across DDP ranks (every rank draws the same list)."""

    def __init__(self, weights: np.ndarray, num_samples: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.num_samples, self.seed, self.rank, self.world, self.epoch = num_samples, seed, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        idx = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=g)
        return iter(idx[self.rank :: self.world].tolist())

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world))


def class_weights(targets: np.ndarray, n_classes: int) -> np.ndarray:
    """'Balanced' weights n / (k * count_c): each class contributes equally to the loss in expectation."""
    counts = np.bincount(targets, minlength=n_classes).astype(float)
    return np.where(counts > 0, len(targets) / (n_classes * np.maximum(counts, 1)), 0.0)


def _source_keys(source: str) -> set[str]:
    """The names `source_weight` may give a manifest's source by: the source as recorded, and the data folder's name
    it carries ("labels-csv:isic2017_256", and "labels-csv:a:sub/dir" where `combine` told two folders named a apart;
    a folder in one of the official layouts is recorded by the layout's name alone, e.g. "ham10000")."""
    parts = source.split(":")
    return {source, parts[1]} if len(parts) > 1 else {source}


def source_weights(sources: pd.Series, weight: Mapping[str, float] | None = None) -> np.ndarray:
    """Per-row weights n * w_s / (W * count_s) that make each source s contribute its share w_s / W of the draws in
    expectation, W being the sum of every source's w (rows without a source form one source of their own). ``weight``
    maps a source's name (`_source_keys`) to its w; unnamed sources have w = 1, so by default every source counts
    the same. Raises `DataError` for a name no source has."""
    keys = sources.astype(object).where(sources.notna(), "").to_numpy()
    names, index, counts = np.unique(keys, return_inverse=True, return_counts=True)
    weight = dict(weight or {})
    check_source_names(names, weight)
    w = np.array([next((weight[k] for k in _source_keys(str(n)) if k in weight), 1.0) for n in names])
    return len(keys) * w[index] / (w.sum() * counts[index].astype(float))


def check_source_names(sources: Iterable[str], weight: Mapping[str, float]) -> None:
    """Refuse `source_weight` names that no source in ``sources`` goes by."""
    sources = sorted({str(s) for s in sources})
    known = set().union(*(_source_keys(s) for s in sources)) if sources else set()
    unmatched = sorted(set(weight) - known)
    if unmatched:
        raise DataError(
            f"source_weight names {', '.join(unmatched)}, which no training image comes from (their sources: "
            f"{', '.join(sources)}; give a data folder's name or a source as written there)"
        )


@dataclass
class PreparedData:
    manifest: pd.DataFrame  # with split, target (class index; -1 = unusable) and cache_row
    cache: ImageCache
    classes: tuple[str, ...]


def subset(data: PreparedData, split: str) -> pd.DataFrame:
    """The rows of ``split`` that have a class of the run's taxonomy."""
    m = data.manifest
    return m[(m["split"] == split) & (m["target"] >= 0)]


def prepare_data(cfg: TrainConfig, progress: bool = True) -> PreparedData:
    """Manifest (read or built) -> lesion-grouped split (unless given) -> decode-once cache."""
    if len(cfg.data_paths) > 1:
        return _prepared(_split_dataset([Path(p) for p in cfg.data_paths], cfg, progress), cfg, progress)
    src = Path(cfg.data_paths[0])
    if run_split(src) is not None:
        src = run_split(src)
        print(f"data: {cfg.data} is a training run's folder; using its split, {src}")
    if src.is_file() and src.suffix == ".csv" and "split" in pd.read_csv(src, nrows=0).columns:
        manifest = load_manifest(src)
    else:
        manifest = _split_dataset([src], cfg, progress)
    return _prepared(manifest, cfg, progress)


def _prepared(manifest: pd.DataFrame, cfg: TrainConfig, progress: bool) -> PreparedData:
    """A split manifest with each row's class index, decoded once into the cache."""
    src = " + ".join(cfg.data_paths)
    classes = TAXONOMIES[cfg.taxonomy].codes
    label = LABEL_COLUMNS[cfg.taxonomy]
    lookup = {c: i for i, c in enumerate(classes)}
    if cfg.source_weight:
        # Checked before the cache is built, which can take a long time.
        sources = manifest["source"] if "source" in manifest else pd.Series([""] * len(manifest))
        check_source_names(sources[manifest["split"] == "train"].fillna(""), cfg.source_weight)
    manifest = manifest.copy()
    manifest["target"] = manifest[label].map(lookup).fillna(-1).astype(int)
    unlabelled = manifest["target"] < 0
    if unlabelled.any():
        # E.g. HAM10000's akiec under taxonomy isic2019: only ISIC's own labels tell AK from SCC.
        print(
            f"warning: {int(unlabelled.sum())} image(s) have no {cfg.taxonomy} class in column {label!r} and are "
            "left out of training and scoring"
        )
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else None
    cache = build_cache(manifest, cfg.cache_size, root=cache_root, progress=progress).cache
    manifest["cache_row"] = [cache.row_of(str(p)) for p in manifest["path"]]
    usable = [cache.ok(r) for r in manifest["cache_row"]]
    if not all(usable):
        # Files that were fine when the split was made can have been damaged or deleted since.
        print(
            f"warning: {usable.count(False)} image(s) could not be decoded and are left out (the list: "
            f"{cache.folder / 'problems.csv'})"
        )
    manifest = manifest[usable]
    if manifest.empty:
        raise DataError(f"{src}: none of its images could be decoded (the list: {cache.folder / 'problems.csv'})")
    return PreparedData(manifest.reset_index(drop=True), cache, classes)


def _split_dataset(sources: list[Path], cfg: TrainConfig, progress: bool) -> pd.DataFrame:
    """The manifest of one or more datasets with a lesion-grouped split drawn by ``cfg``'s split settings."""
    ingests = [build_manifest(s, progress=progress) for s in sources]
    ingest = combine(restore_sources(sources, ingests, cfg.display_aspect, cfg.cache_dir, progress))
    src = " + ".join(map(str, sources))
    if ingest.manifest.empty:
        raise DataError(
            f"{src}: no usable images ({len(ingest.problems)} item(s) dropped; `dermsight data manifest {src} "
            "--out manifest.csv` lists why)"
        )
    if ingest.problems:
        print(
            f"warning: {len(ingest.problems)} item(s) of {src} dropped while reading (see `dermsight data "
            "manifest` for the list)"
        )
    split_cfg = SplitConfig(val=cfg.val, test=cfg.test, seed=cfg.split_seed, label=LABEL_COLUMNS[cfg.taxonomy])
    manifest = split_manifest(ingest.manifest, split_cfg)
    for issue in check_split(manifest, split_cfg.label):
        print(f"warning: {issue}")
    return manifest


def train_augmentation(cfg: TrainConfig, meta: ModelMeta, batched: bool = False) -> TrainPreset | BatchTrainAugment:
    """The config's training augmentation: per image (`TrainPreset`, the loader path) or per batch on the device
    (`BatchTrainAugment`, ``augment: device``), from one set of settings."""
    common: dict[str, Any] = dict(scale=(cfg.scale_min, 1.0), hue=cfg.hue, channel_gain=cfg.channel_gain)
    if batched:
        return BatchTrainAugment.from_meta(meta, **common)
    return TrainPreset.from_meta(meta, **common, jpeg=cfg.jpeg, jpeg_quality=(cfg.jpeg_quality_min, 95))


@dataclass
class Loaders:
    """A run's batches from the cache: training batches in the sampler's order, and scoring batches (the model's
    eval preprocessing) of any rows of the split, for the per-epoch validation and SWA's BatchNorm statistics."""

    cfg: TrainConfig
    data: PreparedData
    eval_transform: EvalPreset
    device: torch.device
    sampler: Sampler[int]
    train: DataLoader | DeviceBatches

    @property
    def steps_per_epoch(self) -> int:
        cap = self.cfg.max_steps_per_epoch
        return min(len(self.train), cap) if cap else len(self.train)

    def scoring(self, rows: pd.DataFrame) -> DataLoader:
        cfg = self.cfg
        ds = CachedImages(
            self.data.cache, rows["cache_row"].to_numpy(), rows["target"].to_numpy(), self.eval_transform,
            cfg.colour_constancy,
        )  # fmt: skip
        return DataLoader(ds, batch_size=cfg.batch_size * 2, shuffle=False, **_worker_options(cfg, self.device))


def make_loaders(cfg: TrainConfig, data: PreparedData, meta: ModelMeta, d: Dist, device: torch.device) -> Loaders:
    """The training batches of ``data``'s train split, augmented on the loader or on the device (``cfg.augment``)
    in an order drawn by a plain, class-balanced (``imbalance: sampler``) or DDP-sharded sampler."""
    train_df = subset(data, "train")
    rows, y = train_df["cache_row"].to_numpy(), train_df["target"].to_numpy()
    weights = class_weights(y, len(data.classes))[y] if cfg.imbalance == "sampler" else None
    if cfg.source_balance:
        by_source = source_weights(train_df["source"], cfg.source_weight)
        weights = by_source if weights is None else weights * by_source
    sampler: Sampler[int]
    if weights is not None:
        sampler = WeightedSampler(weights, len(y), cfg.seed, d.rank, d.world)
    elif d.world > 1:
        sampler = DistributedSampler(range(len(y)), d.world, d.rank, shuffle=True, seed=cfg.seed)
    else:
        sampler = RandomSampler(range(len(y)), generator=torch.Generator().manual_seed(cfg.seed))
    drop_last = len(y) > cfg.batch_size
    cc = cfg.colour_constancy
    train: DataLoader | DeviceBatches
    if cfg.augment == "device":
        augment = train_augmentation(cfg, meta, batched=True)
        train = DeviceBatches(data.cache, rows, y, sampler, cfg.batch_size, augment, device, drop_last, cc)
    else:
        ds = CachedImages(data.cache, rows, y, train_augmentation(cfg, meta), cc)
        options = _worker_options(cfg, device)
        train = DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=drop_last, **options)
    return Loaders(cfg, data, EvalPreset.from_meta(meta), device, sampler, train)


def _worker_options(cfg: TrainConfig, device: torch.device) -> dict:
    workers = cfg.num_workers
    return {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": workers > 0}
