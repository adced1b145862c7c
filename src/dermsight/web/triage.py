"""What a result means for the person who uploaded the photo: one advice message, shared by the pages and the API.

The rules lean towards sending people to a doctor. A missed melanoma costs far more than an unnecessary appointment,
and the model has only seen dermoscopy images of seven conditions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from dermsight.classes import CONDITIONS
from dermsight.inference.types import PredictionResult, below, whole_percent

# Malignant and pre-malignant classes together this probable are worth a doctor's look even when a benign class ranks
# first ("mole 55%, melanoma 40%" is not a result to shrug off).
CONCERN_PROBABILITY = 0.3
# Below that, a malignant or pre-malignant class this probable is still named in the "keep an eye on it" advice: a
# reader of "mole 79%, melanoma 20%" headed "Probably harmless" should not have to find the 20% in the list.
MENTION_PROBABILITY = 0.1


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


def advise(result: PredictionResult) -> Advice:
    top = result.top
    if result.status != "ok" or top is None:
        return Advice(
            "retake",
            "We could not assess this photo",
            sentence(result.reason or "the photo could not be assessed") + " Please try another photo.",
        )
    if _concerning(top.code):
        return Advice(
            "see_doctor",
            "See a dermatologist soon",
            f"The photo looks most like {_name(top)}, at {percent(top.probability)}: a condition that can be or become "
            "skin cancer. Please book an appointment with a doctor or dermatologist soon and show them this spot. "
            "Only a doctor can diagnose it; most spots checked this way turn out to be harmless.",
        )
    if result.uncertain:
        return Advice(
            "see_doctor",
            "See a dermatologist soon: the result is uncertain",
            f"The model is not confident about this photo: its best guess, {_name(top)}, is only "
            f"{percent(top.probability)}. An uncertain result cannot rule anything out: please have the spot checked "
            "by a doctor or dermatologist.",
        )
    concern = concerning_probability(result)
    if not below(concern, CONCERN_PROBABILITY):
        worst = next(p for p in result.predictions if _concerning(p.code))
        return Advice(
            "see_doctor",
            "See a dermatologist soon",
            f"The photo looks most like {_name(top)}, at {percent(top.probability)}, but conditions that can be or "
            f"become skin cancer together reach {percent(concern)} (most of all {_name(worst)}, "
            f"{percent(worst.probability)}). Please have the spot checked by a doctor or dermatologist.",
        )
    worst = next((p for p in result.predictions if _concerning(p.code)), None)
    caveat = ""
    if worst is not None and not below(worst.probability, MENTION_PROBABILITY):
        caveat = (
            f" It does not rule out {_name(worst)} ({percent(worst.probability)}), a condition that can be or become "
            "skin cancer: if in doubt, have it checked."
        )
    return Advice(
        "monitor",
        "Probably harmless: keep an eye on it",
        f"The photo looks most like {_name(top)}, at {percent(top.probability)}, which is usually harmless.{caveat} "
        "See a doctor if the spot changes in size, shape or colour, bleeds, itches, or worries you.",
    )
