"""Images with segmentation masks: a folder that holds an images folder and a masks folder
whose files share stems (``images/`` + ``masks/``, Pascal VOC's ``JPEGImages/`` +
``SegmentationClass/``). Each mask is read as class indices (a palette PNG's indices, a
grayscale PNG's values; an RGB mask is refused unless its three channels are equal) and follows
every resize and crop its image gets, with nearest-neighbour sampling; pixels a crop pads are
the ignore index. Batches are ``(images, masks)`` with masks ``[N, H, W]`` (int64)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from bncheck.config import DataSettings
from bncheck.errors import InputError, first_line
from bncheck.measuring.batches import IGNORE_INDEX
from bncheck.reading.data.source import IMAGE_EXTENSIONS, Batch, DataSource, prefetched

IMAGE_FOLDERS = ("images", "imgs", "image", "img", "JPEGImages", "leftImg8bit")
MASK_FOLDERS = ("masks", "mask", "labels", "annotations", "SegmentationClass", "gtFine", "gt", "ground_truth")


def segmentation_layout(root: Path) -> Optional[tuple[Path, Path]]:
    """``(images folder, masks folder)`` when ``root`` holds one of each by their usual names."""
    if not root.is_dir():
        return None
    folders = {p.name: p for p in root.iterdir() if p.is_dir() and not p.is_symlink()}
    images = next((folders[name] for name in IMAGE_FOLDERS if name in folders), None)
    masks = next((folders[name] for name in MASK_FOLDERS if name in folders), None)
    return (images, masks) if images is not None and masks is not None else None


def _stem(path: Path, root: Path) -> str:
    relative = path.relative_to(root).with_suffix("")
    name = str(relative)
    for suffix in ("_leftImg8bit", "_gtFine_labelIds", "_mask", "_label", "_gt"):  # Cityscapes-style suffixes
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _files(folder: Path) -> dict[str, Path]:
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    return {_stem(p, folder): p for p in found}


def pair_files(images: Path, masks: Path) -> list[tuple[Path, Path]]:
    """Every image with the mask of the same stem; an InputError naming the first image without
    a mask (or mask without an image) otherwise."""
    image_files, mask_files = _files(images), _files(masks)
    if not image_files:
        raise InputError(f"no images in {images}; put the images there and their masks in {masks}")
    missing = sorted(set(image_files) - set(mask_files))
    extra = sorted(set(mask_files) - set(image_files))
    if missing:
        raise InputError(f"{len(missing)} images in {images} have no mask in {masks} (first: {missing[0]}); give "
                         "every image a mask with the same file name stem")
    if extra:
        raise InputError(f"{len(extra)} masks in {masks} have no image in {images} (first: {extra[0]}); remove "
                         "them or add their images")
    return [(image_files[stem], mask_files[stem]) for stem in sorted(image_files)]


def read_mask(path: Path) -> Tensor:
    """Class indices ``[H, W]`` (int64) of one mask file."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        if img.width * img.height > 100_000_000:
            raise InputError(f"mask {path} is {img.width}x{img.height} pixels; masks are limited to 100 Mpx")
        if img.mode in ("P", "L", "I", "I;16", "I;16B", "I;16L", "1"):
            array = np.array(img)
        elif img.mode in ("RGB", "RGBA"):
            rgb = np.array(img.convert("RGB"))
            if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
                raise InputError(
                    f"mask {path} is an RGB image with colours, not class indices; save masks as palette (P) or "
                    "grayscale PNGs whose pixel values are the class indices (Pascal VOC's SegmentationClass are)")
            array = rgb[..., 0]
        else:
            raise InputError(f"mask {path} has image mode {img.mode}; save it as a palette or grayscale PNG")
    return torch.from_numpy(array.astype("int64"))


def _transformed_mask(mask: Tensor, cfg: DataSettings) -> Tensor:
    """The mask through the image's resize and centre crop (nearest; padding is ignored)."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    m = mask[None]
    if cfg.resize is not None:
        m = TF.resize(m, cfg.resize, interpolation=InterpolationMode.NEAREST)
    if cfg.crop is not None:
        height, width = m.shape[-2:]
        if height < cfg.crop or width < cfg.crop:  # torchvision pads with 0, a class: pad with the ignore index
            m = TF.pad(m, [max(0, (cfg.crop - width + 1) // 2), max(0, (cfg.crop - height + 1) // 2)],
                       fill=IGNORE_INDEX)
        m = TF.center_crop(m, cfg.crop)
    return m[0]


def segmentation_folder(root: Path, images: Path, masks: Path, cfg: DataSettings, batch_size: int,
                        num_batches: Optional[int]) -> DataSource:
    """Batches of ``(images, masks)`` in a deterministic shuffle (``data.seed``)."""
    from bncheck.reading.data.images import _image_tensor, check_crop

    check_crop(cfg)
    pairs = pair_files(images, masks)
    random.Random(cfg.seed).shuffle(pairs)
    wanted = len(pairs) if num_batches is None else batch_size * num_batches
    skipped: list[str] = []

    def decode(image_path: Path, mask_path: Path) -> Optional[tuple[Tensor, Tensor]]:
        try:
            from PIL import Image

            with Image.open(image_path) as img:
                size = img.size
            mask = read_mask(mask_path)
            if (mask.shape[1], mask.shape[0]) != size:
                raise InputError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} is "
                                 f"{size[0]}x{size[1]}; a mask must have its image's size")
            return _image_tensor(image_path, cfg, source), _transformed_mask(mask, cfg)
        except InputError:
            raise
        except Exception as exc:
            skipped.append(f"{image_path} ({type(exc).__name__}: {first_line(exc, 120)})")
            return None

    def decoded() -> Iterator[Batch]:
        queue = iter(pairs[:wanted] if num_batches is not None else pairs)
        made = 0
        while num_batches is None or made < num_batches:
            pictures: list[Tensor] = []
            targets: list[Tensor] = []
            for image_path, mask_path in queue:
                item = decode(image_path, mask_path)
                if item is not None:
                    pictures.append(item[0])
                    targets.append(item[1])
                if len(pictures) == batch_size:
                    break
            if len(pictures) < 2:
                break
            shapes = {tuple(t.shape) for t in pictures}
            if len(shapes) > 1:
                raise InputError(f"images in {images} have different sizes after transforms ({sorted(shapes)[:3]}); "
                                 "set data.crop (and data.resize) in the config")
            made += 1
            yield torch.stack(pictures), torch.stack(targets)
        if not made:
            first = skipped[0] if skipped else "fewer than 2 images"
            raise InputError(f"none of the {len(pairs)} images in {images} could be used (first: {first})")

    source = DataSource(batches=lambda: prefetched(decoded()), planned_samples=min(wanted, len(pairs)),
                        skipped=skipped, kind="images", planned_request=None if num_batches is None else wanted)
    source.notes.append(f"{root}: {len(pairs)} images with masks ({images.name}/ + {masks.name}/); masks are labels, "
                        f"read per pixel (ignore index {IGNORE_INDEX})")
    return source
