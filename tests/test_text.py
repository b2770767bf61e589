"""Parity of the T5 / umT5 / CLIP text encoders with transformers, loaded through the real loaders.

transformers builds tiny random models with the official key names and writes them with save_pretrained,
as the Hub folders are written; minirestore.hub.load_t5 / load_clip read them back.
"""
import pytest
import torch
from safetensors.torch import load_file, save_file

from minirestore import UserError, hub

transformers = pytest.importorskip("transformers", reason="the parity reference is transformers")


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomise(model, seed=0):
    """Random weights everywhere (the reference init leaves ones and zeros that hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "bias" not in name:  # norm weights
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed" in name or "shared" in name or "relative_attention_bias" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model.eval()


def make_t5(folder, umt5=False, vocab=99, shard=None, seed=0):
    """A tiny T5 v1.1 (or umT5) encoder written like the Hub folders; heads * d_kv != d_model on purpose."""
    cls = transformers.UMT5EncoderModel if umt5 else transformers.T5EncoderModel
    cfg_cls = transformers.UMT5Config if umt5 else transformers.T5Config
    cfg = cfg_cls(vocab_size=vocab, d_model=40, d_kv=12, d_ff=56, num_layers=3, num_heads=3,
                  relative_attention_num_buckets=16, relative_attention_max_distance=20,
                  feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6)
    model = randomise(cls(cfg), seed)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return model


def make_clip(folder, vocab=99, eos_token_id=2, seed=0):
    """A tiny CLIP text tower with FLUX's config quirks (eos_token_id 2, bos 0, pad 1, quick_gelu)."""
    cfg = transformers.CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                                      layer_norm_eps=1e-5, bos_token_id=0, pad_token_id=1,
                                      eos_token_id=eos_token_id)
    model = randomise(transformers.CLIPTextModel(cfg), seed)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def ids_and_mask(vocab, lengths, L, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (len(lengths), L), generator=g)
    mask = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).long()
    return ids, mask


@pytest.mark.parametrize("umt5", [False, True], ids=["t5", "umt5"])
def test_t5_parity(tmp_path, umt5):
    ref = make_t5(tmp_path / "enc", umt5=umt5, shard="20KB")
    assert len(list((tmp_path / "enc").glob("*.safetensors"))) > 1  # the index path is exercised
    assert (tmp_path / "enc" / "model.safetensors.index.json").exists()
    ours = hub.load_t5(tmp_path / "enc", dtype=torch.float32)
    assert ours.config.shared_pos is (not umt5) and ours.config.max_distance == 20
    ids, mask = ids_and_mask(99, [37, 20], 37)  # 37 > max_distance: the log buckets are used
    with torch.no_grad():
        for m in (None, mask):
            expected = ref(input_ids=ids, attention_mask=m).last_hidden_state
            assert rel_err(ours(ids, m), expected) <= 1e-5
        # the mask matters (else the test could not tell masked from unmasked)
        assert rel_err(ours(ids, mask)[1, :20], ours(ids)[1, :20]) > 1e-3


def test_t5_embedding_alias_and_repo_layout(tmp_path):
    ref = make_t5(tmp_path / "enc")
    (tmp_path / "repo" / "text_encoder_2").mkdir(parents=True)
    state = load_file(tmp_path / "enc" / "model.safetensors")
    state["encoder.embed_tokens.weight"] = state.pop("shared.weight")
    save_file(state, tmp_path / "repo" / "text_encoder_2" / "model.safetensors")
    (tmp_path / "repo" / "text_encoder_2" / "config.json").write_text((tmp_path / "enc" / "config.json").read_text())
    ours = hub.load_t5(tmp_path / "repo", dtype=torch.float32)  # a local copy laid out like the FLUX repo
    ids, _ = ids_and_mask(99, [11], 11)
    with torch.no_grad():
        assert rel_err(ours(ids), ref(input_ids=ids).last_hidden_state) <= 1e-5
    # both names present: one is used, the other ignored
    state["shared.weight"] = state["encoder.embed_tokens.weight"].clone()
    save_file(state, tmp_path / "both.safetensors")
    hub.load_t5(tmp_path / "both.safetensors", config=ours.config, dtype=torch.float32)


def test_t5_wrong_checkpoint_is_refused(tmp_path):
    make_clip(tmp_path / "clip")
    with pytest.raises(UserError, match="not a T5"):
        hub.load_t5(tmp_path / "clip")
    with pytest.raises(UserError, match="no such"):
        hub.load_t5(tmp_path / "nowhere")


@pytest.mark.parametrize("eos_token_id", [2, 98], ids=["legacy-eos2", "eos-id"])
def test_clip_parity(tmp_path, eos_token_id):
    ref = make_clip(tmp_path / "clip", eos_token_id=eos_token_id)
    ours = hub.load_clip(tmp_path / "clip", dtype=torch.float32)
    eos, L = 98, 77
    ids, mask = ids_and_mask(eos, [77, 30], L)  # ordinary tokens < eos
    ids[1, 10] = eos  # the first EOS; padding after it is EOS too, as the FLUX tokenizer pads
    ids[1, 30:] = eos
    ids[0, 40] = eos
    with torch.no_grad():
        for m in (None, mask):
            out = ref(input_ids=ids, attention_mask=m)
            hidden, pooled = ours(ids, m)
            assert rel_err(hidden, out.last_hidden_state) <= 1e-5
            assert rel_err(pooled, out.pooler_output) <= 1e-5
            assert torch.equal(pooled, hidden[[0, 1], [40, 10]])  # pooled at the first EOS


def test_clip_hub_key_format(tmp_path):
    """The Hub's text_encoder/ (written by transformers 4.x) prefixes keys with `text_model.` and may carry the
    `position_ids` buffer; transformers 5.x writes neither. Both load."""
    ref = make_clip(tmp_path / "clip")
    state = load_file(tmp_path / "clip" / "model.safetensors")
    state = {"text_model." + k: v for k, v in state.items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    (tmp_path / "repo" / "text_encoder").mkdir(parents=True)
    save_file(state, tmp_path / "repo" / "text_encoder" / "model.safetensors")
    (tmp_path / "repo" / "text_encoder" / "config.json").write_text((tmp_path / "clip" / "config.json").read_text())
    ours = hub.load_clip(tmp_path / "repo", dtype=torch.float32)
    ids, _ = ids_and_mask(98, [9], 9)
    with torch.no_grad():
        assert rel_err(ours(ids)[0], ref(input_ids=ids).last_hidden_state) <= 1e-5


def test_bf16_runs_close(tmp_path):
    """bf16 (how the references run) stays close to fp32: the fp32 islands are in place."""
    make_t5(tmp_path / "enc", umt5=True)
    ids, mask = ids_and_mask(99, [16, 9], 16)
    with torch.no_grad():
        full = hub.load_t5(tmp_path / "enc", dtype=torch.float32)(ids, mask)
        half = hub.load_t5(tmp_path / "enc", dtype=torch.bfloat16)(ids, mask)
    assert half.dtype == torch.bfloat16 and rel_err(half.float(), full) < 5e-2
