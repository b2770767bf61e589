"""The tiny default on held-out natural photographs: does a learned prompt beat what a user would pick instead?

    python benchmarks/photos.py                                   # noise at sigma 0.05 / 0.1 / 0.2, 128 and 256 px
    python benchmarks/photos.py --degradations noise,lowlight,haze --prompt noise-t0.2=runs/noise-t0.2.safetensors

Test images are crops of the test-split photographs (photos.py; never seen in pre-training, prompt training or
tuning): crop i of a size is PhotoCrops("test").crop(default_rng([31, size, i]), size), a square from full detail
to the whole photo shrunk, degraded once with a generator seeded by (size, i). --split val scores the val
photographs instead, to choose a prompt's T0 without looking at the test set. For each degradation level and
size, PSNR and SSIM (mean and 95% interval, mean +- 1.96 std / sqrt(n)) of:

  degraded input
  best classical filter   classical.py; kind and strength tuned on --val-images crops of the val photographs
  BM3D (noise)            PyPI `bm3d` at the true sigma (bm3d_rgb), a baseline only (pip install bm3d)
  no prompt               the frozen model sampled with the EBR sampler from the shipped prompt's T0
  shipped prompt          weights/tiny/prompts/<degradation>.safetensors, exactly as `python sample.py` runs it
                          (its bridge from the file, its T0 or, with a T0 curve, --t0 auto per image; sample.py's
                          steps, samples and spin, 64 px tiles blended); "no prompt" uses the same T0s and sampler;
                          when sample.py's sampler is not the released one (1 sample of 20 steps), that too, and
                          with cycle spinning (--spin) the same sampler without it
  DnCNN                   with --dncnn-seconds S: dncnn.py trained from scratch for S seconds of wall clock on
                          exactly train.py's batches for the degradation (training photographs, 64 px, seed 0),
                          so with S = a prompt's training time the two are compared at equal cost
  --prompt NAME=FILE      any other prompt files (a T0 sweep, the baseline bridges), sampled the same way (with a
                          T0 curve: --t0 auto per image; NAME=FILE@SxK: S steps x K samples instead), each
                          scored on the degradation its file was trained for
Paired differences (same images, same sampler noise): every row minus the shipped prompt. The targets table reads
the issue's noise targets off them: shipped prompt - Gaussian filter >= 1 dB, shipped prompt - BM3D >= -2 dB. The
bridges table (the paper's bridge comparison) pairs every fixed-T0 EBR prompt with each fixed-T0 naive or DDBM prompt
of the same degradation, whatever their T0s (each bridge has its own best T0): EBR - baseline.
Outputs in --out: results.md, results.json, grid-<degradation>-<level>.png (one column per row of the table in its
order, the shipped prompt moved last, then clean; the first 4 crops of the smallest size).
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
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "benchmarks"))

import classical  # noqa: E402
import dncnn  # noqa: E402
import train  # noqa: E402
from replicate import interval, prompt_bridge, restore_set, save_grid  # noqa: E402
from minirestore import UserError  # noqa: E402
from minirestore.backbone import load_backbone  # noqa: E402
from minirestore.bridge import Bridge  # noqa: E402
from minirestore.cli import Help, run, spin_period  # noqa: E402
from minirestore.data import CleanPhotos  # noqa: E402
from minirestore.degrade import DEGRADATIONS  # noqa: E402
from minirestore.distributed import World  # noqa: E402
from minirestore.metrics import psnr, ssim  # noqa: E402
from minirestore.photos import PhotoCrops  # noqa: E402
from minirestore.prompts import load_prompt  # noqa: E402
from minirestore.strength import auto_T0  # noqa: E402
from sample import default_prompt, sampler_defaults  # noqa: E402

LEVELS = {  # degradation -> the test levels (inside the ranges train.py's prompts train on)
    "noise": [dict(sigma=0.05), dict(sigma=0.1), dict(sigma=0.2)],  # additive Gaussian, std of [0, 1]
    "blur": [dict(kind="gaussian", sigma=2.0)],
    "lowlight": [dict(exposure=0.2, gamma=1.5)],
    "haze": [dict(beta=1.5, airlight=0.85)],
    "jpeg": [dict(quality=20)],
    "rain": [dict(density=0.004, length=20.0, angle=10.0, opacity=0.7)],
    "snow": [dict(density=0.002, veil=0.12, opacity=0.85)],
}
TEST_BASE, VAL_BASE = 31, 37


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=Help)
    p.add_argument("--model", default="tiny", help="tiny or a backbone folder")
    p.add_argument("--degradations", default="noise", help=f"comma-separated, from {', '.join(LEVELS)}")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="photographs scored: test (the benchmark) or val (choosing T0 for a shipped prompt)")
    p.add_argument("--level", action="append", default=[], metavar="LABEL",
                   help="run only this test level, by its label (e.g. 'sigma 0.2'; repeatable; default: all)")
    p.add_argument("--sizes", default="128,256", help="crop sides in pixels")
    p.add_argument("--images", default="50,20", help="test crops per size (one number, or one per size)")
    p.add_argument("--val-images", type=int, default=20, help="val-photo crops (64 px) that tune the classical filters")
    p.add_argument("--prompt", action="append", default=[], metavar="NAME=FILE[@SxK]",
                   help="another prompt to evaluate; @SxK samples it with S steps x K samples instead of --steps/--samples")
    p.add_argument("--dncnn-seconds", type=float, default=0,
                   help="train and score a DnCNN for this many seconds per degradation (0: not run); cached in --out")
    p.add_argument("--steps", type=int, help="sampler steps of every learned row (default: sample.py's)")
    p.add_argument("--samples", type=int, help="restorations averaged per image (default: sample.py's)")
    p.add_argument("--spin", type=spin_period, help="cycle-spinning period of every learned row (sample.py --spin; "
                   "default: sample.py's)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "photos"), help="results and grids")
    p.add_argument("--device", default="cpu", help="torch device")
    args = p.parse_args(argv)
    args.degradations = [d.strip() for d in args.degradations.split(",") if d.strip()]
    for d in args.degradations:
        if d not in LEVELS:
            raise UserError(f"--degradations: {d!r} has no test levels; choose from {', '.join(LEVELS)}")
    known = [label(level) for d in args.degradations for level in LEVELS[d]]
    for want in args.level:
        if want not in known:
            raise UserError(f"--level {want!r} is not a test level of {','.join(args.degradations)}; "
                            f"choose from {', '.join(repr(k) for k in known)}")
    args.sizes = [int(s) for s in args.sizes.split(",")]
    images = [int(n) for n in str(args.images).split(",")]
    args.images = images * len(args.sizes) if len(images) == 1 else images
    if len(args.images) != len(args.sizes) or min(args.images) < 2:
        raise UserError("--images: one count (>= 2, an interval needs two) or one per --sizes entry")
    args.prompt = [tuple(s.split("=", 1)) for s in args.prompt]
    if any(len(x) != 2 for x in args.prompt):
        raise UserError("--prompt takes NAME=FILE, e.g. noise-t0.2=runs/noise-t0.2.safetensors")
    args.prompt = [(name, *prompt_sampler(spec)) for name, spec in args.prompt]
    return args


def prompt_sampler(spec):
    """FILE or FILE@SxK -> (FILE, (S, K) or None): a --prompt row's own sampler (S steps, mean of K samples)."""
    path, _, sampler = spec.rpartition("@") if "@" in spec else (spec, "", "")
    if not sampler:
        return path, None
    try:
        steps, samples = (int(v) for v in sampler.split("x"))
    except ValueError:
        raise UserError(f"--prompt ...@{sampler}: the sampler is STEPSxSAMPLES, e.g. @5x4") from None
    if min(steps, samples) < 1:
        raise UserError(f"--prompt ...@{sampler}: steps and samples must be at least 1")
    return path, (steps, samples)


def load_prompts(args, backbone):
    """--prompt entries -> (name, path, PromptBank, sampler); each is scored on its file's degradation."""
    banks = [(name, path, load_prompt(path, backbone=backbone.name, D=backbone.D, n_blocks=backbone.n_blocks), sampler)
             for name, path, sampler in args.prompt]
    for name, path, bank, _ in banks:
        if bank.meta.get("degradation") not in args.degradations:
            raise UserError(f"--prompt {name}={path}: trained for {bank.meta.get('degradation')!r}, which is not "
                            f"in --degradations {','.join(args.degradations)}")
    return banks


def held_out(photos, base, n, size, degradation, level):
    """n crops [n, 3, size, size] and their degraded versions, each a function of (base, size, i) only."""
    clean = torch.stack([photos.crop(np.random.default_rng([base, size, i]), size) for i in range(n)])
    degraded = torch.cat([DEGRADATIONS[degradation](clean[i:i + 1], generator=base * 1_000_003 + size * 1_000 + i,
                                                    **level) for i in range(n)])
    return clean, degraded


def bm3d_rows(degraded, sigma):
    """BM3D at the true sigma (bm3d_rgb), or None with the reason when the package is missing."""
    try:
        import bm3d
    except ImportError:
        return None, "not run: pip install bm3d"
    out = [torch.from_numpy(np.ascontiguousarray(bm3d.bm3d_rgb(x.permute(1, 2, 0).numpy(), sigma))).permute(2, 0, 1)
           for x in tqdm(degraded, desc="BM3D", leave=False)]
    return torch.stack(out).float().clamp(0, 1), f"bm3d_rgb at the true sigma {sigma:g}"


def train_dncnn(args, degradation):
    """The DnCNN for one degradation, trained on train.py's batches for --dncnn-seconds; cached in --out."""
    path = Path(args.out) / "dncnn" / f"{degradation}-{args.dncnn_seconds:g}s.pt"
    if path.exists():
        model, info = dncnn.load(path)
        return model, info
    photos = CleanPhotos("train", train.PHOTO_ITEMS, degradation, 64, seed=0)
    next_batch = lambda step: train.batch_at(photos, step, 8, 0, World())[:2]  # noqa: E731
    print(f"== training the DnCNN for {degradation}: {args.dncnn_seconds:g} s", flush=True)
    model, steps, seconds = dncnn.train_dncnn(next_batch, args.dncnn_seconds, dncnn.DnCNNConfig(batch_size=8))
    path.parent.mkdir(parents=True, exist_ok=True)
    dncnn.save(model, path, steps=steps, seconds=seconds)
    return model, dict(steps=steps, seconds=seconds)


def label(level):
    return " ".join(f"{k} {v:g}" if not isinstance(v, str) else v for k, v in level.items())


def evaluate(args, backbone, degradation, level, size, n, val_photos, test_photos):
    """All rows for one (degradation, level, size) -> (rows, grid columns)."""
    clean, degraded = held_out(test_photos, TEST_BASE, n, size, degradation, level)
    val_clean, val_degraded = held_out(val_photos, VAL_BASE, args.val_images, 64, degradation, level)
    name, fn, params, _ = classical.tune(degradation, val_degraded, val_clean)
    methods = [("degraded input", degraded, label(level)),
               ("best classical filter", fn(degraded, **params), f"{classical.describe(name, params)}, tuned on "
                                                                 f"{args.val_images} val crops")]
    if degradation == "noise":
        x, note = bm3d_rows(degraded, level["sigma"])
        if x is not None:
            methods.append(("BM3D", x, note))
    if args.dncnn_seconds > 0:
        model, info = train_dncnn(args, degradation)
        with torch.no_grad():
            x = torch.cat([model(degraded[i:i + 8]) for i in range(0, n, 8)]).clamp(0, 1)
        methods.append(("DnCNN", x, f"{info['steps']} steps in {info['seconds']:.0f} s, trained from scratch"))
    shipped = load_prompt(default_prompt(backbone.name, degradation), backbone=backbone.name, D=backbone.D,
                          n_blocks=backbone.n_blocks)
    bridge = prompt_bridge(shipped)
    T0s = [auto_T0(shipped.meta, x)[0] for x in degraded] if "T0_curve" in shipped.meta else None  # --t0 auto
    S, K, P = args.steps, args.samples, args.spin
    none = restore_set(backbone, None, Bridge("ebr", bridge.T0), degraded, S, T0s=T0s, samples=K, spin=P)
    T0 = f"T0 {bridge.T0:g}" if T0s is None else f"auto T0 {np.mean(T0s):.2f} ± {np.std(T0s):.2f}"
    methods.append((f"no prompt ({T0})", none, "frozen model, EBR sampler"))
    if (S, K) != (20, 1):  # the released sampler, for reference
        methods.append((f"shipped prompt, 1 sample of 20 steps ({T0})",
                        restore_set(backbone, shipped, bridge, degraded, 20, T0s=T0s), "the released sampler"))
    if P and K > 1:  # the same sampler without cycle spinning, for reference
        methods.append((f"shipped prompt, no cycle spinning ({T0})",
                        restore_set(backbone, shipped, bridge, degraded, S, T0s=T0s, samples=K), "--spin 0"))
    restored = restore_set(backbone, shipped, bridge, degraded, S, T0s=T0s, samples=K, spin=P)
    methods.append((f"shipped prompt ({bridge.kind}, {T0})", restored,
                    f"what sample.py runs: mean of {K} samples of {S} steps" + (f", spin {P}" if P else "")))
    learned = [] if T0s is not None else [(bridge.kind, bridge.T0, len(methods) - 1)]  # fixed-T0 prompts
    for name, path, bank, sampler in args.prompt:
        if bank.meta.get("degradation") != degradation:
            continue  # a prompt is scored on the degradation it was trained for
        b, (s, k) = prompt_bridge(bank), sampler or (S, K)
        own = [auto_T0(bank.meta, x)[0] for x in degraded] if "T0_curve" in bank.meta else None  # as sample.py
        when = f"T0 {b.T0:g}" if own is None else f"auto T0 {np.mean(own):.2f}"
        kind = b.kind + (f", {b.x0} estimate" if b.x0 != "ypt" else "")
        methods.append((f"{name} ({kind}, {when}" + (f", {k} x {s} steps)" if sampler else ")"),
                        restore_set(backbone, bank, b, degraded, s, T0s=own, samples=k, spin=P), str(path)))
        if own is None and b.x0 == "ypt":  # the bridge comparison holds the estimate fixed, as the paper does
            learned.append((b.kind, b.T0, len(methods) - 1))
    ref = psnr(restored, clean)
    rows, scores = [], [psnr(x, clean) for _, x, _ in methods]
    for (method, x, note), p in zip(methods, scores):
        rows.append(dict(degradation=degradation, level=label(level), size=size, n=n, method=method,
                         psnr=interval(p), ssim=interval(ssim(x, clean)), dpsnr=interval(p - ref), note=note,
                         reference=x is restored))
    bridges = [dict(degradation=degradation, level=label(level), size=size, n=n, **pair)
               for pair in bridge_pairs(learned, methods, scores)]
    grid = [x for method, x, _ in methods if x is not restored] + [restored, clean]  # the shipped prompt last
    return rows, bridges, grid


def bridge_pairs(learned, methods, scores):
    """The paper's bridge comparison (its Table 5), paired on the same crops: every EBR prompt minus every
    baseline (naive, DDBM) prompt, whatever their T0s, since each bridge has its own best horizon.
    learned: (kind, T0, index into methods and scores) of the fixed-T0 prompts."""
    return [dict(T0=T0, baseline_T0=T, baseline=kind, ebr=methods[i][0], other=methods[j][0],
                 dpsnr=interval(scores[i] - scores[j]))
            for ebr_kind, T0, i in learned if ebr_kind == "ebr"
            for kind, T, j in learned if kind != "ebr"]


def table(rows):
    lines = ["| degradation | size | method | PSNR (dB) | SSIM | PSNR - shipped prompt (dB) | notes |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['degradation']} {r['level']} | {r['size']} (n {r['n']}) | {r['method']} | "
                     "{:.2f} ± {:.2f} | {:.3f} ± {:.3f} | ".format(*r["psnr"], *r["ssim"])
                     + ("" if r.get("reference") else "{:+.2f} ± {:.2f}".format(*r["dpsnr"]))
                     + f" | {r['note']} |")
    return "\n".join(lines)


def targets(rows):
    """The issue's noise targets from the paired differences: prompt - filter >= 1 dB, prompt - BM3D >= -2 dB."""
    if not any(r["degradation"] == "noise" for r in rows):
        return ""
    lines = ["| noise | size | shipped prompt - best classical (target >= +1 dB) | shipped prompt - BM3D "
             "(target >= -2 dB) |", "|---|---|---|---|"]
    for r in rows:
        if r["degradation"] == "noise" and r["method"] == "best classical filter":
            bm = next((x for x in rows if x["method"] == "BM3D" and (x["level"], x["size"]) == (r["level"], r["size"])),
                      None)
            cells = []
            for other, need in ((r, 1.0), (bm, -2.0)):
                if other is None:
                    cells.append("not run")
                    continue
                mean, half = -other["dpsnr"][0], other["dpsnr"][1]
                cells.append(f"{mean:+.2f} ± {half:.2f} ({'met' if mean - half >= need else 'missed'})")
            lines.append(f"| {r['level']} | {r['size']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(mean, half):
    """A paired difference's 95% interval read as: ahead (yes), behind (no) or a tie."""
    return "yes" if mean - half > 0 else "no" if mean + half < 0 else "tie (interval spans 0)"


def bridge_table(bridges):
    """EBR - naive and EBR - DDBM, every pair (paired PSNR differences); empty without baseline prompts."""
    if not bridges:
        return ""
    lines = ["| degradation | size | T0: EBR / baseline | EBR prompt | baseline prompt | EBR - baseline, PSNR (dB) | "
             "EBR ahead? |", "|---|---|---|---|---|---|---|"]
    for r in bridges:
        mean, half = r["dpsnr"]
        lines.append(f"| {r['degradation']} {r['level']} | {r['size']} (n {r['n']}) | {r['T0']:g} / "
                     f"{r['baseline_T0']:g} | {r['ebr']} | {r['other']} | {mean:+.2f} ± {half:.2f} | "
                     f"{verdict(mean, half)} |")
    return "\n".join(lines)


def main(argv=None):
    command = ("python benchmarks/photos.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    args = parse_args(argv)
    start = time.time()
    torch.manual_seed(0)
    backbone = load_backbone(args.model, args.device, torch.float32)
    val_photos, test_photos = PhotoCrops("val"), PhotoCrops(args.split)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.prompt = load_prompts(args, backbone)
    args.steps, args.samples, args.spin = sampler_defaults(backbone.name, args.steps, args.samples, spin=args.spin)
    rows, bridges = [], []
    for degradation in args.degradations:
        for level in [v for v in LEVELS[degradation] if not args.level or label(v) in args.level]:
            for size, n in zip(args.sizes, args.images):
                print(f"== {degradation} {label(level)}, {n} crops of {size} px", flush=True)
                r, b, columns = evaluate(args, backbone, degradation, level, size, n, val_photos, test_photos)
                rows, bridges = rows + r, bridges + b
                if size == min(args.sizes):
                    save_grid(columns, out / f"grid-{degradation}-{label(level).replace(' ', '')}.png")
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    md = "\n".join(["# The tiny default on held-out photographs", "", f"Command: `{command}`", "",
                    f"Date: {when}; device: {args.device}, {torch.get_num_threads()} threads; total "
                    f"{time.time() - start:.0f} s. Scored on the {args.split} photographs: {', '.join(test_photos.names)}.", "",
                    table(rows), "", targets(rows), "", bridge_table(bridges), ""])
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(dict(command=command, rows=rows, bridges=bridges), indent=1))
    print("\n" + md)
    return 0


if __name__ == "__main__":
    run(main)
