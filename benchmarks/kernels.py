"""Benchmark of the Triton kernels against their named baselines, in one run (issue 5).

    python benchmarks/kernels.py                # on a GPU: bf16 at the FLUX / Wan shapes, appends to RESULTS.md
    python benchmarks/kernels.py --cpu-smoke    # tiny shapes, reference path only (automatic without a GPU)

Rows (bf16, median of do_bench after warm-up, random data):
  attention     FLUX.1-dev 1024^2 joint attention B1 H24 L4608 D128; Wan 1.3B 480p 81 frames B1 H12 L32760 D128
                vs SDPA's default choice and each backend forced (flash, cuDNN, memory-efficient);
                forward and forward+backward
  prompted      Wan cross-attention Lq 32760 against Lk = Lk_p = 512 and 226, vs two SDPA calls plus the add
                (default backend and cuDNN); forward+backward with the base context constant, as in Wan
  prologue      FLUX stream B1 L4608 H24 D128 with a 512-row prompt residual, vs the eager PyTorch sequence
                (minirestore/kernels/reference.py) and a device-to-device copy of the same bytes (the bandwidth ceiling)
  kv prologue   Wan 1.3B prompted cross-attention keys/values B1 L226 dim 1536 H12 (full-width RMSNorm of
                k_raw + W_k P, v_raw + W_v P), vs the eager PyTorch sequence and a device copy of the same bytes
FLOPs: attention forward 4 B H Lq Lk D, backward 2.5x forward (kernels.md). Prologue bytes: qkv and the
residual read, q/k/v written, the RoPE table read; kv prologue bytes: k_raw, v_raw, r_k, r_v read, k_p, v_p written.
"""
import argparse
import datetime
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minirestore import kernels  # noqa: E402
from minirestore.kernels import reference  # noqa: E402

GPU_SHAPES = dict(
    attention=[("FLUX joint", 1, 24, 4608, 4608, 128), ("Wan self", 1, 12, 32760, 32760, 128)],
    prompted=[("Wan cross 512", 1, 12, 32760, 512, 128), ("Wan cross 226", 1, 12, 32760, 226, 128)],
    prologue=[("FLUX stream", 1, 24, 4608, 512, 128)],
    kv_prologue=[("Wan 1.3B cross", 1, 12, 226, 1536)],
)
CPU_SHAPES = dict(
    attention=[("tiny self", 1, 2, 256, 256, 64)],
    prompted=[("tiny cross", 1, 2, 256, 77, 64)],
    prologue=[("tiny stream", 1, 2, 128, 32, 64)],
    kv_prologue=[("tiny cross", 1, 2, 77, 96)],
)


def bench(fn, cuda):
    """Median milliseconds after warm-up."""
    if cuda:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def ours(name, cuda):
    """On the CPU kernels.* dispatches to the reference: say so in the row."""
    return name if cuda or os.environ.get("MINIRESTORE_KERNELS") == "triton" else name + " [reference path]"


def sdpa(backend):
    """SDPA with one backend forced (None: PyTorch's default choice)."""
    if backend is None:
        return F.scaled_dot_product_attention
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def fwd_bwd(fn, inputs):
    out = fn(*inputs)
    grad = torch.randn_like(out)
    needed = [x for x in inputs if x.requires_grad]
    return lambda: torch.autograd.grad(fn(*inputs), needed, grad)


def sdpa_backends(cuda):
    """(name, fn) of the SDPA baselines: the default choice, and on CUDA each backend forced."""
    impls = [("SDPA default", sdpa(None))]
    if cuda:
        from torch.nn.attention import SDPBackend
        impls += [("SDPA flash", sdpa(SDPBackend.FLASH_ATTENTION)), ("SDPA cuDNN", sdpa(SDPBackend.CUDNN_ATTENTION)),
                  ("SDPA mem-efficient", sdpa(SDPBackend.EFFICIENT_ATTENTION))]
    return impls


def try_bench(fn, cuda):
    try:
        return bench(fn, cuda)
    except Exception as e:  # e.g. cuDNN attention unavailable for this build or GPU
        print(f"    (skipped: {type(e).__name__}: {str(e).splitlines()[0][:100]})")
        return float("nan")


def attention_rows(shapes, dtype, device, cuda):
    rows = []
    for name, B, H, Lq, Lk, D in shapes:
        q = torch.randn(B, H, Lq, D, device=device, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(B, H, Lk, D, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        flops = 4 * B * H * Lq * Lk * D
        impls = [(ours("minirestore", cuda), kernels.attention)] + sdpa_backends(cuda)
        for mode, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
            for impl, fn in impls:
                run = (lambda fn=fn: fn(q, k, v)) if mode == "fwd" else fwd_bwd(fn, (q, k, v))
                with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                    ms = try_bench(run, cuda)
                rows.append((f"attention {mode}", f"{name} B{B} H{H} L{Lq} D{D}", impl, ms, mult * flops / ms / 1e9, "TFLOP/s"))
    return rows


def prompted_rows(shapes, dtype, device, cuda):
    rows = []
    def two_calls(attn):
        return lambda q, k, v, kp, vp, a: attn(q, k, v) + a * attn(q, kp, vp)

    impls = [(ours("minirestore fused", cuda), kernels.prompted_attention)]
    impls += [(f"2x {name} + add", two_calls(fn)) for name, fn in sdpa_backends(cuda) if "flash" not in name
              and "mem" not in name]
    for name, B, H, Lq, Lk, D in shapes:
        q = torch.randn(B, H, Lq, D, device=device, dtype=dtype, requires_grad=True)
        # the base context's k, v are constant in Wan (no gradient); the prompted ones train P
        kv = [torch.randn(B, H, Lk, D, device=device, dtype=dtype, requires_grad=i >= 2) for i in range(4)]
        alpha = torch.tensor(0.3, device=device, requires_grad=True)
        inputs = (q, *kv, alpha)
        flops = 4 * B * H * Lq * 2 * Lk * D
        for mode, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
            for impl, fn in impls:
                run = (lambda fn=fn: fn(*inputs)) if mode == "fwd" else fwd_bwd(fn, inputs)
                with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                    ms = try_bench(run, cuda)
                rows.append((f"prompted {mode}", f"{name} B{B} H{H} Lq{Lq} Lk{Lk} D{D}", impl, ms, mult * flops / ms / 1e9, "TFLOP/s"))
    return rows


def prologue_rows(shapes, dtype, device, cuda):
    rows = []
    for name, B, H, L, K, D in shapes:
        C = 3 * H * D
        qkv = torch.randn(B, L, C, device=device, dtype=dtype)
        residual = torch.randn(1, K, C, device=device, dtype=dtype)
        alpha = torch.tensor(0.3, device=device)
        q_scale, k_scale = (1 + 0.1 * torch.randn(D, device=device, dtype=dtype) for _ in range(2))
        angle = torch.randn(1, 1, L, D // 2, device=device)
        pe = torch.stack([angle.cos(), -angle.sin(), angle.sin(), angle.cos()], -1).reshape(1, 1, L, D // 2, 2, 2)
        size = qkv.element_size()
        moved = 2 * B * L * C * size + K * C * size + pe.numel() * 4  # read qkv, write q/k/v, residual, table
        args = (qkv, q_scale, k_scale, pe, H, residual, alpha)
        with torch.no_grad():
            for impl, fn in ((ours("minirestore fused", cuda), kernels.qkv_prologue), ("eager PyTorch", reference.qkv_prologue)):
                ms = try_bench(lambda fn=fn: fn(*args), cuda)
                rows.append(("prologue fwd", f"{name} B{B} L{L} H{H} D{D} K{K}", impl, ms, moved / ms / 1e6, "GB/s"))
            dst = torch.empty_like(qkv)
            ms = try_bench(lambda: dst.copy_(qkv), cuda)
            rows.append(("prologue fwd", f"{name} B{B} L{L} H{H} D{D} K{K}", "device copy (ceiling)", ms,
                         2 * qkv.numel() * size / ms / 1e6, "GB/s"))
    return rows


def kv_prologue_rows(shapes, dtype, device, cuda):
    rows = []
    for name, B, H, L, C in shapes:
        k_raw, v_raw = (torch.randn(B, L, C, device=device, dtype=dtype) for _ in range(2))
        r_k, r_v = (0.1 * torch.randn(1, L, C, device=device, dtype=dtype) for _ in range(2))
        k_scale = 1 + 0.1 * torch.randn(C, device=device)  # norm_k.weight is an fp32 island
        size = k_raw.element_size()
        moved = (4 * B + 2) * L * C * size  # read k_raw, v_raw, r_k, r_v; write k_p, v_p
        args = (k_raw, v_raw, r_k, r_v, k_scale, H)
        shape = f"{name} B{B} L{L} C{C} H{H}"
        with torch.no_grad():
            for impl, fn in ((ours("minirestore fused", cuda), kernels.kv_prologue),
                             ("eager PyTorch", reference.kv_prologue)):
                ms = try_bench(lambda fn=fn: fn(*args), cuda)
                rows.append(("kv prologue fwd", shape, impl, ms, moved / ms / 1e6, "GB/s"))
            src = torch.cat([k_raw, v_raw])
            dst = torch.empty_like(src)
            ms = try_bench(lambda: dst.copy_(src), cuda)
            rows.append(("kv prologue fwd", shape, "device copy (ceiling)", ms,
                         2 * src.numel() * size / ms / 1e6, "GB/s"))
    return rows


def ratios(rows):
    """Speed-up of the minirestore row of each (kernel, shape) over every other row."""
    out = []
    for kind, shape, impl, ms, *_ in rows:
        if impl.startswith("minirestore"):
            for k2, s2, i2, ms2, *_ in rows:
                if (k2, s2) == (kind, shape) and i2 != impl:
                    out.append(f"{kind:16} {shape:40} {i2:22} {ms2 / ms:6.2f}x")
    return out


def table(rows):
    lines = ["| kernel | shape | implementation | ms (median) | throughput |", "|---|---|---|---|---|"]
    for kind, shape, impl, ms, rate, unit in rows:
        lines.append(f"| {kind} | {shape} | {impl} | {ms:.3f} | {rate:.1f} {unit} |")
    return lines


def tuned_choices():
    """The config each autotuned kernel settled on, per autotune key (GPU only): whether the sm_90 TMA and
    warp-specialised configs won against the pointer-load ones at these shapes."""
    from minirestore.kernels import flash, prompted
    kernels = (flash._fwd_tuned, flash._bwd_dkdv_tuned, flash._bwd_dq_tuned, prompted._prompted_fwd_tuned,
               prompted._prompted_bwd_dq_tuned)
    lines = ["| kernel | autotune key | chosen config |", "|---|---|---|"]
    for kernel in kernels:
        for key, config in getattr(kernel, "cache", {}).items():
            lines.append(f"| {kernel.kind} | {', '.join(map(str, key))} | {config} |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU, reference path")
    parser.add_argument("--write", action="store_true", help="append a CPU smoke run to RESULTS.md too (labelled CPU)")
    parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"))
    parser.add_argument("--only", choices=["attention", "prompted", "prologue"], default=None)
    parser.add_argument("--shapes", choices=["auto", "tiny"], default="auto",
                        help="tiny: the CPU shapes on a GPU too (a quick run of the whole table)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if cuda:
        device, dtype, shapes = "cuda", torch.bfloat16, GPU_SHAPES if args.shapes == "auto" else CPU_SHAPES
        import triton
        where = f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"
    else:
        os.environ.setdefault("MINIRESTORE_KERNELS", "auto")  # CPU tensors: the reference path
        device, dtype, shapes = "cpu", torch.float32, CPU_SHAPES
        where = f"NO GPU PRESENT: CPU smoke run (reference path, fp32, tiny shapes), torch {torch.__version__}"
    print(where)
    torch.manual_seed(0)
    rows = []
    for kind, fn in (("attention", attention_rows), ("prompted", prompted_rows), ("prologue", prologue_rows),
                     ("kv_prologue", kv_prologue_rows)):
        if args.only in (None, kind.split("_")[-1]):  # --only prologue runs both prologues
            rows += fn(shapes[kind], dtype, device, cuda)
    lines = table(rows)
    print("\n".join(lines))
    print("\nspeed-up of minirestore over each baseline (higher is better):")
    print("\n".join(ratios(rows)))
    choices = []
    if cuda:
        choices = ["", "Configs the autotuner chose:", ""] + tuned_choices()
        print("\n".join(choices))
    if not cuda:
        print("\nNo GPU was present: these are CPU reference timings, not results for the Triton kernels.")
    if cuda or args.write:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        header = f"\n## {stamp} - {where}\n\nCommand: `{' '.join([os.path.basename(sys.executable)] + sys.argv)}`\n\n"
        if not cuda:
            header += "**CPU smoke run: not GPU results.**\n\n"
        with open(args.results, "a") as f:
            f.write(header + "\n".join(lines) + "\n\nSpeed-ups:\n\n```\n" + "\n".join(ratios(rows)) + "\n```\n"
                    + "\n".join(choices) + "\n" * bool(choices))
        print(f"appended to {args.results}")


if __name__ == "__main__":
    main()
