"""The replication benchmark (benchmarks/replicate.py) and its baselines (classical.py, dncnn.py).

Classical filters: each one, at a sensible or validation-tuned strength, measurably restores the degradation
it is meant for; the median filter matches scipy's. The DnCNN is the identity before training and learns.
The replication itself runs end to end at smoke scale on random backbones (its numbers mean nothing there):
every row and column is in the table, every number is finite, the grids are written, and a rerun reuses the
cached prompts and DnCNN instead of training. The token-space baseline starts exactly at the frozen model.
"""
import copy
import importlib.util
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minirestore.degrade import blur, haze, noise
from minirestore.metrics import psnr
from minirestore.procedural import dead_leaves

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


replicate = load("replicate")  # puts benchmarks/ on sys.path: classical and dncnn are the modules it uses
classical, dncnn = sys.modules["classical"], sys.modules["dncnn"]


def smooth_images(n, size=32, seed=0):
    """Smooth colourful images [n, 3, size, size] in [0.1, 0.9]: sums of low-frequency sinusoids."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    f = 1 + 2 * torch.rand(n, 3, 2, 1, 1, generator=g)
    phase = 6.28 * torch.rand(n, 3, 1, 1, generator=g)
    return 0.5 + 0.2 * torch.sin(f[:, :, 0] * 3 * xx + phase) + 0.2 * torch.cos(f[:, :, 1] * 3 * yy)


def leaves(n, size=32, base=40):
    return torch.stack([dead_leaves(base * 1_000_003 + i, size)[0] for i in range(n)])


# ---------------------------------------------------------------------------------------------
# classical.py
# ---------------------------------------------------------------------------------------------

def test_gaussian_filter_at_the_tuned_sigma_denoises():
    val, test = smooth_images(4, seed=0), smooth_images(1, seed=1)
    noisy_val, noisy_test = noise(val, generator=0, sigma=0.1), noise(test, generator=1, sigma=0.1)
    scores = {p["sigma"]: psnr(classical.gaussian_filter(noisy_val, **p), val).mean().item()
              for p in classical.CANDIDATES["noise"][0][2]}
    sigma = max(scores, key=scores.get)
    assert sigma > 0.5  # a smooth image wants more than the lightest smoothing of the grid
    assert psnr(classical.gaussian_filter(noisy_test, sigma), test) > psnr(noisy_test, test) + 5


def test_median_filter_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.rand(2, 3, 11, 13, generator=torch.Generator().manual_seed(0))
    ref = ndimage.median_filter(x.numpy(), size=(1, 1, 5, 5), mode="nearest")
    torch.testing.assert_close(classical.median_filter(x, 5), torch.from_numpy(ref))


def test_wiener_deconvolution_deblurs():
    x = leaves(2)
    y = blur(x, generator=0, kind="gaussian", sigma=2.0)
    restored = classical.wiener(y, sigma=2.0, nsr=1e-3)
    assert (psnr(restored, x) > psnr(y, x) + 2).all()
    assert (psnr(classical.wiener(y, sigma=2.0, nsr=1e9), x) < psnr(y, x)).all()  # all-regulariser: ~nothing left


def test_gamma_exposure_correction_brightens():
    x = smooth_images(2)
    dark = 0.3 * x**1.5  # the noise-free lowlight model
    assert (psnr(classical.gamma_exposure(dark, exposure=0.3, gamma=1.5), x) > 50).all()  # its exact inverse
    name, fn, params, _ = classical.tune("lowlight", dark, x)
    assert psnr(fn(dark, **params), x).mean() > psnr(dark, x).mean() + 10


def test_dark_channel_prior_dehazes():
    x = leaves(4)
    hazy = haze(x, generator=0, beta=1.5, airlight=0.85)
    restored = classical.dehaze(hazy, omega=0.8, t0=0.1, patch=5)
    assert psnr(restored, x).mean() > psnr(hazy, x).mean() + 1
    assert classical.airlight(hazy, classical.dark_channel(hazy, 5)).mean() > 0.6  # found the haze, not a leaf


def test_deblock_touches_only_block_edges_and_smooths_them():
    x = torch.rand(1, 3, 16, 24)
    y = classical.deblock(x, sigma=1.0, strength=1.0)
    inside = torch.zeros(16, 24, dtype=torch.bool)
    inside[1:7, 1:7] = inside[9:15, 9:15] = True  # pixels two or more away from every 8 x 8 boundary
    torch.testing.assert_close(y[..., inside], x[..., inside])
    assert (y[..., 7, :] - y[..., 8, :]).abs().mean() < (x[..., 7, :] - x[..., 8, :]).abs().mean()


def test_grey_opening_removes_thin_bright_streaks_and_keeps_flat_regions():
    x = torch.full((1, 3, 20, 20), 0.3)
    x[..., 10:14, 10:14] = 0.8  # a bright square wider than the window: kept
    streaky = x.clone()
    streaky[..., 2, :] = 1.0  # a one-pixel bright line: removed
    torch.testing.assert_close(classical.open_streaks(streaky, 3), x)


def test_deveil_inverts_the_snow_veil():
    x = smooth_images(2)
    veiled = 0.85 * x + 0.9 * 0.15
    torch.testing.assert_close(classical.deveil(veiled, veil=0.15, size=1), x.clamp(0, 1), atol=1e-5, rtol=0)
    assert psnr(classical.deveil(veiled, veil=0.0, size=1), x).mean() < psnr(classical.deveil(veiled, 0.15, 1), x).mean()


# ---------------------------------------------------------------------------------------------
# dncnn.py
# ---------------------------------------------------------------------------------------------

def test_dncnn_starts_at_identity_and_learns_to_denoise():
    x = leaves(8, size=16)
    y = noise(x, generator=0, sigma=0.15)
    net = dncnn.DnCNN(dncnn.DnCNNConfig(depth=4, width=16, lr=3e-3))
    torch.testing.assert_close(net(y), y)

    def next_batch(step):
        clean = leaves(4, size=16, base=50 + step % 8)
        return clean, noise(clean, generator=step, sigma=0.15)

    model, steps, _ = dncnn.train_dncnn(next_batch, seconds=60, config=net.config, max_steps=60)
    assert steps == 60
    assert psnr(dncnn.restore(model, y), x).mean() > psnr(y, x).mean() + 1


# ---------------------------------------------------------------------------------------------
# replicate.py
# ---------------------------------------------------------------------------------------------

def markdown_rows(text):
    """The header and rows of the first table in text."""
    lines = ("|" + text.split("\n\n|", 1)[1]).split("\n\n")[0].splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return header, [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


SMOKE = ["--images", "3", "--val-images", "3", "--size", "16", "--steps", "2", "--batch-size", "2",
         "--sample-steps", "2", "--cnn-seconds", "0.3", "--pool", "8"]


def test_replication_smoke_run_and_cached_rerun(backbone_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "replication"
    argv = ["--model", str(backbone_dir), "--degradations", "noise,haze", "--t0-sweep", "0.4,0.8", "--out", str(out)]
    assert replicate.main(argv + SMOKE) == 0
    md = (out / "results.md").read_text()
    assert "python benchmarks/replicate.py --model" in md
    header, rows = markdown_rows(md)
    assert header == replicate.HEADER
    methods = ["degraded input", "best classical filter", "DnCNN (supervised)", "no prompt (T0 0.4)",
               "naive bridge (T0 0.4)", "DDBM bridge (T0 0.4)", "EBR bridge (the method) (T0 0.4)",
               "no prompt (T0 0.8)", "EBR bridge (T0 0.8)"]
    assert [(r[0], r[1]) for r in rows] == [(d, m) for d in ("noise", "haze") for m in methods]
    for r in rows:
        assert all(len(r[k].split(" ± ")) == 2 for k in (2, 3))
    result = json.loads((out / "results.json").read_text())
    for r in result["rows"]:
        values = list(r["psnr"]) + list(r["ssim"]) + list(r["dpsnr"] or []) + list(r["dnone"] or [])
        assert all(math.isfinite(v) for v in values), r
        assert (r["dnone"] is not None) == ("bridge" in r["method"]), r  # prompt rows only
    # The paired difference to no prompt is the difference of the per-image PSNRs: the means subtract.
    by = {(r["degradation"], r["method"]): r for r in result["rows"]}
    for d in ("noise", "haze"):
        for method, none in (("EBR bridge (T0 0.8)", "no prompt (T0 0.8)"), ("naive bridge (T0 0.4)", "no prompt (T0 0.4)")):
            assert by[d, method]["dnone"][0] == pytest.approx(by[d, method]["psnr"][0] - by[d, none]["psnr"][0], abs=1e-9)
    claims = md.split("The issue's targets")[1].split("Timings")[0]
    claim_rows = [line for line in claims.splitlines() if line.startswith("| noise") or line.startswith("| haze")]
    assert len(claim_rows) == 2 and all(line.count("(yes)") + line.count("(no, ") == 5 for line in claim_rows)
    none = by["noise", "no prompt (T0 0.4)"]
    assert claim_rows[0].split(" | ")[1].startswith(f"{-none['dpsnr'][0]:+.2f}")
    for d in ("noise", "haze"):
        grid = replicate.save_image.__globals__["Image"].open(out / f"grid-{d}.png")
        assert grid.size == (6 * 128, 3 * 128)  # 6 columns, 3 images, 16 px upscaled x 8
        for name in ("naive-t0.4", "ddbm-t0.4", "ebr-t0.4", "ebr-t0.8"):
            assert (out / "prompts" / f"{d}-{name}.safetensors").exists()
    first = {(r["degradation"], r["method"]): r["psnr"] for r in result["rows"]}

    # A rerun only evaluates: training anything now fails the test.
    def no_training(*args, **kwargs):
        raise AssertionError("a rerun without --retrain trained again")

    monkeypatch.setattr(replicate.train, "main", no_training)
    monkeypatch.setattr(replicate.dncnn, "train_dncnn", no_training)
    assert replicate.main(argv + SMOKE) == 0
    again = json.loads((out / "results.json").read_text())["rows"]
    assert {(r["degradation"], r["method"]): r["psnr"] for r in again} == first  # same prompts, same noise

    with pytest.raises(AssertionError, match="trained again"):
        replicate.main(argv + SMOKE + ["--retrain"])


def test_fingerprint_tells_backbones_apart():
    """Cached prompts are keyed by it: another pre-training of "tiny" must not reuse the old prompts."""
    from minirestore.flux import Flux
    from minirestore.tiny import TINY

    torch.manual_seed(0)
    a = Flux(TINY)
    b = copy.deepcopy(a)
    assert replicate.fingerprint(a) == replicate.fingerprint(b)
    with torch.no_grad():
        b.img_in.weight.add_(1e-3)  # one tensor changed slightly, as after more training
    assert replicate.fingerprint(a) != replicate.fingerprint(b)
    torch.manual_seed(1)
    assert replicate.fingerprint(a) != replicate.fingerprint(Flux(TINY))


@pytest.fixture(scope="module")
def tiny_like_dir(tmp_path_factory):
    """A tiny-shaped backbone folder with a text encoder: pixel codec, random Flux and TinyTextEncoder,
    and the context of "" computed by that encoder (as pretrain.write_backbone does)."""
    from minirestore.context import save_context
    from minirestore.flux import Flux, FluxConfig
    from minirestore.tiny import TextConfig, TinyTextEncoder, config_json

    d = tmp_path_factory.mktemp("tiny_like")
    config = FluxConfig(in_channels=48, out_channels=48, vec_in_dim=16, context_in_dim=16, hidden_size=32,
                        mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[4, 6, 6],
                        guidance_embed=False)
    g = torch.Generator().manual_seed(0)
    flux, text = Flux(config), TinyTextEncoder(TextConfig(width=16, num_layers=1, num_heads=2, length=6))
    with torch.no_grad():
        for model in (flux, text):
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5 + (p.dim() == 1) * 0.5)
    save_file(flux.state_dict(), d / "flux.safetensors", metadata={"minirestore_config": json.dumps(asdict(config))})
    save_file(text.state_dict(), d / "text.safetensors", metadata={"minirestore_config": config_json(text.config)})
    with torch.no_grad():
        save_context(d / "context.safetensors", text.encode([""]), {"backbone": "tiny-like", "codec": "pixel2"})
    return d


def test_token_space_starts_at_the_frozen_context_and_gets_gradients(tiny_like_dir):
    args = replicate.parse_args(["--model", str(tiny_like_dir)])
    backbone = replicate.load_backbone(args.model)
    text, ids = replicate.load_text(args, backbone)
    tokens = torch.nn.Parameter(text.token_embedding(ids).detach().clone())
    ctx = replicate.token_context(text, ids, tokens)
    for k in ("txt", "y"):  # step 0 is exactly the frozen model
        torch.testing.assert_close(ctx[k], backbone.context[k], rtol=0, atol=1e-6)
    view = replicate.replace(backbone, context=ctx)
    x = torch.randn(2, 12, 8, 8, generator=torch.Generator().manual_seed(0))
    view.velocity(x, torch.full((2,), 0.3), None).square().mean().backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.model.parameters())  # the backbone stays frozen


def test_replication_has_the_token_space_row_when_the_backbone_has_a_text_encoder(tiny_like_dir, tmp_path):
    out = tmp_path / "replication"
    argv = ["--model", str(tiny_like_dir), "--degradations", "noise", "--t0-sweep", "", "--out", str(out)]
    assert replicate.main(argv + SMOKE) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    token = [r for r in rows if r["method"] == "token space (EBR, T0 0.4)"]
    assert len(token) == 1 and all(math.isfinite(v) for v in token[0]["psnr"] + token[0]["dpsnr"])
    learned = load_file(str(out / "prompts" / "noise-tokens-t0.4.safetensors"))["tokens"]
    text, ids = replicate.load_text(replicate.parse_args(["--model", str(tiny_like_dir)]),
                                    replicate.load_backbone(str(tiny_like_dir)))
    assert not torch.allclose(learned, text.token_embedding(ids))  # training moved the tokens


def test_restore_set_uses_the_prompt_and_the_same_noise_per_image(backbone_dir):
    backbone = replicate.load_backbone(str(backbone_dir))
    _, degraded = replicate.held_out(replicate.TEST_BASE, 3, 16, "noise")
    bridge = replicate.Bridge("ebr", 0.4)
    bank = backbone.new_prompt(torch.Generator().manual_seed(0))
    with torch.no_grad():
        bank.alpha.fill_(1.0)
        bank.prompt.mul_(50)
    plain = replicate.restore_set(backbone, None, bridge, degraded, steps=2)
    prompted = replicate.restore_set(backbone, bank, bridge, degraded, steps=2)
    assert (plain - prompted).abs().max() > 1e-3
    one_by_one = replicate.restore_set(backbone, None, bridge, degraded, steps=2, batch=1)
    torch.testing.assert_close(one_by_one, plain, rtol=1e-4, atol=1e-5)  # image i's noise does not depend on batching


def test_held_out_images_are_fixed_and_disjoint_from_training():
    clean, degraded = replicate.held_out(replicate.TEST_BASE, 2, 16, "blur")
    again = replicate.held_out(replicate.TEST_BASE, 2, 16, "blur")
    assert torch.equal(clean, again[0]) and torch.equal(degraded, again[1])
    bases = {replicate.TEST_BASE, replicate.VAL_BASE, 7, 999}  # test, validation, prompt training, pretrain eval
    # Pre-training with --seed s draws the seeds s x 1_000_003 + [0, steps x batch): s = 0 and 1 (two stages).
    assert len(bases) == 4 and min(bases) * 1_000_003 > 1 * 1_000_003 + 8000 * 32


# ---------------------------------------------------------------------------------------------
# photos.py: its command line
# ---------------------------------------------------------------------------------------------

def test_photos_benchmark_levels_and_their_filter():
    photos = load("photos")
    assert set(photos.LEVELS) <= set(classical.CANDIDATES)  # every test level has a tuned classical baseline
    args = photos.parse_args(["--degradations", "noise,rain", "--level", "sigma 0.2", "--sizes", "64", "--images", "4"])
    assert args.level == ["sigma 0.2"] and args.degradations == ["noise", "rain"]
    with pytest.raises(photos.UserError, match="not a test level"):
        photos.parse_args(["--level", "sigma 0.3"])


def test_photos_bridge_pairs_every_ebr_prompt_with_every_baseline():
    """photos.py's bridge table: each bridge at its own T0, so EBR at T0 0.8 is paired with DDBM at 0.4 too; the
    difference is taken crop by crop (paired), not between means."""
    photos = load("photos")
    learned = [("ebr", 0.8, 0), ("ddbm", 0.4, 1), ("naive", 0.8, 2), ("ebr", 0.6, 3)]
    methods = [(f"m{i}", None, "") for i in range(4)]
    scores = [torch.tensor([20.0, 22.0, 24.0]), torch.tensor([21.0, 21.0, 21.0]), torch.tensor([19.0, 23.0, 24.0]),
              torch.tensor([18.0, 18.0, 18.0])]
    pairs = photos.bridge_pairs(learned, methods, scores)
    assert [(p["ebr"], p["other"], p["T0"], p["baseline_T0"], p["baseline"]) for p in pairs] == [
        ("m0", "m1", 0.8, 0.4, "ddbm"), ("m0", "m2", 0.8, 0.8, "naive"),
        ("m3", "m1", 0.6, 0.4, "ddbm"), ("m3", "m2", 0.6, 0.8, "naive")]
    mean, half = pairs[1]["dpsnr"]  # differences 1, -1, 0: mean 0, an interval from their spread
    assert mean == pytest.approx(0.0) and half == pytest.approx(1.96 / math.sqrt(3))
    assert pairs[0]["dpsnr"][0] == pytest.approx(1.0) and pairs[2]["dpsnr"] == (pytest.approx(-3.0), 0.0)
    assert "| 0.8 / 0.4 |" in photos.bridge_table([dict(degradation="haze", level="", size=64, n=3, **pairs[0])])


def test_bridges_benchmark_picks_each_bridge_on_val(fake_photos, tmp_path):
    """bridges.py: every bridge's pick is its best (prompt, sampler) on the val crops, and the test table pairs the
    picks; a degradation without a prompt of some bridge is refused by name, and an --x0 ebridge prompt is not one."""
    bridges = load("bridges")
    prompts = [str(ROOT / "weights/tiny/prompts/blur.safetensors")] + [
        str(ROOT / f"benchmarks/photos/prompts/blur-{k}-t0.1.safetensors") for k in ("naive", "ddbm")]
    argv = ["--degradations", "blur", "--samplers", "1x2,2x1", "--val-images", "2", "--images", "2", "--sizes", "64",
            "--out", str(tmp_path), *prompts]
    assert bridges.main(argv) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    for kind in ("ebr", "naive", "ddbm"):
        scored = [r for r in result["val"] if r["bridge"] == kind]
        assert len(scored) == 2 and sum(r["picked"] for r in scored) == 1  # one prompt x two samplers, one pick
        best = max(scored, key=lambda r: r["psnr"])
        assert best["picked"] and result["rows"][0]["picks"][kind]["sampler"] == best["sampler"]
    row = result["rows"][0]
    assert set(row["ebr_minus"]) == {"naive", "ddbm"} and (tmp_path / "grid-blur-gaussiansigma2.png").exists()
    with pytest.raises(bridges.UserError, match="ddbm"):
        bridges.main(argv[:-1])
    # an EBR prompt trained with E-Bridge's estimate does not stand in for EBR: the comparison holds YPT's fixed
    ebridge = str(ROOT / "benchmarks/photos/prompts/blur-ebridge-t0.05-pow0.3.safetensors")
    with pytest.raises(bridges.UserError, match="ebr bridge"):
        bridges.main([a if a != prompts[0] else ebridge for a in argv])


def test_spin_benchmark_scores_each_period_against_no_spin(fake_photos, tmp_path):
    """spin.py: one row per test level, no spinning always scored, each period with its paired difference; a spin
    of 0 against itself would be no comparison, so 0 is the reference column, not a duplicate."""
    spin = load("spin")
    assert spin.main(["--degradations", "jpeg", "--spins", "4,0", "--images", "2", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "results.md").read_text()
    assert "| degradation | level | no spin | spin 4 |" in md
    row = next(line for line in md.splitlines() if line.startswith("| jpeg |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 4 and "±" in cells[3] and "±" not in cells[2]
    with pytest.raises(spin.UserError, match="--spins"):
        spin.parse_args(["--spins", "-4"])
