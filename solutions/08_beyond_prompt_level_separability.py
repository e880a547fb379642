# Solutions of notebook 08's exercises (kept apart from the notebook; tests/test_exercises.py runs each block in
# place of the notebook's stub cell, then the notebook's check cell). A "Wrong" block is a plausible mistake that the
# check must catch.

# %% Exercise 08.1
# Exercise 08.1: per caption max_l ||A dW_l^T|| / ||A W_l^T|| over every edited to_k/to_v; (median, max) over captions.
import torch


def kv_change(model, delta, captions):
    params = dict(model.unet.named_parameters())
    per_caption = []
    for p in captions:
        A = model.embed_context([p])[0]
        per_caption.append(max(float((A @ dW.float().T).norm() / (A @ params[k].detach().float().T).norm())
                               for k, dW in delta.tensors.items() if k.endswith(("to_k.weight", "to_v.weight"))))
    return float(torch.tensor(per_caption).quantile(0.5)), max(per_caption)


# %% Wrong 08.1 (the mean over the layers instead of the worst layer)
import torch


def kv_change(model, delta, captions):
    params = dict(model.unet.named_parameters())
    per_caption = []
    for p in captions:
        A = model.embed_context([p])[0]
        ratios = [float((A @ dW.float().T).norm() / (A @ params[k].detach().float().T).norm())
                  for k, dW in delta.tensors.items() if k.endswith(("to_k.weight", "to_v.weight"))]
        per_caption.append(sum(ratios) / len(ratios))
    return float(torch.tensor(per_caption).quantile(0.5)), max(per_caption)


# %% Exercise 08.2
# Exercise 08.2: inside null(A), keep the eigenvectors of S_A^T C S_A (C = R^T R / n) with eigenvalue <= s lambda_max(C).
import torch
from sepme_lib import nullspace


def soft_null_space(A, R, s):
    S_A = nullspace.null_space(A).basis
    R = R.double()
    C = R.T @ R / len(R)
    ev, V = torch.linalg.eigh(S_A.T @ C @ S_A)
    return S_A @ V[:, ev <= s * torch.linalg.eigvalsh(C).max()]


# %% Wrong 08.2 (the cut relative to the largest eigenvalue inside the null space, not of C)
import torch
from sepme_lib import nullspace


def soft_null_space(A, R, s):
    S_A = nullspace.null_space(A).basis
    R = R.double()
    C = R.T @ R / len(R)
    ev, V = torch.linalg.eigh(S_A.T @ C @ S_A)
    return S_A @ V[:, ev <= s * ev.max()]


# %% Exercise 08.3
# Exercise 08.3: the share ||R P||_F^2 / ||R||_F^2 of the rows' energy in span(B), P the orthogonal projector on it.
import torch


def energy_share(R, B):
    Q, _ = torch.linalg.qr(B.double())
    R = R.double()
    return float((R @ Q).pow(2).sum() / R.pow(2).sum())


# %% Wrong 08.3 (the basis used as it is, as if it were orthonormal)
import torch


def energy_share(R, B):
    R = R.double()
    return float((R @ B.double()).pow(2).sum() / R.pow(2).sum())
