"""``.safetensors`` weights: a flat state_dict, its header metadata kept on writing."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from bncheck.errors import InputError, first_line
from bncheck.reading.formats.base import Checkpoint, Format, Probe, model_from_state, put_buffers
from bncheck.reporting.report import ModelInfo


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
        model, prefix = model_from_state(state, path, arch, arch_kwargs)
        info = ModelInfo(str(path), arch, self.name, digest, 0)
        return Checkpoint(model, info, path, self, container=state, prefix=prefix, metadata=metadata)

    def write(self, checkpoint: Checkpoint, tmp: Path) -> None:
        from safetensors.torch import save_file

        tensors = dict(checkpoint.container)
        put_buffers(tensors, checkpoint)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=checkpoint.metadata or None)
