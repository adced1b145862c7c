"""`dermsight evaluate`: a model scored on labelled data, with metrics.json, plots and report.md written to a folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dermsight.cli.common import MODEL_HELP, report_problems, tta_option, whole


def add_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("evaluate", help="score a model on labelled data: metrics.json, plots, report.md")
    e.add_argument("--model", help=MODEL_HELP)
    e.add_argument("--data", required=True, help="labelled data: a folder/CSV any reader understands, or a manifest")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--split", help="only this split of a split manifest (e.g. test)")
    tta_option(e)
    e.add_argument("--bootstrap", type=whole(0), default=1000, help="bootstrap resamples for 95%% CIs (default 1000)")
    e.add_argument(
        "--gates",
        action="store_true",
        help="also count the images the web app and predict would refuse (image quality, not a lesion); "
        "a second pass over the images. The metrics still cover every image",
    )
    e.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dermsight.evaluation.run import evaluate, held_in_words

    ev = evaluate(
        Path(args.data),
        Path(args.out),
        Path(args.model) if args.model else None,
        split=args.split,
        tta=args.tta,
        n_bootstrap=args.bootstrap,
        gates=args.gates,
    )
    m, ci = ev.metrics, ev.metrics["ci95"]

    def fmt(key: str) -> str:
        lo_hi = ci.get(key)
        value = m[key]
        if value is None:
            return "n/a"
        return f"{value:.3f}" + (f" (95% CI {lo_hi[0]:.3f}-{lo_hi[1]:.3f})" if lo_hi else "")

    print(
        f"{m['n']} images; balanced accuracy {fmt('balanced_accuracy')}; accuracy {fmt('accuracy')}; "
        f"macro AUC {fmt('macro_auc')}; ECE {m['ece']:.3f}"
    )
    print(
        "recall per class: "
        + ", ".join(f"{c} {v['recall']:.2f}" for c, v in m["per_class"].items() if v["recall"] is not None)
    )
    print("referred to a doctor by the app's advice: " + _referral_words(m["referral"]))
    for name, s in (m.get("by_source") or {}).items():
        auc = s["mel_vs_nv_auc"]
        print(
            f"  {name}: {s['n']} images; balanced accuracy {s['balanced_accuracy']:.3f}; accuracy "
            f"{s['accuracy']:.3f}"
            + (f"; mel vs nv AUC {auc:.3f}" if auc is not None else "")
            + f"; referred: {_referral_words(s['referral'], ('mel', 'nv'))}"
        )
    if args.gates:
        print(f"serving gates: {m['extra']['serving_gates']} (the metrics above count every image)")
        app = m["app_referral"]
        print(
            f"as the app answers (a refused image is not sent): sent to a doctor {_referral_words(app, ('mel', 'nv'))}"
            f"; refused {_referral_words(app['refused'], ('mel', 'nv'))}"
        )
        for name, s in (m.get("by_source") or {}).items():
            app = s["app_referral"]
            print(
                f"  {name}: sent {_referral_words(app, ('mel', 'nv'))}; refused "
                f"{_referral_words(app['refused'], ('mel', 'nv'))}"
            )
    if m["extra"]["held_in_images"]:
        held = m["extra"]["held_in_images"]
        print(f"WARNING: {held_in_words(held, m['n'] + m['extra']['images_failed'])}", file=sys.stderr)
    print(f"report: {ev.files['report']}")
    # Written even when empty: a folder reused from an earlier run must not keep that run's problem list.
    return report_problems(ev.problems, Path(args.out) / "problems.csv")


def _referral_words(referral: dict, only: tuple[str, ...] | None = None) -> str:
    per_class = referral["per_class"]
    shown = [c for c in per_class if only is None or c in only]
    return ", ".join(f"{c} {per_class[c]['referred']:.1%}" for c in shown) or "-"
