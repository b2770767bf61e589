"""Pre-training of the tiny backbone: it runs, writes a loadable backbone folder, resumes, and learns."""
import json

import pytest
import torch

from minirestore import hub, pretrain
from minirestore.context import load_context
from minirestore.flux import pack, prepare_ids
from minirestore.tiny import PixelCodec, load_text_encoder

TINY_RUN = ["--batch-size", "4", "--sizes", "32", "--sample-steps", "1", "--eval-n", "2", "--threads", "1",
            "--device", "cpu", "--warmup", "2"]


def _args(tmp_path, *extra):
    return pretrain.parse_args(TINY_RUN + ["--out", str(tmp_path / "w"), "--run-dir", str(tmp_path / "run"), *extra])


def _flux_out(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = pack(torch.randn(2, 12, 8, 8, generator=g))
    img_ids, txt_ids = prepare_ids(2, 8, 8, 16)
    return model(img, img_ids, torch.randn(2, 16, 64, generator=g), txt_ids, torch.rand(2, generator=g),
                 torch.randn(2, 64, generator=g))


def test_run_writes_a_loadable_backbone(tmp_path):
    args = _args(tmp_path, "--steps", "3", "--sample-every", "3")
    _, _, ema_flux, ema_text, step = pretrain.train(args)
    assert step == 3
    w = tmp_path / "w"
    loaded = hub.load_flux(w / "flux.safetensors", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(_flux_out(loaded), _flux_out(ema_flux.eval()))
    meta = hub.Checkpoint([w / "flux.safetensors"]).metadata
    assert meta["codec"] == "pixel2" and json.loads(meta["pretrain"])["seed"] == 0
    text = load_text_encoder(w / "text.safetensors")
    ctx, ctx_meta = load_context(w / "context.safetensors")
    assert ctx["txt"].shape == (1, 16, 64) and ctx["y"].shape == (1, 64)
    assert ctx_meta["backbone"] == "tiny" and ctx_meta["codec"] == "pixel2"
    with torch.no_grad():
        assert torch.equal(text.encode([""])["txt"], ctx["txt"]) and torch.equal(ema_text.encode([""])["y"], ctx["y"])
    assert (tmp_path / "run" / "samples_000003.png").exists()


def test_resume_continues_from_the_checkpoint(tmp_path):
    _, _, ema_a, _, _ = pretrain.train(_args(tmp_path / "a", "--steps", "4"))
    pretrain.train(_args(tmp_path / "b", "--steps", "2"))
    _, _, ema_b, _, step = pretrain.train(_args(tmp_path / "b", "--steps", "4", "--resume"))
    assert step == 4
    assert torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=False)["step"] == 4
    # Same data, times, noise and optimizer state: resuming reproduces the uninterrupted run.
    for (k, a), (_, b) in zip(ema_a.state_dict().items(), ema_b.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_init_starts_a_second_stage_from_a_backbone_folder(tmp_path):
    _, _, ema_a, ema_text_a, _ = pretrain.train(_args(tmp_path / "a", "--steps", "2"))
    # Zero steps from a's folder: the weights written are a's, and the metadata keeps a's config.
    flux_b, text_b, *_ = pretrain.train(_args(tmp_path / "b", "--steps", "0", "--seed", "1",
                                             "--init", str(tmp_path / "a" / "w")))
    for (k, a), (_, b) in zip(ema_a.state_dict().items(), flux_b.state_dict().items()):
        assert torch.equal(a, b), k
    with torch.no_grad():
        assert torch.equal(ema_text_a.encode(["warm"])["txt"], text_b.encode(["warm"])["txt"])
    meta = json.loads(hub.Checkpoint([tmp_path / "b" / "w" / "flux.safetensors"]).metadata["pretrain"])
    assert meta["seed"] == 1 and meta["init_pretrain"]["seed"] == 0 and meta["init_pretrain"]["steps"] == 2
    # and it trains on from there
    flux_c, *_ = pretrain.train(_args(tmp_path / "c", "--steps", "1", "--init", str(tmp_path / "a" / "w")))
    assert not torch.equal(flux_c.state_dict()["img_in.weight"], flux_b.state_dict()["img_in.weight"])


def test_init_from_a_folder_without_weights_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no flux.safetensors there"):
        pretrain.train(_args(tmp_path, "--steps", "1", "--init", str(tmp_path / "nowhere")))


def test_main_writes_the_evaluation(tmp_path):
    pretrain.main(TINY_RUN + ["--steps", "1", "--out", str(tmp_path / "w"), "--run-dir", str(tmp_path / "run")])
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    for key in ("slope_generated", "slope_real", "colour_distance_generated_vs_real", "colour_distance_real_vs_real"):
        assert isinstance(result[key], float)


def test_training_loop_learns_one_batch(tmp_path, monkeypatch):
    images, prompts = pretrain.batch(0, 4, 32, seed=5)
    monkeypatch.setattr(pretrain, "batch", lambda *a: (images, prompts))  # overfit one batch
    g = torch.Generator().manual_seed(1)
    x0 = PixelCodec().encode(images * 2 - 1)
    eps, t = torch.randn(x0.shape, generator=g), torch.rand(4, generator=g)
    xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps

    @torch.no_grad()
    def fixed_loss(flux, text):
        return (pretrain.velocity(flux, text.encode(prompts), xt, t) - (eps - x0)).pow(2).mean().item()

    flux0, text0, *_ = pretrain.train(_args(tmp_path / "0", "--steps", "0"))
    flux1, text1, *_ = pretrain.train(_args(tmp_path / "1", "--steps", "30", "--lr", "2e-3", "--cond-drop", "0"))
    before, after = fixed_loss(flux0, text0), fixed_loss(flux1, text1)
    assert after < 0.7 * before, (before, after)
