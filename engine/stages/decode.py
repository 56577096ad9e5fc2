"""Latents -> frames (the decoder half of the VAE) -> mp4 files."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import numpy as np
import torch

from engine.errors import OutputExistsError, SettingsError
from engine.models.components import loaded
from engine.stages.context import StageContext
from engine.video.labels import labelled
from engine.video.masks import Mask, pasted

_MAX_NAME = 60


@torch.no_grad()
def decode_latents(vae: torch.nn.Module, latents: torch.Tensor) -> np.ndarray:
    """[K, F', C, h, w] -> uint8 frames [K, F, H, W, 3]."""
    from diffusers.video_processor import VideoProcessor

    z = latents.to(device=vae.device, dtype=vae.dtype).permute(0, 2, 1, 3, 4) / vae.config.scaling_factor
    video = vae.decode(z).sample
    frames = VideoProcessor().postprocess_video(video.float(), output_type="np")  # [K, F, H, W, 3] in [0, 1]
    return (np.asarray(frames) * 255).round().astype(np.uint8)


def safe_name(prompt: str, index: int) -> str:
    """A file name from a prompt: ASCII words, bounded, never a path."""
    text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode()
    text = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    if len(text) > _MAX_NAME:  # cut at the last word boundary that fits; mid-word only for one long word
        head = text[: _MAX_NAME + 1]
        text = head.rsplit("-", 1)[0] if "-" in head else head[:_MAX_NAME]
    return f"{index:02d}-{text or 'edit'}"


def claim(path: Path, force: bool) -> Path:
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; pass --force to overwrite it or --out to write elsewhere")
    return path


def write_video(frames: np.ndarray, path: Path, fps: float) -> Path:
    """Write uint8 frames [F, H, W, 3] as an mp4 through diffusers' exporter (imageio-ffmpeg)."""
    from diffusers.utils import export_to_video

    tmp = path.with_name(f".{path.stem}.part{path.suffix}")
    export_to_video([f.astype(np.float32) / 255.0 for f in frames], str(tmp), fps=fps)
    tmp.replace(path)  # a half-written mp4 never carries the final name
    return path


def side_by_side(source: np.ndarray, edited: np.ndarray, prompt: str) -> np.ndarray:
    """Source | edit, frame by frame (source cut to the edit's length and size), labelled, with
    the prompt in a band below."""
    n = min(len(source), len(edited))
    src = torch.from_numpy(source[:n]).permute(0, 3, 1, 2).float()
    if src.shape[-2:] != edited.shape[1:3]:
        src = torch.nn.functional.interpolate(src, size=edited.shape[1:3], mode="bilinear", antialias=True)
    src = src.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return labelled([src, edited[:n]], ["source", "edit"], prompt)


def output_paths(stem: str, prompts: tuple[str, ...], out_dir: Path, force: bool) -> tuple[list[Path], list[Path]]:
    """The mp4 paths of an edit, `<stem>-NN-<prompt>.mp4` (the stem names the inversion and the
    edit's settings, so edits with other settings never collide); refuses existing files (unless
    `force`) and unusable folders."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SettingsError(f"cannot create --out folder {out_dir}: {exc.strerror or exc} — pass --out to a writable folder") from None
    names = [safe_name(p, i) for i, p in enumerate(prompts)]
    videos = [claim(out_dir / f"{stem}-{n}.mp4", force) for n in names]
    pairs = [claim(out_dir / f"{stem}-{n}-side-by-side.mp4", force) for n in names]
    return videos, pairs


def decode_stage(
    ctx: StageContext, latents: torch.Tensor, outputs: tuple[list[Path], list[Path]] | None, fps: float, prompts: tuple[str, ...], paste: Mask | None = None
) -> np.ndarray | None:
    """Decode each edit (of `prompts`), put into the source through `paste` when given; with
    `outputs` (videos, side-by-sides) write them as mp4 and return None, else return the uint8
    frames [K, F, H, W, 3]."""
    source = ctx.entry.load(ctx.entry.paths.frames, "frames").numpy() if outputs or paste else None
    decoded = []
    with ctx.reporter.phase("decode", total=latents.shape[0]) as ph:
        with loaded("vae", ctx.info, ctx.runtime) as vae:
            for k in range(latents.shape[0]):
                frames = decode_latents(vae, latents[k : k + 1])[0][: ctx.entry.output_frames]
                if paste is not None:
                    frames = pasted(frames, source, paste)
                if outputs:
                    write_video(frames, outputs[0][k], fps)
                    write_video(side_by_side(source, frames, prompts[k]), outputs[1][k], fps)
                else:
                    decoded.append(frames)
                ph.advance()
        n = latents.shape[0]
        ph.record.detail = f"{n} mp4 + {n} side-by-side in {outputs[0][0].parent}" if outputs else f"{n} video(s) decoded"
    return None if outputs else np.stack(decoded)
