"""Tiled restoration (the tiny default restores any size in overlapping tiles of its training size)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sample import blend_weight, restore, tile_starts  # noqa: E402

from minirestore.backbone import load_backbone  # noqa: E402
from minirestore.bridge import Bridge  # noqa: E402


@pytest.mark.parametrize("size,tile,overlap", [(64, 64, 16), (100, 64, 16), (257, 64, 16), (30, 64, 8), (200, 48, 24)])
def test_tiles_cover_with_overlap(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] + min(tile, size) == max(size, min(tile, size))
    for a, b in zip(starts, starts[1:]):
        assert b - a <= tile - overlap and b > a


def test_blend_weight_is_positive_and_flat_inside():
    w = blend_weight(64, 48, 16)
    assert w.shape == (64, 48) and (w > 0).all() and w[20:44, 20:28].eq(1).all()
    assert w[0, 0] < w[8, 8] < w[16, 16]


def test_tiled_restore_matches_untiled_when_one_tile_covers(backbone_dir):
    bb = load_backbone(backbone_dir)
    x = torch.rand(3, 20, 24, generator=torch.Generator().manual_seed(0))
    bridge = Bridge("ebr", 0.4)
    bank = bb.new_prompt()
    whole = restore(bb, [bank], bridge, x, 3, seed=1)
    one_tile = restore(bb, [bank], bridge, x, 3, seed=1, tile=32)
    torch.testing.assert_close(one_tile, whole, atol=1e-5, rtol=1e-5)
    tiled = restore(bb, [bank], bridge, x, 3, seed=1, tile=12, overlap=4, batch=2)
    assert tiled.shape == (3, 20, 24) and torch.isfinite(tiled).all() and tiled.min() >= 0 and tiled.max() <= 1


def test_samples_average_restorations_from_successive_noises(backbone_dir):
    """--samples K: the mean of K restorations, the first being the K = 1 one; the others start from the
    next draws of the same generator, so they differ from it."""
    bb = load_backbone(backbone_dir)
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    bridge, bank = Bridge("ebr", 0.5), bb.new_prompt()
    one = restore(bb, [bank], bridge, x, 2, seed=3)
    two = restore(bb, [bank], bridge, x, 2, seed=3, samples=2)
    g = torch.Generator().manual_seed(3)
    Y = bb.encode(x[None])
    runs = [bb.decode(bridge.sample(lambda x_, tau: bb.velocity(x_, tau, bank), Y, 2, generator=g))[0] for _ in range(2)]
    torch.testing.assert_close(one, runs[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(two, (runs[0] + runs[1]) / 2, atol=1e-6, rtol=1e-6)
    assert (runs[0] - runs[1]).abs().max() > 1e-3  # different start noises


def test_sampler_defaults():
    from minirestore.restore import sampler_defaults
    assert sampler_defaults("tiny") == (1, 20)  # the tiny default's measured budget split
    assert sampler_defaults("flux-dev") == (20, 1)  # the released sampler
    assert sampler_defaults("tiny", ypt=True) == (20, 1)
    assert sampler_defaults("tiny", steps=7) == (7, 20) and sampler_defaults("flux-dev", samples=2) == (20, 2)


@pytest.mark.parametrize("flag", ["--samples", "--steps"])
def test_sampler_flags_must_be_positive(flag):
    from minirestore import UserError
    from sample import parse_args
    with pytest.raises(UserError, match=f"{flag} must be at least 1"):
        parse_args(["x.png", flag, "0"])
