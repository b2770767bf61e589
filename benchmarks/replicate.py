"""A small-scale replication of the paper's claims on the tiny default backbone (issue 8).

    python benchmarks/replicate.py                       # the full protocol: --model tiny, 50 images each
    python benchmarks/replicate.py --images 10 --steps 100   # a quick look

The claims (arXiv 2604.04924): a learned prompt unlocks restoration in a frozen generator, and the EBR
bridge beats the naive and DDBM bridges. This is the procedural protocol (prompts train on a folder of
dead-leaves images written to --out, since train.py's tiny default now trains on photographs; the
natural-photo benchmark is benchmarks/photos.py). For each degradation, on held-out procedural images, a table of
PSNR and SSIM (mean and 95% interval, mean +- 1.96 std / sqrt(n)) for:

  degraded input
  best classical filter   classical.py; its kind and strength tuned on separate validation images
  DnCNN                   dncnn.py; trained on train.py's own batches for the EBR prompt's wall clock
  no prompt               the frozen model sampled from T0 with the EBR sampler
  naive / DDBM / EBR      prompts trained by train.py (in-process, explicit flags) with the same steps, lr,
                          data and seed; sampled with their own bridge from T0
  EBR at each T0 of --t0-sweep (with the unprompted model at the same T0)
  token space             the paper's token-vs-embedding comparison: instead of adding P inside the blocks,
                          learn the K input token embeddings of the tiny text encoder, so the context is
                          encoder(learned tokens) rather than encoder(""); trained like the EBR prompt
                          (same bridge, steps, lr, data, seed), only where the backbone has text.safetensors
Two columns give paired differences with their 95% intervals, per image on the same images and the same
sampler noise (tighter than comparing two intervals): PSNR(method) - PSNR(EBR), and for prompt rows
PSNR(prompt) - PSNR(no prompt at the same T0). A second table reads the issue's targets off them.

Held-out images: dead_leaves(31 * 1_000_003 + i, size), i < --images; classical tuning uses
dead_leaves(37 * 1_000_003 + i). Pre-training with --seed s draws seeds s * 1_000_003 + [0, steps x batch)
(s = 0, then 1 for the second stage), its evaluation 999 * 1_000_003 + i, and prompt training
7 * 1_000_003 + i (CleanProcedural), so all these sets are disjoint.
Each test image is degraded once with the fixed strengths of STRENGTHS and the generator seeded by its own
seed; every restoration of image i starts from the same noise (seed 5_000 + i).

Outputs in --out: results.md (the table, the command, the date, timings), results.json, grid-<degradation>.png
(input | no prompt | naive | DDBM | EBR | clean), prompts/ (trained prompts, reused by a rerun unless
--retrain) and runs/ (train.py's logs and previews, the DnCNN weights, the training images for a backbone folder).
"""
import argparse
import datetime
import hashlib
import json
import math
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "benchmarks"))

import classical  # noqa: E402
import dncnn  # noqa: E402
import train  # noqa: E402
from minirestore import UserError  # noqa: E402
from minirestore.backbone import TINY_DIR, load_backbone  # noqa: E402
from minirestore.bridge import Bridge  # noqa: E402
from minirestore.cli import Help, run  # noqa: E402
from minirestore.data import CleanFolder, CleanProcedural, save_image, split  # noqa: E402
from minirestore.degrade import DEGRADATIONS  # noqa: E402
from minirestore.distributed import World  # noqa: E402
from minirestore.metrics import psnr, ssim  # noqa: E402
from minirestore.procedural import dead_leaves  # noqa: E402
from minirestore.prompts import load_prompt  # noqa: E402
from sample import TINY_TILE, restore, spun  # noqa: E402

STRENGTHS = {  # the test images' fixed degradations (inside the ranges the prompts train on)
    "noise": dict(sigma=0.15),                           # additive Gaussian, std 0.15 of [0, 1] (38 / 255)
    "blur": dict(kind="gaussian", sigma=2.0),            # Gaussian defocus, std 2 px
    "lowlight": dict(exposure=0.2, gamma=1.5),           # y = 0.2 x^1.5 + Poisson-Gaussian noise (degrade.py)
    "haze": dict(beta=1.5, airlight=0.85),               # t = exp(-1.5 d), grey airlight 0.85
}
TEST_BASE, VAL_BASE, SAMPLE_SEED = 31, 37, 5_000
VAL_COUNT = 4  # train.py's held-out images (its --val-count); the split fixes the training set
PROCEDURAL_IMAGES = 4096  # the prompts' training pool


def parse_args(argv=None):
    d = train.DEFAULTS["tiny"]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=Help)
    p.add_argument("--model", default="tiny", help="tiny or a backbone folder")
    p.add_argument("--degradations", default="noise,blur,lowlight,haze", help="comma-separated, from STRENGTHS")
    p.add_argument("--images", type=int, default=50, help="held-out test images per degradation")
    p.add_argument("--val-images", type=int, default=20, help="validation images that tune the classical filters")
    p.add_argument("--size", type=int, default=64, help="image side (tiles of 64 for tiny beyond 64)")
    p.add_argument("--steps", type=int, default=d["steps"], help="optimiser steps of every prompt")
    p.add_argument("--lr", type=float, default=d["lr"], help="AdamW learning rate of every prompt")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="images per step (prompts and DnCNN)")
    p.add_argument("--t0", type=float, default=0.4, help="T0 of the naive / DDBM / EBR / token comparison")
    p.add_argument("--t0-sweep", default="0.2,0.4,0.6,0.8", help="EBR horizons to compare ('' for none)")
    p.add_argument("--sample-steps", type=int, default=20, help="sampler steps (network evaluations)")
    p.add_argument("--seed", type=int, default=0, help="training seed of every prompt and of the DnCNN")
    p.add_argument("--cnn-seconds", type=float, help="DnCNN training budget (default: the EBR prompt's training time)")
    p.add_argument("--pool", type=int, default=PROCEDURAL_IMAGES,
                   help="procedural training images written to a folder that train.py trains on (--data)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "replication"), help="results, grids and caches")
    p.add_argument("--retrain", action="store_true", help="train every prompt and the DnCNN again")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    args = p.parse_args(argv)
    args.degradations = [x.strip() for x in args.degradations.split(",") if x.strip()]
    for name in args.degradations:
        if name not in STRENGTHS:
            raise UserError(f"--degradations: {name!r} has no fixed test strength; choose from {', '.join(STRENGTHS)}")
    args.t0_sweep = [float(x) for x in args.t0_sweep.split(",") if x.strip()]
    for flag in ("images", "val_images", "steps", "batch_size", "sample_steps"):
        if getattr(args, flag) < (2 if flag == "images" else 1):
            raise UserError(f"--{flag.replace('_', '-')} is too small (an interval needs at least 2 images)")
    return args


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def held_out(base, n, size, degradation):
    """n clean images dead_leaves(base * 1_000_003 + i) and their degraded versions at the fixed strength,
    each degraded with a generator seeded by the image's own seed: [n, 3, size, size] twice."""
    clean, degraded = [], []
    for i in range(n):
        seed = base * 1_000_003 + i
        x = dead_leaves(seed, size)[0][None]
        clean.append(x)
        degraded.append(DEGRADATIONS[degradation](x, generator=seed, **STRENGTHS[degradation]))
    return torch.cat(clean), torch.cat(degraded)


def write_pool(folder, n, size):
    """A backbone folder trains on --data: write CleanProcedural's clean images there (8-bit PNGs)."""
    folder.mkdir(parents=True, exist_ok=True)
    pool = CleanProcedural(n, "noise", size)
    for i in range(n):
        path = folder / f"{i:05d}.png"
        if not path.exists():
            save_image(pool.clean(i)[0], path)
    return folder


def training_set(args, backbone, degradation, data_dir):
    """The training split train.py builds for these flags (the DnCNN and the token loop reuse it)."""
    dataset = CleanFolder(data_dir, degradation, args.size, seed=args.seed)
    return split(dataset, val_count=min(VAL_COUNT, len(dataset) - 1), seed=args.seed)[0]


@torch.no_grad()
def fingerprint(model):
    """A short hash of a model's weights (names, shapes and 16 values spread over each tensor), cheap even
    at 12 B parameters: a cached prompt is reused only on the backbone it was trained on, so a re-trained
    backbone under the same name ("tiny") trains its prompts again."""
    h = hashlib.sha256()
    for name, w in model.state_dict().items():
        flat = w.flatten()
        idx = torch.linspace(0, flat.numel() - 1, min(16, flat.numel()), device=flat.device).long()
        h.update(f"{name}{tuple(w.shape)}".encode())
        h.update(flat[idx].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def cached(path, config, retrain):
    """The sidecar record of a cached file, if it exists and was made with the same config."""
    meta = path.with_suffix(".json")
    if retrain or not path.exists() or not meta.exists():
        return None
    record = json.loads(meta.read_text())
    return record if record.get("config") == config else None


# ---------------------------------------------------------------------------------------------
# Training: prompts through train.py, the token-space baseline, the DnCNN
# ---------------------------------------------------------------------------------------------

def train_prompt(args, backbone, degradation, kind, T0, data_dir):
    """A prompt trained by train.main with explicit flags -> (path, training seconds). Cached."""
    name = f"{degradation}-{kind}-t{T0:g}"
    path = Path(args.out) / "prompts" / f"{name}.safetensors"
    config = dict(model=backbone.name, weights=fingerprint(backbone.model), degradation=degradation, bridge=kind,
                  T0=T0, steps=args.steps, lr=args.lr, batch_size=args.batch_size, size=args.size, seed=args.seed,
                  pool=args.pool)
    record = cached(path, config, args.retrain)
    if record is None:
        run_dir = Path(args.out) / "runs" / name
        if (run_dir / "log.jsonl").exists():
            (run_dir / "log.jsonl").unlink()  # a fresh run, not a continuation
        argv = ["--model", str(args.model), "--degradation", degradation, "--bridge", kind, "--t0", str(T0),
                "--steps", str(args.steps), "--lr", str(args.lr), "--batch-size", str(args.batch_size),
                "--resolution", str(args.size), "--seed", str(args.seed), "--out", str(path), "--run-dir", str(run_dir),
                "--val-every", "0", "--val-count", str(VAL_COUNT), "--val-steps", str(args.sample_steps),
                "--device", args.device, "--dtype", "fp32", "--data", str(data_dir)]
        print(f"\n== training {name}: python train.py {shlex.join(argv)}", flush=True)
        if train.main(argv) != 0:
            raise UserError(f"training {name} did not finish")
        steps = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        seconds = max(r["time"] for r in steps if "time" in r)  # optimiser steps only, validation excluded
        record = dict(config=config, train_seconds=seconds, argv=argv)
        path.with_suffix(".json").write_text(json.dumps(record, indent=1))
    return path, record["train_seconds"]


def token_context(text, ids, tokens):
    """The context encoder(learned tokens): the encoder's own forward, with its token-embedding output
    replaced by `tokens` [1, K, width] (a forward hook), so nothing else of the encoder changes."""
    hook = text.token_embedding.register_forward_hook(lambda module, inputs, output: tokens.expand_as(output))
    try:
        txt, y = text(ids)
    finally:
        hook.remove()
    return {"txt": txt, "y": y}


def load_text(args, backbone):
    """The backbone's tiny text encoder and the ids of "" (None when the folder has none)."""
    from minirestore.tiny import load_text_encoder

    path = (TINY_DIR if str(args.model) == "tiny" else Path(args.model)) / "text.safetensors"
    if not path.exists():
        return None
    text = load_text_encoder(path, device=args.device, dtype=torch.float32).requires_grad_(False)
    ids = text.tokenize("")[None].to(args.device)  # [1, K]
    with torch.no_grad():
        ctx = text(ids)
    if ctx[0].shape != backbone.context["txt"].shape or not torch.allclose(ctx[0], backbone.context["txt"], atol=1e-5):
        raise UserError(f"{path} does not reproduce the backbone's context.safetensors from \"\": they are from "
                        "different pre-training runs")
    return text, ids


def train_tokens(args, backbone, text, ids, degradation, data_dir):
    """Token-space prompt tuning with the EBR bridge: the loop of train.py, with the learned input tokens
    [1, K, width] (initialised at the embeddings of "", so step 0 is the frozen model) as the only parameter,
    no P and no alpha in the blocks. -> (tokens, training seconds). Cached."""
    from safetensors.torch import load_file, save_file

    path = Path(args.out) / "prompts" / f"{degradation}-tokens-t{args.t0:g}.safetensors"
    config = dict(model=backbone.name, weights=fingerprint(backbone.model), degradation=degradation, bridge="ebr",
                  T0=args.t0, steps=args.steps, lr=args.lr, batch_size=args.batch_size, size=args.size,
                  seed=args.seed, pool=args.pool, space="tokens")
    record = cached(path, config, args.retrain)
    if record is not None:
        return load_file(str(path))["tokens"].to(args.device), record["train_seconds"]
    print(f"\n== training {path.stem} (token space)", flush=True)
    bridge = Bridge("ebr", args.t0)
    train_set = training_set(args, backbone, degradation, data_dir)
    with torch.no_grad():
        tokens = torch.nn.Parameter(text.token_embedding(ids).clone())  # [1, K, width]
    opt = torch.optim.AdamW([tokens], lr=args.lr, weight_decay=0.0)
    start = time.time()
    for step in range(args.steps):  # train.py's step, with the context computed from the tokens
        clean, degraded, gens = train.batch_at(train_set, step, args.batch_size, args.seed, World())
        X0, Y = backbone.encode(clean), backbone.encode(degraded)
        t = torch.cat([bridge.sample_t(1, generator=g) for g in gens]).to(X0.device)
        eps = torch.stack([torch.randn(X0.shape[1:], generator=g) for g in gens]).to(X0.device)
        x_t = bridge.make_state(X0, Y, t, eps)
        view = replace(backbone, context=token_context(text, ids, tokens))
        loss = bridge.loss(bridge.x0_from_velocity(x_t, t, view.velocity(x_t, bridge.model_time(t), None), Y), X0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            print(f"token step {step + 1}/{args.steps}: loss {loss.item():.4f}", flush=True)
    seconds = time.time() - start
    save_file({"tokens": tokens.detach().cpu().contiguous()}, str(path))
    path.with_suffix(".json").write_text(json.dumps(dict(config=config, train_seconds=seconds), indent=1))
    return tokens.detach(), seconds


def train_cnn(args, backbone, degradation, data_dir, seconds):
    """The DnCNN on train.py's batches for `seconds` of wall clock -> (model, steps, seconds). Cached."""
    path = Path(args.out) / "runs" / "dncnn" / f"{degradation}.pt"
    config = dict(degradation=degradation, budget=round(seconds, 3), batch_size=args.batch_size, size=args.size,
                  seed=args.seed, pool=args.pool, net=vars(dncnn.DnCNNConfig()))
    record = cached(path, config, args.retrain)
    if record is not None:
        return dncnn.load(path)[0], record["steps"], record["seconds"]
    print(f"\n== training the DnCNN for {degradation}: {seconds:.1f} s", flush=True)
    train_set = training_set(args, backbone, degradation, data_dir)

    def next_batch(step):
        clean, degraded, _ = train.batch_at(train_set, step, args.batch_size, args.seed, World())
        return clean, degraded

    model, steps, used = dncnn.train_dncnn(next_batch, seconds, dncnn.DnCNNConfig(batch_size=args.batch_size),
                                           seed=args.seed, log=print)
    path.parent.mkdir(parents=True, exist_ok=True)
    dncnn.save(model, path, steps=steps, seconds=used)
    path.with_suffix(".json").write_text(json.dumps(dict(config=config, steps=steps, seconds=used), indent=1))
    return model, steps, used


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def restore_set(backbone, bank, bridge, degraded, steps, batch=16, T0s=None, samples=1, spin=0):
    """Restore [N, 3, H, W]; image i always starts from the noise of seed SAMPLE_SEED + i, so every
    method sees the same noise. Beyond the tiny model's 64 x 64, sample.restore's overlapping tiles.
    T0s: one T0 per image (adaptive T0) instead of the bridge's own. samples > 1: the mean of that many
    restorations (sample.py --samples; the first is the samples = 1 one, sample k starts from seed
    SAMPLE_SEED + i + 1_000_003 k without tiles); spin: sample.py --spin (restore.spun)."""
    bridges = [bridge.at(T0) for T0 in T0s] if T0s is not None else [bridge] * len(degraded)
    if backbone.name == "tiny" and max(degraded.shape[-2:]) > TINY_TILE:
        return torch.stack([restore(backbone, [bank], b, x, steps, SAMPLE_SEED + i, tile=TINY_TILE, samples=samples,
                                    spin=spin) for i, (x, b) in enumerate(zip(degraded, bridges))])
    velocity = lambda x, tau: backbone.velocity(x, tau, bank)  # noqa: E731
    out = []
    batch = 1 if T0s is not None else batch  # a batch shares one bridge: one image at a time
    for idx in (list(range(i0, min(i0 + batch, len(degraded)))) for i0 in range(0, len(degraded), batch)):
        def restore_one(x, k):
            Y = backbone.encode(x)
            eps = torch.stack([torch.randn(Y.shape[1:], generator=torch.Generator().manual_seed(
                SAMPLE_SEED + i + 1_000_003 * k)) for i in idx]).to(Y.device)
            return backbone.decode(bridges[idx[0]].sample(velocity, Y, steps, eps=eps)).cpu()
        out.append(spun(restore_one, degraded[idx], samples, spin))
    return torch.cat(out)


def prompt_bridge(bank):
    """The bridge a prompt was trained with, read from its file (as sample.py does)."""
    return Bridge.from_meta(bank.meta)


def interval(values):
    """(mean, 1.96 std / sqrt(n)): the normal-approximation 95% interval of the mean."""
    v = values.double()
    return v.mean().item(), 1.96 * v.std(unbiased=True).item() / math.sqrt(len(v))


def save_grid(columns, path, rows=4):
    """Images side by side: one row per test image, one column per method; nearest-upscaled to >= 128 px."""
    n = min(rows, len(columns[0]))
    grid = torch.cat([torch.cat([c[i] for c in columns], dim=-1) for i in range(n)], dim=-2)  # [3, n H, k W]
    scale = max(1, 128 // columns[0].shape[-1])
    save_image(grid.repeat_interleave(scale, -1).repeat_interleave(scale, -2).clamp(0, 1), path)


def run_degradation(args, backbone, text, degradation, data_dir):
    """All rows for one degradation -> (rows, timings)."""
    T0, out = args.t0, Path(args.out)
    clean, degraded = held_out(TEST_BASE, args.images, args.size, degradation)
    val_clean, val_degraded = held_out(VAL_BASE, args.val_images, args.size, degradation)
    tic = time.time()
    prompts = {(kind, T0): train_prompt(args, backbone, degradation, kind, T0, data_dir)
               for kind in ("naive", "ddbm", "ebr")}
    for T in args.t0_sweep:
        if ("ebr", T) not in prompts:
            prompts[("ebr", T)] = train_prompt(args, backbone, degradation, "ebr", T, data_dir)
    tokens = None if text is None else train_tokens(args, backbone, *text, degradation, data_dir)
    budget = args.cnn_seconds if args.cnn_seconds is not None else prompts[("ebr", T0)][1]
    cnn, cnn_steps, cnn_seconds = train_cnn(args, backbone, degradation, data_dir, budget)
    timings = {"training (this run)": time.time() - tic}

    tic = time.time()
    results = []  # (method, restored, training seconds, note, T0 of a learned prompt or None)
    results.append(("degraded input", degraded, None, ", ".join(f"{k} {v}" for k, v in STRENGTHS[degradation].items()),
                    None))
    name, fn, params, _ = classical.tune(degradation, val_degraded, val_clean)
    results.append(("best classical filter", fn(degraded, **params), None,
                    f"{classical.describe(name, params)}, tuned on {args.val_images} validation images", None))
    results.append(("DnCNN (supervised)", dncnn.restore(cnn, degraded), cnn_seconds,
                    f"{cnn_steps} steps of {args.batch_size}, depth {cnn.config.depth}, width {cnn.config.width}", None))
    restored, horizons = {}, list(dict.fromkeys([T0] + args.t0_sweep))
    bar = tqdm(total=len(horizons) + len(prompts) + (tokens is not None), desc=f"evaluating {degradation}",
               unit="method")
    for T in horizons:  # the unprompted model at each horizon
        restored[("none", T)] = restore_set(backbone, None, Bridge("ebr", T), degraded, args.sample_steps)
        bar.update()
    for key, (path, _) in prompts.items():
        bank = load_prompt(path, backbone=backbone.name, D=backbone.D, n_blocks=backbone.n_blocks).to(backbone.device)
        restored[key] = restore_set(backbone, bank, prompt_bridge(bank), degraded, args.sample_steps)
        bar.update()
    results.append((f"no prompt (T0 {T0:g})", restored[("none", T0)], None, "frozen model, EBR sampler", None))
    for kind, label in (("naive", "naive bridge"), ("ddbm", "DDBM bridge"), ("ebr", "EBR bridge (the method)")):
        results.append((f"{label} (T0 {T0:g})", restored[(kind, T0)], prompts[(kind, T0)][1], "prompt P + alpha", T0))
    for T in args.t0_sweep:
        if T != T0:
            results.append((f"no prompt (T0 {T:g})", restored[("none", T)], None, "T0 sweep", None))
            results.append((f"EBR bridge (T0 {T:g})", restored[("ebr", T)], prompts[("ebr", T)][1], "T0 sweep", T))
    if tokens is not None:
        view = replace(backbone, context={k: v.detach() for k, v in token_context(*text, tokens[0]).items()})
        results.append((f"token space (EBR, T0 {T0:g})", restore_set(view, None, Bridge("ebr", T0), degraded,
                                                                      args.sample_steps), tokens[1],
                        "learned input tokens of the text encoder, no P in the blocks", T0))
        bar.update()
    bar.close()

    ebr_psnr = psnr(restored[("ebr", T0)], clean)
    rows = []
    for method, x, seconds, note, T in results:  # a prompt row is also compared with no prompt at its own T0
        p, s = psnr(x, clean), ssim(x, clean)
        same = method.startswith("EBR bridge (the method)")
        rows.append(dict(degradation=degradation, method=method, psnr=interval(p), ssim=interval(s),
                         dpsnr=None if same else interval(p - ebr_psnr),
                         dnone=None if T is None else interval(p - psnr(restored[("none", T)], clean)),
                         train_seconds=seconds, note=note))
    save_grid([degraded, restored[("none", T0)], restored[("naive", T0)], restored[("ddbm", T0)],
               restored[("ebr", T0)], clean], out / f"grid-{degradation}.png")
    timings["evaluation"] = time.time() - tic
    return rows, timings


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

HEADER = ["degradation", "method", "PSNR (dB)", "SSIM", "PSNR - EBR (dB)", "PSNR - no prompt (dB)", "training",
          "notes"]
# The targets: EBR (at --t0) ahead of each of these by more than the paired 95% interval.
CLAIMS = [("no prompt", "no prompt (T0 {T0:g})"), ("naive bridge", "naive bridge (T0 {T0:g})"),
          ("DDBM bridge", "DDBM bridge (T0 {T0:g})"), ("best classical filter", "best classical filter"),
          ("DnCNN (not a target)", "DnCNN (supervised)")]


def seconds(s):
    return "" if s is None else f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"


def difference(d):
    return "" if d is None else "{:+.2f} ± {:.2f}".format(*d)


def table(rows):
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        cells = [r["degradation"], r["method"], "{:.2f} ± {:.2f}".format(*r["psnr"]),
                 "{:.3f} ± {:.3f}".format(*r["ssim"]), difference(r["dpsnr"]), difference(r.get("dnone")),
                 seconds(r["train_seconds"]), r["note"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claims(rows, T0):
    """Per degradation, PSNR(EBR) - PSNR(other) with its paired interval, and whether EBR is ahead by more
    than the interval ('yes'), behind by more ('no, behind') or within it ('no, within')."""
    lines = ["| degradation | " + " | ".join(f"EBR - {name}" for name, _ in CLAIMS) + " |",
             "|---|" + "---|" * len(CLAIMS)]
    for d in dict.fromkeys(r["degradation"] for r in rows):
        by_method = {r["method"]: r for r in rows if r["degradation"] == d}
        cells = []
        for _, method in CLAIMS:
            mean, half = by_method[method.format(T0=T0)]["dpsnr"]
            verdict = "yes" if -mean - half > 0 else "no, behind" if -mean + half < 0 else "no, within"
            cells.append(f"{-mean:+.2f} ± {half:.2f} ({verdict})")
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(args, command, rows, timings, backbone):
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    device = args.device if args.device != "cpu" else f"cpu, {torch.get_num_threads()} threads"
    lines = [
        f"# Replication on {'the tiny default backbone' if backbone.name == 'tiny' else backbone.name}",
        "", f"Command: `{command}`", "", f"Date: {when}; device: {device}; total {timings['total']:.0f} s.", "",
        f"{args.images} held-out images per degradation (dead_leaves(31 * 1_000_003 + i, {args.size})); every prompt "
        f"{args.steps} steps of {args.batch_size}, lr {args.lr:g}, seed {args.seed}; "
        f"{args.sample_steps} sampler steps. "
        "Intervals: mean ± 1.96 std / sqrt(n). 'PSNR - EBR' is the paired per-image difference to the EBR prompt "
        f"at T0 {args.t0:g}. 'training' is the optimiser's wall clock (train.py's log); the DnCNN gets the EBR "
        "prompt's. 'PSNR - no prompt' is the paired difference of a prompt row to the unprompted model at the "
        "same T0.", "", table(rows), "",
        f"The issue's targets, paired PSNR differences (dB) of the EBR prompt at T0 {args.t0:g}; 'yes' where EBR is "
        "ahead by more than the 95% interval:", "", claims(rows, args.t0), "", "Timings of this run (s):", ""]
    for d, t in timings["per degradation"].items():
        lines.append(f"- {d}: " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()))
    return "\n".join(lines) + "\n"


def main(argv=None):
    command = ("python benchmarks/replicate.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    args = parse_args(argv)
    start = time.time()
    backbone = load_backbone(args.model, args.device, torch.float32)
    if args.size % backbone.multiple:
        raise UserError(f"--size {args.size} must be a multiple of {backbone.multiple} for {backbone.name}")
    out = Path(args.out)
    (out / "prompts").mkdir(parents=True, exist_ok=True)
    data_dir = write_pool(out / "runs" / f"pool-{args.size}", args.pool, args.size)  # train.py's tiny default is photos
    text = load_text(args, backbone)
    rows, per = [], {}
    for degradation in args.degradations:
        r, per[degradation] = run_degradation(args, backbone, text, degradation, data_dir)
        rows += r
    timings = {"total": time.time() - start, "per degradation": per}
    md = report(args, command, rows, timings, backbone)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(dict(command=command, settings=vars(args), strengths=STRENGTHS,
                                                      rows=rows, timings=timings), indent=1))
    print("\n" + md)
    print(f"written: {out / 'results.md'}, {out / 'results.json'} and {len(args.degradations)} grids in {out}")
    return 0


if __name__ == "__main__":
    run(main)
