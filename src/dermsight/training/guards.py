"""What a run may do to its folder: replace a finished model only when told to, resume only onto the split it
started with, and leave a finished run (and a calibration fitted into its model since) as it is."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from dermsight.data.split import split_changes
from dermsight.models.bundle import ModelLoadError, read_meta
from dermsight.models.meta import ModelMeta
from dermsight.training.config import TrainConfig


def refuse_finished_run(run: Path, resume: bool) -> None:
    """Raise ValueError (a usage error) when ``run`` already holds a finished model, or an interrupted run's
    checkpoint, and this is not a resumption: training there would replace the model (or the epochs trained so far),
    its config and its split without a word. An interruption tells people to run the same command with --resume;
    forgetting it must not start the run again from nothing."""
    if resume:
        return
    if (run / "model.safetensors").is_file():
        raise ValueError(
            f"{run} already holds a trained model (model.safetensors); train into another folder (--out), "
            "continue it with --resume, or delete the folder first"
        )
    if (run / "last.pt").is_file():
        raise ValueError(
            f"{run} holds an interrupted run (its checkpoint last.pt): continue it with --resume, train into another "
            "folder (--out), or delete the folder first"
        )


def refuse_changed_split(run: Path, manifest: pd.DataFrame, resuming: bool, same_split_as: Path | None = None) -> None:
    """Raise ValueError when ``run`` would train on another split than it must: its own split.csv when it is
    ``resuming`` from a checkpoint, and ``same_split_as`` (an ensemble's first member's split.csv) for the others.

    The split is drawn again from ``data`` on every start, so images added to or removed from the data since (or a
    changed ``data:``) redraw it: removing one row of 280 moves 154 images, some from train into test, and the
    resumed run would then score its checkpoints on images it trained on (or an ensemble's members would train on
    each other's test images). A run without split.csv has nothing to compare (it never finished preparing its
    data); one with split.csv but no checkpoint yet keeps that split.csv (`fit`), so it is compared too."""
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
