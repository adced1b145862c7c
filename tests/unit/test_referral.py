"""What evaluate reports beside the metrics: the app's referral per true class, and melanoma-vs-nevus ranking."""

from __future__ import annotations

import numpy as np
import pytest

from dermsight.domain import triage
from dermsight.domain.classes import HAM7
from dermsight.evaluation.metrics import mel_vs_nv_auc, others_sent_at, referral_rates

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


def test_others_sent_at_puts_the_threshold_where_the_share_of_positives_is_reached():
    score = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.85, 0.65, 0.4, 0.3, 0.2])
    positive = np.array([True] * 5 + [False] * 5)
    # 3 of 5 positives sent: threshold 0.7, which sends the negatives at 0.85 only.
    assert others_sent_at(score, positive, 0.6) == pytest.approx(1 / 5)
    # A share between two counts rounds up: 0.61 needs 4 positives, threshold 0.6, two negatives sent.
    assert others_sent_at(score, positive, 0.61) == pytest.approx(2 / 5)
    assert others_sent_at(score, positive, 1.0) == pytest.approx(2 / 5)
    assert others_sent_at(score, positive, 0.0) == 0.0
    # A refused positive (-inf) can never be sent: a share that needs it cannot be reached.
    refused = np.where(np.arange(10) == 4, -np.inf, score)
    assert others_sent_at(refused, positive, 0.8) == pytest.approx(2 / 5)
    assert others_sent_at(refused, positive, 1.0) is None
    assert others_sent_at(score, np.ones(10, bool), 0.5) is None
    # A positive without a score (NaN) is never sent, like a refused one.
    assert others_sent_at(np.where(np.arange(10) == 4, np.nan, score), positive, 0.8) == pytest.approx(2 / 5)


def test_a_models_own_threshold_decides_its_advice():
    from dermsight.domain.classes import CONDITIONS
    from dermsight.domain.knowledge import load_knowledge
    from dermsight.domain.results import prediction_result

    names = [CONDITIONS[c].name for c in LABELS]
    p = probs_of(nv=0.9, mel=0.1)  # 10% concerning: under the default 15%
    default = prediction_result(p, LABELS, names)
    own = prediction_result(p, LABELS, names, refer_from=0.08)
    k = load_knowledge()
    assert triage.advise(default, k).level == "monitor"
    assert triage.advise(own, k).level == "see_doctor"
    assert triage.advise(own, k, concern_at=0.2).level == "monitor"  # an explicit threshold wins
    assert triage.referred(p[None], LABELS, 0.08).tolist() == [True]
    assert "8%" in triage.rule(0.08) and "15%" in triage.RULE


def test_referral_fit_takes_the_highest_threshold_that_keeps_95_percent_of_melanomas():
    from dermsight.posthoc.referral import fit_referral

    # 20 melanomas with concerning shares 0.40, 0.38, ..., 0.02 under a confident-enough nevus top class, and 20 nevi
    # with shares 0.01..0.20. 95% of 20 melanomas = 19: the threshold must reach the 19th, 0.04.
    shares = [0.40 - 0.02 * i for i in range(20)] + [0.01 * (i + 1) for i in range(20)]
    probs = np.stack([probs_of(nv=1 - s, mel=s) for s in shares])
    labels = ["mel"] * 20 + ["nv"] * 20
    sources = ["a", "b"] * 20
    fit = fit_referral(probs, labels, LABELS, sources)
    assert fit["refer_from"] == pytest.approx(0.04) and fit["met"]
    assert fit["pooled"]["melanomas_referred"] == 0.95
    assert fit["pooled"]["nevi_referred"] == pytest.approx(17 / 20)  # 0.04..0.20
    assert set(fit["by_source"]) == {"a", "b"}
    # When even 1% misses the target, the lowest is chosen and the fit says so.
    hopeless = fit_referral(np.stack([probs_of(nv=1.0, mel=0.0)] * 3), ["mel"] * 3, LABELS)
    assert hopeless["refer_from"] == pytest.approx(0.01) and not hopeless["met"]
    with pytest.raises(ValueError, match="no melanomas"):
        fit_referral(probs[20:], labels[20:], LABELS)


def test_the_gate_threshold_holds_for_every_group():
    from dermsight.inference.ood import OODGate

    rng = np.random.default_rng(0)
    train = rng.normal(size=(400, 8))
    gate = OODGate.fit(train, [("pooled", 0, 8)], k=4)
    # A large source near the training data and a small one further out: a pooled 1% quantile would reject much of
    # the small one; per group, at most 1% of each.
    near, far = rng.normal(size=(900, 8)), rng.normal(size=(100, 8)) * 1.6
    feats, groups = np.concatenate([near, far]), np.array(["near"] * 900 + ["far"] * 100)
    pooled = gate.calibrated(feats, 0.01)
    grouped = gate.calibrated(feats, 0.01, groups)
    assert (grouped.score(far) > grouped.threshold).mean() <= 0.01
    assert (pooled.score(far) > pooled.threshold).mean() > 0.01
    assert grouped.threshold > pooled.threshold


def test_dermatoscope_field_blacks_out_all_but_a_centred_disc():
    from dermsight.inference.preprocess import dermatoscope_field

    img = np.full((150, 200, 3), 200, np.uint8)
    out = dermatoscope_field(img)
    assert out[0, 0].tolist() == [0, 0, 0] and out[75, 0].tolist() == [0, 0, 0]  # corner and side
    assert out[75, 100].tolist() == [200, 200, 200] and out[0, 100].tolist() == [200, 200, 200]  # centre, top middle
    assert img[0, 0].tolist() == [200, 200, 200]  # the input is not changed


def test_serving_keeps_the_finest_detail_any_training_source_had(tmp_path):
    from PIL import Image

    from dermsight.posthoc.calibrate import source_detail

    rng = np.random.default_rng(0)
    paths, sources = [], []
    for name, (w, h), quality, n in (("coarse", (200, 150), 75, 6), ("fine", (224, 224), 95, 3)):
        for i in range(n):
            p = tmp_path / f"{name}{i}.jpg"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p, quality=quality)
            paths.append(str(p))
            sources.append(name)
    assert source_detail(paths) == (150, 75)  # pooled: the majority's detail
    assert source_detail(paths, sources=sources) == (224, 95)  # by source: the finest
