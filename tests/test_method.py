"""The method end to end on a small FLUX-shaped backbone: train.py -> prompt file -> sample.py.

The backbone folder is built here with random weights and the official key names (BFL transformer,
BFL autoencoder, a cached context), and loaded through the real loaders.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minirestore import UserError
from minirestore.backbone import load_backbone
from minirestore.bridge import Bridge
from minirestore.prompts import load_prompt

ROOT = Path(__file__).resolve().parents[1]
def run(script, *args, cwd):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_backbone_loads_and_prompt_enters(backbone_dir):
    bb = load_backbone(backbone_dir)
    assert bb.name == "test-flux" and bb.K == 6 and bb.D == 32 and bb.n_blocks == 2 and bb.multiple == 4
    img = torch.rand(2, 3, 16, 20)
    z = bb.encode(img)
    assert z.shape == (2, 16, 8, 10)
    tau = torch.tensor([0.3, 0.2])
    bank = bb.new_prompt(torch.Generator().manual_seed(0))
    v0 = bb.velocity(z, tau)
    assert torch.equal(bb.velocity(z, tau, bank), v0)  # alpha = 0: exactly the frozen model
    with torch.no_grad():
        bank.alpha.fill_(0.5)
    assert not torch.allclose(bb.velocity(z, tau, bank), v0)


def test_training_lowers_the_loss_on_held_out_images(backbone_dir, images_dir, tmp_path):
    """A short EBR run: the x0 loss of held-out images at fixed (t, eps) falls below the frozen model's."""
    r = run("train.py", "--model", backbone_dir, "--data", images_dir, "--degradation", "noise", "--t0", "0.6",
            "--resolution", "16", "--steps", "40", "--batch-size", "2", "--lr", "0.05", "--val-every", "0",
            "--val-count", "2", "--val-steps", "3", "--out", tmp_path / "p.safetensors", "--run-dir", tmp_path / "run",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    val = [rec for rec in log if "val_loss" in rec]
    train = [rec["loss"] for rec in log if "loss" in rec]
    assert len(train) == 40 and [rec["step"] for rec in val] == [0, 40]
    assert val[-1]["val_loss"] < 0.9 * val[0]["val_loss"], val
    bank = load_prompt(tmp_path / "p.safetensors", backbone="test-flux")
    assert bank.meta["degradation"] == "noise" and float(bank.meta["T0"]) == 0.6 and bank.meta["steps"] == "40"
    assert float(bank.meta["pow"]) == 1.0  # the time skew is recorded, so a prompt file says how to retrain it
    assert bank.alpha.abs().sum() > 0
    assert (tmp_path / "run" / "preview-000040.png").exists()


def test_cosine_schedule_decays_the_rate_and_is_recorded(backbone_dir, images_dir, tmp_path):
    """--lr-schedule cosine: step k of n runs at lr (1 + cos(pi k / n)) / 2 (read back from the log), the prompt
    file records the schedule, and the trained prompt differs from the constant-rate one."""
    common = ["--model", backbone_dir, "--data", images_dir, "--resolution", "16", "--batch-size", "1", "--lr", "0.05",
              "--steps", "4", "--val-every", "0", "--val-count", "1", "--val-steps", "2"]
    for schedule in ("constant", "cosine"):
        r = run("train.py", *common, "--lr-schedule", schedule, "--out", tmp_path / f"{schedule}.safetensors",
                "--run-dir", tmp_path / schedule, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    log = [json.loads(line) for line in (tmp_path / "cosine" / "log.jsonl").read_text().splitlines()]
    rates = [rec["lr"] for rec in log if "lr" in rec]
    assert rates == pytest.approx([0.05, 0.05 * 0.8535534, 0.025, 0.05 * 0.1464466])
    const, cos = (load_prompt(tmp_path / f"{s}.safetensors") for s in ("constant", "cosine"))
    assert const.meta["lr_schedule"] == "constant" and cos.meta["lr_schedule"] == "cosine"
    assert not torch.allclose(const.prompt, cos.prompt)


def test_resume_matches_an_uninterrupted_run(backbone_dir, images_dir, tmp_path):
    common = ["--model", backbone_dir, "--data", images_dir, "--resolution", "16", "--batch-size", "1",
              "--lr", "0.01", "--val-count", "1", "--val-steps", "2"]
    r = run("train.py", *common, "--steps", "6", "--val-every", "0", "--out", tmp_path / "full.safetensors",
            "--run-dir", tmp_path / "full", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # stop after 3 steps (a checkpoint is written at every validation), then resume to 6
    r = run("train.py", *common, "--steps", "3", "--val-every", "0", "--out", tmp_path / "half.safetensors",
            "--run-dir", tmp_path / "part", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run("train.py", *common, "--steps", "6", "--val-every", "0", "--resume", "--out", tmp_path / "resumed.safetensors",
            "--run-dir", tmp_path / "part", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout
    a, b = load_prompt(tmp_path / "full.safetensors"), load_prompt(tmp_path / "resumed.safetensors")
    assert torch.equal(a.prompt, b.prompt) and torch.equal(a.alpha, b.alpha)


def test_sample_round_trip_and_bad_inputs(backbone_dir, images_dir, tmp_path):
    r = run("train.py", "--model", backbone_dir, "--data", images_dir, "--resolution", "16", "--steps", "2",
            "--val-every", "0", "--val-count", "1", "--val-steps", "2", "--run-dir", tmp_path / "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    prompt = tmp_path / "weights" / "test-flux-noise.safetensors"  # the default output name
    assert prompt.exists()
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray((np.random.default_rng(1).random((19, 23, 4)) * 255).astype(np.uint8), "RGBA").save(src / "a.png")
    Image.fromarray((np.random.default_rng(2).random((17, 13)) * 255).astype(np.uint8), "L").save(src / "b.png")
    r = run("sample.py", src, "--model", backbone_dir, "--steps", "3", cwd=tmp_path)  # default prompt from weights/
    assert r.returncode == 0, r.stderr
    a, b = Image.open(src / "a_restored.png"), Image.open(src / "b_restored.png")
    assert (a.size, a.mode, b.size, b.mode) == ((23, 19), "RGBA", (13, 17), "L")

    def fails(*args, match):
        before = sorted(p.name for p in src.iterdir())
        r = run("sample.py", *args, cwd=tmp_path)
        assert r.returncode != 0 and match in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith("error: "), r.stderr
        assert sorted(p.name for p in src.iterdir()) == before  # nothing written

    fails(src / "missing.png", "--model", backbone_dir, "--prompt", prompt, match="no such file")
    (src / "broken.png").write_bytes(b"not a png")
    fails(src / "broken.png", "--model", backbone_dir, "--prompt", prompt, match="not a readable image")
    (src / "broken.png").unlink()
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(empty, "--model", backbone_dir, "--prompt", prompt, match="no images")
    fails(src / "a.png", "--model", backbone_dir, "--prompt", prompt, "--t0", "1.5", match="--t0 must be in (0, 1]")
    other = tmp_path / "other.safetensors"
    bank = load_prompt(prompt)
    from minirestore.prompts import save_prompt
    save_prompt(bank, other, backbone="flux-dev")
    fails(src / "a.png", "--model", backbone_dir, "--prompt", other, match="trained for the backbone flux-dev")


def test_bad_training_flags(backbone_dir, tmp_path):
    r = run("train.py", "--model", backbone_dir, "--t0", "0", cwd=tmp_path)
    assert r.returncode != 0 and "--t0 must be in (0, 1]" in r.stderr
    r = run("train.py", "--model", backbone_dir, "--data", tmp_path / "nope", cwd=tmp_path)
    assert r.returncode != 0 and "no such folder" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(UserError, match="not a backbone folder"):
        load_backbone(tmp_path)


def test_ebr_sampler_with_the_ideal_velocity_restores_exactly(backbone_dir):
    """Wiring check: Bridge.sample on backbone latents returns X0 when fed the ideal velocity."""
    bb = load_backbone(backbone_dir)
    X0, Y = bb.encode(torch.rand(1, 3, 16, 16)), bb.encode(torch.rand(1, 3, 16, 16))
    bridge = Bridge("ebr", 0.6)
    out = bridge.sample(lambda x, tau: (x - X0) / tau.view(-1, 1, 1, 1), Y, steps=5)
    torch.testing.assert_close(out, X0, atol=1e-4, rtol=1e-4)


def ctrl_c_as_in_a_terminal():
    """preexec_fn of a child that must stop on SIGINT: the default disposition (Python then raises
    KeyboardInterrupt) and SIGINT unblocked, whatever the test process had."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(backbone_dir, images_dir, tmp_path):
    import signal
    import time

    args = [sys.executable, str(ROOT / "train.py"), "--model", str(backbone_dir), "--data", str(images_dir),
            "--resolution", "16", "--steps", "100000", "--val-every", "0", "--val-count", "1", "--val-steps", "1",
            "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "p.safetensors")]
    # The child inherits SIGINT ignored (a suite started with `&` by a shell without job control) or blocked (by a
    # library thread earlier in the suite): give it Ctrl-C as a terminal would, default handler and unblocked.
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ctrl_c_as_in_a_terminal)
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or log.read_text().count('"loss"') < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at step" in out and "--resume" in out
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert 3 <= state["step"] < 100000 and not (tmp_path / "p.safetensors").exists()
    args[args.index("--steps") + 1] = str(state["step"] + 2)
    r = subprocess.run(args + ["--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert load_prompt(tmp_path / "p.safetensors").meta["steps"] == str(state["step"] + 2)
