"""Robustness to colour and exposure: each model's balanced accuracy and accuracy on one split under the photometric
shifts of `dermsight.evaluation.shifts`, beside the unshifted images, in one run.

    .venv/bin/python bench/robustness.py --data runs/default/split.csv --split test --out bench/robustness.md
    .venv/bin/python bench/robustness.py --data runs/default/split.csv --split val --rule argmax \\
        --model runs/default_s1/model.safetensors --model runs/gain_s1/model.safetensors

``--data``: a split manifest (a training run's split.csv, or `dermsight data split`'s output) whose split the models
did not train on; without ``--model`` the bundled default is scored. Images are scored as 224 px square centre crops
(the external test set's shape) unless ``--frames``. The last row, "mean of shifts", averages the shifted rows: one
number for how much of a model's quality survives a change of camera or light.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from dermsight.data.manifest import read_split_manifest
from dermsight.data.problems import DataError
from dermsight.evaluation.shifts import SHIFTS, shift_scores
from dermsight.models.bundle import ModelLoadError, default_model_path, read_meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="split manifest (split.csv) or a run folder that holds one")
    ap.add_argument("--split", default="val", help="which split to score (default: val)")
    ap.add_argument("--model", action="append", type=Path, help="model file (repeatable; default: the bundled one)")
    ap.add_argument("--shifts", default=",".join(SHIFTS), help=f"comma-separated (default: all: {','.join(SHIFTS)})")
    ap.add_argument("--rule", choices=("model", "argmax"), default="model", help="decision rule (default: model's)")
    ap.add_argument("--frames", action="store_true", help="score the 4:3 frames, not 224 px square crops")
    ap.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.shifts.split(",") if n.strip()]
    if "none" not in names:
        names.insert(0, "none")
    models = args.model or [default_model_path()]
    try:
        df = read_split_manifest(args.data)
        rows = df[df["split"] == args.split]
        if rows.empty:
            raise DataError(f"no images in split {args.split!r} of {args.data}")
        results = {}
        for m in models:
            t = time.perf_counter()
            results[m] = shift_scores(m, rows, names, square=not args.frames, rule=args.rule, progress=True)
            print(f"{m}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    except (DataError, ModelLoadError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    view = "4:3 frames" if args.frames else "224 px square centre crops"
    rule = "each model's decision rule" if args.rule == "model" else "plain argmax"
    lines = [
        f"Robustness to colour and exposure shifts: `{args.split}` split of `{args.data}` ({len(rows)} images, {view}),"
        f" {rule}."
        " Balanced accuracy / accuracy; in brackets, the change from the unshifted images.",
        "Produced by `bench/robustness.py`; every model scored in the same run.",
        "",
        "| shift | "
        + " | ".join(f"`{m.name if m.name != 'model.safetensors' else m.parent.name}`" for m in models)
        + " |",
        "|---|" + "---:|" * len(models),
    ]
    for i, name in enumerate(names):
        cells = []
        for m in models:
            r, base = results[m][i], results[m][0]
            cell = f"{r['balanced_accuracy']:.3f} / {r['accuracy']:.3f}"
            if name != "none":
                cell += f" ({r['balanced_accuracy'] - base['balanced_accuracy']:+.3f})"
            cells.append(cell)
        lines.append(f"| {name}: {SHIFTS[name][0]} | " + " | ".join(cells) + " |")
    if len(names) > 1:
        cells = []
        for m in models:
            shifted = results[m][1:]
            ba = statistics.mean(r["balanced_accuracy"] for r in shifted)
            acc = statistics.mean(r["accuracy"] for r in shifted)
            cells.append(f"**{ba:.3f} / {acc:.3f}** ({ba - results[m][0]['balanced_accuracy']:+.3f})")
        lines.append("| mean of shifts | " + " | ".join(cells) + " |")
    lines.append("")
    for m in models:
        meta = read_meta(m)
        gain = meta.config.get("channel_gain", 0) if isinstance(meta.config, dict) else 0
        shown = m.resolve().relative_to(Path.cwd()) if m.resolve().is_relative_to(Path.cwd()) else m
        cc = f", Shades of Gray colour constancy p = {meta.colour_constancy}" if meta.colour_constancy else ""
        lines.append(f"- `{shown}`: {meta.network}, trained with channel_gain {gain}{cc}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
