"""Loading a FLUX transformer with fp8 weights on the CPU: time, peak host memory, and the output error.

    OMP_NUM_THREADS=1 python benchmarks/fp8_load.py                  mid-size random FLUX, bf16 vs fp8, + the tiny default
    OMP_NUM_THREADS=1 python benchmarks/fp8_load.py --full           also the real-size FLUX.1-dev layout (fp8 only:
                                                                     the bf16 baseline needs 24 GB of RAM)

A random bf16 safetensors file in the BFL layout (the Hub file's key names, shapes and dtype) is written once
to a temporary folder, tensor by tensor (it never exists whole in memory). Each load runs in a fresh
process: wall time of hub.load_flux, and its peak anonymous resident memory (RssAnon from /proc, sampled every
20 ms; the file's mmap'd pages are reclaimable page cache and are reported apart as the process's VmHWM), then
one forward pass at a small size in bf16. The baseline is the bf16 load of the same file in the same run.

Why two memory columns: safetensors hands out CPU tensors that map the file (no copy), so a bf16 load to
the CPU reads nothing until the forward pass touches the pages; those pages count in the resident set
(VmHWM, read after the forward pass) but not as anonymous memory. fp8 weights are new (anonymous) memory;
the tensors fp8 leaves in bf16 (modulation, embeddings, norms) stay mapped like the baseline's.
"""
import argparse
import json
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minirestore.flux import FLUX_PRESETS, Flux, prepare_ids  # noqa: E402

MID = replace(FLUX_PRESETS["flux-dev"], depth=2, depth_single_blocks=4)  # full width, 6 of the 57 blocks


def write_random(path, config, seed=0):
    """A bf16 safetensors file with FLUX's keys and shapes for `config`, values ~ N(0, 1/fan_in), written
    tensor by tensor (header first, then the data in order)."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Flux(config).state_dict().items()}
    header, offset = {}, 0
    for k, shape in shapes.items():
        n = 2 * int(torch.tensor(shape).prod()) if shape else 2
        header[k] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    g = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for k, shape in shapes.items():
            if k.endswith("scale") or (k.endswith(".weight") and len(shape) == 1):
                t = torch.ones(shape)
            else:
                t = torch.randn(shape, generator=g) / (shape[-1] ** 0.5 if len(shape) > 1 else 10)
            f.write(t.to(torch.bfloat16).contiguous().view(torch.uint8).numpy().tobytes())
            del t
    return offset


def rss_sampler(peak):
    def run():
        while not peak["stop"]:
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    peak["anon"] = max(peak["anon"], int(line.split()[1]) * 1024)
            time.sleep(0.02)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def child(args):
    """One load (+ one forward) in this process; prints a JSON line."""
    from minirestore import fp8, hub

    peak = {"anon": 0, "stop": False}
    base = int(next(line for line in open("/proc/self/status") if line.startswith("RssAnon:")).split()[1]) * 1024
    thread = rss_sampler(peak)
    t0 = time.perf_counter()
    model = hub.load_flux(args.file, dtype=torch.bfloat16, quantise=fp8.targets if args.weights == "fp8" else None)
    load_s = time.perf_counter() - t0
    time.sleep(0.05)
    peak["stop"] = True
    thread.join()
    stored = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    c = model.config
    g = torch.Generator().manual_seed(1)
    h = w = args.latent
    img = torch.randn(1, h * w // 4, c.in_channels, generator=g).to(torch.bfloat16)
    txt = torch.randn(1, args.txt, c.context_in_dim, generator=g).to(torch.bfloat16)
    y = torch.randn(1, c.vec_in_dim, generator=g).to(torch.bfloat16)
    img_ids, txt_ids = prepare_ids(1, h, w, args.txt)
    guidance = torch.full((1,), 3.5, dtype=torch.bfloat16) if c.guidance_embed else None
    t0 = time.perf_counter()
    with torch.no_grad():
        v = model(img, img_ids, txt, txt_ids, torch.full((1,), 0.5, dtype=torch.bfloat16), y, guidance)
    forward_s = time.perf_counter() - t0
    torch.save(v.float(), args.out)
    hwm = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM:")).split()[1]) * 1024
    print(json.dumps(dict(weights=args.weights, load_s=load_s, forward_s=forward_s, peak_anon=peak["anon"] - base,
                          vm_hwm=hwm, stored_bytes=stored, params=sum(t.numel() for t in model.state_dict().values()))))


def measure(file, weights, out, latent=16, txt=16):
    r = subprocess.run([sys.executable, __file__, "--child", "--file", str(file), "--weights", weights, "--out", str(out),
                        "--latent", str(latent), "--txt", str(txt)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny_error():
    """fp8 vs the shipped fp32 tiny default: velocity error at 64 x 64 with a prompt, fp32 compute."""
    from minirestore.backbone import load_backbone
    from minirestore.prompts import load_prompt

    x = torch.randn(2, 12, 32, 32, generator=torch.Generator().manual_seed(0))
    tau = torch.tensor([0.2, 0.6])
    out = []
    for weights in ("dtype", "fp8"):
        bb = load_backbone("tiny", weights=weights)
        bank = load_prompt(ROOT / "weights" / "tiny" / "prompts" / "noise.safetensors")
        with torch.no_grad():
            out.append(bb.velocity(x, tau, bank))
    return rel_err(out[1], out[0])


def gib(n):
    return f"{n / 2**30:.2f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="also the real-size FLUX.1-dev layout (fp8 only)")
    p.add_argument("--dir", help="folder for the random files (default: a temporary one, removed after)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--latent", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--txt", type=int, default=16, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        d = Path(d)
        configs = [("mid-size random FLUX (width 3072, 2 double + 4 single blocks)", MID, ("dtype", "fp8"))]
        if args.full:
            configs.append(("FLUX.1-dev layout, random (19 double + 38 single blocks)", FLUX_PRESETS["flux-dev"], ("fp8",)))
        for label, config, modes in configs:
            file = d / "flux.safetensors"
            t0 = time.perf_counter()
            size = write_random(file, config)
            print(f"{label}: wrote {gib(size)} GiB of bf16 in {time.perf_counter() - t0:.0f} s", flush=True)
            res = {m: measure(file, m, d / f"{m}.pt") for m in modes}
            err = rel_err(torch.load(d / "fp8.pt"), torch.load(d / "dtype.pt")) if "dtype" in res else None
            for m, r in res.items():
                rows.append((label, m, r, err if m == "fp8" else None, res.get("dtype")))
                print(json.dumps({"config": label, **r}), flush=True)
            file.unlink()
    print("\n| model | weights | parameters | stored (GiB) | load s | first forward s (64 img + 16 txt tokens) "
          "| peak anonymous RSS during load (GiB) | peak RSS incl. mapped file pages, after the forward (GiB) "
          "| vs bf16: load + forward time, peak RSS | fp8 vs bf16 output rel. err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, m, r, err, base in rows:
        both = lambda r: r["load_s"] + r["forward_s"]  # noqa: E731
        ratio = f"{both(r) / both(base):.2f}x, {r['vm_hwm'] / base['vm_hwm']:.2f}x" if base and m == "fp8" else "-"
        print(f"| {label} | {'bf16' if m == 'dtype' else m} | {r['params'] / 1e9:.2f} B | {gib(r['stored_bytes'])} | "
              f"{r['load_s']:.1f} | {r['forward_s']:.1f} | {gib(r['peak_anon'])} | {gib(r['vm_hwm'])} | {ratio} | "
              f"{'-' if err is None else f'{err:.2e}'} |")
    print(f"\ntiny default (fp32 compute, shipped noise prompt): fp8 vs fp32 velocity rel. err {tiny_error():.2e}")


if __name__ == "__main__":
    main()
