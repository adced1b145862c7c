"""bench/ema.py's report: the average against the raw weights, per run and per ensemble, from saved logits."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location("bench_ema", Path(__file__).parents[2] / "bench" / "ema.py")
ema = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ema)


def _run(root: Path, name: str, y: dict, right: dict, images: dict) -> None:
    """A run whose checkpoints get ``right[ck]`` of each split's rows right (one-hot logits), the rest wrong."""
    out = {}
    for split, t in y.items():
        out[f"{split}_y"], out[f"{split}_images"] = t, images[split]
        for ck, n in right.items():
            pred = t.copy()
            pred[n:] = (t[n:] + 1) % 3
            out[f"{ck}_{split}_logits"] = np.eye(3, dtype=np.float32)[pred] * 4
    (root / name).mkdir(parents=True)
    np.savez(root / name / "scores.npz", **out)


def test_report_compares_checkpoints_per_run_and_per_seed_ensemble(tmp_path):
    y = {s: np.tile([0, 1, 2], 4) for s in ("val", "test")}
    images = {s: np.array([f"{s}{i}" for i in range(12)]) for s in y}
    _run(tmp_path, "a_seed1", y, {"best": 12, "best_raw": 6}, images)
    _run(tmp_path, "b_seed1", y, {"best": 12, "best_raw": 12}, images)
    text = ema.report(tmp_path)
    assert "| a seed 1 | best | 1.000 | 1.000 |" in text
    assert "| a seed 1 | best_raw | 0.500 | 0.500 |" in text
    assert "| 2 runs, seed 1 (a + b) | best | 1.000 | 1.000 |" in text
    # Over the two runs the average gains 0.5 and 0: mean +0.25, higher in one of two.
    assert "val mean +0.250 (higher in 1 of 2)" in text


def test_report_refuses_runs_scored_on_different_splits(tmp_path):
    y = {s: np.tile([0, 1, 2], 2) for s in ("val", "test")}
    images = {s: np.array([f"{s}{i}" for i in range(6)]) for s in y}
    _run(tmp_path, "a_seed1", y, {"best": 6, "best_raw": 6}, images)
    _run(tmp_path, "b_seed1", y, {"best": 6, "best_raw": 6}, {**images, "val": images["val"][::-1]})
    with pytest.raises(SystemExit, match="different val splits"):
        ema.report(tmp_path)
    (tmp_path / "b_seed1" / "scores.npz").unlink()
    short = {s: v[:3] for s, v in y.items()}  # a run scored on fewer images: refused, not broadcast
    _run(tmp_path, "c_seed1", short, {"best": 3, "best_raw": 3}, {s: v[:3] for s, v in images.items()})
    with pytest.raises(SystemExit, match="different val splits"):
        ema.report(tmp_path)
    with pytest.raises(SystemExit, match="run --score first"):
        ema.report(tmp_path / "nothing")
