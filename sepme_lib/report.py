"""Tables for people: markdown tables of results, their HTML form, and the benchmark reports.

Used by the notebooks (``IPython.display.Markdown(markdown_table(...))``), ``bench`` and ``course`` (whose
``build/report.html`` is written here). Plain Python: it imports only ``config`` from the rest of the library.
"""
from __future__ import annotations

import html
import os
from datetime import datetime
from pathlib import Path

from . import config

SUMMARY_KEYS = ("erased_acc", "others_acc", "perceptual_erased", "perceptual_others", "l1", "seconds", "redteam_acc")


def fmt(v) -> str:
    """A number with 2-3 significant digits (small values in exponent form); anything else as ``str``."""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 and v != 0 else f"{v:.2f}"
    return "" if v is None else str(v)


def markdown_table(rows, columns, header=None) -> str:
    """A small markdown table from a list of dicts."""
    header = header or columns
    out = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(out)


def combination_markdown(tab: dict, names=None) -> str:
    """A combination table (``evaluate.combination_table``) in the layout of the paper's Tables 3-5 (notebooks 03-04):
    one row per evaluated concept, one column per model ``theta + sum_{i in S} dTheta_i`` (``theta`` first). A bold
    cell is a concept erased in that column. ``names``: the increments in order (default: as they first appear in the
    rows); the caption says which ``dTheta_i`` is which."""
    rows = tab["rows"]
    names = list(names) if names is not None else list(dict.fromkeys(n for r in rows for n in r["subset"]))
    index = {n: i + 1 for i, n in enumerate(names)}
    unknown = sorted({n for r in rows for n in r["subset"]} - set(index))
    if unknown:
        raise ValueError(f"the table has increments {unknown} that are not in names={names}")
    header = ["concept", "θ"] + ["θ" + "".join(f" + Δθ{index[n]}" for n in sorted(r["subset"], key=index.get))
                                 for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c, a in tab["original"].items():
        cells = [fmt(a)] + [f"**{fmt(r['acc'][c])}**" if c in r["subset"] else fmt(r["acc"][c]) for r in rows]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    legend = ", ".join(f"Δθ{i} = {n}" for n, i in index.items())
    return f"ACC of each concept (rows) under each model (columns); {legend}; **bold** = erased in that column.\n\n" + \
        "\n".join(lines)


def with_others(tab: dict, concepts, label: str = "others") -> dict:
    """A copy of a combination table (``evaluate.combination_table``'s ``{"original", "rows"}``) whose ACC dicts also
    hold ``label``: the mean ACC of the classes not in ``concepts`` (the paper's "Others" row of Table 5). The
    classes it averages are the ones the table evaluated; nothing is added when there are none (notebook 07)."""
    concepts = set(concepts)

    def add(acc):
        rest = [v for k, v in acc.items() if k not in concepts and k != label]
        return dict(acc, **({label: sum(rest) / len(rest)} if rest else {}))

    return dict(tab, original=add(tab["original"]), rows=[dict(r, acc=add(r["acc"])) for r in tab["rows"]])


def erasure_markdown(results: dict, original: dict, concepts, l1: dict | None = None) -> str:
    """The layout of the paper's Tables 1-2 (notebook 07): a block of rows per erased set, one row per evaluated
    concept of ``concepts`` (``*`` = erased, as the paper's VG*), then ``others`` (the results' ``"Others"`` entry, or
    the mean ACC of every concept not in ``concepts``), one column per method with ``ORI`` (the unedited model) first.

    ``results[method][erased] = {concept: ACC}``, ``erased`` a name or names joined by ``+``; ``original``:
    ``{concept: ACC}``; ``l1[method][erased]``: ``||dTheta||_p`` (a last row per block)."""
    concepts, methods = list(concepts), list(results)
    if not methods:
        raise ValueError("erasure_markdown needs results of at least one method")
    erased_sets = list(dict.fromkeys(e for m in methods for e in results[m]))

    def value(acc, c):
        if acc is None:
            return None
        if c != "others":
            return acc.get(c)
        if "Others" in acc:
            return acc["Others"]
        rest = [v for k, v in acc.items() if k not in concepts]
        return sum(rest) / len(rest) if rest else None

    header = ["erased", "evaluated", "ORI", *methods]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in erased_sets:
        gone = set(e.split("+"))
        for c in concepts + ["others"]:
            vals = [value(original, c)] + [value(results[m].get(e), c) for m in methods]
            if c == "others" and all(v is None for v in vals):
                continue
            lines.append(f"| {e} | {c + '*' if c in gone else c} | " + " | ".join(fmt(v) for v in vals) + " |")
        if l1:
            lines.append(f"| {e} | ‖Δθ‖_p | - | " + " | ".join(fmt(l1.get(m, {}).get(e)) for m in methods) + " |")
    return "\n".join(lines)


def md_table_to_html(md: str) -> str:
    """The tables (and the caption lines) of a markdown snippet as HTML."""
    rows, pre = [], []
    for line in md.strip().splitlines():
        if line.startswith("|") and not set(line) <= set("|-: "):
            rows.append([html.escape(c.strip()) for c in line.strip("|").split("|")])
        elif not line.startswith("|"):
            pre.append(html.escape(line))
    if not rows:
        return ""
    head = "".join(f"<th>{c}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows[1:])
    return (f"<p>{'<br>'.join(pre)}</p>" if pre else "") + f"<table><tr>{head}</tr>{body}</table>"


def sepme_markdown(out: dict) -> str:
    """The SepME benchmark (``bench.bench_sepme``) in the paper's layout: Tables 1-2 (G-CiRs), 3-5 (combinations),
    6 (the tau sweep)."""
    evals = list(out["original"])
    parts = [f"Original model (ACC, {out['images_per_concept']} images per concept):\n",
             markdown_table([out["original"]], evals)]
    if "gcirs" in out:
        rows = [dict(erased=r["erased"], others=r["others"], l1=r["l1"], **r["acc"]) for r in out["gcirs"]]
        parts += ["\n\nG-CiRs (Tables 1-2 layout)\n", markdown_table(rows, ["erased"] + evals + ["others", "l1"])]
    for key, title in (("sepme1", "SepME_1 (separate)"), ("sepme2", "SepME_2 (iterative)")):
        if key not in out.get("tables", {}):
            continue
        rows = [dict(erased="+".join(r["subset"]), **r["acc"]) for r in out["tables"][key]]
        parts += [f"\n\n{title}: ACC of every style under theta + sum of the listed increments (Tables 3-5 layout)\n",
                  markdown_table(rows, ["erased"] + evals)]
        summ = {k: out[key][k] for k in ("leakage_max", "erased_acc_max", "others_ratio_min", "restoration_drift_max",
                                         "seconds_per_concept")}
        parts += ["\n\n" + markdown_table([summ], list(summ))]
    for key, name in (("tau_sweep", "tau"), ("lam_sweep", "lam")):
        if key in out:
            rows = [dict({name: r[name]}, steps=r["steps"], others=r["others"], l1=r["l1"], **r["acc"]) for r in out[key]]
            parts += [f"\n\n{name} sweep, SepME_1 erasing {out.get('sweep_concept', 'striped')} alone, "
                      f"{out.get('sweep_setting', '')} (Table 6 layout)\n",
                      markdown_table(rows, [name, "steps"] + evals + ["others", "l1"])]
    if not out.get("complete", True):
        parts += ["\n\n(partial results: the run was stopped before its remaining sections)"]
    return "".join(parts)


def relatives_summary(out: dict) -> str:
    """One markdown row per method of a relatives benchmark: its means over the edits (notebooks 06, 07)."""
    rows = [dict(method=m, **{k: r.get(k) for k in SUMMARY_KEYS}) for m, r in out["methods"].items()]
    return markdown_table(rows, ["method", *SUMMARY_KEYS])


def relatives_markdown(out: dict) -> str:
    """Tables 1-2 layout: one row per (method, erased set) with every style's ACC, others, distances, ``||dtheta||``,
    seconds and red-team ACC; then one summary row per method."""
    evals = list(out["original"])
    rows = [dict(method="original", erased="-", **out["original"])]
    for m, r in out["methods"].items():
        for row in r["rows"]:
            rows.append(dict(method=m, erased=row["erased"], others=row["others_acc"], dist_e=row["perceptual_erased"],
                             dist_o=row["perceptual_others"], l1=row["l1"], s=row["seconds"],
                             redteam=row["redteam_acc"], **row["acc"]))
    cols = ["method", "erased"] + evals + ["others", "dist_e", "dist_o", "l1", "s", "redteam"]
    return (f"ACC per style after each edit ({out['images_per_concept']} images per style, {out['sample_steps']} DDIM "
            f"steps; dist = {out.get('perceptual_metric')} to the original images; redteam = ACC of images from RECE's "
            "derived embedding)\n\n" + markdown_table(rows, cols) + "\n\nSummary (means over rows)\n\n"
            + relatives_summary(out))


# ------------------------------------------------------------------------------------------ the course's report
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


def write_report(results, out_dir) -> Path:
    """``out_dir/report.html``: every notebook of a ``make course`` run with its time, status and tables."""
    prof = os.environ.get("PROFILE", "full")
    parts = ["<html><head><meta charset='utf-8'><title>sepme-course report</title><style>"
             "body{font-family:sans-serif;max-width:1000px;margin:auto} table{border-collapse:collapse;margin:8px 0}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}</style></head><body>",
             f"<h1>sepme-course: executed course (PROFILE={prof}, MODEL={html.escape(config.model_name())})</h1><ul>"]
    for r in results:
        status = "ok" if not r["error"] else f"<b>FAILED</b><pre>{html.escape(r['error'])}</pre>"
        parts.append(f"<li><a href='{r['name']}.html'>{r['name']}</a> ({r['seconds']} s) {status}</li>")
    parts.append(f"</ul><p>Total: {sum(r['seconds'] for r in results):.0f} s</p>")
    for r in results:
        tabs = tables_of(r["nb"]) if r.get("nb") is not None else []
        if tabs:
            parts.append(f"<h2>{r['name']}</h2>" + "".join(tabs))
    parts.append("</body></html>")
    path = Path(out_dir) / "report.html"
    path.write_text("\n".join(parts))
    return path


def cell_seconds(nb) -> list[tuple[int, float]]:
    """``(cell index, seconds)`` of every executed code cell, slowest first, from the timing the kernel recorded
    (``metadata.execution``; ``course.normalise`` removes it before a notebook is written)."""
    out = []
    for k, cell in enumerate(nb.cells):
        ex = cell.get("metadata", {}).get("execution", {})
        a, b = ex.get("iopub.execute_input"), ex.get("shell.execute_reply")
        if a and b:
            out.append((k, (datetime.fromisoformat(b.replace("Z", "+00:00"))
                            - datetime.fromisoformat(a.replace("Z", "+00:00"))).total_seconds()))
    return sorted(out, key=lambda kv: -kv[1])
