"""``torch.export`` archives (``.pt2``): inspected as data first (``untrusted``), then loaded and
saved through ``runtime.exported``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from bncheck.errors import InputError, first_line
from bncheck.reading.formats.base import BN_BUFFERS, Checkpoint, Format, Probe
from bncheck.reporting.report import ModelInfo


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
