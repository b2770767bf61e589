"""Test sets for evaluate.py: paired folders, and the official JSON test lists as they are.

  paired folder   clean/ + degraded/ (or gt/ + input/), images matched by file name without extension;
                  entries that are folders are clips (folders of frames). A folder of paired folders is
                  several test sets, one per subfolder. The dataset is the folder's name.
  JSON list       YPT's test_img_jsons/*.json and test_vid_jsons/*.json: a list of {"image_path",
                  "target_path", "degradation", "dataset"}, paths relative to --root (the folder holding
                  test_img_data/ or test_vid_data/); video lists give lists of frames. As the release:
                  SICE keeps exposures 1-3 only, a video list is shuffled with Random(42), an empty
                  target list means no reference (only no-reference metrics are scored).

Degradations are matched to prompts case-insensitively, with the release's spellings mapped to
minirestore's names (LowLight, Low-light -> lowlight; Motion blur -> blur). The sets the release
restores with a mix of prompts, or whose list names no degradation, follow its scripts (OFFICIAL).
"""
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from . import UserError
from .data import IMAGE_EXTS

ALIASES = {"lowlight": "lowlight", "low-light": "lowlight", "low light": "lowlight", "motion blur": "blur",
           "haze": "haze", "rain": "rain", "snow": "snow", "blur": "blur", "noise": "noise", "jpeg": "jpeg"}

# inference_flux.sh / inference_wan.sh: the prompts each set is restored with, where the list's own
# `degradation` field does not say it (mixed and unseen sets; lists without the field). Order as there.
OFFICIAL = {"cdd_haze_snow": ("snow", "haze"), "lolblur": ("lowlight", "blur"), "poled": ("blur", "lowlight"),
            "toled": ("lowlight", "blur"), "4krd": ("blur",), "lasvr": ("rain",), "aaurainsnow": ("snow",),
            "loli-phone": ("lowlight",)}

PAIRS = (("clean", "degraded"), ("gt", "input"))


@dataclass
class Item:
    key: str           # unique in its list: the input's path as listed (resume and output names use it)
    dataset: str
    degradation: str   # minirestore's name where known ("haze"), else the list's own, lower case
    input: object      # an image Path, or a list of frame Paths (a clip)
    target: object     # the same for the reference, or None (no reference)
    prompts: tuple     # the degradations whose prompts restore it: one, or several for a mix

    @property
    def clip(self):
        return isinstance(self.input, list)


def canonical(name):
    name = (name or "").strip().lower()
    return ALIASES.get(name, name)


def prompts_of(dataset, degradation):
    return OFFICIAL.get(dataset.lower(), (degradation,) if degradation else ())


# -- paired folders -----------------------------------------------------------------------------------

def _entries(folder):
    """name without extension -> image Path or list of frame Paths (a clip folder)."""
    out = {}
    for p in sorted(folder.iterdir()):
        if p.is_dir():
            frames = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS)
            if frames:
                out[p.name] = frames
        elif p.suffix.lower() in IMAGE_EXTS:
            if p.stem in out:
                raise UserError(f"{folder} holds two images named {p.stem} (different extensions): keep one")
            out[p.stem] = p
    return out


def pair_dirs(folder):
    for ref, deg in PAIRS:
        if (folder / ref).is_dir() and (folder / deg).is_dir():
            return folder / ref, folder / deg
    return None


def read_pairs(folder, degradation):
    ref, deg = pair_dirs(folder)
    targets, inputs = _entries(ref), _entries(deg)
    missing = sorted(set(inputs) - set(targets))
    if missing:
        raise UserError(f"{deg}: {len(missing)} input(s) have no reference in {ref} (e.g. {missing[0]}): "
                        "give each degraded image a clean one of the same name")
    if not inputs:
        raise UserError(f"{deg} holds no images")
    d = canonical(degradation)
    return [Item(f"{folder.name}/{name}", folder.name, d, inputs[name], targets[name], prompts_of(folder.name, d))
            for name in inputs]


# -- the official JSON lists ---------------------------------------------------------------------------

def read_json(path, root):
    try:
        entries = json.loads(Path(path).read_text())
        if not isinstance(entries, list) or not all("image_path" in e and "dataset" in e for e in entries):
            raise ValueError("expected a list of entries with image_path and dataset")
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a test list ({type(e).__name__}: {e})") from None
    clips = any(isinstance(e["image_path"], list) for e in entries)
    if clips:
        entries = list(entries)
        random.Random(42).shuffle(entries)  # the release's video loader shuffles its list with seed 42
    items, dropped = [], 0
    for e in entries:
        dataset, d = e["dataset"], canonical(e.get("degradation"))
        inp, tgt = e["image_path"], e.get("target_path")
        if clips:
            inp, tgt = [root / f for f in inp], [root / f for f in (tgt or [])]
            if tgt and len(tgt) != len(inp):
                dropped += 1  # as the release: frame lists of different lengths are skipped
                continue
            tgt = tgt or None
        else:
            if dataset == "SICE" and not _sice_under_exposed(inp):
                dropped += 1
                continue
            inp, tgt = root / inp, (root / tgt if tgt else None)
        key = str(Path(e["image_path"][0]).parent if clips else e["image_path"])
        items.append(Item(key, dataset, d, inp, tgt, prompts_of(dataset, d)))
    if dropped:
        print(f"{path}: {dropped} of {len(entries)} entries left out as the release leaves them out")
    return items


def _sice_under_exposed(path):
    """SICE sequences hold exposures 1.jpg, 2.jpg, ...: the release scores those numbered 3 or less."""
    m = re.fullmatch(r"(\d+)", Path(path).stem)
    return m is not None and int(m.group(1)) <= 3


# -- everything -----------------------------------------------------------------------------------------

def collect(sources, root=".", degradation="noise"):
    """Paired folders, folders of paired folders and JSON lists -> [Item], refusing missing files up front."""
    items = []
    for src in map(Path, sources):
        if src.suffix.lower() == ".json":
            items += read_json(src, Path(root))
        elif src.is_dir() and pair_dirs(src):
            items += read_pairs(src, degradation)
        elif src.is_dir() and any(pair_dirs(d) for d in src.iterdir() if d.is_dir()):
            for d in sorted(d for d in src.iterdir() if d.is_dir() and pair_dirs(d)):
                items += read_pairs(d, degradation)
        else:
            raise UserError(f"{src}: not a JSON test list and not a paired folder (clean/ + degraded/, or gt/ + input/)")
    keys = [(i.dataset, i.key) for i in items]
    if len(set(keys)) < len(keys):
        raise UserError("the same test item is listed twice: pass each test set once")
    files = [f for i in items for f in ((i.input if i.clip else [i.input]) + ((i.target if i.clip else [i.target])
                                                                             if i.target is not None else []))]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{len(missing)} of {len(files)} listed files are missing, e.g. {missing[0]}: pass --root, "
                        "the folder the lists' paths start from (the one holding test_img_data/)")
    return items


# -- a small paired folder from the held-out photographs ----------------------------------------------

def make_pairs(out, degradation="noise", count=6, size=128, seed=0):
    """OUT/clean/ + OUT/degraded/: `count` crops of the *test* photographs (photos.py), degraded with
    degrade.py at its default strengths; the same seed gives the same files."""
    import numpy as np

    from .data import save_image
    from .degrade import degrade
    from .photos import PhotoCrops

    crops, rng = PhotoCrops("test"), np.random.default_rng(seed)
    g = __import__("torch").Generator().manual_seed(seed)
    for sub in ("clean", "degraded"):
        (Path(out) / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        x = crops.crop(rng, size, index=i % len(crops))
        save_image(x, Path(out) / "clean" / f"{i:03d}.png")
        save_image(degrade(x, degradation, generator=g), Path(out) / "degraded" / f"{i:03d}.png")
    return Path(out)


def main(argv=None):
    import argparse

    from .cli import Help, run

    p = argparse.ArgumentParser(prog="python -m minirestore.testsets", description="write a small paired folder "
                                "(clean/ + degraded/) from the held-out test photographs", formatter_class=Help)
    p.add_argument("out")
    p.add_argument("--degradation", default="noise", help="a degrade.py name or a + mix")
    p.add_argument("--count", type=int, default=6)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    run(lambda: print(f"wrote {make_pairs(args.out, args.degradation, args.count, args.size, args.seed)}") or 0)


if __name__ == "__main__":
    main()
