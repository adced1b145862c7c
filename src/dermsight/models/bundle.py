"""The saved model carries its contract: one ``.safetensors`` file with the weights and, in its header, the JSON of a
`ModelMeta` (classes, preprocessing, provenance, metrics).

Training, evaluation, export and serving read everything from that one file; `load_model` needs nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import nn

from dermsight import __version__
from dermsight.classes import CONDITIONS, TAXONOMIES
from dermsight.files import written_atomically
from dermsight.models.ensemble import Ensemble, input_map
from dermsight.models.factory import ARCHS, EXTRA_PREFIX, META_KEY, WeightsInfo, create_model

# The newest file format this dermsight reads. A file records the oldest format that can read it: 1 for a single
# network, 2 for an ensemble (`members` > 1), which a dermsight from before ensembles would misread, 3 for an
# ensemble of several backbones (`member_specs`), which one from before those would build wrongly.
FORMAT_VERSION = 4
# What models must share to be averaged (`dermsight soup`) or combined (`dermsight ensemble`): one architecture,
# one class list, one input preprocessing.
RECIPE_FIELDS = (
    "architecture",
    "taxonomy",
    "classes",
    "input_size",
    "mean",
    "std",
    "interpolation",
    "crop_pct",
    "colour_constancy",
)
# May differ between an ensemble's members. The ensemble serves every member through the first member's eval resize
# (`interpolation`): torchvision's MobileNetV2 weights say bilinear where EfficientNet-Lite's say bicubic, for the
# upscale of a 150 px image to 192 px before the centre crop (not measured; expected to matter far less than seeds).
BACKBONE_FIELDS = ("architecture", "mean", "std", "interpolation")


class ModelLoadError(Exception):
    """A model file cannot be loaded; the message is fit to show a user."""


def _plain(value: Any) -> Any:
    """JSON fallback for numpy / torch scalars and arrays, which metrics code returns all the time."""
    for attr in ("tolist", "item"):
        if callable(getattr(value, attr, None)):
            return getattr(value, attr)()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


@dataclass(frozen=True)
class ModelMeta:
    """Everything needed to use a trained model correctly, stored inside the model file.

    Eval preprocessing: resize the shorter side to ``resize_size = round(input_size / crop_pct)``, then centre-crop
    ``input_size``. ``crop_pct`` defaults to 1.0, unlike ImageNet's 0.875: the external test data are square centre
    crops of 4:3 dermoscopy frames, and a 1.0 crop of a 4:3 frame is exactly such a centre square, so training,
    validation and the external sets see lesions at the same scale. A smaller crop_pct would zoom in further on our
    own images only.
    """

    architecture: str
    taxonomy: str  # a key of dermsight.classes.TAXONOMIES: "ham7" or "isic2019"
    classes: tuple[str, ...]  # class codes in logit order
    class_names: tuple[str, ...]  # display names from the catalogue, same order
    input_size: int  # square side in pixels
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # torchvision InterpolationMode value
    weights: dict[str, Any]  # WeightsInfo.to_dict() of the starting weights
    crop_pct: float = 1.0
    temperature: float = 1.0  # logits are divided by this before softmax; 1.0 until calibrated
    # The level of detail of the training images: inputs are first brought to it (shorter side scaled down to
    # ``source_short_side``, then JPEG re-encoded at ``source_jpeg_quality``), see dermsight.inference.predictor.
    # HAM10000 is 200x150 JPEG at quality 75; a CNN trained on it reacts to the extra detail and the missing
    # compression artefacts of a sharper photo. 0 = leave inputs as they are (set by `dermsight calibrate`).
    source_short_side: int = 0
    source_jpeg_quality: int = 0
    # Colour constancy applied to every image before the eval preset, in training and serving alike: the p of
    # Shades of Gray (`transforms.shades_of_gray`); 0 = none (every model before it was added).
    colour_constancy: int = 0
    # Decision rule, chosen on the validation split (dermsight.inference.decision): a per-class bias added to the
    # logits before the temperature (tau * log of the training class prior, which undoes part of the class-weighted
    # loss's shift towards rare classes), and whether predictions average the eight flips/rotations by default.
    logit_bias: tuple[float, ...] = ()
    tta: bool = False
    training_data: str = ""
    split: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    # Out-of-distribution gate (dermsight.inference.ood): method, threshold and the rates measured when it was
    # fitted. Empty until `dermsight calibrate` has run; its statistics are tensors stored beside the weights
    # (`read_extra`).
    ood: dict[str, Any] = field(default_factory=dict)
    # Networks in the file: 1, or an ensemble of this many runs of the recipe whose logits are averaged
    # (dermsight.models.ensemble).
    members: int = 1
    # An ensemble of several backbones: per member, {"architecture", "mean", "std", "interpolation"} (the
    # normalisation and eval resize it was trained with; the file's own are the first member's, and the resize is
    # the file's for all). Empty when every member is `architecture` with the file's preprocessing.
    member_specs: list[dict[str, Any]] = field(default_factory=list)
    created: str = ""  # ISO 8601, UTC
    dermsight_version: str = ""
    format_version: int = 1

    def __post_init__(self) -> None:
        if self.architecture not in ARCHS:
            raise ValueError(f"unknown architecture {self.architecture!r}: expected one of {', '.join(ARCHS)}")
        taxonomy = TAXONOMIES.get(self.taxonomy)
        if taxonomy is None:
            raise ValueError(f"unknown taxonomy {self.taxonomy!r}: expected one of {', '.join(TAXONOMIES)}")
        strays = [c for c in self.classes if c not in taxonomy]
        if strays or len(set(self.classes)) != len(self.classes) or not self.classes:
            raise ValueError(f"classes {self.classes} must be distinct codes of taxonomy {self.taxonomy}")
        if len(self.class_names) != len(self.classes):
            raise ValueError("class_names must give one name per class")
        if self.members < 1:
            raise ValueError("members must be at least 1")
        if self.member_specs:
            if len(self.member_specs) != self.members:
                raise ValueError(f"member_specs must describe each of the {self.members} members")
            for spec in self.member_specs:
                arch, mean, std = spec.get("architecture"), spec.get("mean", ()), spec.get("std", ())
                if arch not in ARCHS or len(mean) != 3 or len(std) != 3:
                    raise ValueError(f"member_specs entry {spec} needs a known architecture and 3-value mean and std")
        # The lowest format that holds this model, so older dermsight versions still read the rest; one that
        # cannot apply the colour constancy must refuse the file rather than serve it without.
        version = 4 if self.colour_constancy else 3 if self.member_specs else 2 if self.members > 1 else 1
        if self.format_version < version:
            object.__setattr__(self, "format_version", version)  # frozen dataclass: set once, while it is being built
        if self.input_size < 1 or not 0 < self.crop_pct <= 1 or self.temperature <= 0:
            raise ValueError("input_size and temperature must be positive and crop_pct in (0, 1]")
        if self.logit_bias and len(self.logit_bias) != len(self.classes):
            raise ValueError("logit_bias must give one value per class (or none)")
        if self.source_short_side < 0 or not 0 <= self.source_jpeg_quality <= 100:
            raise ValueError("source_short_side must be >= 0 and source_jpeg_quality in 0..100")
        if self.colour_constancy < 0:
            raise ValueError(f"colour_constancy (a Shades of Gray p) must be >= 0, got {self.colour_constancy}")
        # Store the free-form dicts as their JSON round trip: a value that cannot be saved fails here rather than at
        # the end of a training run, and a loaded meta compares equal to the one that was saved (tuples -> lists).
        for name in ("weights", "config", "metrics", "ood", "member_specs"):
            try:
                value = json.loads(json.dumps(getattr(self, name), default=_plain))
            except (TypeError, ValueError) as e:
                raise ValueError(f"ModelMeta.{name} must be JSON-serialisable: {e}") from None
            object.__setattr__(self, name, value)

    @classmethod
    def new(
        cls,
        architecture: str,
        taxonomy: str,
        weights: WeightsInfo,
        *,
        input_size: int | None = None,
        classes: tuple[str, ...] | None = None,
        **kwargs: Any,
    ) -> ModelMeta:
        """A fresh contract: classes and names from the catalogue, preprocessing from the starting weights.

        ``input_size`` defaults to the weights' own; ``kwargs`` fill the remaining fields (crop_pct, config, ...).
        """
        if taxonomy not in TAXONOMIES:
            raise ValueError(f"unknown taxonomy {taxonomy!r}: expected one of {', '.join(TAXONOMIES)}")
        codes = tuple(classes) if classes is not None else TAXONOMIES[taxonomy].codes
        unknown = [c for c in codes if c not in CONDITIONS]
        if unknown:
            raise ValueError(f"classes {unknown} are not in the class catalogue (dermsight.classes)")
        return cls(
            architecture=architecture,
            taxonomy=taxonomy,
            classes=codes,
            class_names=tuple(CONDITIONS[c].name for c in codes),
            input_size=input_size or weights.input_size,
            mean=weights.mean,
            std=weights.std,
            interpolation=weights.interpolation,
            weights=weights.to_dict(),
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            dermsight_version=__version__,
            **kwargs,
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def network(self) -> str:
        """The architecture as people should read it: "tf_efficientnet_lite0", "3 x tf_efficientnet_lite0
        (ensemble)", or "tf_efficientnet_lite0 + mobilenetv2_100 (ensemble)"."""
        if self.member_specs:
            return f"{' + '.join(s['architecture'] for s in self.member_specs)} (ensemble)"
        return self.architecture if self.members == 1 else f"{self.members} x {self.architecture} (ensemble)"

    def unfitted(self, **changes: Any) -> ModelMeta:
        """A copy with ``changes`` and without what is fitted to one network's outputs (temperature, decision rule,
        not-a-lesion gate): for models made from other models (soups, ensembles), which must be refitted."""
        return replace(self, temperature=1.0, logit_bias=(), tta=False, ood={}, **changes)

    def adjust(self, logits: np.ndarray) -> np.ndarray:
        """Logits with the model's decision bias added (before the temperature); unchanged without one."""
        return logits + np.asarray(self.logit_bias, dtype=logits.dtype) if self.logit_bias else logits

    @property
    def resize_size(self) -> int:
        """Shorter side after the eval resize, before the centre crop."""
        return round(self.input_size / self.crop_pct)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelMeta:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("model metadata is not a JSON object")
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(
                f"model format {data['format_version']} is newer than this dermsight understands "
                f"({FORMAT_VERSION}); upgrade dermsight"
            )
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}  # fields a newer minor release added are ignored
        for key in ("classes", "class_names"):
            data[key] = tuple(data[key])
        data["logit_bias"] = tuple(float(v) for v in data.get("logit_bias", ()))
        for key in ("mean", "std"):
            data[key] = tuple(float(v) for v in data[key])
        return cls(**data)


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


def weights_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a model file's network tensors (names and bytes), whatever its metadata and extra tensors say (the
    not-a-lesion gate's, which calibration adds to model.safetensors and not to best.safetensors)."""
    h = hashlib.sha256()
    with safetensors.safe_open(str(path), framework="pt") as f:
        for key in sorted(k for k in f.keys() if not k.startswith(EXTRA_PREFIX)):  # noqa: SIM118
            t = f.get_tensor(key)
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
        safetensors.torch.save_file(tensors, tmp, metadata={"format": "pt", META_KEY: meta.to_json()})


def read_meta(path: str | os.PathLike) -> ModelMeta:
    """The contract of a saved model, without reading its weights."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"{path} is not a file")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types and OSError for bad files
        raise ModelLoadError(
            f"{path} is not a dermsight model: not a readable safetensors file ({str(e)[:120]})"
        ) from None
    raw = header.get(META_KEY)
    if raw is None:
        raise ModelLoadError(
            f"{path} is a safetensors file but not a dermsight model (no '{META_KEY}' metadata); "
            "models are written by dermsight's save_model"
        )
    try:
        return ModelMeta.from_json(raw)
    except (ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{path} has corrupt or incompatible dermsight metadata: {e}") from None


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelMeta]:
    """Rebuild a saved model from its file alone; returned in eval mode on ``device``."""
    meta = read_meta(path)
    model = build_network(meta)
    try:
        state = safetensors.torch.load_file(str(path), device="cpu")
    except Exception as e:
        raise ModelLoadError(f"{path} is corrupt: cannot read its weights ({str(e)[:120]})") from None
    state = {k: v for k, v in state.items() if not k.startswith(EXTRA_PREFIX)}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(
            f"{path} does not match its own metadata ({meta.architecture}, {meta.num_classes} classes): {str(e)[:300]}"
        ) from None
    return model.to(device).eval(), meta


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


# The bundled default model ships inside the package so `pip install` users get it too (see MODEL_CARD.md).
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
