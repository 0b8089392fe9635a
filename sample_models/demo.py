"""`make demo`: bncheck on the shipped sample models, as a user would type it.

First the case bncheck was made for: a DeepLabV3 segmentation net fine-tuned with batches of 2
and BN "frozen" the forum's way (sample_models/segmentation/). bncheck reads the masks, reports
mIoU per mode (expected: FAIL, exit 1, with pictures in .bncheck/segmentation.html), passes its
normally fine-tuned twin (exit 0), and `fix` recalibrates it, verified by mIoU (exit 0).

Then the classifier samples: runs the pseudo-frozen fine-tune (expected: FAIL, exit 1) and the healthy one (expected:
PASS, exit 0), re-renders the last run with `bncheck report`, then cures the pseudo-frozen
model with `bncheck fix` (into .bncheck/, exit 0), checks the result (PASS), and compares the
pseudo-frozen checkpoint with its base model without data (`bncheck diff`, exit 1). Exits
non-zero only if an exit code is not the expected one.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCH = ["--arch", "torchvision:shufflenet_v2_x0_5", "--arch-kwargs", "{num_classes: 4}"]
COMMON = [
    *ARCH,
    "--data", "sample_models/data",
    "--config", "sample_models/config.yaml",
]
SEGMENTATION = [
    "--arch", "sample_models/segmentation/deeplab.py:build",
    "--data", "sample_models/segmentation/data",
    "--config", "sample_models/segmentation/config.yaml",
]
STEPS = [
    (["run", "sample_models/segmentation/pseudo_frozen.pt", *SEGMENTATION, "--top", "5",
      "--html", ".bncheck/segmentation.html", "--force"], 1),
    (["run", "sample_models/segmentation/healthy.pt", *SEGMENTATION, "--top", "3"], 0),
    (["fix", "sample_models/segmentation/pseudo_frozen.pt", *SEGMENTATION,
      "--out", ".bncheck/segmentation.fixed.pt", "--force"], 0),
    (["run", "sample_models/pseudo_frozen.pt", *COMMON], 1),
    (["run", "sample_models/healthy.pt", *COMMON, "--top", "5"], 0),
    (["report", "--markdown", "--top", "3"], 0),
    (["fix", "sample_models/pseudo_frozen.pt", *COMMON, "--out", ".bncheck/pseudo_frozen.fixed.pt", "--force"], 0),
    (["run", ".bncheck/pseudo_frozen.fixed.pt", *COMMON, "--top", "3"], 0),
    (["diff", "sample_models/base.pt", "sample_models/pseudo_frozen.pt", *ARCH, "--top", "5"], 1),
]


def main() -> int:
    bncheck = [sys.executable, "-m", "bncheck"]
    failures = 0
    for args, expected in STEPS:
        print(f"\n$ bncheck {shlex.join(args)}", flush=True)
        started = time.perf_counter()
        code = subprocess.call([*bncheck, *args], cwd=ROOT)
        elapsed = time.perf_counter() - started
        verdict = "as expected" if code == expected else f"EXPECTED {expected}"
        print(f"[exit code {code}, {verdict}; {elapsed:.1f} s]", flush=True)
        failures += code != expected
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
