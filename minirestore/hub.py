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


def load_model(make_model, ckpt, key_map=None, *, what, device="cpu", dtype=torch.bfloat16, ignore=()):
    """Build `make_model()` on the meta device and stream `ckpt` into it.

    key_map: our key -> (list of file keys, combine function or None); None means identity. A
    combine function takes the list of tensors (e.g. torch.cat for fused projections).
    ignore: regexes of file keys that are allowed to go unused (e.g. a stray `position_ids`).
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

    state = {}
    for key in tqdm(expected, desc=f"loading {what}", unit="tensor", leave=False):
        srcs, combine = key_map[key]
        tensors = [ckpt.get(s) for s in srcs]
        t = combine(tensors) if combine else tensors[0]
        if tuple(t.shape) != expected[key]:
            raise UserError(f"{key}: the checkpoint gives shape {tuple(t.shape)}, {what} expects "
                            f"{expected[key]}. It looks like {describe(ckpt.shapes)}.")
        state[key] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        del tensors, t
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


def load_flux(source, config=None, device="cpu", dtype=torch.bfloat16, filename=None):
    """Load a FLUX.1 transformer from a BFL file, a diffusers `transformer/` folder or a Hub name.

    source: "flux-dev", "flux-schnell", "black-forest-labs/FLUX.1-dev", a local .safetensors file,
    a local folder (a diffusers repo or its `transformer/` folder), or a repo id with `filename`.
    config=None infers the FluxConfig from the tensor shapes (and the preset for axes_dim/theta).
    """
    from .flux import Flux, FluxConfig

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
                      device=device, dtype=dtype)


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
# Text encoders (T5 / umT5, CLIP): load_t5, load_clip
# ---------------------------------------------------------------------------------------------
# name -> (Hub repo, subfolder, size in bytes for messages, gated). The FLUX repos carry T5 v1.1 XXL in
# text_encoder_2/ (2 bf16 shards + index) and CLIP-L in text_encoder/; Wan's -Diffusers repos carry umT5-XXL
# in text_encoder/ (5 fp32 shards + index). Tokenizers: tokenizer_2/ (spiece.model) and tokenizer/.
T5_HUB = {
    "flux-dev": ("black-forest-labs/FLUX.1-dev", "text_encoder_2", 9.52e9, True),
    "flux-schnell": ("black-forest-labs/FLUX.1-schnell", "text_encoder_2", 9.52e9, False),
    "wan2.1-t2v-1.3b": ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "text_encoder", 22.7e9, False),
    "wan2.1-t2v-14b": ("Wan-AI/Wan2.1-T2V-14B-Diffusers", "text_encoder", 22.7e9, False),
}
CLIP_HUB = {
    "flux-dev": ("black-forest-labs/FLUX.1-dev", "text_encoder", 246e6, True),
    "flux-schnell": ("black-forest-labs/FLUX.1-schnell", "text_encoder", 246e6, False),
}
T5_TOKENIZER_HUB = {name: (repo, "tokenizer_2" if sub == "text_encoder_2" else "tokenizer", None, gated)
                    for name, (repo, sub, _, gated) in T5_HUB.items()}
CLIP_TOKENIZER_HUB = {name: (repo, "tokenizer", None, gated) for name, (repo, *_, gated) in CLIP_HUB.items()}


def _text_folder(source, hub_names, subfolders, needs):
    """A source -> the local folder holding `needs` (a file name or glob), downloading a Hub folder if asked.

    source: a name in `hub_names` (-> (repo, subfolder, size, gated)), that repo's id, a local folder laid
    out like the Hub repo (the first of `subfolders` it has) or the folder itself.
    """
    name = str(source)
    for key, (repo, sub, size, gated) in hub_names.items():
        if name in (key, repo):
            return hub_folder(repo, sub, size, gated)
    path = Path(name).expanduser()
    if path.is_dir():
        for sub in subfolders:
            if (path / sub).is_dir() and any((path / sub).glob(needs)):
                return path / sub
        if any(path.glob(needs)):
            return path
        raise UserError(f"{path} has no {needs} (nor has a subfolder {' or '.join(subfolders)}/ with one)")
    if len(name.split("/")) == 2 and not name.startswith((".", "/")):
        return hub_folder(name, subfolders[0])
    known = ", ".join(sorted(hub_names))
    raise UserError(f"{source}: no such folder, and not a known model name (known: {known})")


def _text_files(source, hub_names, subfolders):
    path = Path(str(source)).expanduser()
    if path.is_file():
        return [path]
    return safetensors_files(_text_folder(source, hub_names, subfolders, "*.safetensors*"))


def _hf_config(files):
    """The transformers config.json beside the weights, if any: fields the shapes cannot tell (eps, act)."""
    f = Path(files[0]).parent / "config.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _t5_embedding_key(shapes):
    # HF ties shared.weight and encoder.embed_tokens.weight and writes one of them: treat them as aliases.
    return "shared.weight" if "shared.weight" in shapes else "encoder.embed_tokens.weight"


def t5_config_from_shapes(shapes, hf=None):
    """T5Config from HF T5/umT5 tensor shapes; max_distance and eps from config.json if given."""
    from .text import T5Config

    hf = hf or {}
    vocab, d_model = shapes[_t5_embedding_key(shapes)]
    num_buckets, num_heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    return T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0] // num_heads,
        d_ff=shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
        num_layers=len({k.split(".")[2] for k in shapes if k.startswith("encoder.block.")}),
        num_heads=num_heads,
        num_buckets=num_buckets,
        max_distance=hf.get("relative_attention_max_distance", 128),
        eps=hf.get("layer_norm_epsilon", 1e-6),
        shared_pos="encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in shapes,
    )


def load_t5(source, config=None, device="cpu", dtype=torch.bfloat16):
    """Load a T5 v1.1 (FLUX) or umT5 (Wan) encoder from HF `transformers` safetensors.

    source: "flux-dev", "flux-schnell", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b", their Hub repo ids, a local
    copy of such a repo (its text_encoder_2/ or else text_encoder/), a text-encoder folder (sharded with an
    index json or not) or a .safetensors file. config=None infers the T5Config from the shapes.
    """
    from .text import T5Config, T5Encoder

    files = _text_files(source, T5_HUB, ["text_encoder_2", "text_encoder"])
    ckpt = Checkpoint(files)
    if "encoder.block.0.layer.0.SelfAttention.q.weight" not in ckpt.shapes:
        raise UserError(f"{ckpt.files[0]} is {describe(ckpt.shapes)}, not a T5 / umT5 text encoder")
    if "encoder.block.0.layer.1.DenseReluDense.wi.weight" in ckpt.shapes:
        raise UserError(f"{ckpt.files[0]} is an original T5 (ReLU feed-forward); FLUX and Wan use T5 v1.1 / umT5 "
                        "(gated GELU): pass the text_encoder_2/ or text_encoder/ folder of the FLUX / Wan repo")
    if config is None:
        stored = ckpt.config()
        config = T5Config(**stored) if stored else t5_config_from_shapes(ckpt.shapes, _hf_config(files))
    emb = _t5_embedding_key(ckpt.shapes)
    with torch.device("meta"):
        keys = T5Encoder(config).state_dict().keys()
    key_map = {k: ([emb if k == "shared.weight" else k], None) for k in keys}
    return load_model(lambda: T5Encoder(config), ckpt, key_map, what="a T5 text encoder", device=device,
                      dtype=dtype, ignore=[r"shared\.weight", r"encoder\.embed_tokens\.weight"])


def clip_config_from_shapes(shapes, hf=None):
    """CLIPTextConfig from HF CLIP text shapes; heads, eps, activation and eos id from config.json if given."""
    from .text import CLIPTextConfig

    hf = hf or {}
    shapes = {k.removeprefix("text_model."): v for k, v in shapes.items()}
    vocab, hidden = shapes["embeddings.token_embedding.weight"]
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=shapes["encoder.layers.0.mlp.fc1.weight"][0],
        num_layers=len({k.split(".")[2] for k in shapes if k.startswith("encoder.layers.")}),
        num_heads=hf.get("num_attention_heads", max(1, hidden // 64)),  # ViT-L/14 text: 12 heads of 64
        max_positions=shapes["embeddings.position_embedding.weight"][0],
        eps=hf.get("layer_norm_eps", 1e-5),
        hidden_act=hf.get("hidden_act", "quick_gelu"),
        eos_token_id=hf.get("eos_token_id", 2),
    )


def load_clip(source, config=None, device="cpu", dtype=torch.bfloat16):
    """Load the CLIP text tower (FLUX's `y`) from HF `transformers` safetensors.

    source: "flux-dev", "flux-schnell", their Hub repo ids, a local copy of such a repo (its text_encoder/),
    the text_encoder/ folder itself or a .safetensors file. config=None infers the config from the shapes.
    """
    from .text import CLIPTextConfig, CLIPTextEncoder

    files = _text_files(source, CLIP_HUB, ["text_encoder"])
    ckpt = Checkpoint(files)
    # The Hub files (transformers 4.x) prefix every key with `text_model.`; transformers 5.x writes none.
    prefix = "text_model." if "text_model.embeddings.token_embedding.weight" in ckpt.shapes else ""
    if f"{prefix}embeddings.token_embedding.weight" not in ckpt.shapes:
        raise UserError(f"{ckpt.files[0]} is {describe(ckpt.shapes)}, not a CLIP text encoder")
    if config is None:
        stored = ckpt.config()
        config = CLIPTextConfig(**stored) if stored else clip_config_from_shapes(ckpt.shapes, _hf_config(files))
    with torch.device("meta"):
        keys = CLIPTextEncoder(config).state_dict().keys()
    key_map = {k: ([prefix + k.removeprefix("text_model.")], None) for k in keys}
    ignore = [r"(text_model\.)?embeddings\.position_ids", r"text_projection\.weight"]  # a buffer; the CLIP head
    return load_model(lambda: CLIPTextEncoder(config), ckpt, key_map, what="a CLIP text encoder", device=device,
                      dtype=dtype, ignore=ignore)


def load_t5_tokenizer(source, max_length=512):
    """The sentencepiece T5 / umT5 tokenizer (`spiece.model`) of a model name, repo id or local folder."""
    from .tokenizers import T5Tokenizer

    folder = _text_folder(source, T5_TOKENIZER_HUB, ["tokenizer_2", "tokenizer"], "spiece.model")
    return T5Tokenizer(folder / "spiece.model", max_length=max_length)


def load_clip_tokenizer(source, max_length=77):
    """The CLIP BPE tokenizer (`vocab.json` + `merges.txt`) of a model name, repo id or local folder."""
    from .tokenizers import CLIPTokenizer

    folder = _text_folder(source, CLIP_TOKENIZER_HUB, ["tokenizer"], "vocab.json")
    return CLIPTokenizer(folder / "vocab.json", folder / "merges.txt", max_length=max_length)


# ---------------------------------------------------------------------------------------------
# Wan 2.1 (transformer, VAE): load_wan, load_wan_vae
# ---------------------------------------------------------------------------------------------
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
        raise UserError(_hub_message(repo_id, patterns[0], size, False, e)) from None


def _wan_files(source, filename):
    if filename is not None:
        return resolve(source, filename=filename)
    for name, (repo, _, size) in WAN_HUB.items():
        if str(source) in (name, repo):  # the original repo: one file (1.3B) or shards and an index (14B)
            return safetensors_files(_hub_snapshot(repo, ["diffusion_pytorch_model*", "config.json"], size))
    return resolve(source, hub_subfolder="transformer")  # a file, a folder, a -Diffusers repo id


def load_wan(source, config=None, device="cpu", dtype=torch.bfloat16, filename=None):
    """Load a Wan 2.1 transformer from the original format or the diffusers format.

    source: "wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "Wan-AI/Wan2.1-T2V-1.3B" (original keys,
    `diffusion_pytorch_model*.safetensors`), "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" (its `transformer/`),
    a local .safetensors file or folder of either format (sharded with an index or not), or a repo id
    with `filename`. config=None: the `minirestore_config` metadata if present, else inferred from the
    shapes, with the heads from a config.json beside the weights or else head_dim 128 (true of the
    released models; tiny ones need the metadata, a config.json or a config).
    The big weights are cast to `dtype`; the small fp32 islands of the reference (time embedding,
    modulation, norms, head: `wan.FP32_PARAMS`) stay in fp32.
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
                       device=device, dtype=dtype)
    if dtype != torch.float32:
        for name, p in model.named_parameters():
            if FP32_PARAMS.fullmatch(name):
                p.data = ckpt.get(rename(name)).to(device=device, dtype=torch.float32)
    return model


# --- Wan 2.1 VAE ------------------------------------------------------------------------------

class TorchCheckpoint:
    """A pickled state dict (.pth) behind Checkpoint's interface (files, shapes, metadata, get, config).

    Read with torch.load(weights_only=True): tensors only, no code from the file runs.
    """

    def __init__(self, path):
        self.files, self.metadata = [Path(path)], {}
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # a legacy (non-zip) pickle cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{path} is not a readable PyTorch state dict ({type(e).__name__}); "
                            "it may be truncated: download it again") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else {}
        self._state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        self.shapes = {k: tuple(v.shape) for k, v in self._state.items()}

    def get(self, name):
        return self._state[name]

    def config(self):
        return None


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
