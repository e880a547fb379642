"""The model card (``README.md``) of a LoRA folder written by ``lora.py`` (``Delta.save_lora``, ``sepme erase``).

Moved out of ``lora.py`` (module size limit); ``lora.model_card`` is this function. It reads only attributes of a
``lora.LoraExport``, so it sits below ``lora`` in the layers.
"""
from __future__ import annotations

import json

from . import config
from .report import markdown_table

WEIGHTS = "pytorch_lora_weights.safetensors"  # the weights file of a LoRA folder (lora.WEIGHTS)


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.2g}" if isinstance(v, float) else str(v))


def model_card(exp, acc: dict | None = None, base_model: str | None = None) -> str:
    """The folder's ``README.md`` in the style of a diffusers/Hub LoRA card: what was erased and how, what is
    protected, the leakage certificate, the ACC table of the run (``acc``: ``{"columns": [...], "rows": [...]}`` or
    ``{row name: {concept: ACC}}``), and how to load and combine the adapter."""
    m, d = exp.meta(), exp.delta
    base = base_model or "the base model it was trained on"
    prompts, protected = d.info.get("prompts") or [], m["protected"]
    r = sorted(set(exp.ranks.values()))
    lines = ["---", "library_name: diffusers", f"base_model: {base}",
             "tags: [lora, concept-erasure, sepme, text-to-image, diffusers]", "---", "",
             f"# {d.name}: erased ({d.method}), as a LoRA adapter", "",
             f"`theta + s * dTheta` with this adapter removes **{d.name}** from `{base}` (fingerprint `{d.base}` of "
             f"its to_k/to_v weights). Made by sepme_lib {config.VERSION}, method `{d.method}`.", "",
             "## What was erased, and how", "",
             f"- prompts erased: {', '.join(repr(p) for p in prompts) or '-'}",
             f"- method: `{d.method}`; settings: `{json.dumps(d.hparams, default=str)}`",
             f"- training: {_fmt(d.info.get('steps'))} steps, {_fmt(d.info.get('seconds'))} s; stop: "
             f"{d.info.get('stop_reason') or '-'}", "",
             "## What is protected", "",
             (f"{len(protected)} prompts (the empty prompt `c_0` shown as ''): "
              + ", ".join(repr(p) for p in protected[:12]) + (" ..." if len(protected) > 12 else "")
              if protected else "No protected set (this method does not decouple its weights)."), "",
             "## Leakage certificate", "",
             "`max_l ||A dW_l^T|| / ||A W_l^T||` over the edited to_k/to_v, `A` = the embedding rows of the protected "
             "prompts: the relative change of their keys and values (float32 rounding is ~1e-6).", "",
             markdown_table([dict(ranks=f"{r[0]}" if len(r) == 1 else f"{r[0]}-{r[-1]}",
                                  exact="yes" if exp.exact else f"no (rank={exp.rank}, rtol={exp.rtol})",
                                  recon_error=_fmt(exp.recon_error), leakage=_fmt(exp.leakage),
                                  leakage_full_rank=_fmt(exp.leakage_exact), output_change=_fmt(exp.output_change))],
                            ["ranks", "exact", "recon_error", "leakage", "leakage_full_rank", "output_change"]), ""]
    if acc:
        rows = acc["rows"] if "rows" in acc else [dict(model=k, **v) for k, v in acc.items()]
        cols = acc.get("columns") or ["model"] + [c for c in rows[0] if c != "model"]
        lines += ["## ACC of the run", "", acc.get("caption", "Judge accuracy per concept (the paper's ACC)."), "",
                  markdown_table(rows, cols), ""]
    name = exp.adapter
    if base_model == "tiny":  # the bundled pixel-space model has no pipeline: its UNet loads the adapter
        load = ["from diffusers import UNet2DConditionModel",
                'unet = UNet2DConditionModel.from_pretrained("data/tiny_t2i/unet")  # the bundled model\'s UNet',
                f'unet.load_lora_adapter("path/to/this/folder", weight_name="{WEIGHTS}",',
                f'                        prefix="unet", adapter_name="{name}")  # both arguments are needed',
                "# more erased concepts: load each folder under its own name, then set their strengths s_i",
                f'unet.set_adapters(["{name}"], [1.0])   # theta + 1.0 * dTheta; 0 restores']
    else:
        load = ["import torch", "from diffusers import StableDiffusionPipeline",
                f'pipe = StableDiffusionPipeline.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda")',
                f'pipe.load_lora_weights("path/to/this/folder", adapter_name="{name}")',
                "# more erased concepts: load each folder under its own name, then set their strengths s_i",
                f'pipe.set_adapters(["{name}"], adapter_weights=[1.0])   # theta + 1.0 * dTheta; 0 restores',
                'image = pipe("a painting", num_inference_steps=50).images[0]']
    lines += ["## Load and combine (diffusers >= 0.34 with peft; nothing from sepme_lib needed)", "", "```python",
              *load, "```", "",
              "Notes: adapter names may not contain `.`; `set_adapters` recomputes `theta + sum_i s_i dTheta_i` on the "
              "fly (exact up to float rounding); `fuse_lora(lora_scale=s)` bakes the scale in and it stays: after "
              "`unfuse_lora` the adapter still runs at `s` until `set_adapters` is called again; fuse/unfuse cycles "
              "round the base weights (~3e-8 after 200 cycles on the bundled model: reload them for a clean base); "
              "in float16 the adapter runs in float16 too. With sepme_lib: `Delta.from_lora(folder)`."
              + (" This adapter changes a bias (peft's `lora_bias`): `set_adapters` is exact, `fuse_lora` is "
                 "impossible on its bias-free layers." if exp.config["lora_bias"] else ""), ""]
    return "\n".join(lines)
