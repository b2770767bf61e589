"""Adaptive T0 end to end: train.py over a T0 range writes a curve (and, on the tiny default, a noise prompt
trained at one T0 gets one too), sample.py --t0 auto follows it.

A few training steps only (the curve of such a prompt means little; tests/test_strength.py checks that
calibration finds the right T0 on a toy sampler): these check the plumbing and its reproducibility.
"""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from minirestore.data import load_image
from minirestore.photos import PhotoCrops
from minirestore.prompts import load_prompt
from minirestore.strength import curve_T0, noise_sigma

ROOT = Path(__file__).resolve().parents[1]


def python(script, *args, cwd):
    r = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def range_prompt(real_photos, tmp_path_factory):
    d = tmp_path_factory.mktemp("adaptive")
    python("train.py", "--degradation", "noise", "--t0", "0.05:0.8", "--steps", "6", "--val-every", "0",
           "--val-count", "2", "--val-steps", "2", "--sample-steps", "1", "--samples", "2",
           "--out", d / "range.safetensors", cwd=d)
    return d / "range.safetensors"


def test_range_training_writes_a_T0_curve(range_prompt):
    meta = load_prompt(range_prompt).meta
    assert meta["T0_range"] == "0.05:0.8" and 0.05 <= float(meta["T0"]) <= 0.8
    curve = json.loads(meta["T0_curve"])
    assert curve["degradation"] == "noise" and len(curve["strength"]) == len(curve["T0"]) == 6
    assert curve["strength"] == sorted(curve["strength"]) and curve["strength"][0] < 0.04 < 0.15 < curve["strength"][-1]
    assert all(0.05 <= T0 <= 0.8 for T0 in curve["T0"])
    assert len(curve["grid"]) == 11 and np.array(curve["psnr"]).shape == (6, 11)
    assert curve["sampler"] == {"steps": 1, "samples": 2, "spin": 4}  # the sampler it was measured with (spun: tiny)


@pytest.fixture(scope="module")
def fixed_prompt(real_photos, tmp_path_factory):
    """The main job's shape (--t0 0.6, tiny, noise): --curve is its default."""
    d = tmp_path_factory.mktemp("fixed")
    python("train.py", "--degradation", "noise", "--t0", "0.6", "--steps", "6", "--val-every", "0", "--val-count", "2",
           "--val-steps", "2", "--sample-steps", "1", "--samples", "2", "--out", d / "fixed.safetensors", cwd=d)
    return d / "fixed.safetensors"


def test_a_prompt_trained_at_one_T0_gets_a_curve_and_keeps_its_T0(fixed_prompt, tmp_path):
    meta = load_prompt(fixed_prompt).meta
    assert meta["T0"] == "0.6" and "T0_range" not in meta
    curve = json.loads(meta["T0_curve"])
    assert curve["grid"][0] == pytest.approx(0.05) and curve["grid"][-1] == pytest.approx(0.95)  # beyond its T0 too
    assert len(curve["strength"]) == 6 and curve["sampler"] == {"steps": 1, "samples": 2, "spin": 4}
    noisy_photo(tmp_path / "light.png", 0.03, seed=3)
    out = python("sample.py", tmp_path / "light.png", "--prompt", fixed_prompt, "--steps", "1", cwd=tmp_path)
    strength, T0 = chosen_T0(out)  # no --t0: auto, as for a range prompt
    assert T0 == pytest.approx(curve_T0(curve, strength), abs=1e-3)
    copy = tmp_path / "copy.safetensors"  # --recalibrate: a new curve, the trained T0 kept
    shutil.copy(fixed_prompt, copy)
    out = python("train.py", "--recalibrate", copy, "--val-count", "2", "--sample-steps", "2", "--samples", "1",
                 cwd=tmp_path)
    assert "T0 0.6 kept" in out
    (meta0, tensors0), (meta1, tensors1) = raw(fixed_prompt), raw(copy)
    assert tensors1 == tensors0 and meta1["T0"] == "0.6"
    assert {k: v for k, v in meta1.items() if k != "T0_curve"} == {k: v for k, v in meta0.items() if k != "T0_curve"}
    assert json.loads(meta1["T0_curve"])["sampler"] == {"steps": 2, "samples": 1}


def test_curve_flag(real_photos, tmp_path):
    """--no-curve: a plain prompt at one T0; --curve where no strength estimator exists: one line, nothing written."""
    python("train.py", "--degradation", "noise", "--t0", "0.6", "--steps", "2", "--val-every", "0", "--val-count", "2",
           "--val-steps", "2", "--no-curve", "--out", tmp_path / "plain.safetensors", cwd=tmp_path)
    assert "T0_curve" not in load_prompt(tmp_path / "plain.safetensors").meta
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--degradation", "blur", "--curve", "--steps", "2",
                        "--out", str(tmp_path / "blur.safetensors")], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--curve" in r.stderr, r.stderr
    assert "--degradation noise" in r.stderr and not (tmp_path / "blur.safetensors").exists()


def noisy_photo(path, sigma, seed):
    clean = PhotoCrops("test").crop(np.random.default_rng([71, seed]), 80)
    noisy = (clean + sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)
    Image.fromarray((noisy.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)


def chosen_T0(stdout):
    m = re.search(r"estimated noise strength ([0-9.]+) -> T0 ([0-9.]+)", stdout)
    assert m, stdout
    return float(m.group(1)), float(m.group(2))


def test_auto_T0_follows_the_curve_and_is_reproducible(range_prompt, tmp_path):
    curve = json.loads(load_prompt(range_prompt).meta["T0_curve"])
    for name, sigma in (("light", 0.03), ("heavy", 0.25)):
        noisy_photo(tmp_path / f"{name}.png", sigma, seed=1)
        runs = []
        for k in range(2):
            out = python("sample.py", tmp_path / f"{name}.png", "--prompt", range_prompt, "--steps", "2",
                         "--suffix", f"_{k}", cwd=tmp_path)  # no --t0: auto is the default for a range prompt
            runs.append((chosen_T0(out), (tmp_path / f"{name}_{k}.png").read_bytes()))
        (strength, T0), _ = runs[0]
        assert runs[0] == runs[1]  # same T0, same bytes
        x, _ = load_image(tmp_path / f"{name}.png")
        assert strength == pytest.approx(noise_sigma(x).item(), abs=1e-4)
        assert T0 == pytest.approx(curve_T0(curve, strength), abs=1e-3)
        assert strength == pytest.approx(sigma, rel=0.35)  # the estimate reads the noise on a photo
    fixed = python("sample.py", tmp_path / "heavy.png", "--prompt", range_prompt, "--steps", "2", "--t0", "0.3",
                   "--suffix", "_fixed", cwd=tmp_path)
    assert "(T0 0.3)" in fixed  # an explicit --t0 overrides the curve


def test_prompt_without_a_curve_keeps_its_T0(real_photos, tmp_path):
    noisy_photo(tmp_path / "p.png", 0.1, seed=2)
    shipped = ROOT / "weights" / "tiny" / "prompts" / "blur.safetensors"
    T0 = float(load_prompt(shipped).meta["T0"])
    out = python("sample.py", tmp_path / "p.png", "--prompt", shipped, "--steps", "2", "--t0", "auto", cwd=tmp_path)
    assert "has no T0 curve" in out and f"(T0 {T0:g})" in out


def raw(path):
    """A prompt file's metadata and its tensors' bytes, as stored."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: (f.get_tensor(k).dtype, f.get_tensor(k).numpy().tobytes()) for k in f.keys()}


def test_recalibrate_changes_only_the_curve_and_default_T0(range_prompt, tmp_path):
    """train.py --recalibrate: the same validation images and code as training's calibration, so with the same
    sampler the same curve; with another sampler a new curve (recorded) and default T0, every other entry and
    tensor bit-identical; the file rewritten in place, or --out written and the source untouched."""
    before = range_prompt.read_bytes()
    same = tmp_path / "same.safetensors"
    python("train.py", "--recalibrate", range_prompt, "--val-count", "2", "--sample-steps", "1", "--samples", "2",
           "--out", same, cwd=tmp_path)
    assert range_prompt.read_bytes() == before
    assert raw(same) == raw(range_prompt)  # same sampler, same val images: the curve training measured
    copy = tmp_path / "copy.safetensors"
    shutil.copy(range_prompt, copy)
    out = python("train.py", "--recalibrate", copy, "--val-count", "2", "--sample-steps", "2", "--samples", "1",
                 cwd=tmp_path)
    assert "default T0" in out
    (meta0, tensors0), (meta1, tensors1) = raw(range_prompt), raw(copy)
    assert tensors1 == tensors0
    assert {k: v for k, v in meta1.items() if k not in ("T0", "T0_curve")} == \
        {k: v for k, v in meta0.items() if k not in ("T0", "T0_curve")}
    curve = json.loads(meta1["T0_curve"])
    assert curve["sampler"] == {"steps": 2, "samples": 1} and meta1["T0_curve"] != meta0["T0_curve"]
    assert 0.05 <= float(meta1["T0"]) <= 0.8 and len(curve["strength"]) == 6
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


@pytest.mark.parametrize("which,message", [("missing", "no such file"), ("fixed", "no strength estimator"),
                                           ("garbage", "not a readable prompt file")])
def test_recalibrate_errors_are_one_line(which, message, tmp_path):
    path = {"missing": tmp_path / "nope.safetensors", "fixed": ROOT / "weights" / "tiny" / "prompts" / "blur.safetensors",
            "garbage": tmp_path / "garbage.safetensors"}[which]
    if which == "garbage":
        path.write_text("not a prompt")
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--recalibrate", str(path), "--out",
                        str(tmp_path / "o.safetensors")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_adaptive_benchmark_compares_curves_with_sample_pys_sampler(range_prompt, tmp_path):
    """benchmarks/adaptive.py --split val --compare: the other curve's row is paired against auto, and the
    sampler of every learned row is the one given (by default sample.py's)."""
    before = ROOT / "benchmarks" / "photos" / "prompts" / "noise-range-0.05-0.95-1800.safetensors"  # train.py's own curve
    python("benchmarks/adaptive.py", "--split", "val", "--adaptive", range_prompt, "--compare", f"other={before}",
           "--sigmas", "0.1", "--images", "2", "--val-images", "2", "--steps", "1", "--samples", "2",
           "--out", tmp_path, cwd=tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "val photographs" in md and "the mean of 2 samples of 1 steps" in md
    assert "(measured with 2 samples of 1 steps)" in md and "(measured with an unrecorded sampler" in md
    row = next(line for line in md.splitlines() if "| other, --t0 auto |" in line)
    assert re.search(r"\| [+-]\d+\.\d\d ± \d+\.\d\d \|", row), row  # its paired difference is shown


def test_adaptive_benchmark_on_jpeg_files_and_a_T0_grid(range_prompt, tmp_path):
    """--jpeg Q: the noisy crops go through a JPEG round trip; auto reads them as sample.py reads any file, beside a
    row that also reads their luma at 2 x 2 (which finds more of the noise the encoder hid); --grid: the same prompt
    from fixed T0s, and auto against the best of them."""
    python("benchmarks/adaptive.py", "--split", "val", "--adaptive", range_prompt, "--jpeg", "75", "--grid", "0.2,0.4",
           "--sigmas", "0.1", "--images", "2", "--val-images", "2", "--steps", "1", "--samples", "2",
           "--out", tmp_path, cwd=tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "noisy crops saved as JPEG quality 75" in md
    rows = {line.split(" | ")[1]: line for line in md.splitlines() if line.startswith("| 0.1 | ")}
    assert {"adaptive, --t0 auto, luma read too", "adaptive at T0 0.2", "adaptive at T0 0.4"} <= set(rows), rows
    out = json.loads((tmp_path / "results.json").read_text())  # (strength, T0) per crop, both readings
    assert all(s_luma > s for (s, _), (s_luma, _) in zip(out["chosen"], out["chosen_luma_read_too"])), out
    assert re.search(r"\| 0\.1 \| 0\.[24] \(\d+\.\d\d dB\) \| [+-]\d+\.\d\d ± \d+\.\d\d \|", md), md
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "adaptive.py"), "--adaptive", str(range_prompt),
                        "--jpeg", "101"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--jpeg 101" in r.stderr, r.stderr
