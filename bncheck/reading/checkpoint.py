"""Opening a checkpoint: a file (its format found by sniffing, in ``FORMATS`` order) or a Hub
model folder, read into one ``Checkpoint`` that can write itself back. The formats are in
``reading/formats/``, one module each."""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from bncheck.errors import InputError, UsageError
from bncheck.reading.architectures import build_arch, sha256_of
from bncheck.reading.formats.base import Checkpoint, Format, Probe, momentum_source
from bncheck.reading.formats.export import ExportFormat
from bncheck.reading.formats.hub_folder import ModelFolderFormat
from bncheck.reading.formats.safetensors import SafetensorsFormat
from bncheck.reading.formats.torch_pickle import TorchPickleFormat
from bncheck.reading.formats.torchscript import TorchScriptFormat
from bncheck.reading.untrusted import check_regular_file, inflation_problem, zip_members
from bncheck.reporting.report import ModelInfo

FORMATS: tuple[Format, ...] = (TorchScriptFormat(), ExportFormat(), SafetensorsFormat(), TorchPickleFormat())
"""Tried in this order; the pickle reader is the fallback (torch.load says what a file is)."""

__all__ = ["FORMATS", "Checkpoint", "Format", "Probe", "momentum_source", "open_checkpoint"]


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
