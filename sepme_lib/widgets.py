"""The interactive combination widget: ``theta + sum_i s_i dTheta_i`` with live ACC and leakage.

Introduced in ``notebooks/05_interactive_combination.ipynb``. SepME's increments are separable (paper
Sec. 3.2, Eqs. 5-10): because ``A_j dW_i^T = 0`` for every concept ``j != i`` (Eq. 7, the null-space
property), the combined model ``theta + sum_{i in S} s_i dTheta_i`` (the paper's evaluation, Sec. 4,
"DMs with theta + sum_{i in {j,k}} dTheta_i eliminate c_j and c_k") acts on concept ``j``'s prompts exactly like
``theta + s_j dTheta_j`` when ``j`` is in ``S`` and like ``theta`` when it is not. The widget lets you switch
each ``dTheta_i`` on and off, set its strength ``s_i``, pick a prompt and a seed, and see the original and the
edited images side by side, the judge's ACC on them and the leakage certificate ``||A dW^T|| / ||A W^T||``
(``nullspace.leakage``) of the combined increment on the prompt, on ``c_0`` and on the concepts switched off.
It works for every model family: the concepts, prompts and labels come from ``concepts.concept_set(model)`` and the
judge (the bundled classifier, or the zero-shot CLIP judge of Stable Diffusion).

All logic is in plain functions, unit-tested in ``tests/test_widgets.py``:

:func:`scales_from_controls` (checkboxes + sliders -> ``s_i``), :func:`prompt_targets` (the classes a prompt asks
for; words the model does not know get no inferred class, no silent "blank"), :func:`render_state` (sample, classify,
leakage, time), :func:`render_comparison` (the same beside the cached original, with their perceptual distance),
:func:`format_readout`, :func:`warning_text`, :func:`grid_image` (tiles >= ``MIN_TILE`` px), :func:`png_bytes`,
:func:`benchmark_refresh` (refresh time).

:class:`CombinationWidget` only wires ipywidgets controls to these functions: while it re-renders, the readout says
so (no stale numbers); an error replaces the readout with the message and marks the images as not updated. Its
displayed output also carries :func:`snapshot_image`, a drawn PNG of the same state (controls, images, readout), which
viewers that cannot render widgets (GitHub, an untrusted notebook) show instead of the live view.

Refresh times measured on the bundled model are in the README ("Results on the bundled world").
"""
from __future__ import annotations

import html
import math
import re
import statistics
import time
import warnings

import ipywidgets as W
import numpy as np
import torch

from . import adapters as _adapters
from . import families, world
from .classifier import HEADS, predict
from .concepts import concept_set
from .config import BadValue
from .deltas import combine, edited_weights
from .nullspace import leakage
from .perceptual import perceptual_distance
from .picture import (  # noqa: F401
    MAX_TILE,
    MIN_TILE,
    grid_image,
    png_bytes,
    tile_scale,
    widget_picture,
)

WIDGET_STEPS = 8       # DDIM steps per refresh (see the module docstring for the measurement)
WIDGET_GUIDANCE = None  # None -> the model's own guidance (config.TINY_GUIDANCE for the bundled model)
SCALE_RANGE = (-1.0, 2.0)
SLIDER_WIDTH = "520px"  # the whole slider row: description 90 px + track (>= 300 px) + readout


# ------------------------------------------------------------------------------------------ controls
def _value(x):
    return getattr(x, "value", x)


def _family(model) -> families.Family:
    """The model's family entry (``model=None``: the bundled world's)."""
    return families.get(families.BUNDLED) if model is None else families.family_of(model)


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


def default_prompts(deltas, extra: int = 2, model=None) -> list[str]:
    """Prompt choices: one per delta naming a concept of the model's concept set, then ``extra`` of concepts no delta
    erases. World (``model=None`` too): "a red circle in striped style"; SD: "a painting in the style of <artist>"."""
    return _family(model).default_prompts([d.name for d in deltas], extra)


def unknown_words(prompt: str, model=None) -> list[str]:
    """Words of ``prompt`` the model never saw (``model.unknown_words``; ``model=None``: the world's vocabulary)."""
    if model is not None:
        return list(model.unknown_words(prompt))
    return [w for w in prompt.lower().replace(",", " ").split() if w not in world.VOCABULARY]


def _found(prompt: str, label: str) -> bool:
    return re.search(rf"(?<![a-z]){re.escape(label.lower())}(?![a-z])", prompt.lower()) is not None


def prompt_targets(prompt: str, judge=None, model=None) -> dict:
    """``{head: class or None}`` that a prompt asks for: the class each of the judge's heads should see.

    World (``model=None`` or the bundled model, the classifier's heads): ``"a red star in striped style"`` ->
    ``{"style": "striped", "shape": "star", "colour": "red"}``; a prompt with a shape or colour but no style phrase
    asks for ``"blank"``. Stable Diffusion (the CLIP judge's ``style`` head): the artist named in the prompt, else
    ``"blank"``. A head whose classes the prompt names twice gets ``None`` (no ACC), and so does every class that would
    only be *inferred* ("blank") when the prompt has words the model never saw: the widget warns about them instead
    of scoring them silently."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    labels = dict(judge.heads_labels) if judge is not None else dict(HEADS)
    found = {k: [lab for lab in v if lab != "blank" and _found(prompt, lab)] for k, v in labels.items()}
    out = {k: (v[0] if len(v) == 1 else None) for k, v in found.items()}
    if unknown_words(prompt, model) or "style" not in labels or "blank" not in labels["style"] or found["style"]:
        return out
    if _family(model).implies_blank(prompt, out):
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


def _concept_prompt(model, name: str):
    """The main prompt of ``name`` in the model's concept set (``None`` if the set does not know it)."""
    cs = concept_set(model)
    if name == "blank" or not cs.knows(name):
        return None
    return cs.prompts(name, 1)[0]


def leakage_readout(model, deltas, scales, prompt: str) -> dict:
    """Leakage certificate of the combined increment ``sum_i s_i dW_i`` (``nullspace.leakage``, notebook 03):

    ``{"prompt": on the chosen prompt, "c0": on the empty prompt, "off": {name: on the main prompt of each
    switched-off concept}}``. For SepME_1 increments "c0" and "off" are at float precision (~1e-6):
    the combination leaves the concepts you did not erase exactly as the original model had them.
    All zero when every scale is 0."""
    off_prompts = {d.name: _concept_prompt(model, d.name) for d, s in zip(deltas, scales) if s == 0.0}
    off_prompts = {k: v for k, v in off_prompts.items() if v is not None}
    if not any(s != 0.0 for s in scales):
        return dict(prompt=0.0, c0=0.0, off={n: 0.0 for n in off_prompts})
    total = combine(deltas, scales)
    probe = [prompt, ""] + [p for p in off_prompts.values() if p not in (prompt, "")]
    lk = leakage(model, total, list(dict.fromkeys(probe)))
    return dict(prompt=lk[prompt], c0=lk[""], off={n: lk[p] for n, p in off_prompts.items()})


def classify_readout(clf, images, targets: dict) -> tuple[dict, dict]:
    """``(acc, predicted)``: per head with a target, the fraction of images classified as it (the paper's
    ACC), and the predicted labels per head (for image titles). ``clf=None`` gives empty dicts."""
    if clf is None:
        return {}, {}
    pred = predict(clf, images)
    acc = {h: sum(p == t for p in pred[h]) / len(pred[h]) for h, t in targets.items() if t is not None and h in pred}
    return acc, pred


@torch.no_grad()
def render_state(model, clf, deltas, scales, prompt: str, seed: int = 0, n: int = 4, steps: int | None = WIDGET_STEPS,
                 guidance: float | None = WIDGET_GUIDANCE, adapters=None) -> dict:
    """Render ``theta + sum_i s_i dTheta_i`` for one prompt (what the widget shows after every change): ``n`` images
    with seeds ``seed .. seed+n-1`` (the same start noise in every state), classified, with leakage. Returns
    ``dict(images (n,3,H,W) in [0,1], acc {head: ACC}, predicted {head: [labels]}, targets, unknown (words the model
    never saw), leakage (:func:`leakage_readout`), seconds, scales, prompt, seed, steps)``."""
    deltas = list(deltas)
    scales = _check_render_args(deltas, scales, prompt, seed, n)
    t0 = time.perf_counter()
    weights = edited_weights(model, deltas, scales) if adapters is None and any(s != 0.0 for s in scales) else None
    with warnings.catch_warnings(), _adapters.backend_context(adapters, model, scales):  # diffusers' set_adapters
        warnings.simplefilter("ignore", UserWarning)  # unknown words: reported in the state, not in the log
        images = model.sample([prompt] * n, seeds=range(seed, seed + n), steps=steps, guidance=guidance,
                              weights=weights)
    leak = leakage_readout(model, deltas, scales, prompt)  # the model's own UNet again (the words warned above)
    targets = prompt_targets(prompt, clf, model)
    acc, pred = classify_readout(clf, images, targets)
    return dict(images=images, acc=acc, predicted=pred, targets=targets, unknown=unknown_words(prompt, model),
                leakage=leak, seconds=time.perf_counter() - t0, scales=dict(zip([d.name for d in deltas], scales)),
                prompt=prompt, seed=int(seed), steps=steps)


def render_comparison(model, clf, deltas, scales, prompt: str, seed: int = 0, n: int = 4,
                      steps: int | None = WIDGET_STEPS, guidance: float | None = WIDGET_GUIDANCE,
                      cache: dict | None = None, metric: str = "auto", adapters=None) -> dict:
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
    edited = render_state(model, clf, deltas, scales, prompt, seed, n, steps, guidance, adapters)
    value, name = perceptual_distance(original["images"], edited["images"], metric)
    return dict(original=original, edited=edited, distance=value, metric=name, seconds=time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------ display
def warning_text(state: dict) -> str:
    """The widget's warning line ('' if none): words the model never saw (spelled letter by letter by its
    tokenizer) and the heads that get no ACC because of them."""
    if not state.get("unknown"):
        return ""
    none = [h for h, t in state["targets"].items() if t is None]
    return (f"unknown word(s) {', '.join(map(repr, state['unknown']))}: the model never saw them (its tokenizer "
            f"spells them letter by letter)" + (f"; no ACC for {', '.join(none)}" if none else ""))


def format_readout(state: dict, comparison: dict | None = None) -> str:
    """The widget's live readout as plain text lines (the widget wraps it in ``<pre>``)."""
    on = [f"{k} x{v:.2f}" for k, v in state["scales"].items() if v != 0.0]
    lines = [f"theta + {' + '.join(on) if on else '(nothing: the original model)'}",
             f"prompt: {state['prompt']!r}  seeds {state['seed']}..{state['seed'] + len(state['images']) - 1}"]
    warn = warning_text(state)
    if warn:
        lines.append("WARNING: " + warn)
    if state["acc"]:
        lines.append("ACC: " + ", ".join(f"{h} {state['targets'][h]!r} {a:.2f}" for h, a in state["acc"].items()))
    else:
        lines.append("ACC: - (no judge, or the prompt names no class the judge knows)")
    lk = state["leakage"]
    off = ", ".join(f"{k} {v:.1e}" for k, v in lk["off"].items()) or "-"
    lines.append(f"leakage ||A dW^T||/||A W^T||: prompt {lk['prompt']:.1e} | c0 {lk['c0']:.1e} | switched-off: {off}")
    if comparison is not None:
        lines.append(f"original vs edited: {comparison['metric']} = {comparison['distance']:.3f}")
    lines.append(f"refresh: {(comparison or state)['seconds']:.2f} s ({state['steps']} DDIM steps)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ widget
def _pre(text: str, colour: str = "#000") -> str:  # the readout's HTML
    return f"<pre style='font-size:11px;color:{colour};white-space:pre-wrap;margin:0'>{html.escape(text)}</pre>"


def _scale_range(scale_range) -> tuple:
    """``(lo, hi)`` of the strength sliders: finite numbers with ``lo < hi``."""
    try:
        lo, hi = (float(v) for v in scale_range)
    except (TypeError, ValueError):
        raise BadValue(f"scale_range must be two numbers (lo, hi), e.g. (-1, 2), got {scale_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise BadValue(f"scale_range must be finite with lo < hi, e.g. (-1, 2), got {scale_range!r}; write the "
                       "smaller strength first")
    return lo, hi


class CombinationWidget:
    """Checkbox + strength slider per ``dTheta_i``, a prompt box, a seed, the original and the edited images side
    by side (``theta`` | ``theta + sum_i s_i dTheta_i``), a warning line and the live readout.

    Only wiring: every number comes from :func:`render_comparison` / :func:`format_readout`. Display it
    with ``display(w)`` (or ``w.ui``); ``w.update()`` re-renders and returns the comparison dict. While it renders
    the readout says so; an error shows its message there (no old numbers) and marks the images as not updated.
    """

    def __init__(self, model, clf, deltas, prompts=None, n: int = 4, seed: int = 0, steps: int | None = WIDGET_STEPS,
                 guidance: float | None = WIDGET_GUIDANCE, scale_range=SCALE_RANGE, metric="auto", backend="library"):
        lo, hi = _scale_range(scale_range)
        self.model, self.clf, self.deltas = model, clf, list(deltas)
        if not self.deltas:
            raise ValueError("CombinationWidget needs at least one delta (a list of Delta objects)")
        for d in self.deltas:
            d.check_base(model)
        prompts = list(prompts) if prompts is not None else default_prompts(self.deltas, model=model)
        if not prompts:
            raise ValueError("no prompts to offer: pass prompts=[...] (deltas that are not concepts of the model's "
                             "concept set have no default prompt)")
        _check_render_args(self.deltas, [0.0] * len(self.deltas), prompts[0], seed, n)
        self.n, self.steps, self.guidance, self.metric = n, steps, guidance, metric
        self.cache, self.adapters = {}, _adapters.make_backend(model, self.deltas, backend)  # diffusers: set_adapters
        self.last = None
        self.checks = [W.Checkbox(value=True, description=f"Δθ {d.name}", indent=False,
                                  layout=W.Layout(width="170px")) for d in self.deltas]
        self.sliders = [W.FloatSlider(value=1.0, min=lo, max=hi, step=0.05, description="strength s",
                                      continuous_update=False, readout_format=".2f",
                                      layout=W.Layout(width=SLIDER_WIDTH), style={"description_width": "90px"})
                        for _ in self.deltas]
        self.prompt = W.Combobox(value=prompts[0], options=prompts, ensure_option=False, description="prompt",
                                 continuous_update=False, layout=W.Layout(width="460px"))
        self.seed = W.BoundedIntText(value=seed, min=0, max=2 ** 31 - 1, description="seed",
                                     layout=W.Layout(width="160px"))
        self.original_img, self.edited_img = W.Image(format="png"), W.Image(format="png")
        self.grid = self.edited_img  # the edited images (the name earlier versions used)
        self.original_caption = W.HTML("<b>original θ</b>")
        self.edited_caption = W.HTML(self._edited_title())
        self.warning = W.HTML("")
        self.readout = W.HTML(_pre("not rendered yet"))
        for w in self.checks + self.sliders + [self.prompt, self.seed]:
            w.observe(self._on_change, names="value")
        rows = [W.HBox([c, s]) for c, s in zip(self.checks, self.sliders)]
        side = W.HBox([W.VBox([self.original_caption, self.original_img]),
                       W.VBox([self.edited_caption, self.edited_img])], layout=W.Layout(gap="16px"))
        self.ui = W.VBox([W.HTML("<b>θ + Σ<sub>i</sub> s<sub>i</sub> Δθ<sub>i</sub></b>"), *rows,
                          W.HBox([self.prompt, self.seed]), self.warning, side, self.readout])
        self.ui.add_class("sepme-combination-widget")

    def _edited_title(self, note: str = "") -> str:
        return "<b>edited θ + Σ s<sub>i</sub>Δθ<sub>i</sub></b>" + (f" <i style='color:#b00'>{note}</i>" if note else "")

    def scales(self) -> list[float]:
        return scales_from_controls(self.checks, self.sliders)

    def _show_warning(self, prompt: str) -> None:
        words = unknown_words(prompt, self.model)
        self.warning.value = ("" if not words else
                              f"<div style='background:#fff3cd;color:#664d03;padding:2px 6px;font-size:12px'>⚠ "
                              f"{html.escape(warning_text(dict(unknown=words, targets={})))}</div>")

    def update(self) -> dict:
        """Re-render from the controls' current values; returns :func:`render_comparison`'s dict."""
        prompt = self.prompt.value.strip()
        self.readout.value = _pre("rendering ... (the numbers will appear here when the new images are ready)", "#777")
        self.edited_caption.value = self._edited_title("rendering ...")
        self._show_warning(prompt)
        comp = render_comparison(self.model, self.clf, self.deltas, self.scales(), prompt, int(self.seed.value),
                                 self.n, self.steps, self.guidance, self.cache, self.metric, self.adapters)
        self.original_img.value = png_bytes(grid_image(comp["original"]["images"], ncols=2))
        self.edited_img.value = png_bytes(grid_image(comp["edited"]["images"], ncols=2))
        self.edited_caption.value = self._edited_title()
        self.readout.value = _pre(format_readout(comp["edited"], comp))
        self.last = comp
        return comp

    def _on_change(self, change):
        try:
            self.update()
        except Exception as e:  # noqa: BLE001 - any failure is shown in the widget, not in the kernel log
            self.edited_caption.value = self._edited_title("not updated: the last change failed")
            self.readout.value = _pre(f"could not render this state: {type(e).__name__}: {e}", "#b00")

    def snapshot_image(self):
        """A static picture of the widget as it stands (:func:`snapshot_image`)."""
        return snapshot_image(self)

    def _repr_mimebundle_(self, include=None, exclude=None):
        """The live widget's view, and beside it a PNG snapshot of the same state: viewers without the widget's
        state (GitHub, an untrusted notebook, nbconvert without state) show the picture instead of a blank."""
        data = self.ui._repr_mimebundle_()
        if self.last is not None:
            data["text/plain"] = ("CombinationWidget (a static snapshot; run the notebook for live controls)\n"
                                  + format_readout(self.last["edited"], self.last))
            data["image/png"] = png_bytes(self.snapshot_image())
        return data


# ------------------------------------------------------------------------------------------ static snapshot
def snapshot_image(widget: "CombinationWidget", width: int = 640):
    """A PIL picture of ``widget``'s controls, images and readout as they stand (drawn, not a screenshot): the stored
    fallback of the widget's output, for viewers that cannot render widgets. Call ``widget.update()`` first."""
    if widget.last is None:
        raise ValueError("the widget has not rendered yet: call widget.update() first")
    return widget_picture([(b.description, b.value) for b in widget.checks],
                          [(float(sl.value), sl.min, sl.max) for sl in widget.sliders], widget.prompt.value,
                          widget.seed.value, widget.last["original"]["images"], widget.last["edited"]["images"],
                          format_readout(widget.last["edited"], widget.last).splitlines(), width)


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
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise BadValue(f"repeats must be >= 1 (a whole number of refreshes to time), got {repeats!r}")
    w = widget or CombinationWidget(model, clf, deltas, prompts=[prompt] if prompt else None, n=n, steps=steps)
    if w.last is None:
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
