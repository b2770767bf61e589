"""Video input/output: frame folders round trip, bad inputs get one clear line, 4k+1 frame counts."""
import importlib.util

import pytest
import torch
from PIL import Image

from minirestore import UserError
from minirestore.video import read_video, to_4k1, write_video


def random_frames(T=3, H=12, W=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (T, 3, H, W), generator=g).float() / 255  # exactly representable in 8 bits


def one_line(excinfo):
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def test_frame_folder_round_trip(tmp_path):
    frames = random_frames()
    out = write_video(frames, tmp_path / "clip", fps=23.976)
    back, fps = read_video(out)
    assert back.shape == frames.shape and back.dtype == torch.float32
    assert torch.equal(back, frames)
    assert fps == pytest.approx(23.976)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip"]  # no temporary folder left behind
    # overwriting replaces the folder as a whole (no stale frames from a longer clip)
    write_video(random_frames(T=2, seed=1), tmp_path / "clip", fps=8)
    back, fps = read_video(tmp_path / "clip")
    assert back.shape[0] == 2 and fps == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip"]


def test_folder_of_jpegs_in_name_order_and_a_single_image(tmp_path):
    for name, value in [("b.jpg", 200), ("a.JPEG", 10), ("c.png", 90)]:
        Image.new("RGB", (16, 8), (value,) * 3).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not a frame")
    frames, fps = read_video(tmp_path)
    assert frames.shape == (3, 3, 8, 16) and fps == 16.0
    assert [round(frames[i].mean().item() * 255) for i in range(3)] == pytest.approx([10, 200, 90], abs=2)
    image, _ = read_video(tmp_path / "c.png")
    assert image.shape == (1, 3, 8, 16)


def test_bad_inputs_get_one_clear_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as e:
        read_video(tmp_path / "empty")
    assert "no frames" in one_line(e)

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (16, 8)).save(mixed / "0.png")
    Image.new("RGB", (16, 10)).save(mixed / "1.png")
    with pytest.raises(UserError) as e:
        read_video(mixed)
    assert "1.png" in one_line(e) and "one size" in one_line(e)

    broken = tmp_path / "broken"
    broken.mkdir()
    Image.new("RGB", (16, 8)).save(broken / "0.png")
    (broken / "1.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(UserError) as e:
        read_video(broken)
    assert "1.png" in one_line(e) and "not a readable image" in one_line(e)

    with pytest.raises(UserError) as e:
        read_video(tmp_path / "missing")
    assert "no such file" in one_line(e)


@pytest.mark.skipif(importlib.util.find_spec("av") is not None, reason="PyAV is installed")
def test_video_files_without_pyav_say_how_to_install_it(tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"")
    with pytest.raises(UserError) as e:
        read_video(tmp_path / "clip.mp4")
    assert "pip install minirestore[video]" in one_line(e)
    with pytest.raises(UserError, match=r"minirestore\[video\]"):
        write_video(random_frames(), tmp_path / "out.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_video_file_round_trip_with_pyav(tmp_path):
    pytest.importorskip("av")
    frames = torch.rand(5, 3, 16, 24)
    write_video(frames, tmp_path / "clip.mp4", fps=16)
    back, fps = read_video(tmp_path / "clip.mp4")
    assert back.shape == frames.shape and fps == pytest.approx(16)


def test_to_4k1_pads_or_trims_and_says_so(capsys):
    frames = random_frames(T=7, H=2, W=2)
    padded = to_4k1(frames)
    assert padded.shape[0] == 9
    assert torch.equal(padded[:7], frames) and torch.equal(padded[7], frames[6]) and torch.equal(padded[8], frames[6])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == ["video: 7 frames -> 9 (4k+1) by repeating the last frame 2 times"]
    trimmed = to_4k1(frames, mode="trim")
    assert torch.equal(trimmed, frames[:5])
    assert len(capsys.readouterr().out.strip().splitlines()) == 1
    same = random_frames(T=5, H=2, W=2)
    assert to_4k1(same) is same and capsys.readouterr().out == ""
    assert to_4k1(random_frames(T=2, H=2, W=2)).shape[0] == 5
    assert to_4k1(random_frames(T=2, H=2, W=2), mode="trim").shape[0] == 1


def test_frames_stream_in_and_out(tmp_path):
    from minirestore.video import FrameWriter, iter_frames, probe

    frames = random_frames(T=7, seed=3)
    with FrameWriter(tmp_path / "clip", fps=12) as out:
        out.write(frames[:3])
        out.write(frames[3:])
    assert probe(tmp_path / "clip") == (7, 12.0, tuple(frames.shape[-2:]))
    back = torch.stack(list(iter_frames(tmp_path / "clip")))
    assert torch.equal(back, read_video(tmp_path / "clip")[0]) and (back - frames).abs().max() <= 0.5 / 255 + 1e-6
    with pytest.raises(RuntimeError):  # an error half way leaves nothing behind and the old output intact
        with FrameWriter(tmp_path / "clip", fps=5) as out:
            out.write(frames[:2])
            raise RuntimeError("stop")
    assert probe(tmp_path / "clip")[:2] == (7, 12.0) and not list(tmp_path.glob(".clip.*"))
