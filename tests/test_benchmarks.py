"""Smoke tests of the method and scaling benchmarks in their smallest CPU configurations.

They check that each script runs end to end, prints its markdown table with the expected columns and
rows, labels CPU numbers as such, and writes a results file only when asked (--write). Timings are
not asserted (beyond being positive numbers): they depend on the machine.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minirestore import UserError
from test_replicate import load  # a benchmark script as a module

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def markdown_table(text, first_column):
    """The rows of the table whose header starts with `first_column`, as lists of cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    assert set(rows[1][0]) == {"-"}, rows[1]  # the |---| separator
    return rows[0], rows[2:]


def test_method_benchmark_prints_both_modes_and_writes_nothing(tmp_path):
    results = tmp_path / "RESULTS.md"
    r = run("method.py", "--model", "tiny", "--repeats", "1", "--warmup", "0", "--sample-steps", "2",
            "--results", results, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    header, rows = markdown_table(r.stdout, "measurement")
    assert header[:4] == ["measurement", "resolution", "mode", "attention path"]
    assert header[4].startswith("seconds (median") and header[5] == "peak memory (MiB)"
    assert [(row[0].split(" (")[0], row[2]) for row in rows] == [
        ("train step", "fused"), ("train step", "released"), ("restore", "fused"), ("restore", "released")]
    assert all(row[1] == "32x32" for row in rows)
    assert all(float(row[4]) > 0 and float(row[5]) > 0 for row in rows)
    assert "CPU smoke" in r.stdout and "not GPU results" in r.stdout
    assert not results.exists()  # no --write, no file


def test_method_benchmark_write_appends_a_labelled_section(tmp_path, monkeypatch):
    method = load("method")
    results = tmp_path / "RESULTS.md"
    results.write_text("# earlier results\n")
    monkeypatch.setenv("MINIRESTORE_KERNELS", "auto")
    argv = ["--model", "tiny", "--repeats", "1", "--warmup", "0", "--sample-steps", "1", "--sample-res", "16",
            "--train-res", "16", "--write", "--results", str(results)]
    monkeypatch.setattr(sys, "argv", ["benchmarks/method.py", *argv])
    assert method.main(argv) == 0
    text = results.read_text()
    assert text.startswith("# earlier results\n")  # appended, not overwritten
    assert "Method benchmark" in text and "torch " in text and "triton " in text
    assert "CPU smoke run: not GPU results" in text and "--sample-res 16" in text
    _, rows = markdown_table(text, "measurement")
    assert len(rows) == 4 and rows[0][1] == "16x16"
    assert os.environ["MINIRESTORE_KERNELS"] == "auto"  # each mode's setting is undone afterwards


def test_method_benchmark_refuses_real_size_on_the_cpu():
    method = load("method")
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        method.main(["--model", "flux-dev", "--device", "cpu"])
    with pytest.raises(UserError, match="multiple of 16"):
        method.main(["--model", "tiny", "--device", "cpu", "--train-res", "24", "--repeats", "1"])


def test_scaling_benchmark_one_process(tmp_path):
    results = tmp_path / "RESULTS.md"
    r = run("scaling.py", "--max-procs", "1", "--steps", "2", "--results", results, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    header, rows = markdown_table(r.stdout, "processes")
    assert header[:6] == ["processes", "per-process batch", "global batch", "steps timed", "steps/s", "images/s"]
    assert len(rows) == 1 and rows[0][:4] == ["1", "1", "1", "1"]
    assert float(rows[0][4]) > 0 and float(rows[0][5]) == pytest.approx(float(rows[0][4]), rel=0.01)
    assert "CPU smoke" in r.stdout
    assert not results.exists()
    assert list(tmp_path.iterdir()) == []  # runs, prompt files and the backbone live in a removed temp dir


@pytest.mark.parametrize("sigma", [0.03, 0.1])
def test_luma_reading_is_unbiased_on_white_noise(sigma):
    """jpeg_noise.luma_sigma (luma, 2 x 2 means, the luma share undone) recovers white noise as the plain MAD rule
    does, on colour images and on grey ones (R = G = B: all of the noise is in luma, no share to undo)."""
    import torch
    from test_strength import smooth_images

    luma_sigma = load("jpeg_noise").luma_sigma
    x = smooth_images(size=192)  # the luma reading has a quarter of one channel's coefficients: a larger image
    g = torch.Generator().manual_seed(2)
    colour = x + sigma * torch.randn(x.shape, generator=g)
    grey = x[:, :1] + sigma * torch.randn(x[:, :1].shape, generator=g)
    assert torch.allclose(luma_sigma(colour), torch.full((4,), sigma), rtol=0.08)
    assert torch.allclose(luma_sigma(grey.expand(-1, 3, -1, -1)), torch.full((4,), sigma), rtol=0.08)
    with pytest.raises(ValueError, match="too small"):
        luma_sigma(x[..., :3, :8])


@pytest.mark.parametrize("quality", [50, 75, 90])
def test_luma_reading_finds_the_noise_a_jpeg_file_hides(quality):
    """Noise 0.1 then a JPEG round trip (PIL, 4:2:0): the finest band alone (strength.noise_sigma) has lost over a
    fifth of it (two thirds at quality 50); the rms reading, which adds luma one scale up, finds most of it back."""
    import torch
    from test_strength import smooth_images

    from minirestore.degrade import jpeg
    from minirestore.strength import noise_sigma

    x = smooth_images(size=192)
    noisy = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    y = jpeg(noisy, generator=0, quality=quality)
    fine, read = noise_sigma(y), load("jpeg_noise").rms_sigma(y)
    assert (fine < 0.08).all() and (read > 1.15 * fine).all(), (fine, read)
    assert ((read > 0.065) & (read < 0.105)).all(), read


def test_jpeg_noise_benchmark_scores_each_reading_by_the_T0_it_picks(real_photos, tmp_path):
    """benchmarks/jpeg_noise.py: every reading gets a PSNR read off the crops' T0 grid (so between the grid's worst
    and best), the coarse reading is above the fine one on a JPEG, and a bad --grid is one line."""
    import json

    import torch

    r = run("jpeg_noise.py", "--images", "2", "--sigmas", "0.1", "--qualities", "75", "--grid", "0.2,0.4",
            "--out", tmp_path, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    header, rows = markdown_table((tmp_path / "results.md").read_text(), "sigma")
    assert [h.split(":")[0] for h in header[4:8]] == ["fine", "coarse", "rms", "energy"] and rows[-1][0] == "mean"
    out = json.loads((tmp_path / "results.json").read_text())
    table = torch.tensor(out["results"]["0.1,75"]["psnr"])  # [crops, grid]
    for name in ("fine", "coarse", "rms", "energy"):
        score = out["rows"][0][name][0]
        assert table.min(1).values.mean() - 1e-6 <= score <= table.max(1).values.mean() + 1e-6
    f, c = (torch.tensor(out["results"]["0.1,75"][k]) for k in ("fine", "coarse"))
    assert (c > f).all()  # JPEG empties the finest band; luma one scale up keeps the noise
    bad = run("jpeg_noise.py", "--grid", "0.3", cwd=tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--grid" in bad.stderr, bad.stderr
