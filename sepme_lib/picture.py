"""Pictures of images for the widget (notebook 05): image grids as PIL images, PNG bytes, and a drawn picture of the
combination widget's state, stored as its output's fallback so that viewers without widget state still see it.

Plain PIL and numpy: it imports nothing from the rest of the library.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont

from .config import BadValue

MIN_TILE = 128         # every image is shown at least this many pixels wide (32x32 images: 4x, nearest neighbour)
MAX_TILE = 256         # larger images (Stable Diffusion's 512x512) are shown downscaled to this width


def tile_scale(size: int, min_tile: int = MIN_TILE, max_tile: int = MAX_TILE) -> float:
    """The factor an image of ``size`` pixels is shown at: enlarged (whole factors) to at least ``min_tile`` pixels,
    reduced to at most ``max_tile``."""
    if size < min_tile:
        return float(-(-min_tile // size))
    return min(1.0, max_tile / size)


def grid_image(images, ncols: int | None = None, upscale: float | None = None, gap: int = 2, background=255):
    """A PIL image: ``images`` (N,3,H,W) in [0,1] tiled ``ncols`` wide, each scaled ``upscale`` times (default
    :func:`tile_scale`: small images enlarged nearest-neighbour to >= ``MIN_TILE`` pixels, large ones reduced)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise BadValue(f"grid_image: images must be a (N, 3, H, W) tensor in [0, 1], got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if images.numel() and not torch.isfinite(images).all():
        bad = sorted({int(i) for i in (~torch.isfinite(images)).flatten(1).any(1).nonzero().flatten()})
        raise BadValue(f"grid_image: image(s) {bad[:5]} hold NaN or inf values (they would show as black tiles); "
                       "the sampling diverged or a delta/scale is not finite")
    n, _, h, w = images.shape
    upscale = tile_scale(max(h, w)) if upscale is None else upscale
    if not upscale > 0 or gap < 0:
        raise BadValue(f"grid_image: upscale must be > 0 and gap >= 0, got upscale={upscale}, gap={gap}")
    ncols = min(ncols or n, n)
    nrows = -(-n // ncols)
    H, Wd = max(1, round(h * upscale)), max(1, round(w * upscale))
    canvas = Image.new("RGB", (ncols * Wd + (ncols - 1) * gap, nrows * H + (nrows - 1) * gap), (background,) * 3)
    arr = (images.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    for k in range(n):
        r, c = divmod(k, ncols)
        tile = Image.fromarray(arr[k])
        if (H, Wd) != (h, w):
            tile = tile.resize((Wd, H), Image.NEAREST if upscale >= 1 else Image.LANCZOS)
        canvas.paste(tile, (c * (Wd + gap), r * (H + gap)))
    return canvas


def png_bytes(img) -> bytes:
    """PNG bytes of a PIL image (what ``ipywidgets.Image`` displays; a 4-image grid is a few kB)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _font(size: int, mono: bool = False):
    """DejaVu (shipped with matplotlib: Greek letters included), else PIL's default font."""
    try:
        return ImageFont.truetype(font_manager.findfont("DejaVu Sans Mono" if mono else "DejaVu Sans"), size)
    except Exception:  # noqa: BLE001 - any font is better than none
        return ImageFont.load_default()


def widget_picture(checks, sliders, prompt: str, seed, original, edited, readout_lines, width: int = 640):
    """A PIL picture of the combination widget (``widgets.snapshot_image`` passes its state): ``checks`` as
    ``(label, on)``, ``sliders`` as ``(value, min, max)``, the original and edited images (N,3,H,W) and the readout's
    lines."""
    f, bold, mono = _font(13), _font(14), _font(11, mono=True)
    size = max(edited.shape[-2:])
    up = tile_scale(size, max_tile=MIN_TILE)  # tiles of MIN_TILE px: a small picture on every model
    orig, edit = grid_image(original, ncols=2, upscale=up), grid_image(edited, ncols=2, upscale=up)
    row = 24
    height = 34 + row * (len(checks) + 1) + 26 + max(orig.height, edit.height) + 14 * len(readout_lines) + 24
    img = Image.new("RGB", (max(width, orig.width + edit.width + 40), height), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 6), "θ + Σᵢ sᵢ Δθᵢ", fill="black", font=bold)
    d.text((150, 8), "(a static snapshot of the widget: run the notebook to use it)", fill="#777", font=f)
    y = 34
    for (label, on), (value, lo, hi) in zip(checks, sliders):
        d.rectangle((8, y + 2, 20, y + 14), outline="#444", fill="#2a7ae2" if on else "white")
        if on:
            d.line((10, y + 8, 13, y + 12, 19, y + 4), fill="white", width=2)
        d.text((28, y), label, fill="black", font=f)
        x0, x1 = 270, 270 + 300
        d.text((190, y), "strength s", fill="black", font=f)
        d.line((x0, y + 8, x1, y + 8), fill="#bbb", width=4)
        hx = x0 + (x1 - x0) * (value - lo) / (hi - lo)
        d.ellipse((hx - 7, y + 1, hx + 7, y + 15), fill="#2a7ae2")
        d.text((x1 + 12, y), f"{value:.2f}", fill="black", font=f)
        y += row
    d.text((8, y), f"prompt: {prompt}", fill="black", font=f)
    d.text((470, y), f"seed: {seed}", fill="black", font=f)
    y += row + 2
    d.text((8, y), "original θ", fill="black", font=bold)
    d.text((orig.width + 32, y), "edited θ + Σ sᵢΔθᵢ", fill="black", font=bold)
    y += 20
    img.paste(orig, (8, y))
    img.paste(edit, (orig.width + 32, y))
    y += max(orig.height, edit.height) + 8
    for line in readout_lines:
        d.text((8, y), line, fill="black", font=mono)
        y += 14
    return img
