from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
SAMPLE_ARGS = [
    "--arch", "torchvision:shufflenet_v2_x0_5",
    "--arch-kwargs", "{num_classes: 4}",
    "--data", str(SAMPLES / "data"),
    "--config", str(SAMPLES / "config.yaml"),
]


def module_from_file(path: Path) -> Any:
    """Import the Python file at ``path`` as a module of its own (not left in sys.modules), the
    way ``--arch path/file.py:callable`` does."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bncheck_test_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_hashes(root: Path) -> dict[str, str]:
    root = Path(root)
    if root.is_file():
        return {root.name: file_hash(root)}
    return {str(p.relative_to(root)): file_hash(p) for p in sorted(root.rglob("*")) if p.is_file()}


class TinyNet(nn.Module):
    """conv -> BN -> ReLU, three times, then a 5-way classifier."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.conv3, self.bn3 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(channels, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.head(self.drop(x.mean((2, 3))))


def calibrate(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """Exact population statistics of ``batches``: cumulative averaging (momentum=None)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    return model.eval()


def make_batches(n_batches: int = 4, batch: int = 16, size: int = 12, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=gen) for _ in range(n_batches)]


@pytest.fixture
def batches() -> list[torch.Tensor]:
    return make_batches()


@pytest.fixture
def tiny(batches: list[torch.Tensor]) -> TinyNet:
    torch.manual_seed(0)
    # Population stats over 8 batches from the same distribution as the test batches.
    return calibrate(TinyNet(), make_batches(8, seed=123))


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """32 samples of TinyNet's input in a tensor file (for --data)."""
    path = tmp_path / "x.pt"
    torch.save(torch.cat(make_batches(2)), path)
    return path


@pytest.fixture
def tiny_weights(tmp_path: Path) -> Path:
    """A calibrated TinyNet's state_dict on disk (for run/fix with --arch conftest.py:TinyNet)."""
    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    torch.save(calibrate(TinyNet(), make_batches(8)).state_dict(), path)
    return path


@pytest.fixture
def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


PYTHON = sys.executable


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    """Every test starts from the same random state: models built without an explicit seed
    (TinyNet(), random data) are the same on every run, so no test can pass by luck."""
    torch.manual_seed(0)
