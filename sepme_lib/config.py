"""Settings in one place: paths, profiles, the device helper, threads, the library version.

Notebooks read ``PROFILE`` from the environment (``ci`` = tiny and fast, ``full`` = paper-sized, ``colab`` = Stable
Diffusion sized for a Colab T4) and get every
size from :func:`profile`. Nothing else in the library hard-codes a device or a size. The hyper-parameters of
the methods (paper values for Stable Diffusion, tuned values for the bundled model) are in one table,
``methods.DEFAULTS``.

Environment variables read here: ``PROFILE``, ``MODEL``, ``SEPME_DEVICE``, ``SEPME_THREADS`` (applied as soon as
the library is imported), ``SEPME_DATA`` (another ``data/`` folder).
"""
from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

import torch

VERSION = "0.2.0"

# The course's GitHub repository (OWNER/NAME): the one place the Colab badges and install cells of the notebooks read
# it from. `python -m sepme_lib.course set-repo OWNER/NAME` rewrites this line, every badge and every install cell.
REPO = "sepme-course/sepme-course"

ROOT = Path(__file__).resolve().parent.parent


class SepmeError(Exception):
    """The base of every error the library raises on bad input or a fault it detects (README, "Troubleshooting:
    the library's errors"): ``except sepme_lib.SepmeError`` catches them all. Each message names the argument or
    file, what was wrong and the fix."""


class BadValue(SepmeError, ValueError):
    """An argument or setting has a wrong value (out of range, non-finite, wrong shape, unknown name)."""


class BadType(SepmeError, TypeError):
    """An argument has a wrong type (a string where a list is expected, a number where a prompt is expected)."""


class UnknownName(BadValue, KeyError):
    """A name (of a delta, a parameter, a concept) that is not among the known ones (also a ``KeyError``)."""

    __str__ = Exception.__str__


class NotFound(SepmeError, FileNotFoundError):
    """A file or folder the call needs does not exist (also a ``FileNotFoundError``)."""


class TooLarge(BadValue):
    """A requested size would not fit in this machine's memory (the message gives the estimate and the fix)."""


def available_memory() -> int:
    """Bytes of memory available now (``MemAvailable`` of /proc/meminfo; else free pages; else 8 GiB)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def check_memory(what: str, nbytes: float, fix: str, share: float = 0.5) -> None:
    """Refuse (:class:`TooLarge`) before starting when ``what`` needs more than ``share`` of the available memory."""
    avail = available_memory()
    if nbytes > share * avail:
        raise TooLarge(f"{what} needs about {nbytes / 2**30:.3g} GiB of memory, more than {share:.0%} of the "
                       f"{avail / 2**30:.3g} GiB available here; {fix}")


def _find_data() -> Path:
    """``data/`` next to the package (a clone or an editable install), or ``$SEPME_DATA``, or the copy that a
    regular ``pip install`` puts inside the package (``sepme_lib/data``)."""
    if os.environ.get("SEPME_DATA"):
        return Path(os.environ["SEPME_DATA"]).expanduser().resolve()
    for candidate in (ROOT / "data", Path(__file__).resolve().parent / "data"):
        if (candidate / "tiny_t2i").is_dir():
            return candidate
    return ROOT / "data"


DATA = _find_data()
TINY_DIR = DATA / "tiny_t2i"
CLASSIFIER_PATH = DATA / "classifier" / "classifier.safetensors"
RESULTS = DATA / "results"
BUNDLED_DELTAS = DATA / "deltas"

# Sampling defaults of the bundled model: a tiny model over-guides easily (measured in notebook 00).
TINY_GUIDANCE = 2.0
TINY_SAMPLE_STEPS = 20

PROFILES = {
    # Sizes for notebooks and benchmarks. "ci" shrinks counts that no stored result depends on (grids, the number
    # of images in the full tables of benchmarks), never the training or sampling behind a result: an ACC table has
    # at least 20 images per class at 20 DDIM steps (at 6 images one image moves an ACC by 0.17), SepME and G-CiRs
    # train as in "full" from the same 64 reference images. Only the comparison runs of notebook 06 are cut to
    # `finetune_steps` in ci (it shows the full table beside them).
    # `table_images`: images per style in the live combination tables of notebooks 03-04 (8 subsets x 6 styles).
    # `sd_cap`: the step cap of SepME/G-CiRs on a Stable Diffusion model in ci (`make test-sd` runs every notebook on
    # a random-weight SD folder on the CPU: the plumbing is what is tested); None = the method's own cap.
    "ci": dict(images_per_concept=20, table_images=20, finetune_steps=10, sample_steps=TINY_SAMPLE_STEPS, grid=4,
               n_ref=64, sd_cap=20),
    "full": dict(images_per_concept=50, table_images=20, finetune_steps=None, sample_steps=TINY_SAMPLE_STEPS,
                 grid=8, n_ref=64, sd_cap=None),
    # Stable Diffusion 1.4 in fp16 on a Colab T4 (16 GB): sizes chosen so that every notebook 00-09 is estimated at
    # <= 20 min and <= 16 GB there (`python -m sepme_lib.t4 --save` -> data/results/colab_t4_estimate.json; the
    # largest, notebook 06, 19.6 min, most of it images and CPU closed forms; peak 9.4 GiB, notebook 09's prompt
    # search). An estimate, never measured on a T4: FLOPs counted with FlopCounterMode on the full-size SD 1.4 (meta
    # device) / (65 TFLOPS fp16 peak x 15 %), training derated by its CPU-measured efficiency; memory = the fp32 peaks
    # of data/results/gpu_path_cpu.json halved for fp16 (README, "Running on a GPU"). 3 images per class at 15 DDIM
    # steps, 3 per class in the combination tables, 8 reference images; `sd_cap` caps SepME / G-CiRs / fine-tuning
    # steps and the attacks' loops (methods.course_settings, methods.attack_budgets) at 80. Any one size a step
    # larger (4 images, 16 DDIM steps, 4 table images, cap 100) takes a notebook past 20 min. On the bundled model
    # `colab` takes full's sizes (profile()): the tiny model needs no cut on a GPU. Benchmarks: ci and full only.
    "colab": dict(images_per_concept=3, table_images=3, finetune_steps=None, sample_steps=15, grid=4, n_ref=8,
                  sd_cap=80),
}
BENCH_PROFILES = ("ci", "full")  # the benchmarks run on the bundled model: their results files are named by these


def positive_int(text: str) -> int:
    """``argparse`` type: a whole number >= 1 (a clear error for 0, negatives and non-numbers)."""
    try:
        n = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {n}")
    return n


# ci on any model but the bundled one (`make test-sd`: a random-weight SD folder on a CPU, where nothing is learned and
# no number is a result): the counts that test the plumbing.
PLUMBING = dict(images_per_concept=4, table_images=4, sample_steps=4, n_ref=8)


def profile(name: str | None = None, model: str | None = None) -> dict:
    """The size settings of a profile; ``name`` defaults to ``$PROFILE`` (else ``"full"``), ``model`` to
    ``$MODEL``. In ``ci`` on a model other than the bundled one the counts are :data:`PLUMBING`'s; ``colab`` on the
    bundled model is ``full``'s sizes (named ``colab``)."""
    name = name or os.environ.get("PROFILE", "full")
    if name not in PROFILES:
        raise BadValue(f"unknown PROFILE {name!r}; use one of {', '.join(PROFILES)}")
    out = dict(PROFILES[name], name=name)
    tiny = (model or model_name()) == "tiny"
    if name == "ci" and not tiny:
        out.update(PLUMBING)
    if name == "colab" and tiny:
        out.update(PROFILES["full"])
    return out


def bench_profile(name: str | None = None) -> str:
    """``name`` (default ``$PROFILE``, else ``"full"``) if a benchmark runs in it (:data:`BENCH_PROFILES`), else a
    clear error: the benchmarks run on the bundled model and save ``<what>_<profile>.json``."""
    name = name or os.environ.get("PROFILE", "full")
    if name not in BENCH_PROFILES:
        raise BadValue(f"the benchmarks run in the {' or '.join(BENCH_PROFILES)} profile, not {name!r}"
                       + (" (colab sizes the notebooks on Stable Diffusion on a Colab T4; on the bundled model it is "
                          "full: use --profile full, or PROFILE=full)" if name == "colab" else ""))
    return name


def model_name(default: str = "tiny") -> str:
    """``$MODEL`` (``tiny``, a Stable Diffusion hub id or a local folder), else ``default``."""
    return os.environ.get("MODEL", "").strip() or default


def set_threads(n: int | None = None) -> int:
    """Set torch's CPU threads to ``n`` (else ``$SEPME_THREADS``; else leave torch's default); return the count.

    Called once when the library is imported, so ``SEPME_THREADS=1`` works wherever ``sepme_lib`` is used. On a CPU
    shared with other jobs extra threads oversubscribe the cores (README, "Troubleshooting").
    """
    if n is None:
        raw = os.environ.get("SEPME_THREADS", "").strip()
        if not raw:
            return torch.get_num_threads()
        try:
            n = int(raw)
        except ValueError:
            raise ValueError(f"SEPME_THREADS must be a whole number of threads, got {raw!r}") from None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of threads must be a whole number >= 1, got {n!r}")
    torch.set_num_threads(n)
    return torch.get_num_threads()


def get_device(prefer: str | None = None) -> torch.device:
    """The one place that picks a device: ``prefer`` or ``$SEPME_DEVICE`` if given, else CUDA, else CPU.

    Apple's MPS is used only when asked for (``SEPME_DEVICE=mps``): the SVDs and float64 solves of the library run
    on the CPU anyway, and MPS lacks float64."""
    want = prefer or os.environ.get("SEPME_DEVICE", "").strip()
    if want:
        try:
            dev = torch.device(want)
        except (RuntimeError, TypeError) as e:
            raise BadValue(f"unknown device {want!r} ({e}); use 'cpu', 'cuda' or 'cuda:N'") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {want!r} was asked for but CUDA is not available here; use 'cpu'")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {want!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
        if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise RuntimeError(f"device {want!r} was asked for but MPS is not available here; use 'cpu'")
        if dev.type not in ("cpu", "cuda", "mps"):
            raise BadValue(f"device {want!r} cannot run the models (it holds no data); use 'cpu' or 'cuda'")
        return dev
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(model: str, device) -> str | None:
    """The precision to load ``model`` in on ``device`` (pass it to ``load_model(..., dtype=)``): ``None`` (float32)
    for the bundled model and on a CPU; on CUDA for Stable Diffusion ``"bf16"`` where the GPU supports it (Ampere
    and later), else ``"fp16"`` (a T4). ``$SEPME_DTYPE`` (``fp32``, ``fp16``, ``bf16``) overrides it. Notebooks 05-07
    load the model this way; the README's "Running on a GPU" gives the memory and times."""
    want = os.environ.get("SEPME_DTYPE", "").strip().lower()
    if want:
        if want not in ("fp32", "fp16", "bf16"):
            raise BadValue(f"SEPME_DTYPE must be fp32, fp16 or bf16, got {want!r}; unset it or use one of those")
        return None if want == "fp32" else want
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if str(model) == "tiny" or dev.type != "cuda":
        return None
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def sample_batch(default: int) -> int:
    """How many images ``T2IModel.sample`` draws at once: ``$SEPME_BATCH`` if set, else ``default``, the model
    family's ``families.Family.batch`` (64 for the bundled model; 8 for Stable Diffusion: 16 UNet passes of 64x64x4
    latents fit a 16 GB GPU in half precision). Every evaluation (``acc_table``, notebooks 03-07) samples in chunks
    of this size."""
    if isinstance(default, bool) or not isinstance(default, int):
        raise BadType(f"sample_batch takes the family's default batch, got {default!r}; for a family's batch use "
                      "families.get(name).sample_batch()")
    raw = os.environ.get("SEPME_BATCH", "").strip()
    if raw:
        try:
            n = int(raw)
        except ValueError:
            raise ValueError(f"SEPME_BATCH must be a whole number >= 1, got {raw!r}") from None
        if n < 1:
            raise ValueError(f"SEPME_BATCH must be a whole number >= 1, got {n}")
        return n
    return default


def sample_cache_dir() -> Path | None:
    """``$SEPME_SAMPLE_CACHE``: a folder where ``T2IModel.sample`` keeps the images of each call, keyed by everything
    the images depend on (every weight of the model and of ``weights``, prompts or embeddings, seeds, steps, guidance,
    batch size, scheduler, threads, device, versions), so that an identical call later returns the same tensor without
    sampling again. Off unless set: ``make test`` sets it for nbval, where the notebooks draw the same original-model
    tables again and again (a call is cached whole: images of one seed drawn in another batch differ in the last bits,
    so nothing smaller is reused)."""
    raw = os.environ.get("SEPME_SAMPLE_CACHE", "").strip()
    return Path(raw) if raw else None


def cache_load(key: str | None):
    folder = sample_cache_dir()
    if key is None or folder is None or not (folder / f"{key}.pt").exists():
        return None
    return torch.load(folder / f"{key}.pt", weights_only=True)


def cache_store(key: str | None, value: torch.Tensor) -> None:
    folder = sample_cache_dir()
    if key is None or folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{key}.{os.getpid()}.tmp"
    torch.save(value, tmp)
    os.replace(tmp, folder / f"{key}.pt")  # atomic: parallel test processes may share the folder


@contextlib.contextmanager
def environment(values: dict, drop=()):
    """Set the environment variables ``values`` (and unset ``drop``) for the ``with`` block; restore them after."""
    old = {k: os.environ.get(k) for k in [*values, *drop]}
    os.environ.update(values)
    for k in drop:
        os.environ.pop(k, None)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


set_threads()  # honour SEPME_THREADS on import
