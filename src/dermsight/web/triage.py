"""What a result means for the person who uploaded the photo: one advice message, shared by the pages and the API.

The rules lean towards sending people to a doctor. A missed melanoma costs far more than an unnecessary appointment,
and the model has only seen dermoscopy images of seven conditions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from dermsight.classes import CONDITIONS
from dermsight.inference.types import PredictionResult

# A malignant or pre-malignant class this probable is worth a doctor's look even when a benign class ranks first:
# with seven classes, 0.3 is about twice what an uninformed model would give each.
CONCERN_PROBABILITY = 0.3


@dataclass(frozen=True)
class Advice:
    level: str  # "see_doctor" | "monitor" | "retake"
    title: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _concerning(code: str) -> bool:
    cond = CONDITIONS.get(code)
    return cond is not None and cond.is_concerning


def advise(result: PredictionResult) -> Advice:
    top = result.top
    if result.status != "ok" or top is None:
        return Advice(
            "retake",
            "We could not assess this photo",
            (result.reason or "The photo could not be assessed.") + " Please try another photo.",
        )
    if _concerning(top.code):
        return Advice(
            "see_doctor",
            "See a dermatologist soon",
            f"The photo looks most like {top.name.lower()} ({top.probability:.0%}), which can be or become skin "
            "cancer. Please book an appointment with a doctor or dermatologist soon and show them this spot. "
            "Only a doctor can diagnose it; most spots checked this way turn out to be harmless.",
        )
    if result.uncertain:
        return Advice(
            "see_doctor",
            "See a dermatologist soon: the result is uncertain",
            f"The model is not confident about this photo (its best guess, {top.name.lower()}, is only "
            f"{top.probability:.0%}). An uncertain result cannot rule anything out: please have the spot checked "
            "by a doctor or dermatologist.",
        )
    worrying = [p for p in result.predictions[1:] if _concerning(p.code) and p.probability >= CONCERN_PROBABILITY]
    if worrying:
        w = worrying[0]
        return Advice(
            "see_doctor",
            "See a dermatologist soon",
            f"The photo looks most like {top.name.lower()} ({top.probability:.0%}), but {w.name.lower()} is also "
            f"possible ({w.probability:.0%}). Please have the spot checked by a doctor or dermatologist.",
        )
    return Advice(
        "monitor",
        "Probably harmless: keep an eye on it",
        f"The photo looks most like {top.name.lower()} ({top.probability:.0%}), which is usually harmless. "
        "See a doctor if the spot changes in size, shape or colour, bleeds, itches, or worries you.",
    )
