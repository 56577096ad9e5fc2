"""Train the shapes proxy: a small CogVideoX that has learned the shapes world (engine/video/shapes.py).

    python benchmarks/train_shapes.py --out $OUT --device cuda --minutes 7          # the shipped proxy (one H200)
    python benchmarks/train_shapes.py --out /tmp/s --device cpu --clips 48 --vae-clips 8 \\
        --vae-steps 2 --steps 2 --eval-clips 2 --sample-captions 1 --sample-steps 3     # try it out on a CPU

One command does everything, for a machine without network or ffmpeg: it draws the training clips
(seeded, `--clips` of them, held-out color x shape pairs never among them), trains the VAE on
their pixels starting from the Big Buck Bunny proxy's VAE (same config), encodes every clip,
trains the transformer with the v-prediction loss on their captions (the fit loop, VAE, T5 and
transformer configs of benchmarks/train_proxy.py), then measures what it learned: the held-out
v-loss against the random tiny model's, and samples drawn from noise under captions of held-out
combinations, judged by benchmarks/shape_measures.py. It writes into --out:

    shapes_proxy.tar       the model in the CogVideoX-5b folder layout (fp16), TRAINING.json inside
    shapes_training.json   the same numbers as TRAINING.json
    shapes_samples.png     samples from noise: one row per held-out caption (every fourth frame)

Unpack the tar into engine/assets/shapes/ to ship it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.shape_measures import sample_adherence  # noqa: E402
from benchmarks.train_proxy import T5_CONFIG, embed_captions, encode, sample, save_grid, train_transformer, train_vae  # noqa: E402
from engine.models.configs import SCHEDULER_5B  # noqa: E402
from engine.models.proxy import PROXY_DIR  # noqa: E402
from engine.models.tiny import build_tiny_model, train_tokenizer, write_model_index  # noqa: E402
from engine.stages.vloss import heldout_loss  # noqa: E402
from engine.video import shapes  # noqa: E402
from engine.video.reader import to_model_input  # noqa: E402

ENCODE_BATCH = 16


def draw(seeds: list[int], split: str) -> tuple[np.ndarray, list[str]]:
    """uint8 frames [N, F, H, W, 3] and captions of the clips of `seeds`."""
    specs = [shapes.clip_spec(s, split) for s in seeds]
    return np.stack([shapes.render(s)[0] for s in specs]), [s.caption for s in specs]


def draw_many(seeds: list[int], split: str, workers: int) -> tuple[np.ndarray, list[str]]:
    """`draw` over worker processes (thousands of clips at a few ms each)."""
    if workers <= 1 or len(seeds) < 64:
        return draw(seeds, split)
    parts = [seeds[i : i + 64] for i in range(0, len(seeds), 64)]
    with ProcessPoolExecutor(workers) as pool:
        done = list(pool.map(draw, parts, [split] * len(parts)))
    return np.concatenate([d[0] for d in done]), [c for d in done for c in d[1]]


def model_input(frames: np.ndarray) -> torch.Tensor:
    """uint8 [N, F, H, W, 3] -> float32 [N, F, 3, H, W] in [-1, 1]: to_model_input over N clips."""
    return to_model_input(torch.from_numpy(frames).flatten(0, 1)).unflatten(0, frames.shape[:2])


def measure_samples(model_dir: Path, count: int, per_caption: int, steps: int, device: str, split: str) -> tuple[dict, list[np.ndarray]]:
    """Samples from noise (plain DDIM, CFG 6) under one-object captions of `split`, judged per frame."""
    rows, videos = [], []
    for seed in shapes.one_object_seeds(count, split):
        spec = shapes.clip_spec(seed, split)
        thing = spec.things[0]
        for k, video in enumerate(sample(model_dir, spec.caption, per_caption, steps, device, seed=seed)):
            rows.append({"caption": spec.caption, "sample": k, **sample_adherence(video, thing.color, thing.shape)})
            videos.append(video)
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

    # 1. The VAE, on the pixels of the first clips (from the bunny proxy's VAE: it already encodes).
    pixels, captions = draw_many(list(range(args.clips)), "train", args.workers)
    log["clips_seconds"] = round(time.monotonic() - began, 1)
    print(f"drew {len(pixels)} training clips in {log['clips_seconds']} s", flush=True)
    vae_data = model_input(pixels[: args.vae_clips]).to(args.device)
    vae = train_vae(vae_data, args.device, budget * args.vae_share, args.vae_steps, log, init=PROXY_DIR / "vae")
    del vae_data

    # 2. Every clip's latents, scaled to unit variance as the bunny proxy's.
    modes = torch.cat([encode(vae, model_input(pixels[i : i + 256]), args.device, ENCODE_BATCH) for i in range(0, len(pixels), 256)])
    del pixels
    scaling = round(float(1.0 / modes.std()), 4)
    vae.register_to_config(scaling_factor=scaling)
    latents = modes * scaling

    # 3. The frozen random T5 and a tokenizer that knows the grammar's words, then the transformer.
    from diffusers import CogVideoXDDIMScheduler
    from transformers import T5Config, T5EncoderModel

    T5EncoderModel(T5Config(**T5_CONFIG)).half().save_pretrained(model / "text_encoder", safe_serialization=True)
    train_tokenizer(model / "tokenizer", extra=shapes.vocabulary())
    embeds = embed_captions(model, sorted(set(captions) | {""}), args.device)
    transformer = train_transformer(latents, [(c,) for c in captions], embeds, args.device, budget - (time.monotonic() - began), args.steps, log, args.batch)
    del embeds, latents

    transformer.half().save_pretrained(model / "transformer", safe_serialization=True)
    vae.half().save_pretrained(model / "vae", safe_serialization=True)
    CogVideoXDDIMScheduler(**SCHEDULER_5B).save_pretrained(model / "scheduler")
    write_model_index(model)
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
    held, held_captions = draw(list(range(args.eval_clips)), "heldout")
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
    ap.add_argument("--minutes", type=float, default=7.0, help="wall-clock budget of the training (drawing the clips included)")
    ap.add_argument("--vae-share", type=float, default=0.25, help="fraction of the budget for the VAE")
    ap.add_argument("--vae-steps", type=int, default=None, help="fixed VAE steps instead of the time budget")
    ap.add_argument("--steps", type=int, default=None, help="fixed transformer steps instead of the time budget")
    ap.add_argument("--batch", type=int, default=128, help="transformer batch (a 4M model leaves an H200 idle at 32)")
    ap.add_argument("--clips", type=int, default=10000, help="training clips")
    ap.add_argument("--vae-clips", type=int, default=768, help="of those, the VAE's")
    ap.add_argument("--eval-clips", type=int, default=8, help="held-out clips for the v-loss")
    ap.add_argument("--sample-captions", type=int, default=12, help="captions sampled from noise (2 samples each), per split")
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--workers", type=int, default=8, help="processes drawing the clips")
    ap.add_argument("--seed", type=int, default=0)
    train(ap.parse_args())


if __name__ == "__main__":
    main()
