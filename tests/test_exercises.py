"""Every notebook's exercises, run with their solutions put in (they must pass) and with a wrong solution (it must
fail): ``make test`` catches a wrong solution and a check that cannot fail (``sepme_lib.exercises``).

An exercise in a notebook is a stub cell that starts with ``# Exercise NN.k`` followed by a cell that calls
``exercises.check("NN.k", ...)``. The solutions live apart, in ``solutions/NN_<name>.py``: a ``# %% Exercise NN.k``
block is the stub cell written out, a ``# %% Wrong NN.k`` block the same cell with a plausible mistake. Here each
notebook's check cell runs after the solution block (and after the wrong block) in a fresh namespace, as it would
in the notebook after the learner wrote the cell.
"""
import contextlib
import io
import json
from pathlib import Path

import pytest

from sepme_lib import exercises

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
CASES = [(nb, eid) for nb in NOTEBOOKS for eid in exercises.notebook_exercises(json.loads(nb.read_text()))]


def _run(block: str, check_cell: str) -> dict:
    ns = {"__name__": "__exercise__", "exercises": exercises}  # as in the notebook, which imported it earlier
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(block, "<solution>", "exec"), ns)  # noqa: S102 - the repository's own solution files
        exec(compile(check_cell, "<check cell>", "exec"), ns)  # noqa: S102
    return ns


def test_every_notebook_has_three_exercises_with_solutions():
    for nb in NOTEBOOKS:
        found = exercises.notebook_exercises(json.loads(nb.read_text()))
        assert len(found) >= 3, f"{nb.name}: {len(found)} exercises (at least 3)"
        blocks = exercises.solution_blocks(nb.name)
        for eid in found:
            assert ("Exercise", eid) in blocks, f"{nb.name}: no '# %% Exercise {eid}' block in solutions/"
            assert ("Wrong", eid) in blocks, f"{nb.name}: no '# %% Wrong {eid}' block in solutions/"
            assert eid in exercises.CHECKS, f"{nb.name}: exercise {eid} has no check in sepme_lib.exercises"


@pytest.mark.parametrize("nb, eid", CASES, ids=[eid for _, eid in CASES])
def test_solution_passes_and_wrong_solution_fails(nb, eid):
    cells = exercises.notebook_exercises(json.loads(nb.read_text()))
    stub, check_cell = cells[eid]
    blocks = exercises.solution_blocks(nb.name)
    # the stub as committed: the check says "not done yet" and does not fail
    exercises.RESULTS.pop(eid, None)
    _run(stub, check_cell)
    assert exercises.RESULTS.get(eid) is False, f"{eid}: the committed stub should be reported as not done yet"
    # the solution put in: correct
    exercises.RESULTS.pop(eid, None)
    _run(blocks[("Exercise", eid)], check_cell)
    assert exercises.RESULTS.get(eid) is True, f"{eid}: the solution did not pass its check"
    # a wrong solution put in: the check fails
    with pytest.raises(exercises.ExerciseFailed) as err:
        _run(blocks[("Wrong", eid)], check_cell)
    assert f"Exercise {eid}" in str(err.value)

