"""The sampler's budget: sampler steps against averaged samples, at a fixed number of network evaluations.

    python benchmarks/sampler.py                 # the shipped noise prompt, --t0 auto, 24 val crops of 64 px

The bridge sampler is deterministic given its start noise, so one restoration is one draw from (roughly)
the posterior p(X0 | Y), and its squared error is about twice the posterior mean's. Averaging K restorations
from K start noises estimates the posterior mean E[X0 | Y] (sample.py --samples K): the error's variance part
shrinks as 1/K. This script measures PSNR for each (steps, samples) pair on val crops (so choosing sample.py's
default from it never looks at the test photographs); steps x samples is the cost in network evaluations.
Restoration k of crop i starts from the noise of seed 1000 + k; every crop is noised once (photos.py's
held_out on the val photographs).
"""
import argparse
import datetime
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "benchmarks"))

from photos import VAL_BASE, held_out  # noqa: E402
from replicate import prompt_bridge  # noqa: E402
from minirestore import UserError  # noqa: E402
from minirestore.backbone import load_backbone  # noqa: E402
from minirestore.cli import Help, run  # noqa: E402
from minirestore.metrics import psnr  # noqa: E402
from minirestore.photos import PhotoCrops  # noqa: E402
from minirestore.prompts import load_prompt  # noqa: E402
from minirestore.strength import auto_T0  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=Help)
    p.add_argument("--prompt", default=str(ROOT / "weights" / "tiny" / "prompts" / "noise.safetensors"))
    p.add_argument("--sigmas", default="0.05,0.1,0.2", help="Gaussian noise std of [0, 1]")
    p.add_argument("--budgets", default="5x1,10x1,20x1,40x1,5x2,10x2,5x4,10x4,20x4,5x8",
                   help="comma-separated STEPSxSAMPLES")
    p.add_argument("--images", type=int, default=24, help="val crops per sigma")
    p.add_argument("--t0", default="auto", help="auto (the prompt's curve, per image) or comma-separated fixed T0s, "
                                                "each budget scored at each (a budget is best compared at its own best T0)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "photos" / "sampler"))
    args = p.parse_args(argv)
    try:
        args.sigmas = [float(s) for s in args.sigmas.split(",")]
        args.budgets = [tuple(int(v) for v in b.split("x")) for b in args.budgets.split(",")]
    except ValueError:
        raise UserError("--sigmas takes numbers, --budgets STEPSxSAMPLES pairs, e.g. 5x4,20x1") from None
    try:
        args.t0 = ["auto"] if args.t0 == "auto" else [float(t) for t in args.t0.split(",")]
    except ValueError:
        raise UserError("--t0 takes auto or comma-separated numbers, e.g. 0.2,0.35,0.5") from None
    if any(t != "auto" and not 0 < t <= 1 for t in args.t0):
        raise UserError("--t0: every T0 must be in (0, 1]")
    if any(len(b) != 2 or min(b) < 1 for b in args.budgets):
        raise UserError("--budgets: each entry is STEPSxSAMPLES with both at least 1, e.g. 5x4")
    return args


def shown(path):
    """A path as a reader of results.md can use it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


@torch.no_grad()
def main(argv=None):
    command = ("python benchmarks/sampler.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    args = parse_args(argv)
    start = time.time()
    backbone = load_backbone("tiny", "cpu", torch.float32)
    bank = load_prompt(args.prompt, backbone=backbone.name, D=backbone.D, n_blocks=backbone.n_blocks)
    bridge, photos = prompt_bridge(bank), PhotoCrops("val")
    velocity = lambda x, tau: backbone.velocity(x, tau, bank)  # noqa: E731
    scores = {}
    for sigma in args.sigmas:
        clean, noisy = held_out(photos, VAL_BASE, args.images, 64, "noise", dict(sigma=sigma))
        Y = backbone.encode(noisy)
        for t0 in args.t0:
            T0s = [auto_T0(bank.meta, x)[0] if "T0_curve" in bank.meta else bridge.T0 for x in noisy] \
                if t0 == "auto" else [t0] * len(noisy)
            for steps, samples in tqdm(args.budgets, desc=f"sigma {sigma:g}, T0 {t0}"):
                mean = 0
                for k in range(samples):
                    eps = torch.randn(Y.shape, generator=torch.Generator().manual_seed(1000 + k))
                    mean = mean + torch.cat([backbone.decode(bridge.at(T0s[i]).sample(velocity, Y[i:i + 1], steps,
                                                                                      eps=eps[i:i + 1]))
                                             for i in range(len(Y))]).clamp(0, 1)
                scores[sigma, t0, steps, samples] = psnr(mean / samples, clean).mean().item()
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = ["# Sampler budget: steps x samples", "", f"Command: `{command}`", "",
             f"Date: {when}; {torch.get_num_threads()} threads; {time.time() - start:.0f} s. Prompt {shown(args.prompt)}; "
             f"{args.images} val crops of 64 px per sigma; mean PSNR (dB).", "",
             "| steps x samples | network evaluations | " + " | ".join(
                 f"sigma {s:g}" + ("" if t == "auto" else f", T0 {t:g}") for s in args.sigmas for t in args.t0) + " |",
             "|---|---|" + "---|" * (len(args.sigmas) * len(args.t0))]
    for steps, samples in args.budgets:
        lines.append(f"| {steps} x {samples} | {steps * samples} | "
                     + " | ".join(f"{scores[s, t, steps, samples]:.2f}" for s in args.sigmas for t in args.t0) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    run(main)
