"""The tiny default backbone: a 2 M-parameter FLUX on pixels, its codec and its small text encoder.

The transformer is the same `Flux` class as FLUX.1 (BFL key names, the same loader), with the config TINY.
It is pre-trained by `python -m minirestore.pretrain`, first on procedural dead-leaves images (procedural.py),
then on crops of real photographs (photos.py), conditioned on their descriptor words through
`TinyTextEncoder`, so that a laptop CPU can run the whole method on a real, pre-trained generator.

Sizes at 64 x 64 pixels: image [3, 64, 64] -> PixelCodec latents [12, 32, 32] -> 2x2 patches: 256 tokens of
48 channels; text: 16 tokens of width 64 and a pooled vector of 64.
"""
import json
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import UserError, hub
from .flux import FluxConfig
from .photos import PHOTO_WORDS
from .procedural import WORDS

def tiny_config(width=128, double=2, single=4):
    """The tiny FluxConfig: `double` double-stream and `single` single-stream blocks of `width` channels,
    heads of 32 channels (RoPE axes 8 + 12 + 12), on the pixel codec's 2 x 2 patches."""
    if width % 32:
        raise UserError(f"the tiny transformer's width must be a multiple of 32 (heads of 32), got {width}")
    return FluxConfig(
        in_channels=48, out_channels=48,  # 3 colours x 2 x 2 (codec) x 2 x 2 (patches)
        vec_in_dim=64, context_in_dim=64,  # TinyTextEncoder: pooled y [64], txt [16, 64]
        hidden_size=width, mlp_ratio=3.0, num_heads=width // 32,
        depth=double, depth_single_blocks=single, axes_dim=[8, 12, 12], theta=10_000,
        qkv_bias=True, guidance_embed=False)


TINY = tiny_config()  # the first generation's shape (2 M parameters); the shipped one's is in its metadata
TEXT_LENGTH = 16  # K: text tokens


class PixelCodec(nn.Module):
    """The tiny backbone's codec: space-to-depth by 2 in pixel space, no parameters.

    encode(x in [-1, 1]) = SCALE * pixel_unshuffle(x, 2): [B, 3, H, W] -> [B, 12, H/2, W/2]; decode inverts it
    exactly. Why pixels rather than a small VAE: the codec is lossless, so the quality ceiling of restoration
    is the generator's alone, and a CPU spends no time encoding or decoding (the README says so).
    SCALE: 2x - 1 of procedural images has std 0.55 (256 images at 64 x 64), so x 2 gives latents of about
    unit std (1.1), the scale rectified flow's unit Gaussian noise expects (as FLUX's VAE scale_factor does);
    a power of two keeps the round trip exact.
    """

    SCALE = 2.0
    downsample_factor = 2

    def encode(self, x, sample=False, generator=None):  # a fixed map: its "posterior" is a point
        return self.SCALE * F.pixel_unshuffle(x, 2)  # [B, 3, H, W] -> [B, 12, H/2, W/2]

    def decode(self, z):
        return F.pixel_shuffle(z / self.SCALE, 2)  # [B, 12, h, w] -> [B, 3, 2h, 2w]


# ---------------------------------------------------------------------------------------------
# Text encoder
# ---------------------------------------------------------------------------------------------

@dataclass
class TextConfig:
    vocab: list = field(default_factory=lambda: ["<pad>", "<eos>", "<unk>"] + WORDS + PHOTO_WORDS)  # ids 0, 1, 2, words
    width: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    length: int = TEXT_LENGTH


PAD, EOS, UNK = 0, 1, 2


class EncoderLayer(nn.Module):
    """Pre-LN transformer layer, non-causal: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, width, num_heads, mlp_ratio):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, int(width * mlp_ratio)), nn.GELU(),
                                 nn.Linear(int(width * mlp_ratio), width))

    def forward(self, x):
        B, L, W = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # 3 x [B, H, L, D]
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, W)
        x = x + self.proj(attn)
        return x + self.mlp(self.norm2(x))


class TinyTextEncoder(nn.Module):
    """Descriptor words -> txt [B, 16, 64] (per-token context) and y [B, 64] (pooled vector).

    A word-level vocabulary (pad 0, eos 1, unk 2, the procedural descriptors, then the words photos add),
    learned token and position embeddings, pre-LN layers and a final LayerNorm. The padding is attended, not masked, as
    FLUX runs T5 on its padded prompt: "" is EOS + 15 pads, and its output is a fixed context like any
    other. y is the EOS token's output through a linear layer (CLIP pools at EOS too).
    """

    def __init__(self, config: TextConfig = None):
        super().__init__()
        c = self.config = config or TextConfig()
        self.token_embedding = nn.Embedding(len(c.vocab), c.width)
        self.position_embedding = nn.Parameter(torch.zeros(c.length, c.width))
        self.layers = nn.ModuleList(EncoderLayer(c.width, c.num_heads, c.mlp_ratio) for _ in range(c.num_layers))
        self.final_norm = nn.LayerNorm(c.width)
        self.pool = nn.Linear(c.width, c.width)

    def tokenize(self, words_or_text, length=None):
        """A string ("warm many circles", commas allowed) or a list of words -> ids [length]:
        the words' ids (unknown words -> unk), EOS, then padding; truncated to keep the EOS."""
        length = length or self.config.length
        words = words_or_text.replace(",", " ").split() if isinstance(words_or_text, str) else list(words_or_text)
        index = {w: i for i, w in enumerate(self.config.vocab)}
        ids = [index.get(w.lower(), UNK) for w in words][: length - 1] + [EOS]
        return torch.tensor(ids + [PAD] * (length - len(ids)), dtype=torch.long)

    def forward(self, ids):
        """ids [B, L] -> (txt [B, L, width], y [B, width])."""
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        for layer in self.layers:
            x = layer(x)
        x = self.final_norm(x)
        eos = (ids == EOS).int().argmax(dim=1)  # the first EOS of each row
        y = self.pool(x[torch.arange(ids.shape[0], device=ids.device), eos])
        return x, y

    def encode(self, prompts):
        """prompts: list of strings (or of word lists) -> {"txt": [B, 16, 64], "y": [B, 64]}."""
        device = self.token_embedding.weight.device
        ids = torch.stack([self.tokenize(p) for p in prompts]).to(device)
        txt, y = self(ids)
        return {"txt": txt, "y": y}


def load_text_encoder(path, device="cpu", dtype=torch.float32):
    """The tiny text encoder from `text.safetensors` (its TextConfig is the `minirestore_config` metadata)."""
    ckpt = hub.Checkpoint([path])
    stored = ckpt.config()
    if stored is None:
        raise UserError(f"{path} has no minirestore_config metadata: it is not a tiny text encoder file; "
                        "rebuild it with `python -m minirestore.pretrain`")
    config = TextConfig(**stored)
    return hub.load_model(lambda: TinyTextEncoder(config), ckpt, what="the tiny text encoder",
                          device=device, dtype=dtype)


def config_json(config):
    return json.dumps(asdict(config))
