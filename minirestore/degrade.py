"""Synthetic degradations for prompt training: images [B, 3, H, W] (or one [3, H, W]) float in [0, 1].

Each degradation is a plain function `f(x, generator=None, shared=False, **strengths)`:
  - a strength is a number, or a (low, high) range drawn uniformly per image (the defaults are ranges,
    so one learned prompt covers a band of strengths);
  - `generator` is a torch.Generator or an int seed (the fixed-seed option); None uses torch's global RNG.
    Random numbers are drawn on the CPU, so a seed gives the same result on any device;
  - `shared=True` draws one set of parameters (kernel, strength, depth map) for the whole batch, while
    per-pixel noise stays fresh per image: that is how `degrade_clip` treats the frames of a video;
  - the output is clamped to [0, 1] and keeps the input's dtype and device.

`degrade(x, "blur+noise", generator)` applies a `+`-joined mix in order.
"""
import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import UserError


# ---------------------------------------------------------------------------------------------
# Helpers: parameters, kernels, per-image filtering
# ---------------------------------------------------------------------------------------------

def _generator(generator):
    if isinstance(generator, int):
        return torch.Generator().manual_seed(generator)
    return generator


def _draw(value, n, g, shared):
    """A per-image parameter [n] (CPU fp32): a number as is, a (low, high) range drawn uniformly per
    image, or once for all images when shared."""
    if isinstance(value, (tuple, list)):
        lo, hi = value
        u = torch.rand(1 if shared else n, generator=g).expand(n)
        return lo + (hi - lo) * u
    return torch.full((n,), float(value))


def _rand(shape, g, like):
    return torch.rand(shape, generator=g).to(like.device)


def _randn(shape, g, like):
    return torch.randn(shape, generator=g).to(like.device)


def _grid(size):
    """Centred pixel coordinates (u = column, v = row) of a size x size kernel."""
    r = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    return r.view(1, 1, -1), r.view(1, -1, 1)


def gaussian_kernels(sigma, size):
    """[B, size, size] Gaussian kernels, one per sigma [B], each summing to 1."""
    u, v = _grid(size)
    s = sigma.view(-1, 1, 1).clamp(min=1e-3)
    k = torch.exp(-(u**2 + v**2) / (2 * s**2))
    return k / k.sum(dim=(1, 2), keepdim=True)


def line_kernels(length, angle, size):
    """[B, size, size] anti-aliased line segments through the centre, peak 1: length [B] in pixels,
    angle [B] in radians from the horizontal. Weight = max(0, 1 - distance to the segment)."""
    u, v = _grid(size)
    c, s = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    along, across = u * c + v * s, -u * s + v * c
    half = ((length - 1) / 2).clamp(min=0).view(-1, 1, 1)
    dist = torch.sqrt(across**2 + (along.abs() - half).clamp(min=0) ** 2)
    return (1 - dist).clamp(min=0)


def filter2d(x, k):
    """Convolve every channel of image b in x [B, C, H, W] with its own kernel k[b] [B, kh, kw] (odd sizes).
    Borders replicate the edge pixels, so a flat image stays flat."""
    B, C, H, W = x.shape
    kh, kw = k.shape[-2:]
    x = F.pad(x.reshape(1, B * C, H, W), (kw // 2, kw // 2, kh // 2, kh // 2), mode="replicate")
    weight = k.to(x).repeat_interleave(C, dim=0).unsqueeze(1)  # [B*C, 1, kh, kw]
    return F.conv2d(x, weight, groups=B * C).reshape(B, C, H, W)


def _odd(n):
    n = int(math.ceil(n))
    return n + 1 - n % 2


def _screen(x, layer):
    """Screen blend of a bright layer in [0, 1] over x: 1 - (1 - x)(1 - layer)."""
    return 1 - (1 - x) * (1 - layer)


# ---------------------------------------------------------------------------------------------
# The degradations
# ---------------------------------------------------------------------------------------------

def noise(x, generator=None, shared=False, sigma=(0.05, 0.2)):
    """Additive white Gaussian noise, y = x + sigma * n, n ~ N(0, 1) per pixel and channel.
    sigma is on the [0, 1] scale (0.1 = 25.5 / 255)."""
    g, B = _generator(generator), x.shape[0]
    s = _draw(sigma, B, g, shared).to(x).view(-1, 1, 1, 1)
    return (x + s * _randn(x.shape, g, x).to(x)).clamp(0, 1)


def blur(x, generator=None, shared=False, kind="mixed", sigma=(1.0, 3.0), length=(5.0, 21.0), angle=None):
    """Blur y = k * x with one kernel per image.
    kind: "gaussian" (isotropic, std `sigma` px, defocus-like), "motion" (a straight camera-shake line of
    `length` px at `angle` radians, default uniform in [0, pi)), or "mixed" (each image picks one, 50/50)."""
    g, B = _generator(generator), x.shape[0]
    s, L = _draw(sigma, B, g, shared), _draw(length, B, g, shared)
    theta = _draw((0.0, math.pi) if angle is None else angle, B, g, shared)
    pick = _draw((0.0, 1.0), B, g, shared) < 0.5  # True -> gaussian (for "mixed")
    if kind == "gaussian":
        pick = torch.ones(B, dtype=torch.bool)
    elif kind == "motion":
        pick = torch.zeros(B, dtype=torch.bool)
    elif kind != "mixed":
        raise UserError(f"unknown blur kind {kind!r}: choose gaussian, motion or mixed")
    size = max(_odd(2 * math.ceil(3 * s[pick].max().item()) + 1) if pick.any() else 1,
               _odd(L[~pick].max().item() + 2) if (~pick).any() else 1)
    motion = line_kernels(L, theta, size)
    motion = motion / motion.sum(dim=(1, 2), keepdim=True)
    k = torch.where(pick.view(-1, 1, 1), gaussian_kernels(s, size), motion)
    return filter2d(x.float(), k.to(x.device)).clamp(0, 1).to(x.dtype)


def lowlight(x, generator=None, shared=False, exposure=(0.1, 0.3), gamma=(1.2, 1.8), shot=0.005, read=0.005):
    """Under-exposure: y = e * x^gamma plus Poisson-Gaussian sensor noise in its Gaussian approximation
    (Foi et al. 2008), y + sqrt(shot * y + read^2) * n. e scales the mean brightness (exactly e for
    gamma = 1), gamma > 1 darkens the mid-tones further; shot = variance per unit signal (1 / photons at
    white), read = read-noise std."""
    g, B = _generator(generator), x.shape[0]
    e = _draw(exposure, B, g, shared).to(x).view(-1, 1, 1, 1)
    gm = _draw(gamma, B, g, shared).to(x).view(-1, 1, 1, 1)
    a = _draw(shot, B, g, shared).to(x).view(-1, 1, 1, 1)
    b = _draw(read, B, g, shared).to(x).view(-1, 1, 1, 1)
    y = e * x.clamp(0, 1) ** gm
    return (y + torch.sqrt(a * y + b**2) * _randn(x.shape, g, x).to(x)).clamp(0, 1)


def depth_proxy(B, H, W, g, shared, like):
    """A smooth random depth map d [B, 1, H, W] in [0, 1]: a vertical gradient (the top of a photo is
    usually far) mixed with bicubically upsampled 4x4 noise (low-frequency scene structure)."""
    n = torch.randn(1 if shared else B, 1, 4, 4, generator=g).expand(B, -1, -1, -1)
    n = F.interpolate(n, size=(H, W), mode="bicubic", align_corners=False)
    lo, hi = n.amin(dim=(2, 3), keepdim=True), n.amax(dim=(2, 3), keepdim=True)
    n = (n - lo) / (hi - lo + 1e-6)
    ramp = torch.linspace(1, 0, H).view(1, 1, H, 1)
    return (0.6 * ramp + 0.4 * n).clamp(0, 1).to(like.device)


def haze(x, generator=None, shared=False, beta=(0.8, 2.5), airlight=(0.7, 1.0)):
    """Atmospheric scattering (Koschmieder): I = J t + A (1 - t), transmission t = exp(-beta d), with a
    smooth random depth d in [0, 1] (`depth_proxy`), scattering coefficient beta and grey airlight A."""
    g, (B, _, H, W) = _generator(generator), x.shape
    b = _draw(beta, B, g, shared).to(x).view(-1, 1, 1, 1)
    A = _draw(airlight, B, g, shared).to(x).view(-1, 1, 1, 1)
    t = torch.exp(-b * depth_proxy(B, H, W, g, shared, x).to(x))
    return (x * t + A * (1 - t)).clamp(0, 1)


def rain(x, generator=None, shared=False, density=(0.002, 0.006), length=(10.0, 30.0), angle=(-20.0, 20.0),
         opacity=(0.5, 0.9)):
    """Rain streaks: sparse random drops (`density` per pixel, brightness U(0.5, 1)) smeared along a line
    of `length` px at `angle` degrees from the vertical (one direction per image), screen-blended with
    `opacity`: y = 1 - (1 - x)(1 - opacity * streaks)."""
    g, (B, _, H, W) = _generator(generator), x.shape
    dens, L = _draw(density, B, g, shared), _draw(length, B, g, shared)
    theta = math.pi / 2 + torch.deg2rad(_draw(angle, B, g, shared))
    op = _draw(opacity, B, g, shared).to(x).view(-1, 1, 1, 1)
    hit = torch.rand(B, 1, H, W, generator=g) < dens.view(-1, 1, 1, 1)
    drops = hit * (0.5 + 0.5 * torch.rand(B, 1, H, W, generator=g))  # [B, 1, H, W]
    streaks = filter2d(drops.to(x.device), line_kernels(L, theta, _odd(L.max().item() + 2)).to(x.device))
    return _screen(x, op * streaks.clamp(0, 1).to(x)).clamp(0, 1)


def snow(x, generator=None, shared=False, density=(0.001, 0.003), sizes=(0.8, 1.6, 3.0), veil=(0.05, 0.2),
         opacity=(0.7, 1.0)):
    """Snow: flakes in layers of several sizes (soft Gaussian blobs with std `sizes` px, peak 1, the
    larger ones sparser: density / size^2), a whitish veil y = (1 - veil) x + 0.9 veil (the slight haze
    of falling snow), then the flakes screen-blended with `opacity`."""
    g, (B, _, H, W) = _generator(generator), x.shape
    dens = _draw(density, B, g, shared).view(-1, 1, 1, 1)
    v = _draw(veil, B, g, shared).to(x).view(-1, 1, 1, 1)
    op = _draw(opacity, B, g, shared).to(x).view(-1, 1, 1, 1)
    flakes = torch.zeros(B, 1, H, W, device=x.device)
    for s in sizes:
        hit = torch.rand(B, 1, H, W, generator=g) < dens / s**2
        seeds = hit * (0.6 + 0.4 * torch.rand(B, 1, H, W, generator=g))  # [B, 1, H, W]
        blob = gaussian_kernels(torch.full((B,), float(s)), _odd(6 * s + 1))
        blob = blob / blob.amax(dim=(1, 2), keepdim=True)
        flakes = torch.maximum(flakes, filter2d(seeds.to(x.device), blob.to(x.device)))
    y = (1 - v) * x + 0.9 * v
    return _screen(y, op * flakes.clamp(0, 1).to(x)).clamp(0, 1)


def jpeg(x, generator=None, shared=False, quality=(10, 40)):
    """JPEG compression artefacts: a PIL encode/decode round trip at `quality` (1..100; PIL's default
    4:2:0 chroma subsampling, as in most camera and web JPEGs)."""
    g, B = _generator(generator), x.shape[0]
    q = _draw(quality, B, g, shared).round().clamp(1, 100).int()
    out = []
    for img, qi in zip(x, q.tolist()):
        arr = (img.float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=qi)
        back = np.asarray(Image.open(buf).convert("RGB"))
        out.append(torch.from_numpy(back.copy()).permute(2, 0, 1))
    return (torch.stack(out).to(x.device, x.dtype) / 255).clamp(0, 1)


def downsample(x, generator=None, shared=False, scale=(2.0, 4.0)):
    """Low resolution: bicubic down by `scale` (antialiased) then bicubic back up to the original size."""
    g, (B, _, H, W) = _generator(generator), x.shape
    sc = _draw(scale, B, g, shared)
    out = []
    for img, s in zip(x, sc.tolist()):
        small = F.interpolate(img[None].float(), size=(max(1, round(H / s)), max(1, round(W / s))),
                              mode="bicubic", antialias=True, align_corners=False)
        out.append(F.interpolate(small, size=(H, W), mode="bicubic", align_corners=False))
    return torch.cat(out).clamp(0, 1).to(x.dtype)


DEGRADATIONS = {
    "noise": noise,
    "blur": blur,
    "lowlight": lowlight,
    "haze": haze,
    "rain": rain,
    "snow": snow,
    "jpeg": jpeg,
    "downsample": downsample,
}


def parse(spec):
    """'blur+noise' -> ['blur', 'noise']; an unknown or empty name is a UserError listing the known ones."""
    names = [n.strip() for n in str(spec).split("+")]
    for n in names:
        if n not in DEGRADATIONS:
            raise UserError(f"unknown degradation {n!r} in {spec!r}: choose from {', '.join(DEGRADATIONS)}, "
                            "or join several with + (e.g. blur+noise)")
    return names


def degrade(x, spec, generator=None, shared=False):
    """Apply one degradation or a `+`-joined mix, in order, to x [B, 3, H, W] or [3, H, W] in [0, 1]."""
    names, g = parse(spec), _generator(generator)
    single = x.dim() == 3
    y = x[None] if single else x
    for n in names:
        y = DEGRADATIONS[n](y, generator=g, shared=shared)
    return y[0] if single else y


def degrade_clip(frames, spec, generator=None):
    """A video clip [T, 3, H, W]: the same kernel and parameters for every frame, fresh noise per frame."""
    return degrade(frames, spec, generator, shared=True)
