"""The model's contract as typed records: built from a split manifest, converted from the earlier format's sentences,
round-tripped through the model file, and used to tell which images a model learned from."""

from __future__ import annotations

import json
from dataclasses import replace

import pandas as pd
import pytest
from pydantic import ValidationError

from dermsight.models import ModelMeta, WeightsInfo
from dermsight.models.meta import FORMAT_VERSION, split_mismatch
from dermsight.models.records import SplitRecord, StopRecord, TrainingData

WEIGHTS = WeightsInfo("none", "random", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 64)


def split_df() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "path": [f"/data/images/ISIC_{i:07d}.jpg" for i in range(8)],
            "split": ["train"] * 4 + ["val"] * 2 + ["test", "excluded"],
            "label_ham7": ["nv"] * 7 + [None],
            "source": ["ham10000"] * 5 + ["isic2017"] * 3,
        }
    )


def test_split_record_of_a_manifest_holds_sizes_fingerprint_and_the_trained_on_ids():
    record = SplitRecord.of(split_df(), seed=3, label="label_ham7")
    assert record.sizes == {"train": 4, "val": 2, "test": 1} and record.seed == 3 and len(record.fingerprint) == 16
    assert record.held_in == tuple(f"ISIC_{i:07d}" for i in range(6))  # train and val, not test
    assert record.sources == {"ham10000": 5, "isic2017": 2}  # the unlabelled row is not part of the split
    assert record.overlap(["ISIC_0000006", "ISIC_0000001", "other"]) == ["ISIC_0000001"]
    assert record.describe().endswith(f"seed 3: train 4, val 2, test 1 images; fingerprint {record.fingerprint}")
    assert "held_in" not in record.summary() and record.summary()["held_in_images"] == 6


def test_records_refuse_unknown_fields_and_impossible_values():
    with pytest.raises(ValidationError):
        SplitRecord(seed=0, sizes={"train": 1}, fingerprnt="x")
    with pytest.raises(ValidationError):
        StopRecord(reason="tired", epochs_run=1, best_epoch=1)
    with pytest.raises(ValidationError):
        TrainingData.of(["/data/ham"], [-1])


def test_a_file_of_the_earlier_format_converts_on_read():
    meta = ModelMeta.new("tf_efficientnet_lite0", "ham7", WEIGHTS, input_size=64)
    old = json.loads(meta.to_json()) | {
        "format_version": 4,
        "training_data": "../shared/data/ham10000 (10015 images)",
        "split": "lesion/patient-grouped, stratified (StratifiedGroupKFold), seed 0: train 7010, val 1502, "
        "test 1503 images; fingerprint 0123456789abcdef",
        "metrics": {"best_epoch": 5, "time_limit": {"seconds": 600, "stopped_after_epoch": 7}},
    }
    old.pop("stop")
    read = ModelMeta.from_json(json.dumps(old))
    assert read.split == SplitRecord(
        method="lesion/patient-grouped, stratified (StratifiedGroupKFold)",
        seed=0,
        sizes={"train": 7010, "val": 1502, "test": 1503},
        fingerprint="0123456789abcdef",
    )
    assert read.training_data.describe() == "../shared/data/ham10000 (10015 images)"
    assert read.training_data.describe(public=True) == "ham10000 (10015 images)"
    assert read.stop == StopRecord(reason="time_limit", epochs_run=7, best_epoch=5, time_limit_s=600)
    # The sentence it came from reads back the same, so the model card does not change its words.
    assert read.split.describe() == old["split"]
    # An old file without a split says nothing about splits, and checks none.
    bare = ModelMeta.from_json(json.dumps(old | {"split": "", "training_data": ""}))
    assert bare.split is None and bare.training_data is None
    assert split_mismatch(bare, split_df()) is None


def test_records_round_trip_through_the_file_format_and_raise_its_version():
    meta = ModelMeta.new("tf_efficientnet_lite0", "ham7", WEIGHTS, input_size=64)
    assert meta.format_version == 1
    typed = replace(
        meta,
        split=SplitRecord.of(split_df(), 0, "label_ham7"),
        training_data=TrainingData.of(["/data/ham10000", "/data/isic"], [10, 5]),
        stop=StopRecord(reason="early_stopping", epochs_run=9, best_epoch=3),
    )
    assert typed.format_version == 5  # a reader of sentences must not take records for them
    # A reader from before per-model referral thresholds would advise by the default one: it must refuse the file.
    assert replace(typed, refer_from=0.08).format_version == FORMAT_VERSION == 6
    with pytest.raises(ValueError, match="refer_from"):
        replace(meta, refer_from=1.5)
    again = ModelMeta.from_json(typed.to_json())
    assert again == typed
    assert again.training_data.images == 15
    assert again.training_data.describe(public=True) == "ham10000 (10 images) + isic (5 images)"
    with pytest.raises(ValueError, match="must be a SplitRecord"):
        replace(meta, split=42)


def test_split_mismatch_reads_the_record():
    df = split_df()
    meta = replace(
        ModelMeta.new("tf_efficientnet_lite0", "ham7", WEIGHTS, input_size=64),
        split=SplitRecord.of(df, 0, "label_ham7"),
    )
    assert split_mismatch(meta, df) is None
    moved = df.assign(path=df["path"].str.replace("/data/", "/elsewhere/"))  # the same split in another folder
    assert split_mismatch(meta, moved) is None
    resized = df.assign(split=["train"] * 3 + ["val"] * 3 + ["test", "excluded"])
    assert "not the one the model was trained on (train 4, val 2, test 1)" in split_mismatch(meta, resized)
    swapped = df.assign(split=["val"] + ["train"] * 3 + ["train", "val", "test", "excluded"])
    assert "puts other images in them" in split_mismatch(meta, swapped)


def test_typed_views_of_calibration_decision_and_gate():
    meta = ModelMeta.new("tf_efficientnet_lite0", "ham7", WEIGHTS, input_size=64)
    assert meta.calibration is None and meta.gate is None
    assert meta.decision.logit_bias == () and meta.decision.tta is False and meta.decision.tau is None
    fitted = replace(
        meta,
        temperature=0.8,
        logit_bias=(0.1,) * 7,
        metrics={"calibration": {"temperature": 0.8, "fitted_on": "val split (3 images)"}, "decision": {"tau": 0.35}},
        ood={"method": "multi-layer-ppca-mahalanobis", "threshold": 7.5, "blocks": []},
    )
    assert fitted.calibration.temperature == 0.8 and fitted.decision.tau == 0.35
    assert fitted.decision.logit_bias == (0.1,) * 7 and fitted.gate.threshold == 7.5
