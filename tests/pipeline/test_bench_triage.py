"""bench/triage.py: the web app's advice replayed on evaluate's predictions.csv, its threshold chosen on val only."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

_spec = importlib.util.spec_from_file_location("bench_triage", Path(__file__).parents[2] / "bench" / "triage.py")
triage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(triage)

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def _predictions(path: Path, rows: list[tuple[str, dict[str, float]]]) -> Path:
    table = [
        {"image": f"i{i}", "path": f"i{i}.jpg", "label": label} | {c: p.get(c, 0.0) for c in CLASSES}
        for i, (label, p) in enumerate(rows)
    ]
    df = pd.DataFrame(table)
    df.insert(3, "predicted", df[CLASSES].idxmax(axis=1))
    df.insert(4, "correct", df["predicted"] == df["label"])
    path.mkdir()
    df.to_csv(path / "predictions.csv", index=False)
    return path


def test_threshold_is_the_highest_that_refers_enough_val_melanomas(tmp_path):
    # Melanomas hidden behind a mole at 25%, 18% and 12%, one found outright; two moles with 8% and 22% melanoma.
    val = _predictions(
        tmp_path / "val",
        [
            ("mel", {"nv": 0.75, "mel": 0.25}),
            ("mel", {"nv": 0.82, "mel": 0.18}),
            ("mel", {"nv": 0.88, "mel": 0.12}),
            ("mel", {"mel": 0.9, "nv": 0.1}),
            ("nv", {"nv": 0.92, "mel": 0.08}),
            ("nv", {"nv": 0.78, "mel": 0.22}),
        ],
    )
    labels, referred = triage.referrals(val, [0.3, 0.2, 0.15, 0.1])
    assert [int(referred[t][labels.eq("mel")].sum()) for t in (0.3, 0.2, 0.15, 0.1)] == [1, 2, 3, 4]
    assert [int(referred[t][labels.eq("nv")].sum()) for t in (0.3, 0.2, 0.15, 0.1)] == [0, 1, 1, 1]
    out = tmp_path / "triage.md"
    assert (
        triage.main(["--val", str(val), "--thresholds", "0.3,0.2,0.15,0.1", "--target", "0.7", "--out", str(out)]) == 0
    )
    assert "**15%**" in out.read_text() and "| 15% (chosen) | 75.0% |" in out.read_text()


def test_refuses_a_file_that_is_not_evaluate_output(tmp_path):
    bad = tmp_path / "p.csv"
    bad.write_text("image,score\na,1\n")
    with pytest.raises(SystemExit, match=r"not a dermsight evaluate predictions\.csv"):
        triage.referrals(bad, [0.15])
