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

from . import __version__
from .config import DEVICES, FAIL_ON_LEVELS, Settings, load_settings
from .errors import BncheckError, ExitCode, UsageError
from .report import Report

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _err(message: str) -> None:
    click.echo(message, err=True)


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
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            _err(
                f"internal error: {type(exc).__name__}: {first} (this is a bncheck bug; rerun "
                "with `bncheck --debug ...` for the traceback and report it)"
            )
            ctx.exit(int(ExitCode.INTERNAL))

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

    Exit codes: 0 no finding at or above --fail-on, 1 findings, 2 usage error,
    3 input error (file, checkpoint, data, architecture), 4 internal error.
    """


def _write_text(path: Path, text: str, what: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {what} to {path}: {exc.strerror}; choose another path") from None


def _save_last_run(report_json: str, settings: Settings) -> None:
    if settings.save is None:
        return
    try:
        _write_text(Path(settings.save), report_json, "the run")
    except UsageError as exc:  # the result still prints; only `bncheck report` misses it
        _err(f"warning: {exc}; `bncheck report` will not see this run")


def _print_report(report: Report, settings: Settings, to_stderr: bool) -> None:
    from .render import render

    stream = sys.stderr if to_stderr else sys.stdout
    color = stream.isatty()
    width = None
    if color:
        import shutil

        width = shutil.get_terminal_size((120, 24)).columns
    click.echo(render(report, "table", top=settings.top, width=width, color=color), nl=False, err=to_stderr)


@cli.command(context_settings=CONTEXT)
@click.argument("checkpoint", required=False, type=click.Path(path_type=Path, dir_okay=True))
@click.option("--arch", metavar="SPEC",
              help="Model builder: torchvision:NAME, timm:NAME, package.module:callable or "
                   "path/file.py:callable. Needed when the checkpoint holds only a state_dict.")
@click.option("--arch-kwargs", metavar="YAML", help="Keyword arguments for --arch, e.g. '{num_classes: 10}'.")
@click.option("--data", metavar="PATH",
              help="Folder of images (flat or class subfolders) or a tensor file (.pt, .npy, .npz[:NAME]). "
                   "Without it, only the checkpoint itself is checked.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), metavar="YAML",
              help="Settings that differ from configs/default.yaml (every flag has a key); flags override it.")
@click.option("--batch-size", type=click.IntRange(min=2), help="Samples per forward pass (default 32).")
@click.option("--num-batches", type=click.IntRange(min=1),
              help="Batches pooled into population statistics (default 4).")
@click.option("--device", type=click.Choice(DEVICES), help="Where to run (default auto: cuda when available).")
@click.option("--seed", type=click.IntRange(min=0), help="Which images form the sample (default 0).")
@click.option("--trust-checkpoint", is_flag=True,
              help="Allow full pickled models (torch.save(model)); loading them executes code from the file.")
@click.option("--attribute", type=click.IntRange(min=0), metavar="K",
              help="For the K top flagged layers, measure how much of the output gap fixing each alone "
                   "removes: one extra eval pass over the sample per layer (default 5; 0: off).")
@click.option("--baseline", metavar="RUN_JSON",
              help="Accepted earlier run: fail only on findings that are new or worse than in it.")
@click.option("--fail-on", type=click.Choice(FAIL_ON_LEVELS),
              help="Exit 1 for findings at least this severe (default error).")
@click.option("--json", "json_out", metavar="PATH|-",
              help="Write the JSON result there; '-' writes only JSON to stdout (the table goes to stderr).")
@click.option("--markdown", "markdown_out", metavar="PATH", help="Also write Markdown there.")
@click.option("--html", "html_out", metavar="PATH", help="Also write a self-contained HTML report there.")
@click.option("--junit", "junit_out", metavar="PATH", help="Also write JUnit XML there (one testcase per layer).")
@click.option("--top", type=click.IntRange(min=1), help="Rows in the table (default 10).")
@click.option("--save", metavar="PATH",
              help="Where to keep the run for `bncheck report` (default .bncheck/last-run.json).")
@click.option("--quiet", "-q", is_flag=True, default=None, help="No table or progress; only errors and warnings.")
@_handle_errors
def run(
    checkpoint: Optional[Path],
    config_path: Optional[Path],
    trust_checkpoint: bool,
    **flags: Any,
) -> None:
    """Run the model in train and eval mode on sample data and rank the BN layers
    whose running statistics diverge most from the data's.

    Cost: two forward passes (eval, then train with only BN layers in train mode) per
    batch, plus one eval pass per attributed layer; the model and the checkpoint are
    never modified.
    """
    settings = load_settings(config_path, _overrides(flags))
    from .loading import parse_arch_kwargs

    arch = settings.arch
    kwargs = parse_arch_kwargs(flags["arch_kwargs"]) if flags["arch_kwargs"] else settings.arch_kwargs
    if checkpoint is None and arch is None:
        raise UsageError("give a CHECKPOINT file and/or --arch; see `bncheck run --help`")
    baseline = _load_baseline(settings.baseline)

    import torch

    from .checkpoint import open_checkpoint
    from .data import open_data
    from .engine import lint

    if settings.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but CUDA is not available here; use --device cpu")
    target = "cuda" if settings.device == "auto" and torch.cuda.is_available() else settings.device
    target = "cpu" if target == "auto" else target

    loaded = open_checkpoint(checkpoint, arch, kwargs, trust_checkpoint=trust_checkpoint)
    if settings.data.path is None:
        _err("note: no --data given: checking only what the checkpoint itself reveals (no statistics measured)")
        report = lint(loaded.module, thresholds=settings.thresholds, ignore=settings.ignore, fail_on=settings.fail_on)
        report = _with_sources(report, loaded.info, None, 0)
    else:
        source = open_data(Path(settings.data.path), settings.data, settings.batch_size, settings.num_batches)
        if loaded.info.format == "random-init":
            _err(f"warning: no checkpoint given: checking {arch} with RANDOM weights, "
                 "which says nothing about a trained model")
        report = _diagnose(loaded.module.to(target), source, settings)
        report = _with_sources(report, loaded.info, settings.data.path, len(source.skipped))
        _warn_skipped(source.skipped)
    if baseline is not None:
        from .baseline import apply_baseline

        report = apply_baseline(report, baseline, settings.baseline)
    _finish(report, settings)


def _diagnose(model: Any, source: Any, settings: Settings) -> Report:
    """``analyze`` over a data source, with a progress bar on a terminal."""
    from .engine import analyze
    from .render.table import progress_bar

    planned = -(-source.planned_samples // settings.batch_size)
    show = not settings.quiet and sys.stderr.isatty()
    with progress_bar(planned, enabled=show) as advance:
        return analyze(
            model, source.batches(), batch_size=settings.batch_size, thresholds=settings.thresholds,
            attribute=settings.attribute, ignore=settings.ignore, fail_on=settings.fail_on, progress=advance,
        )


def _with_sources(report: Report, info: Any, data_source: Optional[str], skipped: int) -> Report:
    """The report with the checkpoint's and the data's provenance (the engine knows neither)."""
    model = replace(info, bn_layers=report.model.bn_layers)
    return replace(report, model=model, data=replace(report.data, source=data_source, skipped=skipped))


def _warn_skipped(skipped: list[str]) -> None:
    for line in skipped[:5]:
        _err(f"warning: skipped unreadable file {line}")
    if len(skipped) > 5:
        _err(f"warning: ... and {len(skipped) - 5} more unreadable files skipped")


def _overrides(flags: dict[str, Any]) -> dict[str, Any]:
    """Command-line flags in the shape of the config file; None means "not given"."""
    outputs = {key: flags[f"{key}_out"] for key in ("json", "markdown", "html", "junit")}
    data = {"path": flags["data"], "seed": flags["seed"]}
    return {
        "arch": flags["arch"], "baseline": flags["baseline"], "batch_size": flags["batch_size"],
        "num_batches": flags["num_batches"], "device": flags["device"], "fail_on": flags["fail_on"],
        "top": flags["top"], "save": flags["save"], "attribute": flags["attribute"], "quiet": flags["quiet"],
        "outputs": {k: v for k, v in outputs.items() if v is not None} or None,
        "data": {k: v for k, v in data.items() if v is not None} or None,
    }


def _load_baseline(path: Optional[str]) -> Optional[Report]:
    if path is None:
        return None
    from . import report as report_module

    return report_module.load(Path(path))


def _write_formats(report: Report, targets: dict[str, Optional[str]], top: int) -> None:
    """Render ``report`` into each format whose target path is given."""
    from .render import render

    for fmt, target in targets.items():
        if target is not None:
            _write_text(Path(target), render(report, fmt, top=top), f"the {fmt} report")


def _write_outputs(report: Report, settings: Settings, report_json: str) -> None:
    outputs = settings.outputs
    _write_formats(report, {"markdown": outputs.markdown, "html": outputs.html, "junit": outputs.junit},
                   settings.top)
    if settings.outputs.json is not None and settings.outputs.json != "-":
        _write_text(Path(settings.outputs.json), report_json, "the JSON result")


def _finish(report: Report, settings: Settings) -> None:
    """Save, write and print the result; exit 1 when it failed."""
    from .report import dumps

    report_json = dumps(report)
    _save_last_run(report_json, settings)
    _write_outputs(report, settings, report_json)
    json_to_stdout = settings.outputs.json == "-"
    if not settings.quiet:
        _print_report(report, settings, to_stderr=json_to_stdout)
    if json_to_stdout:
        sys.stdout.write(report_json)
        sys.stdout.flush()
    if report.verdict == "fail":
        click.get_current_context().exit(int(ExitCode.FINDINGS))


@cli.command(context_settings=CONTEXT)
@click.argument("checkpoint", type=click.Path(path_type=Path, dir_okay=True))
@click.option("--arch", metavar="SPEC", help="Model builder, as for `bncheck run` (needed for a state_dict).")
@click.option("--arch-kwargs", metavar="YAML", help="Keyword arguments for --arch, e.g. '{num_classes: 10}'.")
@click.option("--data", metavar="PATH", help="Folder of images or tensor file whose statistics the BN layers get.")
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
              help="Allow full pickled models (torch.save(model)); loading them executes code from the file.")
@click.option("--dry-run", is_flag=True, help="Compute and show before -> after; write nothing.")
@click.option("--force", is_flag=True,
              help="Replace an existing --out, and write even when bncheck would refuse (loudly).")
@click.option("--json", "json_out", metavar="PATH|-",
              help="Write the fix result (schema bncheck/fix/v1) there; '-' writes only JSON to stdout.")
@click.option("--fail-on", type=click.Choice(FAIL_ON_LEVELS),
              help="Exit 1 when findings at least this severe remain after the fix (default error).")
@click.option("--quiet", "-q", is_flag=True, default=None, help="Only the one-line outcome and warnings.")
@_handle_errors
def fix(
    checkpoint: Path,
    out: Optional[Path],
    config_path: Optional[Path],
    layers: tuple[str, ...],
    num_samples: Optional[int],
    trust_checkpoint: bool,
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
    flags.update(json_out=flags["json_out"], markdown_out=None, html_out=None, junit_out=None, baseline=None,
                 top=None, save=None, attribute=None)
    settings = load_settings(config_path, _overrides(flags))
    from .files import check_output_path
    from .loading import parse_arch_kwargs

    if settings.data.path is None:
        raise UsageError("fix needs --data: the samples whose statistics the BN layers should hold")
    if out is None and not dry_run:
        raise UsageError("give --out NEW for the recalibrated checkpoint, or --dry-run to only see before -> after")
    if out is not None:
        check_output_path(out, checkpoint, force=force)
    kwargs = parse_arch_kwargs(flags["arch_kwargs"]) if flags["arch_kwargs"] else settings.arch_kwargs

    import torch

    from .checkpoint import open_checkpoint
    from .data import open_data
    from .fixing import run_fix

    if settings.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but CUDA is not available here; use --device cpu")
    target = "cuda" if settings.device == "auto" and torch.cuda.is_available() else settings.device
    target = "cpu" if target == "auto" else target
    loaded = open_checkpoint(checkpoint, settings.arch, kwargs, trust_checkpoint=trust_checkpoint)
    loaded.module.to(target)
    path = Path(settings.data.path)
    every = None if num_samples is None else -(-num_samples // settings.batch_size)
    recal_source = open_data(path, settings.data, settings.batch_size, every)
    verify_source = open_data(path, settings.data, settings.batch_size, settings.num_batches)
    result = run_fix(
        loaded, recal_source.batches(), verify_source.batches, out=out, layers=list(layers) or None,
        num_samples=num_samples, batch_size=settings.batch_size, thresholds=settings.thresholds, attribute=0,
        ignore=settings.ignore, fail_on=settings.fail_on, dry_run=dry_run, force=force,
    )
    info = loaded.info
    result = replace(
        result,
        before=_with_sources(result.before, info, settings.data.path, len(verify_source.skipped)),
        after=_with_sources(result.after, info, settings.data.path, len(verify_source.skipped))
        if result.after is not None else None,
    )
    _warn_skipped(sorted(set(recal_source.skipped + verify_source.skipped)))
    _finish_fix(result, settings)


def _finish_fix(result: Any, settings: Settings) -> None:
    from .render.table import render_fix
    from .report import dumps_fix

    json_to_stdout = settings.outputs.json == "-"
    if settings.outputs.json is not None and not json_to_stdout:
        _write_text(Path(settings.outputs.json), dumps_fix(result), "the fix result")
    if not settings.quiet:
        stream = sys.stderr if json_to_stdout else sys.stdout
        click.echo(render_fix(result, color=stream.isatty()), nl=False, err=json_to_stdout)
    else:
        for warning in result.warnings:
            _err(f"warning: {warning}")
        _err(f"bncheck fix: {result.outcome}" + (f" ({result.reasons[0]})" if result.reasons else ""))
    if json_to_stdout:
        sys.stdout.write(dumps_fix(result))
        sys.stdout.flush()
    if result.verdict == "fail":
        click.get_current_context().exit(int(ExitCode.FINDINGS))


@cli.command(context_settings=CONTEXT)
@click.argument("run_json", required=False, type=click.Path(path_type=Path))
@click.option("--json", "fmt", flag_value="json", help="Print the JSON result.")
@click.option("--markdown", "fmt", flag_value="markdown", help="Print Markdown (PR comments, $GITHUB_STEP_SUMMARY).")
@click.option("--html", "html_out", metavar="PATH", help="Write a self-contained HTML report there.")
@click.option("--junit", "junit_out", metavar="PATH", help="Write JUnit XML there (one testcase per layer).")
@click.option("--compare", "baseline", metavar="BASELINE_JSON",
              help="Compare with an accepted run: `report --compare OLD.json NEW.json`; exit 1 on new or "
                   "worsened findings.")
@click.option("--top", type=click.IntRange(min=1), help="Rows in the table (default 10).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), metavar="YAML",
              help="Config whose `save` path locates the last run.")
@_handle_errors
def report(
    run_json: Optional[Path],
    fmt: Optional[str],
    html_out: Optional[str],
    junit_out: Optional[str],
    baseline: Optional[str],
    top: Optional[int],
    config_path: Optional[Path],
) -> None:
    """Re-render a saved run (default: the last one) without running the model or
    importing torch. Exit 0, or with --compare, 1 when findings are new or worse."""
    from . import report as report_module
    from .render import render

    settings = load_settings(config_path, {"top": top})
    if run_json is None:
        if settings.save is None:
            raise UsageError("no RUN_JSON given and saving is off (save: null); pass the JSON path")
        run_json = Path(settings.save)
    loaded = report_module.load(run_json)
    if baseline is not None:
        from .baseline import apply_baseline

        loaded = apply_baseline(loaded, report_module.load(Path(baseline)), baseline)
    _write_formats(loaded, {"html": html_out, "junit": junit_out}, settings.top)
    if fmt == "json":
        sys.stdout.write(report_module.dumps(loaded))
    elif fmt == "markdown":
        sys.stdout.write(render(loaded, "markdown", top=settings.top))
    elif not (html_out or junit_out):
        _print_report(loaded, settings, to_stderr=False)
    if baseline is not None and loaded.verdict == "fail":
        click.get_current_context().exit(int(ExitCode.FINDINGS))


def main() -> None:
    cli(prog_name="bncheck")


if __name__ == "__main__":  # pragma: no cover
    main()
