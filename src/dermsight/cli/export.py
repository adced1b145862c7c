"""`dermsight export|model-card`: what ships with a model, an ONNX file checked against PyTorch and the model's card
rendered from the metadata inside it."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from dermsight.cli.common import EXIT_DROPPED, EXIT_OK, EXIT_USAGE, MODEL_HELP, model_path, output_file, whole


def add_parser(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser("export", help="export a model to ONNX (dynamic batch) and check it against PyTorch")
    ex.add_argument("--model", help=MODEL_HELP)
    ex.add_argument("--out", required=True, metavar="FILE.onnx", help="ONNX file to write")
    ex.add_argument(
        "--int8",
        nargs="?",
        const="dynamic",
        choices=("dynamic", "static"),
        help="also write FILE.int8.onnx and compare it: dynamic (the default) or static (QDQ, calibrated on "
        "--calibration-images); neither is served (bench/inference.md)",
    )
    ex.add_argument(
        "--calibration-images",
        nargs="+",
        metavar="PATH",
        help="for --int8 static: images, folders or a split manifest (its train split), not the check images",
    )
    ex.add_argument(
        "--check-images",
        nargs="+",
        metavar="PATH",
        help="images, folders or a split manifest (its val split, with labels) for the parity check "
        "(default: synthetic images)",
    )
    ex.add_argument("--max-check", type=whole(1), default=64, help="at most this many check images (default 64)")
    ex.add_argument("--threads", type=whole(1), help="ONNX Runtime threads for the check (default 1)")
    ex.set_defaults(func=cmd_export)

    mc = sub.add_parser("model-card", help="render a model's card (Markdown) from the metadata inside the model")
    mc.add_argument("--model", help=MODEL_HELP)
    mc.add_argument("--out", help="write here instead of printing")
    mc.add_argument("--name", help="how to call the file in the card")
    mc.add_argument("--reproduce", default="", help="the command that reproduces the model")
    mc.add_argument("--note", action="append", default=[], help="a paragraph to add (repeatable)")
    mc.add_argument("--notes", help="a Markdown file of paragraphs to add after --note's (HTML comments left out)")
    mc.set_defaults(func=cmd_model_card)


def cmd_export(args: argparse.Namespace) -> int:
    from dermsight.inference.export import export_model
    from dermsight.models.contract import ModelLoadError

    try:
        model = model_path(args.model)
        report, meta = export_model(
            model,
            output_file(
                args.out,
                [model, *(args.check_images or ()), *(args.calibration_images or ())],
                writes="an ONNX model (.onnx)",
            ),
            args.check_images or (),
            args.max_check,
            args.int8 or False,
            args.threads or 1,
            args.calibration_images or (),
        )
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print("\n".join(report.lines(meta)))
    return EXIT_OK if report.ok else EXIT_DROPPED


def read_notes(path: str) -> list[str]:
    """The paragraphs of a Markdown notes file (blank lines between them), each on one line, without the file's own
    HTML comments for whoever edits it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"--notes {path}: cannot read it ({e.strerror or e})") from None
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def cmd_model_card(args: argparse.Namespace) -> int:
    from dermsight.models.card import render_model_card
    from dermsight.models.contract import read_meta

    path = model_path(args.model)
    notes = [*args.note, *(read_notes(args.notes) if args.notes else ())]
    text = render_model_card(
        read_meta(path), model_file=args.name or path.name, reproduce=args.reproduce, notes=tuple(notes)
    )
    if args.out:
        out = output_file(args.out, [path], writes="Markdown (.md)")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"model card written to {args.out}")
    else:
        print(text)
    return EXIT_OK
