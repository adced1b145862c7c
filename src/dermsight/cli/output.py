"""How `dermsight predict` shows results: one JSON object per image (the same keys whatever happened to it) and a
readable table built from those objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dermsight.data.images import ImageError
from dermsight.domain.results import PredictionResult

_ADVICE = {"see_doctor": "see a doctor", "monitor": "monitor"}
DISCLAIMER = (
    "These are a model's estimates from one image, not a diagnosis; see a doctor about any lesion that worries you."
)


def result_record(
    image: str, result: PredictionResult | ImageError, advice: dict[str, str] | None = None
) -> dict[str, Any]:
    """``image``, ``status`` ("ok", "rejected", or "error" for a file that could not be read), ``reason``,
    ``predictions`` ([{code, name, probability}], highest first), ``malignant``, ``advice`` (the web app's
    {level, title, message} for the result, as its API gives it), then the remaining result fields."""
    if isinstance(result, ImageError):
        return {
            "image": image, "status": "error", "reason": str(result), "predictions": [], "malignant": None,
            "advice": None,
        }  # fmt: skip
    d = result.to_dict()
    head = {k: d.pop(k) for k in ("status", "reason", "predictions", "malignant")}
    d.pop("image", None)
    return {"image": image, **head, "advice": advice, **d}


def format_table(records: list[dict[str, Any]], advice_rule: str = "") -> str:
    """The records as a table. ``advice_rule``: the web app's rule in words (`dermsight.domain.triage.RULE`), which the
    advice column follows, so the CLI and the app never disagree; it is explained under the table."""
    width = min(40, max([len("image"), *(len(Path(r["image"]).name) for r in records)]))
    lines = [f"{'image':<{width}}  {'status':<8}  {'top class':<38}  {'prob':>6}  {'advice':<12}  next"]
    for r in records:
        name = Path(r["image"]).name[:width]
        if r["status"] != "ok":
            lines.append(f"{name:<{width}}  {r['status']:<8}  {r['reason']}")
            continue
        top, rest = r["predictions"][0], r["predictions"][1:3]
        label = f"{top['code']} {top['name']}"[:38]
        others = ", ".join(f"{p['code']} {p['probability']:.1%}" for p in rest)
        flag = "  (uncertain)" if r.get("uncertain") else ""
        advice = _ADVICE.get(r["advice"]["level"], r["advice"]["level"])
        lines.append(
            f"{name:<{width}}  {'ok':<8}  {label:<38}  {top['probability']:>6.1%}  {advice:<12}  {others}{flag}"
        )
    # The advice column is explained only where a row has one (every image refused or unreadable: no column).
    explained = advice_rule and any(r["status"] == "ok" for r in records)
    notes = f"advice, as the web app gives it: {advice_rule} {DISCLAIMER}" if explained else DISCLAIMER
    return "\n".join([*lines, "", notes])
