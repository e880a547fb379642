"""The synthetic world: procedural 32x32 images of shapes x styles x colours, with captions.

Introduced in ``notebooks/00_setup_and_tour.ipynb``. The world stands in for the paper's two experiments:

* **styles** (the paper's "blank + nine artists"): ``blank`` plus five textures. A caption without a style
  phrase means ``blank``, exactly as a prompt without an artist name means "no artist" in the paper.
* **shapes** (the paper's "nine objects"): five centred shapes with small jitter.

Everything is vectorised numpy over a batch, deterministic by seed, and renders several thousand images
per second on one core (``python -m sepme_lib.bench world``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 32
SHAPES = ("circle", "square", "triangle", "star", "cross")
STYLES = ("blank", "striped", "checkered", "dotted", "outline", "gradient")
COLOURS = {
    "red": (0.86, 0.16, 0.16),
    "green": (0.13, 0.60, 0.22),
    "blue": (0.16, 0.27, 0.86),
    "purple": (0.58, 0.20, 0.70),
}
COLOUR_NAMES = tuple(COLOURS)
GENERIC_NOUN = "object"  # used when a caption drops the shape: "a red object in striped style"
VOCABULARY = tuple(sorted(set(SHAPES + STYLES[1:] + COLOUR_NAMES + ("a", "an", "in", "style", GENERIC_NOUN))))


@dataclass(frozen=True)
class Spec:
    """One world image: its shape, style and colour names."""

    shape: str
    style: str
    colour: str

    def caption(self, colour: bool = True, shape: bool = True) -> str:
        return caption(self.shape if shape else None, self.style, self.colour if colour else None)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(shape: str | None, style: str | None, colour: str | None) -> str:
    """Caption in the world's grammar: ``a [colour] <shape|object>[ in <style> style]``.

    ``style`` of ``None`` or ``"blank"`` writes no style phrase (the paper's blank column).
    """
    noun = shape or GENERIC_NOUN
    words = ([colour] if colour else []) + [noun]
    text = f"{_article(words[0])} {' '.join(words)}"
    if style and style != "blank":
        text += f" in {style} style"
    return text


def check_names(kind: str, names) -> list[str]:
    """Return ``names`` as a list, raising a clear error for any name the world does not know."""
    known = {"shape": SHAPES, "style": STYLES, "colour": COLOUR_NAMES}[kind]
    names = [names] if isinstance(names, str) else list(names)
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown {kind} name(s) {bad}; known {kind}s are: {', '.join(known)}")
    return names


def concept_kind(name: str) -> str:
    """``"style"`` or ``"shape"`` for a concept name of the world; a clear error otherwise."""
    if name in STYLES:
        return "style"
    if name in SHAPES:
        return "shape"
    raise ValueError(f"unknown concept {name!r}; known styles: {', '.join(STYLES)}; known shapes: {', '.join(SHAPES)}")


def concept_prompt(name: str) -> str:
    """The single prompt that stands for a concept (its embedding is what the null spaces protect).

    Styles: ``"an object in striped style"``; shapes: ``"a star"``; ``blank`` has no prompt of its own.
    """
    kind = concept_kind(name)
    if kind == "style":
        if name == "blank":
            raise ValueError("'blank' is the absence of a style phrase; it has no prompt to erase")
        return caption(None, name, None)
    return caption(name, None, None)


def concept_prompts(name: str, k: int = 4) -> list[str]:
    """The concept's main prompt followed by ``k - 1`` full captions of it with other attributes cycling
    (``"an object in striped style", "a red circle in striped style", "a green square in striped style"``)."""
    first = concept_prompt(name)
    if k < 1:
        raise ValueError(f"a concept needs at least one prompt, got k={k}")
    kind = concept_kind(name)
    out = [first]
    for i in range(k - 1):
        colour = COLOUR_NAMES[i % len(COLOUR_NAMES)]
        if kind == "style":
            out.append(caption(SHAPES[i % len(SHAPES)], name, colour))
        else:
            out.append(caption(name, STYLES[1 + i % (len(STYLES) - 1)], colour))
    return out


def eval_specs(concept: str, n: int, seed: int = 0) -> list[Spec]:
    """``n`` specs that show ``concept`` with the other attributes cycling (for evaluation prompts)."""
    kind = concept_kind(concept)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        colour = COLOUR_NAMES[i % len(COLOUR_NAMES)]
        if kind == "style":
            out.append(Spec(SHAPES[(i // len(COLOUR_NAMES)) % len(SHAPES)], concept, colour))
        else:
            style = STYLES[(i // len(COLOUR_NAMES)) % len(STYLES)]
            out.append(Spec(concept, style, colour))
    rng.shuffle(out)
    return out


def random_specs(n: int, rng: np.random.Generator, shapes=SHAPES, styles=STYLES, colours=COLOUR_NAMES) -> list[Spec]:
    s = rng.integers(len(shapes), size=n)
    t = rng.integers(len(styles), size=n)
    c = rng.integers(len(colours), size=n)
    return [Spec(shapes[i], styles[j], colours[k]) for i, j, k in zip(s, t, c)]


# ---------------------------------------------------------------------------------------------- rendering
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5


def _box(u, v, a, b):
    return np.maximum(np.abs(u) - a, np.abs(v) - b)


def _convex(u, v, pts):
    """Signed distance (exact inside, approximate outside) to the convex polygon with vertices ``pts``."""
    gx = sum(p[0] for p in pts) / len(pts)
    gy = sum(p[1] for p in pts) / len(pts)
    d = None
    for k in range(len(pts)):
        (x0, y0), (x1, y1) = pts[k], pts[(k + 1) % len(pts)]
        nx, ny = y1 - y0, x0 - x1
        ln = np.hypot(nx, ny)
        if (gx - x0) * nx + (gy - y0) * ny > 0:  # make the normal point away from the centroid
            nx, ny = -nx, -ny
        dk = ((u - x0) * nx + (v - y0) * ny) / ln
        d = dk if d is None else np.maximum(d, dk)
    return d


def _star_parts():
    outer, inner = 1.08, 0.5
    ang = [-np.pi / 2 + k * 2 * np.pi / 5 for k in range(5)]
    o = [(outer * np.cos(a), outer * np.sin(a)) for a in ang]
    i = [(inner * np.cos(a + np.pi / 5), inner * np.sin(a + np.pi / 5)) for a in ang]
    parts = [[(1.15 * x, 1.15 * y) for x, y in i]]  # the central pentagon, enlarged to overlap the points
    for k in range(5):
        parts.append([i[k - 1], o[k], i[k]])  # one point of the star
    return parts


_STAR = _star_parts()
_TRI = [(0.0, -1.0), (0.95, 0.72), (-0.95, 0.72)]


def _sdf(shape: str, u, v, r):
    """Signed distance in pixels; ``u, v`` are offsets from the centre in units of the radius ``r``."""
    if shape == "circle":
        d = np.hypot(u, v) - 0.92
    elif shape == "square":
        d = _box(u, v, 0.8, 0.8)
    elif shape == "triangle":
        d = _convex(u, v, _TRI)
    elif shape == "star":
        d = np.minimum.reduce([_convex(u, v, p) for p in _STAR])
    elif shape == "cross":
        d = np.minimum(_box(u, v, 0.95, 0.32), _box(u, v, 0.32, 0.95))
    else:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")
    return d * r


def render(specs, seed: int = 0, jitter: float = 2.0) -> np.ndarray:
    """Render ``specs`` to a float32 array ``(N, 3, 32, 32)`` in [0, 1]; deterministic in ``(specs, seed)``."""
    specs = list(specs)
    n = len(specs)
    rng = np.random.default_rng(seed)
    cx = SIZE / 2 + rng.uniform(-jitter, jitter, n).astype(np.float32)
    cy = SIZE / 2 + rng.uniform(-jitter, jitter, n).astype(np.float32)
    r = rng.uniform(10.0, 12.0, n).astype(np.float32)
    bg = (0.92 + rng.uniform(-0.04, 0.04, (n, 3))).astype(np.float32)
    out = np.empty((n, 3, SIZE, SIZE), np.float32)
    out[:] = bg[:, :, None, None]
    X = _XX[None]
    Y = _YY[None]
    shapes = np.array([s.shape for s in specs])
    styles = np.array([s.style for s in specs])
    for name in SHAPES:
        idx = np.nonzero(shapes == name)[0]
        if idx.size == 0:
            continue
        rr = r[idx, None, None]
        u = (X - cx[idx, None, None]) / rr
        v = (Y - cy[idx, None, None]) / rr
        d = _sdf(name, u, v, rr)
        alpha = np.clip(0.5 - d, 0.0, 1.0)
        # outline: keep a 2.5-pixel rim of the shape only
        ol = styles[idx] == "outline"
        if ol.any():
            alpha[ol] = alpha[ol] - np.clip(0.5 - (d[ol] + 2.5), 0.0, 1.0)
        top = cy[idx, None, None] - rr
        grad_t = np.clip((Y - top) / (2 * rr), 0.0, 1.0)
        for j, i in enumerate(idx):
            col = np.array(COLOURS[specs[i].colour], np.float32)[:, None, None]
            fill = _texture(specs[i].style, col, grad_t[j])
            a = alpha[j][None]
            out[i] = out[i] * (1 - a) + fill * a
    return out


def _texture(style: str, col: np.ndarray, grad_t: np.ndarray) -> np.ndarray:
    pale = 0.25 * col + 0.75
    if style in ("blank", "outline"):
        return np.broadcast_to(col, (3, SIZE, SIZE))
    if style == "striped":
        m = ((_YY // 3) % 2 == 0)[None]
    elif style == "checkered":
        m = ((_XX // 4 + _YY // 4) % 2 == 0)[None]
    elif style == "dotted":
        m = (((_XX % 6) - 3.0) ** 2 + ((_YY % 6) - 3.0) ** 2 < 2.0**2)[None]
    elif style == "gradient":
        t = grad_t[None]
        return col * (1 - t) + pale * t
    else:
        raise ValueError(f"unknown style {style!r}; known styles: {', '.join(STYLES)}")
    return np.where(m, col, pale)


def sample_batch(n: int, rng: np.random.Generator, p_drop_colour=0.2, p_drop_shape=0.2, p_empty=0.1):
    """A training batch: images in [-1, 1] ``(n,3,32,32)`` and captions (some partial, some empty).

    Colour and shape words are dropped at random so that partial prompts ("a star", "an object in striped
    style") mean something; the style phrase is never dropped, since its absence means ``blank``.
    """
    specs = random_specs(n, rng)
    imgs = render(specs, seed=int(rng.integers(2**31))) * 2 - 1
    caps = []
    for s in specs:
        if rng.random() < p_empty:
            caps.append("")
        else:
            caps.append(s.caption(colour=rng.random() >= p_drop_colour, shape=rng.random() >= p_drop_shape))
    return imgs, caps, specs


def reference_images(concept: str, n: int, seed: int = 0) -> np.ndarray:
    """World renders of ``concept`` in [-1, 1]: the x_0 reference set of the erasure losses (``concepts.make_concept``)."""
    kind = concept_kind(concept)
    rng = np.random.default_rng(seed)
    if kind == "style":
        specs = random_specs(n, rng, styles=(concept,))
    else:
        specs = random_specs(n, rng, shapes=(concept,))
    return render(specs, seed=seed) * 2 - 1
