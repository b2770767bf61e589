"""Loaders for Wan 2.1: the DiT (original and diffusers formats through one key map) and its VAE
(`Wan2.1_VAE.pth` or the -Diffusers `vae/` safetensors). Same source forms, streaming and errors as
`hub_flux.load_flux` (loading.py); `minirestore.hub` gathers the public names."""
import json
import re
from pathlib import Path

import torch

from . import UserError
from .loading import (Checkpoint, TorchCheckpoint, describe, hub_file, hub_message, load_model, resolve,
                      safetensors_files)


# name -> (original-format repo, diffusers-format repo, size of the DiT in bytes for messages)
WAN_HUB = {
    "wan2.1-t2v-1.3b": ("Wan-AI/Wan2.1-T2V-1.3B", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 5.68e9),
    "wan2.1-t2v-14b": ("Wan-AI/Wan2.1-T2V-14B", "Wan-AI/Wan2.1-T2V-14B-Diffusers", 57.2e9),
}
WAN_VAE_PTH = "Wan2.1_VAE.pth"  # the VAE in the original repos (a pickle, 508 MB)
WAN_VAE_SAFETENSORS = "vae/diffusion_pytorch_model.safetensors"  # the same weights in the -Diffusers repos


def _wan_rules():
    """Original Wan transformer key -> diffusers key, as (regex, replacement); the first match applies."""
    rules = [
        (r"time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
        (r"time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
        (r"time_projection\.1\.", "condition_embedder.time_proj."),
        (r"text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
        (r"text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
        (r"head\.modulation$", "scale_shift_table"),
        (r"head\.head\.", "proj_out."),
        (r"blocks\.(\d+)\.modulation$", r"blocks.\1.scale_shift_table"),
        (r"blocks\.(\d+)\.norm3\.", r"blocks.\1.norm2."),  # diffusers swaps norm2/norm3 (trap 10)
        (r"blocks\.(\d+)\.ffn\.0\.", r"blocks.\1.ffn.net.0.proj."),
        (r"blocks\.(\d+)\.ffn\.2\.", r"blocks.\1.ffn.net.2."),
    ]
    for ours, theirs in (("self_attn", "attn1"), ("cross_attn", "attn2")):
        rules += [(rf"blocks\.(\d+)\.{ours}\.([qkv])\.", rf"blocks.\1.{theirs}.to_\2."),
                  (rf"blocks\.(\d+)\.{ours}\.o\.", rf"blocks.\1.{theirs}.to_out.0."),
                  (rf"blocks\.(\d+)\.{ours}\.", rf"blocks.\1.{theirs}.")]  # norm_q, norm_k
    return [(re.compile(p), r) for p, r in rules]


WAN_DIFFUSERS_RULES = _wan_rules()


def wan_diffusers_key(key):
    """The one map between the two Wan transformer formats (architectures.md 3.10): original -> diffusers."""
    for pattern, repl in WAN_DIFFUSERS_RULES:
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return key  # patch_embedding.*


def wan_config_from_shapes(shapes, rename=lambda k: k, preset="wan2.1-t2v-1.3b", config_json=None):
    """WanConfig from tensor shapes (original key names through `rename`).

    The number of heads is not in any shape: it comes from a `config.json` beside the weights when
    there is one (`num_heads` in the original format, `num_attention_heads` in diffusers'), else it
    assumes head_dim 128, as in every released Wan 2.1 model. text_len comes from config.json or the preset.
    """
    from .wan import WAN_PRESETS, WanConfig

    def shape(key):
        return shapes[rename(key)]

    hints = config_json or {}
    dim, in_dim, *patch_size = shape("patch_embedding.weight")
    num_heads = hints.get("num_heads") or hints.get("num_attention_heads")
    if num_heads is None and dim % 128:
        raise UserError(f"cannot infer the number of heads of a Wan model of width {dim} (not a multiple of "
                        "head_dim 128): pass a WanConfig, put its config.json beside the weights, or save "
                        "the checkpoint with minirestore_config metadata")
    return WanConfig(
        dim=dim,
        ffn_dim=shape("blocks.0.ffn.0.weight")[0],
        num_heads=num_heads or dim // 128,
        num_layers=len({m.group(1) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}),
        patch_size=tuple(patch_size),
        in_dim=in_dim,
        out_dim=shape("head.head.weight")[0] // (patch_size[0] * patch_size[1] * patch_size[2]),
        text_len=hints.get("text_len", WAN_PRESETS[preset].text_len),
        text_dim=shape("text_embedding.0.weight")[1],
        freq_dim=shape("time_embedding.0.weight")[1],
        qk_norm=rename("blocks.0.self_attn.norm_q.weight") in shapes,
        cross_attn_norm=rename("blocks.0.norm3.weight") in shapes,
        eps=hints.get("eps", 1e-6),
    )


def _config_json(files):
    """The config.json beside the weights (written by save_pretrained in both formats), or None."""
    path = Path(files[0]).parent / "config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _hub_snapshot(repo_id, patterns, size=None):
    """Download (or find in the cache) the files of a Hub repo that match `patterns`; its local folder."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise UserError(hub_message(repo_id, patterns[0], size, False, e)) from None


def _wan_files(source, filename):
    if filename is not None:
        return resolve(source, filename=filename)
    for name, (repo, _, size) in WAN_HUB.items():
        if str(source) in (name, repo):  # the original repo: one file (1.3B) or shards and an index (14B)
            return safetensors_files(_hub_snapshot(repo, ["diffusion_pytorch_model*", "config.json"], size))
    return resolve(source, hub_subfolder="transformer")  # a file, a folder, a -Diffusers repo id


def load_wan(source, config=None, device="cpu", dtype=torch.bfloat16, filename=None, quantise=None):
    """Load a Wan 2.1 transformer from the original format or the diffusers format.

    source: "wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "Wan-AI/Wan2.1-T2V-1.3B" (original keys,
    `diffusion_pytorch_model*.safetensors`), "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" (its `transformer/`),
    a local .safetensors file or folder of either format (sharded with an index or not), or a repo id
    with `filename`. config=None: the `minirestore_config` metadata if present, else inferred from the
    shapes, with the heads from a config.json beside the weights or else head_dim 128 (true of the
    released models; tiny ones need the metadata, a config.json or a config).
    The big weights are cast to `dtype`; the small fp32 islands of the reference (time embedding,
    modulation, norms, head: `wan.FP32_PARAMS`) stay in fp32. quantise: see loading.load_model (fp8.targets).
    """
    from .wan import FP32_PARAMS, WanConfig, WanModel

    ckpt = Checkpoint(_wan_files(source, filename))
    diffusers = "condition_embedder.time_proj.weight" in ckpt.shapes
    if not diffusers and "time_projection.1.weight" not in ckpt.shapes:
        raise UserError(f"{ckpt.files[0]} is {describe(ckpt.shapes)}, not a Wan 2.1 transformer")
    rename = wan_diffusers_key if diffusers else (lambda k: k)
    if config is None:
        stored = ckpt.config()
        config = WanConfig(**stored) if stored else wan_config_from_shapes(
            ckpt.shapes, rename, config_json=_config_json(ckpt.files))
    with torch.device("meta"):
        keys = list(WanModel(config).state_dict())
    key_map = {k: ([rename(k)], None) for k in keys}
    model = load_model(lambda: WanModel(config), ckpt, key_map, what="a Wan 2.1 transformer",
                       device=device, dtype=dtype, quantise=quantise)
    if dtype != torch.float32:
        for name, p in model.named_parameters():
            if FP32_PARAMS.fullmatch(name):
                p.data = ckpt.get(rename(name)).to(device=device, dtype=torch.float32)
    return model


# --- Wan 2.1 VAE ------------------------------------------------------------------------------

_WAN_VAE_RES = [("residual.0.gamma", "norm1.gamma"), ("residual.2.", "conv1."), ("residual.3.gamma", "norm2.gamma"),
                ("residual.6.", "conv2."), ("shortcut.", "conv_shortcut.")]


def wan_vae_diffusers_key(key, config=None):
    """Original Wan VAE key -> diffusers `AutoencoderKLWan` key (architectures.md 3.10).

    config (a WanVAEConfig) is needed for decoder.upsamples.* only: the diffusers decoder groups them
    into levels of num_res_blocks + 1 resnets and one upsampler.
    """
    def res(tail):  # inside a residual block; resample.1 and time_conv keep their names
        for a, b in _WAN_VAE_RES:
            if tail.startswith(a):
                return b + tail[len(a):]
        return tail

    for a, b in (("conv1.", "quant_conv."), ("conv2.", "post_quant_conv.")):
        if key.startswith(a):
            return b + key[len(a):]
    part, rest = key.split(".", 1)
    for a, b in (("conv1.", "conv_in."), ("head.0.", "norm_out."), ("head.2.", "conv_out.")):
        if rest.startswith(a):
            return f"{part}.{b}{rest[len(a):]}"
    if m := re.match(r"middle\.(\d)\.(.*)", rest):
        i, tail = int(m.group(1)), m.group(2)
        return f"{part}.mid_block." + ("attentions.0." + tail if i == 1 else f"resnets.{i // 2}." + res(tail))
    if m := re.match(r"downsamples\.(\d+)\.(.*)", rest):
        return f"encoder.down_blocks.{m.group(1)}." + res(m.group(2))
    if m := re.match(r"upsamples\.(\d+)\.(.*)", rest):
        level, j = divmod(int(m.group(1)), config.num_res_blocks + 2)
        if j <= config.num_res_blocks:
            return f"decoder.up_blocks.{level}.resnets.{j}." + res(m.group(2))
        return f"decoder.up_blocks.{level}.upsamplers.0.{m.group(2)}"
    return key


def wan_vae_config_from_shapes(shapes, rename=lambda k: k):
    """WanVAEConfig from the encoder's shapes (original key names through `rename`)."""
    from .wan_vae import WanVAEConfig

    def has(key):
        return rename(key) in shapes

    dim = shapes[rename("encoder.conv1.weight")][0]
    mults, temporal, blocks_per_level, blocks, k = [], [], [], 0, 0
    while True:
        prefix = f"encoder.downsamples.{k}."
        if has(prefix + "resample.1.weight"):
            mults.append(shapes[rename(prefix + "resample.1.weight")][0] // dim)
            temporal.append(has(prefix + "time_conv.weight"))
            blocks_per_level.append(blocks)
            blocks = 0
        elif has(prefix + "residual.2.weight"):
            out_dim = shapes[rename(prefix + "residual.2.weight")][0]
            blocks += 1
        else:
            break
        k += 1
    mults.append(out_dim // dim)
    blocks_per_level.append(blocks)
    return WanVAEConfig(dim=dim, z_dim=shapes[rename("conv2.weight")][0], dim_mult=tuple(mults),
                        num_res_blocks=blocks_per_level[0], temperal_downsample=tuple(temporal))


def _wan_vae_files(source, filename):
    if filename is not None:
        return resolve(source, filename=filename)
    name = str(source)
    for key, (repo, diffusers_repo, _) in WAN_HUB.items():
        if name == key:
            return [hub_file(diffusers_repo, WAN_VAE_SAFETENSORS, 508e6)]
        if name == repo:
            return [hub_file(repo, WAN_VAE_PTH, 508e6)]
    path = Path(name).expanduser()
    if path.is_dir() and (path / WAN_VAE_PTH).is_file():  # a local copy of an original repo
        return [path / WAN_VAE_PTH]
    return resolve(source, hub_subfolder="vae")  # a file (.safetensors or .pth), a folder, a -Diffusers repo


def load_wan_vae(source="wan2.1-t2v-1.3b", config=None, device="cpu", dtype=torch.float32, filename=None):
    """Load the Wan 2.1 VAE: `Wan2.1_VAE.pth` (original keys, a pickle read with weights_only=True) or
    the `vae/` safetensors of a -Diffusers repo (diffusers keys).

    source: "wan2.1-t2v-1.3b" (the -Diffusers vae/ safetensors), "Wan-AI/Wan2.1-T2V-1.3B" (its .pth),
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", a local .pth or .safetensors file, or a folder of either repo.
    config=None: the `minirestore_config` metadata if present, else inferred from the encoder's shapes.
    """
    from .wan_vae import WanVAE, WanVAEConfig

    files = _wan_vae_files(source, filename)
    if files[0].suffix in (".pth", ".pt", ".ckpt"):
        ckpt = TorchCheckpoint(files[0])
    else:
        ckpt = Checkpoint(files)
    diffusers = "encoder.conv_in.weight" in ckpt.shapes
    if not diffusers and "encoder.conv1.weight" not in ckpt.shapes:
        raise UserError(f"{ckpt.files[0]} is {describe(ckpt.shapes)}, not a Wan 2.1 VAE")
    if config is None:
        stored = ckpt.config()
        rename = (lambda k: wan_vae_diffusers_key(k)) if diffusers else (lambda k: k)
        config = WanVAEConfig(**stored) if stored else wan_vae_config_from_shapes(ckpt.shapes, rename)
    key_map = None
    if diffusers:
        with torch.device("meta"):
            keys = list(WanVAE(config).state_dict())
        key_map = {k: ([wan_vae_diffusers_key(k, config)], None) for k in keys}
    return load_model(lambda: WanVAE(config), ckpt, key_map, what="a Wan 2.1 VAE", device=device, dtype=dtype)
