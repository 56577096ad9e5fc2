"""Shared fixtures: one tiny checkpoint per session, an isolated cache per test, the real clips."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "videos"
# Small but real: the tiny transformer was built for 96x160 frames (12x20 latents).
SMALL = dict(frames=9, height=96, width=160, steps=4)

# What the one-line error says for each broken or odd clip the tests make (test_video.py's
# `clips`, and the fewer that test_cli_errors.py runs through the CLI).
VIDEO_ERRORS = {
    "missing": "does not exist",
    "folder": "is a directory",
    "empty": "is empty",
    "text": "is not a readable video",
    "half": "is not a readable video",
    "front_half": "is not a readable video",
    "audio": "has no video stream",
    "zero": "has no video stream",
    "one": "only 1 of 1 frames remain",
    "four": "only 4 of 4 frames remain",
}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("COGEDIT_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no test may reach a hub
    return cache


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-cogvideox-5b")


@pytest.fixture(scope="session")
def bikes() -> Path:
    path = SHARED_VIDEOS / "bikes.mp4"
    if not path.exists():
        pytest.skip(f"sample clip {path} is not present (it ships in shared/videos beside the repo)")
    return path


@pytest.fixture(scope="session")
def bunny() -> Path:
    path = SHARED_VIDEOS / "bigbuckbunny.mp4"
    if not path.exists():
        pytest.skip(f"sample clip {path} is not present (it ships in shared/videos beside the repo)")
    return path
