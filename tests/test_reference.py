"""The engine against an independent reference of the method (tests/reference/method.py).

Each case runs `engine.invert` / `engine.edit` through the public API and the reference on the
same tiny model, frames and prompts; the two must agree to float32 rounding. Each case also names
the result a plausible bug would give instead (a setting ignored, a sign flipped, the wrong row,
a frame off) and checks that the reference tells the two apart by far more than the tolerance,
so the comparison has the power to catch that bug. Cases that reach the same arithmetic by
another code path (stored attention, row groups, several prompts in one pass) have no such
alternative: agreeing with the reference is what they promise.
"""

from __future__ import annotations

import ast
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch

import engine
from tests.conftest import CLIPS
from tests.reference import method

# 5 frames (2 latent frames) of 48x80 (6x10 latent cells); 4 steps divide the 1000 training timesteps.
SHAPE = dict(frames=5, height=48, width=80, steps=4)
SOURCE, NEGATIVE = "a rabbit in a meadow", "blurry, low quality"
PROMPTS = ("a watercolor painting", "a charcoal sketch")
BOX = (0.1, 0.2, 0.6, 0.9)
# Engine and reference differ by at most ~1e-5 here (float32 on the CPU, other summation orders);
# every setting in the matrix moves the result by more than 1e-3.
ATOL = 5e-5
MOVES = 1e-3

INVERSIONS = {
    "plain": dict(guidance=1.0),
    "guided": dict(guidance=6.0, negative_prompt=NEGATIVE, attention_store="cpu"),
    "fixed-point-1": dict(guidance=1.0, inversion="fixed-point", inversion_iters=1),
    "fixed-point-3": dict(guidance=1.0, inversion="fixed-point", inversion_iters=3),
    "guided-fixed-point-2": dict(guidance=3.0, negative_prompt=NEGATIVE, inversion="fixed-point", inversion_iters=2, attention_store="cpu"),
}
# The reference's (guidance, negative prompt, fixed-point iterations) of each inversion, and the
# inversion whose result a bug would give instead (guidance or refinement ignored, iterations cut).
REFERENCE_INVERSIONS = {
    "plain": ((1.0, None, 0), "guided"),
    "guided": ((6.0, NEGATIVE, 0), "plain"),
    "fixed-point-1": ((1.0, None, 1), "plain"),
    "fixed-point-3": ((1.0, None, 3), "fixed-point-1"),
    "guided-fixed-point-2": ((3.0, NEGATIVE, 2), "guided-fixed-point-0"),
    "guided-fixed-point-0": ((3.0, NEGATIVE, 0), None),  # the reference's alone
}


@dataclass(frozen=True)
class Case:
    """One edit: the engine's options, and the same edit as the reference takes it."""

    options: dict = field(default_factory=dict)  # engine.edit's
    edit: method.Edit = method.Edit()
    inversion: str = "guided"
    negative: str = ""  # the reference's unconditional prompt (with guidance > 1)
    source: str = SOURCE  # the prompt of the reference's shared row
    mask: str | None = None  # box | file | file-one-off (the file's frames grouped one frame late)
    seed: int | None = None  # init random
    prompts: tuple[str, ...] = PROMPTS[:1]
    alternative: dict | None = None  # the fields a plausible bug changes; None: same math, other path


EDITS = {
    "default": Case(alternative=dict(edit=method.Edit(strength=0.0))),
    "unguided": Case(dict(guidance=1.0), method.Edit(guidance=1.0), alternative=dict(edit=method.Edit())),
    "negative-prompt": Case(dict(guidance=4.0, negative_prompt=NEGATIVE), method.Edit(guidance=4.0), negative=NEGATIVE, alternative=dict(negative="")),
    "window-0-0.5": Case(dict(inject_steps="0:0.5"), method.Edit(window=(0.0, 0.5)), alternative=dict(edit=method.Edit())),
    "window-0.25-0.75": Case(dict(inject_steps="0.25:0.75"), method.Edit(window=(0.25, 0.75)), alternative=dict(edit=method.Edit(window=(0.0, 0.5)))),
    "layer-1": Case(dict(inject_layers="1"), method.Edit(layers=(1,)), alternative=dict(edit=method.Edit(layers=(0,)))),
    "strength-0.5": Case(dict(inject_strength=0.5), method.Edit(strength=0.5), alternative=dict(edit=method.Edit(strength=2.0))),
    "strength-3": Case(dict(inject_strength=3.0), method.Edit(strength=3.0), alternative=dict(edit=method.Edit())),
    "strength-0": Case(dict(inject_strength=0.0), method.Edit(strength=0.0), alternative=dict(edit=method.Edit())),
    "per-half": Case(dict(reference="per-half"), method.Edit(reference="per-half"), alternative=dict(edit=method.Edit())),
    # captured from the conditional row of a guided inversion, not the negative prompt's
    "stored-cfg-inversion": Case(dict(reference="stored"), alternative=dict(source=NEGATIVE)),
    # captured later from the cached trajectory, one forward per step
    "stored-added-later": Case(dict(reference="stored"), inversion="plain+disk-store"),
    # the first forward at each timestep: the refinements run at t again, on other latents
    "stored-fixed-point-inversion": Case(dict(reference="stored"), inversion="guided-fixed-point-2"),
    "box-mask": Case(dict(mask_box=",".join(map(str, BOX))), mask="box", alternative=dict(mask=None)),
    "per-frame-mask-file": Case(mask="file", alternative=dict(mask="file-one-off")),
    "random-init": Case(dict(init="random", seed=3), seed=3, alternative=dict(seed=0)),
    "row-groups": Case(dict(plan="lean")),
    "row-groups-per-half": Case(dict(plan="lean", reference="per-half"), method.Edit(reference="per-half")),
    "row-groups-stored": Case(dict(plan="lean", reference="stored", inject_layers="1"), method.Edit(layers=(1,))),
    "two-prompts-one-pass": Case(dict(batch=2), prompts=PROMPTS),
    "two-prompts-row-groups-masked": Case(dict(batch=2, plan="lean", mask_box=",".join(map(str, BOX))), prompts=PROMPTS, mask="box"),
    "negative-prompt-inversion": Case(dict(negative_from_source=True), inversion="plain", negative=SOURCE, alternative=dict(negative="")),
    "from-fixed-point-inversion": Case(inversion="fixed-point-3", alternative=dict(inversion="fixed-point-1")),
}


def _write_mask_video(path: Path) -> Path:
    """One mask per frame, each white somewhere else: frame 0 alone makes latent frame 0, frame 1
    only widens latent frame 1 (with frames 2-4), so grouping frames one off changes the mask.
    Lossless and pure black/white, so any decoder reads the same values."""
    writer = imageio_ffmpeg.write_frames(str(path), (80, 48), fps=8, codec="libx264", quality=None, output_params=["-qp", "0"], macro_block_size=16)
    writer.send(None)
    for i in range(5):
        frame = np.zeros((48, 80, 3), np.uint8)
        rows, cols = [(slice(8, 40), slice(0, 32)), (slice(0, 16), slice(32, 64))][i] if i < 2 else (slice(16, 48), slice(48, 80))
        frame[rows, cols] = 255
        writer.send(frame.tobytes())
    writer.close()
    return path


def _read_mask_video(path: Path) -> torch.Tensor:
    """[F, H, W] in 0-1, decoded by ffmpeg itself (the engine reads through decord)."""
    frames = imageio_ffmpeg.read_frames(str(path))
    width, height = next(frames)["size"]
    pixels = np.stack([np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in frames])
    return torch.from_numpy(pixels).float().mean(-1) / 255


class Bench:
    """The engine's inversions and the reference's, made once per module and shared by the cases."""

    def __init__(self, model: Path, root: Path) -> None:
        self.model, self.cache = model, root / "cache"
        self.ref = method.load(model)
        self.mask_file = _write_mask_video(root / "mask.mp4")
        self._inversions: dict[str, engine.Inversion] = {}
        self._levels: dict[str, dict[int, torch.Tensor]] = {}
        self._embeds: dict[str, torch.Tensor] = {}

    def embed(self, prompt: str) -> torch.Tensor:
        if prompt not in self._embeds:
            self._embeds[prompt] = method.embed(self.ref, prompt)
        return self._embeds[prompt]

    def inversion(self, name: str) -> engine.Inversion:
        if name not in self._inversions:
            if name == "plain+disk-store":  # the plain inversion first: its store is captured afterwards
                self.inversion("plain")
            options = INVERSIONS["plain"] | dict(attention_store="disk") if name == "plain+disk-store" else INVERSIONS[name]
            self._inversions[name] = engine.invert(CLIPS / "bunny_wide.mp4", self.model, device="cpu", cache_dir=self.cache, source_prompt=SOURCE, **SHAPE, **options)
        return self._inversions[name]

    def clean(self) -> torch.Tensor:
        """The reference's latents of the frames the engine selected (reading video is not the method)."""
        return method.encode(self.ref, self.inversion("plain").frames())

    def levels(self, name: str) -> dict[int, torch.Tensor]:
        name = "plain" if name == "plain+disk-store" else name
        if name not in self._levels:
            (guidance, negative, iters), _ = REFERENCE_INVERSIONS[name]
            uncond = self.embed(negative) if negative is not None else None
            self._levels[name] = method.invert(self.ref, self.clean(), self.embed(SOURCE), SHAPE["steps"], uncond, guidance, iters)
        return self._levels[name]

    def pixels(self, mask: str) -> torch.Tensor:
        if mask == "box":
            return method.box_pixels(BOX, SHAPE["frames"], SHAPE["height"], SHAPE["width"])
        pixels = _read_mask_video(self.mask_file)
        return pixels[[0, 2, 3, 4, 4]] if mask == "file-one-off" else pixels

    def engine_edit(self, case: Case) -> torch.Tensor:
        options = case.options | (dict(mask=self.mask_file) if case.mask == "file" else {})
        return engine.edit(self.inversion(case.inversion), list(case.prompts), device="cpu", output="latents", **options).latents

    def reference_edit(self, case: Case) -> torch.Tensor:
        levels = self.levels(case.inversion)
        noise = levels[max(levels)]
        init = torch.randn(noise.shape, generator=torch.Generator().manual_seed(case.seed)) if case.seed is not None else None
        mask = method.latent_mask(self.pixels(case.mask), *noise.shape[-2:]) if case.mask else None
        uncond = self.embed(case.negative) if case.edit.guidance > 1 else None
        rows = [method.edit(self.ref, levels, self.embed(p), self.embed(case.source), case.edit, uncond, mask, init) for p in case.prompts]
        return torch.cat(rows)


@pytest.fixture(scope="module")
def bench(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Bench:
    return Bench(tiny_model, tmp_path_factory.mktemp("reference"))


def _farther_than(a: torch.Tensor, b: torch.Tensor, margin: float) -> bool:
    return (a - b).abs().max().item() > margin


def test_the_reference_imports_nothing_of_the_engine():
    """Independent means it cannot inherit the engine's bugs: model folders load with diffusers
    and transformers directly."""
    for path in Path(method.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {n for n in names if n.split(".")[0] in ("engine", "cache", "webui", "cli")}, path


def test_encoded_latents_match_the_reference(bench):
    torch.testing.assert_close(bench.inversion("plain").latents(), bench.clean(), rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", INVERSIONS)
def test_inversion_matches_the_reference(bench, name):
    expected = bench.levels(name)
    got = bench.inversion(name).trajectory()
    assert len(got) == SHAPE["steps"]
    for x, level in zip(got, sorted(expected)[1:], strict=True):
        torch.testing.assert_close(x, expected[level], rtol=0, atol=ATOL, msg=lambda m, level=level: f"latent at timestep {level}: {m}")
    other = REFERENCE_INVERSIONS[name][1]
    assert _farther_than(expected[max(expected)], bench.levels(other)[max(expected)], MOVES), f"{name} and {other} invert alike: the case cannot catch the difference"


@pytest.mark.parametrize("name", EDITS)
def test_edit_matches_the_reference(bench, name):
    case = EDITS[name]
    expected = bench.reference_edit(case)
    torch.testing.assert_close(bench.engine_edit(case), expected, rtol=0, atol=ATOL)
    if case.alternative is not None:
        wrong = bench.reference_edit(dataclasses.replace(case, **case.alternative))
        assert _farther_than(expected, wrong, MOVES), f"{name}: the reference cannot tell it from {case.alternative}"


def test_the_round_trip_check_matches_the_reference(bench):
    """--verify's latent error: the inverted noise denoised under the source prompt (no guidance,
    no injection) against the clean latents, as the reference computes it; its PSNR is of the
    decoded round trip against the source frames."""
    from engine.stages.verify import psnr_db

    levels = bench.levels("plain")
    back = method.edit(bench.ref, levels, bench.embed(SOURCE), bench.embed(SOURCE), method.Edit(guidance=1.0, strength=0.0))
    expected = ((back - bench.clean()).norm() / bench.clean().norm()).item()
    verified = engine.invert(CLIPS / "bunny_wide.mp4", bench.model, device="cpu", cache_dir=bench.cache, source_prompt=SOURCE, verify=True, **SHAPE, **INVERSIONS["plain"])
    assert verified.id == bench.inversion("plain").id and verified.verify["latent_rel_error"] == pytest.approx(expected, rel=1e-4)
    a, b = torch.zeros(2, 4, 4, 3, dtype=torch.uint8), torch.full((2, 4, 4, 3), 10, dtype=torch.uint8)
    assert psnr_db(a, b) == pytest.approx(10 * math.log10(255**2 / 100)) and psnr_db(b, b) == math.inf
