"""Model soups: weight averaging is exact, greedy selection never loses on val, and mismatched runs are refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_training import synthetic_dataset, tiny_config
from torch import nn

from dermsight.models.bundle import load_model, read_meta
from dermsight.posthoc.soup import average_state_dicts, make_soup, reset_batchnorm
from dermsight.training import fit


def test_average_state_dicts_means_floats_and_keeps_integer_buffers():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(9)}
    out = average_state_dicts([a, b])
    assert torch.equal(out["w"], torch.tensor([2.0, 4.0])) and int(out["n"]) == 3
    with pytest.raises(ValueError, match="different parameters"):
        average_state_dicts([a, {"w": a["w"]}])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("soup")
    data = synthetic_dataset(tmp / "data")
    runs = []
    for seed in (0, 1):
        cfg = tiny_config(tmp, data, seed=seed, out=str(tmp / f"run{seed}"), epochs=2)
        runs.append(fit(cfg, progress=False))
    return tmp, runs


def test_greedy_soup_is_never_worse_on_val_than_its_best_ingredient(two_runs):
    tmp, runs = two_runs
    out = tmp / "soup.safetensors"
    report = make_soup([r.model_path for r in runs], runs[0].run_dir, out, device="cpu", progress=False)
    best_single = max(i["val"]["score"] for i in report["ingredients"])
    assert report["val"]["score"] >= best_single
    v = report["val"]
    assert v["score"] == pytest.approx(v["balanced_accuracy"] + v["accuracy"]) and 0 <= v["tau"] <= 1
    assert len(report["steps"]) == 1 and report["chosen"]
    model, meta = load_model(out)
    assert meta.metrics["soup"]["chosen"] == report["chosen"] and meta.temperature == 1.0 and not meta.logit_bias
    assert model(torch.zeros(1, 3, meta.input_size, meta.input_size)).shape == (1, meta.num_classes)


def test_uniform_soup_averages_every_run(two_runs):
    tmp, runs = two_runs
    out = tmp / "uniform.safetensors"
    report = make_soup([r.model_path for r in runs], runs[0].run_dir, out, greedy=False, device="cpu", progress=False)
    assert len(report["chosen"]) == 2 and report["batchnorm"].startswith("re-estimated")
    soup, _ = load_model(out)
    a, _ = load_model(runs[0].model_path)
    b, _ = load_model(runs[1].model_path)
    name = "conv_stem.weight"  # a conv weight: averaged exactly (BatchNorm statistics are re-estimated)
    expected = (a.state_dict()[name] + b.state_dict()[name]) / 2
    assert torch.allclose(soup.state_dict()[name], expected, atol=1e-6)


def test_soup_refuses_runs_of_different_recipes(two_runs, tmp_path):
    tmp, runs = two_runs
    data = tmp / "data"
    other = fit(tiny_config(tmp_path, data, input_size=40, epochs=1), progress=False)
    with pytest.raises(ValueError, match="input_size"):
        make_soup([runs[0].model_path, other.model_path], runs[0].run_dir, tmp_path / "x.safetensors", progress=False)
    with pytest.raises(ValueError, match="at least two"):
        make_soup([runs[0].model_path], runs[0].run_dir, tmp_path / "x.safetensors", progress=False)
    assert read_meta(runs[0].model_path).input_size == 32
    # Through the command line: a clear error and exit code 2, never a traceback.
    from dermsight.cli import main

    assert (
        main(
            [
                "soup",
                str(runs[0].model_path),
                str(tmp_path / "missing.safetensors"),
                "--data",
                str(runs[0].run_dir),
                "--out",
                str(tmp_path / "y.safetensors"),
            ]
        )
        == 2
    )


def test_reset_batchnorm_replaces_running_statistics(two_runs):
    _, runs = two_runs
    model, meta = load_model(runs[0].model_path)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    bn.running_mean.fill_(123.0)
    paths = [str(p) for p in sorted((runs[0].run_dir.parent / "data" / "img").glob("*.jpg"))[:8]]
    reset_batchnorm(model, meta, paths)
    assert not model.training and bn.momentum == 0.1
    assert float(bn.running_mean.abs().max()) < 50


@pytest.mark.parametrize("combine", ["soup", "ensemble"])
def test_train_seeds_script_trains_each_seed_and_combines_them(tmp_path, combine):
    """scripts/train_seeds.sh end to end on a tiny CPU recipe: one run per seed, then the soup or the ensemble."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not found")
    data = synthetic_dataset(tmp_path / "data")
    # members: 2 in the shared config: the script still trains one model per seed (an ensemble config's recipe).
    config = tiny_config(tmp_path, data, members=2).to_yaml(tmp_path / "tiny.yaml")
    runs = tmp_path / "runs"
    env = os.environ | {
        "CONFIG": str(config),
        "SEEDS": "0 1",
        "RUNS": str(runs),
        "DEVICE": "cpu",
        "PARALLEL": "0",
        "CALIBRATE": "0",  # the quality gate rejects 48x36 toys; calibration has its own tests
        "EPOCHS": "1",
        "WORKERS": "0",
        "AUGMENT": "device" if combine == "ensemble" else "loader",  # both augmentation paths, through the knob
        "COMBINE": combine,
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
    }
    script = Path(__file__).resolve().parents[2] / "scripts" / "train_seeds.sh"
    proc = subprocess.run([bash, str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert all(read_meta(runs / f"seed{s}" / "model.safetensors").members == 1 for s in (0, 1))
    assert all(read_meta(runs / f"seed{s}" / "model.safetensors").config["seed"] == s for s in (0, 1))
    assert read_meta(runs / "seed0" / "model.safetensors").config["augment"] == env["AUGMENT"]
    assert "images ready in the cache" in proc.stdout
    _, meta = load_model(runs / f"{combine}.safetensors")
    if combine == "soup":
        assert "greedy soup" in proc.stdout
        assert meta.metrics["soup"]["ingredients"][0]["model"].startswith("seed")
    else:
        assert meta.members == 2
