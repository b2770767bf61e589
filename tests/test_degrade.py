"""Statistics of each synthetic degradation, determinism, mixes and clips."""
import math

import pytest
import torch
import torch.nn.functional as F

from minirestore import UserError
from minirestore.degrade import DEGRADATIONS, blur, degrade, degrade_clip, downsample, haze, jpeg, line_kernels, \
    lowlight, noise, parse, rain, snow


def textured(B=2, H=48, W=48, seed=0):
    """Smooth structure plus fine texture, strictly inside (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand(B, 3, 6, 6, generator=g), size=(H, W), mode="bilinear", align_corners=False)
    fine = torch.rand(B, 3, H, W, generator=g)
    return (0.15 + 0.4 * base + 0.3 * fine).clamp(0, 1)


def smooth(B=2, H=48, W=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (0.2 + 0.6 * F.interpolate(torch.rand(B, 3, 4, 4, generator=g), size=(H, W), mode="bicubic",
                                      align_corners=False)).clamp(0, 1)


def high_freq_energy(x):
    """Energy of the Laplacian: high spatial frequencies."""
    lap = x[..., 1:-1, 1:-1] * 4 - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
    return lap.pow(2).mean().item()


def dark_channel(x, patch=7):
    return -F.max_pool2d(-x.amin(dim=1, keepdim=True), patch, stride=1, padding=patch // 2)


@pytest.mark.parametrize("name", list(DEGRADATIONS))
def test_every_degradation_range_shape_dtype_and_change(name):
    x = textured()
    y = DEGRADATIONS[name](x, generator=0)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.min() >= 0 and y.max() <= 1
    assert (y - x).abs().mean() > 1e-3  # it did something
    single = degrade(x[0], name, 0)  # one [3, H, W] image works too
    assert single.shape == x[0].shape


@pytest.mark.parametrize("name", list(DEGRADATIONS))
def test_fixed_seed_is_deterministic(name):
    x = textured()
    a, b = degrade(x, name, 7), degrade(x, name, torch.Generator().manual_seed(7))
    c = degrade(x, name, 8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_noise_std_matches_sigma():
    x = torch.full((2, 3, 64, 64), 0.5)  # mid-grey: no clamping at 4 sigma
    for sigma in (0.05, 0.1):
        r = noise(x, generator=0, sigma=sigma) - x
        assert abs(r.std().item() - sigma) < 0.05 * sigma
        assert abs(r.mean().item()) < 0.05 * sigma
    r = noise(x, generator=0, sigma=(0.02, 0.2)) - x  # a range: per-image std inside it, different per image
    stds = r.flatten(1).std(dim=1)
    assert (stds > 0.018).all() and (stds < 0.21).all() and abs(stds[0] - stds[1]) > 1e-3


@pytest.mark.parametrize("kind", ["gaussian", "motion", "mixed"])
def test_blur_preserves_mean_and_removes_high_frequencies(kind):
    x = textured()
    y = blur(x, generator=0, kind=kind, sigma=2.0, length=9.0)
    assert abs(y.mean().item() - x.mean().item()) < 5e-3
    assert high_freq_energy(y) < 0.2 * high_freq_energy(x)
    flat = torch.full((1, 3, 20, 20), 0.3)
    torch.testing.assert_close(blur(flat, generator=0, kind=kind), flat)  # normalised kernel, edge padding


def test_motion_blur_is_directional():
    """A horizontal motion kernel smears along rows only: a horizontal stripe pattern is untouched."""
    rows = torch.zeros(1, 3, 32, 32)
    rows[:, :, ::2] = 1.0  # alternate rows: constant along x
    y = blur(rows, generator=0, kind="motion", length=9.0, angle=0.0)
    torch.testing.assert_close(y, rows, atol=1e-5, rtol=0)
    cols = rows.transpose(2, 3)
    smeared = blur(cols, generator=0, kind="motion", length=9.0, angle=0.0)
    assert high_freq_energy(smeared) < 0.1 * high_freq_energy(cols)
    k = line_kernels(torch.tensor([5.0]), torch.tensor([0.0]), 7)[0]
    assert k[3].tolist() == [0, 1, 1, 1, 1, 1, 0] and k.sum() == 5  # a 5 px line through the centre


def test_lowlight_lowers_brightness_by_exposure():
    x = textured(H=64, W=64).clamp(0.3, 0.8)
    for e in (0.2, 0.5):
        y = lowlight(x, generator=0, exposure=e, gamma=1.0, shot=1e-4, read=1e-3)
        assert abs(y.mean().item() / x.mean().item() - e) < 0.02
    dark = lowlight(x, generator=0, exposure=0.5, gamma=2.0, shot=1e-4, read=1e-3)
    assert dark.mean() < 0.5 * (x**2).mean() + 0.01 and dark.mean() < 0.5 * x.mean()  # gamma darkens mid-tones
    quiet = lowlight(x, generator=0, exposure=0.5, gamma=1.0, shot=0.0, read=0.0)
    noisy = lowlight(x, generator=0, exposure=0.5, gamma=1.0, shot=0.01, read=0.01)
    expect = torch.sqrt(0.01 * quiet + 0.01**2)  # Poisson-Gaussian std at each pixel
    assert abs((noisy - quiet).std().item() - expect.mean().item()) < 0.1 * expect.mean().item()


def test_haze_raises_dark_channel_and_lowers_contrast():
    x = textured()
    y = haze(x, generator=0, beta=2.0, airlight=0.9)
    assert dark_channel(y).mean() > dark_channel(x).mean() + 0.1
    assert y.std() < 0.8 * x.std()
    # far (top) is hazier than near (bottom): the vertical depth proxy
    top, bottom = (y - x)[..., :8, :].mean(), (y - x)[..., -8:, :].mean()
    assert top > bottom
    # a white image under white airlight stays white: I = J t + A (1 - t) is a convex mix
    torch.testing.assert_close(haze(torch.ones(1, 3, 16, 16), generator=0, airlight=1.0), torch.ones(1, 3, 16, 16))


@pytest.mark.parametrize("fn", [rain, snow])
def test_rain_and_snow_add_bright_sparse_structures(fn):
    x = torch.full((2, 3, 64, 64), 0.3)
    y = fn(x, generator=0)
    diff = (y - x).mean(dim=1)
    assert (diff >= -0.2).all()  # only brightens (snow's veil moves towards 0.9 > 0.3)
    bright = diff > 0.25
    frac = bright.float().mean().item()
    assert 0.002 < frac < 0.4  # sparse, but present
    assert y.max() > 0.7


def test_rain_streaks_are_elongated_along_their_angle():
    x = torch.zeros(1, 3, 96, 96)
    y = rain(x, generator=0, density=0.002, length=21.0, angle=0.0, opacity=1.0).mean(dim=1)[0]
    # vertical streaks: neighbours along columns correlate far more than along rows
    vert = (y[1:, :] * y[:-1, :]).mean()
    horiz = (y[:, 1:] * y[:, :-1]).mean()
    assert vert > 2 * horiz


def test_jpeg_quality():
    x = smooth(H=64, W=64)
    low = jpeg(x, generator=0, quality=5)
    high = jpeg(x, generator=0, quality=100)
    err_low, err_high = (low - x).pow(2).mean().item(), (high - x).pow(2).mean().item()
    assert 10 * math.log10(1 / err_high) > 38  # q = 100 is close
    assert err_low > 10 * err_high  # q = 5 is not
    assert torch.equal(jpeg(high, generator=0, quality=100), jpeg(high, generator=0, quality=100))


def test_downsample_removes_high_frequencies():
    x = textured(H=64, W=64)
    y = downsample(x, generator=0, scale=4.0)
    assert y.shape == x.shape
    assert high_freq_energy(y) < 0.1 * high_freq_energy(x)
    assert abs(y.mean().item() - x.mean().item()) < 0.01
    # the result is (nearly) band-limited: downsampling it again changes little
    assert (downsample(y, generator=0, scale=4.0) - y).abs().mean() < 0.2 * (y - x).abs().mean()


def test_mix_applies_in_order():
    x = textured()
    a = degrade(x, "blur+noise", 3)
    g = torch.Generator().manual_seed(3)
    b = noise(blur(x, generator=g), generator=g)
    assert torch.equal(a, b)
    c = degrade(x, "noise+blur", 3)
    assert high_freq_energy(c) < 0.5 * high_freq_energy(a)  # noise blurred away vs noise on top
    assert parse(" blur + noise ") == ["blur", "noise"]


@pytest.mark.parametrize("spec", ["fog", "blur+fog", "", "blur+"])
def test_unknown_name_is_user_error(spec):
    with pytest.raises(UserError) as e:
        degrade(textured(), spec, 0)
    assert "noise" in str(e.value) and "downsample" in str(e.value)  # lists the known ones


def test_clip_shares_parameters_and_draws_fresh_noise():
    frame = textured(B=1)
    clip = frame.expand(4, -1, -1, -1).contiguous()
    blurred = degrade_clip(clip, "blur", 0)  # same kernel on every frame -> identical frames
    assert all(torch.equal(blurred[0], f) for f in blurred[1:])
    hazy = degrade_clip(clip, "haze", 0)
    assert all(torch.equal(hazy[0], f) for f in hazy[1:])
    noisy = degrade_clip(clip, "noise", 0)
    assert not torch.equal(noisy[0], noisy[1])  # fresh noise per frame
    s = (noisy - clip).flatten(1).std(dim=1)
    assert (s.max() - s.min()) < 0.1 * s.mean()  # with the same sigma
    per_image = degrade(clip, "blur", 0)  # not shared: a kernel per image
    assert not all(torch.equal(per_image[0], f) for f in per_image[1:])
    lit = degrade_clip(clip, "lowlight", 0)
    assert (lit.flatten(1).mean(dim=1).std() < 0.01) and not torch.equal(lit[0], lit[1])
