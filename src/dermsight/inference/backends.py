"""The two ways to run a model's network: eager PyTorch and ONNX Runtime, behind one call signature.

Both take a normalised float32 batch (N, 3, S, S) and return ``(logits, features)``: (N, C) raw logits (no
temperature) and (N, D) pooled features for the out-of-distribution gate.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "features")


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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not hasattr(self.model, "forward_features"):
            # A plain module (a test double, say) has no features to give; its logits are all that can be scored.
            logits = self.model(x)
            return logits, logits.new_zeros((len(x), 0))
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
        return logits, torch.cat([self.model.forward_head(fmap, pre_logits=True).flatten(1), *stats], 1)


class TorchRunner:
    name = "torch"

    def __init__(self, model: nn.Module) -> None:
        # channels_last: oneDNN's fast convolution layout on CPUs (as training and bench/models.py use).
        self.net = ServingModule(model.to(memory_format=torch.channels_last)).eval()
        self.device = next(model.parameters()).device  # inputs go where the weights are (a GPU in training)

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        with torch.inference_mode():
            logits, features = self.net(t.contiguous(memory_format=torch.channels_last))
        return logits.float().cpu().numpy(), features.float().cpu().numpy()


class OnnxRunner:
    name = "onnx"

    def __init__(self, onnx_path: str | os.PathLike, threads: int, spinning: bool = False) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle worker threads busy-wait for the next op by default. That shaves a little latency off one process
        # but burns the cores that other server workers (or a training job on a shared box) need.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.path = Path(onnx_path)
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, features = self.session.run(None, {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})
        return logits, features
