"""The FLUX.1 transformer (BFL reference semantics), with the learned restoration prompt folded in.

Module and parameter names equal the keys of `flux1-{dev,schnell}.safetensors`, so a BFL state dict
loads without renaming (architectures.md 2.3). The forward pass follows BFL's `model.py` and
`modules/layers.py` (architectures.md 2.2): 19 double-stream blocks (image and text with their own
weights, one joint attention), then 38 single-stream blocks over [txt; img], then an AdaLN head.

Every attention goes through `kernels`: `kernels.qkv_prologue` turns a fused qkv projection into
q, k, v (prompt residual, QK RMSNorm, RoPE) and `kernels.attention` is plain SDPA.

The learned prompt (paper.md 3.3): one tensor P [1, K, hidden] shared by all blocks and one gate
alpha_l per block. Block l attends with the text tokens' attention input `txt_mod + alpha_l * P`.
q/k/v are linear in it, so the block adds `alpha_l * (W_qkv P)` to the projected text rows instead.

The end of the file holds the sampler helpers: packing, ids, the schedule and an Euler loop.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import kernels


@dataclass
class FluxConfig:
    in_channels: int = 64  # packed latent channels: 16 latent channels x 2 x 2 patch
    out_channels: int = 64
    vec_in_dim: int = 768  # CLIP pooled output
    context_in_dim: int = 4096  # T5 hidden size
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    axes_dim: list = field(default_factory=lambda: [16, 56, 56])  # RoPE channels per id axis, sum = head_dim
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True  # dev is guidance-distilled; schnell is not


FLUX_PRESETS = {
    "flux-dev": FluxConfig(guidance_embed=True),
    "flux-schnell": FluxConfig(guidance_embed=False),
}


def default_axes_dim(head_dim):
    """RoPE split of a head for configs without a preset: [16, 56, 56] for 128, [4, 6, 6] for 16."""
    a1 = 2 * (head_dim * 7 // 32)
    return [head_dim - 2 * a1, a1, a1]


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------

def timestep_embedding(t, dim=256, max_period=10_000, time_factor=1000.0):
    """E(t) = [cos(1000 t f_i), sin(1000 t f_i)], f_i = max_period^(-i/half): cos first (BFL).

    The x1000 happens in t's dtype (the model dtype, as the reference builds t_vec), the sinusoid in
    fp32, and the result is cast back to t's dtype.
    """
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype)


def rope(ids, axes_dim, theta):
    """RoPE table from position ids (BFL `EmbedND`): ids [B, L, n_axes] -> pe [B, 1, L, head_dim/2, 2, 2].

    Axis a rotates pairs j = 0..axes_dim[a]/2-1 by pos * theta^(-2j/axes_dim[a]); the per-axis tables
    are concatenated in axis order. pe[..., i, j] is the 2x2 matrix [[cos, -sin], [sin, cos]], fp32.
    Built on the fly (no buffers: the model is built on the meta device); angles in fp64 where the
    device has it, as both references do.
    """
    wide = torch.float32 if ids.device.type == "mps" else torch.float64
    tables = []
    for a, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=wide, device=ids.device) / dim)  # [dim/2]
        angle = ids[..., a].to(wide)[..., None] * omega  # [B, L, dim/2]
        cos, sin = torch.cos(angle), torch.sin(angle)
        tables.append(torch.stack([cos, -sin, sin, cos], dim=-1))  # [B, L, dim/2, 4]
    pe = torch.cat(tables, dim=-2)  # [B, L, head_dim/2, 4]
    return pe.unflatten(-1, (2, 2)).unsqueeze(1).float()  # [B, 1, L, head_dim/2, 2, 2]


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim, hidden_dim):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """Holds the weight only: the norm itself (fp32) runs inside kernels.qkv_prologue."""

    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))


class QKNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)


class SelfAttention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias):
        super().__init__()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)  # rows laid out (3, heads, head_dim)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


class Modulation(nn.Module):
    """lin(SiLU(vec)) chunked into (shift, scale, gate), twice for a double block."""

    def __init__(self, dim, double):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec):
        return self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)  # each [B, 1, dim]


def modulate(x, shift, scale):
    """(1 + scale) * LN(x) + shift; every LayerNorm in FLUX has no affine and eps 1e-6."""
    return (1 + scale) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + shift


def prompt_residual(prompt, weight):
    """R = P W^T (no bias): what `alpha * P` adds to a qkv projection. prompt [1, K, H] -> [1, K, 3H]."""
    return F.linear(prompt.to(weight.dtype), weight)


def to_tokens(attn):
    return attn.transpose(1, 2).flatten(2)  # [B, H, L, D] -> [B, L, H*D]


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio, qkv_bias):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"),
                                     nn.Linear(mlp_hidden, hidden_size))
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"),
                                     nn.Linear(mlp_hidden, hidden_size))

    def qkv(self, attn, x, pe, prompt=None, alpha=None):
        residual = None if prompt is None else prompt_residual(prompt, attn.qkv.weight)
        return kernels.qkv_prologue(attn.qkv(x), attn.norm.query_norm.scale, attn.norm.key_norm.scale, pe,
                                    self.num_heads, residual=residual, alpha=alpha)

    def forward(self, img, txt, vec, pe, prompt=None, alpha=None):
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(vec)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(vec)
        L_txt = txt.shape[1]

        # Joint attention over [txt; img]; the prompt enters the text tokens' attention input only.
        txt_q, txt_k, txt_v = self.qkv(self.txt_attn, modulate(txt, txt_shift1, txt_scale1), pe[:, :, :L_txt],
                                       prompt, alpha)
        img_q, img_k, img_v = self.qkv(self.img_attn, modulate(img, img_shift1, img_scale1), pe[:, :, L_txt:])
        attn = kernels.attention(torch.cat([txt_q, img_q], dim=2), torch.cat([txt_k, img_k], dim=2),
                                 torch.cat([txt_v, img_v], dim=2))  # [B, H, L_txt + L_img, D]
        txt_attn, img_attn = to_tokens(attn[:, :, :L_txt]), to_tokens(attn[:, :, L_txt:])

        img = img + img_gate1 * self.img_attn.proj(img_attn)
        img = img + img_gate2 * self.img_mlp(modulate(img, img_shift2, img_scale2))
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + txt_gate2 * self.txt_mlp(modulate(txt, txt_shift2, txt_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Attention and MLP in parallel from one fused linear1: [qkv (3H) | mlp (M)] (architectures.md 2.2)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio):
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.mlp_hidden = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + self.mlp_hidden)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x, vec, pe, prompt=None, alpha=None):
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = self.linear1(modulate(x, shift, scale)).split([3 * self.hidden_size, self.mlp_hidden], dim=-1)
        # alpha * P on the first K (text) tokens reaches only the attention: its qkv rows of linear1.
        residual = None if prompt is None else prompt_residual(prompt, self.linear1.weight[: 3 * self.hidden_size])
        q, k, v = kernels.qkv_prologue(qkv, self.norm.query_norm.scale, self.norm.key_norm.scale, pe,
                                       self.num_heads, residual=residual, alpha=alpha)
        attn = to_tokens(kernels.attention(q, k, v))
        return x + gate * self.linear2(torch.cat([attn, F.gelu(mlp, approximate="tanh")], dim=-1))


class LastLayer(nn.Module):
    def __init__(self, hidden_size, out_channels):
        super().__init__()
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)  # shift first (trap 2)
        return self.linear(modulate(x, shift, scale))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class Flux(nn.Module):
    def __init__(self, config: FluxConfig):
        super().__init__()
        c = self.config = config
        if c.hidden_size % c.num_heads:
            raise ValueError(f"hidden_size {c.hidden_size} is not a multiple of num_heads {c.num_heads}")
        head_dim = c.hidden_size // c.num_heads
        if sum(c.axes_dim) != head_dim or any(a % 2 for a in c.axes_dim):
            raise ValueError(f"axes_dim {c.axes_dim} must be even and sum to head_dim {head_dim}")
        self.img_in = nn.Linear(c.in_channels, c.hidden_size)
        self.time_in = MLPEmbedder(256, c.hidden_size)
        self.vector_in = MLPEmbedder(c.vec_in_dim, c.hidden_size)
        if c.guidance_embed:
            self.guidance_in = MLPEmbedder(256, c.hidden_size)
        self.txt_in = nn.Linear(c.context_in_dim, c.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.qkv_bias) for _ in range(c.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(c.hidden_size, c.num_heads, c.mlp_ratio) for _ in range(c.depth_single_blocks))
        self.final_layer = LastLayer(c.hidden_size, c.out_channels)
        self.gradient_checkpointing = False

    def _run(self, block, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, prompt=None):
        """Velocity for packed latents.

        img [B, L_img, in_channels], img_ids [B, L_img, 3], txt [B, L_txt, context_in_dim],
        txt_ids [B, L_txt, 3], timesteps [B] in [0, 1], y [B, vec_in_dim], guidance [B] (dev) or None.
        prompt: None, or an object with `.prompt` [1, K, hidden] and `.alpha` [depth + depth_single_blocks]
        (double blocks first). Returns [B, L_img, out_channels].
        """
        c = self.config
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps.to(img.dtype)))
        if c.guidance_embed:
            if guidance is None:
                raise ValueError("this FLUX model is guidance-distilled (dev): pass guidance, e.g. 3.5")
            vec = vec + self.guidance_in(timestep_embedding(guidance.to(img.dtype)))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        L_txt = txt.shape[1]
        pe = rope(torch.cat([txt_ids, img_ids], dim=1), c.axes_dim, c.theta)  # text first

        n_blocks = c.depth + c.depth_single_blocks
        P, alpha = None, [None] * n_blocks
        if prompt is not None:
            alpha = prompt.alpha
            if tuple(alpha.shape) != (n_blocks,):
                raise ValueError(f"prompt.alpha has shape {tuple(alpha.shape)}; expected one gate per block, "
                                 f"({n_blocks},)")
            # K > L_txt: truncate; K < L_txt: the rows past K get nothing, as zero padding would give.
            P = prompt.prompt[:, :L_txt]

        for i, block in enumerate(self.double_blocks):
            img, txt = self._run(block, img, txt, vec, pe, P, alpha[i])
        x = torch.cat([txt, img], dim=1)  # [B, L_txt + L_img, hidden]
        for i, block in enumerate(self.single_blocks):
            x = self._run(block, x, vec, pe, P, alpha[c.depth + i])
        return self.final_layer(x[:, L_txt:], vec)


# ---------------------------------------------------------------------------------------------
# Sampling helpers (BFL sampling.py, architectures.md 2.5-2.6)
# ---------------------------------------------------------------------------------------------

def pack(z):
    """Latents [B, C, h, w] -> tokens [B, (h/2)(w/2), 4C]: 2x2 patches, channel slowest, then ph, pw."""
    B, C, h, w = z.shape
    z = z.view(B, C, h // 2, 2, w // 2, 2)  # b c h ph w pw
    return z.permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), C * 4)


def unpack(x, height, width):
    """Tokens [B, L, 4C] -> latents [B, C, height, width] (latent pixels, both even): inverse of `pack`."""
    B, L, D = x.shape
    x = x.view(B, height // 2, width // 2, D // 4, 2, 2)  # b h w c ph pw
    return x.permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, height, width)


def prepare_ids(batch, height, width, txt_len, device=None):
    """img_ids [B, (h/2)(w/2), 3] = (0, row, column) row-major over 2x2 patches; txt_ids all zero.

    height, width: latent size in latent pixels (both even).
    """
    rows = torch.arange(height // 2, device=device, dtype=torch.float32)
    cols = torch.arange(width // 2, device=device, dtype=torch.float32)
    ids = torch.zeros(height // 2, width // 2, 3, device=device)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    img_ids = ids.reshape(1, -1, 3).expand(batch, -1, -1)
    txt_ids = torch.zeros(batch, txt_len, 3, device=device)
    return img_ids, txt_ids


def time_shift(mu, t):
    """t' = e^mu / (e^mu + (1/t - 1)): the resolution shift; keeps t = 0 and t = 1 fixed."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def get_schedule(num_steps, image_seq_len, base_shift=0.5, max_shift=1.15, shift=True):
    """num_steps + 1 times from 1 to 0; with shift (dev), mu on the line (256, 0.5)-(4096, 1.15) in L_img."""
    t = torch.linspace(1, 0, num_steps + 1)
    if shift:
        mu = base_shift + (max_shift - base_shift) * (image_seq_len - 256) / (4096 - 256)
        t = time_shift(mu, t)
    return t.tolist()


@torch.no_grad()
def generate(model, txt, y, height, width, num_steps=4, guidance=3.5, seed=0, shift=None, prompt=None,
             txt_ids=None):
    """Text-to-image latents with the Euler sampler: x <- x + (t_prev - t_curr) v(x, t_curr).

    txt [B, L_txt, context_in_dim], y [B, vec_in_dim]; height, width in image pixels (rounded up to
    multiples of 16). shift=None shifts the schedule for guidance-distilled models (dev), not for
    schnell. Returns fp32 latents [B, 16, 2 ceil(height/16), 2 ceil(width/16)]; decoding is the caller's.
    """
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    B = txt.shape[0]
    h, w = 2 * math.ceil(height / 16), 2 * math.ceil(width / 16)
    channels = model.config.in_channels // 4
    # Noise from a CPU generator, so a seed gives the same image on every device.
    noise = torch.randn(B, channels, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    x = pack(noise.to(device=device, dtype=dtype))
    img_ids, default_txt_ids = prepare_ids(B, h, w, txt.shape[1], device=device)
    txt_ids = default_txt_ids if txt_ids is None else txt_ids
    txt, y = txt.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)
    shift = model.config.guidance_embed if shift is None else shift
    g = torch.full((B,), guidance, device=device, dtype=dtype) if model.config.guidance_embed else None
    times = get_schedule(num_steps, x.shape[1], shift=shift)
    for t_curr, t_prev in zip(times[:-1], times[1:]):
        t = torch.full((B,), t_curr, device=device, dtype=dtype)
        v = model(x, img_ids, txt, txt_ids, t, y, guidance=g, prompt=prompt)
        x = x + (t_prev - t_curr) * v
    return unpack(x.float(), h, w)
