"""Loaders for the text encoders: T5 v1.1 / umT5 (FLUX's `text_encoder_2/`, Wan's `text_encoder/`) and
CLIP (FLUX's `text_encoder/`), with their tokenizers. Same source forms, streaming and errors as
`hub_flux.load_flux` (loading.py); `minirestore.hub` gathers the public names."""
import json
from pathlib import Path

import torch

from . import UserError
from .loading import Checkpoint, describe, hub_folder, load_model, safetensors_files


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
