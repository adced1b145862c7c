"""What a result means for the person who uploaded the photo: one advice message, shared by the pages and the API.

The rules lean towards sending people to a doctor. A missed melanoma costs far more than an unnecessary appointment,
and the model has only seen dermoscopy images of seven conditions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from dermsight.domain.classes import CONDITIONS, Malignancy
from dermsight.domain.knowledge import Knowledge, load_knowledge
from dermsight.domain.results import UNCERTAIN_BELOW, PredictionResult, below, prediction_result, whole_percent

# Malignant and pre-malignant classes together this probable are worth a doctor's look even when a benign class ranks
# first. Chosen on the val split (`bench/triage.py`): the highest of 30, 25, 20, 15 and 10% that sends at least 90% of
# its melanomas to a doctor. At 30% a quarter of them got "Probably harmless" (val: 77% of melanomas referred, 17% of
# benign lesions); at 15%, 92% and 30%. The test split was scored after the choice (bench/triage.md).
CONCERN_PROBABILITY = 0.15
# Below that, a malignant or pre-malignant class this probable is still named in the "keep an eye on it" advice: a
# reader of "mole 88%, melanoma 8%" headed "Probably harmless" should not have to find the 8% in the list.
MENTION_PROBABILITY = 0.05


def rule(concern_at: float = CONCERN_PROBABILITY) -> str:
    """The rule in words, from the thresholds themselves (`dermsight predict` prints it under its advice column)."""
    return (
        "see a doctor when the top class is malignant or pre-malignant, when such classes together reach "
        f"{concern_at:.0%}, or when the model is uncertain (top class under {UNCERTAIN_BELOW:.0%}); otherwise monitor."
    )


RULE = rule()


# What a concerning class is, in words (the catalogue's malignancy), and what to do by the knowledge file's urgency.
_KIND = {
    Malignancy.MALIGNANT: "a type of skin cancer",
    Malignancy.PREMALIGNANT: "a skin change that can become skin cancer or be an early one",
}
_WHEN = {
    "urgent": ("See a doctor within two weeks", "see a doctor or dermatologist within about two weeks"),
    # "doctor", not "dermatologist": in many health systems people see a GP first.
    "soon": (
        "See a doctor in the coming weeks",
        "book an appointment with a doctor or dermatologist in the coming weeks",
    ),
}


@dataclass(frozen=True)
class Advice:
    level: str  # "see_doctor" | "monitor" | "retake"
    title: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _name(p) -> str:
    # Lower case inside a sentence, except names that start with a capital for a reason ("Bowen's disease").
    return p.name[0].lower() + p.name[1:] if p.name[1:2].islower() else p.name


def _like(p) -> str:
    """The name after "looks most like": with its article ("a vascular lesion", "an actinic keratosis")."""
    name = _name(p)
    if p.code == "UNK":  # "none of the above / unknown" takes none
        return name
    return ("an " if name[0].lower() in "aeiou" else "a ") + name


def _concerning(code: str) -> bool:
    cond = CONDITIONS.get(code)
    return cond is not None and cond.is_concerning


def sentence(text: str | None) -> str:
    """``text`` as a sentence: capital first letter, final full stop (reasons come from several layers)."""
    text = (text or "").strip()
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def percent(p: float) -> str:
    """A probability for people: whole percents, but never "0%" or "100%" for what the model only finds unlikely or
    likely ("Melanoma 0%" for 0.15% reads as ruled out, which no photo can do)."""
    if 0 < p < 0.01:
        return "<1%"
    if 0.99 < p < 1:
        return ">99%"
    return f"{whole_percent(p)}%"


def concerning_probability(result: PredictionResult) -> float:
    if result.concerning_probability is not None:
        return result.concerning_probability
    return sum(p.probability for p in result.predictions if _concerning(p.code))


def _kind(p) -> str:
    return _KIND.get(CONDITIONS[p.code].malignancy, "a condition that can be or become skin cancer")


def _when(codes: list[str], knowledge: Knowledge) -> tuple[str, str]:
    """(heading, what to do) for concerning classes: the most urgent one's, by the knowledge file ("routine" never
    applies to a class that sends people to a doctor, so it reads as "soon"). Melanoma at 14% beside a pre-cancer at
    16% is still "within two weeks"."""
    urgencies = {info.urgency for info in (knowledge.get(c) for c in codes) if info is not None}
    return _WHEN["urgent"] if "urgent" in urgencies else _WHEN["soon"]


def _listed(preds: list, conjunction: str = "or") -> str:
    """ "melanoma (14%)", "melanoma (14%) or basal cell carcinoma (6%)": the concerning classes worth naming."""
    named = [f"{_name(p)} ({percent(p.probability)})" for p in preds]
    return named[0] if len(named) == 1 else ", ".join(named[:-1]) + f" {conjunction} " + named[-1]


def _kinds(preds: list) -> str:
    """What the listed classes are, after a comma: "a type of skin cancer", "each a type of skin cancer", ..."""
    if len(preds) == 1:
        return _kind(preds[0])
    kinds = {CONDITIONS[p.code].malignancy for p in preds}
    if kinds == {Malignancy.MALIGNANT}:
        return "each a type of skin cancer"
    if kinds == {Malignancy.PREMALIGNANT}:
        return "each a pre-cancer or an early skin cancer"
    return "skin cancers or pre-cancers"


def worth_naming(result: PredictionResult) -> list:
    """The malignant and pre-malignant classes shown at `MENTION_PROBABILITY` or more, most probable first: the
    advice names each, and the result page gives each a card."""
    return [p for p in result.predictions if _concerning(p.code) and not below(p.probability, MENTION_PROBABILITY)]


def concern_threshold(result: PredictionResult, concern_at: float | None = None) -> float:
    """The referral threshold that applies to ``result``: ``concern_at`` when given, else the answering model's own
    (`PredictionResult.refer_from`), else the default."""
    if concern_at is not None:
        return concern_at
    return result.refer_from if result.refer_from is not None else CONCERN_PROBABILITY


def advise(result: PredictionResult, knowledge: Knowledge, concern_at: float | None = None) -> Advice:
    """The advice for ``result``. ``knowledge`` gives each class's urgency; ``concern_at`` is the share of malignant
    and pre-malignant classes together that sends people to a doctor (default: the model's own, `concern_threshold`;
    `bench/triage.py` varies it).

    In order: a concerning top class, then the concerning share, then an uncertain model send people to a doctor; the
    share comes before "uncertain" so that nv 45% / mel 40% is not advised more mildly than nv 55% / mel 40%. Every
    concerning class shown at `MENTION_PROBABILITY` or more is named, and the most urgent of them sets the heading."""
    top = result.top
    if result.status != "ok" or top is None:
        return Advice(
            "retake",
            "Try another photo",
            sentence(result.reason or "the photo could not be assessed") + " Please try another photo. If the spot "
            "worries you, show it to a doctor whatever this tool says.",
        )
    concerning = [p for p in result.predictions if _concerning(p.code)]  # most probable first
    named = worth_naming(result)
    if _concerning(top.code):
        others = [p for p in named if p.code != top.code]
        title, action = _when([top.code] + [p.code for p in others], knowledge)
        also = f" Also possible: {_listed(others)}, {_kinds(others)}." if others else ""
        return Advice(
            "see_doctor",
            title,
            f"The photo looks most like {_like(top)}, at {percent(top.probability)}: {_kind(top)}.{also} Please "
            f"{action} and show them this spot. Only a doctor can diagnose it.",
        )
    concern = concerning_probability(result)
    if concerning and not below(concern, concern_threshold(result, concern_at)):
        # Spread thin (ISIC 2019's four concerning classes at 4% each), none is named; all of them set the heading.
        parts = (
            f"{_listed(named, 'and')}, {_kinds(named)}"
            if named
            else f"spread over {len(concerning)} of them, none at {percent(MENTION_PROBABILITY)} or more"
        )
        title, action = _when([p.code for p in (named or concerning)], knowledge)
        return Advice(
            "see_doctor",
            title,
            f"The photo looks most like {_like(top)}, at {percent(top.probability)}, but skin cancers and conditions "
            f"that can become one together reach {percent(concern)}: {parts}. Please {action} and show them this "
            "spot.",
        )
    caveat = ""
    if named:
        caveat = f" It does not rule out {_listed(named)}, {_kinds(named)}: if in doubt, have it checked."
    if result.uncertain:
        title, action = _when([p.code for p in named], knowledge)  # "within two weeks" when melanoma is named
        return Advice(
            "see_doctor",
            f"{title}: the result is uncertain",
            f"The model is not confident about this photo: its best guess, {_name(top)}, is only "
            f"{percent(top.probability)}.{caveat} An uncertain result cannot rule anything out: please {action} and "
            "show them this spot.",
        )
    return Advice(
        "monitor",
        "Probably harmless, but not ruled out: keep an eye on it" if named else "Probably harmless: keep an eye on it",
        f"The photo looks most like {_like(top)}, at {percent(top.probability)}, which is usually harmless.{caveat} "
        "No photo check can rule out skin cancer: see a doctor if the spot changes in size, shape or colour, bleeds, "
        "itches, grows into a lump, is a sore that has not healed within four weeks, is new and you are over about "
        "40, or worries you.",
    )


def referred(
    probs: np.ndarray,
    classes: Sequence[str],
    concern_at: float | None = None,
    knowledge: Knowledge | None = None,
) -> np.ndarray:
    """Whether the advice sends each row of calibrated probabilities (in ``classes`` order) to a doctor: the app's own
    rule replayed on labelled images (`dermsight evaluate`, `bench/triage.py`, the referral fit). ``concern_at``:
    the model's referral threshold (`ModelMeta.refer_from`; None: the default)."""
    knowledge = knowledge if knowledge is not None else load_knowledge()
    names = [CONDITIONS[c].name for c in classes]
    return np.array(
        [advise(prediction_result(p, classes, names), knowledge, concern_at).level == "see_doctor" for p in probs],
        dtype=bool,
    )
