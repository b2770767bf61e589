"""Benchmark of train.py scaled out over processes: training throughput at 1, 2, ... processes.

    python benchmarks/scaling.py                    # CUDA: 1 .. GPU count processes, a small random backbone
    python benchmarks/scaling.py --max-procs 1 --steps 2          # the quickest CPU smoke run
    python benchmarks/scaling.py --write            # also append the table to benchmarks/RESULTS.md

For every N the real script runs under PyTorch's launcher (NCCL on CUDA, gloo on the CPU):

    python -m torch.distributed.run --standalone --nproc_per_node=N train.py --model BACKBONE --data IMAGES \
        --steps S --val-every 0 --val-count N --val-steps 1 --batch-size B --resolution R ...

on a backbone folder built here with random weights and the official key names (flux.safetensors,
ae.safetensors, context.safetensors with its `backbone` metadata, as tests/test_method.py builds one)
and a folder of procedural images, both in a temporary directory. Each process takes B images per
step, so the global batch is B x N. Throughput comes from the `time` field train.py writes per step
into the run folder's log.jsonl (seconds since the first step began): the first --warmup-steps are
left out, so start-up, model loading, the step-0 validation and Triton's compile are not counted.
On the CPU every process gets --threads intra-op threads, so N processes use N x threads cores.
"""
import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minirestore import UserError  # noqa: E402
from minirestore.cli import Help, run  # noqa: E402
from minirestore.autoencoder import FLUX_AE, AutoEncoder  # noqa: E402
from minirestore.context import save_context  # noqa: E402
from minirestore.flux import Flux, FluxConfig  # noqa: E402
from method import TINY, randomise  # noqa: E402  (benchmarks/method.py)

# tiny: seconds on a CPU. small: real context and VAE, a narrow 6-block transformer, for a quick GPU run.
SIZES = {
    "tiny": dict(flux=TINY["flux"], ae=TINY["ae"], K=TINY["K"]),
    "small": dict(flux=FluxConfig(hidden_size=768, num_heads=6, depth=2, depth_single_blocks=4), ae=FLUX_AE, K=512),
}


def make_backbone(folder, size):
    """A backbone folder with random weights (fp32 files; train.py casts to its dtype when loading)."""
    cfg = SIZES[size]
    folder.mkdir(parents=True, exist_ok=True)
    for name, model, config in (("flux", Flux(cfg["flux"]), cfg["flux"]), ("ae", AutoEncoder(cfg["ae"]), cfg["ae"])):
        randomise(model, seed=len(name))
        save_file(model.state_dict(), folder / f"{name}.safetensors",
                  metadata={"minirestore_config": json.dumps(asdict(config))})
    g = torch.Generator().manual_seed(2)
    save_context(folder / "context.safetensors",
                 {"txt": torch.randn(1, cfg["K"], cfg["flux"].context_in_dim, generator=g),  # [1, K, context_in_dim]
                  "y": torch.randn(1, cfg["flux"].vec_in_dim, generator=g)},  # [1, vec_in_dim]
                 {"backbone": f"random-{size}"})
    return folder


def make_images(folder, count, side):
    """`count` smooth procedural RGB images a little larger than the crop, plus mild noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / side
    for i in range(count):
        img = np.stack([np.sin(xx * (3 + i)), np.cos(yy * (2 + i)), xx * yy], -1) * 0.4 + 0.5
        img = np.clip(img + 0.03 * rng.standard_normal(img.shape), 0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"img{i:03d}.png")
    return folder


def train_once(n, args, backbone, images, work):
    """One torchrun of train.py with n processes -> (steps/s over the timed steps, timed steps, wall s)."""
    run_dir = work / f"run-{n}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           str(ROOT / "train.py"), "--model", str(backbone), "--data", str(images), "--device", args.device,
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--resolution", str(args.resolution),
           "--val-every", "0", "--val-count", str(n), "--val-steps", "1",
           "--run-dir", str(run_dir), "--out", str(work / f"prompt-{n}.safetensors")]
    env = dict(os.environ)
    if not args.device.startswith("cuda"):
        env["OMP_NUM_THREADS"] = str(args.threads)  # the same per process for every N (torchrun would pick 1 for N > 1)
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-15:])
        print(f"  {n} processes: train.py failed (exit {r.returncode}):\n{tail}", file=sys.stderr)
        return None
    times = {rec["step"]: rec["time"] for rec in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())
             if "time" in rec}
    skip = min(args.warmup_steps, args.steps - 1)  # steps 1 .. skip are warm-up
    if skip == 0:
        return args.steps / times[args.steps], args.steps, wall
    timed = args.steps - skip
    return timed / (times[args.steps] - times[skip]), timed, wall


def table(rows, batch_size):
    lines = ["| processes | per-process batch | global batch | steps timed | steps/s | images/s | speed-up (images/s) "
             "| scaling efficiency | wall s (with start-up) |", "|---|---|---|---|---|---|---|---|---|"]
    base = next((r[1] for r in rows if r[0] == 1 and r[1]), None)
    for n, steps_per_s, timed, wall in rows:
        if steps_per_s is None:
            lines.append(f"| {n} | {batch_size} | {batch_size * n} | - | failed | - | - | - | - |")
            continue
        images = steps_per_s * batch_size * n
        speedup = images / (base * batch_size) if base else float("nan")
        lines.append(f"| {n} | {batch_size} | {batch_size * n} | {timed} | {steps_per_s:.2f} | {images:.2f} | "
                     f"{speedup:.2f}x | {100 * speedup / n:.0f}% | {wall:.1f} |")
    return lines


def main(argv=None):
    cuda_available = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=Help)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if cuda_available else "cpu")
    p.add_argument("--max-procs", type=int,
                   help="measure 1 .. this many processes (default: the GPU count on CUDA, min(2, cpus) on the CPU)")
    p.add_argument("--size", choices=SIZES, help="random backbone (default: small on CUDA, tiny on the CPU)")
    p.add_argument("--steps", type=int, default=10, help="optimiser steps per run")
    p.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the throughput")
    p.add_argument("--batch-size", type=int, default=1, help="images per process per step (train.py --batch-size)")
    p.add_argument("--resolution", type=int, help="training crop (default: 512 on CUDA, 32 on the CPU)")
    p.add_argument("--threads", type=int, default=1, help="CPU only: intra-op threads per process")
    p.add_argument("--write", action="store_true", help="append the table to --results")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not cuda_available:
        raise UserError("--device cuda but no CUDA GPU is visible: use --device cpu")
    args.max_procs = args.max_procs or (torch.cuda.device_count() if cuda else min(2, os.cpu_count() or 1))
    args.size = args.size or ("small" if cuda else "tiny")
    args.resolution = args.resolution or (512 if cuda else 32)
    for flag in ("max_procs", "steps", "batch_size", "resolution", "threads"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    if cuda and args.max_procs > torch.cuda.device_count():
        raise UserError(f"--max-procs {args.max_procs} but only {torch.cuda.device_count()} GPUs: one process per GPU")

    if cuda:
        where = f"GPU: {args.max_procs} x {torch.cuda.get_device_name()}, torch {torch.__version__}, NCCL"
    else:
        where = f"NO GPU: CPU smoke run, {os.cpu_count()} CPUs, torch {torch.__version__}, gloo, {args.threads} thread(s) per process"
    print(where, flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="minirestore-scaling-") as tmp:
        work = Path(tmp)
        backbone = make_backbone(work / "backbone", args.size)
        images = make_images(work / "images", 2 * args.max_procs + 8, args.resolution + 8)
        for n in range(1, args.max_procs + 1):
            result = train_once(n, args, backbone, images, work)
            rows.append((n, *(result or (None, None, None))))
            if result:
                print(f"  {n} processes: {result[0]:.2f} steps/s over {result[1]} steps "
                      f"({result[2]:.1f} s with start-up)", flush=True)
    setup = (f"backbone {args.size} (random weights), resolution {args.resolution}, {args.steps} steps "
             f"(first {min(args.warmup_steps, args.steps - 1)} not timed)")
    lines = table(rows, args.batch_size)
    print(setup)
    print("\n".join(lines))
    if not cuda:
        print("\nThese are CPU smoke numbers, not GPU results: gloo on a shared CPU says little about NCCL on GPUs.")
    if args.write:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
        header = f"\n## Scaling benchmark (train.py under torchrun), {stamp} - {where}\n\nCommand: `{command}`\n\n{setup}\n\n"
        if not cuda:
            header += "**CPU smoke run: not GPU results.**\n\n"
        with open(args.results, "a") as f:
            f.write(header + "\n".join(lines) + "\n")
        print(f"appended to {args.results}")
    return 0 if all(r[1] for r in rows) else 1


if __name__ == "__main__":
    run(main)
