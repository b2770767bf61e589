"""Pre-train the tiny default backbone, weights/tiny: `python -m minirestore.pretrain`.

Rectified flow (minRF, SD3) on real photographs (photos.py: Debian's freely licensed wallpapers, multi-scale
crops of the training split; or procedural dead leaves, --data leaves, or both), the transformer
`Flux(tiny_config(width, double, single))` and the `TinyTextEncoder` trained jointly from scratch:
  x0 = PixelCodec.encode(image), eps ~ N(0, I), t ~ logit-normal: sigmoid(N(0, 1)) (SD3; most weight on
  mid-range times, where the velocity is hardest to predict),
  x_t = (1 - t) x0 + t eps,   target v = eps - x0,   loss = |F(x_t, t, text) - v|^2.
The text is the image's descriptor words (photos: "warm bright textured sharp", photos.describe; dead leaves:
"warm many circles textured sharp"); 20% of the time it is the
empty prompt "", as text-to-image models drop their caption, so the model also learns the unconditional
distribution: the restoration method runs it on the empty-prompt context (paper.md 3). Each batch has one
size drawn from --sizes (one seed draws the same scene at any size), so sampling works beyond 64 x 64.
AdamW, linear warm-up then cosine decay, gradient clipping; an EMA of the weights is what gets saved.

On a GPU (benchmarks/gpu_pretrain.sh): --precision bf16 runs the forward under bf16 autocast (fp32 master
weights, optimiser and EMA); the photographs live on the GPU, where the crops are cut and shrunk; t and the
noise come from a generator on the GPU; --time-budget S picks --steps after the warm-up, from the measured
speed, so the run ends in about S seconds (the resolved --steps is printed and stored: rerun with it to repeat
the schedule). The transformer is written in shards of at most 16 MiB (loading.save_weights) when it is larger.

The shipped recipe is in the README (its commands and their stages; the weights' metadata holds every
stage's config).

Outputs: the backbone folder --out (flux.safetensors with BFL keys, or its shards and index; text.safetensors, context.safetensors
for ""), sample grids, checkpoint.pt (for --resume) and eval.json (generated vs held-out statistics) in
--run-dir. The evaluation also scores the frozen model as a denoiser on held-out photographs (the
ablation's score, `denoise_psnr`).
"""
import argparse
import copy
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

from . import UserError, hub
from .cli import run
from .context import save_context
from .files import atomic_write
from .flux import Flux, get_schedule, pack, prepare_ids, unpack
from .metrics import psnr
from .loading import save_weights, weights_file
from .photos import PhotoCrops, describe_batch
from .procedural import colour_histogram_distance, dead_leaves, radial_power_slope
from .tiny import PixelCodec, TextConfig, TinyTextEncoder, load_text_encoder, tiny_config

EVAL_SEED = 999  # held-out images: val-split photo crops / procedural seeds drawn from it; training uses --seed
GRID_PROMPTS = ["", "warm bright textured sharp", "cool dim smooth soft", "earthy dark textured sharp",
                "vivid bright smooth sharp"]
DATA = ("photos", "leaves", "photos+leaves")
DENOISE_SIGMAS = (0.05, 0.1, 0.2)  # the ablation's score: Gaussian noise of these std (of [0, 1])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=8000, help="optimiser steps (0: write the initial or --init weights)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=300, help="linear warm-up steps, then cosine decay to lr/10")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    p.add_argument("--cond-drop", type=float, default=0.2, help="probability of training on the empty prompt")
    p.add_argument("--sizes", default="32,48,64", help="image sides drawn per batch (multiples of 4)")
    p.add_argument("--data", choices=DATA, default="photos",
                   help="training images: photographs (photos.py), dead leaves (procedural.py), or half of each")
    p.add_argument("--width", type=int, default=128, help="transformer width (heads of 32 channels)")
    p.add_argument("--double", type=int, default=2, help="double-stream blocks")
    p.add_argument("--single", type=int, default=4, help="single-stream blocks")
    p.add_argument("--t-mean", type=float, default=0.0, help="t ~ sigmoid(N(t_mean, 1)); < 0 weights low noise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="weights/tiny", help="the backbone folder written")
    p.add_argument("--run-dir", default="runs/pretrain", help="sample grids, checkpoint.pt, eval.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resume", action="store_true", help="continue from <run-dir>/checkpoint.pt")
    p.add_argument("--init", default=None, metavar="DIR",
                   help="start from a backbone folder's weights (a second stage: a fresh optimizer and schedule; "
                        "use another --seed so it sees new images)")
    p.add_argument("--sample-every", type=int, default=500)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--sample-steps", type=int, default=25, help="Euler steps of the sample grids")
    p.add_argument("--cfg", type=float, default=2.0, help="classifier-free guidance of the conditional grid rows")
    p.add_argument("--eval-n", type=int, default=128, help="images per set in the final evaluation")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: the forward under bf16 autocast (GPU runs); weights, optimiser and EMA stay fp32")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="choose --steps at the end of the warm-up so that training takes about this long")
    args = p.parse_args(argv)
    if args.steps < 0:
        raise UserError(f"--steps must be 0 (write the initial weights) or more, got {args.steps}")
    for flag in ("batch_size", "sample_steps", "eval_n", "threads", "sample_every", "checkpoint_every"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if not args.lr > 0:  # `not >` also refuses nan
        raise UserError(f"--lr must be positive, got {args.lr}")
    if args.warmup < 0 or not 0 <= args.ema < 1 or not 0 <= args.cond_drop <= 1:
        raise UserError("--warmup must be 0 or more, --ema in [0, 1), --cond-drop in [0, 1]")
    if args.time_budget is not None and (not args.time_budget > 0 or args.warmup < 4):
        raise UserError("--time-budget needs a positive number of seconds and --warmup 4 or more "
                        "(the warm-up's second half is what it times)")
    return args


# ---------------------------------------------------------------------------------------------
# Data and model
# ---------------------------------------------------------------------------------------------

def batch(step, batch_size, size, seed, data="leaves", photos=None):
    """The training batch of a step, a function of (step, seed) only, so --resume sees the same data:
    images [B, 3, size, size] in [0, 1] and their prompts (descriptor words joined by spaces).
    data "photos+leaves": the first half of the batch are photo crops, the rest dead leaves. Photo crops are
    made where the photographs are (PhotoCrops' device, where the batch is returned) and described at once."""
    n_photos = {"photos": batch_size, "leaves": 0}.get(data, batch_size // 2)
    rng = np.random.default_rng([seed, step])
    images = torch.stack([photos.crop(rng, size) for _ in range(n_photos)]) if n_photos else None
    words = describe_batch(images) if n_photos else []
    leaves = [dead_leaves(seed * 1_000_003 + step * batch_size + j, size) for j in range(n_photos, batch_size)]
    words += [w for _, w in leaves]
    if leaves:
        leaves = torch.stack([image for image, _ in leaves])
        images = leaves if images is None else torch.cat([images, leaves.to(images.device)])
    return images, [" ".join(w) for w in words]


def load_init(folder, flux, text):
    """Copy a backbone folder's weights (flux.safetensors, text.safetensors, as write_backbone writes them,
    read by the package's one loader) into flux and text. -> the pretrain config in their metadata (a dict)."""
    folder = Path(folder)
    for path in (weights_file(folder, "flux"), folder / "text.safetensors"):
        if not path.is_file():
            raise SystemExit(f"--init {folder}: no {path.name} there; give a folder that pretrain wrote (--out)")
    loaded = hub.load_flux(weights_file(folder, "flux"), dtype=torch.float32)
    if loaded.config != flux.config:
        raise SystemExit(f"--init {folder}: its transformer is {loaded.config}, not the one --width, --double and "
                         f"--single ask for ({flux.config})")
    flux.load_state_dict(loaded.state_dict())
    old = load_text_encoder(folder / "text.safetensors")
    state, n = old.state_dict(), len(old.config.vocab)
    if old.config.vocab != text.config.vocab[:n]:
        raise SystemExit(f"--init {folder}: its text encoder's vocabulary is not a prefix of this one's")
    # Words this vocabulary adds (e.g. the photos' brightness words) keep their fresh embeddings.
    state["token_embedding.weight"] = torch.cat([state["token_embedding.weight"], text.token_embedding.weight[n:]])
    text.load_state_dict(state)
    return json.loads(hub.Checkpoint(hub.resolve(weights_file(folder, "flux"))).metadata.get("pretrain", "{}"))


def init_weights(flux):
    """adaLN-Zero (DiT): zero modulations and output layer, so every block starts as the identity and the
    model as v = 0; Xavier elsewhere. Flux's own init is PyTorch's default (it is meant to be loaded)."""
    for name, p in flux.named_parameters():
        if name.endswith("scale"):  # QK RMSNorm weights
            torch.nn.init.ones_(p)
        elif "mod" in name or name.startswith("final_layer"):  # img_mod, txt_mod, modulation, adaLN_modulation
            torch.nn.init.zeros_(p)
        elif p.dim() == 2:
            torch.nn.init.xavier_uniform_(p)
        else:
            torch.nn.init.zeros_(p)
    return flux


def velocity(flux, context, z, t):
    """F(z, t | text): latents z [B, 12, h, w], t [B], context {"txt", "y"}. -> v [B, 12, h, w]."""
    B, _, h, w = z.shape
    img_ids, txt_ids = prepare_ids(B, h, w, context["txt"].shape[1], device=z.device)
    v = flux(pack(z), img_ids, context["txt"], txt_ids, t, context["y"])
    return unpack(v, h, w)


@torch.no_grad()
def sample(flux, text, prompts, size, steps=25, seed=0, cfg=1.0):
    """Euler sampling from t = 1 (noise) to 0, as flux.generate: x <- x + (t_prev - t) v. With cfg != 1,
    v = v("") + cfg (v(prompt) - v("")) (classifier-free guidance). -> images [B, 3, size, size] in [0, 1]."""
    device = next(flux.parameters()).device
    B = len(prompts)
    # Noise from a CPU generator, so a seed gives the same samples on every device.
    channels = flux.config.in_channels // 4  # 12: the codec's 3 x 2 x 2
    z = torch.randn(B, channels, size // 2, size // 2, generator=torch.Generator().manual_seed(seed)).to(device)
    cond = text.encode(prompts)
    uncond = text.encode([""] * B) if cfg != 1.0 else None
    times = get_schedule(steps, 0, shift=False)
    for t_curr, t_prev in zip(times[:-1], times[1:]):
        t = torch.full((B,), t_curr, device=device)
        v = velocity(flux, cond, z, t)
        if uncond is not None:
            v_u = velocity(flux, uncond, z, t)
            v = v_u + cfg * (v - v_u)
        z = z + (t_prev - t_curr) * v
    return ((PixelCodec().decode(z) + 1) / 2).clamp(0, 1).cpu()


def save_grid(images, rows, path):
    """images [rows * cols, 3, H, W] in [0, 1] -> one PNG, row-major, 2 px gaps."""
    n, _, H, W = images.shape
    cols = n // rows
    grid = np.ones((rows * (H + 2), cols * (W + 2), 3), np.float32)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * (H + 2):r * (H + 2) + H, c * (W + 2):c * (W + 2) + W] = im.permute(1, 2, 0).numpy()
    Image.fromarray((grid * 255).round().astype(np.uint8)).save(path)


def sample_grid(flux, text, path, steps, cfg, cols=8, size=64):
    """Row 1: unconditional (""); then one row per descriptor set, with guidance cfg."""
    rows = [sample(flux, text, [""] * cols, size, steps, seed=1)]
    rows += [sample(flux, text, [p] * cols, size, steps, seed=1, cfg=cfg) for p in GRID_PROMPTS[1:]]
    save_grid(torch.cat(rows), len(rows), path)


# ---------------------------------------------------------------------------------------------
# Files: every one written atomically (files.atomic_write), so a crash never leaves half a file
# ---------------------------------------------------------------------------------------------

def write_backbone(out, flux, text, pretrain_config):
    """The backbone folder: flux.safetensors (BFL keys; shards and an index past 16 MiB), text.safetensors,
    context.safetensors ("")."""
    out = Path(out)
    flux_state = {k: v.detach().float() for k, v in flux.state_dict().items()}
    meta = {"minirestore_config": json.dumps(asdict(flux.config)), "pretrain": json.dumps(pretrain_config),
            "codec": "pixel2"}
    save_weights(flux_state, out, "flux", meta)
    text_state = {k: v.detach().float().cpu().contiguous() for k, v in text.state_dict().items()}
    meta = {"minirestore_config": json.dumps(asdict(text.config)), "pretrain": json.dumps(pretrain_config)}
    atomic_write(out / "text.safetensors", lambda p: save_file(text_state, str(p), metadata=meta))
    with torch.no_grad():
        ctx = text.encode([""])  # txt [1, 16, 64], y [1, 64]
    save_context(out / "context.safetensors", ctx, {"backbone": "tiny", "codec": "pixel2"})


def resolve_steps(args, step, timer_step, timer_time, elapsed):
    """--time-budget: the number of steps that ends training about `time_budget` seconds after it began, from
    the speed of the steps timer_step..step (compiled and warm by then; batch sizes vary, so it is an average)."""
    per_step = (time.time() - timer_time) / max(1, step - timer_step)
    steps = max(step + 1, step + int((args.time_budget - elapsed) / per_step))
    print(f"--time-budget {args.time_budget:g} s: {per_step * 1000:.1f} ms a step after the warm-up, so --steps {steps}",
          flush=True)
    return steps


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def held_out(n, size, data="photos"):
    """n held-out images [n, 3, size, size]: crops of the val-split photographs (photos, photos+leaves) or
    procedural images from EVAL_SEED (leaves); the same n for every model, so scores compare."""
    if data == "leaves":
        return torch.stack([dead_leaves(EVAL_SEED * 1_000_003 + i, size)[0] for i in range(n)])
    photos, rng = PhotoCrops("val"), np.random.default_rng(EVAL_SEED)
    return torch.stack([photos.crop(rng, size) for _ in range(n)])


@torch.no_grad()
def denoise_psnr(flux, text, clean, sigma, seed=0):
    """The frozen model as a one-step denoiser, unprompted: noisy = clean + sigma n; its latent is
    Y = X0 + 4 sigma n (the codec maps [0, 1] to [-2, 2]), which is the rectified-flow state x_t / (1 - t) at
    t = 4 sigma / (1 + 4 sigma); so x_t = (1 - t) Y and x0_hat = x_t - t v(x_t, t | "").
    -> (mean PSNR of the noisy images, mean PSNR of x0_hat), in dB."""
    g = torch.Generator().manual_seed(seed)
    noisy = clean + sigma * torch.randn(clean.shape, generator=g)  # not clipped: exactly Gaussian
    codec, t = PixelCodec(), 4 * sigma / (1 + 4 * sigma)
    device = next(flux.parameters()).device
    x_t = (1 - t) * codec.encode(noisy.to(device) * 2 - 1)
    ctx = {k: v.expand(len(clean), *v.shape[1:]) for k, v in text.encode([""]).items()}
    x0 = x_t - t * velocity(flux, ctx, x_t, torch.full((len(clean),), t, device=device))
    restored = ((codec.decode(x0) + 1) / 2).clamp(0, 1).cpu()
    return psnr(noisy.clamp(0, 1), clean).mean().item(), psnr(restored, clean).mean().item()


@torch.no_grad()
def evaluate(flux, text, n, steps, size=64, data="photos"):
    """Radial power slope and colour histogram distance: n unconditional samples vs n held-out images,
    and n held-out vs n other held-out images (what 'same distribution' looks like); and the frozen
    model's one-step denoising PSNR on the first 64 held-out images at DENOISE_SIGMAS."""
    real = held_out(2 * n, size, data)
    fake = torch.cat([sample(flux, text, [""] * min(32, n - i), size, steps, seed=10_000 + i)
                      for i in range(0, n, 32)])
    a, b = real[:n], real[n:]
    result = {"n": n, "size": size, "sample_steps": steps, "data": data,
              "slope_generated": radial_power_slope(fake), "slope_real": radial_power_slope(a),
              "slope_real_b": radial_power_slope(b),
              "colour_distance_generated_vs_real": colour_histogram_distance(fake, a),
              "colour_distance_real_vs_real": colour_histogram_distance(b, a)}
    clean = real[:64]
    for sigma in DENOISE_SIGMAS:
        result[f"noisy_psnr_{sigma}"], result[f"denoise_psnr_{sigma}"] = denoise_psnr(flux, text, clean, sigma, seed=1)
    return result


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def train(args):
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    run_dir, ckpt_path = Path(args.run_dir), Path(args.run_dir) / "checkpoint.pt"
    run_dir.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in str(args.sizes).split(",")]
    if any(s % 4 for s in sizes):
        raise SystemExit(f"--sizes {args.sizes}: every size must be a multiple of 4 (codec 2 x patch 2)")
    # What determines the weights (stored in their metadata); not where they go or how fast.
    where = ("out", "run_dir", "device", "resume", "threads", "time_budget")
    pretrain_config = {k: v for k, v in vars(args).items() if k not in where}

    torch.manual_seed(args.seed)
    flux = init_weights(Flux(tiny_config(args.width, args.double, args.single))).to(device)
    photos = PhotoCrops("train", device=device) if "photos" in args.data else None
    text = TinyTextEncoder(TextConfig()).to(device)
    torch.nn.init.normal_(text.position_embedding, std=0.02)
    if args.init:  # stage 2: the weights of an earlier run; its config goes into ours, so the lineage is stored
        pretrain_config["init_pretrain"] = load_init(args.init, flux, text)
    ema_flux, ema_text = copy.deepcopy(flux).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)
    params = list(flux.parameters()) + list(text.parameters())
    ema_params = list(ema_flux.parameters()) + list(ema_text.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)  # prompt drop and batch size (and on the CPU t and noise)
    # t and the noise: on a GPU from a generator there (a [B, 12, 32, 32] draw a step would tie up the CPU);
    # on the CPU the same generator, so CPU runs draw exactly what they always did.
    dgen = gen if device.type == "cpu" else torch.Generator(device).manual_seed(args.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    step = 0
    if args.resume and ckpt_path.exists():
        # Tensors, numbers and strings only (weights_only=True): a planted pickle in the run folder runs no code.
        try:
            ck = torch.load(ckpt_path, map_location=device, weights_only=True)
            for module, key in ((flux, "flux"), (text, "text"), (ema_flux, "ema_flux"), (ema_text, "ema_text")):
                module.load_state_dict(ck[key])
            opt.load_state_dict(ck["opt"])
            gen.set_state(ck["rng"].cpu())  # the generator's state, a uint8 tensor
            if dgen is not gen:
                dgen.set_state(ck["device_rng"].cpu())
            step = int(ck["step"])
            saved = json.loads(ck["args"])
            if args.time_budget and step >= args.warmup:  # the budget was turned into steps before the stop
                args.steps = pretrain_config["steps"] = saved["steps"]
        except Exception as e:  # truncated, another model's, another format, or code to run
            raise UserError(f"--resume: {ckpt_path} is not a readable checkpoint of this run ({type(e).__name__}: "
                            f"{str(e)[:120]}); delete it to start afresh, or pass another --run-dir") from None
        print(f"resumed from {ckpt_path} at step {step}")
    elif args.resume:
        print(f"--resume: no {ckpt_path} yet; starting from scratch")

    def checkpoint():
        state = {"flux": flux.state_dict(), "text": text.state_dict(), "ema_flux": ema_flux.state_dict(),
                 "ema_text": ema_text.state_dict(), "opt": opt.state_dict(), "rng": gen.get_state(), "step": step,
                 "args": json.dumps(vars(args))}  # the config as JSON: every value loads with weights_only=True
        if dgen is not gen:
            state["device_rng"] = dgen.get_state()
        atomic_write(ckpt_path, lambda p: torch.save(state, p))
        write_backbone(args.out, ema_flux, ema_text, pretrain_config)

    codec = PixelCodec()
    bar = tqdm(total=args.steps, initial=step, desc="pretrain", unit="step", dynamic_ncols=True)
    smooth, seen, t_start, timer = None, 0, time.time(), None
    while step < args.steps:
        if args.time_budget and step == args.warmup // 2:  # the budget's clock: the warm-up's second half
            timer = (step, time.time())
        if args.time_budget and step == args.warmup and timer:
            args.steps = resolve_steps(args, step, *timer, time.time() - t_start)
            pretrain_config["steps"] = args.steps
            bar.total = args.steps
        size = sizes[int(torch.randint(len(sizes), (1,), generator=gen))]
        images, prompts = batch(step, args.batch_size, size, args.seed, args.data, photos)
        B = images.shape[0]
        drop = torch.rand(B, generator=gen) < args.cond_drop
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        t = torch.sigmoid(torch.randn(B, generator=dgen, device=dgen.device) + args.t_mean).to(device)  # logit-normal
        eps = torch.randn(B, 12, size // 2, size // 2, generator=dgen, device=dgen.device).to(device)
        x0 = codec.encode(images.to(device) * 2 - 1)  # [B, 12, size/2, size/2]
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
        with autocast:
            v = velocity(flux, text.encode(prompts), xt, t)
        loss = (v.float() - (eps - x0)).pow(2).mean()

        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))  # a short EMA early on, as in many DiT repos
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        step += 1

        seen += B
        if step % 10 == 0 or step == args.steps:  # not every step: .item() waits for the GPU
            smooth = loss.item() if smooth is None else 0.8 * smooth + 0.2 * loss.item()
            bar.set_postfix(loss=f"{smooth:.4f}", img_s=f"{seen / (time.time() - t_start):.1f}", size=size)
        bar.update(1)
        if step % args.sample_every == 0 or step == args.steps:
            sample_grid(ema_flux, ema_text, run_dir / f"samples_{step:06d}.png", args.sample_steps, args.cfg)
        if step % args.checkpoint_every == 0 or step == args.steps:
            checkpoint()
    bar.close()
    if not ckpt_path.exists():  # resumed at the end: still write the folder
        checkpoint()
    return flux, text, ema_flux, ema_text, step


def main(argv=None):
    args = parse_args(argv)
    *_, ema_flux, ema_text, step = train(args)
    print(f"backbone written to {args.out} (step {step}); evaluating {args.eval_n} samples against held-out images")
    result = evaluate(ema_flux, ema_text, args.eval_n, args.sample_steps, data=args.data)
    result["step"] = step
    atomic_write(Path(args.run_dir) / "eval.json", lambda p: p.write_text(json.dumps(result, indent=2)))
    for k, v in result.items():
        print(f"  {k}: {v}")
    print(f"sample grids, checkpoint.pt and eval.json in {args.run_dir}")


if __name__ == "__main__":
    run(main)
