"""TorchScript archives: loaded (only with ``--trust-checkpoint``: their code runs while they
load) and saved again through ``runtime.scripted``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from bncheck.errors import InputError, first_line
from bncheck.reading.formats.base import Checkpoint, Format, Probe
from bncheck.reporting.report import ModelInfo


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
