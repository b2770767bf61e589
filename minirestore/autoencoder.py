"""The FLUX.1 autoencoder: an LDM-style 2D VAE, 16 latent channels, 8x downsampling (architectures.md 2.7).

Written as the BFL reference (`flux/modules/autoencoder.py`) writes it, so module names are the keys
of `ae.safetensors`: `encoder.down.{i}.block.{j}.conv1`, `decoder.up.{i}.upsample.conv`, ...

    encode: x in [-1, 1] -> encoder -> mean (first z_channels of the 2*z_channels outputs)
            -> z = scale_factor * (mean - shift_factor)
    decode: z -> z / scale_factor + shift_factor -> decoder -> x in (about) [-1, 1]

The reference's `DiagonalGaussian(sample=False)` returns the posterior mean, so encoding is
deterministic; there is no quant_conv / post_quant_conv. `encode(x, sample=True)` draws from the posterior
instead, mean + exp(logvar / 2) * n (diffusers `latent_dist.sample()`, which YPT's released inference uses).

Images whose longer side exceeds `tiles.above` (1024 px) are encoded and decoded in overlapping tiles
with blended seams (tiling.py): close to, not equal to, the untiled pass; `ae.tiles = None` turns it off.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .tiling import Tiles, tiled


@dataclass
class AutoEncoderConfig:
    resolution: int = 256  # training resolution of the reference; unused at run time
    in_channels: int = 3
    ch: int = 128  # channels of the first level; level i has ch * ch_mult[i]
    out_ch: int = 3
    ch_mult: list = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2  # per encoder level; the decoder has one more per level
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159


FLUX_AE = AutoEncoderConfig(256, 3, 128, 3, [1, 2, 4, 4], 2, 16, 0.3611, 0.1159)


def swish(x):
    return x * torch.sigmoid(x)


def Normalize(channels):
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, 1x1 convs for q, k, v and proj_out."""

    def __init__(self, channels):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        # [B, C, H, W] -> [B, 1, H*W, C]: one head whose width is all C channels
        q, k, v = (p(h).view(B, C, H * W).transpose(1, 2).unsqueeze(1) for p in (self.q, self.k, self.v))
        h = kernels.attention(q, k, v)  # [B, 1, H*W, C]
        h = h.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> conv3x3, plus a 1x1 `nin_shortcut` when channels change."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x):
        # asymmetric padding, right and bottom only (the reference's choice; torch conv pads symmetrically)
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def mid_block(channels):
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


def run_mid(mid, h):
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, c: AutoEncoderConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        block_in = c.ch
        for i, mult in enumerate(c.ch_mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(c.num_res_blocks):
                level.block.append(ResnetBlock(block_in, c.ch * mult))
                block_in = c.ch * mult
            if i != len(c.ch_mult) - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = mid_block(block_in)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * c.z_channels, kernel_size=3, padding=1)  # mean; logvar

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = run_mid(self.mid, h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: AutoEncoderConfig):
        super().__init__()
        block_in = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, block_in, kernel_size=3, padding=1)
        self.mid = mid_block(block_in)
        # up.{i} is built from the deepest level down but stored at index i (the reference inserts
        # at 0), so decoder.up.0 is the full-resolution level, run last.
        up = []
        for i in reversed(range(len(c.ch_mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(c.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, c.ch * c.ch_mult[i]))
                block_in = c.ch * c.ch_mult[i]
            if i != 0:
                level.upsample = Upsample(block_in)
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, c.out_ch, kernel_size=3, padding=1)

    def forward(self, z):
        h = run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class AutoEncoder(nn.Module):
    def __init__(self, config: AutoEncoderConfig = FLUX_AE):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.tiles = Tiles(above=1024, size=768, overlap=64, halo=128)  # image pixels; None: never tile

    @property
    def downsample_factor(self):
        return 2 ** (len(self.config.ch_mult) - 1)

    def encode(self, x, sample=False, generator=None):
        """x: [B, in_channels, H, W] in [-1, 1], H and W multiples of 8 (FLUX) -> z: [B, z_channels, H/8, W/8].
        sample=True: a posterior draw with `generator` instead of the mean."""
        f = self.downsample_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"the autoencoder needs image sizes that are multiples of {f}, "
                             f"got {x.shape[-2]}x{x.shape[-1]}: crop or pad the image first")
        # the moments (mean; logvar) of the whole image, from tiles when it is large; then the mean or a draw
        moments = tiled(lambda tile, at: self.encoder(tile), x, self.tiles, 1 / f, f) if self._tiled(*x.shape[-2:]) \
            else self.encoder(x)
        mean = moments[:, : self.config.z_channels]  # DiagonalGaussian(sample=False): the mean
        if sample:  # diffusers clamps logvar to [-30, 20]
            std = torch.exp(0.5 * moments[:, self.config.z_channels:].float().clamp(-30.0, 20.0))
            mean = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.config.scale_factor * (mean - self.config.shift_factor)

    def decode(self, z):
        f = self.downsample_factor
        if self._tiled(z.shape[-2] * f, z.shape[-1] * f):
            return tiled(lambda tile, at: self._decode(tile), z, self.tiles, f, 1)
        return self._decode(z)

    def _tiled(self, H, W):
        return self.tiles is not None and self.tiles.wanted(H, W)

    def _decode(self, z):
        return self.decoder(z / self.config.scale_factor + self.config.shift_factor)

    def forward(self, x):
        return self.decode(self.encode(x))
