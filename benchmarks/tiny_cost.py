"""CPU cost of tiny backbones of other sizes, relative to the shipped one: what a larger GPU-pretrained tiny
default would cost the main job (forward + backward, prompt training) and sample.py (forward only).

    OMP_NUM_THREADS=1 python benchmarks/tiny_cost.py        # widths 128 (shipped), 160, 192, 256; deeper 128

Random weights, one thread, 8 latents of a 64 px crop with a 16-token context; the best of 3 timed repeats
after one warm-up, in ms, and the ratio to width 128 (2 double + 4 single blocks) measured in the same run.
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minirestore.flux import Flux  # noqa: E402
from minirestore.pretrain import init_weights, velocity  # noqa: E402
from minirestore.tiny import tiny_config  # noqa: E402

SHAPES = [(128, 2, 4), (160, 2, 4), (192, 2, 4), (256, 2, 4), (128, 4, 8)]  # (width, double, single)


def best_ms(fn, repeats=3):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def main():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(8, 12, 32, 32, generator=g), torch.rand(8, generator=g)
    rows, base = [], None
    for width, double, single in SHAPES:
        flux = init_weights(Flux(tiny_config(width, double, single)))
        for p in flux.parameters():  # random weights everywhere (init_weights zeroes the modulations)
            torch.nn.init.normal_(p, std=0.02)
        ctx = {"txt": torch.randn(8, 16, 64, generator=g, requires_grad=True), "y": torch.randn(8, 64, generator=g)}

        def forward():
            with torch.no_grad():
                velocity(flux, ctx, z, t)

        def forward_backward():
            velocity(flux, ctx, z, t).sum().backward()

        fwd, bwd = best_ms(forward), best_ms(forward_backward)
        base = base or (fwd, bwd)
        params = sum(p.numel() for p in flux.parameters()) / 1e6
        rows.append(f"| {width} | {double} + {single} | {params:.2f} M | {fwd:.0f} ({fwd / base[0]:.2f}x) | "
                    f"{bwd:.0f} ({bwd / base[1]:.2f}x) |")
        print(rows[-1], flush=True)
    print("\n| width | blocks | parameters | forward ms (vs 128) | forward + backward ms (vs 128) |\n|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
