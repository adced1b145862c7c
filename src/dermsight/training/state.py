"""One training run's state, shared by the stages of `fit` (epochs, checkpoints, final scores) as one object."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from dermsight.models.meta import ModelMeta
from dermsight.training.config import TrainConfig
from dermsight.training.data import Loaders, PreparedData
from dermsight.training.distributed import Dist
from dermsight.training.engine import Learner


@dataclass
class EpochState:
    """Where the epochs stand. All but the timings travel in ``last.pt``, so a resumed run carries on from them."""

    best: float = -1.0  # the best checkpoint's val balanced accuracy
    best_epoch: int = -1  # 0-based
    best_raw: float = -1.0  # with an EMA: the raw weights' best (best_raw.safetensors)
    stale: int = 0  # epochs since the best one, for early stopping
    # This invocation's epochs, in seconds, and its start: the time budget counts from there.
    seconds: list[float] = field(default_factory=list)
    t_begin: float = field(default_factory=time.perf_counter)
    stopped_after: int | None = None  # the last epoch (1-based) when cfg.time_limit_s stopped training


@dataclass
class Run:
    """A run's settings and place, then (as `fit` prepares them) its data, network and batches."""

    cfg: TrainConfig
    dir: Path
    device: torch.device
    dist: Dist
    progress: bool  # progress bars (rank 0 only)
    # Filled in by `fit` once known; read only after that.
    data: PreparedData = field(init=False, repr=False)
    model: nn.Module = field(init=False, repr=False)  # the network trained (`learner.net` may be its DDP wrapper)
    meta: ModelMeta = field(init=False, repr=False)  # the contract every checkpoint carries
    learner: Learner = field(init=False, repr=False)
    loaders: Loaders = field(init=False, repr=False)
    val_loader: DataLoader = field(init=False, repr=False)  # cached val images, for the per-epoch selection
    writer: Any = None  # a TensorBoard SummaryWriter (cfg.tensorboard), rank 0 only
    state: EpochState = field(default_factory=EpochState)

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files."""
        return self.dist.main

    @property
    def scored(self) -> nn.Module:
        """The network each epoch is judged by: the weights' moving average when there is one, else the model."""
        ema = self.learner.ema
        return ema.module if ema is not None else self.model

    @property
    def last(self) -> Path:
        return self.dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.dir / "best.safetensors"

    @property
    def best_raw_path(self) -> Path:
        return self.dir / "best_raw.safetensors"

    @property
    def log_path(self) -> Path:
        return self.dir / "log.csv"
