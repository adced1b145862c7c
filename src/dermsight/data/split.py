"""Train/val/test splits and cross-validation folds grouped by lesion and patient.

HAM10000 has several photographs of one lesion (10,015 images of 7,470 lesions). A random image split puts views of
the same lesion on both sides and inflates every metric, so all splits here are made over *groups*: images that share
a lesion_id or a patient_id (transitively) always land in the same split. Within that constraint the class balance
is kept with scikit-learn's `StratifiedGroupKFold`.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pandas as pd

from dermsight.data.manifest import image_ids

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitConfig:
    val: float = 0.15
    test: float = 0.15
    seed: int = 0
    folds: int = 5  # cross-validation folds over the train+val part
    label: str = "label_ham7"


def groups(manifest: pd.DataFrame) -> np.ndarray:
    """One group number per row: connected components of rows sharing a lesion_id or a patient_id.

    Rows with neither are their own group (an image alone). Union-find over the two id columns.
    """
    n = len(manifest)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for col in ("lesion_id", "patient_id"):
        if col not in manifest:
            continue
        ids = manifest[col].to_numpy()
        first: dict[object, int] = {}
        for i, v in enumerate(ids):
            if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA or v == "":
                continue
            j = first.setdefault(v, i)
            if j != i:
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[ri] = rj
    roots = np.array([find(i) for i in range(n)])
    return np.unique(roots, return_inverse=True)[1]


def _fold_plan(val: float, test: float) -> tuple[int, int, int]:
    """Smallest number of equal folds that expresses both fractions (to the nearest 1/20 at worst)."""
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"val ({val}) and test ({test}) must be fractions in [0, 1) with val + test < 1")
    fv, ft = Fraction(val).limit_denominator(20), Fraction(test).limit_denominator(20)
    k = math.lcm(fv.denominator, ft.denominator)
    if k < 3:
        k *= 10  # 1/2-sized splits still need several folds to stratify well
    return k, round(fv * k), round(ft * k)


def _assign(y: np.ndarray, g: np.ndarray, n_splits: int, seed: int) -> np.ndarray:
    """Fold number per row from StratifiedGroupKFold (shuffled groups, deterministic for a seed)."""
    fold = np.full(len(y), -1)
    # Imported here: a serving install (no scikit-learn) reads split records but never makes a split.
    from sklearn.model_selection import StratifiedGroupKFold

    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # sklearn warns when a class has fewer groups than folds; we check the outcome ourselves.
        warnings.simplefilter("ignore", UserWarning)
        for k, (_, idx) in enumerate(sgkf.split(np.zeros(len(y)), y, g)):
            fold[idx] = k
    return fold


def split_manifest(manifest: pd.DataFrame, cfg: SplitConfig = SplitConfig()) -> pd.DataFrame:
    """Return the manifest with ``split`` (train/val/test) and ``fold`` (CV fold of train+val rows; -1 for test).

    Rows whose label cannot be used for stratification (missing ``cfg.label``) are kept out of every split
    (``split`` = "excluded") rather than silently joining training.
    """
    df = manifest.reset_index(drop=True).copy()
    label = cfg.label if cfg.label in df else "label"
    usable = df[label].notna().to_numpy()
    df["split"] = "excluded"
    df["fold"] = -1
    sub = df[usable]
    if len(sub) == 0:
        return df
    y = sub[label].astype(str)
    if "source" in sub and sub["source"].nunique() > 1:
        # Strata of class and source: each source's classes spread over the parts in proportion, so no source's
        # melanomas gather in one split. One source gives the same strata (and the same split) as the class alone.
        y = y + " | " + sub["source"].astype(str)
    y = y.to_numpy()
    g = groups(sub)
    n_groups = len(np.unique(g))
    k, k_val, k_test = _fold_plan(cfg.val, cfg.test)
    if n_groups < k:
        raise ValueError(f"only {n_groups} lesion/patient groups: too few to split into {k} parts")
    largest = int(pd.Series(y).value_counts().max())
    if largest < k:
        # StratifiedGroupKFold's own message ("n_splits=20 cannot be greater than the number of members in each
        # class") names none of the options that decide k.
        raise ValueError(
            f"val {cfg.val} and test {cfg.test} split the data into {k} stratified parts, but no class has {k} "
            f"images (the largest has {largest}): use more images, or coarser fractions (val 0.2 and test 0.2 "
            "need 5 parts)"
        )
    fold = _assign(y, g, k, cfg.seed)
    # Which folds become test and val is drawn from the seed too, so different seeds give different test sets.
    order = np.random.default_rng(cfg.seed).permutation(k)
    test_folds, val_folds = set(order[:k_test]), set(order[k_test : k_test + k_val])
    split = np.where(np.isin(fold, list(test_folds)), "test", np.where(np.isin(fold, list(val_folds)), "val", "train"))
    df.loc[usable, "split"] = split

    # Cross-validation folds over train+val, grouped and stratified the same way.
    dev = split != "test"
    cv = np.full(len(sub), -1)
    if cfg.folds >= 2 and len(np.unique(g[dev])) >= cfg.folds:
        cv[dev] = _assign(y[dev], g[dev], cfg.folds, cfg.seed)
    df.loc[usable, "fold"] = cv
    return df


def check_split(df: pd.DataFrame, label: str = "label_ham7") -> list[str]:
    """Human-readable problems with a split: groups crossing splits, classes missing from a split."""
    issues = []
    used = df[df["split"].isin(SPLITS)]
    g = groups(used)
    crossing = pd.Series(used["split"].to_numpy()).groupby(g).nunique()
    if (crossing > 1).any():
        issues.append(f"{int((crossing > 1).sum())} lesion/patient group(s) appear in more than one split")
    label = label if label in used else "label"
    classes = set(used[label].dropna())
    for s in SPLITS:
        missing = classes - set(used.loc[used["split"] == s, label])
        if missing and (used["split"] == s).any():
            issues.append(f"split {s!r} has no image of: {', '.join(sorted(missing))}")
    return issues


def split_rows(df: pd.DataFrame, label: str | None = None) -> pd.DataFrame:
    """The rows of a split manifest that are in train, val or test and, with ``label``, have a value in that column."""
    used = df[df["split"].isin(SPLITS)]
    return used[used[label].notna()] if label is not None and label in used else used


def split_fingerprint(df: pd.DataFrame, label: str | None = None) -> str:
    """A short hash of which image is in which split (train/val/test), to tell a model's own split from another of
    the same sizes. Images are keyed by `manifest.image_ids` (``image_id`` where the manifest has one, else the file
    name without folder or suffix), so the same split moved to another folder (or machine) keeps its fingerprint.
    ``label``: count only rows with a value in this column (the rows a taxonomy can train on)."""
    used = split_rows(df, label)
    lines = sorted(f"{k}\t{s}" for k, s in zip(image_ids(used), used["split"], strict=True))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def split_changes(before: pd.DataFrame, after: pd.DataFrame) -> dict[str, int]:
    """How a split changed, image by image (keyed by `manifest.image_ids`): ``moved`` to another split, ``added``
    to a split, ``gone`` from all of them. A lesion-grouped split is redrawn as a whole, so one image more or less
    in the data can move a hundred others."""
    a, b = ({k: s for k, s in zip(image_ids(d), d["split"], strict=True) if s in SPLITS} for d in (before, after))
    return {
        "moved": sum(a[k] != b[k] for k in a.keys() & b.keys()),
        "added": len(b.keys() - a.keys()),
        "gone": len(a.keys() - b.keys()),
    }
