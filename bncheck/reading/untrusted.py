"""Checks on files that may come from a stranger, made before anything in them is loaded.

bncheck's promise: a checkpoint, data file, config or model folder never runs code, never
downloads, never writes outside ``--out`` and never exhausts the machine unless the user said
``--trust-checkpoint``. What each format can hold decides what is checked here:

- a full pickle is a program (``torch.load(weights_only=False)`` runs ``__reduce__``): refused
  untrusted, in ``checkpoint.py``;
- a TorchScript archive is a program too (its ``code/`` is compiled and run at load:
  ``__setstate__``, and ``forward`` may call ``torch.from_file(..., shared=True)``, which
  creates or overwrites any file): loaded only with ``--trust-checkpoint``;
- a ``torch.export`` archive (``.pt2``) is a serialized graph, but ``torch.export.load``
  unpickles with ``weights_only=False`` every payload marked ``use_pickle`` (and opaque/custom
  objects, and legacy or sample-input ``.pt`` files that a safe load rejects), ``exec``s the
  program's ``guards_code``, ``sympify``s (evals) its symbolic shape expressions, and resolves
  node targets by ``getattr`` on the ``torch`` module: :func:`exported_archive_problems`
  reads the archive as data and names what it would run;
- zip members and compressed arrays are sized from their headers before they inflate.

Nothing here imports torch at module level.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import zipfile
from pathlib import Path
from typing import Any, Optional

from bncheck.errors import InputError

MAX_TEXT_BYTES = 16 * 1024 * 1024
"""Largest config, arch-kwargs, model-folder JSON or saved run read as text (a run of a
model with thousands of BN layers is a few MB)."""

MAX_RUN_BYTES = 256 * 1024 * 1024
"""Largest saved run read back (``report``, ``--baseline``): a layer takes ~2-3 KB of JSON, so
a model with 10,000 BN layers writes ~30 MB; this leaves room for 80,000 and bounds the parse."""

MAX_INFLATED_BYTES = 4 * 1024**3
"""Largest compressed member (a deflated ``.npz`` array, a deflated record in a ``.pt``)
inflated into memory; bigger ones are refused (save uncompressed: ``.npy`` is mapped)."""

MAX_COMPRESSION_RATIO = 200
"""A deflated member that claims to expand more than this is a decompression bomb."""


def check_regular_file(path: Path, what: str) -> None:
    """A FIFO, socket or device given as a file would hang or never end: regular files only
    (symlinks are followed to what they name)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist; check the path") from None
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror}") from None
    if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
        return
    kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device or special file"
    raise InputError(f"{what} {path} is {kind}, not a regular file; pass a file saved on disk")


def link_roots(folder: Path) -> list[Path]:
    """Where the files of a model folder may really live: the folder itself, and for a Hugging
    Face cache snapshot (``models--org--name/snapshots/REV/``, each file a link into
    ``../../blobs/``) that repository's ``blobs`` folder -- nowhere else."""
    real = Path(os.path.realpath(folder))
    roots = [real]
    if real.parent.name == "snapshots":
        roots.append(real.parent.parent / "blobs")
    return roots


def folder_member(folder: Path, name: Any, what: str) -> Path:
    """``folder / name`` for a name that a file of the folder chose (a shard index's file
    names): a relative path without ``..`` whose target, links resolved, lies inside the
    folder (or its Hugging Face cache blobs). Anything else is an InputError: an index naming
    ``/home/user/.ssh/id_rsa`` or ``../other/model.bin`` is neither read nor written."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise InputError(f"{what} names {shown(name)}, not a file name; re-save the model folder")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or name.startswith("~"):
        raise InputError(f"{what} names {shown(name)}, a path outside the model folder; bncheck reads and "
                         "writes only files inside it: re-save the model folder")
    path = folder / relative
    if not inside_roots(path, link_roots(folder)):
        raise InputError(f"{what} names {shown(name)}, which links outside the model folder; bncheck follows "
                         "no link out of it: copy the real file into the folder")
    return path


def inside_roots(path: Path, roots: list[Path]) -> bool:
    real = Path(os.path.realpath(path))
    return any(real == root or root in real.parents for root in roots)


_IDENTIFIER_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
BUILDER_SOURCES = ("torchvision", "timm")
"""``--arch`` sources that name a library's model by name: no code of anyone's is imported."""


def code_spec(text: str) -> bool:
    """``package.module:callable`` or ``path/to/file.py:callable``: a value that imports and
    calls Python (not a path that exists, not ``file.npz:KEY``)."""
    source, sep, name = text.rpartition(":")
    if not sep or not source or not name or Path(text).exists() or not _IDENTIFIER_PATH.match(name):
        return False
    if source.lower().endswith(".npz"):
        return False
    return source.endswith(".py") or bool(_IDENTIFIER_PATH.match(source))


def names_code(value: Any, *, builder: bool = False) -> bool:
    """Whether a setting's value makes bncheck import code: for ``arch`` (``builder``) every
    spec but ``torchvision:NAME`` / ``timm:NAME``; for data, a ``module:callable`` pipeline."""
    if not isinstance(value, str):
        return False
    if builder:
        return ":" in value and value.rpartition(":")[0] not in BUILDER_SOURCES
    return code_spec(value)


def read_text_bounded(path: Path, what: str, limit: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of a regular file no larger than ``limit`` bytes (a 1 GB "config" is not
    read whole to find out it is wrong)."""
    check_regular_file(path, what)
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise InputError(
            f"{what} {path} is larger than {limit // (1024 * 1024)} MB; this is not a file bncheck wrote or reads"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{what} {path} is not UTF-8 text") from None


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for quoting a user's value in an error
    message; a value built from YAML aliases may be huge, so the repr is built piecewise."""
    import reprlib

    short = reprlib.Repr()
    short.maxstring = short.maxother = limit
    short.maxlist = short.maxdict = short.maxtuple = short.maxset = 8
    short.maxlevel = 3
    text = short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- zip archives -------------------------------------------------------------------------

def zip_members(path: Path) -> list[zipfile.ZipInfo]:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return []


def inflation_problem(members: list[zipfile.ZipInfo], limit: int = MAX_INFLATED_BYTES) -> Optional[str]:
    """Why a compressed member of an archive must not be inflated, or None. ``torch.save``
    and ``torch.export.save`` store records uncompressed; ``np.savez_compressed`` deflates, and
    its arrays are read piecewise, so only the headers' sizes are judged here."""
    for info in members:
        if info.compress_type == zipfile.ZIP_STORED:
            continue
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > limit:
            return f"member {info.filename} inflates to {info.file_size / 1e9:.1f} GB (limit {limit / 1e9:.1f} GB)"
        if ratio > MAX_COMPRESSION_RATIO and info.file_size > 64 * 1024 * 1024:
            return (f"member {info.filename} inflates {ratio:.0f}x to {info.file_size / 1e9:.1f} GB "
                    "(a decompression bomb)")
    return None


# --- torch.export archives ----------------------------------------------------------------

_SAFE_OPERATOR = frozenset({
    "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "eq", "ne",
    "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift", "rshift", "matmul",
})
_SAFE_TORCH_FUNCTIONS = frozenset({
    "sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt", "sym_sum",
    "_sym_sqrt", "sym_fresh_size",
})
_OP_NAMESPACES = frozenset({"aten", "prims", "quantized_decomposed", "quantized"})
"""Operator namespaces of plain tensor compute (PT2E-quantized exports use quantized_decomposed)."""
_HIGHER_ORDER_OPS = frozenset({
    "cond", "while_loop", "while_loop_stack_output", "map_impl", "scan", "associative_scan",
    "wrap_with_set_grad_enabled", "wrap_with_autocast", "invoke_subgraph", "auto_functionalized",
    "auto_functionalized_v2", "out_dtype", "hints_wrapper", "tag_activation_checkpoint", "_export_tracepoint",
})
"""Higher-order operators admitted by name: control flow over the program's own subgraphs and
wrappers around its own operators (whose operator arguments are inspected as targets). Not
``print`` (it writes the environment to stdout and forges CI workflow commands),
``inline_asm_elementwise`` / triton / inductor / delegate calls (they carry source code for a
compiler), ``with_effects``, ``call_torchbind``, ``flat_apply`` and the other Python callers."""
_FILE_OPS = re.compile(r"file|save|load|storage|pickle|mmap|print")
"""aten ops that read or write files or raw storage (``aten.from_file``): never from a stranger."""

_SYMBOL = re.compile(r"^[a-z]{1,6}\d+$")
_SREPR_SYMBOL = re.compile(r"Symbol\('([a-z]{1,6}\d+)'(?:,\s*[a-z_]+=(?:True|False))*\)")
_SYMPY_FUNCTIONS = frozenset({
    "Mod", "PythonMod", "FloorDiv", "CleanDiv", "IntTrueDiv", "FloatTrueDiv", "TruncToInt", "TruncToFloat",
    "CeilToInt", "FloorToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Max", "Min", "Abs", "Eq", "Ne",
    "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "Pow", "PowByNatural", "FloatPow", "OpaqueUnaryFn_sqrt",
    "OpaqueUnaryFn_exp", "OpaqueUnaryFn_log", "IsNonOverlappingAndDenseIndicator", "LShift", "RShift",
    "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or", "Identity", "Integer", "Rational", "Float",
    "ceiling", "floor", "sqrt", "oo", "zoo", "nan", "true", "false", "True", "False", "Symbol",
})
_EXPRESSION_CHARS = re.compile(r"^[A-Za-z0-9_ +\-*/%().,<>=!&|~]*$")
_GUARD_NAMES = frozenset({"L", "size", "stride", "storage_offset", "dim", "and", "or", "not", "True", "False",
                          "None", "len", "abs", "min", "max", "is", "in"})


def _sym_expression_problem(text: str) -> Optional[str]:
    """A symbolic-shape expression as export writes it (``s0``, ``2*s1 + 1``, ``Max(1, s0)``),
    checked token by token: sympy evaluates these strings with ``eval``."""
    if len(text) > 2000:
        return "an over-long shape expression"
    original, text = text, _SREPR_SYMBOL.sub(r"\1", text)  # Symbol('s0', positive=True, integer=True)
    if not _EXPRESSION_CHARS.match(text) or "__" in text:
        return f"the shape expression {original[:60]!r}"
    if re.search(r"\.\s*[A-Za-z_]", text):
        return f"attribute access in the shape expression {text[:60]!r}"
    for name in re.findall(r"[A-Za-z_]\w*", text):
        if not (_SYMBOL.match(name) or name in _SYMPY_FUNCTIONS):
            return f"the name {name!r} in the shape expression {text[:60]!r}"
    return None


def _guard_problem(text: str) -> Optional[str]:
    """A guard of ``guards_code`` (``L['x'].size()[0] == 2``): export ``exec``s these as Python."""
    if len(text) > 2000:
        return "an over-long guard"
    rest = re.sub(r"L\[(?:'[A-Za-z0-9_]*'|\d+)\]", "L", text)
    rest = re.sub(r"\[\d+\]", "", rest)
    if "__" in rest or not _EXPRESSION_CHARS.match(rest):
        return f"the guard {text[:60]!r}"
    for name in re.findall(r"[A-Za-z_]\w*", rest):
        if name not in _GUARD_NAMES and not _SYMBOL.match(name) and name not in _SYMPY_FUNCTIONS:
            return f"the name {name!r} in the guard {text[:60]!r}"
    return None


def _target_problem(target: str) -> Optional[str]:
    """A graph node's target: export resolves ``torch.a.b.c`` by ``getattr`` from the torch
    module (``torch.os.system`` is reachable that way), so only operator overloads in the
    aten/prims/higher-order namespaces, symbolic-int helpers and plain arithmetic pass."""
    parts = target.split(".")
    if parts[0] == "_operator" and len(parts) == 2 and parts[1] in _SAFE_OPERATOR:
        return None
    if parts[0] == "math" and len(parts) == 2 and parts[1].isidentifier() and not parts[1].startswith("_"):
        return None
    if parts[0] == "torch" and len(parts) == 2 and parts[1] in _SAFE_TORCH_FUNCTIONS:
        return None
    if parts[:3] == ["torch", "ops", "higher_order"] and len(parts) == 4:
        return None if parts[3] in _HIGHER_ORDER_OPS else f"the higher-order operator {target[:80]} (not admitted)"
    if parts[:2] == ["torch", "ops"] and len(parts) in (4, 5) and parts[2] in _OP_NAMESPACES:
        if _FILE_OPS.search(parts[3]):
            return f"the operator {target} (file or storage access)"
        return None
    return f"the call target {target[:80]!r}"


def _walk(node: Any, found: dict[str, list[str]], key: Optional[str] = None) -> None:
    if isinstance(node, dict):
        for name, value in node.items():
            if name in ("target", "as_operator") and isinstance(value, str):  # an operator passed as an argument
                found["targets"].append(value)                                 # is called as well
            elif name == "expr_str" and isinstance(value, str):
                found["expressions"].append(value)
            elif name == "range_constraints" and isinstance(value, dict):
                found["expressions"].extend(k for k in value if isinstance(k, str))
            elif name == "guards_code" and isinstance(value, list):
                found["guards"].extend(v if isinstance(v, str) else repr(v) for v in value)
            _walk(value, found, name)
    elif isinstance(node, list):
        for value in node:
            _walk(value, found, key)


def _safe_torch_artifact(data: bytes) -> bool:
    """Whether a ``.pt`` member loads with ``weights_only=True`` (export falls back to an
    unrestricted load when it does not)."""
    import torch

    if not data:
        return True
    try:
        torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception:
        return False
    return True


def exported_archive_problems(path: Path) -> list[str]:
    """What in a ``torch.export`` archive would run code or touch files when loaded or run;
    empty when it is plain data (tensors, a graph of aten operators, symbolic shapes)."""
    problems: list[str] = []
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        return [f"not a readable archive ({exc})"]
    with archive:
        members = archive.infolist()
        inflating = inflation_problem(members, limit=MAX_TEXT_BYTES * 64)
        if inflating:
            return [inflating]
        for info in members:
            name = info.filename
            base = name.split("/", 1)[1] if "/" in name else name
            if base.endswith(("_weights_config.json", "_constants_config.json")):
                try:
                    config = json.loads(archive.read(info)).get("config", {})
                except RecursionError:
                    problems.append(f"{base} is nested too deeply to inspect")
                    continue
                except (ValueError, AttributeError):
                    continue  # unreadable: torch.export.load refuses it as well, with its own reason
                for fqn, meta in (config or {}).items():
                    if not isinstance(meta, dict):
                        continue
                    if meta.get("use_pickle"):
                        problems.append(f"the payload {str(fqn)[:60]!r} is a pickle (it runs code when loaded)")
                    path_name = str(meta.get("path_name", ""))
                    if path_name.startswith(("custom_obj_", "opaque_obj_")):
                        problems.append(f"the constant {str(fqn)[:60]!r} is a pickled object")
            elif base.startswith("data/aotinductor/") or base.endswith((".so", ".dll", ".dylib", ".cpp")):
                problems.append(f"{base} is compiled code")
            elif base.endswith(".pt"):  # weights, constants, sample inputs, and the legacy serialized_*.pt
                if info.file_size > MAX_INFLATED_BYTES or not _safe_torch_artifact(archive.read(info)):
                    problems.append(f"{base} holds pickled Python objects")
            elif (base.startswith("models/") or base.startswith("serialized_")) and base.endswith(".json"):
                found: dict[str, list[str]] = {"targets": [], "expressions": [], "guards": []}
                try:
                    program = json.loads(archive.read(info))
                    _walk(program, found)
                except ValueError:
                    continue
                except RecursionError:  # a program nested deeper than Python parses is no program export wrote
                    problems.append(f"{base} is nested too deeply to inspect")
                    continue
                for target in dict.fromkeys(found["targets"]):
                    problem = _target_problem(target)
                    if problem:
                        problems.append(problem)
                for expression in dict.fromkeys(found["expressions"]):
                    problem = _sym_expression_problem(expression)
                    if problem:
                        problems.append(problem)
                for guard in dict.fromkeys(found["guards"]):
                    problem = _guard_problem(guard)
                    if problem:
                        problems.append(problem)
    return problems


# --- YAML ---------------------------------------------------------------------------------

MAX_YAML_ALIASES = 1000
"""Aliases (``*name``) one YAML document may use."""
MAX_YAML_NODES = 100_000
"""Nodes a YAML document may stand for once its aliases are expanded. Aliases build shared
objects, so eight lines (a billion laughs) can stand for 10^9 values: cheap to load, but
anything that walks, compares or prints the value (an error message's repr) never ends."""


def safe_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load`` in one parse: the document is composed (aliases counted as they come,
    at most ``MAX_YAML_ALIASES``), its size with every alias expanded is checked (shared nodes
    counted once each, so the check itself stays cheap), and only then is it built into Python
    values. ``yaml.YAMLError`` propagates for the caller to word."""
    import yaml

    from bncheck.errors import UsageError

    class Loader(yaml.SafeLoader):
        aliases = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > MAX_YAML_ALIASES:
                    raise UsageError(f"{what} uses more than {MAX_YAML_ALIASES} YAML aliases (*name); write the "
                                     "values out")
            return super().compose_node(parent, index)

    sizes: dict[int, int] = {}

    def expanded(node: Any) -> int:
        known = sizes.get(id(node))
        if known is not None:
            return known
        size = 1
        if isinstance(node, yaml.SequenceNode):
            size += sum(expanded(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            size += sum(expanded(key) + expanded(value) for key, value in node.value)
        sizes[id(node)] = min(size, MAX_YAML_NODES + 1)
        return sizes[id(node)]

    loader = Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        if loader.aliases and expanded(root) > MAX_YAML_NODES:
            raise UsageError(
                f"{what} expands its YAML aliases (*name) to more than {MAX_YAML_NODES} values; write the "
                "values out"
            )
        return loader.construct_document(root)
    finally:
        loader.dispose()
