"""Adaptive T0 on held-out photographs: one prompt trained over a T0 range, T0 chosen per image, against fixed T0s.

    python benchmarks/adaptive.py --fixed t0.2=runs/noise-t0.2.safetensors --fixed t0.4=... --fixed t0.6=... \\
        --adaptive weights/tiny/prompts/noise.safetensors
    python benchmarks/adaptive.py --split val --adaptive new.safetensors --compare old=old.safetensors

Test images: crops of the test photographs (photos.py), exactly as benchmarks/photos.py draws them (crop i of a
size from default_rng([31, size, i]), degraded with a generator seeded by (size, i)), at noise sigma 0.02, 0.05,
0.1, 0.2 and 0.3 (--split val: crops of the val photographs instead, to compare prompts or curves without looking
at the test set); --jpeg Q: each noisy crop is then saved as a JPEG of quality Q (PIL, 4:2:0 chroma, as a phone
or a web upload would), --t0 auto reads it as sample.py reads any file, and one more row also reads its luma at
2 x 2 (jpeg_noise.py's rms reading: chosen on val, rejected on the test photographs). Every learned row uses
sample.py's sampler for the backbone (the mean of 20 one-step samples on the tiny default; --steps, --samples).
Rows per sigma, PSNR and SSIM with 95% intervals (mean +- 1.96 std / sqrt(n)):

  noisy input
  best classical filter    classical.py, kind and strength tuned per sigma on val-photo crops
  --fixed NAME=FILE        prompts trained at one T0, sampled from it (what sample.py does with them)
  adaptive, default T0     the range-trained prompt at its calibrated default T0 (one T0 for every input)
  adaptive at T0 X         (--grid) the same prompt started from each T0 of a grid, one T0 for every input
  adaptive, --t0 auto      the same prompt, T0 = curve(sigma_hat) per image, as `python sample.py --t0 auto`
  ... luma read too        (--jpeg) the same, sigma_hat = jpeg_noise.rms_sigma: the finest band and luma at 2 x 2
  --compare NAME=FILE      another range prompt (or the same prompt with another T0 curve), --t0 auto on its curve
Paired differences: every row minus `auto` (same images, same start noise). The targets table reads the issue's
targets: auto >= the best fixed T0 at every sigma (within the interval), auto - shipped >= 2 dB at sigma 0.05.
Outputs in --out: results.md, results.json, adaptive.png (the T0 curve with every image's chosen T0; PSNR
against sigma for each fixed T0 and for auto).
"""
import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "benchmarks"))

import classical  # noqa: E402
from jpeg_noise import rms_sigma  # noqa: E402
from photos import TEST_BASE, VAL_BASE, held_out  # noqa: E402
from replicate import interval, prompt_bridge, restore_set  # noqa: E402
from minirestore import UserError  # noqa: E402
from minirestore.backbone import load_backbone  # noqa: E402
from minirestore.cli import Help, run  # noqa: E402
from minirestore.degrade import jpeg  # noqa: E402
from minirestore.metrics import psnr, ssim  # noqa: E402
from minirestore.photos import PhotoCrops  # noqa: E402
from minirestore.prompts import load_prompt  # noqa: E402
from minirestore.restore import sampler_defaults  # noqa: E402
from minirestore.strength import auto_T0, curve_T0  # noqa: E402

SIGMAS = (0.02, 0.05, 0.1, 0.2, 0.3)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=Help)
    p.add_argument("--model", default="tiny", help="tiny or a backbone folder")
    p.add_argument("--adaptive", required=True, help="a noise prompt trained over a T0 range (train.py --t0 LOW:HIGH)")
    p.add_argument("--fixed", action="append", default=[], metavar="NAME=FILE", help="a prompt trained at one T0")
    p.add_argument("--compare", action="append", default=[], metavar="NAME=FILE",
                   help="another prompt with a T0 curve, sampled with --t0 auto on its own curve")
    p.add_argument("--shipped", default="t0.4", help="which --fixed NAME the 2 dB target at sigma 0.05 is read against")
    p.add_argument("--sigmas", default=",".join(map(str, SIGMAS)), help="noise levels (std on the [0, 1] scale)")
    p.add_argument("--grid", default="", metavar="T0,T0,...", help="also sample the adaptive prompt from each of "
                   "these T0s (one for every input): where auto stands against the prompt's own best single T0")
    p.add_argument("--jpeg", type=int, default=0, metavar="Q", help="save every noisy crop as a JPEG of this "
                   "quality (1..100) first, as cameras and uploads do (default: none)")
    p.add_argument("--size", type=int, default=64, help="crop side in pixels")
    p.add_argument("--images", type=int, default=50, help="test crops per sigma")
    p.add_argument("--val-images", type=int, default=20, help="val-photo crops that tune the classical filter")
    p.add_argument("--split", choices=("test", "val"), default="test", help="which photographs the scored crops "
                   "come from (val: to choose between prompts or curves without looking at the test set)")
    p.add_argument("--steps", type=int, help="sampler steps of every learned row (default: sample.py's)")
    p.add_argument("--samples", type=int, help="restorations averaged per image (default: sample.py's)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "photos" / "adaptive"), help="results and plot")
    args = p.parse_args(argv)
    args.sigmas = [float(s) for s in args.sigmas.split(",")]
    try:
        args.grid = [float(t) for t in args.grid.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--grid {args.grid!r}: give T0s separated by commas, e.g. 0.1,0.2,0.4") from None
    if any(not 0 < t <= 1 for t in args.grid):
        raise UserError(f"--grid: every T0 must be in (0, 1], got {args.grid}")
    args.fixed = [tuple(s.split("=", 1)) for s in args.fixed]
    args.compare = [tuple(s.split("=", 1)) for s in args.compare]
    if any(len(x) != 2 for x in args.fixed + args.compare):
        raise UserError("--fixed and --compare take NAME=FILE, e.g. t0.2=runs/noise-t0.2.safetensors")
    for flag in ("steps", "samples"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1")
    if not 0 <= args.jpeg <= 100:
        raise UserError(f"--jpeg {args.jpeg}: a JPEG quality is 1..100 (0: no JPEG)")
    if args.images < 2:
        raise UserError("--images must be at least 2 (an interval needs two)")
    return args


def cpu_name():
    """The CPU's model name (Linux), else the platform's processor string."""
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def spread(T0s):
    return "T0 {:.3f} +- {:.3f} (mean, std over images)".format(torch.tensor(T0s).mean().item(),
                                                                 torch.tensor(T0s).std().item())


def curve_sampler(curve):
    """The sampler a curve was measured with, as it records it (curves from before the record: train.py's
    --val-steps, 1 sample of 20 steps by default)."""
    if "sampler" not in curve:
        return "an unrecorded sampler (train.py's --val-steps: 1 sample of 20 steps by default)"
    return f"{curve['sampler']['samples']} samples of {curve['sampler']['steps']} steps"


def plot(path, curve, chosen, rows, sigmas, others=(), split="test"):
    """Left: the stored T0 curve (and --compare's) and the T0 each scored image got. Right: PSNR against sigma.
    Needs matplotlib (the benchmarks extra); without it the plot is skipped with one line and the tables stay."""
    try:
        import matplotlib
    except ImportError:
        print(f"no plot ({path.name}): matplotlib is not installed (pip install -e \".[benchmarks]\")")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.scatter([s for s, _ in chosen], [T0 for _, T0 in chosen], s=8, alpha=0.4, label=f"{split} images (--t0 auto)")
    a.plot(curve["strength"], curve["T0"], "o-", color="k", label="curve measured on val photos")
    for name, c in others:
        a.plot(c["strength"], c["T0"], "s--", label=f"{name}'s curve")
    a.set(xlabel="estimated noise sigma (strength.noise_sigma)",
          ylabel="T0", title="T0 chosen per image")
    a.legend()
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] not in ("noisy input",)):
        ys = [next(r["psnr"][0] for r in rows if r["method"] == method and r["sigma"] == s) for s in sigmas]
        b.plot(sigmas, ys, "o-" if "auto" in method else ".--", label=method, lw=2.5 if "auto" in method else 1)
    b.set(xlabel="noise sigma", ylabel="PSNR (dB)", title=f"restored PSNR on {split} photos", xscale="log")
    b.minorticks_off()
    b.set_xticks(sigmas, [f"{s:g}" for s in sigmas])
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    command = ("python benchmarks/adaptive.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    args = parse_args(argv)
    start = time.time()
    backbone = load_backbone(args.model, "cpu", torch.float32)
    load = lambda f: load_prompt(f, backbone=backbone.name, D=backbone.D, n_blocks=backbone.n_blocks)  # noqa: E731
    adaptive = load(args.adaptive)
    if "T0_curve" not in adaptive.meta:
        raise UserError(f"{args.adaptive} has no T0 curve: train it with train.py --t0 LOW:HIGH")
    curve = json.loads(adaptive.meta["T0_curve"])
    fixed = [(name, load(f)) for name, f in args.fixed]
    compare = [(name, load(f)) for name, f in args.compare]
    for (name, bank), (_, f) in zip(compare, args.compare):
        if "T0_curve" not in bank.meta:
            raise UserError(f"--compare {name}={f} has no T0 curve: compare prompts trained over a T0 range")
    S, K, P = sampler_defaults(backbone.name, args.steps, args.samples)
    val_photos, test_photos = PhotoCrops("val"), PhotoCrops(args.split)
    rows, chosen, luma = [], [], []
    for sigma in args.sigmas:
        level = dict(sigma=sigma)
        print(f"== noise sigma {sigma:g}, {args.images} crops of {args.size} px ({args.split} photographs)", flush=True)
        clean, noisy = held_out(test_photos, TEST_BASE, args.images, args.size, "noise", level)
        val_clean, val_noisy = held_out(val_photos, VAL_BASE, args.val_images, 64, "noise", level)
        if args.jpeg:  # the noisy crops as a camera or an upload keeps them: a JPEG file
            noisy, val_noisy = (jpeg(x, generator=0, quality=args.jpeg) for x in (noisy, val_noisy))
        name, fn, params, _ = classical.tune("noise", val_noisy, val_clean)
        T0s, strengths = zip(*[auto_T0(adaptive.meta, x) for x in noisy])
        chosen += list(zip(strengths, T0s))
        b = prompt_bridge(adaptive)
        methods = [("noisy input", noisy, ""), ("best classical filter", fn(noisy, **params),
                                                 classical.describe(name, params))]
        for fname, bank in fixed:
            fb = prompt_bridge(bank)
            methods.append((f"{fname} (fixed T0 {fb.T0:g})", restore_set(backbone, bank, fb, noisy, S, samples=K, spin=P), ""))
        methods.append((f"adaptive, default T0 {b.T0:.3g}", restore_set(backbone, adaptive, b, noisy, S, samples=K, spin=P),
                        "one T0 for all"))
        for T0 in args.grid:
            methods.append((f"adaptive at T0 {T0:g}", restore_set(backbone, adaptive, b.at(T0), noisy, S, samples=K,
                                                                  spin=P), "one T0 for all"))
        for cname, bank in compare:  # its own curve: T0 per image, the same crops, noise and sampler
            cT0s = [auto_T0(bank.meta, x)[0] for x in noisy]
            methods.append((f"{cname}, --t0 auto", restore_set(backbone, bank, prompt_bridge(bank), noisy, S, T0s=cT0s,
                                                              samples=K, spin=P), spread(cT0s)))
        if args.jpeg:  # the same prompt, its noise also read from luma at 2 x 2, which the JPEG encoder leaves
            lstrengths = rms_sigma(noisy).tolist()
            lT0s = [curve_T0(curve, v) for v in lstrengths]
            luma += list(zip(lstrengths, lT0s))
            methods.append(("adaptive, --t0 auto, luma read too", restore_set(
                backbone, adaptive, b, noisy, S, T0s=lT0s, samples=K, spin=P), spread(lT0s)))
        auto = restore_set(backbone, adaptive, b, noisy, S, T0s=T0s, samples=K, spin=P)
        methods.append(("adaptive, --t0 auto", auto, spread(T0s)))
        ref = psnr(auto, clean)
        for method, x, note in methods:
            p = psnr(x, clean)
            rows.append(dict(sigma=sigma, n=args.images, method=method, psnr=interval(p), ssim=interval(ssim(x, clean)),
                             dpsnr=interval(p - ref), note=note))
            print(f"  {method:32s} {rows[-1]['psnr'][0]:6.2f} dB  {rows[-1]['dpsnr'][0]:+.2f} +- {rows[-1]['dpsnr'][1]:.2f} vs auto",
                  flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(out / "adaptive.png", curve, chosen, rows, args.sigmas,
         [(name, json.loads(bank.meta["T0_curve"])) for name, bank in compare], args.split)
    lines = ["| sigma | method | PSNR (dB) | SSIM | PSNR - auto (dB) | notes |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sigma']:g} | {r['method']} | " + "{:.2f} ± {:.2f} | {:.3f} ± {:.3f} | ".format(
            *r["psnr"], *r["ssim"]) + ("" if r["method"] == "adaptive, --t0 auto" else "{:+.2f} ± {:.2f}".format(*r["dpsnr"]))
            + f" | {r['note']} |")
    targets = ["| sigma | auto - best fixed T0 (target: >= 0 within the interval) | auto - shipped (target >= +2 dB at "
               "0.05) |", "|---|---|---|"]
    grid_lines = ["| sigma | the prompt's best T0 of --grid | auto - it (dB) |", "|---|---|---|"]
    for sigma in args.sigmas:
        grid_rows = [r for r in rows if r["sigma"] == sigma and r["method"].startswith("adaptive at T0 ")]
        if grid_rows:
            g = max(grid_rows, key=lambda r: r["psnr"][0])
            grid_lines.append(f"| {sigma:g} | {g['method'][len('adaptive at T0 '):]} ({g['psnr'][0]:.2f} dB) | "
                              + "{:+.2f} ± {:.2f} |".format(-g["dpsnr"][0], g["dpsnr"][1]))
        fixed_rows = [r for r in rows if r["sigma"] == sigma and "fixed T0" in r["method"]]
        if not fixed_rows:
            continue
        best = max(fixed_rows, key=lambda r: r["psnr"][0])
        d, h = -best["dpsnr"][0], best["dpsnr"][1]
        cell = f"{d:+.2f} ± {h:.2f} vs {best['method']} ({'met' if d + h >= 0 else 'missed'})"
        ship = next((r for r in fixed_rows if r["method"].startswith(args.shipped + " ")), None)
        ship_cell = "" if ship is None else "{:+.2f} ± {:.2f}".format(-ship["dpsnr"][0], ship["dpsnr"][1]) + (
            f" ({'met' if -ship['dpsnr'][0] - ship['dpsnr'][1] >= 2 else 'missed'})" if sigma == 0.05 else "")
        targets.append(f"| {sigma:g} | {cell} | {ship_cell} |")
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    md = "\n".join([f"# Adaptive T0 on held-out {args.split} photographs" + (
                        f", noisy crops saved as JPEG quality {args.jpeg}" if args.jpeg else ""), "", f"Command: `{command}`", "",
                    f"Date: {when}; {cpu_name()}, {torch.get_num_threads()} threads; total {time.time() - start:.0f} s. "
                    f"Scored on crops of the {args.split} photographs: {', '.join(test_photos.names)}. Every learned "
                    f"row: the mean of {K} samples of {S} steps. " + " ".join(
                        f"Curve of {f}: " + ", ".join(f"{s:.3f} -> {T0:.2f}" for s, T0 in zip(c["strength"], c["T0"]))
                        + f" (measured with {curve_sampler(c)})." for f, c in
                        [(args.adaptive, curve)] + [(f, json.loads(bank.meta["T0_curve"])) for (_, f), (_, bank)
                                                    in zip(args.compare, compare)]), "",
                    "\n".join(lines), ""] + (["\n".join(targets), ""] if args.fixed else [])
                   + (["\n".join(grid_lines), ""] if args.grid else []))
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(dict(command=command, curve=curve, rows=rows, chosen=chosen,
                                                      **({"chosen_luma_read_too": luma} if args.jpeg else {})), indent=1))
    print("\n" + md)
    return 0


if __name__ == "__main__":
    run(main)
