"""Concept-level separability: the caption split, the held-out measurements, SepME's concept-level settings, and the
benchmark's report."""
import math

import pytest

from sepme_lib import concepts, methods, nullspace, separability, sepme, world


def test_caption_split_is_fixed_disjoint_and_keeps_the_listed_prompts(tiny):
    for name in world.STYLES:
        build, held = concepts.caption_split(tiny, name)
        assert len(build) == len(held) == 15 and not set(build) & set(held)
        assert sorted(build + held) == sorted(concepts.concept_captions(tiny, name))
        assert set(concepts.listed_prompts(tiny, name)) <= set(build)
        assert concepts.caption_split(tiny, name) == (build, held)
    prior = concepts.prior_captions(tiny, ["striped"])
    assert len(prior) == 75 and not any("striped" in p for p in prior)
    held = {p for s in world.STYLES for p in concepts.caption_split(tiny, s)[1]}
    assert not held & set(prior)
    # every prompt the other methods use by default is a build caption
    assert not held & set(concepts.preserve_prompts(tiny, ["striped"]))


def test_caption_split_on_stable_diffusion(tiny_sd, tmp_path):
    build, held = concepts.caption_split(tiny_sd, "Van Gogh")
    assert set(concepts.concept_set(tiny_sd).prompts("Van Gogh", 4)) <= set(build) and held
    for p in build + held:
        tiny_sd.check_prompt(p)
    f = tmp_path / "captions.txt"
    f.write_text("a photo of a cat\na painting by Van Gogh\n\na tree\n")
    assert concepts.prior_captions(tiny_sd, ["Van Gogh"], f) == ["a photo of a cat", "a tree"]


def test_held_out_measurements_of_the_bundled_increments(tiny):
    ds = sepme.bundled_deltas(tiny)
    erased = [d.name for d in ds]
    for d in ds:
        kv = separability.kv_metrics(tiny, d, d.name, erased)
        assert kv["heldout_overlap"] == 0
        assert kv["certified_leakage_max"] < 1e-5  # exact for the prompts stacked into A
        assert kv["heldout_protected_kv_max"] > 100 * kv["certified_leakage_max"]  # measured, not certified
        assert kv["own_kv_min"] > kv["heldout_protected_kv_median"]
        assert 0.5 < kv["delta_rel_norm_max"] < 2.0


def test_concept_level_sepme_certifies_its_listed_prompts(tiny):
    s = methods.concept_level(tiny, cap=3)
    ds = methods.erase(tiny, ["striped", "checkered"], method="sepme", **s)
    d = ds[0]
    assert d.info["null_dim"] < d.info["exact_null_dim"] and d.info["soft"] == s["soft"]
    assert set(concepts.caption_split(tiny, "striped")[0]) <= set(d.info["prompts"])
    assert set(d.info["protected"]) == {""} | set(concepts.listed_prompts(tiny, "checkered"))
    assert max(nullspace.leakage(tiny, d, d.info["protected"]).values()) < 1e-5
    kv = separability.kv_metrics(tiny, d, "striped", ["striped", "checkered"])
    assert kv["heldout_overlap"] == 0 and d.info["steps"] == 3
    assert d.info["history"]["monitored"] == "anchor residual"
    with pytest.raises(ValueError, match="protection"):
        methods.settings("sepme", tiny, protection="everything")


def test_concept_level_sepme2_first_stage_is_decoupled(tiny):
    ds = methods.erase(tiny, ["striped", "dotted"], method="sepme", mode="iterative",
                       **methods.concept_level(tiny, cap=2))
    assert all(set(d.tensors) == set(tiny.kv_weight_names()) for d in ds)  # no G-CiRs stage on all of attn2
    assert ds[0].info["protected"] == [""] and "prior" in ds[0].info


def test_concept_level_runs_on_stable_diffusion(tiny_sd):
    ds = methods.erase(tiny_sd, ["Van Gogh", "Picasso"], method="sepme", n_ref=2,
                       **methods.concept_level(tiny_sd, cap=2))
    assert [d.info["steps"] for d in ds] == [2, 2]
    assert max(nullspace.leakage(tiny_sd, ds[0], ds[0].info["protected"]).values()) < 1e-5


def test_held_out_acc_and_entry_summary(tiny, clf):
    ds = sepme.bundled_deltas(tiny, ["striped"])
    acc = separability.heldout_acc(tiny, clf, ds, ["striped", "blank"], n=2, steps=2)
    assert set(acc) == {"striped", "blank"} and all(0 <= a <= 1 and 0 <= b <= 1 for a, b in acc.values())
    rows = [dict(erased="a", certified_leakage_max=1e-6, heldout_protected_kv_max=0.04, own_kv_min=1.2,
                 erased_heldout_acc=0.0, to_anchor_fraction=0.9, delta_rel_norm_max=1.0),
            dict(erased="b", certified_leakage_max=2e-6, heldout_protected_kv_max=0.06, own_kv_min=1.5,
                 erased_heldout_acc=0.2, to_anchor_fraction=0.7, delta_rel_norm_max=0.2)]
    summ = separability.summarise(rows)
    assert summ["heldout_protected_kv_max"] == 0.06 and summ["own_kv_min"] == 1.2
    assert summ["erased_heldout_acc_max"] == 0.2 and summ["to_anchor_fraction_min"] == 0.7
    ok = separability.meets(summ)
    assert ok["certified_leakage_max"] and not ok["heldout_protected_kv_max"] and ok["own_kv_min"]
    assert math.isnan(summ["unrelated_kv_median"]) and "unrelated_kv_median" not in ok


def test_markdown_report():
    entry = dict(rows=[dict(erased="striped", certified_leakage_max=1e-6, own_kv_min=1.3)],
                 summary=dict(certified_leakage_max=1e-6, own_kv_min=1.3, seconds_per_concept=4.0))
    out = dict(entries={"sepme1_concept": entry},
               timing=dict(today=dict(steps=[160], seconds_per_step=0.15, seconds_per_concept=25.0),
                           concept=dict(steps=[35], seconds_per_step=0.1, seconds_per_concept=4.0), speedup=6.25,
                           threads=1),
               curve=[dict(soft=1e-6, heldout_protected_kv_max=0.04)], curve_concept="striped")
    md = separability.markdown(out)
    assert "sepme1_concept" in md and "6.25x" in md and "Trade-off" in md and "✓" in md


def test_unknown_entries_are_refused():
    with pytest.raises(ValueError, match="unknown benchmark entries"):
        separability.benchmark("ci", entries=["esd2"])
