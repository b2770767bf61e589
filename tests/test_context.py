"""encode_text against the reference pipelines (transformers encoders + tokenizers) on tiny local repos, and
the empty-prompt cache: read without constructing an encoder, corrupt files detected and rebuilt."""
import pytest
import torch

from minirestore import context, hub, text
from minirestore.context import base_context, context_path, encode_text, load_context, save_context

transformers = pytest.importorskip("transformers", reason="the parity reference is transformers")
from test_text import make_clip, make_t5, rel_err  # noqa: E402  (tiny models with the official key names)
from test_tokenizers import make_clip_bpe, make_spm  # noqa: E402

PROMPTS = ["", "A photo of a cat sitting on a red chair", "hazy morning over the lake"]


@pytest.fixture(scope="module")
def flux_repo(tmp_path_factory):
    """A tiny local copy laid out like black-forest-labs/FLUX.1-dev (text parts only); T5 sharded."""
    root = tmp_path_factory.mktemp("flux")
    make_spm(root / "tokenizer_2")
    make_clip_bpe(root / "tokenizer")
    clip_vocab = len(transformers.CLIPTokenizer.from_pretrained(root / "tokenizer").get_vocab())
    t5 = make_t5(root / "text_encoder_2", vocab=200, shard="20KB")
    clip = make_clip(root / "text_encoder", vocab=clip_vocab)
    return root, t5, clip


@pytest.fixture(scope="module")
def wan_repo(tmp_path_factory):
    """A tiny local copy laid out like Wan-AI/Wan2.1-T2V-1.3B-Diffusers (text parts only)."""
    root = tmp_path_factory.mktemp("wan")
    make_spm(root / "tokenizer")
    return root, make_t5(root / "text_encoder", umt5=True, vocab=200)


def test_flux_matches_reference_pipeline(flux_repo):
    root, t5, clip = flux_repo
    L = 24
    out = encode_text("flux-dev", PROMPTS, length=L, source=root, dtype=torch.float32)
    t5_tok = transformers.T5TokenizerFast.from_pretrained(root / "tokenizer_2")
    clip_tok = transformers.CLIPTokenizer.from_pretrained(root / "tokenizer")
    with torch.no_grad():  # the BFL HFEmbedder: padded to max_length, attention_mask=None
        ids = t5_tok(PROMPTS, padding="max_length", max_length=L, truncation=True, return_tensors="pt").input_ids
        txt = t5(input_ids=ids, attention_mask=None).last_hidden_state
        ids = clip_tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        y = clip(input_ids=ids, attention_mask=None).pooler_output
    assert out["txt"].shape == (3, L, 40) and out["y"].shape == (3, 32)
    assert rel_err(out["txt"], txt) <= 1e-5
    assert rel_err(out["y"], y) <= 1e-5


def test_flux_default_lengths(flux_repo):
    root = flux_repo[0]
    assert encode_text("flux-schnell", [""], source=root, dtype=torch.float32)["txt"].shape == (1, 256, 40)
    assert encode_text("flux-dev", "", source=root, dtype=torch.float32)["txt"].shape == (1, 512, 40)


def test_wan_matches_reference_pipeline(wan_repo):
    root, umt5 = wan_repo
    L = 32
    out = encode_text("wan2.1-t2v-1.3b", PROMPTS, length=L, source=root, dtype=torch.float32)["context"]
    tok = transformers.T5TokenizerFast.from_pretrained(root / "tokenizer")
    enc = tok(PROMPTS, padding="max_length", max_length=L, truncation=True, add_special_tokens=True,
              return_tensors="pt")
    with torch.no_grad():  # diffusers WanPipeline._get_t5_prompt_embeds: trim to the real length, zero-pad
        hidden = umt5(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
    lengths = enc.attention_mask.sum(1)
    expected = torch.stack([torch.cat([h[:n], h.new_zeros(L - n, h.shape[1])]) for h, n in zip(hidden, lengths)])
    assert out.shape == (3, L, 40)
    assert rel_err(out, expected) <= 1e-5
    assert out[0, 1:].eq(0).all() and out[0, 0].abs().sum() > 0  # "" -> only EOS is real
    assert encode_text("wan2.1-t2v-1.3b", [""], source=root, dtype=torch.float32)["context"].shape == (1, 512, 40)


def test_unknown_model_name():
    with pytest.raises(context.UserError, match="unknown model name"):
        encode_text("sd-1.5", [""])


def _forbid_encoders(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a text encoder was constructed")

    for name in ("load_t5", "load_clip"):
        monkeypatch.setattr(hub, name, fail)
    monkeypatch.setattr(text.T5Encoder, "__init__", fail)
    monkeypatch.setattr(text.CLIPTextEncoder, "__init__", fail)


def test_cache_is_computed_once_then_only_read(flux_repo, tmp_path, monkeypatch, capsys):
    root = flux_repo[0]
    first = base_context("flux-dev", length=24, source=root, cache_dir=tmp_path, dtype=torch.float32)
    assert "encoding the empty prompt" in capsys.readouterr().out
    path = context_path("flux-dev", 24, root, tmp_path)
    assert path.is_file() and list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    direct = encode_text("flux-dev", [""], length=24, source=root, dtype=torch.float32)
    assert torch.equal(first["txt"], direct["txt"]) and torch.equal(first["y"], direct["y"])

    _forbid_encoders(monkeypatch)
    second = base_context("flux-dev", length=24, source=root, cache_dir=tmp_path)
    assert capsys.readouterr().out == ""
    assert torch.equal(second["txt"], first["txt"]) and torch.equal(second["y"], first["y"])
    assert load_context(path)[1]["model"] == "flux-dev"


def test_cache_location_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIRESTORE_CACHE", str(tmp_path))
    assert context_path("wan2.1-t2v-1.3b", 226).parent == tmp_path
    assert context_path("wan2.1-t2v-1.3b", 226) != context_path("wan2.1-t2v-1.3b", 512)
    assert context_path("wan2.1-t2v-1.3b", 226) != context_path("wan2.1-t2v-1.3b", 226, source=tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong-shape", "nan", "other-length"])
def test_corrupt_cache_is_rebuilt(wan_repo, tmp_path, capsys, damage):
    root = wan_repo[0]
    good = base_context("wan2.1-t2v-1.3b", length=20, source=root, cache_dir=tmp_path, dtype=torch.float32)
    path = context_path("wan2.1-t2v-1.3b", 20, root, tmp_path)
    capsys.readouterr()
    meta = load_context(path)[1]
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a safetensors file")
    elif damage == "wrong-shape":
        save_context(path, {"context": torch.zeros(1, 7, 40)}, meta)
    elif damage == "nan":
        save_context(path, {"context": torch.full_like(good["context"], float("nan"))}, meta)
    else:
        save_context(path, good, {**meta, "length": "512"})
    rebuilt = base_context("wan2.1-t2v-1.3b", length=20, source=root, cache_dir=tmp_path, dtype=torch.float32)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and "cannot be used" in out[0] and "rebuilding" in out[0]
    assert "encoding the empty prompt" in out[1]
    assert torch.equal(rebuilt["context"], good["context"])
    assert torch.equal(load_context(path)[0]["context"], good["context"])  # the file is whole again


def test_save_and_load_context_roundtrip(tmp_path):
    """A caller with its own (tiny) text model ships its context file through the same two functions."""
    tensors = {"txt": torch.randn(1, 8, 16), "y": torch.randn(1, 4)}
    save_context(tmp_path / "sub" / "ctx.safetensors", tensors, {"model": "tiny", "length": 8})
    back, meta = load_context(tmp_path / "sub" / "ctx.safetensors")
    assert meta == {"model": "tiny", "length": "8"}
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    with pytest.raises(context.UserError, match="not a readable context file"):
        load_context(tmp_path / "missing.safetensors")
