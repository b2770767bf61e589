"""Video input and output: a folder of frames (no extra dependency) or .mp4/.mov/.webm through PyAV.

Frames are float tensors [T, 3, H, W] in [0, 1]. A folder holds one image per frame, taken in name
order; its frame rate, when written by us, is kept in `fps.txt` beside the frames. `iter_frames` and
`FrameWriter` stream a clip from and to disk a frame at a time (long videos). The Wan VAE needs
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


def _frame_files(path):
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise UserError(f"{path}: no frames in this folder (expected {'/'.join(FRAME_SUFFIXES)} files)")
    return files


def _check_video(path):
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.suffix.lower() not in VIDEO_SUFFIXES + FRAME_SUFFIXES:
        raise UserError(f"{path}: not a video ({'/'.join(VIDEO_SUFFIXES)}), an image or a folder of frames")


def iter_frames(path):
    """The frames of a frame folder, a video file (needs PyAV) or one image, one at a time: [3, H, W] in [0, 1].

    Only the frame being handed over is in memory: long clips stream from disk."""
    path = Path(path).expanduser()
    if path.is_dir():
        files, size = _frame_files(path), None
        for f in files:
            image = _read_image(f)
            if size is None:
                size = image.shape[:2]
            elif image.shape[:2] != size:
                raise UserError(f"{f}: {image.shape[1]}x{image.shape[0]} frame in a clip of {size[1]}x{size[0]} "
                                f"frames ({files[0].name}); all frames of a folder must have one size")
            yield _to_tensor(image)
        return
    _check_video(path)
    if path.suffix.lower() in FRAME_SUFFIXES:
        yield _to_tensor(_read_image(path))
        return
    av = _import_av()
    n = 0
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(container.streams.video[0]):
                n += 1
                yield _to_tensor(frame.to_ndarray(format="rgb24"))
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: cannot decode this video ({type(e).__name__}: {e})") from None
    if not n:
        raise UserError(f"{path}: the video has no frames")


def probe(path):
    """(frame count, fps, (H, W)) of a clip without holding its frames (a video file is decoded once to count)."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = _frame_files(path)
        fps_file = path / FPS_FILE
        fps = float(fps_file.read_text().strip()) if fps_file.is_file() else DEFAULT_FPS
        H, W = _read_image(files[0]).shape[:2]
        return len(files), fps, (H, W)
    _check_video(path)
    if path.suffix.lower() in FRAME_SUFFIXES:
        H, W = _read_image(path).shape[:2]
        return 1, DEFAULT_FPS, (H, W)
    av = _import_av()
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else DEFAULT_FPS
            n, size = 0, None
            for frame in container.decode(stream):  # container frame counts are not always filled in
                n, size = n + 1, size or (frame.height, frame.width)
    except Exception as e:
        raise UserError(f"{path}: cannot decode this video ({type(e).__name__}: {e})") from None
    if not n:
        raise UserError(f"{path}: the video has no frames")
    return n, fps, size


def read_video(path):
    """A frame folder, a video file (.mp4/.mov/.webm, needs PyAV) or one image -> (frames [T, 3, H, W], fps)."""
    path = Path(path).expanduser()
    frames = list(iter_frames(path))
    if path.is_dir():
        fps_file = path / FPS_FILE
        return torch.stack(frames), float(fps_file.read_text().strip()) if fps_file.is_file() else DEFAULT_FPS
    if path.suffix.lower() in FRAME_SUFFIXES:
        return frames[0][None], DEFAULT_FPS
    with _import_av().open(str(path)) as container:
        rate = container.streams.video[0].average_rate
    return torch.stack(frames), float(rate) if rate else DEFAULT_FPS


class FrameWriter:
    """Write a clip a few frames at a time: a video file (by suffix, needs PyAV) or a folder of PNG frames.

        with FrameWriter(path, fps) as out:
            out.write(frames)        # [n, 3, H, W] in [0, 1], as many times as needed

    Atomic: frames go to a temporary name beside the target, renamed over it when the block ends without
    an error; on an error the temporary output is removed and the target is untouched.
    """

    def __init__(self, path, fps=DEFAULT_FPS):
        self.path, self.fps = Path(path).expanduser(), fps
        self.tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
        self.suffix = self.path.suffix.lower()
        self.count, self.container, self.stream = 0, None, None

    def __enter__(self):
        return self

    def write(self, frames):
        frames = _to_uint8(frames)
        if self.suffix in VIDEO_SUFFIXES:
            if self.container is None:
                self._open_file(*frames.shape[1:3])
            for frame in frames:
                for packet in self.stream.encode(self._av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    self.container.mux(packet)
        else:
            from PIL import Image

            self.tmp.mkdir(parents=True, exist_ok=True)
            for frame in frames:
                Image.fromarray(frame).save(self.tmp / f"{self.count:05d}.png")
                self.count += 1

    def _open_file(self, H, W):
        av = self._av = _import_av()
        codec = "libvpx-vp9" if self.suffix == ".webm" else "libx264"
        fmt = {".mp4": "mp4", ".mov": "mov", ".webm": "webm"}[self.suffix]
        self.container = av.open(str(self.tmp), mode="w", format=fmt)
        self.stream = self.container.add_stream(codec, rate=Fraction(self.fps).limit_denominator(1001))
        self.stream.width, self.stream.height = W, H
        # 4:2:0 chroma needs even sizes; odd ones keep full chroma
        self.stream.pix_fmt = "yuv420p" if H % 2 == 0 and W % 2 == 0 else "yuv444p"
        self.stream.options = {"crf": "12"} if codec == "libx264" else {}

    def __exit__(self, kind, error, tb):
        try:
            if self.container is not None:
                if kind is None:
                    for packet in self.stream.encode():
                        self.container.mux(packet)
                self.container.close()
            if kind is None:
                self._finish()
        except OSError as e:
            error = e
        finally:
            if self.tmp.is_dir():
                shutil.rmtree(self.tmp)
            elif self.tmp.exists():
                self.tmp.unlink()
        if isinstance(error, OSError):  # an unwritable folder, a full disk: one line, nothing left behind
            raise UserError(f"{self.path}: cannot write it ({error.strerror or error}); free some space or "
                            "choose another output place") from None
        return False

    def _finish(self):
        if self.suffix in VIDEO_SUFFIXES:
            os.replace(self.tmp, self.path)
            return
        (self.tmp / FPS_FILE).write_text(f"{self.fps:g}\n")
        digits = len(str(self.count - 1))
        if digits > 5:  # beyond 100000 frames: widen every name so that name order stays frame order
            for i in range(10 ** 5):
                os.rename(self.tmp / f"{i:05d}.png", self.tmp / f"{i:0{digits}d}.png")
        if self.path.exists():  # a directory cannot be renamed over another: move the old one aside first
            old = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.old")
            os.rename(self.path, old)
            os.rename(self.tmp, self.path)
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.rename(self.tmp, self.path)


def write_video(frames, path, fps=DEFAULT_FPS):
    """frames [T, 3, H, W] in [0, 1] -> a video file (by suffix, needs PyAV) or a folder of PNG frames, atomically."""
    with FrameWriter(path, fps) as out:
        out.write(frames)
    return Path(path).expanduser()


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
