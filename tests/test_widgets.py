"""The combination widget's logic (notebook 05) as plain functions, plus the thin ipywidgets wiring."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from sepme_lib import erase, perceptual, widgets, world
from sepme_lib.deltas import edited_weights

STEPS = 2  # DDIM steps in these tests: the functions are what is tested, not image quality


@pytest.fixture(scope="session")
def ds(tiny):
    """Two SepME_1 increments (striped, checkered) with a handful of steps: enough to be non-zero."""
    return erase(tiny, ["striped", "checkered"], method="sepme", n_ref=4, cap=4, batch=2)


@pytest.fixture
def no_lpips(tmp_path):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "empty_hub"))
    yield
    torch.hub.set_dir(old)


# ------------------------------------------------------------------------------------------ controls
def test_scales_from_controls_values_and_widgets():
    assert widgets.scales_from_controls([True, False, True], [0.5, 2.0, 1]) == [0.5, 0.0, 1.0]
    ipw = pytest.importorskip("ipywidgets")
    checks = [ipw.Checkbox(value=v) for v in (True, False)]
    sliders = [ipw.FloatSlider(value=v, min=-1, max=2) for v in (1.5, 1.0)]
    assert widgets.scales_from_controls(checks, sliders) == [1.5, 0.0]


@pytest.mark.parametrize("checks, sliders, err, match", [
    ([True, True], [1.0], ValueError, "2 checkboxes but 1 sliders"),
    (["yes"], [1.0], TypeError, "expected True or False"),
    ([True], ["strong"], TypeError, "expected a number"),
    ([True], [float("nan")], ValueError, "non-finite"),
])
def test_scales_from_controls_bad_input(checks, sliders, err, match):
    with pytest.raises(err, match=match):
        widgets.scales_from_controls(checks, sliders)


def test_prompt_targets():
    assert widgets.prompt_targets("a red star in striped style") == dict(style="striped", shape="star", colour="red")
    assert widgets.prompt_targets("a blue circle") == dict(style="blank", shape="circle", colour="blue")
    assert widgets.prompt_targets("an object in dotted style") == dict(style="dotted", shape=None, colour=None)
    assert widgets.prompt_targets("") == dict(style=None, shape=None, colour=None)
    assert widgets.prompt_targets("a painting by van gogh")["style"] is None
    with pytest.raises(TypeError, match="prompt must be a string"):
        widgets.prompt_targets(3)


def test_default_prompts_cover_each_delta_and_untouched_concepts(ds):
    ps = widgets.default_prompts(ds, extra=2)
    assert len(ps) == 4
    assert "in striped style" in ps[0] and "in checkered style" in ps[1]
    assert not any("striped" in p or "checkered" in p for p in ps[2:])
    assert all(widgets.prompt_targets(p)["style"] in world.STYLES for p in ps)


# ------------------------------------------------------------------------------------------ rendering
def test_render_state_all_off_is_the_original_model(tiny, clf, ds):
    prompt = "a red circle in striped style"
    st = widgets.render_state(tiny, clf, ds, [0.0, 0.0], prompt, seed=3, n=2, steps=STEPS)
    ref = tiny.sample([prompt] * 2, seeds=[3, 4], steps=STEPS, guidance=widgets.WIDGET_GUIDANCE)
    assert torch.equal(st["images"], ref)
    assert st["leakage"] == dict(prompt=0.0, c0=0.0, off=dict(striped=0.0, checkered=0.0))
    assert set(st["acc"]) == {"style", "shape", "colour"} and all(0 <= a <= 1 for a in st["acc"].values())
    assert st["targets"]["style"] == "striped" and len(st["predicted"]["style"]) == 2
    assert st["seconds"] > 0 and st["scales"] == dict(striped=0.0, checkered=0.0)


def test_render_state_samples_theta_plus_sum_of_scaled_deltas(tiny, clf, ds):
    prompt = "a red circle in striped style"
    scales = [1.5, 0.0]
    st = widgets.render_state(tiny, clf, ds, scales, prompt, seed=0, n=2, steps=STEPS)
    ref = tiny.sample([prompt] * 2, seeds=[0, 1], steps=STEPS, weights=edited_weights(tiny, ds, scales))
    assert torch.equal(st["images"], ref)
    # the null-space property (A_j dW_i^T = 0): the switched-off concept and c0 are untouched
    assert st["leakage"]["off"].keys() == {"checkered"}
    assert st["leakage"]["off"]["checkered"] < 1e-5 and st["leakage"]["c0"] < 1e-5
    assert st["leakage"]["prompt"] > 100 * st["leakage"]["off"]["checkered"]


def test_switched_off_concept_renders_exactly_as_the_original(tiny, ds):
    # separability through the widget path: only d_striped on, a prompt of checkered that d_striped's null
    # space protects -> the original images to float precision
    prompt = world.concept_prompts("checkered", 4)[1]
    on = widgets.render_state(tiny, None, ds, [1.0, 0.0], prompt, seed=5, n=2, steps=STEPS)
    off = widgets.render_state(tiny, None, ds, [0.0, 0.0], prompt, seed=5, n=2, steps=STEPS)
    assert on["leakage"]["prompt"] < 1e-5
    assert (on["images"] - off["images"]).abs().max() < 1e-4
    assert on["acc"] == {} and on["predicted"] == {}  # no classifier -> no ACC


@pytest.mark.parametrize("kw, match", [
    (dict(scales=[1.0]), "2 deltas but 1 scales"),
    (dict(seed=-1), "seed must be a non-negative integer"),
    (dict(n=0), "n \\(images in the grid\\) must be a positive integer"),
    (dict(scales=[float("inf"), 0.0]), "finite"),
])
def test_render_state_bad_input(tiny, ds, kw, match):
    args = dict(scales=[1.0, 0.0], prompt="a red star", seed=0, n=2)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        widgets.render_state(tiny, None, ds, args["scales"], args["prompt"], args["seed"], args["n"], steps=STEPS)


def test_render_comparison_caches_the_original_and_measures_distance(tiny, clf, ds, no_lpips):
    cache = {}
    prompt = "a green star in striped style"
    same = widgets.render_comparison(tiny, clf, ds, [0.0, 0.0], prompt, 1, 2, STEPS, cache=cache)
    assert same["metric"] == "1-SSIM" and same["distance"] == pytest.approx(0.0, abs=1e-5)
    assert len(cache) == 1
    edited = widgets.render_comparison(tiny, clf, ds, [2.0, 1.0], prompt, 1, 2, STEPS, cache=cache)
    assert edited["original"] is same["original"] and len(cache) == 1  # not re-sampled
    assert edited["distance"] == pytest.approx(
        perceptual.one_minus_ssim(edited["original"]["images"], edited["edited"]["images"]))
    assert edited["distance"] > 0


# ------------------------------------------------------------------------------------------ display
def test_grid_image_and_png():
    imgs = torch.rand(4, 3, 32, 32)
    img = widgets.grid_image(imgs, ncols=2, upscale=4, gap=2)
    assert img.size == (2 * 128 + 2, 2 * 128 + 2)
    tile = torch.from_numpy(np.array(img)[:4, :4]).permute(2, 0, 1).float() / 255
    assert torch.allclose(tile, imgs[0, :, :1, :1].expand(3, 4, 4), atol=1 / 255)  # nearest upscaling
    png = widgets.png_bytes(img)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 200_000
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        widgets.grid_image(torch.rand(3, 32, 32))


def test_format_readout(tiny, clf, ds, no_lpips):
    comp = widgets.render_comparison(tiny, clf, ds, [1.0, 0.0], "a red circle in striped style", 0, 2, STEPS)
    text = widgets.format_readout(comp["edited"], comp)
    assert "theta + striped x1.00" in text and "checkered" in text
    assert "ACC: style 'striped'" in text and "leakage" in text and "1-SSIM" in text
    assert f"{STEPS} DDIM steps" in text
    off = widgets.render_state(tiny, None, ds, [0.0, 0.0], "", 0, 1, STEPS)
    assert "original model" in widgets.format_readout(off) and "ACC: -" in widgets.format_readout(off)


# ------------------------------------------------------------------------------------------ widget
def test_widget_wires_controls_to_the_functions(tiny, clf, ds, no_lpips):
    pytest.importorskip("ipywidgets")
    w = widgets.CombinationWidget(tiny, clf, ds, n=2, steps=STEPS)
    assert len(w.checks) == len(w.sliders) == 2 and w.prompt.value == widgets.default_prompts(ds)[0]
    comp = w.update()
    assert comp["edited"]["scales"] == dict(striped=1.0, checkered=1.0)
    assert w.grid.value[:4] == b"\x89PNG" and w.original_img.value[:4] == b"\x89PNG"
    assert "leakage" in w.readout.value
    w.checks[1].value = False  # the observer re-renders
    assert w.last["edited"]["scales"] == dict(striped=1.0, checkered=0.0)
    w.sliders[0].value = 0.5
    assert w.last["edited"]["scales"]["striped"] == 0.5
    w.prompt.value = "a blue square"
    assert w.last["edited"]["prompt"] == "a blue square" and len(w.cache) == 2
    w.n = 0  # a bad value reaching the callback is shown in the readout, not raised into the kernel log
    w.seed.value = 7
    assert "positive integer" in w.readout.value and w.last["edited"]["seed"] == 0


def test_widget_refuses_bad_setup(tiny, clf, ds):
    pytest.importorskip("ipywidgets")
    with pytest.raises(ValueError, match="at least one delta"):
        widgets.CombinationWidget(tiny, clf, [])
    with pytest.raises(ValueError, match="seed must be"):
        widgets.CombinationWidget(tiny, clf, ds, seed=-3)


def test_benchmark_refresh_reports_numbers_and_restores_the_control(tiny, clf, ds, no_lpips, capsys):
    pytest.importorskip("ipywidgets")
    w = widgets.CombinationWidget(tiny, clf, ds, n=2, steps=STEPS)
    out = widgets.benchmark_refresh(tiny, clf, ds, repeats=2, widget=w)
    assert len(out["seconds"]) == 2 and all(t > 0 for t in out["seconds"])
    assert out["median"] <= out["max"] and out["n"] == 2 and out["steps"] == STEPS
    assert w.checks[0].value is True and w.last["edited"]["scales"]["striped"] == 1.0  # left as found
    assert "widget refresh, 2 images x 2 DDIM steps" in capsys.readouterr().out
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        widgets.benchmark_refresh(tiny, clf, ds, repeats=0, widget=w)


def test_bench_widgets_runs_on_the_bundled_increments(capsys):
    pytest.importorskip("ipywidgets")
    from sepme_lib import bench

    out = bench.bench_widgets(repeats=1)
    assert len(out["seconds"]) == 1 and out["n"] == 4 and out["steps"] == widgets.WIDGET_STEPS
    assert "widget refresh, 4 images" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ readable, never stale
def test_unknown_words_get_no_silent_blank(tiny):
    # a known shape with an unknown style word: no style target (it used to be scored against "blank")
    assert widgets.prompt_targets("a red star in wavy style")["style"] is None
    assert widgets.prompt_targets("a pink star", model=tiny) == dict(style=None, shape="star", colour=None)
    assert widgets.prompt_targets("a red star", model=tiny)["style"] == "blank"
    assert widgets.unknown_words("a pink star", tiny) == ["pink"]


def test_warning_and_readout_name_unknown_words(tiny, clf, ds):
    st = widgets.render_state(tiny, clf, ds, [1.0, 0.0], "a pink star", seed=0, n=1, steps=STEPS)
    assert st["unknown"] == ["pink"] and "style" not in st["acc"] and st["acc"]["shape"] >= 0
    warn = widgets.warning_text(st)
    assert "'pink'" in warn and "no ACC for style" in warn
    assert "WARNING: unknown word(s) 'pink'" in widgets.format_readout(st)
    known = widgets.render_state(tiny, clf, ds, [1.0, 0.0], "a red star", seed=0, n=1, steps=STEPS)
    assert widgets.warning_text(known) == "" and "WARNING" not in widgets.format_readout(known)


def test_images_are_at_least_min_tile_pixels():
    assert widgets.tile_scale(32) == 4 and widgets.tile_scale(128) == 1 and widgets.tile_scale(512) == 0.5
    small = widgets.grid_image(torch.rand(4, 3, 32, 32), ncols=2)
    assert small.size == (2 * 128 + 2, 2 * 128 + 2)
    big = widgets.grid_image(torch.rand(2, 3, 512, 512), ncols=2)
    assert big.size == (2 * 256 + 2, 256)


def _all_children(w):
    out = [w]
    for c in getattr(w, "children", ()):
        out += _all_children(c)
    return out


def test_widget_shows_before_and_after_by_default_with_wide_sliders(tiny, clf, ds):
    ipw = pytest.importorskip("ipywidgets")
    w = widgets.CombinationWidget(tiny, clf, ds, n=2, steps=STEPS)
    parts = _all_children(w.ui)
    assert not any(isinstance(p, ipw.Accordion) for p in parts)  # nothing collapsed
    assert w.original_img in parts and w.edited_img in parts
    total = int(widgets.SLIDER_WIDTH.rstrip("px"))
    desc = int(w.sliders[0].style.description_width.rstrip("px"))
    assert total - desc - 70 >= 300  # the track (70 px: the readout) is at least 300 px wide
    w.update()
    for img in (w.original_img, w.edited_img):
        assert Image.open(io.BytesIO(img.value)).size[0] >= 2 * 64


def test_readout_is_never_stale(tiny, clf, ds, monkeypatch):
    pytest.importorskip("ipywidgets")
    w = widgets.CombinationWidget(tiny, clf, ds, n=2, steps=STEPS)
    w.update()
    assert "ACC" in w.readout.value
    seen = {}
    real = widgets.render_comparison

    def spy(*a, **k):  # what the widget shows while it renders
        seen["readout"], seen["caption"] = w.readout.value, w.edited_caption.value
        return real(*a, **k)

    monkeypatch.setattr(widgets, "render_comparison", spy)
    w.sliders[0].value = 0.5
    assert "rendering" in seen["readout"] and "ACC" not in seen["readout"] and "rendering" in seen["caption"]
    assert "ACC" in w.readout.value and "rendering" not in w.edited_caption.value

    def broken(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(widgets, "render_comparison", broken)
    w.sliders[0].value = 0.7
    assert "out of memory" in w.readout.value and "ACC" not in w.readout.value and "leakage" not in w.readout.value
    assert "not updated" in w.edited_caption.value
    monkeypatch.setattr(widgets, "render_comparison", real)
    w.sliders[0].value = 0.8
    assert "ACC" in w.readout.value and "not updated" not in w.edited_caption.value


def test_widget_warns_about_unknown_words(tiny, clf, ds):
    pytest.importorskip("ipywidgets")
    w = widgets.CombinationWidget(tiny, clf, ds, n=1, steps=STEPS)
    w.prompt.value = "a pink star"
    assert "pink" in w.warning.value and "WARNING" in w.readout.value
    w.prompt.value = "a red star"
    assert w.warning.value == ""


@pytest.fixture(scope="session")
def sd_setup(tiny_sd, tmp_path_factory):
    from sepme_lib import random_sd
    from sepme_lib.classifier import load_classifier

    folders = random_sd.build_folder(tmp_path_factory.mktemp("rsd"))
    judge = load_classifier(model=tiny_sd, path=folders["clip"])
    ds = erase(tiny_sd, ["Van Gogh", "Cezanne"], method="sepme", n_ref=2, cap=2, batch=1)
    return judge, ds


def test_widget_on_stable_diffusion(tiny_sd, sd_setup):
    """The same widget on the SD family: the artists' prompts, the CLIP judge's style head, the SD concept set."""
    pytest.importorskip("ipywidgets")
    judge, ds = sd_setup
    ps = widgets.default_prompts(ds, model=tiny_sd)
    assert ps[:2] == ["a painting in the style of Van Gogh", "a painting in the style of Cezanne"] and len(ps) == 4
    assert widgets.prompt_targets(ps[0], judge, tiny_sd) == {"style": "Van Gogh"}
    assert widgets.prompt_targets("a photo of a cat", judge, tiny_sd) == {"style": "blank"}
    w = widgets.CombinationWidget(tiny_sd, judge, ds, n=1, steps=1)
    comp = w.update()
    assert set(comp["edited"]["acc"]) == {"style"} and comp["edited"]["unknown"] == []
    w.checks[1].value = False
    assert set(w.last["edited"]["leakage"]["off"]) == {"Cezanne"} and w.last["edited"]["leakage"]["off"]["Cezanne"] < 1e-4


def test_snapshot_shows_the_widget_to_viewers_without_widgets(tiny, clf, ds):
    """The widget's output carries, beside the live view, a drawn PNG of the same state (GitHub, untrusted notebooks)."""
    pytest.importorskip("ipywidgets")
    w = widgets.CombinationWidget(tiny, clf, ds, n=2, steps=STEPS)
    assert "image/png" not in w._repr_mimebundle_()  # nothing rendered yet: no picture of old numbers
    with pytest.raises(ValueError, match="update"):
        widgets.snapshot_image(w)
    w.update()
    w.checks[1].value = False
    bundle = w._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == w.ui.model_id
    assert bundle["image/png"][:8] == b"\x89PNG\r\n\x1a\n" and len(bundle["image/png"]) < 150_000
    assert "static snapshot" in bundle["text/plain"] and "theta + striped x1.00" in bundle["text/plain"]
    img = w.snapshot_image().convert("RGB")
    assert img.width >= 2 * 2 * widgets.MIN_TILE and img.height >= 2 * widgets.MIN_TILE
    # the drawn checkboxes follow the controls: the first ticked (filled), the second not (white inside)
    assert img.getpixel((10, 34 + 4)) != (255, 255, 255) and img.getpixel((10, 34 + 24 + 4)) == (255, 255, 255)
