"""G-CiRs (paper Sec. 3.1, Eqs. 2-4, Algorithm 1): the concept representation, the correlation loss, the
eta balance, momentum early stopping, the L1 term, and the one training loop every SepME mode uses.

Introduced in ``notebooks/02_gcirs_correlation_loss.ipynb`` (which writes the loop out once and checks it equals
:func:`gcirs` at the same seed).

Every step of :func:`train` (Algorithm 1; Algorithm 2 runs it on decoupled increments):

1. for each active concept ``i``, ``x_t`` from its reference set (``concepts.draw_batch``);
2. the frozen model's ``r_theta(c_i) = eps_theta(x_t, c_i, t) - eps_theta(x_t, c_0, t)``, without gradient;
3. the edited model ``theta + sum_g dTheta_g`` in one pass (``torch.func.functional_call``, no UNet copy), skipping
   its empty-prompt pass when every increment protects ``c_0`` (its output then equals the frozen one);
4. ``L = (sum_i eta_i L_cor_i + lambda * L1) / |active|`` (Eqs. 2, 3, 5, 11), one Adam step per increment, gradients
   cleared every step (the authors' code never clears them, so its Adam sees summed gradients: not copied);
5. each concept's momentum monitor (Eq. 4) sees its own unweighted ``L_cor_i``; when it stops, the concept leaves
   the active set, and an increment whose concepts have all stopped is frozen at that step.

``eta_i`` stays relative to concept 1 even after concept 1 has stopped: its representation is still computed (its
increment frozen), as in the authors' joint-mode code.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .concepts import draw_batch
from .config import BadValue, SepmeError
from .deltas import Delta

L1_FORMS = ("delta", "w", "w_mean")
SINGLE_MODES = ("anchors", "plain")
PROTECTIONS = ("prompt", "concept")
TARGETS = ("decorrelate", "anchor")


@dataclass
class Settings:
    """Hyper-parameters of a G-CiRs / SepME run. The defaults here are the paper's (Stable Diffusion 1.4);
    ``methods.DEFAULTS`` holds the tuned values of the bundled model, and ``erase()`` picks them by model family."""

    lr: float = 1e-2            # Adam learning rate of the decoupled w (SepME, Eq. 10)
    gcirs_lr: float = 1e-6      # Adam learning rate of dW when G-CiRs edits weights directly (Algorithm 1)
    beta: float = 1e-4          # dW = beta * w @ S^T (Eq. 10)
    lam: float = 3e-5           # L1 weight (Eq. 11)
    l1: str = "delta"           # what the L1 term penalises: "delta" (dW, the authors' code), "w" (Eq. 11), "w_mean"
    alpha: float = 0.9          # momentum of the stop monitor (Eq. 4)
    tau: float = 0.0            # stop threshold (Eq. 4) of decoupled increments (SepME); or one per concept
    gcirs_tau: float = 0.0      # stop threshold of increments G-CiRs trains directly
    cap: int = 1000             # step cap
    warmup: int = 10            # stop test only at 0-based steps i > warmup (the authors' i > 10: >= 12 steps)
    batch: int = 1              # reference images per concept per step
    seed: int = 0
    min_null_dim: int = 16      # smaller null spaces are refused (CapacityError)
    single: str = "plain"       # one concept alone: "plain" (A = {c_0}) or "anchors" (also protect its anchors)
    single_warmup: int = 150    # with single="anchors": at least this many steps before the stop test
    # beyond the paper (notebook 08; the defaults below are the paper's behaviour):
    protection: str = "prompt"  # "prompt": A_i = c_0 + listed prompts; "concept": + a soft null space of many captions
    soft: float = 0.0           # protection="concept": relative eigenvalue cut of the prior (nullspace.null_space)
    target: str = "decorrelate"  # "decorrelate": L_cor (Eq. 2); "anchor": match the anchor's representation
    anchor_tau: float = 0.3     # target="anchor": stop when the momentum of the anchor residual is below it
    cache: int = 0              # x_t per concept drawn once with their frozen outputs, reused (0: fresh every step)

    def __post_init__(self):
        for k in ("lr", "gcirs_lr", "beta"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v != v or v == float("inf"):
                raise BadValue(f"{k} must be a finite number > 0, got {v!r}")
        if self.beta > 1e3:
            raise BadValue(f"beta (dW = beta * w S^T) must be at most 1e3, got {self.beta!r}: larger values overflow "
                           "float32 in training. The paper uses 1e-4 (the bundled model 5e-2)")
        taus = list(self.tau) if isinstance(self.tau, (list, tuple)) else [self.tau]
        for k, values in (("lam", [self.lam]), ("alpha", [self.alpha]), ("tau", taus), ("gcirs_tau", [self.gcirs_tau])):
            for v in values:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or abs(v) == float("inf"):
                    raise BadValue(f"{k} must be a finite number" + (" (or one per concept)" if k == "tau" else "")
                                     + f", got {getattr(self, k)!r}")
        if self.lam < 0:
            raise BadValue(f"lam must be >= 0, got {self.lam}")
        for k, lo in (("cap", 1), ("warmup", 0), ("batch", 1), ("seed", 0), ("min_null_dim", 1), ("single_warmup", 0)):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo or v >= 2**63:
                raise BadValue(f"{k} must be a whole number >= {lo} (and below 2**63), got {v!r}")
        if self.l1 not in L1_FORMS:
            raise BadValue(f"l1 must be one of {L1_FORMS}, got {self.l1!r}")
        if self.single not in SINGLE_MODES:
            raise BadValue(f"single must be one of {SINGLE_MODES}, got {self.single!r}")
        if self.protection not in PROTECTIONS:
            raise BadValue(f"protection must be one of {PROTECTIONS}, got {self.protection!r}")
        if self.target not in TARGETS:
            raise BadValue(f"target must be one of {TARGETS}, got {self.target!r}")
        for k, ok in (("soft", lambda v: 0 <= v < 1), ("anchor_tau", lambda v: 0 < v < 10)):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or not ok(v):
                raise BadValue(f"{k} must be a number in " + ("[0, 1)" if k == "soft" else "(0, 10)") + f", got {v!r}")
        if isinstance(self.cache, bool) or not isinstance(self.cache, int) or self.cache < 0:
            raise BadValue(f"cache must be a whole number >= 0 (x_t per concept; 0: no cache), got {self.cache!r}")

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# ------------------------------------------------------------------------------------------------ Eqs. 2-4
def concept_representation(eps_c: torch.Tensor, eps_0: torch.Tensor) -> torch.Tensor:
    """``r_theta(c) = eps_theta(x_t, c, t) - eps_theta(x_t, c_0, t)`` (the concept-irrelevant representation
    of Eq. 2)."""
    return eps_c - eps_0


def correlation_loss(r: torch.Tensor, r_new: torch.Tensor) -> torch.Tensor:
    """``L_cor = mean(r_theta(c) * r_{theta+dtheta}(c))`` over batch and elements (Eq. 2).

    ``r`` comes from the frozen model (no gradient). Starts at ``mean(r^2) > 0``; may go below zero."""
    return (r.detach() * r_new).mean()


def eta_weights(rs, r_news) -> list[float]:
    """``eta_i = ||r(c_1) * r'(c_1)||_2 / ||r(c_i) * r'(c_i)||_2`` (Eq. 3), detached; ``eta_1 = 1``.

    The paper's text writes the ratio of the losses ``|L_cor|``; the authors' code (followed here) divides the norms
    of the elementwise products, which never divides by a loss that crosses zero."""
    norms = [float((r.detach() * rn.detach()).norm()) for r, rn in zip(rs, r_news)]
    return [norms[0] / max(n, 1e-30) for n in norms]


def anchor_residual(r: torch.Tensor, r_new: torch.Tensor, r_anchor: torch.Tensor) -> torch.Tensor:
    """Beyond the paper (``target="anchor"``, notebook 08): ``||r_{theta+dtheta}(c) - r_theta(c_a)||^2 /
    ||r_theta(c) - r_theta(c_a)||^2`` over the batch, ``c_a`` the prompt's anchor (Ablating Concepts' and UCE's
    target): 1 at the start, 0 when the edited model treats ``c`` as its anchor. Scale-free, so ``eta = 1``."""
    return (r_new - r_anchor).pow(2).sum() / (r.detach() - r_anchor).pow(2).sum().clamp_min(1e-12)


def _frozen(model, X, T, E, E0, Ea=None):
    """The frozen model's ``eps(x_t, c_0)``, ``r_theta(c)`` and (with anchors ``Ea``) ``r_theta(c_a)``, one pass."""
    with torch.no_grad():
        if Ea is None:
            e_c, e_0 = model.eps(torch.cat([X, X]), torch.cat([T, T]), torch.cat([E, E0])).chunk(2)
            return e_0, concept_representation(e_c, e_0), None
        e_c, e_0, e_a = model.eps(torch.cat([X, X, X]), torch.cat([T, T, T]), torch.cat([E, E0, Ea])).chunk(3)
        return e_0, concept_representation(e_c, e_0), concept_representation(e_a, e_0)


def _pool(model, concepts, embs, aembs, c0, s, gen, edits) -> list:
    """``cache``: the first ``ceil(cache / batch)`` steps' batches (at most ``cap``) of every concept, drawn in the
    uncached loop's order, with their frozen outputs computed once, step by step as the uncached loop would (so a run
    that stops within the pool gives the same increments bit for bit); later steps cycle through them."""
    out = []
    for _ in range(min(-(-s.cache // s.batch), s.cap)):
        bs = [draw_batch(model, c.latents, e, s.batch, gen) for c, e in zip(concepts, embs)]
        X, T, E = (torch.cat([b[k] for b in bs]) for k in range(3))
        Ea = torch.cat([a[b[3]] for a, b in zip(aembs, bs)]) if aembs is not None else None
        e_0, r, r_a = _frozen(model, X, T, E, c0.expand(len(X), -1, -1), Ea)
        Ee = torch.cat([d[b[3]] for d, b in zip(edits, bs)])
        out.append(dict(X=X, T=T, E=E, Ee=Ee, e_0=e_0, r=r, r_a=r_a))
    return out


class MomentumStop:
    """Momentum early stopping (Eq. 4): ``L_mom = alpha * L_mom + (1 - alpha) * L`` (started at the first value).

    As the authors' code: stop when ``L_mom < tau`` (strictly) at a step whose 0-based index ``i`` is ``> warmup``
    (their ``i > 10``: with ``warmup = 10`` the earliest stop is after 12 steps), or when ``cap`` steps are done."""

    def __init__(self, alpha: float = 0.9, tau: float = 0.0, warmup: int = 10, cap: int = 1000):
        if not 0 <= alpha < 1:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ValueError(f"the step cap must be a whole number >= 1, got {cap!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be a whole number >= 0, got {warmup!r}")
        self.alpha, self.tau, self.warmup, self.cap = alpha, tau, warmup, cap
        self.value: float | None = None
        self.steps = 0
        self.history: list[float] = []
        self.reason: str | None = None

    def update(self, loss: float) -> bool:
        """Feed one (detached) loss value after a step; returns True when training should stop."""
        loss = float(loss)
        self.value = loss if self.value is None else self.alpha * self.value + (1 - self.alpha) * loss
        self.steps += 1
        self.history.append(self.value)
        if self.steps - 1 > self.warmup and self.value < self.tau:  # self.steps - 1 = the 0-based step index i
            self.reason = f"L_mom {self.value:.3g} < tau {self.tau:g} at step {self.steps}"
            return True
        if self.steps >= self.cap:
            self.reason = f"step cap {self.cap} reached (L_mom {self.value:.3g})"
            return True
        return False


# ------------------------------------------------------------------------------------------------ increments
@dataclass
class Increment:
    """The trainable tensors of one ``dTheta``: ``dW`` itself (G-CiRs), or ``w`` with a null-space basis ``S``
    (decoupled, Eq. 10: ``dW = beta w S^T``; built by ``nullspace.decoupled_increment``)."""

    name: str
    params: dict                      # trainable tensors by UNet parameter name
    lr: float
    tau: float
    basis: torch.Tensor | None = None
    beta: float = 1.0
    stopped_at: int | None = None
    info: dict = field(default_factory=dict)

    def dW(self) -> dict:
        """The increment: ``dW`` itself, or ``beta * w @ S^T`` (Eq. 10)."""
        if self.basis is None:
            return dict(self.params)
        return {k: self.beta * (w @ self.basis.T) for k, w in self.params.items()}

    def l1(self, form: str = "delta") -> torch.Tensor:
        """The L1 term of Eq. 11 over the ``M`` edited matrices, in one of the three forms the authors used.

        ``form``: ``"delta"`` = ``(1/M) sum_l ||dW_l||_1`` with ``dW = beta w S^T`` (the authors' later code,
        ``SRS_ME.py``; for G-CiRs, whose increment is ``dW`` itself, the only form); ``"w"`` = ``(1/M) sum_l ||w_l||_1``
        (Eq. 11 as written: about ``1/beta`` larger); ``"w_mean"`` = ``sum_l mean|w_l|`` (the authors' first code,
        ``SepCE.py``)."""
        if form not in L1_FORMS:
            raise ValueError(f"unknown L1 form {form!r}; use one of {L1_FORMS}")
        if form == "w_mean":
            return sum(t.abs().mean() for t in self.params.values())
        tensors = self.dW() if form == "delta" else self.params
        return sum(t.abs().sum() for t in tensors.values()) / len(tensors)


def direct_increment(model, name: str, param_names, lr: float, tau: float) -> Increment:
    """``dW = 0`` on the given UNet parameters, trained directly (G-CiRs, Algorithm 1)."""
    params = {k: torch.zeros_like(p, dtype=torch.float32, requires_grad=True)
              for k, p in model.params(param_names).items()}
    return Increment(name, params, lr=lr, tau=tau)


class ErasureDiverged(SepmeError, FloatingPointError):
    """The loss became NaN/inf; ``.deltas`` holds the increments of the last good step."""

    def __init__(self, msg, deltas):
        super().__init__(msg)
        self.deltas = deltas


# ------------------------------------------------------------------------------------------------ the loop
def train(model, concepts, increments, owner, s, skip_empty: bool, progress: bool = True, desc: str = "erasing",
          checkpoint=None, anchors=None):
    """The shared loop (module docstring). ``owner[i]``: the increment index of concept ``i``; ``s``: :class:`Settings`.
    Returns the history (per-step ``L_cor``, ``eta``, ``L_mom``). ``checkpoint``: a ``checkpoint.Checkpoint`` to save
    the loop's state to every few steps and resume from (``None``: the loop runs exactly as without it).

    Beyond the paper (notebook 08): ``s.target == "anchor"`` trains and monitors :func:`anchor_residual` instead of
    ``L_cor`` (``anchors[i]``: one anchor prompt per prompt of concept ``i``); ``s.cache > 0`` draws the ``x_t`` of
    the first ``cache / batch`` steps once with the frozen outputs (:func:`_pool`) and cycles through them."""
    gen = torch.Generator().manual_seed(s.seed)
    anchor = s.target == "anchor"
    if anchor and (anchors is None or [len(a) for a in anchors] != [len(c.prompts) for c in concepts]):
        raise ValueError("target='anchor' needs one anchor prompt per prompt of every concept (anchors=[[...], ...])")
    aembs = [model.embed(a) for a in anchors] if anchor else None
    base = model.params({k for inc in increments for k in inc.params})
    opts = [torch.optim.Adam(list(inc.params.values()), lr=inc.lr) for inc in increments]
    monitors = [MomentumStop(s.alpha, increments[owner[i]].tau, s.warmup, s.cap) for i in range(len(concepts))]
    stopped: list = [None] * len(concepts)
    embs = [c.embedding(model) for c in concepts]
    edits = [c.edit_emb if c.edit_emb is not None else e for c, e in zip(concepts, embs)]  # what the edited pass reads
    c0 = model.empty()
    hist = dict(step=[], lcor=[[] for _ in concepts], eta=[[] for _ in concepts], lmom=[[] for _ in concepts])
    if anchor:
        hist["monitored"] = "anchor residual"  # hist["lcor"] then holds the anchor residuals
    t_start = time.time()
    pool = _pool(model, concepts, embs, aembs, c0, s, gen, edits) if s.cache else None
    step = 0
    stage = None
    if checkpoint is not None:  # resume from the last save of this loop, if any
        stage = checkpoint.stage(desc, concepts=[c.name for c in concepts], prompts=[c.prompts for c in concepts],
                                 settings=s.as_dict(), owner=list(owner), skip_empty=skip_empty,
                                 increments=[[inc.name, sorted(inc.params)] for inc in increments])
        saved = stage.load()
        if saved is not None:
            step = _restore(saved, gen, increments, opts, monitors, stopped, hist)
            t_start -= saved["seconds"]
    bar = tqdm(total=s.cap, initial=step, desc=desc, leave=False) if progress else None
    while any(x is None for x in stopped):
        active = [i for i in range(len(concepts)) if stopped[i] is None]
        computed = sorted(set(active) | {0})  # concept 1 is always computed: eta is relative to it
        r_a = None
        if pool is not None:  # 1.-2. from the cache: the computed concepts' rows of this step's pool entry
            p = pool[step % len(pool)]
            rows = torch.cat([torch.arange(i * s.batch, (i + 1) * s.batch) for i in computed])
            X, T, E, Ee, e_0, r = (p[k][rows] for k in ("X", "T", "E", "Ee", "e_0", "r"))
            r_a = p["r_a"][rows] if anchor else None
            E0 = c0.expand(len(X), -1, -1)
        else:
            # 1. x_t for each computed concept
            batches = [draw_batch(model, concepts[i].latents, embs[i], s.batch, gen) for i in computed]
            X = torch.cat([b[0] for b in batches])
            T = torch.cat([b[1] for b in batches])
            E = torch.cat([b[2] for b in batches])
            Ee = torch.cat([edits[i][b[3]] for i, b in zip(computed, batches)])
            E0 = c0.expand(len(X), -1, -1)
            # 2. frozen representations r_theta(c), no gradient
            if anchor:
                Ea = torch.cat([aembs[i][b[3]] for i, b in zip(computed, batches)])
                e_0, r, r_a = _frozen(model, X, T, E, E0, Ea)
            else:
                with torch.no_grad():
                    e_c, e_0 = model.eps(torch.cat([X, X]), torch.cat([T, T]), torch.cat([E, E0])).chunk(2)
                    r = concept_representation(e_c, e_0)
        # 3. the edited model theta + sum_g dTheta_g, one pass; frozen increments are constants
        dws = [inc.dW() if inc.stopped_at is None else {k: v.detach() for k, v in inc.dW().items()}
               for inc in increments]
        weights = {k: (w.detach().float() + sum(d[k] for d in dws if k in d)).to(w.dtype) for k, w in base.items()}
        if skip_empty:
            r_new = concept_representation(model.eps(X, T, Ee, weights), e_0)
        else:
            e_c_new, e_0_new = model.eps(torch.cat([X, X]), torch.cat([T, T]), torch.cat([Ee, E0]), weights).chunk(2)
            r_new = concept_representation(e_c_new, e_0_new)
        # 4. eta-balanced correlation losses over the active concepts, + L1 on the training increments
        rs, rns = r.split(s.batch), r_new.split(s.batch)
        if anchor:  # scale-free residuals: no eta balance
            lcors = [anchor_residual(a, b, c) for a, b, c in zip(rs, rns, r_a.split(s.batch))]
            etas = [1.0] * len(lcors)
        else:
            lcors = [correlation_loss(a, b) for a, b in zip(rs, rns)]
            etas = eta_weights(rs, rns)  # relative to computed[0] = concept 1
        loss = sum(etas[j] * lcors[j] for j, i in enumerate(computed) if i in active)
        training = [inc for inc in increments if inc.stopped_at is None]
        if s.lam:
            loss = loss + s.lam * sum(inc.l1(s.l1) for inc in training)
        loss = loss / len(active)  # the authors' joint loss: (sum over active concepts) / their number
        if not torch.isfinite(loss):
            last = [Delta(c.name, "diverged", {k: v.detach().clone() for k, v in increments[owner[i]].dW().items()},
                          model.fingerprint(), s.as_dict(), dict(diverged_at=step)) for i, c in enumerate(concepts)]
            raise ErasureDiverged(f"the erasure loss became {float(loss.detach())} at step {step}; lower the learning "
                                  f"rate (now {[inc.lr for inc in training]}); the increments of the last good step "
                                  "are in .deltas", last)
        for o, inc in zip(opts, increments):
            if inc.stopped_at is None:
                o.zero_grad(set_to_none=True)
        loss.backward()
        for o, inc in zip(opts, increments):
            if inc.stopped_at is None:
                o.step()
        # 5. one monitor per concept, on its own unweighted L_cor
        step += 1
        hist["step"].append(step)
        for j, i in enumerate(computed):
            hist["lcor"][i].append(float(lcors[j].detach()))
            hist["eta"][i].append(etas[j])
            if i in active:
                if monitors[i].update(lcors[j].detach()):
                    stopped[i] = step
                hist["lmom"][i].append(monitors[i].value)
        for g, inc in enumerate(increments):
            mine = [i for i in range(len(concepts)) if owner[i] == g]
            if inc.stopped_at is None and all(stopped[i] is not None for i in mine):
                inc.stopped_at = step
                inc.info["stop_reason"] = "; ".join(f"{concepts[i].name}: {monitors[i].reason}" for i in mine)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(L=f"{float(loss.detach()):.3g}")
        if stage is not None and stage.due(step, all(x is not None for x in stopped)):
            stage.save(step, _state(gen, increments, opts, monitors, stopped, hist, time.time() - t_start),
                       finished=all(x is not None for x in stopped))
    if bar is not None:
        bar.close()
    seconds = time.time() - t_start
    for inc in increments:
        inc.info.update(steps=inc.stopped_at, seconds=round(seconds, 2))
    hist["stopped"] = stopped
    return hist


def _state(gen, increments, opts, monitors, stopped, hist, seconds) -> dict:
    """Everything the next step of :func:`train` reads (saved by a checkpoint)."""
    return dict(params=[{k: v.detach().clone() for k, v in inc.params.items()} for inc in increments],
                opts=[o.state_dict() for o in opts], gen=gen.get_state().clone(),
                monitors=[dict(m.__dict__) for m in monitors], stopped=list(stopped),
                stopped_at=[inc.stopped_at for inc in increments],
                stop_reason=[inc.info.get("stop_reason") for inc in increments], hist=hist, seconds=seconds)


def _restore(saved, gen, increments, opts, monitors, stopped, hist) -> int:
    """Put a saved :func:`_state` back in place; returns the step to continue from."""
    with torch.no_grad():
        for inc, params in zip(increments, saved["params"]):
            for k, v in params.items():
                inc.params[k].copy_(v)
    for o, st in zip(opts, saved["opts"]):
        o.load_state_dict(st)
    gen.set_state(saved["gen"])
    for m, st in zip(monitors, saved["monitors"]):
        m.__dict__.update(st)
    stopped[:] = saved["stopped"]
    for inc, at, reason in zip(increments, saved["stopped_at"], saved["stop_reason"]):
        inc.stopped_at = at
        if reason is not None:
            inc.info["stop_reason"] = reason
    hist.clear()
    hist.update(saved["hist"])
    return int(saved["step"])


def to_delta(model, inc: Increment, name: str, method: str, s, hist, extra=None) -> Delta:
    """The trained increment as a :class:`Delta` (tensors detached and cloned, settings and history recorded)."""
    info = dict(inc.info, history=hist, **(extra or {}))
    return Delta(name, method, {k: v.detach().float().clone() for k, v in inc.dW().items()}, model.fingerprint(),
                 s.as_dict(), info)


def gcirs(model, concepts, s, params: str = "cross_attention", progress: bool = True, checkpoint=None) -> Delta:
    """G-CiRs (Algorithm 1) on all cross-attention parameters (``params="cross_attention"``, the paper's setting) or
    on to_k/to_v (``"kv"``), for one or several concepts at once (eta-balanced, one shared increment).

    ``s``: :class:`Settings` (``gcirs_lr`` and ``gcirs_tau`` are used). Returns one :class:`Delta` named after the
    concepts joined by ``+``."""
    if params not in ("cross_attention", "kv"):
        raise ValueError(f"params must be 'cross_attention' (all attn2 parameters) or 'kv' (to_k/to_v), got {params!r}")
    names = model.cross_attention_param_names() if params == "cross_attention" else model.kv_weight_names()
    name = "+".join(c.name for c in concepts)
    inc = direct_increment(model, name, names, s.gcirs_lr, s.gcirs_tau)
    hist = train(model, concepts, [inc], [0] * len(concepts), s, skip_empty=False, progress=progress,
                 desc=f"G-CiRs {name}", checkpoint=checkpoint)
    return to_delta(model, inc, name, "gcirs", s, hist,
                    dict(concepts=[c.name for c in concepts], params=params,
                         prompts=[p for c in concepts for p in c.prompts]))
