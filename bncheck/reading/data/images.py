"""Folders of images: read with Pillow (bounded in pixels before decoding), transformed per
``DataSettings`` (resize the shorter side, centre-crop, scale to 0..1, normalize, channel
order), labelled by class sub-folder, dealt in a deterministic shuffle (``data.seed``) so the
first batches mix classes, and decoded by a few threads ahead of the model."""

from __future__ import annotations

import itertools
import os
import random
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from bncheck.config import DataSettings
from bncheck.errors import InputError, first_line
from bncheck.reading.data.source import IMAGE_EXTENSIONS, Batch, DataSource, prefetched


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


def _final_pixels(size: tuple[int, int], cfg: DataSettings) -> int:
    """Pixels of the image the model gets: after resizing, and after a centre crop, which pads
    an image smaller than the crop (``--crop 12000`` makes every image 144 Mpx)."""
    if cfg.crop is not None:
        return cfg.crop * cfg.crop
    return _resized_pixels(size, cfg.resize)


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
            resized = max(_resized_pixels(img.size, cfg.resize), _final_pixels(img.size, cfg))
            if resized > MAX_RESIZED_PIXELS:
                raise ImageTooLarge(
                    f"{width}x{height} pixels would be {resized / 1e6:.0f} Mpx after resizing the shorter side to "
                    f"{cfg.resize} (and cropping to {cfg.crop})"
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


def decoded_batch(queue: Iterator[Any], pool: ThreadPoolExecutor, decode: Callable[[Any], Any],
                  size: int) -> list[tuple[Any, Any]]:
    """Up to ``size`` ``(item, decoded)`` pairs taken from ``queue`` in order, decoded by
    ``pool``; an item that decodes to None (unreadable) is skipped and the next fills its place."""
    out: list[tuple[Any, Any]] = []
    while len(out) < size:
        chunk = list(itertools.islice(queue, size - len(out)))
        if not chunk:
            break
        out += [(item, value) for item, value in zip(chunk, pool.map(decode, chunk)) if value is not None]
    return out


def check_crop(cfg: DataSettings) -> None:
    """A crop pads smaller images up to its size: refused above the pixel limit before any image
    is read (``--crop 12000`` would make every image 144 Mpx)."""
    if cfg.crop is not None and cfg.crop * cfg.crop > MAX_RESIZED_PIXELS:
        raise InputError(
            f"a centre crop of {cfg.crop} px makes every image {cfg.crop * cfg.crop / 1e6:.0f} Mpx (smaller images are "
            f"padded), above the {MAX_RESIZED_PIXELS // 10**6} Mpx limit; set --crop (or the model folder's input "
            "size) to the model's input size")


def image_folder(root: Path, cfg: DataSettings, batch_size: int, num_batches: Optional[int]) -> DataSource:
    check_crop(cfg)
    from bncheck.reading.data.segmentation import MASK_FOLDERS, segmentation_layout

    if root.name in MASK_FOLDERS and segmentation_layout(root.parent) is not None:
        raise InputError(f"{root} is the masks folder of {root.parent}; point --data at {root.parent} so the masks "
                         "are read as labels of their images")
    masks = [p.name for p in root.iterdir() if p.is_dir() and p.name in MASK_FOLDERS]
    if masks:  # never read as a class of images
        raise InputError(f"{root} holds a masks folder ({masks[0]}/) but no images folder next to it (images/ or "
                         "JPEGImages/); put the images in images/ with the same file names as their masks")
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
                pairs = decoded_batch(queue, pool, decode, batch_size)
                images = [tensor for _, tensor in pairs]
                targets = [labels[path] for path, _ in pairs] if labels is not None else []
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
