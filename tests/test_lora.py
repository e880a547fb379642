"""Deltas as diffusers LoRA adapters: the factorisation, the folder format and card, agreement of diffusers'
``set_adapters`` with the library's combination (bundled model and a random SD architecture; a script that imports
only torch and diffusers), the widget's diffusers backend, and one test per diffusers pitfall we handle."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sepme_lib as sm
from sepme_lib import config, lora, nullspace, sepme
from sepme_lib.adapters import AdapterUNet, load_adapter, lora_layers, make_backend
from sepme_lib.deltas import Delta, edited_weights
from sepme_lib.widgets import CombinationWidget, render_state

COMBOS = [[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [-0.5, 2.0, 1.3], [0.0, 0.0, 0.0], [2.5, -1.0, 0.0]]
ROOT = Path(__file__).resolve().parent.parent


def rel(a, b):
    return float((a - b).norm() / b.norm())


def inputs(model, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *model.latent_shape, generator=g)
    t = torch.randint(0, model.num_train_timesteps, (n,), generator=g)
    cs = sm.concept_set(model)
    emb = model.embed([cs.prompts(c)[0] for c in cs.erase][:n - 1] + [""])
    return x, t, emb


def library_outputs(model, deltas, x, t, emb):
    return [model.predict(x, t, emb, edited_weights(model, deltas, s) if any(s) else None) for s in COMBOS]


@pytest.fixture(scope="module")
def bundled(tiny):
    return sepme.bundled_deltas(tiny)


@pytest.fixture(scope="module")
def sd_model(random_sd_folder):
    return sm.load_model(str(random_sd_folder["pipeline"]), device="cpu")


@pytest.fixture(scope="module")
def sdxl_deltas(sdxl):
    """Three SDXL increments made by the library: SepME's two (to_k/to_v) and UCE's (to_k/to_v, closed form)."""
    cs = sm.make_concepts(sdxl, ["Van Gogh", "Cezanne", "Picasso"], n_ref=2)
    return sm.erase(sdxl, cs[:2], method="sepme", cap=2, batch=1, progress=False) + \
        sm.erase(sdxl, cs[2:], method="uce", progress=False)


def saved_inputs(model, x, t, emb) -> dict:
    """The UNet's inputs as a diffusers-only script passes them (SDXL: context, pooled embedding, time ids)."""
    out = {"x": x, "t": t, "emb": model.context(emb).contiguous()}
    if model.time_ids is not None:
        out.update(text_embeds=emb[:, 0, model.context_dim:].contiguous(),
                   time_ids=model.time_ids.expand(len(emb), -1).contiguous())
    return out


@pytest.fixture(scope="module")
def sd_deltas(sd_model):
    """Three increments of real size on the random SD model: to_k/to_v only, every attn2 parameter (to_q, to_out and
    its bias too: the lora_bias path), and to_v only."""
    g = torch.Generator().manual_seed(1)
    params = dict(sd_model.unet.named_parameters())
    kv, ca = sd_model.kv_weight_names(), sd_model.cross_attention_param_names()
    sets = [("Van Gogh", kv), ("Cezanne", ca), ("Picasso", [k for k in kv if "to_v" in k])]
    return [Delta(name, "test", {k: 0.05 * params[k].detach().norm() / params[k].numel() ** 0.5
                                 * torch.randn(params[k].shape, generator=g) for k in keys}, sd_model.fingerprint())
            for name, keys in sets]


def test_factorize_exact_and_truncated():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 24, generator=g) @ torch.diag(torch.logspace(0, -3, 24)) @ torch.randn(24, 24, generator=g)
    B, A, st = lora.factorize(W)
    assert B.shape == (40, 24) and A.shape == (24, 24) and st["rank"] == st["full_rank"] == 24
    assert st["error"] < 1e-6 and rel(B @ A, W) < 1e-6
    s = torch.linalg.svdvals(W.double())
    B, A, st = lora.factorize(W, rank=5)
    assert A.shape == (5, 24) and st["error"] == pytest.approx(float(s[5:].norm() / s.norm()), rel=1e-4)
    _, A, st = lora.factorize(W, rtol=1e-2)
    assert st["rank"] == int((s > 1e-2 * s[0]).sum())
    with pytest.raises(lora.LoraError, match="rank must be"):
        Delta("x", "m", {"a.weight": W}, "b").to_lora(rank=0)
    with pytest.raises(lora.LoraError, match="only matrices"):
        lora.factorize(torch.zeros(3))


def test_export_round_trip_metadata_and_card(tiny, bundled, tmp_path):
    d = bundled[0]
    folder = d.save_lora(tmp_path / "striped", model=tiny)
    assert (folder / lora.WEIGHTS).exists() and (folder / "README.md").exists()
    with safe_open(str(folder / lora.WEIGHTS), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert all(k.startswith("unet.") and ".lora_" in k for k in keys)
    cfg = json.loads(meta["lora_adapter_metadata"])
    assert cfg["unet.alpha_pattern"] == cfg["unet.rank_pattern"] and cfg["unet.r"] == cfg["unet.lora_alpha"]
    info = json.loads(meta["sepme_lora"])
    assert info["name"] == "striped" and info["method"] == "sepme1" and info["exact"] is True
    assert set(info["ranks"].values()) == {64, 128} and info["recon_error"] < 1e-6
    assert info["protected"] == d.info["protected"] and info["leakage"] < 1e-5
    back = Delta.from_lora(folder)
    assert back.name == d.name and back.base == d.base and back.info["lora"]["exact"]
    assert max(rel(back.tensors[k], v) for k, v in d.tensors.items()) < 1e-6
    card = (folder / "README.md").read_text()
    for part in ("library_name: diffusers", "## What was erased", "## What is protected", "## Leakage certificate",
                 'prefix="unet"', "set_adapters", "a red circle in checkered style"):
        assert part in card, part
    # the certificate equals nullspace.leakage's
    assert lora.kv_leakage(tiny, d.tensors, d.info["protected"]) == pytest.approx(
        max(nullspace.leakage(tiny, d, d.info["protected"]).values()), rel=1e-6)


def test_truncated_export_keeps_the_certificate_and_prints_its_cost(tiny, bundled, tmp_path, capsys):
    d = bundled[2]
    exp = d.to_lora(rank=4, model=tiny)
    assert not exp.exact and set(exp.ranks.values()) == {4} and exp.recon_error > 0.01
    assert exp.leakage < 1e-5  # the kept right singular vectors stay in the null space
    assert 1e-4 < exp.output_change < 0.5  # what truncation costs: part of the erasure
    d.save_lora(tmp_path / "r4", rank=4, model=tiny)
    out = capsys.readouterr().out
    assert "truncated" in out and "output change" in out and "leakage" in out
    assert json.loads(safe_open(str(tmp_path / "r4" / lora.WEIGHTS), "pt").metadata()["sepme_lora"])["rank"] == 4


@pytest.mark.parametrize("which", ["tiny", "sd", "sdxl"])
def test_set_adapters_equals_the_library_combination(which, tiny, bundled, sd_model, sd_deltas, sdxl, sdxl_deltas):
    model, deltas = dict(tiny=(tiny, bundled), sd=(sd_model, sd_deltas), sdxl=(sdxl, sdxl_deltas))[which]
    x, t, emb = inputs(model)
    a = AdapterUNet(model.unet, deltas)
    assert a.names == [lora.adapter_name(d.name) for d in deltas]
    for scales, ref in zip(COMBOS, library_outputs(model, deltas, x, t, emb)):
        with torch.no_grad(), a.active(model, scales):
            out = model.predict(x, t, emb)
        assert rel(out, ref) <= 1e-5, (scales, rel(out, ref))
    assert "to_k.weight" in "".join(n for n, _ in model.unet.named_parameters())  # the model's own UNet untouched


def test_a_script_with_only_torch_and_diffusers_reproduces_the_library(tiny, bundled, sd_model, sd_deltas,
                                                                      random_sd_folder, sdxl, sdxl_deltas,
                                                                      random_sdxl_folder, tmp_path):
    """The exported folders load with nothing from sepme_lib (bundled UNet: load_lora_adapter; SD and SDXL folders:
    pipe.load_lora_weights) and set_adapters gives the library's outputs to <= 1e-5 relative."""
    specs, refs = [], []
    for kind, model, deltas, path in (("unet", tiny, bundled, config.TINY_DIR / "unet"),
                                      ("pipeline", sd_model, sd_deltas, random_sd_folder["pipeline"]),
                                      ("sdxl", sdxl, sdxl_deltas, random_sdxl_folder["pipeline"])):
        x, t, emb = inputs(model)
        folders = {lora.adapter_name(d.name): str(d.save_lora(tmp_path / kind / d.name, verbose=False)) for d in deltas}
        save_file(saved_inputs(model, x, t, emb), tmp_path / f"{kind}_in.safetensors")
        specs.append(dict(kind=kind, model=str(path), loras=folders, inputs=str(tmp_path / f"{kind}_in.safetensors"),
                          combos=COMBOS, out=str(tmp_path / f"{kind}_out.safetensors")))
        refs.append(library_outputs(model, deltas, x, t, emb))
    (tmp_path / "specs.json").write_text(json.dumps(specs))
    script = ROOT / "tests" / "diffusers_only_lora_check.py"
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "specs.json")], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "sepme_lib not imported" in r.stdout
    for spec, ref in zip(specs, refs):
        outs = load_file(spec["out"])
        errors = [rel(outs[f"combo{i}"], r) for i, r in enumerate(ref)]
        print(spec["kind"], "relative error per combination:", ", ".join(f"{e:.1e}" for e in errors))
        assert max(errors) <= 1e-5, (spec["kind"], errors)


def test_widget_diffusers_backend_renders_the_same_images(tiny, clf, bundled):
    scales = [1.0, 0.0, -0.5]
    ad = make_backend(tiny, bundled, "diffusers")
    lib = render_state(tiny, clf, bundled, scales, "a red star in striped style", n=2, steps=3)
    dif = render_state(tiny, clf, bundled, scales, "a red star in striped style", n=2, steps=3, adapters=ad)
    assert (lib["images"] - dif["images"]).abs().max() < 1e-4 and lib["leakage"] == dif["leakage"]
    assert make_backend(tiny, bundled, "library") is None
    with pytest.raises(ValueError, match="unknown backend"):
        make_backend(tiny, bundled, "torch")
    w = CombinationWidget(tiny, clf, bundled, n=2, steps=2, backend="diffusers")
    assert w.adapters is not None and w.update()["edited"]["images"].shape[0] == 2


# ---------------------------------------------------------------------------------------------- pitfalls
def test_prefix_default_loads_nothing_and_load_adapter_checks(tiny, bundled, tmp_path):
    folder = bundled[0].save_lora(tmp_path / "s", verbose=False)
    a = AdapterUNet(tiny.unet, bundled[1:2])  # a peft-ready copy
    with pytest.raises(OSError, match="pytorch_lora_weights.bin"):  # a folder: .bin unless weight_name is given
        a.unet.load_lora_adapter(str(folder), prefix="unet", adapter_name="raw")
    a.unet.load_lora_adapter(str(folder), weight_name=lora.WEIGHTS, adapter_name="raw")  # prefix: "transformer"
    assert lora_layers(a.unet, "raw") == 0  # silently nothing
    load_adapter(a.unet, folder, "striped")
    assert lora_layers(a.unet, "striped") == len(bundled[0].tensors)


def test_adapter_names_with_a_dot_are_refused(tiny, bundled):
    assert lora.adapter_name("Van Gogh") == "Van_Gogh" and lora.adapter_name("a.b+c") == "a_b_c"
    a = AdapterUNet(tiny.unet, bundled[:1])
    with pytest.raises(lora.LoraError, match="'.'"):
        load_adapter(a.unet, bundled[1], "v1.5")
    with pytest.raises(Exception):  # what peft itself does with such a name
        a.unet.load_lora_adapter(bundled[1].to_lora().state_dict, prefix="unet", adapter_name="v1.5")


def test_alpha_pattern_keeps_every_layer_at_scale_one(tiny, bundled):
    exp = bundled[0].to_lora()
    a = AdapterUNet(tiny.unet, [exp])
    scal = {m.lora_A["striped"].weight.shape[0]: m.scaling["striped"] for m in a.unet.modules() if hasattr(m, "lora_A")
            and "striped" in m.lora_A}
    assert scal == {64: 1.0, 128: 1.0}
    # the pitfall: metadata without alpha_pattern scales the layers of the other rank by r / r_l
    cfg = {f"unet.{k}": v for k, v in exp.config.items() if k != "alpha_pattern"}
    a.unet.load_lora_adapter(exp.state_dict, prefix="unet", adapter_name="noalpha", metadata=cfg)
    bad = {m.lora_A["noalpha"].weight.shape[0]: m.scaling["noalpha"] for m in a.unet.modules()
           if hasattr(m, "lora_A") and "noalpha" in m.lora_A}
    assert bad == {64: 2.0, 128: 1.0}


def test_fuse_scale_persists_and_unfuse_rounds(tiny, bundled):
    x, t, emb = inputs(tiny, 2)
    a = AdapterUNet(tiny.unet, bundled[:1])
    ref05 = tiny.predict(x, t, emb, edited_weights(tiny, bundled[:1], [0.5]))
    with torch.no_grad():
        a.unet.fuse_lora(lora_scale=0.5)
        assert rel(a.unet(x, t, encoder_hidden_states=emb).sample, ref05) < 1e-5
        a.unet.unfuse_lora()
        assert rel(a.unet(x, t, encoder_hidden_states=emb).sample, ref05) < 1e-5  # still 0.5, not the set weight 1
        a.set_scales([1.0])
        ref1 = tiny.predict(x, t, emb, edited_weights(tiny, bundled[:1], [1.0]))
        assert rel(a.unet(x, t, encoder_hidden_states=emb).sample, ref1) < 1e-5
        for _ in range(20):
            a.unet.fuse_lora()
            a.unet.unfuse_lora()
    own = dict(tiny.unet.named_parameters())
    drift = max(float((p - own[n.replace(".base_layer", "")]).abs().max()) for n, p in a.unet.named_parameters()
                if "base_layer" in n)
    assert drift < 1e-6  # float rounding per cycle: not bit-exact, reload for a clean base


def test_adapters_take_the_unet_dtype(tiny, bundled):
    half = AdapterUNet(copy.deepcopy(tiny.unet).to(torch.float16), bundled[:1])
    assert half.dtype == torch.float16 and AdapterUNet(tiny.unet, bundled[:1]).dtype == torch.float32


def test_pipelines_mutate_the_scheduler_they_are_given_but_the_model_never_hands_its_own(sd_model):
    sched = sd_model.scheduler
    before = (sched.num_inference_steps, sched.timesteps.clone())
    sd_model.sample(["Van Gogh"], seeds=[0], steps=3)
    assert sched.num_inference_steps == before[0] and torch.equal(sched.timesteps, before[1])
    mine = DDIMScheduler.from_config(sched.config)
    pipe = StableDiffusionPipeline(vae=sd_model.vae, text_encoder=sd_model.text_encoder, tokenizer=sd_model.tokenizer,
                                   unet=sd_model.unet, scheduler=mine, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe("Van Gogh", num_inference_steps=3, output_type="latent")
    assert mine.num_inference_steps == 3  # the object a pipeline is built around changes under it


def test_from_lora_refuses_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError):
        Delta.from_lora(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(lora.LoraError, match="has no pytorch_lora_weights"):
        Delta.from_lora(tmp_path / "empty")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(lora.LoraError, match="is a file"):
        lora.write(Delta("x", "m", {"a.weight": torch.ones(2, 2)}, "b").to_lora(), tmp_path / "afile" / "sub", "")
