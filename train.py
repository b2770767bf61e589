"""Learn a restoration prompt on a frozen diffusion backbone (arXiv 2604.04924).

    python train.py --degradation noise --t0 0.6                     the tiny default on photographs, CPU
    python train.py --model flux-dev --degradation haze --data photos/

Only the prompt P [1, K, D] and the per-block gates alpha train. Each step:
    X0, Y = encode(clean), encode(degraded)              frozen VAE
    t ~ t_min + (T0 - t_min) u^p,  eps ~ N(0, I)
    x_t = a(t) X0 + A(t) Y + B(t) eps                    the bridge state (bridge.py; EBR by default)
    v = F(x_t, tau(t); P, alpha)                         frozen transformer with the prompt added
    loss = || x_t - tau v - X0 ||^2                      x0-MSE on latents
                                                         (--x0 ebridge: || (x_t - A Y - tau v) / (1 - A) - X0 ||^2)
--t0 LOW:HIGH trains one prompt over many horizons (T0 ~ U(LOW, HIGH) per sample, bridge.py) and then
measures on the validation images which T0 each strength wants: the curve sample.py --t0 auto follows,
measured with sample.py's sampler for the backbone (--sample-steps x --samples; 20 one-step samples on the tiny default).
A prompt trained at one T0 gets such a curve too with --curve (the default on the tiny default, for noise, the
degradation with a strength estimator): the same measurement over T0 in [0.05, 0.95]; its own T0 stays its default.
`python train.py --recalibrate FILE` measures that curve again for an existing prompt file (no training):
the same validation images, the file rewritten atomically with only its curve and default T0 changed.
Every --val-every steps the held-out images are restored with the bridge sampler and scored
(PSNR/SSIM); a preview grid (degraded | restored | clean) lands in the run folder with a JSONL log.
Checkpoints are written atomically; --resume continues bit-for-bit (every step's randomness is
seeded by (seed, step)); Ctrl-C saves a checkpoint and exits.
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch

from minirestore import UserError
from minirestore.cli import Help, run, spin_period, writable_folder
from minirestore.backbone import add_memory_flags, load_backbone
from minirestore.bridge import KINDS, X0_ESTIMATES, Bridge
from minirestore.data import (CleanFolder, CleanPhotos, ClipFolder, PairedFolder, is_clip_folder, parse_resolution,
                              save_image, split)
from minirestore.degrade import parse
from minirestore.distributed import average_gradients, barrier, close, init, sum_across
from minirestore.files import atomic_write
from minirestore.metrics import psnr, ssim
from minirestore.prompts import load_prompt, save_prompt, update_prompt_meta
from minirestore.restore import sampler_defaults, spun
from minirestore.strength import ESTIMATORS, calibrate

DEFAULTS = {  # per backbone: crop size, optimiser steps, learning rate (paper.md 5: 3K-10K steps)
    "tiny": dict(resolution=64, steps=600, lr=1e-2, batch_size=8, val_every=200, val_count=8,
                 curve=True),  # about 3.5 min on 2 CPU cores, the T0 curve included
    "flux": dict(resolution=512, steps=3000, lr=2e-3),
    "wan": dict(resolution=(480, 832), steps=3000, lr=2e-3),  # clips of --frames 33, as in the paper
}


PHOTO_ITEMS = 4096  # the tiny default's epoch when no --data is given: fresh crops of the training photographs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=Help)
    p.add_argument("--model", default="tiny", help="backbone: tiny (shipped, CPU-sized), flux-dev, flux-schnell, "
                   "wan2.1-t2v-1.3b, wan2.1-t2v-14b, or a backbone folder")
    p.add_argument("--degradation", default="noise", help="a degradation name or a +-joined mix (e.g. blur+noise); "
                   "ignored for paired data except in the output name")
    p.add_argument("--t0", type=parse_t0, default=0.4, help="bridge horizon T0 in (0, 1], or a range LOW:HIGH "
                   "(e.g. 0.1:0.8): one prompt for every strength, T0 ~ U(LOW, HIGH) per sample, and a T0 curve "
                   "measured on the validation images for sample.py --t0 auto")
    p.add_argument("--t-min", type=float, default=1e-4, help="smallest bridge time")
    p.add_argument("--pow", type=float, default=1.0, help="time-sampling skew p in t = t_min + (T0 - t_min) u^p: 1 "
                   "uniform (the paper's); < 1 puts more steps near T0, where sample.py's one-step samples query the "
                   "model (a prompt file records its pow in its metadata)")
    p.add_argument("--bridge", choices=KINDS, default="ebr", help="training states: the method (ebr) or a baseline")
    p.add_argument("--x0", choices=X0_ESTIMATES, default="ypt", help="clean estimate from the velocity: ypt "
                   "(x_t - t v, the released code's) or ebridge ((x_t - A Y - t v) / (1 - A), the E-Bridge paper's, "
                   "which gives the prompt reach at a short T0; bridge.py)")
    p.add_argument("--ddbm-sigma", type=float, default=1.0, help="noise scale of the ddbm baseline's Brownian bridge")
    p.add_argument("--data", help="a folder of clean images (degraded on the fly), a paired folder with clean/ and "
                   "degraded/, or clips for Wan (default for tiny: crops of its training photographs, validated on the "
                   "val photographs; python -m minirestore.photos fetches them)")
    p.add_argument("--resolution", type=parse_resolution,
                   help="training crop: 512 or height x width like 480x832 (default: 64 tiny, 512 FLUX, 480x832 Wan)")
    p.add_argument("--frames", type=int, default=33, help="frames per training clip (Wan, clip data; 4k+1)")
    p.add_argument("--steps", type=int, help="optimiser steps (default: 600 for tiny, 3000 for FLUX and Wan)")
    p.add_argument("--batch-size", type=int, help="images per process and step (default: 8 for tiny, else 1)")
    p.add_argument("--lr", type=float, help="AdamW learning rate for P and alpha (default: 1e-2 for tiny, 2e-3 otherwise)")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant", help="learning rate over "
                   "the run: constant, or cosine decay lr * (1 + cos(pi step / steps)) / 2 to 0 at the last step (a "
                   "resumed run with a larger --steps stretches the curve)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="prompt file to write (default: weights/<model>-<degradation>.safetensors)")
    p.add_argument("--run-dir", help="folder for checkpoint, log and previews (default: runs/<model>-<degradation>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    p.add_argument("--val-every", type=int, help="validate and preview every N steps (0: only at the end; default 250)")
    p.add_argument("--val-count", type=int, help="held-out images for validation (default 4, 8 for tiny)")
    p.add_argument("--val-steps", type=int, default=20, help="sampler steps when validating")
    p.add_argument("--curve", action=argparse.BooleanOptionalAction, help="after training at one T0, also measure the "
                   "prompt's T0 curve (as for --t0 LOW:HIGH, over T0 in [0.05, 0.95]) so that sample.py chooses T0 per "
                   "input; only for degradations with a strength estimator (noise); a range prompt always gets "
                   "one. Default: on for tiny (about 100 s on 2 CPU cores), off for FLUX and Wan (it restores the "
                   "validation images 66 times)")
    p.add_argument("--sample-steps", type=int, help="the T0 curve: sampler steps it is measured with "
                   "(default: sample.py's for the backbone, 1 for tiny, 20 otherwise)")
    p.add_argument("--samples", type=int, help="the T0 curve: restorations averaged per image when measuring the "
                   "T0 curve (default: sample.py's for the backbone, 20 for tiny, 1 otherwise)")
    p.add_argument("--spin", type=spin_period, help="the T0 curve: cycle-spinning period in pixels when measuring the T0 "
                   "curve (sample.py --spin; default: sample.py's for the backbone, 4 for tiny, 0 otherwise)")
    p.add_argument("--recalibrate", metavar="FILE", help="do not train: measure the T0 curve of FILE (a prompt "
                   "trained over a T0 range, or a noise prompt trained at one T0) again with the sampler above on the "
                   "validation images its training used (the file's degradation, resolution and seed; --data, "
                   "--val-count as when training) and rewrite FILE (or --out) with the new curve (and a range "
                   "prompt's new default T0), every other entry unchanged")
    p.add_argument("--grad-checkpointing", choices=("auto", "on", "off"), default="auto",
                   help="recompute each block in the backward pass (auto: on for CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="frozen weights' dtype (default: bf16 on CUDA, fp32 on CPU)")
    add_memory_flags(p)
    args = p.parse_args(argv)
    if not isinstance(args.t0, tuple) and not 0 < args.t0 <= 1:  # a range is checked by Bridge
        raise UserError(f"--t0 must be in (0, 1], got {args.t0}")
    for flag in ("steps", "batch_size", "val_count", "val_steps", "frames", "sample_steps", "samples"):  # None: the backbone's default
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    for flag in ("lr", "t_min", "pow", "ddbm_sigma"):
        if getattr(args, flag) is not None and not getattr(args, flag) > 0:  # `not >` also refuses nan
            raise UserError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.val_every is not None and args.val_every < 0:
        raise UserError("--val-every must be 0 (validate only at the end) or more")
    return args


def parse_t0(text):
    """'0.4' -> 0.4; '0.1:0.8' -> (0.1, 0.8), a range of horizons (adaptive T0)."""
    try:
        parts = [float(v) for v in text.split(":")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor a range LOW:HIGH like 0.1:0.8") from None
    if len(parts) > 2:
        raise argparse.ArgumentTypeError(f"{text!r}: a range has two ends, LOW:HIGH")
    return parts[0] if len(parts) == 1 else tuple(parts)


def lr_at(step, steps, lr, schedule="constant"):
    """The learning rate of optimiser step `step` (0-based) of `steps`: lr, or with "cosine"
    lr * (1 + cos(pi * step / steps)) / 2, from lr down towards 0. A function of the step alone, so a run
    resumed with the same --steps follows the same curve."""
    return lr if schedule == "constant" else lr * (1 + math.cos(math.pi * step / steps)) / 2


def item_seed(seed, step, j):
    """Every random draw of item j of step `step` (its image, crop, degradation, t, eps) comes from
    this seed: a resumed run, or the same global batch split over any number of processes, draws
    exactly the same numbers."""
    return (seed * 1_000_003 + step) * 10_007 + j


def batch_at(dataset, step, batch_size, seed, world):
    """This process's share of the global batch (batch_size per process, batch_size x world in all).

    The sampler: one seeded draw of batch_size x world indices per step, and process r takes items
    [r B, (r + 1) B): the data is sharded per rank like a DistributedSampler, and reproducibly."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    idx = torch.randint(len(dataset), (batch_size * world.size,), generator=g).tolist()
    clean, degraded, gens = [], [], []
    for j in range(world.rank * batch_size, (world.rank + 1) * batch_size):
        torch.manual_seed(item_seed(seed, step, j))  # the dataset's crop, flip and degradation draws
        item = dataset[idx[j]]
        clean.append(item["clean"])
        degraded.append(item["degraded"])
        gens.append(torch.Generator().manual_seed(item_seed(seed, step, j) + 1))  # t and eps of item j
    return torch.stack(clean), torch.stack(degraded), gens


@torch.no_grad()
def validate(backbone, bank, bridge, val_set, steps, seed, world):
    """Restore the held-out images; their mean x0-loss at fixed times, PSNR and SSIM (averaged over
    all processes, each of which restores its share), and this process's preview grid."""
    rows, scores, losses = [], [], []
    for i in range(world.rank, len(val_set), world.size):
        item = val_set[i]
        clean, degraded = item["clean"][None], item["degraded"][None]
        X0, Y = backbone.encode(clean), backbone.encode(degraded)
        g = torch.Generator().manual_seed(seed + i)
        for t in torch.linspace(bridge.t_min, bridge.T0, 4)[1:]:  # the training objective at fixed t, eps
            eps = torch.randn(Y.shape, generator=g).to(Y.device)
            x_t = bridge.make_state(X0, Y, t.item(), eps)
            tau = torch.full((1,), float(bridge.model_time(t.item())), device=Y.device)
            x0_hat = bridge.x0_from_velocity(x_t, t.item(), backbone.velocity(x_t, tau, bank), Y)
            losses.append(bridge.loss(x0_hat, X0).item())
        restored = backbone.decode(bridge.sample(lambda x, tau: backbone.velocity(x, tau, bank), Y, steps, generator=g))
        restored = restored.cpu()
        if clean.dim() == 5:  # a clip [1, 3, T, H, W]: score every frame, preview the middle one
            restored, clean, degraded = (x[0].transpose(0, 1) for x in (restored, clean, degraded))
        scores.append((psnr(restored, clean).mean().item(), ssim(restored, clean).mean().item(),
                       psnr(degraded, clean).mean().item()))
        mid = clean.shape[0] // 2
        rows.append(torch.cat([degraded[mid], restored[mid], clean[mid]], dim=-1))
    sums = sum_across([sum(losses), len(losses), len(scores)] + [sum(s[k] for s in scores) for k in range(3)], world)
    loss_sum, n_loss, n, psnr_sum, ssim_sum, degraded_sum = sums
    metrics = {"val_loss": loss_sum / n_loss, "psnr": psnr_sum / n, "ssim": ssim_sum / n,
               "psnr_degraded": degraded_sum / n}
    return metrics, (torch.cat(rows, dim=-2) if rows else None)


CALIBRATION_GRID = 11  # T0 values tried across a trained range (linspace(low, high, 11))
CURVE_RANGE = (0.05, 0.95)  # the range they span for a prompt trained at one T0 (--curve)


@torch.no_grad()
def calibrate_T0(backbone, bank, bridge, val_set, degradation, args, say):
    """The T0 curve of a prompt trained over bridge.T0_range, or at one T0 (then the grid spans CURVE_RANGE;
    strength.py): the validation images degraded at a ladder of strengths (paired data: as they are) and
    restored from every T0 of a grid with sample.py's sampler for this backbone, the mean of `samples`
    restorations of `steps` steps (restore.py). Restoration k starts from the k-th draw of one generator seeded
    args.seed + 7, the same start noises for every T0 and rung (with 1 sample: exactly the noise of the 1 x 20
    calibration before). Every process computes the same numbers (no sharding: it is small)."""
    clean = torch.stack([val_set[i]["clean"] for i in range(len(val_set))])
    steps, samples, spin = sampler_defaults(backbone.name, args.sample_steps, args.samples, spin=args.spin)
    velocity = lambda x, tau: backbone.velocity(x, tau, bank)  # noqa: E731

    def restore(degraded, T0, steps, samples):  # (1 / K) sum_k decode(sample(x_T0 = (1 - T0) Y + T0 eps_k)), spun
        g = torch.Generator().manual_seed(args.seed + 7)

        def one(x, k):
            Y = backbone.encode(x)
            eps = torch.randn(Y.shape, generator=g).to(Y.device)
            return backbone.decode(bridge.at(T0).sample(velocity, Y, steps, eps=eps)).float().cpu()
        return spun(one, degraded, samples, spin)

    grid = torch.linspace(*(bridge.T0_range or CURVE_RANGE), CALIBRATION_GRID).tolist()
    show = lambda level, scores: say(f"calibrating T0 {level or 'val images'}: " + "  ".join(  # noqa: E731
        f"{T0:.2f}:{p:.2f}" for T0, p in zip(grid, scores)))
    paired = None if degradation else torch.stack([val_set[i]["degraded"] for i in range(len(val_set))])
    say(f"calibrating T0 with sample.py's sampler on {backbone.name}: the mean of {samples} samples of {steps} steps"
        + (f", spin {spin}" if spin else ""))
    out = calibrate(restore, clean, degradation, grid, steps, samples, seed=args.seed, progress=show, degraded=paired,
                    spin=spin)
    if "T0_curve" in out:
        c = json.loads(out["T0_curve"])
        say("T0 curve: " + ", ".join(f"{s:.3f} -> {T0:.2f}" for s, T0 in zip(c["strength"], c["T0"])))
    if bridge.T0_range:
        say(f"default T0 (best on average over the validation strengths): {out['T0']:.3f}")
    else:
        say(f"default T0: {bridge.T0:g}, the one it was trained at (the curve is what sample.py --t0 auto follows)")
    return out


def is_paired(data):
    return data is not None and (data / "clean").is_dir() and (data / "degraded").is_dir()


def datasets(args, backbone, data, degradation, resolution, T0_range):
    """(train_set, val_set, degradation, paired): the tiny default's photographs (validated on the val
    photographs), or --data split into training and --val-count validation items."""
    paired = is_paired(data)
    degradation = "+".join(parse(degradation)) if not paired else degradation
    if data is None:  # the tiny default: its training photographs; validation on other photographs
        dataset = CleanPhotos("train", PHOTO_ITEMS, degradation, resolution, seed=args.seed)
    elif is_clip_folder(data):
        if backbone.kind != "wan":
            raise UserError(f"{data} holds video clips; {backbone.name} trains on images (use a Wan backbone)")
        if T0_range:
            raise UserError("--t0 LOW:HIGH calibrates its T0 curve on images; train a video prompt at one T0")
        dataset = ClipFolder(data, degradation, resolution, args.frames, seed=args.seed)
    else:
        dataset = (PairedFolder(data, resolution, seed=args.seed) if paired
                   else CleanFolder(data, degradation, resolution, seed=args.seed))
    if data is None:
        val_set = CleanPhotos("val", args.val_count, degradation, resolution, train=False, seed=args.seed)
        return dataset, val_set, degradation, paired
    train_set, val_set = split(dataset, val_count=min(args.val_count, len(dataset) - 1), seed=args.seed)
    return train_set, val_set, degradation, paired


def recalibrate(args):
    """--recalibrate FILE: measure the T0 curve of a trained prompt again (calibrate_T0, the code training runs)
    on the validation images its training used, and rewrite the file (or --out) atomically with the new T0_curve
    and, for a range prompt, default T0 (a prompt trained at one T0 keeps it); its tensors and every other
    metadata entry stay as they were."""
    src = Path(args.recalibrate)
    if not src.is_file():
        raise UserError(f"--recalibrate {src}: no such file")
    meta = load_prompt(src).meta  # a one-line UserError for an unreadable file
    if "T0_range" not in meta and meta.get("degradation") not in ESTIMATORS:
        raise UserError(f"--recalibrate {src}: this prompt was trained at one T0 ({meta.get('T0', '?')}) for "
                        f"{meta.get('degradation', 'an unnamed degradation')}, which has no strength estimator "
                        f"(only {', '.join(ESTIMATORS)} has), so it has no T0 curve to measure")
    try:
        T0_range = parse_t0(meta["T0_range"]) if "T0_range" in meta else None
        resolution = parse_resolution(meta.get("resolution", "64"))
        args.seed = int(meta.get("seed", args.seed))  # the validation images and start noises training used
        bridge = Bridge.from_meta(meta, T0_range=T0_range)
    except (argparse.ArgumentTypeError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--recalibrate {src}: unreadable metadata ({e})") from None
    out = Path(args.out or src)
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: the prompt file's name ends in .safetensors")
    writable_folder(out.parent)
    data = None if args.data is None else Path(args.data)
    if data is not None and not data.is_dir():
        raise UserError(f"--data {data}: no such folder")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    backbone = load_backbone(args.model, args.device, dtype, weights=args.weights, offload=args.offload)
    bank = load_prompt(src, backbone=backbone.name, K=backbone.K, D=backbone.D, n_blocks=backbone.n_blocks)
    if args.val_count is None:
        args.val_count = DEFAULTS.get(backbone.name, DEFAULTS[backbone.kind]).get("val_count", 4)
    _, val_set, degradation, paired = datasets(args, backbone, data, meta.get("degradation", args.degradation),
                                               resolution, T0_range)
    if paired and not T0_range:
        raise UserError(f"--recalibrate {src}: --data {data} is paired, so there is no ladder of noise levels to "
                        "measure a curve of a prompt trained at one T0 on; pass clean images")
    new = calibrate_T0(backbone, bank.to(backbone.device), bridge, val_set, None if paired else degradation, args,
                       print)
    if not T0_range:  # trained at one T0: that T0 stays its default
        new = {"T0_curve": new["T0_curve"]}
    update_prompt_meta(src, out, **new)
    print(f"{out}: " + (f"default T0 {meta['T0']} -> {new['T0']:g}" if "T0" in new else f"T0 {meta['T0']} kept")
          + ("; new T0 curve" if "T0_curve" in new else ""))
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.recalibrate:
        return recalibrate(args)
    world = init(args.device)
    args.device = world.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    T0_range = args.t0 if isinstance(args.t0, tuple) else None
    bridge = Bridge(args.bridge, sum(T0_range) / 2 if T0_range else args.t0, args.t_min, args.pow, args.ddbm_sigma,
                    T0_range, args.x0)  # a range validates at its midpoint until calibrate() picks the default
    data = None if args.data is None else Path(args.data)
    if data is not None and not data.is_dir():
        raise UserError(f"--data {data}: no such folder")
    if args.out is not None and Path(args.out).suffix != ".safetensors":
        raise UserError(f"--out {args.out}: the prompt file's name ends in .safetensors")
    # a T0 curve is measured against an estimate of the degradation's strength in single images (strength.py)
    paired = is_paired(data)
    curve_measurable = not paired and "+".join(parse(args.degradation)) in ESTIMATORS and not (
        data is not None and is_clip_folder(data))
    if args.curve and not T0_range and not curve_measurable:
        raise UserError(f"--curve measures T0 against an estimate of the noise level of single images: it needs "
                        f"--degradation {', '.join(ESTIMATORS)} on clean images, not {args.degradation}"
                        f"{' from a paired folder' if paired else ''}; train without --curve")
    for flag, where in (("--out", Path(args.out).parent if args.out else Path("weights")), ("--run-dir", args.run_dir)):
        if where is not None and world.main:  # before any work: an unwritable place fails now, not after training
            writable_folder(where, flag)
    backbone = load_backbone(args.model, args.device, dtype, weights=args.weights, offload=args.offload)
    defaults = DEFAULTS.get(backbone.name, DEFAULTS[backbone.kind])
    if data is None and backbone.name != "tiny":
        raise UserError("pass --data: a folder of clean images, or a paired folder with clean/ and degraded/")
    resolution, steps, lr = (args.resolution or defaults["resolution"], args.steps or defaults["steps"],
                             args.lr or defaults["lr"])
    for flag, fallback in (("batch_size", 1), ("val_every", 250), ("val_count", 4)):
        if getattr(args, flag) is None:
            setattr(args, flag, defaults.get(flag, fallback))
    if any(side % backbone.multiple for side in ((resolution,) * 2 if isinstance(resolution, int) else resolution)):
        raise UserError(f"--resolution {resolution} must be a multiple of {backbone.multiple} for {backbone.name}")
    train_set, val_set, degradation, paired = datasets(args, backbone, data, args.degradation, resolution, T0_range)
    curve = not T0_range and curve_measurable and (args.curve or (args.curve is None and defaults.get("curve", False)))
    if len(val_set) < world.size:
        raise UserError(f"--val-count {len(val_set)} is smaller than the {world.size} processes: each needs one")
    if args.grad_checkpointing == "on" or (args.grad_checkpointing == "auto" and args.device.startswith("cuda")):
        backbone.model.gradient_checkpointing = True
    tag = f"{backbone.name}-{degradation}"
    out = Path(args.out or Path("weights") / f"{tag}.safetensors")
    run_dir = Path(args.run_dir or Path("runs") / tag)
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "checkpoint.pt"

    bank = backbone.new_prompt(torch.Generator().manual_seed(args.seed))
    opt = torch.optim.AdamW(bank.parameters(), lr=lr, weight_decay=0.0)
    start = 0
    if args.resume:
        if not ckpt_path.exists():
            raise UserError(f"--resume: no checkpoint at {ckpt_path}; start without --resume")
        try:
            state = torch.load(ckpt_path, map_location=args.device, weights_only=True)
            state["prompt"], state["alpha"], state["optimizer"], state["step"]
        except Exception as e:  # truncated, another format, or a pickle that wants to run code
            raise UserError(f"--resume: {ckpt_path} is not a readable train.py checkpoint ({type(e).__name__}); "
                            "delete it to start afresh, or pass another --run-dir") from None
        if tuple(state["prompt"].shape) != tuple(bank.prompt.shape):
            raise UserError(f"{ckpt_path} holds a prompt of shape {list(state['prompt'].shape)}, "
                            f"not {list(bank.prompt.shape)}: it is from another backbone")
        bank.load_state_dict({"prompt": state["prompt"], "alpha": state["alpha"]})
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        print(f"resuming {ckpt_path} at step {start}")
    meta = dict(backbone=backbone.name, degradation=degradation, bridge=args.bridge, x0=args.x0, T0=bridge.T0,
                t_min=args.t_min, pow=args.pow, ddbm_sigma=args.ddbm_sigma,
                resolution=resolution if isinstance(resolution, int) else "x".join(map(str, resolution)), lr=lr,
                lr_schedule=args.lr_schedule, batch_size=args.batch_size, seed=args.seed)

    def checkpoint(step):
        if not world.main:
            return
        state = {"prompt": bank.prompt.detach(), "alpha": bank.alpha.detach(), "optimizer": opt.state_dict(),
                 "step": step, "args": vars(args)}
        atomic_write(ckpt_path, lambda tmp: torch.save(state, tmp))

    def log(record):
        if not world.main:
            return
        with open(run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def run_validation(step):
        metrics, grid = validate(backbone, bank, bridge, val_set, args.val_steps, args.seed, world)
        if world.main:
            save_image(grid, run_dir / f"preview-{step:06d}.png")
        log({"step": step, **metrics})
        return metrics

    from tqdm.auto import tqdm

    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"training {tag}", unit="step",
               disable=not world.main)
    say = tqdm.write if world.main else (lambda *a: None)
    done = start  # optimiser steps completed
    try:
        if start == 0:  # the frozen model, as the baseline every later validation is read against
            m = run_validation(0)
            say(f"step 0 (frozen model): val loss {m['val_loss']:.4f}  PSNR {m['psnr']:.2f} dB "
                       f"(degraded {m['psnr_degraded']:.2f})  SSIM {m['ssim']:.3f}")
        t_start = time.time()
        for step in bar:
            clean, degraded, gens = batch_at(train_set, step, args.batch_size, args.seed, world)
            X0, Y = backbone.encode(clean), backbone.encode(degraded)
            draws = [bridge.sample_T0_t(1, generator=g) for g in gens]  # per item: its horizon T0, then t
            T0, t = (torch.cat(d).to(X0.device) for d in zip(*draws))
            b = bridge.at(T0) if T0_range else bridge  # a range: every item on EBR's bridge for its own T0
            eps = torch.stack([torch.randn(X0.shape[1:], generator=g) for g in gens]).to(X0.device)
            x_t = b.make_state(X0, Y, t, eps)
            v = backbone.velocity(x_t, b.model_time(t), bank)
            loss = b.loss(b.x0_from_velocity(x_t, t, v, Y), X0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, lr, args.lr_schedule)
            average_gradients(bank.parameters(), world)  # mean over processes = the global batch's gradient
            opt.step()
            done = step + 1
            bar.set_postfix(loss=f"{loss.item():.4f}")  # this process's share of the batch
            log({"step": step + 1, "loss": loss.item(), "lr": opt.param_groups[0]["lr"], "time": time.time() - t_start})
            if args.val_every and (step + 1) % args.val_every == 0 and step + 1 < steps:
                checkpoint(step + 1)
                m = run_validation(step + 1)
                say(f"step {step + 1}: val loss {m['val_loss']:.4f}  PSNR {m['psnr']:.2f} dB  SSIM {m['ssim']:.3f}")
    except KeyboardInterrupt:
        bar.close()
        checkpoint(done)
        if world.main:
            print(f"interrupted at step {done}: checkpoint saved in {ckpt_path}; continue with --resume")
        return 130
    bar.close()
    checkpoint(steps)
    if T0_range:  # measure which T0 each strength wants; the default T0 becomes the best on average
        meta.update(calibrate_T0(backbone, bank, bridge, val_set, None if paired else degradation, args, say))
        bridge = bridge.at(meta["T0"])
        meta["T0_range"] = f"{T0_range[0]:g}:{T0_range[1]:g}"
    elif curve:  # trained at one T0, which stays its default; the curve lets sample.py pick T0 per input
        meta["T0_curve"] = calibrate_T0(backbone, bank, bridge, val_set, degradation, args, say)["T0_curve"]
    m = run_validation(steps)
    if world.main:
        save_prompt(bank, out, **meta, steps=steps, world_size=world.size)
    barrier(world)
    close(world)
    if not world.main:
        return 0
    print(f"step {steps}: val loss {m['val_loss']:.4f}  PSNR {m['psnr']:.2f} dB (degraded {m['psnr_degraded']:.2f})  "
          f"SSIM {m['ssim']:.3f}")
    print(f"prompt written to {out}; previews and log in {run_dir}")
    return 0


if __name__ == "__main__":
    run(main)
