import json
import time

import pytest
import torch

from sepme_lib import erase, nullspace, world
from sepme_lib.concepts import Concept
from sepme_lib.loading import load_model, load_tiny


def test_tiny_adapter_shapes(tiny):
    emb = tiny.embed(["a red star in striped style", ""])
    assert emb.shape == (2, 16, 256)
    assert torch.equal(tiny.empty()[0], emb[1])
    imgs = torch.from_numpy(world.reference_images("star", 3))
    z = tiny.to_latent(imgs)
    assert z.shape == (3, 48, 8, 8) == (3, *tiny.latent_shape)
    assert torch.allclose(tiny.from_latent(z), imgs)  # patchify is lossless
    t = torch.tensor([10, 500, 990])
    eps = tiny.eps(tiny.add_noise(z, torch.randn_like(z), t), t, emb[:1].expand(3, -1, -1))
    assert eps.shape == z.shape and torch.isfinite(eps).all()
    layers = tiny.cross_attention_layers()
    assert len(layers) > 0 and all(n.endswith("attn2") for n in layers)
    assert len(tiny.kv_weight_names()) == 2 * len(layers)


def test_v_prediction_is_converted_to_eps(tiny):
    assert tiny.prediction_type == "v_prediction"
    z0, noise = torch.randn(4, 48, 8, 8), torch.randn(4, 48, 8, 8)
    t = torch.tensor([0, 250, 600, 999])
    a = tiny.alphas_cumprod[t].view(-1, 1, 1, 1)
    xt = tiny.add_noise(z0, noise, t)
    v = a.sqrt() * noise - (1 - a).sqrt() * z0  # the exact v target
    assert torch.allclose(tiny.to_eps(v, xt, t), noise, atol=1e-4)


def test_sd_adapter_shapes(tiny_sd):
    emb = tiny_sd.embed(["a photo of a cat"])
    assert emb.shape == (1, 16, 256)
    imgs = torch.rand(2, 3, 32, 32) * 2 - 1
    z = tiny_sd.to_latent(imgs)
    assert z.shape == (2, 4, 8, 8)  # VAE downsamples by 4 here, latents times the scaling factor
    assert tiny_sd.from_latent(z).shape == (2, 3, 32, 32)
    t = torch.tensor([3, 700])
    assert tiny_sd.eps(z, t, emb.expand(2, -1, -1)).shape == z.shape
    out = tiny_sd.sample(["a photo of a cat", "a dog"], seeds=[0, 1], steps=2)
    assert out.shape == (2, 3, 32, 32) and out.min() >= 0 and out.max() <= 1


def test_sampling_is_deterministic_per_seed(tiny):
    p = ["a red star in striped style", "a blue circle"]
    a = tiny.sample(p, seeds=[5, 6], steps=3)
    b = tiny.sample(p, seeds=[5, 6], steps=3)
    assert torch.equal(a, b)
    # the same seed gives the same image whatever else is in the batch
    c = tiny.sample(p[1:], seeds=[6], steps=3)
    assert torch.allclose(a[1], c[0], atol=1e-5)
    d = tiny.sample(p, seeds=[7, 6], steps=3)
    assert not torch.allclose(a[0], d[0])


def test_sample_rejects_mismatched_seeds(tiny):
    with pytest.raises(ValueError, match="one seed per prompt"):
        tiny.sample(["a star", "a circle"], seeds=[1])


def test_missing_data_file_names_file_and_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m sepme_lib.train_tiny"):
        load_tiny(tmp_path)


def test_load_model_fails_fast_without_weights():
    t0 = time.time()
    with pytest.raises(RuntimeError, match="local folder"):
        load_model("CompVis/definitely-not-cached-sd")
    assert time.time() - t0 < 30


def test_null_space_capacity_for_six_concepts(tiny):
    prompts = [""] + [world.concept_prompt(c) for c in ("striped", "checkered", "dotted", "outline", "gradient", "star")]
    ns = nullspace.null_space(nullspace.stack_rows(tiny, prompts))
    assert ns.dim >= 32, (ns.dim, ns.rank)


def test_training_smoke_and_checkpoint_roundtrip(tmp_path):
    from sepme_lib import train_tiny

    out, state = tmp_path / "m", tmp_path / "state.pt"
    train_tiny.main(["--out", str(out), "--state", str(state), "--max-steps", "3", "--batch", "4", "--seed", "1"])
    m = load_tiny(out, device=torch.device("cpu"))
    st = torch.load(state, weights_only=False)
    assert st["step"] == 3
    # the exported model is the EMA copy stored in the state
    w = dict(m.unet.named_parameters())["conv_in.weight"]
    assert torch.equal(w, st["ema_unet"]["conv_in.weight"])
    # resuming continues from step 3
    train_tiny.main(["--out", str(out), "--state", str(state), "--max-steps", "5", "--batch", "4", "--seed", "1"])
    assert torch.load(state, weights_only=False)["step"] == 5
    # a new machine has only the committed export: continue from it with a fresh optimizer
    state.unlink()
    train_tiny.main(["--out", str(out), "--state", str(state), "--max-steps", "6", "--batch", "4", "--from-export"])
    assert json.loads((out / "training.json").read_text())["step"] == 6


def test_dtype_is_for_sd_on_a_gpu():
    with pytest.raises(ValueError, match="float32"):
        load_model("tiny", dtype=torch.float16)
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        load_model("tiny", dtype="fp8")


def test_fp16_frozen_sd_trains_fp32_increments(tmp_path):
    """The GPU path of notebook 04 (frozen SD weights in fp16, increments in fp32), on the CPU."""
    from conftest import build_tiny_sd

    from sepme_lib import deltas

    m = build_tiny_sd(tmp_path)
    m.unet.half()
    c = Concept("dog", ["a photo of a dog"], torch.randn(4, *m.latent_shape, generator=torch.Generator().manual_seed(0)))
    d = erase(m, [c], method="sepme", cap=3, batch=2, warmup=1, lr=2e-2, beta=5e-2)[0]
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in d.tensors.values())
    assert d.l1_norm() > 0
    w = deltas.edited_weights(m, [d])
    assert all(v.dtype == torch.float16 for v in w.values())
    z, t, e = torch.randn(1, *m.latent_shape), torch.tensor([500]), m.embed(["a photo of a dog"])
    assert not torch.equal(m.eps(z, t, e), m.eps(z, t, e, w))


def test_sample_cache_returns_the_same_images_and_keys_every_input(tiny, tmp_path, monkeypatch):
    """``$SEPME_SAMPLE_CACHE`` (set by ``make test`` for nbval): an identical call is served from the folder with the
    very tensor it computed; another seed, step count or edited weight is another entry; unset, nothing is written."""
    prompts = ["a red circle in striped style", "a blue square"]
    monkeypatch.delenv("SEPME_SAMPLE_CACHE", raising=False)
    plain = tiny.sample(prompts, seeds=[0, 1], steps=3)
    assert tiny._sample_key(prompts, [0, 1], 3, 2.0, 64, None, None) is None
    monkeypatch.setenv("SEPME_SAMPLE_CACHE", str(tmp_path / "c"))
    first = tiny.sample(prompts, seeds=[0, 1], steps=3)
    assert torch.equal(first, plain) and len(list((tmp_path / "c").glob("*.pt"))) == 1
    again = tiny.sample(prompts, seeds=[0, 1], steps=3)
    assert torch.equal(again, plain)
    assert len(list((tmp_path / "c").glob("*.pt"))) == 1  # served from the folder
    tiny.sample(prompts, seeds=[0, 2], steps=3)
    tiny.sample(prompts, seeds=[0, 1], steps=4)
    name = tiny.kv_weight_names()[0]
    w = dict(tiny.unet.named_parameters())[name].detach() * 1.5
    edited = tiny.sample(prompts, seeds=[0, 1], steps=3, weights={name: w})
    assert len(list((tmp_path / "c").glob("*.pt"))) == 4 and not torch.equal(edited, plain)
    with tiny.edited({name: w}):  # weights written into the UNet in place are part of the key as well
        assert torch.equal(tiny.sample(prompts, seeds=[0, 1], steps=3), edited)
    assert len(list((tmp_path / "c").glob("*.pt"))) == 5
