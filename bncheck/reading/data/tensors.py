"""Tensor files (``.pt``, ``.npy``, ``.npz``), fed to the model exactly as stored: ``.npy``
memory-mapped, ``.npz`` members streamed (only the rows used are read), ``.pt`` loaded with
``weights_only``."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from bncheck.errors import InputError, first_line
from bncheck.measuring.batches import INPUT_KEYS, LABEL_KEYS, batch_bounds
from bncheck.reading.data.source import Batch, DataSource


def _load_npz(path: Path, key: Optional[str], rows: Optional[int] = None) -> tuple[Tensor, Optional[Tensor]]:
    """The input array (and labels) of an ``.npz`` archive, only the first ``rows`` samples
    read: each member is streamed and stops after the rows used, so a deflated 10 GB array
    (9.7 MB on disk) costs what two samples cost; ``rows=None`` (every sample, ``fix``) is
    bounded by ``MAX_INFLATED_BYTES``."""
    import zipfile

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(
            f"{path} is not a readable .npz archive ({first_line(exc)}); save it with numpy.savez"
        ) from None
    with archive:  # closes the file on every path out
        members = {info.filename[:-4]: info for info in archive.infolist() if info.filename.endswith(".npy")}
        names = list(members)
        if key is None:
            key = next((k for k in INPUT_KEYS if k in names), names[0] if len(names) == 1 else None)
        if key not in names:
            missing = f"has no array {key!r}; it " if key is not None else ""
            raise InputError(
                f"{path} {missing}holds arrays {', '.join(names) or '(none)'}; pick the input with --data "
                f"{path}:NAME"
            )
        try:
            inputs = _read_npy_rows(archive, members[key], rows, path)
            label_key = next((k for k in LABEL_KEYS if k in names and k != key), None)
            labels = _read_npy_rows(archive, members[label_key], rows, path) if label_key else None
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"cannot read array {key!r} from {path} ({first_line(exc)})") from None
    return inputs, labels


def _read_npy_rows(archive: Any, info: Any, rows: Optional[int], path: Path) -> Tensor:
    """The first ``rows`` rows of one ``.npy`` member, read from its stream (never inflated whole)."""
    import zipfile

    import numpy as np

    from bncheck.reading.untrusted import MAX_COMPRESSION_RATIO, MAX_INFLATED_BYTES

    with archive.open(info) as stream:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(stream)
        if dtype.hasobject:
            raise InputError(f"{path}: array {info.filename} holds Python objects; save numbers only")
        total = shape[0] if shape else 1
        take = total if rows is None else min(rows, total)
        row_items = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        nbytes = take * row_items * dtype.itemsize
        if nbytes > MAX_INFLATED_BYTES:
            raise InputError(
                f"{path}: reading {take} samples of array {info.filename} would inflate {nbytes / 1e9:.1f} GB "
                f"(limit {MAX_INFLATED_BYTES / 1e9:.0f} GB); use fewer samples or save a .npy file (memory-mapped)"
            )
        deflated = info.compress_type != zipfile.ZIP_STORED
        if deflated and nbytes > max(MAX_COMPRESSION_RATIO * info.compress_size, 64 * 1024**2):
            raise InputError(  # a deflate bomb: bounded for every sample (fix) as for the few a run reads
                f"{path}: reading {take} samples of array {info.filename} would inflate {info.compress_size / 1e6:.1f} "
                f"MB on disk to {nbytes / 1e9:.1f} GB (over {MAX_COMPRESSION_RATIO}x: a decompression bomb); "
                "use fewer samples (--num-samples) or save it uncompressed (numpy.savez or .npy)")
        if fortran and len(shape) > 1 and take < total:
            raise InputError(f"{path}: array {info.filename} is stored column-major; save it with np.ascontiguousarray")
        data = bytearray(nbytes)  # read in place: the samples are held once, not three times
        view, filled = memoryview(data), 0
        while filled < nbytes:
            got = stream.readinto(view[filled:])
            if not got:
                break
            filled += got
    if filled < nbytes:
        raise InputError(f"{path}: array {info.filename} is truncated; re-save it with numpy.savez")
    array = np.frombuffer(data, dtype=dtype).reshape((take, *shape[1:]) if shape else (), order="F" if fortran else "C")
    return torch.from_numpy(np.ascontiguousarray(array))


def _load_tensor_file(path: Path, key: Optional[str] = None, rows: Optional[int] = None
                      ) -> tuple[Tensor, Optional[Tensor]]:
    from bncheck.reading.untrusted import check_regular_file, inflation_problem, zip_members

    check_regular_file(path, "data file")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _load_npz(path, key, rows)
    if suffix == ".npy":
        import numpy as np

        try:  # memory-mapped: only the samples used are ever read (a 20 GB array never loads whole)
            array = np.load(path, allow_pickle=False, mmap_mode="r")
        except Exception as exc:
            raise InputError(
                f"{path} is not a readable .npy array ({first_line(exc)}); save it with numpy.save"
            ) from None
        return MappedArray(array), None
    inflating = inflation_problem(zip_members(path))
    if inflating:  # a deflated record would inflate whole, however few samples are used
        raise InputError(f"{path}: {inflating}; torch.save never compresses: re-save the tensor with torch.save")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:  # zip-format files map lazily too: only the tensors' pages that are used are read
                obj: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except (RuntimeError, ValueError):  # legacy (non-zip) torch.save files cannot be mapped
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = first_line(exc, 160)
        raise InputError(f"{path} is not a readable tensor file ({first}); save a tensor with torch.save") from None
    if isinstance(obj, Tensor):
        return obj, None
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(t, Tensor) for t in obj):
        return obj[0], obj[1]
    if isinstance(obj, dict):
        inputs = next((obj[k] for k in INPUT_KEYS if isinstance(obj.get(k), Tensor)), None)
        labels = next((obj[k] for k in LABEL_KEYS if isinstance(obj.get(k), Tensor)), None)
        if inputs is not None:
            return inputs, labels
    raise InputError(
        f"{path} holds a {type(obj).__name__}; save a tensor, an (inputs, labels) pair or a dict "
        "with 'inputs' (and 'labels')"
    )


class MappedArray:
    """A memory-mapped ``.npy`` array that reads rows only when sliced (as tensors)."""

    def __init__(self, array: Any) -> None:
        self.array = array
        self.shape = torch.Size(array.shape)

    def dim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index: slice) -> Tensor:
        import numpy as np

        return torch.from_numpy(np.array(self.array[index]))  # a copy of just these rows


def _count_non_finite(inputs: Any, wanted: int, chunk: int = 4096) -> int:
    """NaN/Inf among the samples used, read in chunks (a mapped file stays mapped)."""
    bad = 0
    for start in range(0, wanted, chunk):
        part = inputs[start:min(start + chunk, wanted)]
        if part.is_floating_point() or part.is_complex():
            bad += int((~torch.isfinite(part)).sum())
    return bad


def tensor_file(path: Path, batch_size: int, num_batches: Optional[int], key: Optional[str] = None) -> DataSource:
    inputs, labels = _load_tensor_file(path, key, None if num_batches is None else batch_size * num_batches)
    if inputs.dim() < 2:
        raise InputError(
            f"{path} holds a tensor of shape {list(inputs.shape)}; it needs a batch dimension "
            "first (N, C, ...), at least 2-D"
        )
    if labels is not None and (labels.dim() == 0 or labels.shape[0] != inputs.shape[0]):
        labels = None  # one label (a class, or a mask) per sample, or none
    total = inputs.shape[0]
    if total < 2:
        raise InputError(f"{path} holds {total} sample; train-mode BN needs at least 2")
    wanted = total if num_batches is None else min(total, batch_size * num_batches)
    bad = _count_non_finite(inputs, wanted)
    if bad:
        raise InputError(f"{path} contains {bad} NaN/Inf values in the samples used; clean the data first")

    def batches() -> Iterator[Batch]:
        for start, stop in batch_bounds(wanted, batch_size):
            yield inputs[start:stop], labels[start:stop] if labels is not None else None

    def sharded(rank: int, size: int) -> Iterator[Batch]:
        for start, stop in batch_bounds(wanted, batch_size)[rank::size]:
            yield inputs[start:stop], labels[start:stop] if labels is not None else None

    return DataSource(
        batches=batches,
        sharded=sharded,
        planned_samples=wanted,
        skipped=[],
        planned_request=None if num_batches is None else batch_size * num_batches,
    )
