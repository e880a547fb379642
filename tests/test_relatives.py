"""SepME's relatives (closed_form, finetune, methods; notebook 06): the shared closed-form solve against a numpy
least-squares reference, the RECE embedding derivation, token-row selection, attention capture, and every method on
the tiny random-weight SD-architecture model (2-3 training steps each)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import sepme_lib as sm
from sepme_lib import closed_form as CF, concepts, evaluate, finetune, methods
from sepme_lib.concepts import ConceptError
from sepme_lib.deltas import Delta
from sepme_lib.gcirs import Settings

ERASE = "a painting by van gogh"
PROMPTS = [ERASE, "a painting of a tree by van gogh"]
ANCHOR = "a painting"
PRESERVE = ["a photo of a cat", "a photo of a dog", "a photo of a car", "a painting of a tree"]
STEPS = dict(steps=2, batch=2)  # fine-tuning methods: tiny step counts keep this file fast


@pytest.fixture(scope="module")
def concept(tiny_sd):
    # random reference latents instead of sampled ones: the random-weight model's samples are noise anyway
    return sm.Concept("van_gogh", PROMPTS, torch.randn(4, *tiny_sd.latent_shape, generator=torch.Generator().manual_seed(0)))


def _lstsq_reference(W, Ke, V, Kp, U, lam, e, p):
    """Stacked least squares: [sqrt(e) K_e; sqrt(p) K_p; sqrt(lam) I] W'^T = [sqrt(e) V; sqrt(p) U; sqrt(lam) W^T]."""
    A = np.vstack([np.sqrt(e) * Ke, np.sqrt(p)[:, None] * Kp, np.sqrt(lam) * np.eye(W.shape[1])])
    B = np.vstack([np.sqrt(e) * V, np.sqrt(p)[:, None] * U, np.sqrt(lam) * W.T])
    return np.linalg.lstsq(A, B, rcond=None)[0].T


def test_closed_form_matches_numpy_lstsq():
    rng = np.random.default_rng(0)
    d_out, d_in = 7, 12
    W = rng.normal(size=(d_out, d_in))
    Ke, V = rng.normal(size=(3, d_in)), rng.normal(size=(3, d_out))
    Kp = rng.normal(size=(5, d_in))
    p = np.array([1.0, 2.0, 0.5, 1.0, 3.0])  # per-row preserve weights (MACE's lambda_1 / lambda_3)
    U = Kp @ W.T
    ref = _lstsq_reference(W, Ke, V, Kp, U, 0.3, 1.5, p)
    Wn, rep = CF.closed_form_edit(torch.tensor(W), torch.tensor(Ke), torch.tensor(V), torch.tensor(Kp), lam=0.3,
                                 erase_scale=1.5, preserve_scale=torch.tensor(p))
    assert np.allclose(Wn.numpy(), ref, atol=1e-10)
    # the reported residuals are the relative residuals of the solution
    assert rep["erase_residual"] == pytest.approx(np.linalg.norm(Ke @ ref.T - V) / np.linalg.norm(V), rel=1e-8)
    assert rep["preserve_residual"] == pytest.approx(np.linalg.norm(Kp @ ref.T - U) / np.linalg.norm(U), rel=1e-8)
    assert rep["erase_residual"] < rep["erase_residual_before"]
    # a dict of matrices shares one factorisation and gives the same answer per matrix; return_delta gives W' - W
    W2 = rng.normal(size=(4, d_in))
    V2 = rng.normal(size=(3, 4))
    out, _ = CF.closed_form_edit({"a": torch.tensor(W), "b": torch.tensor(W2)}, torch.tensor(Ke),
                                {"a": torch.tensor(V), "b": torch.tensor(V2)}, torch.tensor(Kp), lam=0.3,
                                erase_scale=1.5, preserve_scale=torch.tensor(p), return_delta=True)
    assert np.allclose(out["a"].numpy(), ref - W, atol=1e-10)
    ref2 = _lstsq_reference(W2, Ke, V2, Kp, Kp @ W2.T, 0.3, 1.5, p)
    assert np.allclose(out["b"].numpy() + W2, ref2, atol=1e-10)


def test_closed_form_exact_erase_and_ill_conditioned_warning():
    rng = np.random.default_rng(1)
    W = torch.tensor(rng.normal(size=(6, 10)))
    Ke, V = torch.tensor(rng.normal(size=(2, 10))), torch.tensor(rng.normal(size=(2, 6)))
    # lam -> 0 with no preserve set: rank-2 system in 10 dimensions -> warning, least squares, exact erase anyway
    with pytest.warns(RuntimeWarning, match="ill-conditioned"):
        Wn, rep = CF.closed_form_edit(W, Ke, V, None, lam=0.0)
    assert rep["solver"] == "lstsq" and rep["erase_residual"] < 1e-8
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a well-posed system does not warn
        _, rep = CF.closed_form_edit(W, Ke, V, None, lam=1e-3)
    assert rep["cond"] < CF.COND_WARN and rep["erase_residual"] < 1e-3
    with pytest.raises(CF.ClosedFormError, match="width"):
        CF.closed_form_edit(W, torch.zeros(2, 9), V, None)


def test_derive_embedding_inverts_a_shared_key_map():
    rng = np.random.default_rng(2)
    W = {f"m{i}": torch.tensor(rng.normal(size=(8, 6))) for i in range(3)}
    c = torch.tensor(rng.normal(size=(4, 6)), dtype=torch.float32)
    same = CF.derive_embedding(W, W, c, reg=1e-9)
    assert torch.allclose(same, c, atol=1e-4)  # an unedited model: c' = c
    A = torch.tensor(rng.normal(size=(6, 6))) + 3 * torch.eye(6, dtype=torch.float64)
    Wn = {k: w @ A for k, w in W.items()}  # every matrix edited by the same key map (UCE-style)
    derived = CF.derive_embedding(Wn, W, c, reg=1e-9)
    assert torch.allclose(derived.double(), torch.linalg.solve(A, c.double().T).T, atol=1e-4)  # c' = A^-1 c


def test_key_rows_modes(tiny_sd):
    L = tiny_sd.max_length
    n = tiny_sd.word_count(ERASE)  # a painting by van gogh -> 5 words
    assert n == 5
    assert CF.key_rows(tiny_sd, ERASE, "all", ANCHOR) == (list(range(L)), list(range(L)))
    assert CF.key_rows(tiny_sd, ERASE, "words", ANCHOR)[0] == [1, 2, 3, 4, 5]
    e, g = CF.key_rows(tiny_sd, ERASE, "eos", ANCHOR)
    assert e[0] == 6 and g[0] == 3 and len(e) == len(g) == L - 6
    e, g = CF.key_rows(tiny_sd, ERASE, "tail", ANCHOR)
    assert e[0] == 5 and g[0] == 2 and len(e) == L - 5
    with pytest.raises(CF.ClosedFormError, match="unknown keys"):
        CF.key_rows(tiny_sd, ERASE, "tokens")
    ra, rb = CF.coexisting_rows(tiny_sd, ERASE, ANCHOR)  # phrase "by van gogh" between "a painting" and EOS
    assert ra[:2] == [1, 2] and rb[:2] == [1, 2] and ra[2] == 6 and rb[2] == 3


def test_capture_cross_attention_restores_processors(tiny_sd):
    layers = tiny_sd.cross_attention_layers()
    before = {n: type(m.processor) for n, m in layers.items()}
    x = torch.randn(2, *tiny_sd.latent_shape)
    t = torch.tensor([10, 500])
    emb = tiny_sd.embed([ERASE, ANCHOR])
    ref = tiny_sd.predict(x, t, emb)
    with finetune.capture_cross_attention(tiny_sd) as store:
        out = tiny_sd.predict(x, t, emb)
    assert len(store) == len(layers)
    for a in store:  # probabilities over the L tokens
        assert a.shape[0] == 2 and a.shape[-1] == tiny_sd.max_length
        assert torch.allclose(a.sum(-1), torch.ones(()), atol=1e-5)
    assert torch.allclose(out, ref, atol=1e-5)  # the capturing processor computes the same attention
    assert {n: type(m.processor) for n, m in layers.items()} == before


def _erased_and_preserved(model, deltas):
    ch = evaluate.prediction_change(model, deltas, [ERASE] + PRESERVE)
    return ch[ERASE], max(ch[p] for p in PRESERVE)


@pytest.mark.parametrize("method", ["uce", "rece", "mace"])
def test_closed_forms_erase_and_preserve(tiny_sd, concept, method):
    # official=True (the default) protects every row of the preserve prompts (keys= is refused with it: it would be
    # ignored, issue 17)
    settings = dict(preserve_scale=10.0) if method in ("uce", "rece") else dict(lam_domain=10.0)
    kw = dict(mapped=ANCHOR) if method == "mace" else dict(anchor=ANCHOR)
    ds = sm.erase(tiny_sd, [concept], method=method, preserve=PRESERVE, **kw, **settings)
    assert len(ds) == 1 and isinstance(ds[0], Delta) and ds[0].method == method
    d = ds[0]
    assert set(d.tensors) == set(tiny_sd.kv_weight_names()) and d.base == tiny_sd.fingerprint()
    assert d.info["seconds"] < 5.0  # closed forms: well under a second unloaded (generous bound for shared CI machines)
    erased, preserved = _erased_and_preserved(tiny_sd, ds)
    assert erased > 0.05, f"{method} did not move the erased prompt's noise prediction ({erased:.3g})"
    # stated tolerance: preserved prompts move less than a third of the erased prompt
    assert preserved < erased / 3, f"{method}: preserved prompts moved {preserved:.3g} vs erased {erased:.3g}"


@pytest.mark.parametrize("method", ["esd", "ablating", "fmn", "all_but_one"])
def test_finetuning_methods_change_the_concept(tiny_sd, concept, method):
    kw = {}
    if method in ("ablating", "all_but_one"):
        kw["anchor"] = ANCHOR
    if method == "ablating":
        kw.update(n_anchor=2, anchor_steps=2)
    if method == "fmn":
        kw["words"] = ["van", "gogh"]
    ds = sm.erase(tiny_sd, [concept], method=method, lr=1e-2, **STEPS, **kw)
    d = ds[0]
    assert d.method == method and d.info["steps"] == 2 and len(d.info["loss"]) == 2
    assert all(np.isfinite(d.info["loss"]))
    params = dict(tiny_sd.unet.named_parameters())
    assert all(k in params and v.shape == params[k].shape for k, v in d.tensors.items())
    assert d.l1_norm() > 0
    erased, _ = _erased_and_preserved(tiny_sd, ds)
    assert erased > 1e-3, f"{method} did not move the erased prompt's noise prediction ({erased:.3g})"


def test_fmn_lowers_attention_mass(tiny_sd, concept):
    emb = tiny_sd.embed([ERASE])
    x = torch.randn(2, *tiny_sd.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 700])
    pos = finetune.concept_positions(tiny_sd, ERASE, ["van", "gogh"])
    assert pos == [4, 5]

    def mass(weights=None):
        with torch.no_grad(), finetune.capture_cross_attention(tiny_sd) as store:
            tiny_sd.predict(x, t, emb.expand(2, -1, -1), weights)
        return float(torch.stack([a[..., pos].sum(-1).mean() for a in store]).mean())

    from sepme_lib.deltas import edited_weights
    d = sm.erase(tiny_sd, [concept], method="fmn", words=["van", "gogh"], lr=1e-2, steps=5, batch=2)[0]
    assert mass(edited_weights(tiny_sd, [d])) < mass()


def test_sepme_and_gcirs_in_registry(tiny_sd, concept):
    ds = sm.erase(tiny_sd, [concept], method="sepme", anchor=ANCHOR, single="anchors", cap=2, warmup=1, batch=2,
                  min_null_dim=1)
    assert len(ds) == 1 and ds[0].base == tiny_sd.fingerprint()
    assert ds[0].info["protected"] == ["", ANCHOR]  # c_0 and the (deduplicated) anchors
    assert ds[0].hparams["warmup"] == Settings().single_warmup
    plain = sm.erase(tiny_sd, [concept], method="sepme", cap=2, batch=2, min_null_dim=1)[0]  # SD: the paper's A = {c_0}
    assert plain.info["protected"] == [""] and plain.hparams["warmup"] == Settings().warmup
    g = sm.erase(tiny_sd, [concept], method="gcirs", cap=2, warmup=1, batch=2, gcirs_lr=1e-2)
    assert len(g) == 1 and g[0].method == "gcirs"
    assert _erased_and_preserved(tiny_sd, g)[0] > 1e-4
    assert set(methods.METHODS) == {"sepme", "gcirs", "esd", "ablating", "fmn", "uce", "rece", "mace", "all_but_one",
                                   "speed"}


def test_bad_input_is_named(tiny_sd, concept):
    with pytest.raises(methods.MethodError, match="unknown method"):
        sm.erase(tiny_sd, [concept], method="esd-u")
    with pytest.raises(methods.MethodError, match="unknown setting"):
        sm.erase(tiny_sd, [concept], method="uce", anchor=ANCHOR, lamda=1.0)
    with pytest.raises(ConceptError, match="unknown concept 'striped'"):
        sm.erase(tiny_sd, ["striped"], method="uce")
    with pytest.raises(ConceptError, match="one anchor string, or one per prompt"):
        sm.erase(tiny_sd, [concept], method="uce", anchor=["a", "b", "c"])
    with pytest.raises(ValueError, match="params must be"):
        sm.erase(tiny_sd, [concept], method="esd", params="unet", **STEPS)


def test_redteam_embedding_recovers_original_keys(tiny_sd, concept):
    d = sm.erase(tiny_sd, [concept], method="uce", anchor=ANCHOR, preserve=PRESERVE)[0]
    names = tiny_sd.kv_weight_names()
    W0 = tiny_sd.params(names)
    Wn = {k: W0[k].detach() + d.tensors[k] for k in names}
    c = tiny_sd.embed([ERASE])
    derived = evaluate.redteam_embeddings(tiny_sd, [d], [ERASE], reg=1e-3)

    def gap(emb):  # distance of the edited model's keys/values from the original model's on the concept
        return sum(float((emb[0] @ Wn[k].T - c[0] @ W0[k].detach().T).norm()) for k in names)

    assert gap(derived) < 0.5 * gap(c)  # the derived embedding regenerates the erased keys/values


def test_sample_accepts_embeddings(tiny_sd):
    prompts = [ERASE, ANCHOR]
    a = tiny_sd.sample(prompts, seeds=[0, 1], steps=2)
    b = tiny_sd.sample(None, seeds=[0, 1], steps=2, embeddings=tiny_sd.embed(prompts))
    assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="embeddings"):
        tiny_sd.sample(prompts, seeds=[0, 1], steps=2, embeddings=tiny_sd.embed([ERASE]))


def test_world_helpers(tiny):
    assert concepts.world_anchor("a red star in striped style", "striped") == "a red star"
    assert concepts.world_anchor("an object in striped style", "striped") == "an object"
    assert concepts.world_anchor("a red star", "star") == "a red object"
    assert concepts.world_anchor("a star", "star") == "an object"
    keep = concepts.preserve_prompts(tiny, ["striped"])
    assert keep and not any("striped" in p for p in keep)
    general = concepts.general_prompts(tiny, ["striped", "star"], n=32)
    assert len(general) == 32 and not any("striped" in p or "star" in p.split() for p in general)


def test_profile_settings_cut_every_trained_method_in_ci_only():
    from sepme_lib import config

    ci, full = config.profile("ci"), config.profile("full")
    for m in methods.METHODS:
        assert methods.profile_settings(m, full) == {}, m
        if m in methods.CLOSED_FORM:
            assert methods.profile_settings(m, ci) == {}
            continue
        key = "cap" if m in ("sepme", "gcirs") else "steps"
        assert methods.profile_settings(m, ci)[key] == ci["finetune_steps"], m


def test_relatives_benchmark_on_the_bundled_world(monkeypatch):
    """The comparison of notebooks 06-07 end to end on the bundled model (the fastest method, with the plumbing
    sizes: 6 images, 8 DDIM steps; the ci profile's 20 x 20 are for numbers a reader sees)."""
    from sepme_lib import bench, config, report

    monkeypatch.setitem(config.PROFILES, "ci", dict(config.PROFILES["ci"], **config.PLUMBING))
    out = bench.relatives_benchmark("ci", methods_=["uce"])
    r = out["methods"]["uce"]
    assert [row["erased"] for row in r["rows"]] == ["striped", "striped+checkered+dotted"]
    assert out["original"]["striped"] >= 0.5 and r["rows"][0]["acc"]["striped"] < out["original"]["striped"]
    assert 0 <= r["others_acc"] <= 1 and r["seconds"] >= 0 and out["perceptual_metric"] in ("1-SSIM", "LPIPS-alex", "LPIPS-alex@64")
    assert "| uce |" in out["markdown"] and "| uce |" in report.relatives_summary(out)
    with pytest.raises(methods.MethodError, match="unknown methods"):
        bench.relatives_benchmark("ci", methods_=["uce", "esd-u"])
