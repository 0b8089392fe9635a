"""Writing files that can never destroy data, and never leaves half of one.

Every write goes to a temporary file (or folder) beside the target, then an atomic rename
(pip's ``adjacent_tmp_file`` + ``os.replace``). What a rename may replace is narrow:

- a regular file (never a device, FIFO or socket: ``--json /dev/null`` as root would replace
  the machine's ``/dev/null`` with a file); checked before any work and again at the rename;
- a folder only when bncheck wrote it (it carries ``OUTPUT_MARK``) and only with ``force``:
  ``fix --out EXISTING_DIR --force`` never deletes a folder the user made;
- never an input, a path inside an input folder, or a folder that holds an input.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Optional, Union

from bncheck.errors import InputError, UsageError

PathLike = Union[str, Path]

OUTPUT_MARK = ".bncheck-output"
"""The file bncheck puts in every folder it writes: only such a folder is ever replaced."""
_MARK_TEXT = "This folder was written by bncheck; `bncheck fix --force` may replace it.\n"


def _resolved(path: PathLike) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def _inside(path: PathLike, folder: PathLike) -> bool:
    """``path`` is ``folder`` or lies under it, links resolved."""
    inner, outer = _resolved(path), _resolved(folder)
    return inner == outer or outer in inner.parents


def special_kind(path: PathLike) -> Optional[str]:
    """What a path that is neither a regular file nor a folder is ("a device", ...), or None
    (also None when nothing is there). Links are followed: a link to /dev/null is a device."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"


def written_by_bncheck(folder: PathLike) -> bool:
    """A real folder (not a link) holding bncheck's mark."""
    folder = Path(folder)
    return folder.is_dir() and not folder.is_symlink() and (folder / OUTPUT_MARK).is_file()


def mark_folder(folder: PathLike) -> None:
    (Path(folder) / OUTPUT_MARK).write_text(_MARK_TEXT, encoding="utf-8")


STATE_FOLDER = ".bncheck"
"""bncheck's own folder (the saved run): no reader of checkpoints or data looks into it."""


def _own_folder(out: PathLike, folder: PathLike) -> bool:
    """``out`` lies in a ``.bncheck`` folder below ``folder`` (``--data .`` with the default save)."""
    relative = _resolved(out).relative_to(_resolved(folder))
    return STATE_FOLDER in relative.parts[:-1]


def input_conflict(out: PathLike, inputs: Mapping[str, Optional[PathLike]]) -> Optional[str]:
    """Why writing ``out`` could touch an input (``{"the input checkpoint": path, ...}``): it is
    one, lies inside an input folder, or is a folder that holds one; None when it cannot."""
    for what, source in inputs.items():
        if source is None or str(source) == "-" or not Path(source).exists():
            continue
        if _same_file(Path(out), Path(source)):
            return f"is {what}; bncheck never overwrites its inputs"
        if Path(source).is_dir() and _inside(out, source) and not _own_folder(out, source):
            return f"is inside {what} ({source}); bncheck never writes into its inputs"
        if _inside(source, out):
            return f"holds {what} ({source}); bncheck never replaces a folder that holds its inputs"
    return None


def check_output_path(out: Path, source: Optional[Path], *, force: bool,
                      inputs: Optional[Mapping[str, Optional[PathLike]]] = None) -> None:
    """Refuse before any work is done: an input (or a path inside one) as the output, an
    existing file without ``force``, anything but a regular file, or a missing parent folder."""
    out = Path(out)
    conflict = input_conflict(out, {"the input checkpoint": source, **(inputs or {})})
    if conflict:
        raise InputError(f"$out {out} {conflict}: choose a new path")
    if out.is_dir():
        raise InputError(f"$out {out} is a directory; give a file path")
    kind = special_kind(out)
    if kind:
        raise InputError(f"$out {out} is {kind}, not a file; bncheck replaces only regular files: choose a new path")
    if (out.exists() or out.is_symlink()) and not force:
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
        if _resolved(a) == _resolved(b):
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(outputs: Mapping[str, Optional[PathLike]], inputs: Mapping[str, Optional[PathLike]],
                  *, optional: tuple[str, ...] = (), folders: tuple[str, ...] = ()) -> list[str]:
    """Refuse, before any work, an output (``{"--json": path, ...}``; ``-`` is stdout) that is
    one of the inputs (``{"the input checkpoint": path, ...}``) or lies inside one, another
    output, a folder, a device/FIFO/socket, or cannot be written. Outputs named in ``optional``
    (``--save``) only warn: the returned messages. Outputs named in ``folders`` write a folder
    (``fix --out`` of a model folder)."""
    warnings: list[str] = []
    seen: dict[str, Path] = {}
    for flag, target in outputs.items():
        if target is None or str(target) == "-":
            continue
        path = Path(target)
        conflict = input_conflict(path, inputs)
        if conflict:
            raise UsageError(f"{flag} {path} {conflict}: choose another path")
        for other, other_path in seen.items():
            if _same_file(path, other_path):
                raise UsageError(f"{other} and {flag} both write {path}; give each its own path")
        seen[flag] = path
        kind = special_kind(path)
        if kind:
            problem = f"{path} is {kind}, not a file (bncheck replaces only regular files; '-' is stdout)"
        elif path.is_dir() and flag not in folders:
            problem = f"{path} is a folder"
        else:
            problem = unwritable(path)
        if problem:
            message = f"cannot write {WHAT.get(flag, flag)} to {path}: {problem}; choose another path"
            if flag in optional:
                warnings.append(message)
            else:
                raise UsageError(message)
    return warnings


def _check_replaceable(target: Path) -> None:
    """At the rename: what sits at ``target`` now may be replaced (nothing, a regular file or
    a link). A device or FIFO put there after the checks is never replaced."""
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
        return
    what = "a folder" if stat.S_ISDIR(mode) else special_kind(target) or "not a regular file"
    raise UsageError(f"{target} is {what} now; bncheck replaces only regular files: nothing was written")


def atomic_write(target: Path, write: Callable[[Path], None], *, exclusive: bool = False) -> None:
    """Call ``write(temporary_path)``, then rename the result over ``target``. On any error
    (or an interrupt, SIGTERM included: the CLI turns it into an exception) the temporary file
    is removed and ``target`` is untouched. ``exclusive``: fail instead of replacing a file
    that appeared at ``target`` while writing (a hard link claims the name atomically).
    Only a regular file (or nothing) at ``target`` is ever replaced."""
    target = Path(target)
    _check_replaceable(target)
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
            _check_replaceable(target)
            os.replace(tmp, target)
    except OSError as exc:  # a full disk, a folder gone read-only: the old target stays as it was
        raise _write_failed(target, exc) from None
    except (InputError, UsageError):
        raise
    except Exception as exc:  # torch.save (RuntimeError) and safetensors (SafetensorError) report ENOSPC their way
        if not _is_write_failure(exc, target.parent):
            raise
        raise _write_failed(target, exc) from None
    finally:
        tmp.unlink(missing_ok=True)


def _is_write_failure(exc: BaseException, folder: Optional[Path] = None) -> bool:
    """torch's and safetensors' writers report a failed write (a full disk) in their own
    exception types (torch.save: "unexpected pos" from its zip writer); their text says so, or
    the folder being written has no room left."""
    text = str(exc)
    if any(sign in text for sign in ("file write failed", "PytorchStreamWriter failed", "No space left",
                                     "Disk quota", "Errno 28", "code: 28", "StorageFull", "I/O error",
                                     "unexpected pos")):
        return True
    if folder is not None:
        import shutil

        try:
            return shutil.disk_usage(folder).free < 1024 * 1024
        except OSError:
            return False
    return False


def _write_failed(target: Path, exc: BaseException) -> UsageError:
    reason = getattr(exc, "strerror", None) or "the write failed (is the disk full?)"
    return UsageError(f"cannot write {target}: {reason}; free space or choose another path (nothing was replaced)")


def _claim(tmp: Path, target: Path) -> None:
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise InputError(f"{target} appeared while bncheck was writing it; nothing was replaced: rerun, or pass "
                         "$force to replace it") from None
    except OSError:  # a file system without hard links: the check and the rename, as close as they get
        if target.exists() or target.is_symlink():
            raise InputError(f"{target} appeared while bncheck was writing it; nothing was replaced") from None
        os.replace(tmp, target)


def check_output_folder(out: Path, source: Path, *, force: bool,
                        inputs: Optional[Mapping[str, Optional[PathLike]]] = None) -> None:
    """As ``check_output_path``, for a model folder written as a new folder. An existing
    ``out`` is replaced only with ``force`` and only when bncheck wrote it (``OUTPUT_MARK``)."""
    out = Path(out)
    conflict = input_conflict(out, {"the input folder": source, **(inputs or {})})
    if conflict:
        raise InputError(f"$out {out} {conflict}: choose a new path")
    kind = special_kind(out)
    if kind or (out.exists() and not out.is_dir()):
        raise InputError(f"$out {out} is {kind or 'a file'}; a model folder writes a folder: choose a new path")
    if out.is_symlink():
        raise InputError(f"$out {out} is a link; bncheck replaces only folders it wrote: choose a new path")
    if out.exists() and not force:
        raise InputError(f"$out {out} already exists; choose a new path or pass $force to replace it")
    if out.exists() and not written_by_bncheck(out):
        raise InputError(f"$out {out} is a folder bncheck did not write (no {OUTPUT_MARK} in it); bncheck replaces "
                         "only folders it wrote, even with $force: choose a new path")
    if not out.parent.exists():
        raise InputError(f"the folder of $out {out} does not exist; create {out.parent} first")
    problem = unwritable(out)
    if problem:
        raise InputError(f"cannot write $out {out}: {problem}; choose another path")


def atomic_write_folder(target: Path, write: Callable[[Path], None], *, replace_existing: bool = True) -> None:
    """Call ``write(staging_path)`` (a path that does not exist yet), mark the finished folder
    as bncheck's, then rename it to ``target``. An existing ``target`` is swapped out and
    removed only when bncheck wrote it (checked again here, at the rename). On any error the
    staging folder is removed and ``target`` is untouched."""
    import shutil

    target = Path(target)
    try:
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:
        raise UsageError(f"cannot write to {target.parent}: {exc.strerror}; choose another path") from None
    try:
        staging = scratch / "new"
        write(staging)
        mark_folder(staging)
        for path in staging.rglob("*"):
            if path.is_file() and not path.is_symlink():
                os.chmod(path, 0o666 & ~_umask())
        if target.exists() or target.is_symlink():
            if not replace_existing:
                raise InputError(f"{target} appeared while bncheck was writing it; nothing was replaced")
            if not written_by_bncheck(target):
                raise InputError(f"{target} is not a folder bncheck wrote; nothing was replaced")
            os.replace(target, scratch / "old")
        os.replace(staging, target)
    except OSError as exc:  # a full disk while copying the folder: the old target stays as it was
        raise _write_failed(target, exc) from None
    except (InputError, UsageError):
        raise
    except Exception as exc:
        if not _is_write_failure(exc, target.parent):
            raise
        raise _write_failed(target, exc) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_SIGNATURES = (b'"schema": "bncheck/', b"<title>bncheck", b"bncheck: ", b'name="bncheck"')
"""What the first bytes of each file bncheck writes carry (JSON, HTML, Markdown, JUnit)."""


def report_written_by_bncheck(path: Path) -> bool:
    """A file whose first 4 KB carry the signature of a report or saved run bncheck writes."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return any(sign in head for sign in _SIGNATURES)


def check_config_output(value: str, key: str, config_path: Path, *, force: bool) -> None:
    """An output path named by a config file: relative, inside the working directory (links
    resolved), and replacing an existing file only with ``--force`` or when bncheck wrote it."""
    from bncheck.reading.untrusted import shown

    path = Path(value)
    where = f"config file {config_path} sets '{key}: {shown(value)}'"
    if value == "-":
        return
    if path.is_absolute() or value.startswith("~") or ".." in path.parts:
        raise UsageError(f"{where}, outside the working directory; a config writes only below it: give the path "
                         "as a flag instead")
    if not _inside(path, Path.cwd()):
        raise UsageError(f"{where}, which links outside the working directory; give the path as a flag instead")
    if (path.exists() or path.is_symlink()) and not force and not (path.is_file() and report_written_by_bncheck(path)):
        raise UsageError(f"{where}, an existing file that bncheck did not write; pass --force to replace it, or "
                         "choose another path")
