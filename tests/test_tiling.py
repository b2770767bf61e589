"""Tiled VAE encode/decode (tiling.py): tiles cover with overlap, and tiled outputs stay within a stated
tolerance of untiled ones on sizes that are not multiples of the tile, for tiny random VAEs.

Tolerances (relative L2 error, measured on these random VAEs; not measured on the released weights): the Wan VAE's only
global part is a per-frame attention, so with a halo around each tile the tiled pass is within 1e-3 (encode)
and 3e-2 (decode) (tiles of 64 px, a 48 px halo: measured 0.05e-2 and 2.1e-2; the decoder's receptive field is
wider than the halo's 6 latents); the FLUX autoencoder's GroupNorms and mid-block attention see the tile,
not the image, so it is within 2e-2 (encode) and 5e-2 (decode) with tiles of 96 px (24 latents) here (measured
0.9e-2 and 3.0e-2; smaller tiles are further off: 48 px tiles give 1.4e-2 and 5.2e-2)."""
import pytest
import torch

from conftest import _randomise
from minirestore.autoencoder import AutoEncoder, AutoEncoderConfig
from minirestore.tiling import Tiles, blend_weight, tile_starts
from test_wan_vae import tiny_vae

AE = AutoEncoderConfig(resolution=16, in_channels=3, ch=32, out_ch=3, ch_mult=[1, 2, 2], num_res_blocks=1,
                       z_channels=4, scale_factor=1.0, shift_factor=0.0)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("size,tile,overlap,align", [(64, 64, 16, 8), (100, 32, 8, 4), (257, 64, 16, 1), (200, 48, 24, 8)])
def test_tiles_cover_with_overlap(size, tile, overlap, align):
    starts = tile_starts(size, tile, overlap, align)
    assert starts[0] == 0 and starts[-1] + min(tile, size) == size
    assert all(s % align == 0 for s in starts)
    for a, b in zip(starts, starts[1:]):
        assert 0 < b - a <= tile - overlap


def test_blend_weight_ramps_and_is_positive():
    w = blend_weight(20, 12, 4)
    assert (w > 0).all() and w[5:15, 5:7].eq(1).all() and w[0, 0] < w[2, 2] < w[4, 4]


def test_flux_autoencoder_tiled_close_to_untiled():
    ae = _randomise(AutoEncoder(AE), 1).eval()
    x = torch.rand(1, 3, 212, 252, generator=torch.Generator().manual_seed(0)) * 2 - 1  # multiples of 4, not of 48
    with torch.no_grad():
        ae.tiles = None
        z = ae.encode(x)
        latents = torch.randn(z.shape, generator=torch.Generator().manual_seed(3))  # what a sampler hands over
        out = ae.decode(latents)
        ae.tiles = Tiles(above=0, size=96, overlap=32, halo=64)
        calls = []
        for part in (ae.encoder, ae.decoder):  # every call of the encoder or decoder is one tile
            part.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape))
        z_tiled = ae.encode(x)
        n_enc = len(calls)
        out_tiled = ae.decode(latents)
    assert n_enc == 3 * 4 and len(calls) == 2 * n_enc  # 212 -> 3 tiles of 96 sharing >= 32, 252 -> 4
    assert max(s[-1] for s in calls[:n_enc]) < x.shape[-1]  # every tile (with its halo) is smaller than the image
    assert z_tiled.shape == z.shape and out_tiled.shape == out.shape
    assert rel_err(z_tiled, z) < 2e-2
    assert rel_err(out_tiled, out) < 5e-2
    ae.tiles = Tiles(above=252, size=96, overlap=32)  # automatic: not above the threshold -> untiled, exact
    with torch.no_grad():
        assert torch.equal(ae.encode(x), z)


def test_wan_vae_tiled_close_to_untiled():
    vae = tiny_vae().eval()
    video = torch.rand(1, 3, 5, 128, 192, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        vae.tiles = None
        z = vae.encode(video)
        out = vae.decode(z)
        vae.tiles = Tiles(above=0, size=64, overlap=16, halo=48)
        z_tiled, out_tiled = vae.encode(video), vae.decode(z)
        # streaming decode (one latent frame per call, the caches per tile kept in `state`) = one call
        state = {}
        pieces = torch.cat([vae.decode(z[:, :, i:i + 1], state=state) for i in range(z.shape[2])], dim=2)
    assert z_tiled.shape == z.shape and out_tiled.shape == out.shape == video.shape
    assert rel_err(z_tiled, z) < 1e-3
    assert rel_err(out_tiled, out) < 3e-2
    assert torch.allclose(pieces, out_tiled, atol=1e-6, rtol=0) and len(state) > 1
