"""Restore images with a learned prompt on a frozen diffusion backbone (arXiv 2604.04924).

    python sample.py input.png                      -> input_restored.png beside it
    python sample.py photos/ --prompt haze.safetensors --prompt snow.safetensors --out restored/
    python sample.py clip.mp4 --model wan2.1-t2v-1.3b --prompt wan_haze.safetensors   -> clip_restored.mp4

The degraded image is encoded to Y, noised to level T0, X = (1 - T0) Y + T0 eps, and walked back
to t_min with the bridge sampler (bridge.py, the released code's DDIM-like sampler, 20 steps by
default). A prompt trained over a T0 range (train.py --t0 0.05:0.8) picks T0 per input (--t0 auto, its
default): the degradation's strength is estimated from the input and mapped through the prompt's measured
curve (strength.py); the chosen T0 is printed. Several --prompt files restore mixed degradations: their velocities are averaged at every
step. Outputs keep the input's size and mode and never overwrite an input. With a Wan backbone a
video file or a folder of frames is one clip (frame count padded to 4k+1 and cut back, fps kept);
with FLUX a folder is a set of images. Clips stream from and to disk in overlapping windows of --window
frames blended in latent space (long_video.py), so memory does not grow with a clip's length.
"""
import argparse
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F

from minirestore import UserError
from minirestore.cli import Help, run
from minirestore.backbone import is_wan, load_backbone
from minirestore.bridge import Bridge, averaged
from minirestore.data import list_images, load_image, save_image
from minirestore.distributed import barrier, close, init
from minirestore.prompts import load_prompt
from minirestore.strength import auto_T0
from minirestore.long_video import restore_stream
from minirestore.video import VIDEO_SUFFIXES, FrameWriter, iter_frames, probe, to_4k1


TINY_TILE = 64  # the tiny default's pre-training size


def default_prompt(model, degradation):
    """Your own trained prompt if there is one, else the one shipped for the model."""
    user = Path("weights") / f"{model}-{degradation}.safetensors"
    shipped = Path(__file__).resolve().parent / "weights" / model / "prompts" / f"{degradation}.safetensors"
    return user if user.exists() or not shipped.exists() else shipped


def t0_arg(text):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: pass a number in (0, 1] or auto") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=Help)
    p.add_argument("inputs", nargs="+", help="images or folders of images")
    p.add_argument("--model", default="tiny", help="backbone: tiny (shipped), flux-dev, flux-schnell, "
                   "wan2.1-t2v-1.3b, wan2.1-t2v-14b, or a backbone folder")
    p.add_argument("--video", action="store_true", help="treat folders as clips of frames (the default with Wan)")
    p.add_argument("--prompt", action="append", help="prompt file (repeat for mixed degradations; default: your "
                   "weights/<model>-<degradation>.safetensors, else the shipped weights/<model>/prompts/<degradation>.safetensors)")
    p.add_argument("--degradation", default="noise", help="which default prompt to use when --prompt is not given")
    p.add_argument("--t0", type=t0_arg, help="start level T0 in (0, 1], or auto: chosen per input from its estimated "
                   "degradation strength, on the curve stored in a prompt trained over a T0 range (default: auto for "
                   "such prompts, else the prompt's own T0)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps (network evaluations per prompt)")
    p.add_argument("--out", help="output folder (default: beside each input)")
    p.add_argument("--suffix", default="_restored", help="added to each output's file name")
    p.add_argument("--max-size", type=int, default=2048, help="refuse images whose longer side is larger")
    p.add_argument("--tile", type=int, help="restore in overlapping tiles of this size (default: 64 for tiny, off otherwise)")
    p.add_argument("--window", type=int, default=81, help="clips: frames per temporal window (4k+1); longer clips "
                   "are restored in overlapping windows blended in latent space")
    p.add_argument("--window-overlap", type=int, default=16, help="clips: frames shared by neighbouring windows "
                   "(a multiple of 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="weights' dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--weights", choices=("auto", "dtype", "fp8"), default="auto", help="the frozen transformer's "
                   "weights: fp8 stores its blocks' linears in float8 e4m3 with per-channel scales (half of bf16); auto: "
                   "fp8 on a GPU with less free memory than 1.5x the bf16 transformer, else --dtype (default auto)")
    p.add_argument("--offload", choices=("auto", "none", "blocks"), default="auto", help="blocks: the transformer "
                   "blocks stay in pinned CPU memory and are copied to the GPU one ahead on a side stream (outputs "
                   "identical); auto: blocks on a GPU with less free memory than 1.2x the weights, else none (default auto)")
    args = p.parse_args(argv)
    if args.t0 not in (None, "auto") and not 0 < args.t0 <= 1:
        raise UserError(f"--t0 must be in (0, 1], got {args.t0}")
    if args.steps < 1:
        raise UserError("--steps must be at least 1")
    if args.window < 9 or args.window % 4 != 1:
        raise UserError(f"--window must be 4k+1 frames with k >= 2 (e.g. 33, 81), got {args.window}")
    if args.window_overlap % 4 or not 4 <= args.window_overlap < args.window - 1:
        raise UserError(f"--window-overlap must be a multiple of 4 from 4 to {args.window - 5}, got {args.window_overlap}")
    return args


def output_path(src, out_dir, suffix):
    name = f"{src.name}{suffix}" if src.is_dir() else f"{src.stem}{suffix}{src.suffix}"  # frame folders too
    dst = (Path(out_dir) if out_dir else src.parent) / name
    if dst.resolve() == src.resolve():
        raise UserError(f"{src}: the output would overwrite the input; pass another --out or --suffix")
    return dst


def collect(inputs, clips):
    """Inputs -> [(kind, path)]: video files are clips; folders are clips when `clips`, else sets of images."""
    jobs = []
    for src in map(Path, inputs):
        if src.suffix.lower() in VIDEO_SUFFIXES or (clips and src.is_dir()):
            if not src.exists():
                raise UserError(f"{src}: no such file or folder")
            jobs.append(("clip", src))
        else:
            jobs += [("image", f) for f in list_images(src)]
    return jobs


def size_of(kind, src):
    """(H, W) of an image or a clip (a clip's frames are not all read)."""
    return load_image(src)[0].shape[-2:] if kind == "image" else probe(src)[2]


def tile_starts(size, tile, overlap):
    """Starts of tiles of length `tile` covering [0, size) with at least `overlap` shared pixels."""
    if size <= tile:
        return [0]
    n = 1 + -(-(size - tile) // (tile - overlap))  # ceil
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def blend_weight(h, w, overlap):
    """A tile's weight in the blend: 1 inside, ramping linearly to small values over `overlap` pixels."""
    ramp = lambda n: torch.minimum(torch.arange(n) + 1.0, torch.arange(n, 0, -1.0)).clamp(max=overlap + 1)  # noqa: E731
    return (ramp(h)[:, None] * ramp(w)[None, :]) / (overlap + 1) ** 2


def restore(backbone, prompts, bridge, x, steps, seed, tile=0, overlap=16, batch=32):
    """x: an image [3, H, W] or a clip [T, 3, H, W] in [0, 1] -> restored, same shape.

    Pad the sides to the backbone's multiple (and a clip to 4k+1 frames), sample, crop back. tile > 0
    restores overlapping tiles of that size (the tiny default was pre-trained at 64 x 64: RoPE positions
    beyond its training range are a known failure) and blends them with linear ramps."""
    clip = x.dim() == 4
    H, W = x.shape[-2:]
    if clip:
        T = x.shape[0]
        x = to_4k1(x).permute(1, 0, 2, 3)  # [3, T', H, W]
    m = backbone.multiple
    pad = (0, (-W) % m, 0, (-H) % m) + ((0, 0) if clip else ())  # replicate-pad the sides (not the frames)
    x = F.pad(x[None], pad, mode="replicate")
    g = torch.Generator().manual_seed(seed)
    fns = [lambda x_, tau, bank=bank: backbone.velocity(x_, tau, bank) for bank in prompts]
    velocity = averaged(fns)
    if not tile or clip:
        out = backbone.decode(bridge.sample(velocity, backbone.encode(x), steps, generator=g))[0, ..., :H, :W].cpu()
        return out.permute(1, 0, 2, 3)[:T] if clip else out
    Hp, Wp = x.shape[-2:]
    th, tw = min(tile, Hp), min(tile, Wp)
    boxes = [(i, j) for i in tile_starts(Hp, th, overlap) for j in tile_starts(Wp, tw, overlap)]
    out, weight = torch.zeros(3, Hp, Wp), torch.zeros(1, Hp, Wp)
    w = blend_weight(th, tw, overlap)
    for k in range(0, len(boxes), batch):  # tiles in batches: bounded memory on any image size
        chunk = boxes[k:k + batch]
        tiles = torch.cat([x[..., i:i + th, j:j + tw] for i, j in chunk])
        restored = backbone.decode(bridge.sample(velocity, backbone.encode(tiles), steps, generator=g)).cpu()
        for (i, j), r in zip(chunk, restored):
            out[:, i:i + th, j:j + tw] += w * r
            weight[:, i:i + th, j:j + tw] += w
    return (out / weight)[:, :H, :W]


def main(argv=None):
    args = parse_args(argv)
    world = init(args.device)  # under torchrun each process restores its share of the inputs
    args.device = world.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    jobs = [(kind, src, output_path(src, args.out, args.suffix))
            for kind, src in collect(args.inputs, args.video or is_wan(args.model))]
    outputs = [dst for *_, dst in jobs]
    if len(set(outputs)) < len(outputs):
        raise UserError("two inputs would write the same output (same name in different folders): pass them separately")
    for kind, src, _ in jobs:  # refuse bad inputs before any work, so nothing is half done
        H, W = size_of(kind, src)
        if max(H, W) > args.max_size:
            raise UserError(f"{src} is {W}x{H}, larger than --max-size {args.max_size}: "
                            "resize it or raise --max-size")

    backbone = load_backbone(args.model, args.device, dtype, weights=args.weights, offload=args.offload)
    prompt_files = args.prompt or [default_prompt(backbone.name, args.degradation)]
    prompts = [load_prompt(f, backbone=backbone.name, D=backbone.D, n_blocks=backbone.n_blocks).to(backbone.device)
               for f in prompt_files]
    kinds = {b.meta.get("bridge", "ebr") for b in prompts}
    if len(kinds) > 1:
        raise UserError(f"the prompts were trained with different bridges ({', '.join(sorted(kinds))}); mix only one kind")
    meta = prompts[0].meta  # with several prompts, the first one's T0 (or T0 curve) is used
    T0 = args.t0 if args.t0 not in (None, "auto") else float(meta.get("T0", 0.4))
    bridge = Bridge(kinds.pop(), T0, float(meta.get("t_min", 1e-4)), sigma=float(meta.get("ddbm_sigma", 1.0)))
    auto = args.t0 == "auto" or (args.t0 is None and "T0_curve" in meta)
    if auto and "T0_curve" not in meta:
        print(f"--t0 auto: {prompt_files[0]} has no T0 curve (trained at one T0), so its own T0 {T0:g} is used")
        auto = False

    from tqdm.auto import tqdm

    mine = jobs[world.rank::world.size]  # every output is written by exactly one process
    if backbone.kind == "flux" and any(kind == "clip" for kind, *_ in jobs):
        raise UserError(f"{backbone.name} restores images; videos need a Wan backbone (--model wan2.1-t2v-1.3b)")
    for kind, src, dst in tqdm(mine, desc="restoring", unit="input", disable=len(mine) < 2 or not world.main):
        if kind == "image":
            x, info = load_image(src)
        else:  # a clip streams: its first window's frames for the strength estimate only
            x = torch.stack(list(islice(iter_frames(src), args.window))) if auto else None
        tile = args.tile if args.tile is not None else (TINY_TILE if backbone.name == "tiny" else 0)
        b, note = bridge, f"T0 {bridge.T0:g}"
        if auto:  # adaptive T0: this input's estimated strength, through the prompt's measured curve
            T0, strength = auto_T0(meta, x)
            b, note = bridge.at(T0), f"estimated {meta['degradation']} strength {strength:.4f} -> T0 {T0:.3f}"
        if kind == "image":
            save_image(restore(backbone, prompts, b, x, args.steps, args.seed, tile=tile), dst, info)
        else:
            n_frames, fps, _ = probe(src)
            with FrameWriter(dst, fps) as out:
                restore_stream(backbone, prompts, b, iter_frames(src), n_frames, out.write, args.steps, args.seed,
                               window=args.window, overlap=args.window_overlap)
        print(f"{src} -> {dst} ({note})")
    barrier(world)
    close(world)
    return 0


if __name__ == "__main__":
    run(main)
