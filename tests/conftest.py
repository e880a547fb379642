"""Shared fixtures: the bundled tiny model, and a tiny random-weight Stable Diffusion 1.x architecture
(UNet2DConditionModel with cross-attention, AutoencoderKL, CLIPTextModel, a CLIPTokenizer whose small
vocabulary the test writes) driven through the same T2IModel adapter. Nothing is downloaded."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

SD_WORDS = ("a", "an", "photo", "of", "cat", "dog", "car", "tree", "in", "the", "style", "painting", "by", "artwork",
            "landscape", "painted", "van", "gogh", "picasso", "cezanne", "jackson", "pollock", "caravaggio", "keith",
            "haring", "kelly", "mckernan", "tyler", "edlin", "kilian", "eng")


def build_tiny_sd(tmp_path, seed: int = 0, tokens: int = 12, width: int = 64):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sepme_lib.model import T2IModel
    from sepme_lib.train_tiny import tiny_tokenizer_files

    tok_dir = tmp_path / "sd_tokenizer"
    tiny_tokenizer_files(SD_WORDS, tok_dir)
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
    return T2IModel(unet, text, tok, sched, vae=vae, name="tiny-sd-random", device=torch.device("cpu"),
                    guidance=7.5, sample_steps=4, family="sd")


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="session")
def tiny():
    from sepme_lib.model import load_model

    return load_model("tiny", device=torch.device("cpu"))


@pytest.fixture(scope="session")
def clf():
    from sepme_lib.classifier import load_classifier

    return load_classifier(device=torch.device("cpu"))
