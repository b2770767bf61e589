"""Offline compile check: every Triton kernel at every config its autotuner may choose, built for
sm_90 (H100/H200) and sm_80 (A100) on a machine without a GPU, with Triton's compiler and ptxas.

    python benchmarks/compile_check.py                                  # everything (about 7 min, 2 cores)
    python benchmarks/compile_check.py --arch 90 --dtype bf16 --head-dim 128   # the CI subset

Per kernel and config it prints shared memory (from the compiled kernel), registers and spill bytes
(cuobjdump -res-usage on the cubin: STACK + LOCAL bytes > 0 is a spill) and the tensor-core path found
in the PTX (wgmma = Hopper warpgroup MMA, mma = mma.sync, none = CUDA-core FMA), plus how tiles are copied
(TMA = cp.async.bulk.tensor, cp.async, or plain loads) and, for warp-specialised configs, whether the
compiler split the kernel into partitions (ttg.warp_specialize in the TTGIR; "+ws" in the copies column).
A config labelled tma (or ws) whose code lacks it counts as a failure too.
The configs are those tuning.choose() leaves for the arch's shared memory, dtype and head dim, i.e.
what the autotuner may pick at run time. The argument specialisation is the JIT's own (16-byte
aligned pointers and strides, unit strides as constants) for the models' shapes: FLUX joint attention
(H24 L4608) and Wan cross-attention (Lq 32760, Lk 226). The last line is
`N configs compiled: S spill, X over shared memory`; the exit status is 1 if S or X is non-zero.
Compiled kernels land in Triton's cache (~/.triton/cache), so a rerun of unchanged kernels is fast.
Nothing here runs a kernel: it says nothing about speed, only about what the compiler produced.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)  # must be unset before triton.jit decorates the kernels
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is the default
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from minirestore.kernels import flash, prologue, prompted, tuning  # noqa: E402

SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory per block (opt-in maximum)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def specialise(fn, args, constexprs):
    """The signature, constants and attributes the JIT would build for these argument values."""
    from triton._C.libtriton import native_specialize_impl
    signature, constants, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        ty, spec = native_specialize_impl(BaseBackend, args[name], False, True, True)
        signature[name] = ty
        if ty == "constexpr":  # an integer argument equal to 1 (unit strides) becomes a constant
            constants[name] = spec
        elif spec == "D":  # divisible by 16: pointers and strides the JIT marks aligned
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constants, attrs


def resources(cubin):
    """(registers, spill bytes) from cuobjdump -res-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", out))
    return int(fields["REG"]), int(fields["STACK"]) + int(fields["LOCAL"])


def compile_one(job):
    """Compile one kernel specialisation; returns a result row (a dict)."""
    module, fn_name, args, constexprs, warps, stages, arch = job
    fn = kernel_fn(module, fn_name)
    start = time.time()
    try:
        signature, constants, attrs = specialise(fn, args, constexprs)
        kernel = triton.compile(ASTSource(fn, signature, constexprs=constants, attrs=attrs),
                                target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))
        regs, spill = resources(kernel.asm["cubin"])
        ptx = kernel.asm["ptx"]
        tc = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "none"
        copies = "TMA" if "cp.async.bulk.tensor" in ptx else "cp.async" if "cp.async" in ptx else "-"
        copies += "+ws" * ("ttg.warp_specialize" in kernel.asm["ttgir"])
        return dict(shared=kernel.metadata.shared, regs=regs, spill=spill, tc=tc, copies=copies,
                    seconds=time.time() - start, error=None)
    except Exception as e:  # noqa: BLE001 - a config that does not compile is a finding, not a crash
        return dict(shared=0, regs=0, spill=0, tc="-", copies="-", seconds=time.time() - start,
                    error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:120] if str(e).strip() else ''}")


def kernel_fn(module, name):
    return getattr({"flash": flash, "prompted": prompted, "prologue": prologue}[module], name)


def tile_label(tile):
    return f"M{tile.block_m} N{tile.block_n} w{tile.warps} s{tile.stages}" + " tma" * tile.tma + " ws" * tile.ws


def tensor(dtype):
    return torch.empty(64, dtype=dtype)  # only dtype and alignment matter to the specialisation


def strides(B, H, L, D):
    return (H * L * D, L * D, D, 1)  # a contiguous [B, H, L, D] tensor


def attention_args(dtype, D, Lq, Lk, H=24, Lk_p=None):
    """Named argument values of the attention kernels, for contiguous [B, H, L, D] inputs."""
    t, f32 = tensor(dtype), tensor(torch.float32)
    args = dict(Q=t, K=t, V=t, O=t, DO=t, DQ=t, DK=t, DV=t, KP=t, VP=t, OP=t, LSE=f32, LSE_P=f32, Delta=f32,
                Delta_P=f32, ALPHA=f32, DO_SCALE=f32, H=H, Lq=Lq, Lk=Lk, Lk_p=Lk_p or Lk, D=D, qk_scale=0.1,
                sm_scale=0.1, LQ_KEY=triton.next_power_of_2(Lq), LK_KEY=triton.next_power_of_2(Lk),
                LKP_KEY=triton.next_power_of_2(Lk_p or Lk), TMA_OK=1)
    for prefix, L in (("q", Lq), ("k", Lk), ("v", Lk), ("o", Lq), ("do", Lq), ("dq", Lq), ("kp", Lk_p or Lk),
                      ("vp", Lk_p or Lk), ("dk", Lk), ("dv", Lk)):
        for axis, s in zip("bhld", strides(1, H, L, D)):
            args[f"s{prefix}_{axis}"] = s
    args["sdk_s"] = args["sdv_s"] = H * Lk * D  # the query-chunk axis of the split dK/dV partials
    # dK/dV partials are fp32 when the queries are split (short key sets): take that case for Lk < 1024
    if Lk < 1024:
        args["DK"] = args["DV"] = f32
    args["CHUNK"] = 3072
    return args


def attention_jobs(dtype_name, D, arch):
    """(label, kind, module, kernel, args, constexprs) for every attention kernel at one dtype and head dim."""
    dtype = DTYPES[dtype_name]
    flux = attention_args(dtype, D, 4608, 4608)
    wan = attention_args(dtype, D, 32760, 226, H=12, Lk_p=226)
    meta = dict(PRECISION=tuning.precision(dtype), **flash.head_meta(D))
    kernels = [("attention fwd", "fwd", "flash", "_fwd", flux, {}),
               ("attention dK/dV", "dkdv", "flash", "_bwd_dkdv", flux, dict(HAS_DO_SCALE=False)),
               ("attention dQ", "dq", "flash", "_bwd_dq", flux, {}),
               ("prompted fwd", "prompted_fwd", "prompted", "_prompted_fwd", wan, dict(STORE_OP=True)),
               ("prompted dK/dV (alpha, split)", "dkdv", "flash", "_bwd_dkdv", wan, dict(HAS_DO_SCALE=True)),
               ("prompted dQ", "prompted_dq", "prompted", "_prompted_bwd_dq", wan, {})]
    jobs = []
    for label, kind, module, name, args, extra in kernels:
        for tile in tuning.choose(kind, dtype, meta["BLOCK_D"], arch, SHARED_LIMIT[arch]):
            constexprs = dict(meta, **tuning.constexprs_of(tile, kernel_fn(module, name)), **extra)
            jobs.append((label, tile_label(tile), (module, name, args, constexprs, tile.warps, tile.stages, arch)))
    pre = dict(BLOCK_M=64, BLOCK_D=tuning.block_d(D))
    jobs.append(("bwd preprocess", "M64 w4", ("flash", "_bwd_preprocess", flux, pre, 4, 3, arch)))
    return jobs


def prologue_jobs(dtype_name, D, arch):
    """The prologues' one config each: FLUX qkv (H24 L4608, 512 prompt rows) and Wan kv (L226 C1536)."""
    t, f32 = tensor(DTYPES[dtype_name]), tensor(torch.float32)
    H, L, C = 24, 4608, 3 * 24 * D
    qkv = dict(QKV=t, RES=t, ALPHA=f32, WQ=t, WK=t, PE=f32, Q=t, K=t, V=t, DQ=t, DK=t, DV=t, DQKV=t, DRES=f32,
               DALPHA=f32, DWQ=f32, DWK=f32, s_b=L * C, s_l=C, sr_b=0, sr_l=C, spe_b=0, spe_l=D * 2,
               sdx_b=L * C, sdx_l=C, sdr_b=512 * C, sdr_l=C, H=H, L=L, K_rows=512, D=D, eps=1e-6)
    for p in ("o", "dq", "dk", "dv"):
        qkv.update({f"s{p}_b": H * L * D, f"s{p}_h": L * D, f"s{p}_l": D, f"s{p}_d": 1})
    block_l, block_c = prologue._kv_tiles(1536)
    kv = dict(KR=t, RK=t, VR=t, RV=t, W=f32, KP=t, VP=t, DKP=t, DX=f32, DW=f32, L=226, C=1536, eps=1e-6)
    for name in ("s_kr", "s_rk", "s_vr", "s_rv", "s_o", "s_dkp", "s_dx"):
        kv.update({f"{name}_b": 226 * 1536, f"{name}_l": 1536})
    kv["s_dkp_c"] = 1
    pro = dict(HAS_RES=True, HAS_PE=True, BLOCK_L=prologue.BLOCK_L, BLOCK_D=tuning.block_d(D))
    kvc = dict(BLOCK_L=block_l, BLOCK_C=block_c)
    return [("qkv prologue fwd", "L32 w4", ("prologue", "_fwd", qkv, pro, 4, 3, arch)),
            ("qkv prologue bwd", "L32 w4", ("prologue", "_bwd", qkv, pro, 4, 3, arch)),
            ("kv prologue fwd", f"L{block_l} w8", ("prologue", "_kv_fwd", kv, kvc, 8, 3, arch)),
            ("kv prologue bwd", f"L{block_l} w8", ("prologue", "_kv_bwd", kv, kvc, 8, 3, arch))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, nargs="+", choices=sorted(SHARED_LIMIT), default=[90, 80])
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--head-dim", type=int, nargs="+", choices=[64, 128], default=[64, 128])
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    p.add_argument("--no-prologues", action="store_true", help="attention kernels only")
    args = p.parse_args(argv)

    rows = []  # (arch, dtype, D, label, config, job)
    for arch in args.arch:
        for dtype in args.dtype:
            for D in args.head_dim:
                jobs = attention_jobs(dtype, D, arch)
                if not args.no_prologues and dtype != "fp32":
                    jobs += prologue_jobs(dtype, D, arch)
                rows += [(arch, dtype, D, label, config, job) for label, config, job in jobs]
    print(f"triton {triton.__version__}: compiling {len(rows)} kernel configs with {args.workers} workers", flush=True)
    header = (f"{'arch':>5} {'dtype':5} {'D':>4}  {'kernel':30} {'config':22} {'shared KB':>9} {'regs':>4} "
              f"{'spill B':>7} {'tensor cores':12} {'copies':12} {'s':>5}")
    print(header)
    spills = over = failed = 0
    wanted = {"TMA": 0, "ws": 0}  # configs asking for TMA / warp specialisation
    missing = {"TMA": 0, "ws": 0}  # ... whose code lacks it
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        for (arch, dtype, D, label, config, _), r in zip(rows, pool.map(compile_one, [row[5] for row in rows])):
            too_big = r["shared"] > SHARED_LIMIT[arch]
            spills += r["spill"] > 0
            over += too_big
            failed += r["error"] is not None
            lacks = []
            for name, asked, got in (("TMA", " tma" in config, r["copies"].startswith("TMA")),
                                     ("ws", config.endswith(" ws"), r["copies"].endswith("+ws"))):
                wanted[name] += asked
                if asked and not got and r["error"] is None:
                    missing[name] += 1
                    lacks.append(name)
            flag = " SPILL" * (r["spill"] > 0) + " OVER SHARED" * too_big + "".join(f" NO {n}" for n in lacks)
            line = (f"sm_{arch} {dtype:5} {D:4}  {label:30} {config:22} {r['shared'] / 1024:9.1f} {r['regs']:4} "
                    f"{r['spill']:7} {r['tc']:12} {r['copies']:12} {r['seconds']:5.1f}{flag}")
            print(line + (f"  FAILED {r['error']}" if r["error"] else ""), flush=True)
    if failed:
        print(f"{failed} configs failed to compile")
    print(f"TMA configs: {wanted['TMA']}, {missing['TMA']} without cp.async.bulk.tensor; warp-specialised: "
          f"{wanted['ws']}, {missing['ws']} not split into partitions")
    print(f"{len(rows) - failed} configs compiled: {spills} spill, {over} over shared memory")
    return 1 if spills or over or failed or sum(missing.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
