"""Training behaviour on tiny synthetic data: loss falls, a model overfits 32 images, checkpoints round-trip and
resume, and DDP runs two CPU processes on gloo through torchrun."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import make_image
from dermsight.data.problems import DataError
from dermsight.inference.transforms import BatchTrainAugment
from dermsight.models.bundle import load_model
from dermsight.models.factory import create_model
from dermsight.models.meta import split_mismatch
from dermsight.training import Learner, TrainConfig, fit, train_one_epoch
from dermsight.training import epochs as training_epochs
from dermsight.training.data import DeviceBatches, WeightedSampler, class_weights, prepare_data
from dermsight.training.engine import WeightedCrossEntropy, warmup_cosine
from dermsight.training.epochs import next_epoch_estimate


def synthetic_dataset(root: Path, n: int = 48) -> Path:
    """Two easily separable 'classes': dark lesions (mel) and pale ones (nv), one lesion per image."""
    rows = []
    for i in range(n):
        label = "mel" if i % 2 else "nv"
        color = (90, 40, 30) if label == "mel" else (230, 190, 170)
        make_image(root / "img" / f"{i}.jpg", size=(48, 36), color=color, seed=i)
        rows.append((f"img/{i}.jpg", label, f"L{i}"))
    pd.DataFrame(rows, columns=["image", "label", "lesion_id"]).to_csv(root / "labels.csv", index=False)
    return root


def tiny_config(tmp_path: Path, data: Path, **kw) -> TrainConfig:
    base = dict(
        data=str(data),
        arch="tf_efficientnet_lite0",
        weights="none",
        input_size=32,
        cache_size=48,
        epochs=2,
        batch_size=8,
        lr=3e-3,
        warmup_epochs=0.5,
        patience=5,
        out=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"),
        threads=1,
        drop_rate=0.0,
        scale_min=0.8,
        calibrate=False,  # the quality gate rejects 48x36 toys; calibration has its own tests
    )
    return TrainConfig(**(base | kw))


def test_warmup_cosine_schedule_shape():
    f = warmup_cosine(100, 10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) < f(20) and f(99) == pytest.approx(0.01, abs=0.01)


def test_class_weights_balance_classes_and_sampler_splits_across_ranks():
    y = np.array([0] * 8 + [1] * 2)
    w = class_weights(y, 3)
    assert w[0] * 8 == pytest.approx(w[1] * 2) and w[2] == 0
    s0, s1 = (WeightedSampler(w[y], 10, seed=1, rank=r, world=2) for r in (0, 1))
    a, b = list(s0), list(s1)
    assert len(a) == len(s0) == 5 and len(b) == 5
    whole = list(WeightedSampler(w[y], 10, seed=1))
    assert sorted(a + b) == sorted(whole)


def _loss_optimum(criterion: nn.Module, target: torch.Tensor, n_classes: int) -> torch.Tensor:
    z = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.SGD([z], lr=1.0)
    for _ in range(2000):
        loss = criterion(z.expand(len(target), n_classes), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return z.detach().softmax(0)


def test_weighted_loss_with_smoothing_keeps_the_true_class_on_top():
    # A batch of common-class images (class 0, small weight) must still be pushed towards class 0: the smoothed
    # target is 1 - e + e/C there. PyTorch's own weighted + smoothed loss puts its optimum on the rare class 1.
    w, y = torch.tensor([0.2, 10.0, 1.0]), torch.zeros(4, dtype=torch.long)
    ours = _loss_optimum(WeightedCrossEntropy(w, label_smoothing=0.1), y, 3)
    assert ours[0].item() == pytest.approx(0.9 + 0.1 / 3, abs=1e-3)
    torch_builtin = _loss_optimum(nn.CrossEntropyLoss(weight=w, label_smoothing=0.1), y, 3)
    assert torch_builtin.argmax().item() == 1  # the trap this loss avoids (if PyTorch changes, revisit the note)
    # Weights scale samples: one rare sample (w=10) counts as much as ten common ones (w=1).
    crit = WeightedCrossEntropy(torch.tensor([1.0, 10.0]))
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    per = nn.functional.cross_entropy(logits, torch.tensor([0, 1]), reduction="none")
    expected = (per[0] * 1 + per[1] * 10) / 11
    assert crit(logits, torch.tensor([0, 1])).item() == pytest.approx(expected.item(), rel=1e-6)
    assert WeightedCrossEntropy()(logits, torch.tensor([0, 1])).item() == pytest.approx(per.mean().item(), rel=1e-6)


def test_model_overfits_32_images_and_loss_falls():
    torch.manual_seed(0)
    model, _ = create_model("tf_efficientnet_lite0", 2, weights="none")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 32, 32, generator=g)
    y = torch.arange(32) % 2
    x[y == 1] += 1.5  # learnable but not trivial from the first step
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    learner = Learner(model, nn.CrossEntropyLoss(), opt, sched, torch.device("cpu"))
    losses = [train_one_epoch(learner, loader, progress=False) for _ in range(20)]
    assert min(losses[-3:]) < losses[0] / 5  # single epochs are noisy at batch 8; the trend is not
    model.eval()
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() == 1.0


def test_fit_end_to_end_writes_a_self_contained_model_and_resumes(tmp_path):
    data = synthetic_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path, data, epochs=2)
    res = fit(cfg, progress=False)
    run = Path(cfg.out)
    for name in (
        "config.yaml",
        "log.csv",
        "split.csv",
        "last.pt",
        "model.safetensors",
        "metrics.json",
        "val/metrics.json",
        "test/report.md",
        "test/confusion_matrix.png",
    ):
        assert (run / name).is_file(), name
    log = pd.read_csv(run / "log.csv")
    assert list(log["epoch"]) == [1, 2]
    split = pd.read_csv(run / "split.csv")
    assert split.groupby("lesion_id")["split"].nunique().max() == 1
    model, meta = load_model(res.model_path)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 7)
    assert meta.classes == ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc") and meta.input_size == 32
    assert meta.metrics["test"]["n"] == (split["split"] == "test").sum()
    assert "balanced_accuracy" in meta.metrics["val"] and meta.config["epochs"] == 2
    assert meta.weights["source"] == "none"
    # Resume continues from the last finished epoch instead of starting over.
    fit(tiny_config(tmp_path, data, epochs=3, resume=True), progress=False)
    assert list(pd.read_csv(run / "log.csv")["epoch"]) == [1, 2, 3]
    # Resuming onto another split (changed data or split settings redraw it) would score checkpoints on images the
    # run trained on: refused, and the run's config and split are left as they were.
    kept = {n: (run / n).read_bytes() for n in ("config.yaml", "split.csv", "log.csv")}
    with pytest.raises(
        ValueError,
        match=r"cannot resume .*its data or split settings .* changed since it started \([1-9]\d* image",
    ):
        fit(tiny_config(tmp_path, data, epochs=4, val=0.3, resume=True), progress=False)
    assert kept == {n: (run / n).read_bytes() for n in kept}

    # Training again into the finished run without --resume would replace its model, config and split: refused
    # before anything is written.
    before = {n: (run / n).read_bytes() for n in ("model.safetensors", "config.yaml", "split.csv")}
    with pytest.raises(ValueError, match="already holds a trained model"):
        fit(tiny_config(tmp_path, data, epochs=1, seed=7), progress=False)
    assert before == {n: (run / n).read_bytes() for n in before}
    # So would training again into an interrupted run (a checkpoint, no model yet) without --resume: the epochs
    # trained so far would be lost to a fresh start.
    (run / "model.safetensors").rename(tmp_path / "kept.safetensors")
    before = {n: (run / n).read_bytes() for n in ("last.pt", "config.yaml", "split.csv")}
    with pytest.raises(ValueError, match=r"holds an interrupted run .*continue it with --resume"):
        fit(tiny_config(tmp_path, data, epochs=1, seed=7), progress=False)
    assert before == {n: (run / n).read_bytes() for n in before}
    (tmp_path / "kept.safetensors").rename(run / "model.safetensors")
    # A damaged checkpoint is named, not dumped as a traceback; none is left half-written (saved then renamed).
    assert not list(run.glob(".*.tmp"))
    (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"cannot resume from .*last\.pt: it is damaged"):
        fit(tiny_config(tmp_path, data, epochs=4, resume=True), progress=False)


def test_training_data_problems_are_said_not_swallowed(tmp_path, capsys):
    # No usable image at all: one clear error.
    empty = tmp_path / "empty"
    make_image(empty / "img" / "0.jpg")
    pd.DataFrame({"image": ["img/missing.jpg"], "label": ["nv"]}).to_csv(empty / "labels.csv", index=False)
    with pytest.raises(DataError, match="no usable images"):
        prepare_data(tiny_config(tmp_path, empty), progress=False)
    # A split made earlier whose images were damaged since: left out, and the user is told.
    data = synthetic_dataset(tmp_path / "data")
    fit(tiny_config(tmp_path, data, epochs=1), progress=False)
    split = tmp_path / "run" / "split.csv"
    (data / "img" / "3.jpg").write_bytes(b"broken")
    capsys.readouterr()
    prepared = prepare_data(tiny_config(tmp_path, split, cache_dir=str(tmp_path / "cache2")), progress=False)
    assert "1 image(s) could not be decoded and are left out" in capsys.readouterr().out
    assert len(prepared.manifest) == len(pd.read_csv(split)) - 1
    # Labels the taxonomy has no class for (HAM's akiec is AK or SCC in ISIC 2019): left out, and said so.
    labels = pd.read_csv(data / "labels.csv")
    labels.loc[:3, "label"] = "akiec"
    labels.to_csv(data / "labels.csv", index=False)
    (data / "img" / "3.jpg").unlink()
    labels.drop(index=3).to_csv(data / "labels.csv", index=False)
    prepare_data(tiny_config(tmp_path, data, taxonomy="isic2019", val=0.2, test=0.2), progress=False)
    assert "3 image(s) have no isic2019 class" in capsys.readouterr().out


def test_swa_phase_averages_competes_on_val_and_resumes_exactly(tmp_path):
    data = synthetic_dataset(tmp_path / "data")
    # Uninterrupted: 2 epochs of the main schedule, then 2 averaged ones.
    whole = tiny_config(tmp_path, data, swa_epochs=2, out=str(tmp_path / "whole"))
    res = fit(whole, progress=False)
    log = pd.read_csv(tmp_path / "whole" / "log.csv")
    assert list(log["epoch"]) == [1, 2, 3, 4]
    assert np.allclose(log["lr"].iloc[-1], whole.swa_lr)  # the constant averaging rate is reached
    ck = torch.load(tmp_path / "whole" / "last.pt", weights_only=False)
    assert ck["swa"]["done"] == 2 and int(ck["swa"]["model"]["n_averaged"]) == 2
    swa = res.run_dir / "metrics.json"
    summary = pd.read_json(swa, typ="series")
    assert summary["swa"]["epochs"] == 2 and isinstance(summary["swa"]["selected"], bool)
    _, meta = load_model(res.model_path)
    assert meta.config["swa_epochs"] == 2

    # Interrupted after the first averaged epoch, then resumed: the same average as the uninterrupted run (the
    # sampler's epoch orders and the RNG are restored), and the log continues instead of starting over.
    part = tiny_config(tmp_path, data, swa_epochs=1, out=str(tmp_path / "part"))
    fit(part, progress=False)
    fit(tiny_config(tmp_path, data, swa_epochs=2, out=str(tmp_path / "part"), resume=True), progress=False)
    assert list(pd.read_csv(tmp_path / "part" / "log.csv")["epoch"]) == [1, 2, 3, 4]
    resumed = torch.load(tmp_path / "part" / "last.pt", weights_only=False)["swa"]["model"]
    for k, v in ck["swa"]["model"].items():
        assert torch.allclose(v.float(), resumed[k].float(), atol=1e-5), k


def test_ema_average_is_what_is_scored_kept_and_resumed(tmp_path, monkeypatch):
    data = synthetic_dataset(tmp_path / "data")
    # One epoch: its checkpoint is the best by construction, so best.safetensors must be the average, not the raw
    # weights the optimizer left.
    one = tiny_config(tmp_path, data, epochs=1, ema_decay=0.9, out=str(tmp_path / "one"))
    res = fit(one, progress=False)
    ck = torch.load(tmp_path / "one" / "last.pt", weights_only=False)
    best, _ = load_model(tmp_path / "one" / "best.safetensors")
    kept = best.state_dict()
    assert all(torch.allclose(kept[k].float(), v.float().cpu(), atol=1e-6) for k, v in ck["ema"].items())
    assert any(not torch.allclose(ck["model"][k].float(), v.float()) for k, v in ck["ema"].items())
    assert pd.read_json(res.run_dir / "metrics.json", typ="series")["ema"] == {"decay": 0.9}
    # The raw weights are scored beside it (same trajectory, the average does not change training) and their best
    # kept for comparison: after one epoch, the weights the optimizer left.
    log = pd.read_csv(tmp_path / "one" / "log.csv")
    assert log["raw_val_balanced_accuracy"].between(0, 1).all()
    raw, _ = load_model(tmp_path / "one" / "best_raw.safetensors")
    assert all(torch.allclose(raw.state_dict()[k].float(), v.float(), atol=1e-6) for k, v in ck["model"].items())

    # Interrupted after 2 of 4 epochs and resumed: the same average as an uninterrupted run (its state travels in
    # last.pt and its warm-up follows the restored scheduler's step count).
    whole = tiny_config(tmp_path, data, epochs=4, ema_decay=0.9, out=str(tmp_path / "whole"))
    fit(whole, progress=False)
    save_last = training_epochs.save_last

    def stop_after_second(run, epoch, swa=None):
        save_last(run, epoch, swa)
        if epoch == 1:
            raise KeyboardInterrupt

    part = whole.model_copy(update={"out": str(tmp_path / "part")})
    with monkeypatch.context() as m:
        m.setattr(training_epochs, "save_last", stop_after_second)
        with pytest.raises(KeyboardInterrupt):
            fit(part, progress=False)
    fit(part.model_copy(update={"resume": True}), progress=False)
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=False)["ema"]
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=False)["ema"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k

    # A run cannot go on with ema_decay switched: its best checkpoint so far was judged by the other network.
    with pytest.raises(ValueError, match="it was trained with ema_decay"):
        fit(whole.model_copy(update={"ema_decay": 0.0, "epochs": 5, "resume": True}), progress=False)
    plain = tiny_config(tmp_path, data, epochs=1, out=str(tmp_path / "plain"))
    fit(plain, progress=False)
    with pytest.raises(ValueError, match="it was trained without ema_decay"):
        fit(plain.model_copy(update={"ema_decay": 0.9, "epochs": 2, "resume": True}), progress=False)


def test_ema_options_are_checked():
    with pytest.raises(ValueError, match="ema_decay: Input should be less than 1"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="both average weights"):
        TrainConfig(ema_decay=0.99, swa_epochs=2)


def test_fit_learns_the_synthetic_task(tmp_path):
    # A randomly initialised network in eval mode (running BatchNorm statistics) lags its training-mode fit on so few
    # steps, and at 6 epochs its val accuracy depends on the seed and on the CPU's kernels; 12 epochs reach 1.0 for
    # seeds 0-3.
    data = synthetic_dataset(tmp_path / "data", n=80)
    res = fit(tiny_config(tmp_path, data, epochs=12, imbalance="sampler"), progress=False)
    assert res.val_metrics["accuracy"] > 0.8  # pale vs dark is easy: chance is 0.5
    # The model records which image is in which split; its own split.csv matches it, a reshuffled one does not.
    _, meta = load_model(res.model_path)
    split = pd.read_csv(res.run_dir / "split.csv")
    assert meta.split.fingerprint and split_mismatch(meta, split) is None
    # ... and the ids of the images it learned from or was selected on, so evaluate can flag them.
    held = split[split["split"].isin(["train", "val"])]
    assert set(meta.split.held_in) == {Path(p).stem for p in held["path"]}
    assert meta.stop.reason in ("epochs", "early_stopping") and 1 <= meta.stop.best_epoch <= meta.stop.epochs_run <= 12
    moved = split["split"].to_numpy().copy()
    first_train, first_val = np.flatnonzero(moved == "train")[0], np.flatnonzero(moved == "val")[0]
    moved[[first_train, first_val]] = moved[[first_val, first_train]]
    assert "other images" in split_mismatch(meta, split.assign(split=moved))


def test_config_from_yaml_rejects_unknown_options(tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="learning_rate: unknown option"):
        TrainConfig.from_yaml(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("epochs: 3\nimbalance: magic\n")
    with pytest.raises(ValueError, match="imbalance"):
        TrainConfig.from_yaml(tmp_path / "d.yaml")


def test_channel_gain_reaches_both_augmentation_paths_and_is_checked():
    from dermsight.models.factory import WeightsInfo
    from dermsight.models.meta import ModelMeta
    from dermsight.training.data import train_augmentation

    meta = ModelMeta.new(
        "tf_efficientnet_lite0", "ham7", WeightsInfo("none", "random", (0.5,) * 3, (0.5,) * 3, "bicubic", 32)
    )
    cfg = TrainConfig(channel_gain=0.15)
    assert train_augmentation(cfg, meta, batched=True).channel_gain == 0.15
    per_image = [type(t).__name__ for t in train_augmentation(cfg, meta).transform.transforms]
    assert "RandomChannelGain" in per_image
    assert "RandomChannelGain" not in [
        type(t).__name__ for t in train_augmentation(TrainConfig(), meta).transform.transforms
    ]
    with pytest.raises(ValueError, match="channel_gain"):
        TrainConfig(channel_gain=1.5)


@pytest.mark.slow
def test_ddp_two_cpu_processes_with_torchrun(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not found next to the Python interpreter")
    data = synthetic_dataset(tmp_path / "data")
    # Also under DDP: augmentation on the device (each rank its DistributedSampler shard), and a time limit that
    # rank 0 decides for both (were they to disagree, one rank would wait forever for the other), and a weight average
    # scored beside the raw weights, every score rank 0's for both ranks.
    cfg = tiny_config(tmp_path, data, epochs=2, device="cpu", augment="device", time_limit_s=0.001, ema_decay=0.9)
    cfg.to_yaml(tmp_path / "ddp.yaml")
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "dermsight.cli",
            "train",
            "--config",
            str(tmp_path / "ddp.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch 1/2" in proc.stdout and (Path(cfg.out) / "model.safetensors").is_file()
    assert "epoch 2/2" not in proc.stdout and "time limit" in proc.stdout and "(raw weights" in proc.stdout
    assert proc.stdout.count("model written to") == 1  # only rank 0 writes
    # Resuming onto another split is refused on every rank with rank 0's reason, not on rank 0 alone.
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "dermsight.cli", "train", "--config",
         str(tmp_path / "ddp.yaml"), "--resume", "--set", "val=0.3"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode != 0 and proc.stderr.count("error: cannot resume") == 2, proc.stderr[-3000:]
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "dermsight.cli", "train", "--config",
         str(tmp_path / "ddp.yaml")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode != 0 and proc.stderr.count("already holds a trained model") == 2, proc.stderr[-3000:]


def test_train_with_missing_weights_is_a_clear_user_error(tmp_path, capsys):
    from dermsight.cli import main

    data = synthetic_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path, data, weights=str(tmp_path / "missing.pth"), epochs=1)
    assert main(["train", "--config", str(cfg.to_yaml(tmp_path / "c.yaml"))]) == 2
    err = capsys.readouterr().err
    assert "weights file not found" in err and "Traceback" not in err and "internal error" not in err


def test_set_overrides_are_typed_by_the_option():
    """`dermsight train --set KEY=VALUE` values take the option's type, not YAML's guess (YAML 1.1 reads 1e-3 as a
    string, and a folder called 2024 must stay a string)."""
    parse = TrainConfig.parse_override
    assert parse("lr=1e-3") == ("lr", 0.001)
    assert parse("epochs=24") == ("epochs", 24)
    assert parse("calibrate=false") == ("calibrate", False) and parse("amp=Yes") == ("amp", True)
    assert parse("out=2024") == ("out", "2024")
    assert parse("cache_dir=none") == ("cache_dir", None) and parse("cache_dir=/tmp/c") == ("cache_dir", "/tmp/c")
    assert parse("notes={why: test}") == ("notes", {"why": "test"})
    for bad, says in [
        ("epochs", "KEY=VALUE"),
        ("=3", "KEY=VALUE"),
        ("epoch=3", "unknown option"),
        ("epochs=many", "epochs: Input should be a valid integer"),
        ("calibrate=maybe", "calibrate: Input should be a valid boolean"),
        ("notes=[1, 2]", "notes: Input should be a valid dictionary"),
        ("member_overrides={seed: 1}", "member_overrides: Input should be a valid list"),
        ("imbalance=magic", "imbalance: Input should be 'loss', 'sampler' or 'none'"),
    ]:
        with pytest.raises(ValueError, match=says):
            parse(bad)
    # Every option the config has can be set, and its default, written on the command line, reads back as itself
    # (none falls through to an untyped string).
    for name, value in TrainConfig().model_dump().items():
        text = "none" if value is None else json.dumps(value) if isinstance(value, (bool, dict, list)) else str(value)
        assert parse(f"{name}={text}") == (name, value), name


def test_cli_train_set_and_prepare_only(tmp_path, capsys):
    """--prepare-only builds the split and the cache the runs will share, and trains nothing; --set reaches the
    config (a bad value is a usage error, exit 2, before any work)."""
    from dermsight.cli import main

    data = synthetic_dataset(tmp_path / "data")
    config = tiny_config(tmp_path, data, members=3).to_yaml(tmp_path / "c.yaml")
    args = ["train", "--config", str(config), "--set", "members=1", "--set", "cache_size=40"]
    assert main([*args, "--prepare-only"]) == 0
    out = capsys.readouterr().out
    assert "48 images ready in the cache" in out and "train " in out
    assert any((tmp_path / "cache").iterdir())
    assert not (tmp_path / "run").exists()
    assert main(["train", "--config", str(config), "--set", "epochs=soon", "--prepare-only"]) == 2
    assert "epochs: Input should be a valid integer" in capsys.readouterr().err


def test_from_yaml_applies_none_overrides(tmp_path):
    """An explicit None (`--set cache_dir=none`) replaces the file's value instead of being dropped."""
    path = TrainConfig(cache_dir="/somewhere").to_yaml(tmp_path / "c.yaml")
    assert TrainConfig.from_yaml(path).cache_dir == "/somewhere"
    assert TrainConfig.from_yaml(path, cache_dir=None).cache_dir is None


def test_distillation_loss_matches_the_teacher_distribution():
    from dermsight.training.engine import DistillationLoss

    base = WeightedCrossEntropy()
    z = torch.randn(6, 4)
    y = torch.randint(0, 4, (6,))
    pure = DistillationLoss(base, weight=1.0, temperature=2.0)
    assert float(pure(z, y, z)) == pytest.approx(0.0, abs=1e-6)  # a student equal to its teacher has nothing to learn
    # KL(p_t || p_s) = cross-entropy to the soft targets minus the teacher's entropy, times T^2.
    t = torch.randn(6, 4)
    p_t = torch.softmax(t / 2, 1)
    ce = -(p_t * torch.log_softmax(z / 2, 1)).sum(1).mean()
    ent = -(p_t * torch.log(p_t)).sum(1).mean()
    assert float(pure(z, y, t)) == pytest.approx(float((ce - ent) * 4), rel=1e-5)
    assert float(DistillationLoss(base, weight=0.0)(z, y, t)) == pytest.approx(float(base(z, y)))
    mixed = DistillationLoss(base, weight=0.25, temperature=2.0)
    assert float(mixed(z, y, t)) == pytest.approx(0.25 * float(pure(z, y, t)) + 0.75 * float(base(z, y)), rel=1e-5)


def test_a_distilled_student_follows_its_teacher_not_the_labels(tmp_path):
    """distil_weight 1: the labels play no part. A student trained on the same images with every label swapped
    (mel <-> nv) learns to predict what the teacher does, so by its last epoch it scores near 0 against the swapped
    labels. (Checkpoint selection still uses the labels, so the log's last epoch is what is checked.)
    Epochs: 12 for the teacher and 16 for the student, since eval mode lags a random start (see the test above); with
    them the student's last five epochs score 0.0 for seeds 0-3."""
    data = synthetic_dataset(tmp_path / "data", n=80)
    teacher = fit(tiny_config(tmp_path, data, epochs=12, imbalance="sampler", out=str(tmp_path / "t")), progress=False)
    assert teacher.val_metrics["accuracy"] > 0.8
    labels = pd.read_csv(data / "labels.csv")
    labels["label"] = labels["label"].map({"mel": "nv", "nv": "mel"})
    labels.to_csv(data / "swapped.csv", index=False)
    cfg = tiny_config(
        tmp_path, data / "swapped.csv", epochs=16, imbalance="sampler", out=str(tmp_path / "s"), patience=20,
        teacher=str(teacher.model_path), distil_weight=1.0,
    )  # fmt: skip
    student = fit(cfg, progress=False)
    log = pd.read_csv(tmp_path / "s" / "log.csv")
    assert log["val_accuracy"].iloc[-1] < 0.2, log
    _, meta = load_model(student.model_path)
    assert meta.config["teacher"] == str(teacher.model_path)


def test_a_teacher_of_other_classes_is_refused(tmp_path):
    from dermsight.training.start import load_teacher

    data = synthetic_dataset(tmp_path / "data")
    t = fit(tiny_config(tmp_path, data, epochs=1, out=str(tmp_path / "t")), progress=False)
    _, meta = load_model(t.model_path)
    with pytest.raises(ValueError, match="not this run's"):
        load_teacher(str(t.model_path), meta, ("a", "b"), torch.device("cpu"))
    # A teacher that saw colour-normalised images would be shown raw ones.
    with pytest.raises(ValueError, match="colour_constancy 0, this run uses 6"):
        load_teacher(
            str(t.model_path), dataclasses.replace(meta, colour_constancy=6), meta.classes, torch.device("cpu")
        )


@pytest.mark.parametrize(
    "name", sorted(p.name for p in (Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
)
def test_shipped_configs_load(name):
    """The configs the README tells people to run are valid TrainConfigs."""
    cfg = TrainConfig.from_yaml(Path(__file__).resolve().parents[2] / "configs" / name)
    assert cfg.arch and cfg.epochs >= 1
    if name == "distil.yaml":
        assert cfg.teacher and cfg.members == 1 and 0 < cfg.distil_weight <= 1


def test_device_batches_pad_by_repeating_edges_and_follow_the_sampler():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((6, 8), (8, 4), (5, 5))]
    sampler = [2, 0, 1, 2, 1]  # any iterable of indices with a length, as the samplers are
    aug = BatchTrainAugment(input_size=4, mean=(0, 0, 0), std=(1, 1, 1))
    dev = torch.device("cpu")
    batches = DeviceBatches(images, np.arange(3), np.array([3, 4, 5]), sampler, 2, aug, dev, drop_last=False)
    # The portrait image is stored turned to landscape, so the slots are 6 x 8, not 8 x 8.
    assert batches.images.shape == (3, 3, 6, 8) and batches.sizes.tolist() == [[6, 8], [4, 8], [5, 5]]
    second = batches.images[1]
    assert torch.equal(second[:, :4, :], torch.from_numpy(images[1].transpose(1, 0, 2)).permute(2, 0, 1))
    assert torch.equal(second[:, 4:, :], second[:, 3:4, :].expand(3, 2, 8))  # rows below repeat the last row
    third = batches.images[2]
    assert torch.equal(third[:, :5, 5:], third[:, :5, 4:5].expand(3, 5, 3))  # columns right repeat the last column
    assert torch.equal(third[:, 5:, :], third[:, 4:5, :])  # and below, the last row (corner included)
    out = list(batches)
    assert len(batches) == len(out) == 3 and [len(y) for _, y in out] == [2, 2, 1]
    assert torch.cat([y for _, y in out]).tolist() == [5, 3, 4, 5, 4]  # targets in the sampler's order
    assert out[0][0].shape == (2, 3, 4, 4)
    assert len(DeviceBatches(images, np.arange(3), np.zeros(3), sampler, 2, aug, dev, drop_last=True)) == 2


def test_fit_with_device_augmentation_learns_and_resumes_exactly(tmp_path, monkeypatch):
    data = synthetic_dataset(tmp_path / "data", n=80)
    whole = tiny_config(tmp_path, data, epochs=6, augment="device", out=str(tmp_path / "whole"))
    res = fit(whole, progress=False)
    assert res.val_metrics["accuracy"] > 0.8
    # Interrupted after 3 epochs and resumed: the same weights as the uninterrupted run (the augmentation's
    # parameters come from the restored CPU generator, the batch order from the replayed sampler).
    save_last = training_epochs.save_last

    def stop_after_third(run, epoch, swa=None):
        save_last(run, epoch, swa)
        if epoch == 2:
            raise KeyboardInterrupt

    part = tiny_config(tmp_path, data, epochs=6, augment="device", out=str(tmp_path / "part"))
    with monkeypatch.context() as m:
        m.setattr(training_epochs, "save_last", stop_after_third)
        with pytest.raises(KeyboardInterrupt):
            fit(part, progress=False)
    fit(part.model_copy(update={"resume": True}), progress=False)
    assert list(pd.read_csv(tmp_path / "part" / "log.csv")["epoch"]) == [1, 2, 3, 4, 5, 6]
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=False)["model"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k


def test_time_limit_estimates_the_next_epoch_without_the_first_once_others_ran():
    # The first epoch carries one-time warm-up (several times a later epoch's on a GPU): alone it is all there is to go
    # by; once later epochs exist it would stop a run several epochs early.
    assert next_epoch_estimate([76.0]) == 76.0
    assert next_epoch_estimate([76.0, 21.0, 23.0, 20.0]) == 23.0
    assert next_epoch_estimate([10.0, 30.0]) == 30.0


def test_time_limit_stops_between_epochs_and_still_scores_the_best_checkpoint(tmp_path, capsys):
    data = synthetic_dataset(tmp_path / "data")
    # Any epoch takes longer than a millisecond: the limit stops training after the first epoch of each invocation.
    cfg = tiny_config(tmp_path, data, epochs=3, time_limit_s=0.001)
    res = fit(cfg, progress=False)
    assert "time limit" in capsys.readouterr().out
    run = Path(cfg.out)
    assert list(pd.read_csv(run / "log.csv")["epoch"]) == [1]
    assert res.test_metrics is not None and (run / "test" / "metrics.json").is_file()
    summary = pd.read_json(run / "metrics.json", typ="series")
    assert summary["time_limit"]["stopped_after_epoch"] == 1
    # Resuming with no limit carries on to the end of the schedule.
    fit(cfg.model_copy(update={"time_limit_s": 0, "resume": True}), progress=False)
    assert list(pd.read_csv(run / "log.csv")["epoch"]) == [1, 2, 3]
    assert "time_limit" not in pd.read_json(run / "metrics.json", typ="series")
    with pytest.raises(ValueError, match="time_limit_s"):
        tiny_config(tmp_path, data, time_limit_s=-1)
    # The SWA phase keeps to the budget too: its epochs stop as the main schedule's do, and the summary says so.
    swa = tiny_config(tmp_path, data, epochs=1, swa_epochs=2, time_limit_s=0.001, out=str(tmp_path / "swa"))
    fit(swa, progress=False)
    assert list(pd.read_csv(tmp_path / "swa" / "log.csv")["epoch"]) == [1]
    summary = pd.read_json(tmp_path / "swa" / "metrics.json", typ="series")
    assert summary["time_limit"]["stopped_after_epoch"] == 1 and summary["swa"]["selected"] is False


def test_tensorboard_scalars_match_the_csv_log(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is part of the dev install (make test)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = synthetic_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path, data, epochs=2, tensorboard=True)
    fit(cfg, progress=False)
    log = pd.read_csv(Path(cfg.out) / "log.csv")
    events = EventAccumulator(str(Path(cfg.out) / "tensorboard"))
    events.Reload()
    for name in ("train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy"):
        points = events.Scalars(name)
        assert [p.step for p in points] == [1, 2]
        assert np.allclose([p.value for p in points], log[name], atol=1e-4), name


def test_tensorboard_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    data = synthetic_dataset(tmp_path / "data")
    with pytest.raises(ValueError, match=r"dermsight\[tensorboard\]"):
        fit(tiny_config(tmp_path, data, tensorboard=True), progress=False)


# ------------------------------------------------------------------------------- training mistakes people make


def test_resuming_a_finished_run_keeps_its_model_and_a_refused_resume_keeps_its_files(tmp_path, capsys):
    data = synthetic_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path, data, epochs=2)
    fit(cfg, progress=False)
    run = Path(cfg.out)
    kept = {n: (run / n).read_bytes() for n in ("model.safetensors", "config.yaml", "split.csv", "log.csv")}
    # Nothing left to do: the model (and a calibration fitted into it since) is not rescored and replaced.
    res = fit(tiny_config(tmp_path, data, epochs=2, resume=True), progress=False)
    assert "finished earlier" in capsys.readouterr().out and res.model_path == run / "model.safetensors"
    assert kept == {n: (run / n).read_bytes() for n in kept}
    # Another run's checkpoint (another backbone) is refused, and this run's config still describes it.
    with pytest.raises(ValueError, match="belongs to a different run"):
        fit(tiny_config(tmp_path, data, epochs=3, resume=True, arch="mobilenetv2_100"), progress=False)
    assert kept == {n: (run / n).read_bytes() for n in kept}
    # An epoch logged but not checkpointed (stopped in between) is not logged twice once resumed.
    with (run / "log.csv").open("a") as f:
        f.write("3,1e-3,0.5,0.5,0.5,0.5,1.0\n")
    fit(tiny_config(tmp_path, data, epochs=3, resume=True), progress=False)
    assert list(pd.read_csv(run / "log.csv")["epoch"]) == [1, 2, 3]
    assert (run / "split.csv").read_bytes() == kept["split.csv"]


def test_a_run_stopped_before_its_first_checkpoint_resumes_only_onto_its_split(tmp_path):
    # A run stopped in epoch 1 has split.csv but no last.pt; resumed with another split_seed it would train on the
    # new split and keep the old split.csv, whose test images it would have trained on.
    data = synthetic_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path, data, epochs=1)
    fit(cfg, progress=False)
    run = Path(cfg.out)
    for name in ("last.pt", "best.safetensors", "model.safetensors", "metrics.json"):
        (run / name).unlink(missing_ok=True)
    kept = (run / "split.csv").read_bytes()
    with pytest.raises(ValueError, match="its data or split settings"):
        fit(tiny_config(tmp_path, data, epochs=1, split_seed=7, resume=True), progress=False)
    assert (run / "split.csv").read_bytes() == kept


def test_a_one_class_val_split_and_missing_classes_finish_with_warnings(tmp_path, capsys):
    data = synthetic_dataset(tmp_path / "data")
    first = fit(tiny_config(tmp_path, data, epochs=1, out=str(tmp_path / "a")), progress=False)
    split = pd.read_csv(first.run_dir / "split.csv")
    split.loc[(split["split"] == "val") & (split["label"] == "mel"), "split"] = "train"
    split.to_csv(tmp_path / "one_class_val.csv", index=False)
    capsys.readouterr()
    res = fit(tiny_config(tmp_path, tmp_path / "one_class_val.csv", epochs=1, out=str(tmp_path / "b")), progress=False)
    out, err = capsys.readouterr()
    assert res.model_path.is_file() and re.search(r"val: balanced accuracy [\d.]+, .*macro AUC n/a", out)
    assert "the training split has no image of akiec, bcc, bkl, df, vasc" in err
    assert "the val split has no image of akiec, bcc, bkl, df, mel, vasc" in err


def test_a_run_folder_as_data_means_its_split(tmp_path, capsys):
    data = synthetic_dataset(tmp_path / "data")
    first = fit(tiny_config(tmp_path, data, epochs=1), progress=False)
    prepared = prepare_data(tiny_config(tmp_path, first.run_dir, out=str(tmp_path / "b")), progress=False)
    assert "is a training run's folder; using its split" in capsys.readouterr().out
    split = pd.read_csv(first.run_dir / "split.csv")
    assert sorted(prepared.manifest["split"]) == sorted(split["split"]) and len(prepared.manifest) == len(split)
    # evaluate too: it read the folder as a dataset (its report PNGs and .npz files as unlabelled images).
    from dermsight.evaluation.run import read_labelled

    test, problems = read_labelled(first.run_dir, "test")
    assert len(test) == (split["split"] == "test").sum() and not problems
    with pytest.raises(DataError, match="say which of its splits to score"):
        read_labelled(first.run_dir)  # every split, the run's training images included
    capsys.readouterr()
    whole, _ = read_labelled(first.run_dir / "split.csv")  # the manifest itself: allowed, with a warning
    assert len(whole) == len(split) and "scored whole, its train split included" in capsys.readouterr().err


def test_a_bad_member_fails_before_any_member_trains(tmp_path):
    from dermsight.training import train

    data = synthetic_dataset(tmp_path / "data")
    missing = str(tmp_path / "nothere.pth")
    cfg = tiny_config(tmp_path, data, epochs=1, member_overrides=[{"seed": 0}, {"seed": 1, "weights": missing}])
    with pytest.raises(Exception, match=r"member tf_efficientnet_lite0_seed1: .*not found"):
        train(cfg, progress=False)
    assert not list(Path(cfg.out).rglob("*.safetensors")) and not list(Path(cfg.out).rglob("last.pt"))


def test_config_mistakes_people_make(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = TrainConfig(out="~/runs/x", data="~/ham", cache_dir="~/cache")
    assert (cfg.out, cfg.data, cfg.cache_dir) == tuple(str(tmp_path / "home" / p) for p in ("runs/x", "ham", "cache"))
    with pytest.raises(ValueError, match=r"cache_size \(128\) must be at least input_size / crop_pct \(256\)"):
        TrainConfig(input_size=224, crop_pct=0.875, cache_size=128)
    with pytest.raises(ValueError, match=r"write 0\.001 or 1\.0e-3"):
        TrainConfig(lr="1e-3")
    with pytest.raises(ValueError, match="quote dates"):
        TrainConfig(notes={"when": __import__("datetime").date(2024, 1, 1)})
    with pytest.raises(ValueError, match=r"arch: Input should be .*, got 'resnet5'"):
        TrainConfig(arch="resnet5")
    # PowerShell's `>` writes UTF-16 with a BOM.
    path = tmp_path / "ps.yaml"
    path.write_bytes("epochs: 3\nout: runs/ps\n".encode("utf-16"))
    assert TrainConfig.from_yaml(path).epochs == 3
    path.write_bytes(b"epochs: 3\n\xff\xfe\xfa")
    with pytest.raises(ValueError, match="not a text file in UTF-8 or UTF-16"):
        TrainConfig.from_yaml(path)


def test_export_and_model_card_do_not_write_over_a_model_file(tmp_path, capsys):
    from dermsight.cli import main

    victim = tmp_path / "other_run.safetensors"
    victim.write_bytes(b"a model someone trained")
    assert main(["export", "--out", str(victim)]) == 2
    assert main(["model-card", "--out", str(victim)]) == 2
    assert "is a model file's name" in capsys.readouterr().err
    assert victim.read_bytes() == b"a model someone trained"


def test_resuming_a_finished_ensemble_keeps_its_model(tmp_path, capsys):
    # Combining and calibrating again would replace the ensemble's model (and a calibration fitted into it since).
    from dermsight.models.bundle import read_meta, update_meta
    from dermsight.training import train

    data = synthetic_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path, data, epochs=1, members=2, tune_decision=False)
    path = train(cfg, progress=False)
    update_meta(path, dataclasses.replace(read_meta(path), temperature=1.2345))
    kept = path.read_bytes()
    assert train(cfg.model_copy(update={"resume": True}), progress=False) == path
    assert "finished earlier" in capsys.readouterr().out
    assert path.read_bytes() == kept and read_meta(path).temperature == 1.2345


def test_source_weights_make_each_source_count_the_same():
    from dermsight.training.data import source_weights

    w = source_weights(pd.Series(["a"] * 6 + ["b"] * 2 + [None] * 2))
    # Per source the weights add up to the same share, rows without a source being a source of their own.
    assert w[:6].sum() == pytest.approx(w[6:8].sum()) == pytest.approx(w[8:].sum()) == pytest.approx(10 / 3)


def test_source_weight_draws_a_named_folder_that_many_times_as_often():
    from dermsight.training.data import source_weights

    sources = pd.Series(["labels-csv:a"] * 6 + ["labels-csv:b"] * 2 + ["ham10000"] * 2)
    w = source_weights(sources, {"b": 2})
    # b's images make up 2 of every 4 draws, a's and the HAM10000 layout's 1 each, however many images each has.
    assert w[6:8].sum() == pytest.approx(5) and w[:6].sum() == pytest.approx(w[8:].sum()) == pytest.approx(2.5)
    assert w.sum() == pytest.approx(10)
    # A source is named by its folder or as recorded; a folder in an official layout is recorded by the layout's name.
    assert source_weights(sources, {"labels-csv:b": 2}) == pytest.approx(w)
    assert source_weights(sources, {"ham10000": 3})[8:].sum() == pytest.approx(6)  # 3 of 5 shares of 10
    # Two folders of one name, told apart by `combine` as FORMAT:NAME:SUBFOLDER, both answer to the name.
    twins = pd.Series(["labels-csv:a"] * 2 + ["labels-csv:a:x/a"] * 2 + ["labels-csv:c"] * 4)
    assert source_weights(twins, {"a": 2})[:4].sum() == pytest.approx(8 * 4 / 5)
    with pytest.raises(DataError, match="source_weight names d, which no training image comes from"):
        source_weights(sources, {"d": 2})


def test_source_weight_needs_source_balance_and_a_source_of_that_name(tmp_path):
    from dermsight.training.data import prepare_data

    folders = []
    for name in ("clinic_a", "clinic_b"):
        rows = []
        for i in range(20):
            label = "mel" if i % 2 else "nv"
            make_image(tmp_path / name / "img" / f"{name}_{i}.jpg", size=(48, 36), seed=i)
            rows.append((f"img/{name}_{i}.jpg", label, f"{name}_L{i}"))
        pd.DataFrame(rows, columns=["image", "label", "lesion_id"]).to_csv(tmp_path / name / "labels.csv", index=False)
        folders.append(str(tmp_path / name))
    cfg = tiny_config(tmp_path, tmp_path, val=0.25, test=0.25).updated(data=folders, source_balance=True)
    assert cfg.updated(source_weight={"clinic_b": 2}).source_weight == {"clinic_b": 2.0}
    with pytest.raises(ValueError, match="set source_balance: true"):
        cfg.updated(source_balance=False, source_weight={"clinic_b": 2})
    with pytest.raises(ValueError, match="greater than 0"):
        cfg.updated(source_weight={"clinic_b": 0})
    # A name no source has is refused with the sources there are, before any image is decoded into the cache.
    with pytest.raises(DataError, match=r"source_weight names clinic_c, .*labels-csv:clinic_a, labels-csv:clinic_b"):
        prepare_data(cfg.updated(source_weight={"clinic_c": 2}), progress=False)
    assert not any((tmp_path / "cache").rglob("pixels.u8"))


def test_training_on_several_sources_splits_them_together_and_records_each(tmp_path):
    folders = []
    for name, n, shade in (("clinic_a", 40, 0), ("clinic_b", 16, 20)):
        rows = []
        for i in range(n):
            label = "mel" if i % 2 else "nv"
            color = (90 + shade, 40, 30) if label == "mel" else (230, 190 - shade, 170)
            make_image(tmp_path / name / "img" / f"{name}_{i}.jpg", size=(48, 36), color=color, seed=i)
            rows.append((f"img/{name}_{i}.jpg", label, f"{name}_L{i}"))
        pd.DataFrame(rows, columns=["image", "label", "lesion_id"]).to_csv(tmp_path / name / "labels.csv", index=False)
        folders.append(str(tmp_path / name))
    # clinic_b's 48x36 frames are declared as really 2:1: they reach the split (and so the cache) stretched.
    cfg = tiny_config(tmp_path, tmp_path, epochs=1, val=0.25, test=0.25).updated(
        data=folders, source_balance=True, display_aspect={"clinic_b": "2:1"}
    )
    res = fit(cfg, progress=False)
    split = pd.read_csv(res.run_dir / "split.csv")
    b = split[split["source"] == "labels-csv:clinic_b"]
    assert (b["width"] == 72).all() and (b["height"] == 36).all()
    assert all(Path(p).is_relative_to(tmp_path / "cache") and Image.open(p).size == (72, 36) for p in b["path"])
    assert (split.loc[split["source"] == "labels-csv:clinic_a", "width"] == 48).all()
    # Both sources in every part, each split in proportion (class and source are the strata).
    parts = pd.crosstab(split["source"], split["split"])
    assert (parts > 0).all().all() and parts.loc["labels-csv:clinic_b"].sum() == 16
    _, meta = load_model(res.model_path)
    assert [(s.name, s.images) for s in meta.training_data.sources] == [("clinic_a", 40), ("clinic_b", 16)]
    assert [s.display_aspect for s in meta.training_data.sources] == [None, 2.0]
    assert meta.split.sources == {"labels-csv:clinic_a": 40, "labels-csv:clinic_b": 16}
    assert TrainConfig.from_yaml(res.run_dir / "config.yaml").data == folders  # the resolved config keeps the list
