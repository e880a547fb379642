"""Numerical claims of the core ops: L_cor, eta, the momentum stop, null spaces, leakage, exact
combination and restoration, deltas save/load, base-model checks, capacity and divergence errors."""
import math

import pytest
import torch

from sepme_lib import core, deltas, sepme, world
from sepme_lib.deltas import BaseModelMismatch, Delta


def test_correlation_loss_and_eta_by_hand():
    r = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    rn = torch.tensor([[0.5, 1.0], [-1.0, 2.0]])
    # mean(r * r') = (0.5 + 2 - 3 - 2) / 4
    assert core.correlation_loss(r, rn).item() == pytest.approx(-0.625)
    assert core.correlation_loss(r, r).item() == pytest.approx((1 + 4 + 9 + 1) / 4)
    # eta_i = ||r1*r1'|| / ||ri*ri'||
    r2, rn2 = torch.tensor([2.0, 0.0]), torch.tensor([3.0, 1.0])
    etas = core.eta_weights([r, r2], [rn, rn2])
    assert etas[0] == 1.0
    assert etas[1] == pytest.approx(math.sqrt(0.25 + 4 + 9 + 4) / 6.0)


def test_momentum_stop_by_hand():
    m = core.MomentumStop(alpha=0.5, tau=0.0, warmup=3, cap=100)
    assert not m.update(4.0) and m.value == 4.0      # started at the first value
    assert not m.update(-4.0) and m.value == 0.0     # 0.5*4 + 0.5*(-4) = 0, but warm-up not over
    assert m.update(-2.0) and m.value == -1.0         # step 3: L_mom <= tau -> stop
    assert "tau" in m.reason
    c = core.MomentumStop(alpha=0.9, tau=-1.0, warmup=1, cap=4)
    assert [c.update(1.0) for _ in range(4)] == [False, False, False, True]
    assert "cap" in c.reason


def test_null_space_is_orthonormal_and_annihilates_A():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(20, 8, generator=g) @ torch.randn(8, 50, generator=g)  # rank 8 in R^50
    S, s, rank = core.null_space(A)
    assert rank == 8 and S.shape == (50, 42)
    assert torch.allclose(S.T @ S, torch.eye(42, dtype=S.dtype), atol=1e-10)
    assert (A.double() @ S).abs().max() < 1e-5 * A.abs().max()


def test_capacity_error_names_the_numbers(tiny):
    cs = core.make_concepts(tiny, ["striped", "checkered"], n_ref=4)
    many = [world.caption(sh, st, col) for sh in world.SHAPES for st in world.STYLES[1:] for col in world.COLOUR_NAMES[:2]]
    with pytest.raises(core.CapacityError, match=r"dimension \d+ .*d_in 256"):
        sepme.sepme(tiny, cs, "separate", sepme.Settings(cap=2, batch=1), protect=many, progress=False)


@pytest.fixture(scope="module")
def three(tiny):
    cs = core.make_concepts(tiny, ["striped", "checkered", "dotted"], n_ref=8)
    ds = sepme.sepme(tiny, cs, "separate", sepme.Settings(cap=6, batch=2, lr=1e-2), progress=False)
    return cs, ds


def test_leakage_is_float_precision(tiny, three):
    cs, ds = three
    for d, c in zip(ds, cs):
        others = [""] + [p for o in cs if o is not c for p in o.prompts]
        leak = core.leakage(tiny, d.tensors, others)
        assert max(leak.values()) < 1e-5, leak
        assert core.leakage(tiny, d.tensors, [c.prompt])[c.prompt] > 1e-4  # it does change its own concept


@pytest.mark.parametrize("subset", [[0], [0, 1], [1, 2], [0, 1, 2]])
def test_combination_is_exact_per_concept(tiny, three, subset):
    """theta + sum_{i in S} dTheta_i gives, on concept j's prompt, exactly theta + dTheta_j (j in S) or theta."""
    cs, ds = three
    w_all = deltas.edited_weights(tiny, [ds[i] for i in subset])
    g = torch.Generator().manual_seed(1)
    X, T = torch.randn(4, 48, 8, 8, generator=g), torch.tensor([100, 800, 300, 999])
    for j, c in enumerate(cs):
        E = c.embedding(tiny)  # all 4 prompts of concept j
        ref = tiny.eps(X, T, E, deltas.edited_weights(tiny, [ds[j]]) if j in subset else None)
        got = tiny.eps(X, T, E, w_all)
        assert (got - ref).abs().max() < 1e-4 * ref.abs().max()


def test_restoration_by_leaving_out_is_bit_exact(tiny, three):
    _, ds = three
    before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    with deltas.applied(tiny, ds, [1, 0.5, 0]):
        changed = [k for k, v in tiny.unet.state_dict().items() if not torch.equal(v, before[k])]
        assert changed and all("attn2.to_" in k for k in changed)
    assert all(torch.equal(v, before[k]) for k, v in tiny.unet.state_dict().items())


def test_scales_combine_linearly(three):
    _, ds = three
    k = next(iter(ds[0].tensors))
    tot = deltas.combine(ds, {"striped": 2.0, "dotted": -1.0})
    assert torch.allclose(tot[k], 2 * ds[0].tensors[k] - ds[2].tensors[k])
    with pytest.raises(KeyError, match="unknown deltas"):
        deltas.combine(ds, {"cubist": 1.0})


def test_save_load_bit_exact_and_base_check(tiny, tiny_sd, three, tmp_path):
    _, ds = three
    p = ds[1].save(tmp_path / "checkered")
    back = Delta.load(p)
    assert back.name == "checkered" and back.method == "sepme1" and back.base == tiny.fingerprint()
    assert back.hparams == ds[1].hparams and back.info["null_dim"] == ds[1].info["null_dim"]
    assert all(torch.equal(back.tensors[k], v) for k, v in ds[1].tensors.items())
    with pytest.raises(BaseModelMismatch, match="made for base model"):
        deltas.edited_weights(tiny_sd, [back])


def test_merge_into_stock_diffusers_unet(tiny, three):
    from diffusers import UNet2DConditionModel

    _, ds = three
    unet = UNet2DConditionModel.from_config(tiny.unet.config)
    unet.load_state_dict(tiny.unet.state_dict())
    deltas.merge_into_unet(unet, ds[:2])
    w = deltas.edited_weights(tiny, ds[:2])
    p = dict(unet.named_parameters())
    assert all(torch.equal(p[k], v) for k, v in w.items())


def test_empty_prompt_skip_is_exact(tiny, three):
    """With c_0 protected, the edited model's empty-prompt pass equals the frozen one (so it is skipped)."""
    _, ds = three
    X, T = torch.randn(2, 48, 8, 8), torch.tensor([50, 600])
    E0 = tiny.empty().expand(2, -1, -1)
    a = tiny.eps(X, T, E0, deltas.edited_weights(tiny, ds))
    b = tiny.eps(X, T, E0)
    assert (a - b).abs().max() < 1e-5


def test_early_stop_triggers_before_cap(tiny):
    c = core.make_concepts(tiny, ["striped"], n_ref=8)
    d = sepme.gcirs(tiny, c, sepme.Settings(cap=200, batch=2, gcirs_tau=1e9), progress=False)
    assert d.info["steps"] == 10 and "tau" in d.info["stop_reason"]  # tau huge: stop right after warm-up


def test_nan_loss_stops_with_last_good_increment(tiny, monkeypatch):
    cs = core.make_concepts(tiny, ["striped"], n_ref=8)
    real = tiny.eps
    calls = {"n": 0}

    def flaky(z, t, emb, weights=None):
        out = real(z, t, emb, weights)
        if weights is not None:
            calls["n"] += 1
            if calls["n"] >= 4:
                out = out * float("nan")
        return out

    monkeypatch.setattr(tiny, "eps", flaky)
    with pytest.raises(sepme.ErasureDiverged, match="lower the learning rate") as ei:
        sepme.sepme(tiny, cs, "separate", sepme.Settings(cap=50, batch=2, lr=1e-2), progress=False)
    last = ei.value.deltas[0]
    assert last.info["diverged_at"] == 3
    assert all(torch.isfinite(v).all() for v in last.tensors.values())
    assert last.l1_norm() > 0  # three good steps were kept


def test_joint_and_iterative_modes(tiny):
    cs = core.make_concepts(tiny, ["striped", "dotted"], n_ref=8)
    s = sepme.Settings(cap=5, batch=2, lr=1e-2)
    joint = sepme.sepme(tiny, cs, "joint", s, progress=False)
    assert [d.method for d in joint] == ["sepme1_joint"] * 2
    assert max(core.leakage(tiny, joint[0].tensors, ["", *cs[1].prompts]).values()) < 1e-5
    it = sepme.sepme(tiny, cs, "iterative", s, progress=False)
    assert it[0].method == "sepme2" and len(it[0].tensors) > len(it[1].tensors)  # step 1: all attn2 params
    assert it[1].info["protected"] == ["", *cs[0].prompts]  # A_2 = c_0 + concept 1
    assert max(core.leakage(tiny, it[1].tensors, ["", *cs[0].prompts]).values()) < 1e-5


def test_sd_architecture_leakage_and_combination(tiny_sd):
    cs = [core.make_concept(tiny_sd, n, prompt=p, n_ref=2) for n, p in
          [("van_gogh", "a painting by van gogh"), ("cat", "a photo of a cat")]]
    ds = sepme.sepme(tiny_sd, cs, "separate", sepme.Settings(cap=3, batch=1, lr=1e-2, min_null_dim=8), progress=False)
    assert max(core.leakage(tiny_sd, ds[0].tensors, ["", cs[1].prompt]).values()) < 1e-5
    z, t = torch.randn(1, 4, 8, 8), torch.tensor([400])
    E = cs[1].embedding(tiny_sd)
    a = tiny_sd.eps(z, t, E, deltas.edited_weights(tiny_sd, ds))
    b = tiny_sd.eps(z, t, E, deltas.edited_weights(tiny_sd, ds[1:]))
    assert (a - b).abs().max() < 1e-4 * b.abs().max()


def test_bundled_increments_erase_their_style_and_leave_others(tiny, clf):
    """data/deltas/ (``python -m sepme_lib.bench deltas``): made for this base model, certified by leakage,
    and they erase: 8 striped images go from the original's ACC to <= 0.25, blank images keep >= 0.75."""
    from sepme_lib import evaluate

    ds = sepme.bundled_deltas(tiny)
    assert [d.name for d in ds] == ["striped", "checkered", "dotted"] and all(d.method == "sepme1" for d in ds)
    for d in ds:
        assert max(core.leakage(tiny, d.tensors, d.info["protected"]).values()) < 1e-5
    w = deltas.edited_weights(tiny, ds[:1])
    assert evaluate.concept_acc(tiny, clf, "striped", 8, steps=8) >= 0.75
    assert evaluate.concept_acc(tiny, clf, "striped", 8, w, steps=8) <= 0.25
    assert evaluate.concept_acc(tiny, clf, "blank", 8, w, steps=8) >= 0.75
    with pytest.raises(FileNotFoundError, match="bench deltas"):
        sepme.bundled_deltas(tiny, ["gradient"])


def test_set_threads(monkeypatch):
    from sepme_lib import config

    before = torch.get_num_threads()
    try:
        assert config.set_threads(1) == 1 == torch.get_num_threads()
        monkeypatch.setenv("SEPME_THREADS", "2")
        assert config.set_threads() == 2
        monkeypatch.setenv("SEPME_THREADS", "two")
        with pytest.raises(ValueError, match="SEPME_THREADS must be a whole number"):
            config.set_threads()
        with pytest.raises(ValueError, match=">= 1"):
            config.set_threads(0)
    finally:
        torch.set_num_threads(before)
