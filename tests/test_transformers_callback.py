"""The Hugging Face ``Trainer`` callback (issue 31, part 2), in a real ``Trainer.train()`` on a
tiny ``ResNetForImageClassification`` built from transformers' own classes (no downloads): a
base model trained on one domain is fine-tuned on another, once with the forum's freeze
(BN momentum 0, affine frozen, the model in train mode as the Trainer keeps it) -- caught at the
first evaluation, training stopped -- and once the normal way -- silent."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from bncheck.integrations.transformers import BNDriftTrainerCallback, BNDriftWarning  # noqa: E402


class Images(torch.utils.data.Dataset):
    """Three classes: which channel is bright in a centred square; ``level`` scales the domain."""

    def __init__(self, n: int, seed: int, level: float = 1.0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 3, (n,), generator=g)
        self.pixels = torch.rand(n, 3, 16, 16, generator=g) * 0.4
        for i, c in enumerate(self.labels.tolist()):
            self.pixels[i, c, 4:12, 4:12] += 1.0
        self.pixels = self.pixels * level + (1.0 - level)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


def base_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       num_labels=3, downsample_in_first_stage=False)
    model = transformers.ResNetForImageClassification(config)
    data = Images(256, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(60):
        i = torch.arange(step * 16, step * 16 + 16) % len(data)
        loss = model(pixel_values=data.pixels[i], labels=data.labels[i]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return base_model()


def fine_tune(model: torch.nn.Module, tmp_path, *, freeze: bool) -> tuple[BNDriftTrainerCallback, object]:
    if freeze:  # the forum's freeze: momentum 0, affine frozen, and the Trainer keeps model.train()
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = 0.0
                for p in module.parameters():
                    p.requires_grad_(False)
    callback = BNDriftTrainerCallback(num_batches=4)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, per_device_eval_batch_size=16, max_steps=60,
        eval_strategy="steps", eval_steps=20, logging_steps=20, learning_rate=3e-3, report_to=[], use_cpu=True,
        save_strategy="no", seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Images(512, 2, level=0.4),
                                   eval_dataset=Images(64, 3, level=0.4), callbacks=[callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    return callback, (trainer, [w for w in caught if issubclass(w.category, BNDriftWarning)])


def test_the_forums_freeze_in_a_trainer_loop_is_caught_at_the_first_evaluation(base, tmp_path) -> None:
    model = copy.deepcopy(base)
    callback, (trainer, caught) = fine_tune(model, tmp_path, freeze=True)
    assert len(callback.checks) == 1 and callback.checks[0].step == 20  # stopped at the first evaluation
    assert callback.checks[0].failed and trainer.state.global_step == 20
    assert caught and "stopping training" in str(caught[0].message)
    assert any(f.code in ("stale-running-stats", "pseudo-frozen", "input-distribution", "accuracy-gap")
               for f in callback.last_report.findings if f.severity == "error")
    logged = [entry for entry in trainer.state.log_history if "eval_bncheck/max_score" in entry]
    assert logged and logged[0]["step"] == 20
    with pytest.warns(BNDriftWarning):  # the numbers come back with the evaluation metrics too
        evaluated = trainer.evaluate()
    assert "eval_bncheck/max_score" in evaluated and evaluated["eval_bncheck/max_score"] > 1.0


def test_a_normal_fine_tune_never_fails_and_ends_silent(base, tmp_path) -> None:
    """Measured: 20 steps into the fine-tune (momentum 0.1) the stem's running statistics still
    lag the new domain, a warning; by step 40 they have caught up."""
    model = copy.deepcopy(base)
    callback, (trainer, caught) = fine_tune(model, tmp_path, freeze=False)
    assert len(callback.checks) == 3 and trainer.state.global_step == 60
    assert not any(check.failed for check in callback.checks)
    assert not callback.checks[-1].should_warn and not callback.checks[-2].should_warn, callback.checks[-1].message
    assert all("step 20" in str(w.message) for w in caught)
