"""Sample data, one module per kind: image folders (``images``), tensor files (``tensors``) and
the user's own pipeline (``pipeline``), each yielding a ``DataSource``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from bncheck.config import DataSettings
from bncheck.errors import InputError
from bncheck.reading.data.coco import DETECTION_DEFAULTS, coco_file, coco_source, is_detection_data
from bncheck.reading.data.images import image_folder
from bncheck.reading.data.pipeline import callable_source, is_callable_spec
from bncheck.reading.data.segmentation import segmentation_folder, segmentation_layout
from bncheck.reading.data.source import IMAGE_EXTENSIONS, TENSOR_EXTENSIONS, DataSource
from bncheck.reading.data.tensors import tensor_file

__all__ = ["DataSource", "kind_defaults", "open_data"]


def kind_defaults(path: Optional[str]) -> dict:
    """Preprocessing the kind of data implies where nothing else sets it: detection data (a COCO
    annotation file) is fed as 0..1 pixels at each image's own size."""
    if path is None or is_callable_spec(str(path)):
        return {}
    return dict(DETECTION_DEFAULTS) if is_detection_data(Path(path)) else {}


def open_data(path: Path, cfg: DataSettings, batch_size: int, num_batches: Optional[int]) -> DataSource:
    """Batches from a folder of images (with masks: segmentation; with a COCO annotation file:
    detection), a COCO annotation file, a tensor file or the user's own pipeline
    (``module:callable``); ``num_batches=None`` uses every sample."""
    text = str(path)
    if is_callable_spec(text):  # never file.npz:KEY (untrusted.code_spec)
        return callable_source(text, batch_size, num_batches)
    path = Path(path)
    if not path.exists() and ":" in text:
        file_part, _, key = text.rpartition(":")
        if Path(file_part).suffix.lower() == ".npz" and Path(file_part).is_file():
            return tensor_file(Path(file_part), batch_size, num_batches, key)
    if not path.exists():
        raise InputError(f"data path {path} does not exist; check --data")
    if path.is_dir():
        annotations = coco_file(path)  # before masks: COCO's annotations/ folder holds JSON, not masks
        if annotations is not None:
            return coco_source(annotations, cfg, batch_size, num_batches)
        layout = segmentation_layout(path)
        if layout is not None:
            return segmentation_folder(path, *layout, cfg, batch_size, num_batches)
        return image_folder(path, cfg, batch_size, num_batches)
    if path.suffix.lower() in TENSOR_EXTENSIONS:
        return tensor_file(path, batch_size, num_batches)
    if path.suffix.lower() == ".json":
        return coco_source(path, cfg, batch_size, num_batches)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        raise InputError(f"--data {path} is a single image; pass the folder that holds the images")
    raise InputError(
        f"--data {path} is not a folder of images, a COCO annotation file (.json) or a tensor file "
        f"({', '.join(sorted(TENSOR_EXTENSIONS))})"
    )
