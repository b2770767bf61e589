"""Video input and output: a folder of frames (no extra dependency) or .mp4/.mov/.webm through PyAV.

Frames are float tensors [T, 3, H, W] in [0, 1]. A folder holds one image per frame, taken in name
order; its frame rate, when written by us, is kept in `fps.txt` beside the frames. The Wan VAE needs
1 + 4k frames: `to_4k1` trims or pads a clip to that.
"""
import os
import shutil
import uuid
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from . import UserError

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")
VIDEO_SUFFIXES = (".mp4", ".mov", ".webm")
DEFAULT_FPS = 16.0  # Wan 2.1's output frame rate, for frame folders that do not say theirs
FPS_FILE = "fps.txt"


def _import_av():
    try:
        import av
    except ImportError:
        raise UserError("reading and writing .mp4/.mov/.webm needs PyAV: `pip install minirestore[video]` "
                        "(or pass a folder of PNG/JPEG frames instead)") from None
    return av


def _to_tensor(array):
    """uint8 [H, W, 3] -> float [3, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float() / 255


def _to_uint8(frames):
    """float [T, 3, H, W] in [0, 1] -> uint8 [T, H, W, 3] (numpy)."""
    return (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _read_image(path):
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except Exception as e:
        raise UserError(f"{path}: not a readable image ({type(e).__name__}); remove or replace it") from None


def read_video(path):
    """A frame folder, a video file (.mp4/.mov/.webm, needs PyAV) or one image -> (frames [T, 3, H, W], fps)."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise UserError(f"{path}: no frames in this folder (expected {'/'.join(FRAME_SUFFIXES)} files)")
        frames, size = [], None
        for f in files:
            image = _read_image(f)
            if size is None:
                size = image.shape[:2]
            elif image.shape[:2] != size:
                raise UserError(f"{f}: {image.shape[1]}x{image.shape[0]} frame in a clip of {size[1]}x{size[0]} "
                                f"frames ({files[0].name}); all frames of a folder must have one size")
            frames.append(_to_tensor(image))
        fps_file = path / FPS_FILE
        fps = float(fps_file.read_text().strip()) if fps_file.is_file() else DEFAULT_FPS
        return torch.stack(frames), fps
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.suffix.lower() in FRAME_SUFFIXES:
        return _to_tensor(_read_image(path))[None], DEFAULT_FPS
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise UserError(f"{path}: not a video ({'/'.join(VIDEO_SUFFIXES)}), an image or a folder of frames")
    av = _import_av()
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else DEFAULT_FPS
            frames = [_to_tensor(frame.to_ndarray(format="rgb24")) for frame in container.decode(stream)]
    except Exception as e:
        raise UserError(f"{path}: cannot decode this video ({type(e).__name__}: {e})") from None
    if not frames:
        raise UserError(f"{path}: the video has no frames")
    return torch.stack(frames), fps


def write_video(frames, path, fps=DEFAULT_FPS):
    """frames [T, 3, H, W] in [0, 1] -> a video file (by suffix, needs PyAV) or a folder of PNG frames.

    Written atomically: into a temporary name beside the target, then renamed over it; a failed write
    (unwritable place, full disk) is a UserError and leaves nothing behind.
    """
    path = Path(path).expanduser()
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if path.suffix.lower() in VIDEO_SUFFIXES:
            _write_file(_to_uint8(frames), tmp, fps, path.suffix.lower())
            os.replace(tmp, path)
        else:
            _write_folder(_to_uint8(frames), tmp, fps)
            if path.exists():  # a directory cannot be renamed over another: move the old one aside first
                old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
                os.rename(path, old)
                os.rename(tmp, path)
                if old.is_dir():
                    shutil.rmtree(old)
                else:
                    old.unlink()
            else:
                os.rename(tmp, path)
    except OSError as e:  # an unwritable folder, a full disk: one line, and the temporary file goes
        raise UserError(f"{path}: cannot write it ({e.strerror or e}); free some space or choose another "
                        "output place") from None
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        elif tmp.exists():
            tmp.unlink()
    return path


def _write_folder(frames, folder, fps):
    from PIL import Image

    folder.mkdir(parents=True)
    digits = max(5, len(str(len(frames) - 1)))
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{i:0{digits}d}.png")
    (folder / FPS_FILE).write_text(f"{fps:g}\n")


def _write_file(frames, path, fps, suffix):
    av = _import_av()
    T, H, W, _ = frames.shape
    codec = "libvpx-vp9" if suffix == ".webm" else "libx264"
    with av.open(str(path), mode="w", format={".mp4": "mp4", ".mov": "mov", ".webm": "webm"}[suffix]) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = W, H
        # 4:2:0 chroma needs even sizes; odd ones keep full chroma
        stream.pix_fmt = "yuv420p" if H % 2 == 0 and W % 2 == 0 else "yuv444p"
        stream.options = {"crf": "12"} if codec == "libx264" else {}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def to_4k1(frames, mode="pad"):
    """Bring the frame count to 4k + 1 (the Wan VAE's causal chunks), printing one line when it changes.

    mode="pad" repeats the last frame (every input frame is kept; cut the restored clip back to the
    original length); mode="trim" drops frames from the end.
    """
    T = frames.shape[0]
    if mode not in ("pad", "trim"):
        raise ValueError(f"mode must be 'pad' or 'trim', not {mode!r}")
    if T == 0:
        raise UserError("the clip has no frames")
    if T % 4 == 1:
        return frames
    if mode == "trim" and T > 1:
        n = (T - 1) // 4 * 4 + 1
        print(f"video: {T} frames -> {n} (4k+1) by dropping the last {T - n}")
        return frames[:n]
    n = (T + 2) // 4 * 4 + 1
    print(f"video: {T} frames -> {n} (4k+1) by repeating the last frame {n - T} times")
    return torch.cat([frames, frames[-1:].expand(n - T, *frames.shape[1:])])
