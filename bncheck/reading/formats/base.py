"""What every checkpoint format shares: the ``Probe`` of a file, the ``Checkpoint`` it reads
into (which remembers its container and writes itself back), the ``Format`` interface, and
the helpers that put new BN buffers into a state_dict mapping.

Each format is one module in this package: ``sniff`` says whether a file is of the format,
``read`` builds the model and keeps what a writer needs (the nesting of a state_dict, its key
prefix and every other entry, safetensors metadata, the TorchScript module, the exported
program), and ``write`` puts the model's current BN buffers into that container and saves it
in the same format. Reading never writes; ``Checkpoint.write`` refuses the input's own path and
goes through a temporary file and an atomic rename.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

from torch import Tensor, nn

from bncheck.errors import UsageError
from bncheck.files import atomic_write, atomic_write_folder, check_output_folder, check_output_path
from bncheck.reading.architectures import build_arch, guess_arch, load_state_into
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
        if self.handler.writes_folder:
            check_output_folder(out, self.path, force=force)
            atomic_write_folder(out, lambda tmp: self.handler.write(self, tmp), replace_existing=force)
            return
        check_output_path(out, self.path, force=force)
        atomic_write(out, lambda tmp: self.handler.write(self, tmp), exclusive=not force)


def buffers_by_key(module: nn.Module, keys: list[str]) -> dict[str, Tensor]:
    state = module.state_dict()
    return {key: state[key] for key in keys if key in state}


class Format:
    """One checkpoint format: recognise, read, write back."""

    name: ClassVar[str]
    writes_folder: ClassVar[bool] = False
    """Writes a folder (a Hub model folder), not one file."""

    def sniff(self, probe: Probe) -> bool:
        raise NotImplementedError

    def read(self, probe: Probe, arch: Optional[str], arch_kwargs: dict, trusted: bool, digest: str) -> Checkpoint:
        raise NotImplementedError

    def write(self, checkpoint: Checkpoint, tmp: Path) -> None:
        raise NotImplementedError


def put_buffers(mapping: Any, checkpoint: Checkpoint) -> None:
    """Replace each BN buffer the file already stores with the model's current value, in
    the file's dtype; keys the file never had (e.g. ``num_batches_tracked`` in an old
    checkpoint) stay absent, so the layout is unchanged."""
    for key, value in buffers_by_key(checkpoint.module, checkpoint.bn_buffer_keys()).items():
        stored_key = checkpoint.prefix + key
        if stored_key in mapping and isinstance(mapping[stored_key], Tensor):
            old = mapping[stored_key]
            mapping[stored_key] = value.detach().to(device=old.device, dtype=old.dtype).clone()


def model_from_state(
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


def momentum_source(arch: Optional[str]) -> str:
    """Momentum is not saved in weights: rebuilt by a library builder it is that library's
    default; by the user's own builder, what their code sets (as in training)."""
    return "library-default" if arch and arch.split(":", 1)[0] in ("torchvision", "timm") else "builder"
