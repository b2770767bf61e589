"""Several processes through PyTorch's own distributed runtime (`torchrun`): nothing home-made.

`torchrun --nproc_per_node=N train.py ...` starts N copies of the script with RANK, WORLD_SIZE and
LOCAL_RANK set. Each process holds the frozen backbone; the only trainable tensors (P and alpha,
about 1.5 M numbers for FLUX) have their gradients averaged with one all-reduce per step, which is
all DistributedDataParallel would do for them. NCCL on CUDA, gloo on the CPU. Without torchrun
(WORLD_SIZE unset or 1) every function here is a no-op, so the scripts read the same either way.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self):
        """Only rank 0 writes checkpoints, prompt files, previews and logs."""
        return self.rank == 0

    def device(self, requested):
        """One GPU per process: cuda -> cuda:LOCAL_RANK under torchrun."""
        if self.size > 1 and str(requested) == "cuda":
            return f"cuda:{self.local_rank}"
        return requested


def init(device="cpu"):
    """Join the process group torchrun set up (or stay alone); the backend follows the device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return world


def average_gradients(params, world):
    """grad <- mean over processes of grad: the data-parallel step for a few trainable tensors."""
    if world.size == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world.size


def sum_across(values, world, device="cpu"):
    """Element-wise sum of a list of floats over all processes (validation metrics)."""
    if world.size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def barrier(world):
    if world.size > 1:
        dist.barrier()


def close(world):
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
