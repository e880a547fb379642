"""Perceptual distance between original and edited images -- SSIM, 1-SSIM and (offline) LPIPS.

Introduced in ``notebooks/05_interactive_combination.ipynb`` (original vs edited view of
``theta + sum_i s_i dTheta_i``) and used by ``evaluate``-style tables. The paper reports how much an
erasure changes images of the *other* concepts (Eq. 6, the conditions ``eps_theta(x_t, c_j, t) ==
eps_{theta + dTheta_i}(x_t, c_j, t)``); a perceptual distance between the images the original and the edited
model draw from the same prompt and seed measures that in pixels.

* :func:`ssim` -- per-image SSIM (Wang et al. 2004) with a 7x7 Gaussian window, sigma 1.5, constants
  ``C1 = (0.01)^2``, ``C2 = (0.03)^2`` for a data range of 1, valid (unpadded) windows, mean over channels
  and positions. Images in [0, 1], ``(N, 3, H, W)`` (any channel count works; H, W >= 7).
* :func:`one_minus_ssim` -- ``mean(1 - SSIM)``: 0 for identical images, larger for more change.
* LPIPS (Zhang et al. 2018) through the ``lpips`` package, **only when every weight is already on disk**:
  the linear-layer weights ship inside the ``lpips`` wheel (``lpips/weights/v0.1/alex.pth``); the AlexNet
  ImageNet backbone must already be in the torch hub cache, at ``torch.hub.get_dir()/checkpoints/
  alexnet-owt-7be5be79.pth`` (usually ``~/.cache/torch/hub/checkpoints/``), where torchvision itself
  would cache it. Nothing is ever downloaded: the backbone is built without weights and filled from that
  file, so an offline machine never waits on a network call. :func:`lpips_available` says whether LPIPS
  can run and why not.
* LPIPS-alex on 32x32 images: AlexNet's first layer is an 11x11 convolution with stride 4, so a 32x32
  image leaves 7x7 features after conv1 and 1x1 after the second pooling -- the deeper LPIPS layers
  would compare single pixels. :func:`lpips_distance` therefore upsamples (bilinear) every image whose
  side is below ``LPIPS_MIN_SIDE = 64`` to 64 before the network; report LPIPS of the bundled model's
  images as "LPIPS-alex at 64x64".
* :func:`perceptual_distance` -- ``metric="auto"`` uses LPIPS when available and 1-SSIM otherwise, and
  returns the name of the metric it used, so a table never mixes the two silently.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import SepmeError

SSIM_WINDOW = 7
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01 ** 2
SSIM_C2 = 0.03 ** 2
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # the file name torchvision caches AlexNet's ImageNet weights under
ALEXNET_URL = "https://download.pytorch.org/models/" + ALEXNET_FILE
LPIPS_MIN_SIDE = 64
METRICS = ("auto", "lpips", "1-ssim")

_LPIPS_CACHE: dict = {}


class LPIPSUnavailable(SepmeError, RuntimeError):
    """LPIPS was asked for explicitly but its weights are not on this machine (nothing is downloaded)."""


# ---------------------------------------------------------------------------------------------- SSIM
def _check_pair(a, b, min_side: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(f"expected two torch tensors of images, got {type(a).__name__} and {type(b).__name__}")
    if a.dim() == 3:
        a = a.unsqueeze(0)
    if b.dim() == 3:
        b = b.unsqueeze(0)
    if a.dim() != 4 or b.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W) (or one (C, H, W) image); got shapes {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"the two image batches must have the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}; compare images of the same prompts and seeds pairwise")
    if a.numel() == 0:
        raise ValueError("empty image batch: nothing to compare")
    if min(a.shape[-2:]) < min_side:
        raise ValueError(f"images of {a.shape[-2]}x{a.shape[-1]} pixels are smaller than the {min_side}x{min_side} "
                         "SSIM window; upsample them first")
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    lo, hi = min(a.min().item(), b.min().item()), max(a.max().item(), b.max().item())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("images contain NaN or inf values")
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"images must be in [0, 1] (model.sample returns that); got values in [{lo:.3g}, {hi:.3g}]. "
                         "Images in [-1, 1] convert with (x + 1) / 2")
    return a.clamp(0, 1), b.clamp(0, 1)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The normalised 2-D Gaussian ``(size, size)`` SSIM averages with."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM ``(N,)`` of two batches in [0, 1] ``(N, C, H, W)``: 1 for identical images.

    ``SSIM = (2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2))`` with local
    means/variances under a 7x7 Gaussian window (sigma 1.5), averaged over valid positions and channels.
    Symmetric in ``a`` and ``b``. Notebook 05 uses ``1 - SSIM`` between original and edited images.
    """
    a, b = _check_pair(a, b, SSIM_WINDOW)
    a, b = a.double(), b.double()  # E[x^2] - mu^2 cancels badly in float32 on flat regions
    c = a.shape[1]
    w = gaussian_window().to(a.dtype).expand(c, 1, SSIM_WINDOW, SSIM_WINDOW).contiguous()

    def blur(x):
        return F.conv2d(x, w, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)
    den = (mu_a ** 2 + mu_b ** 2 + SSIM_C1) * (var_a + var_b + SSIM_C2)
    return (num / den).mean(dim=(1, 2, 3)).float()


def one_minus_ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """``mean over images of (1 - SSIM)``: 0 when the edit left the images unchanged (notebook 05)."""
    return float((1 - ssim(a, b)).mean())


# --------------------------------------------------------------------------------------------- LPIPS
def alexnet_weights_path() -> Path:
    """Where torchvision caches AlexNet's ImageNet weights: ``torch.hub.get_dir()/checkpoints/<file>``
    (``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


def _lpips_linear_path():
    try:
        import lpips  # noqa: F401
    except ImportError:
        return None
    return Path(lpips.__file__).resolve().parent / "weights" / "v0.1" / "alex.pth"


def _provide_hint() -> str:
    return (f"To use LPIPS offline, copy AlexNet's ImageNet weights ({ALEXNET_FILE}, from {ALEXNET_URL} on a "
            f"machine with internet) to {alexnet_weights_path()} (the torch hub cache, normally "
            "~/.cache/torch/hub/checkpoints/). Nothing is downloaded by this library. Or use metric='1-ssim' "
            "(or 'auto', which falls back to it).")


def lpips_available() -> tuple[bool, str]:
    """``(True, description)`` when LPIPS-alex can run from files on disk, else ``(False, reason)``.

    Checks (without touching the network): the ``lpips`` package imports, its linear-layer weights
    ``lpips/weights/v0.1/alex.pth`` ship in the wheel, and AlexNet's ImageNet weights are already at
    :func:`alexnet_weights_path`.
    """
    lin = _lpips_linear_path()
    if lin is None:
        return False, ("the `lpips` package is not installed (pip install 'sepme_lib[lpips]' or "
                       "pip install lpips torchvision)")
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False, "torchvision is not installed (LPIPS needs its AlexNet): pip install torchvision"
    if not lin.exists():
        return False, f"the lpips package has no linear-layer weights at {lin}; reinstall lpips (they ship in its wheel)"
    alex = alexnet_weights_path()
    if not alex.exists():
        return False, f"AlexNet ImageNet weights not found at {alex}"
    return True, f"LPIPS-alex v0.1 (backbone {alex}, linear layers {lin})"


def _load_lpips():
    ok, reason = lpips_available()
    if not ok:
        raise LPIPSUnavailable(f"LPIPS is not available: {reason}. {_provide_hint()}")
    alex = alexnet_weights_path()
    key = (str(alex), alex.stat().st_mtime_ns)
    if key in _LPIPS_CACHE:
        return _LPIPS_CACHE[key]
    import lpips  # optional extra (pip install 'sepme_lib[lpips]')

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's "pretrained is deprecated" notices
        # pnet_rand=True: build AlexNet *without* weights (torchvision would otherwise fetch them); the
        # linear layers still load from the wheel (pretrained=True, model_path=None).
        net = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    try:
        sd = torch.load(str(alex), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file and the fix
        raise LPIPSUnavailable(f"could not read AlexNet weights at {alex} ({type(e).__name__}: {e}); the file may "
                               f"be truncated. {_provide_hint()}") from e
    loaded = 0
    for sl in (net.net.slice1, net.net.slice2, net.net.slice3, net.net.slice4, net.net.slice5):
        for idx, mod in sl.named_children():
            own = {k[len(f"features.{idx}."):]: v for k, v in sd.items() if k.startswith(f"features.{idx}.")}
            if own:
                mod.load_state_dict(own)
                loaded += 1
    if loaded != 5:
        raise LPIPSUnavailable(f"{alex} does not look like torchvision's AlexNet state dict (found {loaded} of the 5 "
                               f"conv layers under 'features.N.'). {_provide_hint()}")
    net = net.eval().requires_grad_(False)
    _LPIPS_CACHE.clear()
    _LPIPS_CACHE[key] = net
    return net


@torch.no_grad()
def lpips_distance(a: torch.Tensor, b: torch.Tensor, per_image: bool = False):
    """LPIPS-alex (v0.1) between two batches in [0, 1]; images smaller than 64 px are upsampled
    (bilinear) to 64 first (see the module docstring). Raises :class:`LPIPSUnavailable` -- at once, never a
    download -- when the weights are not on disk. Mean over images, or ``(N,)`` with ``per_image``."""
    net = _load_lpips()
    a, b = _check_pair(a, b)
    side = min(a.shape[-2:])
    if side < LPIPS_MIN_SIDE:
        f = LPIPS_MIN_SIDE / side
        size = (round(a.shape[-2] * f), round(a.shape[-1] * f))
        a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
        b = F.interpolate(b, size=size, mode="bilinear", align_corners=False)
    d = net(a * 2 - 1, b * 2 - 1).flatten()
    return d if per_image else float(d.mean())


# ------------------------------------------------------------------------------------------ dispatch
def perceptual_distance(a: torch.Tensor, b: torch.Tensor, metric: str = "auto") -> tuple[float, str]:
    """``(value, metric_name)``: the perceptual distance between original and edited images (notebook 05).

    ``metric``: ``"auto"`` -> LPIPS when :func:`lpips_available`, else 1-SSIM; ``"lpips"`` -> LPIPS or a
    clear :class:`LPIPSUnavailable` error saying where to put the weights; ``"1-ssim"`` -> 1-SSIM.
    ``metric_name`` is ``"LPIPS-alex@64"`` (or ``"LPIPS-alex"`` for images of 64 px and more) or ``"1-SSIM"``.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if metric == "auto":
        metric = "lpips" if lpips_available()[0] else "1-ssim"
    if metric == "lpips":
        name = "LPIPS-alex@64" if min(a.shape[-2:]) < LPIPS_MIN_SIDE else "LPIPS-alex"
        return lpips_distance(a, b), name
    return one_minus_ssim(a, b), "1-SSIM"
