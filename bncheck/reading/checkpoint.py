"""A checkpoint file read into one object that remembers its container and can write
itself back with new BatchNorm buffers.

Each format is a small reader/writer with one interface (``Format``): ``sniff`` says
whether a file is of this format, ``read`` builds the model and keeps what a writer needs
(the nesting of a state_dict, its key prefix and every other entry, safetensors metadata,
the TorchScript module, the exported program), and ``write`` puts the model's current BN
buffers into that container and saves it in the same format. ``open_checkpoint`` tries
the formats in ``FORMATS`` order. Reading never writes; ``Checkpoint.write`` refuses the
input's own path and goes through a temporary file and an atomic rename.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn

from bncheck.errors import InputError, UsageError, first_line
from bncheck.files import atomic_write, atomic_write_folder, check_output_folder, check_output_path
from bncheck.reading.architectures import (
    NESTED_KEYS,
    build_arch,
    guess_arch,
    load_state_into,
    locate_state_dict,
    sha256_of,
    weight_entries,
)
from bncheck.reading.untrusted import check_regular_file, inflation_problem, zip_members
from bncheck.reporting.report import ModelInfo
from bncheck.runtime import find_bn_layers

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class Probe:
    """What every format's ``sniff`` may look at, read once."""

    path: Path
    zip_names: list[str]
    head: bytes
    size: int
    select: Optional[str] = None
    """The entry the user picked in a checkpoint that holds several models (``--weights``)."""


@dataclass
class Checkpoint:
    """A loaded model and everything needed to save it again in its own format."""

    module: nn.Module
    info: ModelInfo
    path: Optional[Path] = None
    """The file it was read from (None: built from ``--arch`` alone)."""
    handler: Optional[Format] = None
    container: Any = None
    """What the format keeps for writing: the object torch.load returned, the safetensors
    tensors, the exported program, ..."""
    locator: tuple[str, ...] = ()
    """Keys leading from the container to the state_dict mapping (``("state_dict",)``)."""
    prefix: str = ""
    """Key prefix of the model's weights inside that mapping (``"module."``)."""
    metadata: dict[str, str] = field(default_factory=dict)
    """safetensors header metadata, kept as is."""
    preprocessing: dict[str, Any] = field(default_factory=dict)
    """Input preprocessing the checkpoint documents (a Hub folder's mean, std, resize, crop)."""

    @property
    def format(self) -> str:
        return self.info.format

    def bn_buffer_keys(self) -> list[str]:
        """The model's state_dict keys of every BN buffer (``layer1.0.bn1.running_mean``)."""
        keys = []
        for layer in find_bn_layers(self.module):
            for name in BN_BUFFERS:
                if layer.buffer(name) is not None:
                    keys.append(f"{layer.name}.{name}" if layer.name else name)
        return keys

    def write(self, out: Path, *, force: bool = False) -> None:
        """Save the model with its current BN buffers to ``out`` in the input's format:
        everything else in the file is kept as read. Never the input path; an existing
        ``out`` only with ``force``; atomic (a crash leaves no partial file)."""
        if self.handler is None or self.path is None:
            raise UsageError("a model built from $arch alone has no checkpoint format to write; give a checkpoint")
        out = Path(out)
        if isinstance(self.handler, ModelFolderFormat):
            check_output_folder(out, self.path, force=force)
            atomic_write_folder(out, lambda tmp: self.handler.write(self, tmp), replace_existing=force)
            return
        check_output_path(out, self.path, force=force)
        atomic_write(out, lambda tmp: self.handler.write(self, tmp), exclusive=not force)


def _buffers_by_key(module: nn.Module, keys: list[str]) -> dict[str, Tensor]:
    state = module.state_dict()
    return {key: state[key] for key in keys if key in state}


class Format:
    """One checkpoint format: recognise, read, write back."""

    name: ClassVar[str]

    def sniff(self, probe: Probe) -> bool:
        raise NotImplementedError

    def read(self, probe: Probe, arch: Optional[str], arch_kwargs: dict, trusted: bool, digest: str) -> Checkpoint:
        raise NotImplementedError

    def write(self, checkpoint: Checkpoint, tmp: Path) -> None:
        raise NotImplementedError


class TorchScriptFormat(Format):
    """TorchScript archives. Their buffers are mutable: load, update, save."""

    name = "torchscript"

    def sniff(self, probe: Probe) -> bool:
        names = probe.zip_names
        return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)

    def read(self, probe: Probe, arch: Optional[str], arch_kwargs: dict, trusted: bool, digest: str) -> Checkpoint:
        if not trusted:  # its code/ is compiled and run while it loads (see untrusted.py)
            raise InputError(
                f"{probe.path} is a TorchScript archive: a program whose code runs while it loads (it can "
                "read and write files), so bncheck loads it only with $trust_checkpoint; pass that if you "
                "trust the file, or export the model with torch.export (.pt2) or save its state_dict"
            )
        from bncheck.runtime.scripted import load_archive

        try:
            model = load_archive(probe.path)
        except Exception as exc:
            raise InputError(
                f"{probe.path} is a TorchScript archive that failed to load ({first_line(exc)})"
            ) from None
        info = ModelInfo(str(probe.path), arch, self.name, digest, 0)
        return Checkpoint(model, info, probe.path, self)

    def write(self, checkpoint: Checkpoint, tmp: Path) -> None:
        from bncheck.runtime.scripted import save_archive

        save_archive(checkpoint.module, tmp)


class ExportFormat(Format):
    """``torch.export.save`` archives (``.pt2``): BN buffers live in the program's state_dict."""

    name = "exported-program"

    def sniff(self, probe: Probe) -> bool:
        names = probe.zip_names
        return any(n.endswith("/archive_format") for n in names) and any(
            n.endswith(".json") and ("/models/" in n or "serialized_exported_program" in n) for n in names
        )

    def read(self, probe: Probe, arch: Optional[str], arch_kwargs: dict, trusted: bool, digest: str) -> Checkpoint:
        from bncheck.reading.untrusted import exported_archive_problems
        from bncheck.runtime.exported import load_program

        if not trusted:
            problems = exported_archive_problems(probe.path)
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise InputError(
                    f"{probe.path} is a torch.export archive that would run code when loaded or run: "
                    f"{problems[0]}{more}; rerun with $trust_checkpoint only if you trust the file"
                )
        try:
            program, model = load_program(probe.path)
        except Exception as exc:
            raise InputError(
                f"{probe.path} is a torch.export archive that failed to load ({first_line(exc)}); check that it "
                "was saved with torch.export.save by a compatible torch version"
            ) from None
        info = ModelInfo(str(probe.path), arch, self.name, digest, 0)
        return Checkpoint(model, info, probe.path, self, container=program)

    def write(self, checkpoint: Checkpoint, tmp: Path) -> None:
        from bncheck.runtime.exported import save_program

        save_program(checkpoint.container, checkpoint.module, tmp, BN_BUFFERS)


class SafetensorsFormat(Format):
    """``.safetensors`` weights (a flat state_dict); header metadata is kept."""

    name = "safetensors"

    def sniff(self, probe: Probe) -> bool:
        if probe.path.suffix.lower() == ".safetensors":
            return True
        head = probe.head
        return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < probe.size

    def read(self, probe: Probe, arch: Optional[str], arch_kwargs: dict, trusted: bool, digest: str) -> Checkpoint:
        path = probe.path
        try:
            from safetensors import safe_open
        except ImportError:
            raise InputError(f"{path} is a safetensors file; install the reader: pip install safetensors") from None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as reader:
                metadata = dict(reader.metadata() or {})
                state = {key: reader.get_tensor(key) for key in reader.keys()}  # noqa: SIM118 - not a dict
        except Exception as exc:
            raise InputError(
                f"{path} is not a readable safetensors file ({first_line(exc)}); re-save it with safetensors"
            ) from None
        model, prefix = _model_from_state(state, path, arch, arch_kwargs)
        info = ModelInfo(str(path), arch, self.name, digest, 0)
        return Checkpoint(model, info, path, self, container=state, prefix=prefix, metadata=metadata)

    def write(self, checkpoint: Checkpoint, tmp: Path) -> None:
        from safetensors.torch import save_file

        tensors = dict(checkpoint.container)
        _put_buffers(tensors, checkpoint)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=checkpoint.metadata or None)


class TorchPickleFormat(Format):
    """Everything ``torch.save`` writes: a state_dict (plain, nested under ``state_dict``/
    ``model``/``ema``/..., Lightning ``.ckpt`` with its other entries, any key prefix) or,
    only when trusted, a pickled module (alone or inside a dict)."""

    name = "state_dict"

    def sniff(self, probe: Probe) -> bool:
        return True  # the fallback: torch.load says what it is

    def read(self, probe: Probe, arch: Optional[str], arch_kwargs: dict, trusted: bool, digest: str) -> Checkpoint:
        path = probe.path
        obj = _torch_load(path, trusted)
        if isinstance(obj, nn.Module):
            return Checkpoint(obj, ModelInfo(str(path), arch, "pickled-module", digest, 0), path, self, container=obj)
        if isinstance(obj, Mapping) and arch is None:
            for key in NESTED_KEYS:
                if isinstance(obj.get(key), nn.Module):
                    info = ModelInfo(str(path), None, "pickled-module", digest, 0)
                    return Checkpoint(obj[key], info, path, self, container=obj)
        state, locator = locate_state_dict(obj, path, probe.select)
        model, prefix = _model_from_state(state, path, arch, arch_kwargs)
        chosen = locator[0] if locator else None
        others = tuple(entry for entry in weight_entries(obj) if entry != chosen)
        info = ModelInfo(str(path), arch, self.name, digest, 0, weights_key=".".join(locator) or None,
                         other_weights=others)
        return Checkpoint(model, info, path, self, container=obj, locator=locator, prefix=prefix)

    def write(self, checkpoint: Checkpoint, tmp: Path) -> None:
        # The container holds the very module object that was analysed (pickled-module) or
        # the state_dict mapping the weights came from: put the new buffers there.
        if checkpoint.format == "state_dict":
            mapping = checkpoint.container
            for key in checkpoint.locator:
                mapping = mapping[key]
            _put_buffers(mapping, checkpoint)
        torch.save(checkpoint.container, str(tmp))


class ModelFolderFormat(Format):
    """A Hub-style model folder (timm export or transformers ``save_pretrained``); see hub.py."""

    name = "model-folder"

    def sniff(self, probe: Probe) -> bool:
        return False  # folders never reach the file probe

    def read_folder(self, path: Path, arch: Optional[str], arch_kwargs: dict) -> Checkpoint:
        import hashlib

        from bncheck.reading.model_folder import build_from_folder, read_model_folder

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
        from bncheck.reading.model_folder import write_model_folder

        write_model_folder(checkpoint.container, checkpoint.module, checkpoint.bn_buffer_keys(), checkpoint.prefix, tmp)


FORMATS: tuple[Format, ...] = (TorchScriptFormat(), ExportFormat(), SafetensorsFormat(), TorchPickleFormat())


def _put_buffers(mapping: Any, checkpoint: Checkpoint) -> None:
    """Replace each BN buffer the file already stores with the model's current value, in
    the file's dtype; keys the file never had (e.g. ``num_batches_tracked`` in an old
    checkpoint) stay absent, so the layout is unchanged."""
    for key, value in _buffers_by_key(checkpoint.module, checkpoint.bn_buffer_keys()).items():
        stored_key = checkpoint.prefix + key
        if stored_key in mapping and isinstance(mapping[stored_key], Tensor):
            old = mapping[stored_key]
            mapping[stored_key] = value.detach().to(device=old.device, dtype=old.dtype).clone()


def _model_from_state(
    state: dict[str, Tensor], path: Path, arch: Optional[str], arch_kwargs: dict
) -> tuple[nn.Module, str]:
    if arch is None:
        guess = guess_arch(state)
        advice = (f"its keys look like {guess}" if guess
                  else "e.g. $arch torchvision:resnet18 $arch_kwargs '{num_classes: 10}'")
        raise UsageError(
            f"{path} holds only weights (a state_dict of {len(state)} tensors); say which model "
            f"they belong to with $arch: {advice}"
        )
    model = build_arch(arch, arch_kwargs)
    prefix = load_state_into(model, state, arch, path)
    model.eval()
    return model, prefix


def _safe_globals() -> Any:
    """Plain-data classes a training checkpoint holds beside its weights, allowed in a
    ``weights_only`` load: timm's CheckpointSaver pickles its ``args`` (an argparse.Namespace,
    attributes only, no code runs to rebuild one)."""
    import argparse
    import contextlib

    allow = getattr(torch.serialization, "safe_globals", None)
    return allow([argparse.Namespace]) if allow is not None else contextlib.nullcontext()


def _torch_load(path: Path, trusted: bool) -> Any:
    try:
        with warnings.catch_warnings(), _safe_globals():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"(?:GLOBAL|global) ([\w.]+)", text)
        with path.open("rb") as fh:
            plain_pickle = fh.read(2) in {b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"}
        if found or plain_pickle or "Unsupported class" in text:
            what = f" (it references {found.group(1)})" if found else ""
            raise InputError(
                f"{path} holds pickled Python objects{what}, e.g. a whole model saved with "
                "torch.save(model); loading it executes code: rerun with $trust_checkpoint "
                "if you trust the file, or save model.state_dict() instead"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        raise _unreadable(path, detail.group(1) if detail else text) from None
    except Exception as exc:
        raise _unreadable(path, str(exc) or type(exc).__name__) from None


def _unreadable(path: Path, reason: str) -> InputError:
    """One line for a file torch.load cannot read: what it looks like, and torch's reason
    cut to its first sentence."""
    with path.open("rb") as fh:
        head = fh.read(512)
    try:
        looks_like_text = all(ch.isprintable() or ch in "\r\n\t" for ch in head.decode("utf-8"))
    except UnicodeDecodeError:  # binary (or text cut mid-character: then the generic message)
        looks_like_text = False
    if looks_like_text:
        return InputError(f"{path} is a text file, not a PyTorch checkpoint; pass the file written by torch.save")
    first = (reason.strip().splitlines() or [""])[0]
    first = re.split(r"(?<=[a-z])\. ", first)[0].rstrip(".")[:120]
    return InputError(
        f"{path} is not a readable PyTorch checkpoint ({first}); check that the file is complete "
        "(not truncated by a download or copy) and was written by torch.save"
    )


def open_checkpoint(
    checkpoint: Optional[Path],
    arch: Optional[str] = None,
    arch_kwargs: Optional[Mapping[str, Any]] = None,
    *,
    trust_checkpoint: bool = False,
    weights: Optional[str] = None,
) -> Checkpoint:
    """Open a checkpoint (and/or build ``arch``); the model is in the mode it was saved in
    (a state_dict's model in eval mode). ``weights`` picks the model of a checkpoint that holds
    several (``state_dict_ema``); by default the live weights load and ``info.other_weights``
    names the rest."""
    arch_kwargs = dict(arch_kwargs or {})
    if checkpoint is None:
        if arch is None:
            raise UsageError("give a checkpoint, an $arch, or both")
        model = build_arch(arch, arch_kwargs)
        return Checkpoint(model, ModelInfo(None, arch, "random-init", None, 0, momentum_from=momentum_source(arch)))
    path = Path(checkpoint)
    if not path.exists():
        raise InputError(f"checkpoint {path} does not exist; check the path")
    check_regular_file(path, "checkpoint")
    if path.is_dir():
        if weights is not None:
            raise UsageError(f"$weights {weights}: {path} is a model folder, which holds one model; drop $weights")
        loaded = ModelFolderFormat().read_folder(path, arch, arch_kwargs)
        return replace(loaded, info=replace(loaded.info, checkpoint=str(checkpoint)))
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(512)
    except OSError as exc:
        raise InputError(f"cannot read checkpoint {path}: {exc.strerror}") from None
    if size == 0:
        raise InputError(f"checkpoint {path} is empty (0 bytes); re-save or re-download it")
    members = zip_members(path)
    inflating = inflation_problem(members)
    if inflating:
        raise InputError(f"checkpoint {path}: {inflating}; torch.save never compresses: re-save the checkpoint")
    probe = Probe(path, [m.filename for m in members], head, size, select=weights)
    handler = next(fmt for fmt in FORMATS if fmt.sniff(probe))
    if weights is not None and not isinstance(handler, TorchPickleFormat):
        raise UsageError(f"$weights {weights}: {path} is a {handler.name} file, which holds one model; drop $weights")
    # the file's SHA-256 (for the report) is computed while the model loads: hashlib releases
    # the GIL, so a large checkpoint costs one read in parallel instead of one more in series
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bncheck-sha256") as pool:
        hashing = pool.submit(sha256_of, path)
        loaded = handler.read(probe, arch, arch_kwargs, trust_checkpoint, "")
        try:
            digest = hashing.result()
        except OSError as exc:
            raise InputError(f"cannot read checkpoint {path}: {exc.strerror}") from None
    loaded = replace(loaded, info=replace(loaded.info, sha256=digest))
    source = momentum_source(arch) if loaded.info.format in ("state_dict", "safetensors") else "checkpoint"
    return replace(loaded, info=replace(loaded.info, checkpoint=str(checkpoint), momentum_from=source))


def momentum_source(arch: Optional[str]) -> str:
    """Momentum is not saved in weights: rebuilt by a library builder it is that library's
    default; by the user's own builder, what their code sets (as in training)."""
    return "library-default" if arch and arch.split(":", 1)[0] in ("torchvision", "timm") else "builder"
