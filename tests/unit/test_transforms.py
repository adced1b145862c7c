"""Train and eval presets on hand-made images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from dermsight.inference.transforms import (
    BatchTrainAugment,
    EvalPreset,
    RandomChannelGain,
    RandomRot90,
    TrainPreset,
    to_tensor,
)
from dermsight.models import create_model
from dermsight.models.meta import ModelMeta

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


def _still(**kw) -> BatchTrainAugment:
    """A batch augmentation with every random step off unless switched on by ``kw``."""
    base = dict(
        input_size=16, mean=(0, 0, 0), std=(1, 1, 1), scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0, vflip=0,
        rot90=False, brightness=0, contrast=0, saturation=0, hue=0,
    )  # fmt: skip
    return BatchTrainAugment(**(base | kw))


def _pattern(h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_batch_augment_full_crop_is_the_image_and_matches_the_per_image_resize():
    img = _pattern()
    out = _still()(img[None], torch.tensor([[16, 16]]))
    assert out.shape == (1, 3, 16, 16) and out.dtype == torch.float32
    assert torch.allclose(out[0], img.float() / 255, atol=1e-5)  # same size: an exact copy
    # Shrinking a smooth image averages like torchvision's antialiased resize.
    smooth = (torch.linspace(0, 255, 64).view(1, 1, 64) + torch.linspace(0, 255, 64).view(1, 64, 1)) / 2
    smooth = smooth.expand(3, 64, 64).round().to(torch.uint8)
    ours = _still()(smooth[None], torch.tensor([[64, 64]]))[0]
    ref = v2.functional.resize(smooth, [16, 16], antialias=True).float() / 255
    assert (ours - ref).abs().mean() < 0.01


def test_batch_augment_crops_follow_torchvisions_rule_and_stay_inside_each_image():
    torch.manual_seed(0)
    aug = _still(scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3))
    sizes = torch.tensor([[150, 200], [60, 60], [200, 100]]).repeat(400, 1)
    boxes = aug.crop_boxes(sizes)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= sizes[:, 1]).all() and (boxes[:, 3] <= sizes[:, 0]).all()
    frac = w * h / (sizes[:, 0] * sizes[:, 1])
    assert frac.min() > 0.28 and frac.max() <= 1.0 and frac.std() > 0.1  # spread over the scale range
    aspect = w / h
    assert aspect.min() > 0.7 and aspect.max() < 1.4
    # No try can fit a ratio range far from the image's: torchvision's fallback, the centre crop, clamped.
    wide = _still(scale=(1.0, 1.0), ratio=(1.0, 1.0)).crop_boxes(torch.tensor([[100, 200]]))
    assert wide.tolist() == [[50.0, 0.0, 150.0, 100.0]]


def test_batch_augment_reads_no_further_than_one_pixel_past_an_image():
    # Bilinear sampling near a crop's far edge reaches up to one pixel beyond it, as torchvision's resize does by
    # repeating the edge: a batch slot padded by one repeated edge pixel and black beyond must give only white.
    torch.manual_seed(1)
    batch = torch.zeros(8, 3, 40, 40, dtype=torch.uint8)
    batch[:, :, :11, :11] = 255
    aug = _still(scale=(0.2, 1.0), ratio=(0.5, 2.0), hflip=0.5, vflip=0.5, rot90=True)
    out = aug(batch, torch.tensor([[10, 10]] * 8))
    assert torch.allclose(out, torch.ones_like(out))


def test_batch_augment_draws_per_image_and_reaches_every_symmetry():
    torch.manual_seed(0)
    img = _pattern()
    base = img.float() / 255
    symmetries = [torch.rot90(t, k, dims=(-2, -1)) for t in (base, base.flip(-1)) for k in range(4)]
    out = _still(hflip=0.5, vflip=0.5, rot90=True)(img[None].expand(200, -1, -1, -1), torch.tensor([[16, 16]] * 200))
    seen = []
    for o in out:
        matches = [i for i, s in enumerate(symmetries) if torch.allclose(o, s, atol=1e-5)]
        assert len(matches) == 1
        seen.append(matches[0])
    assert set(seen) == set(range(8))  # one batch holds every symmetry: parameters are drawn per image
    counts = np.bincount(seen, minlength=8)
    assert counts.min() > 10  # and about uniformly (25 each expected)


def test_batch_augment_colour_jitter_matches_torchvision_per_image():
    torch.manual_seed(0)
    img = _pattern(seed=3)
    n = 64
    for name in ("brightness", "contrast", "saturation"):
        aug = _still(**{name: 0.4})
        out = aug(img[None].expand(n, -1, -1, -1), torch.tensor([[16, 16]] * n))
        assert len({round(float((o * o).mean()), 5) for o in out}) > n // 2  # a factor per image
        # Each output equals torchvision's adjustment at some factor in the range: find it by a fine search.
        adjust = getattr(v2.functional, f"adjust_{name}")
        grid = torch.linspace(0.6, 1.4, 801)
        refs = torch.stack([adjust(img.float() / 255, float(f)) for f in grid])
        for o in out[:8]:
            assert (refs - o).abs().amax((1, 2, 3)).min() < 2e-3
    # Hue: a small turn of the chroma plane keeps brightness (Y) and changes colour, within the bound.
    aug = _still(hue=0.05)
    out = aug(img[None].expand(n, -1, -1, -1), torch.tensor([[16, 16]] * n))
    gray = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    y_in, y_out = (img.float()[None] / 255 * gray).sum(1), (out * gray).sum(1)
    assert (y_out - y_in).abs().mean() < 0.02
    assert (out - img.float() / 255).abs().mean() > 0.005


def test_batch_augment_is_seeded_and_normalises():
    img = _pattern()[None].expand(4, -1, -1, -1)
    sizes = torch.tensor([[16, 16]] * 4)
    aug = BatchTrainAugment(input_size=12, mean=MEAN, std=STD)
    torch.manual_seed(5)
    a = aug(img, sizes)
    torch.manual_seed(5)
    b = aug(img, sizes)
    assert a.shape == (4, 3, 12, 12) and torch.equal(a, b)
    lo = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    hi = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert (a >= lo.view(1, 3, 1, 1) - 1e-5).all() and (a <= hi.view(1, 3, 1, 1) + 1e-5).all()
    with pytest.raises(ValueError, match="uint8"):
        aug(img.float(), sizes)


def test_batch_augment_and_train_preset_share_their_defaults():
    # Two implementations of one augmentation: a default changed in one must be changed in the other.
    import inspect

    def defaults(cls):
        return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if p.default is not p.empty}

    batch, per_image = defaults(BatchTrainAugment), defaults(TrainPreset)
    # The JPEG step is the loader path's alone (TrainConfig refuses it with augment: device).
    assert batch == {k: v for k, v in per_image.items() if k not in ("interpolation", "jpeg", "jpeg_quality")}


def _gains(out: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Per-channel ratios of the output's mean to the input's: (..., 3)."""
    return out.float().mean((-2, -1)) / base.float().mean((-2, -1))


def test_channel_gain_scales_each_channel_within_its_bound():
    torch.manual_seed(0)
    img = torch.full((3, 8, 8), 100, dtype=torch.uint8)
    gain = RandomChannelGain(0.15)
    outs = torch.stack([gain(img) for _ in range(300)])
    assert outs.dtype == torch.uint8 and outs.shape == (300, 3, 8, 8)
    ratios = _gains(outs, img)
    assert (ratios >= 0.85 - 0.01).all() and (ratios <= 1.15 + 0.01).all()
    # Each channel its own factor (a tint, not only a brightness change), and the range is used to its ends.
    assert (ratios[:, 0] - ratios[:, 2]).abs().max() > 0.2
    assert ratios.min() < 0.87 and ratios.max() > 1.13
    # Float images stay in [0, 1]; bright pixels saturate rather than wrap around.
    bright = gain(torch.ones(3, 4, 4))
    assert bright.max() <= 1 and bright.min() > 0.8
    with pytest.raises(ValueError, match="channel gain"):
        RandomChannelGain(1.0)


def test_train_preset_channel_gain_is_off_by_default_and_on_when_asked():
    names = lambda p: [type(t).__name__ for t in p.transform.transforms]  # noqa: E731
    assert "RandomChannelGain" not in names(TrainPreset(input_size=16, mean=MEAN, std=STD))
    steps = names(TrainPreset(input_size=16, mean=MEAN, std=STD, channel_gain=0.1))
    assert steps.index("RandomChannelGain") < steps.index("ColorJitter")


def test_batch_augment_channel_gain_per_image_and_nothing_else_changes():
    img = torch.full((1, 3, 16, 16), 128, dtype=torch.uint8).expand(64, -1, -1, -1)
    sizes = torch.tensor([[16, 16]] * 64)
    torch.manual_seed(1)
    out = _still(channel_gain=0.1)(img, sizes)
    ratios = _gains(out, img.float() / 255)
    assert (ratios >= 0.9 - 1e-4).all() and (ratios <= 1.1 + 1e-4).all()
    assert len({tuple(r.round(decimals=4).tolist()) for r in ratios}) == 64  # a draw per image
    assert ratios.std(0).min() > 0.03  # spread over the range, per channel
    # The gains are drawn after every other parameter, so switching them on changes nothing else: same seed, same
    # crops and flips, each image's channels scaled by constant factors.
    pattern = (_pattern()[None].expand(8, -1, -1, -1).float() * 0.5 + 60).to(torch.uint8)  # no clipping either way
    sizes = torch.tensor([[16, 16]] * 8)
    plain = BatchTrainAugment(
        input_size=12, mean=(0, 0, 0), std=(1, 1, 1), brightness=0, contrast=0, saturation=0, hue=0
    )
    tinted = BatchTrainAugment(
        input_size=12, mean=(0, 0, 0), std=(1, 1, 1), brightness=0, contrast=0, saturation=0, hue=0, channel_gain=0.1
    )
    torch.manual_seed(5)
    a = plain(pattern, sizes)
    torch.manual_seed(5)
    b = tinted(pattern, sizes)
    ratio = b / a
    assert torch.allclose(ratio, ratio.mean((-2, -1), keepdim=True), atol=1e-4)
    assert not torch.allclose(ratio, torch.ones_like(ratio), atol=1e-3)
    with pytest.raises(ValueError, match="channel_gain"):
        BatchTrainAugment(input_size=12, mean=MEAN, std=STD, channel_gain=-0.1)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize(
    ("size", "crop_pct"), [((150, 200), 1.0), ((450, 600), 1.0), ((300, 257), 0.875), ((64, 64), 1)]
)
def test_serving_preset_gives_torchvisions_pixels(interpolation, size, crop_pct):
    # Serving preprocesses with Pillow (no PyTorch in a serving install), training's validation with torchvision: the
    # two must agree up to rounding, or the figures measured in training would not be those served.
    from dermsight.inference.preprocess import eval_input, synthetic_images

    h, w = size
    img = synthetic_images(1, size=(w, h), seed=h)[0]
    meta = ModelMeta.new(
        "tf_efficientnet_lite0",
        "ham7",
        create_model("tf_efficientnet_lite0", 7, weights="none")[1],
        input_size=56,
        crop_pct=crop_pct,
    )
    meta = meta.__class__(**{**meta.__dict__, "interpolation": interpolation, "mean": MEAN, "std": STD})
    ours = eval_input(img, meta)
    theirs = EvalPreset.from_meta(meta)(img).numpy()
    assert ours.shape == theirs.shape == (3, 56, 56) and ours.dtype == np.float32
    # at most 2 of 255 levels on any pixel (one rounding step each way), and nearly all pixels equal
    assert np.abs(ours - theirs).max() <= 2.01 / 255 / min(STD)
    assert np.mean(np.abs(ours - theirs) > 1e-5) < 0.02


def _roughness(x: torch.Tensor) -> float:
    """Mean absolute difference between horizontal neighbours: what JPEG's blocks smooth away in noise."""
    return float((x[..., 1:] - x[..., :-1]).abs().mean())


def test_train_preset_jpeg_step_compresses_that_share_of_images_first():
    names = lambda p: [type(t).__name__ for t in p.transform.transforms]  # noqa: E731
    assert "RandomApply" not in names(TrainPreset(input_size=16, mean=MEAN, std=STD))
    noise = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    plain = dict(input_size=80, mean=MEAN, std=STD, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), brightness=0, contrast=0)
    plain |= dict(saturation=0, hue=0)
    torch.manual_seed(0)
    raw = [_roughness(TrainPreset(**plain)(noise)) for _ in range(8)]
    always = TrainPreset(**plain, jpeg=1.0, jpeg_quality=(5, 5))
    assert names(always)[0] == "RandomApply"  # before the crop: compression happens at the image's own size
    torch.manual_seed(0)
    squeezed = [_roughness(always(noise)) for _ in range(8)]
    assert max(squeezed) < 0.6 * min(raw)
    half = TrainPreset(**plain, jpeg=0.5, jpeg_quality=(5, 5))
    torch.manual_seed(0)
    shares = np.mean([_roughness(half(noise)) < 0.8 * min(raw) for _ in range(200)])
    assert 0.4 < shares < 0.6
    with pytest.raises(ValueError, match="jpeg"):
        TrainPreset(input_size=16, mean=MEAN, std=STD, jpeg=0.5, jpeg_quality=(90, 10))
