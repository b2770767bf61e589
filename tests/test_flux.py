"""FLUX.1 transformer: parity with diffusers, the learned prompt, sampler helpers.

The diffusers model is the independent reference: its weights are randomised everywhere and moved to
the BFL layout by this file's own conversion (architectures.md 2.10), not by minirestore.hub.
"""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from minirestore.flux import (
    FLUX_PRESETS, Flux, FluxConfig, default_axes_dim, generate, get_schedule, pack, prepare_ids, rope, unpack,
)

HIDDEN, HEADS, DEPTH, SINGLE, IN, VEC, CTX = 64, 4, 2, 2, 64, 32, 32
LAT_H, LAT_W = 10, 14  # latent pixels -> 5 x 7 image tokens: small, non-square, not a power of two
L_TXT = 7


def tiny_config(guidance=True, depth=DEPTH, single=SINGLE):
    return FluxConfig(in_channels=IN, out_channels=IN, vec_in_dim=VEC, context_in_dim=CTX, hidden_size=HIDDEN,
                      mlp_ratio=4.0, num_heads=HEADS, depth=depth, depth_single_blocks=single,
                      axes_dim=[4, 6, 6], theta=10_000, qkv_bias=True, guidance_embed=guidance)


def randomise(module, seed):
    """Every parameter random: the reference initialisers leave zeros that hide ordering bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm_scale = name.endswith("_norm.scale") or (".attn.norm_" in name)  # BFL / diffusers QK norms
            p.copy_(1 + 0.1 * noise if is_norm_scale else 0.1 * noise)
    return module


def tiny_flux(guidance=True, depth=DEPTH, single=SINGLE, seed=0):
    return randomise(Flux(tiny_config(guidance, depth, single)), seed).requires_grad_(False)


def inputs(B=2, guidance=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    L_img = (LAT_H // 2) * (LAT_W // 2)
    # Random integer ids on every axis, shared across the batch (diffusers takes 2-D ids).
    img_ids = torch.randint(0, 12, (L_img, 3), generator=g).float()
    txt_ids = torch.randint(0, 4, (L_TXT, 3), generator=g).float()
    return dict(
        img=torch.randn(B, L_img, IN, generator=g), img_ids=img_ids.expand(B, -1, -1),
        txt=torch.randn(B, L_TXT, CTX, generator=g), txt_ids=txt_ids.expand(B, -1, -1),
        timesteps=torch.rand(B, generator=g), y=torch.randn(B, VEC, generator=g),
        guidance=(1 + 4 * torch.rand(B, generator=g)) if guidance else None,
    )


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------
# diffusers -> BFL, written from architectures.md 2.10 (independent of minirestore.hub)
# ---------------------------------------------------------------------------------------------

def bfl_from_diffusers(sd, depth, single):
    out = {}

    def move(bfl, diff):
        for p in ("weight", "bias"):
            if f"{diff}.{p}" in sd:
                out[f"{bfl}.{p}"] = sd[f"{diff}.{p}"]

    move("img_in", "x_embedder")
    move("txt_in", "context_embedder")
    for bfl, diff in [("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                      ("guidance_in", "guidance_embedder")]:
        move(f"{bfl}.in_layer", f"time_text_embed.{diff}.linear_1")
        move(f"{bfl}.out_layer", f"time_text_embed.{diff}.linear_2")
    for i in range(depth):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}.attn"
        move(f"{b}.img_mod.lin", f"transformer_blocks.{i}.norm1.linear")
        move(f"{b}.txt_mod.lin", f"transformer_blocks.{i}.norm1_context.linear")
        for p in ("weight", "bias"):
            out[f"{b}.img_attn.qkv.{p}"] = torch.cat([sd[f"{d}.to_{x}.{p}"] for x in "qkv"])
            out[f"{b}.txt_attn.qkv.{p}"] = torch.cat([sd[f"{d}.add_{x}_proj.{p}"] for x in "qkv"])
        out[f"{b}.img_attn.norm.query_norm.scale"] = sd[f"{d}.norm_q.weight"]
        out[f"{b}.img_attn.norm.key_norm.scale"] = sd[f"{d}.norm_k.weight"]
        out[f"{b}.txt_attn.norm.query_norm.scale"] = sd[f"{d}.norm_added_q.weight"]
        out[f"{b}.txt_attn.norm.key_norm.scale"] = sd[f"{d}.norm_added_k.weight"]
        move(f"{b}.img_attn.proj", f"{d}.to_out.0")
        move(f"{b}.txt_attn.proj", f"{d}.to_add_out")
        move(f"{b}.img_mlp.0", f"transformer_blocks.{i}.ff.net.0.proj")
        move(f"{b}.img_mlp.2", f"transformer_blocks.{i}.ff.net.2")
        move(f"{b}.txt_mlp.0", f"transformer_blocks.{i}.ff_context.net.0.proj")
        move(f"{b}.txt_mlp.2", f"transformer_blocks.{i}.ff_context.net.2")
    for i in range(single):
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        for p in ("weight", "bias"):
            out[f"{b}.linear1.{p}"] = torch.cat([sd[f"{d}.attn.to_{x}.{p}"] for x in "qkv"]
                                                + [sd[f"{d}.proj_mlp.{p}"]])
        move(f"{b}.linear2", f"{d}.proj_out")
        out[f"{b}.norm.query_norm.scale"] = sd[f"{d}.attn.norm_q.weight"]
        out[f"{b}.norm.key_norm.scale"] = sd[f"{d}.attn.norm_k.weight"]
        move(f"{b}.modulation.lin", f"{d}.norm.linear")
    move("final_layer.linear", "proj_out")
    for p in ("weight", "bias"):
        scale, shift = sd[f"norm_out.linear.{p}"].chunk(2)  # diffusers [scale; shift], BFL [shift; scale]
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale])
    return out


def diffusers_pair(guidance, seed=0):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=IN, num_layers=DEPTH, num_single_layers=SINGLE, attention_head_dim=HIDDEN // HEADS,
        num_attention_heads=HEADS, joint_attention_dim=CTX, pooled_projection_dim=VEC, guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6))
    ref = randomise(ref, seed).eval()
    ours = Flux(tiny_config(guidance))
    ours.load_state_dict(bfl_from_diffusers(ref.state_dict(), DEPTH, SINGLE), strict=True)
    return ref, ours.requires_grad_(False)


def run_diffusers(ref, x):
    return ref(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
               timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
               guidance=x["guidance"], return_dict=False)[0]


@pytest.mark.parametrize("guidance", [True, False])
def test_parity_with_diffusers(guidance):
    ref, ours = diffusers_pair(guidance)
    x = inputs(guidance=guidance)
    with torch.no_grad():
        expected, got = run_diffusers(ref, x), ours(**x)
    assert got.shape == (2, (LAT_H // 2) * (LAT_W // 2), IN)
    assert rel_err(got, expected) <= 1e-5


def prompt_hooks(ref, P, alpha):
    """The official injection on diffusers' attention modules (paper.md 3.3): P zero-padded or truncated
    to L_txt; double blocks attend with txt_norm + alpha P, single blocks add alpha P to the first L_txt
    tokens of the attention input only."""
    P = F.pad(P, (0, 0, 0, max(0, L_TXT - P.shape[1])))[:, :L_TXT]
    handles = []
    for i, block in enumerate(ref.transformer_blocks):
        def double(module, args, kwargs, a=alpha[i]):
            kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"] + a * P
            return args, kwargs
        handles.append(block.attn.register_forward_pre_hook(double, with_kwargs=True))
    for j, block in enumerate(ref.single_transformer_blocks):
        def single(module, args, kwargs, a=alpha[DEPTH + j]):
            h = kwargs["hidden_states"]
            kwargs["hidden_states"] = torch.cat([h[:, :L_TXT] + a * P, h[:, L_TXT:]], dim=1)
            return args, kwargs
        handles.append(block.attn.register_forward_pre_hook(single, with_kwargs=True))
    return handles


@pytest.mark.parametrize("K", [L_TXT, 4, 11])  # equal, zero-padded, truncated
def test_prompt_matches_official_injection(K):
    ref, ours = diffusers_pair(guidance=True)
    x = inputs()
    g = torch.Generator().manual_seed(5)
    prompt = SimpleNamespace(prompt=0.5 * torch.randn(1, K, HIDDEN, generator=g),
                             alpha=torch.randn(DEPTH + SINGLE, generator=g))
    with torch.no_grad():
        got = ours(**x, prompt=prompt)
        prompt_hooks(ref, prompt.prompt, prompt.alpha)
        expected = run_diffusers(ref, x)
        plain = ours(**x)
    assert rel_err(got, expected) <= 1e-5
    assert rel_err(got, plain) > 1e-3  # the prompt does something


def test_prompt_alpha_zero_is_the_plain_model_and_gradients():
    model = tiny_flux()
    x = inputs()
    P = torch.randn(1, L_TXT, HIDDEN, requires_grad=True)
    alpha = torch.zeros(DEPTH + SINGLE, requires_grad=True)
    prompt = SimpleNamespace(prompt=P, alpha=alpha)
    out = model(**x, prompt=prompt)
    assert torch.equal(out, model(**x))
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    # At alpha = 0, P reaches the output only through alpha: its gradient is exactly zero.
    assert torch.count_nonzero(P.grad) == 0
    assert alpha.grad.abs().min() > 0  # every block's gate gets a gradient
    assert all(p.grad is None for p in model.parameters())

    # Each gate acts on its own block: changing one alpha changes the output.
    for i in range(DEPTH + SINGLE):
        a = torch.zeros(DEPTH + SINGLE)
        a[i] = 0.5
        with torch.no_grad():
            assert rel_err(model(**x, prompt=SimpleNamespace(prompt=P.detach(), alpha=a)), out.detach()) > 1e-4

    P.grad, alpha.grad = None, None
    alpha.data.fill_(0.3)
    (model(**x, prompt=prompt) * weights).sum().backward()
    assert P.grad.abs().sum() > 0


def manual_rope(x, ids, axes_dim, theta):
    """Rotate interleaved channel pairs as complex numbers: (x0 + i x1) * exp(i pos omega). x [B, H, L, D]."""
    freqs = torch.cat([ids[..., a:a + 1].double() * theta ** (-torch.arange(0, d, 2).double() / d)
                       for a, d in enumerate(axes_dim)], dim=-1)  # [B, L, D/2]
    rot = torch.polar(torch.ones_like(freqs), freqs)[:, None].to(torch.complex64)
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * rot).flatten(-2)


def test_double_block_injection_by_hand():
    """A double block with the prompt, against the paper's equations written out with plain torch ops."""
    model = tiny_flux(depth=1, single=0)
    block = model.double_blocks[0]
    g = torch.Generator().manual_seed(3)
    B, L_img = 2, 9
    img, txt = torch.randn(B, L_img, HIDDEN, generator=g), torch.randn(B, L_TXT, HIDDEN, generator=g)
    vec = torch.randn(B, HIDDEN, generator=g)
    ids = torch.randint(0, 6, (B, L_TXT + L_img, 3), generator=g).float()
    P, alpha = torch.randn(1, L_TXT, HIDDEN, generator=g), torch.tensor(0.7)

    with torch.no_grad():
        got_img, got_txt = block(img, txt, vec, rope(ids, [4, 6, 6], 10_000), P, alpha)

        def mod(m):
            return [c[:, None] for c in m.lin(F.silu(vec)).chunk(6, dim=-1)]

        def norm(x, shift, scale):
            return (1 + scale) * F.layer_norm(x, (HIDDEN,), eps=1e-6) + shift

        def qkv(attn, x):
            q, k, v = attn.qkv(x).reshape(B, x.shape[1], 3, HEADS, -1).permute(2, 0, 3, 1, 4)
            rms = lambda t, w: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * w  # noqa: E731
            return rms(q, attn.norm.query_norm.scale), rms(k, attn.norm.key_norm.scale), v

        im, tm = mod(block.img_mod), mod(block.txt_mod)
        tq, tk, tv = qkv(block.txt_attn, norm(txt, tm[0], tm[1]) + alpha * P)  # txt_mod + alpha_l P
        iq, ik, iv = qkv(block.img_attn, norm(img, im[0], im[1]))
        q = manual_rope(torch.cat([tq, iq], 2), ids, [4, 6, 6], 10_000)
        k = manual_rope(torch.cat([tk, ik], 2), ids, [4, 6, 6], 10_000)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(HIDDEN // HEADS), dim=-1)
        o = (w @ torch.cat([tv, iv], 2)).transpose(1, 2).reshape(B, -1, HIDDEN)
        exp_img = img + im[2] * block.img_attn.proj(o[:, L_TXT:])
        exp_img = exp_img + im[5] * block.img_mlp(norm(exp_img, im[3], im[4]))
        exp_txt = txt + tm[2] * block.txt_attn.proj(o[:, :L_TXT])  # residual stream without P
        exp_txt = exp_txt + tm[5] * block.txt_mlp(norm(exp_txt, tm[3], tm[4]))
    assert rel_err(got_img, exp_img) <= 1e-5
    assert rel_err(got_txt, exp_txt) <= 1e-5


def test_gradient_checkpointing_same_result():
    model = tiny_flux()
    x = inputs()
    calls = []
    model.double_blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    results = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        P = torch.randn(1, L_TXT, HIDDEN, generator=torch.Generator().manual_seed(0), requires_grad=True)
        alpha = torch.full((DEPTH + SINGLE,), 0.3, requires_grad=True)
        calls.clear()
        out = model(**x, prompt=SimpleNamespace(prompt=P, alpha=alpha))
        out.square().mean().backward()
        results.append((out.detach(), P.grad, alpha.grad, len(calls)))
    (o0, p0, a0, n0), (o1, p1, a1, n1) = results
    assert (n0, n1) == (1, 2)  # checkpointing re-runs the block in backward
    assert torch.equal(o0, o1)
    assert rel_err(p1, p0) <= 1e-6 and rel_err(a1, a0) <= 1e-6


def test_guidance_required_for_dev():
    model = tiny_flux(guidance=True)
    x = inputs(guidance=False)
    with pytest.raises(ValueError, match="guidance"):
        model(**x)
    schnell = tiny_flux(guidance=False)
    with torch.no_grad():  # schnell ignores guidance
        assert torch.equal(schnell(**x), schnell(**{**x, "guidance": torch.ones(2)}))


def test_config_presets_and_axes():
    assert default_axes_dim(128) == [16, 56, 56]
    assert default_axes_dim(16) == [4, 6, 6]
    for d in (16, 32, 64, 96, 128):
        a = default_axes_dim(d)
        assert sum(a) == d and all(v % 2 == 0 and v > 0 for v in a)
    assert FLUX_PRESETS["flux-dev"].guidance_embed and not FLUX_PRESETS["flux-schnell"].guidance_embed
    assert FLUX_PRESETS["flux-dev"].hidden_size == 3072 and FLUX_PRESETS["flux-dev"].depth_single_blocks == 38
    with torch.device("meta"):
        n = sum(p.numel() for p in Flux(FLUX_PRESETS["flux-dev"]).parameters())
        keys = len(Flux(FLUX_PRESETS["flux-schnell"]).state_dict())
    assert n == 11_901_408_320 and keys == 776  # architectures.md 1 and 2.3
    assert not list(Flux(tiny_config()).buffers())  # the model is built on meta and filled from a file


# ---------------------------------------------------------------------------------------------
# Sampling helpers
# ---------------------------------------------------------------------------------------------

def test_pack_unpack():
    z = torch.randn(2, 16, 6, 10)
    x = pack(z)
    assert x.shape == (2, 15, 64)
    b, r, c, ch, ph, pw = 1, 2, 3, 5, 1, 0  # token row-major over patches; features (c, ph, pw), c slowest
    assert x[b, r * 5 + c, ch * 4 + ph * 2 + pw] == z[b, ch, 2 * r + ph, 2 * c + pw]
    assert torch.equal(unpack(x, 6, 10), z)
    img_ids, txt_ids = prepare_ids(2, 6, 10, txt_len=4)
    assert img_ids.shape == (2, 15, 3) and torch.equal(txt_ids, torch.zeros(2, 4, 3))
    assert img_ids[1, r * 5 + c].tolist() == [0.0, r, c]


def test_schedule():
    dev = get_schedule(4, 4096)
    assert dev == pytest.approx([1, 0.9045, 0.7595, 0.5128, 0], abs=1e-4)
    assert get_schedule(4, 4096, shift=False) == pytest.approx([1, 0.75, 0.5, 0.25, 0])
    mu = 0.63  # at L = 1024: t' = e^mu / (e^mu + 1/t - 1)
    assert get_schedule(2, 1024)[1] == pytest.approx(math.exp(mu) / (math.exp(mu) + 1), abs=1e-4)


@pytest.mark.parametrize("guidance", [True, False])
def test_generate(guidance):
    model = tiny_flux(guidance=guidance)
    g = torch.Generator().manual_seed(7)
    txt, y = torch.randn(2, L_TXT, CTX, generator=g), torch.randn(2, VEC, generator=g)
    a = generate(model, txt, y, height=40, width=72, num_steps=3, guidance=3.5, seed=1)
    assert a.shape == (2, 16, 6, 10) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, generate(model, txt, y, height=40, width=72, num_steps=3, guidance=3.5, seed=1))
    assert not torch.allclose(a, generate(model, txt, y, height=40, width=72, num_steps=3, guidance=3.5, seed=2))

    # One step is x_0 = noise - v(noise, t=1).
    one = generate(model, txt, y, height=40, width=72, num_steps=1, guidance=3.5, seed=1)
    noise = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(1))
    img_ids, txt_ids = prepare_ids(2, 6, 10, L_TXT)
    with torch.no_grad():
        v = model(pack(noise), img_ids, txt, txt_ids, torch.ones(2), y,
                  guidance=torch.full((2,), 3.5) if guidance else None)
    assert torch.allclose(one, unpack(pack(noise) - v, 6, 10), atol=1e-6)
