"""fp8 weights: the frozen transformer's big linears stored as float8 e4m3 with one scale per output channel.

A weight W [out, in] is stored as q = round_e4m3(W / s) with s [out] = max_i |W[o, i]| / 448 (448 is e4m3's
largest finite value), so every row uses e4m3's whole range and W ~ s q:

    quantise:    s = amax(|W|, dim=1) / 448,   q = e4m3(W / s)         (1 byte a weight, half of bf16)
    dequantise:  W' = (s q) in the compute dtype

Only the linears inside the transformer blocks are stored so (FLUX: attention qkv/proj, MLPs, the single
blocks' linear1/linear2; Wan: self/cross attention q, k, v, o and the FFN): embeddings, modulation, norms and
the head stay in bf16/fp32, and the learned prompt stays fp32. loading.load_model quantises while it streams
the bf16 file (one tensor at a time, in row blocks), so the host never holds more than the fp8 model plus
one tensor.

Computing: on a GPU with fp8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell) the activations are
quantised per row and multiplied with `torch._scaled_mm` (fp8 x fp8 -> bf16, both scales applied in its
epilogue). Elsewhere (CPU included) each layer upcasts its weight to W' just for its own matmul. Either way the
backward pass (the prompt's gradient) multiplies by W' in the compute dtype: with the upcast path the model is
exactly the bf16 model whose weights are W'. `MATMUL` forces a path ("scaled_mm" or "upcast"; "auto" picks).
Training saves memory only with gradient checkpointing (train.py's default on CUDA): otherwise autograd keeps
each layer's upcast W' for the backward.
"""
import torch
import torch.nn.functional as F
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
ROWS = 1024  # rows quantised at a time: the fp32 temporary stays small for any layer
MATMUL = "auto"


def quantise(w):
    """W [out, in] (any float dtype) -> (q [out, in] float8 e4m3, s [out] fp32) with W ~ s[:, None] * q."""
    q = torch.empty(w.shape, dtype=E4M3, device=w.device)
    s = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for i in range(0, w.shape[0], ROWS):
        rows = w[i:i + ROWS].float()
        scale = rows.abs().amax(dim=1).clamp(min=1e-12) / E4M3_MAX  # an all-zero row keeps a tiny scale
        q[i:i + ROWS] = (rows / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
        s[i:i + ROWS] = scale
    return q, s


def dequantise(q, s, dtype):
    """W' = s q, rounded once to `dtype`."""
    return (q.float() * s[:, None]).to(dtype)


def scaled_mm_supported(x):
    if MATMUL != "auto":
        return MATMUL == "scaled_mm"
    return x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9)


class _ScaledMM(torch.autograd.Function):
    """y = x W'^T with fp8 x fp8 products; backward dx = dy W' in dy's dtype (the weights are frozen)."""

    @staticmethod
    def forward(ctx, x, q, s, dtype):
        ctx.save_for_backward(q, s)
        x2 = x.reshape(-1, x.shape[-1])
        sx = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX  # per row of x
        xq = (x2.float() / sx).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
        y = torch._scaled_mm(xq, q.t(), scale_a=sx, scale_b=s[None].float(), out_dtype=dtype)
        return y.view(*x.shape[:-1], q.shape[0])

    @staticmethod
    def backward(ctx, dy):
        q, s = ctx.saved_tensors
        return dy @ dequantise(q, s, dy.dtype), None, None, None


class FP8Linear(nn.Module):
    """A frozen nn.Linear with its weight in e4m3 (`qweight`) and per-output-channel scales (`weight_scale`).

    `.weight` gives W' in the compute dtype (for the prompt path, which multiplies P by the block's weights),
    so code written for nn.Linear runs unchanged.
    """

    def __init__(self, in_features, out_features, bias=True, dtype=torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, dtype
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=E4M3, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @property
    def weight(self):
        return dequantise(self.qweight, self.weight_scale, self.compute_dtype)

    def forward(self, x):
        # _scaled_mm wants sides that are multiples of 16, and row-wise scales give bf16 out on CUDA
        if scaled_mm_supported(x) and x.dtype == torch.bfloat16 and self.in_features % 16 == 0 and self.out_features % 16 == 0:
            y = _ScaledMM.apply(x, self.qweight, self.weight_scale, x.dtype)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        return F.linear(x, dequantise(self.qweight, self.weight_scale, x.dtype),
                        None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 weights"


def targets(model):
    """Names of the linears stored in fp8: every nn.Linear inside a transformer block except the modulation."""
    blocks = ("double_blocks.", "single_blocks.", "blocks.")
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)
            and name.startswith(blocks) and "_mod." not in name and "modulation" not in name]


def swap_in(model, names, dtype):
    """Replace the named nn.Linear modules by empty FP8Linear ones (same device: meta while loading)."""
    for name in names:
        parent, _, child = name.rpartition(".")
        old = model.get_submodule(name)
        setattr(model.get_submodule(parent), child, FP8Linear(old.in_features, old.out_features, old.bias is not None,
                                                              dtype=dtype, device=old.weight.device))
    return model
