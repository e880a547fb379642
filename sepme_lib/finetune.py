"""The fine-tuning relatives on one loop: ESD-x, Ablating Concepts, Forget-Me-Not, All-but-One.

Introduced in ``notebooks/06_relatives_closed_form_and_baselines.ipynb``. Each trains a full-size ``dW`` (zeros at the
start) on a chosen parameter set (``params="kv"``: every attn2 to_k/to_v; ``"cross_attention"``: every attn2
parameter) with Adam, gradients cleared every step, ``x_t`` from a reference set (``concepts.draw_batch``) and
returns the same :class:`~sepme_lib.deltas.Delta` SepME returns. Settings come resolved from ``methods.DEFAULTS``
(a plain dict ``s``); the per-method docstrings state the paper's values and the bundled model's.

* ESD-x: ``MSE(eps'(x_t,c), eps(x_t,c0) - eta (eps(x_t,c) - eps(x_t,c0)))``;
* Ablating Concepts (model-based): ``MSE(eps'(x_t,c), sg(eps(x_t,c*)))``, ``x_t`` from images of the anchor ``c*``;
* Forget-Me-Not: the cross-attention probability mass on the concept's token positions;
* All-but-One: ``||g2 (eps'(z,c) - sg(eps'(z,c0))) - [g1 (eps(z,c') - eps(z,c0)) + delta]||^2 + lam ||eps'(z,c0) -
  eps(z,c0)||^2``.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .concepts import anchors_for, draw_batch
from .deltas import Delta


# ------------------------------------------------------------------------------------ attention capture
class _AttnCapture:
    """A diffusers attention processor (the plain ``AttnProcessor`` computation) that also records the attention
    probabilities ``(B, heads, queries, tokens)`` into ``store``; used temporarily on attn2 modules."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kw):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, ch, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, ch, h * w).transpose(1, 2)
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        bsz = ctx.shape[0]
        attention_mask = attn.prepare_attention_mask(attention_mask, ctx.shape[1], bsz)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        key, value = attn.to_k(ctx), attn.to_v(ctx)
        q, k, v = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(q, k, attention_mask)  # softmax(q k^T / sqrt(d))
        self.store.append(probs.view(bsz, -1, probs.shape[1], probs.shape[2]))
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, ch, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextmanager
def capture_cross_attention(model):
    """``with capture_cross_attention(model) as store:`` every attn2 call appends its attention probabilities
    ``(B, heads, queries, L)`` to ``store``; the original processors come back on exit."""
    store: list = []
    layers = model.cross_attention_layers()
    old = {n: m.processor for n, m in layers.items()}
    try:
        for m in layers.values():
            m.set_processor(_AttnCapture(store))
        yield store
    finally:
        for n, m in layers.items():
            m.set_processor(old[n])


# -------------------------------------------------------------------------------------- fine-tuning loop
def param_names(model, params: str) -> list[str]:
    """``"kv"`` -> every attn2 to_k/to_v weight; ``"cross_attention"`` -> every attn2 parameter."""
    if params == "kv":
        return model.kv_weight_names()
    if params == "cross_attention":
        return model.cross_attention_param_names()
    raise ValueError(f"params must be 'kv' (attn2 to_k/to_v) or 'cross_attention' (all attn2), got {params!r}")


def _name(concepts) -> str:
    return "+".join(c.name for c in concepts)


def finetune(model, concepts, s: dict, step_loss, method: str, progress: bool, latents=None,
             extra_info=None, checkpoint=None) -> Delta:
    """Shared loop of the fine-tuning relatives: trainable ``dW`` (zeros) on ``s["params"]``; every step draws
    ``s["batch"]`` reference latents per concept (``latents[i]`` if given, else the concept's own), ``t ~ U{0..T-1}``
    and fresh noise, one of the concept's prompts per image, and minimises ``step_loss(X, T, E, idx, weights)``
    with Adam (gradients cleared every step). ``checkpoint``: a ``checkpoint.Checkpoint`` to save the state to every
    few steps and resume from (``None``: exactly the loop without it)."""
    t0 = time.time()
    gen = torch.Generator().manual_seed(s["seed"])
    base = model.params(param_names(model, s["params"]))
    dW = {k: torch.zeros_like(p, dtype=torch.float32, requires_grad=True) for k, p in base.items()}
    opt = torch.optim.Adam(list(dW.values()), lr=s["lr"])
    embs = [c.embedding(model) for c in concepts]
    lat = latents or [c.latents for c in concepts]
    losses, start, stage = [], 0, None
    if checkpoint is not None:  # resume from the last save of this loop, if any
        stage = checkpoint.stage(f"{method} {_name(concepts)}", method=method, concepts=[c.name for c in concepts],
                                 prompts=[c.prompts for c in concepts], settings=dict(s))
        saved = stage.load()
        if saved is not None:
            with torch.no_grad():
                for k, v in saved["dW"].items():
                    dW[k].copy_(v)
            opt.load_state_dict(saved["opt"])
            gen.set_state(saved["gen"])
            losses, start, t0 = list(saved["losses"]), int(saved["step"]), t0 - saved["seconds"]
    bar = tqdm(total=s["steps"], initial=start, desc=f"{method} {_name(concepts)}", leave=False) if progress else None
    for step in range(start, s["steps"]):
        batches = [draw_batch(model, lat[i], embs[i], s["batch"], gen) for i in range(len(concepts))]
        X, T, E = (torch.cat([b[k] for b in batches]) for k in range(3))
        I = torch.cat([torch.stack([torch.full_like(b[3], i), b[3]], 1) for i, b in enumerate(batches)])
        weights = {k: (w.detach().float() + dW[k]).to(w.dtype) for k, w in base.items()}  # theta + dtheta
        loss = step_loss(X, T, E, I, weights)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{method}: the loss became {float(loss)} at step {step}; lower lr "
                                     f"(now {s['lr']:g})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
        if stage is not None and stage.due(step + 1, step + 1 == s["steps"]):
            stage.save(step + 1, dict(dW={k: v.detach().clone() for k, v in dW.items()}, opt=opt.state_dict(),
                                      gen=gen.get_state().clone(), losses=losses, seconds=time.time() - t0),
                       finished=step + 1 == s["steps"])
    if bar is not None:
        bar.close()
    info = dict(seconds=round(time.time() - t0, 2), steps=s["steps"], loss=losses, concepts=[c.name for c in concepts],
                prompts=[p for c in concepts for p in c.prompts], **(extra_info or {}))
    return Delta(_name(concepts), method, {k: v.detach().float().clone() for k, v in dW.items()}, model.fingerprint(),
                 dict(s), info)


def esd(model, concepts, s: dict, progress: bool = False, checkpoint=None) -> Delta:
    """ESD-x (ESD's negative-guidance objective): ``MSE(eps'(x_t,c), eps(x_t,c0) - eta (eps(x_t,c) - eps(x_t,c0)))``
    on ``s["params"]`` (all attn2 parameters by default), notebook 06. ``x_t`` from the concept's reference set (ESD
    samples it with DDIM from ``c``: the same distribution on the bundled model, at no sampling cost)."""
    c0 = model.empty()

    def loss(X, T, E, I, weights):
        with torch.no_grad():
            E0 = c0.expand(len(X), -1, -1)
            e_c, e_0 = model.eps(torch.cat([X, X]), torch.cat([T, T]), torch.cat([E, E0])).chunk(2)
            target = e_0 - s["eta"] * (e_c - e_0)  # eps(c0) - eta (eps(c) - eps(c0))
        return F.mse_loss(model.eps(X, T, E, weights), target)

    return finetune(model, concepts, s, loss, "esd", progress, checkpoint=checkpoint)


def anchor_latents(model, prompts, n: int, steps: int, seed: int = 0) -> torch.Tensor:
    """``x_0`` of the anchor distribution: ``n`` images the frozen model generates from the anchor prompts
    (Ablating Concepts' model-based variant), in the UNet's input space."""
    ps = [prompts[i % len(prompts)] for i in range(n)]
    imgs = model.sample(ps, seeds=range(seed, seed + n), steps=steps)
    return model.to_latent(imgs * 2 - 1)


def ablating(model, concepts, s: dict, anchor=None, progress: bool = False, checkpoint=None) -> Delta:
    """Ablating Concepts, model-based: ``MSE(eps'(x_t,c), sg(eps(x_t,c*)))`` with ``c*`` the anchor of each concept
    prompt (default: the concept set's rule, ``"an object in striped style" -> "an object"``) and ``x_t`` from images
    the frozen model generates for the anchors (``n_anchor`` images, ``anchor_steps`` DDIM steps), notebook 06."""
    anchor_prompts = [anchors_for(model, c, anchor) for c in concepts]
    anchors = [model.embed(a) for a in anchor_prompts]
    lat = [anchor_latents(model, a, s["n_anchor"], s["anchor_steps"], s["seed"]) for a in anchor_prompts]

    def loss(X, T, E, I, weights):
        A = torch.stack([anchors[i][j] for i, j in I.tolist()])  # c* of each image's prompt
        with torch.no_grad():
            target = model.eps(X, T, A)
        return F.mse_loss(model.eps(X, T, E, weights), target)

    return finetune(model, concepts, s, loss, "ablating", progress, latents=lat,
                    extra_info=dict(anchors=[p for a in anchor_prompts for p in a]), checkpoint=checkpoint)


def concept_positions(model, prompt: str, words) -> list[int]:
    """Token positions (BOS = 0) of ``words`` in ``prompt``: Forget-Me-Not's attention targets."""
    ids = model.token_ids(prompt)
    pos = []
    for w in words:
        sub = model.tokenizer(w, add_special_tokens=False).input_ids
        for i in range(1, len(ids) - len(sub) + 1):
            if ids[i:i + len(sub)] == sub:
                pos += list(range(i, i + len(sub)))
    if not pos:
        raise ValueError(f"none of the words {list(words)} occurs in {prompt!r}; pass words= naming tokens of the "
                         "concept")
    return sorted(set(pos))


def fmn(model, concepts, s: dict, words=None, progress: bool = False, checkpoint=None) -> Delta:
    """Forget-Me-Not's attention re-steering, notebook 06: minimise the cross-attention probability mass on the
    concept's token positions, ``mean over layers, images, heads and queries of sum_{j in P} softmax(q k^T)_j``,
    captured by a temporary attention processor (:func:`capture_cross_attention`), on all attn2 parameters.
    ``words``: the concept's words (default: the concept's name)."""
    masks = []
    for c in concepts:
        ws = words or [c.name]
        m = torch.zeros(len(c.prompts), model.max_length, device=model.device)
        for j, p in enumerate(c.prompts):
            m[j, concept_positions(model, p, ws)] = 1.0
        masks.append(m)

    def loss(X, T, E, I, weights):
        P = torch.stack([masks[i][j] for i, j in I.tolist()])  # (B, L) concept positions
        with capture_cross_attention(model) as store:
            model.predict(X, T, E, weights)
        mass = [(a * P[:, None, None, :]).sum(-1).mean() for a in store]  # attention mass on P, per layer
        return torch.stack(mass).mean()

    return finetune(model, concepts, s, loss, "fmn", progress, checkpoint=checkpoint)


def all_but_one(model, concepts, s: dict, anchor=None, instructions=None, progress: bool = False,
                checkpoint=None) -> Delta:
    """All-but-One's surgical loss (its Eqs. 12-13), notebook 06::

        || g2 (eps'(z,c) - sg(eps'(z,c0))) - [g1 (eps(z,c') - eps(z,c0)) + delta] ||^2
            + lam ||eps'(z,c0) - eps(z,c0)||^2

    ``c'`` = the anchor (replacing concept; default: the concept set's rule). The explicit erasing signal is
    ``delta = sum_k g_k beta_k (eps(z,c_k) - eps(z,c0))`` over instruction prompts ``c_k`` with guidance ``g_k``,
    ``beta_k`` keeping only elements with ``|eps(z,c_k) - eps(z,c0)|`` at or above their ``kappa`` quantile per
    image (the SEGA-style bottleneck). Default instructions: the concept prompt itself with ``g = -erase_scale``
    (push away from the concept where it is most salient). ``z`` comes from the concept's reference set, not from
    DDIM sampling of ``c'`` as in the paper, and the timestep window of beta is not applied (all t); Adam instead of
    AdamW (the difference is weight decay, 0 here)."""
    c0 = model.empty()
    anchor_prompts = [anchors_for(model, c, anchor) for c in concepts]
    anchors = [model.embed(a) for a in anchor_prompts]

    def loss(X, T, E, I, weights):
        A = torch.stack([anchors[i][j] for i, j in I.tolist()])
        n = len(X)
        E0 = c0.expand(n, -1, -1)
        with torch.no_grad():
            e_a, e_0, e_c = model.eps(torch.cat([X, X, X]), torch.cat([T, T, T]), torch.cat([A, E0, E])).chunk(3)
            target = s["g1"] * (e_a - e_0)  # g1 (eps(z,c') - eps(z,c0))
            if instructions is None:
                pairs = [(e_c, -s["erase_scale"])]  # the concept itself, negative guidance
            else:
                pairs = [(model.eps(X, T, model.embed([p]).expand(n, -1, -1)), g) for p, g in instructions]
            for e_k, g_k in pairs:
                d = e_k - e_0
                q = torch.quantile(d.abs().flatten(1), s["kappa"], dim=1).view(-1, 1, 1, 1)
                target = target + g_k * (d.abs() >= q).float() * d  # delta = g_k beta_k (eps(c_k) - eps(c0))
        e_c_new, e_0_new = model.eps(torch.cat([X, X]), torch.cat([T, T]), torch.cat([E, E0]), weights).chunk(2)
        concept = F.mse_loss(s["g2"] * (e_c_new - e_0_new.detach()), target)  # sg on the unconditional term
        penalty = F.mse_loss(e_0_new, e_0)  # ||eps'(z,c0) - eps(z,c0)||^2
        return concept + s["lam"] * penalty

    return finetune(model, concepts, s, loss, "all_but_one", progress,
                    extra_info=dict(anchors=[p for a in anchor_prompts for p in a]), checkpoint=checkpoint)
