"""Train the concept classifier on world renders: ``python -m sepme_lib.train_classifier``.

Augmentation (so that it reads generated images, which carry speckle and soft edges): Gaussian pixel
noise with a random strength up to 0.12, and a random light blur. Prints held-out accuracy per head and
writes ``data/classifier/classifier.safetensors`` plus ``metrics.json``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import config, world
from .classifier import HEADS, ConceptClassifier


def labels(specs):
    return {k: torch.tensor([HEADS[k].index(getattr(s, k)) for s in specs]) for k in HEADS}


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    blur = torch.rand(n, 1, 1, 1, generator=g) < 0.3
    k = torch.tensor([0.25, 0.5, 0.25])
    k2 = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
    xb = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k2, groups=3)
    x = torch.where(blur, xb, x)
    sigma = torch.rand(n, 1, 1, 1, generator=g) * 0.12
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)


def heldout_accuracy(clf, n: int = 2000, seed: int = 12345) -> dict:
    rng = np.random.default_rng(seed)
    specs = world.random_specs(n, rng)
    x = torch.from_numpy(world.render(specs, seed=seed))
    y = labels(specs)
    clf.eval()
    with torch.no_grad():
        out = clf(x)
    return {k: float((out[k].argmax(1) == y[k]).float().mean()) for k in HEADS}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=config.CLASSIFIER_PATH)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    clf = ConceptClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.steps)
    t0 = time.time()
    for step in tqdm(range(args.steps), desc="classifier"):
        specs = world.random_specs(args.batch, rng)
        x = augment(torch.from_numpy(world.render(specs, seed=int(rng.integers(2**31)))), g)
        y = labels(specs)
        out = clf(x)
        loss = sum(F.cross_entropy(out[k], y[k]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    acc = heldout_accuracy(clf)
    print(f"held-out accuracy per head: {acc}  ({time.time() - t0:.0f} s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(args.out))
    (args.out.parent / "metrics.json").write_text(json.dumps(dict(heldout_accuracy=acc, steps=args.steps,
                                                                  seconds=round(time.time() - t0, 1)), indent=1))


if __name__ == "__main__":
    main()
