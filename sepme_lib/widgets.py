"""The interactive combination widget -- ``theta + sum_i s_i dTheta_i`` with live ACC and leakage.

Introduced in ``notebooks/05_interactive_combination.ipynb``. SepME's increments are separable (paper
Sec. 3.2, Eqs. 5-10): because ``A_j dW_i^T = 0`` for every concept ``j != i`` (Eq. 7, the null-space
property), the combined model ``theta + sum_{i in S} s_i dTheta_i`` (the paper's evaluation, Sec. 4,
"DMs with theta + sum_{i in {j,k}} dTheta_i eliminate c_j and c_k") acts on concept ``j``'s prompts exactly like
``theta + s_j dTheta_j`` when ``j`` is in ``S`` and like ``theta`` when it is not. The widget lets you switch
each ``dTheta_i`` on and off, set its strength ``s_i``, pick a prompt and a seed, and see the images, the
classifier's ACC on them and the leakage certificate ``||A dW^T|| / ||A W^T||`` (``nullspace.leakage``) of the
combined increment on the prompt, on ``c_0`` and on the concepts that are switched off.

All logic is in plain functions, unit-tested in ``tests/test_widgets.py``:

* :func:`scales_from_controls` -- checkboxes + sliders -> the scales ``s_i`` (0 when unchecked);
* :func:`prompt_targets` -- which style/shape/colour a world prompt asks for (what ACC is measured against);
* :func:`render_state` -- sample the grid of the combined model, classify it, measure leakage and time;
* :func:`render_comparison` -- the same plus the original model's images (cached) and their perceptual
  distance (``perceptual.perceptual_distance``: LPIPS when its weights are on disk, else 1-SSIM);
* :func:`format_readout`, :func:`grid_image`, :func:`png_bytes` -- the readout text and the PNG grids;
* :func:`benchmark_refresh` -- measures the widget's refresh time and prints it.

:class:`CombinationWidget` only wires ipywidgets controls to these functions.

Refresh time (measured with :func:`benchmark_refresh`, 4 images, on a shared 2-core CPU while other jobs kept its
load average at 5-6): ``WIDGET_STEPS = 8`` DDIM steps -> 1.4-1.5 s per refresh with one torch thread (sampling is
~85% of it; leakage, classifier and PNGs ~0.2 s); 10 steps -> 2.1 s; at 20 steps sampling alone took 2.3-2.4 s.
With two torch threads on that overloaded machine a refresh took 16-35 s (thread oversubscription): on a shared
CPU set ``SEPME_THREADS=1`` (``config.set_threads``); ``python -m sepme_lib.bench widgets`` with the bundled increments
then measured 0.55-0.73 s per refresh (one thread, the other core busy), 1.4-2.5 s with two threads. The classifier's
ACC of the bundled model's concepts is 1.00 at 6, 8, 10 and 20 steps, so 8 steps lose nothing visible. Pass
``steps=`` to trade speed for quality; on a GPU any step count is interactive.
"""
from __future__ import annotations

import html
import io
import math
import statistics
import time

import ipywidgets as W
import numpy as np
import torch
from IPython.display import display
from PIL import Image

from . import world
from .classifier import HEADS, predict
from .deltas import combine, edited_weights
from .nullspace import leakage
from .perceptual import perceptual_distance

WIDGET_STEPS = 8       # DDIM steps per refresh (see the module docstring for the measurement)
WIDGET_GUIDANCE = None  # None -> the model's own guidance (config.TINY_GUIDANCE for the bundled model)
SCALE_RANGE = (-1.0, 2.0)
UPSCALE = 4            # 32x32 images are shown 128x128 (nearest neighbour)


# ------------------------------------------------------------------------------------------ controls
def _value(x):
    return getattr(x, "value", x)


def scales_from_controls(checks, sliders) -> list[float]:
    """The scales ``s_i`` of ``theta + sum_i s_i dTheta_i``: slider value where the checkbox is on, else 0.

    ``checks``/``sliders``: sequences of booleans/numbers, or of ipywidgets whose ``.value`` is one.
    """
    checks, sliders = list(checks), list(sliders)
    if len(checks) != len(sliders):
        raise ValueError(f"{len(checks)} checkboxes but {len(sliders)} sliders; give one of each per delta")
    out = []
    for i, (c, s) in enumerate(zip(checks, sliders)):
        c, s = _value(c), _value(s)
        if not isinstance(c, (bool, np.bool_)):
            raise TypeError(f"checkbox {i} has value {c!r}; expected True or False")
        try:
            s = float(s)
        except (TypeError, ValueError):
            raise TypeError(f"slider {i} has value {s!r}; expected a number (the strength s_{i})") from None
        if not math.isfinite(s):
            raise ValueError(f"slider {i} has a non-finite strength {s}; use a finite number")
        out.append(s if c else 0.0)
    return out


def default_prompts(deltas, extra: int = 2) -> list[str]:
    """Prompt choices for the widget: one evaluation prompt per delta that names a world concept, then
    ``extra`` prompts of world concepts that no delta erases (to see that they stay put)."""
    names = [d.name for d in deltas]
    out = []
    for n in names:
        try:
            out.append(world.eval_specs(n, 1)[0].caption())
        except ValueError:  # not a world concept (e.g. a Stable Diffusion delta): no default prompt for it
            continue
    kinds = {world.concept_kind(n) for n in names if n in world.STYLES or n in world.SHAPES} or {"style"}
    pool = [c for k in sorted(kinds) for c in (world.STYLES[1:] if k == "style" else world.SHAPES) if c not in names]
    for c in pool[:extra]:
        out.append(world.eval_specs(c, 1)[0].caption())
    return out


def prompt_targets(prompt: str) -> dict:
    """``{head: class or None}`` that a world prompt asks for: ``"a red star in striped style"`` ->
    ``{"style": "striped", "shape": "star", "colour": "red"}``; a prompt with a shape or colour but no style
    phrase asks for ``"blank"``; words the world does not know give ``None`` (no ACC for that head)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    words = prompt.lower().replace(",", " ").split()
    found = {k: [w for w in words if w in HEADS[k]] for k in HEADS}
    out = {k: (v[0] if len(v) == 1 else None) for k, v in found.items()}
    if out["style"] is None and not found["style"] and (out["shape"] or out["colour"] or world.GENERIC_NOUN in words):
        out["style"] = "blank"
    return out


# ------------------------------------------------------------------------------------------ rendering
def _check_render_args(deltas, scales, prompt, seed, n):
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n (images in the grid) must be a positive integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    scales = [float(s) for s in scales]
    if len(scales) != len(deltas):
        raise ValueError(f"{len(deltas)} deltas but {len(scales)} scales; give one strength per delta (0 = off)")
    if not all(math.isfinite(s) for s in scales):
        raise ValueError(f"scales must be finite numbers, got {scales}")
    return scales


def leakage_readout(model, deltas, scales, prompt: str) -> dict:
    """Leakage certificate of the combined increment ``sum_i s_i dW_i`` (``nullspace.leakage``, notebook 03):

    ``{"prompt": on the chosen prompt, "c0": on the empty prompt, "off": {name: on the main prompt of each
    switched-off world concept}}``. For SepME_1 increments "c0" and "off" are at float precision (~1e-7):
    the combination leaves the concepts you did not erase exactly as the original model had them.
    All zero when every scale is 0."""
    off_names = [d.name for d, s in zip(deltas, scales) if s == 0.0 and _is_world_concept(d.name)]
    off_prompts = {n: world.concept_prompt(n) for n in off_names}
    if not any(s != 0.0 for s in scales):
        return dict(prompt=0.0, c0=0.0, off={n: 0.0 for n in off_names})
    total = combine(deltas, scales)
    probe = [prompt, ""] + [p for p in off_prompts.values() if p not in (prompt, "")]
    lk = leakage(model, total, list(dict.fromkeys(probe)))
    return dict(prompt=lk[prompt], c0=lk[""], off={n: lk[p] for n, p in off_prompts.items()})


def _is_world_concept(name: str) -> bool:
    return (name in world.STYLES and name != "blank") or name in world.SHAPES


def classify_readout(clf, images, targets: dict) -> tuple[dict, dict]:
    """``(acc, predicted)``: per head with a target, the fraction of images classified as it (the paper's
    ACC), and the predicted labels per head (for image titles). ``clf=None`` gives empty dicts."""
    if clf is None:
        return {}, {}
    pred = predict(clf, images)
    acc = {h: sum(p == t for p in pred[h]) / len(pred[h]) for h, t in targets.items() if t is not None}
    return acc, pred


@torch.no_grad()
def render_state(model, clf, deltas, scales, prompt: str, seed: int = 0, n: int = 4, steps: int | None = WIDGET_STEPS,
                 guidance: float | None = WIDGET_GUIDANCE) -> dict:
    """Render ``theta + sum_i s_i dTheta_i`` for one prompt: what the widget shows after every change.

    Samples ``n`` images of ``prompt`` with seeds ``seed .. seed+n-1`` (same seeds -> same start noise,
    so states are comparable image by image), classifies them and measures leakage.
    Returns ``dict(images (n,3,H,W) in [0,1], acc {head: ACC}, predicted {head: [labels]}, targets,
    leakage (see :func:`leakage_readout`), seconds (wall time of this call), scales, prompt, seed, steps)``.
    """
    deltas = list(deltas)
    scales = _check_render_args(deltas, scales, prompt, seed, n)
    t0 = time.perf_counter()
    weights = edited_weights(model, deltas, scales) if any(s != 0.0 for s in scales) else None
    images = model.sample([prompt] * n, seeds=range(seed, seed + n), steps=steps, guidance=guidance, weights=weights)
    targets = prompt_targets(prompt)
    acc, pred = classify_readout(clf, images, targets)
    leak = leakage_readout(model, deltas, scales, prompt)
    return dict(images=images, acc=acc, predicted=pred, targets=targets, leakage=leak,
                seconds=time.perf_counter() - t0, scales=dict(zip([d.name for d in deltas], scales)),
                prompt=prompt, seed=int(seed), steps=steps)


def render_comparison(model, clf, deltas, scales, prompt: str, seed: int = 0, n: int = 4,
                      steps: int | None = WIDGET_STEPS, guidance: float | None = WIDGET_GUIDANCE,
                      cache: dict | None = None, metric: str = "auto") -> dict:
    """Original ``theta`` vs edited ``theta + sum_i s_i dTheta_i`` for the same prompt and seeds.

    ``cache`` (a dict the caller keeps) holds the original model's states by ``(prompt, seed, n, steps,
    guidance)``, so moving a slider re-samples only the edited model. Returns ``dict(original=state,
    edited=state, distance=value, metric=name, seconds=wall time of this call)``, the distance from
    ``perceptual.perceptual_distance`` (0 when the edit leaves the images unchanged).
    """
    t0 = time.perf_counter()
    deltas = list(deltas)
    key = (prompt, int(seed), int(n), steps, guidance)
    original = cache.get(key) if cache is not None else None
    if original is None:
        original = render_state(model, clf, deltas, [0.0] * len(deltas), prompt, seed, n, steps, guidance)
        if cache is not None:
            cache[key] = original
    edited = render_state(model, clf, deltas, scales, prompt, seed, n, steps, guidance)
    value, name = perceptual_distance(original["images"], edited["images"], metric)
    return dict(original=original, edited=edited, distance=value, metric=name, seconds=time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------ display
def grid_image(images, ncols: int | None = None, upscale: int = UPSCALE, gap: int = 2, background=255):
    """A PIL image: ``images`` (N,3,H,W) in [0,1] tiled ``ncols`` wide, each upscaled (nearest) ``upscale``x."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a (N, 3, H, W) tensor in [0, 1], got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if upscale < 1 or gap < 0:
        raise ValueError(f"upscale must be >= 1 and gap >= 0, got upscale={upscale}, gap={gap}")
    n, _, h, w = images.shape
    ncols = min(ncols or n, n)
    nrows = -(-n // ncols)
    H, W = h * upscale, w * upscale
    canvas = np.full((nrows * H + (nrows - 1) * gap, ncols * W + (ncols - 1) * gap, 3), background, np.uint8)
    arr = (images.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    for k in range(n):
        r, c = divmod(k, ncols)
        tile = arr[k].repeat(upscale, 0).repeat(upscale, 1)
        canvas[r * (H + gap):r * (H + gap) + H, c * (W + gap):c * (W + gap) + W] = tile
    return Image.fromarray(canvas)


def png_bytes(img) -> bytes:
    """PNG bytes of a PIL image (what ``ipywidgets.Image`` displays; a 4-image grid is a few kB)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def format_readout(state: dict, comparison: dict | None = None) -> str:
    """The widget's live readout as plain text lines (the widget wraps it in ``<pre>``)."""
    on = [f"{k} x{v:.2f}" for k, v in state["scales"].items() if v != 0.0]
    lines = [f"theta + {' + '.join(on) if on else '(nothing: the original model)'}",
             f"prompt: {state['prompt']!r}  seeds {state['seed']}..{state['seed'] + len(state['images']) - 1}"]
    if state["acc"]:
        lines.append("ACC: " + ", ".join(f"{h} {state['targets'][h]!r} {a:.2f}" for h, a in state["acc"].items()))
    else:
        lines.append("ACC: - (no classifier, or the prompt names no world concept)")
    lk = state["leakage"]
    off = ", ".join(f"{k} {v:.1e}" for k, v in lk["off"].items()) or "-"
    lines.append(f"leakage ||A dW^T||/||A W^T||: prompt {lk['prompt']:.1e} | c0 {lk['c0']:.1e} | switched-off: {off}")
    if comparison is not None:
        lines.append(f"original vs edited: {comparison['metric']} = {comparison['distance']:.3f}")
    lines.append(f"refresh: {(comparison or state)['seconds']:.2f} s ({state['steps']} DDIM steps)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ widget
class CombinationWidget:
    """Checkbox + strength slider per ``dTheta_i``, a prompt box, a seed, the grid of
    ``theta + sum_i s_i dTheta_i``, the live readout, and an original-vs-edited side-by-side view.

    Only wiring: every number comes from :func:`render_comparison` / :func:`format_readout`. Display it
    with ``display(w)`` (or ``w.ui``); ``w.update()`` re-renders and returns the comparison dict.
    """

    def __init__(self, model, clf, deltas, prompts=None, n: int = 4, seed: int = 0, steps: int | None = WIDGET_STEPS,
                 guidance: float | None = WIDGET_GUIDANCE, scale_range=SCALE_RANGE, metric: str = "auto"):
        self.model, self.clf, self.deltas = model, clf, list(deltas)
        if not self.deltas:
            raise ValueError("CombinationWidget needs at least one delta (a list of Delta objects)")
        for d in self.deltas:
            d.check_base(model)
        prompts = list(prompts) if prompts is not None else default_prompts(self.deltas)
        if not prompts:
            raise ValueError("no prompts to offer: pass prompts=[...] (deltas that are not world concepts have no "
                             "default prompt)")
        _check_render_args(self.deltas, [0.0] * len(self.deltas), prompts[0], seed, n)
        self.n, self.steps, self.guidance, self.metric = n, steps, guidance, metric
        self.cache: dict = {}
        self.last = None
        lo, hi = scale_range
        self.checks = [W.Checkbox(value=True, description=f"Δθ {d.name}", indent=False,
                                  layout=W.Layout(width="160px")) for d in self.deltas]
        self.sliders = [W.FloatSlider(value=1.0, min=lo, max=hi, step=0.05, description="strength s",
                                      continuous_update=False, readout_format=".2f") for _ in self.deltas]
        self.prompt = W.Combobox(value=prompts[0], options=prompts, ensure_option=False, description="prompt",
                                 continuous_update=False, layout=W.Layout(width="420px"))
        self.seed = W.BoundedIntText(value=seed, min=0, max=2 ** 31 - 1, description="seed",
                                     layout=W.Layout(width="160px"))
        self.grid = W.Image(format="png")
        self.original_img, self.edited_img = W.Image(format="png"), W.Image(format="png")
        self.readout = W.HTML()
        for w in self.checks + self.sliders + [self.prompt, self.seed]:
            w.observe(self._on_change, names="value")
        rows = [W.HBox([c, s]) for c, s in zip(self.checks, self.sliders)]
        side = W.HBox([W.VBox([W.HTML("<b>original θ</b>"), self.original_img]),
                       W.VBox([W.HTML("<b>edited θ + Σ s<sub>i</sub>Δθ<sub>i</sub></b>"), self.edited_img])])
        self.ui = W.VBox([W.HTML("<b>θ + Σ<sub>i</sub> s<sub>i</sub> Δθ<sub>i</sub></b>"), *rows,
                          W.HBox([self.prompt, self.seed]), self.grid, self.readout,
                          W.Accordion(children=[side], titles=("original vs edited",))])

    def scales(self) -> list[float]:
        return scales_from_controls(self.checks, self.sliders)

    def update(self) -> dict:
        """Re-render from the controls' current values; returns :func:`render_comparison`'s dict."""
        comp = render_comparison(self.model, self.clf, self.deltas, self.scales(), self.prompt.value.strip(),
                                 int(self.seed.value), self.n, self.steps, self.guidance, self.cache, self.metric)
        edited = comp["edited"]
        self.grid.value = png_bytes(grid_image(edited["images"], ncols=self.n))
        self.original_img.value = png_bytes(grid_image(comp["original"]["images"], ncols=2))
        self.edited_img.value = png_bytes(grid_image(edited["images"], ncols=2))
        self.readout.value = "<pre style='font-size:11px'>" + html.escape(format_readout(edited, comp)) + "</pre>"
        self.last = comp
        return comp

    def _on_change(self, change):
        try:
            self.update()
        except (ValueError, TypeError, KeyError) as e:  # bad input from a control: show it, keep the last grid
            self.readout.value = f"<pre style='color:#b00'>{html.escape(str(e))}</pre>"

    def _ipython_display_(self):
        display(self.ui)


# ------------------------------------------------------------------------------------------ benchmark
def benchmark_refresh(model, clf, deltas, n: int = 4, steps: int | None = WIDGET_STEPS, repeats: int = 3,
                      prompt: str | None = None, budget: float = 2.0, widget: "CombinationWidget | None" = None) -> dict:
    """Measure the widget's refresh (toggle one delta -> new grid, readout, PNGs) and print the numbers.

    Uses ``widget`` if given (then ``n``/``steps``/``prompt`` are the widget's), else builds a headless
    :class:`CombinationWidget` and renders once to warm up (and fill the original-image cache). Then toggles
    the first checkbox ``repeats`` times, timing each refresh, and leaves the checkbox as it found it.
    Returns ``dict(seconds=[...], median, max, budget, within_budget, n, steps, threads)``. Not a test:
    timings depend on the machine and on what else runs on it.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    w = widget
    if w is None:
        w = CombinationWidget(model, clf, deltas, prompts=[prompt] if prompt else None, n=n, steps=steps)
        w.update()
    elif w.last is None:
        w.update()
    box = w.checks[0]
    start = box.value
    times = []

    def flip():
        box.unobserve(w._on_change, names="value")
        box.value = not box.value
        box.observe(w._on_change, names="value")

    for _ in range(repeats):
        flip()
        t0 = time.perf_counter()
        w.update()
        times.append(time.perf_counter() - t0)
    if box.value != start:  # put the control back (not timed)
        flip()
        w.update()
    med, worst = statistics.median(times), max(times)
    steps = w.steps if w.steps is not None else model.sample_steps
    out = dict(seconds=times, median=med, max=worst, budget=budget, within_budget=worst <= budget, n=w.n,
               steps=steps, threads=torch.get_num_threads())
    print(f"widget refresh, {w.n} images x {steps} DDIM steps on {model.device} "
          f"({out['threads']} torch threads): " + ", ".join(f"{t:.2f}" for t in times)
          + f" s; median {med:.2f} s, max {worst:.2f} s -> {'within' if worst <= budget else 'OVER'} the {budget:g} s budget")
    return out
