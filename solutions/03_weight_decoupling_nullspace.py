# Solutions of notebook 03's exercises (kept apart from the notebook; tests/test_exercises.py runs each block in
# place of the notebook's stub cell, then the notebook's check cell). A "Wrong" block is a plausible mistake that the
# check must catch.

# %% Exercise 03.1
# Exercise 03.1: Eq. (8), stack all L embedding rows of every prompt into A
import torch


def stack_rows(model, prompts):
    rows = [model.empty_context()[0] if p == "" else model.embed_context([p])[0] for p in prompts]  # each (L, d_in)
    return torch.cat(rows)                                                          # (k L, d_in)


# %% Wrong 03.1 (one pooled row per prompt instead of all L rows)
import torch


def stack_rows(model, prompts):
    rows = [model.empty_context()[0] if p == "" else model.embed_context([p])[0] for p in prompts]
    return torch.stack([r.mean(0) for r in rows])


# %% Exercise 03.2
# Exercise 03.2: Eq. (9), an orthonormal basis S of null(A) from the SVD, with NumPy's rank tolerance
import torch


def null_basis(A):
    A = A.double()
    _, s, vh = torch.linalg.svd(A, full_matrices=True)          # vh: all d_in right singular vectors
    tol = max(A.shape) * torch.finfo(torch.float64).eps * s.max()
    rank = int((s > tol).sum())
    return vh[rank:].T                                          # (d_in, d_in - rank)


# %% Wrong 03.2 (the reduced SVD: only min(rows, d_in) right singular vectors, so most of the null space is missing)
import torch


def null_basis(A):
    A = A.double()
    _, s, vh = torch.linalg.svd(A, full_matrices=False)
    tol = max(A.shape) * torch.finfo(torch.float64).eps * s.max()
    rank = int((s > tol).sum())
    return vh[rank:].T


# %% Exercise 03.3
# Exercise 03.3: the leakage of an increment on one prompt, max over layers of ||A dW^T|| / ||A W^T||
import torch


def leakage(model, tensors, prompt):
    A = (model.empty_context()[0] if prompt == "" else model.embed_context([prompt])[0]).float()
    weights = model.params(list(tensors))
    return max(float((A @ dW.float().T).norm() / (A @ weights[k].detach().float().T).norm())
               for k, dW in tensors.items())


# %% Wrong 03.3 (the mean over the layers instead of the worst layer)
import torch


def leakage(model, tensors, prompt):
    A = (model.empty_context()[0] if prompt == "" else model.embed_context([prompt])[0]).float()
    weights = model.params(list(tensors))
    vals = [float((A @ dW.float().T).norm() / (A @ weights[k].detach().float().T).norm()) for k, dW in tensors.items()]
    return sum(vals) / len(vals)
