"""Numerical claims of G-CiRs and SepME: L_cor, eta, the momentum stop, null spaces, leakage, exact combination and
restoration, deltas save/load, base-model checks, capacity and divergence errors, joint and iterative modes."""
import math

import pytest
import torch

import sepme_lib as sm
from sepme_lib import deltas, gcirs, nullspace, sepme, world
from sepme_lib.deltas import BaseModelMismatch, Delta

QUICK = dict(cap=6, batch=2, lr=1e-2, single="plain")


def test_correlation_loss_and_eta_by_hand():
    r = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    rn = torch.tensor([[0.5, 1.0], [-1.0, 2.0]])
    # mean(r * r') = (0.5 + 2 - 3 - 2) / 4
    assert gcirs.correlation_loss(r, rn).item() == pytest.approx(-0.625)
    assert gcirs.correlation_loss(r, r).item() == pytest.approx((1 + 4 + 9 + 1) / 4)
    # eta_i = ||r1*r1'|| / ||ri*ri'||  (norm of the elementwise product, as the authors' code)
    r2, rn2 = torch.tensor([2.0, 0.0]), torch.tensor([3.0, 1.0])
    etas = gcirs.eta_weights([r, r2], [rn, rn2])
    assert etas[0] == 1.0
    assert etas[1] == pytest.approx(math.sqrt(0.25 + 4 + 9 + 4) / 6.0)


def test_momentum_stop_by_hand():
    """Started at the first value; strict L_mom < tau; the earliest stop at 0-based step i = warmup + 1."""
    m = gcirs.MomentumStop(alpha=0.5, tau=0.0, warmup=1, cap=100)
    assert not m.update(4.0) and m.value == 4.0      # i = 0
    assert not m.update(-4.0) and m.value == 0.0     # i = 1: not > warmup
    assert not m.update(0.0) and m.value == 0.0      # i = 2: L_mom == tau is not < tau
    assert m.update(-2.0) and m.value == -1.0         # i = 3: stop
    assert "tau" in m.reason
    c = gcirs.MomentumStop(alpha=0.9, tau=-1.0, warmup=1, cap=4)
    assert [c.update(1.0) for _ in range(4)] == [False, False, False, True]
    assert "cap" in c.reason
    d = gcirs.MomentumStop(alpha=0.9, tau=1e9, warmup=10)
    assert [d.update(0.0) for _ in range(12)].index(True) == 11  # the authors' i > 10: after 12 steps


def test_null_space_is_orthonormal_and_annihilates_A():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(20, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 50, generator=g, dtype=torch.float64)
    ns = sm.null_space(A)
    assert ns.rank == 8 and ns.basis.shape == (50, 42) and ns.dim == 42
    assert torch.allclose(ns.basis.T @ ns.basis, torch.eye(42, dtype=ns.basis.dtype), atol=1e-10)
    assert ns.residual <= ns.tol and (A.double() @ ns.basis).abs().max() <= ns.tol


def test_null_space_bound_holds_with_a_small_singular_value_under_the_cut():
    """A singular value just under the cut enters S: ||A S|| is then that value, and the bound says so."""
    g = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    s = torch.tensor([100.0, 50, 20, 10, 5e-5, 0, 0, 0, 0, 0], dtype=torch.float64)
    A = U @ torch.diag(s) @ V[:, :10].T
    ns = sm.null_space(A, rtol=1e-7)  # cut at 1e-5: the 5e-5 direction is kept out of S
    assert ns.rank == 5 and ns.residual < 1e-9
    ns = sm.null_space(A, rtol=1e-6)  # cut 1e-6 * 100 = 1e-4: the 5e-5 direction enters S
    assert ns.rank == 4 and ns.residual == pytest.approx(5e-5, rel=1e-6) and ns.residual <= ns.tol
    ns = sm.null_space(A)  # default: max(rows, d_in) * eps(float64) * s_max, the exact rank of the stored matrix
    assert ns.rank == 5 and ns.tol == pytest.approx(30 * 2.220446049250313e-16 * 100)


def test_default_cut_sits_in_the_gap_of_the_bundled_models_spectrum(tiny):
    """The protected sets of SepME on the bundled model: every kept singular value is > 1000 x the cut and every
    dropped one (float64 round-off) < the cut / 10, so float noise in the embeddings cannot change the rank."""
    cs = sm.make_concepts(tiny, ["striped", "checkered", "dotted"], n_ref=2)
    for prompts in sepme.protected_sets(cs, "separate"):
        ns = sm.null_space(nullspace.stack_rows(tiny, prompts))
        kept, dropped = float(ns.singular_values[ns.rank - 1]), float(ns.singular_values[ns.rank])
        assert kept > 1e3 * ns.tol and dropped < 0.1 * ns.tol, (kept, ns.tol, dropped)
        assert ns.residual <= ns.tol


def test_capacity_error_names_the_numbers(tiny):
    many = [world.caption(sh, st, col) for sh in world.SHAPES for st in world.STYLES[3:] for col in world.COLOUR_NAMES]
    with pytest.raises(nullspace.CapacityError, match=r"dimension \d+ .*d_in 256"):
        sm.erase(tiny, ["striped", "checkered"], method="sepme", protect=many, n_ref=4, cap=2, batch=1)


@pytest.fixture(scope="module")
def three(tiny):
    cs = sm.make_concepts(tiny, ["striped", "checkered", "dotted"], n_ref=8)
    return cs, sm.erase(tiny, cs, method="sepme", **QUICK)


def test_leakage_is_float_precision(tiny, three):
    cs, ds = three
    for d, c in zip(ds, cs):
        others = [""] + [p for o in cs if o is not c for p in o.prompts]
        assert d.info["protected"] == others
        leak = sm.leakage(tiny, d, others)
        assert max(leak.values()) < 1e-5, leak
        assert sm.leakage(tiny, d, [c.prompt])[c.prompt] > 1e-4  # it does change its own concept
    assert set(sm.leakage(tiny, ds, [""])) == {""}  # a list of deltas is summed
    assert sm.leakage(tiny, ds[0].tensors, [""])[""] < 1e-5  # a dict of tensors too


@pytest.mark.parametrize("subset", [[0], [0, 1], [1, 2], [0, 1, 2]])
def test_combination_is_exact_per_concept(tiny, three, subset):
    """theta + sum_{i in S} dTheta_i gives, on concept j's prompts, exactly theta + dTheta_j (j in S) or theta."""
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
    with sm.applied(tiny, ds, [1, 0.5, 0]):
        changed = [k for k, v in tiny.unet.state_dict().items() if not torch.equal(v, before[k])]
        assert changed and all("attn2.to_" in k for k in changed)
    assert all(torch.equal(v, before[k]) for k, v in tiny.unet.state_dict().items())


def test_scales_combine_linearly(three):
    _, ds = three
    k = next(iter(ds[0].tensors))
    tot = sm.combine(ds, {"striped": 2.0, "checkered": 0.0, "dotted": -1.0})
    assert torch.allclose(tot[k], 2 * ds[0].tensors[k] - ds[2].tensors[k])
    with pytest.raises(KeyError, match="unknown deltas"):
        sm.combine(ds, {"cubist": 1.0})


def test_save_load_bit_exact_and_base_check(tiny, tiny_sd, three, tmp_path):
    _, ds = three
    p = ds[1].save(tmp_path / "checkered")
    back = Delta.load(p)
    assert back.name == "checkered" and back.method == "sepme1" and back.base == tiny.fingerprint()
    assert back.hparams == ds[1].hparams and back.info["null_dim"] == ds[1].info["null_dim"]
    assert back.info["prompts"] == ds[1].info["prompts"] and back.info["protected"] == ds[1].info["protected"]
    assert back.version == sm.__version__
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
    d = sm.erase(tiny, ["striped"], method="gcirs", n_ref=8, cap=200, batch=2, gcirs_tau=1e9)[0]
    assert d.info["steps"] == 12 and "tau" in d.info["stop_reason"]  # tau huge: the first allowed step, i = 11


def test_nan_loss_stops_with_last_good_increment(tiny, monkeypatch):
    cs = sm.make_concepts(tiny, ["striped"], n_ref=8)
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
    with pytest.raises(gcirs.ErasureDiverged, match="lower the learning rate") as ei:
        sm.erase(tiny, cs, method="sepme", cap=50, batch=2, lr=1e-2, single="plain")
    last = ei.value.deltas[0]
    assert last.info["diverged_at"] == 3
    assert all(torch.isfinite(v).all() for v in last.tensors.values())
    assert last.l1_norm() > 0  # three good steps were kept


def test_joint_and_iterative_modes(tiny):
    cs = sm.make_concepts(tiny, ["striped", "dotted"], n_ref=8)
    joint = sm.erase(tiny, cs, method="sepme", mode="joint", cap=5, batch=2)
    assert [d.method for d in joint] == ["sepme1_joint"] * 2
    assert max(sm.leakage(tiny, joint[0], ["", *cs[1].prompts]).values()) < 1e-5
    it = sm.erase(tiny, cs, method="sepme", mode="iterative", cap=5, batch=2)
    assert it[0].method == "sepme2" and len(it[0].tensors) > len(it[1].tensors)  # step 1: all attn2 params
    assert it[1].info["protected"] == ["", *cs[0].prompts]  # A_2 = c_0 + concept 1
    assert max(sm.leakage(tiny, it[1], ["", *cs[0].prompts]).values()) < 1e-5


def test_single_concept_protects_its_anchors_by_default_on_the_bundled_model(tiny):
    """One SepME path: erase(..., method='sepme') on one concept adds its anchors and the warm-up (tiny defaults)."""
    d = sm.erase(tiny, ["striped"], method="sepme", n_ref=4, cap=3, batch=1)[0]
    anchors = ["an object", "a red circle", "a green square", "a blue triangle"]
    assert d.info["anchors"] == anchors and d.info["protected"] == ["", *anchors]
    assert d.hparams["single"] == "anchors" and d.hparams["warmup"] == sepme.Settings().single_warmup
    plain = sm.erase(tiny, ["striped"], method="sepme", n_ref=4, cap=3, batch=1, single="plain")[0]
    assert plain.info["protected"] == [""] and plain.hparams["warmup"] == 10
    two = sm.erase(tiny, ["striped", "dotted"], method="sepme", n_ref=4, cap=3, batch=1)
    assert "an object" not in two[0].info["protected"] and two[0].hparams["warmup"] == 10


def test_sd_architecture_leakage_and_combination(tiny_sd):
    cs = [sm.make_concepts(tiny_sd, ["Van Gogh"], n_ref=2)[0],
          sm.Concept("cat", ["a photo of a cat"], torch.randn(2, *tiny_sd.latent_shape))]
    ds = sm.erase(tiny_sd, cs, method="sepme", cap=3, batch=1, min_null_dim=8)
    assert max(sm.leakage(tiny_sd, ds[0], ["", cs[1].prompt]).values()) < 1e-5
    z, t = torch.randn(1, 4, 8, 8), torch.tensor([400])
    E = cs[1].embedding(tiny_sd)
    a = tiny_sd.eps(z, t, E, deltas.edited_weights(tiny_sd, ds))
    b = tiny_sd.eps(z, t, E, deltas.edited_weights(tiny_sd, ds[1:]))
    assert (a - b).abs().max() < 1e-4 * b.abs().max()


def test_bundled_increments_erase_their_style_and_leave_others(tiny, clf):
    """data/deltas/ (``python -m sepme_lib.bench deltas``): made for this base model, certified by leakage,
    and they erase: 8 striped images go from the original's ACC to <= 0.25, blank images keep >= 0.75."""
    ds = sepme.bundled_deltas(tiny)
    assert [d.name for d in ds] == ["striped", "checkered", "dotted"] and all(d.method == "sepme1" for d in ds)
    for d in ds:
        assert max(sm.leakage(tiny, d, d.info["protected"]).values()) < 1e-5
    before = sm.acc_table(tiny, clf, ["striped", "blank"], 8, steps=8)
    after = sm.acc_table(tiny, clf, ["striped", "blank"], 8, ds[:1], steps=8)
    assert before["striped"] >= 0.75 and after["striped"] <= 0.25 and after["blank"] >= 0.75
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


def test_erase_uses_each_modes_stop_thresholds_unless_tau_is_given(tiny):
    """``methods.TAU_FACTORS``: on the bundled model SepME_2's stages stop at [tau, 2 tau, tau] and the joint loop at
    2 tau (measured in notebooks 04 and 07); ``erase`` applies them by default, an explicit ``tau=`` wins."""
    from sepme_lib import methods

    tau = methods.DEFAULTS["sepme"]["tiny"]["tau"]
    assert methods.mode_tau(tiny, "iterative", 3) == [tau, 2 * tau, tau]
    assert methods.mode_tau(tiny, "joint", 3) == 2 * tau and methods.mode_tau(tiny, "separate", 3) == tau
    assert methods.mode_tau("sd", "iterative", 3) == methods.DEFAULTS["sepme"]["sd"]["tau"]
    cs = ["striped", "checkered"]
    it = sm.erase(tiny, cs, method="sepme", mode="iterative", cap=3, batch=1, n_ref=4)
    assert it[1].hparams["tau"] == [tau, 2 * tau]
    given = sm.erase(tiny, cs, method="sepme", mode="joint", cap=3, batch=1, n_ref=4, tau=-1e-3)
    assert given[0].hparams["tau"] == -1e-3
