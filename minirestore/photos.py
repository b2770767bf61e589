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
                tmp_npy = cache / f".{r.name}.npy.tmp"
                with open(tmp_npy, "wb") as f:
                    np.save(f, _downscaled(src))
                os.replace(tmp_npy, cache / f"{r.name}.npy")  # atomic: a crash never leaves half a photo
    return cache


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
# Multi-scale crops and their descriptors
# ---------------------------------------------------------------------------------------------

class PhotoCrops:
    """Random square crops of one split's photographs at every scale, as float [3, size, size] in [0, 1].

    crop(rng, size): a photograph uniformly, a scale f = (short / size)^u with u ~ U(0, 1) (log-uniform
    between a full-detail patch and the whole short side), a position uniformly, a horizontal flip half the
    time; the region of side size * f is resized to size (bilinear with antialiasing)."""

    def __init__(self, split="train", cache=None, rows=None):
        self.images, self.names = load_split(split, cache, rows)
        if not self.images:
            raise UserError(f"photos.tsv lists no {split} photographs")

    def __len__(self):
        return len(self.images)

    def crop(self, rng, size, index=None, scale=None):
        """rng: numpy Generator; index / scale (in [0, 1], the u above) fix the photo and the scale."""
        image = self.images[rng.integers(len(self.images)) if index is None else index]
        H, W, _ = image.shape
        u = rng.random() if scale is None else scale
        side = int(round(min(size * (min(H, W) / size) ** u, H, W)))
        top, left = rng.integers(H - side + 1), rng.integers(W - side + 1)
        x = torch.from_numpy(np.ascontiguousarray(image[top:top + side, left:left + side])).permute(2, 0, 1)
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

    colour: grey if the mean saturation is low, pastel if light and weakly saturated, vivid if strongly
    saturated, else the dominant hue's family (warm: magenta-orange, earthy: yellow-green, cool: cyan-violet);
    brightness: the mean luma's tercile; texture: the fine-detail energy (luma minus its 3x3 box mean);
    edges: the 99th percentile of the luma gradient. Thresholds are round numbers near the quantiles of
    1000 training crops at 64 px (brightness near its terciles, texture and edges near their medians)."""
    r, g, b = image[0], image[1], image[2]
    mx, mn = image.max(0).values, image.min(0).values
    sat = ((mx - mn) / mx.clamp(min=1e-3)).mean().item()
    luma = 0.299 * r + 0.587 * g + 0.114 * b
    light = luma.mean().item()
    hue = torch.atan2(3 ** 0.5 * (g - b), 2 * r - g - b).rad2deg() % 360  # 0 red, 60 yellow, 120 green, ...
    weight = (mx - mn).flatten()
    hist = torch.histc(hue.flatten(), 6, 0, 360) if weight.sum() == 0 else \
        torch.zeros(6).index_add_(0, (hue.flatten() // 60).long().clamp(0, 5), weight)
    family = ["warm", "earthy", "earthy", "cool", "cool", "warm"][int(hist.argmax())]
    if sat < 0.15:
        colour = "grey"
    elif sat < 0.35 and light > 0.6:
        colour = "pastel"
    elif sat > 0.75:
        colour = "vivid"
    else:
        colour = family
    brightness = BRIGHTNESS[0 if light < 0.4 else 1 if light < 0.55 else 2]
    box = F.avg_pool2d(luma[None, None], 3, 1, 1, count_include_pad=False)[0, 0]
    texture = "textured" if (luma - box).abs().mean().item() > 0.008 else "smooth"
    grad = torch.cat([(luma[1:] - luma[:-1]).abs().flatten(), (luma[:, 1:] - luma[:, :-1]).abs().flatten()])
    edges = "sharp" if torch.quantile(grad, 0.99).item() > 0.12 else "soft"
    return [colour, brightness, texture, edges]


# ---------------------------------------------------------------------------------------------
# The command: fetch, then list what is there
# ---------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="Fetch the tiny default's photographs (Debian wallpaper packages) "
                                            "into the cache and list them.")
    p.add_argument("--cache", help="cache folder (default: $MINIRESTORE_PHOTOS or ~/.cache/minirestore/photos)")
    args = p.parse_args(argv)
    cache = fetch(args.cache)
    for r in read_list():
        h, w, _ = np.load(cache / f"{r.name}.npy", mmap_mode="r").shape
        print(f"{r.split:5s}  {r.name:28s} {w:4d} x {h:4d}  {r.licence:14s} {r.package}")
    print(f"{len(read_list())} photographs in {cache}")


if __name__ == "__main__":
    from .cli import run

    run(main)
