"""Block offload (offload.py) on the CPU: a stand-in copier clones each block's tensors where a GPU run copies
them over a side stream, counting the transfers. Outputs and the prompt's gradients are bit-identical to the
model without offload; every block is copied once per forward pass (and once more by the backward's
recomputation with gradient checkpointing), and only the running block and the one fetched ahead are alive."""
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from minirestore.backbone import load_backbone
from minirestore.offload import Copier, offload_blocks
from test_wan_method import wan_dir  # noqa: F401  (the tiny Wan backbone folder fixture)

ROOT = Path(__file__).resolve().parents[1]


class CountingCopier(Copier):
    """Counts transfers and how many copied blocks are alive at once."""

    def __init__(self):
        super().__init__("cpu")
        self.alive, self.most, self.blocks = 0, 0, 0

    def _gone(self):
        self.alive -= 1

    def start(self, tensors):
        copies, event = super().start(tensors)
        self.blocks += 1
        self.alive += 1
        self.most = max(self.most, self.alive)
        weakref.finalize(copies[0], self._gone)
        return copies, event


def run_step(bb, x, tau, checkpointing):
    bb.model.gradient_checkpointing = checkpointing
    bank = bb.new_prompt(torch.Generator().manual_seed(2))
    with torch.no_grad():
        bank.alpha.fill_(0.6)
    v = bb.velocity(x, tau, bank)
    v.square().mean().backward()
    return v.detach(), bank.prompt.grad, bank.alpha.grad


@pytest.mark.parametrize("kind", ["flux", "wan"])
@pytest.mark.parametrize("checkpointing", [True, False])
def test_offload_is_bit_identical_and_counts_transfers(kind, checkpointing, backbone_dir, wan_dir):  # noqa: F811
    folder = backbone_dir if kind == "flux" else wan_dir
    x = torch.randn((2, 16, 4, 4) if kind == "flux" else (1, 16, 2, 4, 4), generator=torch.Generator().manual_seed(1))
    tau = torch.tensor([0.3, 0.8][: x.shape[0]])
    ref = run_step(load_backbone(folder), x, tau, checkpointing)
    bb = load_backbone(folder)
    copier = CountingCopier()
    off = offload_blocks(bb.model, "cpu", ahead=1, copier=copier)
    n = len(off.blocks)
    if kind == "wan":  # the constant context's keys and values, computed once per backbone
        with torch.no_grad():
            bb.velocity(x, tau)
        copier.blocks = 0
    got = run_step(bb, x, tau, checkpointing)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    # every block once per forward pass, once more when the backward recomputes it (checkpointing); Wan also
    # brings each block over once for the prompt's keys and values, before the blocks run
    assert copier.blocks == (n if kind == "wan" else 0) + n * (2 if checkpointing else 1)
    assert copier.transfers >= copier.blocks
    if checkpointing:
        assert copier.most <= 2 + (n if kind == "wan" else 0)  # Wan's prompt k/v keep their weights for the backward
    with torch.no_grad():  # sampling: the running block and the one fetched ahead, no more
        copier.most = copier.alive = 0
        assert torch.equal(bb.velocity(x, tau), load_backbone(folder).velocity(x, tau))
        assert copier.most <= 2


def test_sample_with_offload_writes_the_same_image(backbone_dir, images_dir, tmp_path):
    outs = []
    for offload in ("none", "blocks"):
        r = subprocess.run([sys.executable, str(ROOT / "sample.py"), images_dir / "img0.png", "--model", backbone_dir,
                            "--steps", "2", "--offload", offload, "--out", tmp_path / offload,
                            "--prompt", prompt_file(tmp_path, backbone_dir)],
                           capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert r.returncode == 0, r.stderr
        outs.append((tmp_path / offload / "img0_restored.png").read_bytes())
    assert outs[0] == outs[1]


def prompt_file(tmp_path, backbone_dir):
    from minirestore.prompts import save_prompt

    path = tmp_path / "p.safetensors"
    if not path.exists():
        bb = load_backbone(backbone_dir)
        bank = bb.new_prompt(torch.Generator().manual_seed(4))
        with torch.no_grad():
            bank.alpha.fill_(0.5)
        save_prompt(bank, path, backbone=bb.name, T0=0.4)
    return path
