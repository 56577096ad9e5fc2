"""The trained proxy: a small CogVideoX that has learned Big Buck Bunny footage.

Random tiny weights show that the workflow runs, not whether an edit or an inversion is any
good. The proxy is trained by `benchmarks/train_proxy.py` on the clips below (all cut from one
shot of Big Buck Bunny, CC-BY 3.0 (c) Blender Foundation) and ships in `assets/proxy/` in the
CogVideoX-5b folder layout, so the engine loads it like the real model. Its numbers are the
proxy's, never CogVideoX-5B's.

    assets/
    ├── clips/<name>.mp4     192x108, 25 fps, cut from shared/videos/bigbuckbunny.mp4
    └── proxy/               model_index.json, transformer/, vae/, text_encoder/, tokenizer/,
                             scheduler/, TRAINING.json (how it was trained)
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.errors import ModelError

ASSETS = Path(__file__).resolve().parent / "assets"
PROXY_DIR = ASSETS / "proxy"
CLIPS_DIR = ASSETS / "clips"

# The size the proxy was trained at (17 frames = 5 latent frames of 12x18).
PROXY_FRAMES, PROXY_HEIGHT, PROXY_WIDTH = 17, 96, 144


@dataclass(frozen=True)
class Clip:
    """A time range of bigbuckbunny.mp4 shipped as its own small mp4, with honest captions."""

    name: str
    start: int  # first source frame
    frames: int
    captions: tuple[str, ...]
    held_out: bool = False  # never shown to the proxy while training

    @property
    def path(self) -> Path:
        return CLIPS_DIR / f"{self.name}.mp4"


# One continuous shot: a big grey rabbit climbs out of his burrow under a tree on a grassy hill,
# stands up and stretches. Frames 91-98 are left out so the held-out range doesn't touch training.
CLIPS = (
    Clip("bunny_burrow", 0, 33, (
        "a big grey rabbit climbs out of a burrow in a grassy hill",
        "a cartoon rabbit crawls out of a hole under a tree, green grass, sunny day",
    )),
    Clip("bunny_rise", 33, 33, (
        "a big grey rabbit stands up in front of his burrow on a grassy hill",
        "a fat cartoon rabbit gets up beside a tree, green grass and rocks, sunny day",
    )),
    Clip("bunny_stretch", 66, 25, (
        "a big grey rabbit stretches his arms in front of a burrow on a grassy hill",
        "a fat cartoon rabbit stretches beside a tree, green grass, sunny day",
    )),
    Clip("bunny_heldout", 99, 33, (
        "a big grey rabbit stretches an arm up in front of a burrow on a grassy hill",
    ), held_out=True),
)
HELD_OUT = next(c for c in CLIPS if c.held_out)


def write_proxy_model(path: str | Path) -> Path:
    """Copy the trained proxy checkpoint to `path` (a folder in the CogVideoX-5b layout) and return it."""
    if not (PROXY_DIR / "model_index.json").exists():
        raise ModelError(
            f"the trained proxy is missing from {PROXY_DIR}; reinstall cogedit, or train it with "
            "`python benchmarks/train_proxy.py train --out engine/assets/proxy` on a GPU"
        )
    path = Path(path)
    shutil.copytree(PROXY_DIR, path, dirs_exist_ok=True)
    return path


def v_prediction_loss(
    transformer: torch.nn.Module,
    alphas_cumprod: torch.Tensor,
    latents: torch.Tensor,
    embeds: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Mean squared error of the predicted velocity v = sqrt(a) eps - sqrt(1-a) x0 (Salimans & Ho 2022).

    latents [B, F, C, h, w] (already times the VAE's scaling factor), embeds [B, tokens, dim],
    one timestep per row. This is the loss the proxy was trained on."""
    from engine.denoiser import rotary_embeddings

    a = alphas_cumprod.to(latents.device, latents.dtype)[timesteps].view(-1, 1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    target = a.sqrt() * noise - (1 - a).sqrt() * latents
    rotary = rotary_embeddings(transformer, latents.shape, 8, latents.device)
    v = transformer(hidden_states=noisy, encoder_hidden_states=embeds, timestep=timesteps, image_rotary_emb=rotary, return_dict=False)[0]
    return torch.nn.functional.mse_loss(v.float(), target.float())


@torch.no_grad()
def heldout_loss(model: str | Path, frames: torch.Tensor, caption: str, draws: int = 8, seed: int = 0, device: str = "cpu") -> float:
    """A model folder's v-prediction loss on frames [F, 3, H, W] in [-1, 1], at `draws` timesteps
    drawn uniformly (seeded, with seeded noise): the measure of how much the proxy has learned."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    from transformers import AutoTokenizer, T5EncoderModel

    from engine.embed import tokenize
    from engine.encode import encode_frames

    vae = AutoencoderKLCogVideoX.from_pretrained(model, subfolder="vae", torch_dtype=torch.float32).to(device)
    latents = encode_frames(vae, frames)
    del vae
    transformer = CogVideoXTransformer3DModel.from_pretrained(model, subfolder="transformer", torch_dtype=torch.float32).to(device)
    tokenizer = AutoTokenizer.from_pretrained(model, subfolder="tokenizer")
    t5 = T5EncoderModel.from_pretrained(model, subfolder="text_encoder", dtype=torch.float32).to(device)
    embeds = t5(tokenize(tokenizer, caption, transformer.config.max_text_seq_length).to(device))[0]
    alphas = CogVideoXDDIMScheduler.from_pretrained(model, subfolder="scheduler").alphas_cumprod
    g = torch.Generator().manual_seed(seed)
    timesteps = torch.randint(0, len(alphas), (draws,), generator=g)
    noise = torch.randn((draws, *latents.shape[1:]), generator=g)
    loss = v_prediction_loss(
        transformer, alphas, latents.expand(draws, -1, -1, -1, -1), embeds.expand(draws, -1, -1), timesteps.to(device), noise.to(device)
    )
    return float(loss)
