"""Perceptual distance (notebook 05): SSIM by hand-checkable properties, the 1-SSIM fallback, and LPIPS that
runs only from weights already on disk -- never a download, never a hang."""
import time
import urllib.request

import pytest
import torch

from sepme_lib import perceptual


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 3, 32, 32, generator=g)
    return a, g


def noisy(a, sigma, g):
    return (a + sigma * torch.randn(a.shape, generator=g)).clamp(0, 1)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache (so the test does not depend on this machine's ~/.cache) and no network:
    any download attempt fails the test at once."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))

    def no_network(*a, **k):
        raise AssertionError("perceptual tried to download something")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    yield tmp_path / "hub"
    torch.hub.set_dir(old)


# ---------------------------------------------------------------------------------------------- SSIM
def test_ssim_of_identical_images_is_one(images):
    a, _ = images
    s = perceptual.ssim(a, a.clone())
    assert s.shape == (4,)
    assert torch.allclose(s, torch.ones(4), atol=1e-5)
    assert perceptual.one_minus_ssim(a, a) == pytest.approx(0.0, abs=1e-5)


def test_ssim_decreases_with_noise_and_is_symmetric(images):
    a, g = images
    s = [perceptual.ssim(a, noisy(a, sigma, g)).mean().item() for sigma in (0.02, 0.1, 0.3)]
    assert 1 > s[0] > s[1] > s[2] > 0
    b = noisy(a, 0.1, g)
    assert torch.allclose(perceptual.ssim(a, b), perceptual.ssim(b, a), atol=1e-6)
    assert perceptual.one_minus_ssim(a, b) == pytest.approx(1 - perceptual.ssim(a, b).mean().item(), abs=1e-6)


def test_ssim_by_hand_on_constant_images():
    # constant images: variances and covariance are 0, so SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1)
    a, b = torch.full((1, 3, 16, 16), 0.2), torch.full((1, 3, 16, 16), 0.6)
    c1 = perceptual.SSIM_C1
    expected = (2 * 0.2 * 0.6 + c1) / (0.2 ** 2 + 0.6 ** 2 + c1)
    assert perceptual.ssim(a, b).item() == pytest.approx(expected, rel=1e-4)


def test_gaussian_window():
    w = perceptual.gaussian_window()
    assert w.shape == (7, 7) and w.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert w[3, 3] == w.max() and torch.allclose(w, w.T)


@pytest.mark.parametrize("a, b, match", [
    (torch.rand(2, 3, 32, 32), torch.rand(3, 3, 32, 32), "same shape"),
    (torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32), r"\[0, 1\]"),
    (torch.rand(1, 3, 5, 5), torch.rand(1, 3, 5, 5), "smaller than the 7x7"),
    (torch.rand(32, 32), torch.rand(32, 32), r"\(N, C, H, W\)"),
])
def test_ssim_bad_input_names_the_problem(a, b, match):
    with pytest.raises(ValueError, match=match):
        perceptual.ssim(a, b)


# --------------------------------------------------------------------------------------------- LPIPS
def test_auto_falls_back_to_one_minus_ssim_and_names_it(hub, images):
    a, g = images
    b = noisy(a, 0.1, g)
    ok, reason = perceptual.lpips_available()
    assert not ok and perceptual.ALEXNET_FILE in reason and str(hub) in reason
    value, name = perceptual.perceptual_distance(a, b)
    assert name == "1-SSIM"
    assert value == pytest.approx(perceptual.one_minus_ssim(a, b))
    assert perceptual.perceptual_distance(a, b, "1-ssim") == (value, "1-SSIM")


def test_explicit_lpips_without_weights_fails_fast_and_says_how_to_fix(hub, images):
    a, g = images
    t0 = time.perf_counter()
    with pytest.raises(perceptual.LPIPSUnavailable) as e:
        perceptual.perceptual_distance(a, noisy(a, 0.1, g), metric="lpips")
    assert time.perf_counter() - t0 < 5.0
    msg = str(e.value)
    assert perceptual.ALEXNET_FILE in msg and "checkpoints" in msg and "1-ssim" in msg
    assert str(hub / "checkpoints" / perceptual.ALEXNET_FILE) in msg


def test_unknown_metric():
    a = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="unknown metric 'psnr'"):
        perceptual.perceptual_distance(a, a, metric="psnr")


@pytest.fixture
def fake_alexnet(hub):
    """A random-weight AlexNet saved where torchvision caches the real one: exercises the offline loading
    path (the numbers are not LPIPS's, the plumbing is)."""
    tv = pytest.importorskip("torchvision")
    pytest.importorskip("lpips")
    torch.manual_seed(0)
    sd = tv.models.alexnet().state_dict()
    path = hub / "checkpoints" / perceptual.ALEXNET_FILE
    path.parent.mkdir(parents=True)
    torch.save(sd, path)
    return sd


def test_lpips_runs_from_cached_weights_only(fake_alexnet, images):
    a, g = images
    ok, desc = perceptual.lpips_available()
    assert ok, desc
    net = perceptual._load_lpips()
    assert torch.equal(getattr(net.net.slice1, "0").weight, fake_alexnet["features.0.weight"])  # backbone filled from the file
    assert torch.equal(getattr(net.net.slice5, "10").weight, fake_alexnet["features.10.weight"])
    b = noisy(a, 0.2, g)
    value, name = perceptual.perceptual_distance(a, b)  # auto picks LPIPS now
    assert name == "LPIPS-alex@64" and value > 0
    assert perceptual.lpips_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    per = perceptual.lpips_distance(a, b, per_image=True)
    assert per.shape == (4,) and torch.allclose(per, perceptual.lpips_distance(b, a, per_image=True), atol=1e-5)


def test_corrupt_alexnet_file_gives_a_clear_error(hub, images):
    pytest.importorskip("lpips")
    path = hub / "checkpoints" / perceptual.ALEXNET_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    a, _ = images
    with pytest.raises(perceptual.LPIPSUnavailable, match="could not read AlexNet weights"):
        perceptual.perceptual_distance(a, a, metric="lpips")
