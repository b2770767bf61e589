"""Shared test set-up.

Triton decides at decoration time whether a kernel runs in its interpreter, so TRITON_INTERPRET must
be set before `minirestore.kernels` is imported: without a GPU, every Triton kernel in the tests is interpreted.
"""
import json
import os
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))


# ---------------------------------------------------------------------------------------------
# A small FLUX-shaped backbone folder (random weights, official key names) and a folder of images,
# shared by the method and scale-out tests.
# ---------------------------------------------------------------------------------------------
from minirestore.autoencoder import AutoEncoder, AutoEncoderConfig  # noqa: E402
from minirestore.context import save_context  # noqa: E402
from minirestore.flux import Flux, FluxConfig  # noqa: E402

FLUX = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=8, context_in_dim=16, hidden_size=32, mlp_ratio=2.0,
                  num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[4, 6, 6], guidance_embed=False)
AE = AutoEncoderConfig(resolution=16, in_channels=3, ch=32, out_ch=3, ch_mult=[1, 2], num_res_blocks=1,
                       z_channels=16, scale_factor=1.0, shift_factor=0.0)


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("scale", "norm1.weight", "norm2.weight", "norm_out.weight")) or ".norm.weight" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)
    return model


@pytest.fixture(scope="session")
def backbone_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("backbone")
    flux = _randomise(Flux(FLUX), 0)
    save_file(flux.state_dict(), d / "flux.safetensors", metadata={"minirestore_config": json.dumps(asdict(FLUX))})
    ae = _randomise(AutoEncoder(AE), 1)
    save_file(ae.state_dict(), d / "ae.safetensors", metadata={"minirestore_config": json.dumps(asdict(AE))})
    g = torch.Generator().manual_seed(2)
    save_context(d / "context.safetensors", {"txt": torch.randn(1, 6, 16, generator=g), "y": torch.randn(1, 8, generator=g)},
                 {"backbone": "test-flux"})
    return d


@pytest.fixture(scope="session")
def images_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(6):
        yy, xx = np.mgrid[0:20, 0:24] / 24.0
        img = np.stack([np.sin(xx * (3 + i)), np.cos(yy * (2 + i)), xx * yy], -1) * 0.4 + 0.5
        img = np.clip(img + 0.03 * rng.standard_normal(img.shape), 0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(d / f"img{i}.png")
    return d




# ---------------------------------------------------------------------------------------------
# Photographs (photos.py). `fake_photos`: a cache of synthetic arrays under every listed name, for code
# that only needs some photographs (pre-training smoke runs). `real_photos`: the fetched cache, for the
# tests of the shipped weights on held-out photographs (.ci/run fetches it first: python -m minirestore.photos).
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def fake_photos(tmp_path_factory, monkeypatch):
    from minirestore import photos

    cache = tmp_path_factory.getbasetemp() / "fake-photos"
    if not cache.exists():
        cache.mkdir()
        for i, row in enumerate(photos.read_list()):
            g = np.random.default_rng(i)
            small = g.integers(0, 256, (9, 12, 3), dtype=np.uint8)
            np.save(cache / f"{row.name}.npy", np.asarray(Image.fromarray(small).resize((160, 120), Image.BILINEAR)))
    monkeypatch.setenv("MINIRESTORE_PHOTOS", str(cache))
    return cache


@pytest.fixture(scope="session")
def real_photos():
    from minirestore import photos

    cache = photos.cache_dir()
    if not all((cache / f"{r.name}.npy").exists() for r in photos.read_list()):
        pytest.skip(f"the photographs are not in {cache}: fetch them with `python -m minirestore.photos`")
    return cache
