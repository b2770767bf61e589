"""The prompt bank and its file formats (ours, and the official release's .pt)."""
from collections import OrderedDict

import pytest
import torch

from minirestore import UserError
from minirestore.prompts import PromptBank, import_official, load_prompt, main, save_prompt


def test_init_is_the_frozen_model():
    bank = PromptBank(K=7, D=16, n_blocks=5, generator=torch.Generator().manual_seed(0))
    assert bank.prompt.shape == (1, 7, 16) and bank.alpha.shape == (5,)
    assert torch.all(bank.alpha == 0)  # step 0 is exactly the frozen model
    assert abs(bank.prompt.std().item() - 0.02) < 0.005
    assert [n for n, p in bank.named_parameters()] == ["prompt", "alpha"]
    assert bank.prompt.dtype == torch.float32


def test_round_trip_with_metadata(tmp_path):
    bank = PromptBank(4, 8, 3)
    with torch.no_grad():
        bank.alpha.copy_(torch.tensor([0.5, -1.0, 2.0]))
    path = save_prompt(bank, tmp_path / "sub" / "p.safetensors", backbone="tiny", degradation="noise",
                       bridge="ebr", T0=0.6, steps=10)
    assert [p.name for p in path.parent.iterdir()] == ["p.safetensors"]  # no temporary file left
    back = load_prompt(path, backbone="tiny", D=8, n_blocks=3)
    assert torch.equal(back.prompt, bank.prompt) and torch.equal(back.alpha, bank.alpha)
    assert back.meta["degradation"] == "noise" and float(back.meta["T0"]) == 0.6
    assert back.meta["K"] == "4" and back.meta["bridge"] == "ebr"


def test_mismatched_backbone_is_refused(tmp_path):
    path = save_prompt(PromptBank(4, 8, 3), tmp_path / "p.safetensors", backbone="tiny")
    with pytest.raises(UserError, match="trained for the backbone tiny, not flux-dev"):
        load_prompt(path, backbone="flux-dev")
    with pytest.raises(UserError, match="width D is 8, the backbone's is 16"):
        load_prompt(path, D=16)
    with pytest.raises(UserError, match="number of blocks is 3"):
        load_prompt(path, n_blocks=57)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_prompt(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="not a readable prompt file"):
        load_prompt(junk)


def _official(tmp_path, backend="wan", K=226, D=24, n=30):
    P = torch.randn(1, K, D)
    alphas = [torch.tensor(float(i) / 10) for i in range(n)]
    path = tmp_path / f"{backend}_haze.pt"
    torch.save({"backend": backend, "deep_prompt_bank": OrderedDict(prompts=P), "alphas": alphas}, path)
    return path, P, torch.stack(alphas)


def test_import_official_release(tmp_path):
    src, P, alphas = _official(tmp_path)
    out = import_official(src, tmp_path / "haze.safetensors")
    bank = load_prompt(out, backbone="wan2.1-t2v-1.3b", n_blocks=30)
    assert torch.equal(bank.prompt, P) and torch.equal(bank.alpha, alphas)
    assert bank.meta["degradation"] == "haze" and bank.meta["bridge"] == "ebr"
    assert float(bank.meta["T0"]) == 0.4


def test_import_cli(tmp_path, capsys):
    src, _, _ = _official(tmp_path, backend="flux", K=5, D=8, n=57)
    assert main(["import", str(src), str(tmp_path / "o.safetensors")]) == 0
    assert load_prompt(tmp_path / "o.safetensors").meta["backbone"] == "flux-dev"
    torch.save({"something": 1}, tmp_path / "bad.pt")
    assert main(["import", str(tmp_path / "bad.pt"), str(tmp_path / "x.safetensors")]) == 2
    assert "not an official prompt checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
