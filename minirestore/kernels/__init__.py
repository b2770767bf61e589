"""The one entry point for attention and its prologues.

    attention(q, k, v)                                   softmax attention (FLUX, Wan self-attention)
    prompted_attention(q, k, v, k_p, v_p, alpha)         Wan's prompted cross-attention, two contexts in one pass
    qkv_prologue(qkv, q_scale, k_scale, pe, H, ...)      FLUX: fused qkv -> q, k, v (prompt residual, per-head
                                                         QK RMSNorm, RoPE); double and single blocks
    kv_prologue(k_raw, v_raw, r_k, r_v, k_scale, H, eps) Wan: cached k/v of the base context + the prompt's
                                                         projections -> k_p, v_p (full-width RMSNorm on k)

CUDA tensors run the Triton kernels; everything else runs the PyTorch reference in
`reference.py` beside this file, which is the specification. MINIRESTORE_KERNELS=torch forces the reference
everywhere; MINIRESTORE_KERNELS=triton forces the Triton kernels (on the CPU that is the Triton
interpreter, TRITON_INTERPRET=1, which the tests use). The variable is read at every call.

The Triton modules (flash.py, prompted.py, prologue.py) are imported on first use, so a machine
without triton (macOS) runs the reference in auto mode (with one warning if it has a GPU). Inputs the
kernels do not support take the reference too: dtypes other than fp16, bf16 and fp32, and attention
head dims above MAX_TRITON_HEAD_DIM. TRITON_INTERPRET=1 with CUDA tensors is refused (the interpreter
would run them on the CPU, very slowly). MINIRESTORE_KERNELS_POISON=1 makes the Triton wrappers fill
their outputs with NaN first, so an element a kernel never writes shows up.
"""
import os
import warnings

import torch

from .. import UserError
from . import reference

_triton = None  # (flash, prompted, prologue) once imported, or the ImportError that stopped it


def _load():
    global _triton
    if _triton is None:
        try:
            if not torch.cuda.is_available():
                # triton.jit decides at decoration whether a kernel is interpreted; with no GPU the
                # interpreter is the only way the kernels can run.
                os.environ.setdefault("TRITON_INTERPRET", "1")
            from . import flash, prologue, prompted
            _triton = (flash, prompted, prologue)
        except ImportError as e:
            _triton = e
    return _triton


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the kernels compute in; others: reference
_warned = set()


def _warn_once(message):
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def _use_triton(*tensors):
    choice = os.environ.get("MINIRESTORE_KERNELS", "auto")
    if choice == "torch":
        return False
    if choice not in ("auto", "triton"):
        raise UserError(f"MINIRESTORE_KERNELS={choice!r} is not a choice: use auto, torch or triton")
    x = tensors[0]
    if choice == "auto" and not x.is_cuda:
        return False
    if x.dtype not in SUPPORTED_DTYPES:
        return False  # e.g. fp64 (gradient checks): the reference computes it
    if x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise UserError("TRITON_INTERPRET=1 is set but the inputs are CUDA tensors: unset TRITON_INTERPRET to run "
                        "the compiled kernels, or set MINIRESTORE_KERNELS=torch")
    loaded = _load()
    if isinstance(loaded, ImportError):
        if choice == "auto":  # no triton on this platform: the reference is the fallback
            _warn_once(f"triton cannot be imported ({loaded}): CUDA tensors take the PyTorch reference kernels; "
                       "install triton for the fused ones")
            return False
        raise UserError(f"MINIRESTORE_KERNELS=triton but triton cannot be imported ({loaded}); "
                        "install triton or unset MINIRESTORE_KERNELS")
    if loaded[0].INTERPRET and x.is_cuda:  # the variable was set when the kernels were imported
        raise UserError("the Triton kernels were imported under TRITON_INTERPRET=1 but the inputs are CUDA tensors: "
                        "start a process without TRITON_INTERPRET, or set MINIRESTORE_KERNELS=torch")
    if not loaded[0].INTERPRET and not x.is_cuda:
        raise UserError(f"MINIRESTORE_KERNELS=triton got {x.device} tensors but the kernels were compiled "
                        "for CUDA; set TRITON_INTERPRET=1 before the first kernel call to run Triton on the CPU, "
                        "or use MINIRESTORE_KERNELS=torch")
    return True


def _check(name, x, *others):
    for t in others:
        if t.dtype != x.dtype or t.device != x.device:
            raise UserError(f"{name}: all inputs must share one dtype and device, got {x.dtype}/{x.device} "
                            f"and {t.dtype}/{t.device}; cast them first")


# Head dims above this take the reference (SDPA): the tile configs are compile-checked up to it
# (flash.MAX_HEAD_DIM, benchmarks/compile_check.py). FLUX and Wan use 128; the VAE's single-head
# mid-block attention (D = 512) is a small call that SDPA serves well.
MAX_TRITON_HEAD_DIM = 128


def _too_wide(q):
    return q.shape[-1] > MAX_TRITON_HEAD_DIM


def attention(q, k, v):
    """softmax(q k^T / sqrt(D)) v. q: [B, H, Lq, D], k, v: [B, H, Lk, D] -> [B, H, Lq, D]."""
    if not _use_triton(q, k, v) or _too_wide(q):
        return reference.attention(q, k, v)
    _check("attention", q, k, v)
    return _triton[0].attention(q, k, v)


def prompted_attention(q, k, v, k_p, v_p, alpha):
    """attention(q, k, v) + alpha * attention(q, k_p, v_p) (Wan's prompted cross-attention)."""
    if not _use_triton(q, k, v, k_p, v_p) or _too_wide(q):
        return reference.prompted_attention(q, k, v, k_p, v_p, alpha)
    _check("prompted_attention", q, k, v, k_p, v_p)
    if not torch.is_tensor(alpha):
        alpha = torch.tensor(float(alpha), device=q.device)
    return _triton[1].prompted_attention(q, k, v, k_p, v_p, alpha)


def qkv_prologue(qkv, q_scale, k_scale, pe, num_heads, residual=None, alpha=None, eps=1e-6):
    """Fused qkv [B, L, 3*H*D] -> q, k, v [B, H, L, D]: prompt residual, QK RMSNorm, RoPE."""
    if (residual is None) != (alpha is None):
        raise UserError("qkv_prologue: pass residual and alpha together (or neither)")
    if not _use_triton(qkv, q_scale, k_scale, pe, residual):
        return reference.qkv_prologue(qkv, q_scale, k_scale, pe, num_heads, residual, alpha, eps)
    D = qkv.shape[-1] // (3 * num_heads)
    if qkv.shape[-1] != 3 * num_heads * D or D % 2:
        raise UserError(f"qkv_prologue: width {qkv.shape[-1]} is not 3 * {num_heads} heads * an even head dim")
    if pe is not None and (pe.shape[2] != qkv.shape[1] or pe.shape[3] != D // 2):
        raise UserError(f"qkv_prologue: pe {tuple(pe.shape)} does not match L={qkv.shape[1]}, D/2={D // 2}")
    return _triton[2].qkv_prologue(qkv, q_scale, k_scale, pe, num_heads, residual, alpha, eps)


def kv_prologue(k_raw, v_raw, r_k, r_v, k_scale, num_heads, eps=1e-6):
    """Wan's prompted keys/values: k_p = RMSNorm_full(k_raw + r_k) * k_scale, v_p = v_raw + r_v -> [B, H, L, d].

    k_raw, v_raw [B or 1, L, C]: W_k c + b_k, W_v c + b_v of the base context; r_k, r_v [1 or B, L, C]:
    W_k P, W_v P (no bias). Wan's sibling of qkv_prologue: no q, no RoPE, no gate (alpha multiplies the
    second attention in prompted_attention), and the norm spans all heads. fp32 math, k_raw's dtype out.
    """
    if k_raw.dim() != 3 or v_raw.shape != k_raw.shape:
        raise UserError(f"kv_prologue: k_raw {tuple(k_raw.shape)} and v_raw {tuple(v_raw.shape)} must both be "
                        "[B, L, C], the projections of one context")
    B, L, C = k_raw.shape
    batch_ok = r_k.dim() == 3 and (r_k.shape[0] == 1 or B in (1, r_k.shape[0]))  # each side 1 or the batch
    if not batch_ok or r_v.shape != r_k.shape or r_k.shape[1:] != k_raw.shape[1:]:
        raise UserError(f"kv_prologue: r_k {tuple(r_k.shape)} and r_v {tuple(r_v.shape)} do not match k_raw "
                        f"{tuple(k_raw.shape)}; pass [1 or {B}, {L}, {C}] (the prompt padded or cut to the context)")
    if C % num_heads or tuple(k_scale.shape) != (C,):
        raise UserError(f"kv_prologue: width {C} with norm weight {tuple(k_scale.shape)} does not split into "
                        f"{num_heads} heads with one weight per channel")
    if v_raw.dtype != k_raw.dtype:
        raise UserError(f"kv_prologue: k_raw is {k_raw.dtype} but v_raw is {v_raw.dtype}; cast them to one dtype")
    if not _use_triton(k_raw, v_raw, r_k, r_v, k_scale):
        return reference.kv_prologue(k_raw, v_raw, r_k, r_v, k_scale, num_heads, eps)
    for t in (v_raw, r_k, r_v, k_scale):
        if t.device != k_raw.device:
            raise UserError(f"kv_prologue: inputs on {k_raw.device} and {t.device}; move them to one device")
    return _triton[2].kv_prologue(k_raw, v_raw, r_k, r_v, k_scale, num_heads, eps)
