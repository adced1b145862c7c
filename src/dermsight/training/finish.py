"""The end of a run: the best checkpoint scored on val (selection data) and, once, on test, for the record and never
for a decision; the scores stored in the saved model, then its calibration and decision rule fitted on val.

The final scores come from `score_images`, the serving path (each image decoded from its file as `dermsight
evaluate` and the app decode it), not from the decode-once cache the epochs were chosen on: a run reports the figures
`evaluate` and `tune-decision` give for the same split.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn

from dermsight.evaluation import compute_metrics, write_report
from dermsight.evaluation.metrics import headline
from dermsight.evaluation.metrics import summary as metrics_summary
from dermsight.evaluation.run import lesion_groups
from dermsight.inference.scoring import score_images, softmax
from dermsight.models.bundle import load_model, read_meta, save_model
from dermsight.models.meta import ModelMeta
from dermsight.models.records import StopRecord
from dermsight.posthoc import decision
from dermsight.posthoc.calibrate import calibrate_model, report_lines
from dermsight.training.config import TrainConfig
from dermsight.training.data import subset
from dermsight.training.state import Run


@dataclass
class FitResult:
    model_path: Path
    best_epoch: int
    val_metrics: dict
    test_metrics: dict | None
    run_dir: Path


def finish(run: Run, stop: StopRecord, swa_selected: bool | None) -> FitResult:
    """Score the best checkpoint on val and test, store the figures in ``model.safetensors`` and ``metrics.json``,
    then calibrate (``cfg.calibrate``). ``swa_selected``: whether the weight average won on val, None when no SWA
    phase ran. Rank 0 only."""
    cfg, best_epoch = run.cfg, run.state.best_epoch
    model, meta = load_model(run.best_path, device=run.device)
    scores = {name: m for name in ("val", "test") if (m := _score_split(run, model, meta, name)) is not None}
    summary: dict = {name: metrics_summary(m) for name, m in scores.items()}
    summary["best_epoch"] = best_epoch + 1
    if run.state.stopped_after is not None:
        summary["time_limit"] = {"seconds": cfg.time_limit_s, "stopped_after_epoch": run.state.stopped_after}
    if swa_selected is not None:
        # Which candidate won on val: the averaged weights (SWA) or one epoch's checkpoint.
        summary["swa"] = {"epochs": cfg.swa_epochs, "lr": cfg.swa_lr, "selected": swa_selected}
    if cfg.ema_decay:
        summary["ema"] = {"decay": cfg.ema_decay}  # every checkpoint scored, the best included, was the average
    model_path = save_model(run.dir / "model.safetensors", model, replace(meta, metrics=summary, stop=stop))
    if cfg.calibrate:
        summary = calibrate_run(cfg, model_path, run.data.manifest, run.dir, run.progress)
    (run.dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    chosen = "the weight average (SWA)" if swa_selected else f"best epoch {best_epoch + 1}"
    print(f"{chosen}; model written to {model_path}")
    for name, m in scores.items():
        print(f"{name}: {headline(m)}")
    return FitResult(model_path, best_epoch + 1, scores.get("val", {}), scores.get("test"), run.dir)


def _score_split(run: Run, model: nn.Module, meta: ModelMeta, name: str) -> dict | None:
    """Metrics of ``model`` on split ``name`` through the serving path, with its report in RUN/<name>/; None when
    the split has no images. Images that cannot be decoded are left out with a warning, as `evaluate` does."""
    rows = subset(run.data, name)
    if rows.empty:
        return None
    paths = [str(p) for p in rows["path"]]
    scored = score_images(model, meta, paths, tta=False, progress=run.progress, desc=name)
    failed = scored.failures()
    if failed:
        i, why = failed[0]
        print(
            f"warning: {len(failed)} {name} image(s) could not be decoded and are left out of its scores (the "
            f"first: {paths[i]}: {why})",
            file=sys.stderr,
        )
    ok = ~np.isnan(scored.logits).any(axis=1)
    if not ok.any():
        return None
    logits, y = scored.logits[ok], rows["target"].to_numpy()[ok]
    probs = softmax(meta.adjust(logits), meta.temperature)
    groups = lesion_groups(rows)
    m = compute_metrics(y, probs, list(meta.classes), groups=None if groups is None else groups[ok])
    write_report(m, probs, y, run.dir / name, title=f"{meta.architecture} on the {name} split ({len(y)} images)")
    np.savez_compressed(run.dir / name / "predictions.npz", logits=logits, targets=y)
    return m


def calibrate_run(cfg: TrainConfig, model_path: Path, manifest: pd.DataFrame, split_at: Path, progress: bool) -> dict:
    """Fit the temperature and the not-a-lesion gate, then (``cfg.tune_decision``) the decision rule, on the train and
    val parts of ``manifest`` (test is measured, never used to fit); returns the model's metrics afterwards.
    ``split_at``: the run folder that holds the split, for the retry hint."""
    try:
        print("\n".join(report_lines(calibrate_model(model_path, manifest, None, progress=progress, views=cfg.views))))
        if cfg.tune_decision:
            tuned = decision.tune_decision(
                model_path, manifest, None, model_path.parent / "decision", progress, views=cfg.views
            )
            print("\n".join(decision.report_lines(tuned)))
    except ValueError as e:
        # Hours of training must not be lost to a calibration problem: keep the uncalibrated model and say so.
        print(
            f"warning: calibration failed ({e}); the model is saved uncalibrated. Run `dermsight calibrate "
            f"--model {model_path} --data {split_at}` once the problem is fixed."
        )
    return read_meta(model_path).metrics
