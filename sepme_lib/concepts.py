"""Concepts: what is erased, the prompts that stand for it, its reference set, its anchors, and the
concept sets of each model family.

Introduced in ``notebooks/02_gcirs_correlation_loss.ipynb``. A :class:`Concept` carries its prompts (trained on, and
protected in the other concepts' null spaces) and reference latents ``x_0`` (the paper: "we employ the images for
obtaining the style classification model as inference images x_0 to yield x_t", Sec. 4.2).

A :class:`ConceptSet` is the concept part of a model family (``families.FAMILIES``: the bundled world's styles and
shapes, or the paper's artists in prompt templates), so that the same notebook cell runs on the bundled model and on
Stable Diffusion; the functions below (preserve sets, caption pools, priors) read the family's entry, never its name.

:func:`draw_batch` is the one ``x_t`` sampler of every trained method: ``x_t = sqrt(abar_t) x_0 +
sqrt(1 - abar_t) eps`` with ``x_0`` from the reference set, ``t ~ U{0..T-1}`` and fresh noise (the paper's Sec. 4.2).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import families
from .families import (  # noqa: F401 (notebooks and tests read concepts.SD_TEMPLATES, concepts.world_anchor)
    SD_ANCHORS,
    SD_ARTISTS,
    SD_BLANK,
    SD_CAPTIONS,
    SD_TEMPLATES,
    ConceptError,
    world_anchor,
)


# ---------------------------------------------------------------------------------------------- concept sets
@dataclass(frozen=True)
class ConceptSet:
    """The concepts of one model family and how to prompt, anchor and evaluate them.

    ``erase``: the three concepts the course erases (the paper's concepts 1-3: Van Gogh, Cezanne, Picasso, in that
    order); ``evaluate``: every class whose ACC the tables report (``blank`` first).
    """

    family: str
    erase: tuple
    evaluate: tuple
    head: str = "style"

    @property
    def _family(self) -> families.Family:
        return families.get(self.family)

    def prompts(self, name: str, k: int = 4) -> list[str]:
        """The concept's main prompt followed by ``k - 1`` variants (trained on and protected)."""
        return self._family.prompts(name, k)

    def eval_prompts(self, name: str, n: int, seed: int = 0) -> list[str]:
        """``n`` evaluation prompts of ``name`` (world: other attributes cycling; SD: the artist's name alone, as
        the paper generates its evaluation images from artist names, and ``''`` for blank)."""
        return self._family.eval_prompts(name, n, seed=seed)

    def eval_targets(self, name: str, n: int, seed: int = 0) -> list[dict]:
        """What the judge should read on each of :meth:`eval_prompts`' images, per head: world ``{"style", "shape",
        "colour"}`` from the prompt; SD ``{"style": name}`` (the CLIP judge has one head)."""
        return self._family.eval_targets(name, n, seed=seed)

    def anchor(self, prompt: str, name: str) -> str:
        """The anchor of one of ``name``'s prompts: the prompt with the concept phrase removed (Ablating Concepts'
        ``c*``, UCE's guide, MACE's mapped prompt): "a red star in striped style" -> "a red star"."""
        return self._family.anchor(prompt, name)

    def kind(self, name: str) -> str:
        """The judge's head for ``name``: ``"style"`` or ``"shape"`` (world), ``"style"`` (SD artists)."""
        return self._family.kind(name)

    def others(self, erased) -> list[str]:
        """The evaluated classes that are not erased (the paper's "Others" column)."""
        return [c for c in self.evaluate if c not in set(erased)]

    def knows(self, name: str) -> bool:
        """Whether ``name`` is a concept of the set (an evaluated class or, on the bundled world, a shape)."""
        return self._family.knows(name)

    def check(self, name: str) -> None:
        self._family.check(name)


class _ConceptSets(Mapping):
    """``CONCEPT_SETS[name]``: the :class:`ConceptSet` of every registered family (``families.FAMILIES``)."""

    def __getitem__(self, name: str) -> ConceptSet:
        f = families.get(name)
        return ConceptSet(f.name, erase=f.erase, evaluate=f.evaluate)

    def __iter__(self):
        return iter(families.FAMILIES)

    def __len__(self) -> int:
        return len(families.FAMILIES)


CONCEPT_SETS = _ConceptSets()


def concept_set(model) -> ConceptSet:
    """The :class:`ConceptSet` of ``model.family``."""
    return CONCEPT_SETS[families.family_of(model).name]


# ------------------------------------------------------------------------------------------------ concepts
@dataclass
class Concept:
    """A concept to erase: its name, the prompts that stand for it, and reference latents ``x_0``.

    ``prompts[0]`` is the main prompt (``.prompt``); further prompts are variants (other shapes, colours, templates)
    that the erasure trains on and that the other concepts' null spaces protect. ``latents``: ``(N, C, H, W)`` in
    the UNet's input space.
    """

    name: str
    prompts: list
    latents: torch.Tensor
    emb: torch.Tensor | None = field(default=None, repr=False)
    # robust SepME (notebook 09): conditions the edited model reads in place of ``emb``'s rows (attack embeddings,
    # each paired with the prompt it imitates); ``None``: the edited model reads ``emb`` as the frozen one does
    edit_emb: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        self.prompts = [self.prompts] if isinstance(self.prompts, str) else list(self.prompts)
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConceptError(f"a concept needs a non-empty name, got {self.name!r}")
        if not self.prompts:
            raise ConceptError(f"concept {self.name!r} needs at least one prompt")
        if any(not isinstance(p, str) or not p.strip() for p in self.prompts):
            raise ConceptError(f"concept {self.name!r} has an empty prompt in {self.prompts}: the empty prompt is c_0, "
                               "which every null space protects, so erasing it would do nothing")
        if not isinstance(self.latents, torch.Tensor) or self.latents.dim() != 4 or len(self.latents) == 0:
            raise ConceptError(f"concept {self.name!r} needs reference latents (N, C, H, W) with N >= 1, got "
                               f"{tuple(self.latents.shape) if isinstance(self.latents, torch.Tensor) else self.latents!r:.60}")
        if self.edit_emb is not None and (self.emb is None or self.edit_emb.shape != self.emb.shape):
            raise ConceptError(f"concept {self.name!r}: edit_emb needs emb of the same shape (one frozen condition per "
                               "edited one)")
        if not torch.isfinite(self.latents).all():
            raise ConceptError(f"concept {self.name!r}: its reference latents hold NaN or inf values; make them with "
                               "model.to_latent(images) from finite images in [-1, 1]")

    @property
    def prompt(self) -> str:
        return self.prompts[0]

    def embedding(self, model) -> torch.Tensor:
        """Embeddings of all the concept's prompts, ``(k, L, d_in)`` (cached)."""
        if self.emb is None:
            self.emb = model.embed(self.prompts)
        return self.emb


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConceptError(f"{name} must be a whole number >= 1, got {value!r}")
    return int(value)


def make_concept(model, name: str, prompt=None, n_ref: int = 64, seed: int = 0, n_prompts: int = 4,
                 steps: int | None = None) -> Concept:
    """A :class:`Concept` with its reference set (notebook 02).

    ``prompt`` (a string or a list) overrides the concept set's prompts. ``x_0``: on the bundled model, world renders
    of the concept; otherwise ``n_ref`` images the original model generates from the concept's first prompt (the
    paper's reference images are generated by the original model too) with ``steps`` DDIM steps (default: the
    model's ``sample_steps``; the notebooks pass their profile's ``sample_steps``).
    """
    n_ref, n_prompts = _positive("n_ref", n_ref), _positive("n_prompts", n_prompts)
    cs = concept_set(model)
    if prompt is None:
        prompts = cs.prompts(name, n_prompts)
    else:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    rendered = families.family_of(model).reference_images(name, n_ref, seed=seed)
    if rendered is not None:
        imgs = torch.from_numpy(rendered)
    else:
        imgs = model.sample([prompts[0]] * n_ref, seeds=range(seed, seed + n_ref), steps=steps) * 2 - 1
    return Concept(name, prompts, model.to_latent(imgs))


def make_concepts(model, names, n_ref: int = 64, seed: int = 0, n_prompts: int = 4,
                  steps: int | None = None) -> list[Concept]:
    """Concepts of the model's concept set by name, each with ``n_prompts`` prompts and ``n_ref`` references
    (generated with ``steps`` DDIM steps when the model has no world renderer: :func:`make_concept`)."""
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ConceptError("no concept names given; e.g. make_concepts(model, concept_set(model).erase)")
    if len(set(names)) != len(names):
        raise ConceptError(f"concept names repeat: {names}")
    return [make_concept(model, n, n_ref=n_ref, seed=seed + 1000 * k, n_prompts=n_prompts, steps=steps)
            for k, n in enumerate(names)]


def as_concepts(model, concepts, n_ref: int = 64) -> list[Concept]:
    """``concepts`` (Concept objects and/or names of the model's concept set) as a list of :class:`Concept`."""
    if not isinstance(concepts, (str, Concept)) and (isinstance(concepts, (bytes, dict)) or
                                                     not hasattr(concepts, "__iter__")):
        raise ConceptError(f"concepts must be concept names or Concept objects (or a list of them), got "
                           f"{type(concepts).__name__} {concepts!r:.40}")
    concepts = [concepts] if isinstance(concepts, (str, Concept)) else list(concepts)
    if not concepts:
        raise ConceptError("no concepts given; pass make_concepts(model, [...]) or concept names")
    bad = [c for c in concepts if not isinstance(c, (str, Concept))]
    if bad:
        raise ConceptError(f"concepts must be Concept objects or names, got {type(bad[0]).__name__}")
    names = [c for c in concepts if isinstance(c, str)]
    made = iter(make_concepts(model, names, n_ref=n_ref) if names else [])
    out = [next(made) if isinstance(c, str) else c for c in concepts]
    seen = [c.name for c in out]
    if len(set(seen)) != len(seen):
        raise ConceptError(f"concept names repeat: {seen}")
    for c in out:
        if tuple(c.latents.shape[1:]) != tuple(model.latent_shape):
            raise ConceptError(f"concept {c.name!r}: reference latents of shape {tuple(c.latents.shape)}, but this "
                               f"model's latents are (N, {', '.join(map(str, model.latent_shape))}); make them with "
                               "model.to_latent(images)")
    return out


def prompt_list(value, what: str) -> list[str]:
    """``value`` (a prompt or a list of prompts) as a list of strings; ``what`` names the argument in errors."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (bytes, dict)) or not hasattr(value, "__iter__"):
        raise ConceptError(f"{what} must be a prompt or a list of prompts, got {type(value).__name__} {value!r:.60}")
    value = list(value)
    bad = [p for p in value if not isinstance(p, str)]
    if bad:
        raise ConceptError(f"{what} must hold prompt strings, got {type(bad[0]).__name__} {bad[0]!r:.60}")
    return value


def check_clashes(model, concepts, protected=(), what: str = "protect=", kind: str = "protected") -> None:
    """Refuse, before any work, a prompt erased by two concepts, or both erased and protected (``what`` names the
    protected set), compared by the token ids the model embeds (the tokenizer lower-cases and collapses spaces, so
    ``'AN OBJECT IN STRIPED STYLE'`` is ``'an object in striped style'``): the increment could not change it."""
    owner: dict = {}
    for c in concepts:
        for p in c.prompts:
            ids = tuple(model.token_ids(p))
            if ids in owner and owner[ids][0] != c.name:
                raise ConceptError(f"concepts {owner[ids][0]!r} and {c.name!r} both erase the prompt {p!r} (= "
                                   f"{owner[ids][1]!r} for the tokenizer): each one's increment would protect it "
                                   "from the other. Give each concept its own prompts, or merge them into one concept")
            owner.setdefault(ids, (c.name, p))
    for q in protected:
        ids = tuple(model.token_ids(q)) if q else None
        if ids in owner:
            raise ConceptError(f"the prompt {owner[ids][1]!r} of concept {owner[ids][0]!r} is both erased and {kind}: "
                               f"{what} holds {q!r} (the same tokens), so the increment could not change it. Remove "
                               f"it from {what} (or from the concept's prompts)")


# ------------------------------------------------------------------------------------------ prompt sets
def anchors_for(model, concept: Concept, anchor=None) -> list[str]:
    """One anchor prompt per prompt of ``concept``: ``anchor`` (a string for all, or a list aligned with
    ``concept.prompts``), else the concept set's anchor rule (:meth:`ConceptSet.anchor`)."""
    if anchor is None:
        cs = concept_set(model)
        try:
            return [cs.anchor(p, concept.name) for p in concept.prompts]
        except (ConceptError, ValueError) as e:
            raise ConceptError(f"concept {concept.name!r} needs anchor prompts on {model.name!r} ({e}); pass "
                               "anchor='a painting' (one for all prompts) or one per prompt") from None
    if isinstance(anchor, str):
        return [anchor] * len(concept.prompts)
    anchor = prompt_list(anchor, "anchor")
    if len(anchor) != len(concept.prompts):
        raise ConceptError(f"{len(anchor)} anchors for the {len(concept.prompts)} prompts of {concept.name!r}; give "
                           "one anchor string, or one per prompt")
    return anchor


def preserve_prompts(model, erased, k: int = 4) -> list[str]:
    """The default preserve set of UCE, RECE and MACE: ``k`` prompts of every concept of the same kind that is not
    erased, plus (bundled world) captions without a style phrase (the blank style)."""
    return families.family_of(model).preserve_prompts(list(erased), k)


def general_prompts(model, exclude, n: int = 64, seed: int = 0) -> list[str]:
    """``n`` general prompts that mention none of ``exclude``: MACE's "general prior" set (MS-COCO captions in the
    paper; random world captions, colour/shape dropped at random as in training, on the bundled model; on SD the
    other artists' prompts stand in unless a caption list is given to MACE)."""
    return families.family_of(model).general_prompts(set(exclude), n, seed)


# ------------------------------------------------------------------------------------------ caption pools
# Concept-level protection and the separability benchmark (notebook 08) need many captions per concept, split once
# into a "build" part (what an erasure may protect or train on) and a "held-out" part (what only the benchmark reads).
BUILD_SHARE = 0.5  # share of a concept's captions in its build part


def concept_captions(model, name: str) -> list[str]:
    """Every caption of ``name`` the concept set can write: on the bundled world every shape (or none) x colour (or
    none) with the style phrase (30 per style; ``blank``: no style phrase) or, for a shape, every style x colour;
    on SD the artist in 12 caption templates (``blank``: 10 artist-free captions)."""
    fam = families.family_of(model)
    fam.check(name)
    return fam.concept_captions(name)


def listed_prompts(model, name: str) -> list[str]:
    """The prompts every method of the course may already use for ``name`` (its 4 prompts; for ``blank`` the
    style-free captions of UCE's preserve set, or SD's anchors): they always fall in the build part."""
    if name != "blank":
        return concept_set(model).prompts(name, 4)
    return families.family_of(model).blank_prompts()


def caption_split(model, name: str, seed: int = 0) -> tuple[list[str], list[str]]:
    """``(build, held_out)`` captions of ``name`` (:func:`concept_captions`): the listed prompts plus a seeded
    shuffle of the rest fill :data:`BUILD_SHARE` of them; the others are held out. The same on every call, for
    every method: an erasure protects or trains on build captions only, the separability benchmark scores held-out
    ones (notebook 08)."""
    caps = concept_captions(model, name)
    listed = [p for p in listed_prompts(model, name) if p in caps]
    rest = [p for p in caps if p not in listed]
    order = np.random.default_rng([seed, sum(ord(ch) * 31 ** i for i, ch in enumerate(name)) % 2**31]).permutation(
        len(rest))
    rest = [rest[i] for i in order]
    k = max(0, round(len(caps) * BUILD_SHARE) - len(listed))
    return listed + rest[:k], rest[k:]


def _names(text: str, names) -> bool:
    low = f" {text.lower()} "
    return any(f" {n.lower()} " in low for n in names)


def prior_captions(model, exclude, path=None) -> list[str]:
    """The general prior of concept-level protection (SepME ``protection="concept"``, SPEED): build captions of
    every concept of the set except ``exclude`` (on the bundled world, of every style incl. ``blank``: every
    caption has one style). On SD, the lines of a caption file (``path`` or ``$SEPME_CAPTIONS``, e.g. MS-COCO
    captions, one per line) that name none of ``exclude`` as a whole word (SPEED's filter), else the build captions
    of the other artists and of ``blank``."""
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    fam = families.family_of(model)
    path = (path or os.environ.get("SEPME_CAPTIONS", "").strip() or None) if fam.caption_file else None
    if path is not None:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
        out = [t.strip() for t in lines if t.strip() and not _names(t.strip(), exclude)]
        if not out:
            raise ConceptError(f"the caption file {path} has no caption without {exclude}")
        return list(dict.fromkeys(out))
    extra = [e for e in exclude if e in fam.extra]  # world shapes: no caption of the prior names them
    out = [p for c in fam.evaluate if c not in exclude for p in caption_split(model, c)[0]]
    return [p for p in out if not _names(p, extra)]


# ------------------------------------------------------------------------------------------ x_t sampler
def draw_batch(model, latents: torch.Tensor, embeddings: torch.Tensor, batch: int, gen: torch.Generator):
    """One training batch of a concept: ``(x_t, t, c, j)``.

    ``x_0`` = ``batch`` reference latents drawn with replacement, ``t ~ U{0..T-1}``, fresh noise ``eps``,
    ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (the forward process, notebook 01), and for each image one of
    the concept's prompt embeddings ``c = embeddings[j]``. Every random number comes from ``gen`` (on the CPU) in
    this order, so a run is reproducible on any device.
    """
    z0 = latents[torch.randint(0, len(latents), (batch,), generator=gen)]
    t = torch.randint(0, model.num_train_timesteps, (batch,), generator=gen)
    noise = torch.randn(z0.shape, generator=gen)
    t = t.to(model.device)
    x_t = model.add_noise(z0, noise.to(model.device), t)
    j = torch.randint(0, len(embeddings), (batch,), generator=gen)
    return x_t, t, embeddings[j], j
