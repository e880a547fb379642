"""The exercise checks of the notebooks beyond the paper (08: held-out separability; 09: attacks), registered in
``exercise_kit.CHECKS`` on import (``sepme_lib.exercises`` imports this module; see its docstring for the rules every
check follows)."""
from __future__ import annotations

import torch

from . import attacks as _attacks
from . import nullspace, sepme
from . import separability as _separability
from .concepts import concept_set
from .exercise_kit import _model, _rand, exercise, expect, expect_close


# ------------------------------------------------------------------------------------------ notebook 08
@exercise("08.1", "the key/value change of held-out captions")
def _check_08_1(kv_change):
    model = _model()
    d, erased = sepme.bundled_deltas(model, ("striped",))[0], list(concept_set(model).erase)
    ref = _separability.kv_metrics(model, d, "striped", erased)
    got = kv_change(model, d, _separability.heldout(model, "striped", erased)["protected"])
    expect(isinstance(got, tuple) and len(got) == 2, "return (median, max) over the captions")
    expect_close(float(got[0]), ref["heldout_protected_kv_median"], "the median over the captions", rtol=1e-3)
    expect_close(float(got[1]), ref["heldout_protected_kv_max"], "the max over the captions", rtol=1e-3)


def _prior_rows(model):
    return nullspace.stack_rows(model, [""] + _separability.prior_captions(model, ["striped"])[:40])


@exercise("08.2", "a soft null space inside the exact one")
def _check_08_2(soft_null_space):
    model = _model()
    A, R = nullspace.stack_rows(model, ["", "a red circle in checkered style", "a blue star in dotted style"]), \
        _prior_rows(model)
    for s in (1e-3, 1e-5):
        ref, S = nullspace.null_space(A, prior=R, soft=s).basis, soft_null_space(A, R, s)
        expect(torch.is_tensor(S) and S.dim() == 2 and S.shape[0] == A.shape[1], "S must be a (d_in, k) tensor")
        expect(S.shape[1] == ref.shape[1], f"soft = {s:g}: you keep {S.shape[1]} directions, too "
               f"{'few' if S.shape[1] < ref.shape[1] else 'many'} (which largest eigenvalue is the cut relative to?)")
        expect_close(S.double() @ S.double().T, ref @ ref.T, f"the projector S S^T at soft = {s:g}", atol=1e-8)


@exercise("08.3", "the share of the prior's energy a basis reads")
def _check_08_3(energy_share):
    model = _model()
    A, R = nullspace.stack_rows(model, ["", "a red circle in checkered style"]), _prior_rows(model)
    for s in (1e-2, 1e-4):
        ns = nullspace.null_space(A, prior=R, soft=s)
        mix = torch.eye(ns.dim, dtype=torch.float64) + 0.3 * torch.triu(_rand(ns.dim, ns.dim, seed=5,
                                                                               dtype=torch.float64), 1)
        expect_close(float(energy_share(R, ns.basis @ mix)), ns.prior_energy,
                     f"the share at soft = {s:g} (the basis given spans the space but is not orthonormal)", rtol=1e-4)


# ------------------------------------------------------------------------------------------ notebook 09
@exercise("09.1", "the share of an attack condition inside the protected span")
def _check_09_1(span_share):
    model = _model()
    protected = ["", "a red star in dotted style", "a blue circle in checkered style"]
    A = nullspace.stack_rows(model, protected)
    C = torch.cat([model.embed_context(["a green square in striped style"]), _rand(2, model.max_length, A.shape[1], seed=9)])
    got = torch.as_tensor(span_share(A, C)).reshape(-1)
    expect(got.shape == (3,), f"one share per condition: expected shape (3,), got {tuple(got.shape)}")
    expect_close(span_share(A, model.embed_context(protected[1:])), torch.ones(2), "a protected prompt lies wholly in the span",
                 rtol=1e-4, atol=1e-5)
    expect_close(got, _attacks.span_share(model, C, protected), "the shares (project the rows onto span(A), not onto "
                 "null(A); energy is the squared norm)", rtol=1e-3, atol=1e-6)


@exercise("09.2", "one step of greedy coordinate search")
def _check_09_2(coordinate_step):
    target = [5, 2, 7]

    def loss(choice):
        return sum((a - b) ** 2 for a, b in zip(choice, target)) + 0.1 * sum(choice)

    found, value = coordinate_step(loss, [0, 0, 0], 1, list(range(10)))
    expect(list(found) == [0, 2, 0], f"at position 1 the best token is the one with the lowest loss; got {list(found)}")
    expect_close(value, loss([0, 2, 0]), "the returned loss must be the loss of the returned choice")
    kept, value = coordinate_step(loss, [5, 2, 7], 0, [0, 1, 9])
    expect(list(kept) == [5, 2, 7] and abs(value - loss([5, 2, 7])) < 1e-12,
           "when no candidate lowers the loss the current choice must stay (a step never makes things worse)")


@exercise("09.3", "what the derived embedding gives back")
def _check_09_3(recovered_keys):
    W_old = {f"m{i}": _rand(6 + i, 4, seed=40 + i) for i in range(3)}
    W_new = {k: w + 0.5 * _rand(*w.shape, seed=50 + i) for i, (k, w) in enumerate(W_old.items())}
    c = _rand(3, 4, seed=60)
    got = recovered_keys(W_new, W_old, c)
    names = list(W_old)
    expect(isinstance(got, dict) and set(got) == set(names), "return {name: keys} for every matrix")
    cp = _attacks.derive_embedding(W_new, W_old, c, 1e-9)
    for k in names:
        expect_close(got[k], cp @ W_new[k].T, f"the keys of {k}: the edited matrix applied to the derived c' (reg ~ 0)",
                     rtol=1e-3, atol=1e-5)

