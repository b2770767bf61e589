"""Restore one image or clip with a learned prompt: the code sample.py and evaluate.py share.

The degraded input is padded to the backbone's multiple (a clip to 4k+1 frames), encoded to Y, walked
back from X_T0 = (1 - T0) Y + T0 eps with the bridge sampler (bridge.py), decoded and cropped back.
"""
from pathlib import Path

import torch
import torch.nn.functional as F

from . import UserError, protocol
from .bridge import averaged
from .video import to_4k1

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"  # the repository's shipped weights

TINY_TILE = 64  # the tiny default's pre-training size
# (steps, samples) when not given: the released sampler's 20 steps and one sample, except on the tiny default,
# where the same 20 network evaluations spent as the mean of 20 one-step restorations (x0_hat at T0, each from
# its own start noise) score 1.5 to 2.7 dB higher on noisy test photographs (README, "Sampler budget" and "On
# held-out photographs"); measured only there, so the real backbones keep the released protocol.
SAMPLER = {"tiny": (1, 20)}


def sampler_defaults(model, steps=None, samples=None, ypt=False):
    """(steps, samples): the given ones, else the model's defaults (the released 20 x 1 under --protocol ypt)."""
    default = (20, 1) if ypt else SAMPLER.get(model, (20, 1))
    return steps or default[0], samples or default[1]


def default_prompt(model, degradation):
    """Your own trained prompt if there is one, else the one shipped for the model."""
    user = Path("weights") / f"{model}-{degradation}.safetensors"
    shipped = WEIGHTS / model / "prompts" / f"{degradation}.safetensors"
    return user if user.exists() or not shipped.exists() else shipped


def tile_starts(size, tile, overlap):
    """Starts of tiles of length `tile` covering [0, size) with at least `overlap` shared pixels."""
    if size <= tile:
        return [0]
    n = 1 + -(-(size - tile) // (tile - overlap))  # ceil
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def blend_weight(h, w, overlap):
    """A tile's weight in the blend: 1 inside, ramping linearly to small values over `overlap` pixels."""
    ramp = lambda n: torch.minimum(torch.arange(n) + 1.0, torch.arange(n, 0, -1.0)).clamp(max=overlap + 1)  # noqa: E731
    return (ramp(h)[:, None] * ramp(w)[None, :]) / (overlap + 1) ** 2


def restore(backbone, prompts, bridge, x, steps, seed, tile=0, overlap=16, batch=32, ypt=None, samples=1):
    """x: an image [3, H, W] or a clip [T, 3, H, W] in [0, 1] -> restored, same shape.

    Pad the sides to the backbone's multiple (and a clip to 4k+1 frames), sample, crop back. tile > 0
    restores overlapping tiles of that size (the tiny default was pre-trained at 64 x 64: RoPE positions
    beyond its training range are a known failure) and blends them with linear ramps. samples > 1 averages
    that many restorations from successive start noises of the same generator (the first is the samples = 1
    one): an estimate of the posterior mean E[X0 | Y], which scores higher PSNR than any one sample and is a
    little smoother.

    ypt: a protocol.PosteriorStream to restore as the released code does (protocol.py): latents drawn
    from the posterior with its generator, the model fed the nearest scheduler timestep, the start noise
    from a device generator seeded 42 (instead of a CPU one seeded `seed`); no tiles. The caller resizes."""
    clip = x.dim() == 4
    H, W = x.shape[-2:]
    if clip:
        T = x.shape[0]
        x = to_4k1(x).permute(1, 0, 2, 3)  # [3, T', H, W]
    m = backbone.multiple
    pad = (0, (-W) % m, 0, (-H) % m) + ((0, 0) if clip else ())  # replicate-pad the sides (not the frames)
    x = F.pad(x[None], pad, mode="replicate")
    g = torch.Generator().manual_seed(seed) if ypt is None else protocol.start_generator(backbone.device)
    model_time = (lambda tau: tau) if ypt is None else (lambda tau: protocol.scheduler_time(backbone.kind, tau))  # noqa: E731
    fns = [lambda x_, tau, bank=bank: backbone.velocity(x_, model_time(tau), bank) for bank in prompts]
    velocity = averaged(fns)

    def sample(Y):  # decoded restorations of latents Y, averaged over `samples` start noises
        return sum(backbone.decode(bridge.sample(velocity, Y, steps, generator=g)).float()
                   for _ in range(samples)) / samples

    if not tile or clip or ypt is not None:
        Y = backbone.encode(x, generator=None if ypt is None else ypt.generator)
        out = sample(Y)[0, ..., :H, :W].cpu()
        return out.permute(1, 0, 2, 3)[:T] if clip else out
    Hp, Wp = x.shape[-2:]
    th, tw = min(tile, Hp), min(tile, Wp)
    boxes = [(i, j) for i in tile_starts(Hp, th, overlap) for j in tile_starts(Wp, tw, overlap)]
    out, weight = torch.zeros(3, Hp, Wp), torch.zeros(1, Hp, Wp)
    w = blend_weight(th, tw, overlap)
    for k in range(0, len(boxes), batch):  # tiles in batches: bounded memory on any image size
        chunk = boxes[k:k + batch]
        tiles = torch.cat([x[..., i:i + th, j:j + tw] for i, j in chunk])
        restored = sample(backbone.encode(tiles)).cpu()
        for (i, j), r in zip(chunk, restored):
            out[:, i:i + th, j:j + tw] += w * r
            weight[:, i:i + th, j:j + tw] += w
    return (out / weight)[:, :H, :W]


def load_prompts(backbone, files):
    """Prompt files -> PromptBanks on the backbone's device, each checked against it (name, K, D, blocks)."""
    from .prompts import load_prompt

    return [load_prompt(f, backbone=backbone.name, K=backbone.K, D=backbone.D, n_blocks=backbone.n_blocks)
            .to(backbone.device) for f in files]


def bridge_for(prompts, t0=None, source=""):
    """(bridge, auto) for a set of prompts: their bridge at T0 = t0, else the first prompt's own T0.
    auto: choose T0 per input (t0 "auto", the default for a prompt trained over a T0 range with a curve)."""
    from .bridge import Bridge

    kinds = {b.meta.get("bridge", "ebr") for b in prompts}
    if len(kinds) > 1:
        raise UserError(f"the prompts were trained with different bridges ({', '.join(sorted(kinds))}); mix only one kind")
    meta = prompts[0].meta  # with several prompts, the first one's T0 (or T0 curve) is used
    T0 = t0 if t0 not in (None, "auto") else float(meta.get("T0", 0.4))
    bridge = Bridge(kinds.pop(), T0, float(meta.get("t_min", 1e-4)), sigma=float(meta.get("ddbm_sigma", 1.0)))
    auto = t0 == "auto" or (t0 is None and "T0_curve" in meta)
    if auto and "T0_curve" not in meta:
        print(f"--t0 auto: {source} has no T0 curve (trained at one T0), so its own T0 {T0:g} is used")
        auto = False
    return bridge, auto


def at_input(bridge, auto, meta, x):
    """(bridge, note) for one input: adaptive T0 from its estimated strength through the prompt's curve."""
    if not auto:
        return bridge, f"T0 {bridge.T0:g}"
    from .strength import auto_T0

    T0, strength = auto_T0(meta, x)
    return bridge.at(T0), f"estimated {meta['degradation']} strength {strength:.4f} -> T0 {T0:.3f}"
