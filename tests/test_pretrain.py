"""Pre-training of the tiny backbone: it runs, writes a loadable backbone folder, resumes, and learns."""
import json

import pytest
import torch

from minirestore import UserError, hub, pretrain
from minirestore.context import load_context
from minirestore.flux import pack, prepare_ids
from minirestore.tiny import PixelCodec, load_text_encoder

TINY_RUN = ["--batch-size", "4", "--sizes", "32", "--sample-steps", "1", "--eval-n", "2", "--threads", "1",
            "--device", "cpu", "--warmup", "2", "--data", "leaves"]


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
    assert torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=True)["step"] == 4
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


def test_photo_batches_are_seeded_crops_with_their_descriptors(fake_photos):
    from minirestore.photos import PhotoCrops, describe

    crops = PhotoCrops("train")
    images, prompts = pretrain.batch(3, 4, 32, 0, "photos", crops)
    again, _ = pretrain.batch(3, 4, 32, 0, "photos", crops)
    assert images.shape == (4, 3, 32, 32) and torch.equal(images, again)  # a function of (seed, step)
    assert prompts == [" ".join(describe(x)) for x in images]
    mixed, words = pretrain.batch(3, 4, 32, 0, "photos+leaves", crops)
    assert torch.equal(mixed[:2], images[:2]) and len(words[3].split()) == 5  # dead leaves: 5 descriptor words


def test_photo_run_and_the_denoising_score(fake_photos, tmp_path):
    args = TINY_RUN[:-1] + ["photos", "--steps", "1", "--width", "64", "--out", str(tmp_path / "w"),
                            "--run-dir", str(tmp_path / "run")]
    pretrain.main(args)
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["data"] == "photos" and hub.load_flux(tmp_path / "w" / "flux.safetensors").config.hidden_size == 64
    for sigma in pretrain.DENOISE_SIGMAS:  # one step of training: no denoiser yet, but a finite score
        assert 10 < result[f"denoise_psnr_{sigma}"] < 60 and abs(result[f"noisy_psnr_{sigma}"] + 20 *
                                                                   torch.log10(torch.tensor(sigma)).item()) < 1.5


def test_a_perfect_denoiser_scores_high_and_the_identity_scores_the_noisy_psnr():
    clean = pretrain.held_out(4, 32, "leaves")

    class Oracle(torch.nn.Module):  # v such that x_t - t v = X0 exactly, whatever x_t
        def __init__(self, identity=False):
            super().__init__()
            self.w, self.identity = torch.nn.Parameter(torch.zeros(1)), identity

    def fake_velocity(model, ctx, x_t, t):
        x0 = PixelCodec().encode(clean * 2 - 1)
        tt = t[:, None, None, None]
        return torch.zeros_like(x_t) if model.identity else (x_t - x0) / tt

    text = pretrain.TinyTextEncoder(pretrain.TextConfig())
    with pytest.MonkeyPatch.context() as m:
        m.setattr(pretrain, "velocity", fake_velocity)
        noisy, perfect = pretrain.denoise_psnr(Oracle(), text, clean, 0.1)
        _, identity = pretrain.denoise_psnr(Oracle(identity=True), text, clean, 0.1)
    assert perfect > 60 and identity < noisy + 0.5  # x0 = (1 - t) Y: the noisy image, shrunk a little


def test_init_extends_an_older_vocabulary(tmp_path):
    from minirestore.photos import PHOTO_WORDS
    from minirestore.tiny import TextConfig

    old_vocab = TextConfig().vocab[:-len(PHOTO_WORDS)]
    with pytest.MonkeyPatch.context() as m:  # a first-generation text encoder: no photo words
        m.setattr(pretrain, "TextConfig", lambda: TextConfig(vocab=old_vocab))
        _, _, _, ema_text_a, _ = pretrain.train(_args(tmp_path / "a", "--steps", "1"))
    _, text_b, *_ = pretrain.train(_args(tmp_path / "b", "--steps", "0", "--init", str(tmp_path / "a" / "w")))
    n = len(old_vocab)
    assert len(text_b.config.vocab) == n + len(PHOTO_WORDS)
    assert torch.equal(text_b.token_embedding.weight[:n], ema_text_a.token_embedding.weight)
    assert torch.equal(text_b.layers[0].qkv.weight, ema_text_a.layers[0].qkv.weight)


def test_a_large_transformer_is_written_in_shards_that_load_back(tmp_path, monkeypatch):
    from minirestore import loading
    from minirestore.backbone import load_backbone

    monkeypatch.setattr(loading, "SHARD_BYTES", 200_000)  # a 64-wide model is ~0.5 MB: three shards
    _, _, ema, _, _ = pretrain.train(_args(tmp_path / "a", "--steps", "1", "--width", "64"))
    w = tmp_path / "a" / "w"
    shards = sorted(w.glob("flux-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (w / "flux.safetensors").exists()
    assert all(f.stat().st_size < 200_000 + 20_000 for f in shards)  # tensor bytes + the header
    index = json.loads((w / "flux.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ema.state_dict()) and set(index["weight_map"].values()) == {f.name for f in shards}
    loaded = hub.load_flux(w / "flux.safetensors.index.json", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(_flux_out(loaded), _flux_out(ema.eval()))
    assert load_backbone(w).model.config.hidden_size == 64  # a backbone folder, as sample.py loads it
    flux_b, *_ = pretrain.train(_args(tmp_path / "b", "--steps", "0", "--width", "64", "--init", str(w)))  # --init too
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), flux_b.state_dict().values()))
    monkeypatch.setattr(loading, "SHARD_BYTES", 10**9)  # written again under a large limit: one file, no stale shards
    pretrain.write_backbone(w, ema, pretrain.TinyTextEncoder(pretrain.TextConfig()), {})
    assert sorted(f.name for f in w.glob("flux*")) == ["flux.safetensors"]
    (w / "flux.safetensors").unlink()  # an index whose shards are gone: one line naming them
    (w / "flux.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=f"names shards that are not there: {shards[0].name}"):
        load_backbone(w)


def test_a_time_budget_becomes_a_number_of_steps_stored_with_the_weights(tmp_path):
    args = _args(tmp_path, "--steps", "100000", "--time-budget", "3", "--warmup", "6", "--precision", "bf16")
    _, _, ema, _, step = pretrain.train(args)
    assert 6 < step < 100000 and args.steps == step  # resolved at the end of the warm-up, then run to the end
    meta = json.loads(hub.Checkpoint([tmp_path / "w" / "flux.safetensors"]).metadata["pretrain"])
    assert meta["steps"] == step and meta["precision"] == "bf16" and "time_budget" not in meta
    assert all(torch.isfinite(p).all() for p in ema.parameters())  # bf16 autocast trains fp32 weights
    with pytest.raises(UserError, match="--time-budget needs"):
        _args(tmp_path, "--time-budget", "3", "--warmup", "2")
