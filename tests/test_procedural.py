"""The procedural dead-leaves data: determinism, ranges, vocabulary, and statistics that can tell sets apart."""
import torch
import torch.nn.functional as F

from minirestore.procedural import (DENSITIES, EDGES, FILLS, PALETTES, SHAPES, WORDS, ProceduralImages,
                                    colour_histogram_distance, dead_leaves, radial_power_slope)


def _set(seed, n=12, size=64):
    return torch.stack([dead_leaves(seed * 1000 + i, size)[0] for i in range(n)])


def test_deterministic_per_seed_and_seeds_differ():
    a, wa = dead_leaves(7)
    b, wb = dead_leaves(7)
    c, _ = dead_leaves(8)
    assert torch.equal(a, b) and wa == wb
    assert (a - c).abs().mean() > 0.02


def test_shapes_range_and_words():
    for i, size in enumerate((32, 48, 64)):
        for seed in range(4):
            x, words = dead_leaves(100 * i + seed, size)
            assert x.shape == (3, size, size) and x.dtype == torch.float32
            assert x.min() >= 0 and x.max() <= 1 and x.std() > 0.01
            palette, density, shape, fill, edge = words
            assert palette in PALETTES and density in DENSITIES and shape in SHAPES
            assert fill in FILLS and edge in EDGES and set(words) <= set(WORDS)


def test_one_seed_draws_one_scene_at_any_size():
    seed = next(s for s in range(100) if dead_leaves(s, 32)[1][3:] == ["smooth", "sharp"])
    big, small, other = dead_leaves(seed, 64)[0], dead_leaves(seed, 32)[0], dead_leaves(seed + 1, 32)[0]
    down = F.avg_pool2d(big[None], 2)[0]
    assert (down - small).abs().mean() < 0.05 < (other - small).abs().mean()


def test_dataset_items():
    ds = ProceduralImages(5, size=32, seed=3)
    item = ds[2]
    image, words = dead_leaves(3 * 1_000_003 + 2, 32)
    assert len(ds) == 5 and torch.equal(item["clean"], image) and item["words"] == words
    assert isinstance(item["name"], str)
    try:
        ds[5]
        raise AssertionError("index 5 of 5 items must raise IndexError")
    except IndexError:
        pass


def test_radial_power_slope_separates_natural_noise_and_blur():
    x = _set(1)
    slope = radial_power_slope(x)
    assert -3.5 < slope < -1.0  # power-law, natural-image-like
    assert abs(radial_power_slope(torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(0)))) < 0.5
    assert radial_power_slope(F.avg_pool2d(x, 3, 1, 1)) < slope - 0.5  # blur removes high frequencies


def test_colour_histogram_distance():
    a, b = _set(2), _set(3)
    assert colour_histogram_distance(a, a) == 0
    assert abs(colour_histogram_distance(a, b) - colour_histogram_distance(b, a)) < 1e-12
    shifted = a[:, [2, 0, 1]]  # colours rotated: same structure, other colours
    assert colour_histogram_distance(a, shifted) > 0.2
    noise = torch.rand_like(a)
    assert colour_histogram_distance(a, noise) > colour_histogram_distance(a, b)
    assert 0 <= colour_histogram_distance(a, noise) <= 1
