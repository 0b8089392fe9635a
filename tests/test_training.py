"""Drift caught while training: ``check_drift`` in a plain loop and ``BNDriftCallback`` in a real
Lightning ``Trainer.fit`` on CPU -- the seed scenario (a fine-tune with BN "frozen" by
momentum 0 and requires_grad=False, left in train mode) caught at the first validation, a
normal fine-tune left alone, and training bit-identical with and without the checks."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import bncheck

N_CLASSES = 3


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(16, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(self.drop(x.mean((2, 3))))


def domain(n: int, seed: int, shifted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Class k: channel k brighter. Domain B (shifted) is darker, lower contrast, offset."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, N_CLASSES, (n,), generator=gen)
    x = torch.randn(n, 3, 8, 8, generator=gen)
    x[torch.arange(n), y] += 1.5
    if shifted:
        x = x * 0.3 + 2.0
    return x, y


def base_model() -> Net:
    """Trained on domain A the normal way."""
    torch.manual_seed(0)
    model = Net()
    x, y = domain(512, 0, shifted=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(4):
        for i in range(0, 512, 32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 32]), y[i:i + 32]).backward()
            opt.step()
    return model


_BASE: dict[str, dict] = {}


def fresh_base() -> Net:
    if not _BASE:
        _BASE["state"] = copy.deepcopy(base_model().state_dict())
    model = Net()
    model.load_state_dict(_BASE["state"])
    return model


def freeze_the_tempting_way(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.0
            for p in m.parameters():
                p.requires_grad_(False)


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_check_drift_leaves_training_bit_identical() -> None:
    """The same seeded loop with and without a check every 5 steps ends with the same weights."""
    sample = domain(64, 9, shifted=True)

    def train(check_every: int | None) -> tuple[dict, list]:
        model = fresh_base()
        torch.manual_seed(1)
        x, y = domain(256, 1, shifted=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model.train()
        checks = []
        for step in range(16):
            i = (step * 32) % 256
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 32]), y[i:i + 32]).backward()
            if check_every and step % check_every == 0:  # between backward and step: grads must survive
                grads = [p.grad.clone() for p in model.parameters()]
                rng = torch.get_rng_state()
                checks.append(bncheck.check_drift(model, sample, step=step, batch_size=16))
                assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
                assert torch.equal(rng, torch.get_rng_state())
                assert model.training and all(m.training for m in model.modules())
            opt.step()
        return state_of(model), checks

    plain, _ = train(None)
    checked, checks = train(5)
    assert len(checks) == 4
    assert all(torch.equal(plain[k], checked[k]) for k in plain)
    first = checks[0]
    assert first.step == 0 and first.max_score is not None and first.output_agreement is not None
    assert set(first.metrics()) >= {"bncheck/max_score", "bncheck/output_agreement"}


def test_check_drift_catches_the_seed_scenario_and_not_a_normal_fine_tune() -> None:
    sample = domain(64, 9, shifted=True)
    frozen, healthy = fresh_base(), fresh_base()  # (the first call trains the base: seed after it)
    freeze_the_tempting_way(frozen)
    for model in (frozen, healthy):
        torch.manual_seed(2)
        x, y = domain(512, 2, shifted=True)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
        model.train()
        for i in range(0, 512, 16):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 16]), y[i:i + 16]).backward()
            opt.step()
    bad = bncheck.check_drift(frozen, sample, step=32, batch_size=16)
    good = bncheck.check_drift(healthy, sample, step=32, batch_size=16)
    assert bad.failed and bad.worst_layers[0][0] == "bn1"
    assert "bn1" in bad.message and "at step 32" in bad.message
    assert {f.code for f in bad.findings if f.layer == "bn1"} & {"pseudo-frozen", "stale-running-stats"}
    assert not good.failed, good.message
    assert good.max_score < 0.25


pl = pytest.importorskip("lightning.pytorch")


class LitNet(pl.LightningModule):
    def __init__(self, model: nn.Module, lr: float = 0.05) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, _index):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, _index):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr, momentum=0.9)


def fit(model: nn.Module, callbacks: list, tmp_path, epochs: int = 3):
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(3)  # after the model was built: both fits draw the same shuffles and dropout masks
    train = DataLoader(TensorDataset(*domain(512, 3, shifted=True)), batch_size=16, shuffle=True)
    val = DataLoader(TensorDataset(*domain(64, 4, shifted=True)), batch_size=32)
    module = LitNet(model)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path),
                         callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=1, deterministic=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, train, val)
    return trainer, module, caught


def test_lightning_callback_stops_the_seed_scenario_at_the_first_validation(tmp_path) -> None:
    from bncheck.integrations.lightning import BNDriftCallback, BNDriftWarning

    model = fresh_base()
    freeze_the_tempting_way(model)
    callback = BNDriftCallback(domain(64, 9, shifted=True), batch_size=16)
    trainer, _, caught = fit(model, [callback], tmp_path)
    assert len(callback.checks) == 1  # not during the sanity check; stopped after epoch 0
    check = callback.last_check
    assert check.step == 0 and check.failed
    assert check.worst_layers[0][0] == "model.bn1"
    assert trainer.current_epoch == 1 and trainer.should_stop  # epoch 0 ran, 1 and 2 never started
    assert callback.stopped_reason.startswith("bncheck at epoch 0: error ")
    drift = [w for w in caught if issubclass(w.category, BNDriftWarning)]
    assert len(drift) == 1 and "stopping the fit" in str(drift[0].message)
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "bncheck/max_score" in logged and "bncheck/layer/model.bn1" in logged
    assert float(trainer.callback_metrics["bncheck/max_score"]) == pytest.approx(check.max_score)


def test_lightning_callback_is_quiet_on_a_normal_fine_tune_and_changes_nothing(tmp_path) -> None:
    from bncheck.integrations.lightning import BNDriftCallback, BNDriftWarning

    callback = BNDriftCallback(domain(64, 9, shifted=True), batch_size=16, fail_on="error")
    _, with_checks, caught = fit(fresh_base(), [callback], tmp_path / "a")
    assert [c.step for c in callback.checks] == [0, 1, 2]
    assert not any(c.failed for c in callback.checks), callback.last_check.message
    assert not [w for w in caught if issubclass(w.category, BNDriftWarning)]
    _, without, _ = fit(fresh_base(), [], tmp_path / "b")
    a, b = state_of(with_checks), state_of(without)
    assert all(torch.equal(a[k], b[k]) for k in a)  # training went exactly the same way


def test_callback_rejects_bad_settings() -> None:
    from bncheck.integrations.lightning import BNDriftCallback

    with pytest.raises(ValueError, match="every_n_epochs"):
        BNDriftCallback(torch.zeros(4, 3), every_n_epochs=0)
    with pytest.raises(ValueError, match="fail_on"):
        BNDriftCallback(torch.zeros(4, 3), fail_on="fatal")
