"""Tile configs and autotuning of the attention kernels (flash.py, prompted.py).

Each kernel has its own (BLOCK_M, BLOCK_N, warps, stages) list per GPU generation, because the tile
roles differ (the forward and dQ stream keys past a query tile, dK/dV streams queries past a key tile)
and because sm_80 has no warpgroup MMA and fewer registers to spare. `choose()` is what the autotuner
may pick on a given GPU; benchmarks/compile_check.py compiles exactly that set offline.
"""
import inspect
import os

import torch
import triton

# Decided at import like triton.jit itself: under the interpreter one fixed small tile config,
# on a GPU autotuning over the configs below (the interpreter cannot autotune).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and GPU generation, for 16-bit inputs. Chosen
# with `python benchmarks/compile_check.py` (bf16 and fp16, D 64 and 128): none spills registers and
# each fits the generation's shared memory. sm_80 (A100; also used for sm_86/89, pruned by their
# smaller shared memory) has no warpgroup MMA and runs out of registers with the larger dK/dV tiles.
CONFIGS = {
    "fwd": {90: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3), (64, 128, 8, 3)],
            80: [(128, 64, 8, 2), (128, 64, 8, 4), (64, 64, 4, 4), (64, 32, 4, 4)]},
    "dkdv": {90: [(32, 128, 8, 3), (32, 128, 8, 2), (64, 64, 8, 3), (32, 64, 4, 3), (16, 128, 8, 3)],
             80: [(64, 64, 8, 3), (16, 128, 8, 3), (32, 64, 4, 2), (16, 64, 4, 3)]},
    "dq": {90: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 8, 3), (64, 128, 8, 2)],
           80: [(32, 128, 8, 3), (64, 32, 4, 4), (32, 64, 4, 3)]},
    # the prompted kernels keep two accumulators (base and prompted) in registers
    "prompted_fwd": {90: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 8, 3), (64, 128, 8, 2)],
                     80: [(128, 32, 8, 3), (64, 64, 8, 3), (64, 128, 8, 2)]},
    "prompted_dq": {90: [(128, 32, 8, 3), (128, 32, 8, 2), (64, 64, 8, 3), (64, 128, 8, 2), (64, 32, 4, 3)],
                    80: [(32, 128, 8, 3), (64, 32, 4, 4), (32, 64, 4, 3)]},
}
# fp32 inputs: one pinned config per kernel, for both generations. 3xTF32 dots keep three products per
# tile in registers; these are the largest tiles that did not spill (and one config compiles in seconds,
# where autotuning fp32 over every config would spend minutes compiling).
FP32 = {"fwd": (32, 32, 8, 2), "dkdv": (16, 16, 4, 2), "dq": (16, 32, 4, 2),
        "prompted_fwd": (32, 32, 8, 2), "prompted_dq": (16, 32, 4, 2)}
# The interpreter's one config (it cannot autotune): small tiles, fast and ragged-friendly.
INTERPRET_BLOCKS = dict(BLOCK_M=64, BLOCK_N=64)


def block_d(D):
    return max(16, triton.next_power_of_2(D))  # tl.dot needs >= 16 on the reduced dim


def precision(dtype):
    # fp32 must not silently drop to TF32 (10-bit mantissa). 3xTF32 splits each operand into a TF32 high
    # part and a TF32 remainder and sums three tensor-core products: about fp32 accuracy (relative error
    # near 1e-6 on unit-normal data, against ~1e-3 for plain TF32) at tensor-core speed. The interpreter
    # computes fp32 dots exactly, whatever the precision.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def shared_bytes(kind, block_m, block_n, block_d, stages, elem):
    """Shared memory a config needs, an upper estimate: the tiles each loop iteration streams times the
    pipeline stages, plus the tiles staged once for the dots, plus 1 KB. It matches the sm_90 compile
    check within 1 KB and exceeds every sm_80 figure (which keeps fewer buffers in flight)."""
    if kind.endswith("fwd"):  # stream k, v; q staged
        need = elem * block_d * (2 * stages * block_n + block_m)
    elif kind == "dkdv":  # stream q, dO (and the fp32 LSE, delta); k, v staged
        need = elem * block_d * (2 * stages * block_m + 2 * block_n) + 8 * stages * block_m
    else:  # dq: stream k, v; q, dO staged
        need = elem * block_d * (2 * stages * block_n + 2 * block_m)
    return need + 1024


def shared_limit(device=None):
    """Shared memory per block on this GPU (sm_90 about 227 KB, sm_80 163 KB, sm_86/89 99 KB)."""
    props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
    return getattr(props, "shared_memory_per_block_optin", 0) or 101376


def generation(major):
    """The CONFIGS column for a compute capability major version: 90 (Hopper and newer) or 80."""
    return 90 if major >= 9 else 80


def choose(kind, dtype, block_d_, arch, limit):
    """The configs the autotuner may pick for this kernel, dtype and head dim on a GPU of compute capability
    `arch` (e.g. 90) with `limit` bytes of shared memory per block."""
    if dtype == torch.float32:
        return [FP32[kind]]
    elem = torch.empty((), dtype=dtype).element_size()
    configs = CONFIGS[kind][generation(arch // 10)]
    need = lambda c: shared_bytes(kind, c[0], c[1], block_d_, c[3], elem)  # noqa: E731
    return [c for c in configs if need(c) <= limit] or [min(configs, key=need)]


def tuned(kernel, kind, key):
    """Autotune `kernel` on a GPU over CONFIGS[kind] (pruned per dtype, head dim and shared memory);
    unchanged under the interpreter. `key` lists bucketed lengths, so a new resolution rarely re-tunes."""
    if INTERPRET:
        return kernel
    as_config = lambda m, n, w, s: triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)  # noqa: E731

    def prune(configs, nargs, **kwargs):
        q = nargs["Q"]
        major, minor = torch.cuda.get_device_capability(q.device)
        keep = set(choose(kind, q.dtype, kwargs["BLOCK_D"], 10 * major + minor, shared_limit(q.device)))
        return [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in keep]

    configs = [as_config(*c) for c in dict.fromkeys(CONFIGS[kind][90] + CONFIGS[kind][80] + [FP32[kind]])]
    extra = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    kernel = triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune}, **extra)(kernel)
    kernel.kind = kind  # for launch()'s forced configs
    return kernel


def bucket(n):
    """An autotune key for a length: its next power of two (4608 and 4096 < n <= 8192 share one tuning)."""
    return triton.next_power_of_2(n)


def launch(kernel, grid, *args, **constexprs):
    """kernel[grid](...) with the interpreter's fixed tiles when it is not autotuned.
    MINIRESTORE_KERNELS_CONFIG=i (read at every call) bypasses the autotuner on a GPU and runs the i-th
    config it may choose (modulo their number), so the GPU tests can run every config once."""
    if not isinstance(kernel, triton.runtime.Autotuner):
        constexprs.update(INTERPRET_BLOCKS, num_warps=4)
    elif os.environ.get("MINIRESTORE_KERNELS_CONFIG"):
        q = args[0]
        major, minor = torch.cuda.get_device_capability(q.device)
        configs = choose(kernel.kind, q.dtype, constexprs["BLOCK_D"], 10 * major + minor, shared_limit(q.device))
        m, n, warps, stages = configs[int(os.environ["MINIRESTORE_KERNELS_CONFIG"]) % len(configs)]
        kernel = kernel.fn
        constexprs.update(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)
    kernel[grid](*args, **constexprs)
