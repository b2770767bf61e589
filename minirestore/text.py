"""The frozen text encoders: T5 v1.1 XXL and CLIP ViT-L/14 text (FLUX.1), umT5-XXL (Wan 2.1).

Module names equal the Hugging Face `transformers` checkpoint keys (`encoder.block.3.layer.1.DenseReluDense.wi_0`,
`text_model.encoder.layers.5.mlp.fc1`), so the official `text_encoder*/` folders load without a key map.
The method only ever needs these encoders once per backbone, to encode the empty prompt (see context.py);
they are real so that text prompts can be compared against learned ones (architectures.md 2.8, 3.7).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------------------
# T5 v1.1 / umT5 encoder
# ---------------------------------------------------------------------------------------------

@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64            # per-head width; num_heads * d_kv need not equal d_model
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    num_buckets: int = 32     # relative-position buckets (bidirectional: half per direction)
    max_distance: int = 128   # distances beyond this share the last bucket
    eps: float = 1e-6
    shared_pos: bool = True   # T5 v1.1: one bias in block 0 shared by all; umT5: a bias in every block


T5_PRESETS = {
    "t5-v1_1-xxl": T5Config(),                                        # FLUX text_encoder_2/
    "umt5-xxl": T5Config(vocab_size=256384, shared_pos=False),        # Wan 2.1 text_encoder/
}


class RMSNorm(nn.Module):
    """T5 layer norm: x / rms(x) * w, no mean, no bias; the statistics in fp32 (an fp32 island)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(self.weight.dtype)


def relative_position_bucket(length, num_buckets, max_distance, device=None):
    """Bidirectional T5 bucket of (key position - query position) -> [L, L] long (Mesh TensorFlow's rule).

    Half the buckets per direction; of those, half are exact distances 0..max_exact-1, the rest grow
    logarithmically up to max_distance, and everything further shares the last bucket.
    """
    pos = torch.arange(length, device=device)
    rel = pos[None, :] - pos[:, None]  # [Lq, Lk]
    num_buckets //= 2
    bucket = (rel > 0).long() * num_buckets
    rel = rel.abs()
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return bucket + torch.where(rel < max_exact, rel, large)


class T5Attention(nn.Module):
    """Self-attention with an additive relative-position bias and no 1/sqrt(d) scaling (folded into the init)."""

    def __init__(self, c: T5Config, has_bias: bool):
        super().__init__()
        inner = c.num_heads * c.d_kv
        self.num_heads = c.num_heads
        self.q = nn.Linear(c.d_model, inner, bias=False)
        self.k = nn.Linear(c.d_model, inner, bias=False)
        self.v = nn.Linear(c.d_model, inner, bias=False)
        self.o = nn.Linear(inner, c.d_model, bias=False)
        if has_bias:
            self.relative_attention_bias = nn.Embedding(c.num_buckets, c.num_heads)

    def forward(self, x, bias):
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, self.num_heads, -1).transpose(1, 2)
                   for p in (self.q, self.k, self.v))  # [B, H, L, d]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o(out.transpose(1, 2).reshape(B, L, -1))


class T5GatedFFN(nn.Module):
    """wo(gelu_tanh(wi_0 x) * wi_1 x): T5 v1.1's gated-GELU ("gelu_new" is the tanh approximation)."""

    def __init__(self, c: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wi_1 = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wo = nn.Linear(c.d_ff, c.d_model, bias=False)

    def forward(self, x):
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class T5Block(nn.Module):
    def __init__(self, c: T5Config, has_bias: bool):
        super().__init__()
        # `layer.0` / `layer.1` with these member names are the HF checkpoint keys.
        self.layer = nn.ModuleList([
            nn.ModuleDict(dict(SelfAttention=T5Attention(c, has_bias), layer_norm=RMSNorm(c.d_model, c.eps))),
            nn.ModuleDict(dict(DenseReluDense=T5GatedFFN(c), layer_norm=RMSNorm(c.d_model, c.eps))),
        ])

    def forward(self, x, bias):
        attn, ffn = self.layer
        x = x + attn.SelfAttention(attn.layer_norm(x), bias)
        return x + ffn.DenseReluDense(ffn.layer_norm(x))


class T5Encoder(nn.Module):
    """T5 v1.1 / umT5 encoder stack. forward(input_ids [B, L], attention_mask [B, L] or None) -> [B, L, d_model]."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = c = config
        self.shared = nn.Embedding(c.vocab_size, c.d_model)  # the file may call it encoder.embed_tokens (hub_text.py)
        self.encoder = nn.ModuleDict(dict(
            block=nn.ModuleList([T5Block(c, has_bias=(i == 0 or not c.shared_pos)) for i in range(c.num_layers)]),
            final_layer_norm=RMSNorm(c.d_model, c.eps),
        ))

    def forward(self, input_ids, attention_mask=None):
        c = self.config
        x = self.shared(input_ids)
        buckets = relative_position_bucket(input_ids.shape[1], c.num_buckets, c.max_distance, input_ids.device)
        mask = None
        if attention_mask is not None:  # padding keys get the most negative finite value, as the reference
            mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min  # [B, 1, 1, L]
        bias = None
        for block in self.encoder.block:
            attn = block.layer[0].SelfAttention
            if bias is None or not c.shared_pos:
                bias = attn.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # [1, H, L, L]
                if mask is not None:
                    bias = bias + mask
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


# ---------------------------------------------------------------------------------------------
# CLIP text tower (ViT-L/14)
# ---------------------------------------------------------------------------------------------

@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_positions: int = 77
    eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    # The FLUX / OpenAI config.json says 2 (wrong since 2023); transformers then pools at argmax(input_ids),
    # which is the first <|endoftext|> because that is the largest id. Any other value: first id == eos.
    eos_token_id: int = 2


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)  # CLIP's activation, not the erf/tanh GELU


class CLIPAttention(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.num_heads = c.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(c.hidden_size, c.hidden_size) for _ in range(4))

    def forward(self, x, mask):
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, self.num_heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # [B, H, L, d]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale 1/sqrt(d)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, -1))


class CLIPLayer(nn.Module):
    """Pre-LN transformer layer: x += attn(ln1 x); x += fc2(act(fc1(ln2 x)))."""

    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(c)
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.eps)
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(c.hidden_size, c.intermediate_size),
                                      fc2=nn.Linear(c.intermediate_size, c.hidden_size)))
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.eps)
        self.act = quick_gelu if c.hidden_act == "quick_gelu" else F.gelu

    def forward(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp.fc2(self.act(self.mlp.fc1(self.layer_norm2(x))))


class CLIPTextEncoder(nn.Module):
    """CLIP text tower. forward(input_ids [B, L], attention_mask=None) -> (last_hidden_state [B, L, D], pooled [B, D]).

    pooled is the final-LayerNorm output at the first EOS token, with no text_projection (FLUX's `y`).
    """

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = c = config
        self.text_model = nn.ModuleDict(dict(
            embeddings=nn.ModuleDict(dict(token_embedding=nn.Embedding(c.vocab_size, c.hidden_size),
                                          position_embedding=nn.Embedding(c.max_positions, c.hidden_size))),
            encoder=nn.ModuleDict(dict(layers=nn.ModuleList([CLIPLayer(c) for _ in range(c.num_layers)]))),
            final_layer_norm=nn.LayerNorm(c.hidden_size, eps=c.eps),
        ))

    def forward(self, input_ids, attention_mask=None):
        tm, (B, L) = self.text_model, input_ids.shape
        positions = torch.arange(L, device=input_ids.device)
        x = tm.embeddings.token_embedding(input_ids) + tm.embeddings.position_embedding(positions)
        mask = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()[None, None]  # causal [1, 1, L, L]
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]  # and no padding keys [B, 1, L, L]
        for layer in tm.encoder.layers:
            x = layer(x, mask)
        x = tm.final_layer_norm(x)
        if self.config.eos_token_id == 2:
            eos = input_ids.argmax(-1)
        else:
            eos = (input_ids == self.config.eos_token_id).int().argmax(-1)
        return x, x[torch.arange(B, device=x.device), eos]
