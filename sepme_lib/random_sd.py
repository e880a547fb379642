"""Random-weight Stable Diffusion 1.x stand-ins for tests: ``python -m sepme_lib.random_sd DIR``.

Nothing can be downloaded here, so the Stable Diffusion path (``load_model(folder)``, the SD concept set, the CLIP
judge, LoRA export, the command line, ``make test-sd``) is tested on a pipeline with SD 1.x's *architecture* and
random weights: a ``UNet2DConditionModel`` with cross-attention, an ``AutoencoderKL``, a ``CLIPTextModel`` and a
``CLIPTokenizer`` whose small vocabulary holds every word of the SD concept set's prompts, saved with
``StableDiffusionPipeline.save_pretrained`` (``DIR/pipeline``), and a tiny random ``CLIPModel`` for the zero-shot judge
(``DIR/clip``). Images are noise; the plumbing is what is tested. Text width 256 with 16 tokens keeps the null spaces
of three concepts x four prompts wide (as SD's 768 with 77 tokens does).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .concepts import CONCEPT_SETS
from .model import T2IModel
from .train_tiny import tiny_tokenizer_files

EXTRA_WORDS = ("a", "an", "photo", "of", "cat", "dog", "car", "tree", "in", "the", "style", "painting", "by")


def sd_words() -> list[str]:
    """Every lower-case word of the SD concept set's prompts, anchors and judge texts, plus a few test words."""
    cs = CONCEPT_SETS["sd"]
    texts = [p for c in cs.evaluate if c != "blank" for p in cs.prompts(c)]
    texts += ["a painting"] + [f"a painting in the style of {c}" for c in cs.evaluate]
    return sorted({w for t in texts for w in t.lower().split()} | set(EXTRA_WORDS))


def build_parts(directory: Path, seed: int = 0, tokens: int = 16, width: int = 256):
    """Random ``unet, vae, text_encoder, tokenizer, scheduler`` of SD 1.x's architecture (small sizes)."""
    tok_dir = Path(directory) / "tokenizer_files"
    tiny_tokenizer_files(sd_words(), tok_dir)
    tok = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=tokens)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=width, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 32, 32),
                        latent_channels=4, norm_num_groups=32, sample_size=32)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=tokens,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False)
    return unet, vae, text, tok, sched


def build_model(directory: Path, seed: int = 0, tokens: int = 16, width: int = 256, device="cpu") -> T2IModel:
    """The random SD stand-in as a :class:`~sepme_lib.model.T2IModel` (without writing a pipeline folder)."""
    unet, vae, text, tok, sched = build_parts(directory, seed, tokens, width)
    return T2IModel(unet, text, tok, sched, vae=vae, name="random-sd", device=torch.device(device), guidance=7.5,
                    sample_steps=4, family="sd")


def build_folder(directory, seed: int = 0, tokens: int = 16, width: int = 256) -> dict:
    """Write ``directory/pipeline`` (a diffusers SD folder ``load_model`` reads) and ``directory/clip`` (a random
    zero-shot judge ``load_classifier(model=..., path=...)`` reads); returns both paths."""
    directory = Path(directory)
    unet, vae, text, tok, sched = build_parts(directory, seed, tokens, width)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
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
    args = ap.parse_args(argv)
    out = build_folder(args.directory, args.seed)
    print(f"random SD pipeline: {out['pipeline']}\nrandom CLIP judge: {out['clip']}\n"
          f"use: MODEL={out['pipeline']} SEPME_CLIP={out['clip']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
