"""Small matplotlib helpers the notebooks share: image grids, training curves with a stop marker, bars.

Kept tiny on purpose: figures are small PNGs so executed notebooks stay light.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch


def _hwc(img):
    img = img.detach().cpu().float().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    return np.clip(img.transpose(1, 2, 0) if img.shape[0] in (1, 3) else img, 0, 1)


def show_grid(images, titles=None, ncols: int = 8, scale: float = 1.1, suptitle: str | None = None,
              row_labels=None):
    """Images in [0, 1] ``(N,3,H,W)`` as a grid; optional per-image titles and per-row labels."""
    n = len(images)
    ncols = min(ncols, n)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(scale * ncols, scale * nrows + (0.3 if suptitle else 0)),
                             squeeze=False, dpi=72)
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([]), ax.set_yticks([])
        for sp in ax.spines.values():
            sp.set_visible(False)
        if k < n:
            ax.imshow(_hwc(images[k]), interpolation="nearest")
            if titles is not None:
                ax.set_title(str(titles[k]), fontsize=6)
    if row_labels is not None:
        for r, lab in enumerate(row_labels):
            axes[r, 0].set_ylabel(str(lab), fontsize=7, rotation=0, ha="right", va="center")
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    plt.show()
    return fig


def plot_curves(curves: dict, stop_at=None, tau=None, ylabel="loss", title=None):
    """Line plot of named curves; a dashed line at ``tau`` and a marker at the stop step."""
    fig, ax = plt.subplots(figsize=(5, 2.8), dpi=80)
    for name, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, label=name, lw=1.2)
    if tau is not None:
        ax.axhline(tau, color="gray", ls="--", lw=0.8, label=f"tau = {tau:g}")
    if stop_at:
        ax.axvline(stop_at, color="red", ls=":", lw=1, label=f"stop at step {stop_at}")
    ax.set_xlabel("step"), ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    plt.show()
    return fig


def bar(values: dict, ylabel="", log=False, title=None, hline=None):
    fig, ax = plt.subplots(figsize=(5, 2.6), dpi=80)
    ax.bar(list(map(str, values)), list(values.values()), color="#4c72b0")
    if log:
        ax.set_yscale("log")
    if hline is not None:
        ax.axhline(hline, color="red", ls="--", lw=0.8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right", fontsize=7)
    fig.tight_layout()
    plt.show()
    return fig
