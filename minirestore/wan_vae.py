"""Wan 2.1 causal 3D VAE (architectures.md 3.8): 8x spatial, 4x temporal, frame 0 alone, z_dim 16.

Module names equal the keys of the original `Wan2.1_VAE.pth`, so hub.load_wan_vae loads it by name.

Causality: every temporal convolution only looks back, and frame 0 is compressed alone, so a clip of
1 + 4k frames gives 1 + k latent frames. Memory stays bounded on long clips the way the reference
does it: encode frame 0, then chunks of 4 frames; decode one latent frame at a time. Between chunks
each causal layer keeps the last frames of its input in `cache`, a dict keyed by the layer, so a
chunked pass computes exactly what one pass over the whole clip computes (a fresh dict = the start
of a clip). `chunked=False` runs the clip in one pass (faster, more memory). Passing the same `state`
dict to successive `decode` calls decodes a clip's latents a few frames at a time (streaming).
Clips whose longer side exceeds `tiles.above` (832 px, i.e. beyond 480p) are encoded and decoded in
overlapping spatial tiles with blended seams (tiling.py); `vae.tiles = None` turns it off.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import UserError
from .tiling import Tiles, tiled

# Per-channel latent statistics of the released VAE (Wan `WanVAE`, diffusers `latents_mean/std`).
LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


@dataclass
class WanVAEConfig:
    dim: int = 96  # base channel count
    z_dim: int = 16  # latent channels
    dim_mult: tuple = (1, 2, 4, 4)  # channels per level: dim * mult
    num_res_blocks: int = 2  # per encoder level (the decoder has one more)
    temperal_downsample: tuple = (False, True, True)  # per level transition (the reference's spelling)
    latents_mean: tuple = tuple(LATENTS_MEAN)
    latents_std: tuple = tuple(LATENTS_STD)

    def __post_init__(self):
        self.dim_mult = tuple(self.dim_mult)
        self.temperal_downsample = tuple(self.temperal_downsample)
        self.latents_mean, self.latents_std = tuple(self.latents_mean), tuple(self.latents_std)
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError("temperal_downsample needs one entry per level transition (len(dim_mult) - 1)")

    @property
    def temporal_factor(self):
        return 2 ** sum(self.temperal_downsample)

    @property
    def spatial_factor(self):
        return 2 ** (len(self.dim_mult) - 1)


# ---------------------------------------------------------------------------------------------
# Building blocks; every forward takes (x [B, C, T, H, W], cache)
# ---------------------------------------------------------------------------------------------

class CausalConv3d(nn.Conv3d):
    """Conv3d padded symmetrically in space and by 2*p_t frames on the left only (causal in time).

    At a chunk boundary the left padding is the previous chunk's last input frames (from `cache`);
    at the start of a clip it is zeros.
    """

    def __init__(self, in_dim, out_dim, kernel_size, stride=1, padding=0):
        super().__init__(in_dim, out_dim, kernel_size, stride=stride)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.time_pad, self.space_pad = 2 * pt, (pw, pw, ph, ph)
        self.padding = (0, 0, 0)

    def forward(self, x, cache):
        p = self.time_pad
        if p:
            prev = cache.get(self)
            if prev is not None:
                x = torch.cat([prev, x], dim=2)
            cache[self] = x[:, :, -p:].clone()
            p -= 0 if prev is None else prev.shape[2]  # zeros only for frames before the clip
        return super().forward(F.pad(x, self.space_pad + (p, 0)))


class RMS_norm(nn.Module):
    """F.normalize over channels * sqrt(C) * gamma (no bias); gamma [C,1,1,1] (video) or [C,1,1] (frames)."""

    def __init__(self, dim, images=False):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x):
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, in_dim, out_dim):
        super().__init__()
        # indices 0, 2, 3, 6 carry weights: the keys are residual.{0,2,3,6}.*
        self.residual = nn.Sequential(
            RMS_norm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim), nn.SiLU(), nn.Dropout(0.0), CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x, cache):
        h = self.shortcut(x, cache) if self.shortcut is not None else x
        for layer in self.residual:
            x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (no temporal mixing)."""

    def __init__(self, dim):
        super().__init__()
        self.norm = RMS_norm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x, cache=None):
        B, C, T, H, W = x.shape
        h = x.transpose(1, 2).reshape(B * T, C, H, W)  # one image per frame
        q, k, v = self.to_qkv(self.norm(h)).view(B * T, 3 * C, H * W).transpose(1, 2).chunk(3, dim=-1)
        # the head has C channels (384 in the real model), so this is plain SDPA, not kernels.attention
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # [BT, HW, C]
        h = self.proj(h.transpose(1, 2).reshape(B * T, C, H, W))
        return x + h.view(B, T, C, H, W).transpose(1, 2)


def per_frame(fn, x):
    """Apply a 2D module to every frame of x [B, C, T, H, W]."""
    B, _, T = x.shape[:3]
    y = fn(x.transpose(1, 2).flatten(0, 1))  # [B*T, C, H, W]
    return y.unflatten(0, (B, T)).transpose(1, 2)


class Upsample(nn.Upsample):
    def forward(self, x):
        return super().forward(x.float()).type_as(x)  # nearest-exact in fp32 (bf16 support)


class Resample(nn.Module):
    """x2 spatial down/upsampling per frame; the '3d' modes also halve/double time, frame 0 alone."""

    def __init__(self, dim, mode):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            # nearest-exact x2, then a 3x3 conv that halves the channels
            self.resample = nn.Sequential(Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x, cache):
        if self.mode == "upsample3d":
            # frame 0 of the clip passes alone; every later frame t becomes frames 2t-1, 2t
            first, rest = (x[:, :, :0], x) if self in cache else (x[:, :, :1], x[:, :, 1:])
            cache[self] = True
            if rest.shape[2]:
                B, C, T, H, W = rest.shape
                rest = self.time_conv(rest, cache).view(B, 2, C, T, H, W)  # 2C channels -> 2 frames
                rest = rest.permute(0, 2, 3, 1, 4, 5).reshape(B, C, 2 * T, H, W)  # channels [0:C] first
            x = torch.cat([first, rest], dim=2)
        x = per_frame(self.resample, x)
        if self.mode == "downsample3d":
            # stride-2 windows (0,1,2), (2,3,4), ...; frame 0 of the clip is also kept alone
            prev = cache.get(self)
            cache[self] = x[:, :, -1:].clone()
            first, x = (x[:, :, :1], x) if prev is None else (x[:, :, :0], torch.cat([prev, x], dim=2))
            x = torch.cat([first, self.time_conv(x, cache)], dim=2) if x.shape[2] >= 3 else first
        return x


# ---------------------------------------------------------------------------------------------
# Encoder, decoder
# ---------------------------------------------------------------------------------------------

class Encoder3d(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dims = [cfg.dim * m for m in (1,) + cfg.dim_mult]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(cfg.dim_mult) - 1:
                layers.append(Resample(out_dim, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)
        self.middle = nn.Sequential(ResidualBlock(dims[-1], dims[-1]), AttentionBlock(dims[-1]),
                                    ResidualBlock(dims[-1], dims[-1]))
        self.head = nn.Sequential(RMS_norm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, padding=1))

    def forward(self, x, cache):
        x = self.conv1(x, cache)
        for layer in list(self.downsamples) + list(self.middle):
            x = layer(x, cache)
        return self.head[2](self.head[1](self.head[0](x)), cache)


class Decoder3d(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        mult = cfg.dim_mult[::-1]
        dims = [cfg.dim * m for m in (mult[0],) + mult]
        temperal_upsample = cfg.temperal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # every upsample halves the channels
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(mult) - 1:
                layers.append(Resample(out_dim, "upsample3d" if temperal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMS_norm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x, cache):
        x = self.conv1(x, cache)
        for layer in list(self.middle) + list(self.upsamples):
            x = layer(x, cache)
        return self.head[2](self.head[1](self.head[0](x)), cache)


class WanVAE(nn.Module):
    def __init__(self, config: WanVAEConfig = None):
        super().__init__()
        cfg = self.config = config or WanVAEConfig()
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)  # -> (mu, log_var)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)
        self.tiles = Tiles(above=832, size=512, overlap=64, halo=128)  # image pixels; None: never tile

    def _stats(self, like):
        shape = (1, -1, 1, 1, 1)
        mean = torch.tensor(self.config.latents_mean, dtype=torch.float32, device=like.device).view(shape)
        std = torch.tensor(self.config.latents_std, dtype=torch.float32, device=like.device).view(shape)
        return mean, std

    def encode_moments(self, video, chunked=True):
        """video [B, 3, 1+4k, H, W] in [-1, 1] -> (mu, log_var), each [B, z_dim, 1+k, H/8, W/8], unnormalized."""
        cfg = self.config
        T, H, W = video.shape[2:]
        tf, sf = cfg.temporal_factor, cfg.spatial_factor
        if (T - 1) % tf or H % sf or W % sf:
            raise UserError(f"the VAE needs {tf}k+1 frames and sizes that are multiples of {sf}, got {T} "
                            f"frames of {H}x{W}: trim or pad the clip (video.to_4k1) and resize it")
        video = video.to(self.conv1.weight.dtype)

        def run(video, at=None):
            cache = {}
            # frame 0 alone, then chunks of `tf` frames (the reference encodes 1, 4, 4, ...)
            chunks = [video[:, :, :1]] + [video[:, :, i:i + tf] for i in range(1, T, tf)] if chunked else [video]
            out = torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)
            return self.conv1(out, cache)  # (mu, log_var) stacked on channels

        out = tiled(run, video, self.tiles, 1 / sf, sf) if self._tiled(H, W) else run(video)
        mu, log_var = out.chunk(2, dim=1)
        return mu, log_var

    def _tiled(self, H, W):
        return self.tiles is not None and self.tiles.wanted(H, W)

    def encode(self, video, sample=False, generator=None):
        """video [B, 3, F, H, W] (or one image [B, 3, H, W]) in [-1, 1] -> normalized latents (mu - mean) / std.

        sample=True draws mu + exp(log_var / 2) * eps instead of returning mu.
        """
        image = video.ndim == 4
        mu, log_var = self.encode_moments(video[:, :, None] if image else video)
        z = mu.float()
        if sample:
            std = torch.exp(0.5 * log_var.float().clamp(-30.0, 20.0))
            z = z + std * torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        mean, std = self._stats(z)
        z = (z - mean) / std
        return z[:, :, 0] if image else z

    def decode(self, z, chunked=True, state=None):
        """Normalized latents [B, z_dim, 1+k, h, w] (or [B, z_dim, h, w]) -> video [B, 3, 1+4k, 8h, 8w] in [-1, 1].

        state: None (z is a whole clip), or a dict kept by the caller and passed again with the clip's next
        latent frames: the decoder's causal caches (one per tile) live in it, so decoding a clip in pieces
        gives what one call gives (the first piece yields 1 + 4(n - 1) frames, later ones 4 per latent).
        """
        image = z.ndim == 4
        z = z[:, :, None] if image else z
        mean, std = self._stats(z)
        x = self.conv2((z.float() * std + mean).to(self.conv2.weight.dtype), {})
        state = {} if state is None else state

        def run(x, at=None):
            cache = state.setdefault(at, {})
            chunks = x.split(1, dim=2) if chunked else [x]  # one latent frame at a time
            return torch.cat([self.decoder(chunk, cache) for chunk in chunks], dim=2).float()

        sf = self.config.spatial_factor
        out = tiled(run, x, self.tiles, sf, 1) if self._tiled(x.shape[-2] * sf, x.shape[-1] * sf) else run(x)
        out = out.clamp(-1, 1)
        return out[:, :, 0] if image else out
