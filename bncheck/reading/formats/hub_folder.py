"""Model folders as the Hugging Face Hub stores them, read from local disk (never a download).

Two layouts:

- a **timm export** (``timm.models.save_for_hf`` / ``push_to_hf_hub``): ``config.json`` with
  ``architecture``, ``num_classes`` (and ``model_args``, ``pretrained_cfg`` with the
  preprocessing), weights in ``model.safetensors`` or ``pytorch_model.bin``;
- a **transformers model** (``save_pretrained``): ``config.json`` with ``architectures`` /
  ``model_type``, weights in ``model.safetensors`` or ``pytorch_model.bin``, either possibly
  sharded with an ``.index.json``; built with transformers' own classes from the local config
  (transformers is an optional extra).

A folder checkpoint writes back as a folder: every file copied as is, the weight files with
the model's new BN buffers in their own format and dtype, the whole folder renamed into place
at the end.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn

from bncheck.errors import InputError, first_line
from bncheck.reading.architectures import build_arch, load_state_into, sha256_of
from bncheck.reading.formats.base import Checkpoint, Format, Probe, momentum_source
from bncheck.reading.sizing import build_sized, tensor_bytes
from bncheck.reading.untrusted import shown
from bncheck.reporting.report import ModelInfo

CONFIG = "config.json"
PREPROCESSOR = "preprocessor_config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class WeightFile:
    """One file of the folder's weights and the keys it holds."""

    name: str
    keys: list[str]
    safetensors: bool
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class ModelFolder:
    """What the folder holds, before any model is built."""

    path: Path
    kind: str
    """``timm-folder`` or ``transformers-folder``."""
    config: dict[str, Any]
    files: list[WeightFile]
    state: dict[str, Tensor]

    KINDS: ClassVar[tuple[str, ...]] = ("timm-folder", "transformers-folder")

    def preprocessing(self) -> dict[str, Any]:
        """Image preprocessing the folder documents (mean, std, resize, crop), as bncheck's data
        settings; empty when it documents none."""
        if self.kind == "timm-folder":
            return _timm_preprocessing(self.config.get("pretrained_cfg") or {})
        return _transformers_preprocessing(self.path / PREPROCESSOR)


def read_model_folder(path: Path) -> ModelFolder:
    """Read ``config.json`` and every weight file of a Hub-style folder; an InputError naming
    what was looked for when the folder is not one."""
    from bncheck.reading.untrusted import folder_member

    config_path = path / CONFIG
    if not config_path.is_file():
        raise InputError(
            f"checkpoint {path} is a directory without {CONFIG}; pass the checkpoint file inside it, or a "
            "timm / transformers model folder (config.json + model.safetensors or pytorch_model.bin)"
        )
    from bncheck.reading.untrusted import read_text_bounded

    folder_member(path, CONFIG, "the model folder")  # a config.json linked from elsewhere is not this folder's
    try:
        config = json.loads(read_text_bounded(config_path, "model folder config"))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{config_path} is not readable JSON ({first_line(exc)}); re-save the model folder") from None
    if not isinstance(config, dict):
        raise InputError(f"{config_path} holds a {type(config).__name__}, not a JSON object; re-save the model folder")
    if isinstance(config.get("architecture"), str):
        kind = "timm-folder"
    elif isinstance(config.get("architectures"), list) or isinstance(config.get("model_type"), str):
        kind = "transformers-folder"
    else:
        raise InputError(
            f"{path} is neither a timm export ({CONFIG} with 'architecture') nor a transformers model ({CONFIG} "
            "with 'architectures' or 'model_type'); pass a checkpoint file with --arch instead"
        )
    files = _weight_files(path)
    state: dict[str, Tensor] = {}
    for weight in files:
        tensors = _read_weights(path / weight.name, weight)  # _weight_files resolved every name inside the folder
        weight.keys = list(tensors)
        state.update(tensors)
    return ModelFolder(path, kind, config, files, state)


def _weight_files(path: Path) -> list[WeightFile]:
    """The weight files, safetensors first; shards listed by an index file."""
    from bncheck.reading.untrusted import folder_member, read_text_bounded

    for index_name in INDEX_FILES:
        index_path = path / index_name
        if index_path.is_file():
            folder_member(path, index_name, "the model folder")
            try:
                weight_map = json.loads(read_text_bounded(index_path, "shard index"))["weight_map"]
                names = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
                raise InputError(f"{index_path} is not a readable shard index ({first_line(exc)})") from None
            for name in names:  # every name resolved inside the folder before anything is read or written
                folder_member(path, name, f"the shard index {index_path}")
            missing = [n for n in names if not (path / n).is_file()]
            if missing:
                raise InputError(f"{index_path} lists {missing[0]}, which is not in {path}; download every shard")
            return [WeightFile(n, [], n.endswith(".safetensors")) for n in names]
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            folder_member(path, name, "the model folder")
            return [WeightFile(name, [], name.endswith(".safetensors"))]
    raise InputError(
        f"{path} has a {CONFIG} but no weights (looked for {', '.join(WEIGHT_FILES)} and their sharded "
        f"{' / '.join(INDEX_FILES)}); download the weights into the folder"
    )


def _read_weights(file: Path, weight: WeightFile) -> dict[str, Tensor]:
    from bncheck.reading.untrusted import check_regular_file

    check_regular_file(file, "weight file")
    if weight.safetensors:
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt", device="cpu") as reader:
                weight.metadata = dict(reader.metadata() or {})
                return {key: reader.get_tensor(key) for key in reader.keys()}  # noqa: SIM118 - not a dict
        except Exception as exc:
            raise InputError(f"{file} is not a readable safetensors file ({first_line(exc)}); re-download it") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{file} is not a readable PyTorch weights file ({first_line(exc)}); re-download it") from None
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise InputError(f"{file} does not hold a state_dict of tensors; re-save the model folder")
    return dict(obj)


def build_from_folder(folder: ModelFolder) -> tuple[nn.Module, str]:
    """The model the folder describes with its weights loaded (eval mode), and the arch spec
    shown in reports."""
    from bncheck.reading.architectures import load_state_into

    if folder.kind == "timm-folder":
        model, spec = _build_timm(folder)
    else:
        model, spec = _build_transformers(folder)
    load_state_into(model, folder.state, spec, folder.path, ignore_missing=_tied_keys(model))
    return model.eval(), spec


def _build_timm(folder: ModelFolder) -> tuple[nn.Module, str]:
    name = folder.config["architecture"]
    spec = f"timm:{name}"
    try:
        import timm
    except ImportError:
        raise InputError(f"{folder.path} is a timm model folder; install timm: pip install 'bncheck[timm]'") from None
    kwargs = dict(folder.config.get("model_args") or {})
    if "num_classes" in folder.config:
        kwargs.setdefault("num_classes", folder.config["num_classes"])
    kwargs.pop("pretrained", None)
    if not timm.is_model(name):
        raise InputError(f"{folder.path}: timm {timm.__version__} has no model {name!r}; upgrade timm")
    _check_classes(folder, kwargs.get("num_classes"))
    try:
        with warnings.catch_warnings(), sealed():
            warnings.simplefilter("ignore")
            return build_sized(lambda: timm.create_model(name, pretrained=False, **kwargs),
                               f"{folder.path / CONFIG}", _weights_bytes(folder)), spec
    except InputError:
        raise
    except Exception as exc:
        raise InputError(
            f"{folder.path}: building timm model {name} with {shown(kwargs, 120)} raised {type(exc).__name__}: "
            f"{first_line(exc)}"
        ) from None


def _build_transformers(folder: ModelFolder) -> tuple[nn.Module, str]:
    try:
        import transformers
    except ImportError:
        raise InputError(
            f"{folder.path} is a transformers model folder; install transformers: pip install 'bncheck[hub]'"
        ) from None
    names = folder.config.get("architectures") or []
    name = names[0] if names and isinstance(names[0], str) else None
    try:
        with warnings.catch_warnings(), _quiet_transformers(transformers), sealed():
            warnings.simplefilter("ignore")
            # a folder's auto_map names Python files inside it: never run them, never ask on stdin
            config = transformers.AutoConfig.from_pretrained(str(folder.path), local_files_only=True,
                                                             trust_remote_code=False)
            if name is not None and hasattr(transformers, name):
                model_class = getattr(transformers, name)
                build = lambda: model_class._from_config(config)  # noqa: E731
            else:
                name = name or "AutoModel"
                build = lambda: transformers.AutoModel.from_config(config, trust_remote_code=False)  # noqa: E731
            model = build_sized(build, f"{folder.path / CONFIG}", _weights_bytes(folder))
    except InputError:
        raise
    except Exception as exc:
        raise InputError(
            f"{folder.path}: transformers {transformers.__version__} cannot build {name or 'the model'} from its "
            f"{CONFIG} ({type(exc).__name__}: {first_line(exc)}); upgrade transformers or check the config"
        ) from None
    return model, f"transformers:{name}"


def _weights_bytes(folder: ModelFolder) -> int:
    return tensor_bytes(folder.state.values())


def _check_classes(folder: ModelFolder, classes: Any) -> None:
    """The head a config asks for must be one the weights hold: checked before building, so a
    config claiming 5,000,000 classes is refused instead of allocating a 10 GB classifier."""
    if classes is None or classes == 0:
        return
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 0:
        raise InputError(f"{folder.path / CONFIG}: num_classes must be a whole number, got {str(classes)[:40]}")
    if not any(t.dim() in (1, 2) and t.shape[0] == classes for t in folder.state.values()):
        raise InputError(
            f"{folder.path / CONFIG} asks for num_classes {classes}, but no weight in the folder has {classes} "
            "rows; the config does not match its weights: re-save the model folder"
        )


@contextmanager
def sealed() -> Iterator[None]:
    """While a library builds a model from a folder: offline (a config naming ``hf-hub:`` weights
    or a remote backbone makes no request), stdin empty (no prompt is ever answered) and
    stdout sent to stderr (no library chatter inside ``--json -``)."""
    import io
    import os
    import sys

    saved = {key: os.environ.get(key) for key in OFFLINE_ENV}
    os.environ.update(dict.fromkeys(OFFLINE_ENV, "1"))
    constants = sys.modules.get("huggingface_hub.constants")
    was_offline = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:  # read at import: set the live value too
        constants.HF_HUB_OFFLINE = True
    stdin = sys.stdin
    sys.stdin = io.StringIO("")
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdin = stdin
        if constants is not None:
            constants.HF_HUB_OFFLINE = was_offline
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


class _quiet_transformers:
    """transformers' logger prints warnings about weights we load ourselves."""

    def __init__(self, module: Any) -> None:
        self.logging = module.logging

    def __enter__(self) -> None:
        self.level = self.logging.get_verbosity()
        self.logging.set_verbosity_error()

    def __exit__(self, *exc: object) -> None:
        self.logging.set_verbosity(self.level)


def _tied_keys(model: nn.Module) -> set[str]:
    """Keys a transformers model ties to another parameter (saved once, so absent from the file)."""
    tied = getattr(model, "_tied_weights_keys", None) or getattr(model, "all_tied_weights_keys", None) or ()
    if isinstance(tied, Mapping):
        return set(tied)
    return set(tied)


def write_model_folder(folder: ModelFolder, model: nn.Module, bn_keys: list[str], prefix: str, tmp: Path) -> None:
    """Write the folder to ``tmp`` (a new directory): every file copied, the weight files with
    the model's current BN buffers in the file's dtype."""
    from bncheck.reading.untrusted import link_roots

    copy_folder(folder.path, tmp, keep_links_to={CONFIG, PREPROCESSOR, *INDEX_FILES, *(w.name for w in folder.files)},
                roots=link_roots(folder.path))
    current = model.state_dict()
    for weight in folder.files:
        keys = set(weight.keys)
        if not any(prefix + key in keys for key in bn_keys):
            continue
        target = tmp / weight.name  # weight.name was resolved inside the input folder when it was read
        target.unlink(missing_ok=True)  # a copied file may be a hard link or read-only: write a new one
        tensors = {key: folder.state[key] for key in weight.keys}
        for key in bn_keys:
            stored = prefix + key
            if stored in tensors and key in current:
                old = tensors[stored]
                tensors[stored] = current[key].detach().to(device="cpu", dtype=old.dtype).clone()
        if weight.safetensors:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in tensors.items()}, str(target), metadata=weight.metadata or None)
        else:
            torch.save(tensors, str(target))


def copy_folder(source: Path, target: Path, keep_links_to: set[str], roots: Optional[list[Path]] = None) -> None:
    """Copy the regular files of ``source`` (and of its real subfolders) to a new ``target``.
    Links are not followed -- a link to an outside folder would copy it into ``--out``, one to
    /dev/zero would fill the disk -- except a top-level model file bncheck read itself
    (``keep_links_to``: a Hugging Face cache snapshot links each file to its blob), copied
    when it names a regular file inside ``roots`` (the folder, or its Hugging Face cache blobs: a
    kept name linked to ``~/.aws/credentials`` is not copied). FIFOs, sockets and devices are
    skipped."""
    import stat

    from bncheck.reading.untrusted import inside_roots

    target.mkdir()
    for entry in sorted(source.iterdir()):
        destination = target / entry.name
        if entry.is_symlink():
            if entry.name in keep_links_to and roots is not None and inside_roots(entry, roots):
                try:
                    if stat.S_ISREG(entry.stat().st_mode):
                        shutil.copyfile(entry, destination)
                except OSError:
                    pass
            continue
        mode = entry.lstat().st_mode
        if stat.S_ISDIR(mode):
            copy_folder(entry, destination, set())
        elif stat.S_ISREG(mode):
            shutil.copy2(entry, destination)


def _timm_preprocessing(cfg: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if _floats3(cfg.get("mean")):
        out["mean"] = [float(v) for v in cfg["mean"]]
    if _floats3(cfg.get("std")):
        out["std"] = [float(v) for v in cfg["std"]]
    size = cfg.get("test_input_size") or cfg.get("input_size")
    crop_pct = cfg.get("test_crop_pct") or cfg.get("crop_pct")
    if isinstance(size, (list, tuple)) and len(size) == 3 and all(isinstance(v, int) for v in size):
        out["crop"] = int(size[-1])
        if isinstance(crop_pct, (int, float)) and 0 < crop_pct <= 1:
            out["resize"] = int(size[-1] / crop_pct)
    return out


def _transformers_preprocessing(path: Path) -> dict[str, Any]:
    from bncheck.reading.untrusted import folder_member, read_text_bounded

    if not path.is_file():
        return {}
    folder_member(path.parent, path.name, "the model folder")  # a link out of the folder is refused, never read
    try:
        cfg = json.loads(read_text_bounded(path, "preprocessor config"))
    except (OSError, InputError, json.JSONDecodeError, RecursionError):
        return {}
    if not isinstance(cfg, dict):
        return {}
    out: dict[str, Any] = {}
    if cfg.get("do_normalize", True):
        if _floats3(cfg.get("image_mean")):
            out["mean"] = [float(v) for v in cfg["image_mean"]]
        if _floats3(cfg.get("image_std")):
            out["std"] = [float(v) for v in cfg["image_std"]]
    size = cfg.get("crop_size") if cfg.get("do_center_crop") else None
    crop = _edge(size)
    resize = _edge(cfg.get("size"))
    crop_pct = cfg.get("crop_pct")
    if crop is None and resize is not None and isinstance(crop_pct, (int, float)) and 0 < crop_pct < 1:
        crop, resize = resize, int(resize / crop_pct)  # ConvNeXt/ResNet processors: resize/crop_pct, then crop
    if resize is not None:
        out["resize"] = resize
    if crop is not None:
        out["crop"] = crop
    return out


def _edge(size: Any) -> Optional[int]:
    if isinstance(size, int):
        return size
    if isinstance(size, Mapping):
        for key in ("shortest_edge", "height"):
            if isinstance(size.get(key), int):
                return size[key]
    return None


def _floats3(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) in (1, 3) and all(
        isinstance(v, (int, float)) for v in value
    )


class ModelFolderFormat(Format):
    """A Hub-style model folder (timm export or transformers ``save_pretrained``)."""

    name = "model-folder"
    writes_folder = True

    def sniff(self, probe: Probe) -> bool:
        return False  # folders never reach the file probe

    def read_folder(self, path: Path, arch: Optional[str], arch_kwargs: dict) -> Checkpoint:
        import hashlib

        folder = read_model_folder(path)
        if arch is not None:  # the user's builder, the folder's weights
            model = build_arch(arch, arch_kwargs)
            prefix = load_state_into(model, folder.state, arch, path)
            model.eval()
            spec, momentum = arch, momentum_source(arch)
        else:
            model, spec = build_from_folder(folder)
            prefix = ""
            momentum = "library-default" if folder.kind == "timm-folder" else "builder"
        digest = hashlib.sha256()
        for weight in folder.files:
            digest.update(sha256_of(path / weight.name).encode())
        info = ModelInfo(str(path), spec, folder.kind, digest.hexdigest(), 0, momentum_from=momentum)
        return Checkpoint(model, info, path, self, container=folder, prefix=prefix,
                          preprocessing=folder.preprocessing())

    def write(self, checkpoint: Checkpoint, tmp: Path) -> None:
        write_model_folder(checkpoint.container, checkpoint.module, checkpoint.bn_buffer_keys(), checkpoint.prefix, tmp)
