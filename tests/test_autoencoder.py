"""The FLUX autoencoder against diffusers' AutoencoderKL, and loading it through minirestore.hub.

diffusers is the independent reference: it is built with a tiny config, ALL its weights randomised,
and its state dict renamed to BFL keys by the map below (architectures.md 2.10), written here and
not taken from the package, so a wrong map or wrong model maths both show up as a mismatch.
"""
import re

import pytest
import torch
from safetensors.torch import save_file

from minirestore import UserError
from minirestore.autoencoder import FLUX_AE, AutoEncoder, AutoEncoderConfig
from minirestore.hub import load_autoencoder

CONFIGS = [
    AutoEncoderConfig(64, 3, 32, 3, [1, 2], 1, 16, 0.3611, 0.1159),
    AutoEncoderConfig(64, 3, 32, 3, [1, 2, 2], 2, 16, 0.3611, 0.1159),  # equal last two levels, as FLUX
]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def diffusers_to_bfl(state, levels):
    """diffusers AutoencoderKL keys -> BFL ae.safetensors keys (architectures.md 2.10)."""
    out = {}
    for key, t in state.items():
        k = key
        k = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", k)
        k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", k)
        # decoder up blocks are numbered in run order in diffusers, by resolution in BFL
        k = re.sub(r"up_blocks\.(\d+)\.", lambda m: f"up.{levels - 1 - int(m.group(1))}.", k)
        k = re.sub(r"(up\.\d+\.)resnets\.", r"\1block.", k)
        k = k.replace("upsamplers.0.", "upsample.")
        k = k.replace("conv_shortcut", "nin_shortcut")
        k = k.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
        k = k.replace("attn_1.group_norm", "attn_1.norm").replace("attn_1.to_out.0", "attn_1.proj_out")
        k = re.sub(r"attn_1\.to_([qkv])\.", r"attn_1.\1.", k)
        k = k.replace("conv_norm_out", "norm_out")
        if ".attn_1." in k and k.endswith(".weight") and t.ndim == 2:
            t = t[:, :, None, None]  # linear [C, C] -> 1x1 conv [C, C, 1, 1]
        out[k] = t
    return out


def diffusers_pair(config, seed=0):
    diffusers = pytest.importorskip("diffusers")
    levels = len(config.ch_mult)
    ref = diffusers.AutoencoderKL(
        in_channels=config.in_channels,
        out_channels=config.out_ch,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=[config.ch * m for m in config.ch_mult],
        layers_per_block=config.num_res_blocks,
        latent_channels=config.z_channels,
        norm_num_groups=32,
        scaling_factor=config.scale_factor,
        shift_factor=config.shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    ).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # random everywhere (default inits leave ones and zeros that hide bugs), scaled so that the
        # activations stay O(1) and fp32 rounding is not amplified from block to block
        for name, p in ref.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                p.copy_(1 + 0.2 * r if "norm" in name and name.endswith("weight") else 0.1 * r)
            else:
                p.copy_(r / p[0].numel() ** 0.5)
    ours = AutoEncoder(config).eval()
    ours.load_state_dict(diffusers_to_bfl(ref.state_dict(), levels), strict=True)
    return ref, ours


@pytest.mark.parametrize("config", CONFIGS, ids=["2levels", "3levels"])
def test_parity_with_diffusers(config):
    ref, ours = diffusers_pair(config)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 24, 40, generator=g) * 2 - 1  # odd multiples of the factor
    with torch.no_grad():
        mean = ref.encode(x).latent_dist.mean
        z_ref = (mean - config.shift_factor) * config.scale_factor
        z = ours.encode(x)
        assert z.shape == (2, config.z_channels, 24 // ours.downsample_factor, 40 // ours.downsample_factor)
        assert rel_err(z, z_ref) <= 1e-5

        zz = torch.randn(z.shape, generator=g)
        x_ref = ref.decode(zz / config.scale_factor + config.shift_factor).sample
        x_ours = ours.decode(zz)
        assert x_ours.shape == (2, 3, 24, 40)
        assert rel_err(x_ours, x_ref) <= 1e-5

        # forward = decode(encode(x)), the diffusers pipeline with the latent scaling done by hand
        x_ref = ref.decode(z_ref / config.scale_factor + config.shift_factor).sample
        assert rel_err(ours(x), x_ref) <= 1e-5


def test_sizes_not_multiple_of_factor_are_refused():
    model = AutoEncoder(CONFIGS[1])
    with pytest.raises(ValueError, match="multiples of 4"):
        model.encode(torch.zeros(1, 3, 24, 42))


def test_flux_preset_key_set():
    """The FLUX_AE preset has the 244 keys of ae.safetensors (checkpoint-keys.md), built on meta."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoEncoder(FLUX_AE).state_dict().items()}
    assert len(shapes) == 244
    assert shapes["encoder.conv_out.weight"] == (32, 512, 3, 3)
    assert shapes["decoder.conv_in.weight"] == (512, 16, 3, 3)
    assert shapes["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert shapes["decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in shapes
    assert "encoder.down.3.downsample.conv.weight" not in shapes
    assert shapes["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)


def _tiny_file(path, config, seed=0):
    torch.manual_seed(seed)
    model = AutoEncoder(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.eval()


@pytest.mark.parametrize("as_folder", [False, True], ids=["file", "folder"])
def test_load_tiny_checkpoint(tmp_path, as_folder):
    config = CONFIGS[1]
    model = _tiny_file(tmp_path / "ae.safetensors", config)
    # a folder that also holds another checkpoint (like a local copy of the BFL repo) must pick ae
    save_file({"img_in.weight": torch.zeros(4, 4)}, str(tmp_path / "flux1-dev.safetensors"))
    source = tmp_path if as_folder else tmp_path / "ae.safetensors"
    loaded = load_autoencoder(source, dtype=torch.float32)
    assert loaded.config.ch == 32 and loaded.config.ch_mult == [1, 2, 2]
    assert loaded.config.num_res_blocks == 2 and loaded.config.z_channels == 16
    x = torch.rand(1, 3, 16, 12) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_transformer_file_is_refused(tmp_path):
    path = tmp_path / "flux1-dev.safetensors"
    save_file({"img_in.weight": torch.zeros(8, 4), "double_blocks.0.img_attn.qkv.weight": torch.zeros(24, 8)},
              str(path))
    with pytest.raises(UserError, match="FLUX transformer"):
        load_autoencoder(path)


def test_config_stored_in_metadata_wins(tmp_path):
    """A minirestore-written file carries its config (scale/shift included) in the header metadata."""
    import dataclasses
    import json

    config = dataclasses.replace(CONFIGS[0], scale_factor=0.5, shift_factor=-0.25)
    torch.manual_seed(0)
    state = {k: torch.randn(v.shape) for k, v in AutoEncoder(config).state_dict().items()}
    save_file(state, str(tmp_path / "ae.safetensors"),
              metadata={"minirestore_config": json.dumps(dataclasses.asdict(config))})
    loaded = load_autoencoder(tmp_path / "ae.safetensors")
    assert loaded.config == config
    assert next(loaded.parameters()).dtype == torch.float32  # the AE is kept in fp32 by default
