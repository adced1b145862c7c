"""Classification metrics for skin-lesion models, with bootstrap confidence intervals.

Everything here works on plain arrays: ``y_true`` holds class indices into ``labels`` (catalogue codes, in the
model's output order) and ``probs`` holds one row of class probabilities per case. The headline metric is
balanced accuracy (mean per-class recall), the official ISIC 2018/2019 ranking metric; plain accuracy is
dominated by nevi.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

from dermsight.domain.classes import CONDITIONS, TAXONOMIES, Condition, Taxonomy, to_taxonomy

# Softmax outputs saved as float32 sum to 1 only within ~1e-6; anything further off is a bug upstream (logits,
# a dropped column) that the caller should hear about, although we still renormalise.
_SUM_TOLERANCE = 1e-3
# Cap on the resamples x cases weight matrix held at once (float64: 4M entries = 32 MB).
_BOOTSTRAP_CHUNK_ENTRIES = 4_000_000


@dataclass(frozen=True)
class ReliabilityBins:
    """Top-1 confidence histogram: bin ``i`` covers ``(edges[i], edges[i + 1]]`` (the first also holds 0)."""

    edges: np.ndarray  # (n_bins + 1,)
    counts: np.ndarray  # (n_bins,) cases per bin
    confidence: np.ndarray  # (n_bins,) mean top-1 confidence; NaN for empty bins
    accuracy: np.ndarray  # (n_bins,) fraction of top-1 predictions that are right; NaN for empty bins

    @property
    def ece(self) -> float:
        filled = self.counts > 0
        gaps = np.abs(self.accuracy[filled] - self.confidence[filled])
        return float(np.sum(self.counts[filled] * gaps) / self.counts.sum())


def check_probabilities(probs: np.ndarray, n_classes: int | None = None) -> tuple[np.ndarray, float]:
    """Return ``probs`` as float64 rows renormalised to sum to 1, and the largest ``|row sum - 1|`` seen.

    Raises ValueError for anything that is not a probability table (wrong shape, NaN, negative values, which
    usually mean logits were passed, or all-zero rows).
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or (n_classes is not None and p.shape[1] != n_classes):
        want = f"(N, {n_classes})" if n_classes is not None else "(N, C)"
        raise ValueError(f"probs must have shape {want}, got {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contains NaN or infinite values")
    if np.any(p < 0):
        raise ValueError("probs contains negative values: pass softmax probabilities, not logits")
    sums = p.sum(axis=1)
    if np.any(sums <= 0):
        raise ValueError("probs has rows that sum to 0")
    return p / sums[:, None], float(np.max(np.abs(sums - 1.0), initial=0.0))


def _check_targets(y_true: np.ndarray, n: int, n_classes: int) -> np.ndarray:
    y = np.asarray(y_true)
    if y.shape != (n,):
        raise ValueError(f"y_true must have shape ({n},) to match probs, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y_true must hold integer class indices, got dtype {y.dtype}")
    if n and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"y_true holds indices outside 0..{n_classes - 1}")
    return y.astype(np.int64)


def reliability_bins(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> ReliabilityBins:
    """Bin cases by top-1 confidence into ``n_bins`` equal-width bins over [0, 1]."""
    p, _ = check_probabilities(probs)
    y = _check_targets(y_true, len(p), p.shape[1])
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Right-closed bins as in Guo et al. (2017): a confidence exactly on an edge belongs to the lower bin.
    idx = np.searchsorted(edges[1:-1], conf, side="left")
    counts = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(idx, weights=conf, minlength=n_bins) / counts
        accuracy = np.bincount(idx, weights=correct, minlength=n_bins) / counts
    return ReliabilityBins(edges=edges, counts=counts, confidence=confidence, accuracy=accuracy)


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> float:
    """ECE on the top-1 confidence: sum over bins of (bin share of cases) x |accuracy - mean confidence|."""
    return reliability_bins(probs, y_true, n_bins).ece


def _weighted_aucs(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC AUC of ``scores`` for each row of case ``weights`` (R, N); NaN where undefined.

    A bootstrap resample is the original cases with integer multiplicities, so the Mann-Whitney form of the
    AUC (P(score_pos > score_neg) + P(tie) / 2) with weights gives every resample's AUC from one sort of the
    scores.
    """
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # one group per distinct score, so ties count half
    w = weights[:, order]
    pos = positive[order]
    w_pos = np.add.reduceat(w * pos, starts, axis=1)
    w_neg = np.add.reduceat(w * ~pos, starts, axis=1)
    neg_below = np.cumsum(w_neg, axis=1) - w_neg
    numerator = np.sum(w_pos * (neg_below + 0.5 * w_neg), axis=1)
    denominator = w_pos.sum(axis=1) * w_neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / denominator, np.nan)


def _bootstrap(
    y: np.ndarray,
    p: np.ndarray,
    auc_classes: Sequence[int],
    n_bootstrap: int,
    seed: int,
    groups: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy and macro AUC of ``n_bootstrap`` resamples (NaN where degenerate).

    Stratified by class: each resample draws as many clusters of each class as the data has, so every class stays
    present. Without strata a resample that lost a rare class averaged balanced accuracy over fewer classes, and a
    test set with one missed melanoma got an interval whose lower end was the point estimate. Clustered by
    ``groups`` (lesion ids): the photos of one lesion are drawn together, since they are not independent cases
    (HAM10000 has 1.34 photos a lesion, 1.8 for melanoma); resampling photos made the intervals about 1.6 times too
    narrow. Without groups every case is its own cluster. A cluster joins the stratum of its first case."""
    n, n_classes = p.shape
    rng = np.random.default_rng(seed)
    onehot = np.eye(n_classes)[y]
    hits = onehot * (p.argmax(axis=1) == y)[:, None]
    cluster = np.arange(n) if groups is None else pd.factorize(pd.Series(groups, dtype=object))[0]
    n_clusters = int(cluster.max()) + 1 if n else 0
    first = np.unique(cluster, return_index=True)[1]
    strata = [members for c in range(n_classes) if len(members := np.flatnonzero(y[first] == c))]
    out: dict[str, list[np.ndarray]] = {"accuracy": [], "balanced_accuracy": [], "macro_auc": []}
    chunk = max(1, _BOOTSTRAP_CHUNK_ENTRIES // max(n, n_clusters, 1))
    for start in range(0, n_bootstrap, chunk):
        rows = min(chunk, n_bootstrap - start)
        # Multiplicity of each cluster in each resample, then of each case: every metric is a weighted sum.
        counts = np.zeros(rows * n_clusters, np.int64)
        for members in strata:
            drawn = members[rng.integers(0, len(members), size=(rows, len(members)))]
            counts += np.bincount((np.arange(rows)[:, None] * n_clusters + drawn).ravel(), minlength=rows * n_clusters)
        w = counts.reshape(rows, n_clusters)[:, cluster].astype(np.float64)
        support = w @ onehot
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = (w @ hits) / support
        # Same rule as balanced_accuracy_score: classes absent from the resample do not count.
        present = support > 0
        out["accuracy"].append((w @ hits).sum(axis=1) / w.sum(axis=1))
        out["balanced_accuracy"].append(np.where(present, recall, 0).sum(axis=1) / present.sum(axis=1))
        if auc_classes:
            aucs = np.stack([_weighted_aucs(p[:, k], y == k, w) for k in auc_classes], axis=1)
            # A resample that loses every case of a class (possible only for a class whose cases sit in clusters
            # of another stratum) has no AUC for it; skip the resample rather than average over other classes.
            out["macro_auc"].append(aucs.mean(axis=1))
        else:
            out["macro_auc"].append(np.full(rows, np.nan))
    return {k: np.concatenate(v) if v else np.empty(0) for k, v in out.items()}


def _percentile_ci(values: np.ndarray) -> list[float] | None:
    valid = values[np.isfinite(values)]
    if valid.size == 0:
        return None
    low, high = np.percentile(valid, [2.5, 97.5])
    return [float(low), float(high)]


def _json_float(x: float | np.floating) -> float | None:
    """JSON has no NaN: undefined metrics are written as null."""
    x = float(x)
    return None if math.isnan(x) else x


def _condition(code: str) -> Condition:
    try:
        return CONDITIONS[code]
    except KeyError:
        raise ValueError(f"unknown class code {code!r}: labels must be catalogue codes") from None


def compute_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    labels: Sequence[str],
    n_bootstrap: int = 1000,
    seed: int = 0,
    groups: Sequence | np.ndarray | None = None,
) -> dict:
    """Score class probabilities against true class indices; returns a JSON-serialisable dict.

    Undefined values (recall of a class with no cases, AUC of a class with no cases) are ``None``, and each is
    explained in ``warnings``. ``macro_auc`` averages one-vs-rest AUCs over the classes present in ``y_true``;
    the others are listed in ``auc_excluded``. ``ci95`` holds bootstrap 95% percentile intervals from
    ``n_bootstrap`` resamples (``n_bootstrap=0`` skips them), stratified by class and, with ``groups`` (one id per
    case, e.g. its lesion), drawing the cases of a group together (see `_bootstrap`).
    """
    labels = list(labels)
    conditions = [_condition(code) for code in labels]
    n_classes = len(labels)
    p, max_sum_error = check_probabilities(probs, n_classes)
    n = len(p)
    if n == 0:
        raise ValueError("no cases to score")
    y = _check_targets(y_true, n, n_classes)
    y_pred = p.argmax(axis=1)
    notes: list[str] = []
    if max_sum_error > _SUM_TOLERANCE:
        notes.append(f"probability rows did not sum to 1 (max deviation {max_sum_error:.3g}); renormalised")

    classes = range(n_classes)
    cm = confusion_matrix(y, y_pred, labels=classes)
    support = cm.sum(axis=1)
    absent = [labels[k] for k in range(n_classes) if support[k] == 0]
    if absent:
        notes.append(
            f"no cases of {', '.join(absent)}: recall and AUC undefined (null), "
            "excluded from balanced_accuracy and macro_auc"
        )
    with warnings.catch_warnings():
        # sklearn warns about predicted classes missing from y_true; that is reported in `warnings` above.
        warnings.simplefilter("ignore", UserWarning)
        balanced = balanced_accuracy_score(y, y_pred)
    # zero_division=nan: precision of a class never predicted is undefined (null in the JSON), not 0.
    scores = precision_recall_fscore_support(y, y_pred, labels=classes, zero_division=np.nan)
    precision, recall, f1 = scores[:3]
    negatives = n - support
    true_neg = negatives - (cm.sum(axis=0) - np.diag(cm))
    with np.errstate(invalid="ignore", divide="ignore"):
        specificity = true_neg / negatives

    auc_classes = [k for k in range(n_classes) if 0 < support[k] < n]
    aucs = np.full(n_classes, np.nan)
    for k in auc_classes:
        aucs[k] = roc_auc_score(y == k, p[:, k])
    macro_auc = weighted_auc = math.nan
    if auc_classes:
        macro_auc = float(np.mean(aucs[auc_classes]))
        weighted_auc = float(np.average(aucs[auc_classes], weights=support[auc_classes]))
    else:
        notes.append("fewer than two classes present: AUC undefined")

    per_class = {
        code: {
            "name": cond.name,
            "malignancy": str(cond.malignancy),
            "support": int(support[k]),
            "precision": _json_float(precision[k]),
            "recall": _json_float(recall[k]),
            "specificity": _json_float(specificity[k]),
            "f1": _json_float(f1[k]),
            "auc": _json_float(aucs[k]),
        }
        for k, (code, cond) in enumerate(zip(labels, conditions, strict=True))
    }

    result: dict = {
        "n": n,
        "labels": labels,
        "accuracy": float(accuracy_score(y, y_pred)),
        "balanced_accuracy": float(balanced),
        "macro_auc": _json_float(macro_auc),
        "weighted_auc": _json_float(weighted_auc),
        "auc_excluded": [labels[k] for k in range(n_classes) if k not in auc_classes],
        "ece": expected_calibration_error(p, y),
        "ece_bins": 15,
        "nll": float(log_loss(y, p, labels=classes)),
        # Multiclass Brier score: mean over cases of the squared distance to the one-hot truth, range [0, 2].
        "brier": float(brier_score_loss(y, p, labels=classes, scale_by_half=False)),
        "concerning": _concerning(y, p, conditions),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }
    if n_bootstrap > 0:
        if groups is not None and len(groups) != n:
            raise ValueError(f"groups has {len(groups)} entries for {n} cases")
        boot = _bootstrap(y, p, auc_classes, n_bootstrap, seed, None if groups is None else np.asarray(groups))
        result["ci95"] = {name: _percentile_ci(values) for name, values in boot.items()}
        unit = "cases" if groups is None else f"groups of cases ({len(set(groups))} groups, e.g. lesions)"
        result["bootstrap"] = {
            "n_resamples": n_bootstrap,
            "seed": seed,
            "method": f"percentile, {unit} resampled with replacement within each class",
            "valid_resamples": {name: int(np.isfinite(values).sum()) for name, values in boot.items()},
        }
    else:
        result["ci95"] = {"accuracy": None, "balanced_accuracy": None, "macro_auc": None}
    result["warnings"] = notes
    return result


def _concerning(y: np.ndarray, p: np.ndarray, conditions: Sequence[Condition]) -> dict | None:
    """Malignant-or-premalignant vs benign: the decision that matters to a user, from the summed class mass.

    A top-1 prediction of any concerning class counts as flagged, so melanoma called BCC is still a hit.
    """
    flags = np.array([c.is_concerning for c in conditions])
    if flags.all() or not flags.any():
        return None
    truth = flags[y]
    flagged = flags[p.argmax(axis=1)]
    score = p[:, flags].sum(axis=1)
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    return {
        "classes": [c.code for c in conditions if c.is_concerning],
        "support": n_pos,
        "sensitivity": _json_float(np.sum(flagged & truth) / n_pos) if n_pos else None,
        "specificity": _json_float(np.sum(~flagged & ~truth) / n_neg) if n_neg else None,
        "auc": float(roc_auc_score(truth, score)) if n_pos and n_neg else None,
    }


def _resolve_mapping(to_labels: Sequence[str]) -> Callable[[str], str | None]:
    """Catalogue mapping into the taxonomy that ``to_labels`` come from."""
    taxonomy: Taxonomy = TAXONOMIES[_condition(to_labels[0]).taxonomy]
    return lambda code: to_taxonomy(code, taxonomy)


def map_probabilities(
    probs: np.ndarray,
    from_labels: Sequence[str],
    to_labels: Sequence[str],
    mapping: Callable[[str], str | None] | None = None,
) -> np.ndarray:
    """Sum each source class's probability into its target class: (N, C_from) -> (N, C_to).

    ``mapping`` sends a source code to a target code or None; by default the catalogue's `to_taxonomy` into
    the taxonomy of ``to_labels``. ISIC 2019 -> HAM7 always works (AK + SCC -> akiec). HAM7 -> ISIC 2019 does
    not: akiec's mass cannot be split between AK and SCC, so this raises ValueError rather than inventing a
    split or silently dropping mass. A caller with such a pair should score in the coarser taxonomy instead
    (map the labels with `map_labels` and keep the HAM7 probabilities).
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(from_labels):
        raise ValueError(f"probs must have shape (N, {len(from_labels)}), got {p.shape}")
    mapping = mapping or _resolve_mapping(to_labels)
    targets = {code: mapping(code) for code in from_labels}
    lost = [src for src, dst in targets.items() if dst not in to_labels]
    orphans = [dst for dst in to_labels if dst not in targets.values()]
    if lost or orphans:
        raise ValueError(
            f"cannot map {list(from_labels)} onto {list(to_labels)}: "
            f"no target for {lost or 'none'}, no source for {orphans or 'none'}"
        )
    # (C_from, C_to) 0/1 matrix: a matrix product sums the mass of all sources that share a target.
    combine = np.zeros((len(from_labels), len(to_labels)))
    for i, code in enumerate(from_labels):
        combine[i, list(to_labels).index(targets[code])] = 1.0
    return p @ combine


def map_labels(
    y_true: np.ndarray,
    from_labels: Sequence[str],
    to_labels: Sequence[str],
    mapping: Callable[[str], str | None] | None = None,
) -> np.ndarray:
    """Re-index true classes into ``to_labels`` (e.g. ISIC 2019 ground truth to score a HAM7 model).

    Raises ValueError if a class that occurs in ``y_true`` has no target.
    """
    mapping = mapping or _resolve_mapping(to_labels)
    to_labels = list(to_labels)
    lookup = np.array([to_labels.index(t) if (t := mapping(c)) in to_labels else -1 for c in from_labels])
    mapped = lookup[np.asarray(y_true)]
    if np.any(mapped < 0):
        missing = sorted({from_labels[k] for k in np.asarray(y_true)[mapped < 0]})
        raise ValueError(f"classes {missing} have no counterpart in {to_labels}")
    return mapped


def summary(m: dict[str, Any]) -> dict[str, Any]:
    """The figures a model records of one evaluated set (`compute_metrics`' result): the headline metrics with their
    intervals and the recall of each class."""
    return {k: m[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_auc", "ece", "ci95")} | {
        "recall": {c: v["recall"] for c, v in m["per_class"].items()}
    }


def headline(m: dict[str, Any]) -> str:
    """One line of `compute_metrics`'s figures for a terminal. A figure that is undefined on these images (macro AUC
    when only one class is present) reads "n/a" instead of crashing the end of a training run."""

    def num(key: str) -> str:
        return "n/a" if m.get(key) is None else f"{m[key]:.3f}"

    return (
        f"balanced accuracy {num('balanced_accuracy')}, accuracy {num('accuracy')}, macro AUC {num('macro_auc')}, "
        f"ECE {num('ece')} (n={m['n']})"
    )


def referral_rates(referred: np.ndarray, y_true: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Share of each true class that the app's advice sends to a doctor (`domain.triage.referred`), and overall."""
    referred, y_true = np.asarray(referred, bool), np.asarray(y_true)
    per_class = {
        code: {"n": int(m.sum()), "referred": float(referred[m].mean())}
        for code, m in ((c, y_true == i) for i, c in enumerate(labels))
        if m.any()
    }
    return {"per_class": per_class, "all": float(referred.mean()) if len(referred) else None}


def mel_vs_nv_auc(y_true: np.ndarray, probs: np.ndarray, labels: Sequence[str]) -> float | None:
    """ROC AUC of the melanoma probability between melanomas and nevi alone: how well the model ranks the pair that
    matters most, whatever the other classes do. None unless both are present."""
    if "mel" not in labels or "nv" not in labels:
        return None
    mel, nv = list(labels).index("mel"), list(labels).index("nv")
    pair = np.isin(y_true, (mel, nv))
    positive = y_true[pair] == mel
    if positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, np.asarray(probs)[pair, mel]))


def others_sent_at(score: np.ndarray, positive: np.ndarray, share: float) -> float | None:
    """The share of negatives (``~positive``) sent when the threshold on ``score`` is the highest that still sends
    at least ``share`` of the positives (``score >= threshold`` is sent; -inf or NaN, a refused or unscored image,
    never is). Two models compared at the same ``share`` of melanomas sent differ only in how they rank, not in
    where a threshold fitted elsewhere happens to fall. None where the share cannot be reached (too many positives
    refused) or a class is missing."""
    score, positive = np.asarray(score, float), np.asarray(positive, bool)
    score = np.where(np.isnan(score), -np.inf, score)
    pos = np.sort(score[positive])[::-1]
    if not len(pos) or positive.all():
        return None
    k = math.ceil(share * len(pos) - 1e-9)  # positives that must be sent
    if k == 0:
        return 0.0
    threshold = pos[k - 1]
    if not np.isfinite(threshold):
        return None
    return float((score[~positive] >= threshold).mean())
