"""Scale-out through torchrun on the CPU (gloo): the same prompt, the same files, clean failures."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minirestore.prompts import load_prompt

ROOT = Path(__file__).resolve().parents[1]


def run(nproc, script, *args, cwd):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = (launcher if nproc > 1 else [sys.executable]) + [str(ROOT / script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_two_processes_learn_the_same_prompt_as_one(backbone_dir, images_dir, tmp_path):
    """Global batch 2 = 1 process x 2 images = 2 processes x 1 image: the same prompt to fp32 rounding."""
    common = ["--model", backbone_dir, "--data", images_dir, "--resolution", "16", "--steps", "4", "--lr", "0.02",
              "--val-every", "0", "--val-count", "2", "--val-steps", "2", "--seed", "3"]
    one = run(1, "train.py", *common, "--batch-size", "2", "--out", tmp_path / "one.safetensors",
              "--run-dir", tmp_path / "one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    two = run(2, "train.py", *common, "--batch-size", "1", "--out", tmp_path / "two.safetensors",
              "--run-dir", tmp_path / "two", cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    a, b = load_prompt(tmp_path / "one.safetensors"), load_prompt(tmp_path / "two.safetensors")
    assert b.meta["world_size"] == "2"
    assert not torch.equal(a.alpha, torch.zeros_like(a.alpha))  # it did train
    torch.testing.assert_close(b.prompt, a.prompt, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.alpha, a.alpha, rtol=1e-5, atol=1e-6)
    # validation metrics are reduced across ranks: both runs report the same numbers
    last = lambda d: [line for line in (d / "log.jsonl").read_text().splitlines() if "val_loss" in line][-1]  # noqa: E731
    import json
    m1, m2 = json.loads(last(tmp_path / "one")), json.loads(last(tmp_path / "two"))
    assert abs(m1["val_loss"] - m2["val_loss"]) < 1e-4 * abs(m1["val_loss"]) and abs(m1["psnr"] - m2["psnr"]) < 1e-3
    # only rank 0 writes: one log line per step
    assert sum('"loss"' in line for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()) == 4


def test_two_processes_restore_a_folder_like_one(backbone_dir, images_dir, tmp_path):
    r = run(1, "train.py", "--model", backbone_dir, "--data", images_dir, "--resolution", "16", "--steps", "2",
            "--val-every", "0", "--val-count", "1", "--val-steps", "2", "--out", tmp_path / "p.safetensors",
            "--run-dir", tmp_path / "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    outs = {}
    for n in (1, 2):
        r = run(n, "sample.py", images_dir, "--model", backbone_dir, "--prompt", tmp_path / "p.safetensors",
                "--steps", "2", "--out", tmp_path / f"out{n}", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        outs[n] = {p.name: np.asarray(Image.open(p)) for p in sorted((tmp_path / f"out{n}").iterdir())}
    assert sorted(outs[1]) == sorted(outs[2]) == sorted(f"{p.stem}_restored.png" for p in images_dir.iterdir())
    for name in outs[1]:
        assert np.array_equal(outs[1][name], outs[2][name]), name


def test_a_crashing_rank_stops_the_run_and_keeps_the_checkpoint(backbone_dir, images_dir, tmp_path):
    """A training image that fails to decode kills the rank that draws it; the run ends with its message and
    the last checkpoint (written atomically at every validation) still loads. (A file that is no image at all
    is refused before training, test_cli; a truncated one passes that header check and fails when decoded.)"""
    data = tmp_path / "data"
    data.mkdir()
    for p in images_dir.iterdir():
        (data / p.name).write_bytes(p.read_bytes())
    whole = (images_dir / "img0.png").read_bytes()
    (data / "zz_broken.png").write_bytes(whole[:len(whole) // 2])  # a PNG cut in half
    r = run(2, "train.py", "--model", backbone_dir, "--data", data, "--resolution", "16", "--steps", "40",
            "--val-every", "1", "--val-count", "2", "--val-steps", "1", "--run-dir", tmp_path / "run",
            "--out", tmp_path / "p.safetensors", cwd=tmp_path)
    assert r.returncode != 0
    assert "zz_broken.png: not a readable image" in r.stderr and "error: [rank " in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "p.safetensors").exists()
    ckpt = tmp_path / "run" / "checkpoint.pt"
    if ckpt.exists():  # the broken image may be drawn before the first checkpoint
        state = torch.load(ckpt, weights_only=True)
        assert 1 <= state["step"] < 40
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]
