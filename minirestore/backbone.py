"""The frozen backbone as the method sees it: images <-> latents, and a velocity with a prompt.

The method (bridge.py, train.py, sample.py) needs four things from a pre-trained diffusion model:
  encode(images) -> latents X0 / Y        the frozen codec (VAE in fp32, as the released code keeps it)
  decode(latents) -> images
  velocity(x, tau, prompt) -> v           the frozen transformer at its own time tau in [0, 1],
                                          conditioned on the cached empty-prompt context, with the
                                          learned prompt added
  new_prompt() -> PromptBank              P [1, K, D] and one alpha per block, sized for this backbone
Two families sit behind it:
  FLUX.1  latents [B, 16, H/8, W/8] (or the tiny model's pixel codec), packed into 2x2 tokens;
          context {"txt", "y"}; guidance 1.0 for the guidance-distilled dev model (paper.md 2).
  Wan 2.1 latents [B, 16, 1 + (F-1)/4, H/8, W/8] (an image is a clip of one frame); context
          {"context"}; the model reads time on its 0..1000 scale.
`load_backbone` builds one from a model name or a local folder holding the transformer
(`flux.safetensors` or `wan.safetensors`), the codec (`ae.safetensors` / `vae.safetensors`, none for
the pixel codec) and `context.safetensors`. weights="fp8" stores the transformer blocks' linears in float8
e4m3 with per-channel scales, quantised while loading (fp8.py); "auto" does so on a GPU too small for the
bf16 transformer. offload="blocks" keeps the transformer blocks in CPU memory and streams them to the GPU
one at a time (offload.py).
"""
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import UserError, hub
from .loading import resolve, weights_file
from .prompts import PromptBank

FLUX_MODELS = ("flux-dev", "flux-schnell")
WAN_MODELS = ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b")
WAN_CONTEXT_LENGTH = 226  # the released Wan prompts are [1, 226, 1536]; the official pipeline pads to 512
TINY_DIR = hub.TINY_DIR


@dataclass
class Backbone:
    name: str                # written into prompt files; prompts only load on the backbone they were trained on
    kind: str                # "flux" or "wan"
    model: torch.nn.Module   # frozen transformer
    vae: torch.nn.Module     # frozen codec: encode(x in [-1, 1]) -> z, decode(z) -> x
    context: dict            # the empty-prompt context (FLUX: txt, y; Wan: context)
    multiple: int = 16       # image sides must be multiples of this (codec downsampling, then 2x2 patches)
    _wan_context: object = field(default=None, repr=False)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    @property
    def K(self):
        return (self.context["txt"] if self.kind == "flux" else self.context["context"]).shape[1]

    @property
    def D(self):
        return self.model.config.hidden_size if self.kind == "flux" else self.model.config.dim

    @property
    def n_blocks(self):
        c = self.model.config
        return c.depth + c.depth_single_blocks if self.kind == "flux" else c.num_layers

    def new_prompt(self, generator=None):
        return PromptBank(self.K, self.D, self.n_blocks, generator=generator).to(self.device)

    @torch.no_grad()
    def encode(self, images, generator=None):
        """Images [B, 3, H, W] (or Wan clips [B, 3, F, H, W]) in [0, 1] -> latents (fp32): the posterior mean,
        or with a generator a posterior sample (protocol.py)."""
        x = images.to(self.device, torch.float32) * 2 - 1
        if self.kind == "wan" and x.dim() == 4:
            x = x[:, :, None]  # an image is a clip of one frame
        return self.vae.encode(x, sample=generator is not None, generator=generator).float()

    @torch.no_grad()
    def decode(self, latents):
        """Latents -> images [B, 3, H, W] (a one-frame Wan clip comes back as an image) or clips, in [0, 1]."""
        x = self.vae.decode(latents.to(self.device, torch.float32)).float()
        if self.kind == "wan" and x.shape[2] == 1:
            x = x[:, :, 0]
        return ((x + 1) / 2).clamp(0, 1)

    def velocity(self, x, tau, prompt=None):
        """v = F(x, tau) for latents x and model times tau [B] in [0, 1]; fp32 out, x's shape."""
        if self.kind == "wan":
            if self._wan_context is None:  # the base keys/values of the constant null context, once
                with torch.no_grad():
                    self._wan_context = self.model.precompute_context(self.context["context"].to(self.device))
            # The released code feeds the nearest of 1000 scheduler timesteps; tau x 1000 is that, unrounded
            # (protocol.py feeds it exactly). The product in float64 rounds to fp32 once, as fp32 would.
            t = (tau.to(self.device).double() * 1000).float()
            return self.model(x.to(self.device), t, self._wan_context, prompt).float()
        from .flux import pack, prepare_ids, unpack

        B, _, h, w = x.shape
        img = pack(x.to(self.device, self.dtype))
        img_ids, txt_ids = prepare_ids(B, h, w, self.K, device=self.device)
        txt = self.context["txt"].to(self.device, self.dtype).expand(B, -1, -1)
        y = self.context["y"].to(self.device, self.dtype).expand(B, -1)
        guidance = torch.ones(B, device=self.device, dtype=self.dtype) if self.model.config.guidance_embed else None
        v = self.model(img, img_ids, txt, txt_ids, tau.to(self.device, self.dtype), y, guidance, prompt=prompt)
        return unpack(v.float(), h, w)


WEIGHTS = ("auto", "dtype", "fp8")


def transformer_bytes(source):
    """The transformer's size in bf16 bytes, from the known models' sizes or the folder's file (None if unknown)."""
    if str(source) in hub.FLUX_HUB:
        return hub.FLUX_HUB[str(source)][2]
    if str(source) in hub.WAN_HUB:
        return hub.WAN_HUB[str(source)][2] / 2  # the released files are fp32
    folder = TINY_DIR if str(source) == "tiny" else Path(str(source)).expanduser()
    for stem in ("flux", "wan"):
        f = weights_file(folder, stem)
        if f.exists():
            return sum(shard.stat().st_size for shard in resolve(f))
    return None


def pick_weights(weights, source, device):
    """--weights auto -> "fp8" on a GPU whose free memory is under 1.5 x the bf16 transformer (room for the
    activations, the codec and the prompt's backward), else "dtype"; CPU: "dtype" (fp8 there saves memory, not time)."""
    if weights not in WEIGHTS:
        raise UserError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights}")
    if weights != "auto":
        return weights
    return "fp8" if _short_of_memory(source, device, 1.5) else "dtype"


OFFLOAD = ("auto", "none", "blocks")


def pick_offload(offload, source, device, weights):
    """--offload auto -> "blocks" on a GPU whose free memory is under 1.2 x the transformer's weights (in the
    chosen format: fp8 about 0.6 of bf16), else "none"; CPU: "none"."""
    if offload not in OFFLOAD:
        raise UserError(f"--offload must be one of {', '.join(OFFLOAD)}, got {offload}")
    if offload != "auto":
        return offload
    return "blocks" if _short_of_memory(source, device, 1.2 * (0.6 if weights == "fp8" else 1.0)) else "none"


def add_memory_flags(p):
    """--weights and --offload on an argparse parser, shared by train.py and sample.py (pick_weights, pick_offload)."""
    p.add_argument("--weights", choices=WEIGHTS, default="auto", help="the frozen transformer's "
                   "weights: fp8 stores its blocks' linears in float8 e4m3 with per-channel scales (half of bf16); auto: "
                   "fp8 on a GPU with less free memory than 1.5x the bf16 transformer, else --dtype (default auto)")
    p.add_argument("--offload", choices=OFFLOAD, default="auto", help="blocks: the transformer "
                   "blocks stay in pinned CPU memory and are copied to the GPU one ahead on a side stream (outputs "
                   "identical); auto: blocks on a GPU with less free memory than 1.2x the weights, else none (default auto)")


def _short_of_memory(source, device, factor):
    """Whether the GPU's free memory is under `factor` x the bf16 transformer's size; False on the CPU or
    when the size is unknown (what the auto choices above fall back to)."""
    size = transformer_bytes(source)
    if not str(device).startswith("cuda") or size is None:
        return False
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return free < factor * size


def _load_folder(folder, device, dtype, quantise=None):
    from .context import load_context

    ctx_file = folder / "context.safetensors"
    if not ctx_file.exists():
        raise UserError(f"{folder} is not a backbone folder: it has no context.safetensors (a backbone folder "
                        "holds flux.safetensors or wan.safetensors, its codec and context.safetensors)")
    context, meta = load_context(ctx_file)
    name = meta.get("backbone") or folder.name
    flux_file = weights_file(folder, "flux")  # flux.safetensors, or its shards' index
    if flux_file.exists():
        model = hub.load_flux(flux_file, device=device, dtype=dtype, quantise=quantise)
        if (folder / "ae.safetensors").exists():
            vae = hub.load_autoencoder(folder / "ae.safetensors", device=device, dtype=torch.float32)
        elif meta.get("codec") == "pixel2":
            from .tiny import PixelCodec

            vae = PixelCodec().to(device)
        else:
            raise UserError(f"{folder} has no ae.safetensors and its context names no pixel codec")
        return "flux", name, model, vae, context
    if (folder / "wan.safetensors").exists():
        model = hub.load_wan(folder / "wan.safetensors", device=device, dtype=dtype, quantise=quantise)
        vae_file = next((f for f in (folder / "vae.safetensors", folder / "Wan2.1_VAE.pth") if f.exists()), None)
        if vae_file is None:
            raise UserError(f"{folder} has wan.safetensors but no vae.safetensors")
        return "wan", name, model, hub.load_wan_vae(vae_file, device=device, dtype=torch.float32), context
    raise UserError(f"{folder} is not a backbone folder: it has neither flux.safetensors nor wan.safetensors")


def is_wan(source):
    """Whether a model name or folder is a Wan backbone (read from names only; loads nothing)."""
    return str(source) in WAN_MODELS or (Path(str(source)).expanduser() / "wan.safetensors").exists()


def load_backbone(source, device="cpu", dtype=torch.float32, weights="dtype", offload="none"):
    """A model name ("tiny", "flux-dev", "flux-schnell", "wan2.1-t2v-1.3b", ...) or a backbone folder.

    weights: "dtype" (the transformer in `dtype`), "fp8" (its blocks' linears in float8 e4m3, the rest in
    `dtype`; fp8.py) or "auto" (pick_weights). offload: "none", "blocks" (the blocks stay on the host and
    visit `device` one at a time; offload.py) or "auto" (pick_offload)."""
    from . import fp8

    weights = pick_weights(weights, source, device)
    quantise = fp8.targets if weights == "fp8" else None
    offload = pick_offload(offload, source, device, weights)
    target, device = device, ("cpu" if offload == "blocks" else device)  # offload: load on the host first
    folder = TINY_DIR if str(source) == "tiny" else Path(str(source)).expanduser()
    if folder.is_dir():
        kind, name, model, vae, context = _load_folder(folder, device, dtype, quantise)
    elif str(source) == "tiny":
        raise UserError(f"the tiny default backbone is not in {TINY_DIR}: reproduce it with "
                        "`python -m minirestore.pretrain` or check out the repository's weights/")
    elif str(source) in FLUX_MODELS:
        from .context import base_context

        kind, name = "flux", str(source)
        context = base_context(name)
        model = hub.load_flux(name, device=device, dtype=dtype, quantise=quantise)
        vae = hub.load_autoencoder(name, device=device, dtype=torch.float32)
    elif str(source) in WAN_MODELS:
        from .context import base_context

        kind, name = "wan", str(source)
        context = base_context(name, length=WAN_CONTEXT_LENGTH)
        model = hub.load_wan(name, device=device, dtype=dtype, quantise=quantise)
        vae = hub.load_wan_vae(name, device=device, dtype=torch.float32)
    else:
        raise UserError(f"{source}: not a backbone folder and not a known model "
                        f"(known: tiny, {', '.join(FLUX_MODELS + WAN_MODELS)})")
    if offload == "blocks":
        from .offload import offload_blocks

        vae.to(target)
        offload_blocks(model, target)
        device = target
    context = {k: v.to(device) for k, v in context.items()}
    if kind == "flux":
        c = model.config
        if set(context) != {"txt", "y"}:
            raise UserError(f"the context of {source} must hold `txt` and `y`, it holds {', '.join(sorted(context))}")
        if context["txt"].shape[-1] != c.context_in_dim or context["y"].shape[-1] != c.vec_in_dim:
            raise UserError(f"the context of {source} ({list(context['txt'].shape)}, {list(context['y'].shape)}) "
                            "does not fit its transformer: rebuild it from the matching text encoders")
        multiple = vae.downsample_factor * 2  # codec downsampling, then 2x2 patches
    else:
        if set(context) != {"context"} or context["context"].shape[-1] != model.config.text_dim:
            raise UserError(f"the context of {source} must hold `context` [1, L, {model.config.text_dim}]")
        multiple = vae.config.spatial_factor * model.config.patch_size[1]
    return Backbone(name=name, kind=kind, model=model, vae=vae, context=context, multiple=multiple)
