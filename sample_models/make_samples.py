"""Train the shipped sample models on generated data (no downloads; ~2-3 min on 2 CPU cores).

The story is the classic pseudo-frozen fine-tune:

1. ``base``: torchvision ``shufflenet_v2_x0_5`` (4 classes) trained on domain A: coloured
   shapes (circle, square, triangle, cross) on mid-grey noisy backgrounds.
2. The deployment data is domain B: the same shapes photographed "in another place" --
   inverted, darker, lower-contrast, with a colour cast.
3. ``healthy.pt``: base fine-tuned on B the normal way (BN layers update their running
   statistics).
4. ``pseudo_frozen.pt``: base fine-tuned on B with BN "frozen" the tempting way: affine
   ``requires_grad=False`` and ``momentum=0``, but the model left in ``train()``. Batch
   statistics of B carry training; the running statistics still describe A, so eval
   accuracy collapses.

Writes sample_models/{base,healthy,pseudo_frozen}.pt (state_dicts), sample_models/data/ (domain
B images in class subfolders) and prints the accuracies that sample_models/README.md quotes.
Run: ``python sample_models/make_samples.py`` (or ``make samples``).
"""

from __future__ import annotations

import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw
from torch import nn

HERE = Path(__file__).resolve().parent
CLASSES = ("circle", "square", "triangle", "cross")
SIZE = 64
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
ARCH_KWARGS = {"num_classes": len(CLASSES)}


def draw(label: int, rng: random.Random) -> Image.Image:
    """One domain-A image: a coloured shape on a noisy grey background."""
    bg = tuple(rng.randint(90, 160) for _ in range(3))
    img = Image.new("RGB", (SIZE, SIZE), bg)
    d = ImageDraw.Draw(img)
    r = rng.randint(10, 22)
    cx, cy = rng.randint(r + 2, SIZE - r - 2), rng.randint(r + 2, SIZE - r - 2)
    color = tuple(rng.choice((rng.randint(0, 60), rng.randint(190, 255))) for _ in range(3))
    name = CLASSES[label]
    if name == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif name == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif name == "triangle":
        angle = rng.uniform(0, 2 * math.pi)
        corners = [angle + k * 2 * math.pi / 3 for k in range(3)]
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in corners]
        d.polygon(pts, fill=color)
    else:
        w = max(3, r // 3)
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=color)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=color)
    arr = np.asarray(img).astype(np.float32)
    arr += np.random.default_rng(rng.randint(0, 2**31)).normal(0, 12, arr.shape)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def to_domain_b(img: Image.Image) -> Image.Image:
    """Domain shift: inverted, darker, lower contrast, blue cast."""
    arr = 255.0 - np.asarray(img).astype(np.float32)
    arr = arr * 0.3 + np.array([5.0, 30.0, 110.0])
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def to_tensor(img: Image.Image) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0
    return (x - MEAN) / STD


def dataset(n: int, seed: int, domain_b: bool) -> tuple[list[Image.Image], torch.Tensor, torch.Tensor]:
    rng = random.Random(seed)
    labels = [i % len(CLASSES) for i in range(n)]
    rng.shuffle(labels)
    images = [draw(y, rng) for y in labels]
    if domain_b:
        images = [to_domain_b(im) for im in images]
    return images, torch.stack([to_tensor(im) for im in images]), torch.tensor(labels)


def build() -> nn.Module:
    return torchvision.models.shufflenet_v2_x0_5(weights=None, **ARCH_KWARGS)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(x) / 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            if len(idx) < 2:
                continue
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, train_mode: bool) -> float:
    """Top-1 accuracy with BN in train mode (batch statistics, batches of 32) or eval mode.
    Buffers are saved and restored, so measuring never changes the model."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    was_training = model.training
    model.train(train_mode)
    correct = sum(int((model(x[i : i + 32]).argmax(1) == y[i : i + 32]).sum()) for i in range(0, len(x), 32))
    model.load_state_dict(saved)
    model.train(was_training)
    return correct / len(x)


def freeze_the_tempting_way(model: nn.Module) -> None:
    """"Freeze" every BN layer: affine requires_grad=False and momentum=0 -- but the model
    stays in train(), so BN keeps normalizing with batch statistics while the convolutions
    learn domain B, and the running statistics stay those of domain A."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.0
            for p in m.parameters():
                p.requires_grad_(False)


def freeze_the_right_way(model: nn.Module) -> None:
    """Fine-tune with BN frozen *on purpose*: every BN layer kept in eval mode (it normalizes
    with domain A's running statistics, also while training), affine frozen. The layers after
    each BN learn domain B through exactly those statistics, so they are not stale: they are
    the ones the model was fine-tuned with."""
    import bncheck

    bncheck.freeze_batchnorm(model)


def make_frozen_eval(base_state: dict, xb: torch.Tensor, yb: torch.Tensor, xb_test: torch.Tensor,
                     yb_test: torch.Tensor) -> None:
    model = build()
    model.load_state_dict(base_state)
    model.train()
    freeze_the_right_way(model)
    train(model, xb, yb, epochs=3, lr=2e-3, seed=1)
    model.eval()
    from bncheck.curing.freeze import unfreeze_batchnorm

    unfreeze_batchnorm(model)
    torch.save(model.state_dict(), HERE / "frozen_eval.pt")
    print(f"frozen_eval on B: train-mode acc {accuracy(model, xb_test, yb_test, True):.3f}, "
          f"eval-mode acc {accuracy(model, xb_test, yb_test, False):.3f}")


def train_base(xa: torch.Tensor, ya: torch.Tensor) -> dict:
    """The base model, trained on domain A the normal way; its state (eval-ready)."""
    base = build()
    base.train()
    train(base, xa, ya, epochs=12, lr=5e-3, seed=0)
    return {k: v.clone() for k, v in base.eval().state_dict().items()}


def main() -> None:
    if "--only-base" in sys.argv:  # the base model alone (for `bncheck diff`): the others stay as shipped
        torch.manual_seed(0)
        _, xa, ya = dataset(6000, seed=1, domain_b=False)
        torch.save(train_base(xa, ya), HERE / "base.pt")
        return
    if "--only-frozen-eval" in sys.argv:  # the third sample alone: the two others stay as shipped
        torch.manual_seed(0)
        _, xa, ya = dataset(6000, seed=1, domain_b=False)
        _, xb, yb = dataset(1200, seed=2, domain_b=True)
        _, xb_test, yb_test = dataset(256, seed=3, domain_b=True)
        make_frozen_eval(train_base(xa, ya), xb, yb, xb_test, yb_test)
        return
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()
    _, xa, ya = dataset(6000, seed=1, domain_b=False)
    _, xb, yb = dataset(1200, seed=2, domain_b=True)
    sample_images, xb_test, yb_test = dataset(256, seed=3, domain_b=True)
    _, xa_test, ya_test = dataset(256, seed=4, domain_b=False)

    base_state = train_base(xa, ya)
    base = build()
    base.load_state_dict(base_state)
    print(f"base on A: eval acc {accuracy(base.eval(), xa_test, ya_test, False):.3f}  ({time.time() - t0:.0f}s)")

    healthy = build()
    healthy.load_state_dict(base_state)
    healthy.train()
    train(healthy, xb, yb, epochs=3, lr=2e-3, seed=1)
    healthy.eval()

    frozen = build()
    frozen.load_state_dict(base_state)
    freeze_the_tempting_way(frozen)
    frozen.train()
    train(frozen, xb, yb, epochs=3, lr=2e-3, seed=1)
    frozen.eval()

    make_frozen_eval(base_state, xb, yb, xb_test, yb_test)
    torch.save(base_state, HERE / "base.pt")
    results = {}
    for name, model in (("healthy", healthy), ("pseudo_frozen", frozen)):
        results[name] = (accuracy(model, xb_test, yb_test, True), accuracy(model, xb_test, yb_test, False))
        torch.save(model.state_dict(), HERE / f"{name}.pt")
        print(f"{name} on B: train-mode acc {results[name][0]:.3f}, eval-mode acc {results[name][1]:.3f}")

    out = HERE / "data"
    shutil.rmtree(out, ignore_errors=True)
    # Folder names sort in label order, so class-subfolder labels match the model's outputs.
    folders = [f"{i}_{name}" for i, name in enumerate(CLASSES)]
    for folder in folders:
        (out / folder).mkdir(parents=True)
    for i, (img, label) in enumerate(zip(sample_images, yb_test.tolist())):
        img.save(out / folders[label] / f"{i:04d}.png")
    print(f"wrote {len(sample_images)} images to {out} in {time.time() - t0:.0f}s total")


if __name__ == "__main__":
    main()
