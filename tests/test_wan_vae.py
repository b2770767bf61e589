"""Wan 2.1 VAE: parity with diffusers' AutoencoderKLWan, chunked == one pass, loading both formats."""
import json
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import save_file

from minirestore import UserError
from minirestore.hub import load_wan_vae, wan_vae_diffusers_key
from minirestore.wan_vae import LATENTS_MEAN, LATENTS_STD, WanVAE, WanVAEConfig

# The released structure (dim_mult 1,2,4,4, two res blocks, time down in the last two levels), narrow.
TINY = WanVAEConfig(dim=4)
# Another structure, for the loaders' general key map.
ODD = WanVAEConfig(dim=4, dim_mult=(1, 2, 2), num_res_blocks=1, temperal_downsample=(True, False))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny_vae(config=TINY, seed=0):
    g = torch.Generator().manual_seed(seed)
    vae = WanVAE(config).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "gamma" in name else 0.05 * noise)  # outputs mostly inside the clamp
    return vae


def clip(frames, h=24, w=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, h, w, generator=g) * 2 - 1


def save(state, path, config=None):
    meta = {"minirestore_config": json.dumps(asdict(config))} if config else None
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=meta)


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_parity_with_diffusers(frames):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    vae = tiny_vae()
    ref = diffusers.AutoencoderKLWan(base_dim=TINY.dim, z_dim=TINY.z_dim).eval()
    ref.load_state_dict(convert_wan_vae_to_diffusers(dict(vae.state_dict())), strict=True)
    mean = torch.tensor(LATENTS_MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(LATENTS_STD).view(1, -1, 1, 1, 1)
    video = clip(frames)  # 24x40: multiples of 8, not powers of two
    with torch.no_grad():
        z = vae.encode(video)
        # diffusers leaves the per-channel normalisation to the pipeline
        z_ref = (ref.encode(video).latent_dist.mean - mean) / std
        assert z.shape == (1, 16, 1 + (frames - 1) // 4, 3, 5)
        assert rel_err(z, z_ref) <= 1e-5
        out = vae.decode(z)
        out_ref = ref.decode(z * std + mean).sample
    assert out.shape == video.shape
    assert out.abs().max() <= 1 and (out.abs() < 1).float().mean() > 0.9  # clamped, but mostly not
    assert rel_err(out, out_ref) <= 1e-5


@pytest.mark.parametrize("config", [TINY, ODD], ids=["released", "odd"])
def test_chunked_equals_one_pass(config):
    vae = tiny_vae(config).double()
    T = 2 * config.temporal_factor + 1
    video = clip(T).double()
    with torch.no_grad():
        mu, log_var = vae.encode_moments(video)
        mu_full, log_var_full = vae.encode_moments(video, chunked=False)
        assert mu.shape[2] == 3
        assert torch.allclose(mu, mu_full, rtol=0, atol=1e-12)
        assert torch.allclose(log_var, log_var_full, rtol=0, atol=1e-12)
        z = vae.encode(video)
        out = vae.decode(z)
        assert out.shape == video.shape
        assert torch.allclose(out, vae.decode(z, chunked=False), rtol=0, atol=1e-12)


def test_images_sampling_and_bad_sizes():
    vae = tiny_vae()
    image = clip(1)[:, :, 0]
    with torch.no_grad():
        z = vae.encode(image)
        assert z.shape == (1, 16, 3, 5)
        assert torch.equal(z, vae.encode(image[:, :, None])[:, :, 0])
        assert vae.decode(z).shape == image.shape
        sampled = vae.encode(image, sample=True, generator=torch.Generator().manual_seed(0))
        mu, log_var = vae.encode_moments(image[:, :, None])
        eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(0))
        mean, std = torch.tensor(LATENTS_MEAN).view(1, -1, 1, 1, 1), torch.tensor(LATENTS_STD).view(1, -1, 1, 1, 1)
        expected = (mu + torch.exp(0.5 * log_var) * eps - mean) / std
        assert rel_err(sampled, expected[:, :, 0]) <= 1e-6
    with pytest.raises(UserError, match="4k\\+1 frames"):
        vae.encode(clip(4))
    with pytest.raises(UserError, match="multiples of 8"):
        vae.encode(clip(1, h=20))


@pytest.mark.parametrize("config", [TINY, ODD], ids=["released", "odd"])
def test_load_original_pth_and_diffusers_safetensors(tmp_path, config):
    vae = tiny_vae(config)
    state = vae.state_dict()
    torch.save(state, tmp_path / "Wan2.1_VAE.pth")
    (tmp_path / "repo" / "vae").mkdir(parents=True)
    save({wan_vae_diffusers_key(k, config): v for k, v in state.items()},
         tmp_path / "repo" / "vae" / "diffusion_pytorch_model.safetensors")  # no metadata: inferred
    video = clip(5)
    with torch.no_grad():
        expected = vae.decode(vae.encode(video))
        for source in (tmp_path / "Wan2.1_VAE.pth", tmp_path, tmp_path / "repo"):
            loaded = load_wan_vae(source)
            assert loaded.config == config
            assert torch.equal(loaded.decode(loaded.encode(video)), expected)


def test_diffusers_key_map_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    state = WanVAE(TINY).state_dict()
    theirs = convert_wan_vae_to_diffusers(dict(state))
    ours = {wan_vae_diffusers_key(k, TINY): v for k, v in state.items()}
    assert set(ours) == set(theirs) == set(diffusers.AutoencoderKLWan(base_dim=TINY.dim).state_dict())
    assert all(ours[k] is theirs[k] for k in ours)


def test_wrong_files_are_refused(tmp_path):
    save({"patch_embedding.weight": torch.zeros(2, 16, 1, 2, 2), "time_projection.1.weight": torch.zeros(12, 2)},
         tmp_path / "dit.safetensors")
    with pytest.raises(UserError, match="not a Wan 2.1 VAE"):
        load_wan_vae(tmp_path / "dit.safetensors")
    (tmp_path / "bad.pth").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="not a readable PyTorch state dict"):
        load_wan_vae(tmp_path / "bad.pth")


def test_released_size():
    with torch.device("meta"):
        state = WanVAE(WanVAEConfig()).state_dict()
    assert len(state) == 194 and sum(v.numel() for v in state.values()) == 126_892_531
