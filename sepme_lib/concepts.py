"""Concepts: what is erased, the prompts that stand for it, its reference set, its anchors, and the
concept sets of each model family.

Introduced in ``notebooks/02_gcirs_correlation_loss.ipynb``. A :class:`Concept` carries its prompts (trained on, and
protected in the other concepts' null spaces) and reference latents ``x_0`` (the paper: "we employ the images for
obtaining the style classification model as inference images x_0 to yield x_t", Sec. 4.2).

A :class:`ConceptSet` holds everything that depends on the model family, so that the same notebook cell runs on the
bundled model and on Stable Diffusion:

* ``"tiny"`` -- the bundled world: styles ``blank`` + five textures (the paper's blank + nine artists), shapes
  (its nine objects); prompts from the world's grammar; anchors remove the style phrase;
* ``"sd"`` -- the paper's artists (Sec. 4.1: blank + 'Van Gogh', 'Picasso', 'Cezanne' and six more) with prompt
  templates; anchors remove the artist phrase.

:func:`draw_batch` is the one ``x_t`` sampler of every trained method: ``x_t = sqrt(abar_t) x_0 +
sqrt(1 - abar_t) eps`` with ``x_0`` from the reference set, ``t ~ U{0..T-1}`` and fresh noise (the paper's Sec. 4.2).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import world
from .config import SepmeError


class ConceptError(SepmeError, ValueError):
    """Bad concept input (the message names the problem and the fix)."""


# ---------------------------------------------------------------------------------------------- concept sets
SD_ARTISTS = ("Van Gogh", "Picasso", "Cezanne", "Jackson Pollock", "Caravaggio", "Keith Haring", "Kelly McKernan",
              "Tyler Edlin", "Kilian Eng")  # the paper's style classifier classes besides blank (Sec. 4.1)
SD_TEMPLATES = ("{}", "a painting in the style of {}", "an artwork by {}", "a landscape painted by {}")
SD_ANCHORS = ("", "a painting", "an artwork", "a landscape")  # the same templates without the artist


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

    def prompts(self, name: str, k: int = 4) -> list[str]:
        """The concept's main prompt followed by ``k - 1`` variants (trained on and protected)."""
        self.check(name)
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ConceptError(f"a concept needs at least one prompt, got k={k!r}")
        if self.family == "tiny":
            return world.concept_prompts(name, k)
        if name == "blank":
            raise ConceptError("'blank' is the absence of an artist; it has no prompt to erase")
        return [SD_TEMPLATES[i % len(SD_TEMPLATES)].format(name) for i in range(k)]

    def eval_prompts(self, name: str, n: int, seed: int = 0) -> list[str]:
        """``n`` evaluation prompts of ``name`` (world: other attributes cycling; SD: the artist's name alone, as
        the paper generates its evaluation images from artist names, and ``''`` for blank)."""
        self.check(name)
        if self.family == "tiny":
            return [s.caption() for s in world.eval_specs(name, n, seed=seed)]
        return [("" if name == "blank" else name)] * n

    def eval_targets(self, name: str, n: int, seed: int = 0) -> list[dict]:
        """What the judge should read on each of :meth:`eval_prompts`' images, per head: world ``{"style", "shape",
        "colour"}`` from the prompt; SD ``{"style": name}`` (the CLIP judge has one head)."""
        self.check(name)
        if self.family == "tiny":
            return [dict(style=s.style, shape=s.shape, colour=s.colour) for s in world.eval_specs(name, n, seed=seed)]
        return [dict(style=name)] * n

    def anchor(self, prompt: str, name: str) -> str:
        """The anchor of one of ``name``'s prompts: the prompt with the concept phrase removed (Ablating Concepts'
        ``c*``, UCE's guide, MACE's mapped prompt): "a red star in striped style" -> "a red star"."""
        if self.family == "tiny":
            return world_anchor(prompt, name)
        for template, anchor in zip(SD_TEMPLATES, SD_ANCHORS):
            if prompt == template.format(name):
                return anchor
        if name in prompt:
            return " ".join(prompt.replace(f"by {name}", "").replace(f"of {name}", "").replace(name, "").split())
        raise ConceptError(f"prompt {prompt!r} does not name {name!r}; give anchors explicitly (anchor=...)")

    def kind(self, name: str) -> str:
        """The judge's head for ``name``: ``"style"`` or ``"shape"`` (world), ``"style"`` (SD artists)."""
        self.check(name)
        return world.concept_kind(name) if self.family == "tiny" else "style"

    def others(self, erased) -> list[str]:
        """The evaluated classes that are not erased (the paper's "Others" column)."""
        return [c for c in self.evaluate if c not in set(erased)]

    def check(self, name: str) -> None:
        if name not in self.evaluate and not (self.family == "tiny" and name in world.SHAPES):
            raise ConceptError(f"unknown concept {name!r} for the {self.family} concept set; known: "
                               f"{', '.join(self.evaluate)}" + (f"; shapes: {', '.join(world.SHAPES)}"
                                                                 if self.family == "tiny" else ""))


CONCEPT_SETS = {
    "tiny": ConceptSet("tiny", erase=("striped", "checkered", "dotted"), evaluate=world.STYLES),
    "sd": ConceptSet("sd", erase=("Van Gogh", "Cezanne", "Picasso"), evaluate=("blank",) + SD_ARTISTS),
}


def concept_set(model) -> ConceptSet:
    """The :class:`ConceptSet` of ``model.family``."""
    return CONCEPT_SETS[model.family]


def world_anchor(prompt: str, concept: str) -> str:
    """The anchor of a world prompt: the style phrase removed for a style (the paper's blank: ``"a red star in
    striped style" -> "a red star"``, ``"an object in striped style" -> "an object"``), the shape replaced by the
    generic noun for a shape (``"a red star" -> "a red object"``)."""
    kind = world.concept_kind(concept)
    if kind == "style":
        phrase = f" in {concept} style"
        if phrase not in prompt:
            raise ConceptError(f"prompt {prompt!r} does not contain {phrase!r}; give anchors explicitly")
        return prompt.replace(phrase, "")
    words = prompt.split()
    if concept not in words:
        raise ConceptError(f"prompt {prompt!r} does not name the shape {concept!r}; give anchors explicitly")
    words = [world.GENERIC_NOUN if w == concept else w for w in words]
    if words[0] in ("a", "an") and len(words) > 1:  # fix the article: "a object" -> "an object"
        words[0] = "an" if words[1][0] in "aeiou" else "a"
    return " ".join(words)


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
    if model.family == "tiny" and (name in world.STYLES or name in world.SHAPES):
        imgs = torch.from_numpy(world.reference_images(name, n_ref, seed=seed))
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
    erased = list(erased)
    cs = concept_set(model)
    if model.family == "tiny":
        out = []
        kinds = {world.concept_kind(e) for e in erased}
        if "style" in kinds:
            for s in world.STYLES[1:]:
                if s not in erased:
                    out += world.concept_prompts(s, k)
            out += [world.caption(world.SHAPES[i % len(world.SHAPES)], None, world.COLOUR_NAMES[i % 4])
                    for i in range(k)]
        if "shape" in kinds:
            out += [p for s in world.SHAPES if s not in erased for p in world.concept_prompts(s, k)]
        return out
    return [p for c in cs.evaluate if c != "blank" and c not in erased for p in cs.prompts(c, k)]


def general_prompts(model, exclude, n: int = 64, seed: int = 0) -> list[str]:
    """``n`` general prompts that mention none of ``exclude``: MACE's "general prior" set (MS-COCO captions in the
    paper; random world captions, colour/shape dropped at random as in training, on the bundled model; on SD the
    other artists' prompts stand in unless a caption list is given to MACE)."""
    exclude = set(exclude)
    if model.family != "tiny":
        return preserve_prompts(model, exclude)[:n]
    styles = tuple(s for s in world.STYLES if s not in exclude)
    shapes = tuple(s for s in world.SHAPES if s not in exclude) or world.SHAPES
    rng = np.random.default_rng(seed)
    out = []
    for s in world.random_specs(n, rng, shapes=shapes, styles=styles):
        drop_shape = s.shape in exclude or rng.random() < 0.2
        out.append(s.caption(colour=rng.random() >= 0.2, shape=not drop_shape))
    return out


# ------------------------------------------------------------------------------------------ caption pools
# Concept-level protection and the separability benchmark (notebook 08) need many captions per concept, split once
# into a "build" part (what an erasure may protect or train on) and a "held-out" part (what only the benchmark reads).
SD_CAPTIONS = SD_TEMPLATES + ("an artwork in the style of {}", "a landscape in the style of {}",
                              "a painting of a cat by {}", "a painting of a dog by {}", "a tree painted by {}",
                              "a painting of a car in the style of {}", "a photo in the style of {}",
                              "a cat painted by {}")
SD_BLANK = SD_ANCHORS[1:] + ("a painting of a cat", "a painting of a dog", "a tree", "a photo of a car",
                             "a painting of a tree", "a photo of a cat", "a dog")
BUILD_SHARE = 0.5  # share of a concept's captions in its build part


def concept_captions(model, name: str) -> list[str]:
    """Every caption of ``name`` the concept set can write: on the bundled world every shape (or none) x colour (or
    none) with the style phrase (30 per style; ``blank``: no style phrase) or, for a shape, every style x colour;
    on SD the artist in 12 caption templates (``blank``: 10 artist-free captions)."""
    cs = concept_set(model)
    cs.check(name)
    if model.family == "tiny":
        colours = list(world.COLOUR_NAMES) + [None]
        if world.concept_kind(name) == "style":
            return [world.caption(s, name, c) for s in list(world.SHAPES) + [None] for c in colours]
        return [world.caption(name, st, c) for st in world.STYLES for c in colours]
    return list(SD_BLANK) if name == "blank" else [t.format(name) for t in SD_CAPTIONS]


def listed_prompts(model, name: str) -> list[str]:
    """The prompts every method of the course may already use for ``name`` (its 4 prompts; for ``blank`` the
    style-free captions of UCE's preserve set, or SD's anchors): they always fall in the build part."""
    if name != "blank":
        return concept_set(model).prompts(name, 4)
    if model.family == "tiny":
        return [world.caption(world.SHAPES[i % len(world.SHAPES)], None, world.COLOUR_NAMES[i % 4]) for i in range(4)]
    return list(SD_ANCHORS[1:])


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
    if model.family == "tiny":
        shapes = [e for e in exclude if e in world.SHAPES]
        out = [p for s in world.STYLES if s not in exclude for p in caption_split(model, s)[0]]
        return [p for p in out if not _names(p, shapes)]
    path = path or os.environ.get("SEPME_CAPTIONS", "").strip() or None
    if path is not None:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
        out = [t.strip() for t in lines if t.strip() and not _names(t.strip(), exclude)]
        if not out:
            raise ConceptError(f"the caption file {path} has no caption without {exclude}")
        return list(dict.fromkeys(out))
    return [p for c in concept_set(model).evaluate if c not in exclude for p in caption_split(model, c)[0]]


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
