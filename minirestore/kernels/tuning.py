"""Tile configs and autotuning of the attention kernels (flash.py, prompted.py).

Each kernel has its own (BLOCK_M, BLOCK_N, warps, stages) list per GPU generation, because the tile
roles differ (the forward and dQ stream keys past a query tile, dK/dV streams queries past a key tile)
and because sm_80 has no warpgroup MMA and fewer registers to spare. On sm_90 some configs also switch
the kernels' TMA constexpr (tiles copied by the tensor memory accelerator through tensor descriptors)
and, in the forward, WS (a warp-specialised key loop); they are left out for inputs a descriptor cannot
read (tma_ok). `choose()` is what the autotuner may pick on a given GPU; benchmarks/compile_check.py
compiles exactly that set offline.
"""
import inspect
import os
from typing import NamedTuple

import torch
import triton

# Decided at import like triton.jit itself: under the interpreter one fixed small tile config,
# on a GPU autotuning over the configs below (the interpreter cannot autotune).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634


class Tile(NamedTuple):
    """One autotune candidate. tma: the streamed tiles come by TMA (tensor descriptors, sm_90 and newer);
    ws: the forward's key loop is warp-specialised (a producer warp issues the copies; needs tma)."""
    block_m: int
    block_n: int
    warps: int
    stages: int
    tma: bool = False
    ws: bool = False


TMA, WS = True, True  # for the config tuples below: (BLOCK_M, BLOCK_N, warps, stages, TMA, WS)

# (BLOCK_M, BLOCK_N, num_warps, num_stages[, TMA[, WS]]) per kernel and GPU generation, for 16-bit inputs.
# Chosen with `python benchmarks/compile_check.py` (bf16 and fp16, D 64 and 128): none spills registers
# and each fits the generation's shared memory. sm_80 (A100; also used for sm_86/89, pruned by their
# smaller shared memory) has no warpgroup MMA and runs out of registers with the larger dK/dV tiles.
# The sm_90 lists end with TMA twins of their likeliest tiles (and, for the forward, warp-specialised
# ones); the autotuner measures them against the pointer loads, so they only win where they are faster.
CONFIGS = {
    "fwd": {90: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3), (64, 128, 8, 3),
                 (128, 128, 8, 2, TMA), (128, 64, 8, 3, TMA), (128, 128, 4, 2, TMA, WS), (128, 64, 4, 3, TMA, WS)],
            80: [(128, 64, 8, 2), (128, 64, 8, 4), (64, 64, 4, 4), (64, 32, 4, 4)]},
    "dkdv": {90: [(32, 128, 8, 3), (32, 128, 8, 2), (64, 64, 8, 3), (32, 64, 4, 3), (16, 128, 8, 3),
                  (32, 128, 8, 3, TMA), (64, 128, 8, 3, TMA), (64, 128, 8, 2, TMA)],
             80: [(64, 64, 8, 3), (16, 128, 8, 3), (32, 64, 4, 2), (16, 64, 4, 3)]},
    "dq": {90: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 8, 3), (64, 128, 8, 2),
                (128, 64, 8, 3, TMA), (128, 128, 8, 2, TMA), (64, 128, 8, 2, TMA)],
           80: [(32, 128, 8, 3), (64, 32, 4, 4), (32, 64, 4, 3)]},
    # the prompted kernels keep two accumulators (base and prompted) in registers
    "prompted_fwd": {90: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 8, 3), (64, 128, 8, 2),
                          (128, 64, 8, 3, TMA), (64, 128, 8, 2, TMA)],
                     80: [(128, 32, 8, 3), (64, 64, 8, 3), (64, 128, 8, 2)]},
    "prompted_dq": {90: [(128, 32, 8, 3), (128, 32, 8, 2), (64, 64, 8, 3), (64, 128, 8, 2), (64, 32, 4, 3),
                         (128, 32, 8, 3, TMA), (128, 64, 8, 2, TMA), (64, 64, 8, 3, TMA)],
                    80: [(32, 128, 8, 3), (64, 32, 4, 4), (32, 64, 4, 3)]},
}
# fp32 inputs: one pinned config per kernel, for both generations. 3xTF32 dots keep three products per
# tile in registers; these are the largest tiles that did not spill (and one config compiles in seconds,
# where autotuning fp32 over every config would spend minutes compiling).
FP32 = {"fwd": (32, 32, 8, 2), "dkdv": (16, 16, 4, 2), "dq": (16, 32, 4, 2),
        "prompted_fwd": (32, 32, 8, 2), "prompted_dq": (16, 32, 4, 2)}
# the tuples above as Tiles
CONFIGS = {kind: {gen: [Tile(*c) for c in configs] for gen, configs in gens.items()} for kind, gens in CONFIGS.items()}
FP32 = {kind: Tile(*c) for kind, c in FP32.items()}
# The interpreter's one config (it cannot autotune): small tiles, fast and ragged-friendly. The tests swap in
# a TMA (and warp-specialised) one to run those paths through the interpreter too.
INTERPRET_TILE = Tile(64, 64, 4, 1)


def block_d(D):
    return max(16, triton.next_power_of_2(D))  # tl.dot needs >= 16 on the reduced dim


def precision(dtype):
    # fp32 must not silently drop to TF32 (10-bit mantissa). 3xTF32 splits each operand into a TF32 high
    # part and a TF32 remainder and sums three tensor-core products: about fp32 accuracy (relative error
    # near 1e-6 on unit-normal data, against ~1e-3 for plain TF32) at tensor-core speed. The interpreter
    # computes fp32 dots exactly, whatever the precision.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def shared_bytes(kind, tile, block_d, elem):
    """Shared memory a config needs, an upper estimate: the tiles each loop iteration streams times the
    pipeline stages, plus the tiles staged once for the dots, plus 1 KB (and 16 KB more when warp-specialised,
    as compiled by triton 3.9). It matches the sm_90 compile check within 1 KB and exceeds every sm_80 figure
    (which keeps fewer buffers in flight)."""
    block_m, block_n, stages = tile.block_m, tile.block_n, tile.stages
    if kind.endswith("fwd"):  # stream k, v; q staged
        need = elem * block_d * (2 * stages * block_n + block_m)
    elif kind == "dkdv":  # stream q, dO (and the fp32 LSE, delta); k, v staged
        need = elem * block_d * (2 * stages * block_m + 2 * block_n) + 8 * stages * block_m
    else:  # dq: stream k, v; q, dO staged
        need = elem * block_d * (2 * stages * block_n + 2 * block_m)
    if tile.ws:
        need += 16384
    return need + 1024


def tma_ok(*tensors):
    """Whether TMA tensor descriptors can read these [..., L, D] tensors: unit channel stride, base address and
    every other stride 16-byte aligned (as the hardware requires), and a triton that has descriptors."""
    return hasattr(triton.language, "make_tensor_descriptor") and all(
        t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])
        for t in tensors)


def shared_limit(device=None):
    """Shared memory per block on this GPU (sm_90 about 227 KB, sm_80 163 KB, sm_86/89 99 KB)."""
    props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
    return getattr(props, "shared_memory_per_block_optin", 0) or 101376


def generation(major):
    """The CONFIGS column for a compute capability major version: 90 (Hopper and newer) or 80."""
    return 90 if major >= 9 else 80


def choose(kind, dtype, block_d_, arch, limit, tma=True):
    """The configs (Tiles) the autotuner may pick for this kernel, dtype and head dim on a GPU of compute
    capability `arch` (e.g. 90) with `limit` bytes of shared memory per block; `tma`: whether the inputs
    suit TMA (tma_ok), else the TMA configs are left out."""
    if dtype == torch.float32:
        return [FP32[kind]]
    elem = torch.empty((), dtype=dtype).element_size()
    configs = [c for c in CONFIGS[kind][generation(arch // 10)] if tma or not c.tma]
    need = lambda c: shared_bytes(kind, c, block_d_, elem)  # noqa: E731
    return [c for c in configs if need(c) <= limit] or [min(configs, key=need)]


def constexprs_of(tile, fn):
    """A Tile as the launch arguments of kernel `fn` (WS only where the kernel has that switch)."""
    meta = dict(BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, TMA=tile.tma)
    if "WS" in fn.arg_names:
        meta["WS"] = tile.ws
    return meta


def tuned(kernel, kind, key):
    """Autotune `kernel` on a GPU over CONFIGS[kind] (pruned per dtype, head dim, shared memory and whether the
    inputs suit TMA); unchanged under the interpreter. `key` lists bucketed lengths and TMA_OK, so a new
    resolution rarely re-tunes and unaligned inputs never reuse a TMA config."""
    if INTERPRET:
        return kernel
    as_config = lambda t: triton.Config(constexprs_of(t, kernel), num_warps=t.warps, num_stages=t.stages)  # noqa: E731

    def prune(configs, nargs, **kwargs):
        q = nargs["Q"]
        major, minor = torch.cuda.get_device_capability(q.device)
        keep = choose(kind, q.dtype, kwargs["BLOCK_D"], 10 * major + minor, shared_limit(q.device), kwargs["TMA_OK"])
        keep = [as_config(t) for t in keep]
        return [c for c in configs if any(c.all_kwargs() == k.all_kwargs() for k in keep)]

    configs = [as_config(t) for t in dict.fromkeys(CONFIGS[kind][90] + CONFIGS[kind][80] + [FP32[kind]])]
    extra = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    kernel = triton.autotune(configs, key=key + ["TMA_OK"], prune_configs_by={"early_config_prune": prune},
                             **extra)(kernel)
    kernel.kind = kind  # for launch()'s forced configs
    return kernel


def bucket(n):
    """An autotune key for a length: its next power of two (4608 and 4096 < n <= 8192 share one tuning)."""
    return triton.next_power_of_2(n)


def _workspace(size, alignment, stream):
    """Global memory for the tensor descriptors that TMA kernels build on the device (triton.set_allocator)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def launch(kernel, grid, *args, TMA_OK, **constexprs):
    """kernel[grid](...) with the interpreter's fixed tile when it is not autotuned. TMA_OK: whether the
    inputs suit TMA (tma_ok), passed on to the kernel for the autotuner's key and pruning.
    MINIRESTORE_KERNELS_CONFIG=i (read at every call) bypasses the autotuner on a GPU and runs the i-th
    config it may choose (modulo their number), so the GPU tests can run every config once."""
    tile = None
    if not isinstance(kernel, triton.runtime.Autotuner):
        tile = INTERPRET_TILE if TMA_OK or not INTERPRET_TILE.tma else INTERPRET_TILE._replace(tma=False, ws=False)
    elif os.environ.get("MINIRESTORE_KERNELS_CONFIG"):
        q = args[0]
        major, minor = torch.cuda.get_device_capability(q.device)
        configs = choose(kernel.kind, q.dtype, constexprs["BLOCK_D"], 10 * major + minor, shared_limit(q.device),
                         TMA_OK)
        tile = configs[int(os.environ["MINIRESTORE_KERNELS_CONFIG"]) % len(configs)]
        kernel = kernel.fn
    if tile is not None:
        constexprs.update(constexprs_of(tile, kernel), num_warps=tile.warps, num_stages=tile.stages)
    if args[0].is_cuda:
        triton.set_allocator(_workspace)  # per thread (a context variable): autograd's backward runs in its own
    kernel[grid](*args, TMA_OK=int(TMA_OK), **constexprs)
