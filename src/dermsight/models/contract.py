"""Reading a saved model's contract without PyTorch: what a serving install needs from a model file.

A dermsight model is one ``.safetensors`` file: the weights, the non-weight tensors that belong to the model (the
not-a-lesion gate's statistics, under `EXTRA_PREFIX`) and, in its header, the JSON of a `ModelMeta` (under
`META_KEY`) and a checksum of every tensor (`DIGEST_KEY`). Writing and loading the network need PyTorch
(`models.bundle`); reading the contract, the extra tensors and the weights' digest do not, so a server installed
without PyTorch reads them here (safetensors' numpy reader) and runs the network from its ONNX export
(`inference.runtime`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import safetensors

from dermsight.models.meta import ModelMeta

# Key under which a dermsight model stores its contract in the safetensors header.
META_KEY = "dermsight"
# Tensors of a dermsight model file that are not weights (e.g. the out-of-distribution statistics of
# dermsight.inference.ood) are stored under this key prefix; loading weights skips them.
EXTRA_PREFIX = "dermsight_extra."
# Header field holding `content_digest` of every tensor in the file, checked by `load_model`: weights overwritten
# in place (NaN, zeros, a truncated copy patched up) would otherwise load and serve nonsense with a clean start.
DIGEST_KEY = "dermsight.sha256"


class ModelLoadError(Exception):
    """A model file cannot be loaded; the message is fit to show a user."""


def read_header(path: str | os.PathLike) -> dict[str, str]:
    """The string fields of a model file's safetensors header; raises `ModelLoadError` for a missing or foreign file."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"{path} is not a file")
    if path.suffix.lower() == ".onnx":
        # An exported graph serves (`predict`, `serve`), but fitting and exporting rewrite the weights it came from.
        raise ModelLoadError(
            f"{path} is an ONNX export, which predict and serve can use; this command needs the model file it was "
            "exported from (.safetensors)"
        )
    try:
        with safetensors.safe_open(str(path), framework="numpy") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types and OSError for bad files
        raise ModelLoadError(
            f"{path} is not a dermsight model: not a readable safetensors file ({str(e)[:120]})"
        ) from None


def parse_meta(raw: str | None, path: str | os.PathLike) -> ModelMeta:
    """The `ModelMeta` of a header's (or an ONNX file's) contract field; `ModelLoadError` when it is missing or bad."""
    if raw is None:
        raise ModelLoadError(
            f"{path} is a safetensors file but not a dermsight model (no '{META_KEY}' metadata); "
            "models are written by dermsight's save_model"
        )
    try:
        return ModelMeta.from_json(raw)
    except (ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{path} has corrupt or incompatible dermsight metadata: {e}") from None


def read_meta(path: str | os.PathLike) -> ModelMeta:
    """The contract of a saved model, without reading its weights."""
    return parse_meta(read_header(path).get(META_KEY), path)


def read_extra_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The non-weight tensors saved with a model (`bundle.save_model`'s ``extra``) as numpy arrays, without reading
    its weights."""
    try:
        with safetensors.safe_open(str(path), framework="numpy") as f:
            return {k[len(EXTRA_PREFIX) :]: f.get_tensor(k) for k in f.keys() if k.startswith(EXTRA_PREFIX)}  # noqa: SIM118
    except Exception as e:
        raise ModelLoadError(f"{path} is corrupt: cannot read its tensors ({str(e)[:120]})") from None


# The bundled default model ships inside the package so `pip install` users get it too (see MODEL_CARD.md), with its
# ONNX export beside it for installs without PyTorch (`inference.runtime`).
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "assets" / "default.safetensors"


def default_model_path() -> Path:
    """The model used when none is named: $DERMSIGHT_MODEL if set, else the bundled default."""
    env = os.environ.get("DERMSIGHT_MODEL")
    path = Path(env) if env else DEFAULT_MODEL
    if not path.is_file():
        raise ModelLoadError(
            f"no model at {path}: "
            + (
                "check $DERMSIGHT_MODEL"
                if env
                else "the bundled default model is missing; reinstall dermsight or pass --model PATH"
            )
        )
    return path
