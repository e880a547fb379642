"""SPEED against a plain transcription of the authors' update, the soft null space, and the cached training pool."""
import numpy as np
import pytest
import torch

from sepme_lib import gcirs, methods, nullspace, speed
from sepme_lib.concepts import make_concepts


# ------------------------------------------------------------------------------ SPEED vs the released code
def official_edit(W, targets, anchors, last_ret_embs, K2, aug_num, threshold, retain_scale, lamb, use_filter, gen,
                  chunk_size=128):
    """``edit_model`` of SPEED's ``train_erase_null.py`` for one matrix, line by line (float64; ``torch.randn_like``
    replaced by draws from ``gen``; the rows are given: ``targets``/``anchors`` one ``(rows, d)`` tensor per concept,
    ``last_ret_embs`` ``(N, 1, d)`` already shuffled)."""
    d = W.shape[1]
    I = torch.eye(d, dtype=torch.float64)
    I2 = torch.eye(K2.shape[1], dtype=torch.float64)
    sum_target_target = torch.stack([t.T @ t for t in targets]).mean(0)
    sum_anchor_target = torch.stack([a.T @ t for a, t in zip(anchors, targets)]).mean(0)

    def generate_perturbed_embs(ret_embs, P, erase_weight, num_per_sample, mini_batch=8):
        ret_embs = ret_embs.squeeze(1)
        out_embs, norm_list = [], []
        for i in range(0, ret_embs.size(0), mini_batch):
            mini_ret_embs = ret_embs[i:i + mini_batch]
            for _ in range(num_per_sample):
                noise = torch.randn(mini_ret_embs.shape, generator=gen, dtype=torch.float64)
                perturbed_embs = mini_ret_embs + noise @ P
                out_embs.append(perturbed_embs)
                norm_list.append(torch.matmul(perturbed_embs, erase_weight.T).norm(dim=1))
        out_embs = torch.cat(out_embs, dim=0)
        norm_list = torch.cat(norm_list, dim=0)
        return out_embs[norm_list > norm_list.mean()].unsqueeze(1)

    erase_weight = W @ (sum_anchor_target - sum_target_target) @ (I + sum_target_target).inverse()
    (U0, S0, V0) = torch.svd(W)
    P0_min = V0[:, -1:] @ V0[:, -1:].T
    if aug_num > 0 and use_filter:
        weight_norm_init = torch.matmul(last_ret_embs.squeeze(1), erase_weight.T).norm(dim=1)
        layer_ret_embs = last_ret_embs[weight_norm_init > weight_norm_init.mean()]
    else:
        layer_ret_embs = last_ret_embs
    sum_ret_ret, valid_num = [], 0
    for j in range(0, len(layer_ret_embs), chunk_size):
        chunk_ret_embs = layer_ret_embs[j:j + chunk_size]
        if aug_num > 0:
            chunk_ret_embs = torch.cat([chunk_ret_embs, generate_perturbed_embs(chunk_ret_embs, P0_min, erase_weight,
                                                                                num_per_sample=aug_num)], dim=0)
        valid_num += chunk_ret_embs.shape[0]
        sum_ret_ret.append((chunk_ret_embs.transpose(1, 2) @ chunk_ret_embs).sum(0))
    sum_ret_ret = torch.stack(sum_ret_ret, dim=0).sum(0) / valid_num
    U, S, V = torch.svd(sum_ret_ret)
    P = U[:, S < threshold] @ U[:, S < threshold].T
    M = (sum_target_target @ P + retain_scale * I).inverse()
    return W @ (sum_anchor_target - sum_target_target) @ P @ (
        I - M @ K2 @ (K2.T @ P @ M @ K2 + lamb * I2).inverse() @ K2.T @ P) @ M


@pytest.mark.parametrize("aug", [3])
def test_speed_matches_the_official_update(tiny, aug):
    s = methods.settings("speed", tiny, aug=aug, threshold=1e-3, lamb=0.0)
    retain = speed.prior_captions(tiny, ["striped"])[::8]  # a small prior keeps the transcription's loops quick
    d = methods.erase(tiny, ["striped"], method="speed", prior=retain, **s)[0]
    c = make_concepts(tiny, ["striped"], n_ref=1)[0]
    texts, guides = speed._texts(tiny, [c], s, None)
    pairs = [speed.text_rows(tiny, [t], [g], s["keys"]) for t, g in zip(texts, guides)]
    R = speed.text_rows(tiny, retain, keys=s["keys"])[0]
    gen = torch.Generator().manual_seed(s["seed"])
    R = R[torch.randperm(len(R), generator=gen)][:, None]
    K2 = speed.invariants(tiny, s["clusters"], s["seed"])
    params = dict(tiny.unet.named_parameters())
    worst = 0.0
    for k, dW in d.tensors.items():  # state-dict order, one generator stream, as the authors' loop
        W = params[k].detach().double()
        ref = official_edit(W, [p[0] for p in pairs], [p[1] for p in pairs], R, K2, aug, s["threshold"],
                            s["retain_scale"], s["lamb"], s["filter"], gen)
        worst = max(worst, float((dW.double() - ref).norm() / ref.norm()))
        if k.endswith("to_v.weight"):  # lambda = 0: c_0's BOS row and cluster centres keep their values exactly
            assert float((dW.double() @ K2).norm() / (W @ K2).norm()) < 1e-5
    assert worst < 1e-5, worst


def test_kmeans_is_a_fixed_point():
    X = torch.randn(40, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels, centres = speed.kmeans(X, 3, seed=0, tol=1e-12)
    for j in range(3):
        assert torch.allclose(centres[j], X[labels == j].mean(0))
    assert torch.equal(labels, ((X[:, None] - centres[None]) ** 2).sum(-1).argmin(1))


def test_speed_settings_are_checked(tiny):
    with pytest.raises(methods.MethodError, match="keys"):
        methods.settings("speed", tiny, keys="middle")
    with pytest.raises(methods.MethodError, match="aug"):
        methods.settings("speed", tiny, aug=-1)
    assert methods.settings("speed", "sd")["params"] == "V"  # the authors' default: to_v only


def test_speed_official_settings_on_a_random_sd_model(tiny_sd):
    d = methods.erase(tiny_sd, ["Van Gogh"], method="speed", aug=2)[0]
    assert set(d.tensors) == {k for k in tiny_sd.kv_weight_names() if k.endswith("to_v.weight")}
    assert d.info["prompts"] == ["Van Gogh"] and d.info["anchors"] == ["art"]
    assert all(torch.isfinite(v).all() for v in d.tensors.values())


# ------------------------------------------------------------------------------ soft null space
def test_soft_null_space_keeps_A_exact_and_cuts_the_prior():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(20, 64, generator=g, dtype=torch.float64)
    R = torch.randn(200, 64, generator=g, dtype=torch.float64) * torch.logspace(0, -4, 64, dtype=torch.float64)
    exact = nullspace.null_space(A)
    dims = []
    for soft in (1e-2, 1e-4, 1e-6):
        ns = nullspace.null_space(A, prior=R, soft=soft)
        assert ns.exact_dim == exact.dim == 44 and ns.dim <= ns.exact_dim
        assert float(torch.linalg.matrix_norm(A @ ns.basis, ord=2)) <= ns.tol + 1e-12
        lam = float(torch.linalg.eigvalsh(R.T @ R / len(R)).max())
        assert float((R @ ns.basis).pow(2).sum() / len(R)) <= soft * lam * ns.dim * (1 + 1e-9)
        dims.append(ns.dim)
    assert dims[0] > dims[1] > dims[2]
    both = nullspace.null_space(torch.cat([A, R[:10]]))  # soft = 0: the exact null space of the prior too
    assert nullspace.null_space(A, prior=R[:10], soft=0.0).dim == both.dim
    with pytest.raises(ValueError, match="soft"):
        nullspace.null_space(A, prior=R, soft=1.5)


# ------------------------------------------------------------------------------ the cached pool
@pytest.mark.parametrize("target", ["decorrelate", "anchor"])
def test_cache_gives_the_uncached_increments_within_the_pool(tiny, target):
    c = make_concepts(tiny, ["striped"], n_ref=8)
    anchors = [[p.replace(" in striped style", "") for p in c[0].prompts]] if target == "anchor" else None
    out = {}
    for cache in (0, 16):
        s = gcirs.Settings(**dict(methods.settings("sepme", tiny), cap=4, tau=-1e9, target=target, anchor_tau=1e-6,
                                  cache=cache))
        inc = nullspace.decoupled_increment(tiny, "striped", [""], s.beta, s.min_null_dim, s.lr, s.tau)
        gcirs.train(tiny, c, [inc], [0], s, skip_empty=True, progress=False, anchors=anchors)
        out[cache] = {k: v.detach().clone() for k, v in inc.dW().items()}
    # 4 steps of batch 4 = the 16 pooled x_t: the same draws, the same frozen outputs, the same increments
    assert max(float((out[0][k] - out[16][k]).abs().max()) for k in out[0]) == 0.0


def test_cache_cycles_after_the_pool(tiny):
    """With more steps than the pool holds, the cached run reuses x_t (a stated difference: not the same stream)."""
    c = make_concepts(tiny, ["striped"], n_ref=8)
    res = {}
    for cache in (0, 8):
        s = gcirs.Settings(**dict(methods.settings("sepme", tiny), cap=4, tau=-1e9, cache=cache))
        inc = nullspace.decoupled_increment(tiny, "striped", [""], s.beta, s.min_null_dim, s.lr, s.tau)
        gcirs.train(tiny, c, [inc], [0], s, skip_empty=True, progress=False)
        res[cache] = np.concatenate([v.detach().numpy().ravel() for v in inc.dW().values()])
    assert not np.array_equal(res[0], res[8]) and np.isfinite(res[8]).all()
