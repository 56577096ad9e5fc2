"""Train the shapes proxy: a small CogVideoX that has learned the shapes world (engine/video/shapes.py).

    python benchmarks/train_shapes.py --out $OUT --device cuda --minutes 8.5        # the shipped proxy (one H200)
    python benchmarks/train_shapes.py --out /tmp/s --device cpu --clips 48 --vae-clips 8 \\
        --vae-steps 2 --steps 2 --eval-clips 2 --sample-captions 1 --sample-steps 3     # try it out on a CPU

One command does everything, for a machine without network or ffmpeg: worker processes draw the
training clips (seeded, `--clips` of them, held-out color x shape pairs never among them) while
the VAE trains on the first ones, starting from the Big Buck Bunny proxy's VAE (same config),
until it reconstructs held-out clips well enough (VAE_PSNR_DB and VAE_COLOR_RIGHT, checked every
100 steps; at most --vae-seconds); then it encodes every clip and trains the transformer with the
v-prediction loss on their captions (the fit loop, VAE, T5 and transformer configs of
benchmarks/train_proxy.py) for the rest of the budget, and measures what it learned: the held-out
v-loss against the random tiny model's, and samples drawn from noise under captions of held-out
combinations, judged by benchmarks/shape_measures.py.

Why the transformer's recipe differs from the bunny proxy's (the first shapes proxy, trained with
it, followed its caption's color on 4% of samples): a clip's object covers 3-5% of its pixels,
and where it is and what color it has are decided at the noisiest timesteps (t >= ~800 of the
zero-terminal-SNR schedule, where its latent cells are barely above the noise); at uniform
timesteps with a plain mean, the caption's color moves well under 1% of the loss. So the loss
weights the latent cells an object touches 1 + `--object-weight` (5) times (the world's masks are
exact), and `--high-t-share` of each batch is drawn from t >= 700. It writes into --out:

    shapes_proxy.tar       the model in the CogVideoX-5b folder layout (fp16), TRAINING.json inside
    shapes_training.json   the same numbers as TRAINING.json
    shapes_samples.png     samples from noise: one row per held-out caption (every fourth frame)

Unpack the tar into engine/assets/shapes/ to ship it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.shape_measures import EDGE, color_index, erode, nearest, sample_adherence  # noqa: E402
from benchmarks.train_proxy import CAPTION_DROPOUT, T5_CONFIG, embed_captions, encode, sample, save_grid, train_transformer, train_vae  # noqa: E402
from engine.models.configs import SCHEDULER_5B  # noqa: E402
from engine.models.proxy import PROXY_DIR, proxy_defaults  # noqa: E402
from engine.models.tiny import build_tiny_model, train_tokenizer, write_model_index  # noqa: E402
from engine.stages.verify import psnr_db  # noqa: E402
from engine.stages.vloss import heldout_loss  # noqa: E402
from engine.video import shapes  # noqa: E402
from engine.video.reader import to_model_input  # noqa: E402

ENCODE_BATCH = 64
CHUNK = 64  # clips a drawing worker returns at once
VAE_CHECK_CLIPS = 4  # held-out clips the VAE's reconstruction is checked on
VAE_PSNR_DB = 30.0  # the VAE is good enough at this mean PSNR on them (the first shapes VAE: 29.1-33.5 dB)
VAE_COLOR_RIGHT = 0.98  # and this share of their objects' pixels nearest the right color (it: 0.98-1.0)


def latent_cells(masks: np.ndarray) -> np.ndarray:
    """bool [F', H/8, W/8]: the latent cells any object touches, from a clip's masks [objects, F, H, W]
    (the VAE keeps frame 0 alone and folds each next 4 frames into one latent frame; 8x8 pixels a cell)."""
    seen = masks.any(0)
    frames = np.stack([seen[0], *(seen[i : i + 4].any(0) for i in range(1, len(seen), 4))])
    f, h, w = frames.shape
    return frames.reshape(f, h // 8, 8, w // 8, 8).any((2, 4))


def draw(seeds: list[int], split: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """uint8 frames [N, F, H, W, 3], captions and latent cells with an object [N, F', h, w] of the clips of `seeds`."""
    specs = [shapes.clip_spec(s, split) for s in seeds]
    drawn = [shapes.render(s) for s in specs]
    return np.stack([d[0] for d in drawn]), [s.caption for s in specs], np.stack([latent_cells(d[1]) for d in drawn])


def start_drawing(seeds: list[int], split: str, pool: ProcessPoolExecutor) -> list[Future]:
    """`draw` over `pool`, CHUNK seeds a task, in order: the clips are drawn while the VAE trains."""
    return [pool.submit(draw, seeds[i : i + CHUNK], split) for i in range(0, len(seeds), CHUNK)]


def drawing_pool(workers: int) -> ProcessPoolExecutor:
    """Processes of one torch thread each: render's texture upsampling with torch's default thread
    count in every worker would put workers x cores threads on the machine's cores."""
    return ProcessPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,))


def model_input(frames: np.ndarray, device: str = "cpu") -> torch.Tensor:
    """uint8 [N, F, H, W, 3] -> float32 [N, F, 3, H, W] in [-1, 1] on `device`: to_model_input over N
    clips (converted there: the uint8 frames are a quarter of the bytes to move)."""
    return to_model_input(torch.from_numpy(frames).to(device).flatten(0, 1)).unflatten(0, frames.shape[:2])


def vae_good_enough(device: str, history: list[dict], clips: int = VAE_CHECK_CLIPS) -> Callable[[torch.nn.Module, int], bool]:
    """`train_vae`'s early stop: the VAE reconstructs the first `clips` held-out clips at VAE_PSNR_DB and
    their objects' colors (VAE_COLOR_RIGHT); each check goes into `history`."""
    specs = [shapes.clip_spec(s, "heldout") for s in range(clips)]
    drawn = [shapes.render(s) for s in specs]
    source = torch.from_numpy(np.stack([d[0] for d in drawn]))
    x = model_input(source.numpy(), device).permute(0, 2, 1, 3, 4)
    cores = [erode(d[1][0], EDGE) for d in drawn]

    @torch.no_grad()
    def check(vae: torch.nn.Module, step: int) -> bool:
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
        frames = ((recon.permute(0, 2, 3, 4, 1) + 1) * 127.5).round().clamp(0, 255).cpu()
        psnr = float(np.mean([psnr_db(f, s) for f, s in zip(frames, source, strict=True)]))
        right = float(np.mean([(nearest(f.numpy())[core] == color_index(spec.things[0].color)).mean() for f, core, spec in zip(frames, cores, specs, strict=True)]))
        history.append({"step": step, "psnr_db": round(psnr, 2), "object_color_right": round(right, 4)})
        print(f"vae check at step {step}: {psnr:.1f} dB, object color right {right:.3f}", flush=True)
        return psnr >= VAE_PSNR_DB and right >= VAE_COLOR_RIGHT

    return check


def measure_samples(model_dir: Path, count: int, per_caption: int, steps: int, device: str, split: str) -> tuple[dict, list[np.ndarray]]:
    """Samples from noise (plain DDIM, CFG 6) under one-object captions of `split`, judged per frame."""
    specs = [shapes.clip_spec(seed, split) for seed in shapes.one_object_seeds(count, split)]
    videos = list(sample(model_dir, [s.caption for s in specs], per_caption, steps, device))
    things = [s.things[0] for s in specs for _ in range(per_caption)]
    rows = [{"caption": specs[i // per_caption].caption, "sample": i % per_caption, **sample_adherence(v, t.color, t.shape)}
            for i, (v, t) in enumerate(zip(videos, things, strict=True))]
    summary = {
        "captions": count, "samples_per_caption": per_caption, "steps": steps, "guidance": 6.0,
        "color_frames": float(np.mean([r["color_frames"] for r in rows])),
        "shape_frames": float(np.mean([r["shape_frames"] for r in rows])),
        "samples_color_on_most_frames": float(np.mean([r["color_frames"] > 0.5 for r in rows])),
        "samples_shape_on_most_frames": float(np.mean([r["shape_frames"] > 0.5 for r in rows])),
        "rows": rows,
    }
    return summary, videos


def write(model: Path, out: Path, facts: dict) -> None:
    """TRAINING.json into the model, the model into one tar, the numbers beside it."""
    (model / "TRAINING.json").write_text(json.dumps(facts, indent=2))
    (out / "shapes_training.json").write_text(json.dumps(facts, indent=2))
    with tarfile.open(out / "shapes_proxy.tar", "w") as tar:
        tar.add(model, arcname="shapes")


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    began, log = time.monotonic(), {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="shapes-proxy-"))
    model = work / "shapes"
    budget = args.minutes * 60

    # 1. The VAE, on the pixels of the first clips (from the bunny proxy's VAE: it already encodes),
    #    while the workers draw the rest.
    with drawing_pool(args.workers) as pool:
        chunks = start_drawing(list(range(args.clips)), "train", pool)
        vae_pixels = np.concatenate([c.result()[0] for c in chunks[: -(-args.vae_clips // CHUNK)]])[: args.vae_clips]
        log["vae_clips_seconds"] = round(time.monotonic() - began, 1)
        vae_checks: list[dict] = []
        vae = train_vae(model_input(vae_pixels, args.device), args.device, args.vae_seconds, args.vae_steps, log, init=PROXY_DIR / "vae",
                        good_enough=vae_good_enough(args.device, vae_checks))
        log["vae"]["checks"] = vae_checks
        del vae_pixels

        # 2. Every clip's latents, scaled to unit variance as the bunny proxy's, chunk by chunk as drawn.
        waited, modes, captions, cells = 0.0, [], [], []
        while chunks:  # popped: each chunk's pixels are freed once encoded (10000 clips are 7 GB)
            start = time.monotonic()
            pixels, caps, cell = chunks.pop(0).result()
            waited += time.monotonic() - start
            modes.append(encode(vae, model_input(pixels, args.device), ENCODE_BATCH))
            captions += caps
            cells.append(torch.from_numpy(cell))
    log["clips_waited_seconds"] = round(waited, 1)
    log["encoded_seconds"] = round(time.monotonic() - began, 1)
    modes = torch.cat(modes)
    scaling = round(float(1.0 / modes.std()), 4)
    vae.register_to_config(scaling_factor=scaling)
    latents = modes * scaling
    weights = 1.0 + args.object_weight * torch.cat(cells).unsqueeze(2).float()  # [N, F', 1, h, w], v_prediction_loss's

    # 3. The frozen random T5 and a tokenizer that knows the grammar's words, then the transformer.
    from diffusers import CogVideoXDDIMScheduler
    from transformers import T5Config, T5EncoderModel

    T5EncoderModel(T5Config(**T5_CONFIG)).half().save_pretrained(model / "text_encoder", safe_serialization=True)
    train_tokenizer(model / "tokenizer", extra=shapes.vocabulary())
    embeds = embed_captions(model, sorted(set(captions) | {""}), args.device)
    transformer = train_transformer(latents, [(c,) for c in captions], embeds, args.device, budget - (time.monotonic() - began), args.steps, log,
                                    args.batch, args.lr, weights, args.high_t_share, args.ema, args.patch_size)
    del embeds, latents, weights

    transformer.half().save_pretrained(model / "transformer", safe_serialization=True)
    vae.half().save_pretrained(model / "vae", safe_serialization=True)
    CogVideoXDDIMScheduler(**SCHEDULER_5B).save_pretrained(model / "scheduler")
    write_model_index(model, proxy_defaults("shapes"))
    minutes = (time.monotonic() - began) / 60
    params = {
        part: sum(p.numel() for p in m.parameters())
        for part, m in (("transformer", transformer), ("vae", vae), ("text_encoder", T5EncoderModel.from_pretrained(model / "text_encoder")))
    }
    facts = {
        "what": "cogedit's shapes proxy: a small CogVideoX trained on the synthetic shapes world (engine/video/shapes.py); its numbers are not CogVideoX-5B's",
        "trained_on": f"{args.clips} clips of split 'train', seeds 0-{args.clips - 1}; color x shape pairs {list(shapes.HELD_OUT)} never among them",
        "held_out": f"split 'heldout' (every first object is a held-out pair), seeds 0-{args.eval_clips - 1} for the v-loss",
        "size": [shapes.FRAMES, shapes.HEIGHT, shapes.WIDTH],
        "params": params,
        "params_total": sum(params.values()),
        "weights_dtype": "float16",
        "vae_scaling_factor": scaling,
        "vae_init": "the Big Buck Bunny proxy's VAE (engine/assets/proxy/vae)",
        "recipe": {"batch": args.batch, "lr": args.lr, "object_weight": args.object_weight, "high_t_share": args.high_t_share, "ema": args.ema, "patch_size": args.patch_size,
                   "caption_dropout": CAPTION_DROPOUT, "vae_bar": {"psnr_db": VAE_PSNR_DB, "object_color_right": VAE_COLOR_RIGHT}},
        "training_minutes": round(minutes, 2),
        **log,
        "seed": args.seed,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "command": " ".join(["benchmarks/train_shapes.py", *sys.argv[1:]]),
    }
    write(model, out, facts)  # now, and again with the measures: a run cut short still ships a model

    # 4. What it learned: held-out v-loss against the random tiny model's, samples from noise.
    held, held_captions, _ = draw(list(range(args.eval_clips)), "heldout")
    tiny = build_tiny_model(work / "tiny")
    losses = {"proxy": [], "random_tiny": []}
    for frames, caption in zip(held, held_captions, strict=True):
        x = to_model_input(torch.from_numpy(frames))
        losses["proxy"].append(heldout_loss(model, x, caption, device=args.device))
        losses["random_tiny"].append(heldout_loss(tiny, x, caption, device=args.device))
    proxy_loss, random_loss = float(np.mean(losses["proxy"])), float(np.mean(losses["random_tiny"]))
    heldout, videos = measure_samples(model, args.sample_captions, 2, args.sample_steps, args.device, "heldout")
    seen, _ = measure_samples(model, args.sample_captions, 2, args.sample_steps, args.device, "train")
    save_grid(videos, out / "shapes_samples.png")

    facts.update({
        "heldout_v_loss": {"proxy": proxy_loss, "random_tiny": random_loss, "ratio": proxy_loss / random_loss, "clips": args.eval_clips, "per_clip": losses},
        "samples_heldout": heldout,
        "samples_seen_pairs": seen,
        "total_minutes": round((time.monotonic() - began) / 60, 2),
    })
    write(model, out, facts)
    print(json.dumps({k: v for k, v in facts.items() if not k.startswith("samples")}, indent=2))
    print(json.dumps({k: {m: v for m, v in facts[k].items() if m != "rows"} for k in ("samples_heldout", "samples_seen_pairs")}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--minutes", type=float, default=8.5, help="wall-clock budget of the training (drawing the clips included; the measures come after)")
    ap.add_argument("--vae-seconds", type=float, default=90.0, help="at most this long for the VAE (it stops once good enough)")
    ap.add_argument("--vae-steps", type=int, default=None, help="fixed VAE steps instead of the time budget")
    ap.add_argument("--steps", type=int, default=None, help="fixed transformer steps instead of the time budget")
    ap.add_argument("--batch", type=int, default=128, help="transformer batch (a 4M model leaves an H200 idle at 32)")
    ap.add_argument("--lr", type=float, default=4e-4, help="the transformer's peak learning rate")
    ap.add_argument("--object-weight", type=float, default=4.0, help="extra loss weight of the latent cells an object touches (0: a plain mean)")
    ap.add_argument("--high-t-share", type=float, default=0.5, help="share of each batch drawn from the noisiest 30%% of timesteps (0: uniform)")
    ap.add_argument("--ema", type=float, default=0.0, help="ship the moving average of the transformer's weights at this decay (0: the last weights)")
    ap.add_argument("--patch-size", type=int, default=2, help="latent cells a side per transformer token (the 5B's: 2; 1 gives the small objects 4x the tokens)")
    ap.add_argument("--clips", type=int, default=10000, help="training clips")
    ap.add_argument("--vae-clips", type=int, default=768, help="of those, the VAE's")
    ap.add_argument("--eval-clips", type=int, default=8, help="held-out clips for the v-loss")
    ap.add_argument("--sample-captions", type=int, default=12, help="captions sampled from noise (2 samples each), per split")
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="processes drawing the clips (default: all cores but two)")
    ap.add_argument("--seed", type=int, default=0)
    train(ap.parse_args())


if __name__ == "__main__":
    main()
