"""Stable Diffusion XL as a model family, on a random-weight SDXL folder (``random_sd.build_folder(kind="sdxl")``):
the adapter reads and samples as ``StableDiffusionXLPipeline`` does (two text encoders, pooled embeddings, time ids,
zeros for the empty prompt), the methods edit its 2048-wide (here 256-wide) cross-attention with SepME's certificate
intact, and the command line and the widget take the folder. The LoRA export is checked in ``tests/test_lora.py``."""
import json

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline

import sepme_lib as sm
from sepme_lib import cli, families, nullspace, widgets
from sepme_lib.classifier import load_classifier
from sepme_lib.config import BadValue

PROMPT = "a painting in the style of Van Gogh"


@pytest.fixture(scope="module")
def pipe(random_sdxl_folder):
    return StableDiffusionXLPipeline.from_pretrained(random_sdxl_folder["pipeline"])


def test_the_folder_loads_as_the_sdxl_family(sdxl, random_sdxl_folder):
    assert sdxl.family == "sdxl" and families.model_family(str(random_sdxl_folder["pipeline"])).name == "sdxl"
    assert families.family_of(sdxl).settings_key == "sd"  # SD 1.x's concept set and settings
    assert sm.concept_set(sdxl).erase == ("Van Gogh", "Cezanne", "Picasso")
    assert sdxl.text_encoder_2 is not None and sdxl.zero_empty and sdxl.time_ids.tolist() == [[32, 32, 0, 0, 32, 32]]
    assert sm.methods.settings("uce", sdxl) == sm.methods.settings("uce", "sd")


def test_embed_is_the_pipelines_encode_prompt(sdxl, pipe):
    c = sdxl.embed([PROMPT])
    ctx, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                                      do_classifier_free_guidance=True)
    assert c.shape == (1, sdxl.max_length, sdxl.context_dim + pooled.shape[-1])
    assert torch.equal(sdxl.context(c), ctx) and sdxl.context_dim == ctx.shape[-1] == 256
    assert all(torch.equal(c[0, i, sdxl.context_dim:], pooled[0]) for i in range(c.shape[1]))  # on every row
    assert neg.abs().max() == 0 and neg_pooled.abs().max() == 0 and sdxl.empty().abs().max() == 0  # forced zeros
    assert torch.equal(sdxl.embed_context([PROMPT]), ctx)


def test_predict_passes_the_pooled_embedding_and_time_ids(sdxl):
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, *sdxl.latent_shape, generator=g), torch.tensor([10, 700])
    c = sdxl.embed([PROMPT, "a photo of a cat"])
    ref = sdxl.unet(x, t, encoder_hidden_states=sdxl.context(c), added_cond_kwargs=dict(
        text_embeds=c[:, 0, sdxl.context_dim:], time_ids=sdxl.time_ids.expand(2, -1))).sample
    assert torch.equal(sdxl.predict(x, t, c), ref)
    other = sdxl.with_context(c, sdxl.context(c).flip(0))  # the contexts swapped, the pooled parts kept
    assert not torch.allclose(sdxl.predict(x, t, other), ref)
    with pytest.raises(BadValue, match="pooled embedding"):
        sdxl.predict(x, t, sdxl.context(c))


def test_sample_is_the_pipelines_image(sdxl, pipe):
    """``T2IModel.sample`` (DDIM, classifier-free guidance) gives the pipeline's image for the same start noise."""
    pipe.scheduler = DDIMScheduler.from_config(sdxl.scheduler.config)
    ours = sdxl.sample([PROMPT], seeds=[3], steps=4, guidance=5.0)
    z = torch.randn(sdxl.latent_shape, generator=torch.Generator().manual_seed(3))[None]
    theirs = pipe(PROMPT, num_inference_steps=4, guidance_scale=5.0, latents=z, output_type="pt").images
    assert ours.shape == theirs.shape and (ours - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("method", ["sepme", "gcirs", "esd", "uce", "rece", "mace", "speed"])
def test_every_method_runs_on_sdxl_cross_attention(sdxl, method):
    quick = dict(sepme=dict(cap=2, batch=1, n_ref=2), gcirs=dict(cap=2, batch=1, n_ref=2),
                 esd=dict(steps=2), uce={}, rece={}, mace={}, speed={})[method]
    n_ref = quick.pop("n_ref", 2)
    cs = sm.make_concepts(sdxl, ["Van Gogh", "Cezanne"], n_ref=n_ref)
    ds = sm.erase(sdxl, cs, method=method, progress=False, **quick)
    names = set(sdxl.kv_weight_names())
    for d in ds:
        assert d.tensors and all(torch.isfinite(v).all() for v in d.tensors.values())
        kv = {k: v for k, v in d.tensors.items() if k in names}
        assert kv and all(v.shape[1] == sdxl.context_dim for k, v in kv.items() if k.endswith("weight"))
    if method == "sepme":  # the certificate on SDXL's context rows: c_0, the other concept's prompts
        for d in ds:
            assert max(nullspace.leakage(sdxl, d, d.info["protected"]).values()) < 1e-5


def test_cli_and_widget_take_an_sdxl_folder(sdxl, random_sdxl_folder, tmp_path, capsys):
    folder, judge = random_sdxl_folder["pipeline"], random_sdxl_folder["clip"]
    code = cli.main([str(a) for a in ["erase", "--model", folder, "--concepts", "Van Gogh", "Cezanne", "--out",
                                      tmp_path / "e", "--set", "cap=2", "--n-ref", "2", "--eval-images", "0",
                                      "--quiet"]])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "(sdxl)" in out.out and (tmp_path / "e" / "Van_Gogh" / sm.lora.WEIGHTS).exists()
    code = cli.main([str(a) for a in ["evaluate", "--model", folder, "--judge", judge, "--lora", tmp_path / "e" /
                                      "Van_Gogh", "--images", "1", "--steps", "2", "--out", tmp_path / "v", "--quiet"]])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "v" / "table.json").read_text())["family"] == "sdxl"
    pytest.importorskip("ipywidgets")
    clip = load_classifier(model=sdxl, path=judge)
    ds = [sm.Delta.from_lora(tmp_path / "e" / n) for n in ("Van_Gogh", "Cezanne")]
    w = widgets.CombinationWidget(sdxl, clip, ds, n=1, steps=1)
    assert set(w.update()["edited"]["acc"]) == {"style"}
    w.checks[1].value = False
    assert w.last["edited"]["leakage"]["off"]["Cezanne"] < 1e-4
