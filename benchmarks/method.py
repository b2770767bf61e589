"""Benchmark of the method itself: a prompt-training step and a restored image, fused vs released attention.

    python benchmarks/method.py                     # on a GPU: FLUX.1-dev at real size (random bf16 weights)
    python benchmarks/method.py --model tiny        # a small FLUX-shaped backbone, seconds on the CPU
    python benchmarks/method.py --write             # also append the table to benchmarks/RESULTS.md
    python benchmarks/method.py --model wan2.1-t2v-1.3b --train-res 480x832 --frames 33 --sample-res 480x832
    python benchmarks/method.py --model tiny-wan    # a small Wan-shaped backbone for the CPU

The backbone is built from its config with RANDOM weights (nothing is downloaded): modules on the meta
device, cast, then `to_empty` on the target device and filled in place, so the 12B transformer never
exists in fp32 (bf16 parameters, about 24 GB). The context is random tensors of the real shape
(FLUX: txt [1, 512, 4096], y [1, 768]; Wan: context [1, 226, 4096]). Rows, each measured in both modes:

  train step     train.py's step: encode clean and degraded, EBR state, velocity with P and alpha,
                 x0-MSE, backward to P and alpha, AdamW; gradient checkpointing on for CUDA (Wan with
                 --frames F: clips of F frames)
  restore        sample.py's restore(): encode, 20 EBR sampler steps, decode; one image

  fused          MINIRESTORE_KERNELS unset: the Triton kernels on CUDA (on the CPU the reference path)
  released       MINIRESTORE_KERNELS=torch: unfused PyTorch (QK norm and RoPE in eager ops, attention
                 through SDPA), the way the released code runs

Median seconds over --repeats after --warmup runs; peak memory per row (CUDA: max_memory_allocated;
CPU: the process's peak resident set, reset per row through /proc/self/clear_refs where Linux allows).
"""
import argparse
import datetime
import os
import resource
import shlex
import statistics
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from minirestore import UserError  # noqa: E402
from minirestore.cli import Help, run  # noqa: E402
from minirestore.autoencoder import FLUX_AE, AutoEncoder, AutoEncoderConfig  # noqa: E402
from minirestore.backbone import WAN_CONTEXT_LENGTH, Backbone  # noqa: E402
from minirestore.bridge import Bridge  # noqa: E402
from minirestore.flux import FLUX_PRESETS, Flux, FluxConfig, default_axes_dim  # noqa: E402
from minirestore.wan import WAN_PRESETS, WanConfig, WanModel  # noqa: E402
from minirestore.wan_vae import WanVAE, WanVAEConfig  # noqa: E402
from sample import restore  # noqa: E402

# A FLUX-shaped backbone small enough for a CPU: guidance-embedded like dev, 16x image-to-token factor.
TINY = dict(
    flux=FluxConfig(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=64, hidden_size=64,
                    mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=default_axes_dim(32),
                    guidance_embed=True),
    ae=AutoEncoderConfig(resolution=32, in_channels=3, ch=32, out_ch=3, ch_mult=[1, 2, 4, 4], num_res_blocks=1,
                         z_channels=16, scale_factor=0.3611, shift_factor=0.1159),
    K=16,
)
TINY_WAN = dict(wan=WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_len=16, text_dim=32),
                vae=WanVAEConfig(dim=8))
REAL_K = 512  # T5 tokens of FLUX.1-dev's context
MODELS = ["tiny", "tiny-wan", *FLUX_PRESETS, *WAN_PRESETS]


@torch.no_grad()
def randomise(model, seed=0):
    """Random weights everywhere, in place, on the model's device: N(0, 1/fan_in) for matrices and
    convolutions, N(0, 0.02^2) for biases, 1 + N(0, 0.1^2) for norm scales (never zeros: they hide work)."""
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(("scale", "norm1.weight", "norm2.weight", "norm_out.weight")) or ".norm.weight" in name:
            p.normal_(0, 0.1).add_(1)
        elif p.dim() == 1:
            p.normal_(0, 0.02)
        else:
            p.normal_(0, p[0].numel() ** -0.5)
    return model


def build(module_fn, device, dtype):
    """Module on the meta device -> cast -> storage on `device` -> random fill: never a full fp32 copy."""
    with torch.device("meta"):
        model = module_fn().to(dtype)
    return randomise(model.to_empty(device=device)).eval().requires_grad_(False)


def random_wan(name, device, dtype):
    """A Wan Backbone with random weights: the real preset and VAE, or a tiny Wan-shaped config."""
    wan_cfg, vae_cfg = (TINY_WAN["wan"], TINY_WAN["vae"]) if name == "tiny-wan" else (WAN_PRESETS[name], WanVAEConfig())
    model = build(lambda: WanModel(wan_cfg), device, dtype)
    vae = build(lambda: WanVAE(vae_cfg), device, torch.float32)
    L = min(WAN_CONTEXT_LENGTH, wan_cfg.text_len)
    context = {"context": torch.randn(1, L, wan_cfg.text_dim, generator=torch.Generator().manual_seed(1)).to(device)}
    return Backbone(name=f"random-{name}", kind="wan", model=model, vae=vae, context=context,
                    multiple=vae_cfg.spatial_factor * wan_cfg.patch_size[1])


def random_backbone(name, device, dtype):
    """A Backbone with random weights: the real FLUX preset and autoencoder, or the tiny config."""
    if name in WAN_PRESETS or name == "tiny-wan":
        return random_wan(name, device, dtype)
    if name == "tiny":
        flux_cfg, ae_cfg, K = TINY["flux"], TINY["ae"], TINY["K"]
    else:
        flux_cfg, ae_cfg, K = FLUX_PRESETS[name], FLUX_AE, REAL_K
    model = build(lambda: Flux(flux_cfg), device, dtype)
    vae = build(lambda: AutoEncoder(ae_cfg), device, torch.float32)  # the VAE stays fp32, as in backbone.py
    g = torch.Generator().manual_seed(1)
    context = {"txt": torch.randn(1, K, flux_cfg.context_in_dim, generator=g).to(device),  # [1, K, 4096]
               "y": torch.randn(1, flux_cfg.vec_in_dim, generator=g).to(device)}  # [1, 768]
    multiple = 2 ** (len(ae_cfg.ch_mult) - 1) * 2  # VAE downsampling, then 2x2 patches
    return Backbone(name=f"random-{name}", kind="flux", model=model, vae=vae, context=context, multiple=multiple)


# -- one unit of work each ---------------------------------------------------------------------

def train_step(backbone, bank, opt, bridge, clean, degraded, generator):
    """One optimiser step of train.py (its loop body, single process)."""
    X0, Y = backbone.encode(clean), backbone.encode(degraded)
    t = bridge.sample_t(X0.shape[0], generator=generator).to(X0.device)
    eps = torch.randn(X0.shape, generator=generator).to(X0.device)
    x_t = bridge.make_state(X0, Y, t, eps)
    v = backbone.velocity(x_t, bridge.model_time(t), bank)
    loss = bridge.loss(bridge.x0_from_velocity(x_t, t, v, Y), X0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()  # .item() synchronises, as train.py's logging does


# -- timing and memory ---------------------------------------------------------------------------

def reset_peak(cuda):
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: writing 5 resets the peak resident set (VmHWM) of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere the peak is the process's high-water mark since start


def peak_mib(cuda):
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, kB on Linux


def measure(fn, warmup, repeats, cuda):
    """(median seconds, peak MiB) of fn() after `warmup` calls (Triton compiles and autotunes there)."""
    for _ in range(warmup):
        fn()
    reset_peak(cuda)
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak_mib(cuda)


class kernel_mode:
    """MINIRESTORE_KERNELS for one mode (kernels reads it at every call); restored afterwards."""

    def __init__(self, mode):
        self.value = None if mode == "fused" else "torch"

    def __enter__(self):
        self.saved = os.environ.pop("MINIRESTORE_KERNELS", None)
        if self.value is not None:
            os.environ["MINIRESTORE_KERNELS"] = self.value

    def __exit__(self, *exc):
        os.environ.pop("MINIRESTORE_KERNELS", None)
        if self.saved is not None:
            os.environ["MINIRESTORE_KERNELS"] = self.saved


MODES = {"fused": "Triton kernels", "released": "PyTorch eager + SDPA"}


def benchmark(args, cuda):
    device = args.device
    dtype = torch.bfloat16 if cuda else torch.float32
    backbone = random_backbone(args.model, device, dtype)
    m = backbone.multiple
    for flag in ("train_res", "sample_res"):
        if any(side % m for side in getattr(args, flag)):
            sides = "x".join(map(str, getattr(args, flag)))
            raise UserError(f"--{flag.replace('_', '-')} {sides}: each side must be a multiple of {m}")
    if cuda:
        backbone.model.gradient_checkpointing = True  # as train.py does on CUDA
    bridge = Bridge("ebr", 0.4)
    bank = backbone.new_prompt(torch.Generator().manual_seed(0))
    with torch.no_grad():
        bank.alpha.normal_(0, 0.1)  # a trained-looking gate, so the prompt path does real work
    opt = torch.optim.AdamW(bank.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    frames = (args.frames,) if args.frames > 1 else ()  # Wan clips [B, 3, F, H, W]
    clean = torch.rand(args.batch_size, 3, *frames, *args.train_res, generator=g)
    degraded = (clean + 0.1 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    image = torch.rand(3, *args.sample_res, generator=g)

    train_what = f"train step (batch {args.batch_size}" + (f", {args.frames} frames)" if frames else ")")
    work = [(train_what, "x".join(map(str, args.train_res)),
             lambda: train_step(backbone, bank, opt, bridge, clean, degraded, g)),
            (f"restore ({args.sample_steps} steps)", "x".join(map(str, args.sample_res)),
             lambda: restore(backbone, [bank], bridge, image, args.sample_steps, seed=0))]
    rows = []
    for what, res, fn in work:
        for mode in MODES:
            path = MODES[mode] if cuda or mode == "released" else "reference path (no GPU)"
            try:  # one failing row (a kernel that does not compile, out of memory) must not lose the others
                with kernel_mode(mode):
                    seconds, mib = measure(fn, args.warmup, args.repeats, cuda)
            except Exception as e:  # noqa: BLE001
                seconds = mib = float("nan")
                path += f" - FAILED: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
                if cuda:
                    torch.cuda.empty_cache()
            rows.append((what, res, mode, path, seconds, mib))
            print(f"  {what:24} {mode:9} {seconds:9.3f} s  {mib:9.0f} MiB  {path}", flush=True)
    return rows


def table(rows, repeats):
    lines = [f"| measurement | resolution | mode | attention path | seconds (median of {repeats}) | peak memory (MiB) |",
             "|---|---|---|---|---|---|"]
    for what, res, mode, path, seconds, mib in rows:
        lines.append(f"| {what} | {res} | {mode} | {path} | {seconds:.3f} | {mib:.0f} |")
    return lines


def speedups(rows):
    """released / fused seconds per measurement: above 1 means the fused kernels are faster."""
    s = {(what, mode): seconds for what, _, mode, _, seconds, _ in rows}
    return [f"{what}: released / fused = {s[(what, 'released')] / s[(what, 'fused')]:.2f}x"
            for what in dict.fromkeys(w for w, *_ in rows)]


def resolution(text):
    """'512' -> (512, 512); '480x832' -> (480, 832)."""
    sides = tuple(int(x) for x in str(text).lower().split("x"))
    if len(sides) == 1:
        sides = sides * 2
    if len(sides) != 2 or min(sides) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give N or HxW in pixels")
    return sides


def main(argv=None):
    cuda_available = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=Help)
    p.add_argument("--model", choices=MODELS, default="flux-dev" if cuda_available else "tiny",
                   help="the backbone's config (random weights): a real FLUX or Wan preset, or tiny / tiny-wan for the CPU")
    p.add_argument("--device", default="cuda" if cuda_available else "cpu")
    p.add_argument("--train-res", type=resolution, help="training crop in pixels, N or HxW (default: 512 on CUDA, 32 on CPU)")
    p.add_argument("--sample-res", type=resolution, help="restored image in pixels, N or HxW (default: 1024 on CUDA, 32 on CPU)")
    p.add_argument("--frames", type=int, default=1, help="frames per training clip (Wan; 4k+1)")
    p.add_argument("--sample-steps", type=int, default=20, help="EBR sampler steps per image")
    p.add_argument("--batch-size", type=int, default=1, help="images per training step")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per row (Triton compiles here)")
    p.add_argument("--repeats", type=int, help="timed runs per row (default: 5 on CUDA, 3 on CPU)")
    p.add_argument("--write", action="store_true", help="append the table to --results")
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "RESULTS.md"))
    args = p.parse_args(argv)
    cuda = str(args.device).startswith("cuda")
    if cuda and not cuda_available:
        raise UserError("--device cuda but no CUDA GPU is visible: run on the CPU with --model tiny")
    if not cuda and not args.model.startswith("tiny"):
        raise UserError(f"--model {args.model} at real size needs a CUDA GPU (about 24 GB of bf16 weights); "
                        "use --model tiny on the CPU")
    args.train_res = args.train_res or resolution("512" if cuda else "32")
    args.sample_res = args.sample_res or resolution("1024" if cuda else "32")
    args.repeats = args.repeats or (5 if cuda else 3)
    if args.frames > 1 and (args.frames % 4 != 1 or "wan" not in args.model):
        raise UserError(f"--frames {args.frames}: clips are for Wan models and have 4k+1 frames")
    for flag in ("sample_steps", "batch_size", "repeats", "frames"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        raise UserError("--warmup must be 0 or more")

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if cuda:
        where = (f"GPU: {torch.cuda.get_device_name(torch.device(args.device))}, torch {torch.__version__}, "
                 f"triton {triton_version}, bf16 weights, model {args.model}")
    else:
        where = (f"NO GPU: CPU smoke run, torch {torch.__version__}, triton {triton_version}, fp32 weights, "
                 f"model {args.model} (both modes take the PyTorch reference path on the CPU)")
    print(where, flush=True)
    rows = benchmark(args, cuda)
    lines = table(rows, args.repeats)
    print("\n".join(lines))
    print("\n" + "\n".join(speedups(rows)))
    if not cuda:
        print("\nThese are CPU smoke numbers, not GPU results: they check that the benchmark runs, "
              "and say nothing about the Triton kernels.")
    if args.write:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
        header = f"\n## Method benchmark, {stamp} - {where}\n\nCommand: `{command}`\n\n"
        if not cuda:
            header += "**CPU smoke run: not GPU results.**\n\n"
        with open(args.results, "a") as f:
            f.write(header + "\n".join(lines) + "\n\n" + "\n".join(f"- {s}" for s in speedups(rows)) + "\n")
        print(f"appended to {args.results}")
    return 0 if all(row[4] == row[4] for row in rows) else 1  # nan != nan: a row failed


if __name__ == "__main__":
    run(main)
