"""Loaders for FLUX.1: the transformer (BFL and diffusers formats through one key map) and its autoencoder
(`ae.safetensors`). Source forms, streaming and errors: loading.py."""
import re
from pathlib import Path

import torch

from . import UserError
from .loading import Checkpoint, describe, load_model, resolve, weights_file

# name -> (Hub repo, file in the repo, size in bytes for messages, gated)
FLUX_HUB = {
    "flux-dev": ("black-forest-labs/FLUX.1-dev", "flux1-dev.safetensors", 23.8e9, True),
    "flux-schnell": ("black-forest-labs/FLUX.1-schnell", "flux1-schnell.safetensors", 23.8e9, False),
}
TINY_DIR = Path(__file__).resolve().parents[1] / "weights" / "tiny"  # flux.safetensors, or its shards and index
AE_HUB = {
    "flux-dev": ("black-forest-labs/FLUX.1-dev", "ae.safetensors", 335e6, True),
    "flux-schnell": ("black-forest-labs/FLUX.1-schnell", "ae.safetensors", 335e6, False),
}


# ---------------------------------------------------------------------------------------------
# FLUX.1 transformer
# ---------------------------------------------------------------------------------------------

def flux_config_from_shapes(shapes, preset=None):
    """Infer FluxConfig fields from BFL-format tensor shapes; axes_dim/theta from the preset if it fits."""
    from .flux import FluxConfig, FLUX_PRESETS, default_axes_dim

    needed = ["img_in.weight", "double_blocks.0.img_attn.norm.query_norm.scale", "final_layer.linear.weight",
              "vector_in.in_layer.weight", "txt_in.weight", "double_blocks.0.img_mlp.0.weight"]
    absent = [k for k in needed if k not in shapes]
    if absent:
        raise UserError(f"cannot infer the FLUX config: the checkpoint lacks {', '.join(absent)}; "
                        "it is incomplete or not a FLUX transformer")
    hidden, in_channels = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    base = FLUX_PRESETS[preset] if preset else None
    if base is not None and sum(base.axes_dim) != head_dim:  # e.g. a tiny test model under a Hub name
        base = None
    return FluxConfig(
        in_channels=in_channels,
        out_channels=shapes["final_layer.linear.weight"][0],
        vec_in_dim=shapes["vector_in.in_layer.weight"][1],
        context_in_dim=shapes["txt_in.weight"][1],
        hidden_size=hidden,
        mlp_ratio=shapes["double_blocks.0.img_mlp.0.weight"][0] / hidden,
        num_heads=hidden // head_dim,
        depth=len({k.split(".")[1] for k in shapes if k.startswith("double_blocks.")}),
        depth_single_blocks=len({k.split(".")[1] for k in shapes if k.startswith("single_blocks.")}),
        axes_dim=list(base.axes_dim) if base else default_axes_dim(head_dim),
        theta=base.theta if base else 10_000,
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes,
        guidance_embed="guidance_in.in_layer.weight" in shapes,
    )


def flux_diffusers_map(config):
    """BFL key -> (diffusers keys, combine): the one map between the two formats (architectures.md 2.10)."""
    cat = lambda ts: torch.cat(ts, dim=0)  # noqa: E731  fused projections are row blocks
    swap = lambda ts: torch.cat(ts[0].chunk(2, dim=0)[::-1], dim=0)  # noqa: E731  [scale; shift] -> [shift; scale]
    m = {}

    def lin(bfl, diff, bias=True):
        m[f"{bfl}.weight"] = ([f"{diff}.weight"], None)
        if bias:
            m[f"{bfl}.bias"] = ([f"{diff}.bias"], None)

    lin("img_in", "x_embedder")
    lin("txt_in", "context_embedder")
    for bfl, diff in [("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                      ("guidance_in", "guidance_embedder")]:
        if bfl == "guidance_in" and not config.guidance_embed:
            continue
        lin(f"{bfl}.in_layer", f"time_text_embed.{diff}.linear_1")
        lin(f"{bfl}.out_layer", f"time_text_embed.{diff}.linear_2")
    for i in range(config.depth):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        lin(f"{b}.img_mod.lin", f"{d}.norm1.linear")
        lin(f"{b}.txt_mod.lin", f"{d}.norm1_context.linear")
        for stream, (q, k, v), (nq, nk), out, ff in [
            ("img", ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"), "to_out.0", "ff"),
            ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"), ("norm_added_q", "norm_added_k"),
             "to_add_out", "ff_context"),
        ]:
            for p in ["weight"] + (["bias"] if config.qkv_bias else []):
                m[f"{b}.{stream}_attn.qkv.{p}"] = ([f"{d}.attn.{x}.{p}" for x in (q, k, v)], cat)
            m[f"{b}.{stream}_attn.norm.query_norm.scale"] = ([f"{d}.attn.{nq}.weight"], None)
            m[f"{b}.{stream}_attn.norm.key_norm.scale"] = ([f"{d}.attn.{nk}.weight"], None)
            lin(f"{b}.{stream}_attn.proj", f"{d}.attn.{out}")
            lin(f"{b}.{stream}_mlp.0", f"{d}.{ff}.net.0.proj")
            lin(f"{b}.{stream}_mlp.2", f"{d}.{ff}.net.2")
    for i in range(config.depth_single_blocks):
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        for p in ("weight", "bias"):
            m[f"{b}.linear1.{p}"] = ([f"{d}.attn.to_{x}.{p}" for x in "qkv"] + [f"{d}.proj_mlp.{p}"], cat)
        lin(f"{b}.linear2", f"{d}.proj_out")
        m[f"{b}.norm.query_norm.scale"] = ([f"{d}.attn.norm_q.weight"], None)
        m[f"{b}.norm.key_norm.scale"] = ([f"{d}.attn.norm_k.weight"], None)
        lin(f"{b}.modulation.lin", f"{d}.norm.linear")
    lin("final_layer.linear", "proj_out")
    for p in ("weight", "bias"):
        m[f"final_layer.adaLN_modulation.1.{p}"] = ([f"norm_out.linear.{p}"], swap)
    return m


def _flux_shapes_from_diffusers(shapes):
    """Enough BFL-format shapes to infer a config from a diffusers-format file."""
    needed = ["x_embedder.weight", "transformer_blocks.0.attn.norm_q.weight", "proj_out.weight",
              "context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight",
              "transformer_blocks.0.ff.net.0.proj.weight"]
    absent = [k for k in needed if k not in shapes]
    if absent:
        raise UserError(f"cannot infer the FLUX config: the checkpoint lacks {', '.join(absent)}; "
                        "it is incomplete or not a FLUX transformer")
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    out = {
        "img_in.weight": shapes["x_embedder.weight"],
        "final_layer.linear.weight": shapes["proj_out.weight"],
        "vector_in.in_layer.weight": shapes["time_text_embed.text_embedder.linear_1.weight"],
        "txt_in.weight": shapes["context_embedder.weight"],
        "double_blocks.0.img_mlp.0.weight": shapes["transformer_blocks.0.ff.net.0.proj.weight"],
        "double_blocks.0.img_attn.norm.query_norm.scale": (head_dim,),
    }
    for k in shapes:
        if m := re.match(r"transformer_blocks\.(\d+)\.", k):
            out[f"double_blocks.{m.group(1)}.x"] = ()
        if m := re.match(r"single_transformer_blocks\.(\d+)\.", k):
            out[f"single_blocks.{m.group(1)}.x"] = ()
    if "transformer_blocks.0.attn.to_q.bias" in shapes:
        out["double_blocks.0.img_attn.qkv.bias"] = ()
    if "time_text_embed.guidance_embedder.linear_1.weight" in shapes:
        out["guidance_in.in_layer.weight"] = ()
    return out


def load_flux(source, config=None, device="cpu", dtype=torch.bfloat16, filename=None, quantise=None):
    """Load a FLUX.1 transformer from a BFL file, a diffusers `transformer/` folder or a Hub name.

    source: "flux-dev", "flux-schnell", "black-forest-labs/FLUX.1-dev", a local .safetensors file,
    a local folder (a diffusers repo or its `transformer/` folder), or a repo id with `filename`.
    config=None infers the FluxConfig from the tensor shapes (and the preset for axes_dim/theta).
    quantise: see loading.load_model (fp8.targets stores the blocks' linears in fp8).
    """
    from .flux import Flux, FluxConfig

    if str(source) == "tiny":  # the embedded default, shipped in the repository's weights/tiny/
        source = weights_file(TINY_DIR, "flux")
        if not source.exists():
            raise UserError(f"the tiny default is not in {source.parent}: reproduce it with `python -m minirestore.pretrain`")
    files = resolve(source, FLUX_HUB, hub_subfolder="transformer", filename=filename)
    files = [f for f in files if f.stem != "ae"] or files  # a local copy of a BFL repo holds both
    ckpt = Checkpoint(files)
    preset = next((n for n, (repo, *_) in FLUX_HUB.items() if str(source) in (n, repo)), None)
    diffusers = "x_embedder.weight" in ckpt.shapes
    if not diffusers and "img_in.weight" not in ckpt.shapes:
        raise UserError(f"{ckpt.files[0]} is not a FLUX transformer (it has neither img_in.weight nor "
                        f"x_embedder.weight); it looks like {describe(ckpt.shapes)}")
    if config is None:
        stored = ckpt.config()
        if stored:
            config = FluxConfig(**stored)
        else:
            shapes = _flux_shapes_from_diffusers(ckpt.shapes) if diffusers else ckpt.shapes
            config = flux_config_from_shapes(shapes, preset)
    key_map = flux_diffusers_map(config) if diffusers else None
    return load_model(lambda: Flux(config), ckpt, key_map, what="a FLUX transformer",
                      device=device, dtype=dtype, quantise=quantise)


# ---------------------------------------------------------------------------------------------
# FLUX autoencoder
# ---------------------------------------------------------------------------------------------

def autoencoder_config_from_shapes(shapes):
    from .autoencoder import AutoEncoderConfig

    ch, in_channels = shapes["encoder.conv_in.weight"][:2]
    levels = len({k.split(".")[2] for k in shapes if k.startswith("encoder.down.")})
    ch_mult = [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(levels)]
    return AutoEncoderConfig(
        resolution=256,
        in_channels=in_channels,
        ch=ch,
        out_ch=shapes["decoder.conv_out.weight"][0],
        ch_mult=ch_mult,
        num_res_blocks=len({k.split(".")[4] for k in shapes if k.startswith("encoder.down.0.block.")}),
        z_channels=shapes["decoder.conv_in.weight"][1],
        scale_factor=0.3611,
        shift_factor=0.1159,
    )


def load_autoencoder(source, config=None, device="cpu", dtype=torch.float32, filename=None):
    """Load the FLUX autoencoder from `ae.safetensors` (BFL keys): a file, a folder or a Hub name."""
    from .autoencoder import AutoEncoder, AutoEncoderConfig

    files = resolve(source, AE_HUB, filename=filename)
    if len(files) > 1:
        files = [f for f in files if f.stem == "ae"] or files
    ckpt = Checkpoint(files)
    if "encoder.conv_in.weight" not in ckpt.shapes or "decoder.conv_in.weight" not in ckpt.shapes:
        raise UserError(f"{ckpt.files[0]} is {describe(ckpt.shapes)}, not a FLUX autoencoder")
    if config is None:
        stored = ckpt.config()
        config = AutoEncoderConfig(**stored) if stored else autoencoder_config_from_shapes(ckpt.shapes)
    return load_model(lambda: AutoEncoder(config), ckpt, what="a FLUX autoencoder", device=device, dtype=dtype)
