import pytest

from dermsight.domain.classes import CONDITIONS, HAM7, ISIC2019, Malignancy, UnknownLabelError, lookup, to_taxonomy


def test_taxonomies_are_the_official_codes():
    assert HAM7.codes == ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    assert set(ISIC2019.codes) == {"MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"}
    assert all(c in CONDITIONS for c in HAM7.codes + ISIC2019.codes + ("UNK",))


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("AK", "akiec"),
        ("SCC", "akiec"),
        ("MEL", "mel"),
        ("NV", "nv"),
        ("VASC", "vasc"),
        ("UNK", None),
        ("df", "df"),
    ],
)
def test_isic2019_maps_to_ham7(code, expected):
    assert to_taxonomy(code, HAM7) == expected


def test_ham7_to_isic2019_is_ambiguous_only_for_akiec():
    assert to_taxonomy("akiec", ISIC2019) is None
    assert to_taxonomy("bkl", "isic2019") == "BKL"


def test_malignancy_flags():
    assert CONDITIONS["mel"].malignancy is Malignancy.MALIGNANT
    assert CONDITIONS["bcc"].is_concerning and CONDITIONS["SCC"].is_concerning
    assert CONDITIONS["akiec"].malignancy is Malignancy.PREMALIGNANT and CONDITIONS["AK"].is_concerning
    assert not any(CONDITIONS[c].is_concerning for c in ("nv", "bkl", "df", "vasc"))


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("mel", "mel"),
        ("MEL", "MEL"),
        ("Mel", "mel"),
        ("AK", "AK"),
        ("ak", "AK"),
        ("Melanoma", "mel"),
        ("melanocytic_nevi", "nv"),
        ("Basal Cell Carcinoma", "bcc"),
        ("Seborrheic keratosis", "bkl"),
        ("squamous cell carcinoma", "SCC"),
        (" nv ", "nv"),
        ("Solar or actinic keratosis", "AK"),
    ],
)
def test_lookup_accepts_codes_and_common_names(text, code):
    assert lookup(text).code == code


def test_lookup_unknown_label_names_the_choices():
    with pytest.raises(UnknownLabelError, match=r"unknown label 'eczema'.*akiec.*MEL"):
        lookup("eczema")
