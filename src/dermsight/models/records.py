"""Typed records of the saved model's contract: the facts training, calibration and the decision rule write into the
model file, as data rather than sentences.

Files written before these records stored the split and the training data as sentences ("lesion/patient-grouped,
...: train 7010, val 1502, test 1503 images; fingerprint ...", "../data/ham10000 (10015 images)") and the time-limit
stop as a key of the metrics; `from_text` and `StopRecord.from_metrics` convert them when such a file is read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from dermsight.data.manifest import image_ids
from dermsight.data.split import SPLITS, split_fingerprint, split_rows

SPLIT_METHOD = "lesion/patient-grouped, stratified (StratifiedGroupKFold)"


class Record(BaseModel):
    """A frozen record that refuses unknown fields: a typo in a training script fails where it is made."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class DataSource(Record):
    """One folder (or manifest) of training data."""

    name: str  # what the data is: the folder's name ("ham10000"), shown to users
    images: int = Field(ge=0)
    path: str = ""  # where it was on the machine that trained the model; not shown to users
    # The width:height its images were stretched back to before training (`TrainConfig.display_aspect`: a source
    # stored squashed); None: used as stored. Scoring this source's images as the model saw them needs the same.
    display_aspect: float | None = Field(None, gt=0)


class TrainingData(Record):
    """What the model learned from: one entry per source folder."""

    sources: tuple[DataSource, ...] = ()

    @property
    def images(self) -> int:
        return sum(s.images for s in self.sources)

    def describe(self, public: bool = False) -> str:
        """ "<path> (N images)" per source, joined by " + "; ``public`` names each by its folder name, not by where it
        sat on the training machine."""
        return " + ".join(f"{s.name if public else s.path or s.name} ({s.images} images)" for s in self.sources)

    @classmethod
    def of(
        cls, paths: Sequence[str], counts: Sequence[int], aspects: Mapping[str, float] | None = None
    ) -> TrainingData:
        """Sources from their paths and image counts; ``aspects``: display aspect by folder name, where one was set."""
        aspects = aspects or {}
        sources = []
        for p, n in zip(paths, counts, strict=True):
            name = Path(str(p)).name or str(p)
            sources.append(DataSource(name=name, images=int(n), path=str(p), display_aspect=aspects.get(name)))
        return cls(sources=tuple(sources))

    @classmethod
    def from_text(cls, text: str) -> TrainingData | None:
        """A sentence of the earlier format, "<path> (N images)", as a record (None for an empty one)."""
        if not text:
            return None
        where, _, rest = text.partition(" (")
        n = re.match(r"(\d+) images", rest)
        return cls.of([where], [int(n[1]) if n else 0])


class SplitRecord(Record):
    """The train/val/test split the model was trained on: how it was made, its sizes, a fingerprint of which image is
    in which part, and the ids of the images the model learned from or was selected on (train and val), so that
    scoring those images again can be flagged."""

    method: str = SPLIT_METHOD
    seed: int | None = None
    sizes: dict[str, int] = Field(default_factory=dict)  # images per split: train, val, test
    fingerprint: str = ""  # `data.split.split_fingerprint` of the split ("" for files that predate it)
    sources: dict[str, int] = Field(default_factory=dict)  # images per data source (the manifest's `source`)
    held_in: tuple[str, ...] = ()  # image ids (`data.manifest.image_ids`) of the train and val splits, sorted

    def describe(self) -> str:
        """The split in one line, as the model card shows it."""
        seed = f", seed {self.seed}" if self.seed is not None else ""
        sizes = ", ".join(f"{k} {self.sizes[k]}" for k in SPLITS if k in self.sizes)
        text = f"{self.method}{seed}: {sizes} images"
        return text + (f"; fingerprint {self.fingerprint}" if self.fingerprint else "")

    def summary(self) -> dict[str, Any]:
        """The record without its id list, for places that show it (the API, reports)."""
        return self.model_dump(exclude={"held_in"}) | {"held_in_images": len(self.held_in)}

    @classmethod
    def of(cls, df: pd.DataFrame, seed: int | None, label: str | None, method: str = SPLIT_METHOD) -> SplitRecord:
        """The record of split manifest ``df`` (``label``: count only rows with a value in this column, the rows a
        taxonomy can train on)."""
        used = split_rows(df, label)
        held = used[used["split"].isin(("train", "val"))]
        sources = used["source"].dropna().astype(str).value_counts() if "source" in used else pd.Series(dtype=int)
        return cls(
            method=method,
            seed=seed,
            sizes={k: int((used["split"] == k).sum()) for k in SPLITS},
            fingerprint=split_fingerprint(df, label),
            sources={str(k): int(v) for k, v in sorted(sources.items())},
            held_in=tuple(sorted(set(image_ids(held)))),
        )

    @classmethod
    def from_text(cls, text: str) -> SplitRecord | None:
        """A sentence of the earlier format as a record (None when it holds no sizes)."""
        sizes = {k: int(v) for k, v in re.findall(r"\b(train|val|test) (\d+)", text or "")}
        if not sizes:
            return None
        method, _, _ = text.partition(", seed")
        seed = re.search(r"\bseed (\d+)", text)
        fingerprint = re.search(r"\bfingerprint ([0-9a-f]{16})\b", text)
        return cls(
            method=method.partition(":")[0].strip() or SPLIT_METHOD,
            seed=int(seed[1]) if seed else None,
            sizes=sizes,
            fingerprint=fingerprint[1] if fingerprint else "",
        )

    def mismatch(self, df: pd.DataFrame, label: str) -> str | None:
        """Why split manifest ``df`` is probably not this split, or None.

        Fitting a temperature, gate or decision rule on a "val" split that holds the model's own training images would
        make it look surer than it is, and its "test" scores would not be held out. The sizes are compared first (rows
        without a ``label`` are not counted, as training does not count them), then the fingerprint, which tells apart
        two splits of the same sizes; a record without sizes checks nothing."""
        if set(self.sizes) != set(SPLITS):
            return None
        labelled = split_rows(df, label)
        given = {name: int((labelled["split"] == name).sum()) for name in SPLITS}
        risk = "its val and test images may include training images, which would make the fit look better than it is"
        if given != self.sizes:
            return (
                f"this split ({', '.join(f'{k} {given[k]}' for k in SPLITS)}) is not the one the model was trained on "
                f"({', '.join(f'{k} {self.sizes[k]}' for k in SPLITS)}): {risk}"
            )
        keyed = "path" in df.columns or "image_id" in df.columns
        if self.fingerprint and keyed and split_fingerprint(df, label) != self.fingerprint:
            return f"this split has the sizes of the one the model was trained on but puts other images in them: {risk}"
        return None

    def overlap(self, ids: Iterable[str]) -> list[str]:
        """Those of ``ids`` the model was trained or selected on (its train and val images), in the order given."""
        held = set(self.held_in)
        return [i for i in ids if i in held]


class StopRecord(Record):
    """Why training ended: it ran its epochs, early stopping ended it, or its time budget did (a run stopped by time
    goes on when resumed)."""

    reason: Literal["epochs", "early_stopping", "time_limit"]
    epochs_run: int = Field(ge=0)
    best_epoch: int = Field(ge=0)  # 1-based; 0 when unknown
    time_limit_s: float | None = None

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any]) -> StopRecord | None:
        """The earlier format's time-limit stop, kept as a key of the metrics, as a record."""
        limit = metrics.get("time_limit")
        if not isinstance(limit, dict):
            return None
        return cls(
            reason="time_limit",
            epochs_run=int(limit.get("stopped_after_epoch") or 0),
            best_epoch=int(metrics.get("best_epoch") or 0),
            time_limit_s=limit.get("seconds"),
        )


class Loose(BaseModel):
    """A typed view of a dict the model file has long held: known fields checked, others kept."""

    model_config = ConfigDict(frozen=True, extra="allow")


class CalibrationRecord(Loose):
    """Temperature scaling, fitted on the validation split (`posthoc.calibrate`)."""

    temperature: float = Field(gt=0)
    fitted_on: str = ""
    val: dict[str, float] = Field(default_factory=dict)  # ECE and NLL before and after, n
    test: dict[str, float] = Field(default_factory=dict)


class DecisionRecord(Loose):
    """The decision rule, chosen on the validation split (`posthoc.decision`): a bias of ``tau`` times the log of the
    training class prior added to the logits, and whether predictions average the eight flips and rotations."""

    logit_bias: tuple[float, ...] = ()
    tta: bool = False
    tau: float | None = None
    chosen_on: str = ""


class GateRecord(Loose):
    """The not-a-lesion gate (`inference.ood`): its method and threshold, where it was fitted and what it rejects."""

    method: str
    threshold: float
    target_rejection: float | None = None
    fitted_on: str = ""
    threshold_set_on: str = ""
    rejection_rates: dict[str, dict[str, float]] = Field(default_factory=dict)


# The backbones the model factory makes (`models.factory.create_model`), by timm name.
ARCHS: tuple[str, ...] = (
    "vgg19",
    "inception_v3",
    "resnet50",
    "tf_efficientnet_lite0",
    "tf_efficientnet_lite1",
    "tf_efficientnet_lite2",
    "mobilenetv2_100",
)


@dataclass(frozen=True)
class WeightsInfo:
    """Where a model's starting weights came from and the preprocessing they expect."""

    source: str  # "none", "hub", "offline:<pip package>" or "file:<path>"
    description: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # torchvision InterpolationMode value: "bilinear" or "bicubic"
    input_size: int  # the square side the weights were trained / evaluated at

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WeightsInfo:
        return cls(
            source=str(data["source"]),
            description=str(data["description"]),
            mean=_triple(data["mean"]),
            std=_triple(data["std"]),
            interpolation=str(data["interpolation"]),
            input_size=int(data["input_size"]),
        )


def _triple(values: Any) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return (a, b, c)
