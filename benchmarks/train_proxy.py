"""Train the proxy: a small CogVideoX that has learned Big Buck Bunny footage (engine/models/proxy.py).

    python benchmarks/train_proxy.py clips                       # cut engine/assets/clips (once)
    python benchmarks/train_proxy.py data --out data.safetensors  # decode them at 96x144 (needs decord)
    python benchmarks/train_proxy.py train --data data.safetensors --out engine/assets/proxy --minutes 7
    python benchmarks/train_proxy.py train --data data.safetensors --out /tmp/p --device cpu --minutes 0.2

`train` runs on a machine without decord: the frames come from `data`. It trains the VAE on
reconstruction, measures its latents' scale, then trains the transformer on those latents with
the v-prediction loss at uniform timesteps (captions through a frozen random T5, 10% dropped to
"" for CFG), and writes the CogVideoX-5b folder layout in fp16 with TRAINING.json beside it, a
PNG of samples drawn from noise, and the held-out loss against the random tiny model's. Seeded:
the same --vae-steps/--steps (TRAINING.json records them) give the same weights on one device.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.models.configs import SCHEDULER_5B, T5_XXL, TRANSFORMER_5B  # noqa: E402
from engine.models.proxy import PROXY_FRAMES, PROXY_HEIGHT, PROXY_WIDTH, proxy_defaults  # noqa: E402
from engine.models.tiny import TINY_TEXT_LEN, build_tiny_model, train_tokenizer, write_model_index  # noqa: E402
from engine.stages.encode import encode_frames  # noqa: E402
from engine.stages.vloss import heldout_loss, v_prediction_loss  # noqa: E402
from engine.video.clips import CLIPS, HELD_OUT  # noqa: E402

SOURCE = Path(__file__).resolve().parents[2] / "shared" / "videos" / "bigbuckbunny.mp4"
CLIP_SIZE = (192, 108)  # the source's 16:9 at a size the engine resizes from
VAE_FRAMES = 9  # 4k+1 frames per VAE training window
CAPTION_DROPOUT = 0.1
CHECK_EVERY = 100  # steps between two `good_enough` checks of `fit`
HIGH_T_FROM = 0.7  # `high_t_share` draws timesteps from the noisiest 30% of the schedule

VAE_CONFIG = dict(
    block_out_channels=(32, 32, 64, 64),  # 4 levels: 8x spatial compression, as 5B
    latent_channels=16,
    layers_per_block=1,
    norm_num_groups=8,
    temporal_compression_ratio=4,
    sample_height=PROXY_HEIGHT,
    sample_width=PROXY_WIDTH,
)
TRANSFORMER_CONFIG = {
    **TRANSFORMER_5B,
    "num_attention_heads": 6,
    "attention_head_dim": 32,
    "time_embed_dim": 128,
    "text_embed_dim": 128,
    "num_layers": 5,
    "sample_height": PROXY_HEIGHT // 8,
    "sample_width": PROXY_WIDTH // 8,
    "sample_frames": PROXY_FRAMES,
    "max_text_seq_length": TINY_TEXT_LEN,
}
T5_CONFIG = {**T5_XXL, "vocab_size": 200, "d_model": 128, "d_ff": 256, "d_kv": 32, "num_heads": 4, "num_layers": 2, "pad_token_id": 0, "eos_token_id": 1}


def cut_clips() -> None:
    """Cut each clip's frame range from the source into a small h264 mp4 (no audio)."""
    import imageio_ffmpeg

    for clip in CLIPS:
        clip.path.parent.mkdir(parents=True, exist_ok=True)
        end = clip.start + clip.frames - 1
        subprocess.run(
            [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-i", str(SOURCE),
             "-vf", f"select='between(n,{clip.start},{end})',setpts=N/25/TB,scale={CLIP_SIZE[0]}:{CLIP_SIZE[1]}:flags=area",
             "-an", "-c:v", "libx264", "-crf", "16", "-preset", "veryslow", "-pix_fmt", "yuv420p", "-r", "25",
             "-frames:v", str(clip.frames), "-map_metadata", "-1", "-fflags", "+bitexact", str(clip.path)],
            check=True,
        )
        print(clip.path, clip.path.stat().st_size)


def decode_clips(out: Path) -> None:
    """Every clip's frames at the proxy's size, as the engine decodes them, in one safetensors file."""
    from safetensors.torch import save_file

    from engine.video.reader import FrameSettings, read_frames

    tensors = {}
    for clip in CLIPS:
        frames, _ = read_frames(clip.path, FrameSettings(max_frames=clip.frames + 3, height=PROXY_HEIGHT, width=PROXY_WIDTH))
        tensors[clip.name] = frames.contiguous()
        print(clip.name, tuple(frames.shape))
    save_file(tensors, str(out))


def windows(frames: dict[str, torch.Tensor], length: int) -> torch.Tensor:
    """Every run of `length` consecutive training frames, and its mirror image: [N, length, 3, H, W] in [-1, 1]."""
    from engine.video.reader import to_model_input

    out = []
    for clip in CLIPS:
        if clip.held_out:
            continue
        x = to_model_input(frames[clip.name])
        out += [x[i : i + length] for i in range(len(x) - length + 1)]
    x = torch.stack(out)
    return torch.cat([x, x.flip(-1)])


def fit(name: str, module: torch.nn.Module, batch_loss, peak_lr: float, weight_decay: float, seconds: float, max_steps: int | None, log: dict,
        good_enough: Callable[[int], bool] | None = None, ema: float = 0.0) -> torch.nn.Module:
    """AdamW on `batch_loss()` until the time budget (or `max_steps`) is spent, or until
    `good_enough(step)` (asked every CHECK_EVERY steps) says so; the log gets the losses. With
    `ema` > 0 it returns the exponential moving average of the weights at that decay instead of the
    last ones (a diffusion model's samples are cleaner from the average of a short run's last steps)."""
    opt = torch.optim.AdamW(module.parameters(), lr=peak_lr, weight_decay=weight_decay)
    averaged = torch.optim.swa_utils.AveragedModel(module, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ema), use_buffers=True) if ema else None
    losses, step, start = [], 0, time.monotonic()
    while (max_steps is None and time.monotonic() - start < seconds) or (max_steps is not None and step < max_steps):
        if good_enough is not None and step and step % CHECK_EVERY == 0:
            module.eval()
            stop = good_enough(step)
            module.train()
            if stop:
                break
        progress = step / max_steps if max_steps else (time.monotonic() - start) / seconds
        set_lr(opt, peak_lr, step, progress)
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        if averaged is not None:
            averaged.update_parameters(module)
        losses.append(loss.item())
        step += 1
        if step % 500 == 0 or step == 1:
            print(f"{name} step {step} loss {np.mean(losses[-500:]):.4f} {time.monotonic() - start:.0f}s", flush=True)
    log[name] = {"steps": step, "seconds": round(time.monotonic() - start, 1), "loss_first": losses[0], "loss_last_100": float(np.mean(losses[-100:]))}
    if averaged is not None:
        module = averaged.module
    return module.eval().requires_grad_(False)


def train_vae(data: torch.Tensor, device: str, seconds: float, max_steps: int | None, log: dict, init: Path | None = None,
              good_enough: Callable[[torch.nn.Module, int], bool] | None = None):
    """Reconstruction (L1 + MSE) with a small KL term, on random 9-frame windows; from `init`'s
    weights (a VAE folder of this config) when given, else from scratch; `good_enough(vae, step)`
    may end it early (`fit`)."""
    from diffusers import AutoencoderKLCogVideoX

    if init is None:
        vae = AutoencoderKLCogVideoX(**VAE_CONFIG, scaling_factor=1.0)
    else:
        vae = AutoencoderKLCogVideoX.from_pretrained(init, torch_dtype=torch.float32, scaling_factor=1.0)
    vae = vae.to(device).train()

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(0, len(data), (8,))
        offset = random.randrange(data.shape[1] - VAE_FRAMES + 1)
        x = data[idx, offset : offset + VAE_FRAMES].to(device).permute(0, 2, 1, 3, 4)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=device != "cpu"):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample.float()
        return (recon - x).abs().mean() + ((recon - x) ** 2).mean() + 1e-6 * posterior.kl().mean()

    check = None if good_enough is None else (lambda step: good_enough(vae, step))
    return fit("vae", vae, batch_loss, 5e-4, 0.0, seconds, max_steps, log, check)


def set_lr(opt: torch.optim.Optimizer, peak: float, step: int, progress: float) -> None:
    """Linear warm-up over 100 steps, then cosine down to a tenth by the end of the budget."""
    lr = peak * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
    for group in opt.param_groups:
        group["lr"] = lr


def encode(vae, x: torch.Tensor, batch: int = 1) -> torch.Tensor:
    """[N, F, 3, H, W] -> latent modes [N, F', C, h, w] on the CPU (unscaled while the VAE's scaling
    factor is 1), `batch` windows at a time on the VAE's device."""
    return torch.cat([encode_frames(vae, chunk).float().cpu() for chunk in x.split(batch)])


def embed_captions(model_dir: Path, captions: list[str], device: str) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer, T5EncoderModel

    from engine.stages.embed import tokenize

    tokenizer = AutoTokenizer.from_pretrained(model_dir / "tokenizer")
    t5 = T5EncoderModel.from_pretrained(model_dir / "text_encoder", dtype=torch.float32).to(device).eval()
    ids = torch.cat([tokenize(tokenizer, c, TINY_TEXT_LEN) for c in captions])
    with torch.no_grad():  # 256 captions per call: the shapes proxy embeds thousands
        out = torch.cat([t5(chunk.to(device))[0] for chunk in ids.split(256)])
    return dict(zip(captions, out, strict=True))


def draw_timesteps(rows: int, count: int, high_t_share: float, device: str | torch.device) -> torch.Tensor:
    """One training timestep per row, uniform over the schedule's `count`, except that a
    `high_t_share` of the rows come from its noisiest part (t >= HIGH_T_FROM * count)."""
    t = torch.randint(0, count, (rows,), device=device)
    high = torch.randint(int(HIGH_T_FROM * count), count, (rows,), device=device)
    return torch.where(torch.rand(rows, device=device) < high_t_share, high, t)


def train_transformer(latents: torch.Tensor, captions: list[tuple[str, ...]], embeds: dict[str, torch.Tensor], device: str, seconds: float, max_steps: int | None, log: dict,
                      batch: int = 32, lr: float = 4e-4, weights: torch.Tensor | None = None, high_t_share: float = 0.0, ema: float = 0.0, patch_size: int = 2):
    """v-prediction on the 5B scheduler's zero-terminal-SNR schedule, `batch` windows a step, at
    uniform timesteps (`high_t_share`: `draw_timesteps`); `weights` ([N, F, 1, h, w] per window,
    v_prediction_loss's) weight the loss per latent cell; `ema` and `patch_size` as `fit`'s and the
    transformer config's (the 5B's patch is 2 latent cells a side)."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXTransformer3DModel

    transformer = CogVideoXTransformer3DModel(**{**TRANSFORMER_CONFIG, "patch_size": patch_size}).to(device).train()
    alphas = CogVideoXDDIMScheduler(**SCHEDULER_5B).alphas_cumprod.to(device)
    latents = latents.to(device)
    weights = None if weights is None else weights.to(device)

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(0, len(latents), (batch,))
        text = [random.choice(captions[i]) if random.random() > CAPTION_DROPOUT else "" for i in idx.tolist()]
        t = draw_timesteps(len(idx), len(alphas), high_t_share, device)
        noise = torch.randn_like(latents[idx])
        w = None if weights is None else weights[idx.to(weights.device)]
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=device != "cpu"):
            return v_prediction_loss(transformer, alphas, latents[idx], torch.stack([embeds[c] for c in text]), t, noise, w)

    return fit("transformer", transformer, batch_loss, lr, 0.01, seconds, max_steps, log, ema=ema)


@torch.no_grad()
def sample(model_dir: Path, captions: list[str], count: int, steps: int, device: str, seed: int = 0) -> np.ndarray:
    """Plain DDIM from noise with CFG 6 against "", `count` samples of each caption in one batch:
    uint8 frames [len(captions) * count, F, H, W, 3], caption by caption."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel

    from engine.models.denoiser import guided, predict, rotary_embeddings
    from engine.stages.decode import decode_latents

    transformer = CogVideoXTransformer3DModel.from_pretrained(model_dir / "transformer", torch_dtype=torch.float32).to(device)
    scheduler = CogVideoXDDIMScheduler.from_pretrained(model_dir / "scheduler")
    scheduler.set_timesteps(steps)
    embeds = embed_captions(model_dir, sorted({"", *captions}), device)
    rows = [c for c in captions for _ in range(count)]
    cond = torch.stack([embeds[""]] * len(rows) + [embeds[c] for c in rows])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((len(rows), (PROXY_FRAMES - 1) // 4 + 1, 16, PROXY_HEIGHT // 8, PROXY_WIDTH // 8), generator=g).to(device)
    rotary = rotary_embeddings(transformer, x.shape, 8, device)
    for t in scheduler.timesteps:
        v = guided(predict(transformer, torch.cat([x, x]), cond, t, rotary), 6.0, True)
        x = scheduler.step(v, t, x).prev_sample
    vae = AutoencoderKLCogVideoX.from_pretrained(model_dir / "vae", torch_dtype=torch.float32).to(device)
    return decode_latents(vae, x)


def save_grid(rows: list[np.ndarray], path: Path) -> None:
    """Rows of frames [F, H, W, 3] -> one PNG, every fourth frame of each row."""
    from PIL import Image

    grid = np.concatenate([np.concatenate(list(r[::4]), axis=1) for r in rows], axis=0)
    Image.fromarray(grid).save(path)


def train(args: argparse.Namespace) -> None:
    from safetensors.torch import load_file

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    began, log = time.monotonic(), {}
    frames = load_file(str(args.data))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = args.minutes * 60

    vae = train_vae(windows(frames, PROXY_FRAMES), args.device, budget * args.vae_share, args.vae_steps, log)
    clips17 = windows(frames, PROXY_FRAMES)
    modes = encode(vae, clips17)
    scaling = round(float(1.0 / modes.std()), 4)  # latents of unit variance, as 5B's 0.7 gives its VAE
    vae.register_to_config(scaling_factor=scaling)
    latents = modes * scaling

    # The frozen random T5 and the tokenizer first: the captions' embeddings feed the training.
    from diffusers import CogVideoXDDIMScheduler
    from transformers import T5Config, T5EncoderModel

    T5EncoderModel(T5Config(**T5_CONFIG)).half().save_pretrained(out / "text_encoder", safe_serialization=True)
    train_tokenizer(out / "tokenizer")
    per_window = [c.captions for c in CLIPS if not c.held_out for _ in range(c.frames - PROXY_FRAMES + 1)] * 2
    embeds = embed_captions(out, sorted({c for caps in per_window for c in caps} | {""}), args.device)
    transformer = train_transformer(latents, per_window, embeds, args.device, budget - (time.monotonic() - began), args.steps, log)

    transformer.half().save_pretrained(out / "transformer", safe_serialization=True)
    vae.half().save_pretrained(out / "vae", safe_serialization=True)
    CogVideoXDDIMScheduler(**SCHEDULER_5B).save_pretrained(out / "scheduler")
    write_model_index(out, proxy_defaults("bunny"))
    minutes = (time.monotonic() - began) / 60

    # What it learned: held-out v-loss against the random tiny model's, and samples from noise.
    from engine.video.reader import to_model_input

    held = to_model_input(frames[HELD_OUT.name][:PROXY_FRAMES])
    caption = HELD_OUT.captions[0]
    with tempfile.TemporaryDirectory() as tmp:
        random_loss = heldout_loss(build_tiny_model(Path(tmp) / "tiny"), held, caption, device=args.device)
    proxy_loss = heldout_loss(out, held, caption, device=args.device)
    train_caption = CLIPS[0].captions[0]
    samples = sample(out, [train_caption], 2, 50, args.device)
    reference = ((clips17[0].permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    save_grid([reference, *samples], Path(args.samples))

    params = {
        part: sum(p.numel() for p in m.parameters())
        for part, m in (("transformer", transformer), ("vae", vae), ("text_encoder", T5EncoderModel.from_pretrained(out / "text_encoder")))
    }
    facts = {
        "what": "cogedit's proxy: a small CogVideoX trained on Big Buck Bunny (CC-BY 3.0 (c) Blender Foundation); its numbers are not CogVideoX-5B's",
        "trained_on": [f"{c.name}: source frames {c.start}-{c.start + c.frames - 1}" for c in CLIPS if not c.held_out],
        "held_out": f"{HELD_OUT.name}: source frames {HELD_OUT.start}-{HELD_OUT.start + HELD_OUT.frames - 1}",
        "size": [PROXY_FRAMES, PROXY_HEIGHT, PROXY_WIDTH],
        "params": params,
        "params_total": sum(params.values()),
        "weights_dtype": "float16",
        "vae_scaling_factor": scaling,
        "training_minutes": round(minutes, 2),
        **log,
        "heldout_v_loss": {"proxy": proxy_loss, "random_tiny": random_loss, "ratio": proxy_loss / random_loss, "caption": caption},
        "samples": {"caption": train_caption, "steps": 50, "guidance": 6.0, "png": Path(args.samples).name},
        "seed": args.seed,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
    }
    (out / "TRAINING.json").write_text(json.dumps(facts, indent=2))
    print(json.dumps(facts, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("clips", help="cut the clips from shared/videos/bigbuckbunny.mp4")
    data = sub.add_parser("data", help="decode the clips at the proxy's size")
    data.add_argument("--out", type=Path, required=True)
    tr = sub.add_parser("train", help="train and write the checkpoint")
    tr.add_argument("--data", type=Path, required=True)
    tr.add_argument("--out", type=Path, required=True)
    tr.add_argument("--samples", type=Path, default=Path("proxy_samples.png"))
    tr.add_argument("--device", default="cuda")
    tr.add_argument("--minutes", type=float, default=7.0, help="wall-clock budget of the training")
    tr.add_argument("--vae-share", type=float, default=0.35, help="fraction of the budget for the VAE")
    tr.add_argument("--vae-steps", type=int, default=None, help="fixed VAE steps instead of the time budget")
    tr.add_argument("--steps", type=int, default=None, help="fixed transformer steps instead of the time budget")
    tr.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.command == "clips":
        cut_clips()
    elif args.command == "data":
        decode_clips(args.out)
    else:
        train(args)


if __name__ == "__main__":
    main()
