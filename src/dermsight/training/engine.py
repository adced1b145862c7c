"""The training step and its parts: `train_one_epoch`, `predict` over cached batches, the losses, the learning-rate
schedule and the optimiser's parameter groups."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dermsight.training.config import TrainConfig
from dermsight.training.data import DeviceBatches


def autocast(device: torch.device, amp: bool):
    """bfloat16 autocast on CUDA when ``amp``; a no-op elsewhere."""
    enabled = amp and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


@dataclass
class Learner:
    """What a training step needs. ``net`` runs the forward pass (under DDP, the wrapper); with a ``teacher``,
    ``criterion`` is a `DistillationLoss` and also gets the teacher's logits for the same batch; with an ``ema``
    (timm's ModelEmaV3), the moving average takes in the weights after every step."""

    net: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    amp: bool = True
    teacher: nn.Module | None = None
    ema: Any = None


def train_one_epoch(
    learner: Learner, loader: DataLoader | DeviceBatches, max_steps: int = 0, desc: str = "train", progress: bool = True
) -> float:
    """One pass over ``loader`` (at most ``max_steps`` batches, 0: all); returns the mean training loss."""
    net, device, scheduler = learner.net, learner.device, learner.scheduler
    net.train()
    total, n = 0.0, 0
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress or None)
    for step, (x, y) in enumerate(bar):
        if max_steps and step >= max_steps:
            break
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with autocast(device, learner.amp):
            if learner.teacher is None:
                loss = learner.criterion(net(x), y)
            else:
                with torch.no_grad():
                    target_logits = learner.teacher(x)
                loss = learner.criterion(net(x), y, target_logits)
        learner.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        learner.optimizer.step()
        scheduler.step()
        if learner.ema is not None:
            # The scheduler counts optimizer steps, resumed runs included: the average's warm-up follows it.
            learner.ema.update(getattr(net, "module", net), step=scheduler.last_epoch)
        total += loss.item() * len(y)
        n += len(y)
        bar.set_postfix(loss=f"{total / n:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    return total / max(n, 1)


@torch.inference_mode()
def predict(
    model: nn.Module, loader: DataLoader, device: torch.device, amp: bool = True, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (float32, N x C) and targets for every batch of ``loader``: the fast path over cached, pre-resized
    images that picks each epoch's checkpoint. A run's final figures come from the serving path (`finish`)."""
    model.eval()
    logits, targets = [], []
    for x, y in tqdm(loader, desc="eval", unit="batch", leave=False, disable=not progress or None):
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            out = model(x)
        logits.append(out.float().cpu())
        targets.append(y)
    return torch.cat(logits).numpy(), torch.cat(targets).numpy()


def selection_scores(logits: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(loss, accuracy, balanced accuracy) under plain argmax: what checkpoints are chosen by."""
    pred = logits.argmax(1)
    loss = float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y)))
    return loss, float((pred == y).mean()), float(balanced_accuracy_score(y, pred))


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


class WeightedCrossEntropy(nn.Module):
    """Cross-entropy with uniform label smoothing, each sample weighted by its class's weight.

    Not ``nn.CrossEntropyLoss(weight=w, label_smoothing=e)``: PyTorch weights the smoothing term by *every* class's
    weight, so with balanced weights a batch of common-class images is pulled towards the rare classes (on HAM10000
    the optimum for a nevus puts more probability on dermatofibroma than on nevus). Here the smoothed target stays
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


def make_criterion(cfg: TrainConfig, weights: np.ndarray, device: torch.device, distil: bool) -> nn.Module:
    """The config's loss: cross-entropy, class-weighted by ``weights`` under ``imbalance: loss``, within a
    `DistillationLoss` when a teacher (``distil``) is there."""
    weight = torch.tensor(weights, dtype=torch.float32, device=device) if cfg.imbalance == "loss" else None
    criterion: nn.Module = WeightedCrossEntropy(weight, cfg.label_smoothing).to(device)
    if distil:
        criterion = DistillationLoss(criterion, cfg.distil_weight, cfg.distil_temperature)
    return criterion
