"""Finding and reading checkpoints: local files, local folders and Hugging Face Hub names.

One loader path for every model in the package:
  1. `resolve` turns a source (a .safetensors file, a folder, a Hub name) into safetensors files,
     downloading with huggingface_hub (which also serves its offline cache);
  2. `Checkpoint` reads the file headers only (names, shapes), so a wrong file is refused before a
     byte of weights is read;
  3. `load_model` builds the module on the meta device (no random initialisation, no memory) and
     streams tensors into it one at a time, cast to the target dtype, through a key map
     (our key -> the file's keys and how to combine them). Peak host memory stays near one copy of
     the model.
"""
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from . import UserError

# name -> (Hub repo, file in the repo, size in bytes for messages, gated)
FLUX_HUB = {
    "flux-dev": ("black-forest-labs/FLUX.1-dev", "flux1-dev.safetensors", 23.8e9, True),
    "flux-schnell": ("black-forest-labs/FLUX.1-schnell", "flux1-schnell.safetensors", 23.8e9, False),
}
TINY_FLUX = Path(__file__).resolve().parents[1] / "weights" / "tiny" / "flux.safetensors"
AE_HUB = {
    "flux-dev": ("black-forest-labs/FLUX.1-dev", "ae.safetensors", 335e6, True),
    "flux-schnell": ("black-forest-labs/FLUX.1-schnell", "ae.safetensors", 335e6, False),
}


# ---------------------------------------------------------------------------------------------
# 1. Sources -> files
# ---------------------------------------------------------------------------------------------

def hub_file(repo_id, filename, size=None, gated=False):
    """Download (or find in the offline cache) one file of a Hub repo; one clear line on failure."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as e:  # offline, gated, missing: all end the same way for the user
        raise UserError(_hub_message(repo_id, filename, size, gated, e)) from None


def hub_folder(repo_id, subfolder, size=None, gated=False):
    """Download (or find in the offline cache) one folder of a Hub repo, e.g. `transformer/`."""
    from huggingface_hub import snapshot_download

    try:
        root = Path(snapshot_download(repo_id, allow_patterns=[f"{subfolder}/*"]))
    except Exception as e:
        raise UserError(_hub_message(repo_id, subfolder + "/", size, gated, e)) from None
    if not (root / subfolder).is_dir():
        raise UserError(f"the Hub repo {repo_id} has no folder {subfolder}/")
    return root / subfolder


def _hub_message(repo_id, filename, size, gated, error):
    what = f"{filename} ({size / 1e9:.1f} GB)" if size else filename
    how = "connect to the internet (it is then cached)"
    if gated:
        how += f", accept the licence at https://huggingface.co/{repo_id} and log in with `hf auth login`"
    how += ", or pass the path of a local copy"
    reason = type(error).__name__
    return f"cannot get {what} from the Hub repo {repo_id} ({reason}): {how}"


def safetensors_files(folder):
    """The safetensors files of a folder: the shards named by an index json, or every *.safetensors."""
    folder = Path(folder)
    for index in sorted(folder.glob("*.safetensors.index.json")):
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise UserError(f"{index} names shards that are not there: {', '.join(missing)}")
        return files
    files = sorted(list(folder.glob("*.safetensors")) + list(folder.glob("*.sft")))
    if not files:
        raise UserError(f"no .safetensors files in {folder}")
    return files


def resolve(source, hub_names=None, hub_subfolder=None, filename=None):
    """A source -> list of safetensors files.

    source: a .safetensors file; a folder (its index's shards, or all its .safetensors; if it has
    `hub_subfolder`, that subfolder's); a name in `hub_names` (-> (repo, file, size, gated)); a Hub
    repo id with `filename`; or "owner/repo/path/in/repo.safetensors".
    """
    hub_names = hub_names or {}
    if filename is not None:
        return [hub_file(str(source), filename)]
    path = Path(str(source)).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        if hub_subfolder and (path / hub_subfolder).is_dir():
            path = path / hub_subfolder
        return safetensors_files(path)
    name = str(source)
    for key, (repo, file, size, gated) in hub_names.items():
        if name in (key, repo):
            return [hub_file(repo, file, size, gated)]
    parts = name.split("/")
    if len(parts) >= 3 and not name.startswith((".", "/")) and name.endswith((".safetensors", ".sft")):
        return [hub_file("/".join(parts[:2]), "/".join(parts[2:]))]
    if len(parts) == 2 and hub_subfolder and not name.startswith((".", "/")) and not path.suffix:
        return safetensors_files(hub_folder(name, hub_subfolder))
    known = ", ".join(sorted(hub_names)) or "none"
    raise UserError(f"{source}: no such file or folder, and not a known model name (known: {known})")


# ---------------------------------------------------------------------------------------------
# 2. Headers
# ---------------------------------------------------------------------------------------------

class Checkpoint:
    """Lazy view of one or more safetensors files: names and shapes from the headers, tensors on demand."""

    def __init__(self, files):
        self.files = [Path(f) for f in files]
        self.shapes, self._where, self.metadata = {}, {}, {}
        for f in self.files:
            try:
                with safe_open(str(f), framework="pt") as st:
                    self.metadata.update(st.metadata() or {})
                    for name in st.keys():
                        self.shapes[name] = tuple(st.get_slice(name).get_shape())
                        self._where[name] = f
            except Exception as e:
                raise UserError(f"{f} is not a readable safetensors file ({e}); "
                                "it may be truncated or of another format: download it again") from None
        self._open = {}

    def get(self, name):
        f = self._where[name]
        if f not in self._open:
            self._open[f] = safe_open(str(f), framework="pt")
        try:
            return self._open[f].get_tensor(name)
        except Exception as e:
            raise UserError(f"{f}: cannot read tensor {name} ({e}); the file may be truncated") from None

    def config(self):
        """The model config stored in the metadata by minirestore (tiny models), or None."""
        text = self.metadata.get("minirestore_config")
        return json.loads(text) if text else None

    def count(self, pattern):
        """How many distinct N match a key pattern with one `(\\d+)`, e.g. r"double_blocks\\.(\\d+)\\."."""
        return len({m.group(1) for k in self.shapes if (m := re.match(pattern, k))})


# What a set of keys looks like, for "this is X, not Y" messages.
KINDS = [
    ("double_blocks.0.img_attn.qkv.weight", "a FLUX transformer (BFL format)"),
    ("transformer_blocks.0.attn.to_q.weight", "a FLUX transformer (diffusers format)"),
    ("encoder.down.0.block.0.conv1.weight", "a FLUX autoencoder (BFL format)"),
    ("encoder.down_blocks.0.resnets.0.conv1.weight", "an image VAE (diffusers format)"),
    ("encoder.block.0.layer.0.SelfAttention.q.weight", "a T5 / umT5 text encoder (transformers format)"),
    ("text_model.encoder.layers.0.self_attn.q_proj.weight", "a CLIP text encoder (transformers format)"),
    ("embeddings.token_embedding.weight", "a CLIP text encoder (transformers 5 format)"),
    ("blocks.0.cross_attn.q.weight", "a Wan 2.1 transformer (original format)"),
    ("blocks.0.attn2.to_q.weight", "a Wan 2.1 transformer (diffusers format)"),
    ("encoder.downsamples.0.residual.0.gamma", "a Wan 2.1 VAE (original format)"),
    ("encoder.down_blocks.0.norm1.gamma", "a Wan 2.1 VAE (diffusers format)"),
]


def describe(shapes):
    for key, kind in KINDS:
        if key in shapes:
            return kind
    return "a kind of checkpoint this package does not know"


# ---------------------------------------------------------------------------------------------
# 3. Streaming into a meta-initialised module
# ---------------------------------------------------------------------------------------------

def _first(names, n=5):
    names = sorted(names)
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def load_model(make_model, ckpt, key_map=None, *, what, device="cpu", dtype=torch.bfloat16, ignore=(), quantise=None):
    """Build `make_model()` on the meta device and stream `ckpt` into it.

    key_map: our key -> (list of file keys, combine function or None); None means identity. A
    combine function takes the list of tensors (e.g. torch.cat for fused projections).
    ignore: regexes of file keys that are allowed to go unused (e.g. a stray `position_ids`).
    quantise: None, or a function model -> names of nn.Linear modules whose weights are stored in fp8
    (fp8.py): each such weight is quantised as it streams in, so the bf16 copy never exists whole.
    """
    with torch.device("meta"):
        model = make_model()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    key_map = key_map or {k: ([k], None) for k in expected}

    missing = [k for k in expected if k not in key_map or any(s not in ckpt.shapes for s in key_map[k][0])]
    used = {s for srcs, _ in key_map.values() for s in srcs}
    unexpected = [s for s in ckpt.shapes if s not in used and not any(re.fullmatch(p, s) for p in ignore)]
    wrong = [f"{k} {ckpt.shapes[srcs[0]]} (expected {expected[k]})" for k, (srcs, fn) in key_map.items()
             if k in expected and fn is None and srcs[0] in ckpt.shapes and ckpt.shapes[srcs[0]] != expected[k]]
    if missing or unexpected or wrong:
        files = ", ".join(f.name for f in ckpt.files)
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_first(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_first(unexpected)}")
        if wrong:
            parts.append(f"{len(wrong)} wrongly shaped: {_first(wrong, 3)}")
        raise UserError(f"{files} does not fit {what}: {'; '.join(parts)}. "
                        f"It looks like {describe(ckpt.shapes)}.")

    fp8_weights = {f"{name}.weight" for name in quantise(model)} if quantise else set()
    state = {}
    for key in tqdm(expected, desc=f"loading {what}", unit="tensor", leave=False):
        srcs, combine = key_map[key]
        tensors = [ckpt.get(s) for s in srcs]
        t = combine(tensors) if combine else tensors[0]
        if tuple(t.shape) != expected[key]:
            raise UserError(f"{key}: the checkpoint gives shape {tuple(t.shape)}, {what} expects "
                            f"{expected[key]}. It looks like {describe(ckpt.shapes)}.")
        if key in fp8_weights:
            from .fp8 import quantise as to_fp8

            name = key[: -len(".weight")]
            state[f"{name}.qweight"], state[f"{name}.weight_scale"] = to_fp8(t.to(device))
        else:
            state[key] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        del tensors, t
    if fp8_weights:
        from .fp8 import swap_in

        swap_in(model, [k[: -len(".weight")] for k in fp8_weights], dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


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
    quantise: see load_model (fp8.targets stores the blocks' linears in fp8).
    """
    from .flux import Flux, FluxConfig

    if str(source) == "tiny":  # the embedded default, shipped in the repository's weights/tiny/
        source = TINY_FLUX
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


# ---------------------------------------------------------------------------------------------
# The other families' loaders live in their own files; `minirestore.hub` is the one place to get them.
# ---------------------------------------------------------------------------------------------
from .hub_text import (  # noqa: E402,F401
    t5_config_from_shapes, load_t5, clip_config_from_shapes, load_clip, load_t5_tokenizer,
    load_clip_tokenizer, T5_HUB, CLIP_HUB, T5_TOKENIZER_HUB, CLIP_TOKENIZER_HUB,
)
from .hub_wan import (  # noqa: E402,F401
    wan_diffusers_key, wan_config_from_shapes, load_wan, TorchCheckpoint, wan_vae_diffusers_key,
    wan_vae_config_from_shapes, load_wan_vae, WAN_HUB, WAN_VAE_PTH, WAN_VAE_SAFETENSORS, WAN_DIFFUSERS_RULES,
)
