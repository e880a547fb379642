"""Shared fixtures: the bundled tiny model and classifier, and a random-weight Stable Diffusion 1.x architecture
(``sepme_lib.random_sd``) driven through the same T2IModel adapter. Nothing is downloaded."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

def build_tiny_sd(tmp_path, seed: int = 0):
    """The random-weight SD 1.x stand-in (``sepme_lib.random_sd``): 16 tokens, text width 256."""
    from sepme_lib.random_sd import build_model

    return build_model(tmp_path, seed=seed)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="session")
def tiny():
    from sepme_lib.loading import load_model

    return load_model("tiny", device=torch.device("cpu"))


@pytest.fixture(scope="session")
def clf():
    from sepme_lib.classifier import load_classifier

    return load_classifier(device=torch.device("cpu"))


@pytest.fixture(scope="session")
def random_sd_folder(tmp_path_factory):
    """``random_sd.build_folder``: ``{"pipeline": diffusers SD folder, "clip": zero-shot judge folder}`` on disk (the
    command line and the diffusers-only LoRA check load it as a user would)."""
    from sepme_lib.random_sd import build_folder

    return build_folder(tmp_path_factory.mktemp("rsd"))


@pytest.fixture(scope="session")
def random_sdxl_folder(tmp_path_factory):
    """``random_sd.build_folder(kind="sdxl")``: a random-weight SDXL pipeline folder (two text encoders, pooled
    embeddings and time ids at the small stand-in's sizes) and its zero-shot judge."""
    from sepme_lib.random_sd import build_folder

    return build_folder(tmp_path_factory.mktemp("rsdxl"), kind="sdxl")


@pytest.fixture(scope="session")
def sdxl(random_sdxl_folder):
    """The SDXL stand-in loaded as a user loads a folder (``load_model``)."""
    from sepme_lib.loading import load_model

    return load_model(str(random_sdxl_folder["pipeline"]), device=torch.device("cpu"))
