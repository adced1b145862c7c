"""The two ways to run a model's network: eager PyTorch and ONNX Runtime, behind one call signature.

Both take a normalised float32 batch (N, 3, S, S) and return ``(logits, features)``: (N, C) raw logits (no
temperature) and (N, D) pooled features for the out-of-distribution gate. ONNX Runtime's runner needs no PyTorch and
lives in `inference.runtime`; this module holds the PyTorch side: the module that is exported and the eager runner.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dermsight.inference.runtime import INPUT_NAME, OUTPUT_NAMES, OnnxRunner  # noqa: F401 (re-exported)


def stage_names(model: nn.Module) -> list[str]:
    """The modules that end each stage of a timm backbone (``feature_info``), shallow to deep."""
    return [str(f["module"]) for f in getattr(model, "feature_info", [])]


def feature_layout(model: nn.Module, total: int) -> list[tuple[str, int, int]]:
    """(name, start, end) of each block of `ServingModule`'s ``features`` output of width ``total``: the pooled
    features first, then each stage's per-channel means and standard deviations."""
    stages = [(str(f["module"]), int(f["num_chs"])) for f in getattr(model, "feature_info", [])]
    pooled = total - 2 * sum(c for _, c in stages)
    out, start = [("pooled", 0, pooled)], pooled
    for name, c in stages:
        out.append((name, start, start + 2 * c))
        start += 2 * c
    return out


class ServingModule(nn.Module):
    """One pass giving the logits and the features the out-of-distribution gate scores, for any timm backbone.

    ``features`` = the pooled features the classifier reads, then, for the last module of each stage
    (``feature_info``), the mean and standard deviation of every channel over the image. The deep pooled features
    say what the network sees; the per-stage statistics say what the picture is made of (colour, texture, edges,
    compression), in which a photo of a cat, a page or a street differs from dermoscopy far more clearly than in
    the classifier's features, which were trained only to tell lesions apart (see dermsight.inference.ood).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.stages = stage_names(model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not hasattr(self.model, "forward_features"):
            # A plain module (a test double, say) has no features to give; its logits are all that can be scored.
            logits = self.model(x)
            return logits, logits.new_zeros((len(x), 0)), logits.new_zeros((*logits.shape, 1, 1))
        stats: list[torch.Tensor] = []

        def keep(_module: nn.Module, _inputs: object, out: torch.Tensor) -> None:
            # Summarised at once: a later in-place op (an activation, a residual add) may overwrite `out`.
            stats.extend([out.mean((2, 3)), out.var((2, 3), unbiased=False).add(1e-6).sqrt()])

        # Hooks are added for this call only, so the model stays clean for Grad-CAM and training; ONNX tracing
        # records what they compute like any other op.
        handles = [self.model.get_submodule(name).register_forward_hook(keep) for name in self.stages]
        try:
            fmap = self.model.forward_features(x)
        finally:
            for h in handles:
                h.remove()
        # Pooling twice (once inside each forward_head call) costs microseconds and keeps this generic: heads differ
        # in what sits between pooling and the classifier (dropout, timm's ConvMlp for VGG).
        logits = self.model.forward_head(fmap)
        features = torch.cat([self.model.forward_head(fmap, pre_logits=True).flatten(1), *stats], 1)
        return logits, features, class_activation_maps(self.model, fmap)


def class_activation_maps(model: nn.Module, fmap: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w): the head applied to each position's feature vector of the last feature map ``fmap`` (N, K, h, w),
    less the head's output for a zero vector (its bias). For a head that is average pooling then a linear layer this
    is the class activation map, whose mean over the positions is the logit less the bias (`head_is_linear`)."""
    n, k, h, w = fmap.shape
    cells = fmap.permute(0, 2, 3, 1).reshape(-1, k, 1, 1)
    out = model.forward_head(cells) - model.forward_head(fmap.new_zeros((1, k, 1, 1)))
    return out.reshape(n, h, w, -1).permute(0, 3, 1, 2)


def head_is_linear(model: nn.Module, tol: float = 1e-4) -> bool:
    """Whether the model's head is affine in its pooled input (pooling then linear layers, dropout off): then
    `class_activation_maps` is Grad-CAM's map up to a positive factor (see `inference.explain`)."""
    # The last feature map's channels: a timm model's num_features, an `Ensemble`'s members' together.
    width = sum(getattr(model, "widths", [])) or getattr(model, "num_features", 0)
    if not hasattr(model, "forward_head") or not width:
        return False
    g = torch.Generator().manual_seed(0)
    a, b = (torch.rand((2, int(width), 3, 3), generator=g) for _ in range(2))
    with torch.inference_mode():
        zero = model.forward_head(torch.zeros_like(a))
        lhs = model.forward_head(a + b) - zero
        rhs = (model.forward_head(a) - zero) + (model.forward_head(b) - zero)
    return bool(torch.allclose(lhs, rhs, atol=tol * float(rhs.abs().max()) + 1e-6))


class TorchRunner:
    name = "torch"

    def __init__(self, model: nn.Module) -> None:
        # channels_last: oneDNN's fast convolution layout on CPUs (as training and bench/models.py use).
        self.net = ServingModule(model.to(memory_format=torch.channels_last)).eval()
        self.device = next(model.parameters()).device  # inputs go where the weights are (a GPU in training)

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        with torch.inference_mode():
            logits, features, _ = self.net(t.contiguous(memory_format=torch.channels_last))
        return logits.float().cpu().numpy(), features.float().cpu().numpy()
