"""Wan 2.1 transformer: parity with diffusers, the prompted cross-attention, loading both formats."""
import json
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from minirestore import UserError
from minirestore.hub import load_wan
from minirestore.wan import WanConfig, WanContext, WanModel

TINY = WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_len=16, text_dim=24)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomize(model, seed=0):
    """Random weights everywhere (the reference initialisers leave zeros that hide ordering bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.2 * noise)
    return model


def tiny_model(config=TINY, seed=0):
    return randomize(WanModel(config), seed).eval()


def inputs(config=TINY, B=2, frames=3, h=6, w=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, config.in_dim, frames, h, w, generator=g)
    t = torch.tensor([937.0, 41.0][:B])
    context = torch.randn(B, config.text_len, config.text_dim, generator=g)
    context[:, 5:] = 0  # padded umT5 features: zero rows after the real tokens
    return x, t, context


def tiny_prompt(config=TINY, K=None, seed=2, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(prompt=torch.randn(1, K or config.text_len, config.dim, generator=g),
                           alpha=scale * torch.randn(config.num_layers, generator=g))


def save(state, path, config=None):
    meta = {"minirestore_config": json.dumps(asdict(config))} if config else None
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=meta)


# ---------------------------------------------------------------------------------------------
# Parity with diffusers' WanTransformer3DModel (its own conversion of our original-format weights)
# ---------------------------------------------------------------------------------------------

def diffusers_twin(model):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    c = model.config
    ref = diffusers.WanTransformer3DModel(
        patch_size=c.patch_size, num_attention_heads=c.num_heads, attention_head_dim=c.dim // c.num_heads,
        in_channels=c.in_dim, out_channels=c.out_dim, text_dim=c.text_dim, freq_dim=c.freq_dim,
        ffn_dim=c.ffn_dim, num_layers=c.num_layers, cross_attn_norm=c.cross_attn_norm,
        qk_norm="rms_norm_across_heads", eps=c.eps, rope_max_seq_len=1024)  # the reference's table length
    ref.load_state_dict(convert_wan_transformer_to_diffusers(dict(model.state_dict())), strict=True)
    return ref.eval()


def test_parity_with_diffusers():
    model = tiny_model()
    ref = diffusers_twin(model)
    x, t, context = inputs()  # odd latent grid (3 frames, 3x5 patches), B=2, two timesteps
    with torch.no_grad():
        ours = model(x, t, context)
        theirs = ref(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)[0]
    assert ours.shape == x.shape
    assert rel_err(ours, theirs) <= 1e-5


def test_prompted_model_matches_diffusers_with_two_cross_attentions():
    """The whole prompted model against diffusers with each attn2 wrapped as in the released code."""
    model = tiny_model()
    ref = diffusers_twin(model)
    prompt = tiny_prompt()

    class Prompted(torch.nn.Module):
        def __init__(self, attn, alpha):
            super().__init__()
            self.attn, self.alpha = attn, alpha

        def forward(self, h, c, *args):
            P = prompt.prompt.expand(c.shape[0], -1, -1)
            return self.attn(h, c) + self.alpha * self.attn(h, c + P)

    for block, alpha in zip(ref.blocks, prompt.alpha):
        block.attn2 = Prompted(block.attn2, alpha)
    x, t, context = inputs()
    with torch.no_grad():
        ours = model(x, t, context, prompt=prompt)
        theirs = ref(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)[0]
        plain = model(x, t, context)
    assert rel_err(ours, theirs) <= 1e-5
    assert rel_err(plain, theirs) > 1e-2  # the prompt does change the output


# ---------------------------------------------------------------------------------------------
# Prompt injection
# ---------------------------------------------------------------------------------------------

def test_alpha_zero_is_the_unprompted_model():
    model = tiny_model()
    x, t, context = inputs()
    prompt = tiny_prompt(scale=0.0)
    with torch.no_grad():
        assert torch.equal(model(x, t, context, prompt=prompt), model(x, t, context))


def test_prompted_cross_attention_equals_two_cross_attentions_by_hand():
    model = tiny_model()
    attn, cfg = model.blocks[1].cross_attn, model.config
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 7, cfg.dim, generator=g)
    c = torch.randn(2, cfg.text_len, cfg.dim, generator=g)
    P = torch.randn(1, cfg.text_len, cfg.dim, generator=g)
    alpha = torch.tensor(0.7)

    def ca(x, ctx):  # the reference's WanT2VCrossAttention, written out
        def rms(y, w):
            return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + cfg.eps) * w

        def split(y):
            return y.view(y.shape[0], -1, cfg.num_heads, cfg.dim // cfg.num_heads).transpose(1, 2)

        q = split(rms(F.linear(x, attn.q.weight, attn.q.bias), attn.norm_q.weight))
        k = split(rms(F.linear(ctx, attn.k.weight, attn.k.bias), attn.norm_k.weight))
        v = split(F.linear(ctx, attn.v.weight, attn.v.bias))
        scores = (q @ k.transpose(-1, -2) / (cfg.dim // cfg.num_heads) ** 0.5).softmax(-1)
        return F.linear((scores @ v).transpose(1, 2).flatten(2), attn.o.weight, attn.o.bias)

    with torch.no_grad():
        ours = attn.cross_attention(h, attn.kv(c), attn.kv(c + P), alpha)
        expected = ca(h, c) + alpha * ca(h, c + P)
    assert rel_err(ours, expected) <= 1e-5


def test_gradient_reaches_prompt_and_alpha_also_with_checkpointing():
    model = tiny_model().requires_grad_(False)  # frozen, as load_wan returns it
    x, t, context = inputs(B=1)
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        prompt = tiny_prompt(scale=0.5)
        prompt.prompt.requires_grad_(True)
        prompt.alpha.requires_grad_(True)
        model(x, t, context, prompt=prompt).square().mean().backward()
        assert prompt.prompt.grad.abs().sum() > 0 and (prompt.alpha.grad != 0).all()
        assert not any(p.grad is not None for p in model.parameters())  # the backbone stays frozen
        grads.append((prompt.prompt.grad, prompt.alpha.grad))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-7)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-7)


def test_precomputed_context_is_reused_and_prompt_is_padded():
    model = tiny_model()
    x, t, context = inputs()
    with torch.no_grad():
        ctx = model.precompute_context(context)
        assert isinstance(ctx, WanContext) and len(ctx.kv) == TINY.num_layers
        short = tiny_prompt(K=5, scale=0.8)  # K < L: zero-padded to L
        padded = SimpleNamespace(prompt=F.pad(short.prompt, (0, 0, 0, TINY.text_len - 5)), alpha=short.alpha)
        assert torch.equal(model(x, t, ctx), model(x, t, context))
        assert torch.equal(model(x, t, ctx, prompt=short), model(x, t, context, prompt=padded))
        long = tiny_prompt(K=TINY.text_len + 4, scale=0.8)  # K > L: truncated to L
        cut = SimpleNamespace(prompt=long.prompt[:, :TINY.text_len], alpha=long.alpha)
        assert torch.equal(model(x, t, ctx, prompt=long), model(x, t, ctx, prompt=cut))
        # a batch-1 context serves a batch of latents
        one = model.precompute_context(context[:1])
        assert rel_err(model(x, t, one), model(x, t, context[:1].expand(2, -1, -1))) <= 1e-6


# ---------------------------------------------------------------------------------------------
# Loading: original format (single file, sharded), diffusers format, config inference, errors
# ---------------------------------------------------------------------------------------------

def test_load_original_and_diffusers_formats(tmp_path):
    diffusers = pytest.importorskip("diffusers")  # noqa: F841
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    model = tiny_model()
    state = model.state_dict()
    save(state, tmp_path / "wan.safetensors", TINY)
    # original format, sharded with an index, as Wan2.1-T2V-14B ships
    shards = tmp_path / "sharded"
    shards.mkdir()
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save({k: state[k] for k in part}, shards / name, TINY)
        weight_map.update({k: name for k in part})
    (shards / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    # diffusers format: a repo folder with transformer/
    (tmp_path / "repo" / "transformer").mkdir(parents=True)
    save(convert_wan_transformer_to_diffusers(dict(state)),
         tmp_path / "repo" / "transformer" / "diffusion_pytorch_model.safetensors", TINY)

    x, t, context = inputs()
    with torch.no_grad():
        expected = model(x, t, context)
        for source in (tmp_path / "wan.safetensors", shards, tmp_path / "repo"):
            loaded = load_wan(source, dtype=torch.float32)
            assert loaded.config == TINY
            assert torch.equal(loaded(x, t, context), expected)


def test_bf16_load_keeps_fp32_islands(tmp_path, monkeypatch):
    if not torch.cuda.is_available():  # the Triton interpreter's bf16 dots are wrong (triton issue 11584)
        monkeypatch.setenv("MINIRESTORE_KERNELS", "torch")
    model = tiny_model()
    save(model.state_dict(), tmp_path / "wan.safetensors", TINY)
    loaded = load_wan(tmp_path / "wan.safetensors")  # default dtype bf16
    assert loaded.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    assert loaded.blocks[0].modulation.dtype == torch.float32
    assert loaded.time_embedding[0].weight.dtype == torch.float32
    assert torch.equal(loaded.head.head.weight, model.head.head.weight)  # read in fp32, not rounded
    x, t, context = inputs()
    with torch.no_grad():
        out = loaded(x, t, context)
        assert out.dtype == torch.float32
        assert rel_err(out, model(x, t, context)) < 5e-2


def test_config_inferred_from_shapes_with_head_dim_128(tmp_path):
    cfg = WanConfig(dim=256, ffn_dim=64, num_heads=2, num_layers=1, text_len=512, text_dim=16)
    model = tiny_model(cfg)
    save(model.state_dict(), tmp_path / "wan.safetensors")  # no metadata
    loaded = load_wan(tmp_path / "wan.safetensors", dtype=torch.float32)
    assert loaded.config == cfg
    tiny = tmp_path / "tiny.safetensors"
    save(tiny_model().state_dict(), tiny)  # width 32: the heads cannot be inferred
    with pytest.raises(UserError, match="heads"):
        load_wan(tiny)
    assert load_wan(tiny, config=TINY, dtype=torch.float32).config == TINY
    # the config.json that the reference's save_pretrained writes beside the weights gives the heads
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "WanModel", "dim": 32, "num_heads": 2,
                                                      "text_len": 16, "eps": 1e-6}))
    assert load_wan(tiny, dtype=torch.float32).config == TINY


def test_wrong_checkpoint_is_refused(tmp_path):
    save({"encoder.conv1.weight": torch.zeros(4, 3, 3, 3, 3)}, tmp_path / "vae.safetensors")
    with pytest.raises(UserError, match="not a Wan 2.1 transformer"):
        load_wan(tmp_path / "vae.safetensors")
    state = tiny_model().state_dict()
    del state["blocks.1.ffn.2.bias"]
    save(state, tmp_path / "broken.safetensors", TINY)
    with pytest.raises(UserError, match="missing keys: blocks.1.ffn.2.bias"):
        load_wan(tmp_path / "broken.safetensors")


def test_released_sizes_and_the_key_map_at_full_size():
    """Key and parameter counts of the released models (architectures.md 1 and 3.1), built on meta."""
    from minirestore.hub import wan_diffusers_key
    from minirestore.wan import WAN_PRESETS

    for name, keys, params in [("wan2.1-t2v-1.3b", 825, 1_418_996_800), ("wan2.1-t2v-14b", 1095, 14_288_491_584)]:
        with torch.device("meta"):
            state = WanModel(WAN_PRESETS[name]).state_dict()
        assert len(state) == keys and sum(v.numel() for v in state.values()) == params
    diffusers = pytest.importorskip("diffusers")  # noqa: F841
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    theirs = convert_wan_transformer_to_diffusers(dict(state))
    assert {wan_diffusers_key(k): v.shape for k, v in state.items()} == {k: v.shape for k, v in theirs.items()}
