"""Calibration of a trained model on its validation split: temperature scaling and the out-of-distribution gate.

Temperature scaling (Guo et al., 2017) divides the logits by one number T, fitted to minimise the negative
log-likelihood of the validation labels. It changes no prediction (the arg-max is the same), only how confident the
probabilities are, and it is the simplest method that fixes the over-confidence of fine-tuned CNNs. (It cannot undo a
shift of the class priors, such as the one a class-weighted loss builds in; that needs per-class biases, which would
change predictions and so belongs to training.)

`calibrate_model` also records the training images' level of detail (size and JPEG quality, see
`predictor.match_detail`), fits the out-of-distribution gate (`ood.OODGate`) on training-split lesion features, sets
its threshold on the validation split, and measures what it costs and gains: the share of lesions rejected on val,
on the held-out test split and on square 224 px centre crops of it (the shape of the external test data) and, when
negatives are given, the share of non-lesion photos rejected. Everything is written into the model file, so serving
uses it and the model card quotes it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from scipy.optimize import minimize_scalar
from tqdm.auto import tqdm

from dermsight.data.images import ImageError, probe
from dermsight.data.manifest import ID_COLUMNS, LABEL_COLUMNS, walk
from dermsight.data.problems import DataError
from dermsight.data.split import split_fingerprint
from dermsight.evaluation.metrics import expected_calibration_error, softmax
from dermsight.inference.backends import feature_layout
from dermsight.inference.negatives import everyday_images
from dermsight.inference.ood import OODGate
from dermsight.inference.predictor import BackendName, Predictor
from dermsight.models.bundle import ModelMeta, load_model, update_meta

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


# ------------------------------------------------------------------------------------------------ temperature


def nll(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``targets`` under ``softmax(logits / temperature)``."""
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-log_p[np.arange(len(z)), np.asarray(targets)].mean())


def fit_temperature(logits: np.ndarray, targets: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T minimising the NLL of ``targets`` under ``softmax(logits / T)``.

    Optimised over log T: the NLL is smooth and unimodal in it, and one bounded scalar search (Brent) finds the
    minimum to 1e-6 without gradients or a learning rate.
    """
    logits, targets = np.asarray(logits, np.float64), np.asarray(targets)
    if logits.ndim != 2 or len(logits) != len(targets) or not len(logits):
        raise ValueError(f"need (N, C) logits and N targets, got {logits.shape} and {targets.shape}")
    res = minimize_scalar(
        lambda log_t: nll(logits, targets, math.exp(log_t)),
        bounds=(math.log(bounds[0]), math.log(bounds[1])),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(math.exp(res.x))


# ------------------------------------------------------------------------------------------------ source detail

# The IJG (libjpeg) luminance quantisation table for quality 50, in natural order; quality q scales it by 5000/q
# (q < 50) or 200 - 2q percent. Nearly every encoder (libjpeg, Pillow, cameras' "standard" tables) uses it.
_IJG_LUMA = np.array(
    [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
     14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
     49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99],
)  # fmt: skip


def jpeg_quality(path: str | os.PathLike) -> int:
    """The IJG quality setting a JPEG file was most likely saved with (0 when it is not a JPEG)."""
    with Image.open(path) as im:
        tables = getattr(im, "quantization", None) if im.format in ("JPEG", "MPO") else None
    if not tables or 0 not in tables or len(tables[0]) != 64:
        return 0
    luma = np.array(tables[0], dtype=np.float64)
    best, best_err = 0, float("inf")
    for q in range(1, 101):
        scale = 5000 / q if q < 50 else 200 - 2 * q
        ref = np.clip(np.floor((_IJG_LUMA * scale + 50) / 100), 1, 255)
        err = float(np.abs(ref - luma).sum())
        if err < best_err:
            best, best_err = q, err
    return best


def source_detail(paths: Sequence[str], sample: int = 64) -> tuple[int, int]:
    """(median shorter side, median JPEG quality) of a random sample of training images; quality 0 when most are
    not JPEGs."""
    rng = np.random.default_rng(0)
    pick = [paths[i] for i in rng.choice(len(paths), min(sample, len(paths)), replace=False)]
    sides, qualities = [], []
    for p in pick:
        try:
            info = probe(p)
            sides.append(min(info.width, info.height))
            qualities.append(jpeg_quality(p))
        except (ImageError, OSError):
            continue
    if not sides:
        raise DataError("none of the sampled training images could be read")
    return int(np.median(sides)), int(np.median(qualities))


# ------------------------------------------------------------------------------------------------ scoring


def square_crop(image: np.ndarray, size: int = 224) -> np.ndarray:
    """The centre square of ``image`` resized to ``size``: how the external test data was made from 4:3 frames."""
    h, w = image.shape[:2]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    return np.array(Image.fromarray(image[y0 : y0 + s, x0 : x0 + s]).resize((size, size), Image.Resampling.BICUBIC))


@dataclass
class Scored:
    """What the predictor computes for a set of images, gates not applied."""

    logits: np.ndarray  # (N, C); NaN rows for images that failed or that the quality gate rejected
    features: np.ndarray  # (N, D); same
    quality_rejected: np.ndarray  # (N,) bool
    failed: np.ndarray  # (N,) bool: could not be decoded

    @property
    def usable(self) -> np.ndarray:
        return ~(self.quality_rejected | self.failed)


def score_images(
    predictor: Predictor,
    sources: Sequence[str | os.PathLike | bytes | np.ndarray],
    view: Callable[[np.ndarray], np.ndarray] | None = None,
    desc: str = "scoring",
    progress: bool = True,
    batch_size: int = 64,
) -> Scored:
    """Logits and features of ``sources`` through the predictor's own decode, quality gate and preprocessing.

    ``view`` is applied to each decoded image first (e.g. `square_crop`, to see the images as the external test
    set presents them).
    """
    n = len(sources)
    logits = np.full((n, predictor.meta.num_classes), np.nan, np.float32)
    feats: np.ndarray | None = None
    rejected, failed = np.zeros(n, bool), np.zeros(n, bool)
    for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress or None):
        idx, xs = [], []
        for i in range(start, min(start + batch_size, n)):
            try:
                image = predictor.decode(sources[i])
            except ImageError:
                failed[i] = True
                continue
            if view is not None:
                image = view(image)
            if not predictor.check_quality(image).ok:
                rejected[i] = True
                continue
            idx.append(i)
            xs.append(predictor.preprocess(image))
        if not idx:
            continue
        lo, fe = predictor.forward(np.stack(xs))
        if feats is None:
            feats = np.full((n, fe.shape[1]), np.nan, np.float32)
        logits[idx], feats[idx] = lo, fe
    return Scored(logits, feats if feats is not None else np.zeros((n, 0), np.float32), rejected, failed)


# ------------------------------------------------------------------------------------------------ the command


def read_split_manifest(data: str | os.PathLike) -> pd.DataFrame:
    """A split manifest (CSV with `path` and `split`), or a training run folder holding one as split.csv."""
    data = Path(data)
    path = data / "split.csv" if data.is_dir() else data
    if not path.is_file():
        raise DataError(
            f"{data}: expected a split manifest CSV (with `path` and `split` columns, e.g. a run's split.csv) or a "
            "training run folder that holds split.csv"
        )
    # Ids stay text: "0001" read as the number 1 would no longer match the fingerprint the model recorded.
    df = pd.read_csv(path, dtype={"path": str, **dict.fromkeys(ID_COLUMNS, str)})
    missing = [c for c in ("path", "split") if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; `dermsight data split` writes them")
    return df


def split_mismatch(meta: ModelMeta, df: pd.DataFrame) -> str | None:
    """Why ``df`` is probably not the split ``meta``'s model was trained on, or None.

    Fitting a temperature, gate or decision rule on a "val" split that holds the model's own training images would
    make it look surer than it is, and its "test" scores would not be held out. The model records its split's
    sizes (`ModelMeta.split`, "... train N, val N, test N images"; an ensemble its first member's); a model without
    them is not checked. Rows without a label in the model's taxonomy are not counted, as training does not count them.
    Models trained since 2026-11-27 also record a fingerprint of which image is in which split
    (`data.split.split_fingerprint`), which tells apart two splits of the same sizes; older ones are compared by size
    only (seed 1 of HAM10000's split is off by one image, but another of exactly the same sizes would pass)."""
    recorded = dict(re.findall(r"\b(train|val|test) (\d+)", meta.split or ""))
    if set(recorded) != {"train", "val", "test"}:
        return None
    col = LABEL_COLUMNS[meta.taxonomy]
    labelled = df[df[col].notna()] if col in df.columns else df
    given = {name: int((labelled["split"] == name).sum()) for name in recorded}
    risk = "its val and test images may include training images, which would make the fit look better than it is"
    if not all(given[k] == int(v) for k, v in recorded.items()):
        return (
            f"this split ({', '.join(f'{k} {given[k]}' for k in recorded)}) is not the one the model was trained on "
            f"({', '.join(f'{k} {v}' for k, v in recorded.items())}): {risk}"
        )
    fingerprint = re.search(r"\bfingerprint ([0-9a-f]{16})\b", meta.split or "")
    keyed = "path" in df.columns or "image_id" in df.columns
    if fingerprint and keyed and split_fingerprint(df, col) != fingerprint[1]:
        return f"this split has the sizes of the one the model was trained on but puts other images in them: {risk}"
    return None


def list_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise DataError(f"{folder}: no such file or folder")
    # Hidden files (macOS "._photo.jpg" resource forks, say) are not pictures, like hidden folders.
    files = (Path(d, n) for d, names in walk(folder) for n in names if not n.startswith("."))
    return sorted(p for p in files if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_labels(df: pd.DataFrame, meta: ModelMeta, strict: bool = True) -> np.ndarray | None:
    """Class indices (in the model's logit order) of a manifest's rows, from its label column for the model's
    taxonomy. Missing or foreign labels raise `DataError`, or give None when not ``strict``."""
    col = LABEL_COLUMNS[meta.taxonomy]
    if col not in df.columns:
        if not strict:
            return None
        raise DataError(f"the manifest has no {col} column, needed to calibrate a {meta.taxonomy} model")
    index = {c: i for i, c in enumerate(meta.classes)}
    y = df[col].map(index)
    if y.isna().any():
        if not strict:
            return None
        reasons = []
        missing = int(df[col].isna().sum())
        if missing:
            # Typically data labelled in another taxonomy: HAM10000's akiec is AK or SCC in ISIC 2019, so a
            # HAM-labelled split has no ISIC 2019 class for those rows.
            reasons.append(
                f"{missing} of {len(df)} image(s) have no {col} label, which this {meta.taxonomy} model needs (use "
                f"data labelled in the {meta.taxonomy} taxonomy, such as the split of a run that trained this model)"
            )
        # Not astype(str): pandas 3 keeps a missing label missing there, and join() then fails on it.
        bad = sorted(str(v) for v in set(df.loc[y.isna(), col]) if not pd.isna(v))
        if bad:
            reasons.append(f"labels {', '.join(bad)} are not classes of this model")
        raise DataError(f"{'; '.join(reasons)} (its classes: {', '.join(meta.classes)})")
    return y.to_numpy(int)


def _rate(mask: np.ndarray) -> float:
    return round(float(mask.mean()), 4) if len(mask) else 0.0


def _gate_scores(gate: OODGate, s: Scored) -> np.ndarray:
    """The gate's score of every image of ``s`` (0 where there is none: failed or quality-rejected)."""
    out = np.zeros(len(s.usable))
    if s.usable.any():
        out[s.usable] = gate.score(s.features[s.usable])
    return out


def _rejections(s: Scored, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """Shares of decodable images rejected by the quality gate, by the OOD gate, and by either."""
    ok = ~s.failed
    ood = np.zeros(len(ok), bool)
    ood[s.usable] = scores[s.usable] > threshold
    return {
        "n": int(ok.sum()),
        "quality": _rate(s.quality_rejected[ok]),
        "ood": _rate(ood[ok]),
        "total": _rate((s.quality_rejected | ood)[ok]),
    }


def calibrate_model(
    model_path: str | os.PathLike,
    manifest: str | os.PathLike | pd.DataFrame,
    out_path: str | os.PathLike | None = None,
    *,
    negatives: Sequence[str | os.PathLike] = (),
    target_rejection: float = 0.01,
    components: int = 32,
    max_fit_images: int = 4000,
    match_source: bool = True,
    backend: BackendName = "auto",
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit the temperature and the OOD gate of ``model_path`` and write them into ``out_path`` (default: in place).

    ``manifest``: a split manifest (or run folder with split.csv). Lesion features of the ``train`` split (at most
    ``max_fit_images``, drawn at random) fit the feature densities; the ``val`` split fits the temperature and sets
    the threshold so that ``target_rejection`` of its lesions are rejected; the ``test`` split (if any) is only
    measured, as 4:3 frames and as 224 px square centre crops (the shape of the external test data).
    ``match_source``: record the training images' size and JPEG quality in the model (`ModelMeta.source_short_side`,
    `source_jpeg_quality`) so serving brings inputs to that level of detail first. ``negatives``: image files of
    things that are not skin lesions, to measure the share caught.
    Returns the report that is also stored in the model (``meta.ood`` and ``meta.metrics``).
    """
    df = manifest if isinstance(manifest, pd.DataFrame) else read_split_manifest(manifest)
    model_path = Path(model_path)
    model, meta = load_model(model_path)
    parts = {name: df[df["split"] == name] for name in ("train", "val", "test")}
    if parts["val"].empty:
        raise DataError("the manifest has no `val` split to calibrate on")
    fit_df = parts["train"] if not parts["train"].empty else parts["val"]
    side, quality = source_detail([str(p) for p in fit_df["path"]]) if match_source else (0, 0)
    meta = ModelMeta(**{**asdict(meta), "source_short_side": side, "source_jpeg_quality": quality})
    predictor = Predictor.from_path(model_path, backend=backend, threads=threads, meta=meta)
    if len(fit_df) > max_fit_images:
        fit_df = fit_df.sample(max_fit_images, random_state=0)

    def run(frame: pd.DataFrame, name: str, view=None) -> Scored:
        return score_images(predictor, [str(p) for p in frame["path"]], view, name, progress)

    fit = run(fit_df, "fit (train)")
    val = run(parts["val"], "val")
    y_val = read_labels(parts["val"], meta)

    # Temperature: on the validation lesions that pass the quality gate (the ones that would get a diagnosis).
    ok = val.usable
    temperature = fit_temperature(val.logits[ok], y_val[ok])
    calib: dict[str, Any] = {
        "temperature": round(temperature, 5),
        "fitted_on": f"val split ({int(ok.sum())} images)",
        "val": _calibration_numbers(val.logits[ok], y_val[ok], temperature),
    }

    layout = feature_layout(model, fit.features.shape[1])
    gate = OODGate.fit(fit.features[fit.usable], layout, k=components).calibrated(val.features[ok], target_rejection)
    rates: dict[str, Any] = {"val": _rejections(val, _gate_scores(gate, val), gate.threshold)}
    if not parts["test"].empty:
        test = run(parts["test"], "test")
        rates["test"] = _rejections(test, _gate_scores(gate, test), gate.threshold)
        y_test = read_labels(parts["test"], meta)
        calib["test"] = _calibration_numbers(test.logits[test.usable], y_test[test.usable], temperature)
        crops = run(parts["test"], "test, 224 px square crops", square_crop)
        rates["test_square224"] = _rejections(crops, _gate_scores(gate, crops), gate.threshold)
    builtin = score_images(predictor, list(everyday_images().values()), desc="built-in negatives", progress=progress)
    rates["builtin_negatives"] = _rejections(builtin, _gate_scores(gate, builtin), gate.threshold)
    if negatives:
        neg = score_images(predictor, [str(p) for p in negatives], desc="negatives", progress=progress)
        rates["negatives"] = _rejections(neg, _gate_scores(gate, neg), gate.threshold)

    ood = gate.describe() | {
        "target_rejection": target_rejection,
        "fitted_on": f"train split ({int(fit.usable.sum())} lesion images)",
        "threshold_set_on": f"val split ({int(ok.sum())} lesion images)",
        "rejection_rates": rates,
        "fitted": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    metrics = _updated_metrics(meta.metrics, calib, rates)
    new_meta = ModelMeta(**{**asdict(meta), "temperature": temperature, "ood": ood, "metrics": metrics})
    # The weights are rewritten exactly as stored (an ensemble keeps its float16); only meta and gate change.
    out = update_meta(model_path, new_meta, out_path, extra=gate.to_tensors())
    return {
        "model": str(out),
        "temperature": temperature,
        "source": {"short_side": side, "jpeg_quality": quality},
        "calibration": calib,
        "ood": ood,
    }


def _updated_metrics(metrics: dict[str, Any], calib: dict[str, Any], rates: dict[str, Any]) -> dict[str, Any]:
    """The model's metrics with calibration results merged in where the model card looks for them: each split's
    ``ece`` becomes the calibrated one, with ``ece_before_temperature`` beside it; ``rejection`` summarises the
    gates in words."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in metrics.items()}
    for split in ("val", "test"):
        if split in calib and isinstance(out.get(split), dict):
            out[split]["ece"] = calib[split]["ece_after"]
            out[split]["ece_before_temperature"] = calib[split]["ece_before"]
    out["calibration"] = calib
    names = {
        "val": "validation lesions rejected (threshold set here)",
        "test": "held-out test lesions rejected",
        "test_square224": "held-out test lesions rejected, as 224 px square centre crops",
        "builtin_negatives": "non-lesion pictures rejected (built-in set: package photos, crops, synthetic)",
        "negatives": "non-lesion photos rejected (--negatives)",
    }
    out["rejection"] = {
        names[
            k
        ]: f"{r['total']:.1%} of {r['n']} (image-quality gate {r['quality']:.1%}, not-a-lesion gate {r['ood']:.1%})"
        for k, r in rates.items()
    }
    return out


def _calibration_numbers(logits: np.ndarray, y: np.ndarray, temperature: float) -> dict[str, Any]:
    before, after = softmax(logits), softmax(logits, temperature)
    return {
        "n": len(y),
        "ece_before": round(expected_calibration_error(before, y), 4),
        "ece_after": round(expected_calibration_error(after, y), 4),
        "nll_before": round(nll(logits, y), 4),
        "nll_after": round(nll(logits, y, temperature), 4),
    }


def report_lines(report: dict[str, Any]) -> list[str]:
    """`calibrate_model`'s report as text for the command line."""
    cal, ood = report["calibration"], report["ood"]
    src = report["source"]
    lines = [
        f"training images: shorter side {src['short_side']} px, JPEG quality {src['jpeg_quality']} "
        "(inputs are brought to this level of detail; 0 = as they are)",
        f"temperature {report['temperature']:.4f} (fitted on the {cal['fitted_on']})",
    ]
    for split in ("val", "test"):
        if split in cal:
            c = cal[split]
            lines.append(
                f"  {split}: ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}, NLL {c['nll_before']:.4f} -> "
                f"{c['nll_after']:.4f} (n={c['n']})"
            )
    lines.append(
        f"not-a-lesion gate: {ood['method']} over {len(ood['blocks'])} feature blocks, threshold "
        f"{ood['threshold']:.4f} "
        f"(fitted on the {ood['fitted_on']}; threshold set on the {ood['threshold_set_on']})"
    )
    for name, r in ood["rejection_rates"].items():
        what = "non-lesion images caught" if name.endswith("negatives") else "lesions rejected"
        lines.append(
            f"  {name}: {what} {r['total']:.1%} (quality gate {r['quality']:.1%}, OOD {r['ood']:.1%}; n={r['n']})"
        )
    lines.append(f"written to {report['model']}")
    return lines
