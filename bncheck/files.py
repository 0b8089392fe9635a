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
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a saved model is as readable as any new file
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_output_folder(out: Path, source: Path, *, force: bool) -> None:
    """As ``check_output_path``, for a model folder written as a new folder."""
    out = Path(out)
    if out.resolve() == Path(source).resolve() or (out.exists() and os.path.samefile(out, source)):
        raise InputError(f"$out {out} is the input folder; bncheck never overwrites its input: choose a new path")
    if Path(source).resolve() in out.resolve().parents:
        raise InputError(f"$out {out} is inside the input folder; choose a path outside it")
    if out.exists() and not out.is_dir():
        raise InputError(f"$out {out} is a file; a model folder writes a folder: choose a new path")
    if out.exists() and not force:
        raise InputError(f"$out {out} already exists; choose a new path or pass $force to replace it")
    if not out.parent.exists():
        raise InputError(f"the folder of $out {out} does not exist; create {out.parent} first")


def atomic_write_folder(target: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(staging_path)`` (a path that does not exist yet), then rename the finished
    folder to ``target`` (an existing ``target`` is swapped out first and removed). On any
    error the staging folder is removed and ``target`` is untouched."""
    import shutil

    target = Path(target)
    try:
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:
        raise UsageError(f"cannot write to {target.parent}: {exc.strerror}; choose another path") from None
    try:
        staging = scratch / "new"
        write(staging)
        for path in staging.rglob("*"):
            if path.is_file():
                os.chmod(path, 0o666 & ~_umask())
        if target.exists():
            os.replace(target, scratch / "old")
        os.replace(staging, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
