"""Ensembles: logits are the members' mean through every path (eager, ONNX, Grad-CAM, the gate's features), files
round-trip at half size, and mixed or malformed inputs are refused with a clear error."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from dermsight.cli import main
from dermsight.inference.backends import ServingModule, feature_layout
from dermsight.inference.explain import gradcam
from dermsight.inference.export import check_parity, export_onnx, model_inputs, synthetic_images
from dermsight.inference.predictor import Predictor
from dermsight.models import ModelMeta, WeightsInfo, create_model, load_model, save_model
from dermsight.models.bundle import ModelLoadError, read_meta
from dermsight.models.ensemble import Ensemble
from dermsight.models.factory import EXTRA_PREFIX
from dermsight.models.meta import FORMAT_VERSION
from dermsight.posthoc.ensemble import combine
from dermsight.training import TrainConfig

WEIGHTS = WeightsInfo("none", "random", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 64)


def member(path, seed: int, size: int = 64, arch: str = "tf_efficientnet_lite0", weights: WeightsInfo = WEIGHTS):
    torch.manual_seed(seed)
    model, _ = create_model(arch, 7, weights="none")
    meta = ModelMeta.new(arch, "ham7", weights, input_size=size, config={"seed": seed})
    return save_model(path, model, meta)


# MobileNetV2 as torchvision trains it: ImageNet's mean and std and a bilinear resize, unlike EfficientNet-Lite's
# 0.5/0.5 and bicubic.
IMAGENET = WeightsInfo("none", "random", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear", 64)


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    return [member(root / f"m{s}.safetensors", s) for s in (0, 1, 2)]


def test_ensemble_logits_are_the_members_mean_through_features_and_head(members):
    paths = members
    nets = [load_model(p)[0] for p in paths]
    ens = Ensemble(nets).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = torch.stack([n(x) for n in nets]).mean(0)
        assert torch.allclose(ens(x), expected, atol=1e-5)
        fmap = ens.forward_features(x)
        assert fmap.shape[1] == 3 * nets[0].forward_features(x).shape[1]
        assert torch.allclose(ens.forward_head(fmap), expected, atol=1e-5)
        pre = ens.forward_head(fmap, pre_logits=True)
        assert pre.shape[1] == 3 * nets[0].forward_head(nets[0].forward_features(x), pre_logits=True).shape[1]
        # The gate's features: every member's pooled features and stage statistics, laid out block by block.
        logits, feats, _ = ServingModule(ens)(x)
        assert torch.allclose(logits, expected, atol=1e-5)
        layout = feature_layout(ens, feats.shape[1])
        assert len(layout) == 1 + 3 * len(nets[0].feature_info) and layout[-1][2] == feats.shape[1]
    with pytest.raises(ValueError, match="at least two"):
        Ensemble(nets[:1])


def test_combine_writes_a_half_size_file_that_loads_as_the_ensemble(members, tmp_path):
    paths = members
    half = combine(paths, tmp_path / "ens16.safetensors")
    combine(paths, tmp_path / "ens32.safetensors", dtype=None)
    size16, size32 = (tmp_path / "ens16.safetensors").stat().st_size, (tmp_path / "ens32.safetensors").stat().st_size
    assert size16 < 0.55 * size32 and size32 > 2.9 * paths[0].stat().st_size
    assert half["stored_as"] == "float16" and [m["seed"] for m in half["members"]] == [0, 1, 2]
    model16, meta = load_model(tmp_path / "ens16.safetensors")
    model32, _ = load_model(tmp_path / "ens32.safetensors")
    assert isinstance(model16, Ensemble) and meta.members == 3 and meta.format_version == 2 <= FORMAT_VERSION
    assert meta.temperature == 1.0 and not meta.logit_bias and not meta.ood and "ensemble" in meta.metrics
    assert next(model16.parameters()).dtype == torch.float32  # stored as float16, computed in float32
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        exact = torch.stack([load_model(p)[0](x) for p in paths]).mean(0)
        assert torch.allclose(model32(x), exact, atol=1e-5)
        assert torch.allclose(model16(x), exact, atol=2e-2)
    # A dermsight from before ensembles (format 1 only) is told to upgrade instead of misreading the file.
    newer = meta.to_json().replace('"format_version": 2', '"format_version": 99')
    with pytest.raises(ValueError, match="upgrade"):
        ModelMeta.from_json(newer)


def test_members_are_named_by_folder_and_file_or_by_file_alone(members, tmp_path, monkeypatch):
    report = combine(members, tmp_path / "ens.safetensors")
    assert [m["model"] for m in report["members"]] == [f"{members[0].parent.name}/m{s}.safetensors" for s in (0, 1, 2)]
    # Files given by name in the current folder: named alone, not "/m0.safetensors".
    monkeypatch.chdir(members[0].parent)
    report = combine([p.name for p in members], tmp_path / "ens2.safetensors")
    assert [m["model"] for m in report["members"]] == ["m0.safetensors", "m1.safetensors", "m2.safetensors"]
    # Runs in folders of the same name are told apart by their whole paths.
    for run, member in (("a", members[0]), ("b", members[1])):
        (tmp_path / run / "seed0").mkdir(parents=True)
        shutil.copy(member, tmp_path / run / "seed0" / "model.safetensors")
    same_names = [tmp_path / run / "seed0" / "model.safetensors" for run in ("a", "b")]
    report = combine(same_names, tmp_path / "ens3.safetensors")
    assert [m["model"] for m in report["members"]] == [str(p) for p in same_names]


def test_the_same_weights_under_two_names_are_one_member(members, tmp_path):
    # A glob over run folders: each run's best.safetensors holds its model.safetensors' weights, so an "ensemble of 4"
    # would be two networks counted twice. The metadata may differ; the weights decide.
    twin = tmp_path / "best.safetensors"
    model, meta = load_model(members[0])
    # Calibration adds the gate's tensors to model.safetensors, not to best.safetensors: still the same network.
    extra = {"ood.mean": torch.zeros(4)}
    save_model(twin, model, replace(meta, metrics={"note": "another file, the same network"}), extra=extra)
    with pytest.raises(ValueError, match="holds the same weights as"):
        combine([members[0], members[1], twin], tmp_path / "ens.safetensors")


def test_ensemble_serves_onnx_with_parity_and_explains(members, tmp_path):
    paths = members
    path = combine(paths[:2], tmp_path / "ens.safetensors")["model"]
    model, meta = load_model(path)
    onnx = export_onnx(model, meta, tmp_path / "ens.onnx")
    cmp = check_parity(model, meta, onnx, model_inputs(meta, list(synthetic_images())))
    assert cmp.max_abs_diff < 1e-4
    heat, target = gradcam(model, torch.randn(1, 3, 64, 64))
    assert heat.shape == (64, 64) and 0 <= target < 7 and np.isfinite(heat).all()
    image = tmp_path / "lesion.png"
    Image.fromarray(synthetic_images(1, size=(200, 150))[0]).save(image)
    predictor = Predictor.from_path(path, backend="onnx", threads=1)
    result = predictor.predict(image)
    assert result.status == "ok" and len(result.predictions) == 7
    assert result.model == "2 x tf_efficientnet_lite0 (ensemble) (ens.safetensors)" and predictor.info()["members"] == 2
    assert abs(sum(p.probability for p in result.predictions) - 1) < 1e-3


def test_combine_refuses_mixed_recipes_single_models_and_nested_ensembles(members, tmp_path, capsys):
    paths = members
    other = member(tmp_path / "other.safetensors", 5, size=48)
    with pytest.raises(ValueError, match="input_size"):
        combine([paths[0], other], tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="at least two"):
        combine(paths[:1], tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="is given twice"):  # one run twice would weigh it double
        combine([paths[0], paths[1], paths[0]], tmp_path / "x.safetensors")
    ens = combine(paths[:2], tmp_path / "ens.safetensors")["model"]
    with pytest.raises(ValueError, match="single models"):
        combine([ens, paths[2]], tmp_path / "x.safetensors")
    with pytest.raises(ModelLoadError, match="not found"):
        combine([paths[0], tmp_path / "missing.safetensors"], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    # The command line: exit 0 with a next-steps hint, or exit 2 with one line, never a traceback.
    assert main(["ensemble", str(paths[0]), str(paths[1]), "--out", str(tmp_path / "cli.safetensors")]) == 0
    assert "dermsight calibrate" in capsys.readouterr().out
    assert read_meta(tmp_path / "cli.safetensors").members == 2
    assert main(["ensemble", str(paths[0]), str(other), "--out", str(tmp_path / "y.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "input_size" in err and "Traceback" not in err
    # Runs of different splits (cross-validation folds, say) may be combined, but the user is told what that means.
    assert "different splits" not in capsys.readouterr().err
    torch.manual_seed(5)  # not the members' seeds: the same weights would be refused as one network twice
    net, _ = create_model("tf_efficientnet_lite0", 7, weights="none")
    fold = save_model(tmp_path / "fold.safetensors", net, replace(read_meta(paths[2]), split="seed 1: train 9"))
    assert main(["ensemble", str(paths[0]), str(fold), "--out", str(tmp_path / "z.safetensors")]) == 0
    assert "trained on 2 different splits" in capsys.readouterr().err
    # Fingerprinted splits are told apart by their images; a run from before fingerprints by the rest of its record.
    split = "seed 0: train 9, val 3, test 3 images"
    runs = []
    for i, s in enumerate([f"{split}; fingerprint {'a' * 16}", f"{split}; fingerprint {'b' * 16}", split]):
        torch.manual_seed(10 + i)  # three networks: one saved thrice would be refused as the same weights
        net, _ = create_model("tf_efficientnet_lite0", 7, weights="none")
        runs.append(save_model(tmp_path / f"r{i}.safetensors", net, replace(read_meta(paths[2]), split=s)))
    assert main(["ensemble", str(runs[0]), str(runs[1]), "--out", str(tmp_path / "f.safetensors")]) == 0
    assert "trained on 2 different splits" in capsys.readouterr().err
    assert main(["ensemble", str(runs[0]), str(runs[2]), "--out", str(tmp_path / "g.safetensors")]) == 0
    assert "different splits" not in capsys.readouterr().err


def test_model_card_names_the_ensemble_and_its_members(members, tmp_path):
    from dermsight.models.card import render_model_card

    path = combine(members, tmp_path / "ens.safetensors")["model"]
    card = render_model_card(read_meta(path))
    assert "3 x tf_efficientnet_lite0 (ensemble)" in card and "seeds 0, 1, 2" in card and "float16" in card
    assert all(f"m{s}.safetensors` | {s} |" in card for s in (0, 1, 2))
    single = render_model_card(read_meta(members[0]))
    assert "ensemble" not in single


def lesion_dataset(root, n: int = 60):
    """Lesion-like 200x150 JPEGs that pass the image-quality gate, with two separable classes."""
    import pandas as pd

    rows = []
    for i, img in enumerate(synthetic_images(n, seed=3)):
        label = "mel" if i % 2 else "nv"
        if label == "mel":
            img = (img * 0.5).astype(np.uint8)
        path = root / "img" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, quality=85)
        rows.append((f"img/{i}.jpg", label, f"L{i}"))
    pd.DataFrame(rows, columns=["image", "label", "lesion_id"]).to_csv(root / "labels.csv", index=False)
    return root


def test_train_with_members_builds_a_calibrated_ensemble_and_resumes_finished_members(tmp_path):
    import json

    from test_training import tiny_config

    from dermsight.training import train

    data = lesion_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path, data, members=2, seed=4, epochs=1, cache_size=150, calibrate=True)
    path = train(cfg, progress=False)
    run = tmp_path / "run"
    assert path == run / "model.safetensors"
    for seed in (4, 5):
        assert (run / f"seed{seed}" / "model.safetensors").is_file()
        assert read_meta(run / f"seed{seed}" / "model.safetensors").config["seed"] == seed
    model, meta = load_model(path)
    assert isinstance(model, Ensemble) and meta.members == 2
    # Fitted on the members' split: temperature, gate and decision rule, then val and test scored once.
    assert meta.ood and "decision" in meta.metrics and "test" in meta.metrics
    # Calibration rewrote the file without widening the weights: still float16, beside the gate's float32 tensors.
    stored = safetensors.torch.load_file(str(path))
    assert stored["members.0.conv_stem.weight"].dtype == torch.float16
    assert any(k.startswith(EXTRA_PREFIX) and v.dtype == torch.float32 for k, v in stored.items())
    assert json.loads((run / "metrics.json").read_text())["ensemble"]["members"][1]["seed"] == 5
    # Resume: finished members are kept as they are, only the ensemble is rebuilt.
    before = (run / "seed4" / "model.safetensors").stat().st_mtime_ns
    train(tiny_config(tmp_path, data, members=2, seed=4, epochs=1, cache_size=150, resume=True, calibrate=False))
    assert (run / "seed4" / "model.safetensors").stat().st_mtime_ns == before
    # A member that had not started when the run stopped must still share the first member's split: with the
    # split settings changed since (as with changed data), resuming is refused, and the run's config is left alone.
    import shutil

    shutil.rmtree(run / "seed5")
    config = (run / "config.yaml").read_bytes()
    with pytest.raises(ValueError, match=r"the data changed since the ensemble's first member was trained \([1-9]"):
        train(tiny_config(tmp_path, data, members=2, seed=4, epochs=1, cache_size=150, resume=True, val=0.3))
    assert (run / "config.yaml").read_bytes() == config and not (run / "seed5" / "model.safetensors").exists()


def test_bundled_default_model_fits_the_size_cap_and_carries_its_fitted_contract():
    from dermsight.domain.classes import TAXONOMIES
    from dermsight.models.bundle import DEFAULT_MODEL

    assert DEFAULT_MODEL.stat().st_size <= 30 * 2**20  # the cap for a model shipped in the repository
    meta = read_meta(DEFAULT_MODEL)
    assert meta.classes == TAXONOMIES["ham7"].codes and meta.input_size >= 160
    # Calibrated, gated and with a decision rule, all fitted after the weights were final (see MODEL_CARD.md).
    assert meta.temperature != 1.0 and meta.ood.get("threshold") and "decision" in meta.metrics
    assert meta.metrics["test"]["n"] > 1000 and meta.metrics["val"]["n"] > 1000
    if meta.members > 1:
        assert len(meta.metrics["ensemble"]["members"]) == meta.members


def test_mixed_ensemble_feeds_each_backbone_its_own_normalisation_and_round_trips(members, tmp_path):
    mnv2 = member(tmp_path / "mnv2.safetensors", 7, arch="mobilenetv2_100", weights=IMAGENET)
    path = combine([members[0], mnv2], tmp_path / "mixed.safetensors", dtype=None)["model"]
    model, meta = load_model(path)
    assert meta.member_specs[1] == {
        "architecture": "mobilenetv2_100",
        "mean": list(IMAGENET.mean),
        "std": list(IMAGENET.std),
        "interpolation": "bilinear",
    }
    assert meta.interpolation == "bicubic"  # every member is resized as the first one
    assert meta.format_version == 3 < FORMAT_VERSION and meta.mean == WEIGHTS.mean  # served as the first member
    assert meta.network == "tf_efficientnet_lite0 + mobilenetv2_100 (ensemble)"
    assert [m["architecture"] for m in meta.metrics["ensemble"]["members"]] == [
        "tf_efficientnet_lite0",
        "mobilenetv2_100",
    ]
    # The same pixels, normalised as each member was trained, give the members' own logits; the ensemble averages
    # them from the first member's normalisation alone.
    pixels = torch.rand(2, 3, 64, 64)
    norm = lambda w: (pixels - torch.tensor(w.mean).view(1, 3, 1, 1)) / torch.tensor(w.std).view(1, 3, 1, 1)  # noqa: E731
    with torch.no_grad():
        expected = (load_model(members[0])[0](norm(WEIGHTS)) + load_model(mnv2)[0](norm(IMAGENET))) / 2
        assert torch.allclose(model(norm(WEIGHTS)), expected, atol=1e-5)
        # The input maps come from the metadata, not the weights: the file holds no extra tensors for them.
        assert not any("in_scale" in k for k in safetensors.torch.load_file(str(path)))
    # Every downstream path: ONNX parity, Grad-CAM, the predictor and the model card.
    onnx = export_onnx(model, meta, tmp_path / "mixed.onnx")
    assert check_parity(model, meta, onnx, model_inputs(meta, list(synthetic_images()))).max_abs_diff < 1e-4
    heat, _ = gradcam(model, norm(WEIGHTS)[:1])
    assert heat.shape == (64, 64) and np.isfinite(heat).all()
    image = tmp_path / "lesion.png"
    Image.fromarray(synthetic_images(1, size=(200, 150))[0]).save(image)
    result = Predictor.from_path(path, backend="torch", threads=1).predict(image)
    assert result.status == "ok" and "mobilenetv2_100" in result.model
    assert Predictor.from_path(path, backend="torch", threads=1).info()["network"] == meta.network
    from dermsight.models.card import render_model_card

    card = render_model_card(meta)
    assert "tf_efficientnet_lite0 + mobilenetv2_100 (ensemble)" in card and "| mobilenetv2_100 |" in card


def test_mixed_ensemble_refuses_feature_maps_of_different_sizes_and_soups_refuse_mixing(members, tmp_path):
    import pandas as pd

    from dermsight.posthoc.soup import make_soup

    # At 96 px InceptionV3's valid-padded stem leaves a 1x1 map where EfficientNet-Lite0's is 3x3.
    small = [
        member(tmp_path / f"{a}.safetensors", 1, size=96, arch=a) for a in ("tf_efficientnet_lite0", "inception_v3")
    ]
    with pytest.raises(ValueError, match="feature maps differ in size"):
        combine(small, tmp_path / "x.safetensors")
    mnv2 = member(tmp_path / "mnv2.safetensors", 7, arch="mobilenetv2_100", weights=IMAGENET)
    with pytest.raises(ValueError, match="architecture"):
        make_soup([members[0], mnv2], pd.DataFrame(), tmp_path / "soup.safetensors")
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "soup.safetensors").exists()


def test_train_with_member_overrides_builds_an_ensemble_of_backbones(tmp_path):
    from test_training import tiny_config

    from dermsight.training import train

    data = lesion_dataset(tmp_path / "data")
    members = [{"seed": 1}, {"seed": 1, "arch": "mobilenetv2_100", "augment": "device"}]
    cfg = tiny_config(tmp_path, data, member_overrides=members, epochs=1, cache_size=150, calibrate=True)
    assert cfg.members == 2 and cfg.member_config(1).augment == "device" and cfg.member_config(0).augment == "loader"
    path = train(cfg, progress=False)
    run = tmp_path / "run"
    for name, arch in (
        ("tf_efficientnet_lite0_seed1", "tf_efficientnet_lite0"),
        ("mobilenetv2_100_seed1", "mobilenetv2_100"),
    ):
        meta = read_meta(run / name / "model.safetensors")
        assert meta.architecture == arch and meta.config["seed"] == 1
    model, meta = load_model(path)
    assert isinstance(model, Ensemble) and meta.network == "tf_efficientnet_lite0 + mobilenetv2_100 (ensemble)"
    # Calibrated on the members' split like any ensemble; the saved config lists the members to retrain them.
    assert meta.ood and "decision" in meta.metrics and "test" in meta.metrics
    assert TrainConfig.from_yaml(run / "config.yaml").member_overrides == members


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([{"seed": 1}], "at least two"),
        ([{"seed": 1}, {"input_size": 48}], "input_size cannot differ"),
        ([{"seed": 1}, {"colour": 1}], "unknown option"),
        ([{"seed": 1}, {"seed": 1}], "share a folder"),
        ([{"seed": 1}, {"arch": "nope"}], "arch"),
        ([{"seed": 1}, "seed: 2"], "mapping"),
    ],
)
def test_member_overrides_are_checked_when_the_config_is_read(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(out=str(tmp_path), member_overrides=overrides)
    with pytest.raises(ValueError, match="members is 3"):
        TrainConfig(members=3, member_overrides=[{"seed": 1}, {"seed": 2}])
