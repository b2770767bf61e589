"""Wan 2.1 text-to-video DiT (architectures.md section 3), with the learned prompt of the paper.

Module names equal the keys of the original checkpoint (`Wan-AI/Wan2.1-T2V-1.3B`,
`diffusion_pytorch_model.safetensors`), so hub.load_wan streams it in by name.

The learned restoration prompt (paper.md 3.2) enters every cross-attention:
    out_l = CA_l(h, c) + alpha_l * CA_l(h, c + P)
with c the context after `text_embedding` and P [1, K, dim] one tensor shared by all blocks.

Precision follows the reference: the residual stream, the time embedding, the modulation tables,
the LayerNorms and the head run in fp32; the big matmuls run in the dtype of the weights (bf16 for
real checkpoints). `FP32_PARAMS` names the parameters hub.load_wan keeps in fp32 whatever the dtype.
"""
import math
import re
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import UserError, kernels

# Small parameters the reference keeps in fp32 (it runs them under fp32 autocast).
FP32_PARAMS = re.compile(r"(time_embedding|time_projection|head)\..*|.*(modulation|norm3|norm_q|norm_k).*")


@dataclass
class WanConfig:
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12  # head_dim = dim / num_heads (128 in the released models)
    num_layers: int = 30
    patch_size: tuple = (1, 2, 2)  # (t, h, w) of the Conv3d patch embedding
    in_dim: int = 16  # latent channels in
    out_dim: int = 16  # latent channels out
    text_len: int = 512  # umT5 features are zero-padded to this length
    text_dim: int = 4096  # umT5-XXL width
    freq_dim: int = 256  # sinusoidal time embedding width
    qk_norm: bool = True  # RMSNorm over the full width on q and k
    cross_attn_norm: bool = True  # affine LayerNorm `norm3` before the cross-attention
    eps: float = 1e-6

    def __post_init__(self):
        self.patch_size = tuple(self.patch_size)
        head_dim, rem = divmod(self.dim, self.num_heads)
        if rem or head_dim % 2:
            raise ValueError(f"dim {self.dim} must split into {self.num_heads} heads of even width")


WAN_PRESETS = {
    "wan2.1-t2v-1.3b": WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}


# ---------------------------------------------------------------------------------------------
# Embeddings: time sinusoid and 3D RoPE, both computed on the fly (no buffers)
# ---------------------------------------------------------------------------------------------

def sinusoidal_embedding(t, dim):
    """[cos(t f_i), sin(t f_i)] with f_i = 10000^(-i/(dim/2)); t on the 0..1000 scale, in float64."""
    half = dim // 2
    t = t.to(torch.float64)
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_angles(grid, head_dim, device, theta=10000.0):
    """3D RoPE angles [L, head_dim/2] for a (F, H, W) token grid in row-major (f, h, w) order.

    The head_dim/2 complex pairs split as [c - 2(c//3), c//3, c//3] for (frame, height, width),
    c = head_dim/2; each axis has its own table pos * theta^(-2j/axis_dim) (architectures.md 3.4).
    """
    c = head_dim // 2
    splits = [c - 2 * (c // 3), c // 3, c // 3]
    per_axis = []
    for n, pairs in zip(grid, splits):
        freqs = 1.0 / torch.pow(theta, torch.arange(pairs, dtype=torch.float64, device=device) / pairs)
        per_axis.append(torch.outer(torch.arange(n, dtype=torch.float64, device=device), freqs))
    f, h, w = grid
    angles = torch.cat([
        per_axis[0].view(f, 1, 1, -1).expand(f, h, w, -1),
        per_axis[1].view(1, h, 1, -1).expand(f, h, w, -1),
        per_axis[2].view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1)
    return angles.reshape(f * h * w, c)  # [L, c]


def apply_rope(x, cos, sin):
    """Rotate interleaved pairs (x[2j], x[2j+1]) by the angles; x [B, H, L, d], cos/sin [L, d/2] fp32."""
    x_ = x.float().unflatten(-1, (-1, 2))  # [B, H, L, d/2, 2]
    x0, x1 = x_[..., 0], x_[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    """RMSNorm over the full width (all heads together, trap 5), computed in fp32."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


def layer_norm(x, eps, weight=None, bias=None):
    """fp32 LayerNorm (the reference's WanLayerNorm); x is the fp32 residual stream."""
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    return F.layer_norm(x.float(), x.shape[-1:], w, b, eps)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------

class WanAttention(nn.Module):
    """q, k, v, o projections with full-width QK RMSNorm; `self_attn` and `cross_attn` of a block."""

    def __init__(self, dim, num_heads, qk_norm=True, eps=1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def heads(self, x):
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # [B, L, D] -> [B, H, L, d]

    def kv(self, context):
        """Keys and values of a context [B, Lc, D] -> two [B, H, Lc, d] (RMSNorm before the head split)."""
        return self.heads(self.norm_k(self.k(context))), self.heads(self.v(context))

    def prompted_kv(self, k_raw, v_raw, prompt):
        """kv(c + P) from k_raw, v_raw = k(c), v(c) [B, Lc, D] and P [1, Lc, D]: k and v are affine, so
        W(c + P) + b = k_raw + W P, and only the prompt's projection W P (no bias) is new per call."""
        r_k, r_v = F.linear(prompt, self.k.weight), F.linear(prompt, self.v.weight)
        if isinstance(self.norm_k, nn.Identity):  # qk_norm=False: nothing to fuse
            return self.heads(k_raw + r_k), self.heads(v_raw + r_v)
        return kernels.kv_prologue(k_raw, v_raw, r_k, r_v, self.norm_k.weight, self.num_heads, self.norm_k.eps)

    def self_attention(self, x, cos, sin):
        q = apply_rope(self.heads(self.norm_q(self.q(x))), cos, sin)
        k, v = self.kv(x)
        out = kernels.attention(q, apply_rope(k, cos, sin), v)
        return self.o(out.transpose(1, 2).flatten(2))  # [B, H, L, d] -> [B, L, D]

    def cross_attention(self, x, kv, prompt_kv=None, alpha=None):
        """CA(x, c), or CA(x, c) + alpha * CA(x, c + P) when prompt_kv = kv(c + P) is given (paper 3.2).

        o is affine, so alpha * CA(x, c+P) = W_o(alpha * a_p) + alpha * b_o: the attention outputs are
        summed first (one prompted_attention call) and the bias gets the extra alpha * b_o.
        """
        q = self.heads(self.norm_q(self.q(x)))
        k, v = (t.expand(q.shape[0], -1, -1, -1) for t in kv)
        if prompt_kv is None:
            return self.o(kernels.attention(q, k, v).transpose(1, 2).flatten(2))
        k_p, v_p = (t.expand(q.shape[0], -1, -1, -1) for t in prompt_kv)
        alpha = alpha.to(q.dtype)
        out = kernels.prompted_attention(q, k, v, k_p, v_p, alpha)
        return self.o(out.transpose(1, 2).flatten(2)) + alpha * self.o.bias


class WanBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = WanAttention(cfg.dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps) if cfg.cross_attn_norm else None
        self.cross_attn = WanAttention(cfg.dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x, e0, cos, sin, kv, prompt_kv=None, alpha=None):
        """x: [B, L, D] fp32 residual stream; e0: [B, 6, D] fp32 time projection."""
        dtype = self.ffn[0].bias.dtype  # the weights' dtype (the bias's: fp8 weights keep their bias in it)
        shift, scale, gate, c_shift, c_scale, c_gate = (self.modulation.float() + e0).chunk(6, dim=1)
        h = layer_norm(x, self.eps) * (1 + scale) + shift
        x = x + self.self_attn.self_attention(h.to(dtype), cos, sin).float() * gate
        # cross-attention: no modulation, no gate; norm3 is the affine LayerNorm (trap 6)
        h = layer_norm(x, self.eps, self.norm3.weight, self.norm3.bias) if self.norm3 is not None else x
        x = x + self.cross_attn.cross_attention(h.to(dtype), kv, prompt_kv, alpha).float()
        h = layer_norm(x, self.eps) * (1 + c_scale) + c_shift
        return x + self.ffn(h.to(dtype)).float() * c_gate


class Head(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x, e):
        # the head is modulated by e itself, not e0 and not SiLU(e) (trap 6); all fp32
        shift, scale = (self.modulation.float() + e[:, None]).chunk(2, dim=1)
        h = layer_norm(x, self.eps) * (1 + scale) + shift
        return F.linear(h, self.head.weight.float(), self.head.bias.float())


@dataclass
class WanContext:
    """The embedded text context and every block's base keys/values, reusable across steps.

    c: text_embedding(context) [B, L, D]; kv: per block (k, v), each [B, H, L, d]; raw: per block the
    projections (k(c), v(c)) before the norm and the head split, each [B, L, D], for the prompted k/v.
    """
    c: torch.Tensor
    kv: list = field(default_factory=list)
    raw: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class WanModel(nn.Module):
    def __init__(self, config: WanConfig):
        super().__init__()
        cfg = self.config = config
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList([WanBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        self.gradient_checkpointing = False
        self.resident = lambda block: nullcontext()  # offload.py: a block's weights on the device for a while

    @property
    def dtype(self):
        return self.patch_embedding.weight.dtype

    def precompute_context(self, context):
        """context [B, L, text_dim] padded umT5 features -> WanContext (embedded c, base k/v per block).

        The restoration context is the constant null text: compute this once and pass it to every
        forward call instead of the raw features.
        """
        ctx = WanContext(c=self.text_embedding(context.to(self.dtype)))
        for block in self.blocks:
            attn = block.cross_attn
            with self.resident(block):
                k_raw, v_raw = attn.k(ctx.c), attn.v(ctx.c)  # [B, L, D]
            ctx.raw.append((k_raw, v_raw))
            ctx.kv.append((attn.heads(attn.norm_k(k_raw)), attn.heads(v_raw)))  # = attn.kv(c)
        return ctx

    def prompt_context(self, ctx, prompt):
        """Per block (k_p, v_p) = kv(c + P), from the cached k(c), v(c) and P's projections in one fused
        kernel (kernels.kv_prologue: the sum and the norm in fp32, paper.md 2). P is zero-padded or
        truncated to the context length and projected in the weights' dtype, like FLUX's residual."""
        P = prompt.prompt
        L, K = ctx.c.shape[1], P.shape[1]
        P = (F.pad(P, (0, 0, 0, L - K)) if K < L else P[:, :L]).to(self.dtype)
        out = []
        for block, raw in zip(self.blocks, ctx.raw):
            with self.resident(block):
                out.append(block.cross_attn.prompted_kv(*raw, P))
        return out

    def forward(self, x, t, context, prompt=None):
        """x: [B, in_dim, F, H, W] latents; t: [B] timesteps on the 0..1000 scale; context: [B, L, text_dim]
        padded umT5 features or a WanContext from precompute_context; prompt: None or an object with
        `prompt` [1, K, dim] and `alpha` [num_layers]. Returns the velocity [B, out_dim, F, H, W] (fp32).
        """
        cfg = self.config
        B = x.shape[0]
        pt, ph, pw = cfg.patch_size
        if x.shape[2] % pt or x.shape[3] % ph or x.shape[4] % pw:
            raise UserError(f"latent size {tuple(x.shape[2:])} is not a multiple of the patch size "
                            f"{cfg.patch_size}: use 4k+1 frames and heights/widths that are multiples of 16")
        grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)

        h = self.patch_embedding(x.to(self.dtype))
        h = h.flatten(2).transpose(1, 2).float()  # [B, D, F, H, W] -> [B, L, D], row-major (f, h, w)

        angles = rope_angles(grid, cfg.dim // cfg.num_heads, x.device)
        cos, sin = angles.cos().float(), angles.sin().float()

        # time embedding in fp32; timesteps are integers-as-floats on 0..1000, no x1000 (trap 4)
        t = t.expand(B) if t.ndim == 0 else t
        e = F.linear(F.silu(F.linear(sinusoidal_embedding(t, cfg.freq_dim).float(),
                                     self.time_embedding[0].weight.float(), self.time_embedding[0].bias.float())),
                     self.time_embedding[2].weight.float(), self.time_embedding[2].bias.float())
        e0 = F.linear(F.silu(e), self.time_projection[1].weight.float(), self.time_projection[1].bias.float())
        e0 = e0.unflatten(1, (6, cfg.dim))  # [B, 6, D]

        ctx = context if isinstance(context, WanContext) else self.precompute_context(context)
        prompt_kv = self.prompt_context(ctx, prompt) if prompt is not None else [None] * len(self.blocks)
        for i, block in enumerate(self.blocks):
            alpha = prompt.alpha[i] if prompt is not None else None
            args = (h, e0, cos, sin, ctx.kv[i], prompt_kv[i], alpha)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, *args, use_reentrant=False)
            else:
                h = block(*args)

        out = self.head(h, e)  # [B, L, pt*ph*pw*out_dim], features ordered (pt, ph, pw, c) (trap 8)
        f, hh, ww = grid
        out = out.view(B, f, hh, ww, pt, ph, pw, cfg.out_dim)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, c, f, pt, h, ph, w, pw]
        return out.reshape(B, cfg.out_dim, f * pt, hh * ph, ww * pw)
