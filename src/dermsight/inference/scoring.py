"""Scoring: images in, logits and the gate's features out, by one path for every caller.

`score_images` decodes each image as serving does (`preprocess.decode`), applies an optional view (a square crop, a
colour shift), the optional image-quality gate, then the model's own preprocessing (`preprocess.to_model_input`), and
runs the network in batches through `forward`, with the eight-view TTA when asked. `dermsight evaluate`, calibration,
the decision rule, soups, a training run's final scores, the robustness shifts, the bench scripts and `Predictor`
itself all score through it, so a figure means the same thing wherever it is reported.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from dermsight.data.images import ImageError
from dermsight.data.problems import DataError
from dermsight.inference.preprocess import Source, canonical, decode, decode_side, image_views, to_model_input
from dermsight.inference.quality import QUALITY_THRESHOLDS, QualityReport, QualityThresholds, check_quality
from dermsight.models.meta import ModelMeta

if TYPE_CHECKING:
    from torch import nn

# A network run: (N, 3, S, S) float32 inputs -> (N, C) raw logits and (N, D) features (`backends`).
Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
View = Callable[[np.ndarray], np.ndarray]


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def runner_for(model: nn.Module | Runner) -> Runner:
    """A network as a `Runner`: a PyTorch module is run eagerly (on the device its weights are on). (A process that
    never imported PyTorch holds no PyTorch module, so a serving install never imports it here.)"""
    torch: Any = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        from dermsight.inference.backends import TorchRunner

        return TorchRunner(model)
    return model


# Views per image with test-time augmentation: the eight symmetries of the square (`preprocess.image_views`).
TTA_VIEWS = 8


def tta_for(views: int) -> bool:
    """Whether answers served with ``views`` views a photo use test-time augmentation: 8, the eight symmetries
    averaged; 1, the photo in its canonical orientation (`preprocess.canonical`). Anything else is a ValueError."""
    if views not in (1, TTA_VIEWS):
        raise ValueError(f"views must be 1 or {TTA_VIEWS}, not {views}")
    return views == TTA_VIEWS


def forward(run: Runner, x: np.ndarray, views: int = 1, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(N * views, 3, S, S) inputs, each image's ``views`` consecutive -> (N, C) logits and (N, D) features, each the
    mean over the image's views; about ``batch_size`` inputs per pass (whole images).

    With the eight `preprocess.image_views` (dermoscopy has no up or left, so each is as valid as the original) both
    the class scores and the not-a-lesion gate's features are the same for a photo however it is turned or mirrored:
    the eight views of a turned photo are the eight views of the photo (`dermsight calibrate` sets the gate's
    threshold on such averaged features).
    """
    logits, feats = [], []
    step = max(1, batch_size // views) * views
    for i in range(0, len(x), step):
        lo, fe = run(np.ascontiguousarray(x[i : i + step], dtype=np.float32))
        n = len(lo) // views
        logits.append(lo.reshape(n, views, lo.shape[-1]).mean(1))
        feats.append(fe.reshape(n, views, fe.shape[-1]).mean(1))  # a test double's features may be 0 wide
    if not logits:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate(logits), np.concatenate(feats)


@dataclass
class Scored:
    """What the network says of a set of images, the not-a-lesion gate not applied."""

    logits: np.ndarray  # (N, C); NaN rows for images that failed or that the quality gate rejected
    features: np.ndarray  # (N, D); same
    errors: dict[int, ImageError] = field(default_factory=dict)  # why each image that could not be decoded failed
    quality: dict[int, QualityReport] = field(default_factory=dict)  # the gate's report per checked image

    @property
    def failed(self) -> np.ndarray:
        """(N,) bool: could not be decoded."""
        return np.isin(np.arange(len(self.logits)), list(self.errors))

    @property
    def quality_rejected(self) -> np.ndarray:
        """(N,) bool: refused by the image-quality gate."""
        return np.isin(np.arange(len(self.logits)), [i for i, r in self.quality.items() if not r.ok])

    @property
    def usable(self) -> np.ndarray:
        return ~(self.quality_rejected | self.failed)

    def failures(self) -> list[tuple[int, str]]:
        """(index, reason) of each image that could not be decoded, in order."""
        return [(i, str(e)) for i, e in sorted(self.errors.items())]

    def require_usable(self, paths: Sequence[str], what: str) -> list[tuple[str, str]]:
        """The (path, reason) of each image of ``paths`` (those scored) that could not be decoded, to report; raises
        `DataError` when no image at all is usable, naming the first reasons, instead of an error from fitting on
        nothing. ``what``: the images, in words ("val split")."""
        unreadable = [(str(paths[i]), reason) for i, reason in self.failures()]
        if not self.usable.any():
            first = "; ".join(f"{p}: {r}" for p, r in unreadable[:3])
            why = f" (could not be read: {first})" if first else " (all refused by the image-quality gate)"
            raise DataError(f"none of the {len(paths)} images of the {what} can be used{why}")
        return unreadable


@dataclass
class _Prepared:
    x: np.ndarray | None = None
    error: ImageError | None = None
    report: QualityReport | None = None


def _prepare(
    source: Source, meta: ModelMeta, side: int, view: View | None, quality: QualityThresholds | None, tta: bool
) -> _Prepared:
    """One image through serving's decode, the ``view``, `preprocess.canonical`, the quality gate (when given) and the
    model's preprocessing: ``x`` is (1, 3, S, S), or with ``tta`` (8, 3, S, S), the model inputs of the eight
    `preprocess.image_views`."""
    try:
        image = decode(source, side)
    except ImageError as e:
        return _Prepared(error=e)
    if view is not None:
        image = view(image)
    # Everything after this sees the photo in its canonical orientation, so no answer, refusal included, depends on
    # how it was turned; with ``tta`` the eight views are the same set either way.
    image = canonical(image)
    report = None
    if quality is not None:
        report = check_quality(image, quality)
        if not report.ok:
            return _Prepared(report=report)
    views = image_views(image) if tta else [image]
    return _Prepared(np.stack([to_model_input(v, meta) for v in views]), report=report)


def input_batches(
    meta: ModelMeta,
    sources: Sequence[Source],
    *,
    view: View | None = None,
    quality: QualityThresholds | None = None,
    batch_size: int = 64,
    workers: int = 4,
    progress: bool = True,
    desc: str = "scoring",
    tta: bool = False,
) -> Iterator[tuple[range, list[_Prepared]]]:
    """The model inputs of ``sources`` in chunks of ``batch_size``: (the chunk's indices, each image's preparation;
    with ``tta`` the eight views' inputs). Images are decoded ``workers`` at a time (decoding, not the network,
    dominates on large photos)."""
    side = decode_side(meta, quality or QUALITY_THRESHOLDS)

    def prepare(i: int) -> _Prepared:
        return _prepare(sources[i], meta, side, view, quality, tta)

    pool = ThreadPoolExecutor(workers) if workers > 1 and len(sources) > 1 else None
    try:
        chunks = range(0, len(sources), batch_size)
        for start in tqdm(chunks, desc=desc, unit="batch", disable=not progress or None):
            idx = range(start, min(start + batch_size, len(sources)))
            yield idx, list(pool.map(prepare, idx) if pool else map(prepare, idx))
    finally:
        if pool is not None:
            pool.shutdown()


def score_images(
    model: nn.Module | Runner,
    meta: ModelMeta,
    sources: Sequence[Source],
    *,
    view: View | None = None,
    tta: bool = False,
    quality: QualityThresholds | None = None,
    batch_size: int = 64,
    workers: int = 4,
    progress: bool = True,
    desc: str = "scoring",
) -> Scored:
    """Logits and features of ``sources`` through the serving path (see the module's docstring).

    ``model``: a PyTorch network or a `Runner` (`Predictor`'s ONNX Runtime session, say). ``view`` changes each decoded
    image first (`preprocess.square_crop`, a colour cast from `evaluation.shifts`). ``quality``: apply the
    image-quality gate with these thresholds (rejected images get NaN rows); None scores every decodable image.
    """
    run = runner_for(model)
    n = len(sources)
    logits = np.full((n, meta.num_classes), np.nan, np.float32)
    feats: np.ndarray | None = None
    errors: dict[int, ImageError] = {}
    reports: dict[int, QualityReport] = {}
    # With TTA a chunk holds a batch's worth of model inputs, eight per image.
    chunk = max(1, batch_size // TTA_VIEWS) if tta else batch_size
    for idx, prepared in input_batches(
        meta, sources, view=view, quality=quality, batch_size=chunk, workers=workers, progress=progress, desc=desc,
        tta=tta,
    ):  # fmt: skip
        keep = []
        for i, p in zip(idx, prepared, strict=True):
            if p.error is not None:
                errors[i] = p.error
            if p.report is not None:
                reports[i] = p.report
            if p.x is not None:
                keep.append(i)
        if not keep:
            continue
        x = np.concatenate([p.x for p in prepared if p.x is not None])
        lo, fe = forward(run, x, views=TTA_VIEWS if tta else 1, batch_size=batch_size)
        if feats is None:
            feats = np.full((n, fe.shape[1]), np.nan, np.float32)
        logits[keep], feats[keep] = lo, fe
    features = feats if feats is not None else np.zeros((n, 0), np.float32)
    return Scored(logits, features, errors, reports)
