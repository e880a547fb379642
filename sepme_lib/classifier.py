"""The concept classifier (style, shape and colour heads) that turns images into the paper's ACC numbers.

Introduced in ``notebooks/00_setup_and_tour.ipynb``; used by every evaluation. Trained on world renders
with noise and blur augmentation by ``python -m sepme_lib.train_classifier``; weights in
``data/classifier/classifier.safetensors``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from . import config, world

HEADS = {"style": world.STYLES, "shape": world.SHAPES, "colour": world.COLOUR_NAMES}


class ConceptClassifier(nn.Module):
    """A small CNN: 32x32 RGB in [0, 1] -> logits per head."""

    def __init__(self, width: int = 24):
        super().__init__()
        w = width

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())

        self.body = nn.Sequential(block(3, w), nn.MaxPool2d(2), block(w, 2 * w), nn.MaxPool2d(2),
                                  block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({k: nn.Linear(4 * w, len(v)) for k, v in HEADS.items()})

    def forward(self, x):
        h = self.body(x * 2 - 1)
        return {k: head(h) for k, head in self.heads.items()}


def load_classifier(path=None, device=None) -> ConceptClassifier:
    """Load the bundled classifier; a clear error names the file and the command that recreates it."""
    path = path or config.CLASSIFIER_PATH
    if not path.exists():
        raise FileNotFoundError(f"classifier weights not found at {path}; recreate them with "
                                "`python -m sepme_lib.train_classifier` (or restore data/ from git).")
    clf = ConceptClassifier()
    clf.load_state_dict(load_file(str(path)))
    return clf.to(device or config.get_device()).eval()


@torch.no_grad()
def predict(clf: ConceptClassifier, images: torch.Tensor, batch_size: int = 256) -> dict:
    """Predicted class names per head for images in [0, 1] ``(N,3,32,32)``."""
    dev = next(clf.parameters()).device
    out = {k: [] for k in HEADS}
    for s in range(0, len(images), batch_size):
        logits = clf(images[s:s + batch_size].to(dev, torch.float32))
        for k, v in logits.items():
            out[k] += [HEADS[k][i] for i in v.argmax(1).tolist()]
    return out


def accuracy(clf: ConceptClassifier, images: torch.Tensor, head: str, target: str) -> float:
    """Fraction of ``images`` that the ``head`` classifies as ``target`` (the paper's ACC)."""
    if target not in HEADS[head]:
        raise ValueError(f"unknown {head} {target!r}; known: {', '.join(HEADS[head])}")
    pred = predict(clf, images)[head]
    return sum(p == target for p in pred) / max(1, len(pred))
