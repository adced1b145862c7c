"""The `dermsight` command: thin argument parsing over library functions that the tests call too.

Each command group is a module here that adds its sub-parsers and holds its command functions (`data`, `train`,
`evaluate`, `predict`, `serve`, `posthoc`, `export`; shared helpers in `common`). They import the library inside the
command functions, so `dermsight --help` and usage errors need no torch. This module assembles the parser and turns
what a command raises into one line and an exit code.

Exit codes: 0 success; 1 finished but some items were dropped (see the problems file); 2 bad usage or unusable input
(nothing written); 70 an internal error (a bug: the message says how to get the traceback).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable, Sequence

from dermsight.cli import data, evaluate, export, posthoc, predict, serve, train
from dermsight.cli.common import EXIT_INTERNAL, EXIT_OK, EXIT_USAGE

# In the order `dermsight --help` lists them.
COMMAND_GROUPS = (data, train, evaluate, predict, serve, posthoc, export)


def build_parser() -> argparse.ArgumentParser:
    from dermsight import __version__

    p = argparse.ArgumentParser(
        prog="dermsight",
        description="Skin-lesion image classifier. An aid for people and dermatologists; not a medical device.",
    )
    p.add_argument("--version", action="version", version=f"dermsight {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.add_parser(sub)
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    from dermsight.data.download import DownloadError
    from dermsight.data.images import ImageError
    from dermsight.data.problems import DataError
    from dermsight.domain.classes import UnknownLabelError
    from dermsight.models.contract import ModelLoadError

    try:
        from dermsight.models.factory import WeightsError
    except ImportError:  # a serving install (no PyTorch) never fetches weights

        class WeightsError(Exception):  # type: ignore[no-redef]
            pass

    return (
        DataError,
        ImageError,
        UnknownLabelError,
        DownloadError,
        ModelLoadError,
        WeightsError,
        FileNotFoundError,
        ValueError,
    )


_CANNOT_WRITE = {
    errno.EACCES: "Permission denied",  # a folder this user may not write in (export wraps the error in its own)
    errno.ENOSPC: "No space left on device",
    errno.EROFS: "Read-only file system",
    errno.EDQUOT: "Disk quota exceeded",
    errno.EFBIG: "File too large",
}


def _disk_error(e: BaseException | None) -> OSError | None:
    """The full disk, read-only file system or folder this user may not write in behind ``e``, or None. Export
    wraps the OSError in its own error, and safetensors reports it only in words, so the cause chain and the message
    are both read."""
    chain: list[BaseException] = []
    while e is not None and all(e is not seen for seen in chain):
        chain.append(e)
        e = e.__cause__ or e.__context__
    # The OSError itself first: it names the file; the words alone do not.
    for link in chain:
        if isinstance(link, OSError) and link.errno in _CANNOT_WRITE:
            return link
    for link in chain:
        for number, words in _CANNOT_WRITE.items():
            if words in str(link):
                return OSError(number, words)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        # A path the user gave cannot be written or read as asked: an output folder where a file stands, say.
        where = f": {e.filename}" if e.filename else ""
        print(f"error: cannot use that path ({e.strerror or e}){where}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, as Unix tools do.
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:
        hint = ""
        if args.command == "train" and not args.prepare_only:
            hint = " (training keeps its last finished epoch: run the same command with --resume to continue)"
        print(f"interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as e:
        disk = _disk_error(e)
        if disk is not None:
            # The machine's state, not a bug: say what and where.
            where = f": {disk.filename}" if disk.filename else ""
            print(f"error: cannot write ({disk.strerror}){where}", file=sys.stderr)
            return EXIT_USAGE
        if os.environ.get("DERMSIGHT_DEBUG"):
            raise
        print(
            f"internal error: {type(e).__name__}: {e}\n(this is a bug; set DERMSIGHT_DEBUG=1 for the traceback "
            "and report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
