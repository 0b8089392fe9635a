"""Issue 30: a plan of passes. Each pass after the statistics pass runs only where its answer
can change the verdict or the advice; ``report.passes`` says which ran, what each cost and
bought, and why the others did not; ``--thorough`` runs them all, and the advice is the same."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from click.testing import CliRunner
from conftest import TinyNet, calibrate, make_batches
from torch import nn

import bncheck
from bncheck.cli import cli
from bncheck.measuring.passes import STEPS
from bncheck.reporting.render import render
from bncheck.reporting.render.summary import next_step
from bncheck.reporting.report import dumps, from_dict, validate


class Counting(TinyNet):
    """TinyNet counting its whole forwards per mode (stem-only forwards of the input signature
    stop at the first BN layer and are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = {"train": 0, "eval": 0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        self.calls["train" if self.bn1.training else "eval"] += 1
        return out


def stale(layers: tuple[str, ...] = ("bn1", "bn2", "bn3"), shift: float = 1.5) -> Counting:
    torch.manual_seed(0)
    model = Counting()
    calibrate(model, make_batches(8, seed=123))
    with torch.no_grad():
        for name in layers:
            bn = getattr(model, name)
            bn.running_mean += shift * bn.running_var.sqrt()
        model.head.weight *= 30  # confident outputs: the modes' disagreement is material
    model.calls = {"train": 0, "eval": 0}
    return model.eval()


def passes(report: bncheck.Report) -> dict[str, tuple[bool, int, str]]:
    return {p.name: (p.ran, p.forwards, p.bought) for p in report.passes}


def test_every_stale_layer_the_conclusion_runs_and_per_layer_attribution_and_noise_do_not() -> None:
    data = make_batches(4)
    model = stale()
    report = bncheck.analyze(model, data)
    ran = passes(report)
    assert [p.name for p in report.passes] == ["statistics", "input signature", "conclusion", "attribution",
                                              "output noise", "combined evidence", "accuracy recovery"]
    # the recalibrate-all pass stops after its first batch: 16 samples put its share far above the bar
    assert ran["statistics"][:2] == (True, 8) and ran["conclusion"][:2] == (True, 1)
    assert "settled after 1 of 4 batches" in ran["conclusion"][2]
    assert not ran["attribution"][0] and "already explains the gap" in ran["attribution"][2]
    assert not ran["output noise"][0] and "already fail the gate" in ran["output noise"][2]
    assert model.calls == {"eval": 5, "train": 4}  # statistics (4 + 4) and one batch of the conclusion's pass
    assert all(layer.attribution is None for layer in report.layers)  # not measured, never guessed
    net = next(f for f in report.findings if f.code == "output-divergence")
    assert net.severity == "info" and "was not measured" in net.message

    thorough_model = stale()
    thorough = bncheck.analyze(thorough_model, data, thorough=True)
    assert all(p.ran for p in thorough.passes if p.name in ("attribution", "output noise"))
    assert thorough_model.calls["eval"] == 4 + 4 + 3 * 4 and thorough_model.calls["train"] > 4
    # the advice is the same: verdict, conclusion, the layers' findings, the next step; what differs is
    # how many samples measured the share
    assert report.verdict == thorough.verdict == "fail"
    assert "(measured on 16 of 64 kept samples)" in report.conclusion and "(measured)" in thorough.conclusion

    def advice(text: str) -> str:
        return re.sub(r"recovers \d+% of the output gap \(measured[^)]*\)", "recovers N%", text)

    assert advice(report.conclusion) == advice(thorough.conclusion)
    assert "recalibrate all 3 BN layers" in report.conclusion
    assert advice(next_step(report)) == advice(next_step(thorough))
    layer_findings = [(f.code, f.severity, f.layer) for f in report.findings if f.layer is not None]
    assert sorted(layer_findings) == sorted((f.code, f.severity, f.layer) for f in thorough.findings
                                            if f.layer is not None)
    # what thorough's attribution adds is a number per layer, not another cure
    assert all(layer.attribution is not None for layer in thorough.layers)


def test_one_flagged_layer_is_attributed_and_no_conclusion_runs() -> None:
    model = stale(("bn1",))
    report = bncheck.analyze(model, make_batches(4))
    ran = passes(report)
    assert not ran["conclusion"][0] and "fewer than 3 layers" in ran["conclusion"][2]
    assert ran["attribution"][:2] == (True, 4) and "bn1" in ran["attribution"][2]
    assert report.layers[0].name == "bn1" and report.layers[0].attribution is not None


def test_the_noise_pass_runs_when_its_answer_can_change_the_verdict() -> None:
    # the gate is off: nothing fails, so whether the outputs' disagreement is drift or noise matters
    model = stale()
    report = bncheck.analyze(model, make_batches(4), fail_on="never")
    ran = passes(report)
    assert ran["output noise"][0] and ran["output noise"][1] >= 1
    assert "batch noise alone gives" in ran["output noise"][2]
    net = next(f for f in report.findings if f.code == "output-divergence")
    assert "what batch noise explains" in net.message and net.severity == "error"


def test_attribute_0_runs_nothing_after_the_statistics_pass() -> None:
    model = stale()
    report = bncheck.analyze(model, make_batches(4), attribute=0)
    assert model.calls == {"eval": 4, "train": 4}
    assert [p.name for p in report.passes if p.ran] == ["statistics", "input signature"]
    assert "was not measured (--attribute 0)" in report.conclusion


def test_the_accuracy_recovery_shares_the_conclusions_pass() -> None:
    data = make_batches(4)
    model = stale()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():  # labels that train mode gets right: an accuracy gap in eval mode
        for m in bns:
            m.train()
        labels = [model(x).argmax(1) for x in data]
        for m in bns:
            m.eval()
        model.calls = {"train": 0, "eval": 0}
    model.calls = {"train": 0, "eval": 0}
    report = bncheck.analyze(model, list(zip(data, labels)))
    ran = passes(report)
    # the conclusion's pass stopped after one batch; the recovery needs every labelled sample, so it
    # resumes that same pass for the other three batches rather than running its own
    assert ran["conclusion"][:2] == (True, 1)
    assert ran["accuracy recovery"][:2] == (True, 3)
    assert "after recalibrating" in ran["accuracy recovery"][2]
    assert model.calls["eval"] == 8
    gap = next(f for f in report.findings if f.code == "accuracy-gap")
    assert "Recalibrating every BN layer on this data raises eval-mode accuracy" in gap.hint


def test_a_healthy_model_runs_only_the_statistics_pass() -> None:
    torch.manual_seed(0)
    data = make_batches(4)
    model = calibrate(Counting(), data)
    model.calls = {"train": 0, "eval": 0}
    report = bncheck.analyze(model, data)
    assert report.verdict == "pass"
    assert [p.name for p in report.passes if p.ran] == ["statistics"]
    assert model.calls == {"eval": 4, "train": 4}
    assert {p.name for p in report.passes} <= set(STEPS)


def test_passes_travel_in_the_json_and_validate() -> None:
    report = bncheck.analyze(stale(), make_batches(4))
    document = json.loads(dumps(report))
    validate(document)
    assert [p["name"] for p in document["passes"]][:3] == ["statistics", "input signature", "conclusion"]
    assert from_dict(json.loads(dumps(report))).passes == report.passes
    text = render(report, "profile")
    assert text.startswith("profile: ") and "attribution" in text and "skipped" in text
    html = render(report, "html")  # the page says which passes ran and why the others did not
    assert "<summary>Passes: " in html
    skipped = next(p for p in report.passes if not p.ran)
    assert f'>{skipped.name}</td><td>skipped</td><td>-</td>' in html


def test_profile_and_thorough_on_the_command_line(tmp_path) -> None:
    model = stale()
    torch.save(model, tmp_path / "model.pt")
    torch.save(torch.cat(make_batches(4)), tmp_path / "data.pt")
    runner = CliRunner()
    args = ["run", str(tmp_path / "model.pt"), "--trust-checkpoint", "--data", str(tmp_path / "data.pt"),
            "--batch-size", "16", "--save", str(tmp_path / "run.json"), "--quiet"]
    plain = runner.invoke(cli, [*args, "--profile"])
    assert plain.exit_code == 1, plain.output
    assert "profile:" in plain.stderr and "skipped" in plain.stderr
    assert "\\n" not in plain.stderr  # lines, not escaped newlines
    saved = json.loads((tmp_path / "run.json").read_text())
    assert not next(p for p in saved["passes"] if p["name"] == "attribution")["ran"]
    config = tmp_path / "thorough.yaml"
    config.write_text("thorough: true\n")
    thorough = runner.invoke(cli, [*args, "--config", str(config)])
    assert thorough.exit_code == 1, thorough.output
    saved = json.loads((tmp_path / "run.json").read_text())
    assert next(p for p in saved["passes"] if p["name"] == "attribution")["ran"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("profile: 3\n")
    wrong = runner.invoke(cli, [*args, "--config", str(bad)])
    assert wrong.exit_code == 2 and "setting 'profile' must be true or false" in wrong.output


@pytest.mark.parametrize("fail_on", ["error", "warning"])
def test_the_model_is_unchanged_whatever_the_plan(fail_on: str) -> None:
    model = stale()
    before = copy.deepcopy(model.state_dict())
    bncheck.analyze(model, make_batches(4), fail_on=fail_on, thorough=fail_on == "warning")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert not model.training and all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_a_share_is_settled_only_when_its_samples_put_it_surely_on_one_side_by_hand() -> None:
    from bncheck.judging.conclusion import share_settled

    # every sample's KL after recalibrating is 0.01 where the gap was 0.1: share 0.9, no spread
    assert share_settled([0.01] * 8, 0.1)
    assert not share_settled([0.01] * 7, 0.1)  # fewer than 8 samples: never
    # share 0 with a spread: se = sqrt(sum((v - 0.1)^2) / 7 / 8) * 3 / 0.1 = 0.113; 0 + 3 * 0.113 > 0.1
    values = [0.09, 0.11] * 4
    assert not share_settled(values, 0.1)
    # the same values against a gap of 1: share 0.9, se 0.0113 -> settled
    assert share_settled(values, 1.0)
    # surely under the bar: KL that doubled with no spread
    assert share_settled([0.2] * 8, 0.1)
    assert not share_settled([0.2] * 8, 0.0)
