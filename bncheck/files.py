"""Writing files without ever leaving half of one: a temporary file beside the target,
then an atomic rename (pip's ``adjacent_tmp_file`` + ``os.replace``)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Optional, Union

from bncheck.errors import InputError, UsageError

PathLike = Union[str, Path]


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
    problem = unwritable(out)
    if problem:
        raise InputError(f"cannot write $out {out}: {problem}; choose another path")


def unwritable(target: Path) -> Optional[str]:
    """Why a file cannot be created at ``target`` (its folder, or the nearest folder above it
    that exists, refuses a new file), or None. Probed with a real temporary file, so read-only
    mounts and root's permissions are judged as the write will be -- before any compute."""
    folder = Path(target).parent
    while not folder.exists():
        if folder.parent == folder:
            return "no folder above it exists"
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a folder"
    try:
        fd, name = tempfile.mkstemp(prefix=".bncheck-probe.", dir=folder)
    except OSError as exc:
        return f"{folder} is not writable ({exc.strerror})"
    os.close(fd)
    os.unlink(name)
    return None


WHAT = {"--json": "the json report", "--markdown": "the markdown report", "--html": "the html report",
        "--junit": "the junit report", "--save": "the run", "--out": "$out"}
"""What each output flag writes, for messages."""


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(outputs: Mapping[str, Optional[PathLike]], inputs: Mapping[str, Optional[PathLike]],
                  *, optional: tuple[str, ...] = (), folders: tuple[str, ...] = ()) -> list[str]:
    """Refuse, before any work, an output (``{"--json": path, ...}``; ``-`` is stdout) that is
    one of the inputs (``{"the input checkpoint": path, ...}``), another output, a folder, or
    cannot be written. Outputs named in ``optional`` (``--save``) only warn: the returned
    messages. Outputs named in ``folders`` write a folder (``fix --out`` of a model folder)."""
    warnings: list[str] = []
    seen: dict[str, Path] = {}
    for flag, target in outputs.items():
        if target is None or str(target) == "-":
            continue
        path = Path(target)
        for what, source in inputs.items():
            if source is not None and _same_file(path, Path(source)):
                raise UsageError(f"{flag} {path} is {what}; bncheck never overwrites its inputs: choose another path")
        for other, other_path in seen.items():
            if _same_file(path, other_path):
                raise UsageError(f"{other} and {flag} both write {path}; give each its own path")
        seen[flag] = path
        problem = f"{path} is a folder" if path.is_dir() and flag not in folders else unwritable(path)
        if problem:
            message = f"cannot write {WHAT.get(flag, flag)} to {path}: {problem}; choose another path"
            if flag in optional:
                warnings.append(message)
            else:
                raise UsageError(message)
    return warnings


def atomic_write(target: Path, write: Callable[[Path], None], *, exclusive: bool = False) -> None:
    """Call ``write(temporary_path)``, then rename the result over ``target``. On any error
    (or an interrupt, SIGTERM included: the CLI turns it into an exception) the temporary file
    is removed and ``target`` is untouched. ``exclusive``: fail instead of replacing a file
    that appeared at ``target`` while writing (a hard link claims the name atomically)."""
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
        if exclusive:
            _claim(tmp, target)
        else:
            os.replace(tmp, target)
    except OSError as exc:  # a full disk, a folder gone read-only: the old target stays as it was
        raise UsageError(f"cannot write {target}: {exc.strerror or exc}; free space or choose another path") from None
    except RuntimeError as exc:  # torch.save's writer reports a failed write (ENOSPC) as a RuntimeError
        text = str(exc)
        if not any(sign in text for sign in ("file write failed", "PytorchStreamWriter failed", "No space left")):
            raise
        raise UsageError(f"cannot write {target}: the write failed (is the disk full?); free space or choose "
                         "another path") from None
    finally:
        tmp.unlink(missing_ok=True)


def _claim(tmp: Path, target: Path) -> None:
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise InputError(f"{target} appeared while bncheck was writing it; nothing was replaced: rerun, or pass "
                         "$force to replace it") from None
    except OSError:  # a file system without hard links: the check and the rename, as close as they get
        if target.exists():
            raise InputError(f"{target} appeared while bncheck was writing it; nothing was replaced") from None
        os.replace(tmp, target)


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
    problem = unwritable(out)
    if problem:
        raise InputError(f"cannot write $out {out}: {problem}; choose another path")


def atomic_write_folder(target: Path, write: Callable[[Path], None], *, replace_existing: bool = True) -> None:
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
            if not replace_existing:
                raise InputError(f"{target} appeared while bncheck was writing it; nothing was replaced")
            os.replace(target, scratch / "old")
        os.replace(staging, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
