"""The offline compile check (benchmarks/compile_check.py): its CI subset, and that it sees a spill.

The kernels are compiled for sm_90 with Triton's bundled ptxas, on the CPU; nothing runs. Skipped
only where that toolchain is missing (no triton, or a triton without its NVIDIA backend binaries).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _ptxas_works():
    try:
        return subprocess.run([str(BIN / "ptxas"), "--version"], capture_output=True).returncode == 0
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not (_ptxas_works() and (BIN / "cuobjdump").exists()),
                                reason=f"no working ptxas/cuobjdump in {BIN}")


def env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest sets it; compiling needs it unset


def test_ci_subset_bf16_d128_sm90_compiles_without_spills():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_check.py"), "--arch", "90",
                        "--dtype", "bf16", "--head-dim", "128"], capture_output=True, text=True, env=env(),
                       timeout=900)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = re.fullmatch(r"(\d+) configs compiled: (\d+) spill, (\d+) over shared memory", lines[-1])
    assert m and int(m[1]) >= 30 and m[2] == m[3] == "0", lines[-1]
    rows = [line for line in lines if line.startswith("sm_90 bf16")]
    assert len(rows) == int(m[1])
    attention = [line for line in rows if "attention" in line or "prompted" in line]
    assert attention and all(" wgmma " in line for line in attention), "a 16-bit attention kernel without wgmma"
    # the sm_90 TMA configs (every attention kernel has some) copy by cp.async.bulk.tensor; the warp-specialised
    # forward configs are split into partitions
    tma = [line for line in attention if " tma " in line]
    kernels = {re.match(r"sm_90 bf16\s+128\s+(.+?)\s+M\d+ N", line)[1] for line in tma}
    assert kernels == {"attention fwd", "attention dK/dV", "attention dQ", "prompted fwd",
                       "prompted dK/dV (alpha, split)", "prompted dQ"}, kernels
    assert all(" TMA" in line for line in tma) and any(" ws " in line and "TMA+ws" in line for line in tma)
    assert re.fullmatch(r"TMA configs: \d+, 0 without cp.async.bulk.tensor; warp-specialised: \d+, 0 not split "
                        r"into partitions", lines[-2]), lines[-2]


def test_check_sees_a_spilling_config():
    """A config left out of the lists because it spills (fwd M128 N64 with 4 warps) is reported as one."""
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import compile_check as cc, torch;"
            "args = cc.attention_args(torch.bfloat16, 128, 4608, 4608);"
            "meta = dict(PRECISION='tf32', BLOCK_M=128, BLOCK_N=64, TMA=False, WS=False, **cc.flash.head_meta(128));"
            "r = cc.compile_one(('flash', '_fwd', args, meta, 4, 3, 90)); print(r['spill'], r['regs'], r['error'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    spill, regs, error = r.stdout.split()[-3:]
    assert error == "None" and int(spill) > 0 and int(regs) == 255


def test_autotuner_prunes_to_the_chosen_configs():
    """The GPU-only autotuner set-up, on the CPU: every kernel keeps exactly tuning.choose()'s configs for an
    sm_90 GPU (TMA ones only for inputs that suit TMA), and its key holds TMA_OK."""
    code = """
import torch
from minirestore.kernels import flash, prompted, tuning
torch.cuda.get_device_capability = lambda device=None: (9, 0)
tuning.shared_limit = lambda device=None: 232448
for kernel in (flash._fwd_tuned, flash._bwd_dkdv_tuned, flash._bwd_dq_tuned, prompted._prompted_fwd_tuned,
               prompted._prompted_bwd_dq_tuned):
    assert 'TMA_OK' in kernel.keys, kernel.keys
    for ok in (1, 0):
        kept = kernel.early_config_prune(kernel.configs, {'Q': torch.empty(1, dtype=torch.bfloat16)},
                                         BLOCK_D=128, TMA_OK=ok)
        got = {tuning.Tile(c.kwargs['BLOCK_M'], c.kwargs['BLOCK_N'], c.num_warps, c.num_stages, c.kwargs['TMA'],
                           c.kwargs.get('WS', False)) for c in kept}
        want = set(tuning.choose(kernel.kind, torch.bfloat16, 128, 90, 232448, ok))
        assert got == want and len(kept) == len(want), (kernel.kind, ok, got ^ want)
        assert any(t.tma for t in got) == bool(ok), (kernel.kind, ok)
print('ok')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env(), timeout=300)
    assert r.returncode == 0 and r.stdout.split()[-1] == "ok", r.stdout[-2000:] + r.stderr[-3000:]
