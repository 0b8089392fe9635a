"""Settings: ``default.yaml`` <- the user's ``--config`` file <- command-line flags.

One precedence rule: a later source overrides an earlier one key by key. The user's file
states only what differs from the defaults; an unknown key anywhere is an error (a typo
in a threshold must not silently keep the default).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

from bncheck.errors import UsageError
from bncheck.files import check_config_output
from bncheck.reading.untrusted import names_code, shown

DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")
FAIL_ON_LEVELS = ("error", "warning", "never")
CHANNEL_ORDERS = ("rgb", "bgr", "gray")
BOX_LABELS = ("category-id", "index", "index+1")
"""How a COCO file's category ids become target labels: as they are (torchvision's COCO
detectors), their 0-based index among the file's categories sorted by id (ultralytics,
detectron2, mmdetection), or that index + 1 (torchvision-style custom datasets, 0 background)."""
DEVICES = ("auto", "cpu", "cuda")
ANNOTATIONS = ("auto", "github", "none")


@dataclass(frozen=True)
class DataSettings:
    path: Optional[str]
    """Folder of images or tensor file (``--data``)."""
    resize: Optional[int]
    """Shorter image side after resizing, pixels; None keeps each image's size."""
    crop: Optional[int]
    """Centre-crop size, pixels; None: no crop."""
    mean: tuple[float, ...]
    """Per-channel mean subtracted after scaling pixels to 0..1."""
    std: tuple[float, ...]
    """Per-channel std divided by after subtracting the mean."""
    channels: str
    """Channel order fed to the model: rgb, bgr or gray."""
    seed: int
    """Seed of the deterministic shuffle that picks the sample of images."""
    box_labels: str = "category-id"
    """COCO files: target labels from category ids as they are, or renumbered (``BOX_LABELS``)."""


@dataclass(frozen=True)
class Thresholds:
    stale_error: float
    """Layer score at or above which stale running stats are an error."""
    stale_warning: float
    """Layer score at or above which stale running stats are a warning."""
    drift_to_noise: float
    """Minimum ratio of a layer's score to its sampling-noise floor for drift to count."""
    divergence: float
    """Eval-pass layer score that marks the first divergent layer."""
    input_mean_shift: float
    """|mean shift| in running-std units at the first BN layer that flags the input."""
    small_batch_noise: float
    """Per-batch noise floor above which train-mode batch statistics are unreliable."""
    dead_channel_var: float
    """Variance (before eps) at or below which a channel is dead."""
    eps_low: float
    """Lint: a layer eps below this is unusual."""
    eps_high: float
    """Lint: a layer eps above this is unusual."""
    baseline_worsen: float
    """Relative growth of a layer's score that makes a known finding count as worsened."""


@dataclass(frozen=True)
class Outputs:
    json: Optional[str]
    markdown: Optional[str]
    html: Optional[str]
    junit: Optional[str]


@dataclass(frozen=True)
class Settings:
    arch: Optional[str]
    arch_kwargs: dict
    baseline: Optional[str]
    quiet: bool
    outputs: Outputs
    data: DataSettings
    batch_size: int
    num_batches: int
    device: str
    fail_on: str
    top: int
    attribute: int
    """Causal attribution for the K highest-ranked flagged layers (one eval pass each)."""
    save: Optional[str]
    ignore: tuple[str, ...]
    thresholds: Thresholds
    annotations: str = "auto"
    """CI annotations: ``github`` prints workflow commands, ``auto`` does on GitHub Actions."""
    weights: Optional[str] = None
    """Which model of a checkpoint that holds several (``state_dict_ema``); None: the live one."""
    output: Optional[str] = None
    """Which part of the model's output to compare (``logits``, ``1``); None: found automatically."""
    thorough: bool = False
    """Run every pass, even those whose answer cannot change the verdict or the advice."""
    profile: bool = False
    """Print each pass's time and what it bought (the JSON always has them)."""


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    from bncheck.errors import InputError
    from bncheck.reading.untrusted import read_text_bounded, safe_yaml

    if not path.exists():
        raise UsageError(f"config file {path} does not exist; check the --config path")
    try:
        text = read_text_bounded(path, "config file")
    except InputError as exc:
        raise UsageError(exc.template) from None
    try:
        loaded = safe_yaml(text, f"config file {path}")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"config file {path} is not valid YAML{where}; fix its syntax") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UsageError(f"config file {path} must hold a mapping of settings, not {type(loaded).__name__}")
    return loaded


def _merge(base: dict[str, Any], override: Mapping[str, Any], source: str, prefix: str = "") -> dict:
    merged = dict(base)
    for key, value in override.items():
        if key not in base:
            known = ", ".join(sorted(base))
            raise UsageError(f"unknown config key '{prefix}{key}' in {source}; known keys: {known}")
        if isinstance(base[key], dict) and base[key]:  # a section (an empty dict is a value)
            if not isinstance(value, dict):
                raise UsageError(f"config key '{prefix}{key}' in {source} must be a mapping")
            merged[key] = _merge(base[key], value, source, f"{prefix}{key}.")
        else:
            merged[key] = value
    return merged


def _number(raw: dict, key: str, kind: type, *, minimum: float, optional: bool = False, where: str):
    value = raw[key]
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        kind is int and not float(value).is_integer()
    ):
        raise UsageError(f"setting '{where}{key}' must be a number, got {shown(value)}")
    if not math.isfinite(value):  # nan < minimum is False: a NaN threshold would switch its gate off
        raise UsageError(f"setting '{where}{key}' must be a finite number, got {value}")
    value = kind(value)
    if value < minimum:
        raise UsageError(f"setting '{where}{key}' must be at least {minimum}, got {value}")
    return value


def _choice(raw: dict, key: str, choices: tuple[str, ...], where: str = "") -> str:
    value = raw[key]
    if value not in choices:
        raise UsageError(f"setting '{where}{key}' must be one of {', '.join(choices)}; got {shown(value)}")
    return value


def _optional_str(raw: dict, key: str, where: str) -> Optional[str]:
    value = raw[key]
    if value is not None and not isinstance(value, str):
        raise UsageError(f"setting '{where}{key}' must be a string or null, got {shown(value)}")
    return value


def _floats(raw: dict, key: str, where: str) -> tuple[float, ...]:
    value = raw[key]
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        raise UsageError(f"setting '{where}{key}' must be a list of numbers, got {shown(value)}")
    if not all(math.isfinite(v) for v in value):
        raise UsageError(f"setting '{where}{key}' must hold finite numbers, got {shown(value)}")
    return tuple(float(v) for v in value)


def check_arch_kwargs(value: Any, what: str) -> dict[str, Any]:
    """Keyword arguments for the architecture builder: a mapping with string keys, and no
    ``'num_classes:10'`` key that YAML made of a missing space (same rule for flag and config)."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise UsageError(f"{what} must be a mapping such as '{{num_classes: 10}}', got {shown(value)}")
    glued = [k for k, v in value.items() if v is None and ":" in k]
    if glued:
        key, _, val = glued[0].partition(":")
        raise UsageError(f"{what} {shown(value)}: YAML needs a space after the colon: '{{{key}: {val}}}'")
    return dict(value)


THRESHOLD_RANGES: dict[str, tuple[float, float, bool]] = {
    "stale_error": (0.0, 10.0, False),
    "stale_warning": (0.0, 10.0, False),
    "drift_to_noise": (0.0, 100.0, True),
    "divergence": (0.0, 10.0, False),
    "input_mean_shift": (0.0, 100.0, False),
    "small_batch_noise": (0.0, 10.0, False),
    "dead_channel_var": (0.0, 1.0, True),
    "eps_low": (0.0, 1.0, True),
    "eps_high": (0.0, 1.0, True),
    "baseline_worsen": (0.0, 10.0, True),
}
"""Each threshold's valid range ``(low, high, low_included)``; the high end is included. A
layer score (the RMS normalization error) of 10 is ten output standard deviations: a gate set
above that, or a drift-to-noise ratio above 100, would pass every broken model, so a file
cannot switch a gate off with a number (``fail_on: never`` is the one documented switch)."""


def _in_range(name: str, value: float) -> float:
    low, high, low_included = THRESHOLD_RANGES[name]
    if value > high or value < low or (value == low and not low_included):
        bracket = "[" if low_included else "("
        raise UsageError(f"setting 'thresholds.{name}' must be in {bracket}{low:g}, {high:g}], got {value:g}")
    return value


def _thresholds(t: dict[str, Any]) -> Thresholds:
    thresholds = Thresholds(**{
        f.name: _in_range(f.name, _number(t, f.name, float, minimum=0.0, where="thresholds."))
        for f in fields(Thresholds)
    })
    for low, high in (("stale_warning", "stale_error"), ("eps_low", "eps_high")):
        if getattr(thresholds, low) > getattr(thresholds, high):
            raise UsageError(
                f"thresholds.{low} ({getattr(thresholds, low):g}) is above thresholds.{high} "
                f"({getattr(thresholds, high):g}); swap them or raise {high}"
            )
    return thresholds


def _build(raw: dict[str, Any]) -> Settings:
    d = raw["data"]
    data = DataSettings(
        path=_optional_str(d, "path", "data."),
        resize=_number(d, "resize", int, minimum=1, optional=True, where="data."),
        crop=_number(d, "crop", int, minimum=1, optional=True, where="data."),
        mean=_floats(d, "mean", "data."),
        std=_floats(d, "std", "data."),
        channels=_choice(d, "channels", CHANNEL_ORDERS, "data."),
        seed=_number(d, "seed", int, minimum=0, where="data."),
        box_labels=_choice(d, "box_labels", BOX_LABELS, "data."),
    )
    if len(data.mean) != len(data.std):
        raise UsageError("settings 'data.mean' and 'data.std' must have the same length")
    if any(s <= 0 for s in data.std):
        raise UsageError("setting 'data.std' must hold positive numbers")
    thresholds = _thresholds(raw["thresholds"])
    ignore = raw["ignore"] or []
    if not isinstance(ignore, list) or not all(isinstance(g, str) for g in ignore):
        raise UsageError("setting 'ignore' must be a list of layer-name globs")
    save = raw["save"]
    if save is not None and not isinstance(save, str):
        raise UsageError("setting 'save' must be a path or null")
    outputs = Outputs(**{f.name: _optional_str(raw["outputs"], f.name, "outputs.") for f in fields(Outputs)})
    arch_kwargs = check_arch_kwargs(raw["arch_kwargs"] or {}, "setting 'arch_kwargs'")
    for key in ("quiet", "thorough", "profile"):
        if not isinstance(raw[key], bool):
            raise UsageError(f"setting '{key}' must be true or false")
    return Settings(
        arch=_optional_str(raw, "arch", ""),
        arch_kwargs=dict(arch_kwargs),
        baseline=_optional_str(raw, "baseline", ""),
        quiet=raw["quiet"],
        outputs=outputs,
        data=data,
        batch_size=_number(raw, "batch_size", int, minimum=2, where=""),  # train-mode BN needs 2 samples
        num_batches=_number(raw, "num_batches", int, minimum=1, where=""),
        device=_choice(raw, "device", DEVICES),
        fail_on=_choice(raw, "fail_on", FAIL_ON_LEVELS),
        top=_number(raw, "top", int, minimum=1, where=""),
        attribute=_number(raw, "attribute", int, minimum=0, where=""),
        save=save,
        ignore=tuple(ignore),
        thresholds=thresholds,
        annotations=_choice(raw, "annotations", ANNOTATIONS),
        weights=_optional_str(raw, "weights", ""),
        output=_optional_str({"output": str(raw["output"]) if isinstance(raw["output"], int) else raw["output"]},
                             "output", ""),
        thorough=raw["thorough"],
        profile=raw["profile"],
    )


CODE_FIELDS = ("arch", "data.path")
"""Config keys whose value may name code to import and call (``module:callable``, ``file.py:fn``)."""
OUTPUT_FIELDS = ("save", "outputs.json", "outputs.markdown", "outputs.html", "outputs.junit")
"""Config keys naming a file bncheck writes."""


def _dotted(raw: Mapping[str, Any], key: str) -> Any:
    value: Any = raw
    for part in key.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def load_settings(
    config_path: Optional[Path] = None, overrides: Optional[Mapping[str, Any]] = None, *,
    trust_config: bool = False, force: bool = False, writes: bool = True,
) -> Settings:
    """Defaults, then the user's YAML file, then ``overrides`` (flags; None values are unset).

    A config file may come from a stranger: a value of it that names code (``arch:
    os:system``, ``data: helpers.py:load``) is refused unless ``trust_config`` (the flag
    ``--trust-config``); a flag naming code is the user's own. Output paths it names must stay
    inside the working directory, and an existing file there is replaced only with ``force``
    (or when bncheck wrote it: a saved run, a report). ``writes=False``: the command only reads
    the paths (``report`` reads ``save``)."""
    raw = _read_yaml(DEFAULT_CONFIG)
    if config_path is not None:
        user = _read_yaml(Path(config_path))
        raw = _merge(raw, user, str(config_path))
        try:
            _build(raw)  # name the file when a value in it is wrong
        except UsageError as exc:
            raise UsageError(f"{exc.template} (in {config_path})") from None
        given = _given(overrides)
        if not trust_config:
            for key in CODE_FIELDS:
                value = _dotted(user, key)
                if _dotted(given, key) is None and names_code(value, builder=key == "arch"):
                    raise UsageError(
                        f"config file {config_path} names code in '{key}' ({shown(value)}); a config may come from "
                        f"anyone, so it runs none: pass it on the command line (--{key.split('.')[0]}) or add "
                        "--trust-config if you wrote this file")
        for key in OUTPUT_FIELDS if writes else ():
            value = _dotted(user, key)
            if value is not None and _dotted(given, key) is None:
                check_config_output(str(value), key, Path(config_path), force=force)
    if overrides:
        raw = _merge(raw, _given(overrides), "command-line flags")
    return _build(raw)


def _given(overrides: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    return {k: v for k, v in (overrides or {}).items() if v is not None}


def read_user_data_keys(config_path: Optional[Path]) -> set[str]:
    """The ``data`` keys a user's config file sets (for saying where a setting came from)."""
    if config_path is None:
        return set()
    section = _read_yaml(Path(config_path)).get("data") or {}
    return set(section) if isinstance(section, dict) else set()


_DEFAULTS: Optional[Settings] = None


def default_settings() -> Settings:
    """The packaged defaults (read once)."""
    global _DEFAULTS
    if _DEFAULTS is None:
        _DEFAULTS = load_settings()
    return _DEFAULTS


def resolve_thresholds(value: Any) -> Thresholds:
    """A ``Thresholds``, or the defaults overridden key by key by a mapping (unknown keys
    and non-numbers are errors, as in a config file)."""
    if isinstance(value, Thresholds):
        return value
    defaults = default_settings().thresholds
    if value is None:
        return defaults
    if not isinstance(value, Mapping):
        raise UsageError(
            f"thresholds must be a Thresholds or a mapping such as {{'stale_error': 0.5}}, not {shown(value)}")
    raw = _merge({f.name: getattr(defaults, f.name) for f in fields(Thresholds)}, value, "the thresholds argument",
                 "thresholds.")
    return _thresholds(raw)
