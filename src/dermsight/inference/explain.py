"""Grad-CAM explanations (Selvaraju et al., 2017) with the `grad-cam` package, for any backbone the factory makes.

The target layer is chosen generically: every timm model splits into ``forward_features`` (the last spatial feature
map, before global pooling) and ``forward_head``. We run the two halves with an identity module between them and
hook that: it is exactly the last convolutional feature map of any architecture (EfficientNet's 1x1 head conv,
ResNet's layer4, VGG's last block, Inception's Mixed_7c), with no per-architecture table of layer names to keep up
to date. (timm's ``feature_info[-1]`` names the last *stage*, which for EfficientNet and MobileNet sits before the
final 1x1 conv the classifier actually reads.)
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn


class _Split(nn.Module):
    """``model`` as features -> identity -> head; the identity is the Grad-CAM target layer."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.features = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.features(self.model.forward_features(x)))


def gradcam(model: nn.Module, x: torch.Tensor, target: int | None = None) -> tuple[np.ndarray, int]:
    """Grad-CAM map of ``target`` (default: the top class) for one preprocessed input ``x`` (1, 3, S, S).

    Returns the map (S, S) scaled to 0..1 and the class index it explains.
    """
    net = _Split(model).eval()
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


def overlay(image: np.ndarray, heat: np.ndarray, weight: float = 0.45) -> np.ndarray:
    """The heatmap in the JET colour map laid over ``image`` (HxWx3 uint8), resized to the image, each pixel's colour
    as opaque as its heat (up to ``weight``), with the region above `OUTLINE_AT` outlined in white.

    A uniform blend (grad-cam's ``show_cam_on_image``) tinted the whole photo blue and hid the lesion's structure
    under the hot spot, which is what a dermatologist wants to see; here cool areas keep the photo as it is."""
    h, w = image.shape[:2]
    heat_img = Image.fromarray(np.clip(heat * 255, 0, 255).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
    heat_u8 = np.asarray(heat_img)
    colour = cv2.cvtColor(cv2.applyColorMap(heat_u8, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB).astype(np.float32)
    alpha = weight * heat_u8.astype(np.float32)[..., None] / 255.0
    out = np.clip(image.astype(np.float32) * (1 - alpha) + colour * alpha + 0.5, 0, 255).astype(np.uint8)
    hot = (heat_u8 >= round(OUTLINE_AT * 255)).astype(np.uint8)
    contours, _ = cv2.findContours(hot, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (255, 255, 255), max(1, round(min(h, w) / 160)), lineType=cv2.LINE_AA)
    return out


def gradcam_png(model: nn.Module, x: torch.Tensor, display: np.ndarray, target: int | None = None) -> bytes:
    """PNG bytes: ``display`` (the model's view of the image, HxWx3 uint8) and, to its right, the same picture with
    the Grad-CAM heatmap of ``target`` (default: the top class) over it, with a thin white gap between."""
    heat, _ = gradcam(model, x, target)
    over = overlay(display, heat)
    h, w = display.shape[:2]
    gap = np.full((h, max(4, w // 64), 3), 255, np.uint8)
    canvas = np.concatenate([display, gap, over], axis=1)
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG", optimize=False)
    return buf.getvalue()
