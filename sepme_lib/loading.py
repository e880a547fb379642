"""Loading models: ``load_model("tiny")`` (the bundled model in ``data/``) or a Stable Diffusion 1.x / XL folder or hub
id, into the :class:`~sepme_lib.model.T2IModel` adapter (notebooks 00 and 01). Nothing is downloaded unless
``SEPME_ALLOW_DOWNLOAD=1``; the pipeline class of a folder (its ``model_index.json``) picks the family
(``families.Family.pipeline``)."""
from __future__ import annotations

import os
from pathlib import Path

import diffusers
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from . import config, families, world
from .config import BadValue
from .model import T2IModel

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype, device: torch.device):
    """``None``/a torch dtype/``"fp16"``/``"bf16"``/``"fp32"`` -> a torch dtype or ``None`` (float32). Half
    precision is for CUDA: on a CPU it is refused (slow, and some CPU kernels lack it)."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype.lower()]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {dtype}; use float32, float16 or bfloat16")
    if dtype != torch.float32 and device.type != "cuda":
        raise ValueError(f"dtype {dtype} is for a CUDA GPU; on {device.type} use float32 (dtype=None)")
    return None if dtype == torch.float32 else dtype


def load_tiny(directory=None, device=None) -> T2IModel:
    """Load the bundled model from ``data/tiny_t2i`` (diffusers/transformers folders, safetensors)."""
    directory = Path(directory or config.TINY_DIR)
    need = [directory / "unet" / "diffusion_pytorch_model.safetensors", directory / "text_encoder" / "model.safetensors",
            directory / "tokenizer" / "vocab.json", directory / "scheduler" / "scheduler_config.json"]
    missing = [str(p) for p in need if not p.exists()]
    if missing:
        raise FileNotFoundError(f"the bundled tiny model is incomplete: missing {missing}. Recreate it with "
                                "`python -m sepme_lib.train_tiny` (or restore data/ from git, or point SEPME_DATA at "
                                "a data/ folder).")
    unet = UNet2DConditionModel.from_pretrained(directory / "unet", low_cpu_mem_usage=False)
    text = CLIPTextModel.from_pretrained(directory / "text_encoder")
    tok = CLIPTokenizer.from_pretrained(directory / "tokenizer")
    sched = DDIMScheduler.from_pretrained(directory / "scheduler")
    return T2IModel(unet, text, tok, sched, patch=4, name="tiny", vocabulary=world.VOCABULARY, device=device,
                    guidance=config.TINY_GUIDANCE, sample_steps=config.TINY_SAMPLE_STEPS, family="tiny")


def _pipeline_classes() -> dict:
    """The diffusers pipeline classes the families name (``families.Family.pipeline``), by name."""
    return {f.pipeline: getattr(diffusers, f.pipeline) for f in families.FAMILIES.values()
            if hasattr(diffusers, f.pipeline)}


def from_pipeline(pipe, name: str, device=None, family: str | None = None) -> T2IModel:
    """A :class:`T2IModel` of a loaded diffusers pipeline (Stable Diffusion 1.x or XL): its UNet, VAE, text
    encoder(s) and tokenizer(s), its scheduler's configuration in a DDIM scheduler; the pipeline object is not kept."""
    fam = families.get(family) if family else families.model_family(name, type(pipe).__name__)
    extra = {}
    if getattr(pipe, "text_encoder_2", None) is not None:
        extra = dict(text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2,
                     zero_empty=bool(pipe.config.get("force_zeros_for_empty_prompt", False)))
        if pipe.vae.dtype == torch.float16 and pipe.vae.config.get("force_upcast", False):
            pipe.vae.to(torch.float32)  # SDXL's VAE overflows in float16 (the pipeline upcasts it the same way)
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    return T2IModel(pipe.unet, pipe.text_encoder, pipe.tokenizer, sched, vae=pipe.vae, name=str(name),
                    device=device, family=fam.name, **extra)


def load_sd(path_or_id: str, device=None, dtype=None) -> T2IModel:
    """Load a Stable Diffusion 1.x or XL pipeline from a local folder, or from the Hugging Face cache.

    The pipeline class (and so the family, ``families.Family.pipeline``) is the folder's ``model_index.json`` class.
    Nothing is downloaded unless ``SEPME_ALLOW_DOWNLOAD=1``; otherwise an id that is not already in the
    local cache fails at once with a message saying how to provide the weights. The pipeline's scheduler is
    copied into a DDIM scheduler of the same configuration (the pipeline object is not kept).
    """
    local = Path(path_or_id).expanduser()
    allow = os.environ.get("SEPME_ALLOW_DOWNLOAD") == "1"
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    if local.exists() and not (local / "model_index.json").exists():
        raise FileNotFoundError(f"{local} is not a diffusers pipeline folder (no model_index.json); give a folder "
                                "with unet/, vae/, text_encoder/, tokenizer/, scheduler/ and model_index.json")
    classes = _pipeline_classes()
    try:
        source = local if local.exists() else path_or_id
        if not local.exists():
            kwargs["local_files_only"] = not allow
        found = families.pipeline_class(str(source))
        if found is None and allow:  # not cached yet: the index names the class
            found = StableDiffusionPipeline.load_config(path_or_id).get("_class_name")
        if found is not None and found not in classes:
            raise BadValue(f"{path_or_id!r} is a {found}; the library loads {', '.join(classes)} folders")
        cls = classes.get(found, StableDiffusionPipeline)
        extra = dict(safety_checker=None) if cls is StableDiffusionPipeline else {}
        pipe = cls.from_pretrained(source, **extra, **kwargs)
    except BadValue:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the way out
        raise RuntimeError(
            f"could not load Stable Diffusion weights {path_or_id!r} ({type(e).__name__}: {str(e)[:200]}). "
            "Give a local folder with the diffusers layout (unet/, vae/, text_encoder/, tokenizer/, "
            "scheduler/), or pre-download it with `huggingface-cli download <id>` and, where downloads are "
            "allowed, set SEPME_ALLOW_DOWNLOAD=1. The bundled model is load_model('tiny').") from e
    return from_pipeline(pipe, str(path_or_id), device=device)


def load_model(name: str = "tiny", device=None, dtype=None) -> T2IModel:
    """``"tiny"`` -> the bundled model in ``data/``; anything else -> an SD 1.x or SDXL hub id or local folder.

    ``device``: a torch device or its name (default :func:`config.get_device`). ``dtype``: ``None`` (float32,
    exact, what the tests use) or ``"fp16"``/``"bf16"`` (or the torch dtype) for Stable Diffusion on a CUDA GPU
    (deltas stay float32 and are added in float32, then cast)."""
    if not isinstance(name, (str, os.PathLike)) or not str(name).strip():
        raise ValueError(f"load_model needs 'tiny', a Stable Diffusion hub id or a local folder, got {name!r}")
    name = str(name)
    dev = config.get_device(str(device)) if device is not None else config.get_device()
    dt = resolve_dtype(dtype, dev)
    if name == "tiny":
        if dt is not None:
            raise ValueError(f"dtype={dtype} is for Stable Diffusion on a GPU; the bundled tiny model runs in float32 "
                             "(pass dtype=None)")
        return load_tiny(device=dev)
    return load_sd(name, device=dev, dtype=dt)
