"""What a bncheck run on a segmentation or a detection model costs against the hand-written
two-pass script (issues 28 and 30): torchvision's DeepLabV3-ResNet50 at 512x512, or Faster
R-CNN (MobileNetV3-Large 320 FPN, BatchNorm2d in the backbone when built without weights),
healthy (BN statistics set to the images' own), peak RSS and wall time of whole processes,
alternated. Prints ratios, not pass/fail.

    python benchmarks/segmentation.py [--task segmentation|detection] [--images 64] [--batch-size 4]
                                      [--size 512] [--repeats 1] [--device cpu|cuda]
                                      [--markdown benchmarks/RESULTS.md]

The hand-written script loads the state_dict, decodes the JPEGs with PIL and runs one eval-mode
and one train-mode forward per batch under ``no_grad`` (for the detector: only its BN layers in
train mode, as bncheck does -- a torchvision detector in train mode wants targets); bncheck
compares the two per pixel (softmax over 21 classes per pixel, in chunks) or box by box, and
keeps the pictures of the worst images.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import alternate, image_source, make_images  # noqa: E402

HAND_WRITTEN = """
import sys, glob
import numpy as np, torch, torchvision
from PIL import Image
model = {builder}
model.load_state_dict(torch.load(sys.argv[1], map_location="cpu", weights_only=True))
model.eval().to(sys.argv[3])
mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
files = sorted(glob.glob(sys.argv[2] + "/*.jpg"))
with torch.no_grad():
    for i in range(0, len(files), {batch}):
        x = torch.stack([
            (torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1).float() / 255 - mean) / std
            for f in files[i:i + {batch}]
        ]).to(sys.argv[3])
        {passes}
"""
SEGMENTATION_PASSES = 'model.eval(); model(x)["out"]\n        model.train(); model(x)["out"]'
DETECTION_PASSES = ("model.eval(); model(list(x))\n        bns = [m for m in model.modules() if "
                    "isinstance(m, torch.nn.BatchNorm2d)]\n        [m.train() for m in bns]; model(list(x)); "
                    "[m.eval() for m in bns]")
BUILDERS = {
    "segmentation": ("torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, "
                     "num_classes=21)", "torchvision:deeplabv3_resnet50", "{num_classes: 21, weights_backbone: null}"),
    "detection": ("torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, "
                  "weights_backbone=None, num_classes=91)", "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn",
                  "{num_classes: 91, weights_backbone: null}"),
}


def healthy_model(task: str, images: Path, batch: int, path: Path) -> None:
    import bncheck

    torch.manual_seed(0)
    if task == "detection":
        model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
            weights=None, weights_backbone=None, num_classes=91)
    else:
        model = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21)
    batches = [x for x, _ in image_source(images, batch).batches()]
    bncheck.recalibrate(model.eval(), [list(x) for x in batches] if task == "detection" else batches)
    torch.save(model.state_dict(), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(BUILDERS), default="segmentation")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--markdown", type=Path, help="Also append the table to this file.")
    args = parser.parse_args()
    python = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_images(work / "images", args.images, args.size)
        healthy_model(args.task, work / "images", args.batch_size, work / "model.pt")
        builder, arch, kwargs = BUILDERS[args.task]
        passes = DETECTION_PASSES if args.task == "detection" else SEGMENTATION_PASSES
        (work / "hand.py").write_text(HAND_WRITTEN.format(batch=args.batch_size, builder=builder, passes=passes))
        run = [python, "-m", "bncheck", "run", "model.pt", "--arch", arch, "--arch-kwargs", kwargs, "--data", "images",
               "--batch-size", str(args.batch_size), "--num-batches", str(-(-args.images // args.batch_size)),
               "--resize", "none", "--crop", "none", "--device", args.device, "--quiet",
               "--html", "report.html", "--force"]
        hand = [python, "hand.py", "model.pt", "images", args.device]
        result = alternate({"run": run, "hand": hand}, work, args.repeats)
    (run_wall, run_peak), (hand_wall, hand_peak) = result["run"], result["hand"]
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads, device {args.device}")
    name, compared = (("fasterrcnn_mobilenet_v3_large_320_fpn", "box-by-box comparison")
                      if args.task == "detection" else ("deeplabv3_resnet50", "per-pixel comparison"))
    text = "\n".join([
        f"### {name}, {args.images} JPEGs {args.size}×{args.size}, batch {args.batch_size} — {machine}",
        "", "| measurement | time | ratio |", "|---|---|---|",
        f"| `bncheck run` ({compared}, pictures in the HTML) vs hand-written two-pass script | "
        f"{run_wall:.1f} s vs {hand_wall:.1f} s | **{run_wall / hand_wall:.3f}×** wall, "
        f"**{run_peak / hand_peak:.2f}×** peak RSS ({run_peak} vs {hand_peak} MiB) |",
    ]) + "\n"
    print(text)
    if args.markdown:
        with args.markdown.open("a", encoding="utf-8") as out:
            out.write("\n" + text)


if __name__ == "__main__":
    main()
