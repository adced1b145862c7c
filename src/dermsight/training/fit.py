"""`fit`: one model trained per a config, from its data to its saved, scored model.

It ties the stages together: the refusals that protect a run folder (`guards`), the data and its split (`data`), the
network and its loss and optimiser (`start`, `engine`), the epochs with their checkpoints (`epochs`,
`checkpoint`) and the final scores (`finish`). Multi-GPU / multi-node training runs under `torchrun` (DDP); the same
code runs as a single process when torchrun is not used.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from dermsight.data.manifest import LABEL_COLUMNS, save_manifest
from dermsight.models.meta import ModelMeta
from dermsight.models.records import SplitRecord, StopRecord, TrainingData
from dermsight.training.checkpoint import resume
from dermsight.training.config import TrainConfig
from dermsight.training.data import class_weights, make_loaders, prepare_data, subset
from dermsight.training.distributed import (
    barrier,
    checked_on_rank_0,
    close,
    from_rank_0,
    init_distributed,
    seed_everything,
)
from dermsight.training.engine import Learner, make_criterion, param_groups, warmup_cosine
from dermsight.training.epochs import main_phase, swa_phase
from dermsight.training.finish import FitResult, finish
from dermsight.training.guards import finished_earlier, refuse_changed_split, refuse_finished_run
from dermsight.training.start import start_model
from dermsight.training.state import Run


def fit(cfg: TrainConfig, progress: bool = True, same_split_as: Path | None = None) -> FitResult:
    """Train per ``cfg``; writes into ``cfg.out``: config.yaml, log.csv, last.pt, model.safetensors, val/, test/.
    ``same_split_as``: a split.csv this run's split must equal (`train` passes an ensemble's first member's).
    Returns None on DDP ranks other than 0."""
    d, device = init_distributed(cfg.device)
    run = Run(cfg, Path(cfg.out), device, d, progress and d.main)
    if cfg.threads and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed + d.rank)
    checked_on_rank_0(d, lambda: refuse_finished_run(run.dir, cfg.resume))
    earlier = finished_earlier(run.dir, cfg) if d.main else None
    if from_rank_0(d, lambda: earlier is not None):
        close(d)
        return _kept(run.dir, earlier) if earlier is not None else None  # type: ignore[return-value]
    if d.main and not cfg.resume:  # a resumed run's config is written once its data is known to be the same
        cfg.to_yaml(run.dir / "config.yaml")
    writer_class = _tensorboard(cfg)  # before the data work, on every rank: a missing package fails fast
    # The network, its starting weights and the teacher before the data work too: an unknown backbone, weights that
    # cannot be had (no network for the hub, a missing file) or an unfit teacher then fail in seconds, not after
    # minutes of preparing data.
    model, meta, teacher = start_model(cfg, device)
    _prepare_data(run, same_split_as)
    _assemble(run, model, meta, teacher)
    start, swa_state = resume(run)
    if d.main and cfg.resume:
        # Only now: a checkpoint of another run (another arch, say) is refused by `resume`, and that run's
        # config.yaml must then still describe it.
        cfg.to_yaml(run.dir / "config.yaml")
    if writer_class is not None and d.main:
        # A resumed run drops what a crash left logged after its last checkpoint (purge_step), as log.csv does.
        run.writer = writer_class(log_dir=str(run.dir / "tensorboard"), purge_step=start + 1 if start else None)

    # A checkpoint taken in the averaging phase means the main schedule is over.
    last = main_phase(run, start) if swa_state is None else start - 1
    stop = _stop_record(run, last)
    swa_selected = None
    if cfg.swa_epochs and run.state.stopped_after is None:
        swa_start = swa_phase(run, last + 1, swa_state)
        swa_selected = run.state.best_epoch >= swa_start  # the best checkpoint is one of the averages
    if run.writer is not None:
        run.writer.close()

    barrier(d)
    result = finish(run, stop, swa_selected) if d.main else None
    barrier(d)
    close(d)
    return result  # type: ignore[return-value]  # None on non-zero ranks


def _kept(run_dir: Path, earlier: ModelMeta) -> FitResult:
    print(
        f"{run_dir} finished earlier (its model.safetensors is kept as it is): nothing to resume. Raise --epochs to "
        "train it further"
    )
    m = earlier.metrics or {}
    return FitResult(
        run_dir / "model.safetensors", int(m.get("best_epoch", 0)), m.get("val", {}), m.get("test"), run_dir
    )


def _prepare_data(run: Run, same_split_as: Path | None) -> None:
    """``run.data``: the manifest, split and cache, checked against the split the run must keep; split.csv written."""
    cfg, d = run.cfg, run.dist
    # Rank 0 builds the manifest, split and cache; the others then find the finished cache and reuse it.
    if d.main:
        run.data = prepare_data(cfg, run.progress)
    barrier(d)
    if not d.main:
        run.data = prepare_data(cfg, progress=False)
    checked_on_rank_0(d, lambda: refuse_changed_split(run.dir, run.data.manifest, cfg.resume, same_split_as))
    train_df, val_df = subset(run.data, "train"), subset(run.data, "val")
    if len(train_df) == 0 or len(val_df) == 0:
        raise ValueError("the split has no training or no validation images")
    if not d.main:
        return
    if not (cfg.resume and (run.dir / "split.csv").is_file()):
        # A resumed run keeps the split.csv it started with (`refuse_changed_split` has checked that it still holds):
        # images gone from the data since must not rewrite the record of which image was in which split.
        save_manifest(run.data.manifest.drop(columns=["cache_row"]), run.dir / "split.csv")
    # A hand-made split, or data of a few classes, trains a model of every class of the taxonomy all the same.
    for name, df, what in (
        ("training", train_df, "the model cannot learn to name them"),
        ("val", val_df, "checkpoints are chosen on the other classes alone"),
    ):
        missing = [c for i, c in enumerate(run.data.classes) if not (df["target"] == i).any()]
        if missing:
            print(f"warning: the {name} split has no image of {', '.join(missing)}: {what}", file=sys.stderr)


def _assemble(run: Run, model: nn.Module, meta: ModelMeta, teacher: nn.Module | None) -> None:
    """The run's contract, network, batches, loss, optimiser and schedule, on its device."""
    cfg, data, device = run.cfg, run.data, run.device
    run.meta = replace(
        meta,
        training_data=_training_data(cfg, data.manifest),
        # Sizes, fingerprint and the train/val image ids: calibrate and tune-decision check that they fit on this
        # split, and evaluate warns when it scores images the model learned from.
        split=SplitRecord.of(data.manifest, cfg.split_seed, LABEL_COLUMNS[cfg.taxonomy]),
    )
    run.model = model.to(device).to(memory_format=torch.channels_last)
    ema = None
    if cfg.ema_decay:
        from timm.utils import ModelEmaV3

        # Warm-up power 3/4: timm's advice for runs of thousands, not millions, of steps.
        ema = ModelEmaV3(run.model, decay=cfg.ema_decay, use_warmup=True, warmup_power=0.75)
    run.loaders = make_loaders(cfg, data, run.meta, run.dist, device)
    run.val_loader = run.loaders.scoring(subset(data, "val"))
    weights = class_weights(subset(data, "train")["target"].to_numpy(), len(data.classes))
    criterion = make_criterion(cfg, weights, device, distil=teacher is not None)
    net: nn.Module = run.model
    if run.dist.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(run.model, device_ids=ids)
    optimizer = torch.optim.AdamW(param_groups(run.model, cfg.weight_decay), lr=cfg.lr)
    steps = run.loaders.steps_per_epoch
    schedule = warmup_cosine(cfg.epochs * steps, int(cfg.warmup_epochs * steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    run.learner = Learner(net, criterion, optimizer, scheduler, device, cfg.amp, teacher, ema)


def _stop_record(run: Run, last_epoch: int) -> StopRecord:
    """Why the main schedule ended after ``last_epoch`` (0-based)."""
    s, cfg = run.state, run.cfg
    if s.stopped_after is not None:
        reason = "time_limit"
    elif s.stale >= cfg.patience:
        reason = "early_stopping"
    else:
        reason = "epochs"
    return StopRecord(
        reason=reason, epochs_run=last_epoch + 1, best_epoch=s.best_epoch + 1, time_limit_s=cfg.time_limit_s or None
    )


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


def _training_data(cfg: TrainConfig, manifest: pd.DataFrame) -> TrainingData:
    """The record of what the run read: one entry per configured folder, with its images (the manifest keeps each
    folder's rows under its own `source`, in the order given)."""
    paths = cfg.data_paths
    sources = list(dict.fromkeys(manifest["source"].astype(str))) if "source" in manifest else []
    if len(paths) > 1 and len(sources) == len(paths):
        counts = manifest["source"].astype(str).value_counts()
        return TrainingData.of(paths, [int(counts[s]) for s in sources], cfg.display_aspect)
    return TrainingData.of(paths[:1], [len(manifest)], cfg.display_aspect)
