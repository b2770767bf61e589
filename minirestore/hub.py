"""The loaders' public names in one place: `from minirestore.hub import load_flux, load_t5, load_wan, ...`.

This file only gathers; the code lives downhill of it:
    loading.py    files, folders, the Hub and its offline cache, Checkpoint, streaming into meta models
    hub_flux.py   the FLUX.1 transformer and autoencoder            (imports loading)
    hub_text.py   T5 / umT5 and CLIP text encoders, their tokenizers (imports loading)
    hub_wan.py    the Wan 2.1 transformer and VAE                   (imports loading)
None of them imports this file.
"""
from .hub_flux import (  # noqa: F401
    AE_HUB, FLUX_HUB, TINY_DIR, autoencoder_config_from_shapes, flux_config_from_shapes, flux_diffusers_map,
    load_autoencoder, load_flux,
)
from .hub_text import (  # noqa: F401
    CLIP_HUB, CLIP_TOKENIZER_HUB, T5_HUB, T5_TOKENIZER_HUB, clip_config_from_shapes, load_clip, load_clip_tokenizer,
    load_t5, load_t5_tokenizer, t5_config_from_shapes,
)
from .hub_wan import (  # noqa: F401
    WAN_DIFFUSERS_RULES, WAN_HUB, WAN_VAE_PTH, WAN_VAE_SAFETENSORS, load_wan, load_wan_vae, wan_config_from_shapes,
    wan_diffusers_key, wan_vae_config_from_shapes, wan_vae_diffusers_key,
)
from .loading import (  # noqa: F401
    KINDS, Checkpoint, TorchCheckpoint, describe, hub_file, hub_folder, hub_message, load_model, resolve,
    safetensors_files,
)
