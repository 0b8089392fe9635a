"""The user's own pipeline: ``--data module:callable`` or ``file.py:callable`` returning a
DataLoader, any iterable of batches, or one tensor."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

from torch import Tensor

from bncheck.errors import InputError, first_line
from bncheck.reading.data.source import DataSource
from bncheck.reading.untrusted import code_spec

UNSIZED_SAMPLES = 4096
"""Samples read from a pipeline with no length when "every sample" is asked for (``fix``):
precise BN needs 10^3-10^4 samples, and an endless iterable must not run forever."""


def is_callable_spec(text: str) -> bool:
    """``package.module:callable`` or ``path/to/file.py:callable`` (not a path that exists)."""
    return code_spec(text)


def callable_source(spec: str, batch_size: int, num_batches: Optional[int]) -> DataSource:
    """Batches from the user's own pipeline: ``spec`` names a function returning a DataLoader,
    any iterable of batches (tensors, ``(inputs, labels)``, dicts, lists of images) or one
    tensor holding the sample. It is called once, with ``batch_size=`` when it takes it."""
    import inspect

    from bncheck.measuring.batches import iter_batches
    from bncheck.reading.architectures import load_callable

    factory = load_callable(spec, "$data")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    kwargs = {"batch_size": batch_size} if "batch_size" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) else {}
    try:
        data = factory(**kwargs)
    except Exception as exc:
        raise InputError(f"$data {spec}: calling it raised {type(exc).__name__}: {first_line(exc)}") from None
    if isinstance(data, (str, bytes)) or not (isinstance(data, (Tensor, tuple)) or hasattr(data, "__iter__")):
        raise InputError(
            f"$data {spec} returned {type(data).__name__}; return a DataLoader, an iterable of batches or a tensor"
        )
    dataset = getattr(data, "dataset", None)
    size = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
    if isinstance(data, Tensor):
        size = data.shape[0] if data.dim() else None
    if size is None and num_batches is None and not isinstance(data, (list, tuple)):
        # "every sample" of a pipeline with no length may never end (an infinite sampler, a stream)
        num_batches = -(-UNSIZED_SAMPLES // batch_size)
        unsized_note = (f"$data {spec} has no length: read its first {num_batches * batch_size} samples "
                        "(--num-samples N reads another number)")
    else:
        unsized_note = None
    planned = batch_size * num_batches if num_batches is not None else size or batch_size
    if size is not None:
        planned = min(planned, size)
    used: list[bool] = []

    def batches() -> Iterator[Any]:
        if used:  # a generator or loader consumed once cannot be replayed
            raise InputError(f"$data {spec} was already consumed; return a DataLoader or list, not a generator")
        used.append(True)
        yield from iter_batches(data, batch_size=batch_size, num_batches=num_batches)

    source = DataSource(batches=batches, planned_samples=planned, skipped=[], kind="pipeline",
                        planned_request=None if num_batches is None else batch_size * num_batches)
    if unsized_note:
        source.notes.append(unsized_note.replace("$data", "--data"))
    return source
