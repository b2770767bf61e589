"""PyTorch reference for every kernel in this package: the specification, written for reading.

Everything here runs on any device. The Triton kernels in this package must match these functions
(forward and backward) to floating-point rounding; the tests hold them to it.
"""
import torch
import torch.nn.functional as F


def attention(q, k, v):
    """softmax(q k^T / sqrt(D)) v, non-causal, no mask.

    q: [B, H, Lq, D], k and v: [B, H, Lk, D] -> [B, H, Lq, D]
    """
    return F.scaled_dot_product_attention(q, k, v)


def prompted_attention(q, k, v, k_p, v_p, alpha):
    """Wan's prompted cross-attention: attn(q, k, v) + alpha * attn(q, k_p, v_p).

    k, v come from the base (null-text) context c, k_p, v_p from the prompted context c + P
    (paper.md section 3.2). alpha is a 0-dim tensor (the block's gate alpha_l).
    """
    return attention(q, k, v) + alpha * attention(q, k_p, v_p)


def rms_norm(x, scale, eps=1e-6):
    """RMSNorm over the last dim, computed in fp32 and cast back (BFL QKNorm / Wan norm_q, norm_k)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (x * scale.float()).to(dtype)


def apply_rope(x, pe):
    """FLUX RoPE: rotate interleaved channel pairs (x[2j], x[2j+1]) by the 2x2 matrices in pe.

    x: [B, H, L, D]; pe: [B or 1, 1, L, D/2, 2, 2] (fp32) as built by minirestore.flux.rope.
    out_0 = pe[..., 0, 0] x_0 + pe[..., 0, 1] x_1;  out_1 = pe[..., 1, 0] x_0 + pe[..., 1, 1] x_1
    """
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)  # [B, H, L, D/2, 1, 2]
    out = pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]
    return out.reshape(*x.shape).type_as(x)


def qkv_prologue(qkv, q_scale, k_scale, pe, num_heads, residual=None, alpha=None, eps=1e-6):
    """From a block's fused qkv projection to the attention inputs, with the learned prompt folded in.

    qkv: [B, L, 3*H*D], laid out (3, heads, head_dim) with the 3 outermost (architectures.md 2.2).
    residual: [1 or B, K, 3*H*D] = W_qkv P (no bias), the prompt's projection (paper.md 3.3);
    alpha: 0-dim tensor. The prompt is a residual on the first K rows (the text tokens):
        qkv[:, :K] += alpha * residual
    Then per-head RMSNorm of q and k (fp32, weights q_scale, k_scale) and RoPE from pe (pe=None: no
    rotation). Returns q, k, v as [B, H, L, D].
    """
    if residual is not None:
        K = residual.shape[1]
        qkv = torch.cat([qkv[:, :K] + alpha.to(qkv.dtype) * residual.to(qkv.dtype), qkv[:, K:]], dim=1)
    B, L, _ = qkv.shape
    q, k, v = qkv.view(B, L, 3, num_heads, -1).permute(2, 0, 3, 1, 4)  # 3 x [B, H, L, D]
    q = rms_norm(q, q_scale, eps).to(v.dtype)
    k = rms_norm(k, k_scale, eps).to(v.dtype)
    if pe is not None:
        q, k = apply_rope(q, pe), apply_rope(k, pe)
    return q, k, v


def kv_prologue(k_raw, v_raw, r_k, r_v, k_scale, num_heads, eps=1e-6):
    """Wan's prompted cross-attention keys and values, from cached projections of the base context.

    k, v are affine, so kv(c + P) = norm_k(W_k c + b_k + W_k P), W_v c + b_v + W_v P (paper.md 3.2):
    k_raw, v_raw: [B or 1, L, dim] = W_k c + b_k, W_v c + b_v of the base (null-text) context, constant;
    r_k, r_v: [1 or B, L, dim] = W_k P, W_v P, the prompt's projections (no bias), any float dtype.
        k_p = RMSNorm(k_raw + r_k) * k_scale     over the full width dim (all heads together), fp32
        v_p = v_raw + r_v                        fp32 add
    both cast to k_raw's dtype and split into heads. Returns k_p, v_p as [B, H, L, dim / H].
    """
    dtype = k_raw.dtype
    k = rms_norm(k_raw.float() + r_k.float(), k_scale, eps)
    v = v_raw.float() + r_v.float()
    # [B, L, dim] -> [B, H, L, d]
    return tuple(t.to(dtype).unflatten(-1, (num_heads, -1)).transpose(1, 2) for t in (k, v))
