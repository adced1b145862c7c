"""The resumable checkpoint ``last.pt`` and the per-epoch log ``log.csv`` of a run: written after every epoch,
read back by ``--resume``."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from dermsight.files import written_atomically
from dermsight.training.state import Run

LOG_FIELDS = ["epoch", "lr", "train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy", "seconds"]
# With an EMA the val_* columns are the average's; these, the raw weights' for comparison.
RAW_FIELDS = ["raw_val_loss", "raw_val_accuracy", "raw_val_balanced_accuracy"]


class _ResumeRefused(Exception):
    """A whole checkpoint that this run's settings cannot continue (its message says why)."""


def save_last(run: Run, epoch: int, swa: dict | None = None) -> None:
    """``last.pt`` after ``epoch``: weights, optimiser, schedule, the epochs' standing and the RNG (and the SWA
    phase's state, in that phase)."""
    if not run.main:
        return
    learner, s = run.learner, run.state
    state = {
        "model": run.model.state_dict(),
        "optimizer": learner.optimizer.state_dict(),
        "scheduler": learner.scheduler.state_dict(),
        "epoch": epoch,
        "best": s.best,
        "best_epoch": s.best_epoch,
        "best_raw": s.best_raw,
        "stale": s.stale,
        "rng": torch.get_rng_state(),
    }
    if learner.ema is not None:
        state["ema"] = learner.ema.module.state_dict()
    if swa is not None:
        state["swa"] = swa
    # A run killed while saving keeps its previous, whole checkpoint.
    with written_atomically(run.last) as tmp:
        torch.save(state, tmp)


def resume(run: Run) -> tuple[int, dict | None]:
    """Restore ``last.pt`` when the config resumes and there is one, and start the log unless it continues; returns
    (the first epoch to run, the SWA phase's state or None)."""
    start, swa_state = 0, None
    if run.cfg.resume and not run.last.is_file() and run.main:
        print(f"no checkpoint to resume from ({run.last} does not exist): training starts from epoch 1")
    if run.cfg.resume and run.last.is_file():
        start, swa_state = _restore(run)
        if run.main:
            print(f"resumed from {run.last} at epoch {start}")
    if run.main:
        _start_log(run, start)
    return start, swa_state


def _restore(run: Run) -> tuple[int, dict | None]:
    learner, s = run.learner, run.state
    try:
        ck = torch.load(run.last, map_location=run.device, weights_only=False)
        if isinstance(ck, dict) and ("ema" in ck) != (learner.ema is not None):
            # The checkpoints kept so far were judged by the other network (the average or the raw weights), and
            # log.csv has the other columns: the run cannot simply go on with ema_decay changed.
            was = "with ema_decay" if "ema" in ck else "without ema_decay"
            raise _ResumeRefused(
                f"cannot resume from {run.last}: it was trained {was}; resume with the ema_decay it started with, or "
                "train into another --out"
            )
        run.model.load_state_dict(ck["model"])
        learner.optimizer.load_state_dict(ck["optimizer"])
        learner.scheduler.load_state_dict(ck["scheduler"])
        if learner.ema is not None:
            learner.ema.module.load_state_dict(ck["ema"])
        start, s.best, s.best_epoch = ck["epoch"] + 1, ck["best"], ck["best_epoch"]
        s.best_raw, s.stale = ck.get("best_raw", -1.0), ck["stale"]
        torch.set_rng_state(ck["rng"])
    except _ResumeRefused as e:
        raise ValueError(str(e)) from None
    except Exception as e:  # truncated, not a checkpoint, or another run's (architecture, classes)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"cannot resume from {run.last}: it is damaged or belongs to a different run ({first[:200]}); train "
            "without --resume to start again, or into another --out"
        ) from None
    # A plain RandomSampler draws each epoch's order from one generator that advances every epoch: replay the
    # finished epochs so a resumed run sees the orders an uninterrupted one would (the other samplers are seeded per
    # epoch through set_epoch).
    sampler = run.loaders.sampler
    if not hasattr(sampler, "set_epoch"):
        for _ in range(start):
            for _ in sampler:
                pass
    return start, ck.get("swa")


def _start_log(run: Run, start: int) -> None:
    """A fresh log.csv with its header, or the resumed run's, cut to the epochs its checkpoint holds."""
    path: Path = run.log_path
    if start and path.exists():
        # A run stopped between logging an epoch and checkpointing it would otherwise log that epoch twice.
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        kept = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= start]
        if len(kept) < len(rows):
            with written_atomically(path) as tmp, Path(tmp).open("w", newline="") as f:
                csv.writer(f).writerows(kept)
    if start == 0 or not path.exists():
        fields = LOG_FIELDS + (RAW_FIELDS if run.learner.ema is not None else [])
        with path.open("w", newline="") as f:
            csv.writer(f).writerow(fields)
