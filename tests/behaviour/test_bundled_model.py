"""Behaviour tests of the bundled default model itself (src/dermsight/assets/default.safetensors), on its own
held-out test lesions (HAM10000 frames and crops, ISIC 2017 images): answers that do not depend on which way up a
dermoscopy image is held, accuracy well above chance, known answers kept, and a refusal of a picture that is not a
skin lesion.

Through the public API only, so the tests keep measuring what users get while the code underneath moves.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance
from sklearn.metrics import balanced_accuracy_score

from conftest import SHARED_DATA
from dermsight.data.aspect import restore_aspect
from dermsight.data.manifest import build_manifest, combine
from dermsight.data.split import SplitConfig, split_fingerprint, split_manifest
from dermsight.inference.predictor import Predictor
from dermsight.models.bundle import DEFAULT_MODEL, read_meta

# Every test but the refusal of a non-lesion picture reads the real images the model learned from, and skips
# (needs_ham) without them.
pytestmark = pytest.mark.slow

META = read_meta(DEFAULT_MODEL)
# The folders the model learned from, as they sit under ../shared/data: its held-out split is rebuilt from all of them.
SOURCES = [SHARED_DATA / s.name for s in META.training_data.sources]
needs_ham = pytest.mark.skipif(
    not all((p / "labels.csv").is_file() for p in SOURCES),
    reason=f"the model's training data ({', '.join(p.name for p in SOURCES)}) not found under {SHARED_DATA} (set "
    "DERMSIGHT_SHARED_DATA)",
)
LABEL = "label_ham7"  # the model's taxonomy is ham7; training splits and scores on this column
# The fingerprint of the split `held_out` rebuilds from a model's recorded seed, for a record without one (sentence
# records, "seed 0: train 7010, val 1502, test 1503 images", predated fingerprints; this one is the HAM10000 split of
# the previous default). The bundled model's typed record names its own.
BUNDLED_SPLIT_FINGERPRINT = "dec6968ade653f62"


def recorded_split(meta) -> tuple[int, dict[str, int], str, tuple[str, ...]]:
    """(seed, images per split, fingerprint or "", ids of the train and val images or ()) from the model's record of
    its split: the one place that reads it.

    The record is a typed `SplitRecord` (seed, sizes, fingerprint, held_in) in files written since the record was
    typed, and a sentence before ("lesion/patient-grouped, ..., seed 0: train 7010, val 1502, test 1503 images[;
    fingerprint <16 hex>]").
    """
    record = meta.split
    if not isinstance(record, str):
        return record.seed, dict(record.sizes), record.fingerprint, tuple(record.held_in)
    seed = re.search(r"\bseed (\d+)\b", record)
    sizes = {name: int(n) for name, n in re.findall(r"\b(train|val|test) (\d+)\b", record)}
    fingerprint = re.search(r"\bfingerprint ([0-9a-f]{16})\b", record)
    assert seed and set(sizes) == {"train", "val", "test"}, f"the model's split record cannot be read: {record!r}"
    return int(seed[1]), sizes, fingerprint[1] if fingerprint else "", ()


def stratified_sample(df: pd.DataFrame, per_class: int, seed: int) -> pd.DataFrame:
    """Up to ``per_class`` rows of every class, drawn with ``seed`` from rows in image-id order, so the sample stays
    the same wherever the data sits and in whatever order the manifest lists it."""
    rng = np.random.default_rng(seed)
    picks = []
    for _, rows in sorted(df.groupby(LABEL)):
        rows = rows.sort_values("image_id")
        picks.append(rows.iloc[np.sort(rng.choice(len(rows), min(per_class, len(rows)), replace=False))])
    return pd.concat(picks, ignore_index=True)


def load(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def answer(result) -> str:
    """What the user is told: the top class code, or "rejected" for an image refused as not assessable."""
    return result.top.code if result.status == "ok" else "rejected"


def brightness(image: np.ndarray, factor: float) -> np.ndarray:
    return np.asarray(ImageEnhance.Brightness(Image.fromarray(image)).enhance(factor))


# The eight symmetries of the square less the identity: horizontal and vertical flips and three rotations.
SYMMETRIES = {
    "horizontal flip": np.fliplr,
    "vertical flip": np.flipud,
    "rotation 90": lambda a: np.rot90(a, 1),
    "rotation 180": lambda a: np.rot90(a, 2),
    "rotation 270": lambda a: np.rot90(a, 3),
}


def invariance(predictor: Predictor, images: list[np.ndarray], tta: bool | None) -> tuple[list[str], dict[str, float]]:
    """The answers to ``images`` as they are, and per symmetry the share of images whose answer it leaves unchanged
    (a refusal counts as an answer: refused one way up and answered the other is a change)."""
    before = [answer(r) for r in predictor.predict_batch(images, tta=tta)]
    rates = {}
    for name, turn in SYMMETRIES.items():
        after = [answer(r) for r in predictor.predict_batch([turn(a) for a in images], tta=tta)]
        rates[name] = float(np.mean([a == b for a, b in zip(before, after, strict=True)]))
    return before, rates


# ------------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def held_out(tmp_path_factory) -> pd.DataFrame:
    """The model's own held-out test images, rebuilt as training built them: lesion-grouped, from the recorded seed."""
    seed, sizes, fingerprint, held_in = recorded_split(META)
    # verify="none": opening every image adds about a second and cannot change the split unless a file is broken,
    # which the fingerprint below would catch.
    manifest = combine([build_manifest(p, verify="none", progress=False) for p in SOURCES]).manifest
    # The val and test fractions are SplitConfig's defaults, as in configs/default.yaml; folds=0 skips the
    # cross-validation folds of train+val, which do not move any image between train, val and test.
    split = split_manifest(manifest, SplitConfig(seed=seed, folds=0, label=LABEL))
    assert {name: int((split["split"] == name).sum()) for name in sizes} == sizes
    assert split_fingerprint(split, LABEL) == (fingerprint or BUNDLED_SPLIT_FINGERPRINT)
    test = split[split["split"] == "test"].reset_index(drop=True)
    # Sources the model saw stretched back to their true shape (`DataSource.display_aspect`) are shown so here too.
    for source in META.training_data.sources:
        rows = test["source"].str.rsplit(":", n=1).str[-1] == source.name
        if source.display_aspect and rows.any():
            shown, bad = restore_aspect(test[rows], source.display_aspect, tmp_path_factory.mktemp("aspect"), False)
            assert not bad, bad
            test = pd.concat([test[~rows], shown], ignore_index=True)
    # Where the model lists the images it learned from or was selected on, none of them may be among these.
    assert not set(test["image_id"]) & set(held_in)
    return test


@pytest.fixture(scope="session")
def predictor(tmp_path_factory) -> Predictor:
    # ONNX Runtime: about 50 ms an image on 2 cores, against about 430 ms with PyTorch (measured); "onnx", not
    # "auto", so a broken export fails here instead of falling back to PyTorch and a nine times slower run. A session
    # fixture is built before the per-test cache fixture of tests/conftest.py, so the export goes to the same temporary
    # cache here, never into the user's home.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DERMSIGHT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        return Predictor.from_path(DEFAULT_MODEL, backend="onnx", threads=2)


# ---------------------------------------------------------------------------------------------------------- tests


@pytest.mark.shared_data
@needs_ham
def test_held_out_split_is_the_models_own(held_out):
    # The fixture asserts the recorded sizes and the fingerprint; a stratified split also holds out every class.
    assert set(held_out[LABEL]) == set(META.classes)


@pytest.mark.shared_data
@needs_ham
def test_answers_do_not_depend_on_which_way_up_the_lesion_is(held_out, predictor):
    # Dermoscopy has no up or left, so a flipped or rotated lesion must get the same answer. Serving turns every photo
    # to its canonical orientation first (`preprocess.canonical`), and averages over its eight views where the model
    # says so, so every (image, symmetry) pair keeps its answer (measured: all 280 on this sample of 8 held-out images
    # a class, seed 0). The previous default, each image one view as taken, kept 86.1% of them.
    sample = stratified_sample(held_out, per_class=8, seed=0)
    before, rates = invariance(predictor, [load(p) for p in sample["path"]], tta=None)
    # A model that gives every image one answer, or refuses them all, is invariant too: the answers must still
    # name most classes (all seven here, measured, and one image refused).
    assert len(set(before) - {"rejected"}) >= 6, sorted(set(before))
    assert min(rates.values()) == 1.0, {name: round(rate, 3) for name, rate in rates.items()}


@pytest.mark.shared_data
@needs_ham
def test_balanced_accuracy_on_held_out_lesions_is_far_above_chance(held_out, predictor):
    # Chance is 1/7 = 0.14. Measured on this sample (up to 32 held-out images a class, seed 1; 218 images):
    # balanced accuracy 0.755, none refused as not lesions (a refusal counts as wrong here; the whole test split
    # scores 0.738 without the gate, as the model's metadata records). Samples drawn with seed 2 and with 40 a class
    # measured 0.728 and 0.712.
    sample = stratified_sample(held_out, per_class=32, seed=1)
    answers = [answer(r) for r in predictor.predict_batch(list(sample["path"]))]
    with warnings.catch_warnings():
        # "rejected" is a prediction no image is labelled with; sklearn warns about it and scores it as wrong.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        score = balanced_accuracy_score(sample[LABEL], answers)
    assert score >= 0.6, score
    # Held-out lesions are what the not-a-lesion gate must let through: a gate that refuses everything would also
    # pass the refusal test below.
    assert answers.count("rejected") / len(answers) <= 0.08, answers.count("rejected")


# Held-out nevi the model names with the highest confidence (measured nv probability, TTA off), by (folder, image):
# HAM10000 frames and the 224 px crops share image ids.
CONFIDENT_NEVI = {
    ("ham10000", "ISIC_0025882"): 0.9988,
    ("ham10000_224", "ISIC_0033877"): 0.9986,
    ("ham10000", "ISIC_0030662"): 0.9984,
}


def rows_of(held_out: pd.DataFrame, keys) -> pd.DataFrame:
    """The held-out rows of ``keys``, (folder, image id) pairs, in their order."""
    # A manifest's source is "<reader>:<folder name>" (labels-csv:ham10000).
    by_key = held_out.assign(folder=held_out["source"].str.rsplit(":", n=1).str[-1]).set_index(["folder", "image_id"])
    return by_key.loc[list(keys)]


@pytest.mark.shared_data
@needs_ham
def test_known_nevi_are_called_nevi(held_out, predictor):
    rows = rows_of(held_out, CONFIDENT_NEVI)
    assert len(rows) == len(CONFIDENT_NEVI) and (rows[LABEL] == "nv").all()
    results = predictor.predict_batch(list(rows["path"]), tta=False)
    assert [answer(r) for r in results] == ["nv"] * len(CONFIDENT_NEVI)
    # Still confident: a model whose calibration broke (a temperature far too high) would hedge on these.
    assert all(r.top.probability > 0.9 for r in results), [r.top.probability for r in results]


# Held-out melanomas the model flags (measured mel probability, TTA off), three lesions whose answer stays mel from
# 0.8 to 1.2 times their brightness. Of the 169 of 301 held-out melanomas it names as melanomas (TTA off), 160 keep
# that answer at 0.85 times their brightness and 151 at 1.15 times; the others get another class.
FLAGGED_MELANOMAS = {
    ("ham10000", "ISIC_0033477"): 0.984,
    ("ham10000", "ISIC_0025732"): 0.979,
    ("ham10000", "ISIC_0031208"): 0.974,
}


@pytest.mark.shared_data
@needs_ham
@pytest.mark.parametrize("factor", [0.85, 1.15])
def test_a_flagged_melanoma_stays_flagged_when_a_little_darker_or_brighter(held_out, predictor, factor):
    # Exposure differs from one camera or dermatoscope to the next; a melanoma must not be cleared by it.
    rows = rows_of(held_out, FLAGGED_MELANOMAS)
    assert len(rows) == len(FLAGGED_MELANOMAS) and (rows[LABEL] == "mel").all()
    images = [load(p) for p in rows["path"]]
    before = [answer(r) for r in predictor.predict_batch(images, tta=False)]
    after = [answer(r) for r in predictor.predict_batch([brightness(a, factor) for a in images], tta=False)]
    assert before == after == ["mel"] * len(FLAGGED_MELANOMAS), (before, after)


def colour_blocks() -> np.ndarray:
    """A 6x8 grid of random flat colours: sharp, colourful, well exposed, and nothing like skin."""
    rng = np.random.default_rng(0)
    return np.kron(rng.integers(0, 256, (6, 8, 3)), np.ones((50, 50, 1))).astype(np.uint8)


def checkerboard() -> np.ndarray:
    yy, xx = np.mgrid[0:300, 0:400]
    board = (((yy // 25) + (xx // 25)) % 2 * 200 + 30).astype(np.uint8)
    return np.stack([board, board, board // 2], axis=2)


@pytest.mark.parametrize("make", [checkerboard, colour_blocks], ids=["checkerboard", "colour blocks"])
def test_a_picture_that_is_no_lesion_is_refused(predictor, make):
    # Both pass the image-quality gate (sharp, colour, exposed well), so only the model's own not-a-lesion gate
    # (statistics of its features stored in the model file) can refuse them: measured scores 101 (checkerboard)
    # and 37 (colour blocks) against its threshold of 12.5.
    result = predictor.predict(make(), tta=False)
    assert result.status == "rejected", answer(result)
    assert result.scores["ood"] > result.scores["ood_threshold"], result.reason
