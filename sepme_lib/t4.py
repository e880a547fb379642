"""Stable Diffusion 1.4 in fp16 on a Colab T4 (16 GB), per operation and per notebook: ``python -m sepme_lib.t4
[--save] [--json]`` (``--save`` writes ``data/results/colab_t4_estimate.json``). Nothing here ran on a T4: every
number is an **estimate** (``"estimate": true``, ``"measured": false``), recomputed in seconds from

* FLOPs counted here with ``torch.utils.flop_counter.FlopCounterMode`` on the full-size SD 1.4 built on the meta device
  (``random_sd.full_parts``: the real shapes, nothing allocated): the UNet pass at 512x512, batch 2; a SepME and a
  G-CiRs step as ``gcirs.train`` runs them (a frozen pass at batch 2, then the edited pass -- batch 1 for SepME, 2 for
  G-CiRs -- and its backward into the trained parameters); a textual-inversion step (batch 1, backward into the
  prompt embedding); a prompt-search evaluation (a UNet pass of 4 ``x_t``); the text encoder (2 prompts); the VAE
  decode of one image;
* an effective fp16 throughput, an assumption: :data:`PEAK_TFLOPS` (65, the T4's fp16 tensor-core peak) x
  :data:`EFFICIENCY` (0.15). Why 0.15: diffusers' published T4 benchmark (docs "Torch 2.0 support", torch 2.0, fp16,
  SDPA, no compile) runs SD 1.5 txt2img at 6.9 it/s at batch 1 -- one UNet pass of batch 2 per step, 1.61 TFLOP
  counted here -- i.e. about 11 TFLOPS, 17 % of peak; 15 % leaves a margin for this library's own per-step work and a
  shared Colab T4's clocks. A step with a backward pass is derated further by its efficiency relative to the UNet pass
  as measured on the CPU (its FLOPs over its measured seconds, ``data/results/gpu_path_cpu.json``);
* the CPU rows otherwise: closed forms and null spaces run in float64 on the CPU (``closed_form``, ``nullspace``), so
  their measured seconds are kept; loading the model: :data:`LOAD_S`, an assumption (the download is not counted);
* memory: the fp32 peaks measured on the CPU, with ``W`` the fp32 weights (parameters x 4 B) and ``B`` the resident
  baseline (the ``null_space`` row: the model loaded, a negligible op), are taken as ``W/2`` (fp16 weights) +
  ``(peak - B)/2 x b`` (fp16 activations; ``b`` = the GPU's batch over the CPU's, e.g. 8 images per sampling batch
  against 1) + trained parameters x 16 B (their fp32 value, gradient and two Adam moments, not halved).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import config, families, gpupath, random_sd

PEAK_TFLOPS = 65.0  # NVIDIA T4 datasheet: fp16 tensor-core peak (mixed precision)
EFFICIENCY = 0.15  # assumed share of the peak reached by the UNet pass (module docstring: why)
LOAD_S = 60.0  # assumed: reading SD 1.4's ~2.1 GB of fp16 weights from Colab's disk and moving them to the GPU
T4_GIB = 15.0  # of the T4's 16 GB (15 GiB) about 15 GiB can be allocated; the limit the estimates are held to
MINUTES = 20.0  # the per-notebook time budget of the colab profile
SEARCH_BATCH = 4 * 16  # a prompt-search pass: 16 candidates x 4 x_t (attacks.prompt_search, ATTACK_BUDGETS["sd"])
RESULT = "colab_t4_estimate.json"


def count_flops() -> dict:
    """FLOPs of each operation on the full-size SD 1.4 (meta device: the count is exact, nothing is computed)."""
    with torch.device("meta"):
        unet, vae, text, _ = random_sd.full_parts()
    for m in (unet, vae, text):
        m.requires_grad_(False)
    params = dict(unet.named_parameters())
    xattn = [k for k in params if ".attn2." in k]  # every cross-attention parameter (G-CiRs)
    kv = [k for k in xattn if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]  # SepME's edited matrices

    def unet_pass(b, emb_grad=False):
        emb = torch.randn(b, 77, 768, device="meta", requires_grad=emb_grad)
        return unet(torch.randn(b, 4, 64, 64, device="meta"), torch.full((b,), 500, device="meta"),
                    encoder_hidden_states=emb).sample

    def count(fn, trained=()):
        for k in trained:
            params[k].requires_grad_(True)
        with FlopCounterMode(display=False) as fc:
            fn()
        for k in trained:
            params[k].requires_grad_(False)
            params[k].grad = None
        return int(fc.get_total_flops())

    def step(b):
        with torch.no_grad():
            unet_pass(2)  # the frozen representations r_theta(c) (gcirs.train, step 2)
        unet_pass(b).float().pow(2).mean().backward()  # the edited pass and its backward (steps 3-4)

    with torch.no_grad():
        out = dict(unet_forward=count(lambda: unet_pass(2)), search_evaluation=count(lambda: unet_pass(4)),
                   text_encoder=count(lambda: text(torch.zeros(2, 77, dtype=torch.long, device="meta"))),
                   vae_decode=count(lambda: vae.decode(torch.randn(1, 4, 64, 64, device="meta"))))
    out.update(train_sepme=count(lambda: step(1), kv), train_gcirs=count(lambda: step(2), xattn),
               inversion_step=count(lambda: unet_pass(1, emb_grad=True).float().pow(2).mean().backward()))
    return out


def op_estimates(rows: dict, flops: dict) -> dict:
    """``{op: dict(seconds, peak_gib, basis, estimate=True)}`` on a T4 (module docstring)."""
    rate = PEAK_TFLOPS * 1e12 * EFFICIENCY
    cpu_rate = {op: flops[op] / rows[op]["seconds"] for op in ("unet_forward", "train_sepme", "train_gcirs")}
    W = sum(rows["load"]["shape"]["parameters_m"].values()) * 1e6 * 4 / 2**30
    base = rows["null_space"]["peak_mem_gib"]

    def mem(op, b=1.0, trained_m=0.0):
        return W / 2 + max(rows[op]["peak_mem_gib"] - base, 0.0) / 2 * b + trained_m * 1e6 * 16 / 2**30

    out = {}
    for op, src in (("unet_forward", "unet_forward"), ("search_evaluation", "unet_forward"),
                    ("train_sepme", "train_sepme"), ("train_gcirs", "train_gcirs"), ("inversion_step", "train_sepme")):
        rel = min(1.0, cpu_rate[src] / cpu_rate["unet_forward"])
        b = SEARCH_BATCH / 2 if op == "search_evaluation" else 1.0
        trained = rows[src]["shape"].get("trained_parameters_m", 0.0) if op.startswith("train") else 0.0
        out[op] = dict(seconds=flops[op] / (rate * rel), peak_gib=mem(src, b, trained),
                       basis=f"{flops[op] / 1e12:.3g} TFLOP / ({PEAK_TFLOPS:g} TFLOPS x {EFFICIENCY:g}"
                             + (f" x {rel:.2f}, its CPU efficiency relative to the UNet pass)" if rel < 1 else ")")
                             + (f"; memory: a pass of {SEARCH_BATCH} x_t, activations x {b:g}" if b != 1 else ""))
    d = rows["ddim_image"]
    batch = families.get("sd").batch
    fixed = (flops["vae_decode"] + flops["text_encoder"]) / rate
    out["ddim_step"] = dict(seconds=flops["unet_forward"] / rate,
                            peak_gib=mem("ddim_image", batch / d["shape"]["images"]),
                            basis=f"one UNet pass per image and step; memory: {batch} images per sampling batch "
                                  f"(families 'sd'), activations x {batch / d['shape']['images']:g}")
    out["image_fixed"] = dict(seconds=fixed, peak_gib=out["ddim_step"]["peak_gib"],
                              basis="text encoder (2 prompts) + VAE decode of one image, FLOPs / the same rate")
    for op in ("null_space", "uce", "rece", "speed"):
        out[op] = dict(seconds=rows[op]["seconds"], peak_gib=W / 2, basis="float64 on the CPU: the CPU's measured "
                       "seconds (1 thread); GPU memory: the fp16 model (the solve's memory is host RAM)")
    out["load"] = dict(seconds=LOAD_S, peak_gib=W / 2, basis="assumed (module docstring), not a FLOP count")
    return {k: dict(v, estimate=True, measured=False) for k, v in out.items()}


def notebook_t4(ops: dict, profile: str) -> list[dict]:
    """Each notebook on a T4 in ``profile`` from ``gpupath.notebook_counts`` and :func:`op_estimates`."""
    P = config.profile(profile, "sd")
    img = ops["image_fixed"]["seconds"] + P["sample_steps"] * ops["ddim_step"]["seconds"]
    solve = sum(ops[m]["seconds"] for m in ("uce", "rece", "speed")) / 3  # most solves of notebook 06 are UCE's
    out = []
    for nb, c in gpupath.notebook_counts(P).items():
        parts = dict(load=ops["load"]["seconds"], images=(c["images"] + c["refs"]) * img,
                     sepme=c["sepme"] * ops["train_sepme"]["seconds"], gcirs=c["gcirs"] * ops["train_gcirs"]["seconds"],
                     inversion=c["inversion"] * ops["inversion_step"]["seconds"], solves=c["solves"] * solve,
                     search=c["search"] * ops["search_evaluation"]["seconds"])
        used = ["ddim_step"] + [op for op, k in (("train_sepme", "sepme"), ("train_gcirs", "gcirs"),
                                                 ("inversion_step", "inversion"), ("search_evaluation", "search"))
                                if c[k]]
        secs = sum(parts.values())
        out.append(dict(notebook=nb, profile=profile, device="T4 (estimate)", estimate=True, measured=False,
                        seconds=secs, minutes=secs / 60, peak_gib=max(ops[o]["peak_gib"] for o in used),
                        peak_op=max(used, key=lambda o: ops[o]["peak_gib"]), counts=c,
                        seconds_by_part={k: round(v, 1) for k, v in parts.items()},
                        basis=f"load {LOAD_S:g} s + {c['images'] + c['refs']} images x {img:.3g} s "
                              f"({P['sample_steps']} DDIM steps) + {c['sepme']} SepME steps + {c['gcirs']} G-CiRs/"
                              f"fine-tuning steps + {c['inversion']} inversion steps + {c['search']} search "
                              f"evaluations + {c['solves']} closed-form solves, each at its op's estimate"))
    return out


def estimate(cpu: dict | None = None, profiles=("colab", "full")) -> dict:
    """The whole estimate from the committed CPU rows (``gpu_path_cpu.json``; or ``cpu``, a gpu-path result)."""
    cpu = cpu or json.loads((config.RESULTS / "gpu_path_cpu.json").read_text())
    rows = {r["op"]: r for r in cpu["rows"] if r.get("measured")}
    flops = count_flops()
    ops = op_estimates(rows, flops)
    return dict(device="NVIDIA T4, 16 GB, fp16 (estimate: nothing here ran on a T4)", estimate=True, measured=False,
                model="Stable Diffusion 1.4", peak_tflops=PEAK_TFLOPS, efficiency=EFFICIENCY,
                effective_tflops=PEAK_TFLOPS * EFFICIENCY, load_s=LOAD_S, limit_gib=T4_GIB, budget_minutes=MINUTES,
                flops=flops, flops_basis="torch.utils.flop_counter.FlopCounterMode on the full-size SD 1.4 built on "
                                         "the meta device (sepme_lib.t4.count_flops)",
                cpu_rows=f"{cpu.get('command', 'gpu_path_cpu.json')} ({cpu.get('cpu')}, {cpu.get('dtype')})",
                sizes={p: config.profile(p, "sd") for p in profiles}, ops=ops,
                notebooks=[e for p in profiles for e in notebook_t4(ops, p)], basis=__doc__)


def markdown(res: dict) -> str:
    lines = [f"T4 estimate (not measured): {res['effective_tflops']:.3g} TFLOPS effective fp16 "
             f"({res['peak_tflops']:g} x {res['efficiency']:g}), load {res['load_s']:g} s", "",
             "| op | TFLOP | seconds | peak GiB (fp16) | basis |", "|---|---|---|---|---|"]
    lines += [f"| {op} | {res['flops'][op] / 1e12:.3g} | {o['seconds']:.3g} | {o['peak_gib']:.3g} | {o['basis']} |"
              if op in res["flops"] else f"| {op} | - | {o['seconds']:.3g} | {o['peak_gib']:.3g} | {o['basis']} |"
              for op, o in res["ops"].items()]
    lines += ["", "| notebook | profile | minutes on a T4 (estimate) | peak GiB (estimate) | images | training steps |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {e['notebook']} | {e['profile']} | {e['minutes']:.3g} | {e['peak_gib']:.3g} | "
              f"{e['counts']['images'] + e['counts']['refs']} | {e['counts']['sepme'] + e['counts']['gcirs']} |"
              for e in res["notebooks"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sepme_lib.t4", description="T4 estimates per op and notebook")
    ap.add_argument("--json", action="store_true", help="print the JSON instead of markdown")
    ap.add_argument("--save", action="store_true", help=f"also write data/results/{RESULT}")
    a = ap.parse_args(argv)
    res = estimate()
    res["command"] = "python -m sepme_lib.t4 " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.save:
        (config.RESULTS / RESULT).write_text(json.dumps(res, indent=1, default=float) + "\n")
    print(json.dumps(res, indent=1, default=float) if a.json else markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
