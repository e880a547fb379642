"""Evaluation bookkeeping: subsets, summaries (erased / others / restoration drift), tables, paper numbers."""
import pytest

from sepme_lib import evaluate, paper, report, world


def test_subsets_are_the_seven_combinations():
    subs = evaluate.subsets(["a", "b", "c"])
    assert len(subs) == 7 and subs[0] == ["a"] and subs[-1] == ["a", "b", "c"]


def test_summary_by_hand():
    original = dict(a=1.0, b=0.9, c=0.8, z=1.0)
    rows = [dict(subset=["a"], acc=dict(a=0.1, b=0.85, c=0.8, z=0.95)),
            dict(subset=["a", "b"], acc=dict(a=0.05, b=0.2, c=0.7, z=1.0))]
    s = evaluate.summarise(rows, original, ["a", "b", "c"])
    assert s["erased_acc_max"] == pytest.approx(0.2)
    assert s["others_ratio_min"] == pytest.approx(0.7 / 0.8)
    # drift counts only concepts that have a delta but are left out: b in row 1 (0.05), c in both (0, 0.1)
    assert s["restoration_drift_max"] == pytest.approx(0.1)


def test_eval_prompts_show_the_concept(tiny):
    ps = evaluate.eval_prompts(tiny, "dotted", 10)
    assert len(ps) == 10 and all("in dotted style" in p for p in ps)
    assert len(set(ps)) == 10
    assert all(p.split()[2] == "star" for p in evaluate.eval_prompts(tiny, "star", 6))


def test_markdown_table_and_report_html():
    md = report.markdown_table([dict(x=0.5, y="k")], ["x", "y"])
    assert md.splitlines()[0] == "| x | y |" and "| 0.50 | k |" in md
    html = report.md_table_to_html("caption\n" + md)
    assert "<th>x</th>" in html and "<td>0.50</td>" in html and "caption" in html


def test_paper_numbers_and_restoration_drift():
    assert paper.restoration_drift("SepME1") == pytest.approx(1 - 0.908)
    assert paper.restoration_drift("AbConcept") == pytest.approx(1 - 0.6)
    rows = paper.table4_rows("SepME2")
    assert rows[-1] == dict(erased="VG+CE+PC", VG=0.228, CE=0.052, PC=0.108)
    assert set(paper.ANALOGUE.values()) <= set(world.STYLES)


def test_concept_prompts_cycle_other_attributes():
    ps = world.concept_prompts("striped", 4)
    assert ps[0] == "an object in striped style" and len(set(ps)) == 4
    assert all("striped" in p for p in ps)
    assert world.concept_prompts("star", 3)[1:] == ["a red star in striped style", "a green star in checkered style"]
