"""The Triton kernels against the PyTorch reference (minirestore/kernels/reference.py), forward and backward.

Without a GPU the kernels run in the Triton interpreter (conftest.py sets TRITON_INTERPRET=1), so
shapes are small. Lengths are ragged on purpose (not multiples of any tile); outputs are poisoned
with NaN before each call (MINIRESTORE_KERNELS_POISON=1) so an element a kernel forgets fails. Low
precision runs are compared with the fp32 reference on the same (rounded) inputs. The interpreter
cannot do bf16 dots (triton issue 11584): bf16 runs only on a GPU.
"""
import pytest
import torch

from minirestore import kernels
from minirestore.kernels import reference
from minirestore import UserError

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 in the interpreter is exact numpy arithmetic; on a GPU exp2 is approximate.
TOL = {torch.float32: 1e-5 if DEVICE == "cpu" else 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}
FP16 = torch.float16


gpu_only = pytest.mark.skipif(DEVICE == "cpu", reason="a GPU case (compiled kernels, real sizes)")


def bf16(*case):
    return pytest.param(torch.bfloat16, *case, marks=pytest.mark.skipif(DEVICE == "cpu", reason="bf16 dots need a GPU"))


@pytest.fixture(autouse=True)
def triton_mode(monkeypatch):
    monkeypatch.setenv("MINIRESTORE_KERNELS", "triton")
    monkeypatch.setenv("MINIRESTORE_KERNELS_POISON", "1")


def assert_close(name, got, want, tol):
    """Max abs error within tol of the reference's scale (at least 1: inputs are unit normal)."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got = got.float()
    assert not torch.isnan(got).any(), f"{name}: NaN (an element was never written)"
    err = (got - want).abs().max().item()
    scale = max(want.abs().max().item(), 1.0)
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol:g} * {scale:.3g}"


def leaves(dtype, *shapes):
    return [torch.randn(s, device=DEVICE).to(dtype).requires_grad_() for s in shapes]


def as_fp32(xs):
    return [x.detach().float().requires_grad_() for x in xs]


def check(fn, ref, xs, tol, names):
    """fn(*xs) forward and backward vs ref on the fp32 copies, with a random output gradient."""
    out = fn(*xs)
    outs = out if isinstance(out, tuple) else (out,)
    grads_out = [torch.randn_like(o) for o in outs]
    grads = torch.autograd.grad(outs, xs, grads_out)
    xf = as_fp32(xs)
    ref_out = ref(*xf)
    ref_outs = ref_out if isinstance(ref_out, tuple) else (ref_out,)
    ref_grads = torch.autograd.grad(ref_outs, xf, [g.float() for g in grads_out])
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert o.dtype == xs[0].dtype, f"out{i}: dtype {o.dtype}"
        assert_close(f"out{i}", o, r, tol)
    for name, g, r in zip(names, grads, ref_grads):
        assert_close(f"d{name}", g, r, tol)


# ---------------------------------------------------------------------------------------------
# Flash attention
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,B,H,Lq,Lk,D", [
    (torch.float32, 2, 2, 77, 1, 64),
    (torch.float32, 1, 2, 130, 226, 128),
    (torch.float32, 2, 1, 257, 300, 16),
    (torch.float32, 1, 2, 45, 70, 40),  # head dim not a power of two: masked channels
    (FP16, 2, 2, 77, 226, 64),
    (FP16, 1, 1, 130, 300, 128),
    (FP16, 1, 2, 257, 1, 32),
    bf16(1, 2, 257, 300, 128),
])
def test_attention(dtype, B, H, Lq, Lk, D):
    torch.manual_seed(Lq + Lk + D)
    xs = leaves(dtype, (B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, D))
    check(kernels.attention, reference.attention, xs, TOL[dtype], "qkv")


def test_attention_strided_inputs():
    """q, k, v as the [B, L, H, D] -> [B, H, L, D] views the models pass (strides go to the kernel)."""
    torch.manual_seed(0)
    B, H, L, D = 2, 3, 50, 32
    qkv = torch.randn(B, L, 3, H, D, device=DEVICE, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x [B, H, L, D], non-contiguous
    out = kernels.attention(q, k, v)
    (grad,) = torch.autograd.grad(out, qkv, torch.ones_like(out))
    ref_qkv = qkv.detach().clone().requires_grad_()
    ref = reference.attention(*ref_qkv.permute(2, 0, 3, 1, 4))
    (ref_grad,) = torch.autograd.grad(ref, ref_qkv, torch.ones_like(ref))
    assert_close("out", out, ref, 1e-5)
    assert_close("dqkv", grad, ref_grad, 1e-5)


def most_configs():
    """The longest config list of any attention kernel (sm_90 has the most: its TMA and warp-specialised ones)."""
    from minirestore.kernels import tuning
    return max(len(configs) for gens in tuning.CONFIGS.values() for configs in gens.values())


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, FP16])
@pytest.mark.parametrize("config", range(most_configs()))
def test_every_config_on_gpu(monkeypatch, config, dtype):
    """Each config the autotuner may choose (MINIRESTORE_KERNELS_CONFIG forces the i-th, modulo a kernel's
    number), every attention kernel, ragged shapes: attention fwd+bwd and the prompted attention with Wan's
    226 context rows. The inputs suit TMA, so on sm_90 the TMA and warp-specialised configs run too."""
    from minirestore.kernels import tuning
    monkeypatch.setenv("MINIRESTORE_KERNELS_CONFIG", str(config))
    torch.manual_seed(config)
    xs = leaves(dtype, (1, 3, 1000, 128), (1, 3, 777, 128), (1, 3, 777, 128))
    assert tuning.tma_ok(*xs)
    check(kernels.attention, reference.attention, xs, TOL[dtype], "qkv")
    xs = leaves(dtype, (2, 2, 1500, 128), (2, 2, 226, 128), (2, 2, 226, 128), (2, 2, 226, 128), (2, 2, 226, 128))
    a = torch.tensor(0.7, device=DEVICE, requires_grad=True)
    check(kernels.prompted_attention, reference.prompted_attention, xs + [a], TOL[dtype],
          ["q", "k", "v", "k_p", "v_p", "alpha"])


@gpu_only
def test_flux_size_attention_against_sdpa():
    """FLUX.1-dev joint attention at 1024^2 (B1 H24 L4608 D128, bf16), forward and backward, autotuned."""
    torch.manual_seed(0)
    xs = leaves(torch.bfloat16, *[(1, 24, 4608, 128)] * 3)
    check(kernels.attention, reference.attention, xs, TOL[torch.bfloat16], "qkv")


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, FP16])
def test_large_score_magnitudes_against_sdpa(dtype):
    """Scores in the hundreds (q, k scaled up, as after a QK norm with large weights): the online softmax
    must subtract its running max, or exp2 overflows. Against SDPA in fp32 on the same rounded inputs."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 4, L, 128, device=DEVICE) for L in (1100, 900, 900))
    xs = [(x * s).to(dtype).requires_grad_() for x, s in ((q, 8.0), (k, 8.0), (v, 1.0))]
    check(kernels.attention, reference.attention, xs, TOL[dtype], "qkv")


@pytest.mark.parametrize("warp_specialised", [False, True])
def test_tma_paths_in_the_interpreter(monkeypatch, warp_specialised):
    """The sm_90 configs' tensor-descriptor (TMA) loads, and the warp-specialised forward's one masked loop, run
    by the interpreter on ragged shapes, forward and backward, plain and prompted; inputs a descriptor cannot
    read (a 72-byte row: fp16 D=36) take the pointer loads instead."""
    from minirestore.kernels import tuning
    monkeypatch.setattr(tuning, "INTERPRET_TILE", tuning.Tile(32, 64, 4, 1, tma=True, ws=warp_specialised))
    used = []
    real = tuning.constexprs_of
    monkeypatch.setattr(tuning, "constexprs_of", lambda tile, fn: used.append(tile.tma) or real(tile, fn))
    for dtype, Lq, Lk, D in [(torch.float32, 77, 130, 40), (FP16, 130, 45, 64), (FP16, 45, 70, 36)]:
        torch.manual_seed(Lq + D)
        xs = leaves(dtype, (1, 2, Lq, D), (1, 2, Lk, D), (1, 2, Lk, D))
        assert tuning.tma_ok(*xs) == (D != 36)
        used.clear()
        check(kernels.attention, reference.attention, xs, TOL[dtype], "qkv")
        assert used == [D != 36] * 3  # forward, dK/dV, dQ
        xs = leaves(dtype, (1, 2, Lq, D), (1, 2, Lk, D), (1, 2, Lk, D), (1, 2, 29, D), (1, 2, 29, D))
        a = torch.tensor(0.7, device=DEVICE, requires_grad=True)
        check(kernels.prompted_attention, reference.prompted_attention, xs + [a], TOL[dtype],
              ["q", "k", "v", "k_p", "v_p", "alpha"])


# ---------------------------------------------------------------------------------------------
# Prompted (two-context) attention
# ---------------------------------------------------------------------------------------------
# fp16 with Lk = 1 is left out: there dK is zero in exact arithmetic and its computed value is the
# rounding of the stored output o = o_b + alpha o_p in delta = rowsum(dO o), as in FlashAttention-2.
@pytest.mark.parametrize("dtype,B,H,Lq,Lk,Lk_p,D,alpha", [
    (torch.float32, 2, 2, 77, 1, 226, 64, 0.7),
    (torch.float32, 1, 2, 130, 226, 300, 128, -1.3),
    (torch.float32, 2, 1, 257, 300, 77, 16, 0.0),
    (FP16, 2, 2, 77, 226, 1, 64, -0.4),
    (FP16, 1, 2, 130, 300, 226, 128, 1.5),
    (FP16, 1, 1, 257, 77, 130, 32, 0.0),
    bf16(1, 2, 257, 226, 300, 128, 0.8),
])
def test_prompted_attention(dtype, B, H, Lq, Lk, Lk_p, D, alpha):
    torch.manual_seed(Lq + Lk + Lk_p + D)
    xs = leaves(dtype, (B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, D), (B, H, Lk_p, D), (B, H, Lk_p, D))
    a = torch.tensor(alpha, device=DEVICE, requires_grad=True)  # the gate stays fp32, like alpha_l
    check(kernels.prompted_attention, reference.prompted_attention, xs + [a], TOL[dtype],
          ["q", "k", "v", "k_p", "v_p", "alpha"])


def test_prompted_attention_skips_gradients_nobody_needs(monkeypatch):
    """Wan's base context is constant: no dK, dV kernel runs for it, and the other gradients still match."""
    from minirestore.kernels import prompted
    calls = []
    real = prompted.backward_dkdv
    monkeypatch.setattr(prompted, "backward_dkdv", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    torch.manual_seed(3)
    q, k, v, k_p, v_p = (torch.randn(1, 2, L, 32, device=DEVICE) for L in (90, 40, 40, 50, 50))
    q, k_p, v_p = (x.requires_grad_() for x in (q, k_p, v_p))
    a = torch.tensor(0.6, device=DEVICE, requires_grad=True)
    do = torch.randn(1, 2, 90, 32, device=DEVICE)
    grads = torch.autograd.grad(kernels.prompted_attention(q, k, v, k_p, v_p, a), (q, k_p, v_p, a), do)
    assert len(calls) == 1 and "do_scale" in calls[0]  # only the prompted context's dK, dV
    xs = as_fp32((q, k_p, v_p, a))
    want = torch.autograd.grad(reference.prompted_attention(xs[0], k, v, xs[1], xs[2], xs[3]), xs, do)
    for name, g, w in zip(["q", "k_p", "v_p", "alpha"], grads, want):
        assert_close(f"d{name}", g, w, TOL[torch.float32])


def test_attention_splits_the_queries_of_short_key_sets():
    """The dK/dV kernel splits the queries over programs when there are few key tiles (checked here:
    the ragged shapes of test_attention with Lk 1 and 226 take that path)."""
    from minirestore.kernels import flash
    cpu = torch.device("cpu")
    assert flash.query_chunks(257, 1, 2, cpu) == (3, 128)  # chunks of 128 rows, the last one ragged
    assert flash.query_chunks(130, 226, 2, cpu) == (2, 128)
    assert flash.query_chunks(257, 300, 2, cpu)[0] == 1  # enough key tiles: one chunk
    torch.manual_seed(4)
    xs = leaves(torch.float32, (1, 1, 300, 16), (1, 1, 20, 16), (1, 1, 20, 16))
    assert flash.query_chunks(300, 20, 1, cpu)[0] == 3
    check(kernels.attention, reference.attention, xs, TOL[torch.float32], "qkv")


def test_prompted_attention_without_grad():
    """Sampling path: no o_p written, same output."""
    torch.manual_seed(1)
    xs = [torch.randn(1, 2, L, 64, device=DEVICE) for L in (70, 33, 33, 90, 90)]
    a = torch.tensor(-0.6, device=DEVICE)
    with torch.no_grad():
        out = kernels.prompted_attention(*xs, a)
    assert_close("out", out, reference.prompted_attention(*xs, a), TOL[torch.float32])


# ---------------------------------------------------------------------------------------------
# qkv prologue: prompt residual, QK RMSNorm, RoPE
# ---------------------------------------------------------------------------------------------
def pe_table(batch, L, D):
    """Random rotations in the layout of minirestore.flux.rope: [batch, 1, L, D/2, 2, 2]."""
    angle = 3 * torch.randn(batch, 1, L, D // 2, device=DEVICE)
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack([cos, -sin, sin, cos], -1).reshape(batch, 1, L, D // 2, 2, 2)


@pytest.mark.parametrize("dtype,B,H,L,D,K,res_batch,pe_batch,alpha,extra_cols", [
    (torch.float32, 2, 2, 77, 64, 20, 1, 1, 0.7, 0),  # shared prompt residual, batch 2
    (torch.float32, 1, 3, 40, 128, 40, 1, 1, -1.3, 17),  # single block: qkv a view of a wider linear1
    (torch.float32, 2, 2, 50, 16, 0, 0, 2, 0.0, 0),  # no residual (image stream), per-sample pe
    (torch.float32, 2, 1, 33, 32, 9, 2, 0, 0.0, 5),  # per-sample residual, alpha 0, no RoPE
    (FP16, 2, 2, 77, 64, 20, 1, 1, 0.7, 0),
    (FP16, 2, 3, 40, 128, 33, 1, 2, -1.3, 17),
    bf16(1, 4, 130, 128, 60, 1, 1, 0.5, 0),
])
def test_qkv_prologue(dtype, B, H, L, D, K, res_batch, pe_batch, alpha, extra_cols):
    torch.manual_seed(L + D + K)
    C = 3 * H * D
    wide = torch.randn(B, L, C + extra_cols, device=DEVICE).to(dtype).requires_grad_()
    pe = pe_table(pe_batch, L, D) if pe_batch else None
    if pe_batch == 2:  # the same table with its 2x2 matrices stored transposed: not contiguous per row
        pe = pe.transpose(-1, -2).contiguous().transpose(-1, -2)
    xs = [wide, (torch.rand(D, device=DEVICE) + 0.5).requires_grad_(), (torch.rand(D, device=DEVICE) + 0.5).requires_grad_()]
    names = ["qkv", "q_scale", "k_scale"]
    if res_batch:
        xs += [torch.randn(res_batch, K, C, device=DEVICE, requires_grad=True),
               torch.tensor(alpha, device=DEVICE, requires_grad=True)]
        names += ["residual", "alpha"]

    def run(fn):
        return lambda w, qs, ks, *ra: fn(w[..., :C], qs, ks, pe, H, *ra)

    check(run(kernels.qkv_prologue), run(reference.qkv_prologue), xs, TOL[dtype], names)


# ---------------------------------------------------------------------------------------------
# kv prologue (Wan): cached k/v of the base context + the prompt's projections, full-width RMSNorm
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,B_raw,B_r,L,C,H,r_dtype", [
    (torch.float32, 2, 1, 77, 48, 3, torch.float32),  # batch-2 base context, one prompt for the batch
    (torch.float32, 1, 1, 1, 96, 2, torch.float32),  # a single context row
    (torch.float32, 1, 2, 226, 96, 3, torch.float32),  # one base context, per-sample prompt projections
    (FP16, 2, 1, 226, 48, 2, FP16),  # the model's case: projections in the activation dtype
    (FP16, 1, 1, 77, 96, 3, torch.float32),  # fp32 prompt projections into fp16 rows
    (FP16, 2, 2, 1, 48, 3, FP16),
    bf16(2, 1, 226, 1536, 12, torch.bfloat16),  # Wan 1.3B
])
def test_kv_prologue(dtype, B_raw, B_r, L, C, H, r_dtype):
    torch.manual_seed(L + C + B_raw)
    xs = leaves(dtype, (B_raw, L, C), (B_raw, L, C)) + leaves(r_dtype, (B_r, L, C), (B_r, L, C))
    xs.append((torch.rand(C, device=DEVICE) + 0.5).requires_grad_())  # norm_k.weight stays fp32, as in Wan

    def run(fn):
        return lambda *args: fn(*args, H, 1e-6)

    check(run(kernels.kv_prologue), run(reference.kv_prologue), xs, TOL[dtype],
          ["k_raw", "v_raw", "r_k", "r_v", "k_scale"])


def test_kv_prologue_refuses_mismatched_inputs():
    k = torch.randn(2, 10, 32, device=DEVICE)
    w = torch.ones(32, device=DEVICE)
    for r in (torch.randn(1, 12, 32, device=DEVICE), torch.randn(3, 10, 32, device=DEVICE)):  # L 12 != 10; batch 3
        with pytest.raises(UserError, match="do not match k_raw"):
            kernels.kv_prologue(k, k, r, r, w, 2)
    with pytest.raises(UserError, match="heads"):
        kernels.kv_prologue(k, k, k, k, w, 3)


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------
def test_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(reference, "attention", lambda q, k, v: calls.append("reference") or q)
    q = torch.randn(1, 1, 8, 16, device=DEVICE)
    kernels.attention(q, q, q)  # forced triton (fixture)
    assert calls == []
    monkeypatch.setenv("MINIRESTORE_KERNELS", "torch")  # read at every call
    kernels.attention(q, q, q)
    assert calls == ["reference"]
    monkeypatch.setenv("MINIRESTORE_KERNELS", "auto")
    kernels.attention(q, q, q)
    assert calls == ["reference"] * (1 if q.is_cuda else 2)
    monkeypatch.setenv("MINIRESTORE_KERNELS", "fast")
    with pytest.raises(UserError, match="MINIRESTORE_KERNELS"):
        kernels.attention(q, q, q)


def record(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(name) or real(*a, **kw))
    return calls


def test_dispatch_falls_back_for_unsupported_dtypes_and_head_dims(monkeypatch):
    from minirestore.kernels import flash
    ours, ref = record(monkeypatch, flash, "attention"), record(monkeypatch, reference, "attention")
    q = torch.randn(1, 1, 8, 16, device=DEVICE, dtype=torch.float64)
    kernels.attention(q, q, q)  # fp64 (forced triton, fixture): the kernels do not compute it
    assert (ours, ref) == ([], ["attention"])
    q = torch.randn(1, 1, 8, kernels.MAX_TRITON_HEAD_DIM + 8, device=DEVICE)
    kernels.attention(q, q, q)  # wider than the compile-checked tiles
    assert (ours, ref) == ([], ["attention"] * 2)
    torch.manual_seed(5)
    xs = leaves(torch.float32, *[(1, 1, 70, kernels.MAX_TRITON_HEAD_DIM)] * 3)
    check(kernels.attention, reference.attention, xs, TOL[torch.float32], "qkv")  # the limit itself runs ours
    assert ours == ["attention"] and len(ref) == 3  # check() calls the reference once more


class FakeCuda:
    """Just what the dispatch reads from a tensor, for a CUDA input on a machine without a GPU."""
    is_cuda, dtype, device = True, torch.float16, "cuda:0"


def test_dispatch_refuses_the_interpreter_with_cuda_tensors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for mode in ("auto", "triton"):
        monkeypatch.setenv("MINIRESTORE_KERNELS", mode)
        with pytest.raises(UserError, match="TRITON_INTERPRET=1 .* CUDA tensors"):
            kernels._use_triton(FakeCuda())
    monkeypatch.setenv("MINIRESTORE_KERNELS", "torch")
    assert not kernels._use_triton(FakeCuda())


def test_dispatch_warns_once_when_triton_is_missing_on_cuda(monkeypatch):
    monkeypatch.setattr(kernels, "_triton", ImportError("No module named 'triton'"))
    monkeypatch.setattr(kernels, "_warned", set())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("MINIRESTORE_KERNELS", "auto")
    with pytest.warns(UserWarning, match="triton cannot be imported"):
        assert not kernels._use_triton(FakeCuda())
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not kernels._use_triton(FakeCuda())  # once only
    monkeypatch.setenv("MINIRESTORE_KERNELS", "triton")
    with pytest.raises(UserError, match="cannot be imported"):
        kernels._use_triton(FakeCuda())


# ---------------------------------------------------------------------------------------------
# A whole tiny FLUX through the kernels
# ---------------------------------------------------------------------------------------------
def test_tiny_flux_forward_and_prompt_gradient_match_reference(monkeypatch):
    """Forward and backward to the prompt (P and every alpha_l) with MINIRESTORE_KERNELS=triton vs torch."""
    flux = pytest.importorskip("minirestore.flux")
    from types import SimpleNamespace
    torch.manual_seed(0)
    B, L_txt, K, L_img, hidden, depth, single = 2, 7, 5, 12, 64, 2, 2
    cfg = flux.FluxConfig(in_channels=16, out_channels=16, vec_in_dim=8, context_in_dim=24, hidden_size=hidden,
                          num_heads=4, depth=depth, depth_single_blocks=single, axes_dim=[4, 6, 6])
    model = flux.Flux(cfg).to(DEVICE).requires_grad_(False)
    with torch.no_grad():  # random everywhere: default initialisers leave zeros that hide bugs
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith(".scale") else 0.1 * torch.randn_like(p))
    x = dict(img=torch.randn(B, L_img, 16), img_ids=torch.randint(0, 6, (B, L_img, 3)).float(),
             txt=torch.randn(B, L_txt, 24), txt_ids=torch.zeros(B, L_txt, 3), timesteps=torch.rand(B),
             y=torch.randn(B, 8), guidance=torch.full((B,), 3.5))
    x = {k: v.to(DEVICE) for k, v in x.items()}
    P = 0.5 * torch.randn(1, K, hidden, device=DEVICE)
    alpha = torch.tensor([0.8, -0.5, 0.0, 1.2], device=DEVICE)
    w = torch.randn(B, L_img, 16, device=DEVICE)

    def run(mode):
        monkeypatch.setenv("MINIRESTORE_KERNELS", mode)
        prompt = SimpleNamespace(prompt=P.clone().requires_grad_(), alpha=alpha.clone().requires_grad_())
        out = model(**x, prompt=prompt)
        (out * w).sum().backward()
        return out.detach(), prompt.prompt.grad, prompt.alpha.grad

    for name, got, want in zip(["out", "dP", "dalpha"], run("triton"), run("torch")):
        assert_close(name, got, want, 1e-5 if DEVICE == "cpu" else 1e-4)


# ---------------------------------------------------------------------------------------------
# A whole tiny Wan through the kernels
# ---------------------------------------------------------------------------------------------
def test_tiny_wan_forward_and_prompt_gradient_match_reference(monkeypatch):
    """The prompted Wan (kv prologue + prompted attention) with MINIRESTORE_KERNELS=triton vs torch, to P and alpha."""
    wan = pytest.importorskip("minirestore.wan")
    from types import SimpleNamespace
    torch.manual_seed(0)
    cfg = wan.WanConfig(dim=48, ffn_dim=32, num_heads=3, num_layers=2, text_len=9, text_dim=16)
    model = wan.WanModel(cfg).to(DEVICE).requires_grad_(False)
    with torch.no_grad():  # random everywhere: default initialisers leave zeros that hide bugs
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    B = 2
    x, t = torch.randn(B, cfg.in_dim, 1, 4, 6, device=DEVICE), torch.tensor([900.0, 30.0], device=DEVICE)
    context = torch.randn(1, cfg.text_len, cfg.text_dim, device=DEVICE)  # one null context for the batch
    P = 0.5 * torch.randn(1, 7, cfg.dim, device=DEVICE)  # K < L: zero-padded
    alpha = torch.tensor([0.8, -0.5], device=DEVICE)
    w = torch.randn(B, cfg.out_dim, 1, 4, 6, device=DEVICE)

    def run(mode):
        monkeypatch.setenv("MINIRESTORE_KERNELS", mode)
        prompt = SimpleNamespace(prompt=P.clone().requires_grad_(), alpha=alpha.clone().requires_grad_())
        with torch.no_grad():
            ctx = model.precompute_context(context)
        out = model(x, t, ctx, prompt=prompt)
        (out * w).sum().backward()
        return out.detach(), prompt.prompt.grad, prompt.alpha.grad

    for name, got, want in zip(["out", "dP", "dalpha"], run("triton"), run("torch")):
        assert_close(name, got, want, 1e-5 if DEVICE == "cpu" else 1e-4)
