"""bench/equal_sensitivity.py: models compared at the reference model's share of melanomas sent to a doctor."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_equal_sensitivity", Path(__file__).parents[2] / "bench" / "equal_sensitivity.py"
)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

# Per model: (label, melanoma probability, sent by the app, refused by the app) for the same six images.
MODELS = {
    "ref.safetensors": [
        ("mel", 0.9, True, False),
        ("mel", 0.6, True, False),
        ("mel", 0.2, False, False),
        ("nv", 0.7, True, False),
        ("nv", 0.5, False, False),
        ("nv", 0.1, False, False),
        ("bkl", 0.9, True, False),  # neither melanoma nor nevus: left out
    ],
    "better.safetensors": [
        ("mel", 0.9, True, False),
        ("mel", 0.8, True, False),
        ("mel", 0.3, True, False),
        ("nv", 0.4, True, False),
        ("nv", 0.2, False, False),
        ("nv", 0.1, False, False),
        ("bkl", 0.9, True, False),
    ],
    "refuses.safetensors": [
        ("mel", 0.9, True, False),
        ("mel", 0.9, False, True),  # refused: never sent, whatever its probability
        ("mel", 0.2, False, True),
        ("nv", 0.1, False, False),
        ("nv", 0.1, False, False),
        ("nv", 0.1, False, False),
        ("bkl", 0.9, True, False),
    ],
}


def _fake_evaluate(data, work, model, gates, progress):
    assert gates
    rows = MODELS[Path(model).name]
    Path(work).mkdir(parents=True)
    pd.DataFrame(
        {
            "image": [f"i{i}" for i in range(len(rows))],
            "label": [r[0] for r in rows],
            "sent": [r[2] for r in rows],
            "refused": [r[3] for r in rows],
            "mel": [r[1] for r in rows],
            "nv": [1 - r[1] for r in rows],
        }
    ).to_csv(Path(work) / "predictions.csv", index=False)


def _rows(out: str) -> dict[str, list[str]]:
    """The printed table's cells by model name (the first cell keeps its leading "| ", the last its " |")."""
    return {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in out.splitlines() if line.startswith("| ")}


def test_models_are_compared_at_the_reference_share_of_melanomas(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bench, "evaluate", _fake_evaluate)
    models = ["ref=ref.safetensors", "better=better.safetensors", "refuses=refuses.safetensors"]
    assert bench.main(["--data", str(tmp_path), *models]) == 0
    out = capsys.readouterr().out
    assert "3 melanomas, 3 nevi" in out and "ref's share of melanomas sent as the app answers, 66.7%" in out
    rows = _rows(out)
    # The reference: 2 of 3 melanomas need a threshold of 0.6, which sends 1 of 3 nevi (0.7).
    assert rows["ref"][1:5] == ["66.7%", "33.3%", "0.0% / 0.0%", "33.3%"]
    # A better ranking reaches 2 of 3 melanomas at 0.8, sending no nevus: 33 points fewer than the reference.
    assert rows["better"][4] == "0.0%" and rows["better"][5].startswith("-33.3%")
    # Its AUC: 8 of the 9 melanoma-nevus pairs in order (0.3 against 0.4 is not).
    assert rows["better"][6].rstrip(" |") == "0.889"
    # Refused melanomas cannot be sent: with two of three refused, two of three cannot be reached.
    assert rows["refuses"][3] == "66.7% / 0.0%" and rows["refuses"][4] == "-" and rows["refuses"][5] == ""


def test_the_operating_point_can_be_asked_for(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bench, "evaluate", _fake_evaluate)
    assert (
        bench.main(["--data", str(tmp_path), "--share", "1", "ref=ref.safetensors", "better=better.safetensors"]) == 0
    )
    out = capsys.readouterr().out
    assert "Operating point: the share asked, 100.0%" in out
    rows = _rows(out)
    # Every melanoma: the reference must go down to 0.2 and sends two nevi (0.7, 0.5), the better one 0.3 and one.
    assert rows["ref"][4] == "66.7%" and rows["better"][4] == "33.3%" and rows["better"][5].startswith("-33.3%")
    for bad in ("0", "1.5"):
        with pytest.raises(SystemExit):
            bench.main(["--data", str(tmp_path), "--share", bad, "ref=ref.safetensors"])
        assert "expected a share of melanomas" in capsys.readouterr().err


def test_labels_in_capitals_count_and_a_set_without_nevi_is_refused(monkeypatch, capsys, tmp_path):
    def capitals(data, work, model, gates, progress):
        _fake_evaluate(data, work, model, gates, progress)
        pred = pd.read_csv(Path(work) / "predictions.csv")
        pred["label"] = pred["label"].str.upper()
        if "nonevi" in str(data):
            pred = pred[pred["label"] != "NV"]
        pred.to_csv(Path(work) / "predictions.csv", index=False)

    monkeypatch.setattr(bench, "evaluate", capitals)
    assert bench.main(["--data", str(tmp_path), "ref=ref.safetensors", "better=better.safetensors"]) == 0
    assert "3 melanomas, 3 nevi" in capsys.readouterr().out
    assert bench.main(["--data", str(tmp_path / "nonevi"), "ref=ref.safetensors"]) == 2
    assert "needs melanomas and nevi" in capsys.readouterr().err


def test_a_malformed_model_argument_is_a_usage_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bench, "evaluate", _fake_evaluate)
    with pytest.raises(SystemExit) as e:
        bench.main(["--data", str(tmp_path), "ref.safetensors"])
    assert e.value.code == 2
    assert "expected NAME=FILE" in capsys.readouterr().err
