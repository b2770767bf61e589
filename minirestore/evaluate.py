"""Score restorations against their references: the paper's tables from its test lists, or your own pairs.

    python -m minirestore.evaluate pairs/                    # clean/ + degraded/, the tiny default's noise prompt
    python -m minirestore.evaluate YPT/test_img_jsons/HazeRD.json YPT/test_img_jsons/CDD_haze_snow.json \\
        --root YPT --model flux-dev --protocol ypt --prompt haze=flux_haze.safetensors --prompt snow=flux_snow.safetensors

Each test item (testsets.py) is restored with the prompt(s) of its degradation (restore.py, the code
sample.py runs), scored, and written as one JSON line to OUT/rows.jsonl; `--save` also keeps the
restored image. The per-dataset means go to OUT/table.md and OUT/table.json, one row per test set as
in the paper's tables (dataset, degradation, count, PSNR, SSIM, LPIPS, DISTS, MUSIQ, CLIPIQA+). A rerun
with the same settings skips what is already scored, so an interrupted run resumes. Under torchrun each
process restores its share of the items and writes its own rows file; rank 0 writes the table once.

What is scored. Native protocol: the restored image as saved (8-bit, rounded) against the reference,
both at the input's own size, so a --save'd PNG scores exactly what the table says. `--protocol ypt`
(protocol.py): the float output and the resized reference, both bicubic to 512 x 512, as the release
scores. PSNR and SSIM are scikit-image's on RGB (metrics.py); `--y` adds them on BT.601 luma. LPIPS,
DISTS, MUSIQ and CLIPIQA+ come from torchmetrics / pyiqa when installed (perceptual.py), else are skipped
with one line. Clips are scored frame by frame and averaged over their frames.
"""
import argparse
import json
import os
from pathlib import Path

import torch

from . import UserError, perceptual, protocol
from .backbone import load_backbone
from .cli import Help, run, spin_period
from .data import load_image, save_image
from .distributed import barrier, close, init
from .files import atomic_write
from .metrics import psnr, ssim, to_y
from .restore import at_input, bridge_for, default_prompt, load_prompts, restore, sampler_defaults, tile_for
from .testsets import canonical, collect

BUILT_IN = ("psnr", "ssim")
HEADERS = {"psnr": "PSNR ↑", "ssim": "SSIM ↑", "psnr_y": "PSNR-Y ↑", "ssim_y": "SSIM-Y ↑", "lpips": "LPIPS ↓",
           "dists": "DISTS ↓", "musiq": "MUSIQ ↑", "clipiqa+": "CLIPIQA+ ↑"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m minirestore.evaluate", description=__doc__.split("\n")[0], formatter_class=Help)
    p.add_argument("sources", nargs="+", help="paired folders (clean/ + degraded/ or gt/ + input/), folders of them, "
                   "or the official JSON test lists")
    p.add_argument("--model", default="tiny", help="backbone name or folder (as sample.py)")
    p.add_argument("--prompt", action="append", metavar="[NAME=]FILE", help="prompt file for a degradation (haze=FILE; "
                   "the lists' names are matched case-insensitively, LowLight/Low-light -> lowlight) or a dataset "
                   "(CDD_haze_snow=FILE); repeat a name to mix prompts. Plain FILEs restore every item (several: a mix). "
                   "Default: weights/<model>-<degradation>.safetensors, else the shipped prompt")
    p.add_argument("--degradation", default="noise", help="the degradation of paired folders")
    p.add_argument("--root", default=".", help="the folder the JSON lists' paths start from")
    p.add_argument("--out", default="eval", help="output folder: rows.jsonl, table.md, table.json, restored/")
    p.add_argument("--save", action="store_true", help="keep the restored images in OUT/restored/<dataset>/")
    p.add_argument("--protocol", choices=("native", "ypt"), default="native", help="native: the input's own size, "
                   "posterior mean, continuous time; ypt: the released inference protocol (protocol.py)")
    p.add_argument("--metrics", default="psnr,ssim,lpips,dists,musiq,clipiqa+", help="comma-separated")
    p.add_argument("--y", action="store_true", help="also PSNR and SSIM on the BT.601 luma channel")
    p.add_argument("--t0", type=float, help="start level T0 (default: each prompt's own, or per input for prompts "
                   "with a T0 curve; 0.4 with --protocol ypt)")
    p.add_argument("--steps", type=int, help="sampler steps (default: sample.py's, 20 with --protocol ypt)")
    p.add_argument("--samples", type=int, help="restorations averaged per input (default: sample.py's, 1 with "
                   "--protocol ypt)")
    p.add_argument("--spin", type=spin_period, help="native protocol, tiles: cycle spinning period in pixels (sample.py "
                   "--spin; default: sample.py's, 0 with --protocol ypt)")
    p.add_argument("--frames", type=int, default=protocol.FRAMES, help="clips: score the first this many frames")
    p.add_argument("--tile", type=int, help="native protocol: tile size (default: 64 for tiny, off otherwise)")
    p.add_argument("--seed", type=int, default=0, help="native protocol: the start noise's seed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="weights' dtype (default: bf16 on CUDA, fp16 "
                   "with --protocol ypt; fp32 on CPU)")
    args = p.parse_args(argv)
    args.metrics = [m.strip().lower() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in args.metrics if m not in BUILT_IN + perceptual.NAMES]
    if unknown:
        raise UserError(f"unknown metric {unknown[0]!r}: choose from {', '.join(BUILT_IN + perceptual.NAMES)}")
    if min(args.steps or 1, args.samples or 1, args.frames) < 1:
        raise UserError("--steps, --samples and --frames must be at least 1")
    if args.t0 is not None and not 0 < args.t0 <= 1:
        raise UserError(f"--t0 must be in (0, 1], got {args.t0}")
    return args


# -- prompts per item ----------------------------------------------------------------------------------

def prompt_files(items, specs, model):
    """-> {item key: tuple of prompt files}. Named specs by dataset first, then by the item's degradations."""
    plain, named = [], {}
    for spec in specs or []:
        name, sep, file = spec.partition("=")
        if sep and "/" not in name and os.sep not in name:
            named.setdefault(canonical(name), []).append(file)
        else:
            plain.append(spec)
    if plain and named:
        raise UserError("pass either plain --prompt FILE (for every item) or named ones (--prompt haze=FILE), not both")
    files, missing = {}, {}
    for it in items:
        if plain:
            files[it.key] = tuple(plain)
            continue
        if it.dataset.lower() in named:
            files[it.key] = tuple(named[it.dataset.lower()])
            continue
        needs = it.prompts or (it.degradation,)
        have = [named[d] if d in named else [default_prompt(model, d)] if not named else None for d in needs]
        if any(f is None or not Path(f[0]).is_file() for f in have):
            missing.setdefault(it.dataset, [d for d, f in zip(needs, have) if f is None or not Path(f[0]).is_file()])
            continue
        files[it.key] = tuple(f for fs in have for f in fs)
    if missing:
        ds, degs = next(iter(missing.items()))
        raise UserError(f"no prompt for {'+'.join(degs) or 'an unnamed degradation'} (dataset {ds}"
                        f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}): pass --prompt "
                        f"{degs[0] if degs else ds}=FILE")
    return files


# -- inputs, scores, outputs ---------------------------------------------------------------------------

def load(paths, clip, ypt_size, frames):
    """An image [3, H, W] or a clip [T, 3, H, W] in [0, 1], natively or as the release loads it."""
    if not clip:
        return load_image(paths)[0] if ypt_size is None else protocol.load_resized(paths, ypt_size)
    paths = paths[:frames]
    return torch.stack([load_image(p)[0] if ypt_size is None else protocol.load_resized(p, ypt_size) for p in paths])


def scores(pred, gt, names, y, fns):
    """pred, gt [N, 3, H, W] in [0, 1] (gt None: no reference) -> {metric: mean over the N frames}."""
    out = {}
    if gt is not None:
        for name, fn in (("psnr", psnr), ("ssim", ssim)):
            if name in names:
                out[name] = float(fn(pred, gt).mean())
                if y:
                    out[f"{name}_y"] = float(fn(to_y(pred), to_y(gt)).mean())
    return {**out, **perceptual.score(fns, pred, gt)}


def short_names(keys):
    """The fewest trailing path parts that tell the keys apart: 'a/x/1.jpg', 'a/y/1.jpg' -> 'x_1', 'y_1'."""
    for n in range(1, 1 + max(len(Path(k).parts) for k in keys)):
        names = ["_".join(Path(k).with_suffix("").parts[-n:]) for k in keys]
        if len(set(names)) == len(names):
            return dict(zip(keys, names))
    return {k: k.replace("/", "_") for k in keys}


def save_output(pred, dst, clip, ypt, frame_names):
    """The restored image (or frames) as scored: rounded 8-bit PNG natively, truncated JPEG with ypt."""
    ext = ".jpg" if ypt else ".png"
    targets = [(pred[i], dst / f"{Path(n).stem}{ext}") for i, n in enumerate(frame_names)] if clip else [(pred, dst.with_suffix(ext))]
    targets[0][1].parent.mkdir(parents=True, exist_ok=True)
    for x, path in targets:
        protocol.save_jpeg(x, path) if ypt else save_image(x, path)
    return str(dst if clip else targets[0][1])


def read_rows(out):
    """Every complete row written so far (all ranks' files); a line cut by a crash is ignored (redone)."""
    rows = {}
    for f in sorted(out.glob("rows*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                r = json.loads(line)
                rows[(r["dataset"], r["key"])] = r
            except (ValueError, KeyError):
                pass
    return rows


def table(rows, order, metrics, skipped, settings):
    """Per-dataset means -> (markdown, json object), datasets in the order of the lists."""
    groups = {}
    for r in rows:
        groups.setdefault(r["dataset"], []).append(r)
    cols = [m for m in HEADERS if any(m in r for r in rows)]
    out = []
    for ds in [d for d in order if d in groups]:
        g = groups[ds]
        row = {"dataset": ds, "degradation": g[0]["degradation"], "count": len(g)}
        for m in cols:
            vals = [r[m] for r in g if m in r]
            row[m] = sum(vals) / len(vals) if vals else None
        out.append(row)
    fmt = lambda m, v: "–" if v is None else f"{v:.2f}" if m.startswith("psnr") or m == "musiq" else f"{v:.4f}"  # noqa: E731
    lines = [f"{settings['model']}, protocol {settings['protocol']}, {settings['steps']} steps x {settings['samples']} samples"
             + (f", spin {settings['spin']}" if settings.get("spin") else ""), "",
             "| Dataset | Degradation | Count | " + " | ".join(HEADERS[m] for m in cols) + " |",
             "|---|---|---:|" + "---:|" * len(cols)]
    lines += [f"| {r['dataset']} | {r['degradation']} | {r['count']} | " + " | ".join(fmt(m, r[m]) for m in cols) + " |"
              for r in out]
    lines += [""] + [f"{m}: skipped, {why}" for m, why in skipped.items()]
    return "\n".join(lines).rstrip() + "\n", {"settings": settings, "datasets": out, "skipped": skipped}


def drop_partial_line(path):
    """A crash can cut the last row in half: cut it off, so that new rows start on a line of their own."""
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)


# -- the loop --------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    world = init(args.device)
    args.device = world.device(args.device)
    ypt = args.protocol == "ypt"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or (("fp16" if ypt else "bf16") if args.device.startswith("cuda") else "fp32")]
    items = collect(args.sources, args.root, args.degradation)
    out = Path(args.out)
    # steps, samples and spin as given (None: sample.py's defaults for the backbone, resolved once it is loaded)
    settings = {"model": str(args.model), "protocol": args.protocol, "steps": args.steps, "samples": args.samples,
                "spin": args.spin, "t0": args.t0, "seed": args.seed,
                "frames": args.frames, "tile": args.tile, "dtype": str(dtype).split(".")[-1],
                "metrics": args.metrics, "y": args.y}
    old = json.loads((out / "settings.json").read_text()) if (out / "settings.json").exists() else None
    diff = ", ".join(f"{k} {old[k] if k in old else '(not recorded)'} -> {v}" for k, v in settings.items()
                     if k not in old or old[k] != v) if old is not None else ""
    if diff:  # a resume must score the rest as the rows it keeps were scored (by code that recorded every setting)
        raise UserError(f"{out} holds rows scored with other settings ({diff}): pass another --out, or the same flags")
    backbone = load_backbone(args.model, args.device, dtype)
    steps, samples, spin = sampler_defaults(backbone.name, args.steps, args.samples, ypt, args.spin)  # as sample.py does
    tile = tile_for(backbone.name, args.tile, ypt, args.spin)
    if backbone.kind == "flux" and any(it.clip for it in items):
        raise UserError(f"{backbone.name} restores images; the video lists need a Wan backbone (--model wan2.1-t2v-1.3b)")
    files = prompt_files(items, args.prompt, backbone.name)
    sets = {}  # prompt files -> (prompts, bridge, auto): each set loaded once
    for fs in dict.fromkeys(files.values()):
        prompts = load_prompts(backbone, fs)
        sets[fs] = (prompts, *bridge_for(prompts, 0.4 if ypt and args.t0 is None else args.t0, fs[0]))
    if world.main:  # everything checked: now the output folder
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "settings.json", lambda tmp: tmp.write_text(json.dumps(settings, indent=1) + "\n"))
    barrier(world)
    done = read_rows(out)
    todo = [it for it in items if (it.dataset, it.key) not in done]
    mine = {(it.dataset, it.key) for it in todo[world.rank::world.size]}  # every item scored by one process
    fns, skipped = perceptual.load([m for m in args.metrics if m in perceptual.NAMES], backbone.device)
    if world.main:
        print(f"{len(items)} items in {len({it.dataset for it in items})} test sets; {len(done)} already scored in {out}")
        for m, why in skipped.items():
            print(f"{m} skipped: {why}")
    names = {ds: short_names([it.key for it in items if it.dataset == ds]) for ds in {it.dataset for it in items}}
    size = protocol.SIZES[backbone.kind] if ypt else None
    stream = protocol.PosteriorStream(backbone.device) if ypt else None
    latent_shapes = {}

    def latent_shape(n):  # ypt: the latents of an image (n = 0) or an n-frame clip at the protocol's size
        if n not in latent_shapes:
            dummy = torch.zeros(1, 3, n + (1 - n) % 4, *size) if n else torch.zeros(1, 3, *size)
            latent_shapes[n] = backbone.encode(dummy).shape
        return latent_shapes[n]

    from tqdm.auto import tqdm

    rows_file = out / ("rows.jsonl" if world.rank == 0 else f"rows.rank{world.rank}.jsonl")
    bar = tqdm(total=len(mine), desc="evaluating", unit="item", disable=not world.main)
    means = {}
    drop_partial_line(rows_file)
    with open(rows_file, "a") as log:
        for it in items:
            if (it.dataset, it.key) not in mine:
                if ypt:  # the release draws posterior noise for every item's input and target, in list order
                    stream.skip(latent_shape(min(len(it.input), args.frames) if it.clip else 0), draws=2)
                continue
            x = load(it.input, it.clip, size, args.frames)
            gt = None if it.target is None else load(it.target, it.clip, size, args.frames)
            if gt is not None and gt.shape != x.shape:
                raise UserError(f"{it.key}: the input is {tuple(x.shape)}, its reference {tuple(gt.shape)}: native "
                                "scoring needs equal sizes (--protocol ypt resizes both)")
            prompts, bridge, auto = sets[files[it.key]]
            b, _ = at_input(bridge, auto, prompts[0].meta, x)
            restored = restore(backbone, prompts, b, x, steps, args.seed, tile=tile, ypt=stream, samples=samples,
                               spin=spin)
            if ypt:  # the release encodes the target too (for a latent loss): one more posterior draw
                stream.skip(latent_shape(len(x) if it.clip else 0))
            frames = restored if it.clip else restored[None]
            ref = None if gt is None else (gt if it.clip else gt[None])
            if ypt:
                pred, ref = protocol.metric_view(frames), None if ref is None else protocol.metric_view(ref)
            else:
                pred = protocol.to_uint8(frames, round=True).float() / 255  # what the saved PNG holds
            row = {"key": it.key, "dataset": it.dataset, "degradation": "+".join(it.prompts) or it.degradation,
                   "prompts": [str(f) for f in files[it.key]], "T0": round(float(b.T0), 6), "frames": len(frames)}
            row.update(scores(pred.to(backbone.device), None if ref is None else ref.to(backbone.device),
                              args.metrics, args.y, fns))
            if args.save:
                frame_names = [p.name for p in it.input[:len(frames)]] if it.clip else None
                row["output"] = save_output(restored, out / "restored" / it.dataset / names[it.dataset][it.key],
                                            it.clip, ypt, frame_names)
            log.write(json.dumps(row) + "\n")
            log.flush()
            for m in HEADERS:
                if m in row:
                    means.setdefault(m, []).append(row[m])
            bar.set_postfix({m: f"{sum(v) / len(v):.4g}" for m, v in means.items()}, refresh=False)
            bar.update()
    bar.close()
    barrier(world)
    if world.main:
        md, obj = table(list(read_rows(out).values()), list(dict.fromkeys(it.dataset for it in items)),
                        args.metrics, skipped, {**settings, "steps": steps, "samples": samples, "spin": spin})
        atomic_write(out / "table.md", lambda tmp: tmp.write_text(md))
        atomic_write(out / "table.json", lambda tmp: tmp.write_text(json.dumps(obj, indent=1) + "\n"))
        print(md, end="")
        print(f"wrote {out / 'table.md'} and {out / 'table.json'}")
    close(world)
    return 0


if __name__ == "__main__":
    run(main)
