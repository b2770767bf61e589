"""Cycle spinning: which shift period, and does it help every degradation? Measured on val crops.

    python benchmarks/spin.py                    # every shipped prompt, periods 0 (off), 2, 4, 8, 24 val crops of 64 px

sample.py's tiny default averages 20 one-step restorations; with --spin P restoration k sees its tile shifted by
restore.cycle_shift(k, P) pixels (and shifted back), so the grid of the transformer's tokens (4 x 4 pixels on the
tiny default) falls somewhere else each time and its faint seams average out like the sampling noise does
(restore.spun). This script restores the same val crops (photos.py's held_out on the val photographs, so choosing
the default from it never looks at the test photographs) with each shipped prompt exactly as sample.py would,
but for the period, and reports mean PSNR and the paired difference to no spinning with its 95% interval.
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

from photos import LEVELS, VAL_BASE, held_out, label  # noqa: E402
from replicate import interval, prompt_bridge, restore_set  # noqa: E402
from minirestore import UserError  # noqa: E402
from minirestore.backbone import load_backbone  # noqa: E402
from minirestore.cli import Help, run  # noqa: E402
from minirestore.metrics import psnr  # noqa: E402
from minirestore.photos import PhotoCrops  # noqa: E402
from minirestore.prompts import load_prompt  # noqa: E402
from minirestore.strength import auto_T0  # noqa: E402
from sample import default_prompt, sampler_defaults  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=Help)
    p.add_argument("--degradations", default=",".join(LEVELS), help="comma-separated, scored with their shipped prompts")
    p.add_argument("--spins", default="0,2,4,8", help="comma-separated periods in pixels; 0 (off) is always scored")
    p.add_argument("--images", type=int, default=24, help="val crops (64 px) per test level")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "photos" / "spin"))
    args = p.parse_args(argv)
    args.degradations = [d.strip() for d in args.degradations.split(",") if d.strip()]
    if any(d not in LEVELS for d in args.degradations):
        raise UserError(f"--degradations: choose from {', '.join(LEVELS)}")
    try:
        args.spins = sorted({0, *(int(s) for s in args.spins.split(","))})
    except ValueError:
        raise UserError("--spins takes comma-separated whole numbers of pixels, e.g. 0,2,4,8") from None
    if args.spins[0] < 0 or args.images < 2:
        raise UserError("--spins must be >= 0 and --images >= 2 (an interval needs two)")
    return args


@torch.no_grad()
def main(argv=None):
    command = ("python benchmarks/spin.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    args = parse_args(argv)
    start = time.time()
    backbone = load_backbone("tiny", "cpu", torch.float32)
    steps, samples, _ = sampler_defaults(backbone.name)
    photos = PhotoCrops("val")
    lines = ["# Cycle spinning: the shift period", "", f"Command: `{command}`", "",
             f"{args.images} val crops of 64 px per level; each shipped prompt as sample.py runs it (mean of {samples} "
             f"samples of {steps} steps, its T0 or --t0 auto) but for the period. PSNR (dB); in brackets the paired "
             "difference to no spinning, 95% interval.", "",
             "| degradation | level | " + " | ".join(f"spin {s}" if s else "no spin" for s in args.spins) + " |",
             "|---|---|" + "---|" * len(args.spins)]
    for d in args.degradations:
        bank = load_prompt(default_prompt(backbone.name, d), backbone=backbone.name, D=backbone.D,
                           n_blocks=backbone.n_blocks)
        bridge = prompt_bridge(bank)
        for level in LEVELS[d]:
            clean, degraded = held_out(photos, VAL_BASE, args.images, 64, d, level)
            T0s = [auto_T0(bank.meta, x)[0] for x in degraded] if "T0_curve" in bank.meta else None
            p = {s: psnr(restore_set(backbone, bank, bridge, degraded, steps, T0s=T0s, samples=samples, spin=s), clean)
                 for s in tqdm(args.spins, desc=f"{d} {label(level)}")}
            cells = [f"{p[0].mean():.2f}"] + [f"{p[s].mean():.2f} (%+.2f ± %.2f)" % interval(p[s] - p[0])
                                              for s in args.spins[1:]]
            lines.append(f"| {d} | {label(level)} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines[4:4] = [f"Date: {when}; {torch.get_num_threads()} threads; {time.time() - start:.0f} s.", ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    run(main)
