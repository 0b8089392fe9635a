"""Command line: the only module that imports click. Exit codes: see ``errors.ExitCode``.

Parse flags into ``Settings`` (config file as defaults, flags override), build the model
and the data, run, render. torch is imported only inside ``run`` so ``--help`` and
``report`` stay fast.
"""

from __future__ import annotations

import functools
import sys
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

import click

from bncheck import __version__
from bncheck.config import ANNOTATIONS, DEVICES, FAIL_ON_LEVELS, Settings, load_settings
from bncheck.errors import BncheckError, ExitCode, UsageError, first_line
from bncheck.reporting.report import SEVERITY_ORDER, Report

STDOUT = "-"
"""A format's target meaning stdout (``--json -``, or a bare ``--json``)."""
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _err(message: str) -> None:
    """One line on stderr. Messages quote file, layer and folder names that a checkpoint or a
    data folder chose: control characters are shown as escapes, never sent raw."""
    from bncheck.reporting.render.escape import control

    click.echo(control(message), err=True)


def _main_rank() -> bool:
    """Rank 0 of a torchrun job, or a single process (never imports torch by itself)."""
    if "torch.distributed" not in sys.modules:
        return True
    from bncheck.measuring.distributed import current

    return current().main


def _leave_process_group() -> None:
    if "torch.distributed" in sys.modules:
        from bncheck.measuring.distributed import shutdown

        shutdown()


def _handle_errors(command: Callable) -> Callable:
    """Turn every failure into one line on stderr and a distinct exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        debug = bool((ctx.find_root().params or {}).get("debug"))
        try:
            return command(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except BncheckError as exc:
            if debug:
                traceback.print_exc()
            _err(f"error: {exc.for_cli()}")
            ctx.exit(int(exc.exit_code))
        except KeyboardInterrupt:
            _err("interrupted; the model and files were not changed")
            ctx.exit(130)
        except Exception as exc:  # a bug in bncheck: say so, keep the traceback for --debug
            if debug:
                traceback.print_exc()
            first = first_line(exc).replace("$$", "$")
            _err(
                f"internal error: {type(exc).__name__}: {first} (this is a bncheck bug; rerun "
                "with `bncheck --debug ...` for the traceback and report it)"
            )
            ctx.exit(int(ExitCode.INTERNAL))
        finally:
            _leave_process_group()

    return wrapper


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="bncheck")
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
def cli(debug: bool) -> None:
    """Find the BatchNorm layers whose running statistics disagree with your data.

    \b
    bncheck run model.pt --arch torchvision:resnet18 --data images/
    bncheck report            # re-render the last run
    bncheck report --json     # ... as JSON
    bncheck fix model.pt --arch torchvision:resnet18 --data images/ --out fixed.pt
    bncheck diff base.pt finetuned.pt --arch torchvision:resnet18

    Exit codes: 0 no finding at or above --fail-on, 1 findings, 2 usage error,
    3 input error (file, checkpoint, data, architecture), 4 internal error.
    """


def _write_text(path: Path, text: str, what: str) -> None:
    """Write a report atomically: a full disk or a kill mid-write leaves the previous file."""
    from bncheck.files import atomic_write

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot write {what} to {path}: {exc.strerror}; choose another path") from None
    try:
        atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except UsageError as exc:
        raise UsageError(f"cannot write {what} to {path}: {exc.template}") from None


def _input_paths(checkpoint: Any = None, data: Optional[str] = None, **others: Any) -> dict[str, Any]:
    """The files a command reads, by what they are, for ``check_outputs``."""
    inputs = {"the input checkpoint": checkpoint}
    if data:
        text = str(data)
        if not Path(text).exists() and ":" in text:  # file.npz:KEY or file.py:callable
            text = text.rpartition(":")[0]
        inputs["the data"] = text
    inputs.update({f"the {name.replace('_', ' ')}": value for name, value in others.items()})
    return inputs


def _check_outputs(targets: dict[str, Any], inputs: dict[str, Any], optional: tuple[str, ...] = (),
                   folders: tuple[str, ...] = ()) -> None:
    """Every output path differs from every input and from each other, and can be written:
    refused before any work (``--save`` only warns, as its write does)."""
    from bncheck.files import check_outputs

    flags = {f"--{name}": value for name, value in targets.items()}
    for warning in check_outputs(flags, inputs, optional=tuple(f"--{name}" for name in optional),
                                 folders=tuple(f"--{name}" for name in folders)):
        _err(f"warning: {warning}; `bncheck report` will not see this run")


def _save_last_run(report_json: str, settings: Settings) -> None:
    if settings.save is None:
        return
    try:
        _write_text(Path(settings.save), report_json, "the run")
    except UsageError as exc:  # the result still prints; only `bncheck report` misses it
        _err(f"warning: {exc}; `bncheck report` will not see this run")


def _print_report(report: Report, settings: Settings, to_stderr: bool) -> None:
    from bncheck.reporting.render import render

    stream = sys.stderr if to_stderr else sys.stdout
    color = stream.isatty()
    width = None
    if color:
        import shutil

        width = shutil.get_terminal_size((120, 24)).columns
    click.echo(render(report, "table", top=settings.top, width=width, color=color), nl=False, err=to_stderr)


def _size(value: Optional[str], flag: str) -> Any:
    if value is None:
        return None
    if value.strip().lower() in ("none", "null", "off"):
        return _EXPLICIT_NONE
    try:
        number = int(value)
    except ValueError:
        raise UsageError(f"{flag} must be a size in pixels or 'none', got {value!r}") from None
    if number < 1:
        raise UsageError(f"{flag} must be at least 1, got {number}")
    return number


def _floats(value: Optional[str], flag: str) -> Optional[list[float]]:
    if value is None:
        return None
    try:
        numbers = [float(part) for part in value.replace(" ", ",").split(",") if part]
    except ValueError:
        raise UsageError(f"{flag} must be numbers separated by commas, e.g. 0.485,0.456,0.406; got {value!r}") from None
    if not numbers:
        raise UsageError(f"{flag} needs at least one number")
    return numbers


_EXPLICIT_NONE = object()
"""A size flag given as 'none': overrides the config with null (a plain None means "not given")."""


WEIGHTS_HELP = ("Which model of a checkpoint that holds several (timm's state_dict_ema, an EMA/SWA copy beside "
                "the live weights): its key, dotted for deeper nesting. Default: the live weights.")


TRUST_CONFIG = click.option(
    "--trust-config", is_flag=True,
    help="Let the --config file name code (arch: module:callable, data: file.py:callable); without it only a "
         "flag may.")


def _transform_options(command: Callable) -> Callable:
    """--resize/--crop/--mean/--std, --box-labels and --output, shared by run and fix."""
    for option in reversed((
        click.option("--output", "output", metavar="KEY|INDEX",
                     help="Which part of the model's output to compare: a key or an index, dotted for nesting "
                          "('logits', '1', 'out'). Default: found automatically (logits among probabilities, "
                          "'logits'/'out' of a dict); the report says which."),
        click.option("--resize", metavar="PX|none",
                     help="Resize images' shorter side to PX before cropping ('none': keep their size; default 256)."),
        click.option("--crop", metavar="PX|none", help="Centre-crop images to PX ('none': no crop; default 224)."),
        click.option("--mean", metavar="M1,M2,M3", help="Per-channel mean to subtract (default ImageNet's)."),
        click.option("--std", metavar="S1,S2,S3", help="Per-channel std to divide by (default ImageNet's)."),
        click.option("--box-labels", "box_labels", type=click.Choice(["category-id", "index", "index+1"]),
                     help="COCO files: target labels are the category ids as they are (default), their 0-based "
                          "index among the file's categories sorted by id, or that index + 1 (0 = background)."),
    )):
        command = option(command)
    return command


@cli.command(context_settings=CONTEXT)
@click.argument("checkpoint", required=False, type=click.Path(path_type=Path, dir_okay=True))
@click.option("--arch", metavar="SPEC",
              help="Model builder: torchvision:NAME, timm:NAME, package.module:callable or "
                   "path/file.py:callable. Needed when the checkpoint holds only a state_dict.")
@click.option("--arch-kwargs", metavar="YAML", help="Keyword arguments for --arch, e.g. '{num_classes: 10}'.")
@click.option("--weights", metavar="NAME", help=WEIGHTS_HELP)
@click.option("--data", metavar="PATH",
              help="Folder of images (flat, class subfolders, images/+masks/), a COCO annotation file (.json), a "
                   "tensor file (.pt, .npy, .npz[:NAME]) or file.py:callable. Without it, only the checkpoint itself "
                   "is checked.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), metavar="YAML",
              help="Settings that differ from configs/default.yaml (every flag has a key); flags override it.")
@click.option("--batch-size", type=click.IntRange(min=2), help="Samples per forward pass (default 32).")
@click.option("--num-batches", type=click.IntRange(min=1),
              help="Batches pooled into population statistics (default 4).")
@click.option("--device", type=click.Choice(DEVICES), help="Where to run (default auto: cuda when available).")
@click.option("--seed", type=click.IntRange(min=0), help="Which images form the sample (default 0).")
@click.option("--trust-checkpoint", is_flag=True,
              help="Load files that are programs: full pickles (torch.save(model)), TorchScript archives, "
                   ".pt2 archives that hold code. Loading them runs code from the file.")
@TRUST_CONFIG
@click.option("--force", is_flag=True,
              help="Replace existing files that the --config file names as outputs (flags' paths are always "
                   "replaced when they are regular files).")
@click.option("--attribute", type=click.IntRange(min=0), metavar="K",
              help="For the K top flagged layers, measure how much of the output gap fixing each alone "
                   "removes: one extra eval pass over the sample per layer (default 5; 0: off).")
@click.option("--thorough", is_flag=True, default=None,
              help="Run every pass over every kept batch, even where its answer cannot change the verdict or "
                   "the advice (per-layer attribution when recalibrating all layers already explains the gap; "
                   "the output-noise pass when flagged layers already fail the gate).")
@click.option("--profile", is_flag=True, default=None,
              help="Print each pass's time, forwards and what it bought, or why it was skipped (also in the JSON).")
@click.option("--baseline", metavar="RUN_JSON",
              help="Accepted earlier run: fail only on findings that are new or worse than in it.")
@click.option("--fail-on", type=click.Choice(FAIL_ON_LEVELS),
              help="Exit 1 for findings at least this severe (default error).")
@click.option("--json", "json_out", metavar="[PATH|-]", is_flag=False, flag_value=STDOUT,
              help="Write the JSON result to PATH; bare or '-': only JSON on stdout (the table goes to stderr).")
@click.option("--markdown", "markdown_out", metavar="[PATH|-]", is_flag=False, flag_value=STDOUT,
              help="Write Markdown to PATH; bare or '-': Markdown on stdout (the table goes to stderr).")
@click.option("--html", "html_out", metavar="PATH", help="Also write a self-contained HTML report there.")
@click.option("--junit", "junit_out", metavar="PATH", help="Also write JUnit XML there (one testcase per layer).")
@click.option("--top", type=click.IntRange(min=1), help="Rows in the table (default 10).")
@click.option("--save", metavar="PATH",
              help="Where to keep the run for `bncheck report` (default .bncheck/last-run.json).")
@click.option("--quiet", "-q", is_flag=True, default=None, help="No table or progress; only errors and warnings.")
@click.option("--annotations", type=click.Choice(ANNOTATIONS),
              help="Print GitHub Actions workflow commands for the findings (default auto: when GITHUB_ACTIONS=true).")
@_transform_options
@_handle_errors
def run(
    checkpoint: Optional[Path],
    config_path: Optional[Path],
    trust_checkpoint: bool,
    trust_config: bool,
    force: bool,
    **flags: Any,
) -> None:
    """Run the model in train and eval mode on sample data and rank the BN layers
    whose running statistics diverge most from the data's.

    Cost: two forward passes (eval, then train with only BN layers in train mode) per
    batch, plus one eval pass per attributed layer; the model and the checkpoint are
    never modified.
    """
    settings = load_settings(config_path, _overrides(flags), trust_config=trust_config, force=force)
    arch = settings.arch
    kwargs = _arch_kwargs(flags, settings)
    if checkpoint is None and arch is None:
        raise UsageError("give a CHECKPOINT file and/or --arch; see `bncheck run --help`")
    outputs = settings.outputs
    _check_outputs({"json": outputs.json, "markdown": outputs.markdown, "html": outputs.html,
                    "junit": outputs.junit, "save": settings.save},
                   _input_paths(checkpoint, settings.data.path, config=config_path, baseline=settings.baseline),
                   optional=("save",))
    baseline = _load_baseline(settings.baseline)


    from bncheck.engine import lint
    from bncheck.reading.checkpoint import open_checkpoint
    from bncheck.reading.data import open_data

    target = _target_device(settings)
    world = _join(target)

    loaded = _agreed(world, lambda: open_checkpoint(checkpoint, arch, kwargs, trust_checkpoint=trust_checkpoint,
                                                    weights=settings.weights))
    loaded.container = None  # run never writes: free the file's copy of the weights (as large as the model)
    _settle_heap()
    _weights_note(loaded.info)
    if settings.data.path is None:
        _err("note: no --data given: checking only what the checkpoint itself reveals (no statistics measured)")
        report = lint(loaded.module, thresholds=settings.thresholds, ignore=settings.ignore, fail_on=settings.fail_on,
                      momentum_known=loaded.info.momentum_from != "library-default", sources=_sources(loaded.info))
    else:
        settings, provenance = _adopt_preprocessing(settings, loaded, _provenance(config_path, flags))
        source = _agreed(world, lambda: open_data(Path(settings.data.path), settings.data, settings.batch_size,
                                                  settings.num_batches))
        if loaded.info.format == "random-init":
            _err(f"warning: no checkpoint given: checking {arch} with RANDOM weights, "
                 "which says nothing about a trained model")
        report = _diagnose(loaded.module.to(target), source, settings,
                           momentum_known=loaded.info.momentum_from != "library-default", world=world,
                           sources=_sources(loaded.info, settings, source, provenance))
        _data_notes(source, settings)
    if baseline is not None:
        from bncheck.reporting.baseline import apply_baseline

        report = apply_baseline(report, baseline, settings.baseline)
    _finish(report, settings)


def _weights_note(info: Any) -> None:
    """Say which model of a several-model checkpoint was loaded, and how to pick another."""
    if info.other_weights:
        others = ", ".join(info.other_weights)
        _err(f"note: {info.checkpoint} holds several models: loaded '{info.weights_key}'; the others sit under "
             f"{others} (pick one with --weights NAME)")


def _target_device(settings: Settings) -> str:
    """The device a run or fix uses: ``auto`` is cuda when available; ``cuda`` without it is a
    usage error before any loading. Under torchrun, cuda is this rank's GPU."""
    import torch

    from bncheck.measuring.distributed import local_device

    if settings.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but CUDA is not available here; use --device cpu")
    if settings.device == "auto":
        return local_device("cuda" if torch.cuda.is_available() else "cpu")
    return local_device(settings.device)


def _join(target: str) -> Any:
    """Under torchrun: join the process group (gloo on CPU, nccl on CUDA); only rank 0 prints
    and writes, the other ranks stay silent and exit with the same code."""
    from bncheck.measuring.distributed import init_from_env

    world = init_from_env(target.split(":", 1)[0])
    if world.active and not world.main:
        import atexit
        import os

        quiet = open(os.devnull, "w")  # noqa: SIM115 - lives until the process ends
        atexit.register(quiet.close)
        sys.stdout = sys.stderr = quiet
    return world


def _agreed(world: Any, step: Callable[[], Any]) -> Any:
    """Run ``step`` on every rank; when it fails on any, every rank stops with one error."""
    failure = None
    result = None
    try:
        result = step()
    except Exception as exc:
        failure = exc
    world.agree(failure)
    return result


def _arch_kwargs(flags: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """--arch-kwargs parsed like the config's arch_kwargs; the flag wins."""
    from bncheck.reading.architectures import parse_arch_kwargs

    return parse_arch_kwargs(flags["arch_kwargs"]) if flags["arch_kwargs"] else settings.arch_kwargs


def _diagnose(model: Any, source: Any, settings: Settings, *, momentum_known: bool = True,
              world: Any = None, sources: Any = None) -> Report:
    """``analyze`` over a data source (this rank's share of it under torchrun), with a
    progress bar on a terminal."""
    from bncheck.engine import analyze
    from bncheck.measuring.distributed import World
    from bncheck.measuring.outputs import choosing
    from bncheck.reporting.render.table import progress_bar

    planned = -(-source.planned_samples // settings.batch_size)
    show = not settings.quiet and sys.stderr.isatty()
    with progress_bar(planned, enabled=show, batch_size=settings.batch_size) as advance, choosing(settings.output):
        return analyze(
            model, source.batches_for(world or World()), batch_size=settings.batch_size,
            thresholds=settings.thresholds, attribute=settings.attribute, ignore=settings.ignore,
            fail_on=settings.fail_on, progress=advance, momentum_known=momentum_known, shard=False, sources=sources,
            thorough=settings.thorough,
        )


def _sources(
    info: Any, settings: Optional[Settings] = None, source: Any = None, provenance: Optional[dict[str, str]] = None,
) -> Any:
    """Where the model and the data came from, for the engine to put into the report as it
    builds it (the data source describes itself once its batches are read)."""
    from bncheck.reporting.report import Sources

    if settings is None or source is None:
        return Sources(model=info)

    def describe() -> dict[str, Any]:
        return {"source": settings.data.path, "skipped": len(source.skipped),
                "requested": source.planned_request, "preprocessing": source.describe(settings.data, provenance)}

    return Sources(model=info, describe_data=describe)


def _provenance(config_path: Optional[Path], flags: dict[str, Any]) -> dict[str, str]:
    """Where each image transform setting came from: flag, config or default."""
    from bncheck.config import read_user_data_keys

    in_config = read_user_data_keys(config_path)
    return {
        key: "flag" if flags.get(key) is not None else "config" if key in in_config else "default"
        for key in ("resize", "crop", "mean", "std", "channels")
    }


def _adopt_preprocessing(
    settings: Settings, loaded: Any, provenance: dict[str, str]
) -> tuple[Settings, dict[str, str]]:
    """A model folder documents its input preprocessing (timm's pretrained_cfg, transformers'
    preprocessor_config.json), and detection data implies its own (0..1 pixels at each image's
    size): they replace the defaults, the model folder first, never a flag or config value."""
    from bncheck.reading.data import kind_defaults

    for implied, origin in ((loaded.preprocessing, "model folder"),
                            (kind_defaults(settings.data.path), "detection data")):
        adopted = {key: value for key, value in implied.items() if provenance.get(key) == "default"}
        if not adopted:
            continue
        adopted = {key: tuple(v) if isinstance(v, list) else v for key, v in adopted.items()}
        settings = replace(settings, data=replace(settings.data, **adopted))
        provenance = {**provenance, **dict.fromkeys(adopted, origin)}
    return settings, provenance


def _data_notes(source: Any, settings: Settings, *, skipped: Optional[list[str]] = None) -> None:
    """Notes and warnings about how the data was read: skipped files, one class, upscaling."""
    skipped = source.skipped if skipped is None else skipped
    for line in skipped[:5]:
        _err(f"warning: skipped unreadable file {line}")
    if len(skipped) > 5:
        _err(f"warning: ... and {len(skipped) - 5} more unreadable files skipped")
    for note in source.notes:
        _err(f"note: {note}")
    upscale = source.upscale_warning(settings.data)
    if upscale:
        _err(f"warning: {upscale}")


def _overrides(flags: dict[str, Any]) -> dict[str, Any]:
    """Command-line flags in the shape of the config file; None means "not given"."""
    outputs = {key: flags[f"{key}_out"] for key in ("json", "markdown", "html", "junit")}
    data = {"path": flags["data"], "seed": flags["seed"], "resize": _size(flags.get("resize"), "--resize"),
            "crop": _size(flags.get("crop"), "--crop"), "mean": _floats(flags.get("mean"), "--mean"),
            "std": _floats(flags.get("std"), "--std"), "box_labels": flags.get("box_labels")}
    data = {k: (None if v is _EXPLICIT_NONE else v) for k, v in data.items() if v is not None}
    return {
        "arch": flags["arch"], "baseline": flags["baseline"], "batch_size": flags["batch_size"],
        "num_batches": flags["num_batches"], "device": flags["device"], "fail_on": flags["fail_on"],
        "top": flags["top"], "save": flags["save"], "attribute": flags["attribute"], "quiet": flags["quiet"],
        "thorough": flags.get("thorough"), "profile": flags.get("profile"),
        "annotations": flags.get("annotations"), "weights": flags.get("weights"), "output": flags.get("output"),
        "outputs": {k: v for k, v in outputs.items() if v is not None} or None,
        "data": data or None,
    }


def _load_baseline(path: Optional[str]) -> Optional[Report]:
    if path is None:
        return None
    from bncheck.reporting import report as report_module

    return report_module.load(Path(path))


def _stdout_format(targets: dict[str, Optional[str]]) -> Optional[str]:
    """The one format that goes to stdout ('-'), if any. One rule for run and report:
    ``--json``/``--markdown`` take a PATH, or '-' (also a bare flag) for stdout; two formats
    cannot share stdout."""
    to_stdout = [fmt for fmt, target in targets.items() if target == STDOUT]
    if len(to_stdout) > 1:
        flags = " and ".join(f"--{fmt}" for fmt in to_stdout)
        raise UsageError(f"{flags} would both print to stdout; give all but one of them a PATH")
    return to_stdout[0] if to_stdout else None


def _render_text(report: Report, fmt: str, top: int) -> str:
    from bncheck.reporting.render import render

    return render(report, fmt, top=top)


def _write_formats(report: Report, targets: dict[str, Optional[str]], top: int) -> None:
    """Render ``report`` into each format whose target is a path (stdout is the caller's)."""
    for fmt, target in targets.items():
        if target is not None and target != STDOUT:
            _write_text(Path(target), _render_text(report, fmt, top), f"the {fmt} report")


def _quiet_line(report: Report) -> None:
    """--quiet still says why a gate failed: the verdict and the top finding, on stderr."""
    if report.verdict != "fail":
        return
    top = report.top_finding()
    if report.baseline is not None:
        regressions = (*report.baseline.new, *report.baseline.worsened)
        top = max(regressions, key=lambda f: SEVERITY_ORDER[f.severity], default=top)
    where = f" {top.layer}" if top is not None and top.layer else ""
    detail = f": {top.severity} {top.code}{where}: {top.message}" if top is not None else ""
    count = len(report.findings)
    _err(f"bncheck FAIL ({count} finding{'' if count == 1 else 's'}){detail}")


def _finish(report: Report, settings: Settings) -> None:
    """Save, write and print the result; exit 1 when it failed (under torchrun only rank 0
    saves, writes and prints; every rank exits with the same code)."""
    from bncheck.reporting.report import dumps

    if not _main_rank():
        if report.verdict == "fail":
            click.get_current_context().exit(int(ExitCode.FINDINGS))
        return

    outputs = settings.outputs
    targets = {"json": outputs.json, "markdown": outputs.markdown, "html": outputs.html, "junit": outputs.junit}
    to_stdout = _stdout_format({"json": outputs.json, "markdown": outputs.markdown})
    _save_last_run(dumps(report), settings)
    _write_formats(report, targets, settings.top)
    if settings.quiet:
        _quiet_line(report)
    else:
        _print_report(report, settings, to_stderr=to_stdout is not None)
    if settings.profile:
        from bncheck.reporting.render import render

        click.echo(render(report, "profile").rstrip("\n"), err=True)  # escaped by the renderer
    if to_stdout is not None:
        sys.stdout.write(_render_text(report, to_stdout, settings.top))
        sys.stdout.flush()
    _annotate(report, settings.annotations, to_stderr=to_stdout is not None)
    if report.verdict == "fail":
        click.get_current_context().exit(int(ExitCode.FINDINGS))


def _annotate(report: Report, mode: str, *, to_stderr: bool) -> None:
    """GitHub workflow commands for the findings (PR annotations); on stderr when stdout
    carries JSON or Markdown, so that stays parseable (the runner reads both streams)."""
    import os

    if mode == "none" or (mode == "auto" and os.environ.get("GITHUB_ACTIONS") != "true"):
        return
    from bncheck.reporting.render import render

    text = render(report, "github")
    stream = sys.stderr if to_stderr else sys.stdout
    stream.write(text)
    stream.flush()


@cli.command(context_settings=CONTEXT)
@click.argument("checkpoint", type=click.Path(path_type=Path, dir_okay=True))
@click.option("--arch", metavar="SPEC", help="Model builder, as for `bncheck run` (needed for a state_dict).")
@click.option("--arch-kwargs", metavar="YAML", help="Keyword arguments for --arch, e.g. '{num_classes: 10}'.")
@click.option("--weights", metavar="NAME", help=WEIGHTS_HELP + " fix writes the picked one back in place.")
@click.option("--data", metavar="PATH",
              help="Folder of images, COCO annotation file (.json), tensor file or file.py:callable whose statistics "
                   "the BN layers get.")
@click.option("--out", "out", metavar="NEW", type=click.Path(path_type=Path),
              help="Where to write the recalibrated checkpoint (same format as the input; never the input).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), metavar="YAML",
              help="Settings that differ from configs/default.yaml; flags override it.")
@click.option("--layers", multiple=True, metavar="GLOB",
              help="Recalibrate only BN layers matching this glob (repeatable; default: all).")
@click.option("--num-samples", type=click.IntRange(min=2), metavar="N",
              help="Use the first N samples of the deterministic shuffle (default: every sample in --data).")
@click.option("--batch-size", type=click.IntRange(min=2), help="Samples per forward pass (default 32).")
@click.option("--num-batches", type=click.IntRange(min=1),
              help="Batches in the before/after diagnosis (default 4).")
@click.option("--device", type=click.Choice(DEVICES), help="Where to run (default auto: cuda when available).")
@click.option("--seed", type=click.IntRange(min=0), help="Seed of the image shuffle (default 0).")
@click.option("--trust-checkpoint", is_flag=True,
              help="Load files that are programs: full pickles (torch.save(model)), TorchScript archives, "
                   ".pt2 archives that hold code. Loading them runs code from the file.")
@TRUST_CONFIG
@click.option("--dry-run", is_flag=True, help="Compute and show before -> after; write nothing.")
@click.option("--force", is_flag=True,
              help="Replace an existing --out, and write even when bncheck would refuse (loudly).")
@click.option("--html", "html_out", metavar="PATH",
              help="Also write a self-contained HTML page: outputs and every layer before -> after.")
@click.option("--json", "json_out", metavar="[PATH|-]", is_flag=False, flag_value=STDOUT,
              help="Write the fix result (schema bncheck/fix/v1) to PATH; bare or '-': only JSON on stdout.")
@click.option("--fail-on", type=click.Choice(FAIL_ON_LEVELS),
              help="Exit 1 when findings at least this severe remain after the fix (default error).")
@click.option("--quiet", "-q", is_flag=True, default=None, help="Only the one-line outcome and warnings.")
@_transform_options
@_handle_errors
def fix(
    checkpoint: Path,
    out: Optional[Path],
    config_path: Optional[Path],
    layers: tuple[str, ...],
    num_samples: Optional[int],
    trust_checkpoint: bool,
    trust_config: bool,
    dry_run: bool,
    force: bool,
    **flags: Any,
) -> None:
    """Recalibrate BN running statistics to the exact population statistics of --data,
    verify the result (before -> after per layer and for the outputs) and write --out in
    the input's format.

    \b
    Refuses (exit 1, nothing written) when the data looks wrongly preprocessed
    (input-distribution) or, with labels, when eval-mode accuracy would drop.
    Exit 0: written and the fixed model passes the gate; 1: refused, or findings at or
    above --fail-on remain; 2: usage; 3: input error (also an existing --out without
    --force, or --out equal to the input); 4: internal error.
    """
    flags.update(markdown_out=None, junit_out=None, baseline=None,
                 top=None, save=None, attribute=None)
    settings = load_settings(config_path, _overrides(flags), trust_config=trust_config, force=force)
    from bncheck.files import check_output_folder, check_output_path

    if settings.data.path is None:
        raise UsageError("fix needs --data: the samples whose statistics the BN layers should hold")
    if out is None and not dry_run:
        raise UsageError("give --out NEW for the recalibrated checkpoint, or --dry-run to only see before -> after")
    inputs = _input_paths(checkpoint, settings.data.path, config=config_path)
    if out is not None:
        (check_output_folder if Path(checkpoint).is_dir() else check_output_path)(
            out, checkpoint, force=force, inputs=inputs)
    _check_outputs({"out": out, "json": settings.outputs.json, "html": settings.outputs.html}, inputs,
                   folders=("out",) if Path(checkpoint).is_dir() else ())
    kwargs = _arch_kwargs(flags, settings)


    from bncheck.curing.fix import run_fix
    from bncheck.reading.checkpoint import open_checkpoint
    from bncheck.reading.data import open_data

    target = _target_device(settings)
    world = _join(target)
    loaded = _agreed(world, lambda: open_checkpoint(checkpoint, settings.arch, kwargs,
                                                    trust_checkpoint=trust_checkpoint, weights=settings.weights))
    _settle_heap()
    _weights_note(loaded.info)
    loaded.module.to(target)
    settings, provenance = _adopt_preprocessing(settings, loaded, _provenance(config_path, flags))
    path = Path(settings.data.path)
    every = None if num_samples is None else -(-num_samples // settings.batch_size)
    recal_source, verify_source = _agreed(world, lambda: (
        open_data(path, settings.data, settings.batch_size, every),
        open_data(path, settings.data, settings.batch_size, settings.num_batches)))
    verify = _agreed(world, lambda: list(verify_source.batches_for(world)))  # read once: used before and after
    # the verification batches hold the whole sample recalibration would read: fix shares the passes
    same = (num_samples is None and verify_source.kind != "pipeline"
            and verify_source.planned_samples == recal_source.planned_samples)
    from bncheck.measuring.outputs import choosing

    with choosing(settings.output):
        result = run_fix(
            loaded, None if same else recal_source.batches_for(world), lambda: verify, out=out,
            layers=list(layers) or None, num_samples=num_samples, batch_size=settings.batch_size,
            thresholds=settings.thresholds, attribute=0, ignore=settings.ignore, fail_on=settings.fail_on,
            dry_run=dry_run, force=force, sources=_sources(loaded.info, settings, verify_source, provenance),
        )
    verify_source.notes.extend(note for note in recal_source.notes if note not in verify_source.notes)
    _data_notes(verify_source, settings, skipped=sorted(set(recal_source.skipped + verify_source.skipped)))
    _finish_fix(result, settings)


def _finish_fix(result: Any, settings: Settings) -> None:
    from bncheck.reporting.render import render

    if not _main_rank():
        if result.verdict == "fail":
            click.get_current_context().exit(int(ExitCode.FINDINGS))
        return

    json_to_stdout = settings.outputs.json == "-"
    if settings.outputs.json is not None and not json_to_stdout:
        _write_text(Path(settings.outputs.json), render(result, "json"), "the fix result")
    if settings.outputs.html is not None:
        _write_text(Path(settings.outputs.html), render(result, "html", top=settings.top), "the HTML page")
    if not settings.quiet:
        stream = sys.stderr if json_to_stdout else sys.stdout
        click.echo(render(result, "table", color=stream.isatty()), nl=False, err=json_to_stdout)
    else:
        for warning in result.warnings:
            _err(f"warning: {warning}")
        _err(f"bncheck fix: {result.outcome}" + (f" ({result.reasons[0]})" if result.reasons else ""))
    if json_to_stdout:
        sys.stdout.write(render(result, "json"))
        sys.stdout.flush()
    if result.verdict == "fail":
        click.get_current_context().exit(int(ExitCode.FINDINGS))


@cli.command(context_settings=CONTEXT)
@click.argument("checkpoint_a", type=click.Path(path_type=Path, dir_okay=True))
@click.argument("checkpoint_b", type=click.Path(path_type=Path, dir_okay=True))
@click.option("--arch", metavar="SPEC", help="Model builder for both checkpoints (needed for state_dicts).")
@click.option("--arch-kwargs", metavar="YAML", help="Keyword arguments for --arch, e.g. '{num_classes: 10}'.")
@click.option("--weights", "weights", metavar="NAME[,NAME]",
              help="Which model of each checkpoint (as for run); 'A,B' picks one per checkpoint, e.g. "
                   "'state_dict,state_dict_ema' to diff the live weights against their EMA in one file.")
@click.option("--trust-checkpoint", is_flag=True,
              help="Load files that are programs: full pickles (torch.save(model)), TorchScript archives, "
                   ".pt2 archives that hold code. Loading them runs code from the file.")
@click.option("--json", "json_out", metavar="[PATH|-]", is_flag=False, flag_value=STDOUT,
              help="Write the diff (schema bncheck/diff/v1) to PATH; bare or '-': only JSON on stdout.")
@click.option("--markdown", "markdown_out", metavar="[PATH|-]", is_flag=False, flag_value=STDOUT,
              help="Write Markdown to PATH; bare or '-': Markdown on stdout.")
@click.option("--fail-on", type=click.Choice(FAIL_ON_LEVELS), default="error", show_default=True,
              help="Exit 1 for findings at least this severe.")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True, help="Rows in the table.")
@_handle_errors
def diff(
    checkpoint_a: Path, checkpoint_b: Path, arch: Optional[str], arch_kwargs: Optional[str], weights: Optional[str],
    trust_checkpoint: bool, json_out: Optional[str], markdown_out: Optional[str], fail_on: str, top: int,
) -> None:
    """Compare two checkpoints of one architecture (base vs fine-tuned, live vs EMA/SWA,
    rank 0 vs rank 1) around every BN layer, with no data: how far the running statistics
    moved, and how far the affine parameters and the weights feeding each layer moved.

    \b
    Findings: stats-not-updated (statistics identical while the weights around them
    changed: momentum 0, SWA/EMA without a BN update), stats-moved-frozen-weights
    (statistics moved while the weights stayed frozen: a frozen part left in train mode).
    Exit codes as for run.
    """
    from bncheck.diff import diff_checkpoints
    from bncheck.reading.architectures import parse_arch_kwargs
    from bncheck.reading.checkpoint import open_checkpoint
    from bncheck.reporting.render import render

    to_stdout = _stdout_format({"json": json_out, "markdown": markdown_out})
    _check_outputs({"json": json_out, "markdown": markdown_out},
                   {"the first checkpoint": checkpoint_a, "the second checkpoint": checkpoint_b})
    kwargs = parse_arch_kwargs(arch_kwargs)
    picks = (weights or "").split(",") if weights else [None]
    if len(picks) > 2:
        raise UsageError("--weights takes one NAME, or two separated by a comma (one per checkpoint)")
    pick_a, pick_b = picks[0] or None, picks[-1] or None
    first = open_checkpoint(checkpoint_a, arch, kwargs, trust_checkpoint=trust_checkpoint, weights=pick_a)
    second = open_checkpoint(checkpoint_b, arch, kwargs, trust_checkpoint=trust_checkpoint, weights=pick_b)
    _settle_heap()
    result = diff_checkpoints(first, second, fail_on=fail_on)
    texts = {fmt: (lambda fmt=fmt: render(result, fmt, top=top)) for fmt in ("json", "markdown")}
    for fmt, target in (("json", json_out), ("markdown", markdown_out)):
        if target is not None and target != STDOUT:
            _write_text(Path(target), texts[fmt](), f"the {fmt} diff")
    stream_is_err = to_stdout is not None
    click.echo(render(result, "table", top=top, color=(sys.stderr if stream_is_err else sys.stdout).isatty()),
               nl=False, err=stream_is_err)
    if to_stdout is not None:
        sys.stdout.write(texts[to_stdout]())
    if result.verdict == "fail":
        click.get_current_context().exit(int(ExitCode.FINDINGS))


@cli.command(context_settings=CONTEXT)
@click.argument("run_json", required=False, type=click.Path(path_type=Path))
@click.option("--json", "json_out", metavar="[PATH|-]", is_flag=False, flag_value=STDOUT,
              help="The JSON result: to PATH, or bare / '-' to stdout.")
@click.option("--markdown", "markdown_out", metavar="[PATH|-]", is_flag=False, flag_value=STDOUT,
              help="Markdown (PR comments, $GITHUB_STEP_SUMMARY): to PATH, or bare / '-' to stdout.")
@click.option("--html", "html_out", metavar="PATH", help="Write a self-contained HTML report there.")
@click.option("--junit", "junit_out", metavar="PATH", help="Write JUnit XML there (one testcase per layer).")
@click.option("--compare", "baseline", metavar="BASELINE_JSON",
              help="Compare with an accepted run: `report --compare OLD.json NEW.json`; exit 1 on new or "
                   "worsened findings.")
@click.option("--top", type=click.IntRange(min=1), help="Rows in the table (default 10).")
@click.option("--annotations", type=click.Choice(ANNOTATIONS),
              help="Print GitHub Actions workflow commands for the findings (default auto: when GITHUB_ACTIONS=true).")
@click.option("--fail-on", type=click.Choice(FAIL_ON_LEVELS),
              help="Judge the run at this level. Default: the stricter of the saved run's fail_on and the "
                   "config's (error), so a file cannot switch its own gate off.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), metavar="YAML",
              help="Config whose `save` path locates the last run (and whose fail_on judges it).")
@_handle_errors
def report(
    run_json: Optional[Path],
    json_out: Optional[str],
    markdown_out: Optional[str],
    html_out: Optional[str],
    junit_out: Optional[str],
    baseline: Optional[str],
    top: Optional[int],
    annotations: Optional[str],
    fail_on: Optional[str],
    config_path: Optional[Path],
) -> None:
    """Re-render a saved run (default: the last one) without running the model or
    importing torch. Exit 0, or with --compare, 1 when findings are new or worse.

    \b
    --json and --markdown work as in `run`: a PATH, or bare/'-' for stdout (one format
    at a time on stdout); with neither, the table prints."""
    from bncheck.reporting import report as report_module

    targets = {"json": json_out, "markdown": markdown_out, "html": html_out, "junit": junit_out}
    to_stdout = _stdout_format(targets)
    settings = load_settings(config_path, {"top": top, "annotations": annotations, "fail_on": fail_on}, writes=False)
    if run_json is None:
        if settings.save is None:
            raise UsageError("no RUN_JSON given and saving is off (save: null); pass the JSON path")
        run_json = Path(settings.save)
    _check_outputs(targets, {"the saved run": run_json, "the baseline": baseline, "the config": config_path})
    # the gate is the reader's: a file cannot switch it off with its own fail_on or verdict
    loaded = report_module.load(run_json)
    loaded = report_module.regate(loaded, fail_on or report_module.stricter(loaded.fail_on, settings.fail_on))
    if baseline is not None:
        from bncheck.reporting.baseline import apply_baseline

        loaded = apply_baseline(loaded, report_module.load(Path(baseline)), baseline)
    _write_formats(loaded, targets, settings.top)
    if to_stdout is not None:
        sys.stdout.write(_render_text(loaded, to_stdout, settings.top))
    elif not any(targets.values()):
        _print_report(loaded, settings, to_stderr=False)
    _annotate(loaded, settings.annotations, to_stderr=to_stdout is not None)
    if baseline is not None and loaded.verdict == "fail":
        click.get_current_context().exit(int(ExitCode.FINDINGS))


def _terminate(signum: int, _frame: Any) -> None:
    """SIGTERM (a CI timeout, torchrun stopping its workers) unwinds like an interrupt, so
    every temporary file is removed on the way out; the exit status is the usual 128 + 15."""
    raise SystemExit(128 + signum)


def _settle_heap() -> None:
    """Once torch, the model's library and the model are loaded (millions of objects that live
    until the process ends): one collection, then freeze them out of the garbage collector,
    which ``main`` kept off until now. Each full collection would otherwise walk all of them
    again (measured: 0.8 s of a 12 s resnet50 run, most of it during the imports). A no-op
    where ``main`` did not turn the collector off (click's test runner, a host process)."""
    import gc

    if not gc.isenabled():
        gc.collect()  # once: the imports' cyclic garbage goes, so peak memory stays where it was
        gc.freeze()
        gc.enable()


def main() -> None:
    import gc
    import os
    import signal

    gc.disable()  # until _settle_heap: the imports and loading create few cycles and many objects

    # bncheck never downloads: libraries that would fetch a Hub backbone or file stay offline
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    signal.signal(signal.SIGTERM, _terminate)
    cli(prog_name="bncheck")


if __name__ == "__main__":  # pragma: no cover
    main()
