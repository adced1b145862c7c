"""Readers for the dataset layouts people really have, each into one manifest table.

A manifest has one row per usable image with the columns in `MANIFEST_COLUMNS`. Every reader returns an `Ingest`:
the good rows plus a `Problem` per dropped item, so one broken file never aborts a whole ingest. A source that cannot
be used at all (a CSV missing a required column) raises `DataError` with the file and the reason.
"""

from __future__ import annotations

import csv
import filecmp
import io
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from dermsight.data.images import ImageError, load_rgb, probe
from dermsight.data.problems import DataError, Problem
from dermsight.domain.classes import HAM7, ISIC2019, UnknownLabelError, lookup, to_taxonomy
from dermsight.files import written_atomically


class Classes(Protocol):
    """What reading labels needs of a model's contract (`models.meta.ModelMeta` has it): its taxonomy and its
    classes in logit order."""

    taxonomy: str
    classes: tuple[str, ...]


MANIFEST_COLUMNS = (
    "path",  # absolute path of the image file
    "image_id",
    "label",  # catalogue code in the source's own taxonomy (HAM7 lower case, ISIC 2019 upper case)
    "label_ham7",  # the 7-class HAM code, what dermsight trains on (empty for ISIC 2019 UNK)
    "label_isic2019",  # the ISIC 2019 code where known (HAM's akiec is AK or SCC; only some sources say which)
    "lesion_id",
    "patient_id",
    "source",
    "age",
    "sex",
    "site",
    "dx_type",
    "width",
    "height",
)
ID_COLUMNS = ("image_id", "lesion_id", "patient_id")
# The manifest column that holds each taxonomy's labels (training, evaluation and calibration read it from here).
LABEL_COLUMNS = {"ham7": "label_ham7", "isic2019": "label_isic2019"}
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
# Photos in formats that are not read (iPhones save HEIC): `predict` on a folder names each one rather than passing
# over it.
UNREAD_PHOTO_SUFFIXES = frozenset({".heic", ".heif", ".avif", ".gif"})
_JUNK = frozenset({"thumbs.db", "desktop.ini"})
# ISIC 2018 Task 3 (HAM10000's own challenge) writes its ground truth one-hot in these columns, upper case.
ISIC2018_COLUMNS = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")

FORMATS = ("labels-csv", "ham10000", "isic2019", "isic-archive", "folders")


@dataclass
class Ingest:
    manifest: pd.DataFrame
    problems: list[Problem] = field(default_factory=list)
    format: str = ""
    rows_read: int = 0
    labels_read: dict[str, int] = field(default_factory=dict)  # label counts in the source, before any drop


# ----------------------------------------------------------------------------------------------------------- helpers


def _csv_text(path: Path) -> tuple[str, str | None]:
    """The file's text and the separator to parse it with, the file read once. UTF-16 when it starts with its
    byte-order mark (Excel's "Unicode text", tab-separated, so the separator is sniffed), else UTF-8 (a UTF-8 mark
    is skipped) when all of it decodes as UTF-8, else Windows-1252 (what spreadsheets save as "CSV"). All of it is
    checked: a first accented name can come late."""
    data = Path(path).read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16"), None
    try:
        return data.decode("utf-8-sig"), ","
    except UnicodeDecodeError:
        return data.decode("cp1252"), ","


def _parse_csv(path: Path, **kwargs: Any) -> pd.DataFrame:
    """`pandas.read_csv` of the file per `_csv_text` (only Python's parser sniffs a separator)."""
    text, sep = _csv_text(path)
    return pd.read_csv(io.StringIO(text), sep=sep, engine="python" if sep is None else "c", **kwargs)


def _read_csv(path: Path, required: tuple[str, ...], what: str) -> pd.DataFrame:
    try:
        # Ids must stay strings ("0001" is not 1); empty cells become NA, not the string "nan".
        df = _parse_csv(path, dtype=str, keep_default_na=True, skipinitialspace=True)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable CSV file ({e})") from None
    df.columns = [str(c).strip() for c in df.columns]
    _require(df, path, required, what)
    return df


def _require(df: pd.DataFrame, path: Path, required: tuple[str, ...], what: str) -> None:
    # Column names in another case ("Image,Label", as spreadsheets often capitalise them) are the same columns.
    by_lower: dict[str, list[str]] = {}
    for c in df.columns:
        by_lower.setdefault(c.lower(), []).append(c)
    renames = {
        by_lower[c.lower()][0]: c for c in required if c not in df.columns and len(by_lower.get(c.lower(), [])) == 1
    }
    if renames:
        df.columns = [renames.get(c, c) for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(
            f"{path}: missing required column(s) {', '.join(missing)} for {what} "
            f"(found: {', '.join(df.columns) or 'none'})"
        )


def walk(root: str | os.PathLike, skip: Callable[[str], bool] | None = None) -> Iterator[tuple[str, list[str]]]:
    """(folder, sorted file names) for ``root`` and every folder under it, hidden ones (".name") left out, in a stable
    order. Symbolic links to folders are followed (a dataset assembled from links to where the images really are is
    common), each real folder once, so a link back up the tree cannot loop. ``skip``: a folder whose real path it
    accepts is not entered, even through a link."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen or (skip is not None and skip(real)):
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield dirpath, sorted(filenames)


def _same_bytes(a: Path, b: Path) -> bool:
    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError:  # one cannot be read (no permission): not known to be the same image
        return False


class ImageIndex(dict[str, Path]):
    """Image stem -> file for every image under a root, with ``duplicates``: the stems that name more than one file
    there. A stem whose files differ is ambiguous and must not be resolved (which file came first depends on the
    folder walk); byte-identical copies are one image (Kaggle's HAM10000 holds every image in two folders)."""

    def __init__(self) -> None:
        super().__init__()
        self.duplicates: dict[str, list[Path]] = {}
        self._verdicts: dict[str, list[Path]] = {}

    def _distinct(self, key: str) -> list[Path]:
        """The files named ``key`` that differ from each other, compared by content when first asked (lazily: a
        folder's index holds many images no CSV row names)."""
        if key not in self._verdicts:
            distinct: list[Path] = []
            for f in self.duplicates.get(key, []):
                if not any(_same_bytes(d, f) for d in distinct):
                    distinct.append(f)
            self._verdicts[key] = distinct
        return self._verdicts[key]

    def ambiguity(self, key: str, root: Path) -> str | None:
        """Why an image named only ``key`` cannot be told apart under ``root``, or None when it can."""
        files = self._distinct(key) if key in self.duplicates else []
        if len(files) < 2:
            return None
        shown = ", ".join(str(f.relative_to(root)) if f.is_relative_to(root) else str(f) for f in files[:3])
        more = f" and {len(files) - 3} more" if len(files) > 3 else ""
        return (
            f"{len(files)} different images under {root} are named {key} ({shown}{more}): name the file with its "
            "folder in a labels.csv, or keep one of them"
        )


def _index_images(root: Path) -> ImageIndex:
    """Map image stem -> file for every image under root (the HAM10000 download splits images over two folders)."""
    index = ImageIndex()
    for dirpath, filenames in walk(root):
        for name in filenames:
            p = Path(dirpath, name)
            if p.suffix.lower() in IMAGE_SUFFIXES:
                real = p.resolve()
                if not real.is_file():  # a dangling link (a git-annex or DataLad file not fetched yet): no image
                    continue
                first = index.setdefault(p.stem, real)
                if first != real:
                    index.duplicates.setdefault(p.stem, [first]).append(real)
    return index


def sources_of(df: pd.DataFrame) -> np.ndarray | None:
    """Each row's source as text (`combine` sets it per folder), or None for a frame without the column."""
    return df["source"].astype(str).to_numpy() if "source" in df else None


def image_ids(df: pd.DataFrame) -> list[str]:
    """The id each row's label file gave it (``image_id``) where there is one, else the file name without folder or
    suffix; folders are split at / and \\ alike, so a manifest written on Windows names its images the same. (The
    ``image`` column of evaluate's predictions.csv, and the keys of a split's fingerprint.)"""
    if "path" not in df and "image_id" not in df:
        raise ValueError("image ids need a path or image_id column")
    stems = [Path(str(p).replace("\\", "/")).stem for p in df["path"]] if "path" in df else [""] * len(df)
    if "image_id" not in df:
        return stems
    return [str(i) if isinstance(i, str) and i else s for i, s in zip(df["image_id"], stems, strict=True)]


def _image_key(name: str) -> str:
    """The `_index_images` key for an image named in a CSV: its file stem, or the name itself when it has no image
    suffix (ids may contain dots: "img.2019.001")."""
    q = Path(str(name).strip())
    return q.stem if q.suffix.lower() in IMAGE_SUFFIXES else q.name


def _col(df: pd.DataFrame, *names: str) -> pd.Series:
    """The first of ``names`` that the table has (in any case: "Lesion_ID" is lesion_id), else an all-missing
    column."""
    for n in names:
        if n in df.columns:
            return df[n]
    by_lower = {str(c).lower(): c for c in df.columns}
    for n in names:
        if n.lower() in by_lower:
            return df[by_lower[n.lower()]]
    return pd.Series(pd.NA, index=df.index, dtype="object")


def _labels(raw: pd.Series, items: pd.Series, problems: list[Problem]) -> pd.Series:
    """Resolve raw label strings to catalogue codes; unknown or empty labels become problems (row dropped)."""
    resolved: dict[str, str | None] = {}
    for value in raw.dropna().unique():
        try:
            resolved[value] = lookup(value).code
        except UnknownLabelError as e:
            resolved[value] = None
            reason = str(e)
            problems.extend(Problem(str(i), reason, "read") for i in items[raw == value])
    for i in items[raw.isna()]:
        problems.append(Problem(str(i), "no label given", "read"))
    return raw.map(resolved)


def _finish(rows: pd.DataFrame, source: str, problems: list[Problem], fmt: str, rows_read: int) -> Ingest:
    """Fill derived columns, drop rows without path or label, and order columns as MANIFEST_COLUMNS."""
    labels_read = {str(k): int(v) for k, v in rows["label"].value_counts().items()}
    rows = rows[rows["label"].notna() & rows["path"].notna()].copy()
    rows["source"] = source
    rows["label_ham7"] = rows["label"].map(lambda c: to_taxonomy(c, HAM7))
    given = rows["label_isic2019"] if "label_isic2019" in rows else pd.Series(pd.NA, index=rows.index)
    derived = rows["label"].map(lambda c: to_taxonomy(c, ISIC2019))
    rows["label_isic2019"] = given.where(given.notna(), derived)
    rows["path"] = rows["path"].map(str)
    dup = rows["path"].duplicated()
    problems.extend(Problem(p, "listed more than once (later rows dropped)", "read") for p in rows["path"][dup])
    rows = rows[~dup]
    for c in MANIFEST_COLUMNS:
        if c not in rows:
            rows[c] = pd.NA
    manifest = rows.loc[:, list(MANIFEST_COLUMNS)].reset_index(drop=True)
    return Ingest(manifest, problems, fmt, rows_read, labels_read)


def _attach_paths(
    df: pd.DataFrame, ids: pd.Series, index: ImageIndex, root: Path, problems: list[Problem]
) -> pd.Series:
    paths = ids.map(index)
    found = paths.notna()
    for row, i in ids[found].items():
        why = index.ambiguity(str(i), root)
        if why is not None:  # named by id alone, and more than one file has that name: no guess
            problems.append(Problem(str(i), why, "read"))
            paths[row] = pd.NA
    reason = f"image file not found under {root}"
    if not index:
        reason += " (the folder has no images at all: download them first, see `dermsight data download`)"
    problems.extend(Problem(str(i), reason, "read") for i in ids[~found & ids.notna()])
    return paths


# ----------------------------------------------------------------------------------------------------------- readers


def read_labels_csv(csv_path: Path) -> Ingest:
    """A plain ``labels.csv``: ``image,label`` (+ optional columns), image paths relative to the CSV's folder."""
    csv_path = Path(csv_path)
    what = "a labels.csv (image,label)"
    df = _read_csv(csv_path, ("image",), what)
    if "label" not in {str(c).lower() for c in df.columns} and _onehot_classes(df.columns):
        return read_isic2019(csv_path)  # a labels.csv written one-hot, as ISIC's ground truth is
    _require(df, csv_path, ("label",), what)
    problems: list[Problem] = []
    base = csv_path.parent.resolve()

    def resolve(p: str) -> Path:
        q = Path(p)
        return q if q.is_absolute() else (base / q)

    rows_read = len(df)
    # A row that names no image is the user's to fix, so it is listed, not dropped unseen.
    blank = df["image"].isna() | df["image"].astype(str).str.strip().eq("")
    for i in df.index[blank]:
        label = df.at[i, "label"]
        of = "" if pd.isna(label) else f" (label {label})"
        problems.append(Problem(f"{csv_path.name}, data row {i + 1}{of}", "no image named in the image column", "read"))
    df = df[~blank].copy()
    rows = pd.DataFrame(index=df.index)
    rows["path"] = df["image"].map(resolve)
    missing = ~rows["path"].map(Path.is_file)
    if missing.any():
        # Label files often name images by id alone ("ISIC_0024306", as ISIC's own CSVs do) or leave out the
        # sub-folder the images sit in: find those by name under the CSV's folder. Unresolved rows keep the path
        # as written, so the image check reports it as not found.
        index = _index_images(base)
        found = df.loc[missing, "image"].map(lambda v: index.get(_image_key(v)))
        rows.loc[missing, "path"] = found.where(found.notna(), rows.loc[missing, "path"])
        ambiguous = []
        for row, name in df.loc[missing, "image"].items():
            why = index.ambiguity(_image_key(name), base)
            if why is not None:  # more than one file by that name: no guess (it depended on the folder walk)
                problems.append(Problem(str(name), why, "read"))
                ambiguous.append(row)
        df, rows = df.drop(index=ambiguous), rows.drop(index=ambiguous)
    rows["image_id"] = _col(df, "image_id").fillna(rows["path"].map(lambda p: p.stem))
    rows["label"] = _labels(df["label"], rows["path"].map(str), problems)
    if "label_isic2019" in df:
        rows["label_isic2019"] = _isic_codes(df["label_isic2019"])
    rows["lesion_id"] = _col(df, "lesion_id")
    rows["patient_id"] = _col(df, "patient_id")
    rows["age"] = _col(df, "age", "age_approx")
    rows["sex"] = _col(df, "sex")
    rows["site"] = _col(df, "site", "localization", "anatom_site_general")
    rows["dx_type"] = _col(df, "dx_type", "diagnosis_confirm_type")
    return _finish(rows, f"labels-csv:{csv_path.resolve().parent.name}", problems, "labels-csv", rows_read)


def _isic_codes(col: pd.Series) -> pd.Series:
    def one(v: object) -> object:
        if pd.isna(v):
            return pd.NA
        try:
            return to_taxonomy(lookup(str(v)).code, ISIC2019) or pd.NA
        except UnknownLabelError:
            return pd.NA

    return col.map(one)


def read_ham10000(root: Path) -> Ingest:
    """The official HAM10000 download: ``HAM10000_metadata.csv`` plus images in one or more folders below it."""
    root = Path(root)
    meta = root / "HAM10000_metadata.csv" if root.is_dir() else root
    root = meta.parent
    df = _read_csv(meta, ("image_id", "dx", "lesion_id"), "HAM10000 metadata")
    problems: list[Problem] = []
    index = _index_images(root)
    rows = pd.DataFrame(index=df.index)
    rows["image_id"] = df["image_id"]
    rows["path"] = _attach_paths(df, df["image_id"], index, root, problems)
    rows["label"] = _labels(df["dx"], df["image_id"], problems)
    rows["lesion_id"] = df["lesion_id"]
    rows["age"] = _col(df, "age")
    rows["sex"] = _col(df, "sex")
    rows["site"] = _col(df, "localization")
    rows["dx_type"] = _col(df, "dx_type")
    return _finish(rows, "ham10000", problems, "ham10000", len(df))


def _find_one(root: Path, pattern: str) -> Path | None:
    hits = sorted(root.glob(pattern)) or sorted(root.rglob(pattern))
    return hits[0] if hits else None


def _onehot_classes(columns: pd.Index | set[str]) -> tuple[str, ...] | None:
    """The one-hot class columns among ``columns``, in upper case whatever case they are written in (see
    `_upper_class_columns`): ISIC 2019's (+ UNK if present), ISIC 2018's, or None."""
    cols = {str(c).strip().upper() for c in columns}
    if set(ISIC2019.codes) <= cols:
        return tuple(c for c in (*ISIC2019.codes, "UNK") if c in cols)
    if set(ISIC2018_COLUMNS) <= cols:
        return ISIC2018_COLUMNS
    return None


def _upper_class_columns(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with its one-hot class columns named in upper case (a ground truth saved with "mel,nv,..." is ISIC's)."""
    known = {*ISIC2019.codes, *ISIC2018_COLUMNS, "UNK"}
    return df.rename(columns={c: str(c).strip().upper() for c in df.columns if str(c).strip().upper() in known})


def read_isic2019(root: Path) -> Ingest:
    """One-hot ISIC ground truth: ``ISIC_2019_Training_GroundTruth.csv`` (or ISIC 2018 Task 3's, whose akiec is one
    class), optional ``..._Metadata.csv``, image folder."""
    root = Path(root)
    if root.is_file():
        gt_path, root = root, root.parent
    else:
        gt_path = _find_one(root, "*GroundTruth*.csv")
        if gt_path is None:
            raise DataError(f"{root}: no ISIC 2019 ground-truth CSV (ISIC_2019_Training_GroundTruth.csv) found")
    gt = _read_csv(gt_path, ("image",), "an ISIC ground truth")
    found = _onehot_classes(gt.columns)
    if found is None:  # neither class set: report ISIC 2019's missing columns, naming both layouts
        layouts = f"ISIC 2019: {','.join(ISIC2019.codes)}; ISIC 2018: {','.join(ISIC2018_COLUMNS)}"
        missing = [c for c in ISIC2019.codes if c not in {str(c).upper() for c in gt.columns}]
        raise DataError(
            f"{gt_path}: missing required column(s) {', '.join(missing)} for a one-hot ground truth ({layouts}) "
            f"(found: {', '.join(map(str, gt.columns)) or 'none'})"
        )
    gt = _upper_class_columns(gt)
    classes = list(found)
    problems: list[Problem] = []
    onehot = gt[classes].apply(pd.to_numeric, errors="coerce").fillna(0) > 0.5
    n_marked = onehot.sum(axis=1)
    for img, n in zip(gt["image"][n_marked != 1], n_marked[n_marked != 1], strict=True):
        problems.append(Problem(str(img), f"ground truth marks {n} classes (expected exactly one)", "read"))
    raw = onehot.idxmax(axis=1).where(n_marked == 1)
    if "AKIEC" in classes:  # ISIC 2018's columns are the HAM7 codes in upper case; akiec has no ISIC 2019 code
        raw = raw.str.lower()

    meta_path = _find_one(root, "*Training_Metadata*.csv") or _find_one(root, "*Metadata*.csv")
    if meta_path is not None:
        meta = _read_csv(meta_path, ("image",), "the ISIC 2019 metadata")
        meta = meta.drop_duplicates("image").set_index("image")
        meta = meta.reindex(gt["image"]).reset_index(drop=True)
        meta.index = gt.index
    else:
        meta = pd.DataFrame(index=gt.index)
    index = _index_images(root)
    rows = pd.DataFrame(index=gt.index)
    rows["image_id"] = gt["image"]
    rows["path"] = _attach_paths(gt, gt["image"], index, root, problems)
    rows["label"] = raw
    if "AKIEC" not in classes:
        rows["label_isic2019"] = raw.where(raw != "UNK")
    rows["lesion_id"] = _col(meta, "lesion_id")
    rows["patient_id"] = _col(meta, "patient_id")
    rows["age"] = _col(meta, "age_approx")
    rows["sex"] = _col(meta, "sex")
    rows["site"] = _col(meta, "anatom_site_general")
    return _finish(rows, "isic2019", problems, "isic2019", len(gt))


# isic-cli writes a metadata.csv whose diagnosis columns vary with the archive's taxonomy version; the most specific
# column that names a catalogue class wins.
_ARCHIVE_DIAGNOSIS_COLUMNS = (
    "diagnosis_5",
    "diagnosis_4",
    "diagnosis_3",
    "diagnosis",
    "diagnosis_2",
    "diagnosis_1",
)


def read_isic_archive(root: Path) -> Ingest:
    """A folder written by ``isic image download``: images named by ISIC id plus its ``metadata.csv``."""
    root = Path(root)
    meta_path = root if root.is_file() else root / "metadata.csv"
    root = meta_path.parent
    df = _read_csv(meta_path, ("isic_id",), "ISIC Archive metadata (isic-cli)")
    problems: list[Problem] = []
    diag_cols = [c for c in _ARCHIVE_DIAGNOSIS_COLUMNS if c in df.columns]
    if not diag_cols:
        raise DataError(f"{meta_path}: no diagnosis column ({', '.join(_ARCHIVE_DIAGNOSIS_COLUMNS)}) to label from")

    def best(row: pd.Series) -> object:
        for c in diag_cols:
            v = row[c]
            if pd.notna(v):
                try:
                    return lookup(str(v)).code
                except UnknownLabelError:
                    continue
        return next((row[c] for c in diag_cols if pd.notna(row[c])), pd.NA)

    raw = df[diag_cols].apply(best, axis=1) if len(df) else pd.Series(dtype="object")
    index = _index_images(root)
    rows = pd.DataFrame(index=df.index)
    rows["image_id"] = df["isic_id"]
    rows["path"] = _attach_paths(df, df["isic_id"], index, root, problems)
    rows["label"] = _labels(raw, df["isic_id"], problems)
    rows["lesion_id"] = _col(df, "lesion_id")
    rows["patient_id"] = _col(df, "patient_id")
    rows["age"] = _col(df, "age_approx")
    rows["sex"] = _col(df, "sex")
    rows["site"] = _col(df, "anatom_site_general")
    rows["dx_type"] = _col(df, "diagnosis_confirm_type")
    return _finish(rows, "isic-archive", problems, "isic-archive", len(df))


def read_folders(root: Path) -> Ingest:
    """A folder per class (DermNet NZ and most scraped sets): the class is the folder name."""
    root = Path(root)
    problems: list[Problem] = []
    records = []
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    top, reals = os.path.realpath(root), [os.path.realpath(c) for c in classes]
    for d in classes:
        files = []
        # A link inside one class folder back to the root, or into another class, must not file images under this
        # class's label that belong to another (or to none).
        others = [r for c, r in zip(classes, reals, strict=True) if c != d]

        def elsewhere(real: str, others: list[str] = others) -> bool:
            return real == top or any(real == o or real.startswith(o + os.sep) for o in others)

        for dirpath, filenames in walk(d, skip=elsewhere):
            for name in filenames:
                if name.startswith(".") or name.lower() in _JUNK:
                    continue
                p = Path(dirpath, name).resolve()
                if p.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(p)
                else:
                    problems.append(Problem(str(p), f"not an image file name ({p.suffix or 'no extension'})", "read"))
        try:
            code = lookup(d.name).code
        except UnknownLabelError as e:
            if files:
                problems.append(Problem(str(d), f"{len(files)} file(s) skipped: {e}", "read"))
            continue
        records.extend({"path": p, "image_id": p.stem, "label": code} for p in files)
    rows = pd.DataFrame.from_records(records, columns=["path", "image_id", "label"])
    n_read = len(rows) + len(problems)
    return _finish(rows, f"folders:{root.resolve().name}", problems, "folders", n_read)


READERS: dict[str, Callable[[Path], Ingest]] = {
    "labels-csv": lambda p: read_labels_csv(p / "labels.csv" if Path(p).is_dir() else p),
    "ham10000": read_ham10000,
    "isic2019": read_isic2019,
    "isic-archive": read_isic_archive,
    "folders": read_folders,
}


# The files the readers take labels and metadata from, in a dataset folder: these names at its top, and ISIC's
# ground truth and metadata anywhere below (`read_isic2019` searches sub-folders).
LABEL_FILE_NAMES = ("labels.csv", "HAM10000_metadata.csv", "metadata.csv")
LABEL_FILE_PATTERNS_BELOW = ("*GroundTruth*.csv", "*Metadata*.csv")


def label_files(path: Path) -> list[Path]:
    """The label and metadata files a dataset at ``path`` may be read from: the path itself when it is a file."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    found = {path / name for name in LABEL_FILE_NAMES}
    found |= {f for pattern in LABEL_FILE_PATTERNS_BELOW for f in path.rglob(pattern)}
    return sorted(f for f in found if f.is_file())


def detect_format(path: Path) -> str:
    """Guess the layout of ``path`` (a folder or a CSV); raise DataError with what was looked for."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file():
        try:
            cols = {str(c).strip() for c in _parse_csv(path, nrows=0).columns}
        except Exception as e:
            raise DataError(f"{path}: not a readable CSV file ({e})") from None
        lower = {c.lower() for c in cols}
        # An image,label table first: per-class score columns beside a label (evaluate's predictions.csv names
        # them by class code, which are ISIC 2018's one-hot columns in lower case) are not a one-hot ground truth.
        if {"image", "label"} <= lower:
            return "labels-csv"
        if _onehot_classes(cols):
            return "isic2019"
        if {"image_id", "dx", "lesion_id"} <= lower:
            return "ham10000"
        if "isic_id" in lower:
            return "isic-archive"
        raise DataError(
            f"{path}: unrecognised CSV columns ({', '.join(sorted(cols))}); expected image,label or one of the "
            "HAM10000 / ISIC 2019 / ISIC Archive layouts"
        )
    # Our own labels.csv first: it is the richest (the shared HAM10000 copy has both it and the official CSV).
    if (path / "labels.csv").is_file():
        return "labels-csv"
    if (path / "HAM10000_metadata.csv").is_file():
        return "ham10000"
    if _find_one(path, "*GroundTruth*.csv") is not None:
        return "isic2019"
    if (path / "metadata.csv").is_file():
        return "isic-archive"
    if any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir()):
        return "folders"
    raise DataError(
        f"{path}: cannot tell the dataset layout: expected labels.csv, HAM10000_metadata.csv, an ISIC 2019 "
        "GroundTruth CSV, an isic-cli metadata.csv, or one sub-folder per class"
    )


# ------------------------------------------------------------------------------------------------------ verification


def per_image(
    manifest: pd.DataFrame,
    work: Callable[[str], Any],
    stage: str,
    desc: str,
    progress: bool = True,
    leave: bool = True,
    workers: int | None = None,
) -> tuple[pd.DataFrame, list[Any], list[Problem]]:
    """``work`` on every row's image path, in threads (Pillow releases the GIL while it decodes and encodes). A row
    whose ``work`` returns text (the reason) is dropped with a `Problem` of ``stage``; returns the kept rows
    (index reset), ``work``'s values for them, in order, and the problems."""
    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    paths = manifest["path"].tolist()
    with ThreadPoolExecutor(workers) as pool:
        results = list(
            tqdm(
                pool.map(work, paths),
                total=len(paths),
                desc=desc,
                unit="img",
                disable=not progress or None,
                leave=leave,
            )
        )
    problems = [Problem(p, r, stage) for p, r in zip(paths, results, strict=True) if isinstance(r, str)]
    ok = [not isinstance(r, str) for r in results]
    return manifest[ok].reset_index(drop=True), [r for r in results if not isinstance(r, str)], problems


def verify_images(
    manifest: pd.DataFrame, full: bool = True, workers: int | None = None, progress: bool = True
) -> tuple[pd.DataFrame, list[Problem]]:
    """Open every image; drop (and report) the unreadable ones; record width and height.

    ``full`` decodes the pixels (at 1/8 scale through JPEG draft mode, so it stays cheap) because a truncated JPEG
    has an intact header and only fails when decoded; without it only headers are read.
    """

    def check(path: str) -> tuple[int, int] | str:
        try:
            info = probe(path)
            if full:
                load_rgb(path, short_side=max(1, min(info.width, info.height) // 8))
            return info.width, info.height
        except ImageError as e:
            return str(e)

    out, sizes, problems = per_image(manifest, check, "image", "checking images", progress, False, workers)
    out["width"] = [s[0] for s in sizes]
    out["height"] = [s[1] for s in sizes]
    return out, problems


def build_manifest(path: Path, fmt: str | None = None, verify: str = "full", progress: bool = True) -> Ingest:
    """Read any supported layout at ``path`` into a manifest; ``verify`` is "full", "header" or "none"."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt not in READERS:
        raise DataError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    ingest = READERS[fmt](path)
    if verify != "none" and len(ingest.manifest):
        ingest.manifest, bad = verify_images(ingest.manifest, full=verify == "full", progress=progress)
        ingest.problems.extend(bad)
    return ingest


def combine(ingests: Sequence[Ingest]) -> Ingest:
    """Several sources read into one manifest. Each row keeps its ``source`` (made unique with the folder's path where
    two sources would share a name), so training can balance sources and evaluation can report each; a file that two
    sources list is kept once, from the first, and reported."""
    if len(ingests) == 1:
        return ingests[0]
    frames, seen = [], set()
    for ingest in ingests:
        frame = ingest.manifest
        names = set(frame["source"].dropna().astype(str))
        if names & seen:
            frame = frame.assign(
                source=frame["source"].astype(str) + ":" + frame["path"].map(lambda p: str(Path(p).parent))
            )
        seen |= set(frame["source"].dropna().astype(str))
        frames.append(frame)
    manifest = pd.concat(frames, ignore_index=True)
    problems = [p for i in ingests for p in i.problems]
    dup = manifest["path"].duplicated()
    problems += [
        Problem(p, "listed by more than one source (later rows dropped)", "read") for p in manifest["path"][dup]
    ]
    labels_read: dict[str, int] = {}
    for i in ingests:
        for k, v in i.labels_read.items():
            labels_read[k] = labels_read.get(k, 0) + v
    return Ingest(
        manifest[~dup].reset_index(drop=True),
        problems,
        " + ".join(i.format for i in ingests),
        sum(i.rows_read for i in ingests),
        labels_read,
    )


# ----------------------------------------------------------------------------------------------------- persistence


def save_manifest(manifest: pd.DataFrame, out: Path) -> Path:
    """Write ``manifest`` as CSV, beside ``out`` and then renamed onto it: a full disk or an interrupt leaves the
    previous file as it was, never a half-written one that reads as a shorter manifest."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with written_atomically(out, suffix=".csv") as tmp:
        manifest.to_csv(tmp, index=False)
    return out


def run_split(path: str | os.PathLike) -> Path | None:
    """``path``/split.csv when ``path`` is a training run's folder (it holds split.csv and config.yaml), else None.
    Commands that take data accept a run folder to mean its split (`soup`, `calibrate` and `tune-decision` did; read
    as a dataset folder, its report images and predictions were taken for unlabelled images)."""
    path = Path(path)
    split = path / "split.csv"
    return split if path.is_dir() and split.is_file() and (path / "config.yaml").is_file() else None


def load_manifest(path: Path) -> pd.DataFrame:
    """Read a manifest written by `save_manifest` (or any CSV with at least ``path`` and ``label``).

    A hand-made one gets what `save_manifest` would have written: the per-taxonomy label columns, from ``label``
    by the catalogue (names such as "melanoma" included; a label it does not know leaves them empty, which the
    reader reports), and relative paths that exist beside the CSV but not from the working folder are taken from
    beside the CSV (evaluate found no image at all when run from elsewhere)."""
    path = Path(path)
    df = _read_csv(path, ("path", "label"), "a dermsight manifest")
    for c in ("width", "height", "fold"):
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64")
    base = path.resolve().parent

    def locate(p: object) -> object:
        if not isinstance(p, str) or Path(p).is_absolute() or Path(p).exists() or not (base / p).exists():
            return p
        return str(base / p)

    df["path"] = df["path"].map(locate)
    if "label_ham7" not in df or "label_isic2019" not in df:
        codes = _labels(df["label"], df["path"], [])  # unknown labels: no code, reported by the reader later
        for col, taxonomy in (("label_ham7", HAM7), ("label_isic2019", ISIC2019)):
            if col not in df:
                df[col] = codes.map(lambda c, t=taxonomy: to_taxonomy(c, t) if isinstance(c, str) else pd.NA)
    return df


def class_counts(manifest: pd.DataFrame, by: str | None = None, label: str = "label") -> pd.DataFrame:
    """Image counts per class (rows) and, with ``by``, per value of that column, with a total."""
    if by is None:
        t = manifest[label].value_counts().rename("images").to_frame()
        if "lesion_id" in manifest and manifest["lesion_id"].notna().any():
            t["lesions"] = manifest.groupby(label)["lesion_id"].nunique()
        t.loc["total"] = t.sum()
        return t.astype(int)
    t = pd.crosstab(manifest[label], manifest[by], margins=True, margins_name="total")
    return t


def split_manifest_path(data: str | os.PathLike) -> Path:
    """The split manifest ``data`` names: the CSV itself, or a training run folder's split.csv."""
    data = Path(data)
    return data / "split.csv" if data.is_dir() else data


def read_split_manifest(data: str | os.PathLike) -> pd.DataFrame:
    """A split manifest (CSV with `path` and `split`), or a training run folder holding one as split.csv."""
    data = Path(data)
    path = split_manifest_path(data)
    if not path.is_file():
        raise DataError(
            f"{data}: expected a split manifest CSV (with `path` and `split` columns, e.g. a run's split.csv) or a "
            "training run folder that holds split.csv"
        )
    # Ids stay text: "0001" read as the number 1 would no longer match the fingerprint the model recorded.
    df = pd.read_csv(path, dtype={"path": str, **dict.fromkeys(ID_COLUMNS, str)})
    missing = [c for c in ("path", "split") if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; `dermsight data split` writes them")
    return df


def list_images(folder: str | os.PathLike, suffixes: frozenset[str] = IMAGE_SUFFIXES) -> list[Path]:
    """The image files (by ``suffixes``) in ``folder`` and its sub-folders, sorted; a file is itself."""
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise DataError(f"{folder}: no such file or folder")
    # Hidden files (macOS "._photo.jpg" resource forks, say) are not pictures, like hidden folders.
    files = (Path(d, n) for d, names in walk(folder) for n in names if not n.startswith("."))
    return sorted(p for p in files if p.suffix.lower() in suffixes and p.is_file())


def read_labels(df: pd.DataFrame, meta: Classes, strict: bool = True) -> np.ndarray | None:
    """Class indices (in the model's logit order) of a manifest's rows, from its label column for the model's
    taxonomy. Missing or foreign labels raise `DataError`, or give None when not ``strict``."""
    col = LABEL_COLUMNS[meta.taxonomy]
    if col not in df.columns:
        if not strict:
            return None
        raise DataError(f"the manifest has no {col} column, needed to calibrate a {meta.taxonomy} model")
    index = {c: i for i, c in enumerate(meta.classes)}
    y = df[col].map(index)
    if y.isna().any():
        if not strict:
            return None
        reasons = []
        missing = int(df[col].isna().sum())
        if missing:
            # Typically data labelled in another taxonomy: HAM10000's akiec is AK or SCC in ISIC 2019, so a
            # HAM-labelled split has no ISIC 2019 class for those rows.
            reasons.append(
                f"{missing} of {len(df)} image(s) have no {col} label, which this {meta.taxonomy} model needs (use "
                f"data labelled in the {meta.taxonomy} taxonomy, such as the split of a run that trained this model)"
            )
        # Not astype(str): pandas 3 keeps a missing label missing there, and join() then fails on it.
        bad = sorted(str(v) for v in set(df.loc[y.isna(), col]) if not pd.isna(v))
        if bad:
            reasons.append(f"labels {', '.join(bad)} are not classes of this model")
        raise DataError(f"{'; '.join(reasons)} (its classes: {', '.join(meta.classes)})")
    return y.to_numpy(int)
