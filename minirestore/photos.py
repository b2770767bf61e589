"""Real photographs for the tiny default, from Debian's wallpaper packages: `python -m minirestore.photos`.

Debian ships freely licensed photographic wallpapers. `photos.tsv` beside this file is the committed list
of the ones used: one row per photograph (name, split, package, version, path inside the package, sha256 of
the file, licence from the package's copyright file). The illustrations, gradients and renders that the same
packages hold are left out of the list by hand (they are not photographs). `fetch` downloads the packages
with `apt-get download` (no system install, no root needed for it), unpacks them with `dpkg -x` into a cache
folder, checks every listed file's sha256, and keeps each photograph once, downscaled to at most MAX_SIDE
pixels on its short side, as a uint8 array; the packages themselves are then deleted. Nothing downloaded is
committed.

Splits are by photograph: a photograph is in exactly one of train / val / test, so no crop of a test photo is
ever seen in pre-training, prompt training or tuning. `PhotoCrops(split)` serves multi-scale random crops: a
square of side `size * f` pixels, f log-uniform in [1, short side / size], resized to `size` with
antialiasing, so crops run from full-detail patches to whole photographs shrunk to thumbnails, as a user's
photo at 128 or 256 px is. `describe` gives a crop's descriptor words (colour, brightness, texture, edges),
the tiny text encoder's conditioning during pre-training.

The cache is $MINIRESTORE_PHOTOS, else $XDG_CACHE_HOME/minirestore/photos (~/.cache/minirestore/photos).
"""
import argparse
import csv
import fnmatch
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import UserError
from .files import atomic_write

LIST = Path(__file__).with_name("photos.tsv")
MAX_SIDE = 1024  # short side of the cached copy: enough for every scale the crops use
SPLITS = ("train", "val", "test")


@dataclass
class Photo:
    name: str
    split: str
    package: str
    version: str
    path: str      # inside the package, e.g. usr/share/backgrounds/mate/nature/Garden.jpg
    sha256: str
    licence: str


def read_list(path=LIST):
    with open(path, newline="") as f:
        return [Photo(**row) for row in csv.DictReader(f, delimiter="\t")]


def cache_dir(cache=None):
    if cache is not None:
        return Path(cache)
    if os.environ.get("MINIRESTORE_PHOTOS"):
        return Path(os.environ["MINIRESTORE_PHOTOS"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minirestore" / "photos"


# ---------------------------------------------------------------------------------------------
# Fetching: apt-get download + dpkg -x, sha256-checked, kept as downscaled uint8 arrays
# ---------------------------------------------------------------------------------------------

def apt_download(package, version, dest):
    """Download package=version's .deb into dest with apt-get (the current version if that one is gone;
    the sha256 check then says whether the photographs are still the same; the package lists are updated
    once if neither is found). -> the .deb's path."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise UserError("fetching the photographs needs apt-get and dpkg (Debian or Ubuntu); elsewhere pass "
                        "--data with a folder of your own photos")
    for spec in (f"{package}={version}", package, "update", f"{package}={version}", package):
        if spec == "update":  # a fresh machine may have no package lists yet (this needs root)
            subprocess.run(["apt-get", "update"], capture_output=True)
            continue
        done = subprocess.run(["apt-get", "download", spec], cwd=dest, capture_output=True, text=True)
        debs = sorted(Path(dest).glob(f"{package}_*.deb"))
        if done.returncode == 0 and debs:
            return debs[-1]
    raise UserError(f"apt-get download {package} failed ({done.stderr.strip().splitlines()[-1:]}); "
                    "run `apt-get update` first, or pass --data with a folder of your own photos")


def licence_of(copyright_file, path):
    """The License: of the last DEP-5 stanza whose Files: pattern matches the path (patterns name the upstream
    tree, so they are matched against every tail of the installed path). '' when none matches."""
    stanzas, current, key = [], {}, None
    for line in Path(copyright_file).read_text(errors="replace").splitlines() + [""]:
        if not line.strip():
            if current:
                stanzas.append(current)
            current, key = {}, None
        elif line[0] in " \t" and key:
            current[key] += " " + line.strip()
        elif ":" in line:
            key, value = line.split(":", 1)
            key = key.strip().lower()
            current[key] = value.strip()
    parts = Path(path).parts
    tails = ["/".join(parts[i:]) for i in range(len(parts))]

    def matches(pattern):  # a tail of the path, or (a pattern naming one file) its file name
        last = pattern.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatch(t, pattern) for t in tails) or ("*" not in last and last == parts[-1])

    found = ""
    for s in stanzas:
        if "files" in s and "license" in s and any(matches(p) for p in s["files"].split()):
            found = s["license"].split()[0]
    return found


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _downscaled(path):
    """A photograph as uint8 [H, W, 3], its short side at most MAX_SIDE (Lanczos)."""
    Image.MAX_IMAGE_PIXELS = None  # the wallpapers are up to 6k x 4k
    with Image.open(path) as im:
        im.draft("RGB", (MAX_SIDE, MAX_SIDE))  # JPEG: decode at a reduced scale when that is enough
        im = im.convert("RGB")
        scale = MAX_SIDE / min(im.size)
        if scale < 1:
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)
        return np.asarray(im, dtype=np.uint8)


def fetch(cache=None, rows=None, download=apt_download, progress=print):
    """Make sure every listed photograph is in the cache as <name>.npy. -> the cache folder.
    download(package, version, dest) -> .deb path (apt-get by default; the tests pass a local package)."""
    cache = cache_dir(cache)
    rows = read_list() if rows is None else rows
    missing = [r for r in rows if not (cache / f"{r.name}.npy").exists()]
    by_package = {}
    for r in missing:
        by_package.setdefault((r.package, r.version), []).append(r)
    cache.mkdir(parents=True, exist_ok=True)
    for (package, version), photos in by_package.items():
        progress(f"photos: fetching {package} {version} ({len(photos)} photographs) into {cache}")
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            deb = download(package, version, tmp)
            tree = Path(tmp) / "tree"
            subprocess.run(["dpkg", "-x", str(deb), str(tree)], check=True, capture_output=True)
            for r in photos:
                src = tree / r.path
                if not src.is_file():
                    raise UserError(f"{package} {version} has no {r.path}: the package changed; update photos.tsv")
                if _sha256(src) != r.sha256:
                    raise UserError(f"{package}:{r.path} has sha256 {_sha256(src)[:12]}..., not the listed "
                                    f"{r.sha256[:12]}...: the package changed; update photos.tsv")
                _save_array(cache, r.name, _downscaled(src))
    return cache


def _save_array(cache, name, array):
    """cache/<name>.npy, written atomically (files.atomic_write): a crash never leaves half a photo."""
    atomic_write(cache / f"{name}.npy", lambda tmp: np.save(tmp, array))


def load_split(split, cache=None, rows=None):
    """The split's photographs, uint8 arrays [H, W, 3] (fetched first if the cache lacks any)."""
    if split not in SPLITS:
        raise UserError(f"unknown photo split {split!r}: choose one of {', '.join(SPLITS)}")
    rows = [r for r in (read_list() if rows is None else rows) if r.split == split]
    cache = cache_dir(cache)
    if any(not (cache / f"{r.name}.npy").exists() for r in rows):
        fetch(cache, rows)
    return [np.load(cache / f"{r.name}.npy") for r in rows], [r.name for r in rows]


# ---------------------------------------------------------------------------------------------
# A pack: the cached photographs as JPEG files, to carry to a machine that cannot reach the registries
# ---------------------------------------------------------------------------------------------

PACK_QUALITY = 95  # JPEG quality of a pack (4:4:4 chroma): about 0.6 MB a photograph, 40 dB and more


def pack(dest, splits=("train", "val"), cache=None, rows=None, quality=PACK_QUALITY):
    """Write the cached photographs of `splits` into the folder dest as <name>.jpg -> the files written.
    For a GPU machine with no way to the package registries (benchmarks/gpu_pretrain.sh): the cache's arrays
    (175 MB) do not fit the 64 MiB a device run may carry, JPEG at quality 95 does (train + val: about 17 MB).
    The copy is lossy (about 40 dB), which is far below the noise the model learns to remove; what the CPU
    recipe trains on stays the cached arrays themselves."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for split in splits:
        arrays, names = load_split(split, cache, rows)
        for array, name in zip(arrays, names):
            im = Image.fromarray(array)
            written.append(atomic_write(dest / f"{name}.jpg",
                                        lambda tmp: im.save(tmp, "JPEG", quality=quality, subsampling=0)))
    return written


def unpack(src, cache=None, rows=None):
    """Decode a pack's <name>.jpg files into the cache as <name>.npy (what load_split reads) -> the names.
    Every file must be a photograph of the list: a stray or misnamed file is refused in one line."""
    src, cache = Path(src), cache_dir(cache)
    files = sorted(src.glob("*.jpg"))
    if not files:
        raise UserError(f"{src} holds no .jpg files: make a pack with `python -m minirestore.photos --pack {src}`")
    listed = {r.name for r in (read_list() if rows is None else rows)}
    unknown = [f.name for f in files if f.stem not in listed]
    if unknown:
        raise UserError(f"{src}: {', '.join(unknown)} are not photographs of photos.tsv; remove them or repack")
    cache.mkdir(parents=True, exist_ok=True)
    for f in files:
        with Image.open(f) as im:
            _save_array(cache, f.stem, np.asarray(im.convert("RGB"), dtype=np.uint8))
    return [f.stem for f in files]


# ---------------------------------------------------------------------------------------------
# Multi-scale crops and their descriptors
# ---------------------------------------------------------------------------------------------

class PhotoCrops:
    """Random square crops of one split's photographs at every scale, as float [3, size, size] in [0, 1].

    crop(rng, size): a photograph uniformly, a scale f = (short / size)^u with u ~ U(0, 1) (log-uniform
    between a full-detail patch and the whole short side), a position uniformly, a horizontal flip half the
    time; the region of side size * f is resized to size (bilinear with antialiasing).
    device: where the photographs are held and the crops are made ("cuda" for GPU pre-training, where cutting
    and shrinking a 1024 px region on the CPU would starve the GPU); the random draws stay on the CPU (numpy),
    so a seed gives the same crops on any device."""

    def __init__(self, split="train", cache=None, rows=None, device="cpu"):
        arrays, self.names = load_split(split, cache, rows)
        if not arrays:
            raise UserError(f"photos.tsv lists no {split} photographs")
        self.images = [torch.from_numpy(a).to(device) for a in arrays]  # uint8 [H, W, 3]

    def __len__(self):
        return len(self.images)

    def crop(self, rng, size, index=None, scale=None):
        """rng: numpy Generator; index / scale (in [0, 1], the u above) fix the photo and the scale."""
        image = self.images[rng.integers(len(self.images)) if index is None else index]
        H, W, _ = image.shape
        u = rng.random() if scale is None else scale
        side = int(round(min(size * (min(H, W) / size) ** u, H, W)))
        top, left = rng.integers(H - side + 1), rng.integers(W - side + 1)
        x = image[top:top + side, left:left + side].permute(2, 0, 1).contiguous()
        x = x.float()[None] / 255
        if side != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = x[0].clamp(0, 1)
        return x.flip(-1) if rng.random() < 0.5 else x


# Descriptor words: the colour words are procedural.py's palette names (shared vocabulary); brightness is new.
BRIGHTNESS = ["dark", "dim", "bright"]
PHOTO_WORDS = BRIGHTNESS  # words photos add to the procedural vocabulary


def describe(image):
    """image [3, H, W] in [0, 1] -> 4 words: colour, brightness, texture, edges, e.g. "warm bright textured sharp".
    The words of describe_batch for one image."""
    return describe_batch(image[None])[0]


def describe_batch(images):
    """images [B, 3, H, W] in [0, 1] -> B lists of 4 words (colour, brightness, texture, edges), computed for
    the whole batch at once on the images' device (one transfer of the decisions at the end).

    colour: grey if the mean saturation is low, pastel if light and weakly saturated, vivid if strongly
    saturated, else the dominant hue's family (warm: magenta-orange, earthy: yellow-green, cool: cyan-violet);
    brightness: the mean luma's tercile; texture: the fine-detail energy (luma minus its 3x3 box mean);
    edges: the 99th percentile of the luma gradient. Thresholds are round numbers near the quantiles of
    1000 training crops at 64 px (brightness near its terciles, texture and edges near their medians)."""
    x = images.float()
    B = x.shape[0]
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    mx, mn = x.max(1).values, x.min(1).values
    sat = ((mx - mn) / mx.clamp(min=1e-3)).flatten(1).mean(1)
    luma = 0.299 * r + 0.587 * g + 0.114 * b
    light = luma.flatten(1).mean(1)
    hue = torch.atan2(3 ** 0.5 * (g - b), 2 * r - g - b).rad2deg() % 360  # 0 red, 60 yellow, 120 green, ...
    sector = (hue // 60).long().clamp(0, 5).flatten(1)
    weight = (mx - mn).flatten(1)
    weight = torch.where(weight.sum(1, keepdim=True) == 0, torch.ones_like(weight), weight)  # all grey: count
    hist = torch.zeros(B, 6, device=x.device).scatter_add_(1, sector, weight)
    box = F.avg_pool2d(luma[:, None], 3, 1, 1, count_include_pad=False)[:, 0]
    detail = (luma - box).abs().flatten(1).mean(1)
    grad = torch.cat([(luma[:, 1:] - luma[:, :-1]).abs().flatten(1), (luma[:, :, 1:] - luma[:, :, :-1]).abs().flatten(1)], 1)
    edge = torch.quantile(grad, 0.99, dim=1)
    stats = torch.stack([sat, light, hist.argmax(1).float(), detail, edge], 1).tolist()
    words = []
    for sat, light, sector, detail, edge in stats:
        family = ["warm", "earthy", "earthy", "cool", "cool", "warm"][int(sector)]
        if sat < 0.15:
            colour = "grey"
        elif sat < 0.35 and light > 0.6:
            colour = "pastel"
        elif sat > 0.75:
            colour = "vivid"
        else:
            colour = family
        brightness = BRIGHTNESS[0 if light < 0.4 else 1 if light < 0.55 else 2]
        words.append([colour, brightness, "textured" if detail > 0.008 else "smooth", "sharp" if edge > 0.12 else "soft"])
    return words


# ---------------------------------------------------------------------------------------------
# The command: fetch, then list what is there
# ---------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="Fetch the tiny default's photographs (Debian wallpaper packages) "
                                            "into the cache and list them.")
    p.add_argument("--cache", help="cache folder (default: $MINIRESTORE_PHOTOS or ~/.cache/minirestore/photos)")
    p.add_argument("--pack", metavar="DIR", help="then write the train and val photographs into DIR as JPEG "
                                                 "(to carry to a GPU machine; see benchmarks/gpu_pretrain.sh)")
    p.add_argument("--unpack", metavar="DIR", help="instead of fetching, decode a pack from DIR into the cache")
    args = p.parse_args(argv)
    if args.unpack:
        names = unpack(args.unpack, args.cache)
        print(f"{len(names)} photographs unpacked from {args.unpack} into {cache_dir(args.cache)}")
        return
    cache = fetch(args.cache)
    for r in read_list():
        h, w, _ = np.load(cache / f"{r.name}.npy", mmap_mode="r").shape
        print(f"{r.split:5s}  {r.name:28s} {w:4d} x {h:4d}  {r.licence:14s} {r.package}")
    print(f"{len(read_list())} photographs in {cache}")
    if args.pack:
        files = pack(args.pack, cache=cache)
        size = sum(f.stat().st_size for f in files) / 2**20
        print(f"{len(files)} photographs (train, val) packed into {args.pack}: {size:.1f} MiB")


if __name__ == "__main__":
    from .cli import run

    run(main)
