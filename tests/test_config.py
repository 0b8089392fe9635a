from __future__ import annotations

import re

import pytest

from bncheck.config import DEFAULT_CONFIG, load_settings
from bncheck.errors import UsageError


def test_defaults_match_the_documented_keys() -> None:
    s = load_settings()
    assert s.batch_size == 32 and s.num_batches == 4 and s.fail_on == "error"
    assert s.data.resize == 256 and s.data.crop == 224 and s.data.channels == "rgb"
    assert s.data.mean == (0.485, 0.456, 0.406)
    assert s.save == ".bncheck/last-run.json" and s.ignore == ()


def test_configs_default_is_the_packaged_file() -> None:
    from conftest import ROOT

    assert (ROOT / "configs" / "default.yaml").read_text() == DEFAULT_CONFIG.read_text()


def test_precedence_defaults_then_file_then_flags(tmp_path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch_size: 8\nnum_batches: 2\ndata:\n  crop: null\nthresholds:\n  stale_error: 0.9\n")
    s = load_settings(cfg, {"batch_size": 16, "num_batches": None})
    assert s.batch_size == 16  # flag beats file
    assert s.num_batches == 2  # unset flag keeps the file's value
    assert s.data.crop is None and s.data.resize == 256  # nested keys merge one by one
    assert s.thresholds.stale_error == 0.9 and s.thresholds.stale_warning == 0.25


@pytest.mark.parametrize(
    "text, message",
    [
        ("bach_size: 3\n", "unknown config key 'bach_size'"),
        ("data:\n  chanels: rgb\n", "unknown config key 'data.chanels'"),
        ("fail_on: sometimes\n", "'fail_on' must be one of"),
        ("batch_size: two\n", "'batch_size' must be a number"),
        ("batch_size: 0\n", "at least 2"),
        ("batch_size: 1\n", "'batch_size' must be at least 2, got 1"),  # same rule as --batch-size
        ("thresholds:\n  stale_warning: 0.8\n  stale_error: 0.4\n", "thresholds.stale_warning (0.8) is above"),
        ("thresholds:\n  eps_low: 0.1\n  eps_high: 0.01\n", "thresholds.eps_low (0.1) is above"),
        ("arch_kwargs:\n  num_classes:10:\n", "YAML needs a space after the colon"),
        ("arch_kwargs: [1, 2]\n", "setting 'arch_kwargs' must be a mapping"),
        ("data: 5\n", "'data' in"),
        ("- a\n- b\n", "must hold a mapping"),
        ("data:\n  mean: [0.5]\n", "same length"),
        ("thresholds:\n  stale_error: -1\n", "at least 0"),
    ],
)
def test_bad_configs_are_usage_errors(tmp_path, text, message) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(UsageError, match=re.escape(message)):
        load_settings(cfg)


def test_missing_config_file(tmp_path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")
