"""ONNX export of a saved model, the ONNX cache used by serving, int8 quantisation and the parity check.

The exported graph takes the normalised image batch (N, 3, S, S) and returns three outputs: ``logits`` (N, C),
``features`` (N, D), what the out-of-distribution gate scores, and ``cam`` (N, C, h, w), the class activation maps
the heatmap is drawn from (`backends.ServingModule`); its metadata carries the model's contract, so that the file
serves without PyTorch (`inference.runtime`). The temperature is NOT
baked in: both backends return raw logits and `Predictor` applies ``softmax(logits / T)`` in one place, so
recalibrating a model (which only rewrites T) never invalidates an exported graph, and parity is checked on the
probabilities users see."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import nn

from dermsight.data.cache import default_cache_root
from dermsight.data.images import ImageError
from dermsight.files import written_atomically
from dermsight.inference.backends import ServingModule, TorchRunner, head_is_linear
from dermsight.inference.preprocess import model_inputs, synthetic_images
from dermsight.inference.runtime import (
    CAM_KEY,
    EXTRA_KEY,
    INPUT_NAME,
    OUTPUT_NAMES,
    VERSION_KEY,
    OnnxRunner,
    pack_arrays,
)
from dermsight.inference.scoring import softmax
from dermsight.models.bundle import load_model, read_meta
from dermsight.models.contract import DIGEST_KEY, META_KEY, read_extra_arrays, read_header
from dermsight.models.meta import ModelMeta

if TYPE_CHECKING:
    import onnx


# Bumped whenever the exported graph changes (inputs, outputs, opset, metadata), so cached exports of older versions
# are not reused.
EXPORT_VERSION = 3
OPSET = 17
# The bar for "the same model": probabilities may differ by at most this much between backends.
PARITY_TOLERANCE = 1e-4


class ExportError(Exception):
    """The model could not be exported or the export does not match PyTorch; the message is fit to show a user."""


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def contract_metadata(model_path: str | os.PathLike, model: nn.Module) -> dict[str, str]:
    """The ONNX metadata that makes an export of the model file at ``model_path`` a serving model of its own
    (`runtime.read_contract`): its contract as stored, its non-weight tensors and its tensor checksum."""
    header = read_header(model_path)
    return {
        META_KEY: header[META_KEY],
        EXTRA_KEY: pack_arrays(read_extra_arrays(model_path)),
        DIGEST_KEY: header.get(DIGEST_KEY, ""),
        CAM_KEY: "1" if head_is_linear(model) else "0",
        VERSION_KEY: str(EXPORT_VERSION),
    }


def export_onnx(
    model: nn.Module, meta: ModelMeta, out: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write ``model`` as ONNX with a dynamic batch dimension, with ``metadata`` (`contract_metadata`) in the file;
    atomic (a half-written file never has the name)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    net = ServingModule(model).eval()
    dummy = torch.zeros(2, 3, meta.input_size, meta.input_size)
    dyn = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    try:
        with written_atomically(out) as tmp, warnings.catch_warnings():
            # The TorchScript-based exporter is deprecated in favour of the torch.export-based one, but that one
            # needs the onnxscript package, which dermsight does not depend on; the legacy exporter handles every
            # backbone of the factory and its output is checked against PyTorch below.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message=".*will be removed.*")
            torch.onnx.export(
                net,
                (dummy,),
                tmp,
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=dyn,
                opset_version=OPSET,
                # Unfolded, the weights keep the values the model file stores (float16 for an ensemble), so
                # `_half_weights` can store them at half size without changing one; ONNX Runtime folds BatchNorm
                # into the convolutions when it loads the graph.
                do_constant_folding=False,
            )
            import onnx

            graph = onnx.load(tmp)
            _half_weights(graph)
            for key, value in (metadata or {}).items():
                graph.metadata_props.add(key=key, value=value)
            onnx.save(graph, tmp)
    except Exception as e:
        raise ExportError(f"ONNX export of {meta.network} failed: {type(e).__name__}: {str(e)[:300]}") from e
    return out


def _half_weights(graph: onnx.ModelProto) -> None:
    """Store every float32 weight whose values float16 holds exactly as float16, with a Cast back to float32 that
    ONNX Runtime folds away at load: the bundled ensemble's weights are stored as float16, so its export halves (60 MB
    to about 30) and computes exactly as before."""
    import onnx
    from onnx import numpy_helper

    casts = []
    for init in graph.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        a = numpy_helper.to_array(init)
        half = a.astype(np.float16)
        if a.size < 16 or not np.array_equal(half.astype(np.float32), a):
            continue
        name = init.name
        init.CopyFrom(numpy_helper.from_array(half, name + ".f16"))
        casts.append(onnx.helper.make_node("Cast", [name + ".f16"], [name], to=onnx.TensorProto.FLOAT))
    nodes = [*casts, *graph.graph.node]
    del graph.graph.node[:]
    graph.graph.node.extend(nodes)


def quantize_int8(onnx_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Dynamic int8 quantisation (weights int8, activations quantised on the fly) of an exported model.

    onnxruntime's dynamic quantisation targets MatMul/Gemm, plus Conv as ConvInteger; for a convolutional network
    the accuracy change must be measured (`compare_backends`), and the speed too (bench/inference.py): it is not a
    given that int8 is faster on every CPU.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    level = root.level
    try:
        # The quantiser logs a warning on the root logger for every tensor whose type shape inference cannot pin
        # down (TF-style "same" padding slices); they are harmless and would bury the report.
        root.setLevel(logging.ERROR)
        with written_atomically(out) as tmp:
            quantize_dynamic(str(onnx_path), tmp, weight_type=QuantType.QUInt8)
    finally:
        root.setLevel(level)
    return out


# The two int8 schemes `dermsight export --int8` and bench/inference.py offer.
INT8_SCHEMES = ("dynamic", "static")
# How many images static int8 is calibrated on by default (`dermsight export --int8 static`, bench/inference.py).
CALIBRATION_IMAGES = 64


def float_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes `quantize_static_int8` leaves in float, for the graph's sake rather than speed's:

    - the shape arithmetic: nodes the image reaches only through a ``Shape`` op. TF-style "same" padding (the
      EfficientNet-Lite backbones) computes each convolution's padding from the input's size in float
      (Cast, Sub, Div, Ceil...); quantised, those sums round to other paddings and the feature maps change size;
    - what only the ``features`` and ``cam`` outputs need: the per-stage means and standard deviations
      (`backends.ServingModule`) that the out-of-distribution gate scores, cheap reductions whose rounding would move
      the gate's distance and nothing else, and the heatmap's per-position head.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    data: set[str] = set()  # nodes the image reaches without passing through Shape
    todo = [i.name for i in model.graph.input]
    while todo:
        for node in consumers.get(todo.pop(), []):
            if node.name not in data:
                data.add(node.name)
                if node.op_type != "Shape":
                    todo.extend(node.output)

    producer = {out: node for node in model.graph.node for out in node.output}

    def ancestors(output: str) -> set[str]:
        seen: set[str] = set()
        todo = [output]
        while todo:
            node = producer.get(todo.pop())
            if node is not None and node.name not in seen:
                seen.add(node.name)
                todo.extend(node.input)
        return seen

    logits, features, cam = OUTPUT_NAMES
    feature_only = (ancestors(features) | ancestors(cam)) - ancestors(logits)
    return sorted(n.name for n in model.graph.node if n.name not in data or n.name in feature_only)


def quantize_static_int8(
    fp32_onnx: str | os.PathLike,
    out: str | os.PathLike,
    calibration_inputs: np.ndarray,
    batch: int = 8,
    activations: str = "uint8",
) -> Path:
    """Static int8 quantisation (QDQ) of an exported model, calibrated on ``calibration_inputs``: preprocessed images
    (N, 3, S, S) float32 from `model_inputs`, which must not be the images the result is then judged on.

    What onnxruntime's documentation recommends for a CNN on an x86-64 CPU: static rather than dynamic quantisation,
    the QDQ format, the graph optimised and shape-inferred first (`quant_pre_process`), int8 weights per output
    channel (depthwise convolutions' channels differ widely in range), uint8 activations ("U8S8"; int8 activations
    measured slower than fp32 here) and no reduce_range on a CPU with VNNI (reduce_range's 7-bit weights are for
    AVX2 / AVX-512 CPUs without it). Activation ranges are the min/max over the calibration images. The shape
    arithmetic and what only the ``features`` and ``cam`` outputs need stay float (`float_nodes`).

    The accuracy and speed it gives are in bench/inference.md: faster than fp32, but short of the bar for serving,
    and it moves the out-of-distribution gate's scores (fitted on fp32 features) far.
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    if activations not in ("uint8", "int8"):
        raise ValueError(f"activations must be uint8 or int8, not {activations!r}")
    x = np.ascontiguousarray(calibration_inputs, dtype=np.float32)
    if x.ndim != 4 or not len(x):
        raise ValueError(f"calibration inputs must be a non-empty (N, 3, S, S) batch, not {x.shape}")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{INPUT_NAME: x[i : i + batch]} for i in range(0, len(x), batch)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    level = root.level
    try:
        root.setLevel(logging.ERROR)  # as in quantize_int8: per-tensor shape-inference warnings would bury the report
        with tempfile.TemporaryDirectory(prefix="dermsight-quant-") as work, written_atomically(out) as tmp:
            pre = str(Path(work) / "preprocessed.onnx")
            # Symbolic shape inference is for transformers; on these graphs it needs auto_merge to resolve the "same"
            # padding, gives the very same quantised model, and when it fails it leaves a copy of the model in the
            # working directory. ONNX's own shape inference and ORT's graph optimisation still run.
            quant_pre_process(str(fp32_onnx), pre, skip_symbolic_shape=True)
            ort_quantize_static(
                pre,
                tmp,
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=False,
                activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=float_nodes(onnx.load(pre)),
            )
    finally:
        root.setLevel(level)
    return out


def onnx_cache_dir() -> Path:
    return default_cache_root() / "onnx"


def cached_onnx_path(model_path: str | os.PathLike, int8: bool = False) -> Path:
    """Where serving keeps the export of ``model_path``: keyed by the model file's content, not its name, so a
    retrained or recalibrated file never reuses a stale graph and a copied file reuses a good one."""
    digest = file_sha256(model_path)[:24]
    return onnx_cache_dir() / f"{digest}-v{EXPORT_VERSION}{'-int8' if int8 else ''}.onnx"


@dataclass(frozen=True)
class Comparison:
    n: int  # images compared (those that decoded)
    max_abs_diff: float  # largest |p_a - p_b| over images and classes
    top1_agreement: float  # share of images with the same top class
    accuracy_a: float | None = None  # when labels were given
    accuracy_b: float | None = None


def compare_backends(a: np.ndarray, b: np.ndarray, targets: np.ndarray | None = None) -> Comparison:
    """Compare two (N, C) probability tables (e.g. PyTorch vs ONNX Runtime fp32, or fp32 vs int8)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    acc_a = acc_b = None
    if targets is not None and len(targets):
        acc_a = float((a.argmax(1) == targets).mean())
        acc_b = float((b.argmax(1) == targets).mean())
    return Comparison(
        n=len(a),
        # NaN compares false with any tolerance: probabilities that are not all finite never pass as equal.
        max_abs_diff=float(np.abs(a - b).max(initial=0.0)) if np.isfinite(a).all() and np.isfinite(b).all() else np.inf,
        top1_agreement=float((a.argmax(1) == b.argmax(1)).mean()) if len(a) else 1.0,
        accuracy_a=acc_a,
        accuracy_b=acc_b,
    )


def onnx_probabilities(onnx_path: str | os.PathLike, meta: ModelMeta, x: np.ndarray, threads: int = 1) -> np.ndarray:
    return softmax(OnnxRunner(onnx_path, threads)(x)[0], meta.temperature)


def torch_probabilities(model: nn.Module, meta: ModelMeta, x: np.ndarray) -> np.ndarray:
    return softmax(TorchRunner(model)(x)[0], meta.temperature)


def check_parity(
    model: nn.Module, meta: ModelMeta, onnx_path: str | os.PathLike, x: np.ndarray, threads: int = 1
) -> Comparison:
    """PyTorch vs ONNX Runtime probabilities of the same model on the preprocessed inputs ``x``."""
    return compare_backends(torch_probabilities(model, meta, x), onnx_probabilities(onnx_path, meta, x, threads))


def ensure_onnx(model_path: str | os.PathLike, model: nn.Module | None = None, threads: int = 1) -> Path:
    """The cached ONNX export of ``model_path``, exporting and parity-checking it first if it is not cached yet.

    Several server workers may start at once: each exports to a temporary name and renames, so none ever reads a
    half-written file; the last rename wins and the files are identical anyway.
    """
    cached = cached_onnx_path(model_path)
    if cached.is_file():
        return cached
    if model is None:
        model, meta = load_model(model_path)
    else:
        meta = read_meta(model_path)
    cached.parent.mkdir(parents=True, exist_ok=True)
    with written_atomically(cached, suffix=".onnx") as tmp:
        export_onnx(model, meta, tmp, contract_metadata(model_path, model))
        # Synthetic images here (serving has no real ones at hand): this catches a broken export or runtime;
        # `dermsight export` and the test suite check parity on real images.
        cmp = check_parity(model, meta, tmp, model_inputs(meta, list(synthetic_images())), threads)
        if cmp.max_abs_diff > PARITY_TOLERANCE:
            raise ExportError(
                f"ONNX export differs from PyTorch by {cmp.max_abs_diff:.2e} in probability "
                f"(tolerance {PARITY_TOLERANCE:.0e})"
            )
    return cached


def parity_inputs(
    items: Sequence[str | os.PathLike], meta: ModelMeta, limit: int = 64, split: str = "val"
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Preprocessed inputs for a parity check from image files, folders and manifests (CSV with `path`: its
    ``split`` split if it has one, with labels when they are in the model's taxonomy). Unreadable images are
    skipped. (Static int8 calibration reads a manifest's `train` split through this, so it never calibrates on the
    `val` images it is then checked on.)

    Returns the inputs, the labels (None unless every image has one) and a description for the report.
    """
    from dermsight.data.manifest import list_images, read_labels

    paths: list[str] = []
    labels: list[int] | None = []
    for item in items:
        p = Path(item)
        if p.suffix.lower() == ".csv" and p.is_file():
            df = pd.read_csv(p, dtype={"path": str})
            if "path" not in df.columns:
                raise ValueError(f"{p}: a manifest needs a `path` column")
            if "split" in df.columns and (df["split"] == split).any():
                df = df[df["split"] == split]
            df = df.sample(min(limit, len(df)), random_state=0)
            paths += [str(x) for x in df["path"]]
            y = read_labels(df, meta, strict=False)
            labels = labels + list(y) if labels is not None and y is not None else None
        else:
            paths += [str(x) for x in list_images(p)]
            labels = None
    xs, ys = [], []
    for i, path in enumerate(paths[:limit]):
        try:
            xs.append(model_inputs(meta, [path])[0])
        except ImageError:
            continue
        if labels is not None:
            ys.append(labels[i])
    if not xs:
        raise ValueError("none of the check images could be read")
    y_arr = np.array(ys) if labels is not None else None
    return np.stack(xs), y_arr, f"{len(xs)} image(s)" + (" with labels" if y_arr is not None else "")


@dataclass
class ExportReport:
    onnx: Path
    seconds: float
    checked_on: str
    parity: Comparison
    int8: Path | None = None
    int8_vs_fp32: Comparison | None = None
    int8_scheme: str = "dynamic"
    calibrated_on: str = ""  # static int8: what the activation ranges were measured on

    @property
    def ok(self) -> bool:
        return self.parity.max_abs_diff <= PARITY_TOLERANCE

    def lines(self, meta: ModelMeta) -> list[str]:
        out = [
            f"exported {meta.network} to {self.onnx} in {self.seconds:.1f} s (input '{INPUT_NAME}' N x 3 x "
            f"{meta.input_size} x {meta.input_size}, dynamic batch; outputs 'logits', 'features', 'cam'; the model's "
            f"contract in its metadata; probabilities = softmax(logits / T) with T = {meta.temperature:.4f} from the "
            "model file, not baked in)",
            f"parity with PyTorch on {self.checked_on}: max |probability difference| {self.parity.max_abs_diff:.2e} "
            f"(tolerance {PARITY_TOLERANCE:.0e}) -> {'OK' if self.ok else 'FAILED'}; top-1 agreement "
            f"{self.parity.top1_agreement:.1%}",
        ]
        q = self.int8_vs_fp32
        if self.int8 is not None and q is not None:
            how = (
                "dynamic quantisation"
                if self.int8_scheme == "dynamic"
                else f"static QDQ, calibrated on {self.calibrated_on}"
            )
            line = (
                f"int8 ({how}) written to {self.int8} ({self.int8.stat().st_size / 2**20:.1f} MB vs "
                f"{self.onnx.stat().st_size / 2**20:.1f} MB); vs fp32: max |probability difference| "
                f"{q.max_abs_diff:.3f}, top-1 agreement {q.top1_agreement:.1%}"
            )
            if q.accuracy_a is not None and q.accuracy_b is not None:
                line += f", accuracy {q.accuracy_a:.3f} -> {q.accuracy_b:.3f} ({q.accuracy_b - q.accuracy_a:+.3f})"
            out.append(line)
        return out


def export_model(
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    check: Sequence[str | os.PathLike] = (),
    max_check: int = 64,
    int8: bool | str = False,
    threads: int = 1,
    calibration: Sequence[str | os.PathLike] = (),
    max_calibration: int = CALIBRATION_IMAGES,
) -> tuple[ExportReport, ModelMeta]:
    """`dermsight export`: export, check parity on ``check`` images (default: synthetic), optionally quantise.

    ``int8``: False, "dynamic" (True means it too) or "static"; static needs ``calibration`` images (files, folders,
    or a manifest, whose `train` split is used), which must not be the check images."""
    scheme = "dynamic" if int8 is True else (int8 or None)
    if scheme not in (None, *INT8_SCHEMES):
        raise ValueError(f"int8 must be one of {', '.join(INT8_SCHEMES)}, not {int8!r}")
    if scheme == "static" and not calibration:
        raise ValueError("static int8 needs calibration images (--calibration-images), other than the check images")
    model, meta = load_model(model_path)
    out = Path(out)
    # The check images first: a mistyped --check-images is a usage error, and nothing at --out is replaced.
    if check:
        x, y, what = parity_inputs(check, meta, max_check)
    else:
        x, y, what = model_inputs(meta, list(synthetic_images(8))), None, "8 synthetic images"
    if scheme == "static":
        xc, _, calibrated_on = parity_inputs(calibration, meta, max_calibration, split="train")
        # Judging the quantised model on the images it was calibrated on would flatter it.
        checked = {hashlib.sha256(a.tobytes()).digest() for a in x}
        if any(hashlib.sha256(a.tobytes()).digest() in checked for a in xc):
            raise ValueError("the calibration images include check images: calibrate on others")
    t0 = time.perf_counter()
    export_onnx(model, meta, out, contract_metadata(model_path, model))
    seconds = time.perf_counter() - t0
    report = ExportReport(out, seconds, what, check_parity(model, meta, out, x, threads))
    if scheme is not None:
        int8_out = out.with_name(out.stem + ".int8.onnx")
        if scheme == "static":
            report.int8 = quantize_static_int8(out, int8_out, xc)
            report.int8_scheme, report.calibrated_on = "static", calibrated_on
        else:
            report.int8 = quantize_int8(out, int8_out)
        fp32 = onnx_probabilities(out, meta, x, threads)
        report.int8_vs_fp32 = compare_backends(fp32, onnx_probabilities(report.int8, meta, x, threads), y)
    return report, meta
