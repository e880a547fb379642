"""The notebooks as committed files, and the course infrastructure around them (``sepme_lib.course``).

* every committed notebook is executed and current (``course.check_notebook``: one top-to-bottom ci run, stored
  outputs on every ``# NBVAL_CHECK_OUTPUT`` cell, version and code hash recorded, badge and install cell);
* nbval really compares: a notebook whose stored marked output is changed fails ``pytest --nbval-lax``;
* the check catches stale notebooks (edited code, missing outputs, wrong counts);
* ``set-repo`` rewrites config.REPO, badges and install cells in one command;
* the Colab install cell works in a running interpreter that has ``google.colab`` (faked here): clone, pip install,
  import without a restart, data found; a regular (non-editable) ``pip install`` ships ``data/`` inside the package.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from sepme_lib import config, course, families

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_committed_notebook_is_executed_and_current(path):
    problems = course.check_notebook(path)
    assert not problems, f"{path.name}: " + "; ".join(problems)


# ------------------------------------------------------------------------------------------ synthetic notebooks
HEADER = ("**Time**: about 1 s (ci) and about 1 s (full) on a CPU; Colab: none.\n\n**Stored outputs**: the ci profile.\n\n"
          "**On Colab**: nothing to do.")


def synthetic(tmp_path, name="00_synthetic.ipynb", value="2") -> Path:
    """A small notebook that passes ``check_notebook``: title + badge, install cell, parameters, a marked cell with
    its stored output, exercises with a checking cell; as ``course.execute`` would write it."""
    cells = [new_markdown_cell(f"# 00 · Synthetic\n\n{course.badge(name)}\n\n{HEADER}"),
             new_code_cell(course.install_cell()),
             new_code_cell("X = 1", metadata={"tags": ["parameters"]}),
             new_code_cell(f"{course.MARKER}\nprint(X + 1)"),
             new_markdown_cell("## Exercises\n1. Eq. (2)...")]
    for eid, fn in (("02.1", "correlation_loss"), ("02.2", "eta_weights"), ("02.3", "stop_step")):
        cells += [new_code_cell(f"# Exercise {eid}: ...\ndef {fn}(*args):\n    raise NotImplementedError  # your code"),
                  new_code_cell(f'from sepme_lib import exercises\nexercises.check("{eid}", {fn})')]
    counts = iter(range(1, 20))
    for c in cells:
        if c.cell_type == "code":
            c.execution_count = next(counts)
    cells[3].outputs = [new_output("stream", name="stdout", text=f"{value}\n")]
    nb = new_notebook(cells=cells)
    course.normalise(nb, "ci")
    path = tmp_path / name
    nbformat.write(nb, path)
    return path


def test_check_accepts_a_good_notebook(tmp_path):
    assert course.check_notebook(synthetic(tmp_path)) == []


@pytest.mark.parametrize("breakage, expected", [
    ("edit", "code cells changed since"),
    ("strip", "without stored output"),
    ("counts", "not one top-to-bottom run"),
    ("version", "executed with sepme_lib"),
    ("install", "install cell"),
    ("badge", "no Colab badge"),
    ("ids", "cells without ids"),
    ("exercises", "Exercises"),
    ("header", "header lines"),
])
def test_check_catches_stale_or_broken_notebooks(tmp_path, breakage, expected):
    path = synthetic(tmp_path)
    raw = json.loads(path.read_text())
    cells = raw["cells"]
    if breakage == "edit":
        cells[3]["source"] = course.MARKER + "\nprint(X + 2)"
    elif breakage == "strip":
        cells[3]["outputs"] = []
    elif breakage == "counts":
        cells[3]["execution_count"] = 7
    elif breakage == "version":
        raw["metadata"]["sepme"]["version"] = "0.0.1"
    elif breakage == "install":
        cells[1]["source"] = "# Colab only (elsewhere this cell does nothing)\nimport google.colab"
    elif breakage == "badge":
        cells[0]["source"] = "# 00 · Synthetic\n\n" + HEADER
    elif breakage == "header":
        cells[0]["source"] = f"# 00 · Synthetic\n\n{course.badge(path.name)}"
    elif breakage == "ids":
        del cells[2]["id"]
    elif breakage == "exercises":
        cells[5]["source"] = "answer = 2"
    path.write_text(json.dumps(raw))
    problems = course.check_notebook(path)
    assert any(expected in p for p in problems), problems


def test_nbval_fails_when_a_stored_marked_output_changes(tmp_path):
    """The markers check something: in one nbval run, the notebook whose marked cell stored "2" passes and the one
    that stored "3" fails (the cell prints 2), on that cell only."""
    good, bad = synthetic(tmp_path, "00_good.ipynb"), synthetic(tmp_path, "01_bad.ipynb", value="3")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "--nbval-lax",
                        "--nbval-current-env", good.name, bad.name], cwd=tmp_path, env=dict(os.environ, PROFILE="ci"),
                       capture_output=True, text=True, timeout=300)
    failed = [x for x in r.stdout.splitlines() if x.startswith("FAILED")]
    passed = [x for x in r.stdout.splitlines() if x.startswith("PASSED")]
    assert r.returncode == 1 and len(failed) == 1 and failed[0].startswith("FAILED 01_bad.ipynb::Cell 2"), r.stdout[-3000:]
    assert any(x.startswith("PASSED 00_good.ipynb::Cell 2") for x in passed), r.stdout[-3000:]


def test_every_marked_cell_of_the_real_notebooks_has_stored_output():
    """With the test above, this is what makes nbval's comparison real for the course's notebooks."""
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        marked = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(course.MARKER)]
        assert marked, f"{path.name} has no {course.MARKER} cell"
        for c in marked:
            assert c.get("outputs") and c.get("execution_count"), f"{path.name}: a marked cell without stored output"


# ------------------------------------------------------------------------------------------ set-repo
def test_set_repo_rewrites_config_badges_and_install_cells(tmp_path):
    cfg = tmp_path / "config.py"
    cfg.write_text('VERSION = "x"\nREPO = "sepme-course/sepme-course"\n')
    nbs = [synthetic(tmp_path, "00_synthetic.ipynb"), synthetic(tmp_path, "01_other.ipynb")]
    out = course.set_repo("my-org/my-course", nbs, config_path=cfg)
    assert out == {"config": True, "notebooks": ["00_synthetic.ipynb", "01_other.ipynb"]}
    assert 'REPO = "my-org/my-course"' in cfg.read_text()
    for p in nbs:
        nb = nbformat.read(p, as_version=4)
        assert course.badge_url(p.name, "my-org/my-course") in nb.cells[0].source
        assert "sepme-course/sepme-course" not in nb.cells[0].source
        assert nb.cells[1].source == course.install_cell("my-org/my-course")
        assert 'REPO = "my-org/my-course"' in nb.cells[1].source
    again = course.set_repo("my-org/my-course", nbs, config_path=cfg)
    assert again == {"config": False, "notebooks": []}
    with pytest.raises(ValueError, match="OWNER/NAME"):
        course.set_repo("not a repo", nbs, config_path=cfg)


def test_set_repo_keeps_the_code_hash():
    """Rewriting the install cell does not make a notebook stale (it runs only on Colab)."""
    nb = new_notebook(cells=[new_code_cell(course.install_cell("a/b")), new_code_cell("x = 1")])
    h = course.code_hash(nb)
    nb.cells[0].source = course.install_cell("c/d")
    assert course.code_hash(nb) == h


# ------------------------------------------------------------------------------------------ Colab install cell
def _source_repo(tmp_path) -> Path:
    """A git repository holding the course as it is now (what the install cell clones)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("sepme_lib", "data"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=src, check=True)
    subprocess.run(["git", "add", "-A"], cwd=src, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "course"], cwd=src, check=True)
    return src


@pytest.fixture(scope="module")
def colab(tmp_path_factory):
    """Run the install cell in a fresh interpreter where ``google.colab`` exists (a fake module on the path): it
    clones a local copy of the course, pip-installs it (into a target folder, without dependencies: the test
    environment has them; that install is a regular, non-editable one) and imports it without a restart."""
    tmp = tmp_path_factory.mktemp("colab")
    fake = tmp / "fake"
    (fake / "google" / "colab").mkdir(parents=True)
    (fake / "google" / "colab" / "__init__.py").write_text("")
    (fake / "google" / "colab" / "output.py").write_text(
        "CALLS = []\ndef enable_custom_widget_manager():\n    CALLS.append('widgets')\n")
    src = _source_repo(tmp)
    script = tmp / "kernel.py"
    script.write_text(course.install_cell() + "\n" + "\n".join([
        "import sepme_lib as sm", "from sepme_lib import config", "import google.colab.output as out",
        "model = sm.load_model('tiny', device='cpu')",
        "print('RESULT', ON_COLAB, sm.__file__, config.DATA, config.TINY_DIR.is_dir(), out.CALLS, model.family)",
        # the pip-installed copy (no clone next to it): where does its config find data/?
        "import importlib.util, os",
        "spec = importlib.util.spec_from_file_location('installed_config', os.path.join(os.environ['PIP_TARGET'], "
        "'sepme_lib', 'config.py'))",
        "cfg = importlib.util.module_from_spec(spec); spec.loader.exec_module(cfg)",
        "print('INSTALLED', cfg.VERSION, cfg.DATA, cfg.TINY_DIR.is_dir(), cfg.CLASSIFIER_PATH.exists())"]))
    env = dict(os.environ, PYTHONPATH=str(fake), SEPME_HOME=str(tmp / "home"), SEPME_CLONE_URL=str(src),
               PIP_TARGET=str(tmp / "target"), PIP_NO_DEPS="1", PIP_NO_BUILD_ISOLATION="0",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("SEPME_DATA", None)
    r = subprocess.run([sys.executable, str(script)], cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    return tmp, r


def test_install_cell_on_fake_colab_imports_without_restart(colab):
    tmp, r = colab
    assert r.returncode == 0, r.stderr[-3000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT")][-1].split()
    home = str(tmp / "home")
    assert line[1] == "True" and line[2].startswith(home) and line[3] == f"{home}/data" and line[4] == "True"
    assert "['widgets']" in r.stdout and line[-1] == "tiny"


def test_regular_pip_install_ships_the_data(colab):
    """The install cell's ``pip install`` (regular, not editable) put data/ in site-packages/sepme_lib/data, where the
    installed package's ``config`` finds it (no clone next to it)."""
    tmp, r = colab
    assert r.returncode == 0, r.stderr[-3000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("INSTALLED")][-1].split()
    assert line[1:] == [config.VERSION, str(tmp / "target" / "sepme_lib" / "data"), "True", "True"]


def test_install_cell_does_nothing_outside_colab(tmp_path):
    r = subprocess.run([sys.executable, "-c", course.install_cell() + "\nprint('ON_COLAB', ON_COLAB)"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60, env=dict(os.environ, SEPME_HOME=str(tmp_path / "h")))
    assert r.returncode == 0 and "ON_COLAB False" in r.stdout, r.stderr
    assert not (tmp_path / "h").exists()


def test_default_dtype(monkeypatch):
    monkeypatch.delenv("SEPME_DTYPE", raising=False)
    assert config.default_dtype("tiny", "cpu") is None
    assert config.default_dtype("CompVis/stable-diffusion-v1-4", "cpu") is None
    monkeypatch.setenv("SEPME_DTYPE", "fp16")
    assert config.default_dtype("x", "cpu") == "fp16"
    monkeypatch.setenv("SEPME_DTYPE", "fp8")
    with pytest.raises(ValueError, match="SEPME_DTYPE"):
        config.default_dtype("x", "cpu")


def test_sample_batch_per_family(monkeypatch, tiny_sd):
    monkeypatch.delenv("SEPME_BATCH", raising=False)
    assert families.get("tiny").sample_batch() == 64 and families.get("sd").sample_batch() == 8
    seen = []
    real = tiny_sd.embed
    monkeypatch.setattr(tiny_sd, "embed", lambda ps: seen.append(len(ps)) or real(ps))
    tiny_sd.sample(["a cat"] * 10, steps=1)
    assert [n for n in seen if n > 1] == [8, 2]  # two chunks of at most 8 prompts (1: the cached empty prompt)
    monkeypatch.setenv("SEPME_BATCH", "0")
    with pytest.raises(ValueError, match="SEPME_BATCH"):
        families.get("sd").sample_batch()


def test_course_run_reports_a_failing_shell_line_and_a_malformed_notebook(tmp_path):
    """A failing ``!cmd`` stops the run with the command and its status (IPython alone only sets ``_exit_code``); a
    notebook that is not valid JSON is reported with its file name, the others still run, and report.html is written."""
    import nbformat

    src = tmp_path / "nbs"
    src.mkdir()
    ok = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# title"),
                                         nbformat.v4.new_code_cell("!true\nx = 1"), nbformat.v4.new_code_cell("x + 1")])
    bad = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("!false\ny = 2"), nbformat.v4.new_code_cell("y")])
    nbformat.write(ok, src / "01_ok.ipynb")
    nbformat.write(bad, src / "02_shell.ipynb")
    (src / "03_broken.ipynb").write_text('{"cells": [')
    results = {r["name"]: r for r in course.run(src, tmp_path / "out", timeout=120, html_out=False)}
    assert results["01_ok"]["error"] is None
    ran = nbformat.read(tmp_path / "out" / "01_ok.ipynb", as_version=4)
    # the runner's own check leaves every cell where it was and adds no execution count
    assert [c.cell_type for c in ran.cells] == ["markdown", "code", "code"] and ran.cells[0].source == "# title"
    assert [c.execution_count for c in ran.cells[1:]] == [1, 2] and ran.cells[2].outputs[0]["data"]["text/plain"] == "2"
    assert "!false exited with status 1" in results["02_shell"]["error"]
    assert "03_broken.ipynb" in results["03_broken"]["error"] and "not a readable notebook" in results["03_broken"]["error"]
    report = course.write_report(list(results.values()), tmp_path / "out")
    assert report.exists() and "03_broken" in report.read_text()
