# Solutions of notebook 06's exercises (kept apart from the notebook; tests/test_exercises.py runs each block in
# place of the notebook's stub cell, then the notebook's check cell). A "Wrong" block is a plausible mistake that the
# check must catch.

# %% Exercise 06.1
# Exercise 06.1: UCE's closed form for one matrix:
# W' = (lam W + e V^T K_e + p W K_p^T K_p) (lam I + e K_e^T K_e + p K_p^T K_p)^-1
import torch


def uce_edit(W, erase_keys, erase_targets, preserve_keys, lam, e, p):
    eye = torch.eye(W.shape[1], dtype=W.dtype)
    B = lam * W + e * erase_targets.T @ erase_keys + p * W @ preserve_keys.T @ preserve_keys
    M = lam * eye + e * erase_keys.T @ erase_keys + p * preserve_keys.T @ preserve_keys
    return torch.linalg.solve(M.T, B.T).T  # B M^-1 (M is symmetric)


# %% Wrong 06.1 (the ridge term lam W is missing from the numerator: the edit no longer stays close to W)
import torch


def uce_edit(W, erase_keys, erase_targets, preserve_keys, lam, e, p):
    eye = torch.eye(W.shape[1], dtype=W.dtype)
    B = e * erase_targets.T @ erase_keys + p * W @ preserve_keys.T @ preserve_keys
    M = lam * eye + e * erase_keys.T @ erase_keys + p * preserve_keys.T @ preserve_keys
    return torch.linalg.solve(M.T, B.T).T


# %% Exercise 06.2
# Exercise 06.2: ESD-x's loss for one batch: MSE(eps'(x_t, c), eps(x_t, c0) - eta (eps(x_t, c) - eps(x_t, c0))).
import torch
import torch.nn.functional as F


def esd_step_loss(model, X, T, E, weights, eta):
    with torch.no_grad():
        E0 = model.empty().expand(len(X), -1, -1)
        e_c, e_0 = model.eps(X, T, E), model.eps(X, T, E0)
        target = e_0 - eta * (e_c - e_0)
    return F.mse_loss(model.eps(X, T, E, weights), target)


# %% Wrong 06.2 (the guidance points towards the concept instead of away from it)
import torch
import torch.nn.functional as F


def esd_step_loss(model, X, T, E, weights, eta):
    with torch.no_grad():
        E0 = model.empty().expand(len(X), -1, -1)
        e_c, e_0 = model.eps(X, T, E), model.eps(X, T, E0)
        target = e_0 + eta * (e_c - e_0)
    return F.mse_loss(model.eps(X, T, E, weights), target)


# %% Exercise 06.3
# Exercise 06.3: RECE's Eq. (8), c' = (reg I + sum_l W_l'^T W_l')^-1 (sum_l W_l'^T W_l) c, row by row of c.
import torch


def derive_embedding(W_new, W_old, c, reg):
    d_in = c.shape[-1]
    G = reg * torch.eye(d_in, dtype=torch.float64) + sum(W_new[k].double().T @ W_new[k].double() for k in W_old)
    H = sum(W_new[k].double().T @ W_old[k].double() for k in W_old)
    rows = c.double().reshape(-1, d_in)
    return torch.linalg.solve(G, H @ rows.T).T.reshape(c.shape).float()


# %% Wrong 06.3 (the cross term the wrong way round: W^T W' instead of W'^T W)
import torch


def derive_embedding(W_new, W_old, c, reg):
    d_in = c.shape[-1]
    G = reg * torch.eye(d_in, dtype=torch.float64) + sum(W_new[k].double().T @ W_new[k].double() for k in W_old)
    H = sum(W_old[k].double().T @ W_new[k].double() for k in W_old)
    rows = c.double().reshape(-1, d_in)
    return torch.linalg.solve(G, H @ rows.T).T.reshape(c.shape).float()
