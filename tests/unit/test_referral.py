"""What evaluate reports beside the metrics: the app's referral per true class, and melanoma-vs-nevus ranking."""

from __future__ import annotations

import numpy as np
import pytest

from dermsight.domain import triage
from dermsight.domain.classes import HAM7
from dermsight.evaluation.metrics import mel_vs_nv_auc, referral_rates

LABELS = list(HAM7.codes)  # akiec bcc bkl df mel nv vasc


def probs_of(**p: float) -> np.ndarray:
    row = np.array([p.get(c, 0.0) for c in LABELS])
    return row / row.sum()


def test_referred_replays_the_apps_advice_row_by_row():
    rows = np.stack(
        [
            probs_of(mel=0.9, nv=0.1),  # a melanoma on top: see a doctor
            probs_of(nv=0.98, bkl=0.02),  # a confident nevus: monitor
            probs_of(nv=0.8, mel=0.2),  # 20% concerning, above the 15% rule: see a doctor
            probs_of(nv=0.9, mel=0.1),  # 10%: monitor
            probs_of(nv=0.45, bkl=0.40, df=0.15),  # uncertain: see a doctor
        ]
    )
    assert triage.referred(rows, LABELS).tolist() == [True, False, True, False, True]
    # The threshold is the advice's own parameter: at 25% the 20% melanoma is no longer referred.
    assert triage.referred(rows, LABELS, concern_at=0.25).tolist() == [True, False, False, False, True]


def test_referral_rates_per_true_class():
    y = np.array([4, 4, 4, 5, 5])  # mel, mel, mel, nv, nv
    rates = referral_rates(np.array([True, True, False, True, False]), y, LABELS)
    assert rates["per_class"] == {"mel": {"n": 3, "referred": pytest.approx(2 / 3)}, "nv": {"n": 2, "referred": 0.5}}
    assert rates["all"] == pytest.approx(0.6)


def test_mel_vs_nv_auc_ranks_the_pair_alone():
    # mel rows score 0.6 and 0.3, nv rows 0.4 and 0.1: 3 of the 4 pairs are ordered right. The bkl row, with the
    # highest melanoma probability of all, is not part of the pair and must not count.
    y = np.array([4, 4, 5, 5, 2])
    pairs = [probs_of(mel=0.6, nv=0.4), probs_of(mel=0.3, nv=0.7), probs_of(mel=0.4, nv=0.6), probs_of(mel=0.1, nv=0.9)]
    probs = np.stack([*pairs, probs_of(mel=0.9, bkl=0.1)])
    assert mel_vs_nv_auc(y, probs, LABELS) == pytest.approx(0.75)
    assert mel_vs_nv_auc(np.array([5, 5]), probs[2:4], LABELS) is None  # no melanoma, no AUC
    assert mel_vs_nv_auc(y, probs, ["a", "b", "c", "d", "e", "f", "g"]) is None
