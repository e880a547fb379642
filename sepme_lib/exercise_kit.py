"""The machinery of the course's exercises (``sepme_lib.exercises`` holds the checks themselves): the registry of
checks, :func:`check` as a notebook calls it, the hint helpers :func:`expect` and :func:`expect_close`, and the
parsers of a notebook's exercise cells and of ``solutions/NN_*.py`` that ``tests/test_exercises.py`` and
``course check`` use. See ``sepme_lib/exercises.py`` for how an exercise looks in a notebook.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable

import torch

from . import config
from .classifier import load_classifier
from .loading import load_model

CHECKS: dict[str, tuple[str, Callable]] = {}
RESULTS: dict[str, bool] = {}


class ExerciseFailed(AssertionError):
    """The learner's answer is wrong; the message says what is wrong, not what the answer is."""


def exercise(eid: str, title: str):
    """Register the check of exercise ``eid`` (``"NN.k"``): a function of the learner's answer that raises
    :class:`ExerciseFailed` (through :func:`expect`) when it is wrong and may return a short note when it is right."""
    def register(fn):
        if eid in CHECKS:
            raise ValueError(f"exercise {eid} is registered twice")
        CHECKS[eid] = (title, fn)
        return fn
    return register


def ids(notebook: str | None = None) -> list[str]:
    """The registered exercise ids (of notebook ``"NN"`` if given), in order."""
    return sorted(k for k in CHECKS if notebook is None or k.startswith(f"{notebook}."))


def expect(ok: bool, hint: str) -> None:
    """Raise :class:`ExerciseFailed` with ``hint`` unless ``ok``."""
    if not ok:
        raise ExerciseFailed(hint)


def expect_close(got, reference, what: str, rtol: float = 1e-4, atol: float = 1e-8) -> None:
    """``got`` must be a tensor (or number) of ``reference``'s shape and close to it; the hint names ``what``, the
    shapes or the size of the mismatch, not the reference values."""
    if isinstance(reference, (int, float)):
        expect(isinstance(got, (int, float)) or (torch.is_tensor(got) and got.numel() == 1),
               f"{what}: expected a single number, got {type(got).__name__}")
        got, reference = float(got), float(reference)
        expect(math.isfinite(got), f"{what}: got {got}, not a finite number")
        err = abs(got - reference)
        expect(err <= atol + rtol * abs(reference), f"{what}: off by {err / max(abs(reference), 1e-30):.1%} "
                                                    "of the expected size")
        return
    expect(torch.is_tensor(got), f"{what}: expected a torch tensor, got {type(got).__name__}")
    expect(tuple(got.shape) == tuple(reference.shape),
           f"{what}: shape {tuple(got.shape)}, expected {tuple(reference.shape)}")
    got = got.detach().to(reference.device, reference.dtype)
    expect(bool(torch.isfinite(got).all()), f"{what}: contains NaN or inf")
    err = float((got - reference).abs().max())
    scale = float(reference.abs().max())
    expect(err <= atol + rtol * scale, f"{what}: the largest entry-wise difference is {err / max(scale, 1e-30):.1%} "
                                       "of the largest entry")


def check(eid: str, answer) -> bool:
    """Check the learner's ``answer`` to exercise ``eid``; see the module docstring. Returns ``True`` when it is
    right, ``False`` while it is not written yet; raises :class:`ExerciseFailed` when it is wrong."""
    if eid not in CHECKS:
        raise KeyError(f"no exercise {eid!r}; known: {', '.join(ids())}")
    title, fn = CHECKS[eid]
    try:
        note = fn(answer)
    except NotImplementedError:
        print(f"Exercise {eid} ({title}): not done yet. Write your code in the cell above, run it, then run this "
              "cell again.")
        RESULTS[eid] = False
        return False
    except ExerciseFailed as e:
        RESULTS[eid] = False
        raise ExerciseFailed(f"Exercise {eid} ({title}): not yet right. {e}") from None
    print(f"Exercise {eid} ({title}): correct." + (f" {note}" if note else ""))
    RESULTS[eid] = True
    return True


STUB_RE = re.compile(r"^# Exercise (\d\d\.\d+)\b")
BLOCK_RE = re.compile(r"^# %% (Exercise|Wrong) (\d\d\.\d+)\b.*$", re.M)
SOLUTIONS = config.ROOT / "solutions"


def notebook_exercises(nb) -> dict:
    """``{id: (stub cell source, check cell source)}`` of a notebook (a dict as read from the .ipynb JSON, or a
    path): every code cell that starts with ``# Exercise NN.k`` and the next code cell, which must call
    ``exercises.check("NN.k", ...)``."""
    if not isinstance(nb, dict):
        nb = json.loads(Path(nb).read_text())
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    out = {}
    for k, src in enumerate(code):
        m = STUB_RE.match(src)
        if m:
            nxt = code[k + 1] if k + 1 < len(code) else ""
            if f'check("{m.group(1)}"' not in nxt:
                raise ValueError(f"exercise {m.group(1)}: the cell after its stub must call "
                                 f'exercises.check("{m.group(1)}", ...)')
            out[m.group(1)] = (src, nxt)
    return out


def solution_blocks(notebook_name: str) -> dict:
    """``{("Exercise" | "Wrong", id): source}`` from ``solutions/NN_*.py`` of notebook ``notebook_name``."""
    hits = sorted(SOLUTIONS.glob(f"{notebook_name[:2]}_*.py"))
    if len(hits) != 1:
        raise FileNotFoundError(f"expected one solutions/{notebook_name[:2]}_*.py, found {[h.name for h in hits]}")
    text = hits[0].read_text()
    marks = list(BLOCK_RE.finditer(text))
    return {(m.group(1), m.group(2)): text[m.start():(marks[i + 1].start() if i + 1 < len(marks) else len(text))]
            for i, m in enumerate(marks)}


_CACHE: dict = {}


def _model():
    """The bundled model, loaded once for every check that needs it."""
    if "model" not in _CACHE:
        _CACHE["model"] = load_model("tiny", device="cpu")
    return _CACHE["model"]


def _judge():
    """The bundled classifier, loaded once for every check that needs it."""
    if "judge" not in _CACHE:
        _CACHE["judge"] = load_classifier(model=_model(), device="cpu")
    return _CACHE["judge"]


def _rand(*shape, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
