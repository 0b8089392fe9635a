"""Train the segmentation sample: the case bncheck was first asked about (no downloads;
~2 min on 2 CPU cores).

A DeepLab user fine-tunes a segmentation network with small batches and "freezes" BN the way
forum answers show: ``momentum = 0`` and ``requires_grad = False`` on every BN layer, the model
left in ``train()``. Training looks fine; ``eval()`` results are terrible.

1. ``base``: a small torchvision ``DeepLabV3`` (``segmentation/deeplab.py``) trained on domain A:
   discs (class 1) and squares (class 2) of random colours on textured grey backgrounds.
2. The deployment data is domain B: the same scenes in another place -- darker, lower contrast,
   with a warm colour cast.
3. ``pseudo_frozen.pt``: base fine-tuned on B with batches of 2 and the forum's freeze: the
   running statistics still describe A while the convolutions learned B through batch
   statistics.
4. ``healthy.pt``: the twin -- the same fine-tune done the normal way, batches of 16, BN
   updating its running statistics.

Measured while making it (not shipped): a plain fine-tune with batches of 2 leaves eval mode
about 3 mIoU points below train mode on this data (running statistics averaged from batches of
two lag behind); bncheck reports that gap and that recalibrating closes it. The same fine-tune
with every BN layer kept in eval mode (BN frozen properly) scores 81.9 mIoU in eval mode vs 82.7
in train mode, no gap beyond chance, yet its first layer's statistics describe domain A:
bncheck flags them stale -- the one reading labels cannot settle there.

Writes sample_models/segmentation/{healthy,pseudo_frozen}.pt (state_dicts), data/images +
data/masks (64 domain-B scenes, PNG masks of class indices) and prints the mIoU per mode
that sample_models/README.md quotes. Run: ``python sample_models/make_segmentation.py``.
"""

from __future__ import annotations

import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

HERE = Path(__file__).resolve().parent / "segmentation"
sys.path.insert(0, str(HERE))
from deeplab import build  # noqa: E402

SIZE = 96
CLASSES = 3
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def scene(rng: random.Random) -> tuple[Image.Image, Image.Image]:
    """One domain-A scene and its mask: 1-3 discs or squares on a textured grey background."""
    base = rng.randint(90, 160)
    noise = np.random.default_rng(rng.randint(0, 2**31)).integers(-25, 26, (SIZE // 8, SIZE // 8, 3))
    texture = np.kron(noise, np.ones((8, 8, 1))) + base
    img = Image.fromarray(texture.clip(0, 255).astype(np.uint8))
    mask = Image.new("L", (SIZE, SIZE), 0)
    draw, label = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    for _ in range(rng.randint(1, 3)):
        cls, r = rng.randint(1, 2), rng.randint(9, 20)
        cx, cy = rng.randint(r, SIZE - r), rng.randint(r, SIZE - r)
        colour = tuple(rng.choice((rng.randint(0, 70), rng.randint(180, 255))) for _ in range(3))
        box = (cx - r, cy - r, cx + r, cy + r)
        (draw.ellipse if cls == 1 else draw.rectangle)(box, fill=colour)
        (label.ellipse if cls == 1 else label.rectangle)(box, fill=cls)
    return img, mask


def to_domain_b(img: Image.Image) -> Image.Image:
    """The same scene elsewhere: darker, lower contrast, a warm cast."""
    x = np.asarray(img).astype(np.float32) / 255
    x = 0.18 + (x - 0.5) * 0.55 + 0.25 * x * 0.5
    x = x + np.array([0.10, 0.03, -0.08])
    return Image.fromarray((x.clip(0, 1) * 255).round().astype(np.uint8))


def dataset(n: int, seed: int, domain_b: bool) -> tuple[list[Image.Image], list[Image.Image], torch.Tensor,
                                                         torch.Tensor]:
    rng = random.Random(seed)
    images, masks = zip(*(scene(rng) for _ in range(n)))
    if domain_b:
        images = tuple(to_domain_b(img) for img in images)
    x = torch.stack([(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255 - MEAN) / STD
                     for img in images])
    y = torch.stack([torch.from_numpy(np.asarray(m).copy()).long() for m in masks])
    return list(images), list(masks), x, y


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, lr: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)  # the usual decay to zero
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx])["out"], y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()


def miou(model: nn.Module, x: torch.Tensor, y: torch.Tensor, train_mode: bool, batch: int = 16) -> float:
    """Mean IoU over the classes present, the model in train mode (batches of ``batch``) or eval."""
    was = model.training
    model.train(train_mode)
    with torch.no_grad():
        predicted = torch.cat([model(x[i:i + batch])["out"].argmax(1) for i in range(0, len(x), batch)])
    model.train(was)
    ious = []
    for c in range(CLASSES):
        union = ((predicted == c) | (y == c)).sum().item()
        if union:
            ious.append(((predicted == c) & (y == c)).sum().item() / union)
    return sum(ious) / len(ious)


def forum_freeze(model: nn.Module) -> None:
    """What forum answers show: every BN layer's momentum 0 and affine requires_grad=False,
    the model then left in train() -- so BN keeps normalising with batch statistics while
    its running statistics stay those of domain A."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.0
            for p in m.parameters():
                p.requires_grad_(False)


def main() -> None:
    torch.manual_seed(0)
    t0 = time.time()
    _, _, xa, ya = dataset(1200, seed=1, domain_b=False)
    _, _, xb, yb = dataset(400, seed=2, domain_b=True)
    test_images, test_masks, xb_test, yb_test = dataset(64, seed=3, domain_b=True)
    _, _, xa_test, ya_test = dataset(64, seed=4, domain_b=False)

    base = build()
    base.train()
    train(base, xa, ya, steps=700, batch=16, lr=3e-3, seed=0)
    state = {k: v.clone() for k, v in base.eval().state_dict().items()}
    print(f"base on A: eval mIoU {miou(base, xa_test, ya_test, False):.3f}  ({time.time() - t0:.0f}s)")

    results = {}
    for name, freeze, batch, steps in (("pseudo_frozen", forum_freeze, 2, 400), ("healthy", None, 16, 200)):
        model = build()
        model.load_state_dict(state)
        model.train()
        if freeze is not None:
            freeze(model)
        train(model, xb, yb, steps=steps, batch=batch, lr=1e-3, seed=1)
        model.eval()
        results[name] = (miou(model, xb_test, yb_test, True), miou(model, xb_test, yb_test, False))
        torch.save(model.state_dict(), HERE / f"{name}.pt")
        print(f"{name} on B: train-mode mIoU {results[name][0]:.3f}, eval-mode mIoU {results[name][1]:.3f}")

    out = HERE / "data"
    shutil.rmtree(out, ignore_errors=True)
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    for i, (img, mask) in enumerate(zip(test_images, test_masks)):
        img.save(out / "images" / f"{i:03d}.png")
        mask.save(out / "masks" / f"{i:03d}.png")
    print(f"wrote {len(test_images)} scenes with masks to {out} in {time.time() - t0:.0f}s total")


if __name__ == "__main__":
    main()
