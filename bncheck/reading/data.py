"""Sample data: image folders and tensor files, cut into batches.

Images are read with Pillow and transformed per ``DataSettings`` (resize the shorter
side, centre-crop, scale to 0..1, normalize, channel order). Tensor files are fed to the
model exactly as stored. The sample is a deterministic shuffle (``data.seed``), so the
first batches mix classes instead of holding one class folder.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from bncheck.config import DataSettings
from bncheck.errors import InputError, first_line
from bncheck.measuring.batches import INPUT_KEYS, LABEL_KEYS, batch_bounds

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


def _image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _labels_for(root: Path, files: list[Path]) -> Optional[dict[Path, int]]:
    """Class index per file from its top-level subfolder (sorted names, like ImageFolder);
    None for a flat folder."""
    tops = [p.relative_to(root).parts for p in files]
    if not tops or any(len(parts) < 2 for parts in tops):
        return None
    classes = sorted({parts[0] for parts in tops})
    if len(classes) < 2:  # one class is no labels (often the parent folder passed by mistake)
        return None
    index = {name: i for i, name in enumerate(classes)}
    return {p: index[parts[0]] for p, parts in zip(files, tops)}


MAX_DECODED_PIXELS = 100_000_000
"""Largest image decoded (100 Mpx: a 12k x 8k photo). Pillow's own bomb check stays on too."""
MAX_RESIZED_PIXELS = 40_000_000
"""Largest image after "shorter side to --resize": a 20000 x 1 strip resized to 256 would be
5.1 Mpx x 256 (11 GB as float); such a file is skipped with the reason."""


class ImageTooLarge(ValueError):
    """An image whose decoded or resized size is beyond the bounds above (skipped)."""


def _resized_pixels(size: tuple[int, int], resize: Optional[int]) -> int:
    width, height = size
    if resize is None or min(width, height) == 0:
        return width * height
    scale = resize / min(width, height)
    return round(width * scale) * round(height * scale)


def _image_tensor(path: Path, cfg: DataSettings, source: Optional[DataSource] = None) -> Tensor:
    import torchvision.transforms.functional as TF
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's palette chatter ...
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # ... but never its bomb check
        with Image.open(path) as img:
            width, height = img.size
            if width * height > MAX_DECODED_PIXELS:
                raise ImageTooLarge(f"{width}x{height} pixels, more than {MAX_DECODED_PIXELS // 10**6} Mpx")
            resized = _resized_pixels(img.size, cfg.resize)
            if resized > MAX_RESIZED_PIXELS:
                raise ImageTooLarge(
                    f"{width}x{height} pixels would be {resized / 1e6:.0f} Mpx after resizing the shorter side "
                    f"to {cfg.resize}"
                )
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                img = img.point(lambda v: v / 256).convert("L")
            img = img.convert("L" if cfg.channels == "gray" else "RGB")
    if source is not None:
        side = min(img.size)
        source.smallest_side = side if source.smallest_side is None else min(source.smallest_side, side)
    if cfg.resize is not None:
        img = TF.resize(img, cfg.resize, antialias=True)
    if cfg.crop is not None:
        img = TF.center_crop(img, cfg.crop)
    tensor = TF.to_tensor(img)
    if cfg.channels == "bgr":
        tensor = tensor.flip(0)
    mean, std = cfg.mean, cfg.std
    if len(mean) != tensor.shape[0]:
        if len(mean) == 3 and tensor.shape[0] == 1:
            mean, std = (sum(mean) / 3,), (sum(std) / 3,)
        else:
            raise InputError(
                f"data.mean has {len(mean)} values but images have {tensor.shape[0]} channels; "
                "set data.mean/data.std in the config"
            )
    return TF.normalize(tensor, list(mean), list(std))


DECODE_WORKERS = max(1, min(4, os.cpu_count() or 1))
"""Threads decoding the images of one batch."""


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


def image_folder(root: Path, cfg: DataSettings, batch_size: int, num_batches: Optional[int]) -> DataSource:
    files = _image_files(root)
    if not files:
        raise InputError(
            f"no images in {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}); "
            "point --data at a folder of images or a tensor file"
        )
    labels = _labels_for(root, files)
    random.Random(cfg.seed).shuffle(files)
    wanted = len(files) if num_batches is None else batch_size * num_batches
    skipped: list[str] = []

    def decode(path: Path) -> Optional[Tensor]:
        try:
            return _image_tensor(path, cfg, source)
        except InputError:
            raise
        except Exception as exc:
            skipped.append(f"{path} ({type(exc).__name__}: {first_line(exc, 120)})")
            return None

    def batches() -> Iterator[Batch]:
        """Batches in the shuffled order, each decoded by a few threads (Pillow and torch release
        the GIL), the next one decoded while the model runs on this one; an unreadable file is
        skipped and the next file fills its place, exactly as one image at a time would."""
        return prefetched(_decoded())

    def _decoded() -> Iterator[Batch]:
        queue = iter(files)
        yielded = 0
        with ThreadPoolExecutor(max_workers=DECODE_WORKERS, thread_name_prefix="bncheck-decode") as pool:
            for _ in itertools.count() if num_batches is None else range(num_batches):
                images: list[Tensor] = []
                targets: list[int] = []
                while len(images) < batch_size:
                    chunk = list(itertools.islice(queue, batch_size - len(images)))
                    if not chunk:
                        break
                    for path, tensor in zip(chunk, pool.map(decode, chunk)):
                        if tensor is not None:
                            images.append(tensor)
                            if labels is not None:
                                targets.append(labels[path])
                if len(images) < 2:
                    break  # none left, or a single image: it cannot form a train-mode BN batch
                shapes = {tuple(t.shape) for t in images}
                if len(shapes) > 1:
                    raise InputError(
                        f"images in {root} have different sizes after transforms ({sorted(shapes)[:3]}); "
                        "set data.crop (and data.resize) in the config"
                    )
                yielded += 1
                yield torch.stack(images), torch.tensor(targets) if labels is not None else None
        if not yielded:
            first = skipped[0] if skipped else "fewer than 2 images"
            raise InputError(
                f"none of the {len(files)} images in {root} could be used (first: {first}); "
                "check that they are valid image files"
            )

    def sharded(rank: int, size: int) -> Iterator[Batch]:
        """Under torchrun: batch k is files[k*B:(k+1)*B] (an unreadable file leaves its batch
        short instead of pulling the next file in, so no rank decodes another's images)."""
        count = -(-min(wanted, len(files)) // batch_size)
        for index in range(rank, count, size):
            chunk = files[index * batch_size:(index + 1) * batch_size]
            images, targets = [], []
            for path in chunk:
                try:
                    images.append(_image_tensor(path, cfg, source))
                except InputError:
                    raise
                except Exception as exc:
                    skipped.append(f"{path} ({type(exc).__name__}: {first_line(exc, 120)})")
                    continue
                if labels is not None:
                    targets.append(labels[path])
            if len(images) < 2:
                continue
            yield torch.stack(images), torch.tensor(targets) if labels is not None else None

    source = DataSource(batches=batches, planned_samples=min(wanted, len(files)), skipped=skipped, kind="images",
                        planned_request=None if num_batches is None else wanted, sharded=sharded)
    if labels is None and len({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1}) == 1:
        only = next(p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1)
        source.notes.append(
            f"{root} holds one subfolder ({only}/): one class is no labels, so accuracy is not reported; "
            "pass the folder that holds one subfolder per class"
        )
    return source


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
    import numpy as np

    from bncheck.reading.untrusted import MAX_INFLATED_BYTES

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
        if fortran and len(shape) > 1 and take < total:
            raise InputError(f"{path}: array {info.filename} is stored column-major; save it with np.ascontiguousarray")
        data = stream.read(nbytes)
    if len(data) < nbytes:
        raise InputError(f"{path}: array {info.filename} is truncated; re-save it with numpy.savez")
    array = np.frombuffer(data, dtype=dtype).reshape((take, *shape[1:]) if shape else (), order="F" if fortran else "C")
    return torch.from_numpy(np.ascontiguousarray(array).copy())


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
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != inputs.shape[0]):
        labels = None
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


MODULE_NAME = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def is_callable_spec(text: str) -> bool:
    """``package.module:callable`` or ``path/to/file.py:callable`` (not a path that exists)."""
    source, sep, name = text.rpartition(":")
    if not sep or not source or not name or Path(text).exists() or not MODULE_NAME.match(name):
        return False
    return source.endswith(".py") or bool(MODULE_NAME.match(source))


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
    planned = batch_size * num_batches if num_batches is not None else size or batch_size
    if size is not None:
        planned = min(planned, size)
    used: list[bool] = []

    def batches() -> Iterator[Any]:
        if used:  # a generator or loader consumed once cannot be replayed
            raise InputError(f"$data {spec} was already consumed; return a DataLoader or list, not a generator")
        used.append(True)
        yield from iter_batches(data, batch_size=batch_size, num_batches=num_batches)

    return DataSource(batches=batches, planned_samples=planned, skipped=[], kind="pipeline",
                      planned_request=None if num_batches is None else batch_size * num_batches)


def open_data(path: Path, cfg: DataSettings, batch_size: int, num_batches: Optional[int]) -> DataSource:
    """Batches from a folder of images, a tensor file or the user's own pipeline
    (``module:callable``); ``num_batches=None`` uses every sample."""
    text = str(path)
    if is_callable_spec(text) and not text.lower().rpartition(":")[0].endswith(".npz"):
        return callable_source(text, batch_size, num_batches)
    path = Path(path)
    if not path.exists() and ":" in text:
        file_part, _, key = text.rpartition(":")
        if Path(file_part).suffix.lower() == ".npz" and Path(file_part).is_file():
            return tensor_file(Path(file_part), batch_size, num_batches, key)
    if not path.exists():
        raise InputError(f"data path {path} does not exist; check --data")
    if path.is_dir():
        return image_folder(path, cfg, batch_size, num_batches)
    if path.suffix.lower() in TENSOR_EXTENSIONS:
        return tensor_file(path, batch_size, num_batches)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        raise InputError(f"--data {path} is a single image; pass the folder that holds the images")
    raise InputError(
        f"--data {path} is not a folder of images or a tensor file ({', '.join(sorted(TENSOR_EXTENSIONS))})"
    )
