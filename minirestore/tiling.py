"""Tiled codecs: run a VAE's encoder or decoder over overlapping spatial tiles and blend the seams.

A VAE's activations grow with the image: the FLUX autoencoder's first level holds 128 fp32 channels per
pixel (2 GB per tensor at 2048 x 2048), the Wan VAE 96 channels per pixel and frame. Convolutions are
local, so a tile computed with a margin of context around it (`halo`, cropped off afterwards) gives what
the whole image gives inside the tile, up to the global parts: the FLUX autoencoder's GroupNorm
statistics and mid-block attention, the Wan VAE's per-frame mid-block attention see the tile and its
halo, not the image. What remains of those differences is spread out by overlapping the tiles and
blending them with linear ramps across the overlap,

    out[p] = sum_tiles w_tile(p) f(tile + halo)[p] / sum_tiles w_tile(p),

so no seam is a hard edge. Tiled outputs are close to, not equal to, untiled ones (tests/test_tiling.py
states the tolerance). `Tiles.above` makes it automatic: images whose longer side is larger are tiled.
"""
from dataclasses import dataclass

import torch


@dataclass
class Tiles:
    above: int    # tile when the longer side (input pixels of the codec's image side) exceeds this; 0 = always
    size: int     # tile side, in image pixels (a multiple of the codec's downsampling)
    overlap: int  # pixels shared (and blended) by neighbouring tiles (a multiple of the codec's downsampling)
    halo: int = 0  # context pixels computed around each tile and cropped off (a multiple of the downsampling)

    def wanted(self, H, W):
        return max(H, W) > self.above


def tile_starts(size, tile, overlap, align=1):
    """Starts (multiples of `align`) of tiles of length `tile` covering [0, size), neighbours sharing >= overlap."""
    if size <= tile:
        return [0]
    if (size - tile) % align:
        raise ValueError(f"size {size} and tile {tile} must differ by a multiple of {align}")
    n = 1 + -(-(size - tile) // max(1, tile - overlap))  # ceil
    while True:
        starts = [i * (size - tile) // (n - 1) // align * align for i in range(n)]
        starts[-1] = size - tile
        if all(b - a <= tile - overlap for a, b in zip(starts, starts[1:])):
            return starts
        n += 1


def blend_weight(h, w, overlap, device=None):
    """A tile's weight: 1 inside, ramping linearly down over `overlap` pixels at its sides, never zero."""
    def ramp(n):
        i = torch.arange(n, dtype=torch.float32, device=device)
        return torch.minimum(i + 1, n - i).clamp(max=overlap + 1) / (overlap + 1)
    return ramp(h)[:, None] * ramp(w)[None, :]


def tiled(fn, x, tiles, scale, align):
    """fn over overlapping tiles of x [..., H, W], blended: fn(tile, at) maps [..., h, w] -> [..., h * scale,
    w * scale]; `at` = (row, column) of the tile's corner in x, the same for the same tile on every call (a
    streaming decoder keys its per-tile state by it).

    scale: the output pixels per input pixel (1/8 for an encoder, 8 for a decoder); align: tile starts and
    sizes in input pixels are multiples of it (1 for latents, the downsampling factor for images). Tile
    size and overlap are given in image pixels and converted to input pixels here.
    """
    H, W = x.shape[-2:]
    to_input = 1 if scale < 1 else 1 / scale  # image pixels -> input pixels (images for an encoder, latents for a decoder)
    size = max(align, int(tiles.size * to_input) // align * align)
    overlap = int(tiles.overlap * to_input) // align * align
    halo = int(tiles.halo * to_input) // align * align
    th, tw = min(size, H), min(size, W)
    out = weight = None
    for i in tile_starts(H, th, overlap, align):
        for j in tile_starts(W, tw, overlap, align):
            i0, j0 = max(0, i - halo), max(0, j - halo)
            y = fn(x[..., i0:min(H, i + th + halo), j0:min(W, j + tw + halo)], (i, j))
            ci, cj = round((i - i0) * scale), round((j - j0) * scale)  # crop the halo off
            y = y[..., ci:ci + round(th * scale), cj:cj + round(tw * scale)]
            if out is None:
                out = y.new_zeros(*y.shape[:-2], round(H * scale), round(W * scale))
                weight = y.new_zeros(out.shape[-2:])
            oi, oj, (yh, yw) = round(i * scale), round(j * scale), y.shape[-2:]
            w = blend_weight(yh, yw, max(1, round(overlap * scale)), device=y.device).to(y.dtype)
            out[..., oi:oi + yh, oj:oj + yw] += y * w
            weight[oi:oi + yh, oj:oj + yw] += w
            del y
    return out / weight
