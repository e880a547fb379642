"""The paper's numbers (``sepme_lib.paper``) and the table layouts of notebook 07 (``report.erasure_markdown``,
``report.combination_markdown`` on the paper's Tables 3-5)."""
import pytest

from sepme_lib import paper, report


def test_transcriptions_spot_checks():
    assert paper.TABLE1["G-CiRs"]["PC"] == dict(VG=0.908, PC=0.052, CE=1.0)
    assert paper.TABLE1_L1["FMN20"] == pytest.approx(sum(paper.TABLE1_L1_ROWS["FMN20"].values()) / 3, abs=0.01)
    for m, rows in paper.TABLE1_L1_ROWS.items():
        assert paper.TABLE1_L1[m] == pytest.approx(sum(rows.values()) / 3, abs=0.01), m
    assert paper.TABLE2["FMN30"]["Others"] == 0.878
    assert paper.TABLE3["SepME"]["VG"][4] == 0.272 and paper.TABLE3["G-CiRs"]["CE"][5] == 0.036
    assert paper.TABLE5["SepME2"]["Others"][-1] == 0.916 and paper.TABLE5["G-CiRs-kv"]["PC"][-1] == 0.072
    assert [r["tau"] for r in paper.TABLE6["CE"]] == [1e-4, 5e-5, 0.0, -5e-5, -1e-4]
    for t in (paper.TABLE3, paper.TABLE4, paper.TABLE5):
        for m, cols in t.items():
            assert all(len(v) == len(paper.TABLE4_SUBSETS) for v in cols.values()), m


def test_combination_tab_renders_like_ours():
    tab = paper.combination_tab("SepME1", 5)
    assert tab["original"] == dict(VG=1.0, CE=1.0, PC=1.0, Others=1.0) and len(tab["rows"]) == 7
    md = report.combination_markdown(tab, names=["VG", "CE", "PC"])
    assert "θ + Δθ1 + Δθ3" in md and "| PC | 1.00 | 1.00 | 1.00 | **0.00** |" in md
    assert "| Others | 1.00 | 0.96 |" in md
    with pytest.raises(ValueError, match="Tables 3, 4, 5"):
        paper.combination_tab("SepME1", 3)


def test_erasure_markdown_layout():
    res = {m: paper.table1_results(m) for m in ("ESD", "G-CiRs")}
    md = report.erasure_markdown(res, dict(VG=1.0, CE=1.0, PC=1.0), ["VG", "CE", "PC"],
                                 l1={m: paper.TABLE1_L1_ROWS[m] for m in res})
    lines = md.splitlines()
    assert lines[0] == "| erased | evaluated | ORI | ESD | G-CiRs |"
    assert "| VG | VG* | 1.00 | 0.32 | 0.23 |" in lines and "| PC | PC* | 1.00 | 0.40 | 0.05 |" in lines
    assert "| CE | ‖Δθ‖_p | - | 128.50 | 36.55 |" in lines and not any("others" in x for x in lines)
    ours = {"sepme": {"a": dict(a=0.0, b=1.0, x=0.5, y=1.0)}}
    md = report.erasure_markdown(ours, dict(a=1.0, b=1.0, x=1.0, y=1.0), ["a", "b"])
    assert "| a | others | 1.00 | 0.75 |" in md and "| a | a* | 1.00 | 0.00 |" in md
    with pytest.raises(ValueError, match="at least one method"):
        report.erasure_markdown({}, {}, [])


def test_with_others_adds_the_mean_of_the_other_classes():
    tab = dict(original=dict(a=1.0, b=0.5, c=1.0), rows=[dict(subset=["a"], acc=dict(a=0.0, b=0.5, c=0.5))])
    out = report.with_others(tab, ["a"])
    assert out["original"]["others"] == 0.75 and out["rows"][0]["acc"]["others"] == 0.5
    assert "others" not in tab["original"]  # a copy
    assert "others" not in report.with_others(tab, ["a", "b", "c"])["original"]
