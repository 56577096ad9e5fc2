"""The v-prediction loss the proxies are trained on and judged by (benchmarks/train_proxy.py, tests)."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.models.denoiser import rotary_embeddings
from engine.stages.embed import tokenize
from engine.stages.encode import encode_frames


def v_prediction_loss(
    transformer: torch.nn.Module,
    alphas_cumprod: torch.Tensor,
    latents: torch.Tensor,
    embeds: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error of the predicted velocity v = sqrt(a) eps - sqrt(1-a) x0 (Salimans & Ho 2022).

    latents [B, F, C, h, w] (already times the VAE's scaling factor), embeds [B, tokens, dim],
    one timestep per row. This is the loss the proxy was trained on. `weights` (broadcast to the
    latents, e.g. [B, F, 1, h, w]) makes it a weighted mean: some latent cells count more."""
    a = alphas_cumprod.to(latents.device, latents.dtype)[timesteps].view(-1, 1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    target = a.sqrt() * noise - (1 - a).sqrt() * latents
    rotary = rotary_embeddings(transformer, latents.shape, 8, latents.device)
    v = transformer(hidden_states=noisy, encoder_hidden_states=embeds, timestep=timesteps, image_rotary_emb=rotary, return_dict=False)[0]
    error = (v.float() - target.float()) ** 2
    if weights is None:
        return error.mean()
    weights = weights.to(error).expand_as(error)
    return (weights * error).sum() / weights.sum()


@torch.no_grad()
def heldout_loss(model: str | Path, frames: torch.Tensor, caption: str, draws: int = 8, seed: int = 0, device: str = "cpu") -> float:
    """A model folder's v-prediction loss on frames [F, 3, H, W] in [-1, 1], at `draws` timesteps
    drawn uniformly (seeded, with seeded noise): the measure of how much the proxy has learned."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    from transformers import AutoTokenizer, T5EncoderModel


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
