"""Adaptive T0: how strong the degradation is, read off the input alone, and the T0 that strength calls for.

A prompt trained over a range of horizons (`train.py --t0 0.1:0.8`, bridge.py's `T0_range`) can start the
sampler at any T0 in that range; which one is best depends on the input. A prompt trained at one T0 can too:
nothing in P or alpha names a T0 (the state tells the frozen model its time), and on the tiny default the main
job's T0 0.6 noise prompt restores light noise best from T0 0.1 to 0.25 (train.py --curve measures where). Two pieces:

  1. an estimate s of the strength, from the degraded image only. For noise, Donoho's MAD rule on the
     finest diagonal Haar band: per 2 x 2 block HH = (a - b - c + d) / 2, which keeps white noise's std
     (four unit-variance terms / 2) and cancels any locally linear image, so
         sigma_hat = median(|HH|) / 0.6745           (0.6745 = the median of |N(0, 1)|)
     It reads fine texture as noise (overestimates on detailed, clean photos) and underestimates noise that
     is clipped at 0 and 1 or not white (JPEG'd, demosaicked). A JPEG file's encoder empties much of this
     band; reading its luma one scale up too was tried and dropped: better on val photographs, a loss on the
     test ones at quality 90 (benchmarks/photos/README.md, "JPEG files"; benchmarks/jpeg_noise.py);
  2. a curve T0 = curve(s): train.py restores validation images degraded at a ladder of strengths with
     every T0 of a grid, keeps the best T0 of each rung (refined by a parabola through the best grid
     point and its neighbours), and stores the points (mean s of the rung, best T0) in the prompt file.
     Between points it is linear, beyond them flat. Because the curve is measured against the estimate,
     the estimate's bias on photographs is absorbed into it. It is measured with the sampler sample.py
     uses on that backbone (steps x samples, restore.sampler_defaults; recorded in the curve): the mean of
     several samples is smoother than one, so it can want another T0. `train.py --recalibrate FILE`
     measures it again for an existing prompt file.
Degradations with no estimator here (blur, jpeg, haze, ...) get one calibrated T0: the best on average over
validation images degraded at their training strengths.
"""
import json

import numpy as np
import torch

from .degrade import DEGRADATIONS, degrade
from .metrics import psnr

MAD_TO_STD = 0.6745  # median |z| of z ~ N(0, 1)


def noise_sigma(x):
    """Noise std estimate of images x [B, 3, H, W] (or one [3, H, W]) in [0, 1] -> [B] fp32 (sigma_hat above).
    Every channel's HH coefficients are pooled; odd last rows/columns are dropped."""
    x = (x[None] if x.dim() == 3 else x).float()
    H, W = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    if H < 2 or W < 2:
        raise ValueError(f"an image of {x.shape[-1]}x{x.shape[-2]} pixels is too small to estimate its noise")
    x = x[..., :H, :W]
    hh = (x[..., 0::2, 0::2] - x[..., 0::2, 1::2] - x[..., 1::2, 0::2] + x[..., 1::2, 1::2]) / 2
    return hh.abs().flatten(1).median(dim=1).values / MAD_TO_STD


ESTIMATORS = {"noise": noise_sigma}  # degradation -> strength estimate of the degraded images [B]
LADDERS = {"noise": [dict(sigma=s) for s in (0.02, 0.05, 0.1, 0.15, 0.2, 0.3)]}  # the rungs a curve is measured at


def curve_T0(curve, s):
    """T0 = curve(s): linear between the measured points, constant beyond them."""
    return float(np.interp(s, curve["strength"], curve["T0"]))


def auto_T0(meta, x):
    """(T0, strength) for one input x ([3, H, W] image or [T, 3, H, W] clip) from a prompt file's metadata;
    (None, None) when the prompt has no curve (trained at one T0, or a degradation with no estimator)."""
    if "T0_curve" not in meta:
        return None, None
    curve = json.loads(meta["T0_curve"])
    s = ESTIMATORS[curve["degradation"]](x).mean().item()
    return curve_T0(curve, s), s


def best_T0(grid, scores):
    """The T0 of the highest score, refined by the vertex of the parabola through it and its two neighbours
    (kept inside the neighbours; at an end of the grid the end itself)."""
    k = int(np.argmax(scores))
    if k in (0, len(grid) - 1):
        return float(grid[k])
    (x0, x1, x2), (y0, y1, y2) = grid[k - 1:k + 2], scores[k - 1:k + 2]
    denom = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denom
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / denom
    return float(np.clip(-b / (2 * a), x0, x2)) if a < 0 else float(grid[k])


@torch.no_grad()
def calibrate(restore, clean, degradation, grid, steps, samples, seed=0, progress=None, degraded=None, spin=0):
    """Measure the T0 curve of a prompt on validation images.

    restore(degraded [N, 3, H, W], T0, steps, samples) -> restored [N, 3, H, W]: the prompt's sampler (the mean
    of `samples` restorations of `steps` steps, fixed start noises); clean: [N, 3, H, W] validation images;
    grid: the T0 values tried; degraded: given for paired data (one rung, the pairs as they are; degradation
    is then ignored); spin: the cycle-spinning period restore uses (recorded). Returns a dict for the prompt
    file: T0 (the calibrated default, best mean PSNR over all rungs) and, where the degradation has an
    estimator, T0_curve (JSON: degradation, strength, T0, the sampler it was measured with, and the PSNR
    table it was read from)."""
    estimate = ESTIMATORS.get(degradation) if degraded is None else None
    ladder = LADDERS.get(degradation, [{}]) if estimate else [{}]  # {}: the degradation's training strengths
    strengths, best, table = [], [], []
    for r, level in enumerate(ladder):
        g = torch.Generator().manual_seed(seed * 1_000 + r)
        images = degraded if degraded is not None else (
            DEGRADATIONS[degradation](clean, generator=g, **level) if level else degrade(clean, degradation, g))
        scores = [psnr(restore(images, T0, steps, samples), clean).mean().item() for T0 in grid]
        if progress:
            progress(level, scores)
        if estimate:
            strengths.append(estimate(images).mean().item())
        best.append(best_T0(grid, scores))
        table.append([round(v, 3) for v in scores])
    mean = np.mean(table, axis=0).tolist()
    out = {"T0": round(best_T0(grid, mean), 4)}
    if estimate:
        order = np.argsort(strengths)
        out["T0_curve"] = json.dumps({"degradation": degradation, "strength": [round(strengths[i], 5) for i in order],
                                      "T0": [round(best[i], 4) for i in order], "grid": [round(g, 4) for g in grid],
                                      "sampler": {"steps": steps, "samples": samples,
                                                  **({"spin": spin} if spin and samples > 1 else {})},
                                      "levels": [ladder[i] for i in order], "psnr": [table[i] for i in order]})
    return out
