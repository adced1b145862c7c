"""Writing files safely: into a temporary file beside the target, then renamed onto it (`os.replace` is atomic), so
an interrupted or failed write never leaves a half-written file under the real name."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _naming(e: OSError, path: Path) -> OSError:
    """``e`` about the file the user named rather than the temporary one beside it, which they never heard of."""
    return type(e)(e.errno, e.strerror, str(path)) if e.errno is not None else e


@contextmanager
def written_atomically(path: Path, suffix: str = ".tmp") -> Iterator[str]:
    """Yields the name of a new file beside ``path`` to write; when the block ends without an exception, that file
    becomes ``path``. It is removed whatever happens.

    The result gets the permissions a plain ``open()`` would give (0666 less the umask), set after writing because
    some writers replace the file: a temporary file is 0600, and a model or ONNX file renamed from one could not be
    read by anyone else, a web server's user included.
    """
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    except OSError as e:
        raise _naming(e, path) from None
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def temp_folder_beside(path: Path) -> Path:
    """A new, empty folder beside ``path`` to fill and then rename onto it, with a plain ``mkdir``'s permissions
    (`tempfile.mkdtemp` makes 0700)."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as e:
        raise _naming(e, path) from None
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp
