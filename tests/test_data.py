"""Image I/O round trips for every mode, atomic writes, clear errors, datasets and the validation split."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from minirestore import UserError
from minirestore.data import CleanFolder, PairedFolder, list_images, load_image, save_image, split
from minirestore.files import atomic_write


def rgb_array(H=12, W=20, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def as_uint8(x):
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def write_images(folder, n, H=40, W=56, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rgb_array(H, W, seed + i)).save(folder / f"img{i:02d}.png")
    return folder


# ---------------------------------------------------------------------------------------------
# load / save round trips
# ---------------------------------------------------------------------------------------------

def test_rgb_round_trip(tmp_path):
    arr = rgb_array()
    Image.fromarray(arr).save(tmp_path / "a.png")
    x, info = load_image(tmp_path / "a.png")
    assert x.shape == (3, 12, 20) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert np.array_equal(as_uint8(x), arr)
    save_image(x, tmp_path / "b.png", info)
    out = Image.open(tmp_path / "b.png")
    assert out.mode == "RGB" and out.size == (20, 12) and np.array_equal(np.asarray(out), arr)


def test_rgba_keeps_alpha(tmp_path):
    arr = np.dstack([rgb_array(), np.random.default_rng(1).integers(0, 256, (12, 20), dtype=np.uint8)])
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    x, info = load_image(tmp_path / "a.png")
    assert x.shape == (3, 12, 20)
    save_image(1 - x, tmp_path / "b.png", info)  # "restore" the colours; alpha must stay the input's
    out = np.asarray(Image.open(tmp_path / "b.png"))
    assert Image.open(tmp_path / "b.png").mode == "RGBA"
    assert np.array_equal(out[..., 3], arr[..., 3])
    assert np.array_equal(out[..., :3], 255 - arr[..., :3])


@pytest.mark.parametrize("mode", ["L", "LA"])
def test_grey_round_trip(tmp_path, mode):
    grey = rgb_array()[..., 0]
    im = Image.fromarray(grey, "L")
    if mode == "LA":
        im.putalpha(Image.fromarray(rgb_array()[..., 1]))
    im.save(tmp_path / "a.png")
    x, info = load_image(tmp_path / "a.png")
    assert x.shape == (3, 12, 20) and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    save_image(x, tmp_path / "b.png", info)
    out = Image.open(tmp_path / "b.png")
    assert out.mode == mode
    assert np.array_equal(np.asarray(out.getchannel("L")), grey)
    if mode == "LA":
        assert np.array_equal(np.asarray(out.getchannel("A")), rgb_array()[..., 1])


def test_16bit_png_stays_16bit(tmp_path):
    arr = np.random.default_rng(2).integers(0, 65536, (12, 20), dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode == "I;16"
    x, info = load_image(tmp_path / "a.png")
    assert np.allclose(x[0].numpy(), arr / 65535, atol=1e-7)  # full 16-bit precision, not 8
    save_image(x, tmp_path / "b.png", info)
    out = Image.open(tmp_path / "b.png")
    assert out.mode == "I;16" and np.array_equal(np.asarray(out), arr)
    save_image(x, tmp_path / "c.jpg", info)  # JPEG cannot hold 16 bits: 8-bit grey, scaled, not clipped
    back = np.asarray(Image.open(tmp_path / "c.jpg")).astype(float)
    assert Image.open(tmp_path / "c.jpg").mode == "L" and back.mean() > 0.3 * arr.mean() / 257


@pytest.mark.parametrize("transparent", [False, True])
def test_palette_images(tmp_path, transparent):
    arr = np.arange(240, dtype=np.uint8).reshape(12, 20) % 4
    im = Image.fromarray(arr, "P")
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255])
    kwargs = {"transparency": 0} if transparent else {}
    im.save(tmp_path / "a.png", **kwargs)
    x, info = load_image(tmp_path / "a.png")
    assert x[:, 0, 0].tolist() == [1, 0, 0] and x[:, 0, 1].tolist() == [0, 1, 0]
    assert info["mode"] == ("RGBA" if transparent else "RGB")
    save_image(x, tmp_path / "b.png", info)
    out = Image.open(tmp_path / "b.png")
    assert out.mode == info["mode"]
    if transparent:
        assert np.array_equal(np.asarray(out)[..., 3], np.where(arr == 0, 0, 255))


def test_jpeg_exif_orientation(tmp_path):
    """Orientation 6: the stored pixels must be turned 90 degrees clockwise to be seen upright."""
    stored = np.zeros((32, 48, 3), np.uint8)
    stored[:16, :16] = [255, 0, 0]  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "a.jpg", exif=exif, quality=95)
    x, info = load_image(tmp_path / "a.jpg")
    assert x.shape == (3, 48, 32)  # width and height swapped
    upright = np.rot90(stored, k=-1)  # clockwise
    assert np.abs(as_uint8(x).astype(int) - upright).mean() < 4
    assert x[0, :16, -16:].mean() > 0.9 and x[0, :16, :16].mean() < 0.1  # red now top-right
    save_image(x, tmp_path / "b.jpg", info)
    out = Image.open(tmp_path / "b.jpg")
    assert out.size == (32, 48) and out.getexif().get(0x0112, 1) == 1  # upright, no rotation tag left


def test_save_checks_size(tmp_path):
    Image.fromarray(rgb_array()).save(tmp_path / "a.png")
    x, info = load_image(tmp_path / "a.png")
    with pytest.raises(ValueError):
        save_image(x[:, :10], tmp_path / "b.png", info)
    save_image(x[:, :10], tmp_path / "c.png")  # no info: plain RGB of the tensor's size
    assert Image.open(tmp_path / "c.png").size == (20, 10)


# ---------------------------------------------------------------------------------------------
# atomic writes and errors
# ---------------------------------------------------------------------------------------------

def test_atomic_write_leaves_no_temp_files(tmp_path, monkeypatch):
    x = torch.rand(3, 12, 20)
    save_image(x, tmp_path / "out.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    before = (tmp_path / "out.png").read_bytes()

    real_save = Image.Image.save

    def crash(self, fp, *args, **kwargs):  # write part of the file, then fail like a full disk
        fp.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", crash)
    with pytest.raises(UserError, match="out.png: cannot write it \\(disk full\\)"):  # one line for the user
        save_image(1 - x, tmp_path / "out.png")
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # no temp file left
    assert (tmp_path / "out.png").read_bytes() == before  # the old output is untouched


def test_atomic_write_helper(tmp_path):
    target = tmp_path / "a.npy"
    seen = []

    def write(tmp):  # the writer gets a path with the target's name (np.save would add .npy to any other)
        seen.append(tmp)
        np.save(tmp, np.arange(3))

    assert atomic_write(target, write) == target
    assert seen[0].name == "a.npy" and seen[0].parent.parent == tmp_path  # beside the target: same filesystem
    assert np.array_equal(np.load(target), np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # a normal file's mode, not mkstemp's private 0600

    def fail(error):
        def write(tmp):
            tmp.write_bytes(b"half a file")
            raise error
        return write

    for error in (OSError("disk full"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            atomic_write(tmp_path / "new.txt", fail(error))
        with pytest.raises(type(error)):
            atomic_write(target, fail(error))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]  # no target made, no temporary left
        assert np.array_equal(np.load(target), np.arange(3))  # the existing file untouched


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="no such image"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(UserError, match="not a readable image") as e:
        load_image(tmp_path / "text.png")
    assert "\n" not in str(e.value)
    Image.fromarray(rgb_array(64, 64)).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:300])  # truncated
    with pytest.raises(UserError, match="not a readable image"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(UserError, match="extension"):
        save_image(torch.rand(3, 4, 4), tmp_path / "out.xyz")
    with pytest.raises(UserError, match="does not exist"):
        save_image(torch.rand(3, 4, 4), tmp_path / "nofolder" / "out.png")


def test_list_images(tmp_path):
    write_images(tmp_path / "f", 3)
    (tmp_path / "f" / "notes.txt").write_text("x")
    (tmp_path / "f" / ".hidden.png").write_bytes(b"")
    Image.fromarray(rgb_array()).save(tmp_path / "f" / "B.JPG")
    names = [p.name for p in list_images(tmp_path / "f")]
    assert names == sorted(["img00.png", "img01.png", "img02.png", "B.JPG"])
    one = tmp_path / "f" / "img01.png"
    assert list_images([one, tmp_path / "f"])[0] == one
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(UserError, match="no such"):
        list_images(tmp_path / "nope")
    with pytest.raises(UserError):
        list_images([])


# ---------------------------------------------------------------------------------------------
# datasets and split
# ---------------------------------------------------------------------------------------------

def test_clean_folder_items(tmp_path):
    write_images(tmp_path / "c", 3, H=20, W=30)  # smaller than the resolution: scaled up first
    for train in (True, False):
        ds = CleanFolder(tmp_path / "c", "blur+noise", resolution=24, train=train)
        item = ds[1]
        assert set(item) == {"clean", "degraded", "name"} and item["name"] == "img01"
        assert item["clean"].shape == (3, 24, 24) and item["degraded"].shape == (3, 24, 24)
        assert item["clean"].dtype == torch.float32 and 0 <= item["degraded"].min() and item["degraded"].max() <= 1
        assert (item["clean"] - item["degraded"]).abs().mean() > 0.01
    rect = CleanFolder(tmp_path / "c", "noise", resolution=(16, 28), train=True)[0]
    assert rect["clean"].shape == (3, 16, 28)
    with pytest.raises(UserError, match="unknown degradation"):
        CleanFolder(tmp_path / "c", "fog")


def test_validation_items_are_fixed_and_training_items_vary(tmp_path):
    write_images(tmp_path / "c", 2, H=48, W=64)
    val = CleanFolder(tmp_path / "c", "noise", resolution=32, train=False, seed=3)
    again = CleanFolder(tmp_path / "c", "noise", resolution=32, train=False, seed=3)
    a, b = val[0], again[0]
    assert torch.equal(a["degraded"], b["degraded"]) and torch.equal(a["clean"], b["clean"])
    assert torch.equal(val[0]["degraded"], a["degraded"])  # same item read twice
    other_seed = CleanFolder(tmp_path / "c", "noise", resolution=32, train=False, seed=4)
    assert not torch.equal(val[0]["degraded"], other_seed[0]["degraded"])
    full = load_image(tmp_path / "c" / "img00.png")[0]
    assert torch.equal(a["clean"], full[:, 8:40, 16:48])  # the centre crop
    train = CleanFolder(tmp_path / "c", "noise", resolution=32, train=True)
    torch.manual_seed(0)
    draws = [train[0] for _ in range(4)]
    assert any(not torch.equal(draws[0]["degraded"], d["degraded"]) for d in draws[1:])
    assert any(not torch.equal(draws[0]["clean"], d["clean"]) for d in draws[1:])  # random crops / flips
    torch.manual_seed(0)
    assert torch.equal(train[0]["degraded"], draws[0]["degraded"])  # reproducible under a seeded global RNG


def test_paired_folder(tmp_path):
    root = tmp_path / "pairs"
    write_images(root / "clean", 3, H=40, W=40)
    (root / "degraded").mkdir()
    for i in range(3):  # degraded = inverted clean, saved under another extension
        arr = np.asarray(Image.open(root / "clean" / f"img{i:02d}.png"))
        Image.fromarray(255 - arr).save(root / "degraded" / f"img{i:02d}.bmp")
    for train in (True, False):
        ds = PairedFolder(root, resolution=24, train=train)
        assert len(ds) == 3
        for _ in range(3):  # crops and flips are applied to both alike
            item = ds[2]
            assert item["clean"].shape == (3, 24, 24) and item["name"] == "img02"
            torch.testing.assert_close(item["degraded"], 1 - item["clean"], atol=1e-6, rtol=0)
    small = root / "degraded" / "img00.bmp"  # a low-resolution input is resized to its clean partner
    Image.open(small).resize((10, 10)).save(small)
    assert PairedFolder(root, resolution=24)[0]["degraded"].shape == (3, 24, 24)


def test_paired_folder_errors_name_the_unmatched_files(tmp_path):
    root = tmp_path / "pairs"
    write_images(root / "clean", 2)
    with pytest.raises(UserError, match="degraded/"):
        PairedFolder(root)
    write_images(root / "degraded", 1)
    Image.fromarray(rgb_array()).save(root / "degraded" / "stray.png")
    with pytest.raises(UserError) as e:
        PairedFolder(root)
    assert "img01.png" in str(e.value) and "stray.png" in str(e.value) and "img00" not in str(e.value)


def test_split_is_disjoint_and_validation_is_fixed(tmp_path):
    write_images(tmp_path / "c", 10, H=36, W=36)
    ds = CleanFolder(tmp_path / "c", "noise", resolution=24, train=True)
    tr, va = split(ds, val_count=3, seed=1)
    assert len(va) == 3 and len(tr) == 7
    assert set(tr.indices).isdisjoint(va.indices) and set(tr.indices) | set(va.indices) == set(range(10))
    assert tr.indices == split(ds, val_count=3, seed=1)[0].indices  # seeded
    assert tr.indices != split(ds, val_count=3, seed=2)[0].indices
    assert tr.dataset.train and not va.dataset.train and ds.train  # the original is not switched
    assert torch.equal(va[0]["degraded"], va[0]["degraded"])  # validation mode: fixed items
    assert len(split(ds, val_fraction=0.2)[1]) == 2
    assert len(split(ds)[1]) == 1  # default 10 %, at least one
    for bad in (dict(val_count=0), dict(val_count=10), dict(val_fraction=1.0)):
        with pytest.raises(UserError):
            split(ds, **bad)


def test_saved_file_has_a_normal_mode(tmp_path):
    save_image(torch.rand(3, 4, 4), tmp_path / "out.png")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "out.png").stat().st_mode & 0o777 == 0o666 & ~mask
