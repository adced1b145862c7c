"""The decision rule: the prior-correction search and its end-to-end tuning on a split, fitted on val only."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_training import synthetic_dataset, tiny_config

from dermsight.models.bundle import read_meta
from dermsight.posthoc.decision import TAUS, choose, train_prior, tune_decision
from dermsight.training import fit


def test_choose_moves_towards_the_prior_when_that_raises_accuracy():
    # Class 0 is common (90%), class 1 rare. The logits lean slightly towards class 1 (as a class-weighted loss
    # makes them), so argmax calls every ambiguous image rare; the log prior undoes that.
    rng = np.random.default_rng(0)
    y = np.array([0] * 90 + [1] * 10)
    logits = np.stack([np.zeros(100), np.where(y == 1, 2.0, 0.3) + rng.normal(0, 0.1, 100)], 1)
    log_prior = np.log(np.array([0.9, 0.1]))
    tau, ba, acc = choose(logits, y, log_prior)
    assert tau > 0 and tau in TAUS
    assert acc == 1.0 and ba == 1.0
    assert (logits.argmax(1) == y).mean() == pytest.approx(0.1)  # the uncorrected rule: everything called rare


def test_choose_keeps_the_balanced_rule_on_ties():
    y = np.array([0, 1, 0, 1])
    logits = np.array([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0], [0.0, 5.0]])
    assert choose(logits, y, np.log(np.array([0.5, 0.5])))[0] == 0.0


def test_train_prior_follows_the_model_class_order(tmp_path):
    data = synthetic_dataset(tmp_path / "data")
    run = fit(tiny_config(tmp_path, data, epochs=1), progress=False)
    meta = read_meta(run.model_path)
    df = pd.read_csv(run.run_dir / "split.csv")
    prior, log_prior = train_prior(df[df["split"] == "train"], meta)
    assert prior.sum() == pytest.approx(1.0) and len(prior) == len(meta.classes)
    assert prior[meta.classes.index("df")] == 0 and log_prior[meta.classes.index("df")] == pytest.approx(np.log(1e-6))


def test_tune_decision_stores_the_rule_and_scores_val_and_test(tmp_path):
    data = synthetic_dataset(tmp_path / "data")
    run = fit(tiny_config(tmp_path, data, epochs=2), progress=False)
    out = tmp_path / "tuned.safetensors"
    report = tune_decision(run.model_path, run.run_dir / "split.csv", out, tmp_path / "reports", progress=False)
    meta = read_meta(out)
    tau = report["decision"]["tau"]
    _, log_prior = train_prior(pd.read_csv(run.run_dir / "split.csv").query("split == 'train'"), meta)
    assert np.allclose(meta.logit_bias, tau * log_prior)
    assert meta.temperature == pytest.approx(report["temperature"]) and meta.temperature > 0
    assert meta.metrics["decision"]["chosen_on"].startswith("val split")
    assert {"val", "test"} <= set(meta.metrics) and (tmp_path / "reports" / "test" / "metrics.json").is_file()
    assert read_meta(run.model_path).logit_bias == ()  # the input model is left as it was
    # The referral threshold is fitted on the same served probabilities and travels in the file.
    referral = meta.metrics["decision"]["referral"]
    assert meta.refer_from == referral["refer_from"] and 0 < meta.refer_from <= 0.5
    assert referral["met"] == (referral["pooled"]["melanomas_referred"] >= 0.95)


def test_tune_decision_records_each_source_of_a_split_of_several(tmp_path):
    data = synthetic_dataset(tmp_path / "data")
    run = fit(tiny_config(tmp_path, data, epochs=1), progress=False)
    split = pd.read_csv(run.run_dir / "split.csv")
    split["source"] = np.where(np.arange(len(split)) % 2 == 0, "labels-csv:a", "labels-csv:b")
    out = tmp_path / "tuned.safetensors"
    tune_decision(run.model_path, split, out, tmp_path / "reports", progress=False)
    meta = read_meta(out)
    test = meta.metrics["test"]
    assert set(test["by_source"]) == {"labels-csv:a", "labels-csv:b"}
    for figures in test["by_source"].values():
        assert {"n", "balanced_accuracy", "recall", "mel_vs_nv_auc", "referral"} <= set(figures)
    assert sum(f["n"] for f in test["by_source"].values()) == test["n"]
    assert set(meta.metrics["decision"]["referral"]["by_source"]) == {"labels-csv:a", "labels-csv:b"}


def test_one_view_rule_is_stored_by_tune_decision(tmp_path):
    # `--views 1`: served answers come from one view of the photo in its canonical orientation (an eighth of the
    # work of eight views); the decision rule is fitted for that and the file says so.
    data = synthetic_dataset(tmp_path / "data")
    run = fit(tiny_config(tmp_path, data, epochs=1), progress=False)
    split = run.run_dir / "split.csv"
    out = tmp_path / "tuned.safetensors"
    tune_decision(run.model_path, split, out, tmp_path / "reports", progress=False, views=1)
    meta = read_meta(out)
    assert meta.tta is False and "one view each" in meta.metrics["decision"]["chosen_on"]
    assert set(meta.metrics["decision"]["val_grid_best"]) == {"tta", "no_tta"}  # the other rule, for comparison
    with pytest.raises(ValueError, match="views must be 1 or 8"):
        tune_decision(run.model_path, split, tmp_path / "x.safetensors", tmp_path / "r2", progress=False, views=2)
