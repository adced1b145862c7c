"""The one class catalogue of dermsight.

Every other component (readers, splits, training, evaluation, serving) reads diagnostic classes from here; nothing
else declares a class list. Two taxonomies are in use in the public data:

* ``HAM7``: the seven HAM10000 / ISIC 2018 Task 3 codes (lower case, as in ``HAM10000_metadata.csv``).
* ``ISIC2019``: the eight ISIC 2019 codes (upper case, as in ``ISIC_2019_Training_GroundTruth.csv``) plus ``UNK``.

ISIC 2019 splits HAM's ``akiec`` (actinic keratoses and intraepithelial carcinoma / Bowen's disease) into ``AK`` and
``SCC``; the other six classes are the same conditions under upper-case codes. Mapping ISIC 2019 -> HAM7 is therefore
always possible (except ``UNK``); HAM7 -> ISIC 2019 is not for ``akiec`` unless a source says which of the two it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum


class Malignancy(StrEnum):
    BENIGN = "benign"
    PREMALIGNANT = "premalignant"
    MALIGNANT = "malignant"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Condition:
    code: str
    name: str
    malignancy: Malignancy
    taxonomy: str
    ham7: str | None  # the HAM7 code this class maps to (itself for HAM7 classes); None when it has none

    @property
    def is_concerning(self) -> bool:
        """Malignant or pre-malignant: a result that should send someone to a dermatologist."""
        return self.malignancy in (Malignancy.MALIGNANT, Malignancy.PREMALIGNANT)


@dataclass(frozen=True)
class Taxonomy:
    name: str
    codes: tuple[str, ...]

    def __contains__(self, code: object) -> bool:
        return code in self.codes

    def __len__(self) -> int:
        return len(self.codes)

    def index(self, code: str) -> int:
        return self.codes.index(code)


_M, _P, _B, _U = Malignancy.MALIGNANT, Malignancy.PREMALIGNANT, Malignancy.BENIGN, Malignancy.UNKNOWN

_CONDITIONS = (
    # HAM10000 / ISIC 2018 codes. akiec holds actinic keratoses (pre-malignant) and intraepithelial carcinoma
    # (Bowen's disease, an in-situ squamous cell carcinoma), so it is flagged as at least pre-malignant.
    Condition("akiec", "Actinic keratosis / intraepithelial carcinoma", _P, "ham7", "akiec"),
    Condition("bcc", "Basal cell carcinoma", _M, "ham7", "bcc"),
    Condition("bkl", "Benign keratosis-like lesion", _B, "ham7", "bkl"),
    Condition("df", "Dermatofibroma", _B, "ham7", "df"),
    Condition("mel", "Melanoma", _M, "ham7", "mel"),
    Condition("nv", "Melanocytic nevus (mole)", _B, "ham7", "nv"),
    Condition("vasc", "Vascular lesion", _B, "ham7", "vasc"),
    # ISIC 2019 codes, in the column order of the official ground-truth CSV.
    Condition("MEL", "Melanoma", _M, "isic2019", "mel"),
    Condition("NV", "Melanocytic nevus (mole)", _B, "isic2019", "nv"),
    Condition("BCC", "Basal cell carcinoma", _M, "isic2019", "bcc"),
    Condition("AK", "Actinic keratosis", _P, "isic2019", "akiec"),
    Condition("BKL", "Benign keratosis-like lesion", _B, "isic2019", "bkl"),
    Condition("DF", "Dermatofibroma", _B, "isic2019", "df"),
    Condition("VASC", "Vascular lesion", _B, "isic2019", "vasc"),
    Condition("SCC", "Squamous cell carcinoma", _M, "isic2019", "akiec"),
    Condition("UNK", "None of the above / unknown", _U, "isic2019", None),
)

CONDITIONS: dict[str, Condition] = {c.code: c for c in _CONDITIONS}

HAM7 = Taxonomy("ham7", ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"))
# UNK is a column of the ISIC 2019 ground truth but no training image carries it; it is not a trainable class.
ISIC2019 = Taxonomy("isic2019", ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"))
TAXONOMIES: dict[str, Taxonomy] = {t.name: t for t in (HAM7, ISIC2019)}

# Names people and other datasets use for these classes (folder names of scraped sets, ISIC Archive diagnosis
# strings, DermNet-style titles). Keys are normalised with `_normalise`; values are catalogue codes.
_ALIASES = {
    "melanoma": "mel",
    "melanoma invasive": "mel",
    "melanoma in situ": "mel",
    "melanoma metastasis": "mel",
    "malignant melanoma": "mel",
    "nevus": "nv",
    "nevi": "nv",
    "naevus": "nv",
    "naevi": "nv",
    "mole": "nv",
    "moles": "nv",
    "melanocytic nevus": "nv",
    "melanocytic nevi": "nv",
    "melanocytic naevus": "nv",
    "basal cell carcinoma": "bcc",
    "basal cell carcinomas": "bcc",
    "actinic keratosis": "AK",
    "actinic keratoses": "AK",
    "solar or actinic keratosis": "AK",
    "solar keratosis": "AK",
    "actinic keratoses and intraepithelial carcinoma": "akiec",
    "actinic keratosis intraepithelial carcinoma": "akiec",
    "bowen s disease": "akiec",
    "squamous cell carcinoma": "SCC",
    "squamous cell carcinoma invasive": "SCC",
    "squamous cell carcinoma in situ": "SCC",
    "benign keratosis": "bkl",
    "benign keratosis like lesion": "bkl",
    "benign keratosis like lesions": "bkl",
    "pigmented benign keratosis": "bkl",
    "seborrheic keratosis": "bkl",
    "seborrhoeic keratosis": "bkl",
    "solar lentigo": "bkl",
    "lichen planus like keratosis": "bkl",
    "lichenoid keratosis": "bkl",
    "dermatofibroma": "df",
    "dermatofibromas": "df",
    "vascular lesion": "vasc",
    "vascular lesions": "vasc",
    "vascular": "vasc",
    "unknown": "UNK",
}


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


class UnknownLabelError(ValueError):
    pass


def lookup(label: str) -> Condition:
    """Resolve a label as written in a dataset to a catalogue entry.

    Exact codes win (``AK`` is ISIC 2019, ``akiec`` HAM7); then codes case-insensitively, preferring the HAM7 class
    for the six codes both taxonomies share (they are the same condition); then known names and synonyms.
    Raises `UnknownLabelError` with the known codes when nothing matches.
    """
    text = str(label).strip()
    if text in CONDITIONS:
        return CONDITIONS[text]
    low = text.lower()
    if low in HAM7:
        return CONDITIONS[low]
    if text.upper() in CONDITIONS:
        return CONDITIONS[text.upper()]
    alias = _ALIASES.get(_normalise(text))
    if alias:
        return CONDITIONS[alias]
    raise UnknownLabelError(
        f"unknown label {text!r}: expected one of {', '.join(HAM7.codes)} (HAM10000), "
        f"{', '.join(ISIC2019.codes)} (ISIC 2019) or a common name such as 'melanoma'"
    )


def to_taxonomy(code: str, taxonomy: Taxonomy | str) -> str | None:
    """The code of ``code``'s class in ``taxonomy``, or None when it has no single counterpart there."""
    tax = TAXONOMIES[taxonomy] if isinstance(taxonomy, str) else taxonomy
    cond = CONDITIONS[code]
    if cond.taxonomy == tax.name:
        return code if code in tax else None
    if tax is HAM7:
        return cond.ham7
    # HAM7 -> ISIC 2019: the shared classes map by upper-casing; akiec is ambiguous (AK or SCC).
    return code.upper() if code.upper() in tax else None


def condition(code: str) -> Condition:
    return CONDITIONS[code]
