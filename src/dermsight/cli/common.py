"""What the commands share: exit codes, argument types that refuse a bad value at parse time (a usage message, exit 2),
the options several commands take, the checks on the files they write and the report of dropped items."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from dermsight.inference.types import BACKENDS

EXIT_OK, EXIT_DROPPED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 70

MODEL_HELP = "model file (default: $DERMSIGHT_MODEL, else the bundled default model)"


def whole(low: int, high: int | None = None) -> Callable[[str], int]:
    """argparse type: a whole number in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {span}, got {value}")
        return value

    return parse


def share(text: str) -> float:
    """argparse type: a share strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (a share, e.g. 0.01), got {value}")
    return value


def tta_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        help="average over the 8 flips/rotations (default: the model's own rule)",
    )


def inference_options(parser: argparse.ArgumentParser) -> None:
    """``--backend`` and ``--threads``, for the commands that score images through the predictor."""
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="ONNX Runtime, PyTorch, or auto: ONNX Runtime with PyTorch as the fallback (default)",
    )
    parser.add_argument(
        "--threads", type=whole(1), help="intra-op threads (default: $DERMSIGHT_THREADS, else all cores)"
    )


def model_path(given: str | None) -> Path:
    """``--model`` as given, else the default model ($DERMSIGHT_MODEL, else the bundled one)."""
    from dermsight.models.contract import default_model_path

    return Path(given) if given else default_model_path()


def output_file(
    out: str | os.PathLike, inputs: Sequence[str | os.PathLike | None] = (), writes: str | None = None
) -> Path:
    """``out`` as a file this command may write: not a folder, and none of the files the command reads (writing the
    result over its own input would destroy what the user had). ``writes``: what the command writes when that is not
    a model (ONNX, Markdown); a model's name (.safetensors) is then refused, since an ONNX file or a model card written
    there would replace another run's model without a word. Raises ValueError (a usage error, exit 2)."""
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name inside it")
    if writes and path.suffix.lower() == ".safetensors":
        raise ValueError(f"--out {out} is a model file's name, and this command writes {writes}; give another name")
    for source in inputs:
        if source is not None and path.exists() and Path(source).exists() and path.samefile(source):
            raise ValueError(f"--out {out} is one of this command's inputs; write the result to another file")
    return path


def print_table(df, title: str) -> None:  # pandas frame -> aligned text
    print(f"\n{title}")
    print(df.to_string())


def problems_path(out: Path) -> Path:
    """Where the list of items dropped while writing ``out`` goes: beside it, ``NAME.problems.csv``."""
    return out.with_name(out.stem + ".problems.csv")


def report_problems(problems, problems_file: Path | None) -> int:
    """Write the dropped items to ``problems_file`` (when given) and summarise them on stderr; the exit code says
    whether any item was dropped."""
    from dermsight.data.problems import summarise, write_problems

    if problems_file is not None:
        write_problems(problems, problems_file)
    if not problems:
        return EXIT_OK
    print("\n" + summarise(problems), file=sys.stderr)
    if problems_file is not None:
        print(f"full list: {problems_file}", file=sys.stderr)
    return EXIT_DROPPED
