"""Time and peak memory of each Stable Diffusion operation the notebooks run: ``python -m sepme_lib.bench gpu-path``.

Needs only torch, diffusers and transformers and a diffusers SD 1.x folder (real weights, or the random-weight
full-size SD 1.4 of ``python -m sepme_lib.random_sd DIR --size full``: the real shapes, memory and time), so the same
command runs on a CPU, a Colab T4 or any GPU machine. Rows (``OPS``), each measured through the library's own calls:

* ``load``: ``load_model(folder)``; ``unet_forward``: one UNet pass at 512x512 (64x64x4 latents), batch 2 (one image
  with classifier-free guidance), no gradient;
* ``train_sepme`` / ``train_gcirs``: one step of ``gcirs.train`` at the paper's batch (``methods.DEFAULTS``: 1
  reference image), SepME's decoupled to_k/to_v increments (gradients flow through the UNet) or G-CiRs on every
  cross-attention parameter;
* ``null_space``: ``stack_rows`` + ``null_space`` of ``c_0`` and the 8 prompts of two other concepts (77 rows each);
* ``uce`` / ``rece`` / ``speed``: ``erase(..., method=...)`` with SD's default settings (closed forms);
* ``ddim_image``: ``model.sample`` with guidance: a few DDIM steps measured per step (``callback``), the text encoder
  and VAE decode measured once, the 50-step time extrapolated as ``fixed + 50 x per-step`` (``extrapolated: true``).

Time: the median of ``repeats`` runs after one warm-up run; a run whose warm-up took over ``slow_s`` seconds (a
full-size op on one CPU thread) is measured once (the warm-up is the measurement; ``repeats: 1``). Peak memory:
every op runs in a fresh subprocess (``python -m sepme_lib.gpupath --op NAME``); on CUDA it is
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` once the model is loaded, on a CPU the
process's peak RSS (``VmHWM``) after resetting it (``/proc/self/clear_refs``) once the model is loaded -- both include
the resident model, not the transient of loading it (the ``load`` row has that). Derived rows (a reference set, a
combination table, each notebook per profile) are computed from the measured ones; each says its formula.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import diffusers
import torch
import transformers

try:
    import resource  # POSIX only
except ImportError:  # pragma: no cover - Windows
    resource = None

from . import config, families, gcirs, methods, nullspace
from .concepts import Concept, concept_set
from .config import BadValue
from .loading import load_model

OPS = ("load", "unet_forward", "train_sepme", "train_gcirs", "null_space", "uce", "rece", "speed", "ddim_image")
SAMPLE_STEPS_PAPER = 50
E_SD, V_SD = 3, 10  # SD concept set: 3 erased concepts, 10 evaluated classes (concepts.CONCEPT_SETS["sd"])


# ------------------------------------------------------------------------------------------------ measuring
def _reset_peak(device: torch.device) -> bool:
    """Start a new peak; ``False`` on a CPU where the peak RSS cannot be reset (it is then the process's peak)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 if resource else float("nan")  # KiB on Linux


def _timed(fn, device, repeats: int, slow_s: float) -> tuple[list, object]:
    """Seconds of each measured run of ``fn`` (warm-up first; see the module docstring) and its last result."""
    def once():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0, out
    first, out = once()
    if first > slow_s:
        return [first], out
    times = []
    for _ in range(repeats):
        dt, out = once()
        times.append(dt)
    return times, out


def _concept(model, name: str, batch: int) -> Concept:
    """A concept of the SD set with random reference latents (the reference set is timed by ``ddim_image``)."""
    gen = torch.Generator().manual_seed(0)
    return Concept(name, concept_set(model).prompts(name, 4), torch.randn(batch, *model.latent_shape, generator=gen))


def measure(op: str, model_path: str, device=None, dtype=None, repeats: int = 3, slow_s: float = 60.0,
            steps: int = 2, images: int | None = None) -> dict:
    """One row of the table: ``op`` (one of :data:`OPS`) on the model at ``model_path``, in this process."""
    if op not in OPS:
        raise BadValue(f"op must be one of {', '.join(OPS)}, got {op!r}")
    dev = config.get_device(device)
    t0 = time.perf_counter()
    model = load_model(model_path, device=dev, dtype=dtype)
    with torch.no_grad():  # read every weight once: memory-mapped weights become resident here, not in the first op
        for m in (model.unet, model.text_encoder, model.vae):
            for p in m.parameters():
                p.sum()
    row = dict(op=op, device=str(dev), dtype=str(model.unet.dtype).replace("torch.", ""), measured=True)
    if op == "load":
        return dict(row, seconds=time.perf_counter() - t0, repeats=1, peak_mem_gib=_peak_gib(dev),
                    shape=dict(parameters_m={k: round(sum(p.numel() for p in m.parameters()) / 1e6, 2) for k, m in
                                             (("unet", model.unet), ("text_encoder", model.text_encoder),
                                              ("text_encoder_2", model.text_encoder_2), ("vae", model.vae))
                                             if m is not None}),
                    note="every weight read once (resident); peak includes the transient of loading the folder")
    cs = concept_set(model)
    erase_names = list(cs.erase)
    s = gcirs.Settings(**dict(methods.settings("sepme", model), cap=1, warmup=0))
    L, d_in = model.max_length, model.context_dim
    c, h = model.latent_shape[0], model.latent_shape[-1]
    reset = _reset_peak(dev)
    if op == "unet_forward":
        z, emb = torch.randn(2, c, h, h, device=dev), model.embed(["", cs.prompts(erase_names[0], 1)[0]])
        t = torch.tensor(500, device=dev)
        with torch.no_grad():
            times, _ = _timed(lambda: model.predict(z, t, emb), dev, repeats, slow_s)
        shape = dict(batch=2, latent=[c, h, h], image=h * 8, tokens=L, grad=False)
    elif op in ("train_sepme", "train_gcirs"):
        con = _concept(model, erase_names[0], s.batch)
        protect = [""] + [p for n in erase_names[1:] for p in cs.prompts(n, 4)]

        def make():  # a fresh increment per run (a trained one cannot be trained again); built outside the timing
            if op == "train_sepme":
                return nullspace.decoupled_increment(model, con.name, protect, s.beta, s.min_null_dim, s.lr, s.tau)
            return gcirs.direct_increment(model, con.name, model.cross_attention_param_names(), s.gcirs_lr,
                                          s.gcirs_tau)
        incs = [make() for _ in range(2)]
        inc = incs[0]
        skip = op == "train_sepme"
        what = (f"to_k/to_v increments dW = beta w S^T (null dim {inc.info['null_dim']})" if skip
                else "every cross-attention parameter")

        def step():
            if not incs:
                incs.append(make())
            return gcirs.train(model, [con], [incs.pop()], [0], s, skip_empty=skip, progress=False)
        times, _ = _timed(step, dev, repeats, slow_s)
        shape = dict(batch=s.batch, trained=what, trained_parameters_m=round(sum(p.numel() for p in
                                                                                 inc.params.values()) / 1e6, 3))
    elif op == "null_space":
        protect = [""] + [p for n in erase_names[1:] for p in cs.prompts(n, 4)]

        def solve():
            return nullspace.null_space(nullspace.stack_rows(model, protect))
        times, ns = _timed(solve, dev, repeats, slow_s)
        shape = dict(rows=len(protect) * L, d_in=d_in, prompts=len(protect), rank=ns.rank, null_dim=ns.dim,
                     formula_null_dim=nullspace.capacity(d_in, L, len(protect))["null_dim"])
    elif op in ("uce", "rece", "speed"):
        con = _concept(model, erase_names[0], 1)
        times, ds = _timed(lambda: methods.erase(model, [con], method=op), dev, repeats, slow_s)
        shape = dict(concepts=1, edited_matrices=len(ds[0].tensors), d_in=d_in)
    else:  # ddim_image
        n = images or (1 if dev.type == "cpu" else families.family_of(model).sample_batch())
        stamps = []
        prompts = [cs.prompts(erase_names[0], 1)[0]] * n
        model._empty = None  # the empty prompt's embedding is part of the sampling time

        def run():
            stamps.clear()
            t_start = time.perf_counter()
            model.sample(prompts, seeds=range(n), steps=steps, batch_size=n,
                         callback=lambda *a: (torch.cuda.synchronize(dev) if dev.type == "cuda" else None,
                                              stamps.append(time.perf_counter())))
            return t_start
        times, t_start = _timed(run, dev, repeats, slow_s)
        per_step = statistics.median([b - a for a, b in zip(stamps, stamps[1:])]) if steps > 1 else None
        fixed = times[-1] - steps * (per_step or (stamps[0] - t_start))
        per_step = per_step or (stamps[0] - t_start)
        row.update(seconds_per_step=per_step, seconds_fixed=fixed,
                   seconds_measured=statistics.median(times), steps_measured=steps, extrapolated=True,
                   seconds_per_image_50=(fixed + SAMPLE_STEPS_PAPER * per_step) / n,
                   basis=f"{steps} DDIM steps timed one by one; seconds = fixed (text encoder + VAE decode) + "
                         f"{SAMPLE_STEPS_PAPER} x median seconds per step")
        times = [fixed + SAMPLE_STEPS_PAPER * per_step]
        shape = dict(images=n, unet_batch=2 * n, steps=SAMPLE_STEPS_PAPER, guidance=model.guidance, image=h * 8)
    row.update(seconds=statistics.median(times), repeats=len(times), peak_mem_gib=_peak_gib(dev), shape=shape)
    if not reset:
        row["note"] = "peak RSS of the whole process (could not be reset after loading)"
    return row


def measure_isolated(op: str, model_path: str, device=None, dtype=None, **kw) -> dict:
    """:func:`measure` in a fresh ``python -m sepme_lib.gpupath`` subprocess (its own peak memory)."""
    cmd = [sys.executable, "-m", "sepme_lib.gpupath", "--op", op, "--model", str(model_path)]
    cmd += ["--device", str(device)] if device else []
    cmd += ["--dtype", dtype] if dtype else []
    for k, v in kw.items():
        if v is not None:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=config.ROOT, check=False)
    if res.returncode != 0:
        why = " (killed: out of memory?)" if res.returncode == -9 else ""
        raise RuntimeError(f"gpu-path op {op!r} failed (exit {res.returncode}{why}): {res.stderr[-1500:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- estimates
def _image_s(rows: dict, steps: int) -> float:
    d = rows["ddim_image"]
    return (d["seconds_fixed"] + steps * d["seconds_per_step"]) / d["shape"]["images"]


def derived(rows: dict, profile: str) -> list[dict]:
    """Reference set and combination table of a profile, from the measured rows (formula in each row)."""
    P = config.profile(profile, "sd")
    img = _image_s(rows, P["sample_steps"])
    n_img = 2 ** E_SD * V_SD * P["table_images"]
    peak = rows["ddim_image"]["peak_mem_gib"]
    return [dict(op=f"reference_set_{profile}", measured=False, seconds=P["n_ref"] * img, peak_mem_gib=peak,
                 basis=f"n_ref {P['n_ref']} images x {img:.3g} s per image at {P['sample_steps']} DDIM steps "
                       "(ddim_image's fixed + steps x per-step, per image)"),
            dict(op=f"combination_table_{profile}", measured=False, seconds=n_img * img, peak_mem_gib=peak,
                 basis=f"(2^{E_SD} subsets incl. the original) x {V_SD} classes x {P['table_images']} images = "
                       f"{n_img} images x {img:.3g} s")]


def notebook_counts(P: dict) -> dict:
    """Per notebook on SD: ``images`` sampled, ``refs`` (reference images), ``sepme`` training steps, ``gcirs``
    (G-CiRs / fine-tuning steps, notebook 01's cross-attention fine-tuning included), ``solves`` (closed forms),
    ``inversion`` (textual-inversion steps of batch 1) and ``search`` (prompt-search loss evaluations: one UNet pass of
    4 ``x_t``), read from each notebook's SD path and rounded (grids counted approximately). The branches the
    notebooks take on ``PROFILE == "ci"`` / ``"full"`` follow ``P["name"]`` (``colab`` takes neither). Training at the
    step cap (``sd_cap``, else the paper's 1000; notebook 06 in full: ESD-x 1000, Ablating 200, FMN 35, All-but-One
    200): an upper bound, Eq. 4 may stop earlier. Attacks (notebook 09): ``methods.ATTACK_BUDGETS["sd"]``, capped by
    ``sd_cap`` as ``methods.attack_budgets`` does."""
    E, V, n, nt, g, R = E_SD, V_SD, P["images_per_concept"], P["table_images"], P["grid"], P["n_ref"]
    cap, name = P["sd_cap"] or gcirs.Settings().cap, P["name"]
    full, ci = name == "full", name == "ci"
    inv = P["sd_cap"] or methods.ATTACK_BUDGETS["sd"]["inversion"]["steps"]
    ps = methods.ATTACK_BUDGETS["sd"]["prompt_search"]
    search = 1 * P["sd_cap"] if P["sd_cap"] else ps["tokens"] * ps["sweeps"] * ps["candidates"]
    # notebook 06: every method in full (TRAIN_ALL), else all but G-CiRs, ESD, Ablating, All-but-One; 2 classes unless
    # full; UCE's erase-weight sweep (5 values in ci, else 8; e = 1 reuses the table); 3 concepts by 2 or 4 closed forms
    live6, cls6, sweep6 = (10 if full else 6), (V if full else 2), (5 if ci else 8)
    cls3, m3 = (V if full else 4), (4 if full else 2)
    ft6 = (1000 + 1000 + 200 + 35 + 200) if full else cap  # G-CiRs, ESD-x, Ablating, FMN, All-but-One | FMN at the cap
    strengths5 = 4 if ci else 7
    row = dict(images=0, refs=0, sepme=0, gcirs=0, solves=0, inversion=0, search=0)
    return {k: dict(row, **v) for k, v in {
        "00_setup_and_tour": dict(images=V * g + 8 + 5 * n + V * n, refs=E * g),
        "01_diffusion_basics": dict(images=4 * n + 5, refs=E * 8, gcirs=P["sd_cap"] or 60),
        "02_gcirs_correlation_loss": dict(images=16 + 2 * V * n, refs=E * R, gcirs=2 * cap),
        "03_weight_decoupling_nullspace": dict(images=8 * 4 + 2 ** E * V * nt, refs=E * R, sepme=3 * cap + 2 * 20),
        "04_iterative_erasure_and_restoration": dict(images=8 * 4 + 4 * V * n + 5 * n, refs=E * R, sepme=2 * cap,
                                                     gcirs=cap),
        "05_interactive_combination": dict(images=3 * n + strengths5 * 4 * n + 16, refs=E * R, sepme=3 * cap),
        "06_relatives_closed_form_and_baselines": dict(
            images=cls6 * n + live6 * (cls6 + 1) * n + (1 + live6) * 3 + (sweep6 - 1) * cls6 * n + m3 * cls3 * n,
            refs=(1 + E) * R, sepme=cap, gcirs=ft6, solves=4 + sweep6 - 1 + 4 + 1 + m3),
        "07_evaluation_and_reproduction": dict(images=V * n + 2 ** E * V * nt + 24, refs=E * R, sepme=3 * cap),
        # notebook 08: 5 judged classes x table_images, for the original, 3 + 3 + 3 increments and the 2-point curve
        "08_beyond_prompt_level_separability": dict(images=(1 + 9 + 3) * 5 * nt + 12, refs=E * R, sepme=8 * cap,
                                                    solves=3),
        # notebook 09: derived, plain, inversion, search + its ceiling, inversion of robust SepME, its table (3 x n)
        "09_erased_or_hidden": dict(images=9 * n + 6, refs=E * R, sepme=3 * cap + 2 * cap,
                                    inversion=10 + 3 * inv, search=2 * search),
    }.items()}


def notebook_estimates(rows: dict, profile: str) -> list[dict]:
    """Each notebook's seconds and peak on the device of ``rows`` (formula in ``basis``). Inversion steps are
    counted as SepME steps (both: a UNet pass with gradients back through it; an upper bound) and a prompt-search
    evaluation (4 x_t) as two ``unet_forward`` rows."""
    P = config.profile(profile, "sd")
    img = _image_s(rows, P["sample_steps"])
    step, gstep = rows["train_sepme"]["seconds"], rows["train_gcirs"]["seconds"]
    solve, fwd = max(rows[m]["seconds"] for m in ("uce", "rece", "speed")), rows["unet_forward"]["seconds"]
    out = []
    for nb, c in notebook_counts(P).items():
        secs = (rows["load"]["seconds"] + (c["images"] + c["refs"]) * img + (c["sepme"] + c["inversion"]) * step
                + c["gcirs"] * gstep + c["solves"] * solve + c["search"] * 2 * fwd)
        peaks = [rows["ddim_image"]["peak_mem_gib"]] + ([rows["train_sepme"]["peak_mem_gib"]] if c["sepme"] +
                                                        c["inversion"] else [])
        peaks += [rows["train_gcirs"]["peak_mem_gib"]] if c["gcirs"] else []
        out.append(dict(notebook=nb, profile=profile, measured=False, seconds=secs, hours=secs / 3600,
                        peak_mem_gib=max(peaks), images=c["images"] + c["refs"], train_steps=c["sepme"] + c["gcirs"],
                        closed_form_solves=c["solves"], inversion_steps=c["inversion"], search_evaluations=c["search"],
                        basis=f"load + {c['images'] + c['refs']} images x {img:.3g} s ({P['sample_steps']} steps) + "
                              f"{c['sepme']} SepME + {c['inversion']} inversion steps x {step:.3g} s + {c['gcirs']} "
                              f"G-CiRs/fine-tuning steps x {gstep:.3g} s + {c['solves']} solves x {solve:.3g} s + "
                              f"{c['search']} search evaluations x 2 x {fwd:.3g} s"))
    return out


# --------------------------------------------------------------------------------------------------- driver
def environment(device: torch.device) -> dict:
    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = dict(version=config.VERSION, torch=torch.__version__, diffusers=diffusers.__version__,
               transformers=transformers.__version__, python=platform.python_version(), cpu=cpu,
               torch_threads=torch.get_num_threads(), omp_threads=os.environ.get("OMP_NUM_THREADS"))
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def gpu_path(model_path: str, device=None, dtype=None, isolate: bool = True, repeats: int = 3, slow_s: float = 60.0,
             steps: int = 2, images: int | None = None, ops=OPS, progress=None) -> dict:
    """Every row of :data:`OPS` (or of ``ops``, names or one comma-separated string; each in its own subprocess when
    ``isolate``), the derived rows and the notebook estimates for every profile (``config.PROFILES``; all ops needed),
    and the capacity table (``nullspace.capacity_rows``)."""
    dev = config.get_device(device)
    if dtype is None:
        dtype = config.default_dtype(model_path, dev)
    if dtype in ("fp32", "float32"):
        dtype = None
    if dtype is not None and dev.type != "cuda":
        raise BadValue(f"--dtype {dtype} is for a CUDA GPU; on {dev.type} the models run in fp32: pass --dtype fp32 "
                       "(or leave it out), or --device cuda on a GPU machine")
    if not Path(model_path).expanduser().exists():
        raise BadValue(f"--model {model_path!r} is not a folder here; build the full-size random SD 1.4 with "
                       "`python -m sepme_lib.random_sd DIR --size full` and pass DIR/pipeline (or a real SD folder)")
    ops = tuple(o.strip() for o in ops.split(",") if o.strip()) if isinstance(ops, str) else tuple(ops)
    bad = [o for o in ops if o not in OPS]
    if bad or not ops:
        raise BadValue(f"--ops: unknown or empty {bad or ops!r}; choose from {', '.join(OPS)}")
    kw = dict(repeats=repeats, slow_s=slow_s, steps=steps, images=images)
    rows, failed = {}, []
    for op in ops:
        t0 = time.time()
        try:
            rows[op] = (measure_isolated(op, model_path, str(dev), dtype, **kw) if isolate
                        else measure(op, model_path, dev, dtype, **kw))
        except RuntimeError as e:  # an op that fails (killed for memory: exit -9) is recorded; the others are kept
            if not isolate:
                raise
            failed.append(dict(op=op, error=str(e).splitlines()[0][:300], wall_s=round(time.time() - t0)))
            if progress:
                progress(f"{op}: FAILED ({failed[-1]['error']})")
            continue
        if progress:
            progress(f"{op}: {rows[op]['seconds']:.3g} s, {rows[op]['peak_mem_gib']:.3g} GiB "
                     f"({time.time() - t0:.0f} s wall)")
    out = dict(model=str(model_path), family=families.model_family(str(model_path)).name, device=str(dev),
               dtype=dtype or "fp32", **environment(dev),
               memory="fresh subprocess per op" if isolate else "one process (CPU peak reset per op)",
               rows=list(rows.values()), failed=failed)
    if all(o in rows for o in OPS):
        for p in config.PROFILES:
            out["rows"] += derived(rows, p)
        out["notebooks"] = [e for p in config.PROFILES for e in notebook_estimates(rows, p)]
    out["capacity"] = nullspace.capacity_rows()
    return out


def markdown(res: dict) -> str:
    lines = [f"gpu-path on {res['device']} ({res.get('gpu') or res['cpu']}, {res['torch_threads']} threads), "
             f"{res['dtype']}, model {res['model']}", "", "| op | seconds | peak GiB | measured | basis |",
             "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['op']} | {r['seconds']:.4g} | {r['peak_mem_gib']:.3g} | "
                     f"{'extrapolated' if r.get('extrapolated') else r['measured']} | {r.get('basis', '')} |")
    lines += [f"| {f['op']} | failed | | | {f['error']} |" for f in res.get("failed", [])]
    if res.get("notebooks"):
        lines += ["", "| notebook | profile | estimated hours | peak GiB | images | training steps |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {e['notebook']} | {e['profile']} | {e['hours']:.3g} | {e['peak_mem_gib']:.3g} | {e['images']} | "
                  f"{e['train_steps']} |" for e in res["notebooks"]]
    lines += ["", nullspace.capacity_markdown(res["capacity"])]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m sepme_lib.gpupath", description="one gpu-path row (JSON)")
    ap.add_argument("--op", choices=OPS, required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None)
    ap.add_argument("--repeats", type=config.positive_int, default=3)
    ap.add_argument("--slow-s", type=float, default=60.0)
    ap.add_argument("--steps", type=config.positive_int, default=2)
    ap.add_argument("--images", type=config.positive_int, default=None)
    a = ap.parse_args(argv)
    print(json.dumps(measure(a.op, a.model, a.device, None if a.dtype == "fp32" else a.dtype, a.repeats, a.slow_s,
                             a.steps, a.images), default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
