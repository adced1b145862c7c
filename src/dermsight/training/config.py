"""Typed training configuration, read from YAML. The resolved config is written next to every run's outputs.

`TrainConfig` is a pydantic model: each option's type and range are declared with it, and pydantic checks them when a
config is made or changed. A bad value is refused as a ValueError with one ``option: problem`` line per problem,
which the CLI prints as a usage error.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from dermsight.data.aspect import parse_aspect
from dermsight.domain.classes import TAXONOMIES
from dermsight.models.factory import ARCHS

# Smallest image side for training and for the cache: the backbones downsample 32 times, so a smaller value is
# almost surely a typo.
MIN_SIDE = 32

# Options every ensemble member shares (the split and the input contract) or that belong to the ensemble's run.
SHARED_BY_MEMBERS = frozenset(
    {"data", "taxonomy", "val", "test", "split_seed", "input_size", "crop_pct", "cache_size", "cache_dir"}
    | {"display_aspect"}
    | {"colour_constancy"}
    | {"out", "members", "member_overrides", "calibrate", "tune_decision", "views", "resume"}
)


def _a_path(value: str) -> str:
    # Empty: `--set out=` would write the run into the current folder. `~` is expanded here: `out: ~/runs/x` would
    # otherwise train into a folder literally named "~" (which a later `rm -rf ~` would then take for home).
    if not value.strip():
        raise ValueError("must name a path")
    return os.path.expanduser(value)


PathText = Annotated[str, AfterValidator(_a_path)]


def _data_paths(value: Any) -> str | list[str]:
    # One check for both shapes, so a wrong value is one message, not one per shape it could have had.
    if isinstance(value, str):
        return _a_path(value)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return [_a_path(v) for v in value]
    raise ValueError("must be a path or a non-empty list of paths")


DataPaths = Annotated[str | list[str], PlainValidator(_data_paths)]


def _aspects(value: Any) -> dict[str, float]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise ValueError("must map data folder names to width:height ratios, e.g. {isic2017_256: '4:3'}")
    if any(isinstance(v, bool) or not isinstance(v, str | int | float) for v in value.values()):
        raise ValueError("each ratio must be a number or quoted text like '4:3'")
    # YAML 1.1 reads an unquoted 4:3 as the base-60 number 243: a ratio that large is that mistake.
    if any(isinstance(v, int) and v > 100 for v in value.values()):
        raise ValueError("a ratio over 100 is YAML's reading of an unquoted 4:3: write it quoted, '4:3'")
    return {k: parse_aspect(v) for k, v in value.items()}


Aspects = Annotated[dict[str, float], PlainValidator(_aspects)]
Taxonomy = Literal[tuple(TAXONOMIES)]
Arch = Literal[ARCHS]
Fraction = Annotated[float, Field(ge=0, lt=1)]


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a mapping with a key given twice."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"option {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


class TrainConfig(BaseModel):
    # Strict: YAML reads `epochs: "3"` as text and `calibrate: "no"` as a (truthy) string; neither is taken as a
    # number or a flag. Numbers must be finite: nan passes no range check.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)

    # data
    # A dataset folder/CSV any reader understands, or a split manifest CSV; or several dataset folders, read into one
    # manifest (its `source` column tells them apart) and split together, stratified by class and source.
    data: DataPaths = "../shared/data/ham10000"
    taxonomy: Taxonomy = "ham7"
    val: Fraction = 0.15
    test: Fraction = 0.15
    split_seed: int = 0
    cache_size: int = Field(256, ge=MIN_SIDE)  # shorter side kept in the decode-once cache (never enlarged)
    cache_dir: PathText | None = None
    # Sources stored squashed, by the name of their folder in `data`, and the width:height their frames really have,
    # e.g. {isic2017_256: "4:3"}: their images are stretched back to it once (copies beside the cache,
    # `data.aspect`), so the network sees their lesions at their true shape, as other copies of that archive and
    # users' photos show them, and cannot tell the source by its square frames.
    display_aspect: Aspects = Field(default_factory=dict)
    # model
    arch: Arch = "tf_efficientnet_lite0"
    weights: PathText = "auto"  # none | hub | offline | auto | path to a .pth/.safetensors file
    input_size: int = Field(224, ge=MIN_SIDE)
    crop_pct: float = Field(1.0, gt=0, le=1)
    drop_rate: Fraction = 0.2
    # optimisation
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    freeze_epochs: int = Field(0, ge=0)  # train only the head for this many epochs first
    imbalance: Literal["loss", "sampler", "none"] = "loss"  # class-weighted loss, weighted sampling, or nothing
    # Draw training images so that every source contributes as many per epoch, however many it has (with replacement;
    # with `imbalance: sampler` the class weights multiply in). Off: each source in proportion to its size.
    source_balance: bool = False
    # With source_balance: each source's share of the draws, relative to an unnamed source's 1 (a data folder's name,
    # or a source as the manifest records it -> weight). {isic2017_256: 2} draws half of every epoch from that
    # folder when three sources are given; names no training image comes from are refused before the cache is built.
    # The archive a network has trained on is what moves its figures there (docs/experiments.md, "Leave one source
    # out").
    source_weight: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    label_smoothing: Fraction = 0.05
    scale_min: float = Field(0.35, gt=0, le=1)  # RandomResizedCrop's smallest crop, as a share of the image's area
    # ColorJitter hue shift. Hue is by far the costliest augmentation step (about 2.6 of 3.3 ms per 256 px image on
    # one core): 0 lets a few loader workers keep a GPU busy.
    hue: float = Field(0.02, ge=0, le=0.5)
    # Per-channel gain jitter (`transforms.RandomChannelGain`): each of R, G, B scaled by its own factor in
    # [1 - channel_gain, 1 + channel_gain], a white-balance/exposure cast (bench/robustness.py measures what such a
    # cast costs; README, "Robustness to colour and exposure"). 0 = off.
    channel_gain: float = Field(0.0, ge=0, lt=1)
    # Share of training images saved again as JPEG (torchvision's v2.JPEG) at a quality drawn from
    # [jpeg_quality_min, 95], at the size the cache holds them, before any other augmentation. Sources differ in how
    # hard they were compressed (isic2017_256's blocky squares against HAM10000's crops at quality 95): without it a
    # network can read the source, and with it the source's class mix, from the blocks. Loader path only. 0 = off.
    jpeg: float = Field(0.0, ge=0, le=1)
    jpeg_quality_min: int = Field(30, ge=1, le=95)
    # Shades of Gray colour constancy with this p (`transforms.shades_of_gray`) on every image, in training and, as
    # part of the saved model (`ModelMeta.colour_constancy`), in serving. 0 = off; 6 is the usual choice.
    colour_constancy: int = Field(0, ge=0)
    # Where training images are augmented: "loader" (per image, in DataLoader workers; the CPU path) or "device"
    # (per batch, on the training device, from a copy of the split's images held there: `data.DeviceBatches`; the
    # fast path on a GPU, where loader workers cannot keep up).
    augment: Literal["loader", "device"] = "loader"
    patience: int = Field(8, ge=1)  # early stopping on validation balanced accuracy, in epochs
    # Stochastic weight averaging after the main schedule: this many more epochs at the constant rate swa_lr, the
    # weights averaged at the end of each; the average competes with the epoch checkpoints on val (0 = off).
    swa_epochs: int = Field(0, ge=0)
    swa_lr: float = Field(1e-4, gt=0)
    # Exponential moving average of the weights (timm's ModelEmaV3), updated after every optimizer step, with its
    # decay ramped up from 0 over the first few thousand steps (warm-up power 3/4) and capped at ema_decay. When on,
    # the average, not the raw weights, is what is scored on val each epoch and kept as the best checkpoint: weight
    # averages along the trajectory generalise better under a shift of data source (SWAD, Cha et al. 2021; "Ensemble
    # of Averages", Arpit et al. 2022), which is the sealed external test set's situation. 0 = off. With the warm-up
    # the decay is 1 - (1 + step)^-0.75 until it reaches ema_decay: 0.994 (about 180 steps averaged) after 1,000
    # steps, 0.998 (about 500) only after about 4,000, past the default 16 epochs of 219 steps (0.9978 at their end).
    # Not combined with swa_epochs (both average weights).
    ema_decay: float = Field(0.0, ge=0, lt=1)
    # Knowledge distillation: a dermsight model file whose (raw) logits the model learns to match on the same
    # augmented images (e.g. the ensemble, to serve one network at its quality); none: plain supervised training.
    teacher: PathText | None = None
    # Share of the loss that is the distillation term; the rest is the labels' loss.
    distil_weight: float = Field(1.0, ge=0, le=1)
    # Softening of both distributions (Hinton et al. 2015); the term is scaled by T^2.
    distil_temperature: float = Field(1.0, gt=0)
    amp: bool = True  # bfloat16 autocast on CUDA; ignored on CPU
    # run
    seed: int = 0
    # Train this many models, seeds seed, seed+1, ..., each in OUT/seed<N>, and serve their ensemble (mean of
    # logits, dermsight.models.ensemble) from OUT/model.safetensors. 1: one model, in OUT.
    members: int = Field(1, ge=1)
    # An ensemble of unlike runs: per member, the options it changes from the rest of this config, e.g.
    # [{seed: 1}, {seed: 1, arch: tf_efficientnet_lite2, augment: device}] (backbones of one recipe; see
    # dermsight.models.ensemble). Members go to OUT/<arch>_seed<N>; `members` follows the list's length. Options that
    # fix the split or the shared input (SHARED_BY_MEMBERS) and the run's own bookkeeping cannot differ.
    member_overrides: list[dict[str, Any]] = Field(default_factory=list)
    out: PathText = "runs/train"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # the training loop reads no other value
    num_workers: int = Field(0, ge=0)
    threads: int = Field(0, ge=0)  # torch intra-op threads on CPU (0: all cores)
    max_steps_per_epoch: int = Field(0, ge=0)  # 0: full epochs; tests use a few steps
    resume: bool = False  # continue from out/last.pt when it exists
    # Also write the per-epoch figures of log.csv as TensorBoard scalars to out/tensorboard (`tensorboard --logdir
    # runs`); needs the optional tensorboard package (pip install 'dermsight[tensorboard]').
    tensorboard: bool = False
    # Wall-clock budget for the epochs (SWA's included) of one invocation, in seconds (0: none). Before each epoch,
    # training stops if one more, as long as the longest so far, would pass the budget; the best checkpoint so far
    # is then scored and saved as usual (a run killed at a deadline instead loses its final scoring). `--resume`
    # carries on, with the budget counted afresh.
    time_limit_s: float = Field(0.0, ge=0)
    calibrate: bool = True  # fit temperature scaling and the not-a-lesion gate on the val split at the end
    tune_decision: bool = True  # then choose TTA and the prior correction on val (dermsight.posthoc.decision)
    # Views of a photo a served answer averages, as calibration and the decision rule are fitted for: 8 (flips and
    # rotations) or 1 (the photo in its canonical orientation: an eighth of the CPU time). Both make answers
    # independent of how a photo is turned (`dermsight calibrate --views`).
    views: Literal[1, 8] = 8
    # Stored in the model's JSON metadata, so JSON values only (YAML turns `when: 2024-01-01` into a date).
    notes: dict[str, JsonValue] = Field(default_factory=dict)

    def __init__(self, **options: Any) -> None:
        try:
            super().__init__(**options)
        except ValidationError as e:
            raise ValueError(problems(e)) from None

    @model_validator(mode="after")
    def _options_agree(self) -> TrainConfig:
        if self.val + self.test >= 1:
            raise ValueError(f"val and test must leave images to train on (their sum is {self.val + self.test})")
        resize = round(self.input_size / self.crop_pct)  # the eval preset's shorter side (`EvalPreset`)
        if self.cache_size < resize:
            # The cache would hold images smaller than the model's view of them: training and scoring would see
            # enlarged, blurred copies, while serving feeds the real detail.
            raise ValueError(
                f"cache_size ({self.cache_size}) must be at least input_size / crop_pct ({resize}): the cache keeps "
                "each image's shorter side at cache_size, and the model looks at it at that size"
            )
        names = {Path(p).name for p in self.data_paths}
        unknown = sorted(set(self.display_aspect) - names)
        if unknown:
            raise ValueError(
                f"display_aspect names {', '.join(unknown)}, which is not the folder name of any data path "
                f"({', '.join(sorted(names))})"
            )
        if self.source_weight and not self.source_balance:
            raise ValueError("source_weight weighs sources that source_balance draws equally: set source_balance: true")
        if self.freeze_epochs >= self.epochs:
            raise ValueError("freeze_epochs must be smaller than epochs")
        if self.jpeg and self.augment == "device":
            raise ValueError("jpeg re-encodes images one by one on the CPU: it needs augment: loader")
        if self.ema_decay and self.swa_epochs:
            raise ValueError("ema_decay and swa_epochs both average weights: set one of them to 0")
        if self.member_overrides:
            self._check_member_overrides()
        return self

    def _check_member_overrides(self) -> None:
        n = len(self.member_overrides)
        if n < 2:
            raise ValueError("member_overrides describes an ensemble: give at least two members")
        if self.members not in (1, n):
            raise ValueError(f"members is {self.members} but member_overrides lists {n}: drop one of them")
        for i, o in enumerate(self.member_overrides):
            shared = sorted(set(o) & SHARED_BY_MEMBERS)
            if shared:
                raise ValueError(f"member_overrides[{i}]: {', '.join(shared)} cannot differ")
            try:  # each member's config must be valid on its own (a bad backbone included, before any member trains)
                self.member_config(i)
            except ValueError as e:
                raise ValueError("\n".join(f"member_overrides[{i}]: {line}" for line in str(e).splitlines())) from None
        names = [self.member_name(i) for i in range(n)]
        if len(set(names)) < n:
            raise ValueError(f"member_overrides: two members would share a folder ({', '.join(names)})")
        if self.members != n:  # assigning validates again, and this check then finds them equal
            self.members = n

    def member_name(self, i: int) -> str:
        """Folder of member ``i`` under OUT: seed<N> for seeds of one config, <arch>_seed<N> for member_overrides."""
        if not self.member_overrides:
            return f"seed{self.seed + i}"
        o = self.member_overrides[i]
        return f"{o.get('arch', self.arch)}_seed{o.get('seed', self.seed)}"

    def member_config(self, i: int) -> TrainConfig:
        """Member ``i``'s own single-model config (calibration and the decision rule are the ensemble's)."""
        changes = self.member_overrides[i] if self.member_overrides else {"seed": self.seed + i}
        out = str(Path(self.out) / self.member_name(i))
        own = {"out": out, "members": 1, "member_overrides": [], "calibrate": False, "tune_decision": False}
        return self.updated(**(changes | own))

    @property
    def data_paths(self) -> list[str]:
        """``data`` as a list of one or more paths."""
        return list(self.data) if isinstance(self.data, list) else [self.data]

    def updated(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes``, checked as a new config is (`model_copy` checks nothing)."""
        return TrainConfig(**(self.model_dump() | changes))

    @classmethod
    def from_yaml(cls, path: Path, **overrides: Any) -> TrainConfig:
        """The config in ``path`` (YAML) with ``overrides``. An option given twice is refused: YAML would keep the
        last one without a word, and the run would not be the one the file seems to describe."""
        try:
            raw = yaml.load(_config_text(Path(path)), Loader=_UniqueKeyLoader) or {}
        except FileNotFoundError:
            raise ValueError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of option: value")
        # Overrides are applied as given, None included (`--set cache_dir=none` means the default cache root). Keys as
        # text: YAML reads `1: x` as a number, which is then named as an unknown option like any other.
        return cls(**({str(k): v for k, v in raw.items()} | overrides))

    @classmethod
    def parse_override(cls, pair: str) -> tuple[str, Any]:
        """``KEY=VALUE`` from the command line (`dermsight train --set`) -> (key, value typed as the option).

        The value is read as YAML, then converted to the option's declared type by pydantic: YAML 1.1 reads
        ``1e-3`` as text, which a number option still takes. Text options take the text as written (``out=2024``
        stays a folder name), and optional ones read ``none``, ``null`` or nothing as None."""
        key, sep, text = pair.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        if key not in cls.model_fields:
            raise ValueError(f"--set {key}: unknown option; known: {', '.join(sorted(cls.model_fields))}")
        field = cls.model_fields[key]
        kind = field.annotation
        # The field's own validators and bounds too (pydantic keeps them apart from the bare annotation).
        checked = Annotated[kind, *field.metadata] if field.metadata else kind
        try:
            return key, TypeAdapter(checked).validate_python(_override_value(text, kind), strict=False)
        except (ValidationError, yaml.YAMLError) as e:
            why = problems(e) if isinstance(e, ValidationError) else f"not valid YAML ({e})"
            raise ValueError(f"--set {key}: {why}") from None

    def to_yaml(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))
        return path


def _override_value(text: str, kind: Any) -> Any:
    """The command line's text as the value to validate for an option of type ``kind``."""
    kinds = (
        [_unannotated(k) for k in get_args(kind)] if get_origin(kind) in (Union, UnionType) else [_unannotated(kind)]
    )
    if type(None) in kinds and text.lower() in ("", "none", "null", "~"):
        return None
    if str in kinds:
        # A text option that may also be a list (`data`) takes a YAML flow list: data=[../a, ../b].
        lists = any(get_origin(k) is list for k in kinds)
        return yaml.safe_load(text) if lists and text.startswith("[") else text
    if not text and get_origin(kind) in (dict, list):  # `--set notes=` empties the mapping
        return get_origin(kind)()
    return yaml.safe_load(text)  # YAML flow style for mappings and lists: {why: test}, [{seed: 1}, {seed: 2}]


def _unannotated(kind: Any) -> Any:
    return get_args(kind)[0] if get_origin(kind) is Annotated else kind


# Said after pydantic's own message, by the type of error, where that message alone leaves people guessing.
_HINTS = {
    "dict_type": "a mapping of name: value",
    "invalid-json-value": "text, numbers, lists and mappings only: quote dates",
}


def problems(error: ValidationError) -> str:
    """Pydantic's errors as one ``option: problem`` line each (``member_overrides[1]`` for an item of a list)."""
    lines = []
    for e in error.errors(include_url=False):
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".")
        value = e.get("input")
        if e["type"] == "value_error":  # raised by our own checks, which word the whole problem
            what = str(e["ctx"]["error"])
        elif e["type"] == "extra_forbidden":
            what = "unknown option"
        else:
            what = e["msg"] + (f" ({_HINTS[e['type']]})" if e["type"] in _HINTS else "")
            what += f", got {value!r}"
            if isinstance(value, str) and e["type"] in ("float_type", "float_parsing") and _parses_as_float(value):
                # YAML 1.1 reads 1e-3 (no dot) as text; people cannot tell from "got '1e-3'".
                what += " (YAML reads a number like 1e-3 as text: write 0.001 or 1.0e-3)"
        lines.append(f"{where}: {what}" if where else what)
    return "\n".join(lines)


def _config_text(path: Path) -> str:
    """The config file's text: UTF-8 (a BOM allowed), or UTF-16 with its BOM (Windows PowerShell's `>` writes that)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-16") if data[:2] in (b"\xff\xfe", b"\xfe\xff") else data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text file in UTF-8 or UTF-16 ({e.reason} at byte {e.start})") from None


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
