"""Finding and checking a CogVideoX checkpoint without loading it: its folders, its identity
(what goes into cache keys) and its configs. No torch here: `cogedit plan` and the checks that
run before any work stay quick.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
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

    @property
    def vae_scale_spatial(self) -> int:
        return 2 ** (len(self.vae_config.get("block_out_channels", [0] * 4)) - 1)

    @property
    def vae_scale_temporal(self) -> int:
        return int(self.vae_config.get("temporal_compression_ratio", 4))

    @property
    def latent_window(self) -> int:
        """Latent frames the transformer was trained on: one window of a long clip (13 for 5B).
        CogVideoX 1.5 pads latent frames to an even count (patch_size_t 2): its window must be
        that padded length, set here once 1.5 is supported."""
        return (int(self.transformer_config.get("sample_frames", 49)) - 1) // self.vae_scale_temporal + 1

    @property
    def default_fps(self) -> float:
        """The frame rate the model was trained at (CogVideoX-5B: 8; 1.5: 16): `--frames all` reads at it."""
        return 8.0

    @property
    def text_length(self) -> int:
        return int(self.transformer_config.get("max_text_seq_length", 226))


def _resolve(model: str) -> Path:
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"--model {model} is a file; pass the checkpoint folder (the one with model_index.json)")
        return path
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
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
    if not tcfg.get("use_rotary_positional_embeddings", False):
        raise ModelError(
            f"{source} looks like CogVideoX-2B (no rotary position embeddings, "
            f"{tcfg.get('num_layers')} layers); cogedit supports CogVideoX-5B: pass --model THUDM/CogVideoX-5b"
        )
    if tcfg.get("patch_size_t") or tcfg.get("ofs_embed_dim"):
        raise ModelError(f"{source} is a CogVideoX 1.5 or image-to-video model; cogedit supports CogVideoX-5B text-to-video")
    vcfg = _read_json(path / "vae" / "config.json")
    scfg = _read_json(path / "scheduler" / "scheduler_config.json")
    identity = {
        part: {"config": _read_json(path / part / _CONFIG_FILES[part]), "weights": _weights_fingerprint(_weights(path / part))}
        for part in ("transformer", "vae", "text_encoder", "scheduler")
    }
    identity["tokenizer"] = sorted(
        [f.name, f.stat().st_size] for f in (path / "tokenizer").iterdir() if f.is_file()
    )
    return ModelInfo(
        source=source,
        path=path,
        key=stable_hash(identity),
        transformer_config=tcfg,
        vae_config=vcfg,
        scheduler_config=scfg,
        text_encoder_config=identity["text_encoder"]["config"],
    )


def builtin_5b() -> ModelInfo:
    """The CogVideoX-5B shape with no files behind it: enough to plan memory without a download."""
    from engine.models.configs import PARAMS_5B, SCHEDULER_5B, T5_XXL, TRANSFORMER_5B, VAE_5B

    vae = {"block_out_channels": [128, 256, 256, 512], "temporal_compression_ratio": 4, **VAE_5B}
    return ModelInfo("CogVideoX-5B (built-in shape)", Path("."), "0" * 32, TRANSFORMER_5B, vae, SCHEDULER_5B, T5_XXL, PARAMS_5B)
