"""`dermsight predict`: lesion images classified, as a table or JSON (formatting in `dermsight.cli.output`), with the
web app's advice and optional Grad-CAM overlays."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dermsight.cli.common import EXIT_DROPPED, EXIT_OK, EXIT_USAGE, MODEL_HELP, inference_options, tta_option

BATCH = 32  # images decoded and held in memory at once


def add_parser(sub: argparse._SubParsersAction) -> None:
    pr = sub.add_parser("predict", help="classify lesion images (rejects images it cannot assess)")
    pr.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="image files (JPEG, PNG, WebP, BMP, TIFF), or folders: every image in them and their sub-folders",
    )
    pr.add_argument("--model", help=MODEL_HELP)
    tta_option(pr)
    pr.add_argument("--explain", metavar="DIR", help="write a Grad-CAM overlay per image to DIR/<name>_gradcam.png")
    pr.add_argument("--json", action="store_true", help="print a JSON array, one object per image")
    inference_options(pr)
    pr.set_defaults(func=cmd_predict)


def expand_folders(paths: list[str]) -> tuple[list[str], list[str]]:
    """The images to predict, in order: a file as given (a file that is not an image is reported as such later), a
    folder as the images in it and its sub-folders, sorted (hidden files left out, `data.manifest.list_images`),
    photos in formats that are not read (HEIC, GIF) among them so that each is reported rather than passed over.
    Also returns the folders that hold no image, each an error of its own."""
    from dermsight.data.manifest import IMAGE_SUFFIXES, UNREAD_PHOTO_SUFFIXES, list_images

    images, empty = [], []
    for p in paths:
        if Path(p).is_dir():
            found = [str(f) for f in list_images(p, IMAGE_SUFFIXES | UNREAD_PHOTO_SUFFIXES)]
            images.extend(found)
            if not found:
                empty.append(p)
        else:
            images.append(p)
    return images, empty


def cmd_predict(args: argparse.Namespace) -> int:
    import json

    from dermsight.cli.output import format_table, result_record
    from dermsight.data.images import ImageError
    from dermsight.domain.knowledge import load_knowledge
    from dermsight.domain.triage import CONCERN_PROBABILITY, advise, rule
    from dermsight.inference.predictor import Predictor
    from dermsight.models.contract import ModelLoadError

    knowledge = load_knowledge()
    try:
        predictor = Predictor.from_path(args.model, backend=args.backend, threads=args.threads)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    explain_dir = Path(args.explain) if args.explain else None
    if explain_dir:
        explain_dir.mkdir(parents=True, exist_ok=True)  # before any work: a file in the way is a usage error
    images, empty = expand_folders(args.images)
    for folder in empty:
        print(f"error: {folder}: a folder with no images (JPEG, PNG, WebP, BMP or TIFF) in it", file=sys.stderr)
    records, failed, written = [], len(empty), set()
    for start in range(0, len(images), BATCH):
        batch = images[start : start + BATCH]
        for image, result in zip(batch, predictor.predict_batch(batch, tta=args.tta), strict=True):
            advice = None if isinstance(result, ImageError) else advise(result, knowledge).to_dict()
            record = result_record(image, result, advice)
            if isinstance(result, ImageError):
                failed += 1
                print(f"error: {image}: {result}", file=sys.stderr)
            elif explain_dir and result.status == "ok":
                out, n = explain_dir / f"{Path(image).stem}_gradcam.png", 2
                while out in written:  # two inputs of the same name from different folders
                    out, n = explain_dir / f"{Path(image).stem}_{n}_gradcam.png", n + 1
                out.write_bytes(predictor.explain(image, target=result.top.code))  # the class the answer names
                written.add(out)
                record["explanation"] = str(out)
            records.append(record)
    print(
        json.dumps(records, indent=2)
        if args.json
        else format_table(records, advice_rule=rule(predictor.meta.refer_from or CONCERN_PROBABILITY))
    )
    return EXIT_DROPPED if failed else EXIT_OK
