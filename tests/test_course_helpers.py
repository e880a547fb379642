"""Helpers the notebooks 00-04 use: readable image grids, the leakage heat map and table, the Tables 3-5 layout."""
import matplotlib

matplotlib.use("Agg")

import pytest
import torch

from sepme_lib import evaluate, plots, report


def test_grid_images_are_at_least_min_px_and_titles_wrap():
    imgs = torch.rand(6, 3, 32, 32)
    titles = ["a very long prompt about a red triangle in checkered style"] * 6
    fig = plots.show_grid(imgs, titles, ncols=3)
    fig.canvas.draw()  # images keep their aspect: positions are final after a draw
    ax = fig.axes[0]
    w_px = ax.get_window_extent().width
    assert w_px >= plots.MIN_PX - 1, f"image drawn {w_px:.0f} px wide"
    assert "\n" in ax.get_title(), "long titles are wrapped to the image width"
    # titles of neighbouring rows do not overlap the images above them
    top = fig.axes[3]
    title_box = top.title.get_window_extent(fig.canvas.get_renderer())
    above = fig.axes[0].get_window_extent()
    assert title_box.y1 <= above.y0 + 1


def test_grid_column_titles_and_row_labels():
    imgs = torch.rand(6, 3, 32, 32)
    fig = plots.show_grid(imgs, ncols=3, col_titles=["a", "b", "c"], row_labels=["theta", "theta + d1"])
    assert [ax.get_title() for ax in fig.axes[:3]] == ["a", "b", "c"]
    assert all(ax.get_title() == "" for ax in fig.axes[3:])
    with pytest.raises(ValueError, match="column titles"):
        plots.show_grid(imgs, ncols=3, col_titles=["a"])
    with pytest.raises(ValueError, match="one title per image"):
        plots.show_grid(imgs, ["x"])
    with pytest.raises(ValueError, match="row labels"):
        plots.show_grid(imgs, ncols=3, row_labels=["only one"])


def test_wrap_title_and_layout():
    assert plots.wrap_title("short", 80) == "short"
    assert plots.wrap_title("x" * 100, 80).count("\n") >= 2
    nrows, ncols, cell = plots.grid_layout(10, 4, scale=0.5)
    assert (nrows, ncols) == (3, 4) and cell * plots.DPI >= plots.MIN_PX
    with pytest.raises(ValueError):
        plots.grid_layout(0, 4)


def test_heatmap_writes_every_value():
    fig = plots.heatmap({"d1": {"c": 1e-7, "x": 0.3}, "d2": {"c": 2e-8, "x": 1e-7}})
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert {"1.0e-07", "3.0e-01", "2.0e-08"} <= texts
    with pytest.raises(ValueError):
        plots.heatmap({})


def test_combination_markdown_layout():
    tab = dict(original={"blank": 1.0, "a": 1.0, "b": 0.5},
               rows=[dict(subset=["a"], acc={"blank": 1.0, "a": 0.0, "b": 0.5}),
                     dict(subset=["b"], acc={"blank": 0.9, "a": 1.0, "b": 0.0}),
                     dict(subset=["a", "b"], acc={"blank": 0.9, "a": 0.0, "b": 0.0})])
    md = report.combination_markdown(tab)
    lines = md.splitlines()
    assert "Δθ1 = a, Δθ2 = b" in lines[0]
    assert lines[2] == "| concept | θ | θ + Δθ1 | θ + Δθ2 | θ + Δθ1 + Δθ2 |"
    assert lines[5] == "| a | 1.00 | **0.00** | 1.00 | **0.00** |"
    with pytest.raises(ValueError, match="not in names"):
        report.combination_markdown(tab, names=["a"])


def test_leakage_table_of_bundled_increments(tiny):
    from sepme_lib import sepme

    ds = sepme.bundled_deltas(tiny)
    from sepme_lib.concepts import Concept

    prompts = {d.name: [p for p in ds[(k + 1) % 3].info["protected"] if d.name in p] for k, d in enumerate(ds)}
    cs = [Concept(d.name, prompts[d.name], torch.zeros(1, 48, 8, 8)) for d in ds]
    tab = evaluate.leakage_table(tiny, ds, cs)
    assert list(tab) == [d.name for d in ds]
    for d in ds:
        row = tab[d.name]
        assert row[evaluate.EMPTY_LABEL] < 1e-5
        assert all(row[o.name] < 1e-5 for o in cs if o.name != d.name), row
        assert row[d.name] > 1e-3, "an increment changes its own concept's keys/values"
    with pytest.raises(ValueError):
        evaluate.leakage_table(tiny, [], cs)


def test_diffusion_loss_with_replaced_weights(tiny):
    from sepme_lib import train_tiny

    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, *tiny.latent_shape, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([100, 700])
    emb = tiny.embed(["a red star", ""])
    args = (tiny.unet, tiny.alphas_cumprod, x0, emb, t, noise, tiny.prediction_type)
    plain = train_tiny.diffusion_loss(*args)
    names = tiny.cross_attention_param_names()
    same = {k: p.detach().clone().requires_grad_(True) for k, p in tiny.params(names).items()}
    replaced = train_tiny.diffusion_loss(*args, weights=same)
    assert torch.allclose(plain, replaced, rtol=1e-6, atol=0), "the UNet's own weights give the same loss"
    replaced.backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in same.values())
    assert all(not p.requires_grad for p in tiny.unet.parameters()), "the frozen UNet stays frozen"


def test_make_concepts_passes_sampling_steps(tiny_sd):
    from sepme_lib import concepts

    calls = []
    sample = tiny_sd.sample

    def spy(*a, **k):
        calls.append(k.get("steps"))
        return sample(*a, **k)

    tiny_sd.sample = spy
    try:
        cs = concepts.concept_set(tiny_sd)
        made = concepts.make_concepts(tiny_sd, cs.erase[:1], n_ref=2, steps=2)
    finally:
        del tiny_sd.sample
    assert calls == [2] and made[0].latents.shape[0] == 2


def test_lines_draws_each_curve_on_its_own_x_with_the_legend_outside():
    fig = plots.lines({"a": ([0, 1, 2], [0.5, 0.4, 0.3]), "b": ([0, 1], [0.2, 0.2])}, "rounds", "ACC", hline=0.2,
                      hline_label="goal")
    ax = fig.axes[0]
    assert [list(ln.get_xdata()) for ln in ax.lines[:2]] == [[0, 1, 2], [0, 1]]
    assert list(ax.get_xticks()) == [0, 1, 2] and ax.lines[2].get_ydata()[0] == 0.2
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["a", "b", "goal"]
    fig.canvas.draw()
    assert legend.get_window_extent().x0 > ax.get_window_extent().x1  # right of the axes, covering no point


def test_cell_seconds_reads_the_kernels_timing_slowest_first():
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("a"), nbformat.v4.new_markdown_cell("m"),
                                         nbformat.v4.new_code_cell("b"), nbformat.v4.new_code_cell("c")])
    nb.cells[0].metadata["execution"] = {"iopub.execute_input": "2026-12-07T10:00:00.000Z",
                                         "shell.execute_reply": "2026-12-07T10:00:01.500Z"}
    nb.cells[2].metadata["execution"] = {"iopub.execute_input": "2026-12-07T10:00:02.000Z",
                                         "shell.execute_reply": "2026-12-07T10:00:12.250Z"}
    assert report.cell_seconds(nb) == [(2, 10.25), (0, 1.5)]  # the cell without timing is left out
