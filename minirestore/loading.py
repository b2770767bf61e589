"""The foundation of every loader: reading checkpoint files and folders, the Hugging Face Hub and its
offline cache, streaming tensors into meta-initialised models, and the error messages they share.

One loader path for every model in the package (hub_flux.py, hub_text.py, hub_wan.py build on this file
and import nothing from each other; minirestore.hub gathers their public names):
  1. `resolve` turns a source (a .safetensors file, a folder, a Hub name) into safetensors files,
     downloading with huggingface_hub (which also serves its offline cache);
  2. `Checkpoint` reads the file headers only (names, shapes), so a wrong file is refused before a
     byte of weights is read (`TorchCheckpoint`: the same for a .pth state dict, read with weights_only=True);
  3. `load_model` builds the module on the meta device (no random initialisation, no memory) and
     streams tensors into it one at a time, cast to the target dtype, through a key map
     (our key -> the file's keys and how to combine them). Peak host memory stays near one copy of
     the model.
  4. `save_weights` is the other direction for the models trained here (the tiny default): one
     safetensors file, or shards under SHARD_BYTES with an index json, the layout `resolve` reads back.
"""
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import UserError
from .files import atomic_write


# ---------------------------------------------------------------------------------------------
# 1. Sources -> files
# ---------------------------------------------------------------------------------------------

def hub_file(repo_id, filename, size=None, gated=False):
    """Download (or find in the offline cache) one file of a Hub repo; one clear line on failure."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as e:  # offline, gated, missing: all end the same way for the user
        raise UserError(hub_message(repo_id, filename, size, gated, e)) from None


def hub_folder(repo_id, subfolder, size=None, gated=False):
    """Download (or find in the offline cache) one folder of a Hub repo, e.g. `transformer/`."""
    from huggingface_hub import snapshot_download

    try:
        root = Path(snapshot_download(repo_id, allow_patterns=[f"{subfolder}/*"]))
    except Exception as e:
        raise UserError(hub_message(repo_id, subfolder + "/", size, gated, e)) from None
    if not (root / subfolder).is_dir():
        raise UserError(f"the Hub repo {repo_id} has no folder {subfolder}/")
    return root / subfolder


def hub_message(repo_id, filename, size, gated, error):
    what = f"{filename} ({size / 1e9:.1f} GB)" if size else filename
    how = "connect to the internet (it is then cached)"
    if gated:
        how += f", accept the licence at https://huggingface.co/{repo_id} and log in with `hf auth login`"
    how += ", or pass the path of a local copy"
    reason = type(error).__name__
    return f"cannot get {what} from the Hub repo {repo_id} ({reason}): {how}"


def safetensors_files(folder):
    """The safetensors files of a folder: the shards named by an index json, or every *.safetensors."""
    folder = Path(folder)
    for index in sorted(folder.glob("*.safetensors.index.json")):
        return index_shards(index)
    files = sorted(list(folder.glob("*.safetensors")) + list(folder.glob("*.sft")))
    if not files:
        raise UserError(f"no .safetensors files in {folder}")
    return files


def index_shards(index):
    """The shard files an index json (`{"weight_map": {tensor name: shard file name}}`) names, beside it."""
    index = Path(index)
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{index} is not a readable safetensors index ({type(e).__name__}: {e}); "
                        "write the weights again") from None
    files = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise UserError(f"{index} names shards that are not there: {', '.join(missing)}")
    return files


def weights_file(folder, stem):
    """A folder's `stem` weights as save_weights wrote them: `stem.safetensors.index.json` when sharded, else
    `stem.safetensors` (returned even when absent, so the caller's message names what is missing)."""
    index = Path(folder) / f"{stem}.safetensors.index.json"
    return index if index.exists() else Path(folder) / f"{stem}.safetensors"


def resolve(source, hub_names=None, hub_subfolder=None, filename=None):
    """A source -> list of safetensors files.

    source: a .safetensors file; an index json (its shards); a folder (its index's shards, or all its .safetensors; if it has
    `hub_subfolder`, that subfolder's); a name in `hub_names` (-> (repo, file, size, gated)); a Hub
    repo id with `filename`; or "owner/repo/path/in/repo.safetensors".
    """
    hub_names = hub_names or {}
    if filename is not None:
        return [hub_file(str(source), filename)]
    path = Path(str(source)).expanduser()
    if path.is_file():
        return index_shards(path) if path.name.endswith(".index.json") else [path]
    if path.is_dir():
        if hub_subfolder and (path / hub_subfolder).is_dir():
            path = path / hub_subfolder
        return safetensors_files(path)
    name = str(source)
    for key, (repo, file, size, gated) in hub_names.items():
        if name in (key, repo):
            return [hub_file(repo, file, size, gated)]
    parts = name.split("/")
    if len(parts) >= 3 and not name.startswith((".", "/")) and name.endswith((".safetensors", ".sft")):
        return [hub_file("/".join(parts[:2]), "/".join(parts[2:]))]
    if len(parts) == 2 and hub_subfolder and not name.startswith((".", "/")) and not path.suffix:
        return safetensors_files(hub_folder(name, hub_subfolder))
    known = ", ".join(sorted(hub_names)) or "none"
    raise UserError(f"{source}: no such file or folder, and not a known model name (known: {known})")


# ---------------------------------------------------------------------------------------------
# 2. Headers
# ---------------------------------------------------------------------------------------------

class Checkpoint:
    """Lazy view of one or more safetensors files: names and shapes from the headers, tensors on demand."""

    def __init__(self, files):
        self.files = [Path(f) for f in files]
        self.shapes, self._where, self.metadata = {}, {}, {}
        for f in self.files:
            try:
                with safe_open(str(f), framework="pt") as st:
                    self.metadata.update(st.metadata() or {})
                    for name in st.keys():
                        self.shapes[name] = tuple(st.get_slice(name).get_shape())
                        self._where[name] = f
            except Exception as e:
                raise UserError(f"{f} is not a readable safetensors file ({e}); "
                                "it may be truncated or of another format: download it again") from None
        self._open = {}

    def get(self, name):
        f = self._where[name]
        if f not in self._open:
            self._open[f] = safe_open(str(f), framework="pt")
        try:
            return self._open[f].get_tensor(name)
        except Exception as e:
            raise UserError(f"{f}: cannot read tensor {name} ({e}); the file may be truncated") from None

    def config(self):
        """The model config stored in the metadata by minirestore (tiny models), or None."""
        text = self.metadata.get("minirestore_config")
        return json.loads(text) if text else None

    def count(self, pattern):
        """How many distinct N match a key pattern with one `(\\d+)`, e.g. r"double_blocks\\.(\\d+)\\."."""
        return len({m.group(1) for k in self.shapes if (m := re.match(pattern, k))})


# What a set of keys looks like, for "this is X, not Y" messages.
KINDS = [
    ("double_blocks.0.img_attn.qkv.weight", "a FLUX transformer (BFL format)"),
    ("transformer_blocks.0.attn.to_q.weight", "a FLUX transformer (diffusers format)"),
    ("encoder.down.0.block.0.conv1.weight", "a FLUX autoencoder (BFL format)"),
    ("encoder.down_blocks.0.resnets.0.conv1.weight", "an image VAE (diffusers format)"),
    ("encoder.block.0.layer.0.SelfAttention.q.weight", "a T5 / umT5 text encoder (transformers format)"),
    ("text_model.encoder.layers.0.self_attn.q_proj.weight", "a CLIP text encoder (transformers format)"),
    ("embeddings.token_embedding.weight", "a CLIP text encoder (transformers 5 format)"),
    ("blocks.0.cross_attn.q.weight", "a Wan 2.1 transformer (original format)"),
    ("blocks.0.attn2.to_q.weight", "a Wan 2.1 transformer (diffusers format)"),
    ("encoder.downsamples.0.residual.0.gamma", "a Wan 2.1 VAE (original format)"),
    ("encoder.down_blocks.0.norm1.gamma", "a Wan 2.1 VAE (diffusers format)"),
]


def describe(shapes):
    for key, kind in KINDS:
        if key in shapes:
            return kind
    return "a kind of checkpoint this package does not know"


# ---------------------------------------------------------------------------------------------
# 3. Streaming into a meta-initialised module
# ---------------------------------------------------------------------------------------------

def _first(names, n=5):
    names = sorted(names)
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def load_model(make_model, ckpt, key_map=None, *, what, device="cpu", dtype=torch.bfloat16, ignore=(), quantise=None):
    """Build `make_model()` on the meta device and stream `ckpt` into it.

    key_map: our key -> (list of file keys, combine function or None); None means identity. A
    combine function takes the list of tensors (e.g. torch.cat for fused projections).
    ignore: regexes of file keys that are allowed to go unused (e.g. a stray `position_ids`).
    quantise: None, or a function model -> names of nn.Linear modules whose weights are stored in fp8
    (fp8.py): each such weight is quantised as it streams in, so the bf16 copy never exists whole.
    """
    with torch.device("meta"):
        model = make_model()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    key_map = key_map or {k: ([k], None) for k in expected}

    missing = [k for k in expected if k not in key_map or any(s not in ckpt.shapes for s in key_map[k][0])]
    used = {s for srcs, _ in key_map.values() for s in srcs}
    unexpected = [s for s in ckpt.shapes if s not in used and not any(re.fullmatch(p, s) for p in ignore)]
    wrong = [f"{k} {ckpt.shapes[srcs[0]]} (expected {expected[k]})" for k, (srcs, fn) in key_map.items()
             if k in expected and fn is None and srcs[0] in ckpt.shapes and ckpt.shapes[srcs[0]] != expected[k]]
    if missing or unexpected or wrong:
        files = ", ".join(f.name for f in ckpt.files)
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_first(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_first(unexpected)}")
        if wrong:
            parts.append(f"{len(wrong)} wrongly shaped: {_first(wrong, 3)}")
        raise UserError(f"{files} does not fit {what}: {'; '.join(parts)}. "
                        f"It looks like {describe(ckpt.shapes)}.")

    fp8_weights = {f"{name}.weight" for name in quantise(model)} if quantise else set()
    state = {}
    for key in tqdm(expected, desc=f"loading {what}", unit="tensor", leave=False):
        srcs, combine = key_map[key]
        tensors = [ckpt.get(s) for s in srcs]
        t = combine(tensors) if combine else tensors[0]
        if tuple(t.shape) != expected[key]:
            raise UserError(f"{key}: the checkpoint gives shape {tuple(t.shape)}, {what} expects "
                            f"{expected[key]}. It looks like {describe(ckpt.shapes)}.")
        if key in fp8_weights:
            from .fp8 import quantise as to_fp8

            name = key[: -len(".weight")]
            state[f"{name}.qweight"], state[f"{name}.weight_scale"] = to_fp8(t.to(device))
        else:
            state[key] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        del tensors, t
    if fp8_weights:
        from .fp8 import swap_in

        swap_in(model, [k[: -len(".weight")] for k in fp8_weights], dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


class TorchCheckpoint:
    """A pickled state dict (.pth) behind Checkpoint's interface (files, shapes, metadata, get, config).

    Read with torch.load(weights_only=True): tensors only, no code from the file runs.
    """

    def __init__(self, path):
        self.files, self.metadata = [Path(path)], {}
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # a legacy (non-zip) pickle cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{path} is not a readable PyTorch state dict ({type(e).__name__}); "
                            "it may be truncated: download it again") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else {}
        self._state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        self.shapes = {k: tuple(v.shape) for k, v in self._state.items()}

    def get(self, name):
        return self._state[name]

    def config(self):
        return None


# ---------------------------------------------------------------------------------------------
# 4. Writing: one file, or shards with an index
# ---------------------------------------------------------------------------------------------

SHARD_BYTES = 15 * 2**20  # tensor bytes a shard: files under the 16 MiB a device run brings back (header included)


def save_weights(state, folder, stem, metadata=None, max_bytes=None):
    """Write a state dict as folder/stem.safetensors, or, when its tensors pass max_bytes, as shards
    stem-00001-of-0000N.safetensors (each under max_bytes, tensors kept whole and in order) plus
    stem.safetensors.index.json (the Hugging Face layout). Every shard carries the metadata, so each one
    says what it is. Each file is written atomically (files.atomic_write); the other layout's files, left
    by an earlier write, are removed afterwards. max_bytes: SHARD_BYTES unless given. -> the files written."""
    max_bytes = max_bytes or SHARD_BYTES
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    shards, size = [[]], 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes

    old = [folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json",
           *folder.glob(f"{stem}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].safetensors")]
    n, written, weight_map = len(shards), [], {}
    for i, names in enumerate(shards, 1):
        path = folder / (f"{stem}.safetensors" if n == 1 else f"{stem}-{i:05d}-of-{n:05d}.safetensors")
        shard = {k: state[k] for k in names}
        written.append(atomic_write(path, lambda p: save_file(shard, str(p), metadata=metadata)))
        weight_map.update({k: path.name for k in names})
    if n > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": weight_map}
        written.append(atomic_write(folder / f"{stem}.safetensors.index.json",
                                    lambda p: p.write_text(json.dumps(index, indent=1))))
    for f in old:
        if f not in written and f.exists():
            f.unlink()
    return written
