"""Layer 2, core ops: concepts and their reference sets, concept representations and the correlation loss,
the eta balance and the momentum stop, null spaces, and the leakage certificate.

Each function names the SepME equation it computes (paper: ``shared/papers/sepme_...txt``) and the
notebook that introduces it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import world


# ------------------------------------------------------------------------------------------ concepts
@dataclass
class Concept:
    """A concept to erase: its name, the prompts that stand for it, and reference latents ``x_0``.

    ``prompts[0]`` is the concept's main prompt (``.prompt``); further prompts are variants (other shapes,
    colours) that the erasure trains on and that the other concepts' null spaces protect.
    """

    name: str
    prompts: list
    latents: torch.Tensor  # (N, C, H, W) in the UNet's input space
    emb: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        self.prompts = [self.prompts] if isinstance(self.prompts, str) else list(self.prompts)
        if not self.prompts:
            raise ValueError(f"concept {self.name!r} needs at least one prompt")

    @property
    def prompt(self) -> str:
        return self.prompts[0]

    def embedding(self, model) -> torch.Tensor:
        """Embeddings of all the concept's prompts, ``(k, L, d_in)`` (cached)."""
        if self.emb is None:
            self.emb = model.embed(self.prompts)
        return self.emb


def make_concept(model, name: str, prompt=None, n_ref: int = 64, seed: int = 0, n_prompts: int = 4) -> Concept:
    """A :class:`Concept` with its reference set (notebook 02).

    On the bundled model a world concept ("striped", "star") takes world renders as ``x_0`` and
    ``world.concept_prompts(name, n_prompts)`` as its prompts. Any other concept (and any concept on Stable
    Diffusion) needs ``prompt`` (a string or a list) and takes ``x_0`` from images the original model
    generates for its first prompt.
    """
    if model.name == "tiny" and prompt is None:
        prompts = world.concept_prompts(name, n_prompts)  # raises with the list of known names
        imgs = torch.from_numpy(world.reference_images(name, n_ref, seed=seed))
        return Concept(name, prompts, model.to_latent(imgs))
    if prompt is None:
        raise ValueError(f"concept {name!r} needs a prompt on model {model.name!r} (e.g. make_concept(model, "
                         f"'van_gogh', prompt='a painting in the style of Van Gogh'))")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    imgs = model.sample([prompts[0]] * n_ref, seeds=range(seed, seed + n_ref)) * 2 - 1
    return Concept(name, prompts, model.to_latent(imgs))


def make_concepts(model, names, n_ref: int = 64, seed: int = 0, n_prompts: int = 4) -> list[Concept]:
    """World concepts by name (the bundled model), each with ``n_prompts`` prompts and ``n_ref`` renders."""
    names = [names] if isinstance(names, str) else list(names)
    if len(set(names)) != len(names):
        raise ValueError(f"concept names repeat: {names}")
    return [make_concept(model, n, n_ref=n_ref, seed=seed + 1000 * k, n_prompts=n_prompts) for k, n in enumerate(names)]


# ---------------------------------------------------------------------------- representations, L_cor
def concept_representation(eps_c: torch.Tensor, eps_0: torch.Tensor) -> torch.Tensor:
    """``r_theta(c) = eps_theta(x_t, c, t) - eps_theta(x_t, c_0, t)`` (the concept representation, Eq. 2)."""
    return eps_c - eps_0


def correlation_loss(r: torch.Tensor, r_new: torch.Tensor) -> torch.Tensor:
    """``L_cor = mean(r_theta(c) * r_{theta+dtheta}(c))`` over batch and elements (Eq. 2).

    ``r`` comes from the frozen model (no gradient). Starts at ``mean(r^2) > 0``; may go below zero.
    """
    return (r.detach() * r_new).mean()


def eta_weights(rs, r_news) -> list[float]:
    """``eta_i = ||r(c_1) * r'(c_1)||_2 / ||r(c_i) * r'(c_i)||_2`` (Eq. 3), detached; ``eta_1 = 1``."""
    norms = [float((r.detach() * rn.detach()).norm()) for r, rn in zip(rs, r_news)]
    return [norms[0] / max(n, 1e-30) for n in norms]


class MomentumStop:
    """Momentum early stopping (Eq. 4): ``L_mom = alpha * L_mom + (1 - alpha) * L`` (started at the first
    value); stop when ``L_mom <= tau`` after at least ``warmup`` steps, or at ``cap`` steps."""

    def __init__(self, alpha: float = 0.9, tau: float = 0.0, warmup: int = 10, cap: int = 1000):
        if not 0 <= alpha < 1:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        if cap < 1:
            raise ValueError(f"the step cap must be at least 1, got {cap}")
        self.alpha, self.tau, self.warmup, self.cap = alpha, tau, warmup, cap
        self.value: float | None = None
        self.steps = 0
        self.history: list[float] = []
        self.reason: str | None = None

    def update(self, loss: float) -> bool:
        """Feed one (detached) loss value; returns True when training should stop."""
        loss = float(loss)
        self.value = loss if self.value is None else self.alpha * self.value + (1 - self.alpha) * loss
        self.steps += 1
        self.history.append(self.value)
        if self.steps >= self.warmup and self.value <= self.tau:
            self.reason = f"L_mom {self.value:.3g} <= tau {self.tau:g} at step {self.steps}"
            return True
        if self.steps >= self.cap:
            self.reason = f"step cap {self.cap} reached (L_mom {self.value:.3g})"
            return True
        return False


def l1_regulariser(tensors) -> torch.Tensor:
    """``(1/M) sum_l ||dW_l||_1`` over the M trainable tensors (the lambda term of G-CiRs and Eq. 11)."""
    tensors = list(tensors)
    return sum(t.abs().sum() for t in tensors) / len(tensors)


# ---------------------------------------------------------------------------------------- null space
NULL_RTOL = 1e-6  # singular values below NULL_RTOL * s_max count as zero


class CapacityError(ValueError):
    """The null space left for a concept is too small to train a meaningful increment."""


def stack_rows(model, prompts) -> torch.Tensor:
    """``A``: all ``L`` rows of every prompt's embedding stacked, ``(k*L, d_in)`` (Eq. 5)."""
    prompts = list(prompts)
    embs = [model.empty()[0] if p == "" else model.embed([p])[0] for p in prompts]
    return torch.cat(embs)


def null_space(A: torch.Tensor, rtol: float = NULL_RTOL):
    """Orthonormal basis ``S`` (``d_in x n_null``) of ``{x : A x = 0}`` by SVD in float64 (Eqs. 6-9).

    Returns ``(S, singular_values, rank)``; singular values under ``rtol * s_max`` count as zero.
    """
    A64 = A.detach().to(torch.float64).cpu()
    _, s, vh = torch.linalg.svd(A64, full_matrices=True)
    rank = int((s > rtol * s.max()).sum()) if s.numel() else 0
    S = vh[rank:].T.contiguous()
    return S, s, rank


def check_capacity(n_null: int, d_in: int, rank: int, n_prompts: int, name: str, minimum: int) -> None:
    if n_null < minimum:
        raise CapacityError(
            f"the null space left for concept {name!r} has dimension {n_null} (= d_in {d_in} - rank {rank} of "
            f"{n_prompts} protected prompts), below the minimum {minimum}. Protect fewer prompts, use a "
            "shorter tokenizer length, or erase in several iterative stages (SepME_2).")


def leakage(model, tensors: dict, prompts) -> dict:
    """Certificate of separability: for each prompt, ``max_l ||A dW_l^T|| / ||A W_l^T||`` over edited
    to_k/to_v matrices, with ``A`` the prompt's ``L`` embedding rows (notebook 03).

    It certifies decoupled (SepME) increments, which only touch to_k/to_v. A G-CiRs increment also edits
    to_q and to_out, which act on every prompt; for it this number understates the change."""
    params = dict(model.unet.named_parameters())
    out = {}
    for p in prompts:
        A = model.empty()[0] if p == "" else model.embed([p])[0]
        worst = 0.0
        for k, dW in tensors.items():
            if not (k.endswith("to_k.weight") or k.endswith("to_v.weight")):
                continue
            W = params[k].detach().float()
            num = (A @ dW.to(A.device, torch.float32).T).norm()
            den = (A @ W.T).norm()
            worst = max(worst, float(num / den))
        out[p] = worst
    return out


def capacity_table(model, prompt_sets) -> list[dict]:
    """Null-space dimension for growing sets of protected prompts (notebook 03's capacity plot)."""
    rows = []
    for prompts in prompt_sets:
        A = stack_rows(model, prompts)
        S, s, rank = null_space(A)
        rows.append(dict(prompts=len(prompts), rows=A.shape[0], rank=rank, null_dim=S.shape[1]))
    return rows


def rng_choice(gen: torch.Generator, n: int, k: int) -> torch.Tensor:
    return torch.randint(0, n, (k,), generator=gen)
