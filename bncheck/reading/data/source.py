"""What every kind of sample data yields: a ``DataSource`` (batches plus what the report says
about them), and ``prefetched``, which produces batches one step ahead of the model."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import Tensor

from bncheck.config import DataSettings

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
TENSOR_EXTENSIONS = {".pt", ".pth", ".npy", ".npz"}
Batch = tuple[Tensor, Optional[Tensor]]


@dataclass
class DataSource:
    """Batches for ``analyze`` plus what the report says about them."""

    batches: Callable[[], Iterator[Batch]]
    planned_samples: int
    skipped: list[str]
    """Files that could not be read (filled while iterating)."""
    planned_request: Optional[int] = None
    """Samples asked for (batch_size x num_batches; None: all)."""
    kind: str = "tensor"
    """``images`` (transforms applied) or ``tensor`` (fed as stored)."""
    notes: list[str] = field(default_factory=list)
    """Things the user should know about how the data was read."""
    smallest_side: Optional[int] = None
    """Shorter side of the smallest image read, before transforms (filled while iterating)."""
    sharded: Optional[Callable[[int, int], Iterator[Batch]]] = None
    """``sharded(rank, size)``: batches ``rank, rank + size, ...`` without reading the others."""

    def batches_for(self, world: Any) -> Iterator[Batch]:
        """This process's batches: all of them, or its share under torchrun."""
        if not world.active:
            return self.batches()
        if self.sharded is not None:
            return self.sharded(world.rank, world.size)
        return world.shard(self.batches())

    def describe(self, cfg: DataSettings, sources: Optional[dict[str, str]] = None) -> str:
        """The preprocessing applied, each setting with where it came from."""
        if self.kind == "pipeline":
            return "batches from your pipeline, fed to the model as yielded (its own transforms)"
        if self.kind != "images":
            return "tensor file fed to the model as stored (no transforms)"
        src = sources or {}

        def where(key: str) -> str:
            return f" ({src[key]})" if key in src else ""

        resize = f"resize shorter side to {cfg.resize}" if cfg.resize is not None else "no resize"
        crop = f"centre-crop {cfg.crop}" if cfg.crop is not None else "no crop"
        mean = "[" + ", ".join(f"{v:g}" for v in cfg.mean) + "]"
        std = "[" + ", ".join(f"{v:g}" for v in cfg.std) + "]"
        return (f"{resize}{where('resize')}, {crop}{where('crop')}, scale to 0..1, normalize mean {mean}"
                f"{where('mean')} std {std}{where('std')}, {cfg.channels}{where('channels')}")

    def upscale_warning(self, cfg: DataSettings) -> Optional[str]:
        """A warning when transforms blew small images up (e.g. 32x32 digits resized to 256)."""
        small = self.smallest_side
        if self.kind != "images" or small is None:
            return None
        target = cfg.resize if cfg.resize is not None else cfg.crop
        if target is None or target < 2 * small:
            return None
        return (f"images as small as {small} px were upscaled to {target} px ({target / small:.0f}x) by "
                f"data.{'resize' if cfg.resize is not None else 'crop'}; if the model was trained at their own "
                "size, pass --resize none --crop none (or the training size)")


def prefetched(batches: Iterator[Batch], depth: int = 1) -> Iterator[Batch]:
    """``batches`` produced one step ahead by a background thread (decode overlaps the model's
    forward passes); errors surface where the batch would have been; stopping early stops it."""
    import queue
    import threading

    slots: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        slots.put((batch, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:  # handed to the consumer
            slots.put((None, exc))
            return
        slots.put((done, None))

    worker = threading.Thread(target=produce, name="bncheck-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            batch, error = slots.get()
            if error is not None:
                raise error
            if batch is done:
                return
            yield batch
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                slots.get_nowait()
            except queue.Empty:
                pass
            worker.join(timeout=0.05)
