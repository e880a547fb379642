"""Settings in one place: paths, profiles, the device helper, and the tuned defaults of every method.

Notebooks read ``PROFILE`` from the environment (``ci`` = tiny and fast, ``full`` = paper-sized) and get
every size from :func:`profile`. Nothing else in the library hard-codes a device or a size.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
TINY_DIR = DATA / "tiny_t2i"
CLASSIFIER_PATH = DATA / "classifier" / "classifier.safetensors"

# Guidance for the bundled model: a tiny model over-guides easily (measured in 00_setup_and_tour).
TINY_GUIDANCE = 2.0
TINY_SAMPLE_STEPS = 20

PROFILES = {
    # Sizes for notebooks and benchmarks. "ci" shrinks evaluation (images per concept, DDIM steps, grids), never the
    # point of a cell: SepME and G-CiRs train as in "full" (cap 300 steps, stopped by Eq. 4's monitor, batch 4; with
    # batch 2 the monitor stops them before they erase -- measured: striped ACC 0.83, checkered 0.67). Only the
    # comparison runs of notebook 06 (the fine-tuning relatives, SepME and G-CiRs there) are cut to `finetune_steps` in ci
    # (notebook 06 says so and shows the full table).
    # `table_images`: images per style in the live combination tables of notebooks 03-04 (8 subsets x 6 styles, plus the
    # original: 54 x n images). At 50 those two cells alone took 30 min of `make course` on 2 cores; 20 keeps the course
    # within its hour, and notebook 07 shows the committed 50-image tables of `python -m sepme_lib.bench sepme`.
    "ci": dict(images_per_concept=6, table_images=6, erase_steps=300, batch=4, finetune_steps=10, sample_steps=8,
               grid=4),
    "full": dict(images_per_concept=50, table_images=20, erase_steps=300, batch=4, finetune_steps=None,
                 sample_steps=TINY_SAMPLE_STEPS, grid=8),
}


def profile(name: str | None = None) -> dict:
    """The size settings of a profile; ``name`` defaults to ``$PROFILE`` (else ``"full"``)."""
    name = name or os.environ.get("PROFILE", "full")
    if name not in PROFILES:
        raise ValueError(f"unknown PROFILE {name!r}; use one of {', '.join(PROFILES)}")
    return dict(PROFILES[name], name=name)


def set_threads(n: int | None = None) -> int:
    """Set torch's CPU threads to ``n`` (else ``$SEPME_THREADS``; else leave torch's default) and return the count.

    The bundled model is small, so extra threads buy little, and on a CPU shared with other jobs (a benchmark, a
    second notebook, CI) they oversubscribe the cores: a widget refresh measured 1.0-1.5 s with one thread and
    16-35 s with two on an overloaded 2-core machine (``sepme_lib/widgets.py``). One thread per process is the
    safe choice there; an idle laptop can keep the default.
    """
    if n is None and os.environ.get("SEPME_THREADS"):
        try:
            n = int(os.environ["SEPME_THREADS"])
        except ValueError:
            raise ValueError(f"SEPME_THREADS must be a whole number of threads, got {os.environ['SEPME_THREADS']!r}") from None
    if n is not None:
        if n < 1:
            raise ValueError(f"the number of threads must be >= 1, got {n}")
        torch.set_num_threads(n)
    return torch.get_num_threads()


def get_device(prefer: str | None = None) -> torch.device:
    """The one place that picks a device: ``$SEPME_DEVICE`` or ``prefer`` if given, else CUDA, MPS, CPU."""
    want = prefer or os.environ.get("SEPME_DEVICE")
    if want:
        dev = torch.device(want)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {want!r} was asked for but CUDA is not available; use 'cpu'")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
