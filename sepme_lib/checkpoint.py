"""Resumable training loops: save the whole state of a loop every few steps, resume from the last save.

Used by the command line (``sepme erase ... --out DIR`` resumes a killed run from its last saved step) and available to
any caller of ``erase(..., checkpoint=Checkpoint(folder))``. The loops that accept it are ``gcirs.train`` (SepME and
G-CiRs) and ``finetune.finetune`` (ESD, Ablating Concepts, Forget-Me-Not, All-but-One); the closed forms (UCE, RECE,
MACE) have no loop to resume.

What a loop saves (``Stage.save``): its trainable tensors, the Adam states, the state of its random generator, the
momentum monitors, the step and the history: everything the next step reads. A resumed run therefore continues with
exactly the numbers the uninterrupted run would have used, and ends with a bit-identical increment
(``tests/test_cli.py`` checks it). Without a checkpoint the loops run exactly as before (no extra random draws, no
extra operations). A loop that has finished saves its final state too, so a restarted multi-stage run (SepME's
separate mode trains one concept after another) skips the stages already done.

Files: ``<folder>/<stage key>.pt`` (``torch.save``, written to a temporary file and renamed, so a kill during a save
leaves the previous save intact).
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

from .config import SepmeError


class Interrupted(SepmeError, RuntimeError):
    """Raised by :meth:`Stage.save` after saving step ``stop_after`` (tests and the CLI's ``--stop-after-step``
    simulate a killed run this way)."""


class CheckpointMismatch(SepmeError, ValueError):
    """A checkpoint file belongs to another run (other concepts, method or settings)."""


def _key_file(key: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.+-]+", "_", key).strip("_")
    if not safe:
        raise ValueError(f"a checkpoint stage needs a non-empty key, got {key!r}")
    return safe + ".pt"


class Stage:
    """The checkpoint of one training loop (one ``key``), made by :meth:`Checkpoint.stage`."""

    def __init__(self, parent: "Checkpoint", key: str, identity: dict):
        self.parent, self.key, self.identity = parent, key, identity
        self.path = parent.folder / _key_file(key)

    def load(self) -> dict | None:
        """The last saved state of this loop, or ``None`` when there is none. Refuses a file of another run."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the file and the fix
            raise CheckpointMismatch(f"{self.path} is not a readable checkpoint ({type(e).__name__}: {e}); delete it "
                                     "to start this stage again") from None
        if state.get("identity") != self.identity:
            raise CheckpointMismatch(
                f"{self.path} was saved by another run (saved {state.get('identity')}, now {self.identity}); use "
                "another checkpoint folder, or delete it to start again")
        return state

    def due(self, step: int, finished: bool) -> bool:
        """Whether to save after ``step`` (every ``parent.every`` steps, at ``stop_after``, and at the end)."""
        p = self.parent
        return finished or step % p.every == 0 or (p.stop_after is not None and step >= p.stop_after)

    def save(self, step: int, state: dict, finished: bool = False) -> None:
        """Write ``state`` atomically; then raise :class:`Interrupted` if ``step`` reached ``stop_after``."""
        state = dict(state, identity=self.identity, step=step, finished=finished)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        try:
            torch.save(state, tmp)
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.parent.saves += 1
        p = self.parent
        if not finished and p.stop_after is not None and step >= p.stop_after:
            raise Interrupted(f"stopped after saving step {step} of stage {self.key!r} in {self.path} (stop_after)")


class Checkpoint:
    """Where and how often training loops save their state.

    ``folder``: one file per loop (stage) in it. ``every``: save after every ``every`` steps (and at the end of the
    loop). ``stop_after``: after saving step ``stop_after`` of a stage, raise :class:`Interrupted` (a simulated kill;
    ``None`` in normal use)."""

    def __init__(self, folder, every: int = 10, stop_after: int | None = None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every (steps between saves) must be a whole number >= 1, got {every!r}")
        if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int)
                                       or stop_after < 1):
            raise ValueError(f"stop_after must be None or a whole number >= 1, got {stop_after!r}")
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"checkpoint folder {self.folder} is a file; give a folder")
        self.every, self.stop_after, self.saves = every, stop_after, 0

    def stage(self, key: str, **identity) -> Stage:
        """The checkpoint of the loop named ``key``; ``identity`` (plain values: names, settings) must match the saved
        one for a resume."""
        return Stage(self, key, {k: _plain(v) for k, v in identity.items()})

    def __repr__(self):
        return f"Checkpoint({str(self.folder)!r}, every={self.every}, stop_after={self.stop_after})"


def _plain(v):
    """``v`` as JSON-like plain data (tuples as lists), so that a saved identity compares equal after loading."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def generator_state(gen: torch.Generator) -> torch.Tensor:
    """The state of a CPU generator (every random draw of the loops comes from one)."""
    return gen.get_state().clone()


def restore_generator(gen: torch.Generator, state: torch.Tensor) -> None:
    gen.set_state(state)
