"""The referral threshold: how probable skin cancers and pre-cancers together must be before the advice sends a
person to a doctor (`ModelMeta.refer_from`, read by `domain.triage.advise`).

Fitted on the validation split's served probabilities, pooled over its sources: the highest whole percent at which
the app's whole rule (a concerning top class, the concerning share, or an uncertain result) refers at least
``target`` of the validation melanomas. A higher threshold only sends fewer people to a doctor, so the highest one
that keeps the melanomas is the one with the lowest cost in harmless lesions referred. The rates it gives per source
are stored beside it: a pooled figure can hide a source whose melanomas are mostly missed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dermsight.domain.triage import referred

# Whole percents, as the advice compares them (`domain.results.below`).
THRESHOLDS = tuple(p / 100 for p in range(50, 0, -1))
TARGET = 0.95


def _rates(sent: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    mel, nv = labels == "mel", labels == "nv"
    return {
        "melanomas": int(mel.sum()),
        "melanomas_referred": round(float(sent[mel].mean()), 4) if mel.any() else None,
        "nevi": int(nv.sum()),
        "nevi_referred": round(float(sent[nv].mean()), 4) if nv.any() else None,
        "all_referred": round(float(sent.mean()), 4) if len(sent) else None,
    }


def fit_referral(
    probs: np.ndarray,
    labels: Sequence[str],
    classes: Sequence[str],
    sources: Sequence[str] | None = None,
    target: float = TARGET,
) -> dict[str, Any]:
    """The threshold for served probabilities ``probs`` (rows in ``classes`` order) of images with class codes
    ``labels`` (and their ``sources``, for the per-source rates). Returns {"refer_from", "target", "pooled",
    "by_source", "met"}: ``met`` is False when even the lowest threshold refers fewer than ``target`` of the
    melanomas (the lowest is then chosen)."""
    labels = np.asarray(labels, dtype=object)
    mel = labels == "mel"
    if not mel.any():
        raise ValueError("no melanomas among the validation images: the referral threshold cannot be fitted")
    # Referral only grows as the threshold falls: bisect for the highest threshold that meets the target.
    lo, hi = 0, len(THRESHOLDS) - 1  # THRESHOLDS[lo] is the highest
    cache: dict[int, np.ndarray] = {}

    def sent(i: int) -> np.ndarray:
        if i not in cache:
            cache[i] = referred(probs, classes, THRESHOLDS[i])
        return cache[i]

    met = sent(hi)[mel].mean() >= target
    if not met:
        lo = hi
    while lo < hi:
        mid = (lo + hi) // 2
        if sent(mid)[mel].mean() >= target:
            hi = mid
        else:
            lo = mid + 1
    chosen = lo
    out: dict[str, Any] = {
        "refer_from": THRESHOLDS[chosen],
        "target": target,
        "met": bool(met),
        "pooled": _rates(sent(chosen), labels),
    }
    if sources is not None:
        src = np.asarray(sources, dtype=object)
        out["by_source"] = {str(s): _rates(sent(chosen)[src == s], labels[src == s]) for s in sorted(set(src))}
    return out


def report_line(fit: dict[str, Any]) -> str:
    p = fit["pooled"]
    line = (
        f"referral threshold {fit['refer_from']:.0%}: refers {p['melanomas_referred']:.1%} of {p['melanomas']} val "
        "melanomas"
    )
    if p["nevi"]:
        line += f" and {p['nevi_referred']:.1%} of {p['nevi']} val nevi"
    if not fit["met"]:
        line += f" (the target, {fit['target']:.0%} of melanomas, is not reached at 1%)"
    return line
