"""The command-line tools' conventions and hostile inputs: sample.py's --out FILE, one-line errors with a
non-zero exit and nothing half-written, output modes (CMYK), animated images, and pretrain's resume that
unpickles no code. sample.py and train.py run in-process through cli.run, as their __main__ does."""
import errno
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minirestore import UserError, pretrain
from minirestore.cli import run

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(f"cli_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sample, train = _script("sample"), _script("train")


def _image(path, seed=0, size=(24, 20), mode="RGB"):
    rgb = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).convert(mode).save(path)
    return path


def fails(main, argv, capsys, match):
    """main(argv) under cli.run: exit code 2 and, as the last line of stderr, one `error:` line with `match`."""
    with pytest.raises(SystemExit) as e:
        run(lambda: main([str(a) for a in argv]))
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: "), err
    assert match in err.strip().splitlines()[-1], err
    return err


def files(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


FAST = ["--steps", "1", "--t0", "0.4"]  # the tiny default with its shipped noise prompt, one sampler step


# ---------------------------------------------------------------------------------------------
# sample.py --out
# ---------------------------------------------------------------------------------------------

def test_out_with_an_image_suffix_is_the_output_file(tmp_path):
    src = _image(tmp_path / "noisy.png")
    assert sample.main([str(src), "--out", str(tmp_path / "new" / "deeper" / "clean.png"), *FAST]) == 0
    out = tmp_path / "new" / "deeper" / "clean.png"
    assert out.is_file() and Image.open(out).size == (24, 20)  # a file, its folders created
    assert files(tmp_path) == ["new", "new/deeper", "new/deeper/clean.png", "noisy.png"]  # no temporary left
    # another format than the input's: a JPEG named by --out is a JPEG
    assert sample.main([str(src), "--out", str(tmp_path / "clean.jpg"), *FAST]) == 0
    assert Image.open(tmp_path / "clean.jpg").format == "JPEG"


def test_out_without_a_suffix_is_a_folder(tmp_path):
    a, b = _image(tmp_path / "a.png", 1), _image(tmp_path / "b.png", 2)
    assert sample.main([str(a), str(b), "--out", str(tmp_path / "restored"), *FAST]) == 0
    assert files(tmp_path / "restored") == ["a_restored.png", "b_restored.png"]


def test_help_says_what_out_means():
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--help"], capture_output=True, text=True)
    text = " ".join(r.stdout.split())
    assert r.returncode == 0 and "the output file" in text and "otherwise the output folder" in text


def test_out_refusals_write_nothing(tmp_path, capsys):
    a, b = _image(tmp_path / "a.png", 1), _image(tmp_path / "b.png", 2)
    before = files(tmp_path)
    fails(sample.main, [a, "--out", a, *FAST], capsys, "would overwrite an input")
    fails(sample.main, [a, b, "--out", tmp_path / "x.png", *FAST], capsys, "names one file but there are 2 inputs")
    fails(sample.main, [a, "--out", tmp_path / "x.mp4", *FAST], capsys, "is an image, so its output is an image file")
    fails(sample.main, [a, "--out", "/proc/nowhere/x.png", *FAST], capsys, "cannot write in /proc/nowhere")
    fails(sample.main, [a, "--out", "/proc/folder", *FAST], capsys, "cannot write in /proc/folder")
    assert files(tmp_path) == before


def test_a_full_disk_is_one_line_and_leaves_no_file(tmp_path, capsys, monkeypatch):
    src = _image(tmp_path / "a.png")

    def full(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half an image")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", full)
    fails(sample.main, [src, "--out", tmp_path / "out.png", *FAST], capsys, "No space left on device")
    assert files(tmp_path) == ["a.png"]


def test_sampler_flags_out_of_range(tmp_path, capsys):
    src = _image(tmp_path / "a.png")
    fails(sample.main, [src, "--steps", "0"], capsys, "--steps must be at least 1")
    fails(sample.main, [src, "--steps", "-3"], capsys, "--steps must be at least 1")
    fails(sample.main, [src, "--t0", "0"], capsys, "--t0 must be in (0, 1]")
    fails(sample.main, [src, "--spin", "-1"], capsys, "--spin must be 0 (off)")
    fails(sample.main, [src, "--spin", "4", "--tile", "0", *FAST], capsys, "--spin shifts the tiles")
    assert files(tmp_path) == ["a.png"]


def test_spin_on_the_tiny_default(tmp_path):
    """The tiny default spins by default: with several samples the output differs from --spin 0; with one sample
    (restoration 0 is unshifted) it is the same file."""
    src = _image(tmp_path / "a.png", size=(40, 36))
    outs = {}
    for name, extra in (("spun", []), ("plain", ["--spin", "0"]), ("one", ["--samples", "1"]),
                        ("one-plain", ["--samples", "1", "--spin", "0"])):
        assert sample.main([str(src), "--samples", "3", *FAST, *extra, "--out", str(tmp_path / f"{name}.png")]) == 0
        outs[name] = np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.int16)
    assert np.abs(outs["spun"] - outs["plain"]).max() > 0
    assert np.array_equal(outs["one"], outs["one-plain"])


def test_a_backbone_folder_with_a_truncated_transformer(tmp_path, capsys):
    folder = tmp_path / "tiny-copy"
    shutil.copytree(ROOT / "weights" / "tiny", folder)
    flux = folder / "flux.safetensors"
    with open(flux, "r+b") as f:
        f.truncate(flux.stat().st_size // 2)
    src = _image(tmp_path / "a.png")
    fails(sample.main, [src, "--model", folder, *FAST], capsys, "flux.safetensors is not a readable safetensors file")
    assert not (tmp_path / "a_restored.png").exists()


def test_a_prompt_of_another_backbone(tmp_path, capsys):
    from minirestore.prompts import load_prompt, save_prompt

    other = tmp_path / "flux-dev-noise.safetensors"
    save_prompt(load_prompt(ROOT / "weights" / "tiny" / "prompts" / "noise.safetensors"), other, backbone="flux-dev")
    fails(sample.main, [_image(tmp_path / "a.png"), "--prompt", other, *FAST], capsys,
          "trained for the backbone flux-dev")


# ---------------------------------------------------------------------------------------------
# Modes and animated images
# ---------------------------------------------------------------------------------------------

def test_cmyk_in_cmyk_out(tmp_path):
    src = _image(tmp_path / "print.jpg", mode="CMYK")
    assert Image.open(src).mode == "CMYK"
    assert sample.main([str(src), *FAST]) == 0
    out = Image.open(tmp_path / "print_restored.jpg")
    assert (out.mode, out.size) == ("CMYK", (24, 20))
    assert sample.main([str(src), "--out", str(tmp_path / "screen.png"), *FAST]) == 0  # PNG holds no CMYK
    assert Image.open(tmp_path / "screen.png").mode == "RGB"


def _gif(path, n=3, size=(16, 12), durations=(40, 80, 120)):
    rng = np.random.default_rng(3)
    frames = [Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)) for _ in range(n)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=list(durations[:n]), loop=0)
    return path


def test_an_animated_gif_has_every_frame_restored_with_flux(tmp_path, capsys):
    from minirestore.data import load_frames

    src = _gif(tmp_path / "anim.gif")
    assert sample.main([str(src), *FAST]) == 0
    assert "3 frames, each restored as an image" in capsys.readouterr().out
    before, _ = load_frames(src)
    after, info = load_frames(tmp_path / "anim_restored.gif")
    assert after.shape == before.shape == (3, 3, 12, 16) and info["durations"] == [40, 80, 120]
    assert (after - before).abs().mean() > 0.01  # restored, not copied
    assert not torch.equal(after[0], after[1])  # each frame its own, not the first one repeated
    fails(sample.main, [src, "--out", tmp_path / "still.jpg", *FAST], capsys, "cannot hold frames")


# ---------------------------------------------------------------------------------------------
# train.py
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value, match", [
    ("--lr", "-1", "--lr must be positive"), ("--lr", "0", "--lr must be positive"),
    ("--steps", "0", "--steps must be at least 1"), ("--steps", "-5", "--steps must be at least 1"),
    ("--batch-size", "0", "--batch-size must be at least 1"), ("--t-min", "-0.1", "--t-min must be positive"),
    ("--val-every", "-1", "--val-every must be 0"),
])
def test_training_flags_out_of_range(flag, value, match, capsys):
    fails(train.main, [flag, value], capsys, match)


def _train_args(backbone_dir, images_dir, tmp_path, *extra):
    return ["--model", backbone_dir, "--data", images_dir, "--resolution", "16", "--steps", "1", "--val-every", "0",
            "--val-count", "1", "--val-steps", "1", "--run-dir", tmp_path / "run",
            "--out", tmp_path / "p.safetensors", *extra]


def test_training_refuses_bad_places_and_data_before_any_work(backbone_dir, images_dir, tmp_path, capsys):
    args = _train_args(backbone_dir, images_dir, tmp_path)
    fails(train.main, args + ["--out", "/proc/nope/p.safetensors"], capsys, "cannot write in /proc/nope")
    fails(train.main, args + ["--run-dir", "/proc/nope"], capsys, "cannot write in /proc/nope")
    fails(train.main, args + ["--out", tmp_path / "p.png"], capsys, "ends in .safetensors")
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"{i}.png").write_bytes(b"not an image")
    fails(train.main, _train_args(backbone_dir, broken, tmp_path), capsys, "none of its images is readable")
    mixed = tmp_path / "mixed"
    shutil.copytree(images_dir, mixed)
    (mixed / "zz.jpg").write_bytes(b"\xff\xd8 cut short")
    fails(train.main, _train_args(backbone_dir, mixed, tmp_path), capsys, "1 of 7 images are not readable: zz.jpg")
    assert not (tmp_path / "p.safetensors").exists()


def test_training_resume_from_an_unreadable_checkpoint(backbone_dir, images_dir, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    fails(train.main, _train_args(backbone_dir, images_dir, tmp_path, "--resume"), capsys,
          "is not a readable train.py checkpoint")
    torch.save({"something": torch.zeros(2)}, tmp_path / "run" / "checkpoint.pt")  # readable, not ours
    fails(train.main, _train_args(backbone_dir, images_dir, tmp_path, "--resume"), capsys,
          "is not a readable train.py checkpoint")


# ---------------------------------------------------------------------------------------------
# pretrain: flags, and a resume that runs no code from the file
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, match", [
    (["--lr", "-1"], "--lr must be positive"), (["--lr", "0"], "--lr must be positive"),
    (["--steps", "-1"], "--steps must be 0"), (["--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_pretrain_flags_out_of_range(argv, match):
    with pytest.raises(UserError, match=match):
        pretrain.parse_args(argv)


class Planted:
    """What a planted checkpoint.pt could hold: unpickling it would run code (here, write a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def test_pretrain_resume_unpickles_no_code(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"flux": Planted(marker), "step": 3}, run_dir / "checkpoint.pt")
    args = pretrain.parse_args(["--steps", "1", "--batch-size", "2", "--sizes", "32", "--data", "leaves", "--threads",
                                "1", "--device", "cpu", "--out", str(tmp_path / "w"), "--run-dir", str(run_dir),
                                "--resume"])
    with pytest.raises(UserError, match="not a readable checkpoint of this run"):
        pretrain.train(args)
    assert not marker.exists()
    (run_dir / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable checkpoint of this run"):
        pretrain.train(args)


def test_pretrain_checkpoint_holds_tensors_and_json_only(tmp_path):
    args = pretrain.parse_args(["--steps", "1", "--batch-size", "2", "--sizes", "32", "--data", "leaves", "--threads",
                                "1", "--device", "cpu", "--out", str(tmp_path / "w"), "--run-dir", str(tmp_path / "run"),
                                "--sample-steps", "1", "--warmup", "1"])
    pretrain.train(args)
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["rng"].dtype == torch.uint8 and json.loads(ck["args"])["batch_size"] == 2
