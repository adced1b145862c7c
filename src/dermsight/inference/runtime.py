"""Running the exported network with ONNX Runtime, and the ONNX file as a model of its own: no PyTorch needed.

The graph (`backends.ServingModule`, exported by `inference.export`) takes the normalised image batch ``image``
(N, 3, S, S) and returns ``logits`` (N, C, raw: no temperature), ``features`` (N, D, what the not-a-lesion gate
scores) and ``cam`` (N, C, h, w, each class's activation map on the last feature map, for the heatmap).

Every export also carries the model's contract in the ONNX file's metadata (`SERVING_KEYS`): the `ModelMeta` JSON
of the model file it was exported from, that file's non-weight tensors (the gate's statistics) and the checksum its
header records. An ONNX file is therefore a complete serving model: `read_contract` gives what `Predictor` needs
without the ``.safetensors`` file or PyTorch, and the package ships the default model's export beside it
(`models.contract.DEFAULT_MODEL`).
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dermsight.models.contract import DIGEST_KEY, META_KEY, ModelLoadError, parse_meta
from dermsight.models.meta import ModelMeta

INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "features", "cam")

# ONNX metadata keys: the contract (META_KEY, as in a safetensors header), the non-weight tensors (an .npz file,
# base64), the source file's tensor checksum (DIGEST_KEY, as in its header), whether ``cam`` is a class activation map
# (a head that is pooling then linear) and the export's version.
EXTRA_KEY = "dermsight.extra"
CAM_KEY = "dermsight.cam"
VERSION_KEY = "dermsight.export_version"
SERVING_KEYS = (META_KEY, EXTRA_KEY, DIGEST_KEY, CAM_KEY, VERSION_KEY)


def pack_arrays(arrays: dict[str, np.ndarray]) -> str:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def unpack_arrays(text: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(base64.b64decode(text.encode("ascii"))), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def session(path: str | os.PathLike, threads: int, spinning: bool = False):
    """An ONNX Runtime session on the CPU with ``threads`` intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No memory arena: activations are freed after each run and a server worker gives them back to the system
    # (`web.service.release_memory`). With the bundled model, 2 gunicorn workers after predictions and heatmaps held
    # 149-176 MB each (PSS) without it and 236 MB with it; batch-1 latency was the same within 2% (measured).
    opts.enable_cpu_mem_arena = False
    # Idle worker threads busy-wait for the next op by default. That shaves a little latency off one process but
    # burns the cores that other server workers (or a training job on a shared box) need.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxRunner:
    name = "onnx"

    def __init__(self, onnx_path: str | os.PathLike, threads: int, spinning: bool = False) -> None:
        self.path = Path(onnx_path)
        self.session = session(self.path, threads, spinning)
        self.outputs = [o.name for o in self.session.get_outputs()]

    @property
    def has_cam(self) -> bool:
        return "cam" in self.outputs

    # Inputs per session run. On a CPU, small passes are faster per image than large ones: a pass's activations stay
    # in the core's cache (EfficientNet-Lite0 at 192 px on a 2-core Xeon, one thread: 8.7 ms an input in passes of
    # 1, 9.0 in passes of 2, 12.9 of 4, 15.1 of 64; two threads: 7.7, 6.4, 8.3, 9.5 ms). So the eight views of a
    # photo, and evaluation's batches, run as passes of two.
    pass_size = 2

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(x, np.float32)
        passes = [
            self.session.run(["logits", "features"], {INPUT_NAME: x[i : i + self.pass_size]})
            for i in range(0, max(len(x), 1), self.pass_size)  # an empty batch runs once, as before
        ]
        logits, features = (np.concatenate(parts) for parts in zip(*passes, strict=True))
        return logits, features

    def contract(self) -> Contract:
        """The contract the graph carries (`read_contract`)."""
        return contract_of(self.session, self.path)

    def cam(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, C) logits and (N, C, h, w) class activation maps of the inputs ``x``."""
        logits, cam = self.session.run(["logits", "cam"], {INPUT_NAME: np.ascontiguousarray(x, np.float32)})
        return logits, cam


@dataclass(frozen=True)
class Contract:
    """What an exported graph's metadata says of the model it was exported from."""

    meta: ModelMeta
    extra: dict[str, np.ndarray]
    digest: str  # the source file's tensor checksum ("" when it recorded none)
    cam: bool  # the ``cam`` output is the class activation map (see `inference.explain`)
    version: int


def read_contract(path: str | os.PathLike) -> Contract:
    """The contract an ONNX export carries; `ModelLoadError` for a file that is not one (or an export without it)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    try:
        sess = session(path, 1)
    except Exception as e:  # onnxruntime raises its own error types for files that are not ONNX
        raise ModelLoadError(f"{path} is not a readable ONNX model ({str(e)[:160]})") from None
    return contract_of(sess, path)


def contract_of(sess, path: str | os.PathLike) -> Contract:
    """`read_contract` from an open session of the file at ``path``."""
    props = sess.get_modelmeta().custom_metadata_map
    if META_KEY not in props:
        raise ModelLoadError(
            f"{path} is an ONNX model without a dermsight contract; export one with `dermsight export` (or serve the "
            ".safetensors model it came from with PyTorch installed)"
        )
    try:
        extra = unpack_arrays(props[EXTRA_KEY]) if props.get(EXTRA_KEY) else {}
        version = int(props.get(VERSION_KEY) or 0)
    except (ValueError, OSError) as e:
        raise ModelLoadError(f"{path} has a corrupt dermsight contract: {str(e)[:160]}") from None
    return Contract(
        meta=parse_meta(props[META_KEY], path),
        extra=extra,
        digest=props.get(DIGEST_KEY, ""),
        cam=props.get(CAM_KEY) == "1",
        version=version,
    )


def read_model_meta(path: str | os.PathLike) -> ModelMeta:
    """The contract of a model file: a ``.safetensors`` model's header, or what an ``.onnx`` export carries."""
    from dermsight.models.contract import read_meta

    return read_contract(path).meta if Path(path).suffix.lower() == ".onnx" else read_meta(path)
