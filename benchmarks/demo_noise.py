"""What a new user sees: `python sample.py` on an everyday noisy photo, beside the best Gaussian filter.

    python benchmarks/demo_noise.py        # -> benchmarks/photos/demo-noise.png (noisy | Gaussian | sample.py | clean)
    python benchmarks/demo_noise.py --jpeg 75   # the noisy photo saved as a JPEG of quality 75, as a phone would

The photo is the test photograph lomiri-friends (never trained or tuned on), its whole short side shrunk to
256 x 256, with Gaussian noise of std 0.1 saved as an 8-bit PNG; sample.py restores it with its defaults (the
shipped noise prompt). The Gaussian filter gets its best sigma for this very image (an oracle, so the baseline
is optimistic). With --jpeg Q the noisy photo is saved as photo.jpg at that quality (Pillow, 4:2:0 chroma), the
file sample.py then reads, and the picture goes to demo-noise-jpegQ.png.
"""
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "benchmarks"))

import classical  # noqa: E402
from minirestore.data import load_image, save_image, to_pil  # noqa: E402
from minirestore.metrics import psnr  # noqa: E402
from minirestore.photos import PhotoCrops  # noqa: E402


def main(jpeg=0, sigma=0.1):
    out = ROOT / "benchmarks" / "photos" / (f"demo-noise-jpeg{jpeg}.png" if jpeg else "demo-noise.png")
    photos = PhotoCrops("test")
    clean = photos.crop(np.random.default_rng(7), 256, index=photos.names.index("lomiri-friends"), scale=1.0)
    noisy = (clean + sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    name = "photo.jpg" if jpeg else "photo.png"
    with tempfile.TemporaryDirectory() as tmp:
        if jpeg:
            to_pil(noisy).save(Path(tmp) / name, quality=jpeg)
        else:
            save_image(noisy, Path(tmp) / name)
        subprocess.run([sys.executable, str(ROOT / "sample.py"), name, "--out", "restored.png"], cwd=tmp, check=True)
        noisy, restored = (load_image(Path(tmp) / f)[0][None] for f in (name, "restored.png"))
    clean = clean[None]
    score, best = max((psnr(classical.gaussian_filter(noisy, s), clean).item(), s) for s in
                      (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5))
    gauss = classical.gaussian_filter(noisy, best)
    save_image(torch.cat([noisy[0], gauss[0], restored[0], clean[0]], dim=-1), out)
    print(f"noisy {psnr(noisy, clean).item():.2f} dB, Gaussian filter (sigma {best:g}) {score:.2f} dB, "
          f"sample.py {psnr(restored, clean).item():.2f} dB -> {out}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jpeg", type=int, default=0, choices=range(0, 101), metavar="Q",
                   help="save the noisy photo as a JPEG of this quality, 1..100 (default 0: an 8-bit PNG)")
    main(p.parse_args().jpeg)
