"""bench/candidates.py: the candidates side by side, read from what each model file records."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

from dermsight.models.bundle import read_meta, update_meta

_spec = importlib.util.spec_from_file_location(
    "bench_candidates", Path(__file__).parents[2] / "bench" / "candidates.py"
)
candidates = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(candidates)

BUNDLED = Path(__file__).parents[2] / "src" / "dermsight" / "assets" / "default.safetensors"


def _variant(tmp_path: Path) -> Path:
    """The bundled model's file, its external record renamed as older files name it and its figures changed."""
    meta = read_meta(BUNDLED)
    (name, figures), *_ = meta.metrics["external"].items()
    folder = candidates.set_key(name)
    external = {f"Nevi and melanomas ({folder})": figures | {"melanomas_sent": 0.9, "nevi_sent": 0.3}}
    meta = replace(meta, metrics=meta.metrics | {"external": external})
    return update_meta(BUNDLED, meta, out=tmp_path / "variant.safetensors")


def test_tables_put_each_external_set_s_candidates_together(tmp_path):
    variant = _variant(tmp_path)
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n<!-- candidates -->\nold table\n<!-- /candidates -->\n\nLonger tables below.\n")
    assert candidates.main([f"M1={BUNDLED}", f"V={variant}", "--out", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# Title\n\n<!-- candidates -->\n| candidate |") and "old table" not in text
    assert text.endswith("<!-- /candidates -->\n\nLonger tables below.\n")
    meta = read_meta(BUNDLED)
    (name, figures), *_ = meta.metrics["external"].items()
    folder = candidates.set_key(name)
    rows = [line for line in text.splitlines() if f"| {folder} |" in line]
    # One set, both candidates, in the order given; the variant's margin is its own 0.9 - 0.3.
    assert [r.split(" | ")[0] for r in rows] == ["| M1", "| V"]
    assert f"| {figures['melanomas_sent']:.1%} | {figures['nevi_sent']:.1%} |" in rows[0]
    assert "| 90.0% | 30.0% | 0.600 |" in rows[1]
    # The internal row carries the model's own test figures and referral threshold.
    m1 = next(line for line in text.splitlines() if line.startswith("| M1 | tf_efficientnet_lite0"))
    test = meta.metrics["test"]
    assert f"{test['balanced_accuracy']:.3f} / {test['accuracy']:.3f}" in m1
    assert f"| {meta.refer_from:.1%} (" in m1


def test_non_lesion_count_is_read_from_the_recorded_share():
    assert candidates.refused_of("90.9% of 22 (image-quality gate 9.1%, not-a-lesion gate 81.8%)") == "20 of 22"
    assert candidates.refused_of(None) == ""


def test_a_page_without_the_block_or_a_bad_model_file_is_a_clear_error(tmp_path, capsys):
    page = tmp_path / "page.md"
    page.write_text("# no block here\n")
    assert candidates.main([f"M1={BUNDLED}", "--out", str(page)]) == 2
    assert "no <!-- candidates -->" in capsys.readouterr().err
    assert page.read_text() == "# no block here\n"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a model")
    assert candidates.main([f"X={bad}"]) == 2
    assert "error:" in capsys.readouterr().err
