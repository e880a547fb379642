"""Random-weight Stable Diffusion 1.x stand-ins for tests: ``python -m sepme_lib.random_sd DIR``.

Nothing can be downloaded here, so the Stable Diffusion path (``load_model(folder)``, the SD concept set, the CLIP
judge, LoRA export, the command line, ``make test-sd``) is tested on a pipeline with SD 1.x's *architecture* and
random weights: a ``UNet2DConditionModel`` with cross-attention, an ``AutoencoderKL``, a ``CLIPTextModel`` and a
``CLIPTokenizer`` whose small vocabulary holds every word of the SD concept set's prompts, saved with
``StableDiffusionPipeline.save_pretrained`` (``DIR/pipeline``), and a tiny random ``CLIPModel`` for the zero-shot judge
(``DIR/clip``). Images are noise; the plumbing is what is tested. Text width 256 with 16 tokens keeps the null spaces
of three concepts x four prompts wide (as SD's 768 with 77 tokens does).

``--size full`` (``size="full"``) builds Stable Diffusion 1.4 at its real size instead, from its configs written out
here (:data:`SD14`): the UNet (320/640/1280/1280 channels, cross-attention 768, 8 heads), the CLIP ViT-L/14 text
encoder (768 wide, 12 layers, 77 tokens, vocabulary 49408), the 4-channel VAE and SD 1.4's PNDM scheduler config --
about 1.07 billion random parameters (4.3 GB in float32), the real shapes, memory and time, for
``python -m sepme_lib.bench gpu-path``. Its tokenizer is built offline too: the word-level vocabulary of the small
stand-in, padded with unused entries to CLIP's 49408, so the embedding table has the real size (the real BPE merges
are not reproduced: prompts tokenize into other, usually fewer, tokens; every prompt is still padded to 77).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .concepts import CONCEPT_SETS
from .config import BadValue
from .model import T2IModel
from .train_tiny import tiny_tokenizer_files

SIZES = ("small", "full")
KINDS = ("sd", "sdxl")  # the families a stand-in is built for (families.FAMILIES)
CLIP_VOCAB = 49408  # CLIP ViT-L/14's vocabulary size

# Stable Diffusion 1.4 (CompVis/stable-diffusion-v1-4), the values of its unet/, vae/, text_encoder/ and scheduler/
# config.json files: parameters 859.52M (UNet), 83.65M (VAE), 123.06M (text encoder).
SD14 = dict(
    unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
              down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
              attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu", center_input_sample=False,
              downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1),
    vae=dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
             up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
             latent_channels=4, norm_num_groups=32, act_fn="silu", sample_size=512, scaling_factor=0.18215),
    text=dict(vocab_size=CLIP_VOCAB, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
              bos_token_id=0, eos_token_id=1, pad_token_id=1),
    scheduler=dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True,
                   steps_offset=1),
    tokens=77,
)
SD14_PARAMETERS = dict(unet=859_520_964, vae=83_653_863, text_encoder=123_060_480)  # the released model's counts

# Stable Diffusion XL 1.0 base (stabilityai/stable-diffusion-xl-base-1.0), the values of its config.json files: a UNet
# of 3 levels (320/640/1280; 0/2/10 transformer blocks per level), cross-attention 2048 (= 768 + 1280, the two text
# encoders' widths), the pooled embedding (1280) and 6 size numbers (x 256) added to the timestep embedding; CLIP
# ViT-L/14 (penultimate layer) and OpenCLIP ViT-bigG/14 with projection; the 4-channel VAE at 1024 pixels (scaling
# 0.13025); the Euler scheduler of the release (loaded into DDIM).
SDXL10 = dict(
    unet=dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
              transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
              use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
              projection_class_embeddings_input_dim=2816, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
              flip_sin_to_cos=True, freq_shift=0),
    vae=dict(SD14["vae"], sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    text=dict(SD14["text"]),
    text_2=dict(vocab_size=CLIP_VOCAB, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
                bos_token_id=0, eos_token_id=1, pad_token_id=1),
    scheduler=dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
                   use_karras_sigmas=False),
    tokens=77,
)
SDXL10_PARAMETERS = dict(unet=2_567_463_684, vae=83_653_863, text_encoder=123_060_480,
                         text_encoder_2=694_659_840)  # the released model's counts


def check_kind(kind) -> str:
    if kind not in KINDS:
        raise BadValue(f"kind must be one of {KINDS} ('sd': Stable Diffusion 1.x; 'sdxl': Stable Diffusion XL), "
                       f"got {kind!r}")
    return kind


def check_size(size) -> str:
    if size not in SIZES:
        raise BadValue(f"size must be one of {SIZES} ('small': the few-layer test stand-in; 'full': SD 1.4's real "
                       f"architecture), got {size!r}")
    return size


def full_parts(vocab_size: int = CLIP_VOCAB):
    """SD 1.4's ``unet, vae, text_encoder`` (random weights, on the current default device: build them under
    ``torch.device("meta")`` to count parameters without allocating them) and its scheduler."""
    unet = UNet2DConditionModel(**SD14["unet"])
    vae = AutoencoderKL(**SD14["vae"])
    text = CLIPTextModel(CLIPTextConfig(**dict(SD14["text"], vocab_size=vocab_size)))
    return unet, vae, text, PNDMScheduler.from_config(SD14["scheduler"])  # keeps clip_sample for DDIM


def full_parts_xl(vocab_size: int = CLIP_VOCAB):
    """SDXL 1.0's ``unet, vae, text_encoder, text_encoder_2`` (random weights; ``torch.device("meta")`` as in
    :func:`full_parts`) and its scheduler."""
    unet = UNet2DConditionModel(**SDXL10["unet"])
    vae = AutoencoderKL(**SDXL10["vae"])
    text = CLIPTextModel(CLIPTextConfig(**dict(SDXL10["text"], vocab_size=vocab_size)))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**dict(SDXL10["text_2"], vocab_size=vocab_size)))
    with torch.device("cpu"):  # the scheduler's tables are real tensors even when the parts are built on "meta"
        sched = EulerDiscreteScheduler.from_config(SDXL10["scheduler"])
    return unet, vae, text, text_2, sched


def pad_vocabulary(directory: Path, size: int = CLIP_VOCAB) -> None:
    """Pad ``directory/vocab.json`` with unused entries to ``size`` tokens (CLIP's embedding table size)."""
    path = Path(directory) / "vocab.json"
    vocab = json.loads(path.read_text())
    for k in range(len(vocab), size):
        vocab[f"<|unused{k}|>"] = k
    path.write_text(json.dumps(vocab))


EXTRA_WORDS = ("a", "an", "photo", "of", "cat", "dog", "car", "tree", "in", "the", "style", "painting", "by")


def sd_words() -> list[str]:
    """Every lower-case word of the SD concept set's prompts, anchors and judge texts, plus a few test words."""
    cs = CONCEPT_SETS["sd"]
    texts = [p for c in cs.evaluate if c != "blank" for p in cs.prompts(c)]
    texts += ["a painting"] + [f"a painting in the style of {c}" for c in cs.evaluate]
    return sorted({w for t in texts for w in t.lower().split()} | set(EXTRA_WORDS))


def build_parts(directory: Path, seed: int = 0, tokens: int = 16, width: int = 256, size: str = "small",
                kind: str = "sd") -> dict:
    """Random parts of SD 1.x's architecture (``kind="sd"``: ``unet, vae, text_encoder, tokenizer, scheduler``) or
    SDXL's (``kind="sdxl"``: also ``text_encoder_2, tokenizer_2``), as a dict of pipeline components: small sizes, or
    ``size="full"``: SD 1.4's (:data:`SD14`) or SDXL 1.0's (:data:`SDXL10`); ``tokens`` is then 77. SDXL's second
    tokenizer is the first one (the released pair shares the vocabulary and differs in its padding token)."""
    check_size(size)
    check_kind(kind)
    tok_dir = Path(directory) / "tokenizer_files"
    tiny_tokenizer_files(sd_words(), tok_dir)
    if size == "full":
        pad_vocabulary(tok_dir)
        tokens = SD14["tokens"]
    tok = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=tokens)
    torch.manual_seed(seed)
    if size == "full" and kind == "sdxl":
        unet, vae, text, text_2, sched = full_parts_xl(len(tok))
        return dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=sched, text_encoder_2=text_2,
                    tokenizer_2=tok)
    if size == "full":
        unet, vae, text, sched = full_parts(len(tok))
        return dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=sched)
    if kind == "sdxl":  # SDXL's layout at the small stand-in's sizes: two encoders of width/2 each (context = width)
        half = width // 2
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=width, attention_head_dim=(4, 8), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
            norm_num_groups=32)
        enc = dict(vocab_size=len(tok), hidden_size=half, intermediate_size=2 * half, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=tokens, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        text, text_2 = CLIPTextModel(CLIPTextConfig(**enc)), CLIPTextModelWithProjection(
            CLIPTextConfig(**enc, projection_dim=32))
        vae = _small_vae()
        sched = EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                       beta_end=0.012, prediction_type="epsilon", steps_offset=1,
                                       timestep_spacing="leading")
        return dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=sched, text_encoder_2=text_2,
                    tokenizer_2=tok)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=width, attention_head_dim=8, norm_num_groups=32)
    vae = _small_vae()
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=tokens,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False)
    return dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=sched)


def _small_vae():
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 32, 32),
                         latent_channels=4, norm_num_groups=32, sample_size=32)


def build_model(directory: Path, seed: int = 0, tokens: int = 16, width: int = 256, device="cpu",
                size: str = "small", kind: str = "sd") -> T2IModel:
    """The random stand-in as a :class:`~sepme_lib.model.T2IModel` (without writing a pipeline folder)."""
    parts = build_parts(directory, seed, tokens, width, size, kind)
    extra = {k: parts[k] for k in ("text_encoder_2", "tokenizer_2") if k in parts}
    name = f"random-{kind}" + ("" if size == "small" else ("14" if kind == "sd" else "") + "-full")
    return T2IModel(parts["unet"], parts["text_encoder"], parts["tokenizer"],
                    DDIMScheduler.from_config(parts["scheduler"].config), vae=parts["vae"], name=name,
                    device=torch.device(device), guidance=7.5, sample_steps=4 if size == "small" else 50, family=kind,
                    zero_empty=bool(extra), **extra)


def build_folder(directory, seed: int = 0, tokens: int = 16, width: int = 256, size: str = "small",
                 kind: str = "sd") -> dict:
    """Write ``directory/pipeline`` (a diffusers SD 1.x or SDXL folder ``load_model`` reads) and ``directory/clip``
    (a random zero-shot judge ``load_classifier(model=..., path=...)`` reads; small in both sizes); returns both
    paths."""
    directory = Path(directory)
    parts = build_parts(directory, seed, tokens, width, size, kind)
    tok = parts["tokenizer"]
    tokens = tok.model_max_length
    if "text_encoder_2" in parts:
        pipe = StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(directory / "pipeline")
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=tokens, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1),
                     vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8),
                     projection_dim=32)
    torch.manual_seed(seed + 1)
    CLIPModel(cfg).save_pretrained(directory / "clip")
    tok.save_pretrained(directory / "clip")
    return dict(pipeline=directory / "pipeline", clip=directory / "clip")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m sepme_lib.random_sd", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("directory", type=Path, help="where to write pipeline/ and clip/")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", choices=SIZES, default="small",
                    help="small: the few-layer test stand-in (default); full: the real architecture (SD 1.4: 4.3 GB, "
                         "SDXL: 13.9 GB in float32)")
    ap.add_argument("--kind", choices=KINDS, default="sd", help="sd: Stable Diffusion 1.x (default); sdxl: SDXL")
    args = ap.parse_args(argv)
    out = build_folder(args.directory, args.seed, size=args.size, kind=args.kind)
    print(f"random SD pipeline: {out['pipeline']}\nrandom CLIP judge: {out['clip']}\n"
          f"use: MODEL={out['pipeline']} SEPME_CLIP={out['clip']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
