"""The VAE tiles only where diffusers' tiled encode gives the untiled latent grid."""

from __future__ import annotations

import torch

from engine.models.components import exact_tiling
from engine.models.configs import VAE_5B
from engine.models.proxy import PROXY_DIR


def test_tiling_is_kept_for_5b_and_refused_for_the_proxy():
    from diffusers import AutoencoderKLCogVideoX

    with torch.device("meta"):
        big = AutoencoderKLCogVideoX(**VAE_5B)
    assert exact_tiling(big)  # 480x720 tiles: the memory saving stays where it matters

    proxy = AutoencoderKLCogVideoX.from_pretrained(PROXY_DIR, subfolder="vae")
    assert not exact_tiling(proxy)
    proxy.enable_tiling()  # what the check prevents: a latent one column too wide
    assert proxy.encode(torch.zeros(1, 3, 1, 96, 144)).latent_dist.mode().shape[-1] == 19
