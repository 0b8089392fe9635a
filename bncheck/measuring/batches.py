"""Batch plumbing shared by every pass: what a batch is, where it goes, how the model is
called, and what the caller's ``data`` becomes.

A batch is a tensor, an ``(inputs, labels)`` pair, or a dict with an input key
(``inputs``/``input``/``images``/``image``/``x``/``data``/``pixel_values``) and
optionally a label key (``labels``/``label``/``targets``/``target``/``y``). Inputs may be
nested (a tuple of tensors is passed as positional arguments, a dict as keywords). A
detection-style batch -- a list of images (3-D tensors, sizes may differ), alone or as
``(images, targets)`` -- becomes an ``ImageList``: the model gets the list as one argument. A
graph batch (torch_geometric ``Data``/``Batch``, or any object with ``x`` and ``edge_index``)
becomes a ``GraphBatch``: its batch size is its number of graphs, its labels its ``y``, and the
model is called as its ``forward`` asks (``model(data)`` or ``model(x, edge_index, batch)``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any, Optional

import torch
from torch import Tensor, nn

from bncheck.errors import InputError, UsageError, first_line

# One vocabulary for batch dicts, tensor-file dicts and npz archives.
INPUT_KEYS = ("inputs", "input", "images", "image", "x", "data", "pixel_values")
LABEL_KEYS = ("labels", "label", "targets", "target", "y", "masks", "mask")
IGNORE_INDEX = 255
"""Mask value of pixels that count for no class (VOC's object borders, a crop's padding)."""


class ImageList(list):
    """A batch that is a list of per-sample tensors passed to the model as one argument
    (torchvision detection models take ``list[Tensor]``); its length is the batch size."""


class GraphBatch:
    """A graph batch as torch_geometric makes it: node features ``x``, ``edge_index`` and, for
    several graphs, ``batch`` (the graph of each node) and ``num_graphs``. Nothing in it is cut
    by sample: its tensors have nodes or edges first, not graphs."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def __len__(self) -> int:
        graphs = getattr(self.data, "num_graphs", None)
        return int(graphs) if isinstance(graphs, int) else 1

    def tensors(self) -> list[Tensor]:
        return [t for t in (getattr(self.data, "x", None), getattr(self.data, "edge_index", None))
                if isinstance(t, Tensor)]

    def moved(self, how: Any) -> GraphBatch:
        """A copy with every tensor attribute passed through ``how`` (device, dtype, host)."""
        data = self.data.clone() if hasattr(self.data, "clone") else self.data
        if hasattr(data, "apply"):
            data.apply(how)
        return GraphBatch(data)

    def graphs(self) -> list[Any]:
        """One object per graph (``to_data_list``); TypeError when the batch cannot be split."""
        if not hasattr(self.data, "to_data_list"):
            raise TypeError("a single graph is not re-dealt")
        return list(self.data.to_data_list())

    def of(self, graphs: list[Any]) -> GraphBatch:
        """A batch of ``graphs`` of this batch's kind (``Batch.from_data_list``)."""
        return GraphBatch(type(self.data).from_data_list(graphs))


def is_graph(value: Any) -> bool:
    """A torch_geometric-style graph batch (duck-typed: no import of the library)."""
    return (not isinstance(value, (Tensor, dict, list, tuple)) and isinstance(getattr(value, "x", None), Tensor)
            and isinstance(getattr(value, "edge_index", None), Tensor))


def _graph_call(model: nn.Module, data: Any) -> tuple[Any, ...]:
    """The positional arguments ``model.forward`` asks for: the graph itself when its first
    parameter is not one of the graph's fields (``forward(self, data)``), else the fields it
    names, in order, up to the first it does not hold (``forward(self, x, edge_index, batch)``)."""
    import inspect

    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return (data,)
    if not params or not isinstance(getattr(data, params[0].name, None), Tensor):
        return (data,)
    args = []
    for p in params:
        value = getattr(data, p.name, None)
        if value is None:
            if p.default is p.empty:
                raise InputError(f"the model's forward asks for {p.name!r}, which the graph batch does not hold; "
                                 "write a forward that takes the batch (model(data)) or yield batches that hold it")
            break
        args.append(value)
    return tuple(args)


def _is_targets(value: Any) -> bool:
    from bncheck.measuring.detections import is_targets

    return is_targets(value)


def _image_list(value: Any) -> Optional[ImageList]:
    """A list or tuple of at least two 3-D tensors (C, H, W), as a detection loader yields."""
    if (isinstance(value, (list, tuple)) and len(value) >= 2
            and all(isinstance(t, Tensor) and t.dim() == 3 for t in value)):
        return ImageList(value)
    return None


def tensors(value: Any) -> list[Tensor]:
    """Every tensor in a (nested) value: dicts by key, sequences in order."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, GraphBatch):
        return value.tensors()
    if isinstance(value, dict):
        return [t for key in sorted(value, key=str) for t in tensors(value[key])]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors(item)]
    return []


def split_batch(batch: Any) -> tuple[Any, Optional[Tensor]]:
    """``(inputs, labels)`` from a tensor, an ``(inputs,)``/``(inputs, labels[, ...])`` sequence
    (what a ``DataLoader`` over a ``TensorDataset`` yields) or a dict."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (ImageList, GraphBatch)):
        return batch, None
    if is_graph(batch):
        labels = getattr(batch, "y", None)
        return GraphBatch(batch), labels if isinstance(labels, Tensor) else None
    images = _image_list(batch)
    if images is not None:
        return images, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and _image_list(batch[0]) is not None:
        # (images, targets): per-image dicts of boxes/labels label detections, not classes
        return _image_list(batch[0]), list(batch[1]) if _is_targets(batch[1]) else None
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 3 and isinstance(batch[0], Tensor):
        # (inputs,) from a TensorDataset, (inputs, labels), (inputs, labels, weights)
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return batch[0], labels
    if isinstance(batch, dict):
        for key in INPUT_KEYS:
            if key in batch:
                labels = next((batch[k] for k in LABEL_KEYS if k in batch), None)
                return batch[key], labels if isinstance(labels, Tensor) else None
    raise InputError(
        f"cannot use a batch of type {type(batch).__name__}; yield tensors, (inputs, labels) "
        f"pairs, dicts with one of the keys {', '.join(INPUT_KEYS)}, or torch_geometric Data/Batch objects"
    )


def batch_len(inputs: Any) -> int:
    """Samples in a batch: images of an ``ImageList``, graphs of a ``GraphBatch``, else the
    leading size of its tensors -- which must agree in a dict (one that mixes node, edge and
    graph counts says nothing about how many samples it holds: an error naming the fields)."""
    if isinstance(inputs, (ImageList, GraphBatch)):
        return len(inputs)
    if isinstance(inputs, dict):
        sizes = {str(key): int(t.shape[0]) for key in sorted(inputs, key=str) for t in tensors(inputs[key])[:1]
                 if t.dim()}
        if len(set(sizes.values())) > 1:
            shown = ", ".join(f"{key}: {size}" for key, size in sizes.items())
            raise InputError(
                f"the batch's tensors have different leading sizes ({shown}), so bncheck cannot tell how many "
                "samples it holds; yield torch_geometric Data/Batch objects (the batch size is their number of "
                "graphs) or dicts whose tensors all start with the batch size"
            )
    first = tensors(inputs)
    return int(first[0].shape[0]) if first and first[0].dim() else 0


def rebuild(sequence: Any, items: list) -> Any:
    """A list, tuple or namedtuple of the same type holding ``items``."""
    if hasattr(sequence, "_fields"):
        return type(sequence)(*items)
    return type(sequence)(items)


def to_device(value: Any, device: torch.device, float_dtype: Optional[torch.dtype]) -> Any:
    """Move inputs to the model's device; floating inputs also take the model's float dtype
    (a half-precision model fed float32 images would otherwise fail in its first layer)."""
    if isinstance(value, Tensor):
        if float_dtype is not None and value.is_floating_point():
            return value.to(device=device, dtype=float_dtype)
        return value.to(device)
    if isinstance(value, GraphBatch):
        return value.moved(lambda t: to_device(t, device, float_dtype))
    if isinstance(value, dict):
        return {k: to_device(v, device, float_dtype) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return rebuild(value, [to_device(v, device, float_dtype) for v in value])
    return value


def to_host(value: Any) -> Any:
    """Detached CPU copies of every tensor in a (nested) value."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, GraphBatch):
        return value.moved(lambda t: t.detach().cpu())
    if isinstance(value, dict):
        return {k: to_host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return rebuild(value, [to_host(v) for v in value])
    return value


def model_placement(model: nn.Module) -> tuple[torch.device, Optional[torch.dtype]]:
    """The device of the model's first tensor, and the dtype of its first floating parameter."""
    device, dtype = None, None
    for tensor in (*model.parameters(), *model.buffers()):
        if isinstance(tensor, nn.parameter.UninitializedTensorMixin):
            continue
        device = device or tensor.device
        if dtype is None and isinstance(tensor, nn.Parameter) and tensor.is_floating_point():
            dtype = tensor.dtype
    return device or torch.device("cpu"), dtype


def _export_hint(model: nn.Module) -> str:
    """For torch.export programs: the input shape they were exported with (often baked in)."""
    example = getattr(model, "example_inputs", None)
    shapes = [tuple(t.shape) for t in tensors(example)] if example is not None else []
    if not shapes or not shapes[0]:
        return ""
    return (
        f"; the program was exported with input shape {shapes[0]} and may only accept that batch size "
        f"(try $batch_size={shapes[0][0]}, or re-export with dynamic shapes)"
    )


_FORWARDS = [0]


def forwards_run() -> int:
    """How many forwards ``forward`` has run in this process (the plan of passes counts each pass's)."""
    return _FORWARDS[0]


def takes_stacked(model: Any) -> bool:
    """A detector that takes its images as one ``[N, C, H, W]`` tensor, not as a list:
    ultralytics' models (by their class's module; nothing is imported)."""
    return any(getattr(c, "__module__", "").startswith("ultralytics.") for c in type(model).__mro__)


def forward(model: nn.Module, inputs: Any, mode: str) -> Any:
    """``model(inputs)``; a failure inside the model becomes one InputError line naming the
    input shape and the likely fix."""
    _FORWARDS[0] += 1
    try:
        if isinstance(inputs, dict):
            return model(**inputs)
        if isinstance(inputs, ImageList):
            if takes_stacked(model) and len({tuple(t.shape) for t in inputs}) == 1:
                return model(torch.stack(list(inputs)))  # ultralytics' YOLO takes [N, C, H, W]
            return model(list(inputs))
        if isinstance(inputs, GraphBatch):
            return model(*_graph_call(model, inputs.data))
        if isinstance(inputs, (list, tuple)):
            return model(*inputs)
        return model(inputs)
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as exc:
        detail = first_line(exc, 300)
        shapes = [tuple(t.shape) for t in tensors(inputs)]
        integer = next((t.dtype for t in tensors(inputs) if not (t.is_floating_point() or t.is_complex())), None)
        if integer is not None and ("type" in detail.lower() or "dtype" in detail.lower()):
            detail += (
                f" (the data is {integer}: tensor files are fed to the model as stored; save them as float, "
                "normalized as in training)"
            )
        if isinstance(inputs, ImageList):
            detail += (" (the model got a list of images, as detectors take them: a COCO annotation file or an "
                       "(images, targets) pipeline is detection data; for a classifier pass a folder of images)")
        if "Expected more than 1 value per channel" in detail:
            raise InputError(
                f"a BN layer got a single value per channel in train mode (input shape {shapes}); "
                "use $batch_size=2 or more"
            ) from None
        raise InputError(
            f"the model's {mode}-mode forward pass failed on input of shape "
            f"{shapes[0] if len(shapes) == 1 else shapes}: {detail}; check that the data "
            f"matches the model (size, channels, transforms, $arch_kwargs){_export_hint(model)}"
        ) from None


def _dataset_pair(data: Any) -> Optional[tuple[Tensor, Optional[Tensor]]]:
    """A whole dataset given as one tensor, or as ``(inputs, labels)`` with one label per row."""
    if isinstance(data, Tensor):
        return data, None
    if (
        isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data)
        and data[1].dim() == 1 and data[0].dim() >= 2 and data[0].shape[0] == data[1].shape[0]
    ):
        return data[0], data[1]
    return None


def iter_batches(data: Any, *, batch_size: int, num_batches: Optional[int]) -> Iterator[Any]:
    """The batches of ``data`` the caller meant, at most ``num_batches`` of them.

    ``data`` is a tensor (or an ``(inputs, labels)`` pair of tensors) holding the whole
    sample, cut into batches of ``batch_size`` -- a last batch of one sample joins the one
    before it, since train-mode BN cannot normalize a single sample; or a ``DataLoader`` or
    any other iterable of batches, used as it yields them.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 2:
        raise UsageError(f"$batch_size must be an integer of at least 2, got {batch_size!r}")
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise UsageError(f"$num_batches must be a positive integer or None, got {num_batches!r}")
    pair = _dataset_pair(data)
    if pair is not None:
        inputs, labels = pair
        if inputs.dim() < 2:
            raise UsageError(f"$data is a tensor of shape {list(inputs.shape)}; it needs a batch dimension first")
        yield from _slices(inputs, labels, batch_size, num_batches)
        return
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise UsageError(
            f"$data must be a tensor, a DataLoader or an iterable of batches, not {type(data).__name__}"
        )
    # islice: a DataLoader is never asked for a batch beyond the cap (no wasted decode)
    yield from itertools.islice(data, num_batches)


def _slices(inputs: Tensor, labels: Optional[Tensor], batch_size: int, num_batches: Optional[int]) -> Iterator:
    total = inputs.shape[0]
    if num_batches is not None:
        total = min(total, batch_size * num_batches)
    for start, stop in batch_bounds(total, batch_size):
        yield (inputs[start:stop], labels[start:stop]) if labels is not None else inputs[start:stop]


def batch_bounds(total: int, batch_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each batch over ``total`` samples; a lone last sample joins the
    batch before it (train-mode BN cannot normalize one sample on its own)."""
    bounds = [(start, min(start + batch_size, total)) for start in range(0, total, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        (start, _), _last = bounds[-2], bounds.pop()
        bounds[-1] = (start, total)
    return bounds


class OnDevice:
    """Moves the model to ``device`` for the run and back afterwards (parameters are moved in
    place, so the caller's references and optimizer stay valid and the values bit-identical)."""

    def __init__(self, model: nn.Module, device: Any) -> None:
        self.model = model
        self.home, _ = model_placement(model)
        self.target = self.home if device is None else _resolve_device(device)

    def __enter__(self) -> torch.device:
        if self.target != self.home:
            self.model.to(self.target)
        return self.target

    def __exit__(self, *exc: object) -> None:
        if self.target != self.home:
            self.model.to(self.home)


def _resolve_device(device: Any) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"$device {device!r} is not a device; use 'cpu', 'cuda', 'cuda:1' or 'auto'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("$device cuda, but CUDA is not available here; use $device=cpu")
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved
