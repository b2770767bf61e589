"""Block offload: transformer blocks live in (pinned) CPU memory and visit the GPU one at a time.

    offload_blocks(model, "cuda")       the blocks' weights stay on the CPU; everything else moves to the GPU

Before block i runs (a forward pre-hook) its weights are on the GPU, and the copies of the next `ahead` blocks
are already under way on a side stream, so copying overlaps computing; after it ran (a forward hook) its GPU
copy is dropped. The backward pass with gradient checkpointing (train.py's default on CUDA) re-runs every
block's forward in reverse order, which fires the same hooks: the blocks come back in reverse and the
prefetch follows the direction of travel. (Without checkpointing autograd keeps the weights each block saved
for its backward, so the blocks' GPU copies live until the backward: correct, but it saves no memory.)

The weights are the same numbers wherever they are, so outputs and gradients are bit-identical to the
non-offloaded model (tested on the CPU with a stand-in `Copier` that clones and counts transfers).
Wan computes every block's cross-attention keys and values (of the context, once, and of the prompt, per
call) before the blocks run: `model.resident(block)` brings each block over for that too. In training,
autograd keeps those k/v projection weights for the prompt's gradient until the backward.
"""
from contextlib import contextmanager

import torch
from torch import nn


class Copier:
    """Host -> device copies: on a side CUDA stream (non-blocking from pinned memory), or, on the CPU, clones."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.transfers = 0  # tensors copied to the device

    def start(self, tensors):
        """Begin copying a block's tensors; returns a handle for `finish`."""
        self.transfers += len(tensors)
        if self.stream is None:
            return [t.clone() for t in tensors], None
        with torch.cuda.stream(self.stream):
            copies = [t.to(self.device, non_blocking=True) for t in tensors]
            event = torch.cuda.Event()
            event.record(self.stream)
        return copies, event

    def finish(self, handle):
        copies, event = handle
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            for t in copies:  # the compute stream now uses memory the side stream allocated
                t.record_stream(torch.cuda.current_stream(self.device))
        return copies


def _tensors(block):
    """(module, attribute name, is parameter) of every parameter and buffer of a block."""
    out = []
    for module in block.modules():
        out += [(module, name, True) for name, p in module._parameters.items() if p is not None]
        out += [(module, name, False) for name, b in module._buffers.items() if b is not None]
    return out


class BlockOffload:
    def __init__(self, blocks, copier, ahead=1):
        self.blocks, self.copier, self.ahead = list(blocks), copier, ahead
        self.slots = [_tensors(b) for b in self.blocks]
        pin = copier.stream is not None
        self.host = [[(getattr(m, n).data.pin_memory() if pin else getattr(m, n).data) for m, n, _ in slot]
                     for slot in self.slots]
        for i in range(len(self.blocks)):
            self._point(i, self.host[i])
        self.pending, self.last, self.handles = {}, None, []
        self.index = {id(b): i for i, b in enumerate(self.blocks)}
        for i, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_pre_hook(lambda mod, args, i=i: self._before(i)))
            self.handles.append(block.register_forward_hook(lambda mod, args, out, i=i: self._after(i)))

    def _point(self, i, tensors):
        for (module, name, is_param), t in zip(self.slots[i], tensors):
            if is_param:
                module._parameters[name].data = t
            else:
                module._buffers[name] = t

    def _prefetch(self, i):
        if 0 <= i < len(self.blocks) and i not in self.pending:
            self.pending[i] = self.copier.start(self.host[i])

    def _before(self, i):
        step = -1 if self.last is not None and i < self.last else 1  # the backward's recomputation runs in reverse
        self._prefetch(i)
        self._point(i, self.copier.finish(self.pending.pop(i)))
        for j in range(1, self.ahead + 1):
            self._prefetch(i + step * j)
        self.last = i

    def _after(self, i):
        self._point(i, self.host[i])  # drop the device copy (autograd may still hold what it saved)

    @contextmanager
    def resident(self, block):
        """The block's weights on the device inside the `with` (Wan computes its cross-attention keys and
        values of the context and the prompt outside the blocks' forward)."""
        i = self.index[id(block)]
        self._prefetch(i)
        self._point(i, self.copier.finish(self.pending.pop(i)))
        try:
            yield
        finally:
            self._point(i, self.host[i])

    def remove(self):
        for h in self.handles:
            h.remove()
        self.pending.clear()


def offload_blocks(model, device, ahead=1, copier=None):
    """Keep `model`'s transformer blocks on the host and stream them to `device` block by block; move the
    rest of the model to `device`. Returns the BlockOffload (its copier counts the transfers)."""
    names = [n for n in ("double_blocks", "single_blocks", "blocks") if isinstance(getattr(model, n, None), nn.ModuleList)]
    if not names:
        raise ValueError("offload_blocks needs a FLUX or Wan transformer (double_blocks/single_blocks or blocks)")
    blocks = [b for n in names for b in getattr(model, n)]
    held = {id(b) for b in blocks}
    for child_name, child in model.named_children():
        if child_name not in names and id(child) not in held:
            child.to(device)
    for name, p in model.named_parameters(recurse=False):
        p.data = p.data.to(device)
    for block in blocks:
        block.to("cpu")
    off = BlockOffload(blocks, copier or Copier(device), ahead)
    if hasattr(model, "resident"):
        model.resident = off.resident
    return off
