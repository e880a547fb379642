"""Train the bundled tiny text-to-image model from scratch: ``python -m sepme_lib.train_tiny``.

Recipe (chosen from measurements on 2 CPU cores, see README "The bundled model"): 4x4-patchified pixels,
v-prediction with min-SNR-5 loss weights, AdamW 1e-3 with linear warm-up, batch 32, EMA 0.999, text
encoder trained jointly, 10% empty captions for classifier-free guidance. Seeded and resumable: every
``--checkpoint-minutes`` it writes the full training state to ``--state`` and exports the EMA weights in
diffusers / transformers layout to ``--out`` (``data/tiny_t2i``). Run it again to continue.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel
from torch.func import functional_call
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from . import config, world

TINY_TOKENS = 16  # tokenizer length of the bundled model: short, so that null spaces stay wide


# ------------------------------------------------------------------------------------ training loss
def diffusion_loss(unet, alphas_cumprod, x0, emb, t, noise, prediction_type="v_prediction", snr_gamma=None,
                   weights=None):
    """The denoising loss the model is trained with (notebook 01): ``x_t = sqrt(abar) x_0 + sqrt(1-abar) eps``
    and ``|| out(x_t, c, t) - target ||^2`` with target ``eps`` (epsilon) or ``v = sqrt(abar) eps -
    sqrt(1-abar) x_0`` (v_prediction). ``snr_gamma`` applies min-SNR weights ``min(SNR, g) / (SNR + 1)``
    (for v-prediction) or ``min(SNR, g) / SNR`` (for epsilon). ``weights``: parameters by name that replace the
    UNet's (``torch.func.functional_call``), so that notebook 01 can train a few of them on any model, Stable
    Diffusion included, without copying the UNet; inputs are cast to the UNet's dtype and the output back to
    float32 (no-ops for the float32 bundled model). ``unet``: a diffusers UNet, or a ``T2IModel`` (its UNet is run
    with the inputs the model's conditions need, ``T2IModel.unet_inputs``: SDXL's pooled embedding and time ids)."""
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    if prediction_type == "v_prediction":
        target = a.sqrt() * noise - (1 - a).sqrt() * x0
    elif prediction_type == "epsilon":
        target = noise
    else:
        raise ValueError(f"unsupported prediction type {prediction_type!r}")
    if hasattr(unet, "unet_inputs"):  # a T2IModel
        kwargs, unet = unet.unet_inputs(emb.to(unet.unet.dtype)), unet.unet
    else:
        kwargs = {"encoder_hidden_states": emb.to(unet.dtype)}
    dt = unet.dtype
    if weights:
        pred = functional_call(unet, weights, (xt.to(dt), t), kwargs, strict=False)
    else:
        pred = unet(xt.to(dt), t, **kwargs)
    pred = pred.sample.float()
    per = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    if snr_gamma:
        snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
        w = torch.clamp(snr, max=snr_gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
        per = w * per
    return per.mean()


# ------------------------------------------------------------------------------------ the tiny model's parts
def tiny_tokenizer_files(words, directory: Path) -> None:
    """Write ``vocab.json``/``merges.txt`` of a CLIP BPE tokenizer in which each world word is one token.

    Single letters (and letter + ``</w>``) are in the vocabulary too, so an unknown word is spelled out
    letter by letter rather than lost (and :meth:`T2IModel.check_prompt` warns about it).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab: dict = {}

    def add(tok):
        vocab.setdefault(tok, len(vocab))

    for t in ("<|startoftext|>", "<|endoftext|>"):
        add(t)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    for c in letters:
        add(c)
    for c in letters:
        add(c + "</w>")
    # Each word is merged left to right: (w[0], w[1]), (w[:2], w[2]), ... BPE applies the lowest-ranked merge present.
    # Merges whose left side is a prefix of two or more letters come first (they only apply once their word has
    # started merging); then the first-pair merges, ordered so that each word's own first pair ranks before every
    # other first pair found inside it ("tr" of "triangle" inside "striped"): a topological order of that relation.
    chain, first, inside = [], {}, {}
    for w in sorted(words):
        sym = list(w[:-1]) + [w[-1] + "</w>"]
        cur = sym[0]
        for k, s in enumerate(sym[1:]):
            if k == 0:
                first.setdefault((cur, s), set())
            elif (cur, s) not in chain:
                chain.append((cur, s))
            cur += s
            add(cur)
        if len(sym) > 1:
            inside[(sym[0], sym[1])] = inside.get((sym[0], sym[1]), set()) | set(zip(sym[1:], sym[2:]))
    for pair, later in inside.items():  # pair must rank before every first pair occurring later in its word
        for q in later:
            if q in first and q != pair:
                first[q].add(pair)
    ordered, done = [], set()
    while len(ordered) < len(first):
        ready = sorted(m for m in first if m not in done and first[m] <= done) or sorted(set(first) - done)[:1]
        ordered += ready
        done.update(ready)
    merges = chain + ordered
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": TINY_TOKENS, "pad_token": "<|endoftext|>", "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer"}))


def tiny_configs(vocab_size: int) -> dict:
    """Configs of the bundled model (4x4 patches -> 8x8x48; text width 256 keeps null spaces wide)."""
    unet = dict(
        sample_size=8, in_channels=48, out_channels=48, layers_per_block=2, block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=256, attention_head_dim=8, norm_num_groups=32,
    )
    text = dict(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=TINY_TOKENS, bos_token_id=0, eos_token_id=1,
        pad_token_id=1, projection_dim=256,
    )
    scheduler = dict(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
        clip_sample=True, set_alpha_to_one=False, steps_offset=0, timestep_spacing="trailing",
    )
    return dict(unet=unet, text=text, scheduler=scheduler)


def build_tiny(directory=None, seed: int = 0):
    """Fresh random-weight parts of the bundled model (for training): unet, text_encoder, tokenizer, sched."""
    directory = Path(directory or config.TINY_DIR)
    tiny_tokenizer_files(world.VOCABULARY, directory / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(directory / "tokenizer")
    cfg = tiny_configs(len(tok))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg["unet"])
    text = CLIPTextModel(CLIPTextConfig(**cfg["text"]))
    sched = DDIMScheduler(**cfg["scheduler"])
    return unet, text, tok, sched


def export(unet, text, tok, sched, out: Path, meta: dict) -> None:
    """Write the model in the layout ``load_tiny`` reads (safetensors + configs + tokenizer files)."""
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet")
    text.save_pretrained(out / "text_encoder")
    tok.save_pretrained(out / "tokenizer")
    sched.save_pretrained(out / "scheduler")
    (out / "training.json").write_text(json.dumps(meta, indent=1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=config.TINY_DIR)
    ap.add_argument("--state", type=Path, default=config.ROOT / "build" / "tiny_train_state.pt")
    ap.add_argument("--minutes", type=float, default=90.0, help="stop after this much wall time (this run)")
    ap.add_argument("--max-steps", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--snr-gamma", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint-minutes", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--log", type=Path, default=None, help="append progress lines here too")
    ap.add_argument("--from-export", action="store_true",
                    help="without a state file, continue from the exported weights in --out (fresh optimizer): "
                         "how a new machine continues the committed model")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = config.get_device()

    unet, text, tok, sched = build_tiny(args.out, seed=args.seed)
    unet.to(device).train()
    text.to(device).train()
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    step, seconds, history = 0, 0.0, []
    rng = np.random.default_rng(args.seed)
    if args.state.exists():
        st = torch.load(args.state, map_location=device, weights_only=False)
        unet.load_state_dict(st["unet"]), text.load_state_dict(st["text"])
        ema_unet.load_state_dict(st["ema_unet"]), ema_text.load_state_dict(st["ema_text"])
        opt.load_state_dict(st["opt"])
        step, seconds, history = st["step"], st["seconds"], st["history"]
        rng = np.random.default_rng(args.seed + step)  # fresh, deterministic stream after a resume
        torch.manual_seed(args.seed + step)
        print(f"resumed from {args.state} at step {step} ({seconds / 60:.1f} min trained)")
    elif args.from_export:
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(args.out / "unet").state_dict())
        text.load_state_dict(CLIPTextModel.from_pretrained(args.out / "text_encoder").state_dict())
        ema_unet.load_state_dict(unet.state_dict()), ema_text.load_state_dict(text.state_dict())
        meta = json.loads((args.out / "training.json").read_text())
        step, seconds, history = meta["step"], meta["minutes"] * 60, meta.get("history", [])
        rng = np.random.default_rng(args.seed + step)
        torch.manual_seed(args.seed + step)
        print(f"continuing from the exported weights in {args.out} at step {step} (fresh optimizer)")
    else:
        torch.manual_seed(args.seed)

    abar = sched.alphas_cumprod.to(device)
    n_params = sum(p.numel() for p in unet.parameters()) + sum(p.numel() for p in text.parameters())
    print(f"training tiny model: {n_params / 1e6:.2f}M parameters on {device}, batch {args.batch}")

    def log(msg):
        print(msg, flush=True)
        if args.log:
            with open(args.log, "a") as f:
                f.write(msg + "\n")

    def checkpoint():
        args.state.parent.mkdir(parents=True, exist_ok=True)
        torch.save(dict(unet=unet.state_dict(), text=text.state_dict(), ema_unet=ema_unet.state_dict(),
                        ema_text=ema_text.state_dict(), opt=opt.state_dict(), step=step, seconds=seconds,
                        history=history), str(args.state) + ".tmp")
        Path(str(args.state) + ".tmp").replace(args.state)
        export(ema_unet, ema_text, tok, sched, args.out,
               dict(step=step, minutes=seconds / 60, batch=args.batch, lr=args.lr, ema=args.ema,
                    snr_gamma=args.snr_gamma, seed=args.seed, history=history[-400:]))
        log(f"checkpoint at step {step} ({seconds / 60:.1f} min) -> {args.out}")

    t_run = time.time()
    t_ckpt = time.time()
    losses = []
    while step < args.max_steps and time.time() - t_run < args.minutes * 60:
        t0 = time.time()
        imgs, caps, _ = world.sample_batch(args.batch, rng)
        x0 = F.pixel_unshuffle(torch.from_numpy(imgs).to(device), 4)
        ids = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch,), device=device)
        emb = text(ids).last_hidden_state
        loss = diffusion_loss(unet, abar, x0, emb, t, torch.randn_like(x0), "v_prediction", args.snr_gamma)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(args.ema, (1 + step) / (10 + step))
            for m, e in ((unet, ema_unet), (text, ema_text)):
                for p, q in zip(m.parameters(), e.parameters()):
                    q.lerp_(p, 1 - d)
        step += 1
        seconds += time.time() - t0
        losses.append(loss.item())
        if step % 100 == 0:
            history.append([step, round(seconds, 1), float(np.mean(losses))])
            dt = history[-1][1] - (history[-2][1] if len(history) > 1 else 0.0)
            log(f"step {step}  loss {np.mean(losses):.4f}  {seconds / 60:.1f} min  {100 / max(dt, 1e-9):.2f} steps/s")
            losses = []
        if time.time() - t_ckpt > args.checkpoint_minutes * 60:
            checkpoint()
            t_ckpt = time.time()
    checkpoint()


if __name__ == "__main__":
    main()
