"""Classical restoration baselines: what a user would pick instead of a learned prompt.

Every filter takes images x [B, 3, H, W] in [0, 1] and scalar parameters and returns [B, 3, H, W] in [0, 1];
plain torch, no learning. Their strengths are tuned on a validation set (`tune`), never on the test images.

  noise     gaussian_filter(sigma)            a Gaussian low-pass
            median_filter(size)               the median of each size x size window
  blur      unsharp_mask(sigma, amount)       x + amount (x - G_sigma * x)
            wiener(sigma, nsr)                Wiener deconvolution with a Gaussian PSF:
                                              X = conj(H) Y / (|H|^2 + nsr), in the Fourier domain
  lowlight  gamma_exposure(exposure, gamma, smooth)
                                              inverts the under-exposure y = e x^gamma: x = (y / e)^(1 / gamma),
                                              then an optional Gaussian smoothing of the amplified noise
  haze      dehaze(omega, t0, patch)          the dark channel prior (He, Sun & Tang, CVPR 2009) with the
                                              transmission refined by a guided filter (He et al. 2013)
  jpeg      gaussian_filter, median_filter    smoothing the 8 x 8 blocks and ringing away (what a viewer's
            deblock(sigma, strength)          "deblocking" does): a Gaussian blended in only near block edges
  rain      median_filter, open_streaks(size) thin bright streaks: a median, or a grey opening (min then max
                                              over a size x size window) that removes bright lines thinner than it
  snow      deveil(veil, size)                undo the veil y = (1 - v) x + 0.9 v, then a median against the flakes
"""
import itertools
import math

import torch
import torch.nn.functional as F

from minirestore.degrade import filter2d, gaussian_kernels
from minirestore.metrics import psnr


def _odd(n):
    n = int(math.ceil(n))
    return n + 1 - n % 2


# ---------------------------------------------------------------------------------------------
# Denoising
# ---------------------------------------------------------------------------------------------

def gaussian_filter(x, sigma):
    """A Gaussian low-pass of std `sigma` pixels (kernel truncated at 3 sigma, replicated borders)."""
    if sigma <= 0:
        return x
    k = gaussian_kernels(torch.full((x.shape[0],), float(sigma)), _odd(6 * sigma + 1))
    return filter2d(x, k).clamp(0, 1)


def median_filter(x, size):
    """The per-channel median of each size x size window (replicated borders)."""
    B, C, H, W = x.shape
    r = size // 2
    padded = F.pad(x, (r, r, r, r), mode="replicate")
    windows = F.unfold(padded, size)  # [B, C * size^2, H * W]
    return windows.view(B, C, size * size, H, W).median(dim=2).values


# ---------------------------------------------------------------------------------------------
# Deblurring
# ---------------------------------------------------------------------------------------------

def unsharp_mask(x, sigma, amount):
    """Sharpen: x + amount * (x - G_sigma * x)."""
    return (x + amount * (x - gaussian_filter(x, sigma))).clamp(0, 1)


def wiener(x, sigma, nsr):
    """Deconvolve a Gaussian blur of std `sigma`: X = conj(H) Y / (|H|^2 + nsr) with H the PSF's transfer
    function and nsr the noise-to-signal power ratio (the regulariser). The image is first padded by
    replicating its edges (as the blur itself treats borders), so the FFT's periodic wrap does not ring."""
    B, C, H, W = x.shape
    p = _odd(6 * sigma + 1)
    y = F.pad(x, (p, p, p, p), mode="replicate")  # [B, C, H + 2p, W + 2p]
    Hp, Wp = y.shape[-2:]
    k = gaussian_kernels(torch.tensor([float(sigma)]), p)[0]  # [p, p], sums to 1
    psf = torch.zeros(Hp, Wp)
    psf[:p, :p] = k
    psf = torch.roll(psf, shifts=(-(p // 2), -(p // 2)), dims=(0, 1))  # kernel centre at (0, 0): no shift
    Hf = torch.fft.rfft2(psf.to(x))
    X = torch.fft.irfft2(Hf.conj() * torch.fft.rfft2(y) / (Hf.abs() ** 2 + nsr), s=(Hp, Wp))
    return X[..., p:p + H, p:p + W].clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# Low light
# ---------------------------------------------------------------------------------------------

def gamma_exposure(x, exposure, gamma, smooth=0.0):
    """Undo y = exposure * x^gamma: x = (y / exposure)^(1 / gamma), clamped; then a Gaussian of std
    `smooth` against the sensor noise that the gain amplified (0: none)."""
    out = (x / exposure).clamp(0, 1) ** (1 / gamma)
    return gaussian_filter(out, smooth)


# ---------------------------------------------------------------------------------------------
# Haze: the dark channel prior
# ---------------------------------------------------------------------------------------------

def dark_channel(x, patch):
    """min over the colour channels, then over a patch x patch window: [B, 3, H, W] -> [B, 1, H, W]."""
    m = x.amin(dim=1, keepdim=True)
    r = patch // 2
    return -F.max_pool2d(F.pad(-m, (r, r, r, r), mode="replicate"), patch, stride=1)


def box(x, r):
    """Mean over (2r + 1)^2 windows, replicated borders; separable (rows, then columns)."""
    x = F.avg_pool2d(F.pad(x, (r, r, 0, 0), mode="replicate"), (1, 2 * r + 1), stride=1)
    return F.avg_pool2d(F.pad(x, (0, 0, r, r), mode="replicate"), (2 * r + 1, 1), stride=1)


def guided_filter(guide, p, r, eps):
    """He, Sun & Tang 2013: q = mean(a) I + mean(b), with a = cov(I, p) / (var(I) + eps), b = mean(p) - a mean(I)."""
    mean_I, mean_p = box(guide, r), box(p, r)
    a = (box(guide * p, r) - mean_I * mean_p) / (box(guide * guide, r) - mean_I**2 + eps)
    b = mean_p - a * mean_I
    return box(a, r) * guide + box(b, r)


def airlight(x, dark):
    """Among the 0.1% of pixels with the brightest dark channel, the colour of the brightest one (He et al.)."""
    B = x.shape[0]
    n = max(1, dark[0].numel() // 1000)
    top = dark.reshape(B, -1).topk(n, dim=1).indices  # [B, n]
    colours = x.reshape(B, 3, -1).gather(2, top[:, None].expand(-1, 3, -1))  # [B, 3, n]
    best = colours.sum(dim=1).argmax(dim=1)  # [B]
    return colours[torch.arange(B), :, best].view(B, 3, 1, 1)


def dehaze(x, omega=0.95, t0=0.1, patch=15):
    """Invert I = J t + A (1 - t): A from the dark channel, t = 1 - omega dark(I / A) refined by a guided
    filter on the grey image, J = (I - A) / max(t, t0) + A. omega < 1 keeps a little haze (aerial
    perspective), t0 bounds the gain where the haze is dense."""
    A = airlight(x, dark_channel(x, patch))
    t = 1 - omega * dark_channel(x / A.clamp(min=1e-3), patch)
    t = guided_filter(x.mean(dim=1, keepdim=True), t, r=max(2, 2 * patch), eps=1e-3)
    return ((x - A) / t.clamp(min=t0) + A).clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# JPEG, rain, snow
# ---------------------------------------------------------------------------------------------

def deblock(x, sigma, strength):
    """Smooth across the 8 x 8 JPEG block edges only: x + strength * w * (G_sigma * x - x), with w = 1 on the
    two pixel rows / columns either side of each block boundary and 0 inside (a simple loop filter)."""
    H, W = x.shape[-2:]
    edge = lambda n: ((torch.arange(n) % 8 == 0) | (torch.arange(n) % 8 == 7)).float()  # noqa: E731
    w = torch.maximum(edge(H).view(-1, 1), edge(W).view(1, -1)).to(x)
    return (x + strength * w * (gaussian_filter(x, sigma) - x)).clamp(0, 1)


def open_streaks(x, size):
    """Grey opening (erosion then dilation, size x size window, per channel): bright structures thinner than
    the window, such as rain streaks, are removed; larger bright regions keep their shape."""
    r = size // 2
    eroded = -F.max_pool2d(F.pad(-x, (r, r, r, r), mode="replicate"), size, stride=1)
    return F.max_pool2d(F.pad(eroded, (r, r, r, r), mode="replicate"), size, stride=1)


def deveil(x, veil, size):
    """Invert the snow veil y = (1 - v) x + 0.9 v, x = (y - 0.9 v) / (1 - v), then a median (size; 1: none)
    against the flakes."""
    x = ((x - 0.9 * veil) / (1 - veil)).clamp(0, 1)
    return x if size <= 1 else median_filter(x, size)


# ---------------------------------------------------------------------------------------------
# The candidates per degradation and their tuning
# ---------------------------------------------------------------------------------------------

def _grid(**axes):
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*axes.values())]


CANDIDATES = {  # degradation -> [(name, filter, parameter grid)]
    "noise": [("Gaussian filter", gaussian_filter, _grid(sigma=[0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0])),
              ("median filter", median_filter, _grid(size=[3, 5, 7]))],
    "blur": [("unsharp mask", unsharp_mask, _grid(sigma=[0.5, 1.0, 2.0, 3.0], amount=[0.5, 1.0, 2.0, 4.0])),
             ("Wiener deconvolution", wiener,
              _grid(sigma=[1.0, 1.5, 2.0, 2.5, 3.0], nsr=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]))],
    "lowlight": [("gamma + exposure", gamma_exposure,
                  _grid(exposure=[0.1, 0.15, 0.2, 0.25, 0.3, 0.4], gamma=[1.0, 1.2, 1.5, 1.8, 2.2],
                        smooth=[0.0, 0.7, 1.0, 1.5]))],
    "haze": [("dark channel prior", dehaze,
              _grid(omega=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], t0=[0.02, 0.05, 0.1, 0.2, 0.3],
                    patch=[3, 5, 7, 11]))],
    "jpeg": [("Gaussian filter", gaussian_filter, _grid(sigma=[0.3, 0.5, 0.75, 1.0, 1.5])),
             ("deblocking filter", deblock, _grid(sigma=[0.5, 1.0, 1.5, 2.0], strength=[0.25, 0.5, 0.75, 1.0]))],
    "rain": [("median filter", median_filter, _grid(size=[3, 5, 7])),
             ("grey opening", open_streaks, _grid(size=[3, 5, 7]))],
    "snow": [("de-veil + median", deveil, _grid(veil=[0.0, 0.05, 0.1, 0.15, 0.2], size=[1, 3, 5, 7]))],
}


def tune(degradation, degraded, clean):
    """The best (name, filter, parameters, mean validation PSNR) over CANDIDATES[degradation], by mean PSNR
    of the filtered validation images [N, 3, H, W] against their clean originals."""
    best = None
    for name, fn, grid in CANDIDATES[degradation]:
        for params in grid:
            score = psnr(fn(degraded, **params), clean).mean().item()
            if best is None or score > best[3]:
                best = (name, fn, params, score)
    return best


def describe(name, params):
    """'Wiener deconvolution (sigma 2, nsr 0.01)'"""
    return f"{name} ({', '.join(f'{k} {v:g}' for k, v in params.items())})"
