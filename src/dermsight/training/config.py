"""Typed training configuration, read from YAML. The resolved config is written next to every run's outputs."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cache
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from dermsight.domain.classes import TAXONOMIES

IMBALANCE = ("loss", "sampler", "none")
DEVICES = ("auto", "cpu", "cuda")  # the training loop reads no other value (cuda:N would quietly train on the CPU)
# Smallest image side for training and for the cache: the backbones downsample 32 times, and a smaller value is
# almost surely a typo (input_size: 0 used to fall back to the weights' size without a word).
MIN_SIDE = 32


# Options every ensemble member shares (the split and the input contract) or that belong to the ensemble's run.
SHARED_BY_MEMBERS = frozenset(
    {"data", "taxonomy", "val", "test", "split_seed", "input_size", "crop_pct", "cache_size", "cache_dir"}
    | {"colour_constancy"}
    | {"out", "members", "member_overrides", "calibrate", "tune_decision", "resume"}
)


@dataclass
class TrainConfig:
    # data
    data: str = "../shared/data/ham10000"  # a dataset folder/CSV any reader understands, or a split manifest CSV
    taxonomy: str = "ham7"
    val: float = 0.15
    test: float = 0.15
    split_seed: int = 0
    cache_size: int = 256  # shorter side kept in the decode-once cache (never enlarged)
    cache_dir: str | None = None
    # model
    arch: str = "tf_efficientnet_lite0"
    weights: str = "auto"  # none | hub | offline | auto | path to a .pth/.safetensors file
    input_size: int = 224
    crop_pct: float = 1.0
    drop_rate: float = 0.2
    # optimisation
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    freeze_epochs: int = 0  # train only the head for this many epochs first
    imbalance: str = "loss"  # class-weighted loss, weighted sampling, or nothing
    label_smoothing: float = 0.05
    scale_min: float = 0.35  # RandomResizedCrop lower scale bound
    # ColorJitter hue shift. Hue is by far the costliest augmentation step (about 2.6 of 3.3 ms per 256 px image on
    # one core, measured): 0 lets a few loader workers keep a GPU busy.
    hue: float = 0.02
    # Per-channel gain jitter (`transforms.RandomChannelGain`): each of R, G, B scaled by its own factor in
    # [1 - channel_gain, 1 + channel_gain], a white-balance/exposure cast. The bundled model loses up to 0.1 of its
    # balanced accuracy to a 10% cast (bench/robustness.py); on two Lite0 seeds 0.15 made runs steadier under such
    # casts but not better (README, "Robustness to colour and exposure"). 0 = off.
    channel_gain: float = 0.0
    # Shades of Gray colour constancy with this p (`transforms.shades_of_gray`) on every image, in training and, as
    # part of the saved model (`ModelMeta.colour_constancy`), in serving. 0 = off; 6 is the usual choice.
    colour_constancy: int = 0
    # Where training images are augmented: "loader" (per image, in DataLoader workers; the CPU path) or "device"
    # (per batch, on the training device, from a copy of the split's images held there: `loop.DeviceBatches`; the
    # fast path on a GPU, where loader workers cannot keep up).
    augment: str = "loader"
    patience: int = 8  # early stopping on validation balanced accuracy
    # Stochastic weight averaging after the main schedule: this many more epochs at the constant rate swa_lr, the
    # weights averaged at the end of each; the average competes with the epoch checkpoints on val (0 = off).
    swa_epochs: int = 0
    swa_lr: float = 1e-4
    # Exponential moving average of the weights (timm's ModelEmaV3), updated after every optimizer step, with its
    # decay ramped up from 0 over the first few thousand steps (warm-up power 3/4) and capped at ema_decay. When on,
    # the average, not the raw weights, is what is scored on val each epoch and kept as the best checkpoint: weight
    # averages along the trajectory generalise better under a shift of data source (SWAD, Cha et al. 2021; "Ensemble
    # of Averages", Arpit et al. 2022), which is the sealed external test set's situation. 0 = off. With the warm-up
    # the decay is 1 - (1 + step)^-0.75 until it reaches ema_decay: 0.994 (about 180 steps averaged) after 1,000
    # steps, 0.998 (about 500) only after about 4,000, past the default 16 epochs of 219 steps (0.9978 at their end).
    # Not combined with swa_epochs (both average weights).
    ema_decay: float = 0.0
    # Knowledge distillation: a dermsight model file whose (raw) logits the model learns to match on the same
    # augmented images (e.g. the ensemble, to serve one network at its quality); none: plain supervised training.
    teacher: str | None = None
    distil_weight: float = 1.0  # share of the loss that is the distillation term; the rest is the labels' loss
    distil_temperature: float = 1.0  # softening of both distributions (Hinton et al. 2015); the term is scaled by T^2
    amp: bool = True  # bfloat16 autocast on CUDA; ignored on CPU
    # run
    seed: int = 0
    # Train this many models, seeds seed, seed+1, ..., each in OUT/seed<N>, and serve their ensemble (mean of
    # logits, dermsight.models.ensemble) from OUT/model.safetensors. 1: one model, in OUT.
    members: int = 1
    # An ensemble of unlike runs: per member, the options it changes from the rest of this config, e.g.
    # [{seed: 1}, {seed: 1, arch: tf_efficientnet_lite2, augment: device}] (backbones of one recipe; see
    # dermsight.models.ensemble). Members go to OUT/<arch>_seed<N>; `members` follows the list's length. Options that
    # fix the split or the shared input (data, taxonomy, val, test, split_seed, input_size, crop_pct) and the run's
    # own bookkeeping (out, members, calibrate, tune_decision, resume) cannot differ.
    member_overrides: list[dict[str, Any]] = field(default_factory=list)
    out: str = "runs/train"
    device: str = "auto"  # auto | cpu | cuda
    num_workers: int = 0
    threads: int = 0  # torch intra-op threads on CPU (0: all cores)
    max_steps_per_epoch: int = 0  # 0: full epochs; tests use a few steps
    resume: bool = False  # continue from out/last.pt when it exists
    # Also write the per-epoch figures of log.csv as TensorBoard scalars to out/tensorboard (`tensorboard --logdir
    # runs`); needs the optional tensorboard package (pip install 'dermsight[tensorboard]').
    tensorboard: bool = False
    # Wall-clock budget for the epochs (SWA's included) of one invocation, in seconds (0: none). Before each epoch,
    # training stops if one more, as long as the longest so far, would pass the budget; the best checkpoint so far
    # is then scored and saved as usual (a run killed at a deadline instead loses its final scoring). `--resume`
    # carries on, with the budget counted afresh.
    time_limit_s: float = 0.0
    calibrate: bool = True  # fit temperature scaling and the not-a-lesion gate on the val split at the end
    tune_decision: bool = True  # then choose TTA and the prior correction on val (dermsight.posthoc.decision)
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Types first: YAML reads `epochs: "3"` as a string and `calibrate: "no"` as a (truthy) string, and the
        # range checks below would then fail with a TypeError, or not at all.
        self._check_types()
        self._expand_home()
        self._check_ranges()
        if self.imbalance not in IMBALANCE:
            raise ValueError(f"imbalance must be one of {', '.join(IMBALANCE)}, got {self.imbalance!r}")
        if self.augment not in ("loader", "device"):
            raise ValueError(f"augment must be loader or device, got {self.augment!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size and lr must be positive")
        if self.members < 1:
            raise ValueError("members must be at least 1")
        if self.member_overrides:
            self._check_member_overrides()
        if self.swa_epochs < 0 or self.swa_lr <= 0:
            raise ValueError("swa_epochs must be >= 0 and swa_lr positive")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (0: off), got {self.ema_decay}")
        if self.ema_decay and self.swa_epochs:
            raise ValueError("ema_decay and swa_epochs both average weights: set one of them to 0")
        if not 0 <= self.distil_weight <= 1 or self.distil_temperature <= 0:
            raise ValueError("distil_weight must be in [0, 1] and distil_temperature positive")
        if not 0 <= self.channel_gain < 1:
            raise ValueError(f"channel_gain must be in [0, 1), got {self.channel_gain}")
        if self.colour_constancy < 0:
            raise ValueError(f"colour_constancy (a Shades of Gray p) must be >= 0, got {self.colour_constancy}")
        if self.time_limit_s < 0:
            raise ValueError("time_limit_s must be >= 0 (0: no limit)")
        if self.freeze_epochs >= self.epochs:
            raise ValueError("freeze_epochs must be smaller than epochs")

    def _check_types(self) -> None:
        for name, hint in _hints().items():
            value = getattr(self, name)
            if not _is_a(value, hint):
                hint_text = ""
                if isinstance(value, str) and _is_a(1.0, hint) and _parses_as_float(value):
                    # YAML 1.1 reads 1e-3 (no dot) as text; people cannot tell from "got '1e-3'".
                    hint_text = " (YAML reads a number like 1e-3 as text: write 0.001 or 1.0e-3)"
                raise ValueError(f"{name} must be {_describe(hint)}, got {value!r}{hint_text}")
            if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison below
                raise ValueError(f"{name} must be a finite number, got {value!r}")

    def _expand_home(self) -> None:
        # `out: ~/runs/x` would otherwise train into a folder literally named "~" under the current one (and a later
        # `rm -rf ~` to clean it up is a disaster); `data: ~/ham10000` would not be found.
        for name in ("data", "out", "cache_dir", "teacher", "weights"):
            value = getattr(self, name)
            if isinstance(value, str) and value.startswith("~"):
                setattr(self, name, os.path.expanduser(value))

    def _check_ranges(self) -> None:
        for name in ("data", "out"):  # empty: `--set out=` would write the run into the current folder
            if not getattr(self, name).strip():
                raise ValueError(f"{name} must name a path, got {getattr(self, name)!r}")
        from dermsight.models.factory import ARCHS

        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; known: {', '.join(ARCHS)}")
        if self.taxonomy not in TAXONOMIES:
            raise ValueError(f"taxonomy must be one of {', '.join(TAXONOMIES)}, got {self.taxonomy!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if not 0 <= self.val < 1 or not 0 <= self.test < 1 or self.val + self.test >= 1:
            raise ValueError(
                f"val and test must be fractions in [0, 1) with a sum below 1, got val={self.val}, test={self.test}"
            )
        for name in ("input_size", "cache_size"):
            if getattr(self, name) < MIN_SIDE:
                raise ValueError(f"{name} must be a whole number of pixels >= {MIN_SIDE}, got {getattr(self, name)}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        resize = round(self.input_size / self.crop_pct)  # the eval preset's shorter side (`EvalPreset`)
        if self.cache_size < resize:
            # The cache would hold images smaller than the model's view of them: training and scoring would see
            # enlarged, blurred copies, while serving feeds the real detail.
            raise ValueError(
                f"cache_size ({self.cache_size}) must be at least input_size / crop_pct ({resize}): the cache keeps "
                "each image's shorter side at cache_size, and the model looks at it at that size"
            )
        try:
            json.dumps(self.notes)
        except (TypeError, ValueError) as e:
            # Stored in the model's JSON metadata; YAML turns `when: 2024-01-01` into a date, which JSON cannot hold.
            raise ValueError(f"notes must hold text, numbers, lists and mappings only (quote dates): {e}") from None
        if not 0 <= self.drop_rate < 1:
            raise ValueError(f"drop_rate must be in [0, 1), got {self.drop_rate}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 < self.scale_min <= 1:
            raise ValueError(
                f"scale_min (the smallest crop, as a share of the image's area) must be in (0, 1], got {self.scale_min}"
            )
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")
        if self.patience < 1:
            raise ValueError(f"patience must be a whole number of epochs >= 1, got {self.patience}")
        for name in ("weight_decay", "warmup_epochs", "num_workers", "threads", "max_steps_per_epoch"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def _check_member_overrides(self) -> None:
        n = len(self.member_overrides)
        if n < 2:
            raise ValueError("member_overrides describes an ensemble: give at least two members")
        if self.members not in (1, n):
            raise ValueError(f"members is {self.members} but member_overrides lists {n}: drop one of them")
        known = {f.name for f in fields(self)}
        for i, o in enumerate(self.member_overrides):
            if not isinstance(o, dict):
                raise ValueError(f"member_overrides[{i}] must be a mapping of option: value, got {o!r}")
            bad = sorted(set(o) & SHARED_BY_MEMBERS)
            unknown = sorted(set(o) - known)
            if bad or unknown:
                raise ValueError(
                    f"member_overrides[{i}]: "
                    + (f"unknown option(s) {', '.join(unknown)}" if unknown else f"{', '.join(bad)} cannot differ")
                )
            try:  # each member's config must be valid on its own (a bad backbone included, before any member trains)
                replace(self, **o, member_overrides=[])
            except ValueError as e:
                raise ValueError(f"member_overrides[{i}]: {e}") from None
        names = [self.member_name(i) for i in range(n)]
        if len(set(names)) < n:
            raise ValueError(f"member_overrides: two members would share a folder ({', '.join(names)})")
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
        return replace(self, **changes, out=out, members=1, member_overrides=[], calibrate=False, tune_decision=False)

    @classmethod
    def from_yaml(cls, path: Path, **overrides: Any) -> TrainConfig:
        try:
            raw = yaml.safe_load(_config_text(Path(path))) or {}
        except FileNotFoundError:
            raise ValueError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of option: value")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        # Overrides are applied as given, None included (`--set cache_dir=none` means the default cache root).
        return cls(**(raw | overrides))

    @classmethod
    def parse_override(cls, pair: str) -> tuple[str, Any]:
        """``KEY=VALUE`` from the command line (`dermsight train --set`) -> (key, value typed as the option).

        Typed by the option's declared type, not by YAML's guess: YAML 1.1 reads ``1e-3`` as a string, and
        ``out=2024`` must stay a folder name."""
        key, sep, text = pair.partition("=")
        key, text = key.strip(), text.strip()
        types = {f.name: str(f.type) for f in fields(cls)}
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        if key not in types:
            raise ValueError(f"--set {key}: unknown option; known: {', '.join(sorted(types))}")
        kind = types[key]
        try:
            if kind == "bool":
                flags = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
                return key, flags[text.lower()]
            if kind == "int":
                return key, int(text)
            if kind == "float":
                return key, float(text)
            if kind == "str | None":
                return key, None if text.lower() in ("", "none", "null") else text
            if kind.startswith(("dict", "list")):  # YAML flow style: {why: test}, [{seed: 1}, {seed: 2}]
                empty, typ = ({}, dict) if kind.startswith("dict") else ([], list)
                value = yaml.safe_load(text) if text else empty
                if not isinstance(value, typ):
                    raise ValueError
                return key, value
            if kind == "str":
                return key, text
        except (KeyError, ValueError, yaml.YAMLError):
            raise ValueError(f"--set {key}: {text!r} is not a valid {kind}") from None
        # An option added with a type this parser does not know must not silently arrive as a string.
        raise ValueError(f"--set {key}: options of type {kind} cannot be set from the command line; use the YAML file")

    def to_yaml(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(asdict(self), sort_keys=False))
        return path


_KINDS = {
    int: "a whole number",
    float: "a number",
    bool: "true or false",
    str: "a string",
    NoneType: "null",
    list: "a list",
    dict: "a mapping",
}


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


@cache
def _hints() -> dict[str, Any]:
    """Each option's declared type (the annotations are strings under ``from __future__ import annotations``)."""
    return get_type_hints(TrainConfig)


def _is_a(value: Any, hint: Any) -> bool:
    if isinstance(hint, UnionType):
        return any(_is_a(value, h) for h in get_args(hint))
    kind = get_origin(hint) or hint
    if isinstance(value, bool) and kind is not bool:  # True is an int to Python, not to a config
        return False
    return isinstance(value, (int, float) if kind is float else kind)


def _describe(hint: Any) -> str:
    kinds = get_args(hint) if isinstance(hint, UnionType) else (hint,)
    return " or ".join(_KINDS[get_origin(k) or k] for k in kinds)
