"""Top layer -- the command line: ``python -m sepme_lib <command>`` or ``sepme <command>``.

* ``erase``    -- erase concepts with any method of the library and write one diffusers LoRA folder per increment
  (weights + model card); resumes from its last saved step when killed and restarted with the same ``--out``.
* ``generate`` -- images of ``theta + sum_i s_i dTheta_i`` (``--lora DIR:s ...``) for prompts x seeds, and a contact
  sheet.
* ``evaluate`` -- the paper-style ACC table (every combination of the given adapters; markdown + JSON), sharded
  across processes/GPUs when started by ``accelerate launch`` (``scaleout.py``).

Every command checks its input before loading the model (a clear error and exit status 2), shows progress, takes
``--device`` and ``--dtype`` (``fp16``/``bf16`` on CUDA), and prints its time and peak memory. The README's section
"Deltas as LoRA adapters, and the command line" shows each command with its measured time.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from . import config, families, methods, sepme
from .adapters import AdapterUNet
from .checkpoint import Checkpoint
from .classifier import load_classifier
from .concepts import CONCEPT_SETS
from .config import SepmeError
from .deltas import Delta, edited_weights, same_tensors
from .evaluate import acc_table
from .lora import WEIGHTS, adapter_name, model_card, write
from .loading import load_model, resolve_dtype
from .scaleout import TABLES, evaluation_table, peak_memory, shard_from_environment, table_markdown
from .storage import FolderLock


class InputError(SepmeError, ValueError):
    """Bad command-line input, found before the model is loaded."""


# ------------------------------------------------------------------------------------------ parsing helpers
MAX_SEEDS = 10_000  # seeds per command: 10k images of a prompt are already hours of sampling on Stable Diffusion
MAX_SEED = 2**63 - 1  # torch's generator seeds are 64-bit


def parse_seeds(text: str) -> list[int]:
    """``"0-49"`` (inclusive), ``"0,3,7"``, ``"5"`` or a mix (``"0-3,10"``) -> seeds; refuses ``"5-2"``, negatives,
    seeds above 2**63 - 1 and more than :data:`MAX_SEEDS` seeds (checked before the range is expanded)."""
    seeds = []
    for part in str(text).replace(" ", "").split(","):
        try:
            if "-" in part.lstrip("-"):
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise InputError(f"--seeds {text!r}: the range {part!r} runs backwards; write {hi}-{lo}")
                if hi - lo + 1 + len(seeds) > MAX_SEEDS:
                    raise InputError(f"--seeds {text!r}: {hi - lo + 1} seeds in {part!r}, more than {MAX_SEEDS} per "
                                     "command; split the range over several runs")
                seeds += range(lo, hi + 1)
            else:
                seeds.append(int(part))
        except ValueError as e:
            if isinstance(e, InputError):
                raise
            raise InputError(f"--seeds {text!r}: {part!r} is not a seed; use e.g. 0-49 or 0,3,7") from None
    if any(s < 0 for s in seeds):
        raise InputError(f"--seeds {text!r}: seeds must be >= 0")
    if any(s > MAX_SEED for s in seeds):
        raise InputError(f"--seeds {text!r}: seeds must be at most 2**63 - 1 = {MAX_SEED}")
    if len(seeds) > MAX_SEEDS:
        raise InputError(f"--seeds {text!r}: {len(seeds)} seeds, more than {MAX_SEEDS} per command; split them")
    if len(set(seeds)) != len(seeds):
        raise InputError(f"--seeds {text!r}: a seed repeats")
    return seeds


def parse_lora(spec: str) -> tuple[Path, float]:
    """``"DIR"`` or ``"DIR:SCALE"`` -> (folder, scale); the folder must hold a LoRA file, the scale a finite number."""
    path, scale = Path(spec), 1.0
    if not path.exists() and ":" in spec:
        head, tail = spec.rsplit(":", 1)
        try:
            scale = float(tail)
        except ValueError:
            raise InputError(f"--lora {spec!r}: the scale {tail!r} is not a number; write DIR:0.5") from None
        if not math.isfinite(scale):
            raise InputError(f"--lora {spec!r}: the scale is {scale}; scales must be finite numbers")
        path = Path(head)
    if not path.is_dir():
        raise InputError(f"--lora {spec!r}: no folder {path}")
    if not (path / WEIGHTS).exists():
        raise InputError(f"--lora {spec!r}: {path} has no {WEIGHTS} (write one with `sepme erase`)")
    return path, scale


def check_concepts(family: str, names) -> None:
    """Refuse a concept that ``family``'s concept set does not have (the message lists the ones it has)."""
    for c in names:
        try:
            CONCEPT_SETS[family].check(c)
        except ValueError as e:
            raise InputError(str(e)) from None


def parse_settings(items, method: str) -> tuple[dict, dict]:
    """``KEY=VALUE`` pairs -> (settings, arguments) of ``method`` (values read as Python literals, else strings)."""
    settings, args = {}, {}
    for item in items or []:
        if "=" not in item:
            raise InputError(f"--set {item!r}: write KEY=VALUE (e.g. --set cap=50 lr=0.01)")
        key, raw = item.split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        (args if key in methods.ARGUMENTS[method] else settings)[key] = value
    return settings, args


def parse_prompts(items) -> list[str]:
    """One argument naming an existing file -> its non-empty lines (``#`` comments skipped); else the arguments."""
    items = list(items or [])
    if len(items) == 1 and Path(items[0]).is_file():
        lines = [x.strip() for x in Path(items[0]).read_text().splitlines()]
        items = [x for x in lines if x and not x.startswith("#")]
        if not items:
            raise InputError("--prompts: the file holds no prompts")
    return items


def check_out(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise InputError(f"--out {path}: {p} is a file; give a folder")
    return path


def check_model(name: str) -> str:
    """``"tiny"`` or an SD 1.x folder/hub id: a path that exists must be a diffusers pipeline folder."""
    p = Path(name).expanduser()
    if name != "tiny" and name.strip().lower() == "tiny":
        raise InputError(f"--model {name}: the bundled model is spelled 'tiny' (lower case)")
    if name != "tiny" and p.exists() and not (p / "model_index.json").exists():
        raise InputError(f"--model {name}: not a diffusers pipeline folder (no model_index.json); give 'tiny', a "
                         "Stable Diffusion 1.x folder or a hub id")
    if name != "tiny" and not p.exists() and name.startswith((".", "/", "~")):
        raise InputError(f"--model {name}: no such folder")
    return families.model_family(name).name


def check_common(args) -> None:
    """Device, dtype, model and judge checks shared by every command (before any loading)."""
    try:
        args.dev = config.get_device(args.device) if args.device else config.get_device()
        args.family = check_model(args.model)
        env = config.default_dtype(args.model, args.dev) if os.environ.get("SEPME_DTYPE", "").strip() else None
        flag = "--dtype" if args.dtype is not None or env is None else "SEPME_DTYPE"  # the flag wins over $SEPME_DTYPE
        args.dtype = args.dtype if args.dtype is not None else env
        args.dt = resolve_dtype(args.dtype, args.dev)
    except (ValueError, RuntimeError) as e:
        msg = str(e)
        if "dtype" in msg.lower() and not msg.startswith("SEPME_DTYPE"):
            msg = f"{flag} {args.dtype}: {msg}"
        raise InputError(msg) from None
    if families.get(args.family).float32_only and args.dt is not None:
        raise InputError(f"{flag} {args.dtype}: {families.get(args.family).title} runs in float32; "
                         + ("drop --dtype" if flag == "--dtype" else "unset SEPME_DTYPE (or set it to fp32)"))
    if getattr(args, "judge", None) and not Path(args.judge).exists():
        raise InputError(f"--judge {args.judge}: no such file or folder")
    if getattr(args, "judge", None) and families.get(args.family).judge == "classifier":  # refused before loading
        try:
            load_classifier(path=args.judge, device=torch.device("cpu"))
        except SepmeError as e:
            raise InputError(f"--judge {args.judge}: {e}") from None
    if getattr(args, "seed", None) is not None and not 0 <= args.seed <= MAX_SEED:
        raise InputError(f"--seed {args.seed}: the first seed must be a whole number in 0..2**63 - 1")
    if getattr(args, "guidance", None) is not None and (not math.isfinite(args.guidance) or abs(args.guidance) > 1e3):
        raise InputError(f"--guidance {args.guidance}: give a finite guidance scale of at most 1000 (7.5 is usual)")
    if getattr(args, "steps", None) is not None and args.steps > 1000:
        raise InputError(f"--steps {args.steps}: at most 1000 DDIM steps (the model's training schedule has 1000)")


# ------------------------------------------------------------------------------------------ loading
def _load(args):
    t0 = time.time()
    model = load_model(args.model, device=args.dev, dtype=args.dt)
    print(f"model {args.model} ({model.family}) on {model.device}, {model.unet.dtype}: {time.time() - t0:.1f} s",
          flush=True)
    return model


def _judge(args, model):
    return load_classifier(path=args.judge, device=model.device, model=model)


def _deltas(args, model) -> tuple[list, list]:
    deltas, scales = [], []
    for path, scale in args.loras:
        try:
            d = Delta.from_lora(path, device=model.device, base=model.fingerprint())
            d.check_base(model)
        except SepmeError as e:
            raise InputError(f"--lora {path}: {e}") from None
        deltas.append(d)
        scales.append(scale)
    names = [d.name for d in deltas]
    if len(set(names)) != len(names):
        raise InputError(f"--lora: two folders hold the same concept ({names}); give each once with its scale")
    for i, a in enumerate(deltas):
        for j, b in enumerate(deltas[:i]):
            if same_tensors(a, b):
                raise InputError(f"--lora: {args.loras[j][0]} and {args.loras[i][0]} hold the same adapter (one is a "
                                 "copy); it would be applied twice. Give it once, with its scale (DIR:2)")
    return deltas, scales


def batch_size(args) -> int:
    """Images per sampling batch: ``--batch``, else the family's ``cli_batch``: 16 on the bundled model and 4 on Stable
    Diffusion (512 x 512 with guidance doubles the UNet batch: 8 latents of 64 x 64 fit a 16 GB GPU in fp16)."""
    return args.batch or families.get(args.family).cli_batch


def _finish(t0, device):
    print(f"done in {time.time() - t0:.1f} s; peak memory {peak_memory(device)}", flush=True)


# ------------------------------------------------------------------------------------------ commands
def erase(args) -> int:
    """``sepme erase``: train, export every increment as a LoRA folder with its model card, print the cost."""
    try:
        methods.check_method(args.method)
    except ValueError as e:
        raise InputError(str(e)) from None
    settings, extra = parse_settings(args.set, args.method)
    if args.method == "sepme":
        extra["mode"] = args.mode
    elif args.mode != "separate":
        raise InputError(f"--mode is SepME's (separate, joint, iterative); {args.method} has none")
    check_concepts(args.family, args.concepts)
    if len(set(args.concepts)) != len(args.concepts):
        raise InputError(f"--concepts {args.concepts}: a concept repeats")
    try:
        methods.settings(args.method, args.family, **settings)
    except ValueError as e:
        raise InputError(str(e)) from None
    out = check_out(args.out)
    with FolderLock(out, "--out", InputError):
        return _erase_locked(args, out, settings, extra)


def _erase_locked(args, out: Path, settings: dict, extra: dict) -> int:
    """``sepme erase`` while holding the lock of ``--out`` (a second run into the same folder is refused)."""
    run = dict(model=args.model, concepts=args.concepts, method=args.method, mode=args.mode, settings=settings,
               arguments=extra, n_ref=args.n_ref)
    record = out / "erase_run.json"
    if args.restart and out.exists():
        shutil.rmtree(out / ".checkpoints", ignore_errors=True)
        record.unlink(missing_ok=True)
    if record.exists() and json.loads(record.read_text()) != json.loads(json.dumps(run)):
        raise InputError(f"--out {out} holds another run ({record.read_text().strip()}); use another --out, or "
                         "--restart to start over there")
    t0 = time.time()
    model = _load(args)
    judge = _judge(args, model) if args.eval_images else None
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(run, indent=1))
    ck = Checkpoint(out / ".checkpoints", every=args.checkpoint_every, stop_after=args.stop_after_step)
    deltas = methods.erase(model, args.concepts, method=args.method, progress=not args.quiet, n_ref=args.n_ref,
                           checkpoint=ck, **settings, **extra)
    acc = None
    if args.eval_images:
        cs = CONCEPT_SETS[args.family]
        cols = list(cs.evaluate) if all(c in cs.evaluate for c in args.concepts) else list(args.concepts)
        combos = [("original", [])] + [(f"+ {d.name}", [d]) for d in deltas]
        combos += [("+ all", deltas)] if len(deltas) > 1 else []
        rows = [dict(model=name, **acc_table(model, judge, cols, args.eval_images, deltas=ds)) for name, ds in combos]
        acc = dict(columns=["model"] + cols, rows=rows, caption=f"ACC of the run ({args.eval_images} images per "
                   f"concept, seeds 0..{args.eval_images - 1}, {model.sample_steps} DDIM steps).")
    for d in deltas:
        folder = out / adapter_name(d.name)
        exp = d.to_lora(args.rank, args.rtol, model)
        write(exp, folder, model_card(exp, acc, args.model))
        steps = f", {d.info['steps']} steps" if d.info.get("steps") else ""
        print(f"{folder}: {exp.summary()}; {d.method}{steps}", flush=True)
    (out / "erase_summary.json").write_text(json.dumps(dict(run, folders=[adapter_name(d.name) for d in deltas],
                                                            acc=acc, seconds=round(time.time() - t0, 1)), indent=1))
    _finish(t0, model.device)
    return 0


def contact_sheet(images, prompts, seeds, tile: int = 96) -> Image.Image:
    """One row per prompt (its text on the left), one column per seed; ``images`` ``(P*S, 3, H, W)`` in [0, 1]."""
    n_p, n_s = len(prompts), len(seeds)
    label = 220
    sheet = Image.new("RGB", (label + n_s * (tile + 2), 14 + n_p * (tile + 2)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, s in enumerate(seeds):
        draw.text((label + j * (tile + 2) + 2, 1), f"seed {s}", fill="black")
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    for i, p in enumerate(prompts):
        draw.text((2, 14 + i * (tile + 2) + tile // 2 - 6), p[:34], fill="black")
        for j in range(n_s):
            img = Image.fromarray(arr[i * n_s + j]).resize((tile, tile), Image.NEAREST)
            sheet.paste(img, (label + j * (tile + 2), 14 + i * (tile + 2)))
    return sheet


def generate(args) -> int:
    """``sepme generate``: images of the combined model for prompts x seeds, one PNG each, and a contact sheet."""
    args.loras = [parse_lora(s) for s in args.lora or []]
    prompts, seeds = parse_prompts(args.prompts), parse_seeds(args.seeds)
    if not prompts:
        raise InputError("--prompts: give prompt texts or a file with one prompt per line")
    out = check_out(args.out)
    t0 = time.time()
    model = _load(args)
    deltas, scales = _deltas(args, model)
    adapters = AdapterUNet(model.unet, deltas) if deltas and args.backend == "diffusers" else None
    weights = edited_weights(model, deltas, scales) if deltas and adapters is None else None
    out.mkdir(parents=True, exist_ok=True)
    images, files = [], []
    for i, p in enumerate(tqdm(prompts, desc="generate", disable=args.quiet)):
        if adapters is not None:
            with adapters.active(model, scales):
                imgs = model.sample([p] * len(seeds), seeds=seeds, steps=args.steps, guidance=args.guidance,
                                    batch_size=batch_size(args))
        else:
            imgs = model.sample([p] * len(seeds), seeds=seeds, steps=args.steps, guidance=args.guidance,
                                weights=weights, batch_size=batch_size(args))
        for s, img in zip(seeds, imgs):
            name = f"p{i:03d}_seed{s}.png"
            Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(out / name)
            files.append(dict(prompt=p, seed=s, file=name))
        images.append(imgs)
    contact_sheet(torch.cat(images), prompts, seeds).save(out / "contact_sheet.png")
    (out / "images.json").write_text(json.dumps(dict(model=args.model, loras=[dict(folder=str(f), scale=s) for f, s in
                                                                               args.loras], backend=args.backend,
                                                     steps=args.steps or model.sample_steps, files=files), indent=1))
    print(f"{len(files)} images and contact_sheet.png in {out}")
    _finish(t0, model.device)
    return 0


def evaluate(args) -> int:
    """``sepme evaluate``: the paper-style table (markdown + JSON), sharded when launched by accelerate."""
    args.loras = [parse_lora(s) for s in args.lora or []]
    if args.table not in TABLES:
        raise InputError(f"--table {args.table!r}: use one of {TABLES}")
    if args.concepts:
        check_concepts(args.family, args.concepts)
    out = check_out(args.out)
    t0 = time.time()
    shard = shard_from_environment(args.dev)
    model = load_model(args.model, device=shard.device, dtype=args.dt)
    judge = _judge(args, model)
    deltas, scales = _deltas(args, model)
    res = evaluation_table(model, judge, deltas, scales, args.concepts, args.images, args.seed, args.steps,
                           args.guidance, args.table, batch_size(args), shard, progress=not args.quiet)
    if res is None:  # not the main process
        return 0
    out.mkdir(parents=True, exist_ok=True)
    md = table_markdown(res)
    (out / "table.md").write_text(md + "\n")
    (out / "table.json").write_text(json.dumps(res, indent=1))
    print(md)
    print(f"\n{len(res['rows']) + 1} rows x {len(res['concepts'])} concepts x {args.images} images on "
          f"{res['run']['processes']} process(es); {out}/table.md and table.json; memory per process: "
          + "; ".join(f"{k} {v}" for k, v in res["run"]["memory"].items()))
    _finish(t0, model.device)
    return 0


# ------------------------------------------------------------------------------------------ the parser
def _common(p):
    p.add_argument("--model", required=True, help="'tiny' (the bundled model), a Stable Diffusion 1.x folder or hub id")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: CUDA if available, else CPU)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="fp16/bf16: Stable Diffusion on CUDA only")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _sampling(p):
    p.add_argument("--lora", nargs="*", default=[], metavar="DIR[:SCALE]", help="LoRA folders with their scale s_i")
    p.add_argument("--steps", type=config.positive_int, help="DDIM steps (default: the model's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance (default: the model's)")
    p.add_argument("--batch", type=config.positive_int, help="images per batch (default 16 tiny, 4 Stable Diffusion)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sepme", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    e = sub.add_parser("erase", help="erase concepts; one LoRA folder per increment")
    _common(e)
    e.add_argument("--concepts", nargs="+", required=True, help="concept names of the model's concept set")
    e.add_argument("--method", default="sepme", help=f"one of {', '.join(methods.METHODS)}")
    e.add_argument("--mode", default="separate", choices=sepme.MODES, help="SepME's mode")
    e.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="settings/arguments of the method (methods.DEFAULTS)")
    e.add_argument("--n-ref", type=config.positive_int, default=64, help="reference images per concept")
    e.add_argument("--rank", type=config.positive_int, help="truncate each LoRA to this rank (default: exact)")
    e.add_argument("--rtol", type=float, help="truncate singular values <= rtol * s_max (default: exact)")
    e.add_argument("--eval-images", type=int, default=8, help="images per concept of the card's ACC table (0: none)")
    e.add_argument("--judge", help="the judge: a CLIP folder for Stable Diffusion (default: $SEPME_CLIP / bundled)")
    e.add_argument("--checkpoint-every", type=config.positive_int, default=10, help="save the state every N steps")
    e.add_argument("--restart", action="store_true", help="discard a previous run's checkpoints in --out")
    e.add_argument("--stop-after-step", type=config.positive_int, help=argparse.SUPPRESS)  # tests: a simulated kill
    g = sub.add_parser("generate", help="images of theta + sum s_i dTheta_i and a contact sheet")
    _common(g)
    _sampling(g)
    g.add_argument("--prompts", nargs="+", required=True, help="prompt texts, or one file with a prompt per line")
    g.add_argument("--seeds", default="0-3", help="e.g. 0-49, 0,3,7 (default 0-3)")
    g.add_argument("--backend", choices=("library", "diffusers"), default="library",
                   help="combine with the library or with diffusers' set_adapters (same images)")
    v = sub.add_parser("evaluate", help="the paper-style ACC table of every combination (accelerate: sharded)")
    _common(v)
    _sampling(v)
    v.add_argument("--table", default="paper", help="paper: every combination; combination: the given one")
    v.add_argument("--images", type=config.positive_int, default=50, help="images per concept (the paper: 50)")
    v.add_argument("--seed", type=int, default=0, help="first seed")
    v.add_argument("--concepts", nargs="*", help="evaluated concepts (default: the concept set's classes)")
    v.add_argument("--judge", help="the judge: a CLIP folder for Stable Diffusion (default: $SEPME_CLIP / bundled)")
    return ap


COMMANDS = {"erase": erase, "generate": generate, "evaluate": evaluate}


def main(argv=None) -> int:
    """Entry point of ``sepme`` and ``python -m sepme_lib``; returns the exit status (2: bad input)."""
    args = parser().parse_args(argv)
    try:
        check_common(args)
        if args.command == "erase" and (args.eval_images < 0 or (args.rtol is not None and not 0 <= args.rtol < 1)):
            raise InputError("--eval-images must be >= 0 and --rtol in [0, 1)")
        return COMMANDS[args.command](args)
    except InputError as e:
        print(f"sepme {args.command}: error: {e}", file=sys.stderr)
        return 2
