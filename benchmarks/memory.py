"""Which flags fit which GPU: the README's memory table, computed (no GPU was available to measure it).

    OMP_NUM_THREADS=1 python benchmarks/memory.py            prints the table (Markdown)

Per backbone and task, the peak GPU memory is estimated as the sum of
  weights      exact: the parameter counts of the real configs (meta-device models), bf16, or fp8 for the
               blocks' linears (fp8.targets) + bf16 for the rest; the VAE in fp32;
  transformer  activations from the token count L and the widths (below), for sampling (no grad) and for
               prompt training with gradient checkpointing (train.py's default on CUDA);
  VAE          activation bytes per pixel measured here on the CPU (the real VAE configs, random weights,
               peak anonymous memory of one encode / decode at a small size), times the pixels of the largest
               piece the VAE sees (the whole image, or the tile with its halo when tiling.py tiles);
  overhead     1.0 GiB (CUDA context, allocator slack).
Transformer working set of one block (bytes), from the layer widths:
  FLUX  L (3H + H + 3M + 2H) 2       qkv, attention out, MLP hidden (+ GELU, concat), residual and modulated input
  Wan   L (4D 2 + 2F 2 + 3D 4)       q, k, v, o in bf16; FFN hidden and GELU; fp32 residual stream and norms
sampling = one working set; training = the saved block inputs (FLUX L H 2 B, Wan L D 4 B, per block) + three
working sets (recomputing one block and its backward). These are estimates; the GPU run (benchmarks/gpu.sh)
is what would measure them.
"""
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GiB = 2 ** 30
OVERHEAD = 1.0 * GiB
GPUS = (12, 16, 24, 48, 80)


def weight_bytes(model):
    """GPU bytes of the transformer's weights: bf16, fp8, and with --offload blocks (the non-block weights plus
    the two largest blocks: the running one and the one fetched ahead; fp8 blocks when combined with fp8)."""
    from minirestore import fp8

    targets = set(fp8.targets(model))
    big = sum(m.weight.numel() for n, m in model.named_modules() if n in targets)
    total = sum(p.numel() for p in model.parameters())
    blocks = [b for n in ("double_blocks", "single_blocks", "blocks") for b in getattr(model, n, [])]
    in_blocks = sum(p.numel() for b in blocks for p in b.parameters())

    def block_fp8(b):
        lin = sum(m.weight.numel() for m in b.modules() if isinstance(m, torch.nn.Linear) and m in fp8_mods)
        return lin + 2 * (sum(p.numel() for p in b.parameters()) - lin)
    fp8_mods = {model.get_submodule(n) for n in targets}
    two = sorted((sum(p.numel() for p in b.parameters()) for b in blocks), reverse=True)[:2]
    two_fp8 = sorted((block_fp8(b) for b in blocks), reverse=True)[:2]
    rest = 2 * (total - in_blocks)
    return {"bf16": 2 * total, "fp8": big + 2 * (total - big), "offload": rest + 2 * sum(two),
            "fp8+offload": rest + sum(two_fp8)}


def peak_anon(fn):
    """Peak anonymous memory (bytes) of fn() above what was resident before it."""
    def now():
        return int(next(line for line in open("/proc/self/status") if line.startswith("RssAnon:")).split()[1]) * 1024
    base, peak, stop = now(), [0], [False]

    def sample():
        while not stop[0]:
            peak[0] = max(peak[0], now())
            time.sleep(0.005)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    fn()
    stop[0] = True
    t.join()
    return max(0, peak[0] - base)


def vae_child():
    """Bytes per pixel of each VAE's encode and decode (fp32, real configs, random weights), as JSON."""
    from minirestore.autoencoder import AutoEncoder
    from minirestore.wan_vae import WanVAE

    torch.manual_seed(0)
    out = {}
    with torch.no_grad():
        ae = AutoEncoder().eval()
        x = torch.rand(1, 3, 256, 256) * 2 - 1
        z = ae.encode(x)
        out["flux_encode"] = peak_anon(lambda: ae.encode(x)) / 256 ** 2
        out["flux_decode"] = peak_anon(lambda: ae.decode(z)) / 256 ** 2
        vae = WanVAE().eval()
        v = torch.rand(1, 3, 5, 128, 128) * 2 - 1
        zv = vae.encode(v)
        out["wan_encode"] = peak_anon(lambda: vae.encode(v)) / 128 ** 2  # per pixel of a frame, 5 frames
        out["wan_decode"] = peak_anon(lambda: vae.decode(zv)) / 128 ** 2
    print(json.dumps(out))


def flux_block(L, H, M):
    return L * (3 * H + H + 3 * M + 2 * H) * 2


def wan_block(L, D, F):
    return L * (4 * D * 2 + 2 * F * 2 + 3 * D * 4)


def rows(vae):
    from minirestore.flux import FLUX_PRESETS, Flux
    from minirestore.wan import WAN_PRESETS, WanModel
    from minirestore.autoencoder import AutoEncoder
    from minirestore.wan_vae import WanVAE

    with torch.device("meta"):
        ae_w = 4 * sum(p.numel() for p in AutoEncoder().parameters())
        wan_vae_w = 4 * sum(p.numel() for p in WanVAE().parameters())
        flux_w = weight_bytes(Flux(FLUX_PRESETS["flux-dev"]))
        wan_w = {n: weight_bytes(WanModel(WAN_PRESETS[n])) for n in WAN_PRESETS}
    out = []
    c = FLUX_PRESETS["flux-dev"]
    H, M, n = c.hidden_size, int(c.hidden_size * c.mlp_ratio), c.depth + c.depth_single_blocks
    for task, side, train in (("prompt training, 512x512", 512, True), ("restoring 1024x1024", 1024, False),
                              ("restoring 2048x2048 (tiled VAE)", 2048, False)):
        L = (side // 16) ** 2 + 512
        act = n * L * H * 2 + 3 * flux_block(L, H, M) if train else flux_block(L, H, M)
        piece = min(side, 768 + 2 * 128) ** 2 if side > 1024 else side ** 2  # tiles of 768 with a 128 px halo
        codec = max(vae["flux_encode"], 0 if train else vae["flux_decode"]) * piece
        out.append(("FLUX.1-dev", task, flux_w, ae_w + act + codec))
    for name, frames in (("wan2.1-t2v-1.3b", 33), ("wan2.1-t2v-14b", 33)):
        c = WAN_PRESETS[name]
        L = (1 + (frames - 1) // 4) * (480 // 16) * (832 // 16)
        for task, train in ((f"prompt training, 480x832, {frames} frames", True), (f"restoring 480x832, {frames}-frame windows", False)):
            act = c.num_layers * L * c.dim * 4 + 3 * wan_block(L, c.dim, c.ffn_dim) if train else wan_block(L, c.dim, c.ffn_dim)
            codec = max(vae["wan_encode"], 0 if train else vae["wan_decode"]) * 480 * 832
            w = dict(wan_w[name])
            if train:  # autograd keeps every block's cross-attention k/v weights (bf16) for the prompt's gradient:
                kept = c.num_layers * 2 * c.dim ** 2 * 2  # extra copies when they are fp8 (upcast) or offloaded
                for m in ("fp8", "offload", "fp8+offload"):
                    w[m] += kept
            out.append((name, task, w, wan_vae_w + act + codec))
    return out


def main():
    if "--vae-child" in sys.argv:
        return vae_child()
    r = subprocess.run([sys.executable, __file__, "--vae-child"], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr)
    vae = json.loads(r.stdout.strip().splitlines()[-1])
    print("VAE activation bytes per pixel (measured on the CPU, fp32): " +
          ", ".join(f"{k} {v:.0f}" for k, v in vae.items()))
    print("\n| backbone | task | GiB, bf16 weights | GiB, `--weights fp8` | GiB, `--offload blocks` | GiB, both | " +
          " | ".join(f"{g} GB" for g in GPUS) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(GPUS))
    flags = {"bf16": "bf16", "fp8": "`fp8`", "offload": "`offload`", "fp8+offload": "`fp8` + `offload`"}
    for name, task, w, rest in rows(vae):
        need = {m: (w[m] + rest + OVERHEAD) / GiB for m in flags}

        def fits(gb):
            usable = gb * 1e9 / GiB * 0.95  # what the card reports, less 5 %
            return next((flags[m] for m in flags if need[m] <= usable), "no")
        print(f"| {name} | {task} | " + " | ".join(f"{need[m]:.1f}" for m in flags) + " | "
              + " | ".join(fits(g) for g in GPUS) + " |")


if __name__ == "__main__":
    main()
