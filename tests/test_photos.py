"""The photo pipeline (photos.py) on a small fake Debian package built here: no network."""
import dataclasses
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from minirestore import UserError, photos
from minirestore.tiny import TextConfig

COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: fake

Files: *
Copyright: 2020, Somebody
License: GPL-2+

Files: nature/Lake.png
       nature/Hill.png
Copyright: 2021, A Photographer
License: CC-BY-4.0
Comment: two photographs

Files: 16.04/Tree_by_Someone.png
Copyright: 2022, Someone
License: CC0-1.0
"""


def smooth_image(seed, h, w):
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


@pytest.fixture(scope="module")
def fake_package(tmp_path_factory):
    """A .deb like the wallpaper packages: three photographs and a DEP-5 copyright file -> (deb, rows)."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed")
    root = tmp_path_factory.mktemp("pkg")
    tree = root / "fake-backgrounds"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text("Package: fake-backgrounds\nVersion: 1.0-1\nArchitecture: all\n"
                                             "Maintainer: nobody <n@example.org>\nDescription: test photos\n")
    (tree / "usr/share/doc/fake-backgrounds").mkdir(parents=True)
    (tree / "usr/share/doc/fake-backgrounds/copyright").write_text(COPYRIGHT)
    shapes = {"usr/share/backgrounds/nature/Lake.png": (300, 400), "usr/share/backgrounds/nature/Hill.png": (1100, 1200),
              "usr/share/backgrounds/Tree_by_Someone.png": (256, 200)}
    rows = []
    for i, (path, (h, w)) in enumerate(shapes.items()):
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        smooth_image(i, h, w).save(tree / path)
        rows.append(photos.Photo(name=f"p{i}", split=photos.SPLITS[i], package="fake-backgrounds", version="1.0-1",
                                 path=path, sha256=photos._sha256(tree / path),
                                 licence=photos.licence_of(tree / "usr/share/doc/fake-backgrounds/copyright", path)))
    deb = root / "fake-backgrounds_1.0-1_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(tree), str(deb)], check=True, capture_output=True)
    return deb, rows


def local_download(deb):
    calls = []

    def download(package, version, dest):
        calls.append((package, version))
        return shutil.copy(deb, dest)
    return download, calls


def test_licences_come_from_the_copyright_file(fake_package):
    _, rows = fake_package
    assert [r.licence for r in rows] == ["CC-BY-4.0", "CC-BY-4.0", "CC0-1.0"]  # the last matching stanza wins


def test_fetch_unpacks_checks_and_downscales(fake_package, tmp_path):
    deb, rows = fake_package
    download, calls = local_download(deb)
    cache = photos.fetch(tmp_path / "cache", rows, download=download, progress=lambda *a: None)
    assert calls == [("fake-backgrounds", "1.0-1")]  # one download for the package's three photographs
    lake, hill, tree = (np.load(cache / f"{r.name}.npy") for r in rows)
    assert lake.shape == (300, 400, 3) and lake.dtype == np.uint8 and tree.shape == (256, 200, 3)
    assert min(hill.shape[:2]) == photos.MAX_SIDE  # 1100 x 1200 shrunk to a short side of 1024
    assert np.array_equal(lake, np.asarray(smooth_image(0, 300, 400).convert("RGB")))  # stored as it was
    photos.fetch(cache, rows, download=download, progress=lambda *a: None)
    assert len(calls) == 1  # everything cached: nothing downloaded again
    assert not list(cache.glob("*.tmp")) and not list(cache.glob("tmp*"))  # no temporary leftovers


def test_a_changed_package_is_refused(fake_package, tmp_path):
    deb, rows = fake_package
    download, _ = local_download(deb)
    wrong = [dataclasses.replace(rows[0], sha256="0" * 64)]
    with pytest.raises(UserError, match="sha256"):
        photos.fetch(tmp_path, wrong, download=download, progress=lambda *a: None)
    assert not (tmp_path / "p0.npy").exists()
    gone = [dataclasses.replace(rows[0], path="usr/share/backgrounds/nope.png")]
    with pytest.raises(UserError, match="has no usr/share/backgrounds/nope.png"):
        photos.fetch(tmp_path, gone, download=download, progress=lambda *a: None)


def test_crops_cover_every_scale_of_their_split_only(fake_package, tmp_path):
    deb, rows = fake_package
    download, _ = local_download(deb)
    photos.fetch(tmp_path, rows, download=download, progress=lambda *a: None)
    crops = photos.PhotoCrops("train", tmp_path, rows)
    assert crops.names == ["p0"]  # the split's photographs, no other
    rng = np.random.default_rng(0)
    x = crops.crop(rng, 64)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    lake = torch.from_numpy(np.load(tmp_path / "p0.npy")).permute(2, 0, 1).float() / 255

    def expected(seed, side):  # crop's draws in order: photo, (scale given), top, left, flip
        g = np.random.default_rng(seed)
        g.integers(1)
        top, left, flip = g.integers(300 - side + 1), g.integers(400 - side + 1), g.random() < 0.5
        region = lake[None, :, top:top + side, left:left + side]
        if side != 64:
            region = torch.nn.functional.interpolate(region, size=(64, 64), mode="bilinear", antialias=True)
        return region[0].flip(-1) if flip else region[0]

    native = crops.crop(np.random.default_rng(1), 64, scale=0.0)  # a 64 px patch at full detail
    assert torch.equal(native, expected(1, 64))
    whole = crops.crop(np.random.default_rng(2), 64, scale=1.0)  # the whole short side (300 px), shrunk
    assert torch.allclose(whole, expected(2, 300), atol=1e-6)
    assert crops.crop(np.random.default_rng(3), 64, scale=0.5).shape == (3, 64, 64)
    with pytest.raises(UserError, match="unknown photo split"):
        photos.load_split("training", tmp_path, rows)


def test_the_committed_list_splits_by_photograph():
    rows = photos.read_list()
    assert len({r.name for r in rows}) == len(rows) == len({r.sha256 for r in rows})
    assert len({(r.package, r.path) for r in rows}) == len(rows)
    counts = {s: sum(r.split == s for r in rows) for s in photos.SPLITS}
    assert counts["train"] >= 20 and counts["val"] >= 3 and counts["test"] >= 5, counts
    assert all(r.licence and r.version and len(r.sha256) == 64 for r in rows)


def test_descriptors_are_words_of_the_text_encoder():
    vocab = set(TextConfig().vocab)
    g = torch.Generator().manual_seed(0)
    dark_grey = torch.full((3, 32, 32), 0.1) + 0.001 * torch.rand(3, 32, 32, generator=g)
    assert photos.describe(dark_grey) == ["grey", "dark", "smooth", "soft"]
    red = torch.zeros(3, 32, 32)
    red[0] = 0.9
    red[:, :, 16:] = torch.rand(3, 32, 16, generator=g)  # half red, half noise: textured, sharp
    words = photos.describe(red)
    assert words[2:] == ["textured", "sharp"] and set(words) <= vocab


def test_descriptors_of_a_batch_are_each_image_s_own():
    g = torch.Generator().manual_seed(1)
    batch = torch.rand(6, 3, 24, 24, generator=g) ** torch.linspace(0.3, 4, 6)[:, None, None, None]  # dark..bright
    batch[0] = 0.5  # all grey: no hue to weigh, counted instead
    batch[1, 1:] = 0.05  # red on black
    words = photos.describe_batch(batch)
    assert words == [photos.describe(x) for x in batch]  # a batch changes nothing
    assert words[0][0] == "grey" and words[1][0] in ("warm", "vivid")
    assert len({w[1] for w in words}) > 1  # the brightness words follow the images


def test_a_pack_carries_the_photographs_as_jpeg(fake_package, tmp_path):
    deb, rows = fake_package
    download, _ = local_download(deb)
    cache = photos.fetch(tmp_path / "cache", rows, download=download, progress=lambda *a: None)
    files = photos.pack(tmp_path / "pack", splits=("train", "val"), cache=cache, rows=rows)
    assert sorted(f.name for f in files) == sorted(f"{r.name}.jpg" for r in rows if r.split in ("train", "val"))
    names = photos.unpack(tmp_path / "pack", tmp_path / "there", rows)
    for name in names:  # decoded where load_split reads, close to the original (JPEG at quality 95)
        a, b = (np.load(d / f"{name}.npy").astype(np.float64) / 255 for d in (cache, tmp_path / "there"))
        assert a.shape == b.shape and 10 * np.log10(1 / np.mean((a - b) ** 2)) > 35
    crops = photos.PhotoCrops("train", tmp_path / "there", rows)
    assert crops.crop(np.random.default_rng(0), 32).shape == (3, 32, 32)
    (tmp_path / "pack" / "holiday.jpg").write_bytes(files[0].read_bytes())
    with pytest.raises(UserError, match="holiday.jpg are not photographs of photos.tsv"):
        photos.unpack(tmp_path / "pack", tmp_path / "there", rows)
    with pytest.raises(UserError, match="holds no .jpg files"):
        photos.unpack(tmp_path / "empty", tmp_path / "there", rows)
