"""Photometric shifts for robustness checks, and scoring a model under them."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from conftest import make_image
from dermsight.evaluation.shifts import SHIFTS, air_bubbles, channel_gain, compose, gamma, hair, shift_scores
from dermsight.models import ModelMeta, WeightsInfo

WEIGHTS = WeightsInfo("none", "random", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 32)


def test_channel_gain_and_gamma_on_known_pixels():
    img = np.array([[[100, 100, 100], [250, 10, 0]]], np.uint8)
    out = channel_gain(0.9, 1.0, 1.1)(img)
    assert out.dtype == np.uint8 and out.tolist() == [[[90, 100, 110], [225, 10, 0]]]
    assert channel_gain(1.15, 1.15, 1.15)(img)[0, 1, 0] == 255  # saturates, never wraps around
    g = gamma(1.25)(np.array([[[0, 128, 255]]], np.uint8))
    assert g.tolist() == [[[0, round(255 * (128 / 255) ** 1.25), 255]]]
    assert (gamma(0.8)(img) >= img).all()  # a gamma below 1 lifts every level
    # compose applies in order and skips None: doubling first saturates the bright red, halving first does not.
    double, half = channel_gain(2, 2, 2), channel_gain(0.5, 0.5, 0.5)
    assert compose(None, double, half)(img)[0, 1, 0] == 128
    assert compose(half, None, double)(img).tolist() == img.tolist()
    assert SHIFTS["none"][1](img).tolist() == img.tolist()


class RedOrBlue(nn.Module):
    """A stand-in network that calls an image "mel" when it is redder than it is blue, else "nv"."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))  # scoring reads the device from the parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = (x[:, 0] - x[:, 2]).mean((1, 2))
        logits = torch.zeros(len(x), 7)
        logits[:, 4], logits[:, 5] = d, -d  # ham7 order: akiec bcc bkl df mel nv vasc
        return logits


def test_shift_scores_apply_the_shift_before_the_model(tmp_path, monkeypatch):
    # Slightly red images are "mel", slightly blue ones "nv": a 10% cooler white balance turns every mel into nv.
    rows = []
    for i in range(6):
        label = "mel" if i % 2 else "nv"
        color = (150, 120, 140) if label == "mel" else (140, 120, 150)
        rows.append((str(make_image(tmp_path / f"{i}.png", size=(40, 30), color=color, seed=i)), label))
    manifest = pd.DataFrame(rows, columns=["path", "label_ham7"])
    meta = ModelMeta.new("tf_efficientnet_lite0", "ham7", WEIGHTS, input_size=32)
    monkeypatch.setattr("dermsight.models.bundle.load_model", lambda path: (RedOrBlue(), meta))
    out = {r["shift"]: r for r in shift_scores("m", manifest, ["none", "cool", "warm"], rule="argmax")}
    assert out["none"]["balanced_accuracy"] == 1.0 and out["none"]["n"] == 6
    assert out["cool"]["accuracy"] == 0.5 and out["cool"]["balanced_accuracy"] == 0.5  # all called nv
    assert out["warm"]["accuracy"] == 0.5  # all called mel
    # The model's rule applies its logit bias: a strong pull towards nv calls everything nv, unshifted too.
    biased = replace(meta, logit_bias=(0, 0, 0, 0, 0, 5.0, 0))
    monkeypatch.setattr("dermsight.models.bundle.load_model", lambda path: (RedOrBlue(), biased))
    assert shift_scores("m", manifest, ["none"])[0]["accuracy"] == 0.5
    assert shift_scores("m", manifest, ["none"], rule="argmax")[0]["accuracy"] == 1.0
    with pytest.raises(ValueError, match="unknown shift"):
        shift_scores("m", manifest, ["sepia"])
    with pytest.raises(ValueError, match="rule"):
        shift_scores("m", manifest, rule="vote")
    assert set(SHIFTS) >= {"none", "cool", "warm", "dark"}


def _skin(h: int = 150, w: int = 200, seed: int = 3) -> np.ndarray:
    """Flat skin-coloured picture with a little noise."""
    rng = np.random.default_rng(seed)
    return np.clip(np.array([200, 150, 130]) + rng.normal(0, 3, (h, w, 3)), 0, 255).astype(np.uint8)


def test_hair_draws_dark_strands_the_same_way_every_time():
    skin = _skin()
    out = hair(skin)
    assert out.shape == skin.shape and out.dtype == np.uint8
    assert (hair(skin) == out).all()  # seeded from the image: one image, one set of hairs
    dark = out.sum(2) < 250  # skin sums to about 480; hair is under 100 a channel
    assert 0.01 < dark.mean() < 0.25, dark.mean()
    # Strands reach across the picture: dark pixels in many rows and columns, not a blob.
    assert dark.any(1).mean() > 0.3 and dark.any(0).mean() > 0.3
    other = _skin(150, 200, seed=4)
    assert ((hair(other).sum(2) < 250) != dark).mean() > 0.01  # another image, other hairs


def test_air_bubbles_brighten_small_discs_with_a_rim():
    skin = _skin()
    out = air_bubbles(skin)
    assert out.shape == skin.shape and (air_bubbles(skin) == out).all()
    changed = np.abs(out.astype(int) - skin).sum(2) > 20
    assert 0.005 < changed.mean() < 0.2, changed.mean()
    assert (out[changed].astype(int).sum(1) > skin[changed].astype(int).sum(1)).all()  # only ever brighter
    assert (out == 250).all(2).any()  # a highlight in each bubble
