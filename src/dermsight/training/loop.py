"""Transfer-learning training: `train_one_epoch`, `predict`, and `fit`, which ties data, model and checkpoints.

Model selection and early stopping use the validation split's balanced accuracy (the ISIC metric); the test split is
scored once, at the end, for the record, and never used for any decision. Multi-GPU / multi-node training runs under
`torchrun` (DDP); the same code runs as a single process when torchrun is not used.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from sklearn.metrics import balanced_accuracy_score
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from dermsight.data.cache import ImageCache, build_cache
from dermsight.data.manifest import LABEL_COLUMNS, build_manifest, load_manifest, run_split, save_manifest
from dermsight.data.problems import DataError
from dermsight.data.split import SplitConfig, check_split, split_changes, split_manifest
from dermsight.domain.classes import TAXONOMIES
from dermsight.evaluation import compute_metrics, write_report
from dermsight.evaluation.metrics import headline
from dermsight.files import written_atomically
from dermsight.inference.scoring import softmax
from dermsight.inference.transforms import BatchTrainAugment, EvalPreset, TrainPreset, shades_of_gray
from dermsight.models.bundle import ModelLoadError, load_model, read_meta, save_model
from dermsight.models.factory import WeightsError, create_model, freeze_backbone, unfreeze, use_cuda
from dermsight.models.meta import ModelMeta
from dermsight.models.records import SplitRecord, StopRecord, TrainingData
from dermsight.training.config import TrainConfig

# ------------------------------------------------------------------------------------------------------------ data


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
    host-to-device copies of pixels: on a GPU, the per-process data path (workers, collation, copies) is what limited
    training otherwise (about 500 images/s a process on an H200, whatever the GPU's load).

    The batch order comes from the same sampler as the loader path's (plain shuffle, class-balanced, or DDP's
    shard), iterated once per epoch, so seeds, resumption and DDP behave the same. Images of different sizes are
    turned to landscape and padded to the largest (repeating their edges); `BatchTrainAugment` crops each within its
    own size. Memory:
    3 * H * W bytes per image (HAM10000's 7,010 training images at 150 x 200: 0.6 GB).
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
        store = torch.from_numpy(store).permute(0, 3, 1, 2)
        self.images = store.to(device)
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


@dataclass
class PreparedData:
    manifest: pd.DataFrame  # with split, target (class index; -1 = unusable) and cache_row
    cache: ImageCache
    classes: tuple[str, ...]


def prepare_data(cfg: TrainConfig, progress: bool = True) -> PreparedData:
    """Manifest (read or built) -> lesion-grouped split (unless given) -> decode-once cache."""
    src = Path(cfg.data)
    if run_split(src) is not None:
        src = run_split(src)
        print(f"data: {cfg.data} is a training run's folder; using its split, {src}")
    if src.is_file() and src.suffix == ".csv" and "split" in pd.read_csv(src, nrows=0).columns:
        manifest = load_manifest(src)
    else:
        ingest = build_manifest(src, progress=progress)
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
    classes = TAXONOMIES[cfg.taxonomy].codes
    label = LABEL_COLUMNS[cfg.taxonomy]
    lookup = {c: i for i, c in enumerate(classes)}
    manifest = manifest.copy()
    manifest["target"] = manifest[label].map(lookup).fillna(-1).astype(int)
    unlabelled = manifest["target"] < 0
    if unlabelled.any():
        # E.g. HAM10000's akiec under taxonomy isic2019: only ISIC's own labels tell AK from SCC.
        print(
            f"warning: {int(unlabelled.sum())} image(s) have no {cfg.taxonomy} class in column {label!r} and are "
            "left out of training and scoring"
        )
    cache = build_cache(
        manifest, cfg.cache_size, root=Path(cfg.cache_dir) if cfg.cache_dir else None, progress=progress
    ).cache
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


def _subset(data: PreparedData, split: str) -> pd.DataFrame:
    m = data.manifest
    return m[(m["split"] == split) & (m["target"] >= 0)]


# ------------------------------------------------------------------------------------------------------------ loop


def _autocast(device: torch.device, amp: bool):
    enabled = amp and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader | DeviceBatches,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    amp: bool = True,
    max_steps: int = 0,
    desc: str = "train",
    progress: bool = True,
    teacher: nn.Module | None = None,
    ema: Any = None,
) -> float:
    """One pass over ``loader``; returns the mean training loss. With a ``teacher``, ``criterion`` is a
    `DistillationLoss` and also gets the teacher's logits for the same batch. With an ``ema`` (timm's ModelEmaV3),
    the moving average takes in the weights after every step."""
    model.train()
    total, n = 0.0, 0
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress or None)
    for step, (x, y) in enumerate(bar):
        if max_steps and step >= max_steps:
            break
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with _autocast(device, amp):
            if teacher is None:
                loss = criterion(model(x), y)
            else:
                with torch.no_grad():
                    target_logits = teacher(x)
                loss = criterion(model(x), y, target_logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            # The scheduler counts optimizer steps, resumed runs included: the average's warm-up follows it.
            ema.update(getattr(model, "module", model), step=scheduler.last_epoch)
        total += loss.item() * len(y)
        n += len(y)
        bar.set_postfix(loss=f"{total / n:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    return total / max(n, 1)


@torch.inference_mode()
def predict(
    model: nn.Module, loader: DataLoader, device: torch.device, amp: bool = True, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (float32, N x C) and targets for every batch of ``loader``."""
    model.eval()
    logits, targets = [], []
    for x, y in tqdm(loader, desc="eval", unit="batch", leave=False, disable=not progress or None):
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            out = model(x)
        logits.append(out.float().cpu())
        targets.append(y)
    return torch.cat(logits).numpy(), torch.cat(targets).numpy()


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR multiplier per step: linear warm-up from ~0, then cosine decay to 1% of the peak."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms and biases (decaying BN scales only fights the normalisation)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def class_weights(targets: np.ndarray, n_classes: int) -> np.ndarray:
    """'Balanced' weights n / (k * count_c): each class contributes equally to the loss in expectation."""
    counts = np.bincount(targets, minlength=n_classes).astype(float)
    w = np.where(counts > 0, len(targets) / (n_classes * np.maximum(counts, 1)), 0.0)
    return w


class WeightedCrossEntropy(nn.Module):
    """Cross-entropy with uniform label smoothing, each sample weighted by its class's weight.

    Not ``nn.CrossEntropyLoss(weight=w, label_smoothing=e)``: PyTorch weights the smoothing term by *every* class's
    weight, so with balanced weights a batch of common-class images is pulled towards the rare classes (on HAM10000
    the optimum for a nevus put more probability on dermatofibroma than on nevus). Here the smoothed target stays
    (1 - e) on the true class plus e / C everywhere, and the weight only scales how much that sample counts.
    """

    def __init__(self, weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(logits, target, label_smoothing=self.label_smoothing, reduction="none")
        if self.weight is None:
            return loss.mean()
        w = self.weight.to(loss.dtype)[target]
        return (loss * w).sum() / w.sum().clamp_min(1e-12)


class DistillationLoss(nn.Module):
    """Knowledge distillation (Hinton et al., 2015): KL divergence from the teacher's class distribution to the
    student's, both softened by ``temperature`` and scaled by its square so the gradients keep their size, on the same
    augmented batch the student sees (Beyer et al., 2022: "a good teacher is patient and consistent"). ``weight`` is
    the share of this term; the rest is ``base`` (the class-weighted cross-entropy) on the labels.

    The teacher's raw logits are matched, without its served prior correction or temperature: the student then
    learns the same balanced-loss network function, and gets its own decision rule and temperature fitted on val.
    """

    def __init__(self, base: nn.Module, weight: float = 1.0, temperature: float = 1.0) -> None:
        super().__init__()
        self.base, self.weight, self.temperature = base, weight, temperature

    def forward(self, logits: torch.Tensor, target: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        student = nn.functional.log_softmax(logits.float() / t, dim=1)
        teacher = nn.functional.log_softmax(teacher_logits.float() / t, dim=1)
        kd = nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean") * t * t
        if self.weight >= 1:
            return kd
        return self.weight * kd + (1 - self.weight) * self.base(logits, target)


def start_model(cfg: TrainConfig, device: torch.device) -> tuple[nn.Module, ModelMeta, nn.Module | None]:
    """The network ``cfg`` trains, from its starting weights, its contract (the data and split are filled in once
    known) and the frozen teacher, if any. Raises what `create_model` and `load_teacher` raise."""
    classes = TAXONOMIES[cfg.taxonomy].codes
    model, winfo = create_model(cfg.arch, len(classes), weights=cfg.weights, drop_rate=cfg.drop_rate)
    meta = ModelMeta.new(
        cfg.arch,
        cfg.taxonomy,
        winfo,
        input_size=cfg.input_size,
        crop_pct=cfg.crop_pct,
        colour_constancy=cfg.colour_constancy,
        config=asdict(cfg),
    )
    teacher = load_teacher(cfg.teacher, meta, classes, device) if cfg.teacher else None
    return model, meta, teacher


def load_teacher(path: str, meta: ModelMeta, classes: tuple[str, ...], device: torch.device) -> nn.Module:
    """The frozen teacher network; it must score the same classes from the same normalised input."""
    teacher, tmeta = load_model(path, device=device)
    if tuple(tmeta.classes) != tuple(classes):
        raise ValueError(f"teacher {path} scores {', '.join(tmeta.classes)}, not this run's {', '.join(classes)}")
    if tmeta.colour_constancy != meta.colour_constancy:
        # The teacher would see images unlike the ones it learned from, and teach from its answers to them.
        raise ValueError(
            f"teacher {path} was trained with colour_constancy {tmeta.colour_constancy}, this run uses "
            f"{meta.colour_constancy}: distil with the teacher's setting"
        )
    if (tmeta.input_size, tmeta.crop_pct) != (meta.input_size, meta.crop_pct):
        print(
            f"warning: teacher {path} was trained at {tmeta.input_size} px (crop_pct {tmeta.crop_pct}), this run at "
            f"{meta.input_size} px (crop_pct {meta.crop_pct}): it scores images at a size it did not learn",
            file=sys.stderr,
        )
    if tuple(tmeta.mean) != tuple(meta.mean) or tuple(tmeta.std) != tuple(meta.std):
        raise ValueError(
            f"teacher {path} expects inputs normalised with mean {tmeta.mean} / std {tmeta.std}, this run's "
            f"weights {meta.mean} / {meta.std}: distil between networks that share a normalisation"
        )
    return teacher.to(memory_format=torch.channels_last).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------------------ fit


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_pref: str) -> tuple[Dist, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = use_cuda(device_pref)
    if world > 1:
        d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo")
    else:
        d = Dist()
    device = torch.device(f"cuda:{d.local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels once
    return d, device


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class FitResult:
    model_path: Path
    best_epoch: int
    val_metrics: dict
    test_metrics: dict | None
    run_dir: Path


def train_augmentation(cfg: TrainConfig, meta: ModelMeta, batched: bool = False) -> TrainPreset | BatchTrainAugment:
    """The config's training augmentation: per image (`TrainPreset`, the loader path) or per batch on the device
    (`BatchTrainAugment`, ``augment: device``), from one set of settings."""
    kind = BatchTrainAugment if batched else TrainPreset
    return kind.from_meta(meta, scale=(cfg.scale_min, 1.0), hue=cfg.hue, channel_gain=cfg.channel_gain)


def refuse_finished_run(run: Path, resume: bool) -> None:
    """Raise ValueError (a usage error) when ``run`` already holds a finished model and this is not a resumption:
    training there would replace the model, its config and its split without a word."""
    if not resume and (run / "model.safetensors").is_file():
        raise ValueError(
            f"{run} already holds a trained model (model.safetensors); train into another folder (--out), "
            "continue it with --resume, or delete the folder first"
        )


def refuse_changed_split(run: Path, manifest: pd.DataFrame, resuming: bool, same_split_as: Path | None = None) -> None:
    """Raise ValueError when ``run`` would train on another split than it must: its own split.csv when it is
    ``resuming`` from a checkpoint, and ``same_split_as`` (an ensemble's first member's split.csv) for the others.

    The split is drawn again from ``data`` on every start, so images added to or removed from the data since (or a
    changed ``data:``) redraw it: one row removed from 280 moved 154 images, some from train into test, and the
    resumed run then scored its checkpoints on images it had trained on (or an ensemble's members trained on each
    other's test images). A run without split.csv has nothing to compare (it never finished preparing its data); one
    with split.csv but no checkpoint yet keeps that split.csv (`fit`), so it is compared too."""
    checks = []
    # split.csv, not last.pt: a run stopped in its first epoch has no checkpoint yet, but it keeps that split.csv.
    if resuming and (run / "split.csv").is_file():
        why = f"cannot resume {run}: its data or split settings (data, val, test, split_seed) changed since it started"
        checks.append((run / "split.csv", why))
    if same_split_as is not None and same_split_as.is_file() and same_split_as != run / "split.csv":
        checks.append(
            (same_split_as, f"cannot train {run}: the data changed since the ensemble's first member was trained")
        )
    for saved, why in checks:
        changes = split_changes(pd.read_csv(saved, dtype=str), manifest)  # ids stay text
        if changes["moved"] or changes["added"]:
            raise ValueError(
                f"{why} ({changes['moved']} image(s) would move to another split, {changes['added']} added, "
                f"{changes['gone']} gone), so it would train on a different split and be scored on images it (or "
                f"another member) trained on. Restore the data ({saved} lists the images), or train into another "
                "--out without --resume"
            )
        if changes["gone"]:
            print(f"warning: {changes['gone']} image(s) of {saved} are no longer in the data", file=sys.stderr)


def _from_rank_0(d: Dist, value: Callable[[], Any]) -> Any:
    """``value()`` computed on rank 0 and given to every rank. Rank 0 alone holds the run folder's files for sure
    (other nodes may not see them), and ranks that decided differently would wait for each other forever."""
    result = value() if d.main else None
    if d.world > 1:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result


def _checked_on_rank_0(d: Dist, check: Callable[[], None]) -> None:
    """Run ``check`` on rank 0 and stop every rank with its ValueError, if it raises one (a rank left going on alone
    would wait for the others forever under a launcher that does not tear a failed job down; torchrun does)."""

    def refusal() -> str | None:
        try:
            check()
        except ValueError as e:
            return str(e)
        return None

    why = _from_rank_0(d, refusal)
    if why is not None:
        raise ValueError(why)


def finished_earlier(run: Path, cfg: TrainConfig) -> ModelMeta | None:
    """The metadata of ``run``'s model when ``cfg`` resumes a run that already finished with these settings, else
    None. Resuming it would redo the final scoring and replace model.safetensors, losing a calibration fitted since
    (`dermsight calibrate --negatives`). A run stopped by its time budget, or resumed with more epochs, goes on."""
    path = run / "model.safetensors"
    if not (cfg.resume and path.is_file()):
        return None
    try:
        meta = read_meta(path)
    except ModelLoadError:
        return None
    was = meta.config or {}
    stopped_by_time = meta.stop is not None and meta.stop.reason == "time_limit"
    same_length = was.get("epochs") == cfg.epochs and was.get("swa_epochs", 0) == cfg.swa_epochs
    return meta if same_length and not stopped_by_time else None


def fit(cfg: TrainConfig, progress: bool = True, same_split_as: Path | None = None) -> FitResult:
    """Train per ``cfg``; writes into ``cfg.out``: config.yaml, log.csv, last.pt, model.safetensors, val/, test/.
    ``same_split_as``: a split.csv this run's split must equal (`train` passes an ensemble's first member's)."""
    d, device = _init_distributed(cfg.device)
    run = Path(cfg.out)
    progress = progress and d.main
    if cfg.threads and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    _seed_everything(cfg.seed + d.rank)
    _checked_on_rank_0(d, lambda: refuse_finished_run(run, cfg.resume))
    earlier = finished_earlier(run, cfg) if d.main else None
    if _from_rank_0(d, lambda: earlier is not None):
        if d.world > 1:
            dist.destroy_process_group()
        if earlier is None:
            return None  # type: ignore[return-value]  # as on every rank but 0
        print(
            f"{run} finished earlier (its model.safetensors is kept as it is): nothing to resume. Raise --epochs to "
            "train it further"
        )
        m = earlier.metrics or {}
        return FitResult(run / "model.safetensors", int(m.get("best_epoch", 0)), m.get("val", {}), m.get("test"), run)
    if d.main and not cfg.resume:  # a resumed run's config is written once its data is known to be the same
        cfg.to_yaml(run / "config.yaml")
    writer_class = _tensorboard(cfg)  # before the data work, on every rank: a missing package fails fast
    # The network, its starting weights and the teacher before the data work too: an unknown backbone, weights that
    # cannot be had (no network for the hub, a missing file) or an unfit teacher then fail in seconds, not after
    # minutes of preparing data.
    model, meta, teacher = start_model(cfg, device)

    # Rank 0 builds the manifest, split and cache; the others then find the finished cache and reuse it.
    if d.main:
        data = prepare_data(cfg, progress)
    if d.world > 1:
        dist.barrier()
    if not d.main:
        data = prepare_data(cfg, progress=False)
    _checked_on_rank_0(d, lambda: refuse_changed_split(run, data.manifest, cfg.resume, same_split_as))
    train_df, val_df, test_df = (_subset(data, s) for s in ("train", "val", "test"))
    if len(train_df) == 0 or len(val_df) == 0:
        raise ValueError("the split has no training or no validation images")
    if d.main and not (cfg.resume and (run / "split.csv").is_file()):
        # A resumed run keeps the split.csv it started with (`refuse_changed_split` has checked that it still holds):
        # images gone from the data since must not rewrite the record of which image was in which split.
        save_manifest(data.manifest.drop(columns=["cache_row"]), run / "split.csv")
    n_classes = len(data.classes)
    if d.main:
        # A hand-made split, or data of a few classes, trains a model of every class of the taxonomy all the same.
        for name, df, what in (
            ("training", train_df, "the model cannot learn to name them"),
            ("val", val_df, "checkpoints are chosen on the other classes alone"),
        ):
            missing = [c for i, c in enumerate(data.classes) if not (df["target"] == i).any()]
            if missing:
                print(f"warning: the {name} split has no image of {', '.join(missing)}: {what}", file=sys.stderr)

    meta = replace(
        meta,
        training_data=TrainingData.of([cfg.data], [len(data.manifest)]),
        # Sizes, fingerprint and the train/val image ids: calibrate and tune-decision check that they fit on this
        # split, and evaluate warns when it scores images the model learned from.
        split=SplitRecord.of(data.manifest, cfg.split_seed, LABEL_COLUMNS[cfg.taxonomy]),
    )
    model = model.to(device).to(memory_format=torch.channels_last)
    ema = None
    if cfg.ema_decay:
        from timm.utils import ModelEmaV3

        # Warm-up power 3/4: timm's advice for runs of thousands, not millions, of steps.
        ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True, warmup_power=0.75)
    train_tf = train_augmentation(cfg, meta)
    eval_tf = EvalPreset.from_meta(meta)

    y_train = train_df["target"].to_numpy()
    cc = cfg.colour_constancy
    train_ds = CachedImages(data.cache, train_df["cache_row"].to_numpy(), y_train, train_tf, cc)
    cw = class_weights(y_train, n_classes)
    if cfg.imbalance == "sampler":
        sampler: Sampler[int] = WeightedSampler(cw[y_train], len(y_train), cfg.seed, d.rank, d.world)
    elif d.world > 1:
        sampler = torch.utils.data.DistributedSampler(train_ds, d.world, d.rank, shuffle=True, seed=cfg.seed)
    else:
        sampler = torch.utils.data.RandomSampler(train_ds, generator=torch.Generator().manual_seed(cfg.seed))
    loader_kw = dict(
        num_workers=cfg.num_workers, pin_memory=device.type == "cuda", persistent_workers=cfg.num_workers > 0
    )
    drop_last = len(train_ds) > cfg.batch_size
    train_dl: DataLoader | DeviceBatches
    if cfg.augment == "device":
        batch_aug = train_augmentation(cfg, meta, batched=True)
        train_dl = DeviceBatches(
            data.cache, train_ds.rows, y_train, sampler, cfg.batch_size, batch_aug, device, drop_last, cc
        )
    else:
        train_dl = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=drop_last, **loader_kw)

    def eval_loader(df: pd.DataFrame) -> DataLoader:
        ds = CachedImages(data.cache, df["cache_row"].to_numpy(), df["target"].to_numpy(), eval_tf, cc)
        return DataLoader(ds, batch_size=cfg.batch_size * 2, shuffle=False, **loader_kw)

    val_dl = eval_loader(val_df)
    weight = torch.tensor(cw, dtype=torch.float32, device=device) if cfg.imbalance == "loss" else None
    criterion: nn.Module = WeightedCrossEntropy(weight, cfg.label_smoothing).to(device)
    if teacher is not None:
        criterion = DistillationLoss(criterion, cfg.distil_weight, cfg.distil_temperature)

    net: nn.Module = model
    if d.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    steps_per_epoch = len(train_dl) if not cfg.max_steps_per_epoch else min(len(train_dl), cfg.max_steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch))
    )

    loop = _Epochs(
        cfg, model, net, optimizer, scheduler, sampler, train_dl, val_dl, criterion, device, meta, run, d.main,
        progress, teacher, world=d.world, ema=ema,
    )  # fmt: skip
    start, swa_state = loop.begin(cfg.resume)
    if d.main and cfg.resume:
        # Only now: a checkpoint of another run (another arch, say) is refused by `begin`, and that run's config.yaml
        # must then still describe it.
        cfg.to_yaml(run / "config.yaml")
    if writer_class is not None and d.main:
        # A resumed run drops what a crash left logged after its last checkpoint (purge_step), as log.csv does.
        loop.writer = writer_class(log_dir=str(run / "tensorboard"), purge_step=start + 1 if start else None)

    epoch = start - 1
    # A checkpoint taken in the averaging phase means the main schedule is over.
    for epoch in range(start, cfg.epochs) if swa_state is None else ():
        if loop.time_up(epoch):
            epoch -= 1
            break
        t0 = time.perf_counter()
        loss = loop.train_epoch(epoch, scheduler, f"epoch {epoch + 1}/{cfg.epochs}")
        # Every rank scores the (small) validation set itself and takes rank 0's scores (`score_val`), so all keep
        # the same best epoch and take the same early-stopping decision.
        val = loop.score_val(loop.scored)
        improved = loop.consider(loop.scored, val, epoch)
        loop.stale = 0 if improved else loop.stale + 1
        loop.log(epoch, scheduler, loss, val, improved, t0, raw=loop.consider_raw(epoch))
        loop.save_last(epoch)
        if loop.stale >= cfg.patience:
            if d.main:
                print(f"early stop: no val balanced-accuracy gain for {cfg.patience} epochs")
            break

    stop = StopRecord(
        reason="time_limit"
        if loop.stopped_after is not None
        else "early_stopping"
        if loop.stale >= cfg.patience
        else "epochs",
        epochs_run=epoch + 1,
        best_epoch=loop.best_epoch + 1,
        time_limit_s=cfg.time_limit_s or None,
    )
    swa_chosen, swa_ran = False, bool(cfg.swa_epochs) and loop.stopped_after is None
    if swa_ran:
        bn_loader = eval_loader(train_df.sample(n=min(2000, len(train_df)), random_state=cfg.seed))
        swa_start = _swa_phase(loop, steps_per_epoch, epoch + 1, swa_state, bn_loader)
        swa_chosen = loop.best_epoch >= swa_start  # the best checkpoint is one of the averages
    best_path, best_epoch = loop.best_path, loop.best_epoch
    if loop.writer is not None:
        loop.writer.close()

    if d.world > 1:
        dist.barrier()
    result = None
    if d.main:
        result = _finish(
            cfg, run, best_path, best_epoch, data, val_df, test_df, eval_loader, device, progress, swa_chosen,
            swa_ran, loop.stopped_after, stop,
        )  # fmt: skip
    if d.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result  # type: ignore[return-value]  # None on non-zero ranks


class _ResumeRefused(Exception):
    """A whole checkpoint that this run's settings cannot continue (its message says why)."""


def next_epoch_estimate(seconds: Sequence[float]) -> float:
    """The time budget's guess at the next epoch: the longest so far, leaving out the first once there are others
    (see `_Epochs.time_up`)."""
    return max(seconds[1:] or seconds)


@dataclass
class _Epochs:
    """What every epoch of `fit` shares, for the main schedule and the SWA phase alike: training, scoring on val,
    keeping the best checkpoint (on val balanced accuracy), the CSV log and the resumable ``last.pt``."""

    cfg: TrainConfig
    model: nn.Module
    net: nn.Module  # `model`, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # the main schedule's
    sampler: Sampler[int]
    train_dl: DataLoader | DeviceBatches
    val_dl: DataLoader
    criterion: nn.Module
    device: torch.device
    meta: ModelMeta
    run: Path
    main: bool  # rank 0: the one that writes files
    progress: bool = True
    teacher: nn.Module | None = None  # knowledge distillation (cfg.teacher)
    writer: Any = None  # a TensorBoard SummaryWriter (cfg.tensorboard), rank 0 only
    world: int = 1  # DDP processes; rank 0 takes the time-limit decision for all
    ema: Any = None  # timm ModelEmaV3 (cfg.ema_decay): its average is what is scored and kept
    best: float = -1.0
    best_epoch: int = -1
    best_raw: float = -1.0  # with an EMA: the raw weights' best val balanced accuracy (best_raw.safetensors)
    stale: int = 0
    t_begin: float = field(default_factory=time.perf_counter)
    seconds: list[float] = field(default_factory=list)  # this invocation's epochs, in seconds
    stopped_after: int | None = None  # the last epoch (1-based) when cfg.time_limit_s stopped training

    def time_up(self, epoch: int) -> bool:
        """Would one more epoch, as long as the longest so far in this invocation, end past ``cfg.time_limit_s``
        (counted from the start of this invocation: a resumed run gets the budget afresh)? At least one epoch runs.
        The first epoch counts only until a second is done: it carries one-time costs (CUDA and cuDNN warm-up,
        loader workers, the device image store), 76 s against 21 s for the next ones on a shared H200, which would
        otherwise stop a GPU run several epochs early. Under DDP rank 0 decides for all, so every rank stops at the
        same epoch."""
        limit = self.cfg.time_limit_s
        if not limit or not self.seconds:
            return False
        late = time.perf_counter() - self.t_begin + next_epoch_estimate(self.seconds) > limit
        if self.world > 1:
            flag = torch.tensor([float(late)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.broadcast(flag, src=0)
            late = bool(flag.item())
        if late:
            self.stopped_after = epoch  # the epochs before this one (0-based) are done
            if self.main:
                print(
                    f"time limit: another epoch would pass {limit:.0f} s, so training stops after epoch {epoch} and "
                    "the best checkpoint so far is scored"
                )
        return late

    @property
    def scored(self) -> nn.Module:
        """The network each epoch is judged by: the weights' moving average when there is one, else the model."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def last(self) -> Path:
        return self.run / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.run / "best.safetensors"

    @property
    def best_raw_path(self) -> Path:
        return self.run / "best_raw.safetensors"

    @property
    def log_path(self) -> Path:
        return self.run / "log.csv"

    def begin(self, resume: bool) -> tuple[int, dict | None]:
        """Restore ``last.pt`` when resuming and there is one, and start the log unless it continues; returns (the
        first epoch to run, the SWA phase's state or None)."""
        start, swa_state = 0, None
        if resume and not self.last.is_file() and self.main:
            print(f"no checkpoint to resume from ({self.last} does not exist): training starts from epoch 1")
        if resume and self.last.is_file():
            try:
                ck = torch.load(self.last, map_location=self.device, weights_only=False)
                if isinstance(ck, dict) and ("ema" in ck) != (self.ema is not None):
                    # The checkpoints kept so far were judged by the other network (the average or the raw
                    # weights), and log.csv has the other columns: the run cannot simply go on with ema_decay changed.
                    was = "with ema_decay" if "ema" in ck else "without ema_decay"
                    raise _ResumeRefused(
                        f"cannot resume from {self.last}: it was trained {was}; resume with the ema_decay it started "
                        "with, or train into another --out"
                    )
                self.model.load_state_dict(ck["model"])
                self.optimizer.load_state_dict(ck["optimizer"])
                self.scheduler.load_state_dict(ck["scheduler"])
                if self.ema is not None:
                    self.ema.module.load_state_dict(ck["ema"])
                start, self.best, self.best_epoch = ck["epoch"] + 1, ck["best"], ck["best_epoch"]
                self.best_raw = ck.get("best_raw", -1.0)
                self.stale, swa_state = ck["stale"], ck.get("swa")
                torch.set_rng_state(ck["rng"])
            except _ResumeRefused as e:
                raise ValueError(str(e)) from None
            except Exception as e:  # truncated, not a checkpoint, or another run's (architecture, classes)
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ValueError(
                    f"cannot resume from {self.last}: it is damaged or belongs to a different run ({first[:200]}); "
                    "train without --resume to start again, or into another --out"
                ) from None
            # A plain RandomSampler draws each epoch's order from one generator that advances every epoch: replay
            # the finished epochs so a resumed run sees the orders an uninterrupted one would (the other samplers
            # are seeded per epoch through set_epoch).
            if not hasattr(self.sampler, "set_epoch"):
                for _ in range(start):
                    for _ in self.sampler:
                        pass
            if self.main:
                print(f"resumed from {self.last} at epoch {start}")
        if self.main and start and self.log_path.exists():
            # A run stopped between logging an epoch and checkpointing it logs that epoch again when resumed.
            with self.log_path.open(newline="") as f:
                rows = list(csv.reader(f))
            kept = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= start]
            if len(kept) < len(rows):
                with written_atomically(self.log_path) as tmp, Path(tmp).open("w", newline="") as f:
                    csv.writer(f).writerows(kept)
        if self.main and (start == 0 or not self.log_path.exists()):
            fields = ["epoch", "lr", "train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy", "seconds"]
            if self.ema is not None:  # the val_* columns are the average's; these, the raw weights' for comparison
                fields += ["raw_val_loss", "raw_val_accuracy", "raw_val_balanced_accuracy"]
            with self.log_path.open("w", newline="") as f:
                csv.writer(f).writerow(fields)
        return start, swa_state

    def train_epoch(self, epoch: int, sched: torch.optim.lr_scheduler.LRScheduler, label: str) -> float:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        (freeze_backbone if epoch < self.cfg.freeze_epochs else unfreeze)(self.model)
        cfg = self.cfg
        return train_one_epoch(
            self.net, self.train_dl, self.criterion, self.optimizer, sched, self.device, cfg.amp,
            cfg.max_steps_per_epoch, label, self.progress, self.teacher, self.ema,
        )  # fmt: skip

    def score_val(self, m: nn.Module) -> tuple[float, float, float]:
        """(val loss, accuracy, balanced accuracy) of ``m`` under plain argmax."""
        logits, y = predict(m, self.val_dl, self.device, self.cfg.amp, self.progress)
        pred = logits.argmax(1)
        val_loss = float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y)))
        scores = (val_loss, float((pred == y).mean()), float(balanced_accuracy_score(y, pred)))
        if self.world > 1:
            # Each rank updated its BatchNorm statistics with its own last batches, so the ranks' scores differ
            # slightly; rank 0's are used by all, so every rank keeps the same best epoch and stops at the same one
            # (ranks that disagreed would wait for each other forever).
            t = torch.tensor(scores, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.broadcast(t, src=0)
            scores = (float(t[0]), float(t[1]), float(t[2]))
        return scores

    def consider(self, m: nn.Module, val: tuple[float, float, float], epoch: int) -> bool:
        """Keep ``m`` as the best checkpoint if its val balanced accuracy is the highest so far."""
        if val[2] <= self.best:
            return False
        self.best, self.best_epoch = val[2], epoch
        if self.main:
            save_model(self.best_path, m, self.meta)
        return True

    def consider_raw(self, epoch: int) -> tuple[float, float, float] | None:
        """With an EMA, also score the raw weights and keep their best as ``best_raw.safetensors``: what the run
        would have kept without the average, so the two can be compared on the same trajectory (the average does
        not change training). Costs one more pass over val per epoch. None without an EMA."""
        if self.ema is None:
            return None
        raw = self.score_val(self.model)
        if raw[2] > self.best_raw:
            self.best_raw = raw[2]
            if self.main:
                save_model(self.best_raw_path, self.model, self.meta)
        return raw

    def log(self, epoch, sched, loss, val, improved, t0, what: str = "", raw=None) -> None:
        seconds = time.perf_counter() - t0
        self.seconds.append(seconds)  # every rank: see time_up
        if not self.main:
            return
        total = self.cfg.epochs + self.cfg.swa_epochs
        lr = sched.get_last_lr()[0]
        row = [epoch + 1, f"{lr:.3e}", f"{loss:.4f}", *(f"{v:.4f}" for v in val)]
        extra = [f"{v:.4f}" for v in raw] if raw is not None else []
        with self.log_path.open("a", newline="") as f:
            csv.writer(f).writerow([*row, f"{seconds:.1f}", *extra])
        if self.writer is not None:
            names = ("lr", "train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy")  # log.csv's columns
            for name, value in zip(names, (lr, loss, *val), strict=True):
                self.writer.add_scalar(name, value, epoch + 1)
            self.writer.flush()
        print(
            f"epoch {epoch + 1}/{total}{what}: train loss {loss:.3f}, val loss {val[0]:.3f}, val acc {val[1]:.3f}, "
            f"val balanced acc {val[2]:.3f}{' (best)' if improved else ''}"
            + (f" (raw weights {raw[2]:.3f})" if raw is not None else "")
            + f" [{seconds:.0f} s]",
            flush=True,
        )

    def save_last(self, epoch: int, swa: dict | None = None) -> None:
        if not self.main:
            return
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "best_raw": self.best_raw,
            "stale": self.stale,
            "rng": torch.get_rng_state(),
        }
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()
        # A run killed while saving keeps its previous, whole checkpoint.
        with written_atomically(self.last) as tmp:
            torch.save(state | ({"swa": swa} if swa is not None else {}), tmp)


def _swa_phase(loop: _Epochs, steps_per_epoch: int, first_epoch: int, state: dict | None, bn_loader) -> bool:
    """Stochastic weight averaging (Izmailov et al. 2018) after the main schedule: ``cfg.swa_epochs`` more epochs at
    the constant rate ``cfg.swa_lr`` (reached by a one-epoch cosine ramp), averaging the weights at the end of each.

    Averaged weights sit nearer the centre of a flat region of the loss than any one end-of-epoch checkpoint, which
    tends to generalise better, for the price of a few epochs. After every epoch the running average gets BatchNorm
    statistics of its own (re-estimated on ``bn_loader``: training images, eval preprocessing) and is scored on val
    like any checkpoint: it is kept only if its balanced accuracy beats the best so far. Returns the phase's first
    epoch (best epochs from there on are averages)."""
    from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

    cfg = loop.cfg
    averaged = AveragedModel(loop.model)
    sched = SWALR(loop.optimizer, swa_lr=cfg.swa_lr, anneal_epochs=max(steps_per_epoch, 1), anneal_strategy="cos")
    done = 0
    if state is not None:
        averaged.load_state_dict(state["model"])
        sched.load_state_dict(state["scheduler"])
        done = state["done"]
    for k in range(done, cfg.swa_epochs):
        epoch = first_epoch + k - done
        if loop.time_up(epoch):
            break
        t0 = time.perf_counter()
        loss = loop.train_epoch(epoch, sched, f"epoch {epoch + 1}/{cfg.epochs + cfg.swa_epochs} (SWA)")
        averaged.update_parameters(loop.model)
        update_bn(bn_loader, averaged, device=loop.device)
        averaged.eval()
        val = loop.score_val(averaged.module)
        improved = loop.consider(averaged.module, val, epoch)
        loop.log(epoch, sched, loss, val, improved, t0, f" (SWA, average of {k + 1})")
        loop.save_last(epoch, {"model": averaged.state_dict(), "scheduler": sched.state_dict(), "done": k + 1})
    return first_epoch - done


def _calibrate(cfg: TrainConfig, model_path: Path, manifest: pd.DataFrame, split_at: Path, progress: bool) -> dict:
    """Fit the temperature and the not-a-lesion gate, then (``cfg.tune_decision``) the decision rule, on the train and
    val parts of ``manifest`` (test is measured, never used to fit); returns the model's metrics afterwards.
    ``split_at``: the run folder that holds the split, for the retry hint."""
    from dermsight.posthoc import decision
    from dermsight.posthoc.calibrate import calibrate_model, report_lines

    try:
        print("\n".join(report_lines(calibrate_model(model_path, manifest, None, progress=progress))))
        if cfg.tune_decision:
            tuned = decision.tune_decision(model_path, manifest, None, model_path.parent / "decision", progress)
            print("\n".join(decision.report_lines(tuned)))
    except ValueError as e:
        # Hours of training must not be lost to a calibration problem: keep the uncalibrated model and say so.
        print(
            f"warning: calibration failed ({e}); the model is saved uncalibrated. Run `dermsight calibrate "
            f"--model {model_path} --data {split_at}` once the problem is fixed."
        )
    return read_meta(model_path).metrics


def _tensorboard(cfg: TrainConfig) -> Any:
    """TensorBoard's SummaryWriter class when the config asks for TensorBoard scalars, else None."""
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError(
            "tensorboard: true needs the tensorboard package: pip install 'dermsight[tensorboard]' (or set it false; "
            "log.csv has the same figures)"
        ) from None
    return SummaryWriter


def _finish(
    cfg,
    run,
    best_path,
    best_epoch,
    data,
    val_df,
    test_df,
    eval_loader,
    device,
    progress,
    swa_chosen=False,
    swa_ran: bool = False,
    stopped_after: int | None = None,
    stop: StopRecord | None = None,
) -> FitResult:
    """Score the best checkpoint on val (selection data) and, once, on test; store the metrics in the model."""
    model, meta = load_model(best_path, device=device)
    model = model.to(memory_format=torch.channels_last)
    labels = list(data.classes)
    out: dict[str, dict] = {}
    for name, df in (("val", val_df), ("test", test_df)):
        if len(df) == 0:
            continue
        logits, y = predict(model, eval_loader(df), device, cfg.amp, progress)
        probs = softmax(logits, meta.temperature)
        m = compute_metrics(y, probs, labels)
        write_report(m, probs, y, run / name, title=f"{cfg.arch} on the {name} split ({len(df)} images)")
        np.savez_compressed(run / name / "predictions.npz", logits=logits, targets=y)
        out[name] = m
    summary = {
        name: {k: m[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_auc", "ece", "ci95")}
        | {"recall": {c: v["recall"] for c, v in m["per_class"].items()}}
        for name, m in out.items()
    }
    summary["best_epoch"] = best_epoch + 1
    if stopped_after is not None:
        summary["time_limit"] = {"seconds": cfg.time_limit_s, "stopped_after_epoch": stopped_after}
    if swa_ran:
        # Which candidate won on val: the averaged weights (SWA) or one epoch's checkpoint.
        summary["swa"] = {"epochs": cfg.swa_epochs, "lr": cfg.swa_lr, "selected": swa_chosen}
    if cfg.ema_decay:
        summary["ema"] = {"decay": cfg.ema_decay}  # every checkpoint scored, the best included, was the average
    final = ModelMeta(**{**asdict(meta), "metrics": summary, "stop": stop})
    model_path = save_model(run / "model.safetensors", model, final)
    if cfg.calibrate:
        summary = _calibrate(cfg, model_path, data.manifest, run, progress)
    (run / "metrics.json").write_text(json.dumps(summary, indent=2))
    chosen = "the weight average (SWA)" if swa_chosen else f"best epoch {best_epoch + 1}"
    print(f"{chosen}; model written to {model_path}")
    for name, m in out.items():
        print(f"{name}: {headline(m)}")
    return FitResult(model_path, best_epoch + 1, out.get("val", {}), out.get("test"), run)


def train(cfg: TrainConfig, progress: bool = True) -> Path | None:
    """What `dermsight train` runs; returns the model file (None on DDP ranks other than 0).

    ``cfg.members`` == 1: `fit`. Otherwise one `fit` per member, all on the same split: seeds ``cfg.seed``,
    ``cfg.seed + 1``, ... in OUT/seed<N>, or the runs ``cfg.member_overrides`` describes (other backbones, say) in
    OUT/<arch>_seed<N>; then their ensemble in OUT/model.safetensors, whose temperature, not-a-lesion gate and
    decision rule are fitted on that split's train/val parts (the members' own are skipped: they would be replaced).
    With ``resume``, members that finished earlier are kept and an interrupted one continues from its checkpoint.
    """
    if cfg.members == 1:
        res = fit(cfg, progress)
        return res.model_path if res is not None else None
    run = Path(cfg.out)
    main = int(os.environ.get("RANK", "0")) == 0
    if main:
        refuse_finished_run(run, cfg.resume)
        if not cfg.resume:  # a resumed ensemble's config is written once its members agree on the split
            cfg.to_yaml(run / "config.yaml")
    members = [cfg.member_config(i) for i in range(cfg.members)]
    finished = [finished_earlier(Path(m.out), m) is not None for m in members]
    ensemble = run / "model.safetensors"
    if (
        all(finished)
        and cfg.resume
        and ensemble.is_file()
        and (run / "metrics.json").is_file()
        and read_meta(ensemble).members == len(members)  # not when the member list changed since
    ):
        # Combining and calibrating again would replace the ensemble's model, and a calibration fitted into it since.
        if main:
            print(f"{run} finished earlier (its model.safetensors is kept as it is): nothing to resume")
        return run / "model.safetensors" if main else None
    # Every member's start first (backbone, weights, teacher): a bad one fails now, not after the members before it
    # trained (about 48 minutes each on a 2-core CPU).
    for i, member in enumerate(members):
        if not finished[i]:
            try:
                start_model(member, torch.device("cpu"))
            except (ValueError, WeightsError, ModelLoadError) as e:
                raise type(e)(f"member {cfg.member_name(i)}: {e}") from None
    paths = []
    first_split = Path(members[0].out) / "split.csv"
    for i, member in enumerate(members):
        done = Path(member.out) / "model.safetensors"
        if finished[i]:  # checked above; training the members before it changes nothing in its folder
            print(f"member {cfg.member_name(i)} finished earlier: {done}")
        else:
            fit(member, progress, same_split_as=first_split if i else None)
        paths.append(done)
    if not main:
        return None
    if cfg.resume:
        cfg.to_yaml(run / "config.yaml")

    from dermsight.data.manifest import read_split_manifest
    from dermsight.posthoc.ensemble import combine

    model_path = Path(combine(paths, run / "model.safetensors")["model"])
    print(f"ensemble of {len(paths)} written to {model_path}")
    metrics = read_meta(model_path).metrics
    if cfg.calibrate:
        split_at = paths[0].parent
        metrics = _calibrate(cfg, model_path, read_split_manifest(split_at), split_at, progress)
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return model_path
