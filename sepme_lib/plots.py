"""Small matplotlib helpers the notebooks share: image grids, training curves with a stop marker, bars and
a log-scale heat map (the leakage certificates of notebook 03).

Readable on the repository page and still light: dpi 100, titles of 9-11 pt, legends of 9 pt; images are drawn at least
``MIN_PX`` screen pixels wide, and titles are wrapped to the width of their image so that they never overlap.
"""
from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
import numpy as np
import torch

DPI = 100
MIN_PX = 96        # smallest on-screen size of one image in a grid (pixels at DPI)
TITLE_PT = 9       # font size of image titles (points)


def _hwc(img):
    img = img.detach().cpu().float().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    return np.clip(img.transpose(1, 2, 0) if img.shape[0] in (1, 3) else img, 0, 1)


def wrap_title(text, width_px: float, fontsize: float = TITLE_PT) -> str:
    """``text`` broken into lines that fit ``width_px`` pixels at ``fontsize`` points (about 0.6 em per character)."""
    chars = max(4, int(width_px / (0.6 * fontsize * DPI / 72)))
    return "\n".join(textwrap.wrap(str(text), chars, break_long_words=True)) or " "


def grid_layout(n: int, ncols: int, scale: float | None = None, min_px: int = MIN_PX):
    """``(nrows, ncols, cell_in)`` of an image grid: each image is a square of ``cell_in = max(scale, min_px / DPI)``
    inches."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"show_grid needs at least one image, got {n!r}")
    if isinstance(ncols, bool) or not isinstance(ncols, (int, np.integer)) or ncols < 1:
        raise ValueError(f"ncols must be a whole number >= 1, got {ncols!r}")
    ncols = int(min(ncols, n))
    return (n + ncols - 1) // ncols, ncols, max(float(scale or 0.0), min_px / DPI)


def _text_height(lines: int, fontsize: float = TITLE_PT) -> float:
    """Inches taken by ``lines`` lines of title text plus matplotlib's title pad (6 pt)."""
    return (lines * fontsize * 1.3 + 7) / 72 if lines else 0.0


def show_grid(images, titles=None, ncols: int = 8, scale: float | None = None, suptitle: str | None = None,
              row_labels=None, col_titles=None, min_px: int = MIN_PX):
    """Images in [0, 1] ``(N,3,H,W)`` as a grid (notebooks 00-07).

    ``titles``: one per image (wrapped to the image width); ``col_titles``: one per column, drawn above the first row
    only (a combination grid: columns = prompts, rows = ``row_labels``). Every image is at least ``min_px`` pixels
    wide on screen (``scale``: a larger size in inches). The axes are placed by hand (no ``tight_layout``), leaving
    room for the longest title of each row, so titles never run into the images above them."""
    n = len(images)
    if titles is not None and len(titles) != n:
        raise ValueError(f"{len(titles)} titles for {n} images; give one title per image (or col_titles=)")
    nrows, ncols, cell = grid_layout(n, ncols, scale, min_px)
    if col_titles is not None and len(col_titles) != ncols:
        raise ValueError(f"{len(col_titles)} column titles for {ncols} columns")
    if row_labels is not None and len(row_labels) != nrows:
        raise ValueError(f"{len(row_labels)} row labels for {nrows} rows")
    width_px = cell * DPI
    per_image = [wrap_title(t, width_px) for t in titles] if titles is not None else [None] * n
    if col_titles is not None and titles is None:
        per_image[:ncols] = [wrap_title(t, width_px) for t in col_titles]
    gap, label_pt = 0.06, TITLE_PT + 1
    row_title = [_text_height(max((t.count("\n") + 1 for t in per_image[r * ncols:(r + 1) * ncols] if t), default=0))
                 for r in range(nrows)]
    label_in = (max(len(str(x)) for x in row_labels) * 0.62 * label_pt / 72 + 0.2) if row_labels is not None else 0
    top = 0.3 if suptitle else 0.02
    fig_w = label_in + ncols * (cell + gap) + gap
    fig_h = top + sum(row_title) + nrows * (cell + gap)
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=DPI)
    y = fig_h - top
    for r in range(nrows):
        y -= row_title[r] + cell
        for c in range(ncols):
            k = r * ncols + c
            if k >= n:
                break
            ax = fig.add_axes(((label_in + gap + c * (cell + gap)) / fig_w, y / fig_h, cell / fig_w, cell / fig_h))
            ax.set_xticks([]), ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_visible(False)
            ax.imshow(_hwc(images[k]), interpolation="nearest")
            if per_image[k]:
                ax.set_title(per_image[k], fontsize=TITLE_PT)
            if c == 0 and row_labels is not None:
                ax.set_ylabel(str(row_labels[r]), fontsize=label_pt, rotation=0, ha="right", va="center")
        y -= gap
    if suptitle:
        fig.suptitle(suptitle, fontsize=11, y=1 - 0.05 / fig_h, va="top")
    plt.show()
    return fig


def _finish(fig, ax, title=None, legend_outside: bool = False):
    """Title, legend (inside, or right of the axes), layout and display of a line plot; returns the figure."""
    if title:
        ax.set_title(title, fontsize=11)
    ax.legend(fontsize=9, **(dict(loc="upper left", bbox_to_anchor=(1.02, 1.0)) if legend_outside else {}))
    fig.tight_layout()
    plt.show()
    return fig


def plot_curves(curves: dict, stop_at=None, tau=None, ylabel="loss", title=None):
    """Line plot of named curves; a dashed line at ``tau`` and a marker at the stop step (notebooks 01-04)."""
    fig, ax = plt.subplots(figsize=(5, 2.8), dpi=DPI)
    for name, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, label=name, lw=1.2)
    if tau is not None:
        ax.axhline(tau, color="gray", ls="--", lw=0.8, label=f"tau = {tau:g}")
    if stop_at:
        ax.axvline(stop_at, color="red", ls=":", lw=1, label=f"stop at step {stop_at}")
    ax.set_xlabel("step"), ax.set_ylabel(ylabel)
    return _finish(fig, ax, title)


def lines(curves: dict, xlabel: str, ylabel: str, title=None, hline=None, hline_label=None):
    """Named curves ``{name: (xs, ys)}`` with markers; an optional dashed line (a goal) at ``hline`` (notebook 09's
    rounds x budget curve)."""
    fig, ax = plt.subplots(figsize=(7.5, 2.8), dpi=DPI)
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, "o-", label=name, lw=1.2, ms=4)
    if hline is not None:
        ax.axhline(hline, color="gray", ls="--", lw=0.8, label=hline_label)
    ax.set_xlabel(xlabel), ax.set_ylabel(ylabel)
    ax.set_xticks(sorted({x for xs, _ in curves.values() for x in xs}))
    return _finish(fig, ax, title, legend_outside=True)


def bar(values: dict, ylabel="", log=False, title=None, hline=None):
    """Bar chart of ``{label: value}`` (optionally log-scaled, with a dashed reference line at ``hline``)."""
    fig, ax = plt.subplots(figsize=(5, 2.6), dpi=DPI)
    ax.bar(list(map(str, values)), list(values.values()), color="#4c72b0")
    if log:
        ax.set_yscale("log")
    if hline is not None:
        ax.axhline(hline, color="red", ls="--", lw=0.8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=11)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right", fontsize=9)
    fig.tight_layout()
    plt.show()
    return fig


def heatmap(table: dict, title=None, log: bool = True, fmt: str = "{:.1e}", cbar_label: str = ""):
    """``table[row][column] = value`` as a colour grid with the value written in each cell; ``log``: colour by
    ``log10`` (notebook 03's leakage certificates: rows = increments, columns = the prompts they are measured on)."""
    rows = list(table)
    if not rows:
        raise ValueError("heatmap needs at least one row")
    cols = list(dict.fromkeys(c for r in rows for c in table[r]))
    M = np.array([[float(table[r].get(c, np.nan)) for c in cols] for r in rows])
    shown = np.log10(np.clip(M, 1e-30, None)) if log else M
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(cols), 0.8 + 0.45 * len(rows)), dpi=DPI)
    im = ax.imshow(shown, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols], fontsize=9, rotation=20, ha="right")
    ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=9)
    lo, hi = np.nanmin(shown), np.nanmax(shown)
    for i in range(len(rows)):
        for j in range(len(cols)):
            if np.isfinite(M[i, j]):
                light = shown[i, j] < lo + 0.5 * (hi - lo)
                ax.text(j, i, fmt.format(M[i, j]), ha="center", va="center", fontsize=9,
                        color="white" if light else "black")
    fig.colorbar(im, ax=ax, label=("log10 " if log else "") + cbar_label)
    if title:
        ax.set_title(title, fontsize=11)
    fig.tight_layout()
    plt.show()
    return fig
