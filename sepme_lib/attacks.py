"""Erased or only hidden? Three attacks that look for a way back to an erased concept on the edited model, and the
measurement of what no increment that keeps its protected prompts exact can block.

Introduced in ``notebooks/09_erased_or_hidden.ipynb``. Each attack takes the edited model (``model`` with the
``deltas`` applied, the original weights never change) and returns the conditions it found (``embeddings``
``(n, L, d_in)``, one per evaluation prompt of the concept), a readable form of them (``prompts``) and what it cost
(``budget``, ``seconds``); :func:`run` samples the edited model from them and asks the judge.

* ``derived`` -- RECE's closed form (its Eq. 8): the embedding ``c'`` whose keys and values under the edited weights
  best match what the prompt gives the original model; no search at all.
* ``inversion`` -- textual inversion on the edited model (as "Circumventing Concept Erasure" does): one new token
  vector ``v`` learned by the denoising loss on the concept's reference images, the edited model frozen, then used
  in the evaluation captions in place of the concept's word ("a red star in <v> style").
* ``prompt_search`` -- a discrete search over the tokenizer's vocabulary (UnlearnDiffAtk-style, greedy coordinate
  descent on the same denoising loss): ``k`` real tokens put before the concept's word (or in its place with
  ``keep_word=False``), never the word itself nor a piece of it.

:func:`span_share` is the limit (notebook 09): the part of an attack condition inside the span of an increment's
protected rows reaches the edited model's keys and values unchanged, whatever the increment.
"""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from .classifier import accuracy
from .concepts import Concept, as_concepts, concept_set
from .config import BadValue
from .deltas import combine, edited_weights
from .nullspace import null_space, stack_rows

NAMES = ("derived", "inversion", "prompt_search")


# ------------------------------------------------------------------------------------------- closed form
def kv_weights(model) -> dict:
    """``{name: W}`` of every attn2 to_k/to_v (detached)."""
    return {k: v.detach() for k, v in model.params(model.kv_weight_names()).items()}


def derive_embedding(W_new: dict, W_old: dict, c: torch.Tensor, reg: float = 1e-3) -> torch.Tensor:
    """RECE Eq. (8): ``c' = (reg I + sum_i W_i'^T W_i')^-1 (sum_i W_i'^T W_i) c`` over the matrices ``W_i`` (every
    attn2 to_k/to_v), row by row of ``c`` (``(..., d_in)``): the embedding that makes the edited model's keys and
    values closest to what ``c`` gives the original model (notebooks 06 and 09)."""
    names = list(W_old)
    d_in = W_old[names[0]].shape[1]
    Wn = torch.cat([W_new.get(k, W_old[k]).detach().to("cpu", torch.float64) for k in names])  # stacked W'
    Wo = torch.cat([W_old[k].detach().to("cpu", torch.float64) for k in names])  # stacked W
    G = reg * torch.eye(d_in, dtype=torch.float64) + Wn.T @ Wn  # reg I + sum W'^T W'
    H = Wn.T @ Wo  # sum W'^T W
    flat = c.detach().to("cpu", torch.float64).reshape(-1, d_in)
    out = torch.linalg.solve(G, H @ flat.T).T  # c' = G^-1 H c  (row-wise)
    return out.reshape(c.shape).to(c.device, torch.float32)


def derived_embeddings(model, deltas, emb: torch.Tensor, reg: float = 1e-3) -> torch.Tensor:
    """:func:`derive_embedding` of ``emb`` for the edited model ``theta + sum dTheta`` (only to_k/to_v matter)."""
    W0 = kv_weights(model)
    total = combine(list(deltas)) if deltas else {}
    Wn = {k: W0[k] + total[k].to(W0[k].device, W0[k].dtype) for k in W0 if k in total}
    return model.with_context(emb, derive_embedding(Wn, W0, model.context(emb), reg))  # SDXL: the pooled part kept


# ------------------------------------------------------------------------------------- token-level tools
def _tables(model) -> list:
    """``[(parameter name, weight)]`` of the token table of each text encoder (two on SDXL)."""
    out = []
    for enc in (model.text_encoder, model.text_encoder_2):
        if enc is not None:
            w = enc.get_input_embeddings().weight
            out.append((next(n for n, p in enc.named_parameters() if p is w), w))
    return out


def token_table(model) -> torch.Tensor:
    """The token table ``(vocab, d_tok)``; on SDXL the two encoders' tables side by side (``d_1 + d_2``): a token
    vector of the attacks is one row of it (notebook 09)."""
    return torch.cat([w for _, w in _tables(model)], dim=-1)


def encode_ids(model, ids: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
    """The condition (``model.encode_tokens``) of token ids ``(B, L)``; ``extra`` ``(k, d_tok)``: new token vectors,
    read where ``ids`` are ``vocab, vocab + 1, ...`` (appended to the table for this call only; differentiable). On
    SDXL both encoders read ``ids`` and each its own part of a vector (the second encoder is then padded as the first
    tokenizer pads, not with the released second tokenizer's own padding token)."""
    ids = ids.to(model.device)
    if extra is None:
        return model.encode_tokens(ids)
    ws, at = [], 0
    for name, w in _tables(model):
        ws.append({name: torch.cat([w, extra[:, at:at + w.shape[1]].to(w.dtype)])})
        at += w.shape[1]
    return model.encode_tokens(ids, weights=ws[0], weights_2=ws[1] if len(ws) > 1 else None)


def replaced_ids(model, prompts, word: str, new: list, keep: bool = False) -> torch.Tensor:
    """Token ids of ``prompts`` (padded to ``L``) with the tokens of ``word`` replaced by the ids ``new`` (``keep``:
    ``new`` inserted before the word, which stays)."""
    tok = model.tokenizer
    old = tok(word, add_special_tokens=False).input_ids
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = []
    for p in prompts:
        ids = tok(p, truncation=True, max_length=model.max_length).input_ids
        at = next((i for i in range(len(ids)) if ids[i:i + len(old)] == old), None)
        if at is None:
            raise BadValue(f"the prompt {p!r} does not contain the concept's word {word!r}")
        ids = ids[:at] + list(new) + ids[at + (0 if keep else len(old)):]
        if len(ids) > model.max_length:
            raise BadValue(f"{p!r} with {len(new)} attack tokens is longer than the model's {model.max_length} tokens")
        rows.append(ids + [pad] * (model.max_length - len(ids)))
    return torch.tensor(rows)


def banned_tokens(model, word: str) -> set:
    """Ids ``prompt_search`` may not use: the word's tokens, every vocabulary entry that is a piece of the word
    (its BPE prefixes: "stri", "stripe", ...), and the special tokens."""
    tok = model.tokenizer
    w = word.lower().replace(" ", "")
    out = set(tok(word, add_special_tokens=False).input_ids) | set(tok.all_special_ids)
    return out | {i for t, i in tok.get_vocab().items() if len(t.replace("</w>", "")) > 1 and t.replace("</w>", "") in w}


def denoise_batch(model, concept: Concept, n: int, seed: int):
    """A fixed batch ``(x_t, t, noise)`` of the concept's reference latents (one ``x_t`` per caption)."""
    g = torch.Generator().manual_seed(seed)
    z0 = concept.latents[torch.randint(0, len(concept.latents), (n,), generator=g)]
    t = torch.randint(0, model.num_train_timesteps, (n,), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    t = t.to(model.device)
    return model.add_noise(z0.to(model.device), noise.to(model.device), t), t, noise.to(model.device)


# ----------------------------------------------------------------------------------------------- attacks
def derived(model, deltas, concept: Concept, prompts, reg: float = 1e-3, **_) -> dict:
    """RECE's ``c'`` of each evaluation prompt for the edited model (no budget: one linear solve)."""
    return dict(embeddings=derived_embeddings(model, deltas, model.embed(prompts), reg), prompts=list(prompts),
                budget=f"closed form, reg {reg:g}")


def inversion(model, deltas, concept: Concept, prompts, steps: int = 300, lr: float = 5e-3, batch: int = 4,
              seed: int = 0, progress: bool = False, **_) -> dict:
    """Textual inversion on the edited model: ``v`` minimises ``||eps_{theta+dtheta}(x_t, c(caption with <v>), t) -
    eps||^2`` over the concept's reference latents, starting at the concept word's own vector. The captions are the
    concept's prompts with ``<v>`` for its word (on the bundled world "an object in <v> style", "a red circle in <v>
    style", ...; on SD the artist templates). The main prompt alone ("an object in <v> style", which fits every
    reference image) recovered less on the bundled model (0.15 against 0.5 on the bundled striped increment, 300 steps)."""
    weights = edited_weights(model, deltas) if deltas else None
    captions = list(concept.prompts)  # the concept's prompts with <v> for its word
    table = token_table(model)
    vocab = table.shape[0]
    first = model.tokenizer(concept.name, add_special_tokens=False).input_ids
    v = table[first].detach().float().mean(0, keepdim=True).clone().requires_grad_(True)  # start: the word itself
    ids = replaced_ids(model, captions, concept.name, [vocab])
    opt = torch.optim.Adam([v], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _step in tqdm(range(steps), desc=f"inversion {concept.name}", leave=False, disable=not progress):
        j = torch.randint(0, len(concept.latents), (batch,), generator=gen)
        t = torch.randint(0, model.num_train_timesteps, (batch,), generator=gen).to(model.device)
        noise = torch.randn(concept.latents[j].shape, generator=gen).to(model.device)
        x_t = model.add_noise(concept.latents[j].to(model.device), noise, t)
        c = encode_ids(model, ids[torch.randint(0, len(ids), (batch,), generator=gen)], v)
        loss = (model.eps(x_t, t, c, weights) - noise).pow(2).mean()  # the denoising loss, edited model frozen
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        emb = encode_ids(model, replaced_ids(model, prompts, concept.name, [vocab]), v.detach())
    return dict(embeddings=emb, prompts=[p.replace(concept.name, "<v>") for p in prompts], vector=v.detach(),
                budget=f"{steps} steps x {batch} images, Adam {lr:g}")


def prompt_search(model, deltas, concept: Concept, prompts, tokens: int = 3, sweeps: int = 2, batch: int = 16,
                  candidates: int = 0, keep_word: bool = False, seed: int = 0, progress: bool = False, **_) -> dict:
    """Greedy coordinate search over real tokens: ``tokens`` vocabulary tokens are placed just before the concept's
    word (``keep_word=True``, UnlearnDiffAtk's adversarial prompt: the erased word stays, its context is searched)
    or replace it (``keep_word=False``: a prompt without the word). Position by position, every allowed token (or
    ``candidates`` drawn at random from them, on a large vocabulary) is tried and the one with the lowest denoising
    loss of the edited model on a fixed batch of reference ``x_t`` is kept; ``sweeps`` passes. Never allowed: the
    word's tokens and pieces of it (:func:`banned_tokens`)."""
    weights = edited_weights(model, deltas) if deltas else None
    cs = concept_set(model)
    captions = cs.prompts(concept.name, 4) if concept.name in cs.evaluate else list(concept.prompts)
    bad = banned_tokens(model, concept.name)
    vocab = _tables(model)[0][1].shape[0]  # rows of the token table (both tables have them on SDXL)
    allowed = torch.tensor([i for i in range(min(len(model.tokenizer), vocab)) if i not in bad])
    x_t, t, noise = denoise_batch(model, concept, batch, seed)
    cap = [captions[k % len(captions)] for k in range(batch)]
    filler = model.tokenizer("a", add_special_tokens=False).input_ids[0]
    found = [filler if filler not in bad else int(allowed[0])] * tokens

    @torch.no_grad()
    def losses(choices, chunk: int = 16):  # the denoising loss of each choice on the same batch, several per pass
        out = []
        for k in range(0, len(choices), chunk):
            part = choices[k:k + chunk]
            ids = torch.cat([replaced_ids(model, cap, concept.name, ch, keep_word) for ch in part])
            e = model.eps(x_t.repeat(len(part), 1, 1, 1), t.repeat(len(part)), encode_ids(model, ids), weights)
            out += (e - noise.repeat(len(part), 1, 1, 1)).pow(2).flatten(1).mean(1).view(len(part), -1).mean(1).tolist()
        return out

    best, tried = losses([found])[0], 1
    for _sweep in range(sweeps):
        for pos in tqdm(range(tokens), desc=f"prompt search {concept.name}", leave=False, disable=not progress):
            pool = allowed if not candidates or candidates >= len(allowed) else allowed[torch.randperm(
                len(allowed), generator=torch.Generator().manual_seed(seed + pos))[:candidates]]
            trials = [found[:pos] + [tok_id] + found[pos + 1:] for tok_id in pool.tolist()]
            values = losses(trials)
            tried += len(trials)
            k = min(range(len(values)), key=values.__getitem__)
            if values[k] < best:
                best, found = values[k], trials[k]
    ids = replaced_ids(model, prompts, concept.name, found, keep_word)
    with torch.no_grad():
        emb = encode_ids(model, ids)
    words = model.tokenizer.decode(found).strip()
    text = f"{words} {concept.name}" if keep_word else words
    return dict(embeddings=emb, prompts=[p.replace(concept.name, text) for p in prompts], tokens=found,
                loss=best, budget=f"{tokens} tokens x {sweeps} sweeps ({tried} loss evaluations of {batch} x_t)")


ATTACKS = {"derived": derived, "inversion": inversion, "prompt_search": prompt_search}


def run(model, judge, deltas, concept, attack: str, n: int = 20, seed: int = 0, sample_steps=None,
        images: bool = False, **settings) -> dict:
    """Attack ``concept`` (a name or :class:`Concept`) on ``model + sum deltas`` and judge it: ``acc`` = the judge's
    ACC of the erased concept on ``n`` images sampled (``sample_steps`` DDIM steps) from the attack's conditions
    (attack success; the evaluation seeds and captions of ``acc_table``), with the attack's ``prompts``, ``budget``
    and ``seconds``. ``settings``: the attack's budget (e.g. ``steps``, ``lr``, ``batch`` of :func:`inversion`)."""
    if attack not in ATTACKS:
        raise BadValue(f"unknown attack {attack!r}; use one of {', '.join(NAMES)}")
    deltas = list(deltas or [])
    (concept,) = as_concepts(model, [concept])
    cs = concept_set(model)
    prompts = cs.eval_prompts(concept.name, n, seed)
    t0 = time.time()
    out = ATTACKS[attack](model, deltas, concept, prompts, seed=seed, **settings)
    seconds = time.time() - t0
    w = edited_weights(model, deltas) if deltas else None
    imgs = model.sample(None, seeds=range(seed, seed + n), steps=sample_steps, weights=w, embeddings=out["embeddings"])
    out.update(attack=attack, concept=concept.name, acc=accuracy(judge, imgs, cs.kind(concept.name), concept.name),
               n=n, seconds=round(seconds, 2))
    if images:
        out["images"] = imgs
    return out


# ------------------------------------------------------------------------------------------------- limit
def span_share(model, emb: torch.Tensor, protected) -> torch.Tensor:
    """``||P_A c'||^2 / ||c'||^2`` per condition: the share of each attack condition (``(n, L, d_in)``, all rows)
    inside the span of the protected rows ``A`` (the prompts an increment leaves exactly unchanged; ``""`` is
    ``c_0``). That part reaches the edited keys and values as it reaches the original ones."""
    P = span_projector(model, protected)
    ctx = model.context(emb)
    flat = ctx.reshape(len(ctx), -1, ctx.shape[-1]).to(P.device, torch.float64)
    return ((flat @ P).pow(2).sum((1, 2)) / flat.pow(2).sum((1, 2)).clamp_min(1e-30)).float()


def span_projector(model, protected) -> torch.Tensor:
    """``P_A``: the orthogonal projector onto the span of the protected prompts' rows (``d_in x d_in``, float64)."""
    ns = null_space(stack_rows(model, list(protected)))
    S = ns.basis.to(torch.float64)
    return torch.eye(S.shape[0], dtype=torch.float64, device=S.device) - S @ S.T


def from_span(model, judge, emb: torch.Tensor, protected, concept: str, seed: int = 0, steps=None) -> float:
    """The original model's ACC of ``concept`` on images from ``P_A c'`` alone (the part of the attack no
    increment with exact protection of ``A`` can change)."""
    P = span_projector(model, protected).float().to(emb.device)
    imgs = model.sample(None, seeds=range(seed, seed + len(emb)), steps=steps,
                        embeddings=model.with_context(emb, model.context(emb) @ P))
    cs = concept_set(model)
    return accuracy(judge, imgs, cs.kind(concept), concept)
