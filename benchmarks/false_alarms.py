"""False-alarm price of the rules that judge the sample and the labels (accuracy-gap,
chance-accuracy, unrepresentative-sample, bn-frozen-in-eval, combined weak evidence): how often
each fires on models whose statistics are right.

Cases (all healthy by construction):
- the slow sweep's 10 torchvision architectures (random weights, BN calibrated on 128 sample
  images) on 128 others at batch sizes 32, 8, 4, 2 -- unlabelled (as the sweep) and labelled;
- the shipped healthy sample model on its data at batch sizes 64, 32, 16, 8, 4, with labels and
  without, over 5 seeds of the sample.

Prints one row per rule: firings / runs. Run: ``.venv/bin/python benchmarks/false_alarms.py``.
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from bncheck.config import load_settings  # noqa: E402
from bncheck.engine import analyze  # noqa: E402
from bncheck.reading.data import open_data  # noqa: E402

RULES = ("accuracy-gap", "chance-accuracy", "unrepresentative-sample", "bn-frozen-in-eval", "combined")


def tally(report, counts: Counter, errors: Counter, label: str) -> None:
    codes = {f.code for f in report.findings}
    for rule in RULES[:-1]:
        counts[rule] += rule in codes
    counts["combined"] += any(f.code == "stale-running-stats" and f.layer is None for f in report.findings)
    if report.verdict == "fail":
        errors[label] += 1


def sweep(counts: Counter, errors: Counter) -> int:
    from test_sweep_slow import ARCHS, calibrated

    cfg = load_settings(overrides={"data": {"resize": 112, "crop": 112}}).data
    pairs = list(open_data(ROOT / "sample_models" / "data", cfg, 32, 8).batches())
    calib, test = [x for x, _ in pairs[:4]], pairs[4:]
    runs = 0
    for arch in ARCHS:
        model = calibrated(arch, calib)
        for batch_size in (32, 8, 4, 2):
            for labelled in (False, True):
                data = [(x[:batch_size], y[:batch_size]) if labelled else x[:batch_size] for x, y in test]
                tally(analyze(model, data), counts, errors, f"{arch} b{batch_size}{' labelled' if labelled else ''}")
                runs += 1
        print(f"  {arch}: done", file=sys.stderr)
    return runs


def samples(counts: Counter, errors: Counter) -> int:
    from test_fix import sample_model

    cfg = load_settings(ROOT / "sample_models" / "config.yaml").data
    model = sample_model("healthy")
    runs = 0
    for seed in range(5):
        pairs = list(open_data(ROOT / "sample_models" / "data", cfg.__class__(**{**cfg.__dict__, "seed": seed}),
                               64, None).batches())
        x, y = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        for batch_size in (64, 32, 16, 8, 4):
            for labelled in (False, True):
                data = (x, y) if labelled else x
                tally(analyze(model, data, batch_size=batch_size), counts, errors,
                      f"healthy seed{seed} b{batch_size}{' labelled' if labelled else ''}")
                runs += 1
    return runs


def main() -> None:
    warnings.simplefilter("ignore")
    for name, run in (("slow sweep (10 archs x 4 batch sizes x labels/none)", sweep),
                      ("healthy sample (5 seeds x 5 batch sizes x labels/none)", samples)):
        counts: Counter = Counter()
        errors: Counter = Counter()
        runs = run(counts, errors)
        print(f"\n{name}: {runs} runs")
        print("| rule | fired |\n|---|---:|")
        for rule in RULES:
            print(f"| {rule} | {counts[rule]} / {runs} |")
        print(f"| verdict fail | {sum(errors.values())} / {runs} |")
        for label in sorted(errors):
            print(f"  fail: {label}")


if __name__ == "__main__":
    main()
