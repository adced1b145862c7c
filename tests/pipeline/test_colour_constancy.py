"""Colour constancy (Shades of Gray) as part of a model's contract: the function, then each place that must apply it
the same way (serving, both training data paths, the saved model, ensembles of one recipe)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dermsight.inference.preprocess import to_model_input
from dermsight.inference.transforms import BatchTrainAugment, shades_of_gray
from dermsight.models.bundle import load_model, save_model
from dermsight.models.factory import WeightsInfo, create_model
from dermsight.models.meta import ModelMeta
from dermsight.posthoc.ensemble import combine
from dermsight.training.config import TrainConfig
from dermsight.training.data import CachedImages, DeviceBatches

CAST = np.array([0.9, 1.0, 1.1], np.float32)  # a cooler white balance, as bench/robustness.py's "cool"


def skin(seed: int = 0, shape=(40, 50)) -> np.ndarray:
    """Skin-coloured noise with a darker blob, kept below 200 so a 10% cast does not clip."""
    rng = np.random.default_rng(seed)
    img = rng.normal((170, 125, 105), 20, (*shape, 3))
    img[10:30, 15:35] *= 0.5
    return np.clip(img, 0, 200).astype(np.uint8)


def cast(img: np.ndarray) -> np.ndarray:
    return np.clip(img * CAST + 0.5, 0, 255).astype(np.uint8)


def light(img: np.ndarray, p: int = 6) -> np.ndarray:
    return np.power(np.power(img / 255.0, p).reshape(-1, 3).mean(0), 1 / p)


def chroma_ratio(a, b) -> np.ndarray:
    """Per-channel ratio of mean levels, b over a: equal in all channels when b is a only brighter or darker."""
    a, b = (np.asarray(x, np.float64).reshape(-1, 3) for x in (a, b))
    return b.mean(0) / a.mean(0)


def test_shades_of_gray_removes_a_per_channel_cast():
    img = skin()
    assert np.abs(cast(img).astype(int) - img).max() > 15  # the cast is visible without the correction
    a, b = shades_of_gray(img, 6), shades_of_gray(cast(img), 6)
    # What is left is one brightness factor for all three channels: the light keeps its intensity (its norm), and
    # the cast changed that by 2.5%. Colour balance, what the cast changed, is restored.
    ratio = chroma_ratio(a, b)
    assert np.ptp(ratio) < 0.005 and abs(ratio.mean() - 1) < 0.05
    est = light(a)
    assert np.ptp(est) < 0.01 * est.mean()  # the estimated light is now neutral grey
    assert np.linalg.norm(est) == pytest.approx(np.linalg.norm(light(img)), rel=0.01)  # and keeps its intensity


def test_shades_of_gray_leaves_neutral_black_and_switched_off_images_alone():
    grey = np.full((8, 8, 3), 128, np.uint8)
    assert np.array_equal(shades_of_gray(grey, 6), grey)
    black = np.zeros((8, 8, 3), np.uint8)
    assert np.array_equal(shades_of_gray(black, 6), black)
    img = skin()
    assert shades_of_gray(img, 0) is img


def _meta(colour_constancy: int = 0, **kw) -> ModelMeta:
    weights = WeightsInfo("none", "random", (0.5,) * 3, (0.5,) * 3, "bicubic", 32)
    return ModelMeta.new("tf_efficientnet_lite0", "ham7", weights, colour_constancy=colour_constancy, **kw)


def test_serving_input_applies_the_models_colour_constancy():
    img = skin(1, (64, 64))
    for cc, invariant in ((6, True), (0, False)):
        meta = _meta(cc)
        a, b = to_model_input(img, meta), to_model_input(cast(img), meta)
        # Corrected, the cast leaves one small shift for all channels (the brightness); uncorrected, red rises
        # and blue falls.
        spread = float(np.ptp((b - a).mean((1, 2))))
        assert spread < 0.005 if invariant else spread > 0.1
    with pytest.raises(ValueError, match="colour_constancy"):
        _meta(-1)
    # A dermsight that predates it must refuse such a file, not serve it without; other files keep their format.
    assert _meta(6).format_version == 4 and _meta(0).format_version == 1


def test_both_training_paths_apply_it_before_augmenting():
    images = [skin(2), cast(skin(2))]
    rows, targets = np.arange(2), np.array([0, 1])

    def identity(x):
        return torch.from_numpy(np.ascontiguousarray(x))

    off, on = CachedImages(images, rows, targets, identity), CachedImages(images, rows, targets, identity, 6)
    assert np.ptp(chroma_ratio(off[0][0], off[1][0])) > 0.1
    assert np.ptp(chroma_ratio(on[0][0], on[1][0])) < 0.005
    aug = BatchTrainAugment(input_size=8, mean=(0, 0, 0), std=(1, 1, 1))
    dev = torch.device("cpu")
    batches = DeviceBatches(images, rows, targets, [0, 1], 2, aug, dev, drop_last=False, colour_constancy=6)
    stored = batches.images.permute(0, 2, 3, 1).numpy()  # as kept on the device, before any augmentation
    assert np.ptp(chroma_ratio(stored[0], stored[1])) < 0.005
    assert np.array_equal(batches.images[0].permute(1, 2, 0).numpy(), shades_of_gray(images[0], 6))


def test_config_checks_it_and_members_must_share_it():
    with pytest.raises(ValueError, match="colour_constancy"):
        TrainConfig(colour_constancy=-2)
    with pytest.raises(ValueError, match="colour_constancy cannot differ"):
        TrainConfig(member_overrides=[{"seed": 1}, {"seed": 2, "colour_constancy": 6}])


def test_an_ensemble_refuses_runs_with_different_colour_constancy(tmp_path):
    paths = []
    for cc in (0, 6):
        model, winfo = create_model("mobilenetv2_100", 7)
        meta = ModelMeta.new("mobilenetv2_100", "ham7", winfo, input_size=32, colour_constancy=cc)
        paths.append(save_model(tmp_path / f"cc{cc}" / "model.safetensors", model, meta))
    with pytest.raises(ValueError, match=r"differs .* in colour_constancy"):
        combine(paths, tmp_path / "ens.safetensors")
    assert load_model(paths[1])[1].colour_constancy == 6  # and the saved contract carries it


def test_fit_records_it_in_the_saved_model(tmp_path):
    from test_training import synthetic_dataset, tiny_config

    from dermsight.training import fit

    data = synthetic_dataset(tmp_path / "data")
    res = fit(tiny_config(tmp_path, data, epochs=1, colour_constancy=6), progress=False)
    meta = load_model(res.model_path)[1]
    assert meta.colour_constancy == 6 and meta.config["colour_constancy"] == 6


def test_model_card_says_so_only_when_on():
    from dermsight.models.card import render_model_card

    assert "Shades of Gray colour constancy (p = 6)" in render_model_card(_meta(6))
    assert "Shades of Gray" not in render_model_card(_meta(0))
