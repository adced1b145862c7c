"""Train and eval presets: the one place where pixels become model inputs.

Images arrive as HxWx3 uint8 numpy arrays (the data cache, the image loader); `to_tensor` makes them 3xHxW uint8
tensors without copying. The geometric and colour steps run on uint8 (cheaper, and what torchvision's fast paths
expect); conversion to float and normalisation come last.

Both presets also accept a batch (B, 3, H, W). torchvision draws one set of random parameters per call, so a batch
shares its crop, flips and jitter: fine for eval, weaker augmentation for training, where the per-sample path (in the
data loader workers) is the main one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

if TYPE_CHECKING:
    from dermsight.models.bundle import ModelMeta


def to_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """HxWx3 uint8 array -> 3xHxW uint8 tensor (a view, no copy). Tensors are passed through unchanged."""
    if isinstance(image, torch.Tensor):
        return image
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"expected an HxWx3 uint8 image array, got shape {shape} of {dtype}")
    return torch.from_numpy(image).permute(2, 0, 1)


class RandomRot90(nn.Module):
    """Rotate by 0, 90, 180 or 270 degrees at random. Dermoscopy has no "up", so all four are equally valid."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(4, ()).item())
        return torch.rot90(image, k, dims=(-2, -1))


def _normalise_steps(mean: Sequence[float], std: Sequence[float]) -> list[nn.Module]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


class TrainPreset:
    """Training augmentation: random resized crop, flips both ways, 90-degree rotations, modest colour jitter."""

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
    ) -> None:
        steps: list[nn.Module] = [
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
