"""Evaluation metrics against hand-computed cases, probability mapping between taxonomies, and the report."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from dermsight.domain.classes import HAM7, ISIC2019
from dermsight.evaluation import (
    compute_metrics,
    expected_calibration_error,
    map_labels,
    map_probabilities,
    reliability_bins,
    write_report,
)

TOY_LABELS = ("mel", "nv", "bkl")
# True class -> predicted class for the 10 toy cases. Confusion matrix (rows true, cols predicted):
#   mel [3, 1, 0]   nv [0, 2, 1]   bkl [1, 0, 2]
TOY_TRUE = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
TOY_PRED = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 0])


def toy_probs() -> np.ndarray:
    """0.8 on the predicted class and 0.1 on the others: every top-1 confidence is 0.8."""
    probs = np.full((10, 3), 0.1)
    probs[np.arange(10), TOY_PRED] = 0.8
    return probs


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Imbalanced HAM7-like labels with softmax scores that carry some signal about the true class."""
    rng = np.random.default_rng(seed)
    y = rng.choice(7, size=n, p=[0.05, 0.08, 0.12, 0.03, 0.12, 0.55, 0.05])
    logits = rng.normal(size=(n, 7))
    logits[np.arange(n), y] += 1.5
    probs = np.exp(logits)
    return y, probs / probs.sum(axis=1, keepdims=True)


def test_toy_case_matches_hand_computation():
    m = compute_metrics(TOY_TRUE, toy_probs(), TOY_LABELS, n_bootstrap=0)

    assert m["n"] == 10
    assert m["labels"] == list(TOY_LABELS)
    assert m["confusion_matrix"] == [[3, 1, 0], [0, 2, 1], [1, 0, 2]]
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 2 / 3 + 2 / 3) / 3)
    mel, nv, bkl = (m["per_class"][code] for code in TOY_LABELS)
    assert (mel["support"], nv["support"], bkl["support"]) == (4, 3, 3)
    assert mel["name"] == "Melanoma"
    assert mel["malignancy"] == "malignant" and nv["malignancy"] == "benign"
    assert mel["recall"] == pytest.approx(3 / 4)
    assert nv["recall"] == pytest.approx(2 / 3)
    assert mel["precision"] == pytest.approx(3 / 4)  # column mel: 3 right, 1 bkl called mel
    assert nv["precision"] == pytest.approx(2 / 3)
    # Specificity = TN / negatives: mel has 6 negatives, one of which (a bkl) was called mel.
    assert mel["specificity"] == pytest.approx(5 / 6)
    assert nv["specificity"] == pytest.approx(6 / 7)
    assert bkl["specificity"] == pytest.approx(6 / 7)
    assert mel["f1"] == pytest.approx(3 / 4)
    # Mel scores: positives [.8, .8, .8, .1], negatives [.1 x5, .8]: 15 wins + 8 ties of 24 pairs.
    assert mel["auc"] == pytest.approx((15 + 0.5 * 8) / 24)
    # Every confidence is 0.8 (one bin) and 70% are right.
    assert m["ece"] == pytest.approx(0.1)
    assert m["warnings"] == []


def test_ece_two_bins_by_hand():
    # Four cases at confidence 0.95 (3 right, gap 0.2) and two at 0.55 (none right, gap 0.55).
    probs = np.array([[0.95, 0.05]] * 4 + [[0.55, 0.45]] * 2)
    y = np.array([0, 0, 0, 1, 1, 1])
    assert expected_calibration_error(probs, y) == pytest.approx((4 * 0.2 + 2 * 0.55) / 6)

    bins = reliability_bins(probs, y, n_bins=15)
    assert bins.counts.sum() == 6
    assert bins.counts[14] == 4 and bins.counts[8] == 2  # (14/15, 1] and (8/15, 9/15]
    assert bins.accuracy[14] == pytest.approx(0.75)
    assert bins.confidence[8] == pytest.approx(0.55)
    assert np.isnan(bins.accuracy[0])


def test_reliability_bins_are_right_closed():
    # Confidences exactly on the edges 0.5 and 0.75 of 4 bins fall in the lower bin; 1.0 in the last.
    probs = np.array([[0.5, 0.25, 0.25, 0.0], [0.75, 0.25, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    bins = reliability_bins(probs, np.zeros(3, dtype=int), n_bins=4)
    assert bins.counts.tolist() == [0, 1, 1, 1]


def test_perfect_confident_classifier():
    y = np.array([0, 1, 2, 3, 4, 5, 6] * 5)
    probs = np.eye(7)[y]
    m = compute_metrics(y, probs, HAM7.codes, n_bootstrap=50)
    assert m["accuracy"] == 1.0
    assert m["balanced_accuracy"] == 1.0
    assert m["macro_auc"] == 1.0
    assert m["ece"] == pytest.approx(0.0, abs=1e-12)
    assert all(row["auc"] == 1.0 and row["specificity"] == 1.0 for row in m["per_class"].values())
    assert m["ci95"]["balanced_accuracy"] == [1.0, 1.0]


def test_macro_auc_and_balanced_accuracy_agree_with_sklearn():
    y, probs = synthetic(400)
    m = compute_metrics(y, probs, HAM7.codes, n_bootstrap=0)
    assert m["macro_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["weighted_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="weighted"))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, probs.argmax(axis=1)))


def tied_scores(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three classes, rows drawn from a few dyadic templates (exact sums of 1), so scores tie a lot."""
    rng = np.random.default_rng(seed)
    templates = np.array([[0.75, 0.125, 0.125], [0.5, 0.25, 0.25], [0.25, 0.625, 0.125], [0.125, 0.5, 0.375]])
    return rng.integers(0, 3, size=n), templates[rng.integers(0, len(templates), size=n)]


def _stratified_draws(y: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> list[np.ndarray]:
    """The case indices of each resample, drawn as the bootstrap's documented rule says: per class (of a group's
    first case), as many groups as it has, with replacement, in the same order of random draws."""
    cluster = pd.factorize(pd.Series(groups, dtype=object))[0]
    first = np.unique(cluster, return_index=True)[1]
    rng = np.random.default_rng(seed)
    picks = [np.empty((n_boot, 0), int)]
    for c in range(int(y.max()) + 1):
        members = np.flatnonzero(y[first] == c)
        if len(members):
            picks.append(members[rng.integers(0, len(members), size=(n_boot, len(members)))])
    chosen = np.concatenate(picks, axis=1)
    return [np.concatenate([np.flatnonzero(cluster == g) for g in row]) for row in chosen]


@pytest.mark.parametrize("case", ["continuous", "tied", "lesions"])
def test_bootstrap_equals_naive_resampling(case):
    # The vectorised bootstrap must give the same numbers as scoring each resample with sklearn.
    y, probs = synthetic(150, seed=3) if case != "tied" else tied_scores(60)
    labels = HAM7.codes if case != "tied" else TOY_LABELS
    groups = None
    if case == "lesions":  # lesions of one to three photos, all of one class
        sizes = np.random.default_rng(5).integers(1, 4, size=len(y))
        lesion = np.repeat(np.arange(len(y)), sizes)[: len(y)]
        y = y[lesion]  # a lesion's photos share its label
        groups = np.array([f"L{i}" for i in lesion], dtype=object)
    n_classes = len(labels)
    n_boot, seed = 40, 7
    m = compute_metrics(y, probs, labels, n_bootstrap=n_boot, seed=seed, groups=groups)

    draws = _stratified_draws(y, groups if groups is not None else np.arange(len(y)), n_boot, seed)
    naive: dict[str, list[float]] = {"accuracy": [], "balanced_accuracy": [], "macro_auc": []}
    for idx in draws:
        yb, pb = y[idx], probs[idx]
        naive["accuracy"].append(accuracy_score(yb, pb.argmax(axis=1)))
        with warnings.catch_warnings():
            # A resample can miss a class that is still predicted; sklearn warns and drops it.
            warnings.simplefilter("ignore", UserWarning)
            naive["balanced_accuracy"].append(balanced_accuracy_score(yb, pb.argmax(axis=1)))
        present = np.unique(y)
        if len(np.unique(yb)) == len(present):
            naive["macro_auc"].append(np.mean([roc_auc_score(yb == k, pb[:, k]) for k in present]))
    for name, values in naive.items():
        assert m["ci95"][name] == pytest.approx(list(np.percentile(values, [2.5, 97.5])))
    assert m["bootstrap"]["valid_resamples"]["macro_auc"] == len(naive["macro_auc"]) == n_boot  # no class lost
    assert n_classes >= len(np.unique(y))


def test_bootstrap_keeps_rare_classes_and_draws_a_lesions_photos_together():
    # One missed melanoma among 35 cases: resamples that dropped it put the point estimate on the lower bound.
    y = np.repeat(np.arange(6), [6, 5, 5, 5, 5, 5])
    pred = y.copy()
    pred[0] = 1  # the melanoma called a naevus
    probs = np.eye(7)[pred] * 0.9 + 0.1 / 7
    m = compute_metrics(y, probs, HAM7.codes, n_bootstrap=400)
    low, high = m["ci95"]["balanced_accuracy"]
    assert low < m["balanced_accuracy"] <= high
    # Three photos of each lesion are one case, not three: the interval is wider than counting photos.
    y, probs = synthetic(120, seed=2)
    tripled = compute_metrics(np.repeat(y, 3), np.repeat(probs, 3, axis=0), HAM7.codes, n_bootstrap=400)
    lesions = compute_metrics(
        np.repeat(y, 3), np.repeat(probs, 3, axis=0), HAM7.codes, n_bootstrap=400, groups=np.repeat(np.arange(120), 3)
    )
    width = {k: m["ci95"]["accuracy"][1] - m["ci95"]["accuracy"][0] for k, m in (("t", tripled), ("l", lesions))}
    assert width["l"] > 1.4 * width["t"]  # about sqrt(3)
    assert "groups of cases (120 groups" in lesions["bootstrap"]["method"]


def test_confidence_intervals_contain_estimate_narrow_with_data_and_are_deterministic():
    small = compute_metrics(*synthetic(200, seed=1), HAM7.codes, n_bootstrap=300)
    large = compute_metrics(*synthetic(2000, seed=1), HAM7.codes, n_bootstrap=300)
    for m in (small, large):
        for name in ("accuracy", "balanced_accuracy", "macro_auc"):
            low, high = m["ci95"][name]
            assert low <= m[name] <= high
    for name in ("accuracy", "balanced_accuracy", "macro_auc"):
        width = {key: m["ci95"][name][1] - m["ci95"][name][0] for key, m in (("s", small), ("l", large))}
        assert width["l"] < 0.6 * width["s"]  # ~sqrt(10) narrower in theory

    y, probs = synthetic(200, seed=1)
    again = compute_metrics(y, probs, HAM7.codes, n_bootstrap=300)
    assert again["ci95"] == small["ci95"]
    other_seed = compute_metrics(y, probs, HAM7.codes, n_bootstrap=300, seed=1)
    assert other_seed["ci95"] != small["ci95"]


def test_class_without_support():
    # No true bkl, but the model predicts bkl once.
    y = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array(
        [
            [0.9, 0.05, 0.05],
            [0.6, 0.3, 0.1],
            [0.2, 0.1, 0.7],
            [0.1, 0.8, 0.1],
            [0.3, 0.6, 0.1],
            [0.5, 0.4, 0.1],
        ]
    )
    m = compute_metrics(y, probs, TOY_LABELS, n_bootstrap=100)

    bkl = m["per_class"]["bkl"]
    assert bkl["support"] == 0
    assert bkl["recall"] is None and bkl["auc"] is None
    assert bkl["precision"] == 0.0  # predicted once, wrongly
    assert m["auc_excluded"] == ["bkl"]
    # sklearn drops classes absent from y_true: mean of mel recall 2/3 and nv recall 2/3.
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    assert m["macro_auc"] == pytest.approx(np.mean([m["per_class"][c]["auc"] for c in ("mel", "nv")]))
    assert any("bkl" in note for note in m["warnings"])
    json.dumps(m, allow_nan=False)  # undefined values are null, not NaN


def test_unnormalised_probabilities_are_renormalised_with_a_warning():
    y, probs = synthetic(100, seed=2)
    reference = compute_metrics(y, probs, HAM7.codes, n_bootstrap=20)
    scaled = compute_metrics(y, probs * 3.0, HAM7.codes, n_bootstrap=20)
    for key in ("accuracy", "balanced_accuracy", "macro_auc", "ece", "nll"):
        assert scaled[key] == pytest.approx(reference[key])
    for key, interval in reference["ci95"].items():
        assert scaled["ci95"][key] == pytest.approx(interval)
    assert reference["warnings"] == []
    assert any("renormalised" in note for note in scaled["warnings"])
    # float32 softmax rounding is not worth a warning.
    assert compute_metrics(y, probs.astype(np.float32), HAM7.codes, n_bootstrap=0)["warnings"] == []


def test_rejects_logits_and_bad_shapes():
    y, probs = synthetic(20)
    with pytest.raises(ValueError, match="logits"):
        compute_metrics(y, np.log(probs), HAM7.codes)
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(y, probs[:, :6], HAM7.codes)
    with pytest.raises(ValueError, match="outside"):
        compute_metrics(np.full(20, 7), probs, HAM7.codes)
    with pytest.raises(ValueError, match="unknown class code"):
        compute_metrics(y, probs, ("a", "b", "c", "d", "e", "f", "g"))


def test_map_isic2019_probabilities_to_ham7():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(8), size=50)
    mapped = map_probabilities(probs, ISIC2019.codes, HAM7.codes)

    assert mapped.shape == (50, 7)
    np.testing.assert_allclose(mapped.sum(axis=1), 1.0)
    col = {code: ISIC2019.index(code) for code in ISIC2019.codes}
    np.testing.assert_allclose(mapped[:, HAM7.index("akiec")], probs[:, col["AK"]] + probs[:, col["SCC"]])
    np.testing.assert_allclose(mapped[:, HAM7.index("mel")], probs[:, col["MEL"]])
    np.testing.assert_allclose(mapped[:, HAM7.index("nv")], probs[:, col["NV"]])


def test_map_ham7_to_isic2019_refuses_to_split_akiec():
    probs = np.full((3, 7), 1 / 7)
    with pytest.raises(ValueError, match="akiec"):
        map_probabilities(probs, HAM7.codes, ISIC2019.codes)
    # Scoring a HAM7 model on ISIC 2019 data goes the other way: the ground truth is mapped down.
    y = np.array([ISIC2019.index(code) for code in ("AK", "SCC", "MEL", "NV")])
    assert map_labels(y, ISIC2019.codes, HAM7.codes).tolist() == [
        HAM7.index(c) for c in ("akiec", "akiec", "mel", "nv")
    ]
    with pytest.raises(ValueError, match="akiec"):
        map_labels(np.array([HAM7.index("akiec")]), HAM7.codes, ISIC2019.codes)


def test_write_report(tmp_path):
    import matplotlib.pyplot as plt

    y, probs = synthetic(120, seed=4)
    y[y == HAM7.index("df")] = HAM7.index("nv")  # one class without support: its ROC curve is skipped
    m = compute_metrics(y, probs, HAM7.codes, n_bootstrap=50)
    paths = write_report(m, probs, y, tmp_path / "eval", "Test report", extra={"model": "toy | model"})

    expected = {"metrics.json", "confusion_matrix.png", "roc_curves.png", "reliability.png", "report.md"}
    assert {p.name for p in paths.values()} == expected
    assert all(p.parent == tmp_path / "eval" and p.stat().st_size > 0 for p in paths.values())

    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    required = {
        "accuracy",
        "balanced_accuracy",
        "macro_auc",
        "ece",
        "labels",
        "per_class",
        "confusion_matrix",
    }
    assert required <= saved.keys()
    assert saved["labels"] == list(HAM7.codes)
    assert saved["extra"] == {"model": "toy | model"}
    assert saved["per_class"]["df"]["recall"] is None

    for name in ("confusion_matrix.png", "roc_curves.png", "reliability.png"):
        with Image.open(tmp_path / "eval" / name) as image:
            image.verify()
            assert image.format == "PNG"
            assert min(image.size) >= 400

    report = (tmp_path / "eval" / "report.md").read_text()
    assert "# Test report" in report
    assert "not a clinical validation" in report
    assert f"{m['balanced_accuracy']:.3f}" in report
    assert "| **mel** |" in report
    assert "toy \\| model" in report
    for name in ("confusion_matrix.png", "roc_curves.png", "reliability.png"):
        assert f"]({name})" in report
    assert plt.get_fignums() == []  # no figure left open


def test_write_report_rejects_mismatched_inputs(tmp_path):
    y, probs = synthetic(30)
    m = compute_metrics(y, probs, HAM7.codes, n_bootstrap=0)
    with pytest.raises(ValueError, match="cases"):
        write_report(m, probs[:20], y[:20], tmp_path, "mismatch")
