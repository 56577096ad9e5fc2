"""Shared fixtures: one tiny checkpoint per session, an isolated cache per test, the real clips."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

# Real footage that ships with the tests (tests/clips/CREDITS.md): odd sizes and lengths on purpose.
CLIPS = Path(__file__).resolve().parent / "clips"
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


def free_port() -> int:
    """A local port nothing listens on, for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("COGEDIT_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no test may reach a hub
    return cache


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch):
    """FA4 and Sage 'installed' on this CPU: the availability check passes, and the kernels' custom
    ops call CPU stand-ins (tests/test_attention.py's StandIn, which counts its calls)."""
    from engine.hooks import attention
    from tests.test_attention import StandIn

    fake = StandIn()
    monkeypatch.setattr(attention, "fa4_function", lambda: fake.fa4)
    monkeypatch.setattr(attention, "sage_function", lambda: fake.sage)
    monkeypatch.setattr(attention, "_problem", lambda kernel, device, dtype: None)
    return fake


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-cogvideox-5b")


@pytest.fixture(scope="session")
def tiny_15(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CogVideoX1.5-5B-shaped checkpoint, written the way a user writes one: through the CLI."""
    from click.testing import CliRunner

    from cli import cli

    path = tmp_path_factory.mktemp("models") / "tiny-cogvideox1.5-5b"
    result = CliRunner().invoke(cli, ["tiny-model", str(path), "--random", "--arch", "1.5"])
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture(scope="session")
def wide_clip() -> Path:
    """131 frames, 636x270 at 25 fps: no side a multiple of 8, a length that is not 4k+1."""
    return CLIPS / "bunny_wide.mp4"


@pytest.fixture(scope="session")
def small_clip() -> Path:
    """47 frames, 430x242 at 25 fps."""
    return CLIPS / "bunny_small.mp4"


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what the imports made, so that the engine's garbage collections skip it.

    Every phase collects garbage before and after it loads a model (`engine.models.components`);
    with torch, diffusers and transformers imported that is ~490k objects, 0.6 s a collection on
    the CI machine, over a second per phase. Module-level objects are never garbage, so a
    collection need only look at what the tests make."""
    import gc

    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel, DDIMInverseScheduler  # noqa: F401
    from transformers import AutoTokenizer, T5EncoderModel  # noqa: F401

    gc.collect()
    gc.freeze()
