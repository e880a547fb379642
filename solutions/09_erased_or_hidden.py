# Solutions of notebook 09's exercises (kept apart from the notebook; tests/test_exercises.py runs each block in
# place of the notebook's stub cell, then the notebook's check cell). A "Wrong" block is a plausible mistake that the
# check must catch.

# %% Exercise 09.1
# Exercise 09.1: the share ||P_A c||^2 / ||c||^2 of each condition (all its rows) inside the span of A's rows.
import torch


def span_share(A, C):
    A, C = A.double(), C.double().reshape(len(C), -1, A.shape[1])
    _, s, Vh = torch.linalg.svd(A, full_matrices=False)  # rows of Vh: an orthonormal basis of A's row space ...
    V = Vh[s > 1e-10 * s.max()].T                   # ... keeping the directions with a non-negligible singular value
    inside = C @ V                                   # coordinates of every row in that span (an orthonormal basis)
    return inside.pow(2).sum((1, 2)) / C.pow(2).sum((1, 2))


# %% Wrong 09.1 (the share in the null space of A, not in its span)
import torch


def span_share(A, C):
    A, C = A.double(), C.double().reshape(len(C), -1, A.shape[1])
    _, s, Vh = torch.linalg.svd(A, full_matrices=False)
    V = Vh[s > 1e-10 * s.max()].T
    outside = C - (C @ V) @ V.T
    return outside.pow(2).sum((1, 2)) / C.pow(2).sum((1, 2))


# %% Exercise 09.2
# Exercise 09.2: try every allowed token at position pos; keep the best only if it lowers the loss.
def coordinate_step(loss, found, pos, allowed):
    best, value = list(found), loss(found)
    for tok in allowed:
        trial = best[:pos] + [tok] + best[pos + 1:]
        v = loss(trial)
        if v < value:
            best, value = trial, v
    return best, value


# %% Wrong 09.2 (takes the best candidate even when it is worse than the current choice)
def coordinate_step(loss, found, pos, allowed):
    trials = [list(found[:pos]) + [tok] + list(found[pos + 1:]) for tok in allowed]
    values = [loss(t) for t in trials]
    k = min(range(len(values)), key=values.__getitem__)
    return trials[k], values[k]


# %% Exercise 09.3
# Exercise 09.3: the edited keys W' c' of RECE's derived c' = (sum W'^T W')^-1 (sum W'^T W) c  (reg -> 0).
import torch


def recovered_keys(W_new, W_old, c):
    names = list(W_old)
    Wn = torch.cat([W_new[k].double() for k in names])
    Wo = torch.cat([W_old[k].double() for k in names])
    cp = torch.linalg.solve(Wn.T @ Wn, Wn.T @ Wo @ c.double().T).T
    return {k: (cp @ W_new[k].double().T).float() for k in names}


# %% Wrong 09.3 (the original keys W c: what the attack aims at, not what it gets)
def recovered_keys(W_new, W_old, c):
    return {k: c @ W_old[k].T for k in W_old}
