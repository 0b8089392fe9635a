"""The result contract: JSON round trip, schema, and golden renderings."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jsonschema
import pytest

from bncheck.errors import InputError
from bncheck.reporting.render import RENDERERS, render
from bncheck.reporting.report import (
    ChannelDrift,
    DataInfo,
    Finding,
    LayerResult,
    ModelInfo,
    OutputDivergence,
    Report,
    dumps,
    from_dict,
    load,
    schema_path,
    to_dict,
)

GOLDEN = Path(__file__).parents[1] / "golden"


def make_report() -> Report:
    stale = Finding("stale-running-stats", "error", "layer1.0.bn2",
                    "running stats disagree with this data: score 1.50.", "Recalibrate.")
    nan = Finding("non-finite-stats", "error", "layer2.bn", "running statistics hold NaN/Inf in 2 of 64 channels.",
                  "Recalibrate on clean data.")
    noise = Finding("small-batch-noise", "warning", "fc.bn", "with batch size 2, batch statistics jitter.",
                    "Use larger batches.")

    def layer(name, rank, depth, score, findings=(), **kw):
        return LayerResult(
            name=name, type="BatchNorm2d", channels=64, rank=rank, depth=depth, score=score,
            mean_shift=kw.get("mean_shift", 0.1), scale_ratio=kw.get("scale_ratio", 1.0), kl=0.01,
            max_error=kw.get("max_error", 0.2), noise_floor=0.05, drift_to_noise=kw.get("drift", 2.0),
            batch_noise=0.1, eval_score=kw.get("eval_score", 0.2), momentum=0.1, eps=1e-5,
            track_running_stats=True, attribution=kw.get("attribution"),
            worst_channels=(ChannelDrift(3, 0.2, 0.1, 1.1),), findings=tuple(findings),
        )

    return Report(
        model=ModelInfo("model.pt", "torchvision:resnet18", "state_dict", "a" * 64, 3),
        data=DataInfo("imgs/", 64, 32, 2, True, 1),
        verdict="fail",
        fail_on="error",
        output=OutputDivergence("classifier", kl=1.25, js=0.3, top1_agreement=0.5, relative_l2=0.9,
                                train_accuracy=0.96, eval_accuracy=0.31),
        first_divergent_layer="layer1.0.bn2",
        layers=(
            layer("layer2.bn", 1, 2, None, [nan], mean_shift=math.nan, scale_ratio=None, max_error=None,
                  drift=None, eval_score=None),
            layer("layer1.0.bn2", 2, 1, 1.5, [stale], mean_shift=1.4, drift=30.0, eval_score=1.6, attribution=0.94),
            layer("fc.bn", 3, 3, 0.12),
        ),
        findings=(nan, stale, noise),
        thresholds={"stale_error": 0.5},
        bncheck_version="0.1.0",
        torch_version="2.14.1",
        device="cpu",
        duration_s=1.5,
    )


def test_json_round_trip_and_nan_becomes_null(tmp_path) -> None:
    report = make_report()
    doc = to_dict(report)
    assert list(doc)[0] == "schema" and doc["schema"] == "bncheck/run/v1"
    assert doc["layers"][0]["mean_shift"] is None  # NaN -> null
    text = dumps(report)
    assert ": NaN" not in text and "Infinity" not in text
    jsonschema.validate(json.loads(text), json.loads(schema_path().read_text()))
    path = tmp_path / "run.json"
    path.write_text(text)
    again = load(path)
    assert to_dict(again) == doc
    assert again.layers[1].worst_channels[0] == ChannelDrift(3, 0.2, 0.1, 1.1)


def test_load_rejects_what_is_not_a_run(tmp_path) -> None:
    (tmp_path / "a.json").write_text('{"schema": "other"}')
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(InputError, match="not a bncheck run result"):
        load(tmp_path / "a.json")
    with pytest.raises(InputError, match="not valid JSON"):
        load(tmp_path / "b.json")
    with pytest.raises(InputError, match="not a valid bncheck/run/v1 document .top level: 'bncheck_version' is a "
                                         "required property"):
        from_dict({"schema": "bncheck/run/v1"})


def test_a_hand_edited_run_is_an_input_error_naming_the_field(tmp_path) -> None:
    from click.testing import CliRunner

    from bncheck.cli import cli

    doc = to_dict(make_report())
    doc["layers"][0]["score"] = "high"
    (tmp_path / "edited.json").write_text(json.dumps(doc))
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "edited.json")])
    assert result.exit_code == 3
    assert "edited.json is not a valid bncheck/run/v1 document (layers[0].score: 'high' is not of type" in result.output
    assert "Traceback" not in result.output


def test_registry_lists_formats() -> None:
    assert {"table", "json", "markdown"} <= set(RENDERERS)
    with pytest.raises(ValueError, match="unknown format"):
        render(make_report(), "pdf")


@pytest.mark.parametrize("fmt, name", [("markdown", "report.md"), ("table", "report.txt"), ("github", "report.gha")])
def test_golden_renderings(fmt, name) -> None:
    text = render(make_report(), fmt, top=2, width=120, color=False)
    golden = GOLDEN / name
    if os.environ.get("BNCHECK_UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text, encoding="utf-8")
    assert text == golden.read_text(encoding="utf-8")


def test_fix_and_diff_results_go_through_the_renderer_registry() -> None:
    """One registry for every kind of result: run, fix and diff, each escaped for its format."""
    import pytest

    from bncheck.reporting.render import get_renderer
    from bncheck.reporting.report import DiffReport, FixReport

    assert get_renderer("table", FixReport).__name__ == "render_fix"
    assert get_renderer("json", DiffReport).__name__ == "render_diff"
    assert get_renderer("markdown", DiffReport).__name__ == "render_diff"
    with pytest.raises(ValueError, match="no renderer for a FixReport"):
        get_renderer("junit", FixReport)


def test_long_layer_names_break_after_a_dot_never_inside_a_word() -> None:
    from dataclasses import replace

    from bncheck.reporting.render.table import wrap_name

    name = "backbone_feature_extractor.encoder_stage_four.residual_block.1.bn"
    assert wrap_name(name, 30) == "backbone_feature_extractor.\nencoder_stage_four.\nresidual_block.1.bn"
    assert wrap_name("backbone.layer4.2.bn3", 40) == "backbone.layer4.2.bn3"
    assert wrap_name("a" * 25, 10) == "a" * 10 + "\n" + "a" * 10 + "\n" + "a" * 5  # no break point: cut
    for width in (10, 13, 21):
        lines = wrap_name(name, width).split("\n")
        assert "".join(lines) == name and all(len(line) <= width for line in lines)
    report = make_report()
    report = replace(report, layers=(replace(report.layers[1], name=name), *report.layers[2:]))
    text = render(report, "table", width=120)
    table_lines = [line.split("│")[1].strip() for line in text.splitlines() if line.count("│") >= 10]
    assert "".join(table_lines[:3]) == name and all(line.endswith((".", "bn")) for line in table_lines[:3])
