"""Finding and checking a CogVideoX checkpoint without loading it: its folders, its identity
(what goes into cache keys) and its configs. No torch here: `cogedit plan` and the checks that
run before any work stay quick.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cache.keys import stable_hash
from engine.errors import ModelError

PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
_CONFIG_FILES = {
    "transformer": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "scheduler": "scheduler_config.json",
}
_HASH_WINDOW = 1 << 20  # bytes hashed from each end of a weight file for the model identity


# What each model was made for, when its files don't say (the folders cogedit writes do, in
# model_index.json's "_cogedit_defaults" entry, which is not part of the model's identity). CogVideoX-5B:
# 49 frames of 480x720 at 8 fps (its transformer config's sample_* agree). CogVideoX1.5-5B: 81
# frames (5 s) or 161 (10 s) at 16 fps, 768x1360 (THUDM's CogVideo inference/cli_demo.py: its
# RESOLUTION_MAP and its num_frames and fps help); 1.5's config sample_height/width (300 latent
# rows and columns) is the largest rotary grid, not a working size, so it can't give the size.
DEFAULTS_KEY = "_cogedit_defaults"
_NATIVE_FPS = {1: 8.0, 2: 16.0}  # by patch_size_t
_NATIVE_15 = (768, 1360)
_WINDOW_FRAMES_15 = 161  # 1.5's longest native clip (cli_demo.py's num_frames help): its window


@dataclass(frozen=True)
class ModelDefaults:
    """The frames, size and frame rate a run uses when none are given: the model's own."""

    frames: int
    height: int
    width: int
    fps: float

    @property
    def size(self) -> str:
        return f"{self.frames} frames of {self.height}x{self.width} at {self.fps:g} fps"


@dataclass(frozen=True)
class ModelInfo:
    """A checked model folder and its identity (what goes into cache keys)."""

    source: str  # what the user passed: a folder or a hub id
    path: Path
    key: str
    transformer_config: dict[str, Any]
    vae_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    text_encoder_config: dict[str, Any]
    known_params: dict[str, int] | None = None  # parameter counts, when known without building the models
    pipeline_config: dict[str, Any] = field(default_factory=dict)  # model_index.json: not in the key

    @property
    def stored_source(self) -> str:
        """What an inversion records to find the model again: a folder as an absolute path (an edit
        from another working directory still finds it), a hub id as given."""
        local = self.path == Path(self.source).expanduser()
        return str(self.path.resolve()) if local else self.source

    @property
    def vae_scale_spatial(self) -> int:
        return 2 ** (len(self.vae_config.get("block_out_channels", [0] * 4)) - 1)

    @property
    def vae_scale_temporal(self) -> int:
        return int(self.vae_config.get("temporal_compression_ratio", 4))

    @property
    def latent_window(self) -> int:
        """Latent frames of one window of a long clip: the longest clip the model was made for
        (CogVideoX-5B: its sample_frames, 49 -> 13; 1.5: 161 frames, 10 s at 16 fps -> 41, which
        `predict` pads to an even count at every call, as for any 1.5 clip)."""
        frames = int(self.transformer_config.get("sample_frames", 49)) if self.patch_size_t == 1 else _WINDOW_FRAMES_15
        return self.vae_latent_frames(frames)

    @property
    def window_frames(self) -> int:
        """Video frames of one window (49 for CogVideoX-5B)."""
        return (self.latent_window - 1) * self.vae_scale_temporal + 1

    def vae_latent_frames(self, frames: int) -> int:
        """Latent frames the VAE makes of `frames` (4k+1) video frames: the first alone, then 4 a latent frame."""
        return (frames - 1) // self.vae_scale_temporal + 1

    @property
    def text_length(self) -> int:
        return int(self.transformer_config.get("max_text_seq_length", 226))

    @property
    def patch_size_t(self) -> int:
        """Latent frames per token: 1 for CogVideoX 1.0, 2 for 1.5 (whose latent frames are padded
        to an even count, engine.models.denoiser.pad_frames)."""
        return int(self.transformer_config.get("patch_size_t") or 1)

    @property
    def version(self) -> str:
        return "1.5" if self.patch_size_t > 1 else "1.0"

    def latent_frames(self, frames: int) -> int:
        """Latent frames of `frames` video frames (4k+1) as the transformer sees them: the VAE's
        causal 4x compression, padded to a multiple of patch_size_t."""
        return -(-self.vae_latent_frames(frames) // self.patch_size_t) * self.patch_size_t

    @property
    def defaults(self) -> ModelDefaults:
        """The model's own frames, size and fps: what invert, plan and the web app use unless told."""
        tcfg, scale = self.transformer_config, self.vae_scale_spatial
        height, width = (tcfg["sample_height"] * scale, tcfg["sample_width"] * scale) if self.patch_size_t == 1 else _NATIVE_15
        native = {"frames": int(tcfg.get("sample_frames", 49)), "height": height, "width": width, "fps": _NATIVE_FPS.get(self.patch_size_t, 8.0)}
        written = self.pipeline_config.get(DEFAULTS_KEY, {})
        return ModelDefaults(**{k: type(v)(written.get(k, v)) for k, v in native.items()})


def is_hub_id(model: str) -> bool:
    """Whether `model`, where no folder of that name exists, is read as a hub id (owner/name)."""
    return model.count("/") == 1 and not model.startswith((".", "/", "~"))


def _resolve(model: str) -> Path:
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"--model {model} is a file; pass the checkpoint folder (the one with model_index.json)")
        return path
    if not is_hub_id(model):
        raise ModelError(f"model folder {model} does not exist: pass a CogVideoX-5b folder or a hub id like THUDM/CogVideoX-5b")
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "*/*.json", "*/*.safetensors", "tokenizer/*"]
    try:
        # Only safetensors weights: pickled .bin files are never fetched or loaded.
        return Path(snapshot_download(model, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, gated, …: all end in the same advice
        raise ModelError(
            f"cannot get {model} from the hub ({type(exc).__name__}); with no network, download it first "
            f"(`hf download {model}`; `huggingface-cli download` on an older huggingface_hub) or pass a local folder with --model"
        ) from exc


def _weights(part_dir: Path) -> list[Path]:
    return sorted(part_dir.glob("*.safetensors"))


def _weights_fingerprint(files: list[Path]) -> list[list[Any]]:
    # Hashing whole 10 GB files on every run is too slow; size plus both ends tells checkpoints apart.
    import hashlib

    out = []
    for f in files:
        size = f.stat().st_size
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            h.update(fh.read(_HASH_WINDOW))
            if size > _HASH_WINDOW:
                fh.seek(max(size - _HASH_WINDOW, _HASH_WINDOW))
                h.update(fh.read(_HASH_WINDOW))
        out.append([f.name, size, h.hexdigest()])
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} is unreadable ({exc}); re-download the model") from exc


def inspect_model(model: str | os.PathLike) -> ModelInfo:
    """Check a model folder (or hub id) without loading weights; refuse what the engine can't run."""
    source = str(model)
    path = _resolve(source)
    missing = []
    for part in PARTS:
        d = path / part
        if part == "tokenizer":
            ok = d.is_dir() and any(d.glob("tokenizer*")) or (d / "spiece.model").exists()
        else:
            ok = (d / _CONFIG_FILES[part]).exists() and (part == "scheduler" or bool(_weights(d)))
        if not ok:
            missing.append(part)
    pickled = [part for part in missing if any((path / part).glob("*.bin"))]
    if pickled:
        raise ModelError(
            f"model folder {path} has only pickled .bin weights for {', '.join(pickled)}, and cogedit loads "
            "safetensors only (loading a pickle can run code); download the .safetensors files of the repository"
        )
    if missing:
        hint = "safetensors weights and config" if set(missing) - {"tokenizer", "scheduler"} else "files"
        raise ModelError(
            f"model folder {path} is missing {', '.join(missing)} ({hint}); "
            "download the complete CogVideoX-5b repository (all five subfolders)"
        )
    tcfg = _read_json(path / "transformer" / "config.json")
    check_supported(source, tcfg)
    vcfg = _read_json(path / "vae" / "config.json")
    scfg = _read_json(path / "scheduler" / "scheduler_config.json")
    identity = {
        part: {"config": _read_json(path / part / _CONFIG_FILES[part]), "weights": _weights_fingerprint(_weights(path / part))}
        for part in ("transformer", "vae", "text_encoder", "scheduler")
    }
    identity["tokenizer"] = sorted(
        [f.name, f.stat().st_size] for f in (path / "tokenizer").iterdir() if f.is_file()
    )
    index = path / "model_index.json"
    return ModelInfo(
        source=source,
        path=path,
        key=stable_hash(identity),
        transformer_config=tcfg,
        vae_config=vcfg,
        scheduler_config=scfg,
        text_encoder_config=identity["text_encoder"]["config"],
        pipeline_config=_read_json(index) if index.exists() else {},
    )


SUPPORTED = "pass THUDM/CogVideoX-5b or THUDM/CogVideoX1.5-5b"


def check_supported(source: str, tcfg: dict[str, Any]) -> None:
    """Refuse the CogVideoX variants cogedit can't edit with, saying why."""
    if not tcfg.get("use_rotary_positional_embeddings", False):
        raise ModelError(
            f"{source} looks like CogVideoX-2B (sinusoidal positions, no rotary embeddings, {tcfg.get('num_layers')} layers): "
            f"cogedit's inversion, attention injection and memory plans are made and measured for the 5B models; {SUPPORTED}"
        )
    if tcfg.get("ofs_embed_dim") or tcfg.get("in_channels", 16) != tcfg.get("out_channels", 16):
        raise ModelError(
            f"{source} is an image-to-video model (it takes {tcfg.get('in_channels')} latent channels: the noise and an image's): "
            f"inverting a video needs a text-to-video model; {SUPPORTED}"
        )
    if (tcfg.get("patch_size_t") or 1) not in (1, 2):
        raise ModelError(f"{source} patches time by {tcfg['patch_size_t']}, which no CogVideoX release does; {SUPPORTED}")


def builtin_5b() -> ModelInfo:
    """The CogVideoX-5B shape with no files behind it: enough to plan memory without a download."""
    from engine.models.configs import PARAMS_5B, SCHEDULER_5B, T5_XXL, TRANSFORMER_5B, VAE_5B

    vae = {"block_out_channels": [128, 256, 256, 512], "temporal_compression_ratio": 4, **VAE_5B}
    return ModelInfo("CogVideoX-5B (built-in shape)", Path("."), "0" * 32, TRANSFORMER_5B, vae, SCHEDULER_5B, T5_XXL, PARAMS_5B)


def builtin_15() -> ModelInfo:
    """The CogVideoX1.5-5B shape with no files behind it (see builtin_5b)."""
    from engine.models.configs import PARAMS_15, TRANSFORMER_15

    return dataclasses.replace(builtin_5b(), source="CogVideoX1.5-5B (built-in shape)", transformer_config=TRANSFORMER_15, known_params=PARAMS_15)


# Hub ids `cogedit plan` answers for from the built-in shapes, with no download.
_BUILTIN = {"cogvideox-5b": builtin_5b, "cogvideox1.5-5b": builtin_15}


def plan_model(model: str | None) -> ModelInfo:
    """The model `cogedit plan` describes: a folder, a known hub id (built in, no download) or
    by default the CogVideoX-5B shape."""
    if model is None:
        return builtin_5b()
    name = model.lower().split("/")[-1]
    if not Path(model).expanduser().exists() and model.count("/") == 1 and name in _BUILTIN:
        return _BUILTIN[name]()
    return inspect_model(model)
