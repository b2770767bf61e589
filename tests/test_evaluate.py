"""evaluate.py on small random FLUX and Wan backbones: paired folders and JSON lists, rows and tables that
equal the project's metrics on the saved outputs, resume, prompts per degradation, skipped metrics."""
import json
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minirestore import UserError, perceptual
from minirestore.backbone import load_backbone
from minirestore.data import load_image
from minirestore.evaluate import main as evaluate
from minirestore.metrics import psnr, ssim, to_y
from minirestore.prompts import PromptBank, import_official, load_prompt, save_prompt
from test_wan_method import wan_dir  # noqa: F401 (the small Wan backbone folder)

FAST = ["--steps", "2", "--metrics", "psnr,ssim"]


def make_prompt(folder, path, seed=0, K=None, **meta):
    bb = load_backbone(folder)
    bank = PromptBank(K or bb.K, bb.D, bb.n_blocks, std=0.1, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        bank.alpha.fill_(0.5)
    return save_prompt(bank, path, backbone=bb.name, bridge="ebr", T0=0.5, **meta)


def make_pairs(images_dir, root, names=("clean", "degraded"), count=3):
    rng = np.random.default_rng(0)
    for sub in names:
        (root / sub).mkdir(parents=True)
    for p in sorted(images_dir.iterdir())[:count]:
        a = np.asarray(Image.open(p))
        Image.fromarray(a).save(root / names[0] / p.name)
        noisy = np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(root / names[1] / (p.stem + ".jpg" if names[1] == "input" else p.name))
    return root


def rows(out):
    return [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]


def test_paired_folder_scores_the_saved_outputs_and_resumes(backbone_dir, images_dir, tmp_path, capsys):
    pairs = make_pairs(images_dir, tmp_path / "pairs")
    prompt = make_prompt(backbone_dir, tmp_path / "noise.safetensors")
    out = tmp_path / "eval"
    args = ["--model", str(backbone_dir), "--prompt", str(prompt), "--out", str(out), "--save", "--y", *FAST]
    assert evaluate([str(pairs), *args]) == 0
    r = rows(out)
    assert [x["key"] for x in r] == ["pairs/img0", "pairs/img1", "pairs/img2"]
    for x in r:  # every number is our metric on the PNG that was written
        saved, clean = load_image(x["output"])[0], load_image(pairs / "clean" / (x["key"].split("/")[1] + ".png"))[0]
        assert x["psnr"] == pytest.approx(float(psnr(saved, clean)), abs=1e-9)
        assert x["ssim"] == pytest.approx(float(ssim(saved, clean)), abs=1e-9)
        assert x["psnr_y"] == pytest.approx(float(psnr(to_y(saved[None]), to_y(clean[None]))), abs=1e-9)
    table = json.loads((out / "table.json").read_text())
    (ds,) = table["datasets"]
    assert (ds["dataset"], ds["degradation"], ds["count"]) == ("pairs", "noise", 3)
    assert ds["psnr"] == pytest.approx(np.mean([x["psnr"] for x in r])) and ds["ssim"] == pytest.approx(np.mean([x["ssim"] for x in r]))
    md = (out / "table.md").read_text()
    assert "| Dataset | Degradation | Count | PSNR ↑ | SSIM ↑ | PSNR-Y ↑ | SSIM-Y ↑ |" in md and "| pairs | noise | 3 |" in md

    # resume: drop the last row and cut a line in half (a crash); only that image is restored again
    lines = (out / "rows.jsonl").read_text().splitlines()
    (out / "rows.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])
    capsys.readouterr()
    assert evaluate([str(pairs), *args]) == 0
    assert "2 already scored" in capsys.readouterr().out
    again = [x for x in rows_lenient(out)]
    assert len(again) == 3 and again[2] == r[2]  # the same seed: the same restoration, the same scores
    with pytest.raises(UserError, match="other settings.*steps 2 -> 3"):
        evaluate([str(pairs), *args[:-4], "--steps", "3", "--metrics", "psnr,ssim"])
    recorded = json.loads((out / "settings.json").read_text())
    (out / "settings.json").write_text(json.dumps({k: v for k, v in recorded.items() if k != "spin"}))
    with pytest.raises(UserError, match=r"spin \(not recorded\) -> None"):  # a folder from before --spin existed
        evaluate([str(pairs), *args])
    with pytest.raises(UserError, match="--spin shifts the tiles"):  # no tiles on this backbone: nothing to shift
        evaluate([str(pairs), *args, "--spin", "4", "--out", str(tmp_path / "spun")])
    with pytest.raises(UserError, match="--spin must be 0"):
        evaluate([str(pairs), *args, "--spin", "-1"])


def rows_lenient(out):
    good = []
    for line in (out / "rows.jsonl").read_text().splitlines():
        try:
            good.append(json.loads(line))
        except ValueError:
            pass
    return good


def test_json_list_prompts_per_degradation_and_mixed_sets(backbone_dir, images_dir, tmp_path):
    """Official names (Haze, Mixed, LowLight) reach the right prompts; CDD takes snow + haze as the release does;
    SICE keeps exposures up to 3; a missing prompt, a bad list and a wrong prompt length fail in one line."""
    pairs = make_pairs(images_dir, tmp_path / "data", names=("gt", "input"), count=3)
    entry = lambda ds, deg, i, name=None: {"image_path": f"data/input/{name or f'img{i}.jpg'}",  # noqa: E731
                                           "target_path": f"data/gt/img{i}.png", "degradation": deg, "dataset": ds}
    (pairs / "input" / "5.jpg").write_bytes((pairs / "input" / "img0.jpg").read_bytes())
    (pairs / "input" / "2.jpg").write_bytes((pairs / "input" / "img0.jpg").read_bytes())
    lists = {"HazeRD": [entry("HazeRD", "Haze", 0), entry("HazeRD", "Haze", 1)],
             "CDD": [entry("CDD_haze_snow", "Mixed", 2)],
             "SICE": [entry("SICE", "LowLight", 0, "5.jpg"), entry("SICE", "LowLight", 0, "2.jpg")]}
    for name, entries in lists.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(entries))
    haze, snow, low = (make_prompt(backbone_dir, tmp_path / f"{d}.safetensors", seed=i) for i, d in
                       enumerate(("haze", "snow", "lowlight")))
    out = tmp_path / "eval"
    base = [*(str(tmp_path / f"{n}.json") for n in lists), "--root", str(tmp_path), "--model", str(backbone_dir), *FAST]
    with pytest.raises(UserError, match=r"no prompt for snow \(dataset CDD_haze_snow.*--prompt snow=FILE"):
        evaluate([*base, "--prompt", f"haze={haze}", "--prompt", f"lowlight={low}", "--out", str(out)])
    assert not out.exists()  # refused before any output
    assert evaluate([*base, "--prompt", f"Haze={haze}", "--prompt", f"snow={snow}", "--prompt", f"Low-light={low}",
                     "--out", str(out)]) == 0
    r = {x["key"]: x for x in rows(out)}
    assert r["data/input/img0.jpg"]["prompts"] == [str(haze)]
    assert r["data/input/img2.jpg"]["prompts"] == [str(snow), str(haze)]  # mixed: velocities averaged
    assert r["data/input/2.jpg"]["prompts"] == [str(low)] and "data/input/5.jpg" not in r
    table = {d["dataset"]: d for d in json.loads((out / "table.json").read_text())["datasets"]}
    assert [(d, table[d]["degradation"], table[d]["count"]) for d in table] == [
        ("HazeRD", "haze", 2), ("CDD_haze_snow", "snow+haze", 1), ("SICE", "lowlight", 1)]
    assert table["HazeRD"]["psnr"] == pytest.approx((r["data/input/img0.jpg"]["psnr"] + r["data/input/img1.jpg"]["psnr"]) / 2)

    (tmp_path / "bad.json").write_text('{"not": "a list"}')
    with pytest.raises(UserError, match="bad.json is not a test list"):
        evaluate([str(tmp_path / "bad.json"), "--model", str(backbone_dir)])
    short = make_prompt(backbone_dir, tmp_path / "short.safetensors", K=5)
    with pytest.raises(UserError, match="its prompt length K is 5 tokens, the backbone's text context is 6"):
        evaluate([*base, "--prompt", str(short), "--out", str(tmp_path / "e2")])
    with pytest.raises(UserError, match="missing, e.g. .*img0.jpg: pass --root"):
        evaluate([str(tmp_path / "HazeRD.json"), "--model", str(backbone_dir), "--prompt", str(haze)])


def test_a_missing_metric_package_is_one_line(backbone_dir, images_dir, tmp_path, monkeypatch, capsys):
    for mod in ("torchmetrics", "torchmetrics.image", "torchmetrics.image.lpip", "pyiqa"):
        monkeypatch.setitem(sys.modules, mod, None)  # import raises ImportError
    fns, skipped = perceptual.load(["lpips", "dists", "musiq"], "cpu")
    assert fns == {} and set(skipped) == {"lpips", "dists", "musiq"}
    assert skipped["lpips"] == 'torchmetrics is not installed (pip install -e ".[metrics]")'
    pairs = make_pairs(images_dir, tmp_path / "pairs", count=1)
    prompt = make_prompt(backbone_dir, tmp_path / "p.safetensors")
    assert evaluate([str(pairs), "--model", str(backbone_dir), "--prompt", str(prompt), "--out", str(tmp_path / "e"),
                     "--steps", "2", "--metrics", "psnr,lpips,dists"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert 'lpips skipped: torchmetrics is not installed (pip install -e ".[metrics]")' in printed
    table = json.loads((tmp_path / "e" / "table.json").read_text())
    assert set(table["skipped"]) == {"lpips", "dists"} and table["datasets"][0]["psnr"] > 0
    assert "dists: skipped, pyiqa is not installed" in (tmp_path / "e" / "table.md").read_text()


def test_wan_on_a_json_list_of_clips(wan_dir, tmp_path):  # noqa: F811
    rng = np.random.default_rng(1)
    entries = []
    for c in range(2):
        for sub in ("hazy", "gt"):
            (tmp_path / sub / f"C{c}").mkdir(parents=True)
        frames = [f"C{c}/{i:05d}.png" for i in range(6)]
        for f in frames:
            a = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
            Image.fromarray(a).save(tmp_path / "gt" / f)
            Image.fromarray((a * 0.6 + 60).astype(np.uint8)).save(tmp_path / "hazy" / f)
        entries.append({"image_path": [f"hazy/{f}" for f in frames], "target_path": [f"gt/{f}" for f in frames],
                        "degradation": "Haze", "dataset": "REVIDE"})
    (tmp_path / "REVIDE.json").write_text(json.dumps(entries))
    prompt = make_prompt(wan_dir, tmp_path / "haze.safetensors")
    out = tmp_path / "eval"
    assert evaluate([str(tmp_path / "REVIDE.json"), "--root", str(tmp_path), "--model", str(wan_dir), "--prompt",
                     f"haze={prompt}", "--out", str(out), "--frames", "5", "--save", *FAST]) == 0
    r = rows(out)
    assert sorted(x["key"] for x in r) == ["hazy/C0", "hazy/C1"] and all(x["frames"] == 5 for x in r)
    for x in r:  # the clip's score is the mean over its saved frames
        c = x["key"].split("/")[1]
        per_frame = [float(psnr(load_image(f"{x['output']}/{i:05d}.png")[0], load_image(tmp_path / "gt" / c / f"{i:05d}.png")[0]))
                     for i in range(5)]
        assert x["psnr"] == pytest.approx(np.mean(per_frame), abs=1e-9)


def test_official_flux_prompt_imports_bit_exactly(tmp_path):
    """The released FLUX files: backend 'flux', prompt [1, 512, 3072] fp32, 57 alphas (19 double, then 38 single)."""
    g = torch.Generator().manual_seed(0)
    P, alphas = torch.randn(1, 512, 3072, generator=g) * 0.02, [torch.randn((), generator=g) for _ in range(57)]
    torch.save({"backend": "flux", "deep_prompt_bank": OrderedDict(prompts=P), "alphas": alphas}, tmp_path / "flux_haze.pt")
    import_official(tmp_path / "flux_haze.pt", tmp_path / "haze.safetensors")
    bank = load_prompt(tmp_path / "haze.safetensors", backbone="flux-dev", K=512, D=3072, n_blocks=57)
    assert torch.equal(bank.prompt.data, P) and torch.equal(bank.alpha.data, torch.stack(alphas))
    assert bank.meta["backbone"] == "flux-dev" and bank.meta["degradation"] == "haze" and bank.meta["T0"] == "0.4"
    with pytest.raises(UserError, match="prompt length K is 512 tokens, the backbone's text context is 226"):
        load_prompt(tmp_path / "haze.safetensors", K=226)


def test_two_processes_score_like_one(backbone_dir, images_dir, tmp_path):
    """torchrun: each rank restores its share and writes its own rows; rank 0 writes the table once."""
    import os
    import subprocess

    pairs = make_pairs(images_dir, tmp_path / "pairs", count=3)
    prompt = make_prompt(backbone_dir, tmp_path / "p.safetensors")
    tables = {}
    for n in (1, 2):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] if n > 1 else [sys.executable]
        r = subprocess.run([*launcher, "-m", "minirestore.evaluate", str(pairs), "--model", str(backbone_dir), "--prompt",
                            str(prompt), "--out", str(tmp_path / f"e{n}"), *FAST], capture_output=True, text=True,
                           timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=Path(__file__).parents[1])
        assert r.returncode == 0, r.stderr
        tables[n] = json.loads((tmp_path / f"e{n}" / "table.json").read_text())["datasets"]
    assert sorted(p.name for p in (tmp_path / "e2").glob("rows*.jsonl")) == ["rows.jsonl", "rows.rank1.jsonl"]
    assert tables[1] == tables[2]
