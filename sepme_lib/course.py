"""Run the whole course: ``python -m sepme_lib.course`` (what ``make course`` calls).

Executes every ``notebooks/NN_*.ipynb`` in order with the current Python (``PROFILE`` from the
environment, ``full`` by default), writes the executed notebooks and an HTML rendering of each into
``build/``, and ``build/report.html``: one page with the run times, links, and every table the notebooks
printed.
"""
from __future__ import annotations

import argparse
import html
import os
import re
import sys
import time
from pathlib import Path

from . import config
from .report import md_table_to_html


def run(notebooks_dir: Path, out_dir: Path, pattern: str = "[0-9][0-9]_*.ipynb", timeout: int = 3600) -> list[dict]:
    import nbformat
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import ExecutePreprocessor

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = sorted(notebooks_dir.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no notebooks matching {pattern} in {notebooks_dir}")
    results = []
    for p in paths:
        print(f"running {p.name} (PROFILE={os.environ.get('PROFILE', 'full')}) ...", flush=True)
        nb = nbformat.read(p, as_version=4)
        t0 = time.time()
        ep = ExecutePreprocessor(timeout=timeout, kernel_name="python3")
        error = None
        try:
            ep.preprocess(nb, {"metadata": {"path": str(p.parent)}})
        except Exception as e:  # noqa: BLE001 - recorded in the report, the run goes on
            error = error_text(e)
            print(f"  FAILED in {p.name}:\n{error}", flush=True)
        dt = time.time() - t0
        nbformat.write(nb, out_dir / p.name)
        body, _ = HTMLExporter().from_notebook_node(nb)
        (out_dir / p.with_suffix(".html").name).write_text(body)
        results.append(dict(name=p.stem, seconds=round(dt, 1), error=error, nb=nb))
        print(f"  {dt:.0f} s -> {out_dir / p.name}", flush=True)
    return results


def tables_of(nb) -> list[str]:
    """The markdown/HTML tables a notebook displayed, as HTML snippets."""
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            data = o.get("data", {})
            if "text/markdown" in data and "|---" in data["text/markdown"]:
                out.append(md_table_to_html(data["text/markdown"]))
            elif "text/html" in data and "<table" in data["text/html"]:
                out.append(data["text/html"])
    return out


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def error_text(e: BaseException, limit: int = 3000) -> str:
    """A notebook's error as plain text (nbconvert's message carries terminal colour codes): the failing cell's
    traceback tail, so the console and the report say what went wrong."""
    return ANSI.sub("", f"{type(e).__name__}: {e}")[-limit:]


def write_report(results, out_dir: Path) -> Path:
    prof = os.environ.get("PROFILE", "full")
    parts = ["<html><head><meta charset='utf-8'><title>sepme-course report</title><style>"
             "body{font-family:sans-serif;max-width:1000px;margin:auto} table{border-collapse:collapse;margin:8px 0}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}</style></head><body>",
             f"<h1>sepme-course: executed course (PROFILE={prof})</h1><ul>"]
    for r in results:
        status = "ok" if not r["error"] else f"<b>FAILED</b><pre>{html.escape(r['error'])}</pre>"
        parts.append(f"<li><a href='{r['name']}.html'>{r['name']}</a> ({r['seconds']} s) {status}</li>")
    parts.append(f"</ul><p>Total: {sum(r['seconds'] for r in results):.0f} s</p>")
    for r in results:
        tabs = tables_of(r["nb"])
        if tabs:
            parts.append(f"<h2>{r['name']}</h2>" + "".join(tabs))
    parts.append("</body></html>")
    path = out_dir / "report.html"
    path.write_text("\n".join(parts))
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--notebooks", type=Path, default=config.ROOT / "notebooks")
    ap.add_argument("--out", type=Path, default=config.ROOT / "build")
    ap.add_argument("--pattern", default="[0-9][0-9]_*.ipynb")
    args = ap.parse_args(argv)
    t0 = time.time()
    results = run(args.notebooks, args.out, args.pattern)
    report = write_report(results, args.out)
    print(f"\nexecuted notebooks and HTML in {args.out}/; report: {report} ({time.time() - t0:.0f} s)")
    return 1 if any(r["error"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
