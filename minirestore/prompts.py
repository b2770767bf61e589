"""The learned prompt: one shared embedding P and one gate alpha_l per transformer block (paper.md 3.1).

    P      [1, K, D]   K = the backbone's text length, D = its width; init N(0, 0.02^2)
    alpha  [n_blocks]  init 0, so step 0 is exactly the frozen model

These are the only trainable tensors of the method. The backbone adds them where its text context
enters attention (FLUX: `txt_mod + alpha_l * P` in double blocks, `alpha_l * P` on the text rows of
single blocks; Wan: `CA(h, c) + alpha_l * CA(h, c + P)`), through its `prompt=` argument.

File format: safetensors with `prompt`, `alpha` and string metadata (backbone, K, D, degradation,
bridge, T0, steps, version). `python -m minirestore.prompts import IN.pt OUT.safetensors` converts a
checkpoint of the official release (a pickle dict with `backend`, `deep_prompt_bank.prompts`, `alphas`).
"""
import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from safetensors import safe_open
from safetensors.torch import save_file

from . import UserError, __version__
from .files import atomic_write


class PromptBank(nn.Module):
    def __init__(self, K, D, n_blocks, std=0.02, generator=None):
        super().__init__()
        self.prompt = nn.Parameter(torch.randn(1, K, D, generator=generator) * std)  # P
        self.alpha = nn.Parameter(torch.zeros(n_blocks))  # alpha_l, one per block
        self.meta = {}

    @property
    def K(self):
        return self.prompt.shape[1]

    @property
    def D(self):
        return self.prompt.shape[2]

    @property
    def n_blocks(self):
        return self.alpha.shape[0]


def save_prompt(bank, path, **meta):
    """Write a prompt file atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {**bank.meta, **meta, "K": bank.K, "D": bank.D, "n_blocks": bank.n_blocks, "version": __version__}
    tensors = {"prompt": bank.prompt.detach().float().cpu().contiguous(),
               "alpha": bank.alpha.detach().float().cpu().contiguous()}
    return _write(tensors, path, info)


def _write(tensors, path, meta):
    """Tensors and metadata (values as strings) -> path, atomically (files.atomic_write), so a crash never
    leaves half a prompt file."""
    meta = {k: str(v) for k, v in meta.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _read(path):
    """A prompt file's (metadata, tensors), or a one-line UserError when it cannot be read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise UserError(f"{path} is not a readable prompt file ({e})") from None


def update_prompt_meta(src, dst, **changes):
    """Write prompt file src to dst (src itself allowed) atomically with the metadata entries `changes` set:
    its tensors (bytes, dtypes) and every other entry exactly as stored (train.py --recalibrate)."""
    meta, tensors = _read(src)
    return _write(tensors, Path(dst), {**meta, **changes})


def load_prompt(path, backbone=None, K=None, D=None, n_blocks=None):
    """Read a prompt file; check it fits the backbone (name, length K, width D, number of blocks) when given."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist: train one with train.py or pass --prompt FILE")
    meta, tensors = _read(path)
    if set(tensors) != {"prompt", "alpha"}:
        raise UserError(f"{path} is not a prompt file: it holds {', '.join(sorted(tensors)) or 'nothing'} "
                        "instead of `prompt` and `alpha`")
    P, alpha = tensors["prompt"].float(), tensors["alpha"].float()
    if P.dim() != 3 or alpha.dim() != 1:
        raise UserError(f"{path}: prompt must be [1, K, D] and alpha [n_blocks], got {list(P.shape)} and "
                        f"{list(alpha.shape)}")
    name = meta.get("backbone")
    if backbone is not None and name is not None and name != backbone:
        raise UserError(f"{path} was trained for the backbone {name}, not {backbone}: pass --model {name} "
                        "or a prompt trained for this backbone")
    if K is not None and K != P.shape[1]:  # the release pads/cuts a FLUX prompt to 512 silently; we say so
        raise UserError(f"{path} does not fit the backbone {backbone or ''}: its prompt length K is {P.shape[1]} "
                        f"tokens, the backbone's text context is {K} (FLUX 512, Wan 226): use a prompt made for it")
    for what, want, have in [("width D", D, P.shape[2]), ("number of blocks", n_blocks, alpha.shape[0])]:
        if want is not None and want != have:
            raise UserError(f"{path} does not fit the backbone {backbone or ''}: its {what} is {have}, "
                            f"the backbone's is {want}")
    bank = PromptBank(P.shape[1], P.shape[2], alpha.shape[0])
    with torch.no_grad():
        bank.prompt.copy_(P)
        bank.alpha.copy_(alpha)
    bank.meta = meta
    return bank


# The official release (github.com/sudraj2002/YPT, ckpts/{flux,wan}_<degradation>.pt); paper.md 3.1.
OFFICIAL_BACKENDS = {"wan": "wan2.1-t2v-1.3b", "flux": "flux-dev"}


def import_official(src, dst, T0=0.4):
    """Convert an official `.pt` prompt checkpoint to our safetensors format."""
    src = Path(src)
    if not src.is_file():
        raise UserError(f"{src} does not exist")
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{src} is not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    try:
        backend = ckpt["backend"]
        P = ckpt["deep_prompt_bank"]["prompts"]
        alphas = torch.stack([torch.as_tensor(a, dtype=torch.float32).reshape(()) for a in ckpt["alphas"]])
    except (KeyError, TypeError) as e:
        raise UserError(f"{src} is not an official prompt checkpoint (missing {e}); expected a dict with "
                        "`backend`, `deep_prompt_bank.prompts` and `alphas`") from None
    if backend not in OFFICIAL_BACKENDS:
        raise UserError(f"{src}: unknown backend {backend!r} (known: {', '.join(OFFICIAL_BACKENDS)})")
    bank = PromptBank(P.shape[1], P.shape[2], alphas.shape[0])
    with torch.no_grad():
        bank.prompt.copy_(P.float())
        bank.alpha.copy_(alphas)
    degradation = src.stem.split("_", 1)[1] if "_" in src.stem else "unknown"
    return save_prompt(bank, dst, backbone=OFFICIAL_BACKENDS[backend], degradation=degradation,
                       bridge="ebr", T0=T0, steps="unknown", source=f"official release {src.name}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minirestore.prompts", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="convert an official .pt prompt checkpoint to safetensors")
    imp.add_argument("src", help="official checkpoint, e.g. wan_haze.pt")
    imp.add_argument("dst", help="output .safetensors")
    imp.add_argument("--t0", type=float, default=0.4, help="T0 the prompt was trained with (released: 0.4)")
    show = sub.add_parser("show", help="print a prompt file's metadata and statistics")
    show.add_argument("path")
    args = p.parse_args(argv)
    try:
        if args.command == "import":
            out = import_official(args.src, args.dst, args.t0)
            print(f"wrote {out}")
        else:
            bank = load_prompt(args.path)
            for k, v in sorted(bank.meta.items()):
                print(f"{k}: {v}")
            a = bank.alpha.detach()
            print(f"std(P): {bank.prompt.std().item():.4f}  alpha: min {a.min():.3f} max {a.max():.3f}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
