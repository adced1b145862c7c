"""Heatmaps of what the model looked at: class activation maps from the served graph, or Grad-CAM (Selvaraju et al.,
2017) with the `grad-cam` package on the PyTorch network, for any backbone the factory makes.

For a head that is global average pooling then a linear layer (every backbone of the default model; an ensemble's
averaged heads too), Grad-CAM's channel weights are the head's weights divided by the map's area, so its map is the
class activation map (Zhou et al., 2016) up to a positive factor, which its 0..1 scaling removes. The exported graph
computes that map for every class (`backends.ServingModule`'s ``cam`` output) and `cam_heat` scales it exactly as the
grad-cam package does: a server without PyTorch draws the same heatmap (`tests/pipeline/test_serving_install.py`
checks the equality against the package).

The target layer is chosen generically: every timm model splits into ``forward_features`` (the last spatial feature
map, before global pooling) and ``forward_head``. We run the two halves with an identity module between them and
hook that: it is exactly the last convolutional feature map of any architecture (EfficientNet's 1x1 head conv,
ResNet's layer4, VGG's last block, Inception's Mixed_7c), with no per-architecture table of layer names to keep up
to date. (timm's ``feature_info[-1]`` names the last *stage*, which for EfficientNet and MobileNet sits before the
final 1x1 conv the classifier actually reads.)
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFilter

if TYPE_CHECKING:
    import torch
    from torch import nn


def _scaled(a: np.ndarray) -> np.ndarray:
    """grad-cam's `scale_cam_image` for one map: shifted to a minimum of 0 and divided by its maximum."""
    a = a - np.min(a)
    return a / (1e-7 + np.max(a))


def resize_linear(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A 2-D float map resized to ``size`` (width, height) as OpenCV's ``cv2.resize`` does by default (bilinear,
    pixel centres aligned, edges repeated), which the grad-cam package uses; numpy, so that serving needs no OpenCV."""

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
        i0 = np.floor(x).astype(np.intp)
        return i0, np.minimum(i0 + 1, n_in - 1), (x - i0).astype(np.float32)

    a = np.asarray(a, np.float32)
    (y0, y1, fy), (x0, x1, fx) = axis(a.shape[0], size[1]), axis(a.shape[1], size[0])
    rows = a[y0] * (1 - fy)[:, None] + a[y1] * fy[:, None]
    return rows[:, x0] * (1 - fx) + rows[:, x1] * fx


def cam_heat(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One class's activation map (h, w) -> the heatmap (H, W) = ``size`` (width, height), 0..1, computed as the
    grad-cam package computes Grad-CAM from its raw map: negative parts cut, scaled, resized (bilinear), cut and
    scaled again."""
    heat = _scaled(np.maximum(np.asarray(cam, np.float32), 0))
    heat = resize_linear(heat, size)
    return np.nan_to_num(_scaled(np.maximum(heat, 0)).astype(np.float32))


def gradcam(model: nn.Module, x: torch.Tensor, target: int | None = None) -> tuple[np.ndarray, int]:
    """Grad-CAM map of ``target`` (default: the top class) for one preprocessed input ``x`` (1, 3, S, S).

    Returns the map (S, S) scaled to 0..1 and the class index it explains.
    """
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from torch import nn

    class Split(nn.Module):
        """``model`` as features -> identity -> head; the identity is the Grad-CAM target layer."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.features = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model.forward_head(self.features(self.model.forward_features(x)))

    net = Split().eval()
    if target is None:
        with torch.inference_mode():
            target = int(net(x).argmax(1).item())
    # grad-cam needs gradients, which inference mode (and no_grad, if a caller set it) would switch off.
    with torch.enable_grad(), GradCAM(model=net, target_layers=[net.features]) as cam:
        heat = cam(input_tensor=x.clone(), targets=[ClassifierOutputTarget(target)])[0]
    return np.nan_to_num(heat.astype(np.float32)), target


# Where the map is at least this share of its peak, a white outline is drawn: the region reads by its shape, not only
# by red against blue (which colour-blind readers may not tell apart).
OUTLINE_AT = 0.5


def jet(level: np.ndarray) -> np.ndarray:
    """The JET colour map (blue, cyan, yellow, red) of uint8 levels: HxW -> HxWx3 float32 RGB in 0..255."""
    x = level.astype(np.float32)[..., None] / 255.0
    centres = np.array([0.75, 0.5, 0.25], np.float32)  # where red, green and blue peak
    return np.clip(1.5 - np.abs(4 * (x - centres)), 0, 1) * 255.0


def overlay(image: np.ndarray, heat: np.ndarray, weight: float = 0.45) -> np.ndarray:
    """The heatmap in the JET colour map laid over ``image`` (HxWx3 uint8), resized to the image, each pixel's colour
    as opaque as its heat (up to ``weight``), with the region above `OUTLINE_AT` outlined in white.

    A uniform blend (grad-cam's ``show_cam_on_image``) tinted the whole photo blue and hid the lesion's structure
    under the hot spot, which is what a dermatologist wants to see; here cool areas keep the photo as it is."""
    h, w = image.shape[:2]
    heat_img = Image.fromarray(np.clip(heat * 255, 0, 255).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
    heat_u8 = np.asarray(heat_img)
    alpha = weight * heat_u8.astype(np.float32)[..., None] / 255.0
    out = np.clip(image.astype(np.float32) * (1 - alpha) + jet(heat_u8) * alpha + 0.5, 0, 255).astype(np.uint8)
    # The outline: the hot region's border pixels (the region less its erosion), thickened to about 1/160 of the
    # picture's shorter side.
    hot = Image.fromarray(((heat_u8 >= round(OUTLINE_AT * 255)) * 255).astype(np.uint8))
    edge = np.asarray(hot).astype(np.int16) - np.asarray(hot.filter(ImageFilter.MinFilter(3)))
    width = max(1, round(min(h, w) / 160))
    ring = Image.fromarray((edge > 0).astype(np.uint8) * 255)
    if width > 1:
        ring = ring.filter(ImageFilter.MaxFilter(2 * (width // 2) + 1))
    out[np.asarray(ring) > 0] = 255
    return out


def gradcam_png(model: nn.Module, x: torch.Tensor, display: np.ndarray, target: int | None = None) -> bytes:
    """`heatmap_png` with the Grad-CAM heatmap of ``target`` (default: the top class) from a PyTorch network."""
    return heatmap_png(display, gradcam(model, x, target)[0])


def heatmap_png(display: np.ndarray, heat: np.ndarray) -> bytes:
    """PNG bytes: ``display`` (the model's view of the image, HxWx3 uint8) and, to its right, the same picture with
    the heatmap ``heat`` (0..1, any size) over it, with a thin white gap between."""
    over = overlay(display, heat)
    h, w = display.shape[:2]
    gap = np.full((h, max(4, w // 64), 3), 255, np.uint8)
    canvas = np.concatenate([display, gap, over], axis=1)
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG", optimize=False)
    return buf.getvalue()
