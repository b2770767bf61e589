"""Restore images with a learned prompt on a frozen diffusion backbone (arXiv 2604.04924).

    python sample.py input.png                      -> input_restored.png beside it
    python sample.py noisy.jpg --out clean.png      -> clean.png (one input, --out with an image suffix: the file)
    python sample.py photos/ --prompt haze.safetensors --prompt snow.safetensors --out restored/
    python sample.py clip.mp4 --model wan2.1-t2v-1.3b --prompt wan_haze.safetensors   -> clip_restored.mp4

The degraded image is encoded to Y, noised to level T0, X = (1 - T0) Y + T0 eps, and walked back
to t_min with the bridge sampler (bridge.py, the released code's DDIM-like sampler, 20 steps by
default; on the tiny default the mean of 20 one-step samples, the same cost, each on its tiles shifted to
another phase of the 4-pixel token grid, --spin). A prompt with a measured T0 curve (trained over a T0 range,
train.py --t0 0.05:0.8, or a noise prompt trained at one T0 on the tiny default, train.py --curve) picks T0 per
input (--t0 auto, its default): the degradation's strength is estimated from the input and mapped through the
curve (strength.py); the chosen T0 is printed. Several --prompt files restore mixed degradations: their velocities are averaged at every
step. Outputs keep the input's size and mode (data.py's table: CMYK stays CMYK, a palette becomes RGB)
and never overwrite an input; each is written atomically (a temporary file, then a rename). With a Wan
backbone a video file or a folder of frames is one clip (frame count padded to 4k+1 and cut back, fps
kept), and so is an animated image (GIF, APNG, WebP); with FLUX a folder is a set of images and an
animated image has every frame restored on its own. Either way it comes back animated, frame timing kept.
--protocol ypt restores as the released code does (resized to 1024x1024 or 480x832, posterior sample,
scheduler timesteps, noise seed 42, truncated JPEG; protocol.py).
Clips stream from and to disk in overlapping windows of --window frames blended in latent space
(long_video.py), so memory does not grow with a clip's length.
"""
import argparse
from itertools import islice
from pathlib import Path

import torch

from minirestore import UserError, protocol
from minirestore.cli import Help, run, spin_period, writable_folder
from minirestore.backbone import add_memory_flags, is_wan, load_backbone
from minirestore.data import (ANIMATED_FORMATS, IMAGE_EXTS, frame_count, image_format, list_images, load_frames,
                              load_image, save_frames, save_image)
from minirestore.distributed import barrier, close, init
from minirestore.restore import (TINY_TILE, at_input, blend_weight, bridge_for, default_prompt, load_prompts,  # noqa: F401
                                 restore, sampler_defaults, spun, tile_for, tile_starts)  # (benchmarks and tests import restore's names from here)
from minirestore.long_video import restore_stream
from minirestore.video import VIDEO_SUFFIXES, FrameWriter, iter_frames, probe, read_video, write_video


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
                   "degradation strength, on the T0 curve stored in the prompt (train.py measures one for a range "
                   "prompt, and with --curve for one trained at one T0; default: auto for a prompt with a curve, "
                   "else the prompt's own T0)")
    p.add_argument("--steps", type=int, help="sampler steps, network evaluations per prompt and sample "
                   "(default: 1 for tiny, 20 otherwise and with --protocol ypt)")
    p.add_argument("--samples", type=int, help="average this many restorations from different start noises "
                   "(the posterior mean: higher PSNR, slightly smoother, samples x the time; default: 20 for tiny, "
                   "1 otherwise and with --protocol ypt)")
    p.add_argument("--spin", type=spin_period, help="cycle spinning, with --tile: restoration k sees each tile shifted to "
                   "another of the SPIN x SPIN phases of the token grid, so its seams average out (0: off; "
                   "default: 4 for tiny, its token size in pixels, 0 otherwise and with --protocol ypt)")
    p.add_argument("--out", help="with one input and a name ending like an image (.png, .jpg, ...; for a clip "
                   "like a video: .mp4, .mov, .webm): the output file, its folder created; otherwise the output "
                   "folder, created if need be (default: beside each input, named with --suffix)")
    p.add_argument("--suffix", default="_restored", help="added to each output's file name when --out is a folder")
    p.add_argument("--max-size", type=int, default=2048, help="refuse images whose longer side is larger")
    p.add_argument("--tile", type=int, help="restore in overlapping tiles of this size (default: 64 for tiny, off otherwise)")
    p.add_argument("--window", type=int, default=81, help="clips: frames per temporal window (4k+1); longer clips "
                   "are restored in overlapping windows blended in latent space")
    p.add_argument("--window-overlap", type=int, default=16, help="clips: frames shared by neighbouring windows "
                   "(a multiple of 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="weights' dtype (default: bf16 on CUDA, fp16 "
                   "with --protocol ypt; fp32 on CPU)")
    add_memory_flags(p)
    p.add_argument("--protocol", choices=("native", "ypt"), default="native", help="native: the input's own size, "
                   "posterior mean, continuous time; ypt: the released inference protocol (protocol.py: resized to "
                   "1024x1024 / 480x832, posterior sample, scheduler timesteps, seed 42, truncated uint8, JPEG)")
    args = p.parse_args(argv)
    if args.t0 not in (None, "auto") and not 0 < args.t0 <= 1:
        raise UserError(f"--t0 must be in (0, 1], got {args.t0}")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if args.samples is not None and args.samples < 1:
        raise UserError(f"--samples must be at least 1, got {args.samples}")
    if args.window < 9 or args.window % 4 != 1:
        raise UserError(f"--window must be 4k+1 frames with k >= 2 (e.g. 33, 81), got {args.window}")
    if args.window_overlap % 4 or not 4 <= args.window_overlap < args.window - 1:
        raise UserError(f"--window-overlap must be a multiple of 4 from 4 to {args.window - 5}, got {args.window_overlap}")
    return args


def output_path(src, out_dir, suffix, ext=None):
    name = f"{src.name}{suffix}" if src.is_dir() else f"{src.stem}{suffix}{ext or src.suffix}"  # frame folders too
    return (Path(out_dir) if out_dir else src.parent) / name


def is_file_name(out):
    """--out names an output file (not a folder) when it ends like an image or a video."""
    return out is not None and Path(out).suffix.lower() in IMAGE_EXTS + VIDEO_SUFFIXES


def plan(jobs, out, suffix, ypt=False):
    """[(kind, src)] -> [(kind, src, dst)]: --out as the one output file, or as the folder (beside each input
    when None). Refuses what cannot be written, before any work: an output over an input, an output file for
    several inputs or of the wrong kind, two outputs on one name, a place it cannot write in. ypt: images are
    written as JPEG (.jpg), as the released code does."""
    if is_file_name(out):
        out = Path(out)
        if len(jobs) != 1:
            raise UserError(f"--out {out} names one file but there are {len(jobs)} inputs: give a folder "
                            "(a name without an image suffix) to write them all")
        kind, src = jobs[0]
        video_out = out.suffix.lower() in VIDEO_SUFFIXES
        if kind == "clip" and not video_out:
            raise UserError(f"--out {out}: {src} is a clip, so its output is a video ({'/'.join(VIDEO_SUFFIXES)}) "
                            "or a folder of frames")
        if kind != "clip" and video_out:
            raise UserError(f"--out {out}: {src} is an image, so its output is an image file ({', '.join(IMAGE_EXTS)})")
        if ypt and kind == "image" and out.suffix.lower() not in (".jpg", ".jpeg"):
            raise UserError(f"--out {out}: --protocol ypt writes JPEG, as the released code does: name it .jpg")
        planned = [(kind, src, out)]
    else:
        planned = [(kind, src, output_path(src, out, suffix, ".jpg" if ypt and kind == "image" else None))
                   for kind, src in jobs]
    outputs = [dst.resolve() for *_, dst in planned]
    if len(set(outputs)) < len(outputs):
        raise UserError("two inputs would write the same output (same name in different folders): pass them separately")
    inputs = {src.resolve() for _, src, _ in planned}
    for _, src, dst in planned:
        if dst.resolve() in inputs:
            raise UserError(f"{src}: the output {dst} would overwrite an input; pass another --out or --suffix")
    for kind, src, dst in planned:
        if kind == "animation" and image_format(dst) not in ANIMATED_FORMATS:
            raise UserError(f"{src} is animated and {dst} cannot hold frames: name the output .gif, .png (APNG), "
                            ".webp or .tif")
    for folder in sorted({dst.parent for *_, dst in planned}):
        writable_folder(folder)
    return planned


def collect(inputs, clips):
    """Inputs -> [(kind, path)]: video files are clips; folders are clips when `clips`, else sets of images;
    an image file with several frames is an animation."""
    jobs = []
    for src in map(Path, inputs):
        if src.suffix.lower() in VIDEO_SUFFIXES or (clips and src.is_dir()):
            if not src.exists():
                raise UserError(f"{src}: no such file or folder")
            jobs.append(("clip", src))
        else:
            jobs += [("animation" if frame_count(f) > 1 else "image", f) for f in list_images(src)]
    return jobs


def read(kind, src, ypt_size=None):
    """-> (tensor, info): an image [3, H, W] with its mode, a clip [T, 3, H, W] with its fps, or an animated
    image's frames [T, 3, H, W] with their durations. ypt_size (H, W): resized as the released code loads
    inputs (protocol.py), a clip cut to its first 33 frames."""
    if ypt_size is None:
        return {"image": load_image, "clip": read_video, "animation": load_frames}[kind](src)
    if kind == "image":
        return protocol.load_resized(src, ypt_size), None
    if kind == "animation":
        raise UserError(f"{src} is an animated image: --protocol ypt restores images and videos; convert it to a video")
    clip, fps = read_video(src)
    return protocol.resize_frames(clip[:protocol.FRAMES], ypt_size), fps


def main(argv=None):
    args = parse_args(argv)
    world = init(args.device)  # under torchrun each process restores its share of the inputs
    args.device = world.device(args.device)
    ypt = args.protocol == "ypt"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or (("fp16" if ypt else "bf16") if args.device.startswith("cuda") else "fp32")]
    wan = is_wan(args.model)
    size = protocol.SIZES["wan" if wan else "flux"] if ypt else None
    jobs = plan(collect(args.inputs, args.video or wan), args.out, args.suffix, ypt)
    for kind, src, _ in jobs:  # refuse bad inputs before any work, so nothing is half done
        H, W = probe(src)[2] if kind == "clip" and not ypt else read(kind, src, size)[0].shape[-2:]  # clips: not read whole
        if max(H, W) > args.max_size:
            raise UserError(f"{src} is {W}x{H}, larger than --max-size {args.max_size}: resize it or raise --max-size")

    backbone = load_backbone(args.model, args.device, dtype, weights=args.weights, offload=args.offload)
    steps, samples, spin = sampler_defaults(backbone.name, args.steps, args.samples, ypt, args.spin)
    prompt_files = args.prompt or [default_prompt(backbone.name, args.degradation)]
    prompts = load_prompts(backbone, prompt_files)
    t0 = 0.4 if ypt and args.t0 is None else args.t0  # the release samples every prompt from T0 0.4
    tile = tile_for(backbone.name, args.tile, ypt, args.spin)
    bridge, auto = bridge_for(prompts, t0, prompt_files[0])

    from tqdm.auto import tqdm

    mine = jobs[world.rank::world.size]  # every output is written by exactly one process
    if backbone.kind == "flux" and any(kind == "clip" for kind, *_ in jobs):
        raise UserError(f"{backbone.name} restores images; videos need a Wan backbone (--model wan2.1-t2v-1.3b)")
    for kind, src, dst in tqdm(mine, desc="restoring", unit="input", disable=len(mine) < 2 or not world.main):
        if kind == "clip" and not ypt:  # streamed in windows: only the first window's frames for the T0 estimate
            b, note = at_input(bridge, auto, prompts[0].meta,
                               torch.stack(list(islice(iter_frames(src), args.window))) if auto else None)
            n_frames, fps, _ = probe(src)
            with FrameWriter(dst, fps) as out:
                restore_stream(backbone, prompts, b, iter_frames(src), n_frames, out.write, steps, args.seed,
                               window=args.window, overlap=args.window_overlap, samples=samples)
            print(f"{src} -> {dst} ({note})")
            continue
        x, info = read(kind, src, size)
        b, note = at_input(bridge, auto, prompts[0].meta, x)
        # ypt: each input as the release's run_single.py restores it, the posterior stream fresh per run
        stream = protocol.PosteriorStream(backbone.device) if ypt else None
        if kind == "animation" and backbone.kind == "flux":  # an image model: each frame on its own
            print(f"{src}: {len(x)} frames, each restored as an image")
            restored = torch.stack([restore(backbone, prompts, b, frame, steps, args.seed, tile=tile, samples=samples,
                                            spin=spin)
                                    for frame in tqdm(x, desc="frames", unit="frame", leave=False)])
        else:  # an image, or a clip (a video, a frame folder or, with Wan, an animated image)
            restored = restore(backbone, prompts, b, x, steps, args.seed, tile=tile, ypt=stream, samples=samples,
                               spin=spin)
        if kind == "image":
            save_image(restored, dst, info) if not ypt else protocol.save_jpeg(restored, dst)
        elif kind == "animation":
            save_frames(restored, dst, info)
        else:
            write_video(protocol.to_uint8(restored).float() / 255 if ypt else restored, dst, fps=info)
        print(f"{src} -> {dst} ({note})")
    barrier(world)
    close(world)
    return 0


if __name__ == "__main__":
    run(main)
