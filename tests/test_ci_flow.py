"""The CI gate end to end on the sample models: run -> JSON -> Markdown/HTML/JUnit ->
exit code, and a baseline accepted, then a regression caught."""

from __future__ import annotations

import json
import re
import subprocess
import xml.etree.ElementTree as ET

import jsonschema
import pytest
import torch
from click.testing import CliRunner
from conftest import PYTHON, ROOT, SAMPLE_ARGS, SAMPLES

from bncheck.cli import cli
from bncheck.reporting.report import schema_path

SCHEMA = json.loads(schema_path().read_text())


def invoke(args: list[str]):
    return CliRunner().invoke(cli, args)


def test_github_actions_example_commands(tmp_path, monkeypatch) -> None:
    """The commands examples/github-actions.yml runs, with configs/ci.yaml, from a checkout."""
    workflow = (ROOT / "examples" / "github-actions.yml").read_text()
    assert "bncheck run sample_models/pseudo_frozen.pt --config configs/ci.yaml --quiet" in workflow
    assert 'bncheck report bncheck-report/run.json --markdown >> "$GITHUB_STEP_SUMMARY"' in workflow
    # a checkout in a scratch folder: the config's relative outputs land below the working directory
    (tmp_path / "sample_models").symlink_to(ROOT / "sample_models")
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bncheck-report"
    result = invoke(["run", "sample_models/pseudo_frozen.pt", "--config", "configs/ci.yaml", "--quiet",
                     "--save", str(tmp_path / "last.json")])
    assert result.exit_code == 1  # the pseudo-frozen model fails the gate
    assert result.stdout == ""  # --quiet
    doc = json.loads((out / "run.json").read_text())
    jsonschema.validate(doc, SCHEMA)
    assert doc["verdict"] == "fail" and doc["layers"][0]["name"] == "conv1.1"
    assert not any(layer["name"].startswith("fc.") for layer in doc["layers"])
    assert (out / "summary.md").read_text().startswith("## ❌ bncheck: fail")
    assert "<svg" in (out / "report.html").read_text()
    suite = ET.parse(out / "junit.xml").getroot()
    # conv1.1 (stale) and the (model) testcase (output-divergence): 56 layers + 1
    assert suite.get("failures") == "2" and int(suite.get("tests")) == 57
    summary = invoke(["report", str(out / "run.json"), "--markdown"])
    assert summary.exit_code == 0 and "conv1.1" in summary.stdout


def test_baseline_accepts_known_drift_then_catches_a_regression(tmp_path) -> None:
    accepted = tmp_path / "accepted.json"
    first = invoke(["run", str(SAMPLES / "pseudo_frozen.pt"), *SAMPLE_ARGS, "-q", "--json", str(accepted),
                    "--save", str(tmp_path / "last.json")])
    assert first.exit_code == 1
    again = invoke(["run", str(SAMPLES / "pseudo_frozen.pt"), *SAMPLE_ARGS, "-q", "--baseline", str(accepted),
                    "--json", "-", "--save", str(tmp_path / "last.json")])
    assert again.exit_code == 0, again.stderr
    doc = json.loads(again.stdout)
    jsonschema.validate(doc, SCHEMA)
    assert doc["verdict"] == "pass" and doc["baseline"]["new"] == [] and doc["baseline"]["worsened"] == []
    assert doc["findings"]  # the accepted finding is still reported

    # A later checkpoint breaks another layer: new error finding -> the gate fails.
    state = torch.load(SAMPLES / "pseudo_frozen.pt", weights_only=True)
    state["stage3.2.branch2.1.running_mean"] += 4 * state["stage3.2.branch2.1.running_var"].sqrt()
    torch.save(state, tmp_path / "regressed.pt")
    regressed = invoke(["run", str(tmp_path / "regressed.pt"), *SAMPLE_ARGS, "-q", "--baseline", str(accepted),
                        "--json", str(tmp_path / "regressed.json"), "--save", str(tmp_path / "last.json")])
    assert regressed.exit_code == 1
    doc = json.loads((tmp_path / "regressed.json").read_text())
    assert [(f["code"], f["layer"]) for f in doc["baseline"]["new"]] == [
        ("stale-running-stats", "stage3.2.branch2.1")
    ]
    # The same comparison from saved files, without running the model.
    compare = invoke(["report", "--compare", str(accepted), str(tmp_path / "regressed.json"), "--markdown"])
    assert compare.exit_code == 1 and "1 new, 0 worsened" in compare.stdout
    html = invoke(["report", str(tmp_path / "regressed.json"), "--html", str(tmp_path / "r.html"),
                   "--junit", str(tmp_path / "r.xml")])
    assert html.exit_code == 0 and (tmp_path / "r.html").exists()
    assert ET.parse(tmp_path / "r.xml").getroot().get("failures") == "3"  # two layers and the model


def test_html_is_self_contained(tmp_path) -> None:
    invoke(["run", str(SAMPLES / "pseudo_frozen.pt"), *SAMPLE_ARGS, "-q", "--html", str(tmp_path / "r.html"),
            "--save", str(tmp_path / "last.json")])
    page = (tmp_path / "r.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "bncheck: FAIL" in page
    assert "<script" not in page
    # no external resources: the only URL is the SVG namespace
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) == {"http://www.w3.org/2000/svg"}
    assert "first divergent: conv1.1" in page and "error threshold" in page
    assert page.count("<circle") >= 2 * 50  # both passes plotted for every layer


def test_report_imports_no_torch(tmp_path, cli_env) -> None:
    invoke(["run", str(SAMPLES / "healthy.pt"), *SAMPLE_ARGS, "-q", "--save", str(tmp_path / "run.json")])
    code = (
        "import sys, time; t = time.perf_counter(); from bncheck.cli import cli;"
        f"cli(['report', {str(tmp_path / 'run.json')!r}, '--markdown'], standalone_mode=False);"
        f"cli(['report', {str(tmp_path / 'run.json')!r}, '--html', {str(tmp_path / 'r.html')!r}],"
        " standalone_mode=False);"
        "assert 'torch' not in sys.modules, 'torch imported';"
        "print('elapsed', time.perf_counter() - t, file=sys.stderr)"
    )
    out = subprocess.run([PYTHON, "-c", code], env=cli_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "bncheck: pass" in out.stdout


@pytest.mark.parametrize("fmt, name", [("junit", "report.xml")])
def test_junit_golden(fmt, name) -> None:
    import os

    from test_report import GOLDEN, make_report

    from bncheck.reporting.render import render

    text = render(make_report(), fmt)
    golden = GOLDEN / name
    if os.environ.get("BNCHECK_UPDATE_GOLDEN"):
        golden.write_text(text, encoding="utf-8")
    assert text == golden.read_text(encoding="utf-8")
    suite = ET.fromstring(text.split("\n", 1)[1])
    assert suite.get("tests") == "3" and suite.get("failures") == "2"
