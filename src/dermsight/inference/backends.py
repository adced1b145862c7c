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


class ServingModule(nn.Module):
    """logits and pooled features in one pass, for any timm backbone (``forward_features`` + ``forward_head``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.model.forward_features(x)
        # Pooling twice (once inside each forward_head call) costs microseconds and keeps this generic: heads differ
        # in what sits between pooling and the classifier (dropout, timm's ConvMlp for VGG).
        return self.model.forward_head(fmap), self.model.forward_head(fmap, pre_logits=True)


class TorchRunner:
    name = "torch"

    def __init__(self, model: nn.Module) -> None:
        self.net = ServingModule(model).eval()

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            logits, features = self.net(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        return logits.float().numpy(), features.float().numpy()


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
