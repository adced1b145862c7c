"""The saved model carries its contract: one ``.safetensors`` file with the weights and, in its header, the JSON of a
`ModelMeta` (classes, preprocessing, provenance, metrics).

Training, evaluation, export and serving read everything from that one file; `load_model` needs nothing else.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from dermsight.files import written_atomically
from dermsight.models.contract import (  # noqa: F401 (re-exported: the training side imports them from here)
    DEFAULT_MODEL,
    DIGEST_KEY,
    EXTRA_PREFIX,
    META_KEY,
    ModelLoadError,
    default_model_path,
    read_meta,
)
from dermsight.models.ensemble import Ensemble, input_map
from dermsight.models.factory import create_model
from dermsight.models.meta import BACKBONE_FIELDS, RECIPE_FIELDS, ModelMeta


def read_runs(
    model_paths: list[str | os.PathLike], what: str, same_architecture: bool = True
) -> tuple[list[Path], list[str], list[ModelMeta]]:
    """Paths, short names and contracts of the runs to be combined into ``what`` ("a soup", "an ensemble"): at least
    two single models (not ensembles) of one recipe (`RECIPE_FIELDS`), else a `ValueError` or `ModelLoadError` that
    says which file is the problem. ``same_architecture`` False (ensembles) lets the backbone and its input
    normalisation differ; classes, input size, crop and interpolation must still agree."""
    paths = [Path(p) for p in model_paths]
    if len(paths) < 2:
        raise ValueError(f"{what} needs at least two models")
    # Runs' files share a name (model.safetensors); their folders tell them apart. A file given with no folder (in the
    # current one) is named alone, not "/name".
    names = [f"{p.parent.name}/{p.name}" if p.parent.name else p.name for p in paths]
    if len(set(names)) < len(names):  # a/seed0/model.safetensors and b/seed0/model.safetensors: the paths as given
        names = [str(p) for p in paths]
    seen: dict[Path, Path] = {}
    for p in paths:
        key = p.resolve()
        if key in seen:
            raise ValueError(f"{p} is given twice (as {seen[key]}); {what} needs distinct runs")
        seen[key] = p
    metas = [read_meta(p) for p in paths]
    # A run's best.safetensors holds its model.safetensors' weights (without the final metrics): a glob over run
    # folders gave "an ensemble of 4" of two networks, each counted twice.
    twins: dict[str, Path] = {}
    for p in paths:
        digest = weights_digest(p)
        if digest in twins:
            raise ValueError(f"{p} holds the same weights as {twins[digest]}; {what} needs distinct runs")
        twins[digest] = p
    for p, m in zip(paths, metas, strict=True):
        if m.members > 1:
            raise ValueError(f"{p} is an ensemble; {what} is made of single models: pass the runs' own model files")
        fields_ = RECIPE_FIELDS if same_architecture else [k for k in RECIPE_FIELDS if k not in BACKBONE_FIELDS]
        diff = [k for k in fields_ if getattr(m, k) != getattr(metas[0], k)]
        if diff:
            raise ValueError(f"{p} differs from {paths[0]} in {', '.join(diff)}; {what} needs runs of one recipe")
    return paths, names, metas


def content_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes and bytes), in name order."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weights_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a model file's network tensors (names and bytes), whatever its metadata and extra tensors say (the
    not-a-lesion gate's, which calibration adds to model.safetensors and not to best.safetensors)."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        return content_digest({k: f.get_tensor(k) for k in f.keys() if not k.startswith(EXTRA_PREFIX)})  # noqa: SIM118


def save_model(
    path: str | os.PathLike,
    model: nn.Module,
    meta: ModelMeta,
    extra: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model`` and ``meta`` to one ``.safetensors`` file; returns the path.

    ``extra``: named tensors that belong to the model but are not weights (read back with `read_extra`).
    ``dtype``: store floating-point weights in this type (float16 halves the file; `load_model` casts back to
    float32, so everything fitted after saving, such as calibration, sees exactly the stored values).
    """
    path = Path(path)
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(classifier, nn.Linear) and classifier.out_features != meta.num_classes:
        raise ValueError(f"model has {classifier.out_features} outputs but meta lists {meta.num_classes} classes")
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        # safetensors refuses tensors that share storage (tied weights); each key gets its own copy, and loading
        # writes the same values into the tied parameter twice.
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(ptr)
        tensors[key] = t
    tensors |= _extra_tensors(extra or {})
    _write(path, tensors, meta)
    return path


def update_meta(
    path: str | os.PathLike,
    meta: ModelMeta,
    out: str | os.PathLike | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Rewrite a model file with new metadata, keeping the weights exactly as stored (dtype included: an ensemble's
    float16 stays float16). Use this, not `save_model`, for steps that only change the contract. ``extra``: replace
    the non-weight tensors (e.g. the OOD gate's statistics) with these; None keeps the ones in the file."""
    read_meta(path)  # a clear ModelLoadError for a missing or foreign file
    tensors = safetensors.torch.load_file(str(path))
    if extra is not None:
        tensors = {k: v for k, v in tensors.items() if not k.startswith(EXTRA_PREFIX)}
        tensors |= _extra_tensors(extra)
    target = Path(out) if out else Path(path)
    _write(target, tensors, meta)
    return target


def _extra_tensors(extra: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``extra`` under the keys and in the form the file stores them (own CPU copies, prefixed)."""
    return {EXTRA_PREFIX + k: v.detach().to("cpu").contiguous().clone() for k, v in extra.items()}


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: ModelMeta) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so an interrupted save never leaves a truncated model under the real name.
    with written_atomically(path) as tmp:
        header = {"format": "pt", META_KEY: meta.to_json(), DIGEST_KEY: content_digest(tensors)}
        safetensors.torch.save_file(tensors, tmp, metadata=header)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelMeta]:
    """Rebuild a saved model from its file alone; returned in eval mode on ``device``."""
    meta = read_meta(path)
    model = build_network(meta)
    try:
        state = safetensors.torch.load_file(str(path), device="cpu")
    except Exception as e:
        raise ModelLoadError(f"{path} is corrupt: cannot read its weights ({str(e)[:120]})") from None
    check_digest(path, state)
    state = {k: v for k, v in state.items() if not k.startswith(EXTRA_PREFIX)}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(
            f"{path} does not match its own metadata ({meta.architecture}, {meta.num_classes} classes): {str(e)[:300]}"
        ) from None
    return model.to(device).eval(), meta


def check_digest(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Raise `ModelLoadError` when ``tensors`` (all of the file's) differ from the digest its header records (files
    written before the digest existed record none and are not checked)."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        recorded = (f.metadata() or {}).get(DIGEST_KEY)
    if recorded and content_digest(tensors) != recorded:
        raise ModelLoadError(
            f"{path} is damaged: its tensors do not match the checksum written with them (changed or corrupted after "
            "it was saved); restore the file or train it again"
        )


def build_network(meta: ModelMeta) -> nn.Module:
    """The untrained network ``meta`` describes: one model from the factory, or an `Ensemble` of ``members``."""
    same = {"architecture": meta.architecture, "mean": meta.mean, "std": meta.std}
    specs = meta.member_specs or [same] * meta.members
    nets = [create_model(s["architecture"], meta.num_classes, weights="none")[0] for s in specs]
    if meta.members == 1:
        return nets[0]
    return Ensemble(nets, [input_map((meta.mean, meta.std), (s["mean"], s["std"])) for s in specs])


def read_extra(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The non-weight tensors saved with a model (`save_model`'s ``extra``), without reading its weights."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return {k[len(EXTRA_PREFIX) :]: f.get_tensor(k) for k in f.keys() if k.startswith(EXTRA_PREFIX)}  # noqa: SIM118
    except Exception as e:
        raise ModelLoadError(f"{path} is corrupt: cannot read its tensors ({str(e)[:120]})") from None
