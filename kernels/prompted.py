"""Wan's prompted cross-attention in one Triton kernel: o = attn(q, k, v) + alpha * attn(q, k_p, v_p).

paper.md 3.2: every Wan cross-attention runs twice, on the null-text context c and on c + P. The
released code makes two attention calls and an add (q read twice, two outputs written and read
back). Here each query tile is read once, two online softmaxes run side by side (base keys Lk,
prompted keys Lk_p) and o_base + alpha * o_prompt is written once.

Backward. With dO the output gradient, the base branch sees dO and the prompted branch alpha * dO:
    d_alpha = sum(dO * o_p)
    delta_p = rowsum(dO * o_p)                  (the prompted branch's delta, before its alpha)
    delta_b = rowsum(dO * o) - alpha * delta_p  (= rowsum(dO * o_b))
dK_p, dV_p come from flash._bwd_dkdv with DO_SCALE = alpha; dK, dV from the same kernel unscaled;
dQ = scale * (dS_b K + alpha * dS_p K_p) in one kernel that walks both key sets.
o_p is written by the forward only when a gradient will be needed (sampling skips that write).
"""
import math

import torch
import triton
import triton.language as tl

from .flash import (LOG2E, _dq_inner, _fwd_inner, backward_dkdv, block_d, empty, launch, poison, precision,
                    preprocess, rows_grid, tuned)


@triton.jit
def _prompted_fwd(Q, K, V, KP, VP, ALPHA, O, OP, LSE, LSE_P,
                  sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d,
                  skp_b, skp_h, skp_l, skp_d, svp_b, svp_h, svp_l, svp_d, so_b, so_h, so_l, so_d,
                  H, Lq, Lk, Lk_p, D, qk_scale,
                  STORE_OP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < Lq
    mask = row_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_l + offs_d[None, :] * sq_d, mask=mask, other=0.0)
    # Two independent online softmaxes over the same q tile.
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K + b * sk_b + h * sk_h, V + b * sv_b + h * sv_h,
                               sk_l, sk_d, sv_l, sv_d, Lk, D, qk_scale, BLOCK_N, BLOCK_D, PRECISION)
    acc_p = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_p = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_p = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_p, m_p, l_p = _fwd_inner(acc_p, m_p, l_p, q, KP + b * skp_b + h * skp_h, VP + b * svp_b + h * svp_h,
                                 skp_l, skp_d, svp_l, svp_d, Lk_p, D, qk_scale, BLOCK_N, BLOCK_D, PRECISION)
    alpha = tl.load(ALPHA).to(tl.float32)
    o_p = acc_p / l_p[:, None]
    o = acc / l_i[:, None] + alpha * o_p
    offs = b * so_b + h * so_h + rows[:, None] * so_l + offs_d[None, :] * so_d
    tl.store(O + offs, o.to(O.dtype.element_ty), mask=mask)
    if STORE_OP:  # OP has O's strides
        tl.store(OP + offs, o_p.to(OP.dtype.element_ty), mask=mask)
    tl.store(LSE + bh.to(tl.int64) * Lq + rows, m_i + tl.log2(l_i), mask=row_ok)
    tl.store(LSE_P + bh.to(tl.int64) * Lq + rows, m_p + tl.log2(l_p), mask=row_ok)


@triton.jit
def _prompted_bwd_dq(Q, K, V, KP, VP, ALPHA, DO, LSE, LSE_P, Delta, Delta_P, DQ,
                     sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d,
                     skp_b, skp_h, skp_l, skp_d, svp_b, svp_h, svp_l, svp_d,
                     sdo_b, sdo_h, sdo_l, sdo_d, sdq_b, sdq_h, sdq_l, sdq_d,
                     H, Lq, Lk, Lk_p, D, qk_scale, sm_scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr):
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
    stats = bh.to(tl.int64) * Lq + rows
    lse = tl.load(LSE + stats, mask=row_ok, other=0.0)
    delta = tl.load(Delta + stats, mask=row_ok, other=0.0)
    lse_p = tl.load(LSE_P + stats, mask=row_ok, other=0.0)
    delta_p = tl.load(Delta_P + stats, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_inner(dq, q, do, lse, delta, K + b * sk_b + h * sk_h, V + b * sv_b + h * sv_h,
                   sk_l, sk_d, sv_l, sv_d, Lk, D, qk_scale, BLOCK_N, BLOCK_D, PRECISION)
    dq_p = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq_p = _dq_inner(dq_p, q, do, lse_p, delta_p, KP + b * skp_b + h * skp_h, VP + b * svp_b + h * svp_h,
                     skp_l, skp_d, svp_l, svp_d, Lk_p, D, qk_scale, BLOCK_N, BLOCK_D, PRECISION)
    alpha = tl.load(ALPHA).to(tl.float32)
    tl.store(DQ + b * sdq_b + h * sdq_h + rows[:, None] * sdq_l + offs_d[None, :] * sdq_d,
             ((dq + alpha * dq_p) * sm_scale).to(DQ.dtype.element_ty), mask=mask)


_prompted_fwd_tuned = tuned(_prompted_fwd, key=["Lq", "Lk", "Lk_p", "BLOCK_D"])
_prompted_bwd_dq_tuned = tuned(_prompted_bwd_dq, key=["Lq", "Lk", "Lk_p", "BLOCK_D"])


class PromptedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, k_p, v_p, alpha):
        B, H, Lq, D = q.shape
        a = alpha.detach().reshape(1).to(device=q.device, dtype=torch.float32)  # read in the kernel: no host sync
        store_op = any(ctx.needs_input_grad)  # (forward runs under no_grad; this says whether backward will run)
        o = empty(q.shape, q, poison())
        o_p = empty(q.shape, q, poison()) if store_op else o  # dummy pointer when not stored
        lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
        lse_p = torch.empty_like(lse)
        sm_scale = 1.0 / math.sqrt(D)
        launch(_prompted_fwd_tuned, rows_grid(Lq, B * H), q, k, v, k_p, v_p, a, o, o_p, lse, lse_p,
               *q.stride(), *k.stride(), *v.stride(), *k_p.stride(), *v_p.stride(), *o.stride(),
               H, Lq, k.shape[2], k_p.shape[2], D, sm_scale * LOG2E,
               STORE_OP=store_op, BLOCK_D=block_d(D), PRECISION=precision(q.dtype))
        ctx.save_for_backward(q, k, v, k_p, v_p, a, o, o_p, lse, lse_p)
        ctx.alpha_like = (alpha.shape, alpha.dtype, alpha.device)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, k_p, v_p, a, o, o_p, lse, lse_p = ctx.saved_tensors
        B, H, Lq, D = q.shape
        delta_p = preprocess(o_p, do)  # rowsum(dO * o_p)
        delta = preprocess(o, do) - a * delta_p  # rowsum(dO * o_b)
        shape, dtype, device = ctx.alpha_like
        d_alpha = delta_p.sum().reshape(shape).to(device=device, dtype=dtype)
        dk, dv = backward_dkdv(q, k, v, do, lse, delta)
        dk_p, dv_p = backward_dkdv(q, k_p, v_p, do, lse_p, delta_p, do_scale=a)
        dq = empty(q.shape, q, poison())
        sm_scale = 1.0 / math.sqrt(D)
        launch(_prompted_bwd_dq_tuned, rows_grid(Lq, B * H), q, k, v, k_p, v_p, a, do, lse, lse_p, delta, delta_p,
               dq, *q.stride(), *k.stride(), *v.stride(), *k_p.stride(), *v_p.stride(), *do.stride(), *dq.stride(),
               H, Lq, k.shape[2], k_p.shape[2], D, sm_scale * LOG2E, sm_scale,
               BLOCK_D=block_d(D), PRECISION=precision(q.dtype))
        return dq, dk, dv, dk_p, dv_p, d_alpha


def prompted_attention(q, k, v, k_p, v_p, alpha):
    """attention(q, k, v) + alpha * attention(q, k_p, v_p); alpha a 0-dim tensor."""
    return PromptedAttention.apply(q, k, v, k_p, v_p, alpha)
