"""bncheck.recalibrate against torch.optim.swa_utils.update_bn on the pseudo-frozen sample.

Both recalibrate on the first half of the 256 shipped test images (seed-0 shuffle) and are
scored on the other half: held-out eval-mode accuracy, and the error of each layer's new
running statistics against the exact population statistics of its train-mode input over
the fitting half (max relative error of the variance, max mean error in running stds).

    python benchmarks/recalibration_vs_update_bn.py
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torchvision
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bncheck  # noqa: E402
from bncheck.config import load_settings  # noqa: E402
from bncheck.reading.data import open_data  # noqa: E402


def main() -> None:
    cfg = load_settings(ROOT / "sample_models" / "config.yaml").data
    pairs = list(open_data(ROOT / "sample_models" / "data", cfg, 32, None).batches())
    x, y = torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs])
    fit, held = slice(0, 128), slice(128, 256)
    base = torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=4)
    base.load_state_dict(torch.load(ROOT / "sample_models" / "pseudo_frozen.pt", weights_only=True))
    base.eval()

    exact = bncheck.recalibrate(copy.deepcopy(base), x[fit], batch_size=32, in_place=False).state

    def accuracy(model: nn.Module, train_bn: bool = False) -> float:
        model.eval()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train(train_bn)
        with torch.no_grad():
            pred = torch.cat([model(b).argmax(1) for b in x[held].split(32)])
        model.eval()
        return float((pred == y[held]).float().mean())

    def stat_error(model: nn.Module) -> tuple[float, float]:
        state = model.state_dict()
        var_err = mean_err = 0.0
        for key, value in exact.items():
            if key.endswith("running_var"):
                var_err = max(var_err, float(((state[key] - value).abs() / value).max()))
                mkey = key.replace("running_var", "running_mean")
                mean_err = max(mean_err, float(((state[mkey] - exact[mkey]).abs() / value.sqrt()).max()))
        return var_err, mean_err

    ours = copy.deepcopy(base)
    bncheck.recalibrate(ours, x[fit], batch_size=32)
    theirs = copy.deepcopy(base)  # update_bn resets the buffers and sets momentum=None itself
    loader = torch.utils.data.DataLoader(x[fit], batch_size=32)
    torch.optim.swa_utils.update_bn(loader, theirs)

    print("held-out (128 images)      eval-mode acc   max rel. var error   max mean error (stds)")
    print(f"before                      {accuracy(base):>12.1%}")
    print(f"train-mode reference        {accuracy(base, train_bn=True):>12.1%}")
    for name, model in (("bncheck.recalibrate", ours), ("swa_utils.update_bn", theirs)):
        var_err, mean_err = stat_error(model)
        print(f"{name:<26}  {accuracy(model):>12.1%}   {var_err:>18.2e}   {mean_err:>20.2e}")


if __name__ == "__main__":
    main()
