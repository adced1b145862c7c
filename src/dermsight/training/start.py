"""What a run starts from: the network with its starting weights, its contract, and the frozen teacher, if any."""

from __future__ import annotations

import sys

import torch
from torch import nn

from dermsight.domain.classes import TAXONOMIES
from dermsight.models.bundle import load_model
from dermsight.models.factory import create_model
from dermsight.models.meta import ModelMeta
from dermsight.training.config import TrainConfig


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
        config=cfg.model_dump(mode="json"),
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
