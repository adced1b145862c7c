"""Train and eval presets: the one place where pixels become model inputs.

Images arrive as HxWx3 uint8 numpy arrays (the data cache, the image loader); `to_tensor` makes them 3xHxW uint8
tensors without copying. The geometric and colour steps run on uint8 (cheaper, and what torchvision's fast paths
expect); conversion to float and normalisation come last.

Both presets also accept a batch (B, 3, H, W). torchvision draws one set of random parameters per call, so a batch
shares its crop, flips and jitter: fine for eval, weaker augmentation for training, where the per-sample path (in the
data loader workers) is the main one.

`BatchTrainAugment` is the same training augmentation for a whole batch at once, with parameters drawn per image, so
it can run on the GPU next to the model (`TrainConfig.augment: device`): loader workers then only index a tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torchvision.ops import roi_align
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

# shades_of_gray lives with the serving preprocessing, which needs no PyTorch; training imports it from here too.
from dermsight.inference.preprocess import shades_of_gray  # noqa: F401

if TYPE_CHECKING:
    from dermsight.models.meta import ModelMeta


def to_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """HxWx3 uint8 array -> 3xHxW uint8 tensor (a view, no copy). Tensors are passed through unchanged."""
    if isinstance(image, torch.Tensor):
        return image
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"expected an HxWx3 uint8 image array, got shape {shape} of {dtype}")
    return torch.from_numpy(image).permute(2, 0, 1)


def _checked_gain(amount: float) -> float:
    """A channel-gain amount, or a ValueError: factors run from 1 - amount to 1 + amount and must stay positive."""
    if not 0 <= amount < 1:
        raise ValueError(f"channel gain (channel_gain) must be in [0, 1), got {amount}")
    return amount


class RandomChannelGain(nn.Module):
    """Scale each colour channel by its own factor, uniform in [1 - amount, 1 + amount]: a white-balance and exposure
    cast, as between dermatoscopes, cameras and clinics. ColorJitter's brightness moves all channels together and its
    hue turns the colour wheel, neither of which is what a different light or sensor does to a picture."""

    def __init__(self, amount: float) -> None:
        super().__init__()
        self.amount = _checked_gain(amount)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        gain = 1 + (torch.rand(3, 1, 1) * 2 - 1) * self.amount
        if image.dtype == torch.uint8:
            return (image.float() * gain).round_().clamp_(0, 255).to(torch.uint8)
        return (image * gain).clamp(0, 1)

    def extra_repr(self) -> str:
        return f"amount={self.amount}"


class RandomRot90(nn.Module):
    """Rotate by 0, 90, 180 or 270 degrees at random. Dermoscopy has no "up", so all four are equally valid."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(4, ()).item())
        return torch.rot90(image, k, dims=(-2, -1))


def _normalise_steps(mean: Sequence[float], std: Sequence[float]) -> list[nn.Module]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


class TrainPreset:
    """Training augmentation: random resized crop, flips both ways, 90-degree rotations, modest colour jitter; with
    ``jpeg`` > 0, that share of images first saved again as JPEG at a quality drawn from ``jpeg_quality``."""

    def __init__(
        self,
        *,
        input_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        scale: tuple[float, float] = (0.35, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: str = "bilinear",
        hflip: float = 0.5,
        vflip: float = 0.5,
        rot90: bool = True,
        brightness: float = 0.2,
        contrast: float = 0.2,
        saturation: float = 0.2,
        hue: float = 0.02,
        channel_gain: float = 0.0,
        jpeg: float = 0.0,
        jpeg_quality: tuple[int, int] = (30, 95),
    ) -> None:
        if not 0 <= jpeg <= 1 or not 1 <= jpeg_quality[0] <= jpeg_quality[1] <= 100:
            raise ValueError(f"jpeg must be in [0, 1] and jpeg_quality a range in [1, 100], got {jpeg}, {jpeg_quality}")
        steps: list[nn.Module] = []
        if jpeg > 0:
            # First, at the image's own size: that is where a source's compression happened.
            steps.append(v2.RandomApply([v2.JPEG(list(jpeg_quality))], p=jpeg))
        steps += [
            v2.RandomResizedCrop(
                input_size, scale=scale, ratio=ratio, interpolation=InterpolationMode(interpolation), antialias=True
            )
        ]
        if hflip > 0:
            steps.append(v2.RandomHorizontalFlip(hflip))
        if vflip > 0:
            steps.append(v2.RandomVerticalFlip(vflip))
        if rot90:
            steps.append(RandomRot90())
        if channel_gain:
            steps.append(RandomChannelGain(channel_gain))
        # Kept modest: colour carries diagnostic signal (blue-white veil, red vascular structures), and strong hue
        # shifts would teach the model to ignore it.
        if brightness or contrast or saturation or hue:
            steps.append(v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue))
        steps += _normalise_steps(mean, std)
        self.transform = v2.Compose(steps)

    @classmethod
    def from_meta(cls, meta: ModelMeta, **overrides: Any) -> TrainPreset:
        kwargs: dict[str, Any] = dict(
            input_size=meta.input_size, mean=meta.mean, std=meta.std, interpolation=meta.interpolation
        )
        return cls(**(kwargs | overrides))

    def __call__(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.transform(to_tensor(image))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform})"


class EvalPreset:
    """Deterministic eval preprocessing: resize the shorter side to round(input_size / crop_pct), centre-crop
    input_size, normalise. See `ModelMeta` for why crop_pct defaults to 1.0."""

    def __init__(
        self,
        *,
        input_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        crop_pct: float = 1.0,
        interpolation: str = "bicubic",
    ) -> None:
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.resize_size = round(input_size / crop_pct)
        self.transform = v2.Compose(
            [
                v2.Resize(self.resize_size, interpolation=InterpolationMode(interpolation), antialias=True),
                v2.CenterCrop(input_size),
                *_normalise_steps(mean, std),
            ]
        )

    @classmethod
    def from_meta(cls, meta: ModelMeta) -> EvalPreset:
        return cls(
            input_size=meta.input_size,
            mean=meta.mean,
            std=meta.std,
            crop_pct=meta.crop_pct,
            interpolation=meta.interpolation,
        )

    def __call__(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.transform(to_tensor(image))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform})"


class BatchTrainAugment:
    """`TrainPreset`'s augmentation for a batch, every image with its own random parameters, on the batch's device.

    torchvision.transforms.v2 draws one parameter set per call (a batch would share its crop), and kornia would be a
    further dependency that, like v2, needs equally sized images; this stays inside torch and torchvision:

    - random resized crop: torchvision's parameter rule (scale, log-uniform aspect ratio, 10 tries, then a centre
      crop), vectorised, and cut and resized by `torchvision.ops.roi_align`, which averages the source pixels of each
      output pixel (``sampling_ratio=-1``), so shrinking is antialiased as in `v2.RandomResizedCrop(antialias=True)`;
      enlarging is bilinear, where `TrainPreset` uses the model's interpolation (bicubic for EfficientNet-Lite), and
      at a crop's border it blends in the pixel just outside the crop where torchvision repeats the crop's edge;
      shrinking is a box average rather than torchvision's triangle filter: close, not identical;
    - flips both ways and 90-degree rotations, chosen per image;
    - per-channel gain (`RandomChannelGain`), when asked for;
    - colour jitter (brightness, contrast, saturation in torchvision's definitions; hue as a rotation of the
      chroma plane in YIQ space, a linear stand-in for HSV's hue shift that agrees with it for the small shifts
      used here), in that fixed order rather than v2's random order per call.

    Images come as one uint8 batch ``(B, 3, H, W)`` padded to a common size, with ``sizes`` ``(B, 2)`` giving each
    image's own height and width: crops stay inside the image. Bilinear sampling at a crop's far edge reaches up to
    one pixel past it, so the padding must repeat each image's last row and column (as
    `training.data.DeviceBatches` does), which is what torchvision's resize does at an image's border. Random parameters
    are drawn from torch's global CPU generator (a few numbers per image), so a seed fixes them on every device and a
    resumed run's restored RNG state carries on where it left off.
    """

    _YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])

    def __init__(
        self,
        *,
        input_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        scale: tuple[float, float] = (0.35, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        vflip: float = 0.5,
        rot90: bool = True,
        brightness: float = 0.2,
        contrast: float = 0.2,
        saturation: float = 0.2,
        hue: float = 0.02,
        channel_gain: float = 0.0,
    ) -> None:
        if not 0 < scale[0] <= scale[1] or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"scale and ratio must be increasing positive ranges, got {scale}, {ratio}")
        self.input_size, self.scale, self.ratio = input_size, scale, ratio
        self.hflip, self.vflip, self.rot90 = hflip, vflip, rot90
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.channel_gain = _checked_gain(channel_gain)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self._consts: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _on(self, dev: torch.device) -> tuple[torch.Tensor, ...]:
        """Constants on ``dev``, copied there once (a copy or an inverse per batch would make the CPU wait for the
        GPU every step)."""
        if dev not in self._consts:
            gray = torch.tensor([0.2989, 0.587, 0.114]).view(1, 3, 1, 1)
            consts = (self._YIQ, torch.linalg.inv(self._YIQ), gray, self.mean, self.std)
            self._consts[dev] = tuple(c.to(dev) for c in consts)
        return self._consts[dev]

    @classmethod
    def from_meta(cls, meta: ModelMeta, **overrides: Any) -> BatchTrainAugment:
        kwargs: dict[str, Any] = dict(input_size=meta.input_size, mean=meta.mean, std=meta.std)
        return cls(**(kwargs | overrides))

    def crop_boxes(self, sizes: torch.Tensor, tries: int = 10) -> torch.Tensor:
        """(B, 2) heights and widths -> (B, 4) crop boxes x1, y1, x2, y2 in pixels (CPU, float32)."""
        h, w = sizes[:, 0:1].float(), sizes[:, 1:2].float()
        n = len(sizes)
        area = h * w
        target = area * torch.empty(n, tries).uniform_(*self.scale)
        log_r = torch.empty(n, tries).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]))
        aspect = torch.exp(log_r)
        cw = torch.sqrt(target * aspect).round()
        ch = torch.sqrt(target / aspect).round()
        ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
        pick = first.clamp(min=0).unsqueeze(1)
        cw, ch = cw.gather(1, pick), ch.gather(1, pick)
        y0 = (torch.rand(n, 1) * (h - ch + 1)).floor()
        x0 = (torch.rand(n, 1) * (w - cw + 1)).floor()
        # No try fitted: torchvision's fallback, the largest centre crop with the ratio clamped into range.
        in_ratio = w / h
        fw = torch.where(
            in_ratio < self.ratio[0], w, torch.where(in_ratio > self.ratio[1], (h * self.ratio[1]).round(), w)
        )
        fh = torch.where(in_ratio < self.ratio[0], (w / self.ratio[0]).round(), h)
        fall = (first < 0).unsqueeze(1)
        cw, ch = torch.where(fall, fw, cw), torch.where(fall, fh, ch)
        y0 = torch.where(fall, ((h - ch) / 2).floor(), y0)
        x0 = torch.where(fall, ((w - cw) / 2).floor(), x0)
        return torch.cat([x0, y0, x0 + cw, y0 + ch], 1)

    def __call__(self, images: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) on any device + (B, 2) sizes -> normalised float32 (B, 3, S, S) on that device."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) uint8 batch, got {tuple(images.shape)} of {images.dtype}")
        dev, n, s = images.device, len(images), self.input_size
        boxes = torch.cat([torch.arange(n, dtype=torch.float32).unsqueeze(1), self.crop_boxes(sizes.cpu())], 1)
        # Draw everything on the CPU first (see the class docstring), then one small copy to the device.
        draws = torch.rand(n, 8)
        # Drawn only when used, so that runs without it keep the random stream they always had.
        gains = torch.rand(n, 3) if self.channel_gain else torch.empty(n, 0)
        params = torch.cat([boxes, draws, gains], 1).to(dev, non_blocking=True)
        boxes, draws, gains = params[:, :5], params[:, 5:13], params[:, 13:]
        x = roi_align(images.float(), boxes, output_size=s, spatial_scale=1.0, sampling_ratio=-1, aligned=True) / 255
        x = x.clamp_(0, 1)

        def where(flag: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.where(flag.view(-1, 1, 1, 1), a, b)

        x = where(draws[:, 0] < self.hflip, x.flip(-1), x)
        x = where(draws[:, 1] < self.vflip, x.flip(-2), x)
        if self.rot90:  # k = 0..3 quarter turns: an odd k turns once, k >= 2 adds a half turn
            k = (draws[:, 2] * 4).floor()
            x = where(k % 2 == 1, x.rot90(1, (-2, -1)), x)
            x = where(k >= 2, x.flip(-1).flip(-2), x)

        def factor(u: torch.Tensor, amount: float) -> torch.Tensor:  # uniform in [max(0, 1 - amount), 1 + amount]
            low = max(0.0, 1 - amount)
            return (low + (1 + amount - low) * u).view(-1, 1, 1, 1)

        yiq, yiq_inv, gray_w, mean, std = self._on(dev)
        if self.channel_gain:  # as `RandomChannelGain`, before the jitter as in `TrainPreset`
            x = (x * (1 + (gains * 2 - 1) * self.channel_gain).view(n, 3, 1, 1)).clamp_(0, 1)
        if self.brightness:
            x = (x * factor(draws[:, 3], self.brightness)).clamp_(0, 1)
        if self.contrast:
            m = (x * gray_w).sum(1, keepdim=True).mean((2, 3), keepdim=True)
            c = factor(draws[:, 4], self.contrast)
            x = (c * x + (1 - c) * m).clamp_(0, 1)
        if self.saturation:
            g = (x * gray_w).sum(1, keepdim=True)
            c = factor(draws[:, 5], self.saturation)
            x = (c * x + (1 - c) * g).clamp_(0, 1)
        if self.hue:
            theta = (draws[:, 6] * 2 - 1) * self.hue * 2 * math.pi
            cos, sin = torch.cos(theta), torch.sin(theta)
            rot = torch.zeros(n, 3, 3, device=dev)
            rot[:, 0, 0] = 1
            rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
            mat = yiq_inv @ rot @ yiq  # (B, 3, 3): RGB -> YIQ, turn the chroma plane, back
            x = torch.einsum("bij,bjhw->bihw", mat, x).clamp_(0, 1)
        return (x - mean) / std

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.input_size}, scale={self.scale}, ratio={self.ratio}, "
            f"hflip={self.hflip}, vflip={self.vflip}, rot90={self.rot90}, brightness={self.brightness}, "
            f"contrast={self.contrast}, saturation={self.saturation}, hue={self.hue}, "
            f"channel_gain={self.channel_gain})"
        )
