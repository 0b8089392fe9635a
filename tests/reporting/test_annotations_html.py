"""GitHub annotations (workflow commands) from run and report, and the HTML pages: every
layer on the page, tooltips naming each point's layer and numbers, fix before -> after."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from html.parser import HTMLParser

from click.testing import CliRunner
from test_report import make_report

from bncheck.cli import cli
from bncheck.reporting.render import render
from bncheck.reporting.render.github import escape_data, escape_property
from bncheck.reporting.report import Finding, LayerResult, dumps


def test_workflow_command_escaping() -> None:
    assert escape_data("50% done\nnext\r") == "50%25 done%0Anext%0D"
    assert escape_property("bncheck a:b, c") == "bncheck a%3Ab%2C c"


def test_one_annotation_per_group_and_info_is_a_notice() -> None:
    report = make_report()
    many = tuple(Finding("stale-running-stats", "error", f"layer{i}", f"m{i}", "h") for i in range(12))
    info = Finding("frozen-bn", "info", "x", "frozen", "nothing")
    lines = render(replace(report, findings=(*many, info)), "github").splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("::error title=bncheck stale-running-stats on 12 layers::model.pt: layer0: m0 h")
    assert "%0ALayers: layer0, layer1, layer2, layer3, layer4, layer5, layer6, layer7 and 4 more" in lines[0]
    assert lines[1] == "::notice title=bncheck frozen-bn x::model.pt: frozen nothing"


def test_a_failing_gate_without_error_findings_still_annotates() -> None:
    report = replace(make_report(), findings=(), verdict="fail", fail_on="warning")
    assert render(report, "github") == "::error title=bncheck FAIL::model.pt: the gate failed (fail on warning)\n"


def saved_run(tmp_path) -> str:
    path = tmp_path / "run.json"
    path.write_text(dumps(make_report()))
    return str(path)


def test_report_annotates_on_github_actions_only(tmp_path, monkeypatch) -> None:
    run = saved_run(tmp_path)
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    assert "::error" not in CliRunner().invoke(cli, ["report", run]).output
    assert "::error title=bncheck non-finite-stats layer2.bn::" in CliRunner().invoke(
        cli, ["report", run, "--annotations", "github"]).output
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    result = CliRunner().invoke(cli, ["report", run])
    assert result.output.count("::error ") == 2 and "::warning title=bncheck small-batch-noise fc.bn::" in result.output
    assert "::" not in CliRunner().invoke(cli, ["report", run, "--annotations", "none"]).output


def test_annotations_leave_json_on_stdout_parseable(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    result = CliRunner().invoke(cli, ["report", saved_run(tmp_path), "--json", "-"])
    assert json.loads(result.stdout)["verdict"] == "fail"
    assert "::error title=bncheck" in result.stderr


class Titles(HTMLParser):
    """Every SVG <title> text and whether <details> folds the layer tail."""

    def __init__(self) -> None:
        super().__init__()
        self.titles: list[str] = []
        self._in_title = False
        self.details = 0

    def handle_starttag(self, tag, attrs) -> None:
        self._in_title = tag == "title"
        self.details += tag == "details"

    def handle_endtag(self, tag) -> None:
        self._in_title = False

    def handle_data(self, data) -> None:
        if self._in_title:
            self.titles.append(data)


def test_html_has_every_layer_and_tooltips_with_numbers() -> None:
    report = make_report()
    extra = tuple(
        replace(report.layers[2], name=f"extra{i}", rank=4 + i, depth=4 + i, score=0.01 * i) for i in range(15)
    )
    report = replace(report, layers=(*report.layers, *extra))
    page = render(report, "html", top=10)
    parser = Titles()
    parser.feed(page)
    assert all(f">{layer.name}<" in page for layer in report.layers)  # all 18 rows on the page
    assert "8 more layers (ranks 11–18)" in page and parser.details >= 1
    points = [t for t in parser.titles if t.startswith("layer1.0.bn2 (BatchNorm2d, 64 ch, #2 of 18)")]
    assert len(points) == 2  # its train-pass and eval-pass points
    point = next(t for t in points if "train-pass score 1.500" in t)
    assert "eval score 1.60" in point and any("eval-pass score 1.600" in t for t in points)
    assert "fixing it alone recovers 94% of the output gap" in point and "error: stale-running-stats" in point
    assert "<script" not in page


def test_fix_html_shows_before_and_after(tmp_path) -> None:
    from conftest import SAMPLE_ARGS, SAMPLES

    page = tmp_path / "fix.html"
    result = CliRunner().invoke(cli, [
        "fix", str(SAMPLES / "pseudo_frozen.pt"), *SAMPLE_ARGS, "--num-batches", "2", "--dry-run",
        "--html", str(page), "-q"])
    assert result.exit_code == 0, result.output
    html = page.read_text()
    assert "bncheck fix: DRY-RUN" in html
    assert re.search(r"<dt>before</dt><dd>top-1 agreement train vs eval \d+\.\d%", html)
    assert re.search(r"<dt>after</dt><dd>top-1 agreement train vs eval \d+\.\d%", html)
    assert re.search(r'conv1\.1</td><td><span class="change better">1\.\d\d → 0\.[01]\d</span>', html)
    parser = Titles()
    parser.feed(html)
    assert any(t.startswith("conv1.1\nscore 1.") and "→ 0." in t for t in parser.titles)
    assert "more layers</summary>" in html and "<script" not in html


def test_layer_results_all_render_even_with_none_numbers() -> None:
    report = make_report()
    bare = LayerResult(name="lonely", type="BatchNorm1d", channels=3, rank=4, depth=None, score=None,
                       mean_shift=None, scale_ratio=None, kl=None, max_error=None, noise_floor=None,
                       drift_to_noise=None, batch_noise=None, eval_score=None, momentum=None, eps=1e-5,
                       track_running_stats=True, attribution=None, worst_channels=(), findings=())
    page = render(replace(report, layers=(*report.layers, bare)), "html", top=2)
    assert ">lonely<" in page


def test_the_conclusion_reaches_every_stale_groups_annotation() -> None:
    """render/github.py kept its own copy of the stale group without unconverged-running-stats,
    so that group's PR annotation lost its conclusion line."""
    from dataclasses import replace

    from test_report import make_report

    from bncheck.reporting.render import render
    from bncheck.reporting.report import Finding

    report = make_report()
    unconverged = tuple(Finding("unconverged-running-stats", "error", f"bn{i}", "m", "h") for i in range(3))
    text = render(replace(report, findings=unconverged, conclusion="3 of 3 layers are stale: recalibrate all."),
                  "github")
    assert "Conclusion: 3 of 3 layers are stale" in text
