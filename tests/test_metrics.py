"""PSNR and SSIM against scikit-image (the paper's metric code) and against closed forms."""
import math

import pytest
import torch

from minirestore.metrics import psnr, ssim, to_unit

SIZES = [(11, 11), (16, 16), (23, 37), (40, 29)]


def image_pair(kind, C, H, W, seed):
    """A reference image and a degraded copy, in [0, 1], [2, C, H, W]."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        x = torch.rand(2, C, H, W, generator=g, dtype=torch.float64)
        y = torch.rand(2, C, H, W, generator=g, dtype=torch.float64)
    else:  # smooth and structured: a few sinusoids, a step edge, a bit of noise and a blur in y
        yy, xx = torch.meshgrid(torch.linspace(0, 1, H, dtype=torch.float64),
                                torch.linspace(0, 1, W, dtype=torch.float64), indexing="ij")
        f = torch.rand(2, C, 3, generator=g, dtype=torch.float64) * 6 + 1
        x = 0.5 + 0.2 * torch.sin(f[..., 0, None, None] * xx + f[..., 1, None, None] * yy)
        x = x + 0.2 * (xx > 0.4) + 0.05 * torch.cos(f[..., 2, None, None] * xx * yy)
        blur = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        y = blur + 0.02 * torch.randn(x.shape, generator=g, dtype=torch.float64)
        x, y = x.clamp(0, 1), y.clamp(0, 1)
    return x, y


def skimage_ssim(x, y, gaussian):
    metrics = pytest.importorskip("skimage.metrics")
    kwargs = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False) if gaussian else {}
    return torch.tensor([
        metrics.structural_similarity(a.permute(1, 2, 0).numpy(), b.permute(1, 2, 0).numpy(),
                                      channel_axis=2, data_range=1, **kwargs)
        for a, b in zip(x, y)
    ], dtype=torch.float64)


@pytest.mark.parametrize("gaussian", [False, True], ids=["skimage-default", "wang-gaussian"])
@pytest.mark.parametrize("kind", ["random", "smooth"])
@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_ssim_matches_skimage(kind, size, gaussian):
    x, y = image_pair(kind, 3, *size, seed=size[0] * 100 + size[1])
    ours = ssim(x, y, gaussian=gaussian)
    ref = skimage_ssim(x, y, gaussian)
    assert ours.shape == (2,)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-7)
    assert not torch.allclose(ssim(x, y, gaussian=not gaussian), ref, atol=1e-4)  # the two settings differ


def test_ssim_fp32_single_image_and_grayscale():
    x, y = image_pair("smooth", 1, 24, 19, seed=3)
    ref = skimage_ssim(x, y, gaussian=False)
    ours = ssim(x[1].float(), y[1].float())  # [C, H, W] in fp32
    assert ours.shape == (1,)
    torch.testing.assert_close(ours, ref[1:], rtol=0, atol=1e-5)


def test_ssim_identical_is_one_and_small_images_refused():
    x, _ = image_pair("random", 3, 16, 16, seed=0)
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(ssim(x, x, gaussian=True), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="11x11"):
        ssim(x[..., :10], x[..., :10], gaussian=True)
    with pytest.raises(ValueError, match="differ in shape"):
        ssim(x, x[..., :15])


def test_psnr_closed_form():
    x = torch.rand(3, 3, 9, 13, dtype=torch.float64) * 0.8
    torch.testing.assert_close(psnr(x + 0.1, x), torch.full((3,), 20.0, dtype=torch.float64))
    # one image off by 0.01 everywhere, one by 0.5 on a quarter of its values: per-image results
    y = x.clone()
    y[0] += 0.01
    y[1].view(-1)[: y[1].numel() // 4] += 0.5
    mse1 = 0.25 * (y[1].numel() // 4) / y[1].numel()
    expected = torch.tensor([40.0, 10 * math.log10(1 / mse1), math.inf], dtype=torch.float64)
    torch.testing.assert_close(psnr(y, x), expected)
    # data_range scales the peak: 8-bit values with an offset of 25.5 -> 20 dB
    torch.testing.assert_close(psnr(x * 255 + 25.5, x * 255, data_range=255.0),
                               torch.full((3,), 20.0, dtype=torch.float64))


def test_psnr_matches_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    x, y = image_pair("smooth", 3, 23, 37, seed=5)
    ref = [metrics.peak_signal_noise_ratio(a.numpy(), b.numpy(), data_range=1) for a, b in zip(x, y)]
    torch.testing.assert_close(psnr(x, y), torch.tensor(ref, dtype=torch.float64), rtol=0, atol=1e-9)


def test_identical_images():
    x = torch.rand(2, 3, 12, 12)
    assert torch.isinf(psnr(x, x)).all() and (psnr(x, x) > 0).all()
    assert (ssim(x, x) == 1).all()


def test_to_unit():
    torch.testing.assert_close(to_unit(torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0])),
                               torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
