"""Video input: frame selection, probing, decoding at model size, and every way a file can be bad."""

from __future__ import annotations

import hashlib
import logging
import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch

import engine.video.reader as video
from engine.errors import SettingsError, VideoError
from engine.video.clips import DEMO_VIDEO
from engine.video.reader import (
    MIN_FRAMES,
    FrameSettings,
    VideoInfo,
    decode_size,
    probe_video,
    read_frames,
    select_frame_indices,
    to_model_input,
)
from tests.conftest import VIDEO_ERRORS

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
SMALL = dict(height=64, width=96)  # keeps decoding cheap where the size is not the point


def _ffmpeg(*args: str) -> None:
    subprocess.run([FFMPEG, "-y", "-loglevel", "error", *args], check=True)


def _testsrc(out: Path, size: str, rate: str, frames: int, *extra: str) -> Path:
    _ffmpeg("-f", "lavfi", "-i", f"testsrc=size={size}:rate={rate}", "-frames:v", str(frames),
            "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", *extra, str(out))
    return out


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Odd clips made on the spot: sizes, rates, lengths and damage the real clips don't have."""
    d = tmp_path_factory.mktemp("clips")
    c: dict[str, Path] = {}
    c["ntsc"] = _testsrc(d / "ntsc.mp4", "176x144", "30000/1001", 13)
    c["four"] = _testsrc(d / "four.mp4", "176x144", "25", 4)
    c["one"] = _testsrc(d / "one.mp4", "176x144", "25", 1)
    c["uhd"] = _testsrc(d / "uhd.mp4", "3840x2160", "25", 6)

    c["audio"] = d / "audio.mp4"
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", "aac", str(c["audio"]))

    # Default mp4s keep their index (moov) at the end: cutting one in half loses it.
    whole = _testsrc(d / "whole.mp4", "320x240", "25", 60).read_bytes()
    c["half"] = d / "half.mp4"
    c["half"].write_bytes(whole[: len(whole) // 2])
    # With the index up front the cut file still opens, but its packets run out mid-file.
    front = _testsrc(d / "front.mp4", "320x240", "25", 60, "-movflags", "+faststart").read_bytes()
    c["front_half"] = d / "front_half.mp4"
    c["front_half"].write_bytes(front[: len(front) // 2])
    # Same length, second half zeroed: claims 60 frames, the later ones can't be decoded.
    c["zeroed"] = d / "zeroed.mp4"
    cut = len(front) // 2
    c["zeroed"].write_bytes(front[:cut] + bytes(len(front) - cut))

    c["empty"] = d / "empty.mp4"
    c["empty"].write_bytes(b"")
    c["text"] = d / "notes.mp4"
    c["text"].write_text("this is not a video\n")
    c["folder"] = d / "folder.mp4"
    c["folder"].mkdir()
    c["missing"] = d / "missing.mp4"

    # Frame i is flat gray 16 + 8 i, encoded losslessly: a frame's brightness says its index.
    c["ramp"] = d / "ramp.mp4"
    writer = imageio_ffmpeg.write_frames(
        str(c["ramp"]), (64, 48), fps=25, codec="libx264", quality=None,
        output_params=["-qp", "0"], macro_block_size=16,
    )
    writer.send(None)
    for i in range(25):
        writer.send(np.full((48, 64, 3), 16 + 8 * i, dtype=np.uint8).tobytes())
    writer.close()
    return c


def _ramp_index(frame: torch.Tensor) -> int:
    return round((frame.float().mean().item() - 16) / 8)


# ---------------------------------------------------------------------------------------------
# FrameSettings validation


def test_frame_settings_defaults() -> None:
    s = FrameSettings()
    assert (s.max_frames, s.skip_start, s.skip_end, s.stride, s.height, s.width) == (49, 0, 0, None, 480, 720)
    assert MIN_FRAMES == 5
    with pytest.raises(AttributeError):
        s.max_frames = 9  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        (dict(max_frames=4), "--frames"),
        (dict(max_frames=0), "--frames"),
        (dict(skip_start=-1), "--skip-start"),
        (dict(skip_end=-3), "--skip-end"),
        (dict(stride=0), "--stride"),
        (dict(stride=1.5), "--stride"),
        (dict(height=481), "--height"),
        (dict(height=0), "--height"),
        (dict(width=-16), "--width"),
        (dict(width=700), "--width"),
    ],
)
def test_frame_settings_rejects(kwargs: dict, flag: str) -> None:
    with pytest.raises(SettingsError, match=flag):
        FrameSettings(**kwargs)


# ---------------------------------------------------------------------------------------------
# select_frame_indices: pure


def test_select_takes_all_when_fewer_than_asked() -> None:
    # 20 frames < 49: take them all, keep the first 4k+1 = 17.
    assert select_frame_indices(20, FrameSettings()) == list(range(17))
    assert select_frame_indices(49, FrameSettings()) == list(range(49))
    assert select_frame_indices(5, FrameSettings()) == [0, 1, 2, 3, 4]
    assert select_frame_indices(8, FrameSettings()) == [0, 1, 2, 3, 4]


def test_select_spreads_evenly() -> None:
    assert select_frame_indices(17, FrameSettings(max_frames=9)) == [0, 2, 4, 6, 8, 10, 12, 14, 16]
    idx = select_frame_indices(250, FrameSettings())
    assert len(idx) == 49 and idx[0] == 0 and idx[-1] == 249
    assert idx == sorted(set(idx))
    assert set(np.diff(idx)) <= {5, 6}
    # round(linspace(0, 249, 49)), ties rounded up: 8 * 249 / 48 = 41.5 -> 42.
    assert idx[:10] == [0, 5, 10, 16, 21, 26, 31, 36, 42, 47]
    # One more frame than the cap: spread over the whole range, not the first 49.
    idx = select_frame_indices(50, FrameSettings())
    assert len(idx) == 49 and idx[0] == 0 and idx[-1] == 49


def test_select_max_frames_not_4k1_rounds_the_target_down() -> None:
    # --frames 50 means at most 49 usable; the spread still reaches the last frame.
    idx = select_frame_indices(250, FrameSettings(max_frames=50))
    assert len(idx) == 49 and idx[-1] == 249
    assert select_frame_indices(250, FrameSettings(max_frames=8)) == [0, 62, 125, 187, 249]  # 124.5 rounds up


def test_select_stride() -> None:
    assert select_frame_indices(100, FrameSettings(stride=4)) == list(range(0, 100, 4))  # 25 = 4*6+1
    # Capped at max_frames.
    assert select_frame_indices(250, FrameSettings(stride=2)) == list(range(0, 98, 2))
    # 10 strided frames -> first 9.
    assert select_frame_indices(30, FrameSettings(stride=3)) == [0, 3, 6, 9, 12, 15, 18, 21, 24]
    # stride 1 with fewer frames than the cap is just "all".
    assert select_frame_indices(13, FrameSettings(stride=1)) == list(range(13))


def test_select_skips() -> None:
    # 45 frames remain (5..49): all kept, 45 is 4*11+1.
    assert select_frame_indices(60, FrameSettings(skip_start=5, skip_end=10)) == list(range(5, 50))
    idx = select_frame_indices(250, FrameSettings(max_frames=9, skip_start=10, skip_end=40))
    assert idx == [10, 35, 60, 85, 110, 134, 159, 184, 209]
    # 3, 8, ..., 38 is 8 frames -> first 5.
    assert select_frame_indices(40, FrameSettings(skip_start=3, stride=5)) == [3, 8, 13, 18, 23]


@pytest.mark.parametrize(
    ("num_frames", "kwargs", "remain", "flags"),
    [
        (20, dict(skip_start=15, skip_end=10), "only 0 of 20", "lower --skip-start/--skip-end"),
        (20, dict(skip_start=30), "only 0 of 20", "lower --skip-start"),
        (20, dict(skip_end=16), "only 4 of 20", "lower --skip-end"),
        (20, dict(stride=10), "only 2 of 20", "lower --stride"),
        (4, dict(), "only 4 of 4", "at least 5 frames"),
        (1, dict(), "only 1 of 1", "at least 5 frames"),
    ],
)
def test_select_too_few_frames(num_frames: int, kwargs: dict, remain: str, flags: str) -> None:
    with pytest.raises(VideoError) as err:
        select_frame_indices(num_frames, FrameSettings(**kwargs))
    message = str(err.value)
    assert remain in message and flags in message and "\n" not in message


def test_select_no_frames() -> None:
    with pytest.raises(VideoError, match="0 frames"):
        select_frame_indices(0, FrameSettings())


# ---------------------------------------------------------------------------------------------
# probe_video


def test_probe_real_clips(wide_clip: Path, small_clip: Path) -> None:
    info = probe_video(wide_clip)
    assert isinstance(info, VideoInfo)
    assert (info.num_frames, info.fps, info.width, info.height) == (131, 25.0, 636, 270)
    assert info.sha256 == hashlib.sha256(wide_clip.read_bytes()).hexdigest()
    assert info.path == str(wide_clip.resolve())
    info = probe_video(str(small_clip))
    assert (info.num_frames, info.fps, info.width, info.height) == (47, 25.0, 430, 242)


def test_probe_sha256_streamed_and_stable(clips: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    expected = hashlib.sha256(clips["ntsc"].read_bytes()).hexdigest()
    assert probe_video(clips["ntsc"]).sha256 == expected
    monkeypatch.setattr(video, "_HASH_BLOCK", 1000)  # many blocks: same digest
    assert probe_video(clips["ntsc"]).sha256 == expected
    assert probe_video(clips["four"]).sha256 != expected


def test_probe_odd_rate_and_size(clips: dict[str, Path]) -> None:
    info = probe_video(clips["ntsc"])
    assert info.num_frames == 13
    assert info.fps == pytest.approx(30000 / 1001, abs=1e-3)
    assert (info.width, info.height) == (176, 144)
    assert probe_video(clips["one"]).num_frames == 1  # probing is fine; selection refuses it
    info = probe_video(clips["uhd"])
    assert (info.num_frames, info.width, info.height) == (6, 3840, 2160)


@pytest.mark.parametrize(
    ("name", "expected"),
    [(name, VIDEO_ERRORS[name]) for name in ("missing", "folder", "empty", "text", "half", "front_half", "audio")],
)
def test_probe_rejects(clips: dict[str, Path], name: str, expected: str) -> None:
    with pytest.raises(VideoError) as err:
        probe_video(clips[name])
    message = str(err.value)
    assert expected in message
    assert clips[name].name in message and "\n" not in message and " — " in message


def test_probe_unreadable_names_reason_and_fix(clips: dict[str, Path]) -> None:
    with pytest.raises(VideoError) as err:
        probe_video(clips["half"])
    assert "moov atom not found" in str(err.value)  # ffmpeg's reason, not decord's "Error reading"
    assert "ffmpeg -i" in str(err.value) and "libx264" in str(err.value)


# decord can hang or crash in native code; a stand-in worker shows the caller survives both.
@pytest.mark.parametrize(
    ("worker", "expected"),
    [
        ("import time; time.sleep(30)", "did not finish probing"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "crashed (SIGSEGV)"),
        ("import os; os.abort()", "crashed (SIGABRT)"),
        ("print('garbage')", "decord failed while probing"),
        ("raise SystemExit('worker exploded')", "worker exploded"),
    ],
)
def test_probe_survives_worker_hang_and_crash(
    clips: dict[str, Path], monkeypatch: pytest.MonkeyPatch, worker: str, expected: str
) -> None:
    monkeypatch.setattr(video, "_worker_source", lambda: worker)
    monkeypatch.setattr(video, "PROBE_TIMEOUT_S", 0.5)
    with pytest.raises(VideoError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        probe_video(clips["ntsc"])


# ---------------------------------------------------------------------------------------------
# read_frames


def test_read_frames_real_clip_at_model_size(wide_clip: Path) -> None:
    frames, info = read_frames(wide_clip, FrameSettings())
    assert frames.dtype == torch.uint8 and tuple(frames.shape) == (49, 480, 720, 3)
    assert info.num_frames == 131
    assert frames.float().std() > 20  # real picture content, not a blank buffer


def test_read_frames_matches_ffmpeg(small_clip: Path) -> None:
    # Cross-check frame 0 against ffmpeg's own decode+scale: right frame, RGB order, same size.
    frames, info = read_frames(small_clip, FrameSettings(max_frames=5, height=240, width=368))
    assert tuple(frames.shape) == (5, 240, 368, 3)
    assert select_frame_indices(info.num_frames, FrameSettings(max_frames=5)) == [0, 12, 23, 35, 46]
    reader = imageio_ffmpeg.read_frames(str(small_clip), output_params=["-vf", "scale=368:240"])
    meta = next(reader)
    assert meta["source_size"] == (430, 242) and meta["size"] == (368, 240)
    reference = np.frombuffer(next(reader), dtype=np.uint8).reshape(240, 368, 3)
    reader.close()
    diff = np.abs(frames[0].numpy().astype(np.int16) - reference.astype(np.int16))
    assert diff.mean() < 4
    swapped = np.abs(frames[0].numpy()[..., ::-1].astype(np.int16) - reference.astype(np.int16))
    assert swapped.mean() > diff.mean()


def test_read_frames_picks_the_selected_frames(clips: dict[str, Path]) -> None:
    frames, _ = read_frames(clips["ramp"], FrameSettings(skip_start=2, stride=3, **SMALL))
    assert [_ramp_index(f) for f in frames] == [2, 5, 8, 11, 14]
    frames, _ = read_frames(clips["ramp"], FrameSettings(max_frames=9, **SMALL))
    assert [_ramp_index(f) for f in frames] == [0, 3, 6, 9, 12, 15, 18, 21, 24]
    frames, _ = read_frames(clips["ramp"], FrameSettings(skip_start=3, skip_end=4, **SMALL))
    assert [_ramp_index(f) for f in frames] == list(range(3, 20))  # 18 kept -> first 17


def test_read_frames_chunking_does_not_change_frames(
    clips: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = FrameSettings(max_frames=13, **SMALL)
    whole, _ = read_frames(clips["ramp"], settings)
    monkeypatch.setattr(video, "DECODE_CHUNK", 2)
    chunked, _ = read_frames(clips["ramp"], settings)
    assert torch.equal(whole, chunked)


def test_read_frames_4k_source_comes_back_at_requested_size(clips: dict[str, Path]) -> None:
    frames, info = read_frames(clips["uhd"], FrameSettings())
    assert tuple(frames.shape) == (5, 480, 720, 3)  # 6 frames -> 4k+1 = 5
    assert (info.width, info.height) == (3840, 2160)
    frames, _ = read_frames(clips["uhd"], FrameSettings(height=96, width=160))
    assert tuple(frames.shape) == (5, 96, 160, 3)


def test_read_frames_odd_rate_upscaled(clips: dict[str, Path]) -> None:
    frames, info = read_frames(str(clips["ntsc"]), FrameSettings())
    assert tuple(frames.shape) == (13, 480, 720, 3)
    assert info.fps == pytest.approx(29.97, abs=1e-2)


# ---------------------------------------------------------------------------------------------
# --fit: a source of another aspect ratio


@pytest.fixture(scope="module")
def vertical(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """144x176 (portrait), bands top to bottom: red 44 rows, green 88, blue 44."""
    out = tmp_path_factory.mktemp("vertical") / "vertical.mp4"
    bands = "drawbox=x=0:y=0:w=144:h=44:color=0xFF0000:t=fill,drawbox=x=0:y=132:w=144:h=44:color=0x0000FF:t=fill"
    _ffmpeg("-f", "lavfi", "-i", "color=c=0x00FF00:s=144x176:r=25", "-vf", bands, "-frames:v", "5",
            "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(out))
    return out


def _band(pixel: torch.Tensor) -> str:
    return "rgb"[int(pixel.float().argmax())] if pixel.max() > 150 else "black"


def test_fit_decode_sizes() -> None:
    assert decode_size(144, 176, FrameSettings(fit="crop", **SMALL)) == (117, 96)  # covers 64x96
    assert decode_size(144, 176, FrameSettings(fit="pad", **SMALL)) == (64, 52)  # fits inside it
    assert decode_size(144, 176, FrameSettings(**SMALL)) == (64, 96)
    with pytest.raises(SettingsError, match="--fit 'squash' is invalid — use stretch, crop, pad"):
        FrameSettings(fit="squash")


def test_fit_crop_pad_and_stretch_place_the_picture(vertical: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cogedit"):
        stretched = read_frames(vertical, FrameSettings(**SMALL))[0][0]
        cropped = read_frames(vertical, FrameSettings(fit="crop", **SMALL))[0][0]
        padded = read_frames(vertical, FrameSettings(fit="pad", **SMALL))[0][0]
    assert stretched.shape == cropped.shape == padded.shape == (64, 96, 3)
    # Stretched, the red band is the top quarter; cropped, the centre is cut out: mostly green.
    assert [_band(stretched[row, 48]) for row in (4, 32, 60)] == ["r", "g", "b"]
    assert [_band(cropped[row, 48]) for row in (8, 32, 56)] == ["g", "g", "g"]
    assert _band(cropped[32, 0]) == _band(cropped[32, 95]) == "g"  # no bars: the width is filled
    # Padded, the whole picture (52 wide) sits centred between black bars of 22 columns.
    assert padded[:, :22].max() == 0 and padded[:, 74:].max() == 0
    assert [_band(padded[row, 48]) for row in (2, 32, 61)] == ["r", "g", "b"]
    assert _band(padded[32, 23]) == _band(padded[32, 72]) == "g"
    squashed = [r.getMessage() for r in caplog.records if "--fit crop or --fit pad" in r.getMessage()]
    assert len(squashed) == 1 and "144x176 and is stretched to 96x64" in squashed[0]  # only stretch warns


def test_stretch_to_the_same_shape_does_not_warn(vertical: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cogedit"):
        frames, _ = read_frames(vertical, FrameSettings(max_frames=5, height=176, width=144))
    assert frames.shape[1:] == (176, 144, 3) and not caplog.records


@pytest.mark.parametrize(("name", "remain"), [("four", "only 4 of 4"), ("one", "only 1 of 1")])
def test_read_frames_too_short(clips: dict[str, Path], name: str, remain: str) -> None:
    with pytest.raises(VideoError) as err:
        read_frames(clips[name], FrameSettings())
    assert str(err.value).startswith(f"{clips[name]}: {remain}")


def test_read_frames_skips_leave_nothing(clips: dict[str, Path]) -> None:
    with pytest.raises(VideoError, match="only 0 of 25 frames remain after --skip-start 20, --skip-end 10"):
        read_frames(clips["ramp"], FrameSettings(skip_start=20, skip_end=10))


def test_read_frames_damaged_file_reports_count_it_cannot_decode(clips: dict[str, Path]) -> None:
    # Opens and claims 60 frames; decoding the zeroed half fails -> re-encode advice.
    assert probe_video(clips["zeroed"]).num_frames == 60
    with pytest.raises(VideoError) as err:
        read_frames(clips["zeroed"], FrameSettings(**SMALL))
    message = str(err.value)
    assert "could not be decoded" in message and "re-encode" in message and "\n" not in message


@pytest.mark.parametrize("name", ["missing", "folder", "text", "audio"])
def test_read_frames_rejects_bad_files(clips: dict[str, Path], name: str) -> None:
    with pytest.raises(VideoError):
        read_frames(clips[name], FrameSettings(**SMALL))


def test_read_frames_survives_decode_hang(clips: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in child answers the probe, then hangs in the decode (where decord is known to spin).
    probe_then_hang = (
        "import sys, json, time\n"
        "sys.stdin.readline()\n"
        "print(json.dumps(dict(ok=True, num_frames=25, fps=25.0, width=64, height=48)), flush=True)\n"
        "sys.stdin.readline()\n"
        "time.sleep(30)\n"
    )
    monkeypatch.setattr(video, "_worker_source", lambda: probe_then_hang)
    monkeypatch.setattr(video, "DECODE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(video, "DECODE_TIMEOUT_PER_FRAME_S", 0.0)
    with pytest.raises(VideoError, match="did not finish decoding"):
        read_frames(clips["ramp"], FrameSettings(**SMALL))


# ---------------------------------------------------------------------------------------------
# to_model_input


def test_to_model_input_layout_and_range() -> None:
    frames = torch.zeros(5, 4, 6, 3, dtype=torch.uint8)
    frames[0] = 255
    frames[1, :, :, 0] = 255  # red
    frames[2] = 128
    x = to_model_input(frames)
    assert x.dtype == torch.float32 and tuple(x.shape) == (5, 3, 4, 6) and x.is_contiguous()
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert torch.all(x[0] == 1.0) and torch.all(x[3] == -1.0)
    assert torch.all(x[1, 0] == 1.0) and torch.all(x[1, 1:] == -1.0)  # channel 0 is red
    assert x[2, 0, 0, 0].item() == pytest.approx(128 / 127.5 - 1, abs=1e-6)


def test_to_model_input_on_real_frames(clips: dict[str, Path]) -> None:
    frames, _ = read_frames(clips["ramp"], FrameSettings(max_frames=5, **SMALL))
    x = to_model_input(frames)
    assert tuple(x.shape) == (5, 3, 64, 96)
    assert -1.0 <= x.min().item() and x.max().item() <= 1.0
    # Frame 0 is gray 16 -> about 16 / 127.5 - 1 = -0.875.
    assert x[0].mean().item() == pytest.approx(-0.875, abs=0.03)


@pytest.mark.parametrize(
    "bad",
    [torch.zeros(5, 4, 6, 3), torch.zeros(4, 6, 3, dtype=torch.uint8), torch.zeros(5, 3, 4, 6, dtype=torch.uint8)],
)
def test_to_model_input_rejects(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        to_model_input(bad)


# ---------------------------------------------------------------------------------------------
# the demo asset


def test_demo_video_asset() -> None:
    assert DEMO_VIDEO.is_file() and DEMO_VIDEO.parent.name == "clips"
    assert DEMO_VIDEO.stat().st_size < 300_000
    info = probe_video(DEMO_VIDEO)
    assert (info.num_frames, info.fps, info.width, info.height) == (33, 25.0, 192, 108)
    streams = subprocess.run([FFMPEG, "-hide_banner", "-i", str(DEMO_VIDEO)], capture_output=True, text=True).stderr
    assert "Video: h264" in streams and "Audio" not in streams
    frames, _ = read_frames(DEMO_VIDEO, FrameSettings())
    assert tuple(frames.shape) == (33, 480, 720, 3)  # 33 = 4*8+1: every frame is used
