"""The typed result of one prediction, shared by the CLI, the web pages and the JSON API (one shape everywhere),
and the rule that builds it from calibrated probabilities and the class catalogue."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from dermsight.domain.classes import CONDITIONS

Status = Literal["ok", "rejected"]


# Below this calibrated top-class probability the result is flagged `uncertain`: the model's best guess is less
# likely than all other classes together, which is not an answer to act on.
UNCERTAIN_BELOW = 0.5


def whole_percent(p: float) -> int:
    """``p`` as the whole percent people are shown. The thresholds that send people to a doctor or name a concerning
    class compare this where rounding makes them more cautious (a concerning class named from 5%, concerning
    classes together from 15%): a result showing "Melanoma 10%" must not be passed over because it was 0.097. The
    uncertain flag keeps the raw probability, which is the cautious side there (0.496, shown as 50%, is uncertain)."""
    return round(p * 100)


def below(p: float, threshold: float) -> bool:
    """Whether ``p`` is below ``threshold`` as shown: in whole percents (see `whole_percent`)."""
    return whole_percent(p) < round(threshold * 100)


@dataclass(frozen=True)
class ClassProbability:
    code: str  # catalogue code, e.g. "mel"
    name: str  # display name from the catalogue
    probability: float
    malignancy: str  # "malignant" | "premalignant" | "benign" | "unknown" (dermsight.domain.classes.Malignancy)


@dataclass(frozen=True)
class PredictionResult:
    status: Status
    reason: str | None  # why an image was rejected (a sentence a user can act on); None when status is "ok"
    predictions: list[ClassProbability] = field(default_factory=list)  # sorted by probability, highest first
    malignant: bool | None = None  # top class malignant or pre-malignant; None when rejected
    uncertain: bool = False  # the model is not confident (low top probability): advise a dermatologist
    model: str = ""  # which model answered (architecture + file)
    image: str | None = None  # the input's name, when it came from a file
    # Sum of the probabilities of the malignant and pre-malignant classes: "nv 0.55, mel 0.40" is not malignant by
    # its top class but is a 40% melanoma risk. None when rejected.
    concerning_probability: float | None = None
    # The measurements behind the decision (image-quality scores, out-of-distribution score and its threshold),
    # for logs and for the API; never needed to read the result.
    scores: dict[str, float] = field(default_factory=dict)
    # The answering model's referral threshold: malignant and pre-malignant classes together this probable send
    # people to a doctor (`ModelMeta.refer_from`, fitted on its validation images). None: dermsight's default,
    # `triage.CONCERN_PROBABILITY`.
    refer_from: float | None = None

    @property
    def top(self) -> ClassProbability | None:
        return self.predictions[0] if self.predictions else None

    def top_k(self, k: int) -> list[ClassProbability]:
        return self.predictions[:k]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["predictions"] = [{"code": p.code, "name": p.name, "probability": p.probability} for p in self.predictions]
        return d


def prediction_result(
    probs: np.ndarray,
    classes: Sequence[str],
    names: Sequence[str],
    model: str = "",
    image: str | None = None,
    scores: dict[str, float] | None = None,
    refer_from: float | None = None,
) -> PredictionResult:
    """An accepted image's result from its calibrated probabilities (in ``classes`` order, catalogue codes, with their
    display ``names``): sorted, with the flags the advice reads (`uncertain`, `concerning_probability`). One rule for
    serving and for `bench/triage.py`, which replays the advice on evaluation's predictions."""
    conds = [CONDITIONS[c] for c in classes]
    order = np.argsort(-probs, kind="stable")
    preds = [
        ClassProbability(
            code=conds[k].code, name=names[k], probability=float(probs[k]), malignancy=str(conds[k].malignancy)
        )
        for k in order
    ]
    return PredictionResult(
        status="ok",
        reason=None,
        predictions=preds,
        malignant=conds[int(order[0])].is_concerning,
        uncertain=bool(probs[order[0]] < UNCERTAIN_BELOW),  # raw, not as shown: 0.496 stays uncertain
        model=model,
        image=image,
        concerning_probability=float(sum(probs[k] for k, c in enumerate(conds) if c.is_concerning)),
        scores=scores or {},
        refer_from=refer_from,
    )
