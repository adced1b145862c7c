"""`dermsight calibrate|tune-decision|ensemble|soup`: what is fitted after training, on a run's val split (temperature,
the not-a-lesion gate, the decision rule), and runs of one recipe combined into one model."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from dermsight.cli.common import (
    EXIT_DROPPED,
    EXIT_OK,
    EXIT_USAGE,
    MODEL_HELP,
    inference_options,
    model_path,
    output_file,
    share,
    whole,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    ca = sub.add_parser("calibrate", help="fit temperature scaling and the not-a-lesion gate on a validation split")
    ca.add_argument("--model", help=MODEL_HELP)
    ca.add_argument(
        "--data",
        required=True,
        metavar="SPLIT_MANIFEST_OR_RUN_DIR",
        help="split manifest (train: fits the OOD statistics, val: temperature and threshold, test: "
        "measured only) or a training run folder with split.csv",
    )
    ca.add_argument("--out", help="model file to write (default: update --model in place)")
    ca.add_argument(
        "--negatives",
        nargs="+",
        metavar="PATH",
        help="images or folders of non-lesion photos, to measure the share the gate catches",
    )
    ca.add_argument(
        "--target-rejection",
        type=share,
        default=0.01,
        help="share of validation lesions the OOD threshold may reject (default 0.01: held-out lesions were "
        "rejected about twice as often as validation ones, and the bar is 5%%)",
    )
    ca.add_argument(
        "--max-fit-images",
        type=whole(1),
        default=4000,
        help="training images used to fit the OOD statistics (default 4000)",
    )
    ca.add_argument(
        "--views",
        type=int,
        choices=(1, 8),
        default=8,
        help="views of each photo a served answer averages: 8 (its flips and rotations) or 1 (the photo turned to "
        "a canonical orientation, an eighth of the work); either way turning a photo never changes the answer "
        "(default 8)",
    )
    inference_options(ca)
    ca.set_defaults(func=cmd_calibrate)

    td = sub.add_parser(
        "tune-decision",
        help="choose TTA and the prior correction on the val split, refit the temperature, re-score val and test",
    )
    td.add_argument("--model", help=MODEL_HELP)
    td.add_argument("--data", required=True, help="split manifest (split.csv) or a training run folder")
    td.add_argument("--out", help="write the tuned model here (default: in place)")
    td.add_argument("--reports", help="folder for the val/test reports (default: a temporary folder)")
    td.add_argument(
        "--views",
        type=int,
        choices=(1, 8),
        default=8,
        help="views a served answer averages, as given to calibrate (default 8)",
    )
    td.set_defaults(func=cmd_tune_decision)

    en = sub.add_parser("ensemble", help="serve runs of one recipe as one model that averages their logits")
    en.add_argument("models", nargs="+", metavar="MODEL", help="model files of runs of the same recipe")
    en.add_argument("--out", required=True, help="model file to write")
    en.add_argument("--float32", action="store_true", help="store weights as float32 (default float16: half the size)")
    en.set_defaults(func=cmd_ensemble)

    so = sub.add_parser(
        "soup", help="average the weights of runs of one recipe (greedy model soup, chosen on the val split)"
    )
    so.add_argument("models", nargs="+", metavar="MODEL", help="model files of runs of the same recipe")
    so.add_argument("--data", required=True, help="split manifest (split.csv) or a training run folder")
    so.add_argument("--out", required=True, help="model file to write")
    so.add_argument("--uniform", action="store_true", help="average all models (default: greedy on val)")
    so.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to score (default auto)")
    so.set_defaults(func=cmd_soup)


def _model_and_out(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The model that ``calibrate`` or ``tune-decision`` reads (``--model``, else the default model) and the file it
    writes (``--out``, else the model itself, None here). Both are checked before minutes of scoring.

    The bundled default model is never rewritten in place: the app, ``predict`` and ``evaluate`` serve it, and a
    calibration on some other split would silently replace the shipped one."""
    from dermsight.data.manifest import split_manifest_path
    from dermsight.models.contract import DEFAULT_MODEL

    model = model_path(args.model)
    # The split it scores is an input too: a model written over a run's split.csv would lose the record of which
    # images trained it.
    out = output_file(args.out, [model, split_manifest_path(args.data)]) if args.out else None
    target = out or model
    if target.exists() and DEFAULT_MODEL.exists() and target.samefile(DEFAULT_MODEL):
        raise ValueError(
            f"{target} is the bundled default model, which is not rewritten in place: give --out FILE, then use it "
            "with --model FILE (or DERMSIGHT_MODEL=FILE for the app)"
        )
    return model, out


def _warn_if_not_the_training_split(model: Path, data: str) -> None:
    from dermsight.data.manifest import read_split_manifest
    from dermsight.models.contract import read_meta
    from dermsight.models.meta import split_mismatch

    problem = split_mismatch(read_meta(model), read_split_manifest(data))
    if problem:
        print(f"warning: {problem}", file=sys.stderr)


def _warn_if_splits_differ(models: Sequence[str]) -> None:
    """Runs combined from different splits (cross-validation folds, say) can be averaged, but no split is then
    held out from all of them: the temperature, gate and decision rule fitted on one run's val split, and the
    scores on its test split, would include images another member trained on."""
    from dermsight.models.contract import read_meta

    records = [read_meta(m).split for m in models]
    splits = {r.describe() if r else "not recorded" for r in records}
    if any(r is None or not r.fingerprint for r in records):
        # A run whose split carries no fingerprint can only be compared by the rest (seed and sizes).
        splits = {re.sub(r"; fingerprint [0-9a-f]+", "", s) for s in splits}
    if len(splits) > 1:
        print(
            f"warning: these runs were trained on {len(splits)} different splits ({' | '.join(sorted(splits))}); "
            "calibrating or scoring the result on any one of them includes images another member trained on",
            file=sys.stderr,
        )


def cmd_calibrate(args: argparse.Namespace) -> int:
    from dermsight.data.manifest import list_images
    from dermsight.models.contract import ModelLoadError
    from dermsight.posthoc.calibrate import calibrate_model, report_lines

    try:
        model, out = _model_and_out(args)
        _warn_if_not_the_training_split(model, args.data)
        report = calibrate_model(
            model,
            Path(args.data),
            out,
            negatives=[p for d in args.negatives or () for p in list_images(d)],
            target_rejection=args.target_rejection,
            max_fit_images=args.max_fit_images,
            backend=args.backend,
            threads=args.threads,
            views=args.views,
        )
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print("\n".join(report_lines(report)))
    return _said_unreadable(report["unreadable"])


def _said_unreadable(unreadable: list[tuple[str, str]]) -> int:
    """Name the images a fit left out because they could not be read; the exit code says whether there were any."""
    if not unreadable:
        return EXIT_OK
    print(f"\n{len(unreadable)} image(s) could not be read and were left out of the fit:", file=sys.stderr)
    for path, reason in unreadable[:10]:
        print(f"  {path}: {reason}", file=sys.stderr)
    if len(unreadable) > 10:
        print(f"  ... and {len(unreadable) - 10} more", file=sys.stderr)
    return EXIT_DROPPED


def cmd_tune_decision(args: argparse.Namespace) -> int:
    from dermsight.posthoc.decision import report_lines, tune_decision

    model, out = _model_and_out(args)
    _warn_if_not_the_training_split(model, args.data)
    report = tune_decision(model, args.data, out, report_dir=args.reports, views=args.views)
    print("\n".join(report_lines(report)))
    return _said_unreadable(report["unreadable"])


def cmd_ensemble(args: argparse.Namespace) -> int:
    import torch

    from dermsight.posthoc.ensemble import combine

    out = output_file(args.out, args.models)
    report = combine(args.models, out, dtype=None if args.float32 else torch.float16)
    _warn_if_splits_differ(args.models)
    for m in report["members"]:
        val = m["val"]
        figures = f"val balanced accuracy {val['balanced_accuracy']:.3f}, accuracy {val['accuracy']:.3f}" if val else ""
        print(f"  {m['model']} (seed {m['seed']}) {figures}")
    print(
        f"ensemble of {len(report['members'])} written to {report['model']} (weights stored as "
        f"{report['stored_as']}); now fit its temperature, gate and decision rule on the members' split:\n"
        f"  dermsight calibrate --model {args.out} --data RUN_FOLDER\n"
        f"  dermsight tune-decision --model {args.out} --data RUN_FOLDER"
    )
    return EXIT_OK


def cmd_soup(args: argparse.Namespace) -> int:
    from dermsight.data.manifest import split_manifest_path
    from dermsight.posthoc.soup import make_soup, report_lines

    out = output_file(args.out, [*args.models, split_manifest_path(args.data)])
    _warn_if_splits_differ(args.models)
    # The greedy choice is made on --data's val split: another split's "val" can hold the runs' training images.
    _warn_if_not_the_training_split(Path(args.models[0]), args.data)
    report = make_soup(args.models, args.data, out, greedy=not args.uniform, device=args.device)
    print("\n".join(report_lines(report)))
    return EXIT_OK
