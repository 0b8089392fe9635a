"""Runs across processes (``torchrun``) and inside a user's DDP job.

Rank ``r`` of ``N`` takes batches ``r, r+N, r+2N, ...`` of the sample one process would use;
what the passes pool is merged across ranks in float64, in rank order, so every rank holds
the single-process result (to float64 reduction order) and takes the same decisions after
it -- every later collective is reached by every rank. A rank that fails tells the others at
the next agreement point: all ranks then raise one error naming the rank, never a hang.

Nothing here runs when ``torch.distributed`` is not initialized (``World(0, 1)``).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from datetime import timedelta
from typing import Any, Callable, Optional, TypeVar

import torch
from torch import Tensor

from bncheck.errors import BncheckError, InputError, InternalError, UsageError

T = TypeVar("T")
TIMEOUT_S = 600
"""How long a collective waits for a rank before every rank fails (``BNCHECK_DIST_TIMEOUT``)."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Iterable[T]) -> Iterator[T]:
        """This rank's items: ``rank, rank + size, ...`` (all of them when not distributed)."""
        return itertools.islice(items, self.rank, None, self.size) if self.active else iter(items)

    def gather(self, value: Any) -> list[Any]:
        """``value`` from every rank, in rank order (``[value]`` when not distributed)."""
        if not self.active:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        self.collective("gathering results", lambda: dist.all_gather_object(out, value))
        return out

    def collective(self, what: str, call: Callable[[], Any]) -> Any:
        """Run one collective. Each rank first marks its arrival in the process group's store,
        so when the collective times out (a rank hung or died) the error names the ranks that
        never arrived instead of surfacing as an internal error after the backend's timeout."""
        global _COLLECTIVES
        _COLLECTIVES += 1
        store = _store()
        key = f"bncheck/arrived/{_COLLECTIVES}/"
        if store is not None:
            store.set(key + str(self.rank), "1")
        try:
            return call()
        except Exception as exc:
            if not _timed_out(exc):
                raise
            missing = [] if store is None else [r for r in range(self.size) if not _arrived(store, key + str(r))]
            who = (f"rank {', '.join(map(str, missing))} of {self.size}" if missing
                   else f"a rank of {self.size}")
            raise RankTimeoutError(
                f"{who} did not arrive for {what} within {_timeout_s()} s (it hung or died; this is rank "
                f"{self.rank}); every rank stopped: find why that rank stalled (its data pipeline, its GPU), "
                "or wait longer with BNCHECK_DIST_TIMEOUT=SECONDS"
            ) from None

    def agree(self, error: Optional[BaseException]) -> None:
        """Every rank reports whether its part failed; if any did, every rank raises: the failed
        rank its own error, the others one naming it."""
        if not self.active:
            if error is not None:
                raise error
            return
        report = None if error is None else _describe(error)
        reports = self.gather(report)
        failed = [(rank, r) for rank, r in enumerate(reports) if r is not None]
        if not failed:
            return
        if error is not None:
            raise error
        rank, (kind, message) = failed[0]
        cls = {"usage": UsageError, "input": InputError}.get(kind, InternalError)
        raise cls(f"rank {rank} of {self.size} failed: {message}")


class RankTimeoutError(InputError):
    """A rank of a torchrun job never reached a collective in time (exit 3, the rank named)."""


_COLLECTIVES = 0
"""Collectives this process entered (every rank enters the same ones in the same order)."""


def _timeout_s() -> int:
    try:
        return int(os.environ.get("BNCHECK_DIST_TIMEOUT", TIMEOUT_S))
    except ValueError:
        return TIMEOUT_S


def _store() -> Any:
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except Exception:  # no store (another launcher): the timeout still reads as one, unnamed
        return None


def _arrived(store: Any, key: str) -> bool:
    try:
        return bool(store.check([key]))
    except Exception:
        return False


def _timed_out(error: BaseException) -> bool:
    text = str(error).lower()
    return "timed out" in text or "timeout" in text or type(error).__name__ == "DistBackendError"


def _describe(error: BaseException) -> tuple[str, str]:
    if isinstance(error, UsageError):
        return "usage", error.template
    if isinstance(error, InputError):
        return "input", error.template
    if isinstance(error, BncheckError):
        return "internal", error.template
    text = str(error).splitlines()[0] if str(error) else ""
    return "internal", f"{type(error).__name__}: {text}".replace("$", "$$")


def current() -> World:
    """The process group that exists (a user's DDP job, or one ``init_from_env`` made)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def launched() -> bool:
    """Started by torchrun (or another launcher that sets the env:// variables) with N > 1."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        return False


def init_from_env(device_type: str) -> World:
    """Join the process group torchrun describes: gloo on CPU, nccl on CUDA (each rank on
    ``cuda:LOCAL_RANK``). A no-op when not launched or already initialized."""
    import torch.distributed as dist

    if not launched() or (dist.is_available() and dist.is_initialized()):
        return current()
    if not dist.is_available():
        raise UsageError("this torch build has no torch.distributed; run bncheck as one process")
    timeout = timedelta(seconds=_timeout_s())
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timeout)
    return current()


def local_device(device: str) -> str:
    """``cuda`` means this rank's GPU under torchrun."""
    if device == "cuda" and launched():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def to_cpu(value: Any) -> Any:
    """Tensors (also inside dataclass fields, dicts, lists) moved to the host for pickling."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):  # a copy keeps the mapping's type (a Counter stays a Counter)
        out = value.copy()
        for key, item in value.items():
            out[key] = to_cpu(item)
        return out
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


def merge_moments(parts: list[Any], device: Any) -> Any:
    """One ``ChannelMoments`` from each rank's (None where a rank saw nothing), merged in rank
    order onto ``device``."""
    from bncheck.judging.metrics import ChannelMoments

    present = [p for p in parts if p is not None and p.values > 0]
    if not present:
        return next((p for p in parts if p is not None), None)
    merged = ChannelMoments(present[0].channels, device=device)
    for part in present:
        merged.merge(part)
    return merged


def moments_on(moments: Any, device: Any) -> Any:
    """A copy of a ``ChannelMoments`` on ``device`` (None stays None)."""
    if moments is None:
        return None
    from bncheck.judging.metrics import ChannelMoments

    out = ChannelMoments(moments.channels, device=torch.device(device))
    for f in fields(moments):
        value = getattr(moments, f.name)
        if f.name != "device":
            setattr(out, f.name, value.detach().to(device) if isinstance(value, Tensor) else value)
    return out


# --- declared state: each pooled quantity says how it reduces across ranks ------------------
# (as torchmetrics' add_state(..., dist_reduce_fx=...)): a dataclass field made with
# ``pooled(how)`` is reduced by ``REDUCTIONS[how]`` (or by ``how`` itself when it is callable)
# over the ranks' values in rank order; ``pool`` gathers a whole dataclass once and rebuilds it.

def _first(values: list[Any]) -> Any:
    return next((v for v in values if v is not None), None)


def _concatenated(values: list[Any]) -> list[Any]:
    return [item for value in values for item in value]


def _summed(values: list[Any]) -> Any:
    return sum(values[1:], values[0])  # numbers, and Counters (per-class tallies) alike


def _min_present(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def _moments(values: list[Any]) -> Any:
    return merge_moments(values, torch.device("cpu"))


def _concatenated_by_key(values: list[dict]) -> dict:
    merged: dict = {}
    for value in values:
        for key, items in value.items():
            merged.setdefault(key, []).extend(items)
    return merged


REDUCTIONS: dict[str, Callable[[list[Any]], Any]] = {
    "sum": _summed, "max": max, "min": _min_present, "any": any, "cat": _concatenated, "first": _first,
    "moments": _moments, "cat-by-key": _concatenated_by_key,
}


def pooled(how: Any, **kwargs: Any) -> Any:
    """A dataclass field that pools across ranks by ``how`` (a name in ``REDUCTIONS``, or a
    function of the ranks' values)."""
    if not callable(how) and how not in REDUCTIONS:
        raise ValueError(f"unknown reduction {how!r}")
    return field(metadata={"pooled": how}, **kwargs)


def combine(parts: list[Any]) -> Any:
    """One instance from the ranks' instances of a dataclass whose fields are all ``pooled``."""
    cls = type(parts[0])
    values = {}
    for f in fields(cls):
        how = f.metadata.get("pooled")
        if how is None:
            raise TypeError(f"{cls.__name__}.{f.name} does not say how it pools across ranks")
        reduce = how if callable(how) else REDUCTIONS[how]
        values[f.name] = reduce([getattr(p, f.name) for p in parts])
    return cls(**values)


def pool(world: World, state: Any) -> Any:
    """``state`` (a dataclass of ``pooled`` fields) reduced over every rank; itself alone."""
    if not world.active:
        return state
    on_host = type(state)(**{f.name: to_cpu(getattr(state, f.name)) for f in fields(state)})
    return combine(world.gather(on_host))


@dataclass
class SampleCounts:
    """What one rank saw of the sample, pooled over ranks."""

    samples: int = pooled("sum", default=0)
    batches: int = pooled("sum", default=0)
    largest: int = pooled("max", default=0)
    any_labels: bool = pooled("any", default=False)
    input_shape: Optional[tuple] = pooled("first", default=None)
    labels_per_batch: list = pooled("cat", default_factory=list)


@dataclass
class LayerPart:
    """What one rank's statistics pass learned about one BN layer."""

    train: Any = pooled("moments", default=None)
    eval: Any = pooled("moments", default=None)
    depth: Optional[int] = pooled("min", default=None)
    train_calls: int = pooled("sum", default=0)


@dataclass
class PassPart:
    """One rank's statistics pass: every layer's part, and the per-batch means per layer."""

    layers: list = pooled(lambda parts: [combine(list(layer)) for layer in zip(*parts)], default_factory=list)
    batch_means: dict = pooled("cat-by-key", default_factory=dict)


def pool_stats(world: World, stats: Any, device: torch.device) -> None:
    """Every layer's moments, depth and call counts, and the per-batch means, pooled over ranks
    (in rank order); the moments end up on ``device``."""
    cpu = torch.device("cpu")
    mine = PassPart([LayerPart(moments_on(e.train, cpu), moments_on(e.eval, cpu), e.depth, e.train_calls)
                     for e in stats.stats], stats.batch_means)
    everyone = pool(world, mine)
    for entry, part in zip(stats.stats, everyone.layers):
        entry.train, entry.eval = moments_on(part.train, device), moments_on(part.eval, device)
        entry.depth, entry.train_calls = part.depth, part.train_calls
    stats.batch_means = everyone.batch_means


def rank_divergence(world: World, layers: list[Any]) -> list[tuple[str, list[tuple[int, float]]]]:
    """Per BN layer, the ranks whose running statistics differ from rank 0's and by how much:
    the RMS over channels of ``sqrt(shift^2 + (scale - 1)^2)`` with the shift in rank 0's
    running stds and the scale the ratio of running stds (the layer score's formula between
    two sets of buffers). Only layers that differ anywhere are listed."""
    if not world.active:
        return []
    mine = [
        (layer.running_mean.detach().double().cpu(), layer.running_var.detach().double().cpu())
        if layer.running_mean is not None and layer.running_var is not None else None
        for layer in layers
    ]
    everyone = world.gather(mine)
    out = []
    for index, layer in enumerate(layers):
        reference = everyone[0][index]
        if reference is None:
            continue
        mean0, var0 = reference
        eps = float(getattr(layer, "eps", 1e-5) or 1e-5)
        differing = []
        for rank in range(1, world.size):
            other = everyone[rank][index]
            if other is None or (torch.equal(other[0], mean0) and torch.equal(other[1], var0)):
                continue
            std0 = (var0 + eps).sqrt()
            shift = (other[0] - mean0) / std0
            scale = (other[1] + eps).sqrt() / std0
            score = float(((shift**2 + (scale - 1) ** 2).mean()).sqrt())
            differing.append((rank, score if math.isfinite(score) else math.inf))
        if differing:
            out.append((layer.name, differing))
    return out


def broadcast_buffers_from_main(world: World, layers: list[Any]) -> None:
    """Every rank takes rank 0's BN buffers (for a run whose report describes rank 0's model)."""
    if not world.active:
        return
    import torch.distributed as dist

    for layer in layers:
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            tensor = layer.buffer(name)
            if tensor is None:
                continue
            values = [tensor.detach().cpu()]
            world.collective("rank 0's BN buffers", lambda values=values: dist.broadcast_object_list(values, src=0))
            with torch.no_grad():
                tensor.copy_(values[0].to(tensor))
