"""Score a saved model on any labelled data the data layer reads, and write metrics, plots and a report.

The data's labels are brought into the model's taxonomy through the class catalogue: a HAM 7-class model is scored on
ISIC 2019 data by mapping AK and SCC to akiec, and an ISIC 2019 model is scored on HAM data by summing its AK and SCC
probabilities into akiec (HAM's akiec cannot be split into the two).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from dermsight.data.images import ImageError
from dermsight.data.manifest import LABEL_COLUMNS, build_manifest, image_ids, load_manifest, run_split, sources_of
from dermsight.data.problems import DataError, Problem, summarise
from dermsight.domain import triage
from dermsight.domain.classes import HAM7
from dermsight.evaluation.metrics import (
    compute_metrics,
    expected_calibration_error,
    map_probabilities,
    mel_vs_nv_auc,
    referral_rates,
    summary,
)
from dermsight.evaluation.report import write_report
from dermsight.inference.scoring import score_images, softmax
from dermsight.models.bundle import default_model_path, load_model
from dermsight.models.meta import ModelMeta


@dataclass
class Evaluation:
    metrics: dict
    files: dict[str, Path]
    problems: list[Problem]


def read_labelled(data: Path, split: str | None = None) -> tuple[pd.DataFrame, list[Problem]]:
    """A manifest of labelled images from a dataset folder/CSV or a (split) manifest, optionally one split."""
    run = run_split(data)
    if run is not None and split is None:
        # All of a run's split would score it on the images it trained on.
        raise DataError(f"{data} is a training run's folder: say which of its splits to score (--split test or val)")
    data = run or Path(data)  # a training run's folder means its split
    problems: list[Problem] = []
    if data.is_file() and data.suffix == ".csv" and "path" in pd.read_csv(data, nrows=0).columns:
        manifest = load_manifest(data)
    else:
        ingest = build_manifest(data, verify="header", progress=False)
        manifest, problems = ingest.manifest, ingest.problems
    if split is not None:
        if "split" not in manifest:
            raise DataError(f"{data}: no `split` column, so --split {split} cannot be applied")
        names = sorted(str(n) for n in manifest["split"].dropna().unique())
        if split not in names:
            raise DataError(f"{data}: no split named {split!r}; it has {', '.join(names) or 'none'}")
        manifest = manifest[manifest["split"] == split]
    elif "split" in manifest and manifest["split"].eq("train").any():
        # Allowed (the manifest may be scored whole on purpose), but such figures include trained-on images.
        print(
            f"warning: {data} is a split manifest scored whole, its train split included; add --split test (or val) "
            "to score held-out images only",
            file=sys.stderr,
        )
    if manifest.empty:
        # Say why every row went (files not found, unknown labels...), not just that none is left.
        why = f"\n{summarise(problems)}" if problems else ""
        raise DataError(f"{data}: no labelled images to evaluate" + (f" in split {split!r}" if split else "") + why)
    return manifest.reset_index(drop=True), problems


def _targets(manifest: pd.DataFrame, meta: ModelMeta) -> tuple[np.ndarray, list[str], str]:
    """Target indices in the scoring taxonomy (the model's when the data has it for every row, else HAM7), -1 for a
    row whose label has no class there (ISIC 2019's UNK, say)."""
    col = LABEL_COLUMNS[meta.taxonomy]
    # Rows with a class in no taxonomy (ISIC's UNK, "none of the others") are left out whichever is used: one of
    # them must not move an ISIC 2019 evaluation into HAM7. Any other row without a class in the model's
    # taxonomy (HAM's akiec for an ISIC 2019 model) means scoring in HAM7, where both have one.
    other = manifest["label_ham7"].notna() if "label_ham7" in manifest else pd.Series(False, index=manifest.index)
    if col in manifest and manifest[col].notna().any() and (manifest[col].notna() | ~other).all():
        labels = list(meta.classes)
        taxonomy = meta.taxonomy
    else:
        labels, col, taxonomy = list(HAM7.codes), "label_ham7", "ham7"
    index = {c: i for i, c in enumerate(labels)}
    return manifest[col].map(index).fillna(-1).to_numpy(int), labels, taxonomy


def serving_refusals(model_path: Path, paths: Sequence[str], progress: bool = True) -> dict[str, Any]:
    """How many of ``paths`` the serving gates would refuse (`Predictor`: the image-quality checks, then the
    not-a-lesion gate), which `predict` and the web app answer with a reason and no diagnosis. `evaluate` itself
    scores every image, so its metrics describe the model, not what a user of the app would be told."""
    return serving_answers(model_path, paths, progress)[1]


def serving_answers(model_path: Path, paths: Sequence[str], progress: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """(refused, counts): whether the app refuses each of ``paths`` (an image that cannot be read included), and the
    counts `serving_refusals` reports."""
    from dermsight.inference.predictor import NOT_A_LESION, Predictor

    predictor = Predictor.from_path(model_path)
    quality: dict[str, int] = {}
    not_a_lesion = failed = 0
    refused_each = np.zeros(len(paths), bool)
    for start in tqdm(range(0, len(paths), 32), desc="serving gates", unit="batch", disable=not progress or None):
        for j, r in enumerate(predictor.predict_batch(list(paths[start : start + 32]))):
            refused_each[start + j] = isinstance(r, ImageError) or r.status == "rejected"
            if isinstance(r, ImageError):
                failed += 1
            elif r.status == "rejected" and r.reason == NOT_A_LESION:
                not_a_lesion += 1
            elif r.status == "rejected":
                quality[str(r.reason)] = quality.get(str(r.reason), 0) + 1
    n = len(paths) - failed
    refused = not_a_lesion + sum(quality.values())
    return refused_each, {
        "images": n,
        "refused": refused,
        "share": refused / n if n else 0.0,
        "not_a_lesion": not_a_lesion,
        "image_quality": sum(quality.values()),
        "image_quality_reasons": dict(sorted(quality.items(), key=lambda kv: -kv[1])),
    }


def app_referral(
    referred: np.ndarray, refused: np.ndarray, y: np.ndarray, labels: list[str], rows: np.ndarray
) -> dict[str, Any]:
    """What the app tells the images of ``rows`` (a mask), class by class: sent to a doctor (a refused image gets no
    advice, so it is not sent), and, under "refused", the share refused."""
    sent = referral_rates((referred & ~refused)[rows], y[rows], labels)
    return sent | {"refused": referral_rates(refused[rows], y[rows], labels)}


def source_metrics(
    y: np.ndarray,
    probs: np.ndarray,
    referred: np.ndarray,
    labels: list[str],
    n_bootstrap: int,
    groups: np.ndarray | None,
) -> dict[str, Any]:
    """The headline figures of one source's images: the metrics with their intervals, recall per class, the advice's
    referral per class and the melanoma-vs-nevus AUC."""
    return summary(compute_metrics(y, probs, labels, n_bootstrap=n_bootstrap, groups=groups)) | {
        "referral": referral_rates(referred, y, labels),
        "mel_vs_nv_auc": mel_vs_nv_auc(y, probs, labels),
    }


def lesion_groups(manifest: pd.DataFrame) -> np.ndarray | None:
    """Resampling groups for the confidence intervals: the photos of one lesion together (HAM10000 has several of many
    lesions), an image without a lesion id on its own; None (every image on its own) without lesion ids."""
    if "lesion_id" not in manifest or manifest["lesion_id"].isna().all():
        return None
    ids = manifest["lesion_id"].astype(object)
    return ids.where(ids.notna(), "image:" + manifest["path"].astype(str)).to_numpy()


def held_in_words(held: int, n: int) -> str:
    return (
        f"{held} of these {n} images ({held / n:.0%}) are in the model's own training or validation split; figures "
        "on them are not a held-out estimate and look better than the model is. Score images the model has not "
        "seen, such as the test split of the split it was trained on (--data SPLIT_CSV --split test)."
    )


def refusals_line(r: dict[str, Any]) -> str:
    return (
        f"the app would refuse {r['refused']} of these {r['images']} images ({100 * r['share']:.1f}%): "
        f"{r['not_a_lesion']} as not a lesion, {r['image_quality']} for image quality"
    )


def evaluate(
    data: Path,
    out_dir: Path,
    model_path: Path | None = None,
    split: str | None = None,
    tta: bool | None = None,
    n_bootstrap: int = 1000,
    progress: bool = True,
    gates: bool = False,
) -> Evaluation:
    """Score ``model_path`` (default: the bundled model) on ``data``; write metrics.json, plots, report.md and
    predictions.csv.

    ``tta`` None follows the model's decision rule (`ModelMeta.tta`), as serving does. ``gates``: also count the
    images the serving gates would refuse (`serving_refusals`; a second pass over the images). The metrics are
    computed on every image either way."""
    # The output folder first: a path that cannot be one (a file stands there) fails before minutes of scoring.
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model_path = Path(model_path) if model_path else default_model_path()
    model, meta = load_model(model_path)
    tta = meta.tta if tta is None else tta
    model = model.to(memory_format=torch.channels_last)
    manifest, problems = read_labelled(Path(data), split)
    y, labels, taxonomy = _targets(manifest, meta)
    if (y < 0).any():
        # Rows no class of the scoring taxonomy can hold are left out and listed, as unreadable images are.
        given = manifest["label"] if "label" in manifest else pd.Series(["?"] * len(manifest))
        problems += [
            Problem(str(p), f"label {g} has no class in the {taxonomy} taxonomy the model is scored in", "read")
            for p, g in zip(manifest.loc[y < 0, "path"], given[y < 0], strict=True)
        ]
        manifest, y = manifest[y >= 0].reset_index(drop=True), y[y >= 0]
        if manifest.empty:
            raise DataError(f"{data}: no image has a label in the {taxonomy} taxonomy of this model")
    paths = [str(p) for p in manifest["path"]]
    held_in = meta.split.overlap(image_ids(manifest)) if meta.split is not None else []
    if held_in:
        # Loud and first: minutes of scoring follow, and figures on trained-on images look far better than they are.
        print(f"WARNING: {held_in_words(len(held_in), len(paths))}", file=sys.stderr)
    scored = score_images(model, meta, paths, tta=tta, progress=progress, desc="evaluating")
    logits, failed = scored.logits, scored.failures()
    problems += [Problem(paths[i], reason, "image") for i, reason in failed]
    ok = ~np.isnan(logits).any(axis=1)
    logits, y = logits[ok], y[ok]
    adjusted = meta.adjust(logits)
    probs_raw, probs = softmax(adjusted), softmax(adjusted, meta.temperature)
    # The advice is given on the served probabilities, in the model's own classes, whatever taxonomy scores them.
    referred = triage.referred(probs, meta.classes, meta.refer_from or None)
    if taxonomy != meta.taxonomy:
        # Scored in the coarser taxonomy on summed probabilities (AK + SCC -> akiec), and decided by their argmax:
        # with calibrated probabilities that is the best decision among the coarse classes, which is what the
        # metrics score. (An untrained 8-class model favours akiec this way, two outputs' worth of prior mass; the
        # fine top-1 mapped down would hide that a trained model is sure it is one of AK or SCC.)
        probs_raw = map_probabilities(probs_raw, list(meta.classes), labels)
        probs = map_probabilities(probs, list(meta.classes), labels)
    groups = lesion_groups(manifest)
    groups = None if groups is None else groups[ok]
    metrics = compute_metrics(y, probs, labels, n_bootstrap=n_bootstrap, groups=groups)
    metrics["referral"] = referral_rates(referred, y, labels)
    metrics["mel_vs_nv_auc"] = mel_vs_nv_auc(y, probs, labels)
    sources = sources_of(manifest)
    sources = None if sources is None else sources[ok]
    if sources is not None and len(set(sources)) > 1:
        # Pooled figures hide where a model fails: one archive's images can carry another's.
        metrics["by_source"] = {
            s: source_metrics(y[m], probs[m], referred[m], labels, n_bootstrap, None if groups is None else groups[m])
            for s, m in ((s, sources == s) for s in sorted(set(sources)))
        }
    if held_in:
        metrics["warnings"] = [held_in_words(len(held_in), len(paths)), *metrics.get("warnings", [])]
    if gates:
        # Counted beside the metrics, which still cover every image (metrics.json "serving_gates").
        scored = [p for p, k in zip(paths, ok, strict=True) if k]
        refused, metrics["serving_gates"] = serving_answers(model_path, scored, progress)
        # What a user is told: a refused image gets no advice, so it is not sent to a doctor by the app.
        everyone = np.ones(len(y), bool)
        metrics["app_referral"] = app_referral(referred, refused, y, labels, everyone)
        for src, m in metrics.get("by_source", {}).items():
            m["app_referral"] = app_referral(referred, refused, y, labels, sources == src)
    extra = {
        "model": str(model_path),
        "architecture": meta.architecture,
        "network": meta.network,
        "members": meta.members,
        "model_taxonomy": meta.taxonomy,
        "scored_taxonomy": taxonomy,
        "data": str(data),
        "split": split,
        "tta": tta,
        "temperature": meta.temperature,
        "logit_bias": list(meta.logit_bias),
        "ece_before_temperature": expected_calibration_error(probs_raw, y),
        "images_failed": len(failed),
        # Images the model was trained or selected on (its split's train and val ids), scored here all the same.
        "held_in_images": len(held_in),
    }
    if gates:
        extra["serving_gates"] = refusals_line(metrics["serving_gates"])
    title = f"{meta.network} on {Path(data).name}" + (f" ({split} split)" if split else "")
    files = write_report(metrics, probs, y, Path(out_dir), title=title, extra=extra)
    # With the gates, what the app told each image: `bench/equal_sensitivity.py` reads them.
    answers = {"refused": refused, "sent": referred & ~refused} if gates else None
    files["predictions"] = write_predictions(Path(out_dir) / "predictions.csv", manifest[ok], probs, y, labels, answers)
    metrics["extra"] = extra
    return Evaluation(metrics, files, problems)


def write_predictions(
    path: Path,
    manifest: pd.DataFrame,
    probs: np.ndarray,
    y: np.ndarray,
    labels: list[str],
    answers: dict[str, np.ndarray] | None = None,
) -> Path:
    """One row per scored image: ``image`` (the id its label file gave it, else the file name without suffix, as
    ISIC names images), ``path``, ``label``, ``predicted`` (the decision the metrics scored), ``correct``, then the
    calibrated probability of each class, one column per class code (the layout of ISIC's challenge submissions).
    For finding which images a model gets wrong, and for any metric this module does not compute. A manifest of
    several folders adds each image's ``source`` after its path (one folder keeps ISIC's layout); ``answers``
    (name -> one bool per row: what the app did, e.g. ``refused``) come after ``correct``."""
    pred = probs.argmax(axis=1)
    table = pd.DataFrame(
        {
            "image": image_ids(manifest),
            "path": [str(p) for p in manifest["path"]],
            "label": [labels[i] for i in y],
            "predicted": [labels[i] for i in pred],
            "correct": pred == y,
        }
    )
    if "source" in manifest and manifest["source"].nunique() > 1:  # several folders (`dermsight data manifest A B`)
        table.insert(2, "source", manifest["source"].astype(str).to_numpy())
    for name, values in (answers or {}).items():
        table[name] = np.asarray(values, bool)
    table = pd.concat([table, pd.DataFrame(np.round(probs, 6), columns=labels)], axis=1)
    table.to_csv(path, index=False)
    return path
