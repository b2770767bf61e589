"""The prepared device script (benchmarks/gpu.sh) in its --dry-run mode: every part, tiny shapes, the CPU.

So that the script the first GPU will run cannot rot: each part must finish (status ok in summary.txt),
and the output folder must stay within what a device run may bring back (8 files, 16 MiB each).
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["env", "compile", "tests", "kernels", "flux", "wan", "pretrain"]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_script_dry_run(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=os.environ.get("PYTHON", "python"))
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run"], capture_output=True, text=True,
                       env=env, timeout=900)
    summary = (out / "summary.txt").read_text()
    assert r.returncode == 0, summary + r.stdout[-4000:] + r.stderr[-2000:]
    status = {line.split()[0]: line.split()[1] for line in summary.splitlines()[:len(PARTS)]}  # one line a part
    assert [p for p in PARTS if status.get(p) != "ok"] == [], summary
    assert "0 part(s) failed" in summary and "images/s" in summary
    files = list(out.iterdir())
    assert len(files) <= 8 and all(f.stat().st_size < 16 * 2**20 for f in files)
    assert {"summary.txt", "log.txt", "kernels.md", "method.md", "pretrain.txt"} <= {f.name for f in files}
    method = (out / "method.md").read_text()
    assert "model tiny " in method and "model tiny-wan" in method and "5 frames" in method
    assert "configs compiled: 0 spill, 0 over shared memory" in (out / "log.txt").read_text()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_pretrain_script_dry_run(tmp_path, fake_photos):
    """benchmarks/gpu_pretrain.sh --dry-run: packs the photo cache, unpacks it as the GPU machine would, pre-trains
    a small model for a few seconds under bf16 autocast and a time budget, evaluates it and the shipped one."""
    from minirestore.backbone import load_backbone
    from minirestore.photos import read_list

    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=os.environ.get("PYTHON", "python"), PACK=str(tmp_path / "no-pack"))
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_pretrain.sh"), "--dry-run"], capture_output=True,
                       text=True, env=env, timeout=600)
    log = (out / "log.txt").read_text()
    assert r.returncode == 0, log[-4000:] + r.stderr[-2000:]
    files = [f for f in out.rglob("*") if f.is_file()]
    assert len(files) <= 8 and all(f.stat().st_size < 16 * 2**20 for f in files), files  # what a device run returns
    assert {"log.txt", "eval.json", "samples.png"} <= {f.name for f in out.iterdir()}
    assert "--time-budget 4 s:" in log and "shipped weights/tiny" in log and "new (width 32)" in log
    assert load_backbone(out / "tiny").model.config.hidden_size == 32
    packed = sum(r.split != "test" for r in read_list())  # train and val travel; test photographs never do
    assert f"{packed} photographs unpacked" in log
