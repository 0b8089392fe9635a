"""What a bncheck run costs against the script a user would write by hand. Prints ratios, not
pass/fail: machines here are shared and noisy, so the two processes alternate and the median
of each is compared.

    python benchmarks/overhead.py [--arch resnet50] [--images 64] [--batch-size 16] [--repeats 3]
                                  [--device cpu|cuda] [--markdown benchmarks/RESULTS.md]

Measured (each a whole process: interpreter start, imports, loading, decoding, forwards):

1. ``bncheck run`` vs the hand-written script: load the resnet50 state_dict, decode the JPEGs
   at 224x224 with PIL, one eval-mode and one train-mode forward per batch (target <= 1.05x
   wall, peak memory 1.0x);
2. ``bncheck.recalibrate`` vs a bare train-mode pass over the same tensors (in process, at
   the sample size and at 4x it; target <= 1.05x) and the whole ``bncheck fix`` process (recalibration plus a diagnosis
   before and after) vs the bare train-pass script and vs the careful user's script (an eval pass,
   ``swa_utils.update_bn``, an eval pass; target <= 1.10x);
   and ``bncheck run`` on a failing model (every BN mean off by half a std): the default command
   (target <= 1.5x), ``--attribute 0`` (target <= 1.15x) and ``--thorough`` (every pass), with
   each pass's time, forwards and what it bought from the run's own ``passes`` (``--profile``);
3. peak memory of ``bncheck run`` at 4 and 16 batches (flat: the sample kept for the
   later passes is capped);
4. image decoding throughput (images/s) of bncheck's folder reader.

The model's BN statistics are first set to the images' own (so the run is healthy and pays
for no attribution or noise passes, like the user's script).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image

HAND_WRITTEN = """
import sys, glob, gc
if sys.argv[4].endswith("-gc"):  # what bncheck does: no collections while importing, then freeze
    gc.disable()
import numpy as np, torch, torchvision
from PIL import Image
model = torchvision.models.{arch}(weights=None)
model.load_state_dict(torch.load(sys.argv[1], map_location="cpu", weights_only=True))
if sys.argv[4].endswith("-gc"):
    gc.freeze(); gc.enable()
model.eval().to(sys.argv[3])
mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
files = sorted(glob.glob(sys.argv[2] + "/*.jpg"))
mode = sys.argv[4].removesuffix("-gc")
batches = []
with torch.no_grad():
    for i in range(0, len(files), {batch}):
        x = torch.stack([
            (torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1).float() / 255 - mean) / std
            for f in files[i:i + {batch}]
        ]).to(sys.argv[3])
        if mode == "fix":  # what a careful user writes instead of bncheck fix: eval, update_bn, eval
            batches.append(x)
            continue
        if mode == "both":
            model.eval(); model(x)
        model.train(); model(x)
if mode == "fix":
    with torch.no_grad():
        model.eval()
        before = [model(x) for x in batches]
        torch.optim.swa_utils.update_bn(batches, model)
        model.eval()
        after = [model(x) for x in batches]
"""


def make_images(folder: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        phase = rng.uniform(0, 6.28, 3)
        img = np.stack([np.sin(6 * xx + phase[c]) * np.cos(4 * yy + phase[c]) for c in range(3)], -1)
        img = ((img + 1) * 127.5 + rng.normal(0, 12, img.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:04d}.jpg", quality=90)


def image_source(images: Path, batch: int) -> Any:
    """bncheck's reader over the benchmark's JPEGs as they are (no resize, no crop)."""
    from bncheck.config import load_settings
    from bncheck.reading.data import open_data

    cfg = load_settings(overrides={"data": {"resize": None, "crop": None}}).data
    return open_data(images, cfg, batch, None)


def healthy_checkpoint(arch: str, images: Path, batch: int, path: Path) -> None:
    """Random weights with BN statistics set to the images' own (a model that passes)."""
    import bncheck

    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None).eval()
    source = image_source(images, batch)
    bncheck.recalibrate(model, [x for x, _ in source.batches()])
    torch.save(model.state_dict(), path)


def stale_checkpoint(healthy: Path, path: Path) -> None:
    """The healthy checkpoint with every BN layer's running mean moved by half a running std:
    a model that fails, so a run pays for the passes a failing model triggers."""
    state = torch.load(healthy, weights_only=True)
    for key in list(state):
        if key.endswith("running_mean"):
            state[key] = state[key] + 0.5 * state[key[: -len("running_mean")] + "running_var"].sqrt()
    torch.save(state, path)


LAUNCHER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = proc.stderr.read()
_, status, usage = os.wait4(proc.pid, 0)
wall = time.perf_counter() - start
with open(sys.argv[1], "w") as out:
    json.dump({"wall": wall, "rss": usage.ru_maxrss, "code": os.waitstatus_to_exitcode(status),
               "stderr": err.decode(errors="replace")[-800:]}, out)
"""
"""Runs one command and reports its wall time and peak RSS. A child's ``ru_maxrss`` starts at
the RSS of the process that forked it (Linux keeps the old memory's high-water mark across
exec), and this benchmark's own process holds torch: measured from a small launcher, the
figure is the command's own."""


def timed_process(command: list[str], cwd: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS (MiB) of one child process."""
    import json

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with tempfile.NamedTemporaryFile(suffix=".json") as report:
        subprocess.run([sys.executable, "-c", LAUNCHER, report.name, *command], cwd=cwd, env=env, check=True)
        result = json.loads(Path(report.name).read_text())
    if result["code"] not in (0, 1):
        raise SystemExit(f"{command[:4]} failed ({result['code']}): {result['stderr']}")
    return result["wall"], result["rss"] // 1024


def alternate(commands: dict[str, list[str]], cwd: Path, repeats: int) -> dict[str, tuple[float, int]]:
    for command in commands.values():  # warm the page cache and the imports once
        timed_process(command, cwd)
    walls: dict[str, list[float]] = {name: [] for name in commands}
    peaks: dict[str, list[int]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, command in commands.items():
            wall, peak = timed_process(command, cwd)
            walls[name].append(wall)
            peaks[name].append(peak)
    return {name: (statistics.median(walls[name]), max(peaks[name])) for name in commands}


def in_process_recalibration(arch: str, images: Path, batch: int, device: str, repeats: int) -> tuple[float, float]:
    """Median seconds of ``bncheck.recalibrate`` and of a bare train-mode pass, same tensors."""
    import bncheck

    model = torchvision.models.get_model(arch, weights=None).eval().to(device)
    batches = [x.to(device) for x, _ in image_source(images, batch).batches()]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def bare() -> None:
        model.train()
        with torch.no_grad():
            for x in batches:
                model(x)
        model.eval()

    def ours() -> None:
        bncheck.recalibrate(model, batches, in_place=False)

    bare()  # warm-up
    times: dict[str, list[float]] = {"bare": [], "ours": []}
    for _ in range(repeats):
        for name, fn in (("bare", bare), ("ours", ours)):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["ours"]), statistics.median(times["bare"])


def pass_costs(saved: Path, label: str) -> list[tuple[str, str, str]]:
    """Each pass of a run, from its saved JSON (what ``--profile`` prints): wall time, share of
    the time in passes, forwards, and what it bought or why it was skipped."""
    import json

    passes = json.loads(saved.read_text())["passes"]
    total = sum(p["seconds"] for p in passes if p["ran"])
    rows = []
    for p in passes:
        if p["ran"]:
            rows.append((f"{label}, pass `{p['name']}`", f"{p['seconds']:.2f} s of {total:.2f} s",
                         f"{100 * p['seconds'] / total:.0f}%, {p['forwards']} forwards; buys: {p['bought']}"))
        else:
            rows.append((f"{label}, pass `{p['name']}`", "skipped", p["bought"]))
    return rows


def decode_rate(images: Path, batch: int) -> float:

    source = image_source(images, batch)
    start = time.perf_counter()
    count = sum(x.shape[0] for x, _ in source.batches())
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--markdown", type=Path, help="Also append the table to this file.")
    args = parser.parse_args()
    python = sys.executable
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        images = work / "images"
        make_images(images, args.images, args.size)
        healthy_checkpoint(args.arch, images, args.batch_size, work / "model.pt")
        stale_checkpoint(work / "model.pt", work / "stale.pt")
        (work / "hand.py").write_text(HAND_WRITTEN.format(arch=args.arch, batch=args.batch_size))
        run = [python, "-m", "bncheck", "run", "model.pt", "--arch", f"torchvision:{args.arch}", "--data", "images",
               "--batch-size", str(args.batch_size), "--num-batches", str(-(-args.images // args.batch_size)),
               "--resize", "none", "--crop", "none", "--device", args.device, "--quiet"]
        fix = [python, "-m", "bncheck", "fix", "model.pt", "--arch", f"torchvision:{args.arch}", "--data", "images",
               "--batch-size", str(args.batch_size), "--resize", "none", "--crop", "none", "--device", args.device,
               "--out", "fixed.pt", "--force", "--quiet"]
        hand = [python, "hand.py", "model.pt", "images", args.device, "both"]
        hand_gc = [python, "hand.py", "model.pt", "images", args.device, "both-gc"]
        hand_train = [python, "hand.py", "model.pt", "images", args.device, "train"]
        hand_fix = [python, "hand.py", "model.pt", "images", args.device, "fix"]
        failing = [*run[:4], "stale.pt", *run[5:], "--save", "failing.json"]
        failing_quick = [*failing[:-1], "failing-quick.json", "--attribute", "0"]
        failing_thorough = [*failing[:-1], "failing-thorough.json", "--thorough"]
        result = alternate({"run": run, "hand": hand, "hand_gc": hand_gc, "fix": fix,
                            "hand_train": hand_train, "hand_fix": hand_fix,
                            "failing": failing, "failing_quick": failing_quick,
                            "failing_thorough": failing_thorough}, work, args.repeats)
        (run_wall, run_peak), (hand_wall, hand_peak) = result["run"], result["hand"]
        (fix_wall, fix_peak), (train_wall, _) = result["fix"], result["hand_train"]
        rows.append(("`bncheck run` process vs hand-written script (eval+train forward per batch)",
                     f"{run_wall:.2f} s vs {hand_wall:.2f} s", f"**{run_wall / hand_wall:.3f}×** wall, "
                     f"{run_peak / hand_peak:.2f}× peak RSS ({run_peak} vs {hand_peak} MiB)"))
        gc_wall = result["hand_gc"][0]
        rows.append(("... vs the same script with the garbage collector handled as bncheck does (off while "
                     "importing, then frozen)", f"{run_wall:.2f} s vs {gc_wall:.2f} s",
                     f"{run_wall / gc_wall:.3f}× wall"))
        for name, label in (("failing_quick", "`--attribute 0`"),
                            ("failing", "default command (the plan of passes)"),
                            ("failing_thorough", "`--thorough` (every pass, as before issue 30)")):
            wall, peak = result[name]
            rows.append((f"`bncheck run` on a failing model (every BN mean off by 0.5 std), {label}",
                         f"{wall:.2f} s vs {hand_wall:.2f} s", f"**{wall / hand_wall:.3f}×** wall, "
                         f"{peak / hand_peak:.2f}× peak RSS"))
        rows += pass_costs(work / "failing.json", "failing model, default command")
        rows += pass_costs(work / "failing-thorough.json", "failing model, `--thorough`")
        ours, bare = in_process_recalibration(args.arch, images, args.batch_size, args.device, args.repeats)
        rows.append(("`bncheck.recalibrate` vs bare train-mode pass (in process, same tensors)",
                     f"{ours:.2f} s vs {bare:.2f} s", f"**{ours / bare:.3f}×**"))
        rows.append(("`bncheck fix` process (recalibrate + diagnosis before and after) vs train-pass script",
                     f"{fix_wall:.2f} s vs {train_wall:.2f} s", f"{fix_wall / train_wall:.2f}× wall, {fix_peak} MiB"))
        careful_wall, _ = result["hand_fix"]
        rows.append(("`bncheck fix` process vs the careful user's script (eval pass, update_bn, eval pass)",
                     f"{fix_wall:.2f} s vs {careful_wall:.2f} s", f"**{fix_wall / careful_wall:.3f}×** wall"))
        # memory flat in the number of batches: the same run over 4x the batches
        more = work / "more"
        make_images(more, args.images * 4, args.size)
        long_run = [*run[:8], "more", *run[9:]]
        long_run[long_run.index("--num-batches") + 1] = str(-(-4 * args.images // args.batch_size))
        (long_wall, long_peak) = alternate({"long": long_run}, work, 1)["long"]
        rows.append((f"`bncheck run` peak RSS, {args.images} vs {4 * args.images} images",
                     f"{run_peak} vs {long_peak} MiB", f"{long_peak / run_peak:.2f}× ({long_wall:.1f} s)"))
        ours, bare = in_process_recalibration(args.arch, more, args.batch_size, args.device, args.repeats)
        rows.append((f"`bncheck.recalibrate` vs bare train-mode pass, {4 * args.images} images (BN's own statistics "
                     "after the first 32 samples)", f"{ours:.2f} s vs {bare:.2f} s", f"**{ours / bare:.3f}×**"))
        rows.append(("bncheck image folder decode (PIL, one process)", f"{decode_rate(more, args.batch_size):.0f} "
                     "images/s", ""))
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads, device {args.device}"
               + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    lines = [f"### {args.arch}, {args.images} JPEGs {args.size}×{args.size}, batch {args.batch_size} — {machine}",
             "", "| measurement | time | ratio |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        with args.markdown.open("a", encoding="utf-8") as fh:
            fh.write("\n" + text)


if __name__ == "__main__":
    main()
