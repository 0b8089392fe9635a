"""Writing files without ever leaving half of one: a temporary file beside the target,
then an atomic rename (pip's ``adjacent_tmp_file`` + ``os.replace``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

from .errors import InputError, UsageError


def check_output_path(out: Path, source: Optional[Path], *, force: bool) -> None:
    """Refuse before any work is done: the input itself as the output, an existing file
    without ``force``, a folder, or a missing parent folder."""
    out = Path(out)
    if source is not None and out.exists() and Path(source).exists() and os.path.samefile(out, source):
        raise InputError(f"$out {out} is the input checkpoint; bncheck never overwrites its input: choose a new path")
    if source is not None and out.resolve() == Path(source).resolve():
        raise InputError(f"$out {out} is the input checkpoint; bncheck never overwrites its input: choose a new path")
    if out.is_dir():
        raise InputError(f"$out {out} is a directory; give a file path")
    if out.exists() and not force:
        raise InputError(f"$out {out} already exists; choose a new path or pass $force to replace it")
    if not out.parent.exists():
        raise InputError(f"the folder of $out {out} does not exist; create {out.parent} first")


def atomic_write(target: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(temporary_path)``, then rename the result over ``target``. On any error
    (or an interrupt) the temporary file is removed and ``target`` is untouched."""
    target = Path(target)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise UsageError(f"cannot write to {target.parent}: {exc.strerror}; choose another path") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
