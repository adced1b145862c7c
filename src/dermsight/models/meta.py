"""The saved model's contract: `ModelMeta`, stored as JSON in the header of the model file, and what checks data
against it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel

from dermsight import __version__
from dermsight.data.manifest import LABEL_COLUMNS
from dermsight.domain.classes import CONDITIONS, TAXONOMIES
from dermsight.models.records import (
    ARCHS,
    CalibrationRecord,
    DecisionRecord,
    GateRecord,
    SplitRecord,
    StopRecord,
    TrainingData,
    WeightsInfo,
)

# The newest file format this dermsight reads. A file records the oldest format that can read it: 1 for a single
# network, 2 for an ensemble (`members` > 1), which a dermsight from before ensembles would misread, 3 for an
# ensemble of several backbones (`member_specs`), which one from before those would build wrongly, 4 for colour
# constancy, 5 for the typed records (`models.records`: split, training data, stop), which earlier readers would take
# for sentences, 6 for a model's own referral threshold (`refer_from`), which earlier readers would drop and so
# advise by the default.
FORMAT_VERSION = 6


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
    taxonomy: str  # a key of dermsight.domain.classes.TAXONOMIES: "ham7" or "isic2019"
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
    # Decision rule, chosen on the validation split (dermsight.posthoc.decision): a per-class bias added to the
    # logits before the temperature (tau * log of the training class prior, which undoes part of the class-weighted
    # loss's shift towards rare classes), and whether predictions average the eight flips/rotations by default.
    logit_bias: tuple[float, ...] = ()
    tta: bool = False
    # The referral threshold: malignant and pre-malignant classes together this probable send people to a doctor
    # (`domain.triage.advise`). Fitted on the validation split pooled over its sources (`posthoc.referral`): the
    # highest whole percent that refers at least 95% of validation melanomas. 0: the default,
    # `triage.CONCERN_PROBABILITY`.
    refer_from: float = 0.0
    # Typed records (`models.records`); a file of the earlier format holds sentences here, converted when read.
    training_data: TrainingData | None = None
    split: SplitRecord | None = None
    stop: StopRecord | None = None  # why training ended; None for models made otherwise (ensembles, soups)
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    # Out-of-distribution gate (dermsight.inference.ood): method, threshold and the rates measured when it was
    # fitted. Empty until `dermsight calibrate` has run; its statistics are tensors stored beside the weights
    # (`read_extra`).
    ood: dict[str, Any] = field(default_factory=dict)
    # Expected answers for the start-up self-test (`inference.selftest`): the raw logits of fixed synthetic pictures,
    # recorded when the model was calibrated. Empty: only finite outputs are checked.
    probe: dict[str, Any] = field(default_factory=dict)
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
        self._convert_records()
        typed = self.split is not None or self.training_data is not None or self.stop is not None
        version = (
            6
            if self.refer_from
            else 5
            if typed
            else 4
            if self.colour_constancy
            else 3
            if self.member_specs
            else 2
            if self.members > 1
            else 1
        )
        if self.format_version < version:
            object.__setattr__(self, "format_version", version)  # frozen dataclass: set once, while it is being built
        if self.input_size < 1 or not 0 < self.crop_pct <= 1 or self.temperature <= 0:
            raise ValueError("input_size and temperature must be positive and crop_pct in (0, 1]")
        if self.logit_bias and len(self.logit_bias) != len(self.classes):
            raise ValueError("logit_bias must give one value per class (or none)")
        if self.source_short_side < 0 or not 0 <= self.source_jpeg_quality <= 100:
            raise ValueError("source_short_side must be >= 0 and source_jpeg_quality in 0..100")
        if not 0 <= self.refer_from < 1:
            raise ValueError(f"refer_from (a probability) must be in [0, 1), got {self.refer_from}")
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

    def _convert_records(self) -> None:
        """Records from their JSON (a file being read), or from the earlier format's sentences."""
        records = {"training_data": TrainingData, "split": SplitRecord, "stop": StopRecord}
        for name, kind in records.items():
            value = getattr(self, name)
            if isinstance(value, str):
                value = kind.from_text(value) if name != "stop" else None
            elif isinstance(value, dict):
                value = kind.model_validate(value)
            elif value is not None and not isinstance(value, kind):
                raise ValueError(f"ModelMeta.{name} must be a {kind.__name__}, got {type(value).__name__}")
            object.__setattr__(self, name, value)  # frozen dataclass: set once, while it is being built
        if self.stop is None and isinstance(self.metrics, dict):
            object.__setattr__(self, "stop", StopRecord.from_metrics(self.metrics))

    @property
    def calibration(self) -> CalibrationRecord | None:
        """Temperature scaling as fitted (None before `dermsight calibrate`)."""
        calib = self.metrics.get("calibration")
        return CalibrationRecord.model_validate(calib) if isinstance(calib, dict) else None

    @property
    def decision(self) -> DecisionRecord:
        """The decision rule the model applies (an empty bias and no TTA until `dermsight tune-decision`)."""
        chosen = self.metrics.get("decision")
        extra = {k: v for k, v in chosen.items() if k not in ("tta",)} if isinstance(chosen, dict) else {}
        return DecisionRecord.model_validate(extra | {"logit_bias": self.logit_bias, "tta": self.tta})

    @property
    def gate(self) -> GateRecord | None:
        """The not-a-lesion gate's settings and measured rates (None before `dermsight calibrate`)."""
        return GateRecord.model_validate(self.ood) if self.ood.get("method") else None

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
            raise ValueError(f"classes {unknown} are not in the class catalogue (dermsight.domain.classes)")
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

    def to_dict(self) -> dict[str, Any]:
        """The contract as plain JSON types (records included)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        return json.loads(json.dumps(out, default=_plain))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

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


def split_mismatch(meta: ModelMeta, df: pd.DataFrame) -> str | None:
    """Why split manifest ``df`` is probably not the split ``meta``'s model was trained on, or None
    (`SplitRecord.mismatch`; an ensemble records its first member's split). A model without a split record is not
    checked."""
    return meta.split.mismatch(df, LABEL_COLUMNS[meta.taxonomy]) if meta.split is not None else None
