"""The attention prologues in Triton: projected rows -> attention inputs with the prompt folded in.

FLUX (qkv_prologue): fused qkv rows -> q, k, v with a prompt residual, per-head QK RMSNorm and RoPE.
Wan (kv_prologue, at the end of this file): cached k/v rows of the base context plus the prompt's
projections -> the prompted cross-attention's k_p, v_p, with the RMSNorm over the full width.

FLUX, per row and head (reference.qkv_prologue is the specification; architectures.md 2.2 and 2.4):
    x = qkv + alpha * R          rows < K only (R = W_qkv P, the prompt's projection, paper.md 3.3)
    n = x / sqrt(mean(x^2) + eps),  y = n * w          QKNorm of q and k, fp32, per head
    out = rot(pe) y              interleaved pairs: (out0, out1) = [[pe00, pe01], [pe10, pe11]] (y0, y1)
v is x. One program handles BLOCK_L rows of one head for q, k and v, reading qkv once.

Backward (dy = rot(pe)^T dout,  dw = sum_rows dy * n,  dx = (dn - n * mean(dn * n)) / rms with dn = dy w;
dR = alpha * dx and d_alpha = sum(dx * R) on rows < K). The sums over rows (dw, d_alpha, and dR over
the batch when R is shared) are written as per-program partials and summed by torch.
"""
import torch
import triton
import triton.language as tl

from .flash import block_d, empty, poison

BLOCK_L = 32


@triton.jit
def _load_rows(X, rows, cols, stride_l, mask):
    return tl.load(X + rows[:, None] * stride_l + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_pe(PE, rows, stride_l, L, D, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """The four [BLOCK_L, BLOCK_D/2] entries of the per-pair 2x2 rotations. A row's table is D/2 contiguous
    2x2 matrices (2 D values): one contiguous, vectorised load per row, split into the entries in registers."""
    offs = tl.arange(0, 2 * BLOCK_D)  # pair j, row r, column c at 4 j + 2 r + c
    pe = tl.load(PE + rows[:, None] * stride_l + offs[None, :], mask=(rows[:, None] < L) & (offs[None, :] < 2 * D),
                 other=0.0)
    pe_c0, pe_c1 = tl.split(tl.reshape(pe, [BLOCK_L, BLOCK_D // 2, 2, 2]))  # columns c = 0, 1: [.., pair, r]
    pe00, pe10 = tl.split(pe_c0)
    pe01, pe11 = tl.split(pe_c1)
    return pe00, pe01, pe10, pe11


@triton.jit
def _fwd(QKV, RES, ALPHA, WQ, WK, PE, Q, K, V,
         s_b, s_l, sr_b, sr_l, spe_b, spe_l, so_b, so_h, so_l, so_d,
         H, L, K_rows, D, eps,
         HAS_RES: tl.constexpr, HAS_PE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_l = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    mask = (rows[:, None] < L) & d_ok[None, :]
    dtype = Q.dtype.element_ty
    if HAS_RES:
        alpha = tl.load(ALPHA).to(tl.float32)
        res_mask = (rows[:, None] < K_rows) & d_ok[None, :]
    if HAS_PE:
        pe00, pe01, pe10, pe11 = _load_pe(PE + b * spe_b, rows, spe_l, L, D, BLOCK_L, BLOCK_D)
    out = b * so_b + h * so_h + rows[:, None] * so_l + offs_d[None, :] * so_d
    for part in tl.static_range(3):  # q, k, v: the 3 is outermost in the qkv columns
        cols = (part * H + h) * D + offs_d
        x = _load_rows(QKV + b * s_b, rows, cols, s_l, mask)
        if HAS_RES:
            x += alpha * _load_rows(RES + b * sr_b, rows, cols, sr_l, res_mask)
            x = x.to(dtype).to(tl.float32)  # the reference adds in the activation dtype
        if part == 2:
            tl.store(V + out, x.to(dtype), mask=mask)
        else:
            w = tl.load((WQ if part == 0 else WK) + offs_d, mask=d_ok, other=0.0).to(tl.float32)
            rrms = tl.rsqrt(tl.sum(x * x, 1) / D + eps)
            y = (x * rrms[:, None] * w[None, :]).to(dtype).to(tl.float32)  # RMSNorm output is cast back
            if HAS_PE:
                y0, y1 = tl.split(tl.reshape(y, [BLOCK_L, BLOCK_D // 2, 2]))  # interleaved pairs
                y = tl.reshape(tl.join(pe00 * y0 + pe01 * y1, pe10 * y0 + pe11 * y1), [BLOCK_L, BLOCK_D])
            tl.store((Q if part == 0 else K) + out, y.to(dtype), mask=mask)


@triton.jit
def _bwd(QKV, RES, ALPHA, WQ, WK, PE, DQ, DK, DV, DQKV, DRES, DALPHA, DWQ, DWK,
         s_b, s_l, sr_b, sr_l, spe_b, spe_l, sdx_b, sdx_l, sdr_b, sdr_l,
         sdq_b, sdq_h, sdq_l, sdq_d, sdk_b, sdk_h, sdk_l, sdk_d, sdv_b, sdv_h, sdv_l, sdv_d,
         H, L, K_rows, D, eps,
         HAS_RES: tl.constexpr, HAS_PE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_l = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    pid = bh * tl.num_programs(0) + pid_l  # slot for this program's partial sums
    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    mask = (rows[:, None] < L) & d_ok[None, :]
    if HAS_RES:
        alpha = tl.load(ALPHA).to(tl.float32)
        res_mask = (rows[:, None] < K_rows) & d_ok[None, :]
        d_alpha = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    if HAS_PE:
        pe00, pe01, pe10, pe11 = _load_pe(PE + b * spe_b, rows, spe_l, L, D, BLOCK_L, BLOCK_D)
    for part in tl.static_range(3):
        cols = (part * H + h) * D + offs_d
        if part == 2:
            dx = tl.load(DV + b * sdv_b + h * sdv_h + rows[:, None] * sdv_l + offs_d[None, :] * sdv_d,
                         mask=mask, other=0.0).to(tl.float32)
        else:
            x = _load_rows(QKV + b * s_b, rows, cols, s_l, mask)  # recompute the forward's x, n
            if HAS_RES:
                x += alpha * _load_rows(RES + b * sr_b, rows, cols, sr_l, res_mask)
            rrms = tl.rsqrt(tl.sum(x * x, 1) / D + eps)
            n = x * rrms[:, None]
            if part == 0:
                dout = tl.load(DQ + b * sdq_b + h * sdq_h + rows[:, None] * sdq_l + offs_d[None, :] * sdq_d,
                               mask=mask, other=0.0).to(tl.float32)
            else:
                dout = tl.load(DK + b * sdk_b + h * sdk_h + rows[:, None] * sdk_l + offs_d[None, :] * sdk_d,
                               mask=mask, other=0.0).to(tl.float32)
            if HAS_PE:  # dy = rot^T dout
                d0, d1 = tl.split(tl.reshape(dout, [BLOCK_L, BLOCK_D // 2, 2]))
                dout = tl.reshape(tl.join(pe00 * d0 + pe10 * d1, pe01 * d0 + pe11 * d1), [BLOCK_L, BLOCK_D])
            w = tl.load((WQ if part == 0 else WK) + offs_d, mask=d_ok, other=0.0).to(tl.float32)
            tl.store((DWQ if part == 0 else DWK) + pid * BLOCK_D + offs_d, tl.sum(dout * n, 0))
            dn = dout * w[None, :]
            dx = rrms[:, None] * (dn - n * (tl.sum(dn * n, 1) / D)[:, None])
        tl.store(DQKV + b * sdx_b + rows[:, None] * sdx_l + cols[None, :], dx.to(DQKV.dtype.element_ty), mask=mask)
        if HAS_RES:
            r = _load_rows(RES + b * sr_b, rows, cols, sr_l, res_mask)
            d_alpha += dx * r
            tl.store(DRES + b * sdr_b + rows[:, None] * sdr_l + cols[None, :], alpha * dx, mask=res_mask)
    if HAS_RES:
        tl.store(DALPHA + pid, tl.sum(tl.sum(tl.where(res_mask, d_alpha, 0.0), 1), 0))


def _pe_strides(pe, qkv):
    """pe [B or 1, 1, L, D/2, 2, 2] with each row's D/2 x 2 x 2 table contiguous, and its (batch, row) strides."""
    if pe is None:
        return qkv, (0, 0)  # dummy pointer, never read
    if pe.stride()[3:] != (4, 2, 1):
        pe = pe.contiguous()
    return pe, (pe.stride(0) if pe.shape[0] > 1 else 0, pe.stride(2))


class QKVPrologue(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, q_scale, k_scale, pe, residual, alpha, num_heads, eps):
        B, L, C = qkv.shape
        H, D = num_heads, C // (3 * num_heads)
        if qkv.stride(2) != 1:
            qkv = qkv.contiguous()
        has_res = residual is not None
        if has_res:
            residual = residual if residual.stride(2) == 1 else residual.contiguous()
            a = alpha.detach().reshape(1).to(device=qkv.device, dtype=torch.float32)
        res, a = (residual, a) if has_res else (qkv, qkv)  # dummies when absent
        sr_b = res.stride(0) if has_res and residual.shape[0] > 1 else 0
        pe_, spe = _pe_strides(pe, qkv)
        q, k, v = (empty((B, H, L, D), qkv, poison()) for _ in range(3))
        grid = (triton.cdiv(L, BLOCK_L), B * H)
        _fwd[grid](qkv, res, a, q_scale, k_scale, pe_, q, k, v,
                   qkv.stride(0), qkv.stride(1), sr_b, res.stride(1), *spe, *q.stride(),
                   H, L, residual.shape[1] if has_res else 0, D, eps,
                   HAS_RES=has_res, HAS_PE=pe is not None, BLOCK_L=BLOCK_L, BLOCK_D=block_d(D), num_warps=4)
        ctx.save_for_backward(qkv, q_scale, k_scale, pe, residual, alpha, a)
        ctx.meta = (H, D, eps, sr_b)
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        qkv, q_scale, k_scale, pe, residual, alpha, a = ctx.saved_tensors
        H, D, eps, sr_b = ctx.meta
        B, L, C = qkv.shape
        has_res = residual is not None
        dq, dk, dv = (torch.zeros(B, H, L, D, dtype=qkv.dtype, device=qkv.device) if g is None else g
                      for g in (dq, dk, dv))
        grid = (triton.cdiv(L, BLOCK_L), B * H)
        n_prog = grid[0] * grid[1]
        BD = block_d(D)
        dqkv = torch.empty(B, L, C, dtype=qkv.dtype, device=qkv.device)  # every element written
        if poison():
            dqkv.fill_(float("nan"))
        dwq = torch.empty(n_prog, BD, dtype=torch.float32, device=qkv.device)
        dwk = torch.empty_like(dwq)
        K_rows = residual.shape[1] if has_res else 0
        # dR per batch element, in fp32 (summed over the batch below when R is shared).
        dres = torch.empty(B, K_rows, C, dtype=torch.float32, device=qkv.device) if has_res else dwq
        d_alpha = torch.empty(n_prog, dtype=torch.float32, device=qkv.device) if has_res else dwq
        res = residual if has_res else qkv
        pe_, spe = _pe_strides(pe, qkv)
        _bwd[grid](qkv, res, a, q_scale, k_scale, pe_, dq, dk, dv, dqkv, dres, d_alpha, dwq, dwk,
                   qkv.stride(0), qkv.stride(1), sr_b, res.stride(1), *spe,
                   dqkv.stride(0), dqkv.stride(1), dres.stride(0), dres.stride(1),
                   *dq.stride(), *dk.stride(), *dv.stride(), H, L, K_rows, D, eps,
                   HAS_RES=has_res, HAS_PE=pe is not None, BLOCK_L=BLOCK_L, BLOCK_D=BD, num_warps=4)
        d_residual = d_alpha_out = None
        if has_res:
            d_residual = dres.sum(0, keepdim=True) if residual.shape[0] == 1 else dres
            d_residual = d_residual.to(residual.dtype)
            d_alpha_out = d_alpha.sum().reshape(alpha.shape).to(alpha.dtype)
        dwq, dwk = dwq[:, :D].sum(0).to(q_scale.dtype), dwk[:, :D].sum(0).to(k_scale.dtype)
        return dqkv, dwq, dwk, None, d_residual, d_alpha_out, None, None


def qkv_prologue(qkv, q_scale, k_scale, pe, num_heads, residual=None, alpha=None, eps=1e-6):
    """qkv [B, L, 3*H*D] -> q, k, v [B, H, L, D]: prompt residual, per-head QK RMSNorm, RoPE."""
    return QKVPrologue.apply(qkv, q_scale, k_scale, pe, residual, alpha, num_heads, eps)


# ---------------------------------------------------------------------------------------------
# Wan: k_p, v_p of the prompted cross-attention (reference.kv_prologue is the specification)
# ---------------------------------------------------------------------------------------------
# Per row of the context (architectures.md 3.2: Wan's norm_k spans all heads, so a row is the unit):
#     x = k_raw + r_k,  n = x / sqrt(mean(x^2) + eps),  k_p = n * w       fp32, over the full width C
#     v_p = v_raw + r_v
# One program handles BLOCK_L whole rows and reads each input once. Backward: dx = (dn - n mean(dn n)) / rms
# with dn = dk_p w is the gradient of k_raw and of r_k alike, dw = sum_rows dk_p n (per-program partials),
# and dv_p is the gradient of v_raw and of r_v (no kernel). Inputs broadcast over the batch (stride 0);
# their gradients are summed over it by torch.

@triton.jit
def _kv_fwd(KR, RK, VR, RV, W, KP, VP, s_kr_b, s_kr_l, s_rk_b, s_rk_l, s_vr_b, s_vr_l, s_rv_b, s_rv_l,
            s_o_b, s_o_l, L, C, eps, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_l = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < L) & (cols[None, :] < C)
    dtype = KP.dtype.element_ty
    x = _load_rows(KR + b * s_kr_b, rows, cols, s_kr_l, mask) + _load_rows(RK + b * s_rk_b, rows, cols, s_rk_l, mask)
    rrms = tl.rsqrt(tl.sum(x * x, 1) / C + eps)
    w = tl.load(W + cols, mask=cols < C, other=0.0).to(tl.float32)
    out = b * s_o_b + rows[:, None] * s_o_l + cols[None, :]
    tl.store(KP + out, (x * rrms[:, None] * w[None, :]).to(dtype), mask=mask)
    v = _load_rows(VR + b * s_vr_b, rows, cols, s_vr_l, mask) + _load_rows(RV + b * s_rv_b, rows, cols, s_rv_l, mask)
    tl.store(VP + out, v.to(dtype), mask=mask)


@triton.jit
def _kv_bwd(KR, RK, W, DKP, DX, DW, s_kr_b, s_kr_l, s_rk_b, s_rk_l, s_dkp_b, s_dkp_l, s_dkp_c, s_dx_b, s_dx_l,
            L, C, eps, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_l = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pid = b * tl.num_programs(0) + pid_l  # slot for this program's dw partial
    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < L) & (cols[None, :] < C)
    x = _load_rows(KR + b * s_kr_b, rows, cols, s_kr_l, mask) + _load_rows(RK + b * s_rk_b, rows, cols, s_rk_l, mask)
    rrms = tl.rsqrt(tl.sum(x * x, 1) / C + eps)
    n = x * rrms[:, None]  # 0 where masked, so masked entries add nothing to the sums below
    dy = tl.load(DKP + b * s_dkp_b + rows[:, None] * s_dkp_l + cols[None, :] * s_dkp_c,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DW + pid * BLOCK_C + cols, tl.sum(dy * n, 0))
    dn = dy * tl.load(W + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
    dx = rrms[:, None] * (dn - n * (tl.sum(dn * n, 1) / C)[:, None])
    tl.store(DX + b * s_dx_b + rows[:, None] * s_dx_l + cols[None, :], dx, mask=mask)


def _rows(x):
    """x with contiguous columns, and its (batch, row) strides: batch stride 0 where x is broadcast."""
    x = x if x.stride(2) == 1 else x.contiguous()
    return x, (x.stride(0) if x.shape[0] > 1 else 0, x.stride(1))


def _kv_tiles(C):
    """Whole rows per program: BLOCK_C spans the width, BLOCK_L rows keep a tile near 4096 elements."""
    BLOCK_C = max(16, triton.next_power_of_2(C))
    return max(1, 4096 // BLOCK_C), BLOCK_C


def _sum_to(g, batch, dtype):
    """The gradient of an input with `batch` rows that was broadcast over g's batch: summed over it."""
    return (g.sum(0, keepdim=True, dtype=torch.float32) if batch == 1 < g.shape[0] else g).to(dtype)


class KVPrologue(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k_raw, v_raw, r_k, r_v, k_scale, eps):
        B, (L, C) = max(k_raw.shape[0], r_k.shape[0]), k_raw.shape[1:]
        (k_raw, s_kr), (r_k, s_rk), (v_raw, s_vr), (r_v, s_rv) = map(_rows, (k_raw, r_k, v_raw, r_v))
        k_p, v_p = (empty((B, L, C), k_raw, poison()) for _ in range(2))
        BLOCK_L, BLOCK_C = _kv_tiles(C)
        _kv_fwd[(triton.cdiv(L, BLOCK_L), B)](k_raw, r_k, v_raw, r_v, k_scale, k_p, v_p, *s_kr, *s_rk, *s_vr, *s_rv,
                                              k_p.stride(0), k_p.stride(1), L, C, eps,
                                              BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C, num_warps=8)
        ctx.save_for_backward(k_raw, r_k, k_scale)
        ctx.meta = (v_raw.shape[0], v_raw.dtype, r_v.shape[0], r_v.dtype, eps)
        return k_p, v_p

    @staticmethod
    def backward(ctx, dk_p, dv_p):
        k_raw, r_k, k_scale = ctx.saved_tensors
        v_batch, v_dtype, rv_batch, rv_dtype, eps = ctx.meta
        B, L, C = dk_p.shape
        BLOCK_L, BLOCK_C = _kv_tiles(C)
        grid = (triton.cdiv(L, BLOCK_L), B)
        dx = torch.empty(B, L, C, dtype=torch.float32, device=dk_p.device)  # d(k_raw + r_k); every element written
        if poison():
            dx.fill_(float("nan"))
        dw = torch.empty(grid[0] * grid[1], BLOCK_C, dtype=torch.float32, device=dk_p.device)
        _kv_bwd[grid](k_raw, r_k, k_scale, dk_p, dx, dw, *_rows(k_raw)[1], *_rows(r_k)[1], *dk_p.stride(),
                      dx.stride(0), dx.stride(1), L, C, eps, BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C, num_warps=8)
        return (_sum_to(dx, k_raw.shape[0], k_raw.dtype), _sum_to(dv_p, v_batch, v_dtype),
                _sum_to(dx, r_k.shape[0], r_k.dtype), _sum_to(dv_p, rv_batch, rv_dtype),
                dw[:, :C].sum(0).to(k_scale.dtype), None)


def kv_prologue(k_raw, v_raw, r_k, r_v, k_scale, num_heads, eps=1e-6):
    """k_raw, v_raw [B or 1, L, C] + r_k, r_v [1 or B, L, C] -> k_p, v_p [B, H, L, C/H] (full-width RMSNorm on k)."""
    k_p, v_p = KVPrologue.apply(k_raw, v_raw, r_k, r_v, k_scale, eps)
    return tuple(t.unflatten(-1, (num_heads, -1)).transpose(1, 2) for t in (k_p, v_p))  # [B, L, C] -> [B, H, L, d]
