"""Train and eval presets on hand-made images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from dermsight.models import create_model
from dermsight.models.bundle import ModelMeta
from dermsight.transforms import EvalPreset, RandomRot90, TrainPreset, to_tensor

MEAN = (0.5, 0.25, 0.0)
STD = (0.5, 0.25, 1.0)


def _frame() -> np.ndarray:
    """A 4:3 frame (60 x 80): a 60 x 60 grey centre square between two white 10-px bands."""
    img = np.full((60, 80, 3), 255, dtype=np.uint8)
    img[:, 10:70] = 102
    return img


def test_to_tensor_is_chw_uint8_view():
    img = _frame()
    t = to_tensor(img)
    assert t.shape == (3, 60, 80) and t.dtype == torch.uint8
    assert t[:, 5, 40].tolist() == [102, 102, 102]
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        to_tensor(img.astype(np.float32))


def test_eval_crops_the_centre_square_and_normalises():
    out = EvalPreset(input_size=60, mean=MEAN, std=STD, crop_pct=1.0)(_frame())
    assert out.shape == (3, 60, 60) and out.dtype == torch.float32
    # crop_pct 1.0 on a 4:3 frame keeps exactly the centre square: no white band survives
    expected = (102 / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(out, expected[:, None, None].expand(3, 60, 60), atol=1e-6)


def test_eval_resize_then_crop():
    preset = EvalPreset(input_size=30, mean=MEAN, std=STD, crop_pct=0.5)
    assert preset.resize_size == 60  # shorter side 60 -> no resize, then a 30 px centre crop
    img = _frame()
    img[15:45, 25:55] = 0  # the central 30 x 30
    out = preset(img)
    assert out.shape == (3, 30, 30)
    assert torch.allclose(out, ((0 - torch.tensor(MEAN)) / torch.tensor(STD))[:, None, None].expand(3, 30, 30))


def test_eval_batch_equals_per_sample():
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (45, 60, 3), dtype=np.uint8) for _ in range(3)]
    preset = EvalPreset(input_size=32, mean=MEAN, std=STD, interpolation="bilinear")
    batch = preset(torch.stack([to_tensor(i) for i in imgs]))
    assert batch.shape == (3, 3, 32, 32)
    for i, img in enumerate(imgs):
        assert torch.allclose(batch[i], preset(img), atol=1e-6)


def test_presets_from_meta():
    _, info = create_model("mobilenetv2_100", 7, weights="none")
    meta = ModelMeta.new("mobilenetv2_100", "ham7", info, input_size=48, crop_pct=0.875)
    ev = EvalPreset.from_meta(meta)
    assert ev.resize_size == meta.resize_size == 55
    assert ev(_frame()).shape == (3, 48, 48)
    norm = next(t for t in ev.transform.transforms if isinstance(t, v2.Normalize))
    assert tuple(norm.mean) == meta.mean and tuple(norm.std) == meta.std
    assert TrainPreset.from_meta(meta, scale=(0.5, 1.0))(_frame()).shape == (3, 48, 48)


def test_train_preset_shape_and_steps():
    preset = TrainPreset(input_size=32, mean=MEAN, std=STD)
    out = preset(_frame())
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    kinds = {type(t) for t in preset.transform.transforms}
    assert {v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.RandomVerticalFlip, RandomRot90, v2.ColorJitter} <= kinds
    assert preset(torch.stack([to_tensor(_frame())] * 2)).shape == (2, 3, 32, 32)


def test_train_preset_reaches_every_flip_and_rotation():
    # With the crop covering the whole (square) image and no jitter, the output must be one of the 8 symmetries of
    # the square, and over enough draws every one of them must appear.
    torch.manual_seed(0)
    img = np.arange(16 * 16 * 3, dtype=np.int64).reshape(16, 16, 3) % 251
    img = img.astype(np.uint8)
    preset = TrainPreset(
        input_size=16,
        mean=(0, 0, 0),
        std=(1, 1, 1),
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        interpolation="nearest",
        brightness=0,
        contrast=0,
        saturation=0,
        hue=0,
    )
    base = to_tensor(img).float() / 255
    symmetries = [torch.rot90(t, k, dims=(-2, -1)) for t in (base, base.flip(-1)) for k in range(4)]
    seen = set()
    for _ in range(200):
        out = preset(img)
        matches = [i for i, s in enumerate(symmetries) if torch.allclose(out, s)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == set(range(8))
