"""The frozen backbone as the method sees it: images <-> latents, and a velocity with a prompt.

The method (bridge.py, train.py, sample.py) needs four things from a pre-trained diffusion model:
  encode(images) -> latents X0 / Y        the frozen VAE (fp32, as the released code keeps it)
  decode(latents) -> images
  velocity(x, tau, prompt) -> v           the frozen transformer at its own time tau, conditioned on
                                          the cached empty-prompt context, with the learned prompt added
  new_prompt() -> PromptBank              P [1, K, D] and one alpha per block, sized for this backbone
`load_backbone` builds one from a Hub model name (e.g. "flux-dev") or a local folder holding
`flux.safetensors` (BFL keys), `ae.safetensors` and `context.safetensors` (`txt`, `y`).
"""
from dataclasses import dataclass
from pathlib import Path

import torch

from . import UserError, hub
from .prompts import PromptBank

FLUX_MODELS = ("flux-dev", "flux-schnell")


@dataclass
class Backbone:
    name: str                # written into prompt files; prompts only load on the backbone they were trained on
    model: torch.nn.Module   # frozen transformer
    vae: torch.nn.Module     # frozen autoencoder
    context: dict            # the empty-prompt context: FLUX {"txt": [1, K, 4096], "y": [1, 768]}
    multiple: int = 16       # image sides must be multiples of this (8x VAE, then 2x2 patches)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    @property
    def K(self):
        return self.context["txt"].shape[1]

    @property
    def D(self):
        return self.model.config.hidden_size

    @property
    def n_blocks(self):
        return self.model.config.depth + self.model.config.depth_single_blocks

    def new_prompt(self, generator=None):
        return PromptBank(self.K, self.D, self.n_blocks, generator=generator).to(self.device)

    @torch.no_grad()
    def encode(self, images):
        """Images [B, 3, H, W] in [0, 1] -> latents [B, 16, H/8, W/8] (fp32)."""
        return self.vae.encode(images.to(self.device, torch.float32) * 2 - 1).float()

    @torch.no_grad()
    def decode(self, latents):
        """Latents -> images in [0, 1] (fp32, clamped)."""
        return ((self.vae.decode(latents.to(self.device, torch.float32)).float() + 1) / 2).clamp(0, 1)

    def velocity(self, x, tau, prompt=None):
        """v = F(x, tau) for latents x [B, 16, h, w] and model times tau [B] in [0, 1]; fp32 out.

        FLUX-dev is guidance-distilled: the released code feeds guidance 1.0 (paper.md 2), no CFG.
        """
        from .flux import pack, prepare_ids, unpack

        B, _, h, w = x.shape
        img = pack(x.to(self.device, self.dtype))
        img_ids, txt_ids = prepare_ids(B, h, w, self.K, device=self.device)
        txt = self.context["txt"].to(self.device, self.dtype).expand(B, -1, -1)
        y = self.context["y"].to(self.device, self.dtype).expand(B, -1)
        guidance = torch.ones(B, device=self.device, dtype=self.dtype) if self.model.config.guidance_embed else None
        v = self.model(img, img_ids, txt, txt_ids, tau.to(self.device, self.dtype), y, guidance, prompt=prompt)
        return unpack(v.float(), h, w)


def load_backbone(source, device="cpu", dtype=torch.float32):
    """A Hub model name ("flux-dev", "flux-schnell") or a local backbone folder -> Backbone."""
    folder = Path(str(source)).expanduser()
    if folder.is_dir():
        files = {n: folder / f"{n}.safetensors" for n in ("flux", "ae", "context")}
        missing = [str(f) for f in files.values() if not f.exists()]
        if missing:
            raise UserError(f"{folder} is not a backbone folder: missing {', '.join(missing)} "
                            "(a backbone folder holds flux.safetensors, ae.safetensors and context.safetensors)")
        from .context import load_context

        context, meta = load_context(files["context"])
        if set(context) != {"txt", "y"}:
            raise UserError(f"{files['context']} must hold `txt` and `y`, it holds {', '.join(sorted(context))}")
        model = hub.load_flux(files["flux"], device=device, dtype=dtype)
        vae = hub.load_autoencoder(files["ae"], device=device, dtype=torch.float32)
        name = meta.get("backbone") or folder.name
    elif str(source) in FLUX_MODELS:
        from .context import base_context

        context = base_context(str(source))
        model = hub.load_flux(str(source), device=device, dtype=dtype)
        vae = hub.load_autoencoder(str(source), device=device, dtype=torch.float32)
        name = str(source)
    else:
        raise UserError(f"{source}: not a backbone folder and not a known model "
                        f"(known: {', '.join(FLUX_MODELS)})")
    context = {k: v.to(device) for k, v in context.items()}
    if context["txt"].shape[-1] != model.config.context_in_dim or context["y"].shape[-1] != model.config.vec_in_dim:
        raise UserError(f"the context of {source} ({list(context['txt'].shape)}, {list(context['y'].shape)}) does "
                        "not fit its transformer: rebuild it from the matching text encoders")
    multiple = 2 ** (len(vae.config.ch_mult) - 1) * 2  # VAE downsampling, then 2x2 patches
    return Backbone(name=name, model=model, vae=vae, context=context, multiple=multiple)
