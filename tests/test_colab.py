"""Issue 18: the colab profile (Stable Diffusion 1.4 in fp16 on a Colab T4): it resolves, the benchmarks refuse it
clearly, every notebook's T4 estimate from the committed CPU rows stays within 20 min and the T4's memory (so that
growing the sizes fails here), the committed estimate file is the one these sizes give, and every notebook's header
names the profile with its estimate."""
import json
import re
from pathlib import Path

import pytest

from sepme_lib import bench, config, gpupath, robustness, separability, t4
from sepme_lib.config import BadValue

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("0*_*.ipynb"))


@pytest.fixture(scope="module")
def committed():
    cpu = json.loads((config.RESULTS / "gpu_path_cpu.json").read_text())
    est = json.loads((config.RESULTS / t4.RESULT).read_text())
    rows = {r["op"]: r for r in cpu["rows"] if r.get("measured")}
    return rows, est


def test_colab_profile_resolves_on_sd_and_is_full_on_the_bundled_model():
    sd = config.profile("colab", "sd")
    assert sd["name"] == "colab" and {k: sd[k] for k in config.PROFILES["colab"]} == config.PROFILES["colab"]
    assert sd["sd_cap"] and sd["sample_steps"] >= 10 and sd["images_per_concept"] >= 3 and sd["n_ref"] >= 8
    tiny = config.profile("colab", "tiny")
    assert tiny == dict(config.PROFILES["full"], name="colab")
    assert set(config.PROFILES["colab"]) == set(config.PROFILES["full"])  # every size the notebooks read


def test_benchmarks_refuse_colab_with_a_clear_error():
    assert config.bench_profile("ci") == "ci" and config.bench_profile("full") == "full"
    with pytest.raises(BadValue, match="colab sizes the notebooks.*--profile full"):
        config.bench_profile("colab")
    with pytest.raises(BadValue, match="not 'colab'"):  # before any model is loaded
        robustness.benchmark("colab")
    with pytest.raises(BadValue, match="not 'colab'"):
        robustness.tradeoff("colab")
    with pytest.raises(BadValue, match="not 'colab'"):
        separability.benchmark("colab")
    with pytest.raises(BadValue, match="not 'colab'"):
        bench.bench_joint("colab")
    with pytest.raises(SystemExit):  # argparse: --profile offers ci and full only
        bench.main(["sepme", "--profile", "colab"])


def test_every_notebook_is_counted():
    counts = gpupath.notebook_counts(config.profile("colab", "sd"))
    assert sorted(counts) == [p.stem for p in NOTEBOOKS]
    assert counts["09_erased_or_hidden"]["inversion"] > 0 and counts["09_erased_or_hidden"]["search"] > 0


def test_colab_fits_a_t4_on_the_committed_rows(committed):
    rows, est = committed
    ops = t4.op_estimates(rows, est["flops"])  # the committed FLOP counts (test_flop_counts_are_current checks them)
    nbs = t4.notebook_t4(ops, "colab")
    assert len(nbs) == len(NOTEBOOKS)
    for e in nbs:
        assert e["estimate"] and not e["measured"]
        assert e["minutes"] <= t4.MINUTES, (e["notebook"], e["minutes"], e["seconds_by_part"])
        assert e["peak_gib"] <= t4.T4_GIB, (e["notebook"], e["peak_gib"], e["peak_op"])
    # the committed file is what these sizes and rows give (rerun `python -m sepme_lib.t4 --save` after a change)
    assert est["sizes"]["colab"] == config.profile("colab", "sd")
    saved = {(e["profile"], e["notebook"]): e for e in est["notebooks"]}
    for e in nbs:
        assert saved[("colab", e["notebook"])]["seconds"] == pytest.approx(e["seconds"], rel=1e-9)
    assert all(o["estimate"] and not o["measured"] for o in est["ops"].values())
    assert est["estimate"] and not est["measured"] and "T4" in est["device"]


def test_flop_counts_are_current(committed):
    _, est = committed
    flops = t4.count_flops()
    assert flops == est["flops"]
    assert 1.5e12 < flops["unet_forward"] < 1.7e12  # SD 1.4's UNet at 512x512, batch 2 (2 FLOPs per multiply-add)
    assert flops["search_evaluation"] == 2 * flops["unet_forward"]
    assert flops["unet_forward"] < flops["train_sepme"] < flops["train_gcirs"]


def test_every_header_names_the_colab_profile_and_its_estimate(committed):
    _, est = committed
    minutes = {e["notebook"]: e["minutes"] for e in est["notebooks"] if e["profile"] == "colab"}
    for path in NOTEBOOKS:
        first = json.loads(path.read_text())["cells"][0]
        text = "".join(first["source"])
        on_colab = text[text.index("**On Colab**"):]
        assert first["cell_type"] == "markdown" and 'PROFILE = "colab"' in on_colab, path.name
        found = re.findall(r"about (\d+) min with `PROFILE = \"colab\"`", text)
        assert found == [f"{minutes[path.stem]:.0f}"], (path.name, found, minutes[path.stem])
        assert "estimate" in text and "colab_t4_estimate.json" in text, path.name


def test_colab_caps_training_and_attacks_on_sd_only(tiny_sd, tiny):
    from sepme_lib import methods

    sd, bundled = config.profile("colab", "sd"), config.profile("colab", "tiny")
    cap = sd["sd_cap"]
    assert methods.course_settings("sepme", tiny_sd, sd) == {"cap": cap}
    assert methods.course_settings("fmn", tiny_sd, sd) == {"steps": cap}
    budgets = methods.attack_budgets(tiny_sd, sd)
    assert budgets["inversion"]["steps"] == cap and budgets["robust"]["inversion_steps"] == cap
    assert methods.course_settings("sepme", tiny, bundled) == {}  # the bundled model trains as in full
    assert methods.profile_settings("esd", sd) == methods.profile_settings("esd", bundled) == {}
