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

    def restore(degraded, T0, steps, samples):
        k = gaussian_kernels(torch.full((len(degraded),), 0.2 + 6 * T0), 25)
        return filter2d(degraded, k).clamp(0, 1)

    out = calibrate(restore, clean, "noise", np.linspace(0.05, 0.8, 8).tolist(), 20, 1, seed=0)
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
    restore = lambda d, T0, steps, samples: clean * (1 - abs(T0 - 0.3)) + d * abs(T0 - 0.3)  # noqa: E731  best at T0 0.3
    out = calibrate(restore, clean, "blur", [0.1, 0.2, 0.3, 0.4, 0.5], 20, 1)
    assert set(out) == {"T0"} and out["T0"] == pytest.approx(0.3)


def test_calibration_on_given_pairs_gives_one_T0():
    """Paired data: the pairs as they are (no ladder, no curve, even for noise)."""
    clean = smooth_images(2, 32)
    degraded = (clean + 0.1).clamp(0, 1)
    restore = lambda d, T0, steps, samples: clean * (1 - abs(T0 - 0.3)) + d * abs(T0 - 0.3)  # noqa: E731  best at T0 0.3
    out = calibrate(restore, clean, "noise", [0.1, 0.2, 0.3, 0.4, 0.5], 20, 1, degraded=degraded)
    assert set(out) == {"T0"} and out["T0"] == pytest.approx(0.3)


def test_calibration_uses_the_given_sampler_and_records_it():
    clean = smooth_images(2, 32)
    calls = []

    def restore(degraded, T0, steps, samples):
        calls.append((steps, samples))
        return degraded

    out = calibrate(restore, clean, "noise", [0.1, 0.5, 0.9], 5, 4)
    assert set(calls) == {(5, 4)} and len(calls) == 6 * 3  # every rung, every T0 of the grid
    assert json.loads(out["T0_curve"])["sampler"] == {"steps": 5, "samples": 4}


class FakeBackbone:
    """encode/decode the identity and a velocity that counts its calls: calibrate_T0 without a network."""
    name, kind, device = "tiny", "flux", "cpu"

    def __init__(self):
        self.calls = 0

    def encode(self, x):
        return x

    def decode(self, x):
        return x

    def velocity(self, x, tau, bank):
        self.calls += 1
        return torch.zeros_like(x)


@pytest.mark.parametrize("flags,sampler", [((None, None, None), (1, 20, 4)), ((2, 1, None), (2, 1, 4)),
                                           ((1, 3, 0), (1, 3, 0)), ((1, 3, 2), (1, 3, 2))])
def test_train_calibrates_with_sample_pys_sampler(flags, sampler):
    """train.py's calibrate_T0 measures the curve with sample.py's sampler for the backbone (1 x 20 spun on 4 px
    on tiny) unless --sample-steps / --samples / --spin say otherwise, records it (spin only where it shifts
    anything: several samples), and averages `samples` restorations from successive start noises (with one
    sample: the single start noise of the calibration before the sampler was recorded)."""
    import argparse
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from train import CALIBRATION_GRID, calibrate_T0
    from minirestore.bridge import Bridge

    backbone, clean = FakeBackbone(), smooth_images(2, 16)
    args = argparse.Namespace(seed=0, sample_steps=flags[0], samples=flags[1], spin=flags[2])
    bridge = Bridge("ebr", 0.5, T0_range=(0.1, 0.9))
    out = calibrate_T0(backbone, None, bridge, [{"clean": c} for c in clean], "noise", args, lambda *a: None)
    steps, samples, spin = sampler
    assert json.loads(out["T0_curve"])["sampler"] == {"steps": steps, "samples": samples,
                                                      **({"spin": spin} if spin and samples > 1 else {})}
    assert backbone.calls == 6 * CALIBRATION_GRID * steps * samples


def test_calibration_averages_successive_start_noises(monkeypatch):
    """The mean of K restorations = the mean over the first K draws of the generator seeded seed + 7 (unspun)."""
    import argparse
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import train
    from minirestore.bridge import Bridge

    seen = {}
    real = train.calibrate

    def spy(restore, clean, degradation, grid, steps, samples, **kw):
        x = clean[:1]
        seen["mean"] = restore(x, 0.5, 1, 3)
        b = Bridge("ebr", 0.5)
        g = torch.Generator().manual_seed(7)
        seen["by_hand"] = sum(b.sample(lambda x_, tau: torch.zeros_like(x_), x, 1, eps=torch.randn(x.shape, generator=g))
                              for _ in range(3)) / 3
        return real(restore, clean, degradation, grid[:2], 1, 1, **kw)

    monkeypatch.setattr(train, "calibrate", spy)
    train.calibrate_T0(FakeBackbone(), None, Bridge("ebr", 0.5, T0_range=(0.1, 0.9)),
                       [{"clean": c} for c in smooth_images(1, 16)], "noise",
                       argparse.Namespace(seed=0, sample_steps=1, samples=3, spin=0), lambda *a: None)
    assert torch.equal(seen["mean"], seen["by_hand"])
