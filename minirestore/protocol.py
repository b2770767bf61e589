"""The released inference protocol (YPT `inference.py`, `run_single.py`) as inputs to minirestore's one sampler.

minirestore's native protocol restores an image at its own size from the posterior *mean* and feeds the
frozen model the continuous bridge time t. The released code differs at every point below, and each one
changes the output; `--protocol ypt` (evaluate.py, sample.py) switches them all on. The sampler itself is
the same `Bridge.sample` either way: the protocol only changes what goes in (the image size, the latents,
the model's time, the start noise) and how the output is written.

  size         bicubic resize to 1024 x 1024 (FLUX) or 480 x 832 (Wan) whatever the aspect, target too
               (torchvision Resize on a PIL image = PIL's BICUBIC, no EXIF rotation); outputs stay that size.
               Clips: the first 33 frames.
  latents      sampled from the VAE posterior, Y = mu + sigma * n (diffusers `latent_dist.sample()`), n from
               the default CUDA generator after `set_seed(123)`: drawn for the input, then for the target
               (encoded for a latent loss), item after item, so `posterior_stream` replays that order.
  model time   the scheduler's timestep nearest to t, not t. FLUX: FlowMatchEulerDiscrete(shift 1) set to 1000
               steps, timesteps 1000, 999, ..., 1 and sigma = timestep / 1000, fed as timestep / 1000. Wan: UniPC with flow
               sigmas, sigma_k = 0.999 (1000 - k) / 1000 and timestep_k = int64(1000 sigma_k): 399 at t = 0.4,
               0 at t_min. Only the model's input changes: x0_hat = X - t v and the re-projection keep t.
  start noise  eps_0 ~ N(0, I) from a fresh generator on the device seeded 42, for every image.
  output       clamp, (x + 1) / 2, (x * 255).byte(): truncation, not rounding; JPEG at PIL's default quality
               (75); video 12 fps.
  metrics      on the float output (not the JPEG), prediction and target bicubic-resized to 512 x 512
               (F.interpolate, no antialias) and clamped to [0, 1]; clips averaged over frames.
  precision    fp16 weights (the release runs fp16 weights under autocast); the VAE in fp32.

The two schedulers' grids below are written from diffusers 0.33.1 (the release's pin), whose UniPC flow
sigmas differ from later versions'.
"""
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from . import UserError

SIZES = {"flux": (1024, 1024), "wan": (480, 832)}  # (H, W) the release resizes every input to
FRAMES = 33                                        # clips: the first 33 frames (9 latent frames)
START_SEED = 42                                    # the sampler's own generator, per image
POSTERIOR_SEED = 123                               # the release's global seed (set_seed)
METRIC_SIZE = 512                                  # predictions and targets are scored at 512 x 512
FPS = 12


# -- the model's time: the nearest scheduler timestep -----------------------------------------------

@lru_cache(maxsize=None)
def scheduler_grid(kind):
    """(sigmas [1001] fp32, timesteps [1000]) of the release's scheduler after set_timesteps(1000).

    FLUX FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0): its constructor's smallest
    sigma is 1/1000 in fp32, set_timesteps spaces 1000 timesteps linearly from 1000 down to 1000 * that
    (float64), sigma = timestep / 1000 in fp32, timesteps = 1000 * sigma (fp32), then a terminal sigma 0.
    Wan UniPCMultistepScheduler(flow_prediction, use_flow_sigmas, flow_shift=1.0): alphas = linspace(1,
    1/1000, 1001), sigmas = flip(1 - alphas) without its last (0), timesteps = int64(1000 sigma) (truncated,
    from the float64 sigmas), then a terminal sigma 0 (final_sigmas_type "zero")."""
    if kind == "flux":
        sigma_min = float(torch.tensor(1.0) / 1000)  # fp32 0.001
        sigmas = torch.from_numpy(np.linspace(1000.0, sigma_min * 1000, 1000) / 1000).float()
        return torch.cat([sigmas, torch.zeros(1)]), sigmas * 1000
    if kind == "wan":
        sigmas = np.flip(1.0 - np.linspace(1, 1 / 1000, 1001))[:-1].copy()
        timesteps = torch.from_numpy((sigmas * 1000).astype(np.int64))
        return torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32)), timesteps
    raise ValueError(f"unknown backbone kind {kind!r}")


def scheduler_time(kind, tau):
    """Model times tau [B] -> what the release feeds the model, on minirestore's 0..1 scale.

    k = argmin_k |sigma_k - tau| over the 1001 sigmas (fp32), clamped to the last of the 1000 timesteps
    (the terminal sigma 0 maps there), t_idx = timesteps[k]. FLUX reads t_idx / 1000 (fp32, as the
    release divides). Wan reads t_idx itself: returned as t_idx / 1000 in float64, so that the backbone's
    tau * 1000 gives the integer back exactly (in fp32 ten of the 1001 integers would not survive)."""
    sigmas, timesteps = (g.to(tau.device) for g in scheduler_grid(kind))
    k = (sigmas[None, :] - tau.float()[:, None]).abs().argmin(dim=1).clamp(max=len(timesteps) - 1)
    t_idx = timesteps[k]
    return t_idx.float() / 1000.0 if kind == "flux" else t_idx.double() / 1000


# -- the noise: a fresh start-noise generator per image, one posterior stream per run --------------

def start_generator(device):
    """The sampler's eps_0 generator: on the device, seeded 42, new for every image."""
    return torch.Generator(device=device).manual_seed(START_SEED)


class PosteriorStream:
    """The posterior noise n of Y = mu + sigma n, in the release's order: one generator seeded 123, two
    draws per scored item (its input, then its target, of the same latent shape). `skip(shape)` passes an
    item another process (or an earlier run) restores, so every item gets the noise of its place in the list."""

    def __init__(self, device):
        self.generator = torch.Generator(device=device).manual_seed(POSTERIOR_SEED)
        self.device = device

    def skip(self, latent_shape, draws=1):
        for _ in range(draws):
            torch.randn(latent_shape, generator=self.generator, device=self.device)


# -- inputs and outputs ------------------------------------------------------------------------------

def load_resized(path, size):
    """An image file -> [3, H, W] in [0, 1], bicubic-resized to size (H, W) as the release loads it:
    PIL convert("RGB") (no EXIF rotation), Image.resize(BICUBIC), / 255."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size[1], size[0]), Image.BICUBIC)
    except FileNotFoundError:
        raise UserError(f"{path}: no such image file") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1).contiguous()


def resize_frames(x, size):
    """Frames [T, 3, h, w] in [0, 1] (read from 8-bit files) -> [T, 3, H, W], each as load_resized resizes."""
    frames = [Image.fromarray(to_uint8(f, round=True).permute(1, 2, 0).numpy()).resize((size[1], size[0]), Image.BICUBIC)
              for f in x.cpu()]
    return torch.stack([torch.from_numpy(np.asarray(f, dtype=np.float32) / 255).permute(2, 0, 1) for f in frames])


def to_uint8(x, round=False):
    """[..., 3, H, W] in [0, 1] -> uint8 by truncation, the release's (x * 255).byte() (round: the nearest)."""
    x = x.clamp(0, 1) * 255
    return (x.round() if round else x).byte()


def save_jpeg(x, path):
    """One image [3, H, W] in [0, 1] -> JPEG at PIL's default quality, truncated to uint8 first."""
    from .data import atomic_save

    atomic_save(Image.fromarray(to_uint8(x).permute(1, 2, 0).cpu().numpy()), path, "JPEG")


def metric_view(x):
    """Prediction or target [N, 3, H, W] -> what the release scores: bicubic to 512 x 512 (no antialias)."""
    if x.shape[-2:] == (METRIC_SIZE, METRIC_SIZE):
        return x.clamp(0, 1)
    return F.interpolate(x.float(), size=(METRIC_SIZE, METRIC_SIZE), mode="bicubic").clamp(0, 1)
