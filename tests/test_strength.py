"""Adaptive T0 (strength.py): the noise estimate, the T0 curve, its calibration and its use by sample.py."""
import json

import numpy as np
import pytest
import torch

from minirestore.degrade import filter2d, gaussian_kernels
from minirestore.strength import auto_T0, best_T0, calibrate, curve_T0, noise_sigma


def smooth_images(n=4, size=64, seed=0):
    """Smooth random images in [0.25, 0.75] (no clipping at sigma <= 0.08 ... the estimate's home ground)."""
    g = torch.Generator().manual_seed(seed)
    x = filter2d(torch.rand(n, 3, size, size, generator=g), gaussian_kernels(torch.full((n,), 4.0), 25))
    x = (x - x.amin(dim=(1, 2, 3), keepdim=True)) / (x.amax(dim=(1, 2, 3), keepdim=True) - x.amin(dim=(1, 2, 3), keepdim=True))
    return 0.25 + 0.5 * x


@pytest.mark.parametrize("sigma", [0.01, 0.03, 0.1, 0.25])
def test_noise_estimate_recovers_a_known_sigma(sigma):
    """Within 5% on smooth images with white Gaussian noise (no clipping, so no bias from [0, 1])."""
    x = smooth_images()
    y = x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    est = noise_sigma(y)
    assert est.shape == (4,)
    assert torch.allclose(est, torch.full((4,), sigma), rtol=0.05), est


def test_noise_estimate_of_a_clean_image_is_small_and_single_images_work():
    x = smooth_images(1)[0]  # [3, H, W]
    assert noise_sigma(x).item() < 0.002
    assert noise_sigma(x[:, :33, :31]).shape == (1,)  # odd sizes: the last row / column is dropped
    with pytest.raises(ValueError, match="too small"):
        noise_sigma(x[:, :1, :5])


def test_curve_is_linear_between_points_and_flat_beyond():
    curve = {"strength": [0.05, 0.1, 0.2], "T0": [0.2, 0.3, 0.6]}
    assert curve_T0(curve, 0.075) == pytest.approx(0.25)
    assert curve_T0(curve, 0.15) == pytest.approx(0.45)
    assert curve_T0(curve, 0.01) == 0.2 and curve_T0(curve, 0.5) == 0.6


def test_best_T0_refines_with_a_parabola():
    grid = [0.1, 0.2, 0.3, 0.4]
    scores = [-(g - 0.27) ** 2 for g in grid]  # a parabola peaking at 0.27
    assert best_T0(grid, scores) == pytest.approx(0.27)
    assert best_T0(grid, [4, 3, 2, 1]) == 0.1  # best at an end: the end itself


def test_calibration_finds_a_T0_that_grows_with_the_noise():
    """A toy 'sampler' whose smoothing grows with T0: the measured curve must ask for more T0 at more noise,
    and a stronger estimate must map to a larger T0 through it."""
    clean = smooth_images(4, 48)

    def restore(degraded, T0):
        k = gaussian_kernels(torch.full((len(degraded),), 0.2 + 6 * T0), 25)
        return filter2d(degraded, k).clamp(0, 1)

    out = calibrate(restore, clean, "noise", np.linspace(0.05, 0.8, 8).tolist(), seed=0)
    curve = json.loads(out["T0_curve"])
    assert curve["degradation"] == "noise" and len(curve["strength"]) == len(curve["T0"]) == 6
    assert curve["strength"] == sorted(curve["strength"])
    assert curve["T0"][-1] > curve["T0"][0] + 0.1
    assert 0.05 <= out["T0"] <= 0.8
    noisy = clean[0] + 0.2 * torch.randn(clean[0].shape, generator=torch.Generator().manual_seed(3))
    T0_heavy, s_heavy = auto_T0(out, noisy.clamp(0, 1))
    T0_light, s_light = auto_T0(out, (clean[0] + 0.03 * torch.randn(clean[0].shape)).clamp(0, 1))
    assert s_heavy > s_light and T0_heavy > T0_light
    assert auto_T0({"T0": "0.4"}, noisy) == (None, None)  # a prompt trained at one T0 has no curve


def test_calibration_without_an_estimator_gives_one_T0():
    clean = smooth_images(2, 32)
    restore = lambda d, T0: clean * (1 - abs(T0 - 0.3)) + d * abs(T0 - 0.3)  # noqa: E731  best at T0 0.3
    out = calibrate(restore, clean, "blur", [0.1, 0.2, 0.3, 0.4, 0.5])
    assert set(out) == {"T0"} and out["T0"] == pytest.approx(0.3)


def test_calibration_on_given_pairs_gives_one_T0():
    """Paired data: the pairs as they are (no ladder, no curve, even for noise)."""
    clean = smooth_images(2, 32)
    degraded = (clean + 0.1).clamp(0, 1)
    restore = lambda d, T0: clean * (1 - abs(T0 - 0.3)) + d * abs(T0 - 0.3)  # noqa: E731  best at T0 0.3
    out = calibrate(restore, clean, "noise", [0.1, 0.2, 0.3, 0.4, 0.5], degraded=degraded)
    assert set(out) == {"T0"} and out["T0"] == pytest.approx(0.3)
