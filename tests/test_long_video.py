"""Long videos (long_video.py): overlapping temporal windows blended in latent space, frames streamed from and
to disk; one window covering the clip is exactly the unwindowed restore, and memory does not grow with length."""
import sys
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from minirestore import UserError
from minirestore.backbone import load_backbone
from minirestore.bridge import Bridge
from minirestore.long_video import plan_windows, ramp, restore_stream
from minirestore.video import read_video
from test_wan_method import ROOT, run, wan_dir  # noqa: F401  (the tiny Wan backbone folder fixture)

sys.path.insert(0, str(ROOT))
from sample import restore  # noqa: E402


def moving_clip(T, H=32, W=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(3, H, W + T, generator=g)
    return torch.stack([base[:, :, t:t + W] for t in range(T)]).clamp(0, 1)  # [T, 3, H, W]


@pytest.mark.parametrize("n,k,o", [(11, 10, 2), (11, 4, 1), (21, 8, 2), (12, 3, 1), (3, 8, 4)])
def test_windows_cover_the_clip_with_overlap(n, k, o):
    starts = plan_windows(n, k, o)
    assert starts[0] == 0 and starts[-1] + k >= n - 1
    covered = set(range(0, min(k, n - 1) + 1))
    for a, b in zip(starts, starts[1:]):
        assert b > a and a + k - b >= o  # shared blended latents b+1 .. a+k
        covered |= set(range(b + 1, b + k + 1))
    assert covered == set(range(n))


def test_ramp():
    assert torch.equal(ramp(5, 0, 0), torch.ones(5))
    w = ramp(6, 2, 1)
    assert (w > 0).all() and w[0] < w[1] < w[2] == 1 and w[-1] < 1


def test_bad_window_flags():
    with pytest.raises(UserError, match="4k\\+1"):
        restore_stream(None, [], None, iter([]), 5, print, window=40)
    with pytest.raises(UserError, match="multiple of 4"):
        restore_stream(None, [], None, iter([]), 5, print, window=41, overlap=6)


class Frames:
    """Frames handed out one at a time (as from disk), counting how many are still alive in memory."""

    def __init__(self, clip):
        self.clip, self.alive, self.most = clip, 0, 0

    def _gone(self):
        self.alive -= 1

    def __iter__(self):
        for f in self.clip:
            f = f.clone()
            self.alive += 1
            self.most = max(self.most, self.alive)
            weakref.finalize(f, self._gone)
            yield f


def windowed(bb, bank, bridge, clip, window, overlap, stats=None):
    out = []
    frames = Frames(clip)
    restore_stream(bb, [bank], bridge, frames, len(clip), out.append, steps=2, seed=3, window=window,
                   overlap=overlap, stats=stats)
    return torch.cat(out), frames


def test_one_window_is_the_unwindowed_restore(wan_dir):  # noqa: F811
    bb = load_backbone(wan_dir)
    bank = bb.new_prompt(torch.Generator().manual_seed(0))
    with torch.no_grad():
        bank.alpha.fill_(0.5)
        bank.prompt.mul_(3)
    bridge = Bridge("ebr", 0.5)
    clip = moving_clip(41, 30, 40)  # sides not multiples of 16: padded and cropped back
    whole = restore(bb, [bank], bridge, clip, 2, seed=3)
    out, _ = windowed(bb, bank, bridge, clip, window=41, overlap=8)
    assert out.shape == clip.shape == whole.shape
    torch.testing.assert_close(out, whole, atol=1e-5, rtol=0)
    out, _ = windowed(bb, bank, bridge, clip, window=81, overlap=16)  # a window longer than the clip: the same
    torch.testing.assert_close(out, whole, atol=1e-5, rtol=0)


def test_memory_does_not_grow_with_the_clip(wan_dir):  # noqa: F811
    bb = load_backbone(wan_dir)
    bank = bb.new_prompt(torch.Generator().manual_seed(0))
    bridge = Bridge("ebr", 0.5)
    held = []
    for T in (41, 79):  # 79 frames: padded to 81 and cut back
        clip = moving_clip(T, 16, 16)
        stats = {}
        out, frames = windowed(bb, bank, bridge, clip, window=9, overlap=4, stats=stats)
        assert out.shape == clip.shape and torch.isfinite(out).all() and 0 <= out.min() and out.max() <= 1
        held.append((stats["frames_held"], stats["latents_held"], frames.most))
    assert held[0] == held[1]  # the same whatever the length
    frames_held, latents_held, alive = held[0]
    assert frames_held == 9 and latents_held <= 2 * 3 and alive <= 9 + 1


def test_sample_restores_a_long_clip_in_windows(wan_dir, tmp_path):  # noqa: F811
    from minirestore.prompts import save_prompt

    bb = load_backbone(wan_dir)
    save_prompt(bb.new_prompt(torch.Generator().manual_seed(1)), tmp_path / "p.safetensors", backbone=bb.name, T0=0.4)
    clip = tmp_path / "clip"
    clip.mkdir()
    for t, f in enumerate(moving_clip(23, 16, 32)):
        Image.fromarray((f.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(clip / f"{t:03d}.png")
    r = run("sample.py", clip, "--model", wan_dir, "--prompt", tmp_path / "p.safetensors", "--steps", "2",
            "--window", "9", "--window-overlap", "4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out, fps = read_video(tmp_path / "clip_restored")
    assert out.shape == (23, 3, 16, 32) and fps == 16
    r = run("sample.py", clip, "--model", wan_dir, "--prompt", tmp_path / "p.safetensors", "--window", "10",
            cwd=tmp_path)
    assert r.returncode == 2 and "4k+1" in r.stderr
