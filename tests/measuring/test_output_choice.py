"""Finding the prediction in what real models return (issue 29, part 1): ultralytics'
classifiers return logits in train mode and ``(probabilities, logits)`` in eval mode; softmax
heads return probabilities; dicts and model-output objects hold ``logits``/``out``; and the
user can name the part (``--output``, ``analyze(output=...)``). Truths computed by hand."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import bncheck
from bncheck.cli import cli
from bncheck.judging.metrics import softmax_divergence
from bncheck.measuring.outputs import choosing, is_probabilities, prediction
from bncheck.reporting.render import render


class Net(nn.Module):
    """conv-BN-pool-linear; ``returns`` shapes the output the way a library does."""

    def __init__(self, returns: str = "tensor", classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())
        self.head = nn.Linear(8, classes)
        self.returns = returns

    def forward(self, x):
        logits = self.head(self.body(x))
        if self.returns == "ultralytics":  # Classify head: logits in training, (softmax, logits) in eval
            return logits if self.training else (logits.softmax(1), logits)
        if self.returns == "softmax":
            return logits.softmax(1)
        if self.returns == "dict":
            return {"features": self.body(x), "logits": logits}
        if self.returns == "nested":
            return {"heads": (logits * 0.0, logits), "aux": logits.detach()}
        return logits


def calibrated(returns: str) -> nn.Module:
    torch.manual_seed(0)
    model = Net(returns)
    model.train()
    with torch.no_grad():
        for _ in range(10):
            model(torch.randn(16, 3, 10, 10))
    return model.eval()


def sample(shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(64, 3, 10, 10) * 1.5 + shift, torch.randint(0, 4, (64,))


def by_hand(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 16) -> dict:
    """Accuracy and KL per mode from the logits, batch by batch as bncheck feeds them."""
    train_logits, eval_logits = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = copy.deepcopy(model).train()(x[i:i + batch])  # a copy: train mode moves running stats
            train_logits.append(out if isinstance(out, torch.Tensor) else out[1])
            eval_logits.append(model.eval()(x[i:i + batch])[1])
    train, evaluated = torch.cat(train_logits), torch.cat(eval_logits)
    kl, _, agree = softmax_divergence(train, evaluated)
    return {"train_accuracy": (train.argmax(1) == y).double().mean().item(),
            "eval_accuracy": (evaluated.argmax(1) == y).double().mean().item(),
            "kl": kl.double().mean().item(), "agree": agree.double().mean().item()}


def test_an_ultralytics_classifier_is_read_by_its_logits_in_both_modes() -> None:
    model = calibrated("ultralytics")
    x, y = sample(shift=1.0)
    report = bncheck.analyze(model, (x, y), batch_size=16)
    out, truth = report.output, by_hand(model, x, y)
    assert out.kind == "classifier" and out.labeled == 64
    assert out.source.startswith("output[1]") and "probabilities" in out.source
    assert out.train_accuracy == pytest.approx(truth["train_accuracy"])
    assert out.eval_accuracy == pytest.approx(truth["eval_accuracy"])
    assert out.kl == pytest.approx(truth["kl"], rel=1e-6)
    assert out.top1_agreement == pytest.approx(truth["agree"])
    assert "[compared: output[1]" in render(report, "table", width=400)


def test_probabilities_are_compared_as_probabilities() -> None:
    """A softmax head: KL between the probabilities it returns, not between softmaxes of them."""
    model = calibrated("softmax")
    x, _ = sample(shift=1.0)
    report = bncheck.analyze(model, x, batch_size=16)
    with torch.no_grad():
        train = torch.cat([copy.deepcopy(model).train()(x[i:i + 16]) for i in range(0, 64, 16)])
        evaluated = model.eval()(x)
    kl = (train.double() * (train.double().log() - evaluated.double().log())).sum(1).mean().item()
    assert report.output.kind == "classifier" and report.output.source == "probabilities"
    assert report.output.kl == pytest.approx(kl, rel=1e-4)


def test_probabilities_are_told_from_logits() -> None:
    logits = torch.randn(8, 5)
    assert is_probabilities(logits.softmax(1)) and not is_probabilities(logits)
    assert not is_probabilities(logits.abs())  # non-negative but not summing to one
    assert torch.allclose(prediction(logits.softmax(1))[0].softmax(1), logits.softmax(1), atol=1e-6)


@pytest.mark.parametrize("returns, source", [("dict", "output['logits']"), ("tensor", None)])
def test_dict_outputs_and_plain_tensors(returns: str, source) -> None:
    model = calibrated(returns)
    report = bncheck.analyze(model, sample()[0], batch_size=16)
    assert report.output.kind == "classifier" and report.output.source == source


def test_the_user_names_the_part_and_a_wrong_name_lists_the_parts(tmp_path) -> None:
    model = calibrated("nested")
    x, y = sample()
    report = bncheck.analyze(model, (x, y), batch_size=16, output="heads.1")
    assert report.output.kind == "classifier" and report.output.source == "output.heads.1 (--output)"
    assert report.output.eval_accuracy is not None
    with choosing("aux"):  # the same through the context the CLI sets
        assert bncheck.analyze(model, x, batch_size=16).output.source == "output.aux (--output)"
    with pytest.raises(bncheck.InputError, match=r"no 'head'.*keys heads, aux"):
        bncheck.analyze(model, x, batch_size=16, output="head")
    torch.save(model, tmp_path / "nested.pt")
    torch.save({"inputs": x, "labels": y}, tmp_path / "data.pt")
    base = ["run", str(tmp_path / "nested.pt"), "--trust-checkpoint", "--data", str(tmp_path / "data.pt"),
            "--batch-size", "16"]
    result = CliRunner().invoke(cli, [*base, "--output", "heads.1", "--json", "-"])
    assert result.exit_code in (0, 1), result.output
    assert json.loads(result.stdout)["output"]["source"] == "output.heads.1 (--output)"
    wrong = CliRunner().invoke(cli, [*base, "--output", "heads.7"])
    assert wrong.exit_code == 3 and "no '7' (it has indices 0..1)" in wrong.output
    assert "Traceback" not in wrong.output
