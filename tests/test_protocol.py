"""--protocol ypt against the release's equations: the scheduler time lookup, posterior sampling, the
start-noise generator and the sampler (an oracle written from paper.md section 6, not our Bridge),
resizing, uint8 truncation, and the posterior stream's order across a resumed evaluation."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minirestore import protocol
from minirestore.backbone import load_backbone
from minirestore.bridge import Bridge
from minirestore.evaluate import main as evaluate
from minirestore.restore import restore
from test_evaluate import make_pairs, make_prompt

ROOT = Path(__file__).resolve().parents[1]


def test_flux_time_is_the_nearest_flowmatch_timestep():
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    s.set_timesteps(1000, mu=None, sigmas=None)
    t = torch.cat([torch.linspace(0.4, 1e-4, 20), torch.rand(200, generator=torch.Generator().manual_seed(0))])
    # the release (utils.py): nearest of scheduler.sigmas, clamped to the last timestep, fed as timestep / 1000
    k = (s.sigmas.view(1, -1) - t.view(-1, 1)).abs().argmin(dim=1).clamp(max=len(s.timesteps) - 1)
    assert torch.equal(protocol.scheduler_time("flux", t), s.timesteps[k].float() / 1000.0)
    assert protocol.scheduler_time("flux", torch.tensor([0.4, 1e-4])).tolist() == pytest.approx([0.4, 0.001])


def test_wan_time_is_unipc_integer_timesteps():
    # diffusers 0.33.1 UniPC with flow sigmas (flow_shift 1): sigma_i = 1 - alpha for alphas
    # linspace(1, 1/1000, 1001), largest first, the 0 dropped; timesteps int64(1000 sigma); terminal sigma 0
    alphas = np.linspace(1, 1 / 1000, 1001)
    sig = (1.0 - alphas)[::-1][:-1]
    steps = (sig * 1000).astype(np.int64)
    sigmas = np.append(sig, 0.0).astype(np.float32)
    t = torch.cat([torch.linspace(0.4, 1e-4, 20), torch.rand(200, generator=torch.Generator().manual_seed(1))])
    k = np.abs(sigmas[None, :] - t.numpy()[:, None]).argmin(axis=1).clip(max=999)
    got = protocol.scheduler_time("wan", t)
    assert torch.equal((got * 1000).float(), torch.from_numpy(steps[k]).float())  # integers, exactly
    assert (got[[0, 19]] * 1000).tolist() == [399, 0]  # the anchors: 399 at T0 0.4, 0 at t_min


def test_wan_backbone_receives_the_integer_timestep(monkeypatch):
    from test_wan_method import WAN, VAE  # noqa: F401
    from minirestore.wan import WanModel

    seen = []
    model = WanModel(WAN)
    monkeypatch.setattr(model, "forward", lambda x, t, ctx, prompt=None: seen.append(t) or torch.zeros_like(x))
    from minirestore.backbone import Backbone

    bb = Backbone("w", "wan", model, None, {"context": torch.zeros(1, 8, 24)})
    monkeypatch.setattr(model, "precompute_context", lambda c: c)
    tau = protocol.scheduler_time("wan", torch.linspace(0.4, 1e-4, 1000))
    bb.velocity(torch.zeros(1000, 16, 1, 2, 2), tau)
    assert torch.equal(seen[0], seen[0].round()) and seen[0][0] == 399


def test_posterior_sampling_is_diffusers_latent_dist_sample(backbone_dir):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    bb = load_backbone(backbone_dir)
    x = torch.rand(2, 3, 16, 20)
    moments = bb.vae.encoder(x * 2 - 1)
    c = bb.vae.config
    ref = c.scale_factor * (DiagonalGaussianDistribution(moments).sample(torch.Generator().manual_seed(5)) - c.shift_factor)
    assert torch.equal(bb.encode(x, generator=torch.Generator().manual_seed(5)), ref)
    assert torch.equal(bb.encode(x), c.scale_factor * (moments[:, :16] - c.shift_factor))  # native: the mean


def released_sampler(velocity, Y, steps, T0, t_min):
    """YPT utils.py ebr_custom_multistep_sample, from paper.md section 6 (fp32 grid, generator seeded 42)."""
    ts = torch.linspace(T0, t_min, steps, dtype=torch.float32)
    g = torch.Generator(device=Y.device).manual_seed(42)
    X = (1 - T0) * Y + T0 * torch.randn(Y.shape, generator=g, device=Y.device, dtype=Y.dtype)
    for i in range(steps - 1):
        t, tn = ts[i], ts[i + 1]
        x0 = X - t * velocity(X, t)
        A, B = (1 - t) * (t / T0), t  # X = (1 - t)(1 - t/T0) x0 + A Y + B eps
        eps = (X - (1 - t) * (1 - t / T0) * x0 - A * Y) / torch.clamp(B, min=max(t_min, 1e-6))
        X = (1 - tn) * ((1 - tn / T0) * x0 + (tn / T0) * Y) + tn * eps
    return X - ts[-1] * velocity(X, ts[-1])


def test_restore_under_ypt_is_the_released_pipeline(backbone_dir, tmp_path):
    bb = load_backbone(backbone_dir)
    bank = bb.new_prompt(torch.Generator().manual_seed(0))
    with torch.no_grad():
        bank.alpha.fill_(0.5)
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(3))
    stream = protocol.PosteriorStream("cpu")
    out = restore(bb, [bank], Bridge("ebr", 0.4, 1e-4), x, 5, seed=0, ypt=stream)

    # the oracle: its own posterior generator (seed 123), nearest-timestep lookup, sampler and decode
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(1000)
    Y = bb.encode(x[None], generator=torch.Generator().manual_seed(123))

    def velocity(X, t):
        k = (sched.sigmas - t).abs().argmin().clamp(max=999)
        return bb.velocity(X, (sched.timesteps[k] / 1000.0).view(1), bank)

    ref = ((bb.vae.decode(released_sampler(velocity, Y, 5, 0.4, 1e-4)).clamp(-1, 1) + 1) * 0.5)[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)  # the grid: our float64 linspace vs fp32
    native = restore(bb, [bank], Bridge("ebr", 0.4, 1e-4), x, 5, seed=0)
    assert (native - out).abs().max() > 1e-3  # the protocol does change the output


def test_resize_truncation_and_jpeg(tmp_path):
    a = (np.random.default_rng(0).random((30, 50, 3)) * 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": the release does not apply it
    Image.fromarray(a).save(tmp_path / "a.jpg", exif=exif)
    x = protocol.load_resized(tmp_path / "a.jpg", (40, 40))  # any aspect -> exactly (H, W)
    ref = np.asarray(Image.open(tmp_path / "a.jpg").convert("RGB").resize((40, 40), Image.BICUBIC), dtype=np.float32) / 255
    assert x.shape == (3, 40, 40) and torch.equal(x, torch.from_numpy(ref).permute(2, 0, 1))
    v = torch.tensor([0.0, 0.999 / 255, 1.6 / 255, 254.99 / 255, 1.0, 1.2])
    assert protocol.to_uint8(v).tolist() == [0, 0, 1, 254, 255, 255]  # (x * 255).byte(): truncation
    assert protocol.to_uint8(v, round=True).tolist() == [0, 1, 2, 255, 255, 255]
    protocol.save_jpeg(x, tmp_path / "o.jpg")
    im = Image.open(tmp_path / "o.jpg")
    assert im.format == "JPEG" and im.size == (40, 40)
    assert protocol.metric_view(x[None]).shape == (1, 3, 512, 512)


@pytest.fixture
def small_ypt(monkeypatch):
    """The release's sizes shrunk so that a random tiny backbone runs them on the CPU."""
    monkeypatch.setitem(protocol.SIZES, "flux", (24, 32))
    monkeypatch.setattr(protocol, "METRIC_SIZE", 16)


def test_evaluate_ypt_resumes_with_each_items_own_noise(backbone_dir, images_dir, tmp_path, small_ypt):
    """The posterior stream follows the list: items restored after a resume (or by another rank) get the
    noise of their place, so the rows equal an uninterrupted run's."""
    pairs = make_pairs(images_dir, tmp_path / "pairs", count=3)
    prompt = make_prompt(backbone_dir, tmp_path / "p.safetensors")
    args = [str(pairs), "--model", str(backbone_dir), "--prompt", str(prompt), "--protocol", "ypt", "--steps", "2",
            "--metrics", "psnr,ssim", "--save"]
    assert evaluate([*args, "--out", str(tmp_path / "full")]) == 0
    full = (tmp_path / "full" / "rows.jsonl").read_text().splitlines()
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "rows.jsonl").write_text(full[0] + "\n")  # as if stopped after the first item
    (tmp_path / "part" / "settings.json").write_bytes((tmp_path / "full" / "settings.json").read_bytes())
    assert evaluate([*args, "--out", str(tmp_path / "part")]) == 0
    part = (tmp_path / "part" / "rows.jsonl").read_text().splitlines()
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k != "output"}  # noqa: E731
    assert [strip(r) for r in part] == [strip(r) for r in full]
    rows = [json.loads(r) for r in full]
    assert all(r["T0"] == 0.4 for r in rows)  # the release samples from T0 0.4
    out = Image.open(rows[0]["output"])
    assert out.format == "JPEG" and out.size == (32, 24)


def test_sample_ypt_writes_the_release_size_as_jpeg(backbone_dir, images_dir, tmp_path, small_ypt, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    sys.modules.pop("sample", None)
    import sample

    prompt = make_prompt(backbone_dir, tmp_path / "p.safetensors")
    src = images_dir / "img0.png"  # 24 x 20
    assert sample.main([str(src), "--model", str(backbone_dir), "--prompt", str(prompt), "--protocol", "ypt",
                        "--steps", "2", "--out", str(tmp_path)]) == 0
    im = Image.open(tmp_path / "img0_restored.jpg")
    assert im.format == "JPEG" and im.size == (32, 24)
