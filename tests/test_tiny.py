"""The tiny backbone's parts: the pixel codec, the TINY config and the small text encoder."""
import torch

from minirestore.flux import Flux, pack, prepare_ids
from minirestore.photos import PHOTO_WORDS
from minirestore.procedural import WORDS, dead_leaves
from minirestore.tiny import EOS, PAD, TINY, UNK, PixelCodec, TextConfig, TinyTextEncoder


def test_pixel_codec_round_trips_exactly():
    codec = PixelCodec()
    x = torch.rand(2, 3, 24, 40) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (2, 12, 12, 20) and codec.downsample_factor == 2
    assert torch.equal(codec.decode(z), x)
    assert list(codec.parameters()) == []


def test_pixel_codec_latents_have_about_unit_std():
    x = torch.stack([dead_leaves(i, 64)[0] for i in range(16)]) * 2 - 1
    assert 0.7 < PixelCodec().encode(x).std() < 1.5


def test_tiny_flux_shapes_and_size_budget():
    torch.manual_seed(0)
    model, text = Flux(TINY), TinyTextEncoder()
    n_flux = sum(p.numel() for p in model.parameters())
    n_text = sum(p.numel() for p in text.parameters())
    assert 1.5e6 < n_flux < 4e6
    assert 4 * (n_flux + n_text) < 16e6  # the shipped fp32 safetensors stay under the 16 MB budget
    z = PixelCodec().encode(torch.rand(2, 3, 64, 64) * 2 - 1)
    img = pack(z)
    assert img.shape == (2, 256, 48)
    ctx = text.encode(["warm many", ""])
    img_ids, txt_ids = prepare_ids(2, 32, 32, 16)
    v = model(img, img_ids, ctx["txt"], txt_ids, torch.rand(2), ctx["y"])
    assert v.shape == (2, 256, 48) and torch.isfinite(v).all()


def test_tokenizer():
    text = TinyTextEncoder()
    vocab = TextConfig().vocab
    assert vocab[:3] == ["<pad>", "<eos>", "<unk>"] and vocab[3:] == WORDS + PHOTO_WORDS
    empty = text.tokenize("")
    assert empty.tolist() == [EOS] + [PAD] * 15
    ids = text.tokenize("Warm, zebra circles")
    assert ids[:4].tolist() == [vocab.index("warm"), UNK, vocab.index("circles"), EOS] and (ids[4:] == PAD).all()
    assert torch.equal(text.tokenize(["warm", "zebra", "circles"]), ids)
    long = text.tokenize(["warm"] * 40)
    assert long.shape == (16,) and long[-1] == EOS and (long[:-1] == vocab.index("warm")).all()


def test_text_encoder_shapes_and_prompts_differ():
    torch.manual_seed(0)
    text = TinyTextEncoder()
    torch.nn.init.normal_(text.position_embedding, std=0.02)
    out = text.encode(["", "warm many circles textured sharp", "cool few squares smooth soft"])
    assert out["txt"].shape == (3, 16, 64) and out["y"].shape == (3, 64)
    for i in range(3):
        for j in range(i + 1, 3):
            assert (out["txt"][i] - out["txt"][j]).abs().max() > 1e-3
            assert (out["y"][i] - out["y"][j]).abs().max() > 1e-3
    # Batch-independent: "" alone gives the same context as "" in a batch.
    alone = text.encode([""])
    assert torch.allclose(alone["txt"][0], out["txt"][0], atol=1e-6)
    assert torch.allclose(alone["y"][0], out["y"][0], atol=1e-6)
