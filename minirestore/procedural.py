"""Procedural training images with natural-image statistics: dead leaves, nothing downloaded.

The dead-leaves model (Matheron; Lee, Mumford & Huang 2001) occludes random shapes back to front. With a
radius density ~ r^-3 it is scale invariant, so its power spectrum falls as ~ 1/f^2, as natural images'
does. On top of the classic model each image gets a named colour palette, per-leaf fills (flat, linear
gradient, 1/f texture or stripes), sharp (anti-aliased) or soft (blurred) edges, four shape kinds and
sometimes a smooth background gradient.

All geometry lives in normalised coordinates [0, 1]^2 and only the edge widths are in pixels, so one seed
draws the same scene at any size (the pretraining trains at several resolutions).

Each image comes with content descriptors from a fixed vocabulary (WORDS): its palette, density, dominant
shape, fill and edge kind. They are the tiny text encoder's vocabulary; they never describe a degradation.

Statistics that say whether a generator learned the distribution: `radial_power_slope` (natural images
~ -2) and `colour_histogram_distance`.
"""
import numpy as np
import torch

# Base colours (sRGB in [0, 1]); a leaf's colour is drawn near one of its palette's colours.
PALETTES = {
    "warm": [(0.80, 0.20, 0.15), (0.95, 0.55, 0.15), (0.98, 0.80, 0.30), (0.55, 0.25, 0.12), (0.90, 0.40, 0.35)],
    "cool": [(0.15, 0.30, 0.65), (0.20, 0.60, 0.70), (0.45, 0.35, 0.70), (0.70, 0.85, 0.95), (0.10, 0.20, 0.30)],
    "earthy": [(0.42, 0.45, 0.20), (0.50, 0.35, 0.20), (0.78, 0.68, 0.50), (0.30, 0.40, 0.25), (0.45, 0.48, 0.52)],
    "vivid": [(0.90, 0.10, 0.10), (0.10, 0.70, 0.20), (0.10, 0.30, 0.90), (0.98, 0.85, 0.05), (0.80, 0.10, 0.75)],
    "pastel": [(0.98, 0.80, 0.82), (0.80, 0.92, 0.80), (0.78, 0.85, 0.98), (0.98, 0.95, 0.75), (0.88, 0.80, 0.95)],
    "grey": [(0.10, 0.10, 0.10), (0.35, 0.35, 0.36), (0.55, 0.55, 0.53), (0.75, 0.75, 0.76), (0.92, 0.92, 0.90)],
}
DENSITIES = ["few", "many"]
SHAPES = ["circles", "squares", "ellipses", "rectangles"]
FILLS = ["textured", "smooth"]
EDGES = ["soft", "sharp"]
WORDS = list(PALETTES) + DENSITIES + SHAPES + FILLS + EDGES  # the descriptor vocabulary, in a fixed order

# density -> (number of leaves, r_min, r_max) in normalised units; E[area] x N ~ 1.5 covers most of the image
LEAVES = {"few": (40, 0.05, 0.45), "many": (180, 0.02, 0.35)}


def _power_law_radii(rng, n, rmin, rmax):
    """Radii with density ~ r^-3 on [rmin, rmax], by inverting the CDF (rmin^-2 - r^-2) / (rmin^-2 - rmax^-2)."""
    u = rng.random(n)
    return (rmin ** -2 - u * (rmin ** -2 - rmax ** -2)) ** -0.5


def _pink_noise(rng, k, size):
    """k fields of 1/f noise [k, size, size] (amplitude ~ 1/f, power ~ 1/f^2), zero mean, unit std."""
    f = np.sqrt(np.fft.fftfreq(size)[:, None] ** 2 + np.fft.fftfreq(size)[None, :] ** 2)
    f[0, 0] = 1.0
    spectrum = np.fft.fft2(rng.standard_normal((k, size, size))) / f
    spectrum[:, 0, 0] = 0
    field = np.fft.ifft2(spectrum).real
    return (field / (field.std(axis=(1, 2), keepdims=True) + 1e-8)).astype(np.float32)


def _colours(rng, palette, n):
    """n colours near the palette's base colours: RGB jitter and a brightness factor. -> [n, 3]"""
    base = np.asarray(PALETTES[palette], dtype=np.float32)[rng.integers(0, len(PALETTES[palette]), n)]
    c = base * rng.uniform(0.75, 1.15, (n, 1)) + rng.normal(0, 0.05, (n, 3))
    return np.clip(c, 0, 1).astype(np.float32)


def dead_leaves(seed, size=64):
    """One procedural image: (image [3, size, size] float32 in [0, 1], descriptor words). Deterministic per seed."""
    rng = np.random.default_rng(seed)
    palette = list(PALETTES)[rng.integers(len(PALETTES))]
    density, shape = DENSITIES[rng.integers(2)], SHAPES[rng.integers(4)]
    fill, edge = FILLS[rng.integers(2)], EDGES[rng.integers(2)]
    n, rmin, rmax = LEAVES[density]

    # Leaves, listed back to front: centre, radius, kind (0 circle, 1 square, 2 ellipse, 3 rectangle), angle.
    centre = rng.uniform(-0.1, 1.1, (n, 2)).astype(np.float32)
    r = _power_law_radii(rng, n, rmin, rmax).astype(np.float32)
    kind = np.where(rng.random(n) < 0.7, SHAPES.index(shape), rng.integers(0, 4, n))
    aspect = np.where(kind >= 2, rng.uniform(0.3, 0.8, n), 1.0).astype(np.float32)
    angle = np.where(kind >= 2, rng.uniform(0, np.pi, n), 0.0).astype(np.float32)
    colour = _colours(rng, palette, n)
    colour2 = _colours(rng, palette, n)
    p_texture = 0.6 if fill == "textured" else 0.0
    u = rng.random(n)
    leaf_fill = np.where(u < p_texture, 2, np.where(u < p_texture + 0.3, 1, 0))  # 0 flat, 1 gradient, 2 texture
    # Edge width in pixels: ~1 px is an anti-aliased sharp edge, 2-6 px a soft one.
    soft = rng.random(n) < (0.7 if edge == "soft" else 0.05)
    width = np.where(soft, rng.uniform(2.0, 6.0, n), 1.0).astype(np.float32) / size
    texture_kind, wavelength_periods = rng.random(n) < 0.5, rng.uniform(2, 6, n)
    phase, amp = rng.uniform(0, 2 * np.pi, n).astype(np.float32), rng.uniform(0.1, 0.3, n).astype(np.float32)
    noise_field = rng.integers(0, 3, n)
    noise = _pink_noise(np.random.default_rng(rng.integers(2 ** 63)), 3, size)  # own stream: size-independent draws

    # Drop the leaves that cannot touch the image (all draws are made first, so the scene stays seeded).
    reach = r + width * 2 + 0.01
    keep = np.all((centre > -reach[:, None]) & (centre < 1 + reach[:, None]), axis=1)
    centre, r, kind, aspect, angle, colour, colour2, leaf_fill, width, texture_kind, wavelength_periods, phase, \
        amp, noise_field = (v[keep] for v in (centre, r, kind, aspect, angle, colour, colour2, leaf_fill, width,
                                              texture_kind, wavelength_periods, phase, amp, noise_field))
    n = len(r)

    # Background: flat, or a smooth gradient between two palette colours.
    g = (np.arange(size, dtype=np.float32) + 0.5) / size  # pixel centres
    bg_c = _colours(rng, palette, 2)
    if rng.random() < 0.3:
        th = rng.uniform(0, 2 * np.pi)
        s = np.clip(((g[None, :] - 0.5) * np.cos(th) + (g[:, None] - 0.5) * np.sin(th)) + 0.5, 0, 1)
        image = bg_c[0][:, None, None] * (1 - s) + bg_c[1][:, None, None] * s
    else:
        image = bg_c[0][:, None, None] * np.ones((1, size, size), np.float32)
    if n == 0:
        return torch.from_numpy(np.clip(image, 0, 1).astype(np.float32)), [palette, density, shape, fill, edge]

    # Every leaf's pixel grid in its own rotated frame (u along the long axis a, v along b).
    X = g[None, None, :] - centre[:, 0, None, None]  # [n, 1, S]
    Y = g[None, :, None] - centre[:, 1, None, None]  # [n, S, 1]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    U, V = X * cos + Y * sin, Y * cos - X * sin  # [n, S, S]
    a, b = r[:, None, None], (r * aspect)[:, None, None]
    # Approximate signed distance (normalised units): ellipses by radial scaling, boxes by Chebyshev.
    # Each formula runs only on its own leaves: every op here touches n x S x S values.
    d = np.empty_like(U)
    rnd, box = (kind == 0) | (kind == 2), (kind == 1) | (kind == 3)
    d[rnd] = (np.sqrt((U[rnd] / a[rnd]) ** 2 + (V[rnd] / b[rnd]) ** 2) - 1) * b[rnd]
    d[box] = np.maximum(np.abs(U[box]) - a[box], np.abs(V[box]) - b[box])
    alpha = np.clip(0.5 - d / width[:, None, None], 0, 1)  # a linear ramp of `width` across the edge

    # Composite back to front: leaf i shows with weight w_i = alpha_i prod_{j > i} (1 - alpha_j).
    # (A loop of n small products: numpy's cumprod along the leaf axis is ~10x slower.)
    w, covered = np.empty_like(alpha), np.ones((size, size), np.float32)
    for i in range(n - 1, -1, -1):
        w[i] = alpha[i] * covered
        covered = covered * (1 - alpha[i])
    # Fills: flat c; a gradient c -> c2 across the leaf, c + t (c2 - c); or a texture modulating brightness,
    # c (1 + amp x), with x 1/f noise (one of three shared fields) or stripes of 2-6 periods (>= 3 pixels).
    image = image * covered + np.einsum("nst,nc->cst", w, colour)
    grad, tex = leaf_fill == 1, leaf_fill == 2
    if grad.any():
        t = np.clip(U[grad] / (2 * a[grad]) + 0.5, 0, 1)
        image += np.einsum("nst,nc->cst", w[grad] * t, colour2[grad] - colour[grad])
    if tex.any():
        wavelength = np.maximum(2 * r[tex] / wavelength_periods[tex], 3 / size).astype(np.float32)[:, None, None]
        stripes = np.sin(2 * np.pi * V[tex] / wavelength + phase[tex, None, None])
        x = np.where(texture_kind[tex, None, None], 0.6 * noise[noise_field[tex]], stripes)
        image += np.einsum("nst,nc->cst", w[tex] * x, amp[tex, None] * colour[tex])
    image = torch.from_numpy(np.clip(image, 0, 1).astype(np.float32))
    return image, [palette, density, shape, fill, edge]


class ProceduralImages(torch.utils.data.Dataset):
    """n dead-leaves images of one size; item i is dead_leaves(seed * 1_000_003 + i, size)."""

    def __init__(self, n, size=64, seed=0):
        self.n, self.size, self.seed = n, size, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        s = self.seed * 1_000_003 + i
        image, words = dead_leaves(s, self.size)
        return {"clean": image, "words": words, "name": f"leaves-{s}"}


# ---------------------------------------------------------------------------------------------
# Statistics: generated vs real
# ---------------------------------------------------------------------------------------------

def radial_power_slope(images):
    """Slope of log radially averaged power vs log frequency of the luminance, mean over images [N, 3, H, W].

    A Hann window removes the border discontinuity (which alone would add a 1/f^2 spectrum); the fit uses
    integer radii 2 .. min(H, W)/2 - 1 (cycles per image). Natural images ~ -2, white noise ~ 0, blur steeper.
    """
    x = images.double()
    lum = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]  # [N, H, W]
    N, H, W = lum.shape
    lum = lum - lum.mean(dim=(1, 2), keepdim=True)
    window = torch.hann_window(H, periodic=False, dtype=torch.float64)[:, None] * \
        torch.hann_window(W, periodic=False, dtype=torch.float64)[None, :]
    power = torch.fft.fft2(lum * window).abs() ** 2  # [N, H, W]
    fy, fx = torch.fft.fftfreq(H, 1 / H, dtype=torch.float64), torch.fft.fftfreq(W, 1 / W, dtype=torch.float64)
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2).round().long().flatten()  # [H*W]
    rs = torch.arange(2, min(H, W) // 2)
    slopes = []
    for p in power.flatten(1):
        mean = torch.zeros(int(radius.max()) + 1, dtype=torch.float64).index_add_(0, radius, p)
        count = torch.zeros_like(mean).index_add_(0, radius, torch.ones_like(p))
        logp, logf = torch.log(mean[rs] / count[rs] + 1e-20), torch.log(rs.double())
        lf = logf - logf.mean()
        slopes.append(float((lf * (logp - logp.mean())).sum() / (lf * lf).sum()))  # least squares
    return float(np.mean(slopes))


def colour_histogram_distance(a, b, bins=8):
    """Total-variation distance 0.5 sum |p - q| between the 3D RGB histograms (bins^3 cells, 8^3 = 512 by
    default) of all pixels of two image sets [N, 3, H, W] in [0, 1]: 0 for equal distributions, 1 for disjoint."""
    def hist(x):
        q = (x.clamp(0, 1) * bins).long().clamp(max=bins - 1)  # [N, 3, H, W]
        cell = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]
        h = torch.bincount(cell.flatten(), minlength=bins ** 3).double()
        return h / h.sum()
    return float(0.5 * (hist(a) - hist(b)).abs().sum())
