"""The model card renders what a multi-source model records: figures per source and its own referral threshold."""

from __future__ import annotations

from dataclasses import replace

from dermsight.models import ModelMeta, WeightsInfo
from dermsight.models.card import render_model_card

WEIGHTS = WeightsInfo("none", "random", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 64)


def _split(n: int, ba: float, mel: float, nv: float) -> dict:
    return {
        "n": n, "accuracy": 0.8, "balanced_accuracy": ba, "macro_auc": 0.9, "ece": 0.03, "ci95": {},
        "recall": {}, "mel_vs_nv_auc": 0.85, "referral": {"mel": mel, "nv": nv, "all": 0.3},
    }  # fmt: skip


EXTERNAL = {
    "n": 555, "melanomas": 159, "nevi": 396, "balanced_accuracy": 0.7, "balanced_accuracy_ci95": [0.65, 0.75],
    "accuracy": 0.75, "mel_vs_nv_auc": 0.8, "melanomas_sent": 0.881, "nevi_sent": 0.333, "melanomas_refused": 0.02,
    "refused": 0.041,
}  # fmt: skip


def test_card_shows_each_source_and_the_fitted_referral_threshold():
    test = _split(300, 0.7, 0.9, 0.25) | {
        "by_source": {
            "labels-csv:ham10000": _split(200, 0.75, 0.93, 0.2),
            "labels-csv:isic2017_256": _split(100, 0.55, 0.81, 0.4),
        }
    }
    referral = {
        "refer_from": 0.08, "target": 0.95, "met": True,
        "pooled": {"melanomas": 60, "melanomas_referred": 0.95, "nevi": 200, "nevi_referred": 0.31},
        "by_source": {"labels-csv:isic2017_256": {
            "melanomas": 20, "melanomas_referred": 0.9, "nevi": 50, "nevi_referred": 0.44,
        }},
    }  # fmt: skip
    decision = {"tta": False, "tau": 0.3, "chosen_on": "val split", "referral": referral}
    meta = replace(
        ModelMeta.new("tf_efficientnet_lite0", "ham7", WEIGHTS, input_size=64),
        refer_from=0.08,
        metrics={"test": test, "decision": decision, "external": {"ISIC Archive": EXTERNAL}},
    )
    card = render_model_card(meta)
    assert "| isic2017_256 | 100 | 0.550 | 0.800 | 0.850 | 0.810 | 0.400 |" in card
    assert "| ham10000 | 200 | 0.750 |" in card
    assert "reach **8%**" in card
    assert "| all sources | 95.0% of 60 | 31.0% of 200 |" in card
    assert "| isic2017_256 | 90.0% of 20 | 44.0% of 50 |" in card
    assert "| ISIC Archive | 555 (159 mel, 396 nv) | 88.1% | 33.3% | 4.1% | 0.800 | 0.700 (0.650-0.750) |" in card
    # A model of one source and the default threshold says neither.
    plain = replace(meta, refer_from=0.0, metrics={"test": _split(300, 0.7, 0.9, 0.25)})
    assert "By source" not in render_model_card(plain) and "Referral threshold" not in render_model_card(plain)
