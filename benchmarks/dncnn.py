"""A small supervised baseline: a DnCNN-style residual CNN (Zhang et al., TIP 2017), trained from scratch.

    restored = y - R(y),   R = conv3x3(3 -> C) ReLU, (depth - 2) x [conv3x3(C -> C) ReLU], conv3x3(C -> 3)

R predicts the degradation residual; the last convolution starts at zero, so an untrained network returns
its input. No batch norm (the original has it; at these sizes and batch 8 it only adds a train/eval gap).
It trains with Adam on MSE in pixel space on exactly the clean/degraded batches that train.py draws for the
prompt (`train.batch_at` on the same dataset, split and seed), for a wall-clock budget: the replication
gives it the same seconds the prompt took, so the two are compared at equal cost.
"""
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DnCNNConfig:
    depth: int = 6     # convolutions, first and last included
    width: int = 48    # channels of the hidden convolutions
    lr: float = 1e-3   # Adam
    batch_size: int = 8


class DnCNN(nn.Module):
    def __init__(self, config: DnCNNConfig = None):
        super().__init__()
        c = self.config = config or DnCNNConfig()
        layers = [nn.Conv2d(3, c.width, 3, padding=1), nn.ReLU()]
        for _ in range(c.depth - 2):
            layers += [nn.Conv2d(c.width, c.width, 3, padding=1), nn.ReLU()]
        layers.append(nn.Conv2d(c.width, 3, 3, padding=1))
        self.residual = nn.Sequential(*layers)
        nn.init.zeros_(layers[-1].weight)  # identity at step 0
        nn.init.zeros_(layers[-1].bias)

    def forward(self, y):
        """y [B, 3, H, W] in [0, 1] -> restored [B, 3, H, W] (unclamped; clamp for display and scores)."""
        return y - self.residual(y)


def train_dncnn(next_batch, seconds, config=None, seed=0, max_steps=None, log=None):
    """Train for `seconds` of wall clock (data drawing included, as for the prompt) or `max_steps` steps.

    next_batch(step) -> (clean, degraded), each [B, 3, H, W]. Returns (model in eval mode, steps, seconds).
    The step count a budget buys depends on the machine: the run is reproducible given its step count."""
    torch.manual_seed(seed)
    model = DnCNN(config)
    opt = torch.optim.Adam(model.parameters(), lr=model.config.lr)
    start, step = time.time(), 0
    while time.time() - start < seconds and (max_steps is None or step < max_steps):
        clean, degraded = next_batch(step)
        loss = F.mse_loss(model(degraded), clean)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if log is not None and step % 100 == 0:
            log(f"DnCNN step {step}: loss {loss.item():.5f} ({time.time() - start:.0f} s of {seconds:.0f})")
    return model.eval(), step, time.time() - start


@torch.no_grad()
def restore(model, degraded, batch=32):
    """degraded [N, 3, H, W] -> restored [N, 3, H, W] in [0, 1]."""
    return torch.cat([model(degraded[i:i + batch]).clamp(0, 1) for i in range(0, len(degraded), batch)])


def save(model, path, **info):
    torch.save({"config": asdict(model.config), "state": model.state_dict(), "info": info}, path)


def load(path):
    """-> (model in eval mode, info)"""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = DnCNN(DnCNNConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["state"])
    return model.eval(), ckpt["info"]
