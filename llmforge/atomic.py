"""Write outputs atomically: a temp file (or folder) beside the target, renamed into place on success."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import LlmforgeError


def check_output_dir(path: Path, *, file: bool = True) -> None:
    """Raise a clear error when the folder that should hold ``path`` is missing or not writable, or when
    ``path`` is an existing folder where a file should go (``file``) or an existing file where a folder should."""
    if file and path.is_dir():
        raise LlmforgeError(f"output {path} is a folder", hint=f"pass a file path, e.g. {path}/NAME")
    if not file and path.exists() and not path.is_dir():
        raise LlmforgeError(f"output {path} is a file, not a folder", hint="pass a folder path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise LlmforgeError(f"output folder {parent} does not exist", hint="create it or pass another -o path")
    if not os.access(parent, os.W_OK):
        raise LlmforgeError(f"output folder {parent} is not writable", hint="pass another -o path")


# write errors that mean "the output does not fit here": one line, not a traceback
FULL_DISK = {errno.ENOSPC: ("no space left on the device", "free some disk space or write elsewhere with -o"),
             errno.EDQUOT: ("disk quota exceeded", "free some disk space or write elsewhere with -o"),
             errno.EFBIG: ("file size limit reached", "raise the limit (ulimit -f) or write elsewhere with -o")}


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds.

    On any exception the temporary file is removed, so no half-written output is ever left behind.
    """
    target = Path(target)
    check_output_dir(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in FULL_DISK:
            what, hint = FULL_DISK[exc.errno]
            raise LlmforgeError(f"{what} while writing {target}", hint=hint) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Like :func:`atomic_path` for a folder: build it under a temp name, then rename into place.

    An existing ``target`` folder is replaced only after the new one is complete.
    """
    target = Path(target)
    check_output_dir(target, file=False)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or "."))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
