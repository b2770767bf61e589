"""Images in and out, and the training datasets (a clean folder degraded on the fly, or clean/degraded pairs).

Tensors are [3, H, W] float in [0, 1], RGB. `load_image` returns with the tensor an `info` dict that
`save_image` uses to write the result back in the input's mode:

    input                       tensor            written back as
    RGB, YCbCr, 1-bit           RGB               RGB (8 bit)
    CMYK                        RGB               CMYK (with its ICC profile; RGB where the format has no CMYK)
    RGBA, LA, palette+alpha     RGB (alpha kept)  RGBA / LA with the input's alpha
    L                           grey in 3 chans   L (8 bit)
    I;16 / I (16-bit PNG)       grey / 65535      I;16 (16 bit)
    palette without alpha       RGB               RGB (a restored image no longer fits the palette)

JPEG EXIF orientation is applied on load (ImageOps.exif_transpose), so the tensor is upright and the
output carries no orientation tag. A format that cannot hold the mode falls back to the nearest one it can
(`FALLBACK`: a JPEG output drops alpha and 16 bits, a PNG output turns CMYK into RGB and drops the CMYK
profile). 16-bit RGB PNGs are read by Pillow as 8-bit RGB.

Animated images (GIF, APNG, animated WebP, multi-page TIFF) are read by `load_frames` as [T, 3, H, W] RGB
frames with each frame's duration, and written back by `save_frames` as an animation of the same timing
(RGB frames: a GIF's palette and transparency are not kept, Pillow quantises the frames again).
"""
import copy
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError

from . import UserError
from .degrade import degrade, degrade_clip, parse
from .files import atomic_write

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


# ---------------------------------------------------------------------------------------------
# Image I/O
# ---------------------------------------------------------------------------------------------

READ_ERRORS = (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError, EOFError)


def _open(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such image file")
    try:
        return Image.open(path)
    except READ_ERRORS as e:
        raise UserError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def frame_count(path):
    """How many frames an image file holds (1 for a still image; an animated GIF/PNG/WebP or a multi-page TIFF
    more). Reads the header only."""
    with _open(path) as im:
        return getattr(im, "n_frames", 1) if getattr(im, "is_animated", False) else 1


def load_image(path):
    """Read an image file -> (tensor [3, H, W] float32 in [0, 1], info). One-line UserError if it
    is missing or not a readable image. Of an animated image, the first frame (see load_frames)."""
    path = Path(path)
    try:
        with _open(path) as im:
            im = ImageOps.exif_transpose(im)  # rotate JPEGs to how they are meant to be seen
            im.load()
    except READ_ERRORS as e:
        raise UserError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None

    info = {"size": im.size, "icc_profile": im.info.get("icc_profile"), "alpha": None}
    mode = im.mode
    if mode == "P" and "transparency" in im.info or mode == "PA":
        im, mode = im.convert("RGBA"), "RGBA"
    elif mode == "P":
        im, mode = im.convert("RGB"), "RGB"
    if mode in ("RGBA", "LA"):
        info["alpha"] = np.asarray(im.getchannel("A")).copy()  # uint8 [H, W], written back unchanged
    if mode in GREY_MODES:
        if mode in ("1", "L", "LA"):
            grey, out_mode = np.asarray(im.convert("L"), dtype=np.float32) / 255, "LA" if mode == "LA" else "L"
        elif mode == "F":
            grey, out_mode = np.asarray(im, dtype=np.float32).clip(0, 1), "L"
        else:  # 16-bit PNG opens as I;16 (or I in older Pillow): values 0..65535
            grey, out_mode = np.asarray(im, dtype=np.float32) / 65535, "I;16"
        x = torch.from_numpy(grey.copy()).expand(3, -1, -1).contiguous()
    else:
        out_mode = mode if mode in ("RGBA", "CMYK") else "RGB"
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
        x = torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()  # [H, W, 3] -> [3, H, W]
    info["mode"] = out_mode
    return x.clamp(0, 1), info


def to_pil(x, info=None, mode=None):
    """A tensor [3, H, W] in [0, 1] -> PIL image in `mode` (default: the input's, from `info`; else RGB)."""
    x = x.detach().float().clamp(0, 1).cpu()
    mode = mode or (info or {}).get("mode", "RGB")
    if info is not None and tuple(info["size"]) != (x.shape[-1], x.shape[-2]):
        w, h = info["size"]
        raise ValueError(f"image is {x.shape[-1]}x{x.shape[-2]} but the input was {w}x{h}")
    if mode in ("L", "LA", "I;16"):
        grey = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]  # ITU-R 601 luma, as PIL's RGB -> L
        if mode == "I;16":
            return Image.fromarray((grey * 65535).round().numpy().astype(np.uint16))
        im = Image.fromarray((grey * 255).round().numpy().astype(np.uint8))
    else:
        im = Image.fromarray((x * 255).round().byte().permute(1, 2, 0).numpy())  # [H, W, 3]
    if mode in ("RGBA", "LA"):
        alpha = (info or {}).get("alpha")
        im.putalpha(Image.fromarray(alpha) if alpha is not None else 255)
    if mode == "CMYK":
        im = im.convert("CMYK")  # Pillow's plain inverse of its CMYK -> RGB (K = 0): the same colours on screen
    return im


# What a format cannot hold falls back to the nearest mode it can (PNG and TIFF hold them all).
FALLBACK = {
    "JPEG": {"RGBA": "RGB", "LA": "L", "I;16": "L"},
    "PNG": {"CMYK": "RGB"},
    "BMP": {"LA": "RGBA", "I;16": "L", "CMYK": "RGB"},
    "WEBP": {"LA": "RGBA", "L": "RGB", "I;16": "RGB", "CMYK": "RGB"},
    "GIF": {"LA": "RGBA", "I;16": "L", "CMYK": "RGB"},
}


def save_image(x, path, info=None):
    """Write x [3, H, W] to `path` in the input's mode and size (see the module docstring), atomically:
    a temporary file beside it, then os.replace, so a crash never leaves half an image (atomic_save)."""
    path = Path(path)
    fmt = image_format(path)
    mode = (info or {}).get("mode", "RGB")
    out_mode = FALLBACK.get(fmt, {}).get(mode, mode)
    im = to_pil(x, info, out_mode)
    kwargs = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    if info is not None and info.get("icc_profile") and (out_mode == "CMYK") == (mode == "CMYK"):
        kwargs["icc_profile"] = info["icc_profile"]  # a CMYK profile does not describe RGB pixels
    atomic_save(im, path, fmt, **kwargs)


def atomic_save(im, path, fmt, **kwargs):
    """PIL image -> file, atomically (files.atomic_write): a crash, a full disk or an unwritable folder never
    leaves half a file, and ends in a one-line UserError."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"{path.parent}: output folder does not exist")

    def write(tmp):
        with open(tmp, "wb") as f:
            im.save(f, format=fmt, **kwargs)

    try:
        atomic_write(path, write)
    except OSError as e:
        raise UserError(f"{path}: cannot write it ({e.strerror or e}); free some space or choose another "
                        "output place") from None


def image_format(path):
    """Pillow's format name for a file name's suffix; UserError for a suffix that is not an image's."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None or Path(path).suffix.lower() not in IMAGE_EXTS:
        raise UserError(f"{path}: unknown image extension {Path(path).suffix!r}; use one of {', '.join(IMAGE_EXTS)}")
    return fmt


def load_frames(path):
    """An animated image -> (frames [T, 3, H, W] float32 RGB in [0, 1], info with each frame's duration)."""
    path = Path(path)
    frames, durations = [], []
    try:
        with _open(path) as im:
            info = {"size": im.size, "loop": im.info.get("loop", 0), "mode": "RGB"}
            for frame in ImageSequence.Iterator(im):
                frame.load()  # WebP sets a frame's duration only once it is decoded
                durations.append(frame.info.get("duration", 100))
                rgb = np.asarray(frame.convert("RGB"), dtype=np.float32) / 255
                frames.append(torch.from_numpy(rgb.copy()).permute(2, 0, 1))
    except READ_ERRORS as e:
        raise UserError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    info["durations"] = durations
    return torch.stack(frames), info


ANIMATED_FORMATS = ("GIF", "PNG", "WEBP", "TIFF")


def save_frames(frames, path, info):
    """frames [T, 3, H, W] -> an animated image at `path` (GIF, APNG, WebP or multi-page TIFF, by suffix) with
    info's frame durations and loop count, written atomically."""
    path = Path(path)
    fmt = image_format(path)
    if fmt not in ANIMATED_FORMATS:
        raise UserError(f"{path}: a {fmt} file holds one frame, not {len(frames)}; name the output .gif, .png "
                        "(APNG), .webp or .tif")
    ims = [to_pil(f, info) for f in frames]
    kwargs = {"save_all": True, "append_images": ims[1:]}
    if fmt != "TIFF":
        kwargs.update(duration=info.get("durations", 100), loop=info.get("loop", 0))
    if fmt == "WEBP":
        kwargs["quality"] = 95
    atomic_save(ims[0], path, fmt, **kwargs)


def list_images(sources):
    """Image files from a folder, a file, or a list of both: each folder's images sorted by name
    (not recursive, hidden files skipped), in the order given. UserError when a path is missing or
    nothing is found."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    files = []
    for src in map(Path, sources):
        if src.is_dir():
            found = sorted(p for p in src.iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))
            if not found:
                raise UserError(f"{src}: no images in this folder (looked for {', '.join(IMAGE_EXTS)})")
            files += found
        elif src.is_file():
            files.append(src)
        else:
            raise UserError(f"{src}: no such file or folder")
    if not files:
        raise UserError("no input images given")
    return files


def usable(files, where):
    """files, if every one opens as an image (headers only: quick); else a UserError naming the bad ones, so a
    training run stops before any work instead of at the first batch that draws a broken file."""
    bad = []
    for f in files:
        try:
            with Image.open(f):
                pass
        except READ_ERRORS as e:
            bad.append(f"{Path(f).name} ({type(e).__name__})")
    if bad:
        what = ("none of its images is readable" if len(bad) == len(files)
                else f"{len(bad)} of {len(files)} images are not readable")
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise UserError(f"{where}: {what}: {', '.join(bad[:3])}{more}; remove or replace them")
    return files


# ---------------------------------------------------------------------------------------------
# Crops
# ---------------------------------------------------------------------------------------------

def _size(resolution):
    return (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)


def parse_resolution(text):
    """'512' -> 512, '480x832' -> (480, 832) (height x width)."""
    try:
        parts = [int(p) for p in str(text).lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts, default=0) < 1:
        raise UserError(f"--resolution {text!r}: give a size in pixels, e.g. 512, or height x width, e.g. 480x832")
    return parts[0] if len(parts) == 1 else tuple(parts)


def _cover(imgs, size):
    """Scale images (same size) up, bicubically, until they cover `size` (h, w); larger ones stay as they are."""
    H, W = imgs[0].shape[-2:]
    scale = max(size[0] / H, size[1] / W)
    if scale <= 1:
        return imgs
    new = (max(size[0], round(H * scale)), max(size[1], round(W * scale)))
    return [F.interpolate(x[None], size=new, mode="bicubic", antialias=False, align_corners=False)[0].clamp(0, 1)
            for x in imgs]


def crop(imgs, resolution, train, generator=None):
    """The same crop of every image in `imgs` (tensors [3, H, W] of one size) -> [3, h, w] each.
    train: a random crop and a horizontal flip half the time; otherwise the centre crop."""
    h, w = _size(resolution)
    imgs = _cover(imgs, (h, w))
    H, W = imgs[0].shape[-2:]
    if train:
        top = int(torch.randint(0, H - h + 1, (1,), generator=generator))
        left = int(torch.randint(0, W - w + 1, (1,), generator=generator))
        flip = bool(torch.rand(1, generator=generator) < 0.5)
    else:
        top, left, flip = (H - h) // 2, (W - w) // 2, False
    out = [x[:, top:top + h, left:left + w] for x in imgs]
    return [x.flip(-1) for x in out] if flip else out


# ---------------------------------------------------------------------------------------------
# Datasets: items are {"clean": [3, h, w], "degraded": [3, h, w], "name": str}
# ---------------------------------------------------------------------------------------------

class CleanFolder(torch.utils.data.Dataset):
    """A folder of clean images, degraded on the fly with `degradation` (a name or a + mix).

    train=True: random crops and flips, a fresh degradation each time (torch's global RNG, so a seeded
    run, and DataLoader workers seeded by torch, are reproducible). train=False: the centre crop and a
    degradation drawn from a generator seeded by (seed, index), so validation items never change.
    """

    def __init__(self, folder, degradation, resolution=512, train=True, seed=0):
        self.files = usable(list_images(folder), folder)
        self.degradation = "+".join(parse(degradation))
        self.resolution, self.train, self.seed = resolution, train, seed

    def __len__(self):
        return len(self.files)

    def clean(self, i):
        """-> (image [3, H, W], name)"""
        return load_image(self.files[i])[0], self.files[i].stem

    def __getitem__(self, i):
        g = None if self.train else torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        image, name = self.clean(i)
        clean = crop([image], self.resolution, self.train, g)[0]
        return {"clean": clean, "degraded": degrade(clean, self.degradation, g), "name": name}


class CleanProcedural(CleanFolder):
    """The tiny default's data: procedural dead-leaves images (procedural.py) degraded on the fly.

    Images come from their own seed range (`base`), disjoint from the ones the backbone was pre-trained
    on, so training and validation images are new to it."""

    def __init__(self, n, degradation, resolution=64, train=True, seed=0, base=7):
        self.n, self.base, self.size = n, base, resolution if isinstance(resolution, int) else max(resolution)
        self.degradation = "+".join(parse(degradation))
        self.resolution, self.train, self.seed = resolution, train, seed

    def __len__(self):
        return self.n

    def clean(self, i):
        from .procedural import dead_leaves

        image, _ = dead_leaves(self.base * 1_000_003 + i, self.size)
        return image, f"leaves-{self.base}-{i}"


class CleanPhotos(CleanFolder):
    """The tiny default's data: crops of one split's photographs (photos.py), degraded on the fly.

    n items; a train item is a fresh multi-scale crop each time (drawn from torch's global RNG, which
    train.py seeds per item), a val or test item a fixed crop, degradation and flip from (seed, index)."""

    def __init__(self, split, n, degradation, resolution=64, train=True, seed=0):
        from .photos import PhotoCrops

        self.photos, self.split, self.n = PhotoCrops(split), split, n
        self.size = resolution if isinstance(resolution, int) else max(resolution)
        self.degradation = "+".join(parse(degradation))
        self.resolution, self.train, self.seed = resolution, train, seed

    def __len__(self):
        return self.n

    def clean(self, i):
        g = None if self.train else torch.Generator().manual_seed(self.seed * 1_000_003 + i + 1)
        rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=g)))
        return self.photos.crop(rng, self.size), f"{self.split}-{i}"


class PairedFolder(torch.utils.data.Dataset):
    """`folder/clean/` and `folder/degraded/` with images matched by file stem (as in the public
    restoration sets). A degraded image of another size (e.g. a low-resolution input) is resized
    bicubically to its clean partner. Both get the same crop and flip."""

    def __init__(self, folder, resolution=512, train=True, seed=0):
        folder = Path(folder)
        for sub in ("clean", "degraded"):
            if not (folder / sub).is_dir():
                raise UserError(f"{folder}: a paired dataset needs the subfolders clean/ and degraded/ "
                                f"({sub}/ is missing)")
        clean = {p.stem: p for p in usable(list_images(folder / "clean"), folder / "clean")}
        degraded = {p.stem: p for p in usable(list_images(folder / "degraded"), folder / "degraded")}
        lonely = sorted(set(clean) ^ set(degraded))
        if lonely:
            names = [str(clean.get(s) or degraded.get(s)) for s in lonely]
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            raise UserError(f"{folder}: {len(names)} images have no partner with the same name in the other "
                            f"subfolder: {', '.join(names[:5])}{more}")
        self.pairs = [(clean[s], degraded[s]) for s in sorted(clean)]
        self.resolution, self.train, self.seed = resolution, train, seed

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        g = None if self.train else torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        clean, degraded = (load_image(p)[0] for p in self.pairs[i])
        if degraded.shape != clean.shape:
            degraded = F.interpolate(degraded[None], size=clean.shape[-2:], mode="bicubic",
                                     align_corners=False)[0].clamp(0, 1)
        clean, degraded = crop([clean, degraded], self.resolution, self.train, g)
        return {"clean": clean, "degraded": degraded, "name": self.pairs[i][0].stem}


def split(dataset, val_fraction=None, val_count=None, seed=0):
    """Hold out a validation split -> (train, val), two disjoint torch Subsets chosen by a seeded
    permutation. The validation part reads a copy of the dataset with train=False (centre crops,
    fixed degradations). Give val_count (images) or val_fraction (default 0.1, at least one image)."""
    n = len(dataset)
    if val_count is None:
        val_count = max(1, round(n * (0.1 if val_fraction is None else val_fraction)))
    if n < 2 or not 1 <= val_count < n:
        raise UserError(f"cannot hold out {val_count} of {n} images for validation: "
                        "need at least one image on each side (add images or change the validation size)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val_ds = copy.copy(dataset)
    val_ds.train = False
    return (torch.utils.data.Subset(dataset, sorted(perm[val_count:])),
            torch.utils.data.Subset(val_ds, sorted(perm[:val_count])))


# ---------------------------------------------------------------------------------------------
# Clips (Wan): items are {"clean": [3, T, h, w], "degraded": [3, T, h, w], "name": str}
# ---------------------------------------------------------------------------------------------

def list_clips(folder):
    """The clips of a folder: video files (.mp4/.mov/.webm) and subfolders of frames, sorted by name."""
    from .video import VIDEO_SUFFIXES

    folder = Path(folder)
    clips = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and
                   (p.suffix.lower() in VIDEO_SUFFIXES or (p.is_dir() and any(q.suffix.lower() in IMAGE_EXTS
                                                                               for q in p.iterdir()))))
    if not clips:
        raise UserError(f"{folder}: no clips in this folder (video files or subfolders of frames)")
    return clips


def is_clip_folder(folder):
    """A clip dataset holds clips (or clean/ and degraded/ holding clips) rather than images."""
    folder = Path(folder)
    inner = folder / "clean" if (folder / "clean").is_dir() else folder
    try:
        return bool(list_clips(inner))
    except UserError:
        return False


def crop_clip(clips, frames, resolution, train, generator=None):
    """The same temporal window (`frames` consecutive frames; the start at random when training) and the
    same spatial crop and flip for every clip in `clips` (tensors [T, 3, H, W] of one size) -> [3, frames, h, w]."""
    T = clips[0].shape[0]
    if T < frames:  # a short clip repeats its last frame, as sample.py pads to 4k+1
        clips = [torch.cat([c, c[-1:].expand(frames - T, -1, -1, -1)]) for c in clips]
        T = frames
    start = int(torch.randint(0, T - frames + 1, (1,), generator=generator)) if train else 0
    flat = [c[start:start + frames].flatten(0, 1) for c in clips]  # [frames * 3, H, W]: crop() works per channel
    return [c.unflatten(0, (frames, 3)).transpose(0, 1) for c in crop(flat, resolution, train, generator)]


class ClipFolder(torch.utils.data.Dataset):
    """Clips for Wan: a folder of clips degraded on the fly (one blur kernel, haze map, ... per clip and fresh
    noise per frame: `degrade_clip`), or `clean/` and `degraded/` with clips matched by name. Windows of
    `frames` frames (4k+1; 33 in the paper) cropped to `resolution` (480x832 in the paper)."""

    def __init__(self, folder, degradation, resolution=(480, 832), frames=33, train=True, seed=0):
        from .video import read_video

        if (frames - 1) % 4:
            raise UserError(f"--frames {frames}: the Wan VAE needs 4k+1 frames (e.g. 17, 33, 81)")
        folder = Path(folder)
        self.paired = (folder / "clean").is_dir() and (folder / "degraded").is_dir()
        if self.paired:
            clean = {p.stem: p for p in list_clips(folder / "clean")}
            degraded = {p.stem: p for p in list_clips(folder / "degraded")}
            lonely = sorted(set(clean) ^ set(degraded))
            if lonely:
                raise UserError(f"{folder}: {len(lonely)} clips have no partner of the same name: {', '.join(lonely[:5])}")
            self.items = [(clean[k], degraded[k]) for k in sorted(clean)]
        else:
            self.items = [(p, None) for p in list_clips(folder)]
        self.degradation = None if self.paired else "+".join(parse(degradation))
        self.read = read_video
        self.resolution, self.frames, self.train, self.seed = resolution, frames, train, seed

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        g = None if self.train else torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        clean_path, degraded_path = self.items[i]
        clean = self.read(clean_path)[0]
        if degraded_path is None:
            clean = crop_clip([clean], self.frames, self.resolution, self.train, g)[0]
            degraded = degrade_clip(clean.transpose(0, 1), self.degradation, g).transpose(0, 1)
        else:
            degraded = self.read(degraded_path)[0]
            if degraded.shape != clean.shape:
                raise UserError(f"{degraded_path}: {tuple(degraded.shape)} frames, its clean partner has "
                                f"{tuple(clean.shape)}; paired clips must match")
            clean, degraded = crop_clip([clean, degraded], self.frames, self.resolution, self.train, g)
        return {"clean": clean, "degraded": degraded, "name": clean_path.stem}
