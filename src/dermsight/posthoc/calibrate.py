"""`dermsight calibrate`: fit what serving needs beyond the weights, on the model's own split.

`calibrate_model` records the training images' level of detail (size and JPEG quality, see
`preprocess.match_detail`), fits the temperature on the validation split (`temperature.fit_temperature`; it changes no
prediction, only how confident the probabilities are), fits the not-a-lesion gate (`ood.OODGate`) on training-split
lesion features and sets its threshold on the validation split, then measures what the gates cost and gain: the share
of lesions rejected on val, on the held-out test split and on square 224 px centre crops of it (the shape of the
external test data) and, when negatives are given, the share of non-lesion photos rejected. Everything is written into
the model file, so serving uses it and the model card quotes it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dermsight.data.images import ImageError, jpeg_quality, probe
from dermsight.data.manifest import read_labels, read_split_manifest, sources_of
from dermsight.data.problems import DataError
from dermsight.evaluation.metrics import expected_calibration_error
from dermsight.evaluation.shifts import air_bubbles, compose, hair
from dermsight.inference.backends import TorchRunner, feature_layout
from dermsight.inference.ood import OODGate
from dermsight.inference.predictor import BackendName, Predictor
from dermsight.inference.preprocess import dermatoscope_field, square_crop
from dermsight.inference.scoring import Scored, softmax, tta_for
from dermsight.inference.selftest import probe_record
from dermsight.models.bundle import load_model, update_meta
from dermsight.models.meta import ModelMeta
from dermsight.posthoc.negatives import everyday_images
from dermsight.posthoc.temperature import fit_temperature, nll

# Contact dermoscopy as many clinics take it: hairs and air bubbles in the immersion fluid, inside the dermatoscope's
# round black field. The gate's threshold is set on validation lesions shown so as well (`calibrate_model`).
CONTACT_ARTEFACTS = compose(hair, air_bubbles, dermatoscope_field)

# ------------------------------------------------------------------------------------------------ temperature


# ------------------------------------------------------------------------------------------------ source detail


def source_detail(paths: Sequence[str], sample: int = 64, sources: Sequence[str] | None = None) -> tuple[int, int]:
    """(median shorter side, median JPEG quality) of a random sample of training images; quality 0 when most are
    not JPEGs. With ``sources`` (one per path), each source's medians, then the finest of them: a network trained on
    several levels of detail can use the finest, so serving should not throw it away (HAM10000's 150 px side
    would otherwise shrink every upload, the 224 px crops it also trained on included)."""
    if sources is not None:
        keys = np.asarray(sources, dtype=object)
        found = [source_detail([p for p, k in zip(paths, keys, strict=True) if k == s], sample) for s in set(keys)]
        return max(side for side, _ in found), max(quality for _, quality in found)
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


# ------------------------------------------------------------------------------------------------ the command


def _sources(frame: pd.DataFrame) -> np.ndarray:
    """Each row's source (one source for a manifest without the column)."""
    found = sources_of(frame)
    return found if found is not None else np.full(len(frame), "images", object)


def _rate(mask: np.ndarray) -> float:
    return round(float(mask.mean()), 4) if len(mask) else 0.0


def _gate_scores(gate: OODGate, s: Scored) -> np.ndarray:
    """The gate's score of every image of ``s`` (0 where there is none: failed or quality-rejected)."""
    out = np.zeros(len(s.usable))
    if s.usable.any():
        out[s.usable] = gate.score(s.features[s.usable])
    return out


def _rejections(s: Scored, scores: np.ndarray, threshold: float, rows: np.ndarray | None = None) -> dict[str, Any]:
    """Shares of decodable images (of ``rows``, a mask, when given) rejected by the quality gate, by the OOD gate,
    and by either."""
    ok = ~s.failed if rows is None else ~s.failed & rows
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
    views: int = 8,
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
    # ``views``: served answers are the mean over the eight views of a photo, or one view of it in its canonical
    # orientation (`preprocess.canonical`); either way turning or mirroring a photo changes nothing. The temperature
    # and the gate's threshold are fitted on what is served.
    tta = tta_for(views)
    df = manifest if isinstance(manifest, pd.DataFrame) else read_split_manifest(manifest)
    model_path = Path(model_path)
    model, meta = load_model(model_path)
    parts = {name: df[df["split"] == name] for name in ("train", "val", "test")}
    if parts["val"].empty:
        raise DataError("the manifest has no `val` split to calibrate on")
    fit_df = parts["train"] if not parts["train"].empty else parts["val"]
    paths = [str(p) for p in fit_df["path"]]
    side, quality = source_detail(paths, sources=sources_of(fit_df)) if match_source else (0, 0)
    meta = ModelMeta(**{**asdict(meta), "source_short_side": side, "source_jpeg_quality": quality, "tta": tta})
    predictor = Predictor.from_path(model_path, backend=backend, threads=threads, meta=meta)
    if len(fit_df) > max_fit_images:
        fit_df = fit_df.sample(max_fit_images, random_state=0)

    def run(frame: pd.DataFrame, name: str, view=None, tta: bool = tta) -> Scored:
        paths = [str(p) for p in frame["path"]]
        return predictor.score(paths, view=view, tta=tta, desc=name, progress=progress, batch_size=64)

    # The feature densities are fitted on one view of each training image (an eighth of the work with eight views);
    # their scales and the threshold are set on validation images as served.
    fit = run(fit_df, "fit (train)", tta=False)
    unreadable = fit.require_usable(list(fit_df["path"]), "train split" if len(parts["train"]) else "val split")
    val = run(parts["val"], "val")
    # Without a train split the fit images are val's own: each unreadable one is named once.
    unreadable = list(dict.fromkeys(unreadable + val.require_usable(list(parts["val"]["path"]), "val split")))
    y_val = read_labels(parts["val"], meta)

    # Temperature: on the validation lesions that pass the quality gate (the ones that would get a diagnosis).
    ok = val.usable
    temperature = fit_temperature(val.logits[ok], y_val[ok])
    calib: dict[str, Any] = {
        "temperature": round(temperature, 5),
        "fitted_on": f"val split ({int(ok.sum())} images)",
        "val": _calibration_numbers(val.logits[ok], y_val[ok], temperature),
    }

    # The threshold rejects at most target_rejection of each source's validation lesions, as photographed, as a
    # contact dermatoscope's round field shows them (`dermatoscope_field`), and with hairs and air bubbles in that
    # field (`CONTACT_ARTEFACTS`): HAM10000's frames seldom have the dark border that many clinics' have, and shaved,
    # bubble-free skin is not what every clinic photographs.
    field = run(parts["val"], "val, as dermatoscope fields", dermatoscope_field)
    marked = run(parts["val"], "val, with hairs and air bubbles in a dermatoscope field", CONTACT_ARTEFACTS)
    val_sources = _sources(parts["val"])
    layout = feature_layout(model, fit.features.shape[1])
    groups = np.concatenate(
        [
            val_sources[ok],
            val_sources[field.usable] + " (dermatoscope field)",
            val_sources[marked.usable] + " (hairs and bubbles in a dermatoscope field)",
        ]
    )
    features = np.concatenate([val.features[ok], field.features[field.usable], marked.features[marked.usable]])
    gate = OODGate.fit(fit.features[fit.usable], layout, k=components).calibrated(features, target_rejection, groups)
    rates: dict[str, Any] = {"val": _rejections(val, _gate_scores(gate, val), gate.threshold)}
    rates["val_dermatoscope_field"] = _rejections(field, _gate_scores(gate, field), gate.threshold)
    rates["val_artefacts"] = _rejections(marked, _gate_scores(gate, marked), gate.threshold)
    if not parts["test"].empty:
        test = run(parts["test"], "test")
        test_scores = _gate_scores(gate, test)
        rates["test"] = _rejections(test, test_scores, gate.threshold)
        y_test = read_labels(parts["test"], meta)
        calib["test"] = _calibration_numbers(test.logits[test.usable], y_test[test.usable], temperature)
        crops = run(parts["test"], "test, 224 px square crops", square_crop)
        rates["test_square224"] = _rejections(crops, _gate_scores(gate, crops), gate.threshold)
        fields = run(parts["test"], "test, as dermatoscope fields", dermatoscope_field)
        rates["test_dermatoscope_field"] = _rejections(fields, _gate_scores(gate, fields), gate.threshold)
        marked = run(parts["test"], "test, with hairs and air bubbles in a dermatoscope field", CONTACT_ARTEFACTS)
        rates["test_artefacts"] = _rejections(marked, _gate_scores(gate, marked), gate.threshold)
        test_sources = _sources(parts["test"])
        if len(set(test_sources)) > 1:
            rates["test_by_source"] = {
                str(src): _rejections(test, test_scores, gate.threshold, test_sources == src)
                for src in sorted(set(test_sources))
            }
    builtin = predictor.score(list(everyday_images().values()), tta=tta, desc="built-in negatives", progress=progress)
    rates["builtin_negatives"] = _rejections(builtin, _gate_scores(gate, builtin), gate.threshold)
    if negatives:
        neg = predictor.score([str(p) for p in negatives], tta=tta, desc="negatives", progress=progress)
        rates["negatives"] = _rejections(neg, _gate_scores(gate, neg), gate.threshold)

    ood = gate.describe() | {
        "target_rejection": target_rejection,
        "fitted_on": f"train split ({int(fit.usable.sum())} lesion images, one view each)",
        "views": 8,
        "threshold_set_on": (
            f"val split ({int(ok.sum())} lesion images, as dermatoscope fields, and with hairs and air bubbles in "
            f"such a field), at most {target_rejection:.0%} of each of {len(set(groups))} groups"
        ),
        "rejection_rates": rates,
        "fitted": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    metrics = _updated_metrics(meta.metrics, calib, rates)
    probe = probe_record(TorchRunner(model), meta)  # the start-up self-test's expected answers
    new_meta = ModelMeta(**{**asdict(meta), "temperature": temperature, "ood": ood, "metrics": metrics, "probe": probe})
    # The weights are rewritten exactly as stored (an ensemble keeps its float16); only meta and gate change.
    out = update_meta(model_path, new_meta, out_path, extra=gate.to_tensors())
    return {
        "model": str(out),
        "temperature": temperature,
        "source": {"short_side": side, "jpeg_quality": quality},
        "calibration": calib,
        "ood": ood,
        "unreadable": unreadable,  # (path, reason): left out of the fit
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
        "val_dermatoscope_field": "validation lesions rejected, as dermatoscope fields (threshold set here too)",
        "test": "held-out test lesions rejected",
        "test_square224": "held-out test lesions rejected, as 224 px square centre crops",
        "test_dermatoscope_field": "held-out test lesions rejected, as dermatoscope fields",
        "val_artefacts": "validation lesions rejected, with hairs and air bubbles in a dermatoscope field (threshold "
        "set here too)",
        "test_artefacts": "held-out test lesions rejected, with hairs and air bubbles in a dermatoscope field",
        "builtin_negatives": "non-lesion pictures rejected (built-in set: package photos, crops, synthetic)",
        "negatives": "non-lesion photos rejected (--negatives)",
    }
    flat = {names[k]: r for k, r in rates.items() if k in names}
    flat |= {f"held-out test lesions of {src} rejected": r for src, r in rates.get("test_by_source", {}).items()}
    out["rejection"] = {
        name: f"{r['total']:.1%} of {r['n']} (image-quality gate {r['quality']:.1%}, not-a-lesion gate {r['ood']:.1%})"
        for name, r in flat.items()
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
    rates = dict(ood["rejection_rates"])
    rates |= {f"test, {src}": r for src, r in rates.pop("test_by_source", {}).items()}
    for name, r in rates.items():
        what = "non-lesion images caught" if name.endswith("negatives") else "lesions rejected"
        lines.append(
            f"  {name}: {what} {r['total']:.1%} (quality gate {r['quality']:.1%}, OOD {r['ood']:.1%}; n={r['n']})"
        )
    lines.append(f"written to {report['model']}")
    return lines
