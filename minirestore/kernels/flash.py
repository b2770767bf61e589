"""Flash attention in Triton: softmax(q k^T / sqrt(D)) v, forward and backward, non-causal.

Forward (FlashAttention-2): one program per (query tile, batch*head) streams the key/value tiles
through an online softmax with fp32 accumulators and saves the row log-sum-exp (LSE).
Backward (FlashAttention-2, atomic-free):
    delta = rowsum(dO * O)                                  (_bwd_preprocess)
    P = exp(S - LSE),  dV = P^T dO,  dS = P * (dO V^T - delta),  dK = scale * dS^T Q   (_bwd_dkdv,
        one program per (key tile, query chunk); short key sets split the queries over several
        programs, whose fp32 partial dK, dV are summed by torch)
    dQ = scale * dS K                                        (_bwd_dq, one program per query tile)
Scores live in log2 units (S * scale * log2 e) so the kernels use exp2; LSE is stored in those units.
Every loop runs its full tiles unmasked and then the ragged last tile, if any, with masks; EVEN_D
(head dim a power of two >= 16) drops the channel masks.

Two constexpr switches, set by some sm_90 autotune configs (tuning.py), change how tiles reach the dots
and nothing else: TMA reads them through tensor descriptors (tl.make_tensor_descriptor: bulk copies by the
tensor memory accelerator, zero-filled past the tensor's edges, so no masks on the loads; needs 16-byte
aligned rows, see tuning.tma_ok), and WS (forward only, with TMA) warp-specialises the key loop, as one
loop masking every tile. Under the interpreter the same code runs, descriptors included (the tests).

The prompted (two-context) attention in prompted.py reuses the inner loops and _bwd_dkdv, whose
optional DO_SCALE (a pointer to alpha) turns it into the backward of `alpha * attention(...)`.

Triton 3.6 to 3.9 (no block pointers); inputs of any strides (TMA configs only for aligned ones); head
dims up to kernels.MAX_TRITON_HEAD_DIM. Each kernel has its own tile configs (tuning.py: the roles of
BLOCK_M and BLOCK_N differ), checked offline for sm_90 and sm_80 by benchmarks/compile_check.py: no
spills, shared memory within the limit, TMA where a config asks for it.
"""
import math
import os

import torch
import triton
import triton.language as tl

from .tuning import INTERPRET, LOG2E, block_d, bucket, launch, precision, tma_ok, tuned  # noqa: F401 (re-exported)


@triton.jit
def _load(ptrs, row_ok, col_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """A 2-D tile with only the masks it needs (full tiles load unmasked, so vectorised)."""
    if MASK_ROWS:
        if MASK_COLS:
            x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    elif MASK_COLS:
        x = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _store(ptrs, x, row_ok, col_ok, MASK_COLS: tl.constexpr):
    if MASK_COLS:
        tl.store(ptrs, x, mask=row_ok[:, None] & col_ok[None, :])
    else:
        tl.store(ptrs, x, mask=row_ok[:, None])


@triton.jit
def _head(X, L, D, stride_l, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """One head's [L, D] rows (X points at row 0) as the inner loops stream them: with TMA a tensor
    descriptor (sm_90: whole tiles come by bulk copy, rows past L and channels past D zero-filled by the
    hardware; the host checks the 16-byte alignment it needs), else the pointer itself."""
    if TMA:
        return tl.make_tensor_descriptor(X, shape=[L, D], strides=[stride_l, 1], block_shape=[BLOCK, BLOCK_D])
    else:
        return X


@triton.jit
def _block(X, start, L, D, stride_l, stride_d, EVEN_D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
           TMA: tl.constexpr):
    """Rows start..start+BLOCK of one head, [BLOCK, BLOCK_D], zero past row L and channel D (a tile read once
    per program: by TMA, or a masked load)."""
    if TMA:
        x = _head(X, L, D, stride_l, BLOCK, BLOCK_D, TMA).load([start, 0])
    else:
        rows = start + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, BLOCK_D)
        x = _load(X + rows[:, None] * stride_l + offs_d[None, :] * stride_d, rows < L, offs_d < D, True, not EVEN_D)
    return x


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, start, end, D, qk_scale,
               MASK_N: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               PRECISION: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr):
    """Online softmax of q [BLOCK_M, BLOCK_D] against keys start..end (masked beyond end if MASK_N).
    K, V are pointers, or tensor descriptors when TMA (see _head); WS warp-specialises the loop."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    for start_n in tl.range(start, end, BLOCK_N, warp_specialize=WS):
        cols = start_n + offs_n
        col_ok = cols < end
        if TMA:
            kT = tl.trans(K.load([start_n, 0]))
        else:
            kT = _load(K + offs_d[:, None] * stride_kd + cols[None, :] * stride_kn, d_ok, col_ok,
                       not EVEN_D, MASK_N)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        if MASK_N:
            s = tl.where(col_ok[None, :], s, float("-inf"))  # every tile has >= 1 real key: no -inf rows
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        corr = tl.exp2(m_i - m_new)  # rescale what was accumulated under the old max
        l_i = l_i * corr + tl.sum(p, 1)
        if TMA:
            v = V.load([start_n, 0])
        else:
            v = _load(V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, col_ok, d_ok,
                      MASK_N, not EVEN_D)  # [BLOCK_N, BLOCK_D]
        acc = tl.dot(p.to(v.dtype), v, acc * corr[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, Lk, D, qk_scale,
               EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
               TMA: tl.constexpr, WS: tl.constexpr):
    """Online softmax over all Lk keys of one head: the full tiles unmasked, then the ragged last one.
    Warp-specialised (WS, with TMA), one loop masking every tile: triton 3.9's sm_90 partitioner takes
    neither a second loop nor pointer loads (benchmarks/compile_check.py builds both variants)."""
    tl.static_assert(TMA or not WS, "warp specialisation needs the TMA loads")
    K = _head(K, Lk, D, stride_kn, BLOCK_N, BLOCK_D, TMA)
    V = _head(V, Lk, D, stride_vn, BLOCK_N, BLOCK_D, TMA)
    if WS:
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, 0, Lk, D,
                                   qk_scale, True, EVEN_D, BLOCK_N, BLOCK_D, PRECISION, TMA, True)
    else:
        n_full = (Lk // BLOCK_N) * BLOCK_N
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, 0, n_full, D,
                                   qk_scale, False, EVEN_D, BLOCK_N, BLOCK_D, PRECISION, TMA, False)
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, n_full, Lk, D,
                                   qk_scale, True, EVEN_D, BLOCK_N, BLOCK_D, PRECISION, TMA, False)
    return acc, m_i, l_i


@triton.jit
def _fwd(Q, K, V, O, LSE,
         sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d, so_b, so_h, so_l, so_d,
         H, Lq, Lk, D, qk_scale, LQ_KEY, LK_KEY, TMA_OK,
         EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
         PRECISION: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr):
    """o = softmax(q k^T * scale) v and the row LSE for one query tile of one head (LQ_KEY, LK_KEY:
    bucketed lengths, and TMA_OK, whether the inputs suit TMA: read only by the autotuner)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < Lq
    d_ok = offs_d < D
    q = _block(Q + b * sq_b + h * sq_h, pid_m * BLOCK_M, Lq, D, sq_l, sq_d, EVEN_D, BLOCK_M, BLOCK_D, TMA)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K + b * sk_b + h * sk_h, V + b * sv_b + h * sv_h,
                               sk_l, sk_d, sv_l, sv_d, Lk, D, qk_scale, EVEN_D, BLOCK_N, BLOCK_D, PRECISION, TMA, WS)
    o = acc / l_i[:, None]
    _store(O + b * so_b + h * so_h + rows[:, None] * so_l + offs_d[None, :] * so_d, o.to(O.dtype.element_ty),
           row_ok, d_ok, not EVEN_D)
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
def _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, Delta, sq_l, sq_d, sdo_l, sdo_d, start, end, D, qk_scale,
                MASK_M: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                PRECISION: tl.constexpr, TMA: tl.constexpr):
    """dk += dS^T q, dv += P^T dO for one key tile over queries start..end (masked beyond end if MASK_M).
    Q, DO are pointers, or tensor descriptors when TMA."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < end
        if TMA:
            qT = tl.trans(Q.load([start_m, 0]))
        else:
            qT = _load(Q + offs_d[:, None] * sq_d + rows[None, :] * sq_l, d_ok, row_ok,
                       not EVEN_D, MASK_M)  # [BLOCK_D, BLOCK_M]
        if MASK_M:
            lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
        else:
            lse = tl.load(LSE + rows)
        sT = tl.dot(k, qT, input_precision=PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        pT = tl.exp2(sT - lse[None, :])
        if MASK_M:
            pT = tl.where(row_ok[None, :], pT, 0.0)
        if TMA:
            do = DO.load([start_m, 0])
        else:
            do = _load(DO + rows[:, None] * sdo_l + offs_d[None, :] * sdo_d, row_ok, d_ok,
                       MASK_M, not EVEN_D)  # [BLOCK_M, BLOCK_D]
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        if MASK_M:
            delta = tl.load(Delta + rows, mask=row_ok, other=0.0)
        else:
            delta = tl.load(Delta + rows)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv(Q, K, V, DO, LSE, Delta, DK, DV, DO_SCALE,
              sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d,
              sdo_b, sdo_h, sdo_l, sdo_d, sdk_s, sdk_b, sdk_h, sdk_l, sdk_d, sdv_s, sdv_b, sdv_h, sdv_l, sdv_d,
              H, Lq, Lk, D, qk_scale, sm_scale, CHUNK, LQ_KEY, LK_KEY, TMA_OK,
              HAS_DO_SCALE: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    """dK, dV of one key tile from the queries of chunk program_id(2) (CHUNK rows, a multiple of every
    BLOCK_M), written to slice program_id(2) of DK, DV. With DO_SCALE (alpha) the output gradient is
    alpha * dO: dV = alpha P^T dO, dS = alpha P (dO V^T - delta)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < Lk
    d_ok = offs_d < D
    k = _block(K + b * sk_b + h * sk_h, pid_n * BLOCK_N, Lk, D, sk_l, sk_d, EVEN_D, BLOCK_N, BLOCK_D, TMA)
    v = _block(V + b * sv_b + h * sv_h, pid_n * BLOCK_N, Lk, D, sv_l, sv_d, EVEN_D, BLOCK_N, BLOCK_D, TMA)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    Q = _head(Q + b * sq_b + h * sq_h, Lq, D, sq_l, BLOCK_M, BLOCK_D, TMA)  # a chunk's rows end at Lq or a tile edge
    DO = _head(DO + b * sdo_b + h * sdo_h, Lq, D, sdo_l, BLOCK_M, BLOCK_D, TMA)
    LSE += bh.to(tl.int64) * Lq
    Delta += bh.to(tl.int64) * Lq
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, Lq)
    m_full = start + ((end - start) // BLOCK_M) * BLOCK_M
    dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, Delta, sq_l, sq_d, sdo_l, sdo_d, start, m_full, D, qk_scale,
                         False, EVEN_D, BLOCK_M, BLOCK_D, PRECISION, TMA)
    dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, Delta, sq_l, sq_d, sdo_l, sdo_d, m_full, end, D, qk_scale,
                         True, EVEN_D, BLOCK_M, BLOCK_D, PRECISION, TMA)
    dk *= sm_scale
    if HAS_DO_SCALE:
        alpha = tl.load(DO_SCALE).to(tl.float32)
        dk *= alpha
        dv *= alpha
    _store(DK + split * sdk_s + b * sdk_b + h * sdk_h + cols[:, None] * sdk_l + offs_d[None, :] * sdk_d,
           dk.to(DK.dtype.element_ty), col_ok, d_ok, not EVEN_D)
    _store(DV + split * sdv_s + b * sdv_b + h * sdv_h + cols[:, None] * sdv_l + offs_d[None, :] * sdv_d,
           dv.to(DV.dtype.element_ty), col_ok, d_ok, not EVEN_D)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd, start, end, D, qk_scale,
              MASK_N: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              PRECISION: tl.constexpr, TMA: tl.constexpr):
    """dq += dS K over keys start..end (unscaled: the caller multiplies by sm_scale). K, V are pointers, or
    tensor descriptors when TMA."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < end
        if TMA:
            kT = tl.trans(K.load([start_n, 0]))
            vT = tl.trans(V.load([start_n, 0]))
        else:
            kT = _load(K + offs_d[:, None] * stride_kd + cols[None, :] * stride_kn, d_ok, col_ok, not EVEN_D, MASK_N)
            vT = _load(V + offs_d[:, None] * stride_vd + cols[None, :] * stride_vn, d_ok, col_ok, not EVEN_D, MASK_N)
        s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        p = tl.exp2(s - lse[:, None])
        if MASK_N:
            p = tl.where(col_ok[None, :], p, 0.0)
        dp = tl.dot(do, vT, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PRECISION)
    return dq


@triton.jit
def _dq_inner(dq, q, do, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd, Lk, D, qk_scale,
              EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
              TMA: tl.constexpr):
    """dq += dS K over all Lk keys of one head: the full tiles unmasked, then the ragged last one."""
    K = _head(K, Lk, D, stride_kn, BLOCK_N, BLOCK_D, TMA)
    V = _head(V, Lk, D, stride_vn, BLOCK_N, BLOCK_D, TMA)
    n_full = (Lk // BLOCK_N) * BLOCK_N
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd, 0, n_full, D, qk_scale,
                   False, EVEN_D, BLOCK_N, BLOCK_D, PRECISION, TMA)
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd, n_full, Lk, D, qk_scale,
                   True, EVEN_D, BLOCK_N, BLOCK_D, PRECISION, TMA)
    return dq


@triton.jit
def _bwd_dq(Q, K, V, DO, LSE, Delta, DQ,
            sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d,
            sdo_b, sdo_h, sdo_l, sdo_d, sdq_b, sdq_h, sdq_l, sdq_d,
            H, Lq, Lk, D, qk_scale, sm_scale, LQ_KEY, LK_KEY, TMA_OK,
            EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            PRECISION: tl.constexpr, TMA: tl.constexpr):
    """dQ = scale * dS K for one query tile of one head."""
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
    lse = tl.load(LSE + bh.to(tl.int64) * Lq + rows, mask=row_ok, other=0.0)
    delta = tl.load(Delta + bh.to(tl.int64) * Lq + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_inner(dq, q, do, lse, delta, K + b * sk_b + h * sk_h, V + b * sv_b + h * sv_h,
                   sk_l, sk_d, sv_l, sv_d, Lk, D, qk_scale, EVEN_D, BLOCK_N, BLOCK_D, PRECISION, TMA)
    _store(DQ + b * sdq_b + h * sdq_h + rows[:, None] * sdq_l + offs_d[None, :] * sdq_d,
           (dq * sm_scale).to(DQ.dtype.element_ty), row_ok, d_ok, not EVEN_D)


_fwd_tuned = tuned(_fwd, "fwd", key=["LQ_KEY", "LK_KEY", "BLOCK_D"])  # tuned() adds TMA_OK to each key
_bwd_dkdv_tuned = tuned(_bwd_dkdv, "dkdv", key=["LQ_KEY", "LK_KEY", "BLOCK_D", "HAS_DO_SCALE"])
_bwd_dq_tuned = tuned(_bwd_dq, "dq", key=["LQ_KEY", "LK_KEY", "BLOCK_D"])


def empty(shape, like, poison):
    """Output buffer; `poison` fills it with NaN so an element a kernel forgets to write fails a test."""
    return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device) if poison else \
        torch.empty(shape, dtype=like.dtype, device=like.device)


def poison():
    return os.environ.get("MINIRESTORE_KERNELS_POISON", "0") == "1"


def rows_grid(L, BH):
    return lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), BH)


def head_meta(D):
    """Constexprs every attention kernel takes from the head dim."""
    return dict(BLOCK_D=block_d(D), EVEN_D=D == block_d(D))


# Host side shared with prompted.py: buffers, scales and the launch over query tiles.

def row_stats(q):
    """An empty fp32 [B, H, Lq] buffer of per-row statistics (LSE)."""
    return torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)


def scales(q):
    """(sm_scale, qk_scale): 1 / sqrt(D), and the same times log2 e for the kernels' exp2."""
    sm_scale = 1.0 / math.sqrt(q.shape[-1])
    return sm_scale, sm_scale * LOG2E


def launch_rows(kernel, q, *args, **constexprs):
    """Launch `kernel` with one program per (query tile, batch * head), in q's precision and with its
    head-dim constexprs."""
    B, H, Lq, D = q.shape
    launch(kernel, rows_grid(Lq, B * H), *args, PRECISION=precision(q.dtype), **head_meta(D), **constexprs)


def forward(q, k, v):
    """-> o [B, H, Lq, D] (q's dtype), lse [B, H, Lq] fp32 in log2 units."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    o, lse = empty(q.shape, q, poison()), row_stats(q)
    _, qk_scale = scales(q)
    launch_rows(_fwd_tuned, q, q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                H, Lq, Lk, D, qk_scale, bucket(Lq), bucket(Lk), TMA_OK=tma_ok(q, k, v))
    return o, lse


def preprocess(o, do):
    """delta = rowsum(dO * O) [B, H, Lq] fp32."""
    B, H, Lq, D = o.shape
    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=o.device)
    _bwd_preprocess[(triton.cdiv(Lq, 64), B * H)](o, do, delta, *o.stride(), *do.stride(), H, Lq, D,
                                                  BLOCK_M=64, BLOCK_D=block_d(D))
    return delta


def programs_wanted(device):
    """(programs, rows): enough dK/dV programs to fill the GPU twice, chunks of at least `rows` queries.
    The interpreter asks for 8 programs of >= 128 rows, so the small tests split too."""
    if device.type != "cuda":
        return 8, 128
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count, 512


def query_chunks(Lq, Lk, BH, device):
    """(splits, CHUNK): the dK/dV kernel's queries in `splits` chunks of CHUNK rows (a multiple of 128,
    so of every BLOCK_M). A short key set (Wan cross-attention, Lk 226: 2 key tiles a head) would leave
    most of the GPU idle with one program per key tile, each looping over all Lq queries."""
    wanted, min_rows = programs_wanted(device)
    key_programs = triton.cdiv(Lk, 128) * BH  # the fewest programs any config launches (BLOCK_N <= 128)
    splits = max(1, min(wanted // key_programs, triton.cdiv(Lq, min_rows)))
    chunk = triton.cdiv(triton.cdiv(Lq, splits), 128) * 128
    return triton.cdiv(Lq, chunk), chunk


def backward_dkdv(q, k, v, do, lse, delta, do_scale=None):
    """dK, dV of attention(q, k, v) whose output gradient is do (times do_scale, a 1-element tensor)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    splits, chunk = query_chunks(Lq, Lk, B * H, q.device)
    if splits == 1:  # written in place, in the inputs' dtype
        dk, dv = empty(k.shape, k, poison()), empty(v.shape, v, poison())
        dk_, dv_ = dk.unsqueeze(0), dv.unsqueeze(0)
    else:  # one fp32 partial per query chunk, summed below
        dk_ = torch.empty((splits, *k.shape), dtype=torch.float32, device=k.device)
        dv_ = torch.empty((splits, *v.shape), dtype=torch.float32, device=v.device)
    sm_scale = 1.0 / math.sqrt(D)
    grid = lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]), B * H, splits)  # noqa: E731
    launch(_bwd_dkdv_tuned, grid, q, k, v, do, lse, delta, dk_, dv_, do_scale if do_scale is not None else lse,
           *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk_.stride(), *dv_.stride(),
           H, Lq, Lk, D, sm_scale * LOG2E, sm_scale, chunk, bucket(Lq), bucket(Lk), TMA_OK=tma_ok(q, k, v, do),
           HAS_DO_SCALE=do_scale is not None, PRECISION=precision(q.dtype), **head_meta(D))
    if splits == 1:
        return dk, dv
    return dk_.sum(0).to(k.dtype), dv_.sum(0).to(v.dtype)


def backward_dq(q, k, v, do, lse, delta):
    B, H, Lq, D = q.shape
    dq = empty(q.shape, q, poison())
    sm_scale, qk_scale = scales(q)
    launch_rows(_bwd_dq_tuned, q, q, k, v, do, lse, delta, dq,
                *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
                H, Lq, k.shape[2], D, qk_scale, sm_scale, bucket(Lq), bucket(k.shape[2]), TMA_OK=tma_ok(q, k, v, do))
    return dq


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        o, lse = forward(q, k, v)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        need_q, need_k, need_v = ctx.needs_input_grad  # e.g. a frozen model's constant keys: no dK, dV
        delta = preprocess(o, do)
        dk, dv = backward_dkdv(q, k, v, do, lse, delta) if need_k or need_v else (None, None)
        dq = backward_dq(q, k, v, do, lse, delta) if need_q else None
        return dq, dk if need_k else None, dv if need_v else None


def attention(q, k, v):
    """softmax(q k^T / sqrt(D)) v. q: [B, H, Lq, D], k, v: [B, H, Lk, D] -> [B, H, Lq, D]."""
    return FlashAttention.apply(q, k, v)
