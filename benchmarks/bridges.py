"""The paper's bridge comparison with each bridge tuned as a user would tune it: EBR against the naive and DDBM
baselines on held-out photographs, every bridge at its own best T0 and sampler.

    python benchmarks/bridges.py --degradations noise,blur,lowlight,haze --sizes 128 --images 50 \
        benchmarks/photos/prompts/{noise,blur,lowlight,haze}-*t0.*.safetensors weights/tiny/prompts/*.safetensors

photos.py's bridges table pairs prompts at the same T0: does the bridge help at a given horizon? This asks the
question a user has: which bridge gives the better restorer? A bridge's best horizon is its own (DDBM's states
depend on t / T0 only, so its T0 does not matter at all; EBR and naive start from the same X_T0 but train on
different states), and so is its best sampler (one step is all DDBM cannot do: its single query sits at t_min).

Protocol. Candidates: the given prompt files (each read for its degradation, bridge and fixed T0; prompts
trained over a T0 range, and prompts trained with E-Bridge's clean estimate (`train.py --x0 ebridge`), are left
out: the comparison holds the estimate fixed at YPT's, as the paper does, and as photos.py's bridges table
does), each with every --samplers entry (S steps x mean of K samples, 20 evaluations each by default). For
every (degradation, level, bridge) the candidate with the best mean PSNR on --val-images crops of the val
photographs (64 px, photos.py's val crops) is that bridge's pick. The picks are scored on the test crops
(photos.py's, same degradation draw and sampler noise), and the table gives EBR - naive and EBR - DDBM,
paired, with 95% intervals. Only files trained the same way apart from bridge and T0 (train.py's defaults)
make a fair field: pass --pow, --lr and the like variants to none of them or to all.
Outputs in --out: results.md, results.json, grid-<degradation>-<level>.png (degraded | naive | DDBM | EBR | clean).
"""
import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "benchmarks"))

from photos import LEVELS, TEST_BASE, VAL_BASE, held_out, label, verdict  # noqa: E402
from replicate import interval, prompt_bridge, restore_set, save_grid  # noqa: E402
from sample import sampler_defaults  # noqa: E402
from minirestore import UserError  # noqa: E402
from minirestore.backbone import load_backbone  # noqa: E402
from minirestore.bridge import KINDS  # noqa: E402
from minirestore.cli import Help, run, spin_period  # noqa: E402
from minirestore.metrics import psnr  # noqa: E402
from minirestore.photos import PhotoCrops  # noqa: E402
from minirestore.prompts import load_prompt  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=Help)
    p.add_argument("prompts", nargs="+", help="candidate prompt files (fixed T0; any bridge, any degradation)")
    p.add_argument("--degradations", default="noise,blur,lowlight,haze", help=f"comma-separated, from {', '.join(LEVELS)}")
    p.add_argument("--samplers", default="1x20,5x4,20x1", help="STEPSxSAMPLES entries every candidate is tried with")
    p.add_argument("--spin", type=spin_period, help="cycle-spinning period of every sampler (sample.py --spin; default: "
                   "sample.py's for the backbone; it shifts samples 2..K, so a 1-sample sampler is unchanged)")
    p.add_argument("--val-images", type=int, default=24, help="val-photo crops (64 px) that pick each bridge's candidate")
    p.add_argument("--sizes", default="128", help="test crop sides in pixels")
    p.add_argument("--images", type=int, default=50, help="test crops per size")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "photos" / "bridges"), help="results and grids")
    p.add_argument("--device", default="cpu", help="torch device")
    args = p.parse_args(argv)
    args.degradations = args.degradations.split(",")
    for d in args.degradations:
        if d not in LEVELS:
            raise UserError(f"--degradations: {d!r} has no test levels; choose from {', '.join(LEVELS)}")
    try:
        args.samplers = [tuple(int(v) for v in s.split("x")) for s in args.samplers.split(",")]
    except ValueError:
        raise UserError(f"--samplers {args.samplers!r}: give STEPSxSAMPLES entries, e.g. 1x20,5x4") from None
    if any(len(s) != 2 or min(s) < 1 for s in args.samplers):
        raise UserError("--samplers: every entry is STEPSxSAMPLES with both at least 1, e.g. 1x20")
    args.sizes = [int(s) for s in args.sizes.split(",")]
    if args.images < 2 or args.val_images < 2:
        raise UserError("--images and --val-images must be at least 2 (an interval needs two)")
    return args


def candidates(args, backbone):
    """{(degradation, bridge kind): [(name, bank, bridge)]} for the fixed-T0 prompt files among args.prompts."""
    found = {}
    for path in dict.fromkeys(args.prompts):  # unique, in order
        if not Path(path).is_file():
            raise UserError(f"{path}: no such prompt file")
        bank = load_prompt(path, backbone=backbone.name, D=backbone.D, n_blocks=backbone.n_blocks)
        if "T0_range" in bank.meta or bank.meta.get("degradation") not in args.degradations:
            continue
        bridge = prompt_bridge(bank)
        if bridge.x0 != "ypt":
            print(f"{path}: left out, trained with the {bridge.x0} estimate (the comparison holds YPT's fixed)")
            continue
        found.setdefault((bank.meta["degradation"], bridge.kind), []).append((Path(path).name, bank, bridge))
    for d in args.degradations:
        missing = [k for k in KINDS if (d, k) not in found]
        if missing:
            raise UserError(f"{d}: no fixed-T0 prompt file trained with the {', '.join(missing)} bridge among the "
                            f"given files; train one with python train.py --degradation {d} --bridge KIND")
    return found


def pick(args, backbone, options, clean, degraded):
    """The (name, bank, bridge, sampler) with the best mean val PSNR, and every candidate's score."""
    scores = []
    for name, bank, bridge in options:
        for steps, samples in args.samplers:
            x = restore_set(backbone, bank, bridge, degraded, steps, samples=samples, spin=args.spin)
            scores.append((psnr(x, clean).mean().item(), name, bank, bridge, (steps, samples)))
    best = max(scores, key=lambda s: s[0])
    return best[1:], [(name, bridge.T0, sampler, p) for p, name, _, bridge, sampler in scores]


def main(argv=None):
    command = ("python benchmarks/bridges.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    args = parse_args(argv)
    start = time.time()
    backbone = load_backbone("tiny", args.device, torch.float32)
    args.spin = sampler_defaults(backbone.name, spin=args.spin)[2]
    found = candidates(args, backbone)
    val_photos, test_photos = PhotoCrops("val"), PhotoCrops("test")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    val_rows, rows = [], []
    for d in args.degradations:
        for level in LEVELS[d]:
            val_clean, val_degraded = held_out(val_photos, VAL_BASE, args.val_images, 64, d, level)
            picks = {}
            for kind in tqdm(KINDS, desc=f"val {d} {label(level)}"):
                picks[kind], scored = pick(args, backbone, found[(d, kind)], val_clean, val_degraded)
                val_rows += [dict(degradation=d, level=label(level), bridge=kind, prompt=n, T0=T0, sampler=s, psnr=p,
                                  picked=n == picks[kind][0] and s == picks[kind][3]) for n, T0, s, p in scored]
            for size in args.sizes:
                clean, degraded = held_out(test_photos, TEST_BASE, args.images, size, d, level)
                restored = {kind: restore_set(backbone, bank, bridge, degraded, s, samples=k, spin=args.spin)
                            for kind, (_, bank, bridge, (s, k)) in picks.items()}
                p = {kind: psnr(x, clean) for kind, x in restored.items()}
                rows.append(dict(degradation=d, level=label(level), size=size, n=args.images,
                                 degraded=interval(psnr(degraded, clean)),
                                 picks={k: dict(prompt=v[0], T0=v[2].T0, sampler=v[3], psnr=interval(p[k]))
                                        for k, v in picks.items()},
                                 ebr_minus={k: interval(p["ebr"] - p[k]) for k in KINDS if k != "ebr"}))
                if size == min(args.sizes):
                    save_grid([degraded, restored["naive"], restored["ddbm"], restored["ebr"], clean],
                              out / f"grid-{d}-{label(level).replace(' ', '')}.png")
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    md = "\n".join(["# Bridges, each at its own best T0 and sampler", "", f"Command: `{command}`", "",
                    f"Date: {when}; device: {args.device}, {torch.get_num_threads()} threads; cycle spinning "
                    f"{args.spin or 'off'}; total "
                    f"{time.time() - start:.0f} s. Picked on {args.val_images} val crops (64 px), scored on "
                    f"{args.images} test crops of {', '.join(test_photos.names)}.", "",
                    test_table(rows), "", val_table(val_rows), ""])
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(dict(command=command, rows=rows, val=val_rows), indent=1))
    print("\n" + md)
    return 0


def test_table(rows):
    lines = ["| degradation | size | degraded | naive (pick) | DDBM (pick) | EBR (pick) | EBR - naive | EBR - DDBM |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r['picks'][k]['psnr'][0]:.2f} ({r['picks'][k]['prompt'].removesuffix('.safetensors')}, "
                 "{}x{})".format(*r["picks"][k]["sampler"]) for k in ("naive", "ddbm", "ebr")]
        diffs = ["{:+.2f} ± {:.2f} ({})".format(*r["ebr_minus"][k], verdict(*r["ebr_minus"][k])) for k in ("naive", "ddbm")]
        lines.append(f"| {r['degradation']} {r['level']} | {r['size']} (n {r['n']}) | {r['degraded'][0]:.2f} | "
                     + " | ".join(cells + diffs) + " |")
    return "\n".join(lines)


def val_table(val_rows):
    lines = ["Every candidate on the val crops (mean PSNR, dB; **picked**):", "",
             "| degradation | bridge | prompt | T0 | sampler | PSNR |", "|---|---|---|---|---|---|"]
    for r in val_rows:
        p = f"**{r['psnr']:.2f}**" if r["picked"] else f"{r['psnr']:.2f}"
        lines.append(f"| {r['degradation']} {r['level']} | {r['bridge']} | {r['prompt']} | {r['T0']:g} | "
                     "{}x{} | ".format(*r["sampler"]) + p + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    run(main)
