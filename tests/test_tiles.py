"""Tiled restoration (the tiny default restores any size in overlapping tiles of its training size)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sample import blend_weight, restore, spun, tile_starts  # noqa: E402
from minirestore.restore import cycle_shift  # noqa: E402

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
    assert sampler_defaults("tiny") == (1, 20, 4)  # the tiny default's measured budget split, spun on its 4 px tokens
    assert sampler_defaults("flux-dev") == (20, 1, 0)  # the released sampler
    assert sampler_defaults("tiny", ypt=True) == (20, 1, 0)
    assert sampler_defaults("tiny", steps=7) == (7, 20, 4) and sampler_defaults("flux-dev", samples=2) == (20, 2, 0)
    assert sampler_defaults("tiny", spin=0) == (1, 20, 0) and sampler_defaults("flux-dev", spin=16) == (20, 1, 16)


@pytest.mark.parametrize("flag", ["--samples", "--steps"])
def test_sampler_flags_must_be_positive(flag):
    from minirestore import UserError
    from sample import parse_args
    with pytest.raises(UserError, match=f"{flag} must be at least 1"):
        parse_args(["x.png", flag, "0"])


def test_spin_flag_must_not_be_negative():
    from minirestore import UserError
    from sample import parse_args
    with pytest.raises(UserError, match="--spin must be 0"):
        parse_args(["x.png", "--spin", "-1"])
    assert parse_args(["x.png", "--spin", "0"]).spin == 0


@pytest.mark.parametrize("p", [2, 4, 16])
def test_cycle_shift_visits_every_phase_once(p):
    shifts = [cycle_shift(k, p) for k in range(p * p)]
    assert shifts[0] == (0, 0) and len(set(shifts)) == p * p
    assert all(-(p // 2) <= v < p - p // 2 for s in shifts for v in s)
    assert all(a[0] != b[0] for a, b in zip(shifts, shifts[1:]))  # a few samples already spread out
    assert cycle_shift(p * p + 3, p) == shifts[3]  # then round again


@pytest.mark.parametrize("p", [0, 1, 2, 4])
def test_spun_shifts_back_exactly(p):
    """Whatever the shift, restoration k is put back where its pixels came from: an identity restorer gives x."""
    x = torch.rand(2, 3, 12, 20, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(spun(lambda t, k: t, x, 7, p), x, rtol=0, atol=1e-6)


def test_spun_without_shift_is_the_plain_mean():
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(5, 1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    out = spun(lambda t, k: t + noise[k], x, 5, 0)
    assert torch.equal(out, sum(x + noise[k] for k in range(5)) / 5)


def test_spun_averages_a_token_grid_artifact_out():
    """A restorer that adds a pattern tied to its own p x p token grid (the seams): spun over the p * p phases,
    every pixel at least p / 2 from the border gets the pattern's mean, a flat offset; without spinning the
    pattern stays."""
    p = 4
    pattern = torch.randn(p, p, generator=torch.Generator().manual_seed(2))
    seamy = lambda t, k: t + pattern.repeat(t.shape[-2] // p + 1, t.shape[-1] // p + 1)[:t.shape[-2], :t.shape[-1]]  # noqa: E731
    x = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(3))
    inner = (..., slice(p // 2, -(p // 2)), slice(p // 2, -(p // 2)))
    out = spun(seamy, x, p * p, p)
    torch.testing.assert_close(out[inner], x[inner] + pattern.mean(), rtol=0, atol=1e-6)
    plain = spun(seamy, x, p * p, 0)
    assert (plain - x - pattern.mean())[inner].abs().max() > 0.1


def test_restore_spin(backbone_dir):
    """restore(spin=p): the first restoration is unshifted (one sample is the unspun one); with several the tiles'
    grid moves, so the mean changes, and stays a valid image."""
    bb = load_backbone(backbone_dir)
    x = torch.rand(3, 20, 24, generator=torch.Generator().manual_seed(0))
    bridge, bank = Bridge("ebr", 0.5), bb.new_prompt()
    m = bb.multiple
    one = restore(bb, [bank], bridge, x, 2, seed=3, tile=32)
    assert torch.equal(restore(bb, [bank], bridge, x, 2, seed=3, tile=32, spin=m), one)
    plain = restore(bb, [bank], bridge, x, 2, seed=3, tile=32, samples=3)
    spun_ = restore(bb, [bank], bridge, x, 2, seed=3, tile=32, samples=3, spin=m)
    assert spun_.shape == x.shape and torch.isfinite(spun_).all() and spun_.min() >= 0 and spun_.max() <= 1
    assert (spun_ - plain).abs().max() > 1e-3
