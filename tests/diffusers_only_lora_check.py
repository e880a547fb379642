"""Load LoRA folders written by ``Delta.save_lora`` with torch and diffusers only (no sepme_lib), combine them with
``set_adapters`` and save the UNet outputs: ``tests/test_lora.py`` runs this in a fresh interpreter and compares the
outputs with the library's ``theta + sum_i s_i dTheta_i``.

    python tests/diffusers_only_lora_check.py SPEC.json

SPEC.json: a list of ``{"kind": "unet" | "pipeline" | "sdxl", "model": UNet folder or pipeline folder, "loras": {name:
folder}, "inputs": file with x, t, emb (SDXL also text_embeds, time_ids) (safetensors), "combos": [[s_1, ...], ...],
"out": file to write}``.
"""
import json
import sys

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file

def run(spec):
    if spec["kind"] in ("pipeline", "sdxl"):  # a Stable Diffusion (XL) folder: the documented pipeline call
        if spec["kind"] == "sdxl":
            pipe = StableDiffusionXLPipeline.from_pretrained(spec["model"])
        else:
            pipe = StableDiffusionPipeline.from_pretrained(spec["model"], safety_checker=None)
        for name, folder in spec["loras"].items():
            pipe.load_lora_weights(folder, adapter_name=name)
        unet = pipe.unet
    else:  # the bundled pixel-space model has no pipeline: its UNet loads the adapters (prefix and weight_name needed)
        unet = UNet2DConditionModel.from_pretrained(spec["model"])
        for name, folder in spec["loras"].items():
            unet.load_lora_adapter(folder, weight_name="pytorch_lora_weights.safetensors", prefix="unet",
                                   adapter_name=name)
    unet.eval()
    x = load_file(spec["inputs"])
    names = list(spec["loras"])
    added = dict(added_cond_kwargs=dict(text_embeds=x["text_embeds"], time_ids=x["time_ids"])) if "time_ids" in x else {}
    outs = {}
    with torch.no_grad():
        for i, scales in enumerate(spec["combos"]):
            unet.set_adapters(names, scales)
            outs[f"combo{i}"] = unet(x["x"], x["t"], encoder_hidden_states=x["emb"], **added).sample.contiguous()
    save_file(outs, spec["out"])
    print(f"{spec['kind']}: {len(outs)} combinations of {names}")


for spec in json.load(open(sys.argv[1])):
    run(spec)
assert not any(m.startswith("sepme_lib") for m in sys.modules), "sepme_lib was imported"
print("ok: sepme_lib not imported")
