"""Wan's prompted cross-attention in one Triton kernel: o = attn(q, k, v) + alpha * attn(q, k_p, v_p).

paper.md 3.2: every Wan cross-attention runs twice, on the null-text context c and on c + P. The
released code makes two attention calls and an add (q read twice, two outputs written and read
back). Here each query tile is read once, two online softmaxes run side by side (base keys Lk,
prompted keys Lk_p) and o_base + alpha * o_prompt is written once.

Backward. With dO the output gradient, the base branch sees dO and the prompted branch alpha * dO:
    d_alpha = sum(dO * o_p)
    delta_p = rowsum(dO * o_p)                  (the prompted branch's delta, before its alpha)
    delta_b = rowsum(dO * o) - alpha * delta_p  (= rowsum(dO * o_b))
dK_p, dV_p come from flash._bwd_dkdv with DO_SCALE = alpha; dK, dV from the same kernel unscaled, run
only when asked for (Wan's base context is constant: ctx.needs_input_grad skips that kernel);
dQ = scale * (dS_b K + alpha * dS_p K_p) in one kernel that walks both key sets.
o_p is written by the forward only when a gradient will be needed (sampling skips that write).
"""

import torch
import triton
import triton.language as tl

from .flash import (_block, _dq_inner, _fwd_inner, _store, backward_dkdv, bucket, empty, launch_rows, poison,
                    preprocess, row_stats, scales, tma_ok, tuned)


@triton.jit
def _prompted_fwd(Q, K, V, KP, VP, ALPHA, O, OP, LSE, LSE_P,
                  sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d,
                  skp_b, skp_h, skp_l, skp_d, svp_b, svp_h, svp_l, svp_d, so_b, so_h, so_l, so_d,
                  H, Lq, Lk, Lk_p, D, qk_scale, LQ_KEY, LK_KEY, LKP_KEY, TMA_OK,
                  STORE_OP: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    """o = attn(q, k, v) + alpha attn(q, k_p, v_p) for one query tile of one head, both row LSEs, and o_p
    = attn(q, k_p, v_p) when STORE_OP (training). LQ_KEY, LK_KEY, LKP_KEY, TMA_OK: for the autotuner only."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < Lq
    d_ok = offs_d < D
    q = _block(Q + b * sq_b + h * sq_h, pid_m * BLOCK_M, Lq, D, sq_l, sq_d, EVEN_D, BLOCK_M, BLOCK_D, TMA)
    # Two independent online softmaxes over the same q tile.
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K + b * sk_b + h * sk_h, V + b * sv_b + h * sv_h,
                               sk_l, sk_d, sv_l, sv_d, Lk, D, qk_scale, EVEN_D, BLOCK_N, BLOCK_D, PRECISION, TMA,
                               False)
    acc_p = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_p = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_p = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_p, m_p, l_p = _fwd_inner(acc_p, m_p, l_p, q, KP + b * skp_b + h * skp_h, VP + b * svp_b + h * svp_h,
                                 skp_l, skp_d, svp_l, svp_d, Lk_p, D, qk_scale, EVEN_D, BLOCK_N, BLOCK_D, PRECISION,
                                 TMA, False)
    alpha = tl.load(ALPHA).to(tl.float32)
    o_p = acc_p / l_p[:, None]
    o = acc / l_i[:, None] + alpha * o_p
    offs = b * so_b + h * so_h + rows[:, None] * so_l + offs_d[None, :] * so_d
    _store(O + offs, o.to(O.dtype.element_ty), row_ok, d_ok, not EVEN_D)
    if STORE_OP:  # OP has O's strides
        _store(OP + offs, o_p.to(OP.dtype.element_ty), row_ok, d_ok, not EVEN_D)
    tl.store(LSE + bh.to(tl.int64) * Lq + rows, m_i + tl.log2(l_i), mask=row_ok)
    tl.store(LSE_P + bh.to(tl.int64) * Lq + rows, m_p + tl.log2(l_p), mask=row_ok)


@triton.jit
def _prompted_bwd_dq(Q, K, V, KP, VP, ALPHA, DO, LSE, LSE_P, Delta, Delta_P, DQ,
                     sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d,
                     skp_b, skp_h, skp_l, skp_d, svp_b, svp_h, svp_l, svp_d,
                     sdo_b, sdo_h, sdo_l, sdo_d, sdq_b, sdq_h, sdq_l, sdq_d,
                     H, Lq, Lk, Lk_p, D, qk_scale, sm_scale, LQ_KEY, LK_KEY, LKP_KEY, TMA_OK,
                     EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr, TMA: tl.constexpr):
    """dQ = scale * (dS_b K + alpha dS_p K_p) for one query tile of one head: both key sets in one pass."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < Lq
    d_ok = offs_d < D
    q = _block(Q + b * sq_b + h * sq_h, pid_m * BLOCK_M, Lq, D, sq_l, sq_d, EVEN_D, BLOCK_M, BLOCK_D, TMA)
    do = _block(DO + b * sdo_b + h * sdo_h, pid_m * BLOCK_M, Lq, D, sdo_l, sdo_d, EVEN_D, BLOCK_M, BLOCK_D, TMA)
    stats = bh.to(tl.int64) * Lq + rows
    lse = tl.load(LSE + stats, mask=row_ok, other=0.0)
    delta = tl.load(Delta + stats, mask=row_ok, other=0.0)
    lse_p = tl.load(LSE_P + stats, mask=row_ok, other=0.0)
    delta_p = tl.load(Delta_P + stats, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_inner(dq, q, do, lse, delta, K + b * sk_b + h * sk_h, V + b * sv_b + h * sv_h,
                   sk_l, sk_d, sv_l, sv_d, Lk, D, qk_scale, EVEN_D, BLOCK_N, BLOCK_D, PRECISION, TMA)
    dq_p = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq_p = _dq_inner(dq_p, q, do, lse_p, delta_p, KP + b * skp_b + h * skp_h, VP + b * svp_b + h * svp_h,
                     skp_l, skp_d, svp_l, svp_d, Lk_p, D, qk_scale, EVEN_D, BLOCK_N, BLOCK_D, PRECISION, TMA)
    alpha = tl.load(ALPHA).to(tl.float32)
    _store(DQ + b * sdq_b + h * sdq_h + rows[:, None] * sdq_l + offs_d[None, :] * sdq_d,
           ((dq + alpha * dq_p) * sm_scale).to(DQ.dtype.element_ty), row_ok, d_ok, not EVEN_D)


_prompted_fwd_tuned = tuned(_prompted_fwd, "prompted_fwd", key=["LQ_KEY", "LK_KEY", "LKP_KEY", "BLOCK_D", "STORE_OP"])
_prompted_bwd_dq_tuned = tuned(_prompted_bwd_dq, "prompted_dq", key=["LQ_KEY", "LK_KEY", "LKP_KEY", "BLOCK_D"])


def keys(q, k, k_p):
    """The autotuner's key: bucketed Lq, Lk, Lk_p."""
    return bucket(q.shape[2]), bucket(k.shape[2]), bucket(k_p.shape[2])


class PromptedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, k_p, v_p, alpha):
        B, H, Lq, D = q.shape
        a = alpha.detach().reshape(1).to(device=q.device, dtype=torch.float32)  # read in the kernel: no host sync
        store_op = any(ctx.needs_input_grad)  # (forward runs under no_grad; this says whether backward will run)
        o = empty(q.shape, q, poison())
        o_p = empty(q.shape, q, poison()) if store_op else o  # dummy pointer when not stored
        lse, lse_p = row_stats(q), row_stats(q)
        _, qk_scale = scales(q)
        launch_rows(_prompted_fwd_tuned, q, q, k, v, k_p, v_p, a, o, o_p, lse, lse_p,
                    *q.stride(), *k.stride(), *v.stride(), *k_p.stride(), *v_p.stride(), *o.stride(),
                    H, Lq, k.shape[2], k_p.shape[2], D, qk_scale, *keys(q, k, k_p), TMA_OK=tma_ok(q, k, v, k_p, v_p),
                    STORE_OP=store_op)
        ctx.save_for_backward(q, k, v, k_p, v_p, a, o, o_p, lse, lse_p)
        ctx.alpha_like = (alpha.shape, alpha.dtype, alpha.device)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, k_p, v_p, a, o, o_p, lse, lse_p = ctx.saved_tensors
        B, H, Lq, D = q.shape
        need_q, need_k, need_v, need_kp, need_vp, need_alpha = ctx.needs_input_grad
        delta_p = preprocess(o_p, do)  # rowsum(dO * o_p)
        delta = preprocess(o, do) - a * delta_p  # rowsum(dO * o_b)
        shape, dtype, device = ctx.alpha_like
        d_alpha = delta_p.sum().reshape(shape).to(device=device, dtype=dtype) if need_alpha else None
        # Wan holds the base (null-text) context constant: its dK, dV are skipped unless asked for.
        dk, dv = backward_dkdv(q, k, v, do, lse, delta) if need_k or need_v else (None, None)
        dk_p, dv_p = backward_dkdv(q, k_p, v_p, do, lse_p, delta_p, do_scale=a) if need_kp or need_vp else (None, None)
        dq = None
        if need_q:
            dq = empty(q.shape, q, poison())
            sm_scale, qk_scale = scales(q)
            launch_rows(_prompted_bwd_dq_tuned, q, q, k, v, k_p, v_p, a, do, lse, lse_p, delta, delta_p, dq,
                        *q.stride(), *k.stride(), *v.stride(), *k_p.stride(), *v_p.stride(), *do.stride(),
                        *dq.stride(), H, Lq, k.shape[2], k_p.shape[2], D, qk_scale, sm_scale, *keys(q, k, k_p),
                        TMA_OK=tma_ok(q, k, v, k_p, v_p, do))
        return (dq, dk if need_k else None, dv if need_v else None, dk_p if need_kp else None,
                dv_p if need_vp else None, d_alpha)


def prompted_attention(q, k, v, k_p, v_p, alpha):
    """attention(q, k, v) + alpha * attention(q, k_p, v_p); alpha a 0-dim tensor."""
    return PromptedAttention.apply(q, k, v, k_p, v_p, alpha)
