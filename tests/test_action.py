"""The reusable GitHub Action (issue 31, part 1): ``action.yml`` is a valid composite action,
and its steps, run as GitHub runs them -- bash, inputs as environment variables, the
``GITHUB_OUTPUT``/``GITHUB_STEP_SUMMARY`` files -- gate the sample model: annotations on stdout,
the Markdown summary in the job summary, the reports kept, bncheck's exit code at the end."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml
from conftest import PYTHON, ROOT, SAMPLES

ACTION = yaml.safe_load((ROOT / "action.yml").read_text())


def step(name: str) -> dict:
    return next(s for s in ACTION["runs"]["steps"] if s.get("name") == name)


def test_the_action_file_is_a_composite_action_with_documented_inputs() -> None:
    assert ACTION["name"] and ACTION["description"] and ACTION["runs"]["using"] == "composite"
    for key, spec in ACTION["inputs"].items():
        assert spec.get("description"), key
        assert spec.get("required") is True or "default" in spec, key
    assert ACTION["inputs"]["trust-checkpoint"]["default"] == "false"  # never runs code from a file by default
    for s in ACTION["runs"]["steps"]:
        assert ("uses" in s) != ("run" in s), s
        if "run" in s:
            assert s["shell"] == "bash"
            assert "${{ inputs." not in s["run"]  # inputs only through env: a value cannot become a command
    assert {"verdict", "exit-code"} <= set(ACTION["outputs"])
    assert all("steps.run.outputs." in o["value"] for o in ACTION["outputs"].values())


def run_step(name: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-e", "-c", step(name)["run"]], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def action_env(tmp_path: Path, **inputs: str) -> dict[str, str]:
    values = {"checkpoint": str(SAMPLES / "pseudo_frozen.pt"), "data": str(SAMPLES / "data"),
              "arch": "torchvision:shufflenet_v2_x0_5", "arch-kwargs": "{num_classes: 4}",
              "config": str(SAMPLES / "config.yaml"), "fail-on": "error", "trust-checkpoint": "false",
              "report-dir": "bncheck-report", **inputs}
    env = {**os.environ, "PATH": f"{Path(PYTHON).parent}{os.pathsep}{os.environ['PATH']}",
           "GITHUB_OUTPUT": str(tmp_path / "output"), "GITHUB_STEP_SUMMARY": str(tmp_path / "summary"),
           "GITHUB_ACTIONS": "true"}
    for variable, expression in step("Run bncheck")["env"].items():  # ${{ inputs.NAME }} -> the value
        env[variable] = values[expression.removeprefix("${{ inputs.").removesuffix(" }}")]
    return env


def test_the_steps_gate_the_sample_model_as_github_runs_them(tmp_path) -> None:
    env = action_env(tmp_path)
    result = run_step("Run bncheck", env, tmp_path)
    assert result.returncode == 0, result.stderr  # the exit code is kept for the gate step
    outputs = dict(line.split("=", 1) for line in (tmp_path / "output").read_text().splitlines())
    assert outputs == {"exit-code": "1", "verdict": "fail"}
    summary = (tmp_path / "summary").read_text()
    assert summary.startswith("## ❌ bncheck: fail") and "conv1.1" in summary
    assert "::error" in result.stdout and "stale-running-stats" in result.stdout  # PR annotations
    reports = tmp_path / "bncheck-report"
    assert {p.name for p in reports.iterdir()} == {"run.json", "summary.md", "report.html", "junit.xml"}
    # the job summary is what the CLI prints for that run, and so are the annotations
    printed = subprocess.run([PYTHON, "-m", "bncheck", "report", str(reports / "run.json"), "--markdown",
                              "--annotations", "github"], capture_output=True, text=True, env=env, timeout=120)
    assert summary == printed.stdout  # (with Markdown on stdout, the annotations go to stderr)
    annotations = sorted(line for line in result.stdout.splitlines() if line.startswith("::"))
    assert annotations and annotations == sorted(line for line in printed.stderr.splitlines()
                                                 if line.startswith("::"))
    gate = subprocess.run(["bash", "-c", step("Gate")["run"]], env={**env, "BNCHECK_EXIT": "1"}, timeout=30)
    assert gate.returncode == 1
    healthy = run_step("Run bncheck", action_env(tmp_path / "h", checkpoint=str(SAMPLES / "healthy.pt")) | {
        "GITHUB_OUTPUT": str(tmp_path / "h.out"), "GITHUB_STEP_SUMMARY": str(tmp_path / "h.sum")}, tmp_path)
    assert healthy.returncode == 0 and "exit-code=0" in (tmp_path / "h.out").read_text()
    assert (tmp_path / "h.sum").read_text().startswith("## ✅ bncheck: pass")


def test_an_input_cannot_run_a_command_and_a_missing_file_is_reported(tmp_path) -> None:
    hostile = f"$(touch {tmp_path / 'pwned'}); x"
    result = run_step("Run bncheck", action_env(tmp_path, checkpoint=hostile), tmp_path)
    assert result.returncode == 0 and not (tmp_path / "pwned").exists()
    assert "exit-code=3" in (tmp_path / "output").read_text()  # bncheck's input error, kept for the gate
    assert "could not run (exit code 3)" in (tmp_path / "summary").read_text()
