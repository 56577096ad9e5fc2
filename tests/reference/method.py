"""cogedit's method written out from the papers, plainly and slowly, to test the engine against.

Nothing here imports `engine`: the model folder is loaded with diffusers and transformers as a
user would, the noise schedule is computed from the scheduler's config, and attention runs in
this module's own processor. One prompt, one CFG half, one forward at a time; no caches, no
batching tricks. The equations:

- Schedule (CogVideoX): scaled-linear betas, alpha_bar = cumprod(1 - beta), the SNR shift
  alpha_bar / (s + (1 - s) alpha_bar), then zero terminal SNR (Lin et al. 2024, algorithm 1);
  below timestep 0 alpha_bar is 1 (`set_alpha_to_one`). "Trailing" timesteps: T-1, T-1-T/N, ...
- v-prediction (Salimans & Ho 2022), x at level a: x0 = sqrt(a) x - sqrt(1-a) v,
  eps = sqrt(a) v + sqrt(1-a) x.
- DDIM (Song et al. 2021, eq. 12, eta 0) from level a to a': x' = sqrt(a') x0 + sqrt(1-a') eps.
  Sampling walks the timesteps down; inversion walks them up, evaluating v at the step's larger
  timestep on the latent it starts from (the less noisy one).
- Classifier-free guidance (Ho & Salimans 2022): v = v_u + w (v_c - v_u).
- Fixed-point inversion (Pan et al. 2023, AIDI; Garibi et al. 2024, ReNoise): the sampling step
  from t to s is x_s = a x_t + b v(x_t), so x_t solves x = (x_s - b v(x)) / a; iterate from the DDIM
  result, keep the iterate with the smallest residual |F(x) - x| / |x| and stop when it stops
  shrinking (cogedit's documented guard: never worse than plain DDIM).
- Reference attention injection: in the chosen blocks the edit row's queries attend to its own
  keys/values followed by the reference row's, with log(strength) added to the reference logits.
  The shared reference row is the inversion's own forward at t (its input latent, the source
  prompt); upstream's per-half rows take the inverted latent at t's noise level and the edit
  row's own prompt. Stored attention replays the shared row's keys/values, so it is the shared row.
- Blended latent diffusion (Avrahami et al. 2023): after each step x = m x_edit + (1 - m) x_src,
  x_src the inversion's latent at the same noise level; a pixel mask reaches the latent grid as
  the union of the frames each latent frame encodes (frame 0 alone, then frames 4k-3..4k), the
  share of each cell's pixels, and a one-cell soft edge outside (a [1, 2, 1] / 4 blur, kept where larger).
- Negative-prompt inversion (Miyake et al. 2023): invert without guidance, edit with the source
  prompt as the negative prompt (the test passes the source's embedding as `uncond`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Injection:
    """What every block's processor does on this forward: with `on`, the batch is [edit row,
    reference row] and the chosen blocks (`layers`, None = all) inject with `log_bias`."""

    on: bool = False
    layers: tuple[int, ...] | None = None
    log_bias: float = 0.0


@dataclass
class Model:
    transformer: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    vae: torch.nn.Module
    alpha_bar: torch.Tensor  # float64 [T]
    alpha_below_zero: float
    injection: Injection = field(default_factory=Injection)


@dataclass(frozen=True)
class Edit:
    """An edit's settings, as the method names them."""

    guidance: float = 6.0
    window: tuple[float, float] = (0.0, 1.0)  # fraction of the sampling steps, from the noisy end
    layers: tuple[int, ...] | None = None
    strength: float = 1.0
    reference: str = "shared"  # shared (and stored) | per-half


def load(folder: str | Path) -> Model:
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import AutoTokenizer, T5EncoderModel

    folder = Path(folder)
    transformer = CogVideoXTransformer3DModel.from_pretrained(folder, subfolder="transformer").eval()
    injection = Injection()
    for i, block in enumerate(transformer.transformer_blocks):
        block.attn1.set_processor(JoinedAttention(i, injection))
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    alpha_bar, below_zero = schedule(config)
    return Model(
        transformer,
        T5EncoderModel.from_pretrained(folder, subfolder="text_encoder").eval(),
        AutoTokenizer.from_pretrained(folder / "tokenizer"),
        AutoencoderKLCogVideoX.from_pretrained(folder, subfolder="vae").eval(),
        alpha_bar,
        below_zero,
        injection,
    )


def schedule(config: dict) -> tuple[torch.Tensor, float]:
    """alpha_bar for every training timestep, and its value below timestep 0."""
    assert config["beta_schedule"] == "scaled_linear" and config["prediction_type"] == "v_prediction"
    assert config["timestep_spacing"] == "trailing" and not config["clip_sample"]
    n = config["num_train_timesteps"]
    betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)
    shift = config["snr_shift_scale"]
    alpha_bar = alpha_bar / (shift + (1 - shift) * alpha_bar)
    if config["rescale_betas_zero_snr"]:
        root = alpha_bar.sqrt()
        first, last = root[0].clone(), root[-1].clone()
        alpha_bar = ((root - last) * first / (first - last)) ** 2
    return alpha_bar, 1.0 if config["set_alpha_to_one"] else alpha_bar[0].item()


def timesteps(m: Model, steps: int) -> list[int]:
    """The sampling timesteps, noisiest first; the level after the last one is -1 (clean)."""
    n = len(m.alpha_bar)
    assert n % steps == 0, "the reference takes step counts that divide the training timesteps"
    return [n - 1 - i * (n // steps) for i in range(steps)]


def alpha(m: Model, level: int) -> float:
    return m.alpha_bar[level].item() if level >= 0 else m.alpha_below_zero


def ddim(x: torch.Tensor, v: torch.Tensor, a_from: float, a_to: float) -> torch.Tensor:
    """One DDIM step (eta 0) of a v-prediction model, from noise level a_from to a_to."""
    x0 = a_from**0.5 * x - (1 - a_from) ** 0.5 * v
    eps = a_from**0.5 * v + (1 - a_from) ** 0.5 * x
    return a_to**0.5 * x0 + (1 - a_to) ** 0.5 * eps


def embed(m: Model, prompt: str) -> torch.Tensor:
    length = m.transformer.config.max_text_seq_length
    ids = m.tokenizer(prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return m.text_encoder(ids)[0]


def encode(m: Model, frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames [F, H, W, 3] -> latents [1, F', C, h, w]: the VAE posterior's mode, scaled."""
    x = (frames.float() / 127.5 - 1).permute(3, 0, 1, 2)[None]
    with torch.no_grad():
        z = m.vae.encode(x).latent_dist.mode() * m.vae.config.scaling_factor
    return z.permute(0, 2, 1, 3, 4)


def _rope_tables(m: Model, latent_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """CogVideoX-5B's 3D RoPE: the token grid resized into the training grid, centred."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    cfg = m.transformer.config
    _, frames, _, h, w = latent_shape
    grid = (h // cfg.patch_size, w // cfg.patch_size)
    crops = get_resize_crop_region_for_grid(grid, cfg.sample_width // cfg.patch_size, cfg.sample_height // cfg.patch_size)
    return get_3d_rotary_pos_embed(cfg.attention_head_dim, crops, grid, frames)


def _rope(x: torch.Tensor, text: int, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate consecutive pairs of the image tokens' channels: (x1, x2) -> x cos + (-x2, x1) sin."""
    cos, sin = tables
    image = x[:, :, text:]
    first, second = image.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-second, first], -1).flatten(-2)
    return torch.cat([x[:, :, :text], image * cos + rotated * sin], 2)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    return logits.softmax(-1) @ v


class JoinedAttention:
    """CogVideoX self-attention over text and image tokens joined (projections, per-head layer
    norms of q and k, RoPE on image tokens), with reference injection: when injecting, row 0
    attends to its own keys/values followed by row 1's, log(strength) added to row 1's logits,
    and row 1 attends to itself."""

    def __init__(self, block: int, injection: Injection) -> None:
        self.block, self.injection = block, injection

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        text = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], 1)

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

        q, k, v = heads(attn.to_q(x)), heads(attn.to_k(x)), heads(attn.to_v(x))
        q, k = _rope(attn.norm_q(q), text, image_rotary_emb), _rope(attn.norm_k(k), text, image_rotary_emb)
        inj = self.injection
        if inj.on and (inj.layers is None or self.block in inj.layers):
            bias = torch.zeros(2 * k.shape[2])
            bias[k.shape[2] :] = inj.log_bias
            edit = _attention(q[:1], torch.cat([k[:1], k[1:]], 2), torch.cat([v[:1], v[1:]], 2), bias)
            out = torch.cat([edit, _attention(q[1:], k[1:], v[1:])])
        else:
            out = _attention(q, k, v)
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2)))
        return out[:, text:], out[:, :text]


def velocity(m: Model, x: torch.Tensor, embeds: torch.Tensor, t: int, reference: tuple[torch.Tensor, torch.Tensor] | None = None, edit: Edit | None = None) -> torch.Tensor:
    """The model's v for one latent row; with `reference` (latent, embedding) injected as `edit` says."""
    rows, cond = (x, embeds) if reference is None else (torch.cat([x, reference[0]]), torch.cat([embeds, reference[1]]))
    if reference is not None:
        m.injection.on, m.injection.layers, m.injection.log_bias = True, edit.layers, math.log(edit.strength)
    try:
        with torch.no_grad():
            out = m.transformer(
                hidden_states=rows,
                encoder_hidden_states=cond,
                timestep=torch.full((len(rows),), t, dtype=torch.long),
                image_rotary_emb=_rope_tables(m, x.shape),
                return_dict=False,
            )[0]
    finally:
        m.injection.on = False
    return out[:1].float()


def _guided(u: torch.Tensor | None, c: torch.Tensor, w: float) -> torch.Tensor:
    return c if u is None else u + w * (c - u)


def _fixed_point(v_at, x_s: torch.Tensor, x_t: torch.Tensor, a: float, b: float, iters: int, tol: float = 1e-4) -> torch.Tensor:
    x, best, best_r, last_r = x_t, x_t, math.inf, math.inf
    for k in range(iters + 1):
        proposal = (x_s - b * v_at(x)) / a
        r = ((proposal - x).norm() / x.norm()).item()
        if r <= best_r:
            best, best_r = x, r
        if r >= last_r or r < tol or k == iters:
            break
        x, last_r = proposal, r
    return best


def invert(m: Model, clean: torch.Tensor, cond: torch.Tensor, steps: int, uncond: torch.Tensor | None = None, guidance: float = 1.0, iters: int = 0) -> dict[int, torch.Tensor]:
    """{noise level: latent}: the clean latent at level -1 and the inversion's latent at each timestep."""
    levels, x, s = {-1: clean}, clean, -1
    for t in reversed(timesteps(m, steps)):

        def v_at(y: torch.Tensor, t: int = t) -> torch.Tensor:
            return _guided(velocity(m, y, uncond, t) if uncond is not None else None, velocity(m, y, cond, t), guidance)

        a_s, a_t = alpha(m, s), alpha(m, t)
        y = ddim(x, v_at(x), a_s, a_t)
        if iters:
            # the sampling step t -> s as x_s = a x_t + b v(x_t), from the DDIM equations above
            a = (a_s * a_t) ** 0.5 + ((1 - a_s) * (1 - a_t)) ** 0.5
            b = ((1 - a_s) * a_t) ** 0.5 - (a_s * (1 - a_t)) ** 0.5
            y = _fixed_point(v_at, x, y, a, b, iters)
        levels[t], x, s = y, y, t
    return levels


def edit(
    m: Model, levels: dict[int, torch.Tensor], cond: torch.Tensor, source: torch.Tensor, settings: Edit,
    uncond: torch.Tensor | None = None, mask: torch.Tensor | None = None, init: torch.Tensor | None = None,
) -> torch.Tensor:
    """One prompt's edited latent from the inversion `levels`; `source` embeds the source prompt,
    `uncond` (with guidance > 1) the negative prompt, `mask` [F', 1, h, w] makes it local."""
    steps = len(levels) - 1
    ts = timesteps(m, steps)
    start, end = (round(f * steps) for f in settings.window)
    x = levels[ts[0]] if init is None else init
    cfg = uncond is not None and settings.guidance > 1
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < steps else -1
        injects = settings.strength > 0 and settings.layers != () and start <= i < end
        halves = [uncond, cond] if cfg else [cond]
        if not injects:
            v = [velocity(m, x, e, t) for e in halves]
        elif settings.reference == "shared":
            v = [velocity(m, x, e, t, (levels[s], source), settings) for e in halves]
        else:
            v = [velocity(m, x, e, t, (levels[t], e), settings) for e in halves]
        x = ddim(x, _guided(v[0], v[1], settings.guidance) if cfg else v[0], alpha(m, t), alpha(m, s))
        if mask is not None:
            x = mask * x + (1 - mask) * levels[s]
    return x


def box_pixels(box: tuple[float, float, float, float], frames: int, height: int, width: int) -> torch.Tensor:
    """A box in fractions of the frame as a pixel mask [F, H, W]: 1 where the pixel's centre is inside."""
    x0, y0, x1, y1 = box
    ys, xs = (torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width
    inside = ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None]
    return inside.float().expand(frames, -1, -1)


def latent_mask(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel mask [F, H, W] (F = 4k+1) -> latent mask [F', 1, h, w] (module docstring)."""
    frames = pixels.shape[0]
    groups = [pixels[0:1]] + [pixels[4 * k - 3 : 4 * k + 1] for k in range(1, (frames - 1) // 4 + 1)]
    union = torch.stack([g.max(0).values for g in groups])
    n, big_h, big_w = union.shape
    cells = union.reshape(n, height, big_h // height, width, big_w // width).mean((2, 4))
    padded = torch.nn.functional.pad(cells[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    weights = (0.25, 0.5, 0.25)
    blurred = sum(weights[dy] * weights[dx] * padded[:, dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3))
    return torch.maximum(cells, blurred).clamp(0, 1)[:, None]
