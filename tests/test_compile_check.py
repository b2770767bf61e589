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


def test_check_sees_a_spilling_config():
    """A config left out of the lists because it spills (fwd M128 N64 with 4 warps) is reported as one."""
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import compile_check as cc, torch;"
            "args = cc.attention_args(torch.bfloat16, 128, 4608, 4608);"
            "meta = dict(PRECISION='tf32', BLOCK_M=128, BLOCK_N=64, **cc.flash.head_meta(128));"
            "r = cc.compile_one(('flash', '_fwd', args, meta, 4, 3, 90)); print(r['spill'], r['regs'], r['error'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    spill, regs, error = r.stdout.split()[-3:]
    assert error == "None" and int(spill) > 0 and int(regs) == 255
