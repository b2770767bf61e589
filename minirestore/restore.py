"""Restore one image or clip with a learned prompt: the code sample.py and evaluate.py share.

The degraded input is padded to the backbone's multiple (a clip to 4k+1 frames), encoded to Y, walked
back from X_T0 = (1 - T0) Y + T0 eps with the bridge sampler (bridge.py), decoded and cropped back.
"""
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import UserError, protocol
from .bridge import averaged
from .video import to_4k1

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"  # the repository's shipped weights

TINY_TILE = 64  # the tiny default's pre-training size
# (steps, samples, spin) when not given: the released sampler's 20 steps and one sample, except on the tiny
# default, where the same 20 network evaluations spent as the mean of 20 one-step restorations (x0_hat at T0, each
# from its own start noise) score 1.5 to 2.7 dB higher on noisy test photographs (README, "Sampler budget" and
# "On held-out photographs"), and each of the 20 sees its tile shifted to another phase of the 4-pixel token grid
# (spin 4, `spun`: +0.1 to +0.7 dB on every degradation, README "Cycle spinning"); measured only there, so the
# real backbones keep the released protocol.
SAMPLER = {"tiny": (1, 20, 4)}


def sampler_defaults(model, steps=None, samples=None, ypt=False, spin=None):
    """(steps, samples, spin): the given ones, else the model's defaults (the released 20 x 1, no spin, under
    --protocol ypt)."""
    default = (20, 1, 0) if ypt else SAMPLER.get(model, (20, 1, 0))
    return steps or default[0], samples or default[1], default[2] if spin is None else spin



def tile_for(model, tile=None, ypt=False, spin=None):
    """The tile size restore() gets: the given one, else TINY_TILE on the tiny default (its pre-training size) and
    none on the others; none under --protocol ypt. spin: the --spin the user gave; it shifts tiles, so asking for
    it where there are none is refused in one line."""
    size = 0 if ypt else tile if tile is not None else (TINY_TILE if model == "tiny" else 0)
    if spin and not size:
        raise UserError("--spin shifts the tiles between samples: it needs --tile N (the tiny default tiles by "
                        "itself) and the native protocol, not --protocol ypt")
    return size

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


def cycle_shift(k, p):
    """Restoration k's shift (dy, dx) of the token grid, in pixels: the p * p phases in turn, k = 0 unshifted,
    each in [-p/2, p/2): k = 0..p*p-1 visits every phase once, dy moving by one pixel each time, dx by one or two
    (so a few samples are already spread over both axes)."""
    centred = lambda v: (v + p // 2) % p - p // 2  # noqa: E731
    return centred(k % p), centred(k + k // p)


def spun(restore_one, x, samples, p):
    """The mean of `samples` restorations of images x [N, C, H, W], restoration k = restore_one(x_k, k) computed on
    x shifted by cycle_shift(k, p) pixels and shifted back: cycle spinning (Coifman & Donoho 1995). A transformer
    over p x p pixel tokens leaves faint seams on its token grid; with the grid at a different phase in each
    restoration they average out, as the sampling noise does. The shifted-in border is replicate-padded and
    cropped off again, so a pixel within p/2 of the border is the mean over the shifts that keep it inside the
    frame. p <= 1: no shift, the plain mean."""
    p = p if p > 1 else 0
    H, W = x.shape[-2:]
    padded = F.pad(x, (p, p, p, p), mode="replicate") if p else x
    out = count = None
    for k in range(samples):
        dy, dx = cycle_shift(k, p) if p else (0, 0)
        window = (slice(p + dy, p + dy + H), slice(p + dx, p + dx + W))  # x_k: the frame moved by (dy, dx)
        y = restore_one(padded[..., window[0], window[1]], k)
        if out is None:
            out = y.new_zeros(*y.shape[:-2], H + 2 * p, W + 2 * p)
            count = y.new_zeros(H + 2 * p, W + 2 * p)
        out[..., window[0], window[1]] += y  # shifted back into place
        count[window] += 1
    return (out / count)[..., p:p + H, p:p + W]


def restore(backbone, prompts, bridge, x, steps, seed, tile=0, overlap=16, batch=32, ypt=None, samples=1, spin=0):
    """x: an image [3, H, W] or a clip [T, 3, H, W] in [0, 1] -> restored, same shape.

    Pad the sides to the backbone's multiple (and a clip to 4k+1 frames), sample, crop back. tile > 0
    restores overlapping tiles of that size (the tiny default was pre-trained at 64 x 64: RoPE positions
    beyond its training range are a known failure) and blends them with linear ramps. samples > 1 averages
    that many restorations from successive start noises of the same generator (the first is the samples = 1
    one): an estimate of the posterior mean E[X0 | Y], which scores higher PSNR than any one sample and is a
    little smoother. spin = p > 1 (tiles only): restoration k of a tile sees it shifted by cycle_shift(k, p)
    pixels (`spun`), so the seams of a p-pixel token grid average out too (the tiny default's p = 4).

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
    one = lambda t, k: backbone.decode(bridge.sample(velocity, backbone.encode(t), steps, generator=g)).float()  # noqa: E731
    bar = tqdm(total=len(boxes), desc="tiles", unit="tile", leave=False, disable=len(boxes) <= batch)  # a big photo
    for b0 in range(0, len(boxes), batch):  # tiles in batches: bounded memory on any image size
        chunk = boxes[b0:b0 + batch]
        tiles = torch.cat([x[..., i:i + th, j:j + tw] for i, j in chunk])
        restored = spun(one, tiles, samples, spin).cpu()
        for (i, j), r in zip(chunk, restored):
            out[:, i:i + th, j:j + tw] += w * r
            weight[:, i:i + th, j:j + tw] += w
        bar.update(len(chunk))
    bar.close()
    return (out / weight)[:, :H, :W]


def load_prompts(backbone, files):
    """Prompt files -> PromptBanks on the backbone's device, each checked against it (name, K, D, blocks)."""
    from .prompts import load_prompt

    return [load_prompt(f, backbone=backbone.name, K=backbone.K, D=backbone.D, n_blocks=backbone.n_blocks)
            .to(backbone.device) for f in files]


def bridge_for(prompts, t0=None, source=""):
    """(bridge, auto) for a set of prompts: their bridge at T0 = t0, else the first prompt's own T0.
    auto: choose T0 per input (t0 "auto", the default for a prompt with a T0 curve)."""
    from .bridge import Bridge

    kinds = {f'{b.meta.get("bridge", "ebr")} ({b.meta.get("x0", "ypt")} estimate)' for b in prompts}
    if len(kinds) > 1:
        raise UserError(f"the prompts were trained with different bridges ({', '.join(sorted(kinds))}); mix only one kind")
    meta = prompts[0].meta  # with several prompts, the first one's T0 (or T0 curve) is used
    T0 = t0 if t0 not in (None, "auto") else float(meta.get("T0", 0.4))
    bridge = Bridge.from_meta(meta, T0)
    auto = t0 == "auto" or (t0 is None and "T0_curve" in meta)
    if auto and "T0_curve" not in meta:
        print(f"--t0 auto: {source} has no T0 curve, so its own T0 {T0:g} is used")
        auto = False
    return bridge, auto


def at_input(bridge, auto, meta, x):
    """(bridge, note) for one input: adaptive T0 from its estimated strength through the prompt's curve."""
    if not auto:
        return bridge, f"T0 {bridge.T0:g}"
    from .strength import auto_T0

    T0, strength = auto_T0(meta, x)
    return bridge.at(T0), f"estimated {meta['degradation']} strength {strength:.4f} -> T0 {T0:.3f}"
