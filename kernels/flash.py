"""Flash attention in Triton: softmax(q k^T / sqrt(D)) v, forward and backward, non-causal.

Forward (FlashAttention-2): one program per (query tile, batch*head) streams the key/value tiles
through an online softmax with fp32 accumulators and saves the row log-sum-exp (LSE).
Backward (FlashAttention-2, atomic-free):
    delta = rowsum(dO * O)                                  (_bwd_preprocess)
    P = exp(S - LSE),  dV = P^T dO,  dS = P * (dO V^T - delta),  dK = scale * dS^T Q   (_bwd_dkdv,
        one program per key tile, looping over query tiles)
    dQ = scale * dS K                                        (_bwd_dq, one program per query tile)
Scores live in log2 units (S * scale * log2 e) so the kernels use exp2; LSE is stored in those units.

The prompted (two-context) attention in prompted.py reuses the inner loops and _bwd_dkdv, whose
optional DO_SCALE (a pointer to alpha) turns it into the backward of `alpha * attention(...)`.

Triton 3.6 to 3.9 (no block pointers); inputs of any strides; any head dim (padded to a power of two
>= 16 with masked channels); fp32 dots in IEEE precision so fp32 matches the reference.
"""
import math
import os

import torch
import triton
import triton.language as tl

# Decided at import like triton.jit itself: under the interpreter one fixed small tile config,
# on a GPU autotuning over a few standard ones (the interpreter cannot autotune).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634


def tuned(kernel, key):
    """Autotune `kernel` on a GPU over (BLOCK_M, BLOCK_N, warps, stages); unchanged under the interpreter."""
    if INTERPRET:
        return kernel
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4),
                                  (64, 128, 4, 3), (64, 32, 4, 4), (32, 32, 4, 2)]]  # the last fits fp32
    return triton.autotune(configs, key=key)(kernel)


def launch(kernel, grid, *args, **constexprs):
    """kernel[grid](...) with the interpreter's fixed tiles when it is not autotuned."""
    if not isinstance(kernel, triton.runtime.Autotuner):
        constexprs.update(BLOCK_M=64, BLOCK_N=64, num_warps=4)
    kernel[grid](*args, **constexprs)


def block_d(D):
    return max(16, triton.next_power_of_2(D))  # tl.dot needs >= 16 on the reduced dim


def precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 must not silently drop to TF32


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, Lk, D, qk_scale,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax of q [BLOCK_M, BLOCK_D] against all Lk keys of one head; returns (acc, m, l)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(0, Lk, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < Lk
        kT = tl.load(K + offs_d[:, None] * stride_kd + cols[None, :] * stride_kn,
                     mask=(offs_d[:, None] < D) & col_ok[None, :], other=0.0)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        s = tl.where(col_ok[None, :], s, float("-inf"))  # every tile has >= 1 real key: no -inf rows
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        corr = tl.exp2(m_i - m_new)  # rescale what was accumulated under the old max
        l_i = l_i * corr + tl.sum(p, 1)
        v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)  # [BLOCK_N, BLOCK_D]
        acc = tl.dot(p.to(v.dtype), v, acc * corr[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd(Q, K, V, O, LSE,
         sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d, so_b, so_h, so_l, so_d,
         H, Lq, Lk, D, qk_scale,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < Lq
    d_ok = offs_d < D
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_l + offs_d[None, :] * sq_d,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D], read once
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K + b * sk_b + h * sk_h, V + b * sv_b + h * sv_h,
                               sk_l, sk_d, sv_l, sv_d, Lk, D, qk_scale, BLOCK_N, BLOCK_D, PRECISION)
    o = acc / l_i[:, None]
    tl.store(O + b * so_b + h * so_h + rows[:, None] * so_l + offs_d[None, :] * so_d,
             o.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * Lq + rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _bwd_preprocess(O, DO, Delta, so_b, so_h, so_l, so_d, sdo_b, sdo_h, sdo_l, sdo_d, H, Lq, D,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(dO * O) in fp32: the softmax-backward term shared by every key tile."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < Lq) & (offs_d[None, :] < D)
    o = tl.load(O + b * so_b + h * so_h + rows[:, None] * so_l + offs_d[None, :] * so_d, mask=mask, other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + rows[:, None] * sdo_l + offs_d[None, :] * sdo_d, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh.to(tl.int64) * Lq + rows, delta, mask=rows < Lq)


@triton.jit
def _bwd_dkdv(Q, K, V, DO, LSE, Delta, DK, DV, DO_SCALE,
              sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d,
              sdo_b, sdo_h, sdo_l, sdo_d, sdk_b, sdk_h, sdk_l, sdk_d, sdv_b, sdv_h, sdv_l, sdv_d,
              H, Lq, Lk, D, qk_scale, sm_scale,
              HAS_DO_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """dK, dV of one key tile, looping over all query tiles. With DO_SCALE (alpha) the output
    gradient is alpha * dO: dV = alpha P^T dO, dS = alpha P (dO V^T - delta)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < Lk
    d_ok = offs_d < D
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * sk_b + h * sk_h + cols[:, None] * sk_l + offs_d[None, :] * sk_d, mask=kv_mask, other=0.0)
    v = tl.load(V + b * sv_b + h * sv_h + cols[:, None] * sv_l + offs_d[None, :] * sv_d, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    Q += b * sq_b + h * sq_h
    DO += b * sdo_b + h * sdo_h
    LSE += bh.to(tl.int64) * Lq
    Delta += bh.to(tl.int64) * Lq
    for start_m in range(0, Lq, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < Lq
        qT = tl.load(Q + offs_d[:, None] * sq_d + rows[None, :] * sq_l,
                     mask=d_ok[:, None] & row_ok[None, :], other=0.0)  # [BLOCK_D, BLOCK_M]
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
        sT = tl.dot(k, qT, input_precision=PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        pT = tl.where(row_ok[None, :], tl.exp2(sT - lse[None, :]), 0.0)
        do = tl.load(DO + rows[:, None] * sdo_l + offs_d[None, :] * sdo_d,
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        delta = tl.load(Delta + rows, mask=row_ok, other=0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PRECISION)
    dk *= sm_scale
    if HAS_DO_SCALE:
        alpha = tl.load(DO_SCALE).to(tl.float32)
        dk *= alpha
        dv *= alpha
    tl.store(DK + b * sdk_b + h * sdk_h + cols[:, None] * sdk_l + offs_d[None, :] * sdk_d,
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * sdv_b + h * sdv_h + cols[:, None] * sdv_l + offs_d[None, :] * sdv_d,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd, Lk, D, qk_scale,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """dq += dS K over all Lk keys of one head (unscaled: the caller multiplies by sm_scale)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(0, Lk, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < Lk
        mask = (offs_d[:, None] < D) & col_ok[None, :]
        kT = tl.load(K + offs_d[:, None] * stride_kd + cols[None, :] * stride_kn, mask=mask, other=0.0)
        vT = tl.load(V + offs_d[:, None] * stride_vd + cols[None, :] * stride_vn, mask=mask, other=0.0)
        s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        p = tl.where(col_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, vT, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PRECISION)
    return dq


@triton.jit
def _bwd_dq(Q, K, V, DO, LSE, Delta, DQ,
            sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d,
            sdo_b, sdo_h, sdo_l, sdo_d, sdq_b, sdq_h, sdq_l, sdq_d,
            H, Lq, Lk, D, qk_scale, sm_scale,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < Lq
    mask = row_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_l + offs_d[None, :] * sq_d, mask=mask, other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + rows[:, None] * sdo_l + offs_d[None, :] * sdo_d, mask=mask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * Lq + rows, mask=row_ok, other=0.0)
    delta = tl.load(Delta + bh.to(tl.int64) * Lq + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_inner(dq, q, do, lse, delta, K + b * sk_b + h * sk_h, V + b * sv_b + h * sv_h,
                   sk_l, sk_d, sv_l, sv_d, Lk, D, qk_scale, BLOCK_N, BLOCK_D, PRECISION)
    tl.store(DQ + b * sdq_b + h * sdq_h + rows[:, None] * sdq_l + offs_d[None, :] * sdq_d,
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask)


_fwd_tuned = tuned(_fwd, key=["Lq", "Lk", "BLOCK_D"])
_bwd_dkdv_tuned = tuned(_bwd_dkdv, key=["Lq", "Lk", "BLOCK_D"])
_bwd_dq_tuned = tuned(_bwd_dq, key=["Lq", "Lk", "BLOCK_D"])


def empty(shape, like, poison):
    """Output buffer; `poison` fills it with NaN so an element a kernel forgets to write fails a test."""
    return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device) if poison else \
        torch.empty(shape, dtype=like.dtype, device=like.device)


def poison():
    return os.environ.get("MINIRESTORE_KERNELS_POISON", "0") == "1"


def rows_grid(L, BH):
    return lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), BH)


def forward(q, k, v):
    """-> o [B, H, Lq, D] (q's dtype), lse [B, H, Lq] fp32 in log2 units."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    o = empty(q.shape, q, poison())
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    sm_scale = 1.0 / math.sqrt(D)
    launch(_fwd_tuned, rows_grid(Lq, B * H), q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
           H, Lq, Lk, D, sm_scale * LOG2E, BLOCK_D=block_d(D), PRECISION=precision(q.dtype))
    return o, lse


def preprocess(o, do):
    """delta = rowsum(dO * O) [B, H, Lq] fp32."""
    B, H, Lq, D = o.shape
    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=o.device)
    _bwd_preprocess[(triton.cdiv(Lq, 64), B * H)](o, do, delta, *o.stride(), *do.stride(), H, Lq, D,
                                                  BLOCK_M=64, BLOCK_D=block_d(D))
    return delta


def backward_dkdv(q, k, v, do, lse, delta, do_scale=None):
    """dK, dV of attention(q, k, v) whose output gradient is do (times do_scale, a 1-element tensor)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    dk, dv = empty(k.shape, k, poison()), empty(v.shape, v, poison())
    sm_scale = 1.0 / math.sqrt(D)
    grid = lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]), B * H)
    launch(_bwd_dkdv_tuned, grid, q, k, v, do, lse, delta, dk, dv, do_scale if do_scale is not None else lse,
           *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
           H, Lq, Lk, D, sm_scale * LOG2E, sm_scale,
           HAS_DO_SCALE=do_scale is not None, BLOCK_D=block_d(D), PRECISION=precision(q.dtype))
    return dk, dv


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        o, lse = forward(q, k, v)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        B, H, Lq, D = q.shape
        Lk = k.shape[2]
        delta = preprocess(o, do)
        dk, dv = backward_dkdv(q, k, v, do, lse, delta)
        dq = empty(q.shape, q, poison())
        sm_scale = 1.0 / math.sqrt(D)
        launch(_bwd_dq_tuned, rows_grid(Lq, B * H), q, k, v, do, lse, delta, dq,
               *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
               H, Lq, Lk, D, sm_scale * LOG2E, sm_scale, BLOCK_D=block_d(D), PRECISION=precision(q.dtype))
        return dq, dk, dv


def attention(q, k, v):
    """softmax(q k^T / sqrt(D)) v. q: [B, H, Lq, D], k, v: [B, H, Lk, D] -> [B, H, Lq, D]."""
    return FlashAttention.apply(q, k, v)
