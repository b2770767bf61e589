"""Long videos in bounded memory: Wan restoration in overlapping temporal windows, blended in latent space.

A clip of T = 4n + 1 frames has 1 + n latent frames: latent 0 is frame 0 alone, latent j >= 1 is frames
4j-3 .. 4j. Window w is the 4k + 1 frames 4 m_w .. 4 m_w + 4k, read from disk and encoded as a clip of its
own (fresh causal caches). Its latents i >= 1 are the clip's latents m_w + i (the same four frames); its
latent 0 is frame 4 m_w alone, which conditions the transformer but is dropped from the blend (except in
the first window, where it is the clip's latent 0). Each window is restored with the bridge sampler (start
noise from seed + w) and its latents are blended into the clip's with linear ramps over the latents it
shares with its neighbours:

    Z[j] = sum_w r_w(j) X0_w[j - m_w] / sum_w r_w(j)

A latent that no later window touches is final: it is decoded at once (WanVAE.decode(state=) keeps the
decoder's causal caches between latents, so the clip decodes as in one call) and its frames are written
out. At any time memory holds one window of frames, one window of latents and the decoder's caches,
whatever the clip's length. When one window covers the clip, this is exactly sample.restore on the clip.
"""
import torch
import torch.nn.functional as F

from . import UserError
from .bridge import averaged


def plan_windows(n_latents, k, overlap):
    """Window starts m_w (in latents) for a clip of n_latents latents, windows of 1 + k latents whose blended
    parts (latents m_w + 1 .. m_w + k; 0 .. k for the first) share at least `overlap` latents."""
    if k < 2 or not 0 < overlap < k:
        raise UserError(f"a window of {4 * k + 1} frames needs an overlap of 4 to {4 * (k - 1)} frames "
                        f"(a multiple of 4), got {4 * overlap}")
    if n_latents <= k + 1:
        return [0]
    starts = [0]
    while starts[-1] + k < n_latents - 1:
        starts.append(min(starts[-1] + k - overlap, n_latents - 1 - k))
    return starts


def ramp(n, up, down):
    """Weights of a window's n blended latents: rising over the first `up`, falling over the last `down`,
    1 elsewhere (exactly 1 everywhere for a window with no neighbours)."""
    i = torch.arange(n, dtype=torch.float32)
    w = torch.ones(n)
    if up:
        w = torch.minimum(w, (i + 1) / (up + 1))
    if down:
        w = torch.minimum(w, (n - i) / (down + 1))
    return w


@torch.no_grad()
def restore_stream(backbone, prompts, bridge, frames, n_frames, write, steps=20, seed=0, window=81, overlap=16,
                   stats=None, samples=1):
    """Restore a clip that streams in and out: frames yields [3, H, W] in [0, 1] (n_frames of them), write(f)
    receives the restored frames [m, 3, H, W] in order (n_frames in all).

    window: frames per window (4k + 1), overlap: frames shared by neighbouring windows (a multiple of 4).
    stats: a dict that gets the most input frames held at once (`frames_held`) and the most latent frames
    held (`latents_held`), both independent of the clip's length. samples > 1 averages that many restorations
    of each window from successive start noises, in latent space (restore.restore averages decoded images).
    """
    if window % 4 != 1:
        raise UserError(f"--window must be 4k+1 frames (e.g. 33, 81), got {window}")
    if overlap % 4:
        raise UserError(f"--window-overlap must be a multiple of 4 frames, got {overlap}")
    if n_frames < 1:
        raise UserError("the clip has no frames")
    k, o = (window - 1) // 4, overlap // 4
    n_latents = 1 + (n_frames + 2) // 4  # the clip padded to 4n + 1 frames by repeating its last frame
    starts = plan_windows(n_latents, k, o)
    k = min(k, n_latents - 1)  # a clip shorter than a window is one window of its own length
    velocity = averaged([lambda x_, tau, bank=bank: backbone.velocity(x_, tau, bank) for bank in prompts])
    stats = {} if stats is None else stats
    stats.update(frames_held=0, latents_held=0)

    source, last, buffer, first = iter(frames), None, [], 0  # buffer holds frames first .. first + len - 1
    size = None

    def frame(t):  # frame t of the padded clip; frames before `first` are gone
        nonlocal last
        while first + len(buffer) <= t:
            if first + len(buffer) < n_frames:  # a frame of the clip; past its end, the last one repeated
                last = next(source, None)
                if last is None:
                    raise UserError(f"the clip has fewer frames than the {n_frames} announced")
            buffer.append(last)
            stats["frames_held"] = max(stats["frames_held"], len(buffer))
        return buffer[t - first]

    acc = weight = None  # blended latents m .. m + len - 1, not yet final
    acc_start, decoded, written, dec_state = 0, 0, 0, {}
    for w, m in enumerate(starts):
        clip = torch.stack([frame(t) for t in range(4 * m, 4 * m + 4 * k + 1)])  # [4k+1, 3, H, W]
        nxt = starts[w + 1] if w + 1 < len(starts) else None
        if nxt is not None:  # frames before the next window are no longer needed
            drop = 4 * nxt - first
            del buffer[:drop]
            first += drop
        H, W = clip.shape[-2:]
        size = size or (H, W)
        mult = backbone.multiple
        x = F.pad(clip.permute(1, 0, 2, 3)[None], (0, (-W) % mult, 0, (-H) % mult, 0, 0), mode="replicate")
        del clip
        Y = backbone.encode(x)
        del x
        g = torch.Generator().manual_seed(seed + w)
        X0 = sum(bridge.sample(velocity, Y, steps, generator=g).float() for _ in range(samples)).cpu() / samples
        # blend latents j in [lo, m + k]: lo = m + 1, or 0 for the first window
        lo = 0 if m == 0 else m + 1
        part = X0[:, :, lo - m:]
        up = (acc_start + acc.shape[2] - lo) if acc is not None else 0
        down = (m + k - starts[w + 1]) if nxt is not None else 0
        r = ramp(part.shape[2], up, down).view(1, 1, -1, 1, 1)
        if acc is None:
            acc, weight, acc_start = part * r, r.clone(), lo
        else:
            end = acc_start + acc.shape[2]
            acc[:, :, lo - acc_start:] += part[:, :, :end - lo] * r[:, :, :end - lo]
            weight[:, :, lo - acc_start:] += r[:, :, :end - lo]
            acc = torch.cat([acc, part[:, :, end - lo:] * r[:, :, end - lo:]], dim=2)
            weight = torch.cat([weight, r[:, :, end - lo:]], dim=2)
        stats["latents_held"] = max(stats["latents_held"], acc.shape[2] + X0.shape[2])
        del X0, part, Y
        final = (nxt + 1 if nxt is not None else m + k + 1) - acc_start  # latents no later window blends into
        z = acc[:, :, :final] / weight[:, :, :final]
        acc, weight, acc_start = acc[:, :, final:], weight[:, :, final:], acc_start + final
        for j in range(z.shape[2]):  # decode latent by latent, the decoder's caches carried in dec_state
            out = backbone.vae.decode(z[:, :, j:j + 1].to(backbone.device), state=dec_state).float()
            out = ((out + 1) / 2).clamp(0, 1)[0, :, :, :size[0], :size[1]].permute(1, 0, 2, 3).cpu()  # [m, 3, H, W]
            keep = out[:max(0, n_frames - written)]
            if len(keep):
                write(keep)
            written += len(keep)
            decoded += 1
    if decoded != n_latents or written != n_frames:
        raise RuntimeError(f"windowed restore decoded {decoded}/{n_latents} latents, wrote {written}/{n_frames} frames")
    return written
