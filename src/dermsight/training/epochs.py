"""The epochs of a run, for the main schedule and the SWA phase alike: train, score on val, keep the best checkpoint
(on val balanced accuracy), log, checkpoint, and stop early or at the time budget.

Model selection and early stopping use the validation split's balanced accuracy (the ISIC metric), scored on the
cached, pre-resized images: fast enough for every epoch. Under DDP every rank scores val itself and takes rank 0's
scores, so all keep the same best epoch and stop at the same one.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

from dermsight.models.bundle import save_model
from dermsight.models.factory import freeze_backbone, unfreeze
from dermsight.training.checkpoint import save_last
from dermsight.training.data import subset
from dermsight.training.distributed import numbers_from_rank_0
from dermsight.training.engine import Learner, predict, selection_scores, train_one_epoch
from dermsight.training.state import Run

Scores = tuple[float, float, float]  # val loss, accuracy, balanced accuracy


@dataclass
class EpochRow:
    """One epoch's line of log.csv (and of the console, and TensorBoard's scalars)."""

    epoch: int  # 0-based
    lr: float
    loss: float
    val: Scores
    improved: bool
    seconds: float
    raw: Scores | None = None  # with an EMA: the raw weights' scores beside the average's
    note: str = ""


def next_epoch_estimate(seconds: Sequence[float]) -> float:
    """The time budget's guess at the next epoch: the longest so far, leaving out the first once there are others
    (see `time_up`)."""
    return max(seconds[1:] or seconds)


def time_up(run: Run, epoch: int) -> bool:
    """Would one more epoch, as long as the longest so far in this invocation, end past ``cfg.time_limit_s``
    (counted from the start of this invocation: a resumed run gets the budget afresh)? At least one epoch runs. The
    first epoch counts only until a second is done: it carries one-time costs (CUDA and cuDNN warm-up, loader
    workers, the device image store), several times a later epoch's on a GPU, which would otherwise stop a GPU run
    several epochs early. Rank 0 decides for all."""
    limit, s = run.cfg.time_limit_s, run.state
    if not limit or not s.seconds:
        return False
    late = time.perf_counter() - s.t_begin + next_epoch_estimate(s.seconds) > limit
    late = bool(numbers_from_rank_0(run.dist, [float(late)])[0])
    if late:
        s.stopped_after = epoch  # the epochs before this one (0-based) are done
        if run.main:
            print(
                f"time limit: another epoch would pass {limit:.0f} s, so training stops after epoch {epoch} and the "
                "best checkpoint so far is scored"
            )
    return late


def train_epoch(run: Run, epoch: int, learner: Learner, label: str) -> float:
    sampler = run.loaders.sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    (freeze_backbone if epoch < run.cfg.freeze_epochs else unfreeze)(run.model)
    return train_one_epoch(learner, run.loaders.train, run.cfg.max_steps_per_epoch, label, run.progress)


def score_val(run: Run, m: nn.Module) -> Scores:
    """(val loss, accuracy, balanced accuracy) of ``m`` under plain argmax, rank 0's on every rank: each rank's
    BatchNorm statistics come from its own last batches, so the ranks' scores differ slightly."""
    logits, y = predict(m, run.val_loader, run.device, run.cfg.amp, run.progress)
    loss, acc, bacc = numbers_from_rank_0(run.dist, selection_scores(logits, y))
    return loss, acc, bacc


def consider(run: Run, m: nn.Module, val: Scores, epoch: int) -> bool:
    """Keep ``m`` as the best checkpoint if its val balanced accuracy is the highest so far."""
    s = run.state
    if val[2] <= s.best:
        return False
    s.best, s.best_epoch = val[2], epoch
    if run.main:
        save_model(run.best_path, m, run.meta)
    return True


def consider_raw(run: Run) -> Scores | None:
    """With an EMA, also score the raw weights and keep their best as ``best_raw.safetensors``: what the run would
    have kept without the average, so the two can be compared on the same trajectory (the average does not change
    training). Costs one more pass over val per epoch. None without an EMA."""
    if run.learner.ema is None:
        return None
    raw = score_val(run, run.model)
    if raw[2] > run.state.best_raw:
        run.state.best_raw = raw[2]
        if run.main:
            save_model(run.best_raw_path, run.model, run.meta)
    return raw


def log_epoch(run: Run, row: EpochRow) -> None:
    run.state.seconds.append(row.seconds)  # on every rank: `time_up` reads it
    if not run.main:
        return
    cells = [row.epoch + 1, f"{row.lr:.3e}", f"{row.loss:.4f}", *(f"{v:.4f}" for v in row.val), f"{row.seconds:.1f}"]
    with run.log_path.open("a", newline="") as f:
        csv.writer(f).writerow([*cells, *(f"{v:.4f}" for v in row.raw or ())])
    if run.writer is not None:
        names = ("lr", "train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy")  # log.csv's columns
        for name, value in zip(names, (row.lr, row.loss, *row.val), strict=True):
            run.writer.add_scalar(name, value, row.epoch + 1)
        run.writer.flush()
    total = run.cfg.epochs + run.cfg.swa_epochs
    loss, acc, bacc = row.val
    print(
        f"epoch {row.epoch + 1}/{total}{row.note}: train loss {row.loss:.3f}, val loss {loss:.3f}, val acc {acc:.3f}, "
        f"val balanced acc {bacc:.3f}{' (best)' if row.improved else ''}"
        + (f" (raw weights {row.raw[2]:.3f})" if row.raw is not None else "")
        + f" [{row.seconds:.0f} s]",
        flush=True,
    )


def main_phase(run: Run, start: int) -> int:
    """The main schedule's epochs from ``start``; returns the last one run (0-based; ``start - 1`` when none)."""
    cfg, s = run.cfg, run.state
    epoch = start - 1
    for epoch in range(start, cfg.epochs):
        if time_up(run, epoch):
            return epoch - 1
        t0 = time.perf_counter()
        loss = train_epoch(run, epoch, run.learner, f"epoch {epoch + 1}/{cfg.epochs}")
        val = score_val(run, run.scored)
        improved = consider(run, run.scored, val, epoch)
        s.stale = 0 if improved else s.stale + 1
        raw = consider_raw(run)
        lr = run.learner.scheduler.get_last_lr()[0]
        log_epoch(run, EpochRow(epoch, lr, loss, val, improved, time.perf_counter() - t0, raw))
        save_last(run, epoch)
        if s.stale >= cfg.patience:
            if run.main:
                print(f"early stop: no val balanced-accuracy gain for {cfg.patience} epochs")
            break
    return epoch


def swa_phase(run: Run, first_epoch: int, state: dict | None) -> int:
    """Stochastic weight averaging (Izmailov et al. 2018) after the main schedule: ``cfg.swa_epochs`` more epochs at
    the constant rate ``cfg.swa_lr`` (reached by a one-epoch cosine ramp), averaging the weights at the end of each.

    Averaged weights sit nearer the centre of a flat region of the loss than any one end-of-epoch checkpoint, which
    tends to generalise better, for the price of a few epochs. After every epoch the running average gets BatchNorm
    statistics of its own (re-estimated on training images with the eval preprocessing) and is scored on val like
    any checkpoint: it is kept only if its balanced accuracy beats the best so far. ``state``: the phase's state from
    ``last.pt`` when resuming in it. Returns the phase's first epoch (best epochs from there on are averages)."""
    cfg = run.cfg
    train_df = subset(run.data, "train")
    bn_loader = run.loaders.scoring(train_df.sample(n=min(2000, len(train_df)), random_state=cfg.seed))
    averaged = AveragedModel(run.model)
    optimizer = run.learner.optimizer
    ramp = max(run.loaders.steps_per_epoch, 1)
    sched = SWALR(optimizer, swa_lr=cfg.swa_lr, anneal_epochs=ramp, anneal_strategy="cos")
    done = 0
    if state is not None:
        averaged.load_state_dict(state["model"])
        sched.load_state_dict(state["scheduler"])
        done = state["done"]
    learner = replace(run.learner, scheduler=sched)
    for k in range(done, cfg.swa_epochs):
        epoch = first_epoch + k - done
        if time_up(run, epoch):
            break
        t0 = time.perf_counter()
        loss = train_epoch(run, epoch, learner, f"epoch {epoch + 1}/{cfg.epochs + cfg.swa_epochs} (SWA)")
        averaged.update_parameters(run.model)
        update_bn(bn_loader, averaged, device=run.device)
        averaged.eval()
        val = score_val(run, averaged.module)
        improved = consider(run, averaged.module, val, epoch)
        seconds, note = time.perf_counter() - t0, f" (SWA, average of {k + 1})"
        log_epoch(run, EpochRow(epoch, sched.get_last_lr()[0], loss, val, improved, seconds, note=note))
        save_last(run, epoch, {"model": averaged.state_dict(), "scheduler": sched.state_dict(), "done": k + 1})
    return first_epoch - done
