"""Overhead of a bncheck run against its floor: one eval-mode and one train-mode (BN only)
forward per batch, no hooks. Prints ratios, not pass/fail: machines are shared and noisy.

    python benchmarks/overhead.py [--arch resnet50] [--batch-size 16] [--num-batches 4] [--size 224]

Target (DESIGN section 6): a run within 1.10x of the floor.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from bncheck.capture import fingerprint, preserved_state, set_bn_train_mode
from bncheck.config import load_settings
from bncheck.discovery import find_bn_layers
from bncheck.engine import analyze


def floor_run(model, batches, layers) -> None:
    with torch.no_grad(), preserved_state(model) as snapshot:
        for x in batches:
            set_bn_train_mode(model, layers, bn_training=False)
            model(x)
            set_bn_train_mode(model, layers, bn_training=True)
            model(x)
            snapshot.restore_buffers()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-batches", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torchvision.models.get_model(args.arch, weights=None).eval().to(args.device)
    batches = [torch.randn(args.batch_size, 3, args.size, args.size, device=args.device)
               for _ in range(args.num_batches)]
    layers = find_bn_layers(model)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def timed(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    floor_run(model, batches[:1], layers)  # warm-up
    # Random init leaves the buffers at their defaults (findings everywhere), so measure the
    # core run without attribution, and attribution on its own line.
    plain = load_settings(overrides={"attribute": 0})
    attributing = load_settings(overrides={"attribute": 5})
    floors, runs, prints, attributed = [], [], [], []
    for _ in range(args.repeats):
        floors.append(timed(lambda: floor_run(model, batches, layers)))
        runs.append(timed(lambda: analyze(model, batches, settings=plain)))
        prints.append(timed(lambda: fingerprint(model)))
    attributed.append(timed(lambda: analyze(model, batches, settings=attributing)))
    floor, run, fp = statistics.median(floors), statistics.median(runs), statistics.median(prints)
    print(f"{args.arch} {args.num_batches}x{args.batch_size}x{args.size}^2 on {args.device}, "
          f"{len(layers)} BN layers, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"floor (eval+train forward per batch): {floor:.2f} s")
    print(f"bncheck analyze:                      {run:.2f} s")
    print(f"ratio run / floor:                    {run / floor:.2f}x  (target <= 1.10x)")
    print(f"of which model fingerprint (x2):      {2 * fp:.2f} s ({2 * fp / floor:.1%} of floor)")
    print(f"with --attribute 5 (5 flagged layers): {attributed[0]:.2f} s = {attributed[0] / floor:.2f}x floor "
          "(expected ~1 + 5/2: one eval pass per layer)")


if __name__ == "__main__":
    main()
