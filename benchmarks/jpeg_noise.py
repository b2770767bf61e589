"""Which noise reading picks T0 best for a JPEG file: a T0 grid on noisy, then JPEG'd val crops, scored offline.

    python benchmarks/jpeg_noise.py         # 64 px, 16 crops: sigma 0.02 / 0.05 / 0.1 / 0.2 x quality 90 / 75
    python benchmarks/jpeg_noise.py --size 128 --images 8 --qualities 75 --grid 0.1,0.2,0.3,0.4,0.5

A JPEG encoder quantizes the finest luma band (mostly to zero) and keeps chroma at half resolution, so the noise it
leaves is coloured and the finest Haar band, which the T0 curve was measured against, reads only part of it. This
scores other readings of a JPEG file on val photographs only (the one chosen here, rms, then lost on the test
photographs at quality 90, so sample.py reads a JPEG as any image: benchmarks/photos/README.md, "JPEG files").
For every crop (noise sigma, then a PIL JPEG round trip at quality q) and every T0 of --grid, the shipped noise
prompt restores it with sample.py's sampler, and each crop's PSNR at each T0 is kept. Each candidate reading r of a
crop picks T0 = curve(r) through the prompt's curve, and its PSNR is read off that crop's grid by linear
interpolation:

  fine       the finest band, all channels (strength.noise_sigma: what sample.py reads)
  coarse     luma at 2 x 2, luma's share undone (luma_sigma below)
  rms        sqrt((fine^2 + coarse^2) / 2)            (rms_sigma below)
  energy     sqrt(3/4 fine^2 + 1/4 coarse^2)          (white noise's Haar energy: 3/4 in the finest level)

with, for reference, the best single T0 of the grid and the per-crop best T0 (an oracle). Outputs in --out:
results.md, results.json (every crop's readings and PSNRs, so other readings can be scored without restoring).
"""
import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "benchmarks"))

from photos import VAL_BASE, held_out  # noqa: E402
from replicate import prompt_bridge, restore_set  # noqa: E402
from minirestore import UserError  # noqa: E402
from minirestore.backbone import load_backbone  # noqa: E402
from minirestore.cli import Help, run  # noqa: E402
from minirestore.degrade import jpeg  # noqa: E402
from minirestore.metrics import psnr  # noqa: E402
from minirestore.photos import PhotoCrops  # noqa: E402
from minirestore.prompts import load_prompt  # noqa: E402
from minirestore.restore import sampler_defaults  # noqa: E402
from minirestore.strength import curve_T0, noise_sigma  # noqa: E402

LUMA = (0.299, 0.587, 0.114)  # JPEG's luma Y = 0.299 R + 0.587 G + 0.114 B (ITU-R 601)
LUMA_SHARE = sum(w * w for w in LUMA) ** 0.5  # 0.6685: Y's std when R, G, B each carry independent unit noise


def luma_sigma(x):
    """The coarse reading of images x [B, 3, H, W] decoded from JPEG files -> [B]. The encoder quantized the
    finest luma band (mostly to zero) and kept chroma at half resolution (4:2:0), while luma one scale up keeps
    about all the noise there was: Y, 2 x 2 means (white noise's std halves), the MAD rule, luma's share undone,
        sigma_coarse = 2 median(|HH(mean2x2(Y))|) / 0.6745 / 0.6685
    (a grey image, R = G = B, has all of its noise in Y: no share to undo)."""
    x = x.float()
    if x.shape[-2] < 4 or x.shape[-1] < 4:
        raise ValueError(f"an image of {x.shape[-1]}x{x.shape[-2]} pixels is too small to read its luma at 2 x 2")
    grey = (x == x[:, :1]).flatten(1).all(dim=1)  # [B]
    luma = sum(w * x[:, c:c + 1] for c, w in enumerate(LUMA)) / torch.where(grey, 1.0, LUMA_SHARE)[:, None, None, None]
    return noise_sigma(torch.nn.functional.avg_pool2d(luma[..., :x.shape[-2] // 4 * 4, :x.shape[-1] // 4 * 4], 2) * 2)


def rms_sigma(x):
    """READINGS["rms"] of images x: the reading this benchmark chose on val (and the test then rejected)."""
    return READINGS["rms"](noise_sigma(x), luma_sigma(x))


READINGS = {  # name -> reading from (fine, coarse)
    "fine": lambda f, c: f,
    "coarse": lambda f, c: c,
    "rms": lambda f, c: ((f * f + c * c) / 2) ** 0.5,
    "energy": lambda f, c: (0.75 * f * f + 0.25 * c * c) ** 0.5,
}


def floats(text, flag):
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: give numbers separated by commas") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=Help)
    p.add_argument("--prompt", default=str(ROOT / "weights" / "tiny" / "prompts" / "noise.safetensors"),
                   help="a noise prompt with a T0 curve")
    p.add_argument("--sigmas", default="0.02,0.05,0.1,0.2", help="noise levels before the JPEG round trip")
    p.add_argument("--qualities", default="90,75", help="JPEG qualities (1..100)")
    p.add_argument("--grid", default="0.1,0.15,0.2,0.25,0.3,0.4,0.5,0.6", help="the T0s every crop is restored from")
    p.add_argument("--size", type=int, default=64, help="crop side in pixels")
    p.add_argument("--images", type=int, default=16, help="val crops per (sigma, quality)")
    p.add_argument("--out", help="results folder (default benchmarks/photos/jpeg-noise-val-<size>)")
    args = p.parse_args(argv)
    args.sigmas, args.grid = floats(args.sigmas, "--sigmas"), sorted(floats(args.grid, "--grid"))
    args.qualities = [int(q) for q in floats(args.qualities, "--qualities")]
    if not all(1 <= q <= 100 for q in args.qualities):
        raise UserError(f"--qualities {args.qualities}: a JPEG quality is 1..100")
    if len(args.grid) < 2 or not all(0 < t <= 1 for t in args.grid):
        raise UserError(f"--grid {args.grid}: give at least two T0s in (0, 1]")
    args.out = Path(args.out or ROOT / "benchmarks" / "photos" / f"jpeg-noise-val-{args.size}")
    return args


def main(argv=None):
    command = ("python benchmarks/jpeg_noise.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    args = parse_args(argv)
    start = time.time()
    backbone = load_backbone("tiny", "cpu", torch.float32)
    bank = load_prompt(args.prompt, backbone=backbone.name, D=backbone.D, n_blocks=backbone.n_blocks)
    if "T0_curve" not in bank.meta:
        raise UserError(f"{args.prompt} has no T0 curve: train it with train.py --t0 LOW:HIGH (or --curve)")
    curve, bridge = json.loads(bank.meta["T0_curve"]), prompt_bridge(bank)
    S, K, P = sampler_defaults(backbone.name)
    photos = PhotoCrops("val")
    results = {}
    for sigma in args.sigmas:
        clean, noisy = held_out(photos, VAL_BASE, args.images, args.size, "noise", dict(sigma=sigma))
        for q in args.qualities:
            print(f"== sigma {sigma:g}, JPEG quality {q}: {args.images} val crops of {args.size} px", flush=True)
            y = jpeg(noisy, generator=0, quality=q)
            fine, coarse = noise_sigma(y), luma_sigma(y)
            table = torch.stack([psnr(restore_set(backbone, bank, bridge, y, S, T0s=[T0] * args.images, samples=K,
                                                  spin=P), clean) for T0 in args.grid], dim=1)  # [n, len(grid)]
            results[f"{sigma:g},{q}"] = dict(sigma=sigma, quality=q, input=psnr(y, clean).tolist(), fine=fine.tolist(),
                                             coarse=coarse.tolist(), psnr=table.tolist())
    rows = []
    for key, r in results.items():
        table = np.array(r["psnr"])
        row = dict(sigma=r["sigma"], quality=r["quality"], input=float(np.mean(r["input"])),
                   best=(float(table.mean(0).max()), args.grid[int(table.mean(0).argmax())]),
                   oracle=float(table.max(1).mean()))
        for name, reading in READINGS.items():
            s = [reading(f, c) for f, c in zip(r["fine"], r["coarse"])]
            T0s = [curve_T0(curve, v) for v in s]
            row[name] = (float(np.mean([np.interp(T0, args.grid, t) for T0, t in zip(T0s, table)])),
                         float(np.mean(s)), float(np.mean(T0s)))
        rows.append(row)
    names = list(READINGS)
    lines = ["| sigma | quality | input | best one T0 of the grid | " + " | ".join(
        f"{n}: PSNR (reading, T0)" for n in names) + " | per-crop best T0 |", "|---" * (len(names) + 5) + "|"]
    for r in rows:
        lines.append(f"| {r['sigma']:g} | {r['quality']} | {r['input']:.2f} | {r['best'][0]:.2f} (T0 {r['best'][1]:g}) | "
                     + " | ".join("{:.2f} ({:.3f}, {:.2f})".format(*r[n]) for n in names) + f" | {r['oracle']:.2f} |")
    lines.append("| mean | | | {:.2f} | ".format(np.mean([r["best"][0] for r in rows])) + " | ".join(
        f"**{np.mean([r[n][0] for r in rows]):.2f}**" for n in names) + f" | {np.mean([r['oracle'] for r in rows]):.2f} |")
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    md = "\n".join([f"# Noise readings of JPEG files, scored by the T0 they pick ({args.size} px val crops)", "",
                    f"Command: `{command}`", "", f"Date: {when}; {torch.get_num_threads()} threads; total "
                    f"{time.time() - start:.0f} s. Prompt {Path(args.prompt).name}, sample.py's sampler ({K} samples "
                    f"of {S} steps, spin {P}); T0 grid {args.grid}; val photographs: {', '.join(photos.names)}.", "",
                    "\n".join(lines), ""])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(md)
    (args.out / "results.json").write_text(json.dumps(dict(command=command, grid=args.grid, curve=curve,
                                                           results=results, rows=rows), indent=1))
    print("\n" + md)
    return 0


if __name__ == "__main__":
    run(main)
