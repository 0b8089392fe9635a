"""Architectures and state_dicts: build a model from ``--arch``, find the weights and their key
prefix in a checkpoint's contents, and load them with a one-line error for every mismatch.

Parse, build, execute: everything here runs before the first forward pass, and every
failure is an ``InputError``/``UsageError`` with one line naming the problem and the fix.
Nothing here writes to the user's files; full pickles load only when trusted.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Optional

from torch import Tensor, nn

from bncheck.config import check_arch_kwargs
from bncheck.errors import InputError, UsageError, first_line
from bncheck.reading.sizing import build_sized
from bncheck.reading.untrusted import BUILDER_SOURCES

# Keys under which training code nests the weights, most specific first.
# Prefix names preferred when several prefixes fit the architecture equally well.
PREFERRED_PREFIXES = ("module", "model", "_orig_mod", "net", "student", "backbone", "ema", "model_ema", "teacher")
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "ema", "model_ema", "net", "module", "weights")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def parse_arch_kwargs(text: Optional[str]) -> dict[str, Any]:
    """``--arch-kwargs`` as a YAML/JSON mapping, e.g. ``'{num_classes: 10}'``."""
    if text is None or not text.strip():
        return {}
    import yaml

    from bncheck.reading.untrusted import safe_yaml, shown

    try:
        value = safe_yaml(text, "$arch_kwargs")
    except yaml.YAMLError:
        raise UsageError(f"$arch_kwargs {shown(text)} is not valid YAML; write e.g. '{{num_classes: 10}}'") from None
    return check_arch_kwargs(value, "$arch_kwargs")


def _load_attr(module_name: str, attr: str, spec: str, what: str = "$arch") -> Callable:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(
            f"{what} {spec}: cannot import {module_name} ({first_line(exc)}); check the module path and PYTHONPATH"
        ) from None
    except Exception as exc:  # a user module that fails while importing
        raise InputError(
            f"{what} {spec}: importing {module_name} raised {type(exc).__name__}: {first_line(exc)}"
        ) from None
    return _attr(module, attr, spec, what)


def _attr(module: Any, attr: str, spec: str, what: str = "$arch") -> Callable:
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise InputError(f"{what} {spec}: {getattr(module, '__name__', module)} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise InputError(f"{what} {spec}: {attr} is not callable")
    return target


def _load_file_attr(path_text: str, attr: str, spec: str, what: str = "$arch") -> Callable:
    path = Path(path_text)
    if not path.is_file():
        raise InputError(f"{what} {spec}: file {path} does not exist")
    name = f"bncheck_user_{re.sub(r'[^0-9a-zA-Z_]', '_', path.stem)}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise InputError(f"{what} {spec}: cannot import {path} as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.resolve().parent))
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise InputError(f"{what} {spec}: running {path} raised {type(exc).__name__}: {first_line(exc)}") from None
    finally:
        sys.path.remove(str(path.resolve().parent))
    return _attr(module, attr, spec, what)


def load_callable(spec: str, what: str) -> Callable:
    """``package.module:callable`` or ``path/to/file.py:callable`` (``what`` names the flag in
    messages, e.g. ``$data``)."""
    source, _, name = spec.rpartition(":")
    if source.endswith(".py") or "/" in source or "\\" in source:
        return _load_file_attr(source, name, spec, what)
    return _load_attr(source, name, spec, what)


def _unknown_model(spec: str, source: str, name: str, available: list[str]) -> InputError:
    close = difflib.get_close_matches(name, sorted(available), n=3)
    suggestion = f"; did you mean {', '.join(f'{source}:{c}' for c in close)}?" if close else ""
    return InputError(f"$arch {spec}: {source} has no model {name!r}{suggestion}")


def _torchvision_builder(name: str, spec: str) -> Callable:
    import torchvision.models as tvm

    available = tvm.list_models()
    if name not in available:
        raise _unknown_model(spec, "torchvision", name, available)

    builder = tvm.get_model_builder(name)
    # Never download: every weights argument (weights, weights_backbone, ...) defaults to None.
    weight_args = [p for p in inspect.signature(builder).parameters if p == "weights" or p.startswith("weights_")]

    def build(**kwargs: Any) -> nn.Module:
        for arg in weight_args or ["weights"]:
            kwargs.setdefault(arg, None)
        return builder(**kwargs)

    return build


def _timm_builder(name: str, spec: str) -> Callable:
    try:
        import timm
    except ImportError:
        raise InputError(f"$arch {spec} needs timm: pip install timm") from None
    if not timm.is_model(name):
        raise _unknown_model(spec, "timm", name, timm.list_models())

    def build(**kwargs: Any) -> nn.Module:
        kwargs.setdefault("pretrained", False)  # never download
        return timm.create_model(name, **kwargs)

    return build


def resolve_arch(spec: str) -> Callable[..., nn.Module]:
    """``torchvision:NAME``, ``timm:NAME``, ``package.module:callable``, ``path/file.py:callable``."""
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise UsageError(
            f"$arch {spec!r} is not SOURCE:NAME; use torchvision:resnet18, timm:NAME, "
            "package.module:build or path/to/file.py:build"
        )
    if source == "torchvision":
        return _torchvision_builder(name, spec)
    if source == "timm":
        return _timm_builder(name, spec)
    if source.endswith(".py") or "/" in source or "\\" in source:
        return _load_file_attr(source, name, spec)
    return _load_attr(source, name, spec)


def _shown(value: Any) -> str:
    from bncheck.reading.untrusted import shown

    return shown(value, 120)


def build_arch(spec: str, kwargs: Mapping[str, Any]) -> nn.Module:
    builder = resolve_arch(spec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if spec.partition(":")[0] in BUILDER_SOURCES:  # a library's model from data: sized before allocating
                model = build_sized(lambda: builder(**kwargs), f"$arch {spec} with $arch_kwargs {_shown(dict(kwargs))}")
            else:  # the user's own code, named on their command line: built as they wrote it
                model = builder(**kwargs)
    except InputError:
        raise
    except TypeError as exc:
        from bncheck.reading.untrusted import shown

        raise InputError(
            f"$arch {spec}: the builder rejected $arch_kwargs {shown(dict(kwargs), 120)}: {first_line(exc)}"
        ) from None
    except Exception as exc:
        raise InputError(f"$arch {spec}: building the model raised {type(exc).__name__}: {first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"$arch {spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _looks_like_state_dict(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) for k in value)
        and all(isinstance(v, Tensor) for v in value.values())
    )


def locate_state_dict(
    obj: Any, path: Path, select: Optional[str] = None
) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """Find the weights in whatever the training code saved: a state_dict, or one nested
    under a known key (Lightning ``state_dict``, ``model_state_dict``, ``ema``, ...), or under
    ``select`` (``state_dict_ema``: a dotted path for deeper nesting) when the user picks one.
    Returns the tensors and the keys that lead to their mapping inside ``obj`` (``()`` for
    ``obj`` itself), so a writer can put new tensors back in the same place."""
    if select is not None:
        inner: Any = obj
        parts = tuple(select.split("."))
        for part in parts:
            if not isinstance(inner, Mapping) or part not in inner:
                held = ", ".join(weight_entries(obj)) or "none"
                raise InputError(
                    f"{path} has no weights under {select!r}; the models it holds sit under: {held} "
                    "(pick one with $weights)"
                )
            inner = inner[part]
        state, rest = locate_state_dict(inner, path)
        return state, (*parts, *rest)
    if _looks_like_state_dict(obj):
        return dict(obj), ()
    if isinstance(obj, Mapping):
        for key in NESTED_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                try:
                    state, inner_keys = locate_state_dict(obj[key], path)
                except InputError:
                    continue
                return state, (key, *inner_keys)
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
        if tensors and len(tensors) >= len(obj) / 2:
            return tensors, ()
        keys = ", ".join(sorted(map(str, obj))[:8])
        raise InputError(
            f"{path} holds a dict without model weights under a known key (found: {keys}); "
            f"save the state_dict, nest it under one of: {', '.join(NESTED_KEYS)}, or pick the entry with $weights"
        )
    raise InputError(f"{path} holds a {type(obj).__name__}, not model weights or a module")


def weight_entries(obj: Any) -> list[str]:
    """Top-level entries of a checkpoint dict that each hold a model's weights: the live
    weights and the EMA/SWA copies that timm's CheckpointSaver (``state_dict_ema``), Lightning
    callbacks and hand-written loops keep beside them. Known live-weight keys first."""
    if not isinstance(obj, Mapping) or _looks_like_state_dict(obj):
        return []
    found = []
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, Mapping) or not value:
            continue
        tensors = sum(isinstance(v, Tensor) for v in value.values())
        nested = any(isinstance(value.get(k), Mapping) for k in NESTED_KEYS)
        if (tensors and tensors >= len(value) / 2) or nested:
            found.append(key)
    rank = {key: i for i, key in enumerate(NESTED_KEYS)}
    return sorted(found, key=lambda k: rank.get(k, len(rank)))


def find_prefix(state: Mapping[str, Tensor], expected: set[str]) -> str:
    """The key prefix under which the architecture's weights sit (``""`` for none).

    Wrappers add prefixes (``module.`` from DDP, ``_orig_mod.`` from torch.compile,
    ``model.`` from Lightning, any mix of them), and a training checkpoint may hold other
    modules beside the model (a loss, a teacher). Every dotted prefix of the keys is a
    candidate; the one that makes the most keys match the architecture wins, and only the
    keys under it are kept. Ties go to the shortest prefix, then to the usual wrapper and
    deployment names (``module.``, ``model.``, ``student.`` before ``teacher.``), then
    alphabetically -- never to set order.
    """
    candidates = {""}
    for key in state:
        parts = key.split(".")
        for depth in range(1, min(len(parts), 4)):
            candidates.add(".".join(parts[:depth]) + ".")

    def matches(prefix: str) -> int:
        return sum(1 for k in state if k.startswith(prefix) and k[len(prefix):] in expected)

    def preference(prefix: str) -> tuple:
        first = prefix.split(".", 1)[0]
        rank = PREFERRED_PREFIXES.index(first) if first in PREFERRED_PREFIXES else len(PREFERRED_PREFIXES)
        return (len(prefix.split(".")), rank, prefix)

    best = max(sorted(candidates, key=preference), key=matches)
    if not best or matches(best) <= matches(""):
        return ""
    return best


def _summarize(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_state_into(
    model: nn.Module, state: dict[str, Tensor], spec: str, path: Path, *, ignore_missing: frozenset | set = frozenset()
) -> str:
    """Load ``state`` (under whatever prefix fits) into ``model``; returns that prefix.
    Any mismatch is an InputError naming the keys and the likely fix. ``ignore_missing``:
    keys the file may lack (weights a model ties to another and saves once)."""
    expected = model.state_dict()
    prefix = find_prefix(state, set(expected))
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    resizing = _self_loading_prefixes(model)
    mismatched = [
        (k, tuple(v.shape), tuple(expected[k].shape))
        for k, v in state.items()
        if k in expected and isinstance(expected[k], Tensor) and tuple(v.shape) != tuple(expected[k].shape)
        and k.rpartition(".")[0] not in resizing
    ]
    # Checkpoints from before PyTorch 0.4.1, and many converted ones, lack num_batches_tracked;
    # it only counts updates, so it stays at the model's value (reported as never-updated
    # only when it is 0 and the statistics also look untouched).
    missing = [
        k for k in expected if k not in state and not k.endswith("num_batches_tracked") and k not in ignore_missing
    ]
    unexpected = [k for k in state if k not in expected]
    wrong_kind = [
        (k, v.dtype, expected[k].dtype) for k, v in state.items()
        if k in expected and expected[k].is_floating_point() and not v.is_floating_point()
    ]
    if wrong_kind:
        key, got, want = wrong_kind[0]
        raise InputError(
            f"{path} stores {len(wrong_kind)} tensors in a dtype $arch {spec} cannot take (first: {key} is "
            f"{got}, the model uses {want}); export the weights unquantized"
        )
    named = sum(1 for k in expected if k in state)
    if missing or unexpected:  # the bigger problem: another architecture (shapes then say little)
        parts = []
        if missing:
            parts.append(f"missing {_summarize(missing)}")
        if unexpected:
            parts.append(f"unexpected {_summarize(unexpected)}")
        shapes = f", {len(mismatched)} of them with other shapes" if mismatched else ""
        guess = guess_arch(state)
        advice = f"its keys look like {guess}" if guess else "check $arch and $arch_kwargs"
        raise InputError(
            f"{path} does not fit $arch {spec} ({named} of {len(expected)} keys match by name{shapes}; "
            f"{'; '.join(parts)}); {advice}"
        )
    if mismatched:
        key, got, want = mismatched[0]
        hint = ""
        if key.endswith(".weight") and len(got) == 2 and len(want) == 2 and got[1] == want[1]:
            hint = f"; try $arch_kwargs '{{num_classes: {got[0]}}}'"
        count = f"{len(mismatched)} tensor has" if len(mismatched) == 1 else f"{len(mismatched)} tensors have"
        raise InputError(
            f"{path} does not fit $arch {spec}: all {named} keys match by name, but {count} other shapes "
            f"(first: {key} is {list(got)} in the file, {list(want)} in the model){hint}"
        )
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a module that loads its own state refused it
        raise InputError(f"{path} does not fit $arch {spec}: {first_line(exc)}") from None
    left = [k for k in result.missing_keys if not k.endswith("num_batches_tracked") and k not in ignore_missing]
    if left or result.unexpected_keys:  # the checks above should have caught these
        raise InputError(f"{path} does not fit $arch {spec}: {_summarize(left + list(result.unexpected_keys))}")
    return prefix




def _self_loading_prefixes(model: nn.Module) -> set[str]:
    """Modules that load their own state and may resize buffers while doing it (QAT's
    FakeQuantize and observers turn a per-tensor ``scale`` of shape [1] into the per-channel
    [64] the file holds): bncheck's shape check must not be stricter than their loading.
    torch.nn's own modules (BatchNorm included) keep their shapes, so they are not among them."""
    base = nn.Module._load_from_state_dict
    found = set()
    for name, module in model.named_modules():
        loader = type(module)._load_from_state_dict
        if loader is not base and not getattr(loader, "__module__", "").startswith("torch.nn.modules"):
            found.add(name)
    return found


_RESNETS = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
    ((3, 8, 36, 3), True): "resnet152",
}
_SHUFFLENETS = {24: "shufflenet_v2_x0_5", 58: "shufflenet_v2_x1_0", 88: "shufflenet_v2_x1_5", 122: "shufflenet_v2_x2_0"}
_DENSENETS = {24: "densenet121", 32: "densenet169", 48: "densenet201", 36: "densenet161"}
_HEADS = ("fc.weight", "classifier.weight", "classifier.1.weight", "classifier.3.weight", "classifier.6.weight",
          "head.fc.weight", "head.weight", "last_linear.weight")


def _blocks(keys: set[str], stem: str) -> int:
    """How many numbered children ``stem.N.`` the keys have."""
    found = {int(m.group(1)) for k in keys if (m := re.match(re.escape(stem) + r"\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def guess_arch(state: Mapping[str, Tensor]) -> Optional[str]:
    """A likely ``--arch`` (and ``--arch-kwargs``) for a state_dict, from its key names and
    shapes: torchvision's resnet, shufflenet, densenet, mobilenet, efficientnet, regnet,
    googlenet, inception and mnasnet families, and timm's ``conv_stem``/``blocks`` naming.
    None when nothing fits."""
    segmentation = _guess_segmentation(state) or _guess_smp(state)
    if segmentation is not None:
        return segmentation
    anchors = ("layer1.0.conv1.weight", "stage2.0.branch2.0.weight", "features.denseblock1", "conv_stem.weight",
               "trunk_output.block1", "Mixed_5b", "inception3a", "features.0.0.weight", "layers.0.weight",
               "conv1.weight")
    prefix = ""
    for key in sorted(state, key=len):
        hit = next((a for a in anchors if a in key), None)
        if hit is not None:
            prefix = key[: key.index(hit)]
            break
    keys = {k[len(prefix):] for k in state if k.startswith(prefix)}
    shape = {k[len(prefix):]: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}
    name, source = None, "torchvision"
    if "layer1.0.conv1.weight" in keys:
        counts = tuple(_blocks(keys, f"layer{i}") for i in range(1, 5))
        bottleneck = "layer1.0.conv3.weight" in keys
        name = _RESNETS.get((counts, bottleneck))
        conv2 = shape.get("layer1.0.conv2.weight", (0, 0))
        grouped = bottleneck and conv2[1] != conv2[0]  # ResNeXt: grouped 3x3 convolutions
        if name and grouped:
            name = {"resnet50": "resnext50_32x4d", "resnet101": "resnext101_32x8d"}.get(name, name)
    elif "stage2.0.branch2.0.weight" in keys:
        name = _SHUFFLENETS.get(shape["stage2.0.branch2.0.weight"][0])
    elif any(k.startswith("features.denseblock3.") for k in keys):
        layers = {m.group(1) for k in keys if (m := re.match(r"features\.denseblock3\.denselayer(\d+)\.", k))}
        name = _DENSENETS.get(len(layers))
    elif "conv_stem.weight" in keys and any(k.startswith("blocks.") for k in keys):
        source, name = "timm", "efficientnet_b0"  # timm naming; the variant is a guess
    elif any(k.startswith("trunk_output.") for k in keys):
        name = "regnet_y_400mf"
    elif any(k.startswith("Mixed_5b.") for k in keys):
        name = "inception_v3"
    elif any(k.startswith("inception3a.") for k in keys):
        name = "googlenet"
    elif any(k.startswith("features.1.0.block.") for k in keys):
        name = "efficientnet_b0"
    elif any(k.startswith("features.1.block.") for k in keys):
        name = "mobilenet_v3_large" if _blocks(keys, "features") > 14 else "mobilenet_v3_small"
    elif any(k.startswith("features.1.conv.") for k in keys):
        name = "mobilenet_v2"
    elif any(k.startswith("layers.") for k in keys) and "classifier.1.weight" in keys:
        name = "mnasnet1_0"
    if name is None:
        return None
    head = next((shape[h] for h in _HEADS if h in shape and len(shape[h]) == 2), None)
    kwargs = f" $arch_kwargs '{{num_classes: {head[0]}}}'" if head and head[0] != 1000 else ""
    return f"$arch {source}:{name}{kwargs}"


def _guess_segmentation(state: Mapping[str, Tensor]) -> Optional[str]:
    """torchvision's segmentation models by their heads: DeepLabV3 (an ASPP at
    ``classifier.0.convs``), FCN (``classifier.0`` a 3x3 conv) and LR-ASPP (``classifier.cbr``),
    on a ResNet-50/101 or MobileNetV3 backbone; ``aux_classifier.*`` keys need ``aux_loss: true``
    and the last classifier's width is ``num_classes``."""
    keys = set(state)
    prefix = next((k[: k.index("backbone.")] for k in sorted(keys, key=len) if "backbone." in k), None)
    if prefix is None:
        return None
    keys = {k[len(prefix):] for k in keys if k.startswith(prefix)}
    shape = {k[len(prefix):]: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}
    if "backbone.layer1.0.conv1.weight" in keys:
        blocks = _blocks(keys, "backbone.layer3")
        backbone = {6: "resnet50", 23: "resnet101"}.get(blocks)
    elif "backbone.0.0.weight" in keys:
        backbone = "mobilenet_v3_large"
    else:
        return None
    if "classifier.0.convs.0.0.weight" in keys:
        head, classes = "deeplabv3", shape.get("classifier.4.weight")
    elif "classifier.cbr.0.weight" in keys:
        head, classes = "lraspp", shape.get("classifier.high_classifier.weight")
    elif "classifier.0.weight" in keys and "classifier.4.weight" in keys:
        head, classes = "fcn", shape.get("classifier.4.weight")
    else:
        return None
    if backbone is None:
        return None
    name = f"{head}_{backbone}"
    kwargs = []
    if classes is not None:
        kwargs.append(f"num_classes: {classes[0]}")
    if any(k.startswith("aux_classifier.") for k in keys):
        kwargs.append("aux_loss: true")
    extra = f" $arch_kwargs '{{{', '.join(kwargs)}}}'" if kwargs else ""
    return f"$arch torchvision:{name}{extra}"


SMP_DECODERS = (
    ("decoder.blocks.x_0_0.", "UnetPlusPlus"), ("decoder.blocks.0.block.", "Linknet"), ("decoder.center.", "MAnet"),
    ("decoder.blocks.0.conv1.", "Unet"), ("decoder.p5.", "FPN"), ("decoder.psp.", "PSPNet"), ("decoder.fpa.", "PAN"),
    ("decoder.block1.", "DeepLabV3Plus"), ("decoder.aspp.", "DeepLabV3"),
)
"""segmentation_models_pytorch's decoders by a key only they have, first match wins (MAnet before
Unet: both have ``blocks.0.conv1``; DeepLabV3Plus before DeepLabV3: both have an ``aspp``)."""
SMP_RESNETS = {(2, 2, 2, 2, False): "resnet18", (3, 4, 6, 3, False): "resnet34", (3, 4, 6, 3, True): "resnet50",
               (3, 4, 23, 3, True): "resnet101", (3, 8, 36, 3, True): "resnet152"}


def _guess_smp(state: Mapping[str, Tensor]) -> Optional[str]:
    """segmentation_models_pytorch's models (``encoder.*``, ``decoder.*``, ``segmentation_head.*``):
    the decoder class by its keys, a ResNet encoder by its block counts (other encoders are named
    by family: their variant cannot be read off reliably), ``classes`` from the head's width."""
    prefix = next((k[: k.index("segmentation_head.")] for k in sorted(state, key=len)
                   if "segmentation_head." in k), None)
    if prefix is None:
        return None
    keys = {k[len(prefix):] for k in state if k.startswith(prefix)}
    decoder = next((name for key, name in SMP_DECODERS if any(k.startswith(key) for k in keys)), None)
    if decoder is None or not any(k.startswith("encoder.") for k in keys):
        return None
    if "encoder.layer1.0.conv1.weight" in keys:
        depth = tuple(_blocks(keys, f"encoder.layer{i}") for i in range(1, 5))
        encoder = SMP_RESNETS.get((*depth, "encoder.layer1.0.conv3.weight" in keys), "ENCODER (a ResNet)")
    elif "encoder._conv_stem.weight" in keys:
        encoder = "ENCODER (an EfficientNet: efficientnet-b0 ... b7, the one you trained)"
    else:
        encoder = "ENCODER (the encoder_name you trained with)"
    heads = sorted((k for k in keys if k.startswith("segmentation_head.") and k.endswith(".weight")),
                   key=lambda k: int(k.split(".")[1]) if k.split(".")[1].isdigit() else 0)
    classes = state[prefix + heads[0]].shape[0] if heads else None
    kwargs = [f"encoder_name: {encoder}", "encoder_weights: null"] + ([f"classes: {classes}"] if classes else [])
    return f"$arch segmentation_models_pytorch:{decoder} $arch_kwargs '{{{', '.join(kwargs)}}}'"
