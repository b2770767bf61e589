"""The method on a small Wan-shaped backbone: images and clips through train.py / sample.py, and the
official release's Wan prompt checkpoints imported and used."""
import json
import subprocess
import sys
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import _randomise
from minirestore.backbone import load_backbone
from minirestore.context import save_context
from minirestore.prompts import load_prompt
from minirestore.wan import WanConfig, WanModel
from minirestore.wan_vae import WanVAE, WanVAEConfig

ROOT = Path(__file__).resolve().parents[1]
WAN = WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_len=8, text_dim=24)
VAE = WanVAEConfig(dim=4)


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("wan")
    model = _randomise(WanModel(WAN), 10)
    save_file(model.state_dict(), d / "wan.safetensors", metadata={"minirestore_config": json.dumps(asdict(WAN))})
    vae = _randomise(WanVAE(VAE), 11)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, d / "vae.safetensors")
    context = torch.zeros(1, 8, 24)
    context[:, :2] = torch.randn(1, 2, 24, generator=torch.Generator().manual_seed(12))  # 2 real tokens, zero padding
    save_context(d / "context.safetensors", {"context": context}, {"backbone": "test-wan"})
    return d


def run(script, *args, cwd):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_wan_backbone_images_and_clips(wan_dir):
    bb = load_backbone(wan_dir)
    assert (bb.kind, bb.name, bb.K, bb.D, bb.n_blocks, bb.multiple) == ("wan", "test-wan", 8, 32, 2, 16)
    img = torch.rand(2, 3, 32, 48)
    z = bb.encode(img)
    assert z.shape == (2, 16, 1, 4, 6)
    assert bb.decode(z).shape == (2, 3, 32, 48)  # a one-frame clip comes back as an image
    clip = torch.rand(1, 3, 5, 32, 32)
    zc = bb.encode(clip)
    assert zc.shape == (1, 16, 2, 4, 4) and bb.decode(zc).shape == (1, 3, 5, 32, 32)
    bank = bb.new_prompt(torch.Generator().manual_seed(0))
    tau = torch.tensor([0.3])
    v0 = bb.velocity(zc, tau)
    assert torch.equal(bb.velocity(zc, tau, bank), v0)  # alpha = 0: the frozen model
    with torch.no_grad():
        bank.alpha.fill_(1.0)
    assert not torch.allclose(bb.velocity(zc, tau, bank), v0)


def _official_wan_prompt(path, K=8, D=32, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.save({"backend": "wan", "deep_prompt_bank": OrderedDict(prompts=torch.randn(1, K, D, generator=g) * 0.1),
                "alphas": [torch.tensor(0.3), torch.tensor(-0.2)][:n]}, path)


def test_imported_prompts_restore_clips_and_images(wan_dir, tmp_path):
    _official_wan_prompt(tmp_path / "wan_haze.pt")
    r = subprocess.run([sys.executable, "-m", "minirestore.prompts", "import", tmp_path / "wan_haze.pt",
                        tmp_path / "haze.safetensors"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # The imported prompt names the real backbone; retag it for this small one, as a user's own would be.
    bank = load_prompt(tmp_path / "haze.safetensors")
    assert bank.meta["backbone"] == "wan2.1-t2v-1.3b" and bank.meta["degradation"] == "haze"
    from minirestore.prompts import save_prompt
    save_prompt(bank, tmp_path / "haze.safetensors", backbone="test-wan")

    frames = tmp_path / "clip"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):  # 6 frames: padded to 9 for the VAE, cut back to 6
        Image.fromarray((rng.random((20, 30, 3)) * 255).astype(np.uint8)).save(frames / f"{i:03d}.png")
    (frames / "fps.txt").write_text("12\n")
    Image.fromarray((rng.random((17, 21, 3)) * 255).astype(np.uint8)).save(tmp_path / "still.png")
    r = run("sample.py", frames, tmp_path / "still.png", "--model", wan_dir, "--prompt", tmp_path / "haze.safetensors",
            "--steps", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "clip_restored"
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".png") == [f"{i:05d}.png" for i in range(6)]
    assert (out / "fps.txt").read_text().strip() == "12"
    assert Image.open(out / "00000.png").size == (30, 20)
    assert Image.open(tmp_path / "still_restored.png").size == (21, 17)


def test_train_on_images_with_wan(wan_dir, images_dir, tmp_path):
    r = run("train.py", "--model", wan_dir, "--data", images_dir, "--resolution", "16", "--steps", "3",
            "--val-every", "0", "--val-count", "1", "--val-steps", "2", "--out", tmp_path / "p.safetensors",
            "--run-dir", tmp_path / "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    bank = load_prompt(tmp_path / "p.safetensors", backbone="test-wan", D=32, n_blocks=2)
    assert bank.prompt.shape == (1, 8, 32)


def test_flux_refuses_clips(backbone_dir, tmp_path):
    (tmp_path / "v.mp4").write_bytes(b"")
    from minirestore.prompts import PromptBank, save_prompt
    save_prompt(PromptBank(6, 32, 2), tmp_path / "p.safetensors", backbone="test-flux")
    r = run("sample.py", tmp_path / "v.mp4", "--model", backbone_dir, "--prompt", tmp_path / "p.safetensors", cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr


def test_train_on_clip_folder_with_wan(wan_dir, tmp_path):
    """Clean clips (frame folders) degraded consistently across frames; 5-frame windows at 16x16."""
    data = tmp_path / "clips"
    rng = np.random.default_rng(1)
    for c in range(3):
        d = data / f"clip{c}"
        d.mkdir(parents=True)
        base = rng.random((24, 28, 3))
        for i in range(7):
            frame = np.clip(np.roll(base, i, axis=1) * 0.8 + 0.1, 0, 1)
            Image.fromarray((frame * 255).astype(np.uint8)).save(d / f"{i:03d}.png")
    r = run("train.py", "--model", wan_dir, "--data", data, "--degradation", "blur+noise", "--resolution", "16",
            "--frames", "5", "--steps", "2", "--val-every", "0", "--val-count", "1", "--val-steps", "2",
            "--out", tmp_path / "p.safetensors", "--run-dir", tmp_path / "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert load_prompt(tmp_path / "p.safetensors").meta["degradation"] == "blur+noise"
    assert (tmp_path / "run" / "preview-000002.png").exists()
    r = run("train.py", "--model", wan_dir, "--data", data, "--frames", "6", "--steps", "1", cwd=tmp_path)
    assert r.returncode != 0 and "4k+1" in r.stderr and "Traceback" not in r.stderr


def test_clip_dataset_is_consistent_across_frames(tmp_path):
    from minirestore.data import ClipFolder

    d = tmp_path / "c" / "a"
    d.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(d / f"{i}.png")
    ds = ClipFolder(tmp_path / "c", "noise", resolution=8, frames=5, train=False)
    item = ds[0]
    assert item["clean"].shape == (3, 5, 8, 8) and item["degraded"].shape == (3, 5, 8, 8)
    noise = item["degraded"] - item["clean"]
    assert not torch.allclose(noise[:, 0], noise[:, 1])  # fresh noise per frame
    assert torch.equal(ds[0]["degraded"], item["degraded"])  # validation items are fixed


def test_sample_restores_an_mp4(wan_dir, tmp_path):
    pytest.importorskip("av")
    from minirestore.prompts import PromptBank, save_prompt
    from minirestore.video import read_video, write_video

    frames = torch.rand(5, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    write_video(frames, tmp_path / "clip.mp4", fps=10)
    save_prompt(PromptBank(8, 32, 2), tmp_path / "p.safetensors", backbone="test-wan", T0=0.4)
    r = run("sample.py", tmp_path / "clip.mp4", "--model", wan_dir, "--prompt", tmp_path / "p.safetensors",
            "--steps", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out, fps = read_video(tmp_path / "clip_restored.mp4")
    assert out.shape == (5, 3, 32, 48) and abs(fps - 10) < 1e-6


def test_an_animated_gif_is_a_clip_with_wan(wan_dir, tmp_path):
    from minirestore.data import load_frames
    from minirestore.prompts import PromptBank, save_prompt

    rng = np.random.default_rng(4)
    frames = [Image.fromarray((rng.random((20, 30, 3)) * 255).astype(np.uint8)) for _ in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=[30, 60, 90], loop=0)
    save_prompt(PromptBank(8, 32, 2), tmp_path / "p.safetensors", backbone="test-wan", T0=0.4)
    r = run("sample.py", tmp_path / "anim.gif", "--model", wan_dir, "--prompt", tmp_path / "p.safetensors",
            "--steps", "2", "--out", tmp_path / "out" / "clean.webp", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "3 frames -> 5 (4k+1)" in r.stdout  # one clip through the video VAE, padded and cut back
    out, info = load_frames(tmp_path / "out" / "clean.webp")
    assert out.shape == (3, 3, 20, 30) and info["durations"] == [30, 60, 90]
