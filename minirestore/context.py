"""The text context each backbone consumes, and the cached empty-prompt context the method trains on.

The learned prompt sits on top of the encoders' output for the empty prompt "" (paper.md section 3), so the
5-billion-parameter text encoders are needed once per backbone: `base_context` encodes "" on first use,
writes a small safetensors file and from then on only reads it; training and sampling never load a text
encoder. `encode_text` is the general path (text-prompt baselines), exactly as the reference pipelines run:
  FLUX (BFL `cli.py`):   txt = T5("" padded to 512 dev / 256 schnell, no attention mask) [B, L, 4096],
                         y   = CLIP pooled output at the first EOS (77 tokens, no mask)  [B, 768];
  Wan 2.1 (`t5.py`):     context = umT5 with the mask, real tokens (incl. EOS) kept, the rest zero [B, L, 4096],
                         L = 512 in the official pipeline, 226 in the paper's released Wan prompts.
"""
import gc
import hashlib
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import UserError, hub
from .files import atomic_write
from .tokenizers import wan_clean

# model name -> text-encoder family and default T5 length
TEXT_MODELS = {
    "flux-dev": ("flux", 512),
    "flux-schnell": ("flux", 256),
    "wan2.1-t2v-1.3b": ("wan", 512),
    "wan2.1-t2v-14b": ("wan", 512),
}
CONTEXT_FORMAT = "1"  # bump when the meaning of a cached file changes


def _family(model_name):
    if model_name not in TEXT_MODELS:
        raise UserError(f"{model_name}: unknown model name for text encoding (known: {', '.join(TEXT_MODELS)})")
    return TEXT_MODELS[model_name]


def _device_dtype(device, dtype):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # The references run bf16; fp32 on a CPU, where bf16 matmuls are slow.
    return device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


@torch.no_grad()
def encode_text(model_name, prompts=("",), length=None, source=None, device=None, dtype=None):
    """Prompts -> the text tensors `model_name`'s backbone consumes (see the module docstring).

    source: where the encoders and tokenizers come from; None means the model's Hub repo, else a local
    folder laid out like it (text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/). Each encoder is
    loaded, used once and freed.
    """
    family, default_length = _family(model_name)
    length = length or default_length
    src = model_name if source is None else source
    device, dtype = _device_dtype(device, dtype)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)

    if family == "flux":
        ids, _ = hub.load_t5_tokenizer(src, max_length=length)(prompts)
        t5 = hub.load_t5(src, device=device, dtype=dtype)
        txt = t5(ids.to(device))  # unmasked: the padding is part of the input, as the reference runs it
        del t5
        ids, _ = hub.load_clip_tokenizer(src)(prompts)
        clip = hub.load_clip(src, device=device, dtype=dtype)
        _, y = clip(ids.to(device))
        del clip
        return {"txt": txt, "y": y}

    ids, mask = hub.load_t5_tokenizer(src, max_length=length)([wan_clean(p) for p in prompts])
    t5 = hub.load_t5(src, device=device, dtype=dtype)
    ids, mask = ids.to(device), mask.to(device)
    context = t5(ids, mask).masked_fill(mask[..., None] == 0, 0.0)  # [B, L, 4096]: trimmed, zero-padded
    del t5
    return {"context": context}


# ---------------------------------------------------------------------------------------------
# Context files: plain safetensors with string metadata
# ---------------------------------------------------------------------------------------------

def save_context(path, tensors, meta=None):
    """Write a context file atomically (files.atomic_write): a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (meta or {}).items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_context(path):
    """A context file -> (tensors, metadata); UserError if it cannot be read whole."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:
        raise UserError(f"{path} is not a readable context file ({type(e).__name__}: {e})") from None


def context_path(model_name, length=None, source=None, cache_dir=None):
    """Where the empty-prompt context of (model, source, length) is cached.

    The Hub source is keyed "main" (the repo's current revision at the time it was built); a local source by a
    hash of its absolute path. Directory: cache_dir, else $MINIRESTORE_CACHE, else ~/.cache/minirestore.
    """
    _, default_length = _family(model_name)
    if source is None:
        rev = "main"
    else:
        where = Path(str(source)).expanduser()
        key = str(where.resolve()) if where.exists() else str(source)
        rev = "local-" + hashlib.sha1(key.encode()).hexdigest()[:10]
    root = Path(cache_dir or os.environ.get("MINIRESTORE_CACHE") or Path.home() / ".cache" / "minirestore")
    return root.expanduser() / f"context-{model_name}-{rev}-{length or default_length}.safetensors"


def _check(tensors, meta, model_name, length, official):
    """Why a cached context cannot be used, or None: wrong keys, shapes, values or metadata."""
    family, _ = _family(model_name)
    # key -> expected shape; None where a local (e.g. tiny) encoder decides the width
    expected = ({"txt": (1, length, 4096 if official else None), "y": (1, 768 if official else None)}
                if family == "flux" else {"context": (1, length, 4096 if official else None)})
    if set(tensors) != set(expected):
        return f"holds {sorted(tensors)}, expected {sorted(expected)}"
    for k, shape in expected.items():
        got = tuple(tensors[k].shape)
        if len(got) != len(shape) or any(e is not None and g != e for g, e in zip(got, shape)):
            return f"{k} has shape {got}, expected {tuple('*' if e is None else e for e in shape)}"
        if not torch.isfinite(tensors[k]).all():
            return f"{k} holds non-finite values"
    if meta.get("model") != model_name or meta.get("length") != str(length) or meta.get("format") != CONTEXT_FORMAT:
        return f"was written for {meta.get('model')} at length {meta.get('length')} (format {meta.get('format')})"
    return None


def base_context(model_name, length=None, source=None, cache_dir=None, device=None, dtype=None):
    """The empty-prompt context of `model_name` (encode_text(model_name, [""])) as fp32 CPU tensors, cached.

    The first call loads the text encoder(s), encodes "", frees them and writes the cache file; later calls
    only read it. A cache file that is unreadable or does not fit is reported in one line and rebuilt.
    """
    _, default_length = _family(model_name)
    length = length or default_length
    path = context_path(model_name, length, source, cache_dir)
    if path.exists():
        try:
            tensors, meta = load_context(path)
            problem = _check(tensors, meta, model_name, length, official=source is None)
        except UserError as e:
            problem = str(e)
        if problem is None:
            return tensors
        print(f"the cached context {path} cannot be used ({problem.removeprefix(str(path) + ' ')}); rebuilding it")

    what = "T5 and CLIP" if model_name.startswith("flux") else "umT5"
    print(f"encoding the empty prompt with {what} of {source or model_name} once; cached at {path}")
    device, dtype = _device_dtype(device, dtype)
    tensors = {k: v.float().cpu() for k, v in encode_text(model_name, [""], length, source, device, dtype).items()}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    meta = {"model": model_name, "length": length, "source": source or model_name, "dtype": str(dtype).split(".")[-1],
            "format": CONTEXT_FORMAT}
    save_context(path, tensors, meta)
    return tensors
