"""Loading the FLUX transformer through minirestore.hub.load_flux, from every kind of source.

Tiny random checkpoints with the official key names are written into tmp_path: a BFL file, a local
folder, a sharded diffusers `transformer/` folder (converted by this file's own BFL -> diffusers code,
architectures.md 2.10) and huggingface_hub's offline cache layout. No network.
"""
import json
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import save_file

from minirestore import UserError
from minirestore.flux import Flux, FluxConfig, default_axes_dim
from minirestore.hub import load_flux

CFG = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=32, hidden_size=64, mlp_ratio=4.0,
                 num_heads=4, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6], theta=10_000, qkv_bias=True,
                 guidance_embed=False)


def random_state(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = Flux(config)
    return {k: torch.randn(v.shape, generator=g) * 0.1 + (1.0 if k.endswith("scale") else 0.0)
            for k, v in model.state_dict().items()}


def reference_model(state, config):
    model = Flux(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def run(model):
    g = torch.Generator().manual_seed(1)
    c = model.config
    B, L_img, L_txt = 2, 15, 5
    ids = torch.randint(0, 8, (B, L_img + L_txt, 3), generator=g).float()
    dtype = next(model.parameters()).dtype
    x = dict(img=torch.randn(B, L_img, c.in_channels, generator=g), img_ids=ids[:, L_txt:],
             txt=torch.randn(B, L_txt, c.context_in_dim, generator=g), txt_ids=ids[:, :L_txt],
             timesteps=torch.rand(B, generator=g), y=torch.randn(B, c.vec_in_dim, generator=g),
             guidance=torch.full((B,), 3.5) if c.guidance_embed else None)
    x = {k: v.to(dtype) if v is not None and "ids" not in k else v for k, v in x.items()}
    with torch.no_grad():
        return model(**x).float()


def diffusers_from_bfl(sd, config):
    """BFL -> diffusers FluxTransformer2DModel keys (the test's own map, architectures.md 2.10)."""
    H, M = config.hidden_size, int(config.hidden_size * config.mlp_ratio)
    out = {}

    def move(diff, bfl):
        for p in ("weight", "bias"):
            if f"{bfl}.{p}" in sd:
                out[f"{diff}.{p}"] = sd[f"{bfl}.{p}"]

    move("x_embedder", "img_in")
    move("context_embedder", "txt_in")
    for diff, bfl in [("timestep_embedder", "time_in"), ("text_embedder", "vector_in"),
                      ("guidance_embedder", "guidance_in")]:
        move(f"time_text_embed.{diff}.linear_1", f"{bfl}.in_layer")
        move(f"time_text_embed.{diff}.linear_2", f"{bfl}.out_layer")
    for i in range(config.depth):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        move(f"{d}.norm1.linear", f"{b}.img_mod.lin")
        move(f"{d}.norm1_context.linear", f"{b}.txt_mod.lin")
        for p in ("weight", "bias"):
            for name, t in zip(["to_q", "to_k", "to_v"], sd[f"{b}.img_attn.qkv.{p}"].chunk(3)):
                out[f"{d}.attn.{name}.{p}"] = t
            for name, t in zip(["add_q_proj", "add_k_proj", "add_v_proj"], sd[f"{b}.txt_attn.qkv.{p}"].chunk(3)):
                out[f"{d}.attn.{name}.{p}"] = t
        out[f"{d}.attn.norm_q.weight"] = sd[f"{b}.img_attn.norm.query_norm.scale"]
        out[f"{d}.attn.norm_k.weight"] = sd[f"{b}.img_attn.norm.key_norm.scale"]
        out[f"{d}.attn.norm_added_q.weight"] = sd[f"{b}.txt_attn.norm.query_norm.scale"]
        out[f"{d}.attn.norm_added_k.weight"] = sd[f"{b}.txt_attn.norm.key_norm.scale"]
        move(f"{d}.attn.to_out.0", f"{b}.img_attn.proj")
        move(f"{d}.attn.to_add_out", f"{b}.txt_attn.proj")
        move(f"{d}.ff.net.0.proj", f"{b}.img_mlp.0")
        move(f"{d}.ff.net.2", f"{b}.img_mlp.2")
        move(f"{d}.ff_context.net.0.proj", f"{b}.txt_mlp.0")
        move(f"{d}.ff_context.net.2", f"{b}.txt_mlp.2")
    for i in range(config.depth_single_blocks):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for p in ("weight", "bias"):
            q, k, v, mlp = sd[f"{b}.linear1.{p}"].split([H, H, H, M])
            out.update({f"{d}.attn.to_q.{p}": q, f"{d}.attn.to_k.{p}": k, f"{d}.attn.to_v.{p}": v,
                        f"{d}.proj_mlp.{p}": mlp})
        move(f"{d}.proj_out", f"{b}.linear2")
        out[f"{d}.attn.norm_q.weight"] = sd[f"{b}.norm.query_norm.scale"]
        out[f"{d}.attn.norm_k.weight"] = sd[f"{b}.norm.key_norm.scale"]
        move(f"{d}.norm.linear", f"{b}.modulation.lin")
    move("proj_out", "final_layer.linear")
    for p in ("weight", "bias"):
        shift, scale = sd[f"final_layer.adaLN_modulation.1.{p}"].chunk(2)
        out[f"norm_out.linear.{p}"] = torch.cat([scale, shift])  # diffusers keeps [scale; shift]
    return {k: v.contiguous() for k, v in out.items()}


def write_sharded(folder, state):
    """Two shards plus the index json, as diffusers' save_pretrained writes them."""
    folder.mkdir(parents=True)
    keys = sorted(state)
    weight_map = {}
    for n, part in enumerate([keys[: len(keys) // 2], keys[len(keys) // 2:]], start=1):
        name = f"diffusion_pytorch_model-0000{n}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


def fake_hub_cache(monkeypatch, root):
    """Point huggingface_hub at an offline cache under root. huggingface_hub 2.x reads
    constants.HF_HUB_CACHE / constants.HF_HUB_OFFLINE at call time; both are set from the environment
    at import, so patch the module attributes as well as the variables."""
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))


def put_in_cache(root, repo, filename, state):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    save_file(state, str(snapshot / filename))


@pytest.fixture(scope="module")
def tiny():
    state = random_state(CFG)
    return state, run(reference_model(state, CFG))


def test_local_file_and_folder(tmp_path, tiny):
    state, expected = tiny
    path = tmp_path / "flux1-schnell.safetensors"
    save_file(state, str(path))
    model = load_flux(path, dtype=torch.float32)
    assert model.config == CFG
    assert torch.equal(run(model), expected)
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())

    # A local copy of a BFL repo: the transformer file beside ae.safetensors, which is skipped.
    save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}, str(tmp_path / "ae.safetensors"))
    assert torch.equal(run(load_flux(tmp_path, dtype=torch.float32)), expected)

    bf16 = load_flux(str(path))  # default dtype bf16: every tensor cast on the way in
    fp32 = dict(model.named_parameters())
    assert all(p.dtype == torch.bfloat16 and torch.equal(p, fp32[k].bfloat16()) for k, p in bf16.named_parameters())
    assert torch.isfinite(run(bf16)).all()


def test_diffusers_sharded_folder(tmp_path, tiny):
    state, expected = tiny
    write_sharded(tmp_path / "repo" / "transformer", diffusers_from_bfl(state, CFG))
    for source in (tmp_path / "repo", tmp_path / "repo" / "transformer"):  # the repo root or its transformer/
        model = load_flux(source, dtype=torch.float32)
        assert model.config == CFG
        assert torch.equal(run(model), expected)


def test_hub_offline_cache(tmp_path, monkeypatch, tiny):
    state, expected = tiny
    fake_hub_cache(monkeypatch, tmp_path)
    put_in_cache(tmp_path, "black-forest-labs/FLUX.1-schnell", "flux1-schnell.safetensors", state)
    for source in ("flux-schnell", "black-forest-labs/FLUX.1-schnell",
                   "black-forest-labs/FLUX.1-schnell/flux1-schnell.safetensors"):
        model = load_flux(source, dtype=torch.float32)
        assert model.config == CFG  # inferred from shapes; the preset's axes_dim does not fit a tiny head
        assert torch.equal(run(model), expected)


def test_config_inference(tmp_path):
    cfg = FluxConfig(in_channels=16, out_channels=8, vec_in_dim=12, context_in_dim=24, hidden_size=64,
                     mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=3, axes_dim=default_axes_dim(32),
                     theta=10_000, qkv_bias=False, guidance_embed=True)
    path = tmp_path / "odd.safetensors"
    state = random_state(cfg)
    save_file(state, str(path))
    model = load_flux(path, dtype=torch.float32)
    assert model.config == cfg
    assert torch.equal(run(model), run(reference_model(state, cfg)))

    # A config stored in the metadata wins over inference (here a non-default RoPE split and theta).
    stored = FluxConfig(**{**asdict(cfg), "axes_dim": [8, 12, 12], "theta": 500})
    save_file(state, str(path), metadata={"minirestore_config": json.dumps(asdict(stored))})
    assert load_flux(path, dtype=torch.float32).config == stored


def test_error_truncated(tmp_path, tiny):
    path = tmp_path / "flux.safetensors"
    save_file(tiny[0], str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(UserError, match="truncated"):
        load_flux(path)


@pytest.mark.parametrize("tensors, kind", [
    ({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "encoder.down.0.block.0.conv1.weight": torch.zeros(8, 8, 3, 3),
      "decoder.conv_in.weight": torch.zeros(8, 16, 3, 3)}, "autoencoder"),
    ({"foo": torch.zeros(3), "bar.weight": torch.zeros(2, 2)}, "a kind of checkpoint this package does not know"),
])
def test_error_not_a_transformer(tmp_path, tensors, kind):
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(UserError, match="not a FLUX transformer") as e:
        load_flux(path)
    assert "looks like" in str(e.value) and kind in str(e.value)


def test_error_missing_and_unexpected_keys(tmp_path, tiny):
    state = dict(tiny[0])
    del state["double_blocks.1.txt_mlp.2.weight"], state["single_blocks.0.linear2.bias"]
    path = tmp_path / "flux.safetensors"
    save_file(state, str(path))
    with pytest.raises(UserError, match="2 missing keys") as e:
        load_flux(path)
    assert "double_blocks.1.txt_mlp.2.weight" in str(e.value) and "single_blocks.0.linear2.bias" in str(e.value)

    save_file({**tiny[0], "extra.weight": torch.zeros(2)}, str(path))
    with pytest.raises(UserError, match="unexpected keys: extra.weight"):
        load_flux(path)

    # Keys the config is inferred from: named too, not a KeyError.
    save_file({k: v for k, v in tiny[0].items() if k != "img_in.weight"}, str(path))
    with pytest.raises(UserError, match="img_in.weight"):
        load_flux(path)


def test_error_hub_offline(tmp_path, monkeypatch):
    fake_hub_cache(monkeypatch, tmp_path)
    with pytest.raises(UserError) as e:
        load_flux("flux-dev")
    msg = str(e.value)
    assert "black-forest-labs/FLUX.1-dev" in msg and "flux1-dev.safetensors" in msg
    assert "internet" in msg and "licence" in msg and "local copy" in msg
    with pytest.raises(UserError, match="someone/nothing"):
        load_flux("someone/nothing/model.safetensors")
    with pytest.raises(UserError, match="not a known model name"):
        load_flux("flux-pro")
