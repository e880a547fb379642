"""The attacks of notebook 09 (``sepme_lib.attacks``), robust SepME (``sepme.harden``) and the robustness benchmark's
rows. Each attack is run against an erasure that hides the concept from its plain prompts and must bring it back
(a check that fails when the attack does nothing): the derived embedding here; textual inversion (300 steps) and the
prompt search (against its own starting point) in notebook 09's cells, which nbval runs in `make test` (the same
runs, asserted there once instead of twice); robust SepME must keep the certificate and separability."""
from __future__ import annotations

import pytest
import torch

import sepme_lib as sm
from sepme_lib import attacks, closed_form, methods, robustness, sepme
from sepme_lib.concepts import make_concepts


def test_encode_ids_is_the_models_embedding_and_extra_rows_are_read(tiny):
    prompts = ["a red star in striped style", "an object", ""]
    ids = tiny.tokenizer(prompts, padding="max_length", max_length=tiny.max_length, return_tensors="pt").input_ids
    assert torch.equal(attacks.encode_ids(tiny, ids), tiny.embed(prompts))
    # an appended token vector equal to "striped"'s own row gives the prompt with the word
    table = tiny.text_encoder.get_input_embeddings().weight
    word = tiny.tokenizer("striped", add_special_tokens=False).input_ids
    new = attacks.replaced_ids(tiny, prompts[:1], "striped", [table.shape[0]])
    got = attacks.encode_ids(tiny, new, table[word].detach())
    assert torch.allclose(got, tiny.embed(prompts[:1]), atol=1e-6)


def test_replaced_ids_and_banned_tokens(tiny):
    tok = tiny.tokenizer
    ids = attacks.replaced_ids(tiny, ["a red star in striped style"], "striped", [tok.convert_tokens_to_ids("red</w>")])
    assert tok.decode([i for i in ids[0].tolist() if i > 1]) .split() == "a red star in red style".split()
    kept = attacks.replaced_ids(tiny, ["a red star in striped style"], "striped", [tok.convert_tokens_to_ids("red</w>")],
                                keep=True)
    assert "red striped style" in tok.decode([i for i in kept[0].tolist() if i > 1])
    banned = {tok.convert_ids_to_tokens(i) for i in attacks.banned_tokens(tiny, "striped")}
    assert {"striped</w>", "stripe", "stri"} <= banned and "red</w>" not in banned and "dotted</w>" not in banned
    with pytest.raises(sm.SepmeError, match="does not contain"):
        attacks.replaced_ids(tiny, ["a red star"], "striped", [2])
    with pytest.raises(sm.SepmeError, match="unknown attack"):
        attacks.run(tiny, None, [], "striped", "jailbreak")


def test_derive_embedding_lives_in_attacks_and_closed_form_shows_it():
    assert closed_form.derive_embedding is attacks.derive_embedding and closed_form.kv_weights is attacks.kv_weights


@pytest.fixture(scope="module")
def bundled(tiny):
    return sepme.bundled_deltas(tiny, ["striped"])


def test_derived_embedding_brings_back_what_sepme_hides(tiny, clf, bundled):
    """The committed finding of notebook 09: the bundled SepME increment erases striped from its prompts, and RECE's
    derived embedding draws it again (the concept is hidden, not removed)."""
    plain = sm.acc_table(tiny, clf, ["striped"], n=10, deltas=bundled)["striped"]
    r = attacks.run(tiny, clf, bundled, "striped", "derived", n=10)
    assert plain <= 0.1 and r["acc"] >= 0.5, (plain, r["acc"])
    assert r["embeddings"].shape == (10, tiny.max_length, 256)


def test_robust_sepme_keeps_the_certificate_and_separability(tiny):
    """Two concepts, one short round each: the hardened increments still leave every protected prompt's keys and values
    exactly unchanged (the other concept's prompts, c_0), so each stays removable on its own."""
    cons = make_concepts(tiny, ["striped", "dotted"], n_ref=16)
    ds = sm.erase(tiny, cons, method="sepme", cap=20, warmup=2, robust=dict(rounds=1, inversion_steps=5))
    plain = sm.erase(tiny, cons, method="sepme", cap=20, warmup=2)
    for d, p in zip(ds, plain):
        assert d.method == "sepme1_robust" and d.info["robust"]["rounds_done"][0]["conditions"] == 2 * 4  # prompts + inversion
        assert max(sm.leakage(tiny, d, d.info["protected"]).values()) <= 1e-5
        assert sum((d.tensors[k] - p.tensors[k]).abs().sum() for k in d.tensors) > 0  # the round trained further
    striped, dotted = ds
    assert max(sm.leakage(tiny, striped, dotted.info["prompts"]).values()) <= 1e-5
    with pytest.raises(sm.SepmeError, match="mode='separate'"):
        sm.erase(tiny, cons, method="sepme", mode="joint", robust=True)
    with pytest.raises(sm.SepmeError, match="robust attacks"):
        sm.erase(tiny, cons, method="sepme", robust=dict(attacks=["jailbreak"]))


def test_span_share_is_one_inside_the_protected_span_and_zero_outside(tiny):
    protected = ["", "a red star in dotted style"]
    inside = tiny.embed(protected)
    assert torch.allclose(attacks.span_share(tiny, inside, protected), torch.ones(2), atol=1e-5)
    P = attacks.span_projector(tiny, protected).float()
    outside = torch.randn(1, tiny.max_length, 256) @ (torch.eye(256) - P)
    assert attacks.span_share(tiny, outside, protected).item() < 1e-6


def test_attacks_run_on_a_random_sd_model(tiny_sd):
    """Every attack on the random-weight SD stand-in (plumbing: shapes, the token table, the banned pieces)."""
    name = sm.concept_set(tiny_sd).erase[0]
    cons = make_concepts(tiny_sd, [name], n_ref=2, steps=2)
    d = sm.erase(tiny_sd, cons, method="uce")
    for a, kw in (("derived", {}), ("inversion", dict(steps=2, batch=1)),
                  ("prompt_search", dict(tokens=1, sweeps=1, batch=1, candidates=4))):
        out = attacks.ATTACKS[a](tiny_sd, d, cons[0], [cons[0].prompt], **kw)
        assert out["embeddings"].shape == (1, tiny_sd.max_length, tiny_sd.text_encoder.config.hidden_size)
        assert torch.isfinite(out["embeddings"]).all()


def test_robustness_rows_have_the_issue_schema(tiny, clf, monkeypatch):
    """The benchmark's plumbing (rows, keys, the table) with the smallest budgets: numbers are the full run's job."""
    monkeypatch.setitem(robustness.PROFILES, "ci", dict(styles=("striped",), n=2, n_ref=4, sample_steps=4, budgets={
        "inversion": dict(steps=2), "prompt_search": dict(tokens=1, candidates=4, batch=2)}))
    out = robustness.benchmark("ci", ["original", "uce"], model=tiny, judge=clf)
    assert len(out["rows"]) == 2 * len(attacks.NAMES)
    for r in out["rows"]:
        assert set(robustness.ROW_KEYS) <= set(r) and r["certified"] is None and 0 <= r["attack_acc"] <= 1
    assert [r["heldout_protected_kv"] for r in out["rows"]][:3] == [None] * 3  # no edit, no key/value change
    assert "| uce |" in out["markdown"]
    assert methods.ATTACK_BUDGETS["tiny"].keys() == set(attacks.NAMES)


def test_attack_budgets_follow_the_family_and_cap_random_sd_in_ci(tiny, tiny_sd):
    """Notebook 09's budgets: the bundled model's are ATTACK_BUDGETS as they are (in every profile); a family that caps
    ci training (the random SD folder of `make test-sd`) runs every attack loop at the profile's sd_cap."""
    tiny_b = methods.attack_budgets(tiny, {"sd_cap": 3})
    assert {a: tiny_b[a] for a in attacks.NAMES} == methods.ATTACK_BUDGETS["tiny"]
    assert tiny_b["robust"] == {"inversion_steps": methods.ROBUST["tiny"]["inversion_steps"]}
    sd_b = methods.attack_budgets(tiny_sd, {"sd_cap": 3})
    assert sd_b["inversion"]["steps"] == 3 and sd_b["robust"]["inversion_steps"] == 3
    assert sd_b["prompt_search"]["tokens"] == 1 and sd_b["prompt_search"]["candidates"] == 3
    full = methods.attack_budgets(tiny_sd, {"sd_cap": None})
    assert full["inversion"] == methods.ATTACK_BUDGETS[tiny_sd.family]["inversion"]
    assert methods.ATTACK_BUDGETS[tiny_sd.family]["inversion"]["steps"] != 3  # the cap changed something


def test_tradeoff_points_keep_the_certificate(tiny, clf, monkeypatch):
    """`bench robustness --tradeoff` plumbing at the smallest sizes: one row per point and style, the 0-round point
    is concept-level SepME, every point keeps the certificate, and more rounds cost more CPU."""
    monkeypatch.setitem(robustness.TRADEOFF, "ci", dict(n=2, n_ref=4, sample_steps=4, settings=dict(cap=6, warmup=1),
                                                        series={"concept": dict(rounds=(0, 1), budgets=(3,))}))
    monkeypatch.setitem(robustness.PROFILES, "ci", dict(robustness.PROFILES["ci"], budgets={"inversion": dict(steps=2)}))
    out = robustness.tradeoff("ci", model=tiny, judge=clf)
    assert [(r["rounds"], r["budget"]) for r in out["rows"]] == [(0, None)] * 3 + [(1, 3)] * 3
    assert {r["concept"] for r in out["rows"]} == set(robustness.STYLES)
    assert all(r["certified"] <= 1e-5 and 0 <= r["inversion_acc"] <= 1 for r in out["rows"])
    assert out["rows"][3]["cpu_s_per_concept"] > out["rows"][0]["cpu_s_per_concept"]
    assert out["markdown"].count("\n| ") == 2  # two points (rows after the header)
    means = [sum(r["inversion_acc"] for r in out["rows"][i:i + 3]) / 3 for i in (0, 3)]
    ((name, (rounds, ys)),) = robustness.tradeoff_curves(out).items()
    assert name == "concept-level, 3 steps/round" and rounds == [0, 1] and ys == pytest.approx(means)
    with pytest.raises(sm.SepmeError, match="keyed by protection"):
        robustness.tradeoff("ci", series={"word": dict(rounds=(1,), budgets=(3,))}, model=tiny, judge=clf)
