"""Record what a model does on labelled sets from other sources in the model file, for its card, the web app's
About page and the README's table by source.

    .venv/bin/python scripts/record_external.py runs/multisource/model.safetensors \
        "ISIC Archive (isic_archive_val224)=../shared/data/isic_archive_val224"

Each set is scored with `dermsight evaluate --gates`: the model's figures on every image, and what the app tells
people (a refused image is not sent to a doctor). The figures go to ``metrics["external"][NAME]``; the weights are
kept byte for byte (`models.bundle.update_meta`). Sets used to train or select the model are refused: they are not
external.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from dermsight.data.problems import DataError
from dermsight.evaluation.run import evaluate
from dermsight.models.bundle import ModelLoadError, read_meta, update_meta


def external_figures(metrics: dict) -> dict:
    """The figures the card and the About page show for one set (`evaluate(..., gates=True)`'s metrics)."""
    app, gates = metrics["app_referral"], metrics["serving_gates"]

    def rate(rates: dict, code: str) -> float | None:
        c = rates["per_class"].get(code)
        return None if c is None else round(c["referred"], 4)

    ci = (metrics.get("ci95") or {}).get("balanced_accuracy")
    return {
        "n": metrics["n"],
        "melanomas": (app["per_class"].get("mel") or {}).get("n", 0),
        "nevi": (app["per_class"].get("nv") or {}).get("n", 0),
        "balanced_accuracy": round(metrics["balanced_accuracy"], 4),
        "balanced_accuracy_ci95": [round(v, 4) for v in ci] if ci else None,
        "accuracy": round(metrics["accuracy"], 4),
        "mel_vs_nv_auc": None if metrics["mel_vs_nv_auc"] is None else round(metrics["mel_vs_nv_auc"], 4),
        "melanomas_sent": rate(app, "mel"),
        "nevi_sent": rate(app, "nv"),
        "melanomas_refused": rate(app["refused"], "mel"),
        "refused": round(gates["share"], 4),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="model file (.safetensors) to update in place")
    ap.add_argument("sets", nargs="+", metavar="NAME=DIR", help="a labelled set from another source (repeatable)")
    args = ap.parse_args(argv)
    try:
        meta = read_meta(args.model)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    external = dict(meta.metrics.get("external") or {})
    for spec in args.sets:
        name, sep, data = spec.partition("=")
        if not sep or not name or not data:
            print(f"error: {spec!r}: expected NAME=DIR", file=sys.stderr)
            return 2
        with tempfile.TemporaryDirectory() as tmp:
            try:
                m = evaluate(Path(data), Path(tmp), args.model, gates=True, progress=False).metrics
            except DataError as e:
                print(f"error: {data}: {e}", file=sys.stderr)
                return 2
        if m["extra"]["held_in_images"]:
            print(
                f"error: {data}: {m['extra']['held_in_images']} of its images trained or selected this model",
                file=sys.stderr,
            )
            return 2
        external[name] = external_figures(m)
        print(f"{name}: {external[name]}")
    update_meta(args.model, replace(meta, metrics=meta.metrics | {"external": external}))
    print(f"written to {args.model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
