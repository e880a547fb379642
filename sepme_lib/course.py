"""The course's notebooks as files: run them, execute them in place, check them, point them at a repository.

``python -m sepme_lib.course <command>`` (``make course``, ``make notebooks``, ``make test-sd`` call it):

* ``run`` (the default) -- execute every ``notebooks/NN_*.ipynb`` in order with the current environment (``PROFILE``,
  ``MODEL``, ...) into ``build/`` with an HTML rendering of each and ``build/report.html`` (run times, links, every
  table the notebooks printed); exit status 1 if any notebook failed.
* ``execute [NB ...]`` -- re-execute notebooks **in place** in the ``ci`` profile on the CPU with the bundled model
  (what is committed, so that every figure, table and number shows on the repository page and nbval has stored
  outputs to compare), and record the library version, profile and a hash of the code cells in the metadata.
* ``check [NB ...]`` -- the committed notebooks are executed and current: one top-to-bottom run (execution counts
  1, 2, 3, ...), no error output, stored outputs on every ``# NBVAL_CHECK_OUTPUT`` cell, the recorded version
  equal to ``sepme_lib.__version__`` and the recorded code hash equal to the code now in the cells (edit a cell
  without re-executing and this fails), the Colab badge and install cell of ``config.REPO``, the kernel
  ``python3``, cell ids (nbformat 4.5), a title, checked exercises, outputs under ``MAX_OUTPUT_BYTES``.
* ``set-repo OWNER/NAME`` -- write ``config.REPO`` and rewrite every notebook's badge and install cell.
* ``test-sd`` -- build a random-weight Stable Diffusion folder (``random_sd``) in a temporary directory and run every
  notebook on it (``MODEL``/``SEPME_CLIP`` set, ``PROFILE=ci``, CPU): the plumbing of the SD path, not its numbers.
* ``install-cell`` -- print the Colab install cell.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from . import config, exercises, random_sd, report
from .config import environment  # noqa: F401 - course.environment, used by the runner and tests
from .report import write_report

NOTEBOOKS = config.ROOT / "notebooks"
PATTERN = "[0-9][0-9]_*.ipynb"
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
MARKER = "# NBVAL_CHECK_OUTPUT"
MAX_OUTPUT_BYTES = 1_000_000
REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*/[A-Za-z0-9._-]+$")
BADGE_RE = re.compile(r"https://colab\.research\.google\.com/github/[^)\s]+?/blob/main/notebooks/([^)\s]+\.ipynb)")
INSTALL_FIRST_LINE = "# Colab only (elsewhere this cell does nothing)"
INSTALL_CELL = '''\
# Colab only (elsewhere this cell does nothing): clone the course, pip-install it, and import it in this kernel.
import importlib, os, subprocess, sys
REPO = "{repo}"  # set everywhere by `python -m sepme_lib.course set-repo OWNER/NAME`
try:
    import google.colab  # noqa: F401  (exists only on Colab)
    ON_COLAB = True
except ImportError:
    ON_COLAB = False
if ON_COLAB:
    os.environ.setdefault("SEPME_ALLOW_DOWNLOAD", "1")  # Stable Diffusion weights from the hub (MODEL = "CompVis/...")
    HOME = os.environ.get("SEPME_HOME", "/content/sepme-course")
    if not os.path.isdir(os.path.join(HOME, "sepme_lib")):
        url = os.environ.get("SEPME_CLONE_URL", f"https://github.com/{{REPO}}")
        subprocess.run(["git", "clone", "-q", "--depth", "1", url, HOME], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", HOME], check=True)
    if HOME not in sys.path:
        sys.path.insert(0, HOME)  # importable now, without restarting the kernel; data/ is found next to it
    importlib.invalidate_caches()
    from google.colab import output
    output.enable_custom_widget_manager()  # ipywidgets 8 (notebook 05's widget)'''


# ------------------------------------------------------------------------------------------ badge, install cell
def install_cell(repo: str | None = None) -> str:
    """The install cell every notebook opens with (its first code cell), for ``repo`` (default ``config.REPO``)."""
    return INSTALL_CELL.format(repo=repo or config.REPO)


def badge_url(name: str, repo: str | None = None) -> str:
    """The Colab URL of ``notebooks/<name>`` in ``repo`` (default ``config.REPO``)."""
    return f"https://colab.research.google.com/github/{repo or config.REPO}/blob/main/notebooks/{name}"


def badge(name: str, repo: str | None = None) -> str:
    """The markdown Colab badge of ``notebooks/<name>``."""
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({badge_url(name, repo)})"


def _is_install_cell(cell) -> bool:
    return cell.cell_type == "code" and ("google.colab" in cell.source or cell.source.startswith(INSTALL_FIRST_LINE))


def install_cell_index(nb) -> int | None:
    """Index of the install cell: the first code cell, if it mentions ``google.colab``."""
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    return code[0] if code and _is_install_cell(nb.cells[code[0]]) else None


def set_repo(repo: str, notebooks=None, config_path: Path | None = None) -> dict:
    """Point the course at ``repo`` (OWNER/NAME): rewrite ``REPO = ...`` in ``config.py``, every notebook's Colab
    badge, and every install cell. Returns ``{"config": changed?, "notebooks": [names changed]}``."""
    import nbformat

    if not isinstance(repo, str) or not REPO_RE.match(repo):
        raise ValueError(f"expected OWNER/NAME (a GitHub repository, e.g. my-org/sepme-course), got {repo!r}")
    config_path = Path(config_path or Path(config.__file__))
    text = config_path.read_text()
    new = re.sub(r'^REPO = "[^"]*"', f'REPO = "{repo}"', text, count=1, flags=re.M)
    if 'REPO = "' not in text:
        raise ValueError(f"{config_path} has no line REPO = \"...\" to rewrite")
    if new != text:
        config_path.write_text(new)
    changed = []
    for path in notebook_paths(notebooks):
        nb = nbformat.read(path, as_version=4)
        before = json.dumps(nb, sort_keys=True)
        for cell in nb.cells:
            if cell.cell_type == "markdown":
                cell.source = BADGE_RE.sub(lambda m: badge_url(m.group(1), repo), cell.source)
        i = install_cell_index(nb)
        if i is not None:
            nb.cells[i].source = install_cell(repo)
        if json.dumps(nb, sort_keys=True) != before:
            nbformat.write(nb, path)
            changed.append(path.name)
    return {"config": new != text, "notebooks": changed}


# ------------------------------------------------------------------------------------------ metadata
def code_hash(nb) -> str:
    """A hash of the code cells' sources, the install cell excepted (it runs only on Colab and ``set-repo`` rewrites
    it): recorded by :func:`execute`, compared by :func:`check`."""
    h = hashlib.sha256()
    skip = install_cell_index(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and i != skip:
            h.update(cell.source.strip().encode() + b"\0")
    return h.hexdigest()[:16]


def normalise(nb, profile: str = "ci") -> None:
    """Kernel ``python3``, nbformat 4.5 with a stable id on every cell, no per-cell timing, and the run's record in
    ``metadata["sepme"]`` (library version, profile, code hash)."""
    nb.nbformat, nb.nbformat_minor = 4, 5
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    seen = set()
    for k, cell in enumerate(nb.cells):
        cid = cell.get("id")
        if not cid or cid in seen:
            cid = f"cell-{k:02d}-" + hashlib.sha1(cell.source.encode()).hexdigest()[:8]
        cell["id"] = cid
        seen.add(cid)
        cell.metadata.pop("execution", None)
    nb.metadata["sepme"] = {"version": config.VERSION, "profile": profile, "code_sha256": code_hash(nb)}


def notebook_paths(notebooks=None) -> list[Path]:
    """Notebook paths from names/paths/numbers (``"05"``), or every ``notebooks/NN_*.ipynb``."""
    if not notebooks:
        paths = sorted(NOTEBOOKS.glob(PATTERN))
    else:
        paths = []
        for n in notebooks:
            p = Path(n)
            if not p.exists():
                hits = sorted(NOTEBOOKS.glob(f"{n}*.ipynb")) if re.fullmatch(r"\d\d", str(n)) else []
                if len(hits) != 1:
                    raise FileNotFoundError(f"no notebook {n!r} (give a path, or a number such as 05)")
                p = hits[0]
            paths.append(p)
    if not paths:
        raise FileNotFoundError(f"no notebooks matching {PATTERN} in {NOTEBOOKS}")
    return paths


# ------------------------------------------------------------------------------------------ execution
def _execute(nb, path: Path, timeout: int, store_widget_state: bool = True):
    """Run ``nb`` in a fresh ``python3`` kernel with the notebook's folder as working directory; returns the error
    text or ``None``. Committed notebooks store widget state only where :func:`execute` keeps it (notebook 05's, when
    small: viewers that render widgets then show its controls)."""
    import nbformat
    from nbconvert.preprocessors import ExecutePreprocessor

    class Checked(ExecutePreprocessor):
        """Runs :data:`SHELL_CHECK` (not stored, no execution count) before the first cell."""

        def preprocess_cell(self, cell, resources, index):
            if index == 0:  # execute_cell stores what it ran at the index given: put the notebook's cell back
                self.execute_cell(nbformat.v4.new_code_cell(SHELL_CHECK), index, store_history=False)
                self.nb.cells[index] = cell
            return super().preprocess_cell(cell, resources, index)

    ep = Checked(timeout=timeout, kernel_name="python3", record_timing=True, store_widget_state=store_widget_state)
    try:
        ep.preprocess(nb, {"metadata": {"path": str(path.parent)}})
    except Exception as e:  # noqa: BLE001 - reported by the caller
        return error_text(e)
    return None


# A notebook's shell line (``!cmd``) that fails only sets ``_exit_code`` in IPython: the run would go on and report
# success. The runner makes such a line raise, naming the command and its status.
SHELL_CHECK = """\
def _sepme_checked_system(cmd, _system=get_ipython().system):
    out = _system(cmd)
    status = get_ipython().user_ns.get("_exit_code", 0)
    if status:
        raise RuntimeError(f"the shell line !{cmd} exited with status {status}")
    return out
get_ipython().system = _sepme_checked_system
del _sepme_checked_system
"""


def ci_environment() -> dict:
    """The environment committed outputs come from: ``PROFILE=ci``, the bundled model, the CPU, one torch thread (float
    sums, and so a momentum stop step, can change with the thread count; ``make test-notebooks`` uses one too), and no
    weight-loading progress bars, which would be stored as empty widgets."""
    return dict(PROFILE="ci", SEPME_DEVICE="cpu", MODEL="tiny", RECOMPUTE="0", HF_HUB_DISABLE_PROGRESS_BARS="1",
                SEPME_THREADS="1", OMP_NUM_THREADS="1")


def execute(notebooks=None, timeout: int = 1800) -> list[dict]:
    """Re-execute notebooks in place in the ci profile (``make notebooks``); a failing notebook is not written."""
    import nbformat

    results = []
    with environment(ci_environment(), drop=("SEPME_CLIP",)):
        for path in notebook_paths(notebooks):
            nb = nbformat.read(path, as_version=4)
            t0 = time.time()
            # widget state (the last value of every widget, its images included) is kept for notebook 05 only, and
            # only while it stays small; the widget's output also holds a PNG snapshot for viewers without widgets
            keep = {"05_interactive_combination.ipynb": 250_000}.get(path.name, 0)
            err = _execute(nb, path, timeout, store_widget_state=bool(keep))
            dt = time.time() - t0
            if err is None:
                slow = ", ".join(f"cell {k} {sec:.0f} s" for k, sec in report.cell_seconds(nb)[:5])
                print(f"{path.name}: slowest cells {slow}", flush=True)
                size = len(json.dumps(nb.metadata.get("widgets", {})))
                if size > keep:
                    nb.metadata.pop("widgets", None)
                    if keep:
                        print(f"{path.name}: widget state of {size / 1e3:.0f} kB > {keep / 1e3:.0f} kB not stored")
                normalise(nb, "ci")
                nbformat.write(nb, path)
            print(f"{path.name}: {dt:.0f} s" + (f"  FAILED (not written)\n{err}" if err else ""), flush=True)
            results.append(dict(name=path.name, seconds=round(dt, 1), error=err))
    return results


def run(notebooks_dir: Path, out_dir: Path, pattern: str = PATTERN, timeout: int = 3600, html_out: bool = True
        ) -> list[dict]:
    """Execute every notebook in order with the current environment into ``out_dir`` (``make course``)."""
    import nbformat
    from nbconvert import HTMLExporter

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = sorted(Path(notebooks_dir).glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no notebooks matching {pattern} in {notebooks_dir}")
    results = []
    for p in paths:
        print(f"running {p.name} (PROFILE={os.environ.get('PROFILE', 'full')}, MODEL={config.model_name()}) ...",
              flush=True)
        t0 = time.time()
        try:
            nb = nbformat.read(p, as_version=4)
        except Exception as e:  # noqa: BLE001 - malformed JSON, a wrong format version...: report it with the file
            error = (f"{p}: not a readable notebook ({type(e).__name__}: {str(e)[:300]}); restore it with "
                     f"`git checkout {p}` or re-save it from Jupyter")
            print(f"  FAILED: {error}", flush=True)
            results.append(dict(name=p.stem, seconds=0.0, error=error, nb=None))
            continue
        error = _execute(nb, p, timeout)
        if error:
            print(f"  FAILED in {p.name}:\n{error}", flush=True)
        dt = time.time() - t0
        nbformat.write(nb, out_dir / p.name)
        if html_out:
            body, _ = HTMLExporter().from_notebook_node(nb)
            (out_dir / p.with_suffix(".html").name).write_text(body)
        results.append(dict(name=p.stem, seconds=round(dt, 1), error=error, nb=nb))
        print(f"  {dt:.0f} s -> {out_dir / p.name}", flush=True)
    return results


def run_on_random_sd(out_dir: Path | None = None, pattern: str = PATTERN, kind: str = "sd") -> list[dict]:
    """Every notebook on a random-weight SD 1.x (``kind="sd"``) or SDXL (``"sdxl"``) folder (``make test-sd`` runs
    both): ``PROFILE=ci``, CPU, ``MODEL`` and ``SEPME_CLIP`` pointing at ``random_sd.build_folder``'s pipeline and CLIP
    judge in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix=f"sepme-{random_sd.check_kind(kind)}-") as tmp:
        t0 = time.time()
        folders = random_sd.build_folder(Path(tmp) / "rsd", kind=kind)
        print(f"random {kind} folder in {time.time() - t0:.0f} s: {folders['pipeline']}", flush=True)
        env = dict(MODEL=str(folders["pipeline"]), SEPME_CLIP=str(folders["clip"]), PROFILE="ci", SEPME_DEVICE="cpu",
                   HF_HUB_DISABLE_PROGRESS_BARS="1")
        with environment(env):
            return run(NOTEBOOKS, Path(out_dir or Path(tmp) / "out"), pattern, timeout=900, html_out=False)


# ------------------------------------------------------------------------------------------ checks
def _output_bytes(cell) -> int:
    return len(json.dumps(cell.get("outputs", [])))


def check_notebook(path: Path) -> list[str]:
    """Problems of one committed notebook (empty list: it is executed, current and consistent; see the module
    docstring for what is checked)."""
    import nbformat

    raw = json.loads(Path(path).read_text())
    nb = nbformat.reads(json.dumps(raw), as_version=4)
    name, bad = Path(path).name, []
    if (raw.get("nbformat"), raw.get("nbformat_minor")) != (4, 5):
        bad.append(f"nbformat {raw.get('nbformat')}.{raw.get('nbformat_minor')}, expected 4.5 (with cell ids)")
    ids = [c.get("id") for c in raw.get("cells", [])]
    if not all(ids) or len(set(ids)) != len(ids):
        bad.append("cells without ids or with repeated ids (JupyterLab would add them and mark the notebook modified)")
    if raw.get("metadata", {}).get("kernelspec") != KERNELSPEC:
        bad.append(f"kernelspec {raw.get('metadata', {}).get('kernelspec')}, expected {KERNELSPEC}")
    cells = nb.cells
    first = cells[0].source if cells and cells[0].cell_type == "markdown" else ""
    if not re.match(rf"# {name[:2]} · \S", first):
        bad.append(f"the first cell is not a title '# {name[:2]} · ...'")
    if not (re.search(r"\*\*Time\*\*.*\d+\s*(s|min)\b.*ci", first) and "**Stored outputs**" in first
            and "**On Colab**" in first):
        bad.append("the title cell lacks the header lines '**Time**: ... (ci ... full ... Colab ...)', "
                   "'**Stored outputs**: ...' and '**On Colab**: ...'")
    if badge_url(name) not in first:
        bad.append(f"no Colab badge for {config.REPO} in the title cell (python -m sepme_lib.course set-repo)")
    i = install_cell_index(nb)
    if i is None or cells[i].source != install_cell():
        bad.append("the first code cell is not the install cell of course.install_cell() "
                   "(python -m sepme_lib.course set-repo OWNER/NAME rewrites it)")
    code = [c for c in cells if c.cell_type == "code"]
    if not any("parameters" in c.metadata.get("tags", []) for c in code):
        bad.append("no code cell tagged 'parameters'")
    empty = [k for k, c in enumerate(cells) if c.cell_type == "code" and not c.source.strip()]
    if empty:
        bad.append(f"empty code cells at {empty}")
    counts = [c.get("execution_count") for c in code if c.source.strip()]
    if counts != list(range(1, len(counts) + 1)):
        bad.append(f"not one top-to-bottom run: execution counts {counts[:12]}{'...' if len(counts) > 12 else ''} "
                   "(run `make notebooks`)")
    errors = [k for k, c in enumerate(cells) for o in c.get("outputs", []) if o.get("output_type") == "error"]
    if errors:
        bad.append(f"error outputs in cells {errors}")
    unchecked = [k for k, c in enumerate(cells) if c.cell_type == "code" and c.source.startswith(MARKER)
                 and not c.get("outputs")]
    if unchecked:
        bad.append(f"{MARKER} cells without stored output (nbval would check nothing): {unchecked}")
    if not any(c.source.startswith(MARKER) for c in code):
        bad.append(f"no {MARKER} cell")
    rec = nb.metadata.get("sepme", {})
    if rec.get("version") != config.VERSION:
        bad.append(f"executed with sepme_lib {rec.get('version')}, the library is {config.VERSION} (make notebooks)")
    if rec.get("profile") != "ci":
        bad.append(f"executed in profile {rec.get('profile')!r}; commit the ci run (make notebooks)")
    if rec.get("code_sha256") != code_hash(nb):
        bad.append("code cells changed since the notebook was executed: its outputs are stale (make notebooks)")
    try:
        found = exercises.notebook_exercises(raw)
    except ValueError as e:
        found, _ = {}, bad.append(str(e))
    if not any(c.cell_type == "markdown" and re.search(r"^## Exercises", c.source, re.M) for c in cells) \
            or len(found) < 3:
        bad.append(f"{len(found)} exercises (stub cells '# Exercise NN.k' + exercises.check); at least 3 after "
                   "'## Exercises'")
    size = sum(_output_bytes(c) for c in cells)
    if size > MAX_OUTPUT_BYTES:
        bad.append(f"outputs are {size / 1e6:.1f} MB (> {MAX_OUTPUT_BYTES / 1e6:.1f} MB): smaller figures")
    return bad


def check(notebooks=None) -> dict:
    """``{name: [problems]}`` of :func:`check_notebook` for every notebook (``make check-notebooks``)."""
    return {p.name: check_notebook(p) for p in notebook_paths(notebooks)}


# ------------------------------------------------------------------------------------------ report
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def error_text(e: BaseException, limit: int = 3000) -> str:
    """A notebook's error as plain text (nbconvert's message carries terminal colour codes): the failing cell's
    traceback tail, so the console and the report say what went wrong."""
    return ANSI.sub("", f"{type(e).__name__}: {e}")[-limit:]


# ------------------------------------------------------------------------------------------ command line
COMMANDS = ("run", "execute", "check", "set-repo", "test-sd", "install-cell")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sepme_lib.course", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command")
    r = sub.add_parser("run", help="every notebook in order into build/ with report.html (make course)")
    r.add_argument("--notebooks", type=Path, default=NOTEBOOKS)
    r.add_argument("--out", type=Path, default=config.ROOT / "build")
    r.add_argument("--pattern", default=PATTERN)
    e = sub.add_parser("execute", help="re-execute notebooks in place, ci profile, CPU (make notebooks)")
    e.add_argument("notebooks", nargs="*", help="paths or numbers (05); default: all")
    c = sub.add_parser("check", help="committed notebooks are executed and current")
    c.add_argument("notebooks", nargs="*")
    s = sub.add_parser("set-repo", help="write config.REPO and rewrite every badge and install cell")
    s.add_argument("repo", help="OWNER/NAME of the GitHub repository")
    t = sub.add_parser("test-sd", help="every notebook on a random-weight SD folder, ci profile (make test-sd)")
    t.add_argument("--pattern", default=PATTERN)
    t.add_argument("--kind", choices=random_sd.KINDS, default="sd", help="sd: SD 1.x (default); sdxl: SDXL")
    sub.add_parser("install-cell", help="print the Colab install cell")
    return ap


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv = ["run"] + argv  # `python -m sepme_lib.course [--out ...]` runs the course, as before
    args = parser().parse_args(argv)
    t0 = time.time()
    if args.command == "install-cell":
        print(install_cell())
        return 0
    if args.command == "set-repo":
        out = set_repo(args.repo)
        print(f"REPO = {args.repo!r} in config.py ({'changed' if out['config'] else 'unchanged'}); badges and install "
              f"cells rewritten in {len(out['notebooks'])} notebook(s): {', '.join(out['notebooks']) or '-'}")
        return 0
    if args.command == "check":
        problems = {k: v for k, v in check(args.notebooks).items() if v}
        for name, bad in problems.items():
            print(f"{name}:\n  - " + "\n  - ".join(bad))
        print("all notebooks executed and current" if not problems else f"{len(problems)} notebook(s) need work")
        return 1 if problems else 0
    if args.command == "execute":
        results = execute(args.notebooks)
    elif args.command == "test-sd":
        results = run_on_random_sd(pattern=args.pattern, kind=args.kind)
    else:
        results = run(args.notebooks, args.out, args.pattern)
        print(f"report: {write_report(results, args.out)}")
    failed = [r["name"] for r in results if r["error"]]
    times = ", ".join(f"{r['name'][:2]} {r['seconds']:.0f} s" for r in results)
    print(f"\n{len(results)} notebook(s) in {time.time() - t0:.0f} s ({times}); "
          + (f"FAILED: {', '.join(failed)}" if failed else "no failures"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
