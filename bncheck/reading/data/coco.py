"""Images with COCO-style box annotations, for detection models: ``--data instances.json`` (the
images found beside it, in ``images/``, or -- COCO's own layout -- in ``../val2017/`` for
``annotations/instances_val2017.json``), or ``--data FOLDER`` holding one such file (Roboflow's
``_annotations.coco.json`` beside the images, or ``annotations/*.json``).

Batches are ``(images, targets)`` as torchvision's detectors take them in training: a list of
``[C, H, W]`` images (sizes may differ) and one ``{"boxes": [K, 4] xyxy, "labels": [K]}`` per
image, labels being the file's category ids as they are, or renumbered (``data.box_labels``).
Boxes follow every resize and crop their image gets. Detection models resize and normalize
inside (torchvision's do), so unless a flag, the config or the model folder says otherwise
images are fed as 0..1 pixels at their own size (``DETECTION_DEFAULTS``).

The file is data from anyone: parsed as JSON only, bounded in size, every field checked, and an
image name that is absolute or climbs out of the image folder (``..``) is refused."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Optional

from bncheck.config import DataSettings
from bncheck.errors import InputError, first_line
from bncheck.reading.data.source import IMAGE_EXTENSIONS, DataSource, prefetched

ANNOTATION_LIMIT = 512 * 2**20
"""Largest annotation file read (COCO's val2017 instances are 25 MB, train2017's 448 MB)."""
SNIFF_BYTES = 1 << 20
"""Bytes of a folder's JSON file read to tell a COCO annotation file from another JSON file."""
DETECTION_DEFAULTS: dict[str, Any] = {"resize": None, "crop": None, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
"""Preprocessing for detection data where no flag, config or model folder sets it: each image
at its own size, 0..1 pixels (torchvision's detectors resize and normalize inside the model)."""
LABELLED_BY = {"category-id": "the file's category ids as they are",
               "index": "their category's 0-based index among the file's categories sorted by id",
               "index+1": "their category's index among the file's categories sorted by id, from 1"}
PROBE = 200
"""Image names tried in each candidate folder to find where the images are."""


@dataclass(frozen=True)
class Annotated:
    """One image of the annotation file: its path, its size as annotated (None: not given),
    and its boxes (xyxy, in the file's pixels) with their category ids."""

    path: Path
    size: Optional[tuple[int, int]]
    boxes: tuple[tuple[float, float, float, float], ...]
    labels: tuple[int, ...]


def _looks_like_coco(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(SNIFF_BYTES)
    except OSError:
        return False
    return head.lstrip()[:1] == b"{" and b'"images"' in head and (b'"annotations"' in head or b'"categories"' in head
                                                                   or len(head) == SNIFF_BYTES)


def _holds_images(folder: Path, look: int = 1000) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in itertools.islice(folder.rglob("*"), look))


def coco_file(root: Path) -> Optional[Path]:
    """The COCO annotation file of a folder (in it or in its ``annotations/`` folder); None when
    it holds none; an InputError when it holds several."""
    if not root.is_dir():
        return None
    candidates = sorted(p for p in root.glob("*.json") if p.is_file())
    notes = root / "annotations"
    if notes.is_dir() and not _holds_images(notes):  # a folder of masks is segmentation's, whatever JSON sits in it
        candidates += sorted(p for p in notes.glob("*.json") if p.is_file())
    found = [p for p in candidates if _looks_like_coco(p)]
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(root)) for p in found[:4])
        raise InputError(f"{root} holds {len(found)} COCO annotation files ({names}); pass the one to use: "
                         f"--data {found[0]}")
    return found[0] if found else None


def is_detection_data(path: Path) -> bool:
    """``--data`` names COCO-style detection data (a ``.json`` file, or a folder holding one)."""
    try:
        if path.is_file():
            return path.suffix.lower() == ".json"
        return coco_file(path) is not None
    except (InputError, OSError):
        return False


def _load(path: Path) -> dict:
    size = path.stat().st_size
    if size > ANNOTATION_LIMIT:
        raise InputError(f"{path} is {size / 2**20:.0f} MiB, above the {ANNOTATION_LIMIT // 2**20} MiB limit for an "
                         "annotation file; keep the annotations of the images you check in a smaller file")
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except (ValueError, RecursionError) as exc:
        raise InputError(f"{path} is not valid JSON ({first_line(exc, 120)}); pass a COCO annotation file") from None
    if not isinstance(document, dict) or not isinstance(document.get("images"), list) \
            or not isinstance(document.get("annotations"), list):
        raise InputError(f"{path} is not a COCO annotation file (it needs 'images' and 'annotations' lists); pass "
                         "the instances JSON of your images")
    return document


def _safe_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"{where} has no file_name; every image of a COCO file needs one")
    for pure in (PurePosixPath(name), PureWindowsPath(name)):
        if pure.is_absolute() or pure.anchor or ".." in pure.parts:
            raise InputError(f"{where} names {name!r}, outside the image folder; image names must be relative "
                             "paths inside it")
    return name.replace("\\", "/")  # written on Windows (images\\0001.jpg)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _image_roots(path: Path) -> list[Path]:
    """Where the images of an annotation file may be, most likely first."""
    here = path.parent
    roots = [here, here / "images"]
    if here.name == "annotations":
        split = path.stem
        for prefix in ("instances_", "person_keypoints_", "captions_"):
            if split.startswith(prefix):
                split = split[len(prefix):]
        up = here.parent
        roots += [up / split, up / "images" / split, up / "images", up]
    seen: list[Path] = []
    for root in roots:
        if root not in seen and root.is_dir():
            seen.append(root)
    return seen


@dataclass(frozen=True)
class Annotations:
    images: list[Annotated]
    root: Path
    missing: int
    """Annotated images not found in ``root``."""
    boxes: int
    categories: int
    crowd: int
    """Crowd annotations left out (COCO's evaluation ignores them)."""
    empty: int
    """Boxes of zero width or height left out."""
    orphans: int
    """Annotations of an image the file does not list, left out."""


def label_map(document: dict, used: set[int], how: str) -> dict[int, int]:
    """Category id -> target label: as it is (``category-id``), or its 0-based index among the
    file's categories sorted by id (``index``, as ultralytics, detectron2 and mmdetection number
    classes), or that index + 1 (``index+1``: 0 is the background, as torchvision's custom
    datasets number them). Categories come from the file's ``categories``, else from the boxes."""
    listed = document.get("categories")
    ids = {c["id"] for c in listed if isinstance(c, dict) and isinstance(c.get("id"), int)} \
        if isinstance(listed, list) else set()
    ordered = sorted(ids | used)
    if how == "category-id":
        return {c: c for c in ordered}
    start = 1 if how == "index+1" else 0
    return {c: start + i for i, c in enumerate(ordered)}


def read_annotations(path: Path, box_labels: str = "category-id") -> Annotations:
    """The annotated images of a COCO file that are on disk, with their boxes."""
    document = _load(path)
    names: dict[Any, tuple[str, Optional[tuple[int, int]]]] = {}
    for index, entry in enumerate(document["images"]):
        where = f"{path.name}: images[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), (int, str)):
            raise InputError(f"{where} has no id; every image of a COCO file needs an id and a file_name")
        width, height = entry.get("width"), entry.get("height")
        size = (int(width), int(height)) if _number(width) and _number(height) else None
        names[entry["id"]] = (_safe_name(entry.get("file_name"), where), size)
    boxes: dict[Any, list[tuple[float, float, float, float]]] = {key: [] for key in names}
    labels: dict[Any, list[int]] = {key: [] for key in names}
    crowd = empty = orphans = 0
    for index, entry in enumerate(document["annotations"]):
        where = f"{path.name}: annotations[{index}]"
        if not isinstance(entry, dict):
            raise InputError(f"{where} is not an object; pass a COCO annotation file")
        bbox, category = entry.get("bbox"), entry.get("category_id")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_number(v) for v in bbox)):
            raise InputError(f"{where} has bbox {str(bbox)[:60]}; COCO boxes are [x, y, width, height] in pixels")
        if not isinstance(category, int) or isinstance(category, bool):
            raise InputError(f"{where} has category_id {str(category)[:30]}; COCO category ids are integers")
        if entry.get("image_id") not in names:
            orphans += 1
            continue
        if entry.get("iscrowd") in (1, True):
            crowd += 1
            continue
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            empty += 1
            continue
        boxes[entry["image_id"]].append((x, y, x + w, y + h))
        labels[entry["image_id"]].append(category)
    if not names:
        raise InputError(f"{path} lists no images; pass the annotation file of the images you check")
    numbered = label_map(document, {c for values in labels.values() for c in values}, box_labels)
    labels = {key: [numbered[c] for c in values] for key, values in labels.items()}
    roots = _image_roots(path)
    probe = [name for name, _ in itertools.islice(names.values(), PROBE)]
    root = max(roots, key=lambda r: sum((r / name).is_file() for name in probe), default=path.parent)
    images = [Annotated(root / name, size, tuple(boxes[key]), tuple(labels[key]))
              for key, (name, size) in names.items()]
    present = [image for image in images if image.path.is_file()]
    if not present:
        looked = ", ".join(str(r) for r in roots) or str(path.parent)
        raise InputError(f"none of the {len(images)} images {path.name} annotates is on disk (first: "
                         f"{images[0].path.name}; looked in {looked}); put the images beside the file or in images/")
    categories = document.get("categories")
    return Annotations(present, root, len(images) - len(present), sum(len(i.boxes) for i in present),
                       len(categories) if isinstance(categories, list) else len({c for i in present for c in i.labels}),
                       crowd, empty, orphans)


def box_geometry(size: tuple[int, int], cfg: DataSettings) -> tuple[float, float, float, float, int, int]:
    """How a ``(width, height)`` image's pixels move under ``cfg``'s resize and centre crop, as
    torchvision's ``resize`` and ``center_crop`` move them: ``(scale x, scale y, shift x,
    shift y, width, height)`` with the size after both."""
    width, height = size
    scale_x = scale_y = 1.0
    if cfg.resize is not None and min(width, height) != cfg.resize:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = cfg.resize, int(cfg.resize * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        scale_x, scale_y, width, height = new_w / width, new_h / height, new_w, new_h
    shift_x = shift_y = 0.0
    if cfg.crop is not None:
        crop = cfg.crop
        pad_x, pad_y = max(0, (crop - width) // 2), max(0, (crop - height) // 2)
        padded_w, padded_h = max(width, crop), max(height, crop)
        shift_x = pad_x - int(round((padded_w - crop) / 2.0))
        shift_y = pad_y - int(round((padded_h - crop) / 2.0))
        width = height = crop
    return scale_x, scale_y, float(shift_x), float(shift_y), width, height


def transformed_target(image: Annotated, size: tuple[int, int], cfg: DataSettings) -> dict:
    """The image's target after its resize and crop: boxes moved, clipped to the image, and
    left out when nothing of them is left."""
    import torch

    scale_x, scale_y, shift_x, shift_y, width, height = box_geometry(size, cfg)
    boxes = torch.tensor(image.boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.tensor(image.labels, dtype=torch.int64)
    boxes = boxes * torch.tensor([scale_x, scale_y, scale_x, scale_y]) + torch.tensor([shift_x, shift_y] * 2)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return {"boxes": boxes[keep], "labels": labels[keep]}


def coco_source(path: Path, cfg: DataSettings, batch_size: int, num_batches: Optional[int]) -> DataSource:
    """Batches of ``(images, targets)`` from a COCO annotation file, in a deterministic shuffle
    (``data.seed``) of its images that are on disk."""
    from PIL import Image

    from bncheck.measuring.batches import ImageList
    from bncheck.reading.data.images import DECODE_WORKERS, _image_tensor, check_crop, decoded_batch

    check_crop(cfg)
    found = read_annotations(path, cfg.box_labels)
    images = list(found.images)
    random.Random(cfg.seed).shuffle(images)
    wanted = len(images) if num_batches is None else batch_size * num_batches
    skipped: list[str] = []

    def decode(image: Annotated) -> Optional[tuple[Any, dict]]:
        try:
            with Image.open(image.path) as img:
                size = img.size
            if image.size is not None and image.size != size:
                raise ValueError(f"annotated as {image.size[0]}x{image.size[1]} but the file is {size[0]}x{size[1]}, "
                                 "so its boxes would not fit")
            return _image_tensor(image.path, cfg, source), transformed_target(image, size, cfg)
        except InputError:
            raise
        except Exception as exc:
            skipped.append(f"{image.path} ({type(exc).__name__}: {first_line(exc, 120)})")
            return None

    def decoded() -> Iterator[tuple[ImageList, list[dict]]]:
        queue = iter(images)
        made = 0
        with ThreadPoolExecutor(max_workers=DECODE_WORKERS, thread_name_prefix="bncheck-decode") as pool:
            while num_batches is None or made < num_batches:
                pairs = decoded_batch(queue, pool, decode, batch_size)
                pictures = [picture for _, (picture, _) in pairs]
                targets = [target for _, (_, target) in pairs]
                if len(pictures) < 2:
                    break  # none left, or one image: it cannot form a train-mode BN batch
                made += 1
                yield ImageList(pictures), targets
        if not made:
            first = skipped[0] if skipped else "fewer than 2 images"
            raise InputError(f"none of the {len(images)} images of {path} could be used (first: {first}); check that "
                             "they are valid image files")

    source = DataSource(batches=lambda: prefetched(decoded()), planned_samples=min(wanted, len(images)),
                        skipped=skipped, kind="images", planned_request=None if num_batches is None else wanted)
    source.notes.append(
        f"{path.name}: {len(images)} images with {found.boxes} boxes of {found.categories} "
        f"{'category' if found.categories == 1 else 'categories'} (COCO "
        f"annotations), images from {found.root}; boxes are targets, labelled by "
        f"{LABELLED_BY[cfg.box_labels]} (--box-labels)")
    if found.missing:
        source.notes.append(f"{found.missing} images {path.name} annotates are not in {found.root}; the "
                            f"{len(images)} found are used")
    parts = [f"{found.crowd} crowd annotations (COCO's evaluation ignores them)"] if found.crowd else []
    parts += [f"{found.empty} boxes of zero width or height"] if found.empty else []
    parts += [f"{found.orphans} annotations of images the file does not list"] if found.orphans else []
    if parts:
        source.notes.append(f"left out of the targets: {' and '.join(parts)}")
    return source
