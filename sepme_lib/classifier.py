"""The judges that turn images into the paper's ACC numbers: the bundled model's concept classifier
(style, shape and colour heads) and, for Stable Diffusion, a zero-shot CLIP judge over the paper's style classes.

Introduced in ``notebooks/00_setup_and_tour.ipynb``; used by every evaluation. Both judges have
``predict(images) -> {head: [label, ...]}`` for images in [0, 1] ``(N, 3, H, W)``, so :func:`accuracy` (the fraction
of images a head assigns to a target, the paper's ACC) serves both.

* :class:`ConceptClassifier`: a small CNN trained on world renders with noise and blur augmentation by
  ``python -m sepme_lib.train_classifier``; weights in ``data/classifier/classifier.safetensors``.
* :class:`ZeroShotCLIP`: the paper trains a ResNet-18 head on images of its classes; without those images we score
  each image against one text per class with a CLIP model loaded from a local folder (or the Hugging Face cache;
  nothing is downloaded unless ``SEPME_ALLOW_DOWNLOAD=1``). The label set is the SD family's ``evaluate``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPTokenizer

from . import config, world
from .config import BadValue
from .families import family_of

HEADS = {"style": world.STYLES, "shape": world.SHAPES, "colour": world.COLOUR_NAMES}
CLIP_DEFAULT = "openai/clip-vit-large-patch14"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check_images(images) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a (N, 3, H, W) tensor in [0, 1], got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if len(images) == 0:
        raise ValueError("no images to classify")
    if not torch.isfinite(images).all():
        raise ValueError("the images contain NaN or inf values (a broken model or delta); refusing to score them, "
                         "since any label would be meaningless")
    return images


class ConceptClassifier(nn.Module):
    """A small CNN: 32x32 RGB in [0, 1] -> logits per head (``HEADS``)."""

    heads_labels = HEADS

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

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict:
        """Predicted class names per head for images in [0, 1] ``(N,3,32,32)``."""
        images = _check_images(images)
        dev = next(self.parameters()).device
        out = {k: [] for k in HEADS}
        for s in range(0, len(images), batch_size):
            logits = self(images[s:s + batch_size].to(dev, torch.float32))
            for k, v in logits.items():
                out[k] += [HEADS[k][i] for i in v.argmax(1).tolist()]
        return out


class ZeroShotCLIP:
    """Zero-shot CLIP judge with one head, ``"style"``: ``labels[k]`` is scored by the text ``texts[k]``."""

    def __init__(self, clip: CLIPModel, tokenizer, labels, texts, device):
        self.clip, self.tokenizer, self.labels, self.device = clip.to(device).eval(), tokenizer, list(labels), device
        self.heads_labels = {"style": tuple(self.labels)}
        ids = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(device)
        with torch.no_grad():
            t = clip.get_text_features(**ids)
            t = t if isinstance(t, torch.Tensor) else t.pooler_output
            self.text = F.normalize(t.float(), dim=-1)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 32) -> dict:
        images = _check_images(images)
        size = self.clip.config.vision_config.image_size
        mean = torch.tensor(CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=self.device).view(1, 3, 1, 1)
        out = []
        for s in range(0, len(images), batch_size):
            x = F.interpolate(images[s:s + batch_size].to(self.device, torch.float32), size=(size, size),
                              mode="bicubic", align_corners=False).clamp(0, 1)
            f = self.clip.get_image_features(pixel_values=(x - mean) / std)
            f = F.normalize((f if isinstance(f, torch.Tensor) else f.pooler_output).float(), dim=-1)
            out += [self.labels[i] for i in (f @ self.text.T).argmax(1).tolist()]
        return {"style": out}


def style_text(label: str) -> str:
    """The text a zero-shot judge scores a style class with (blank: a painting with no artist named)."""
    return "a painting" if label == "blank" else f"a painting in the style of {label}"


def load_clip_judge(labels, path=None, device=None) -> ZeroShotCLIP:
    """A :class:`ZeroShotCLIP` over ``labels`` from ``path`` (a local folder), ``$SEPME_CLIP`` or
    ``openai/clip-vit-large-patch14`` in the local cache; a clear error when it is not on this machine."""
    src = str(path or os.environ.get("SEPME_CLIP") or CLIP_DEFAULT)
    local = Path(src).expanduser()
    allow = os.environ.get("SEPME_ALLOW_DOWNLOAD") == "1"
    try:
        kw = {} if local.exists() else dict(local_files_only=not allow)
        clip = CLIPModel.from_pretrained(local if local.exists() else src, **kw)
        tok = CLIPTokenizer.from_pretrained(local if local.exists() else src, **kw)
    except Exception as e:  # noqa: BLE001 - re-raised with the way out
        raise RuntimeError(f"could not load the CLIP judge {src!r} ({type(e).__name__}: {str(e)[:200]}). Give a local "
                           "folder with a transformers CLIPModel and its tokenizer (path= or SEPME_CLIP), or "
                           "pre-download it with `huggingface-cli download openai/clip-vit-large-patch14`.") from e
    return ZeroShotCLIP(clip, tok, labels, [style_text(lab) for lab in labels], device or config.get_device())


def load_classifier(path=None, device=None, model=None):
    """The judge for ``model``'s family (``families.Family.judge``): the bundled CNN (default; ``path`` overrides its
    weights file) or, for Stable Diffusion, a zero-shot CLIP judge over the family's classes (``path``: a CLIP
    folder). A clear error names what is missing."""
    fam = None if model is None else family_of(model)
    if fam is not None and fam.judge == "clip":
        return load_clip_judge(fam.evaluate, path, device or model.device)
    path = Path(path or config.CLASSIFIER_PATH)
    if not path.exists():
        raise FileNotFoundError(f"classifier weights not found at {path}; recreate them with "
                                "`python -m sepme_lib.train_classifier` (or restore data/ from git).")
    if path.is_dir():
        raise BadValue(f"judge {path} is a folder; the bundled judge is one .safetensors file (a CLIP folder is for "
                       "Stable Diffusion models)")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise BadValue(f"judge {path} is not a readable safetensors file ({type(e).__name__}: {e}); it may be "
                       "truncated. Restore data/classifier from git or retrain with "
                       "`python -m sepme_lib.train_classifier`") from None
    clf = ConceptClassifier()
    try:
        clf.load_state_dict(state)
    except RuntimeError as e:
        kind = " (a sepme delta file, not a judge)" if any("attn2" in k for k in state) else ""
        raise BadValue(f"judge {path} does not hold the bundled judge's weights{kind}: {str(e).splitlines()[0]}; "
                       "pass the classifier file (data/classifier/classifier.safetensors) or leave it out") from None
    return clf.to(device or config.get_device()).eval()


def predict(clf, images: torch.Tensor) -> dict:
    """``clf.predict(images)``: predicted class names per head."""
    return clf.predict(images)


def accuracy(clf, images: torch.Tensor, head: str, target: str) -> float:
    """Fraction of ``images`` that the ``head`` classifies as ``target`` (the paper's ACC)."""
    labels = clf.heads_labels
    if head not in labels:
        raise ValueError(f"unknown head {head!r}; this judge has {list(labels)}")
    if target not in labels[head]:
        raise ValueError(f"unknown {head} {target!r}; known: {', '.join(labels[head])}")
    pred = clf.predict(images)[head]
    return sum(p == target for p in pred) / len(pred)
