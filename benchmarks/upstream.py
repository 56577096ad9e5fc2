"""The upstream method (THUDM/CogVideo `inference/ddim_inversion.py`) as the baseline.

Algorithmically it is the engine's per-half path (tests/test_engine.py proves them equal on
the tiny model); what differs is how it uses memory and compute, which is what this measures:
- `resident`: as published, T5, transformer and VAE all on the GPU at once; inversion with CFG
  on two rows ("" / ""); reconstruction with four rows (a reference row per CFG half); VAE
  decode without tiling.
- `model_offload`: the same rows, as a savvy user fits a smaller card: one component on the GPU
  at a time (what diffusers' model CPU offload does) and VAE tiling + slicing.
- `sequential`: accelerate's sequential CPU offload of the transformer (weights streamed leaf by
  leaf with no overlap), timed over one step of each kind.
"""

from __future__ import annotations

import time

import torch

from engine.models.components import Runtime, free_memory, load_component
from engine.stages.editing import Reference, ddim_edit
from engine.stages.embed import tokenize
from engine.stages.encode import encode_frames
from engine.stages.inversion import ddim_invert
from engine.stages.settings import InjectSettings


def _timed_steps(sync: bool):
    marks: list[float] = [time.perf_counter()]

    def callback(state) -> None:
        if sync:
            torch.cuda.synchronize()
        marks.append(time.perf_counter())

    return marks, callback


def _steps(marks: list[float]) -> list[float]:
    return [b - a for a, b in zip(marks, marks[1:])]


def _peak(cuda: bool) -> dict[str, int]:
    if not cuda:
        return {"peak_alloc": 0, "peak_reserved": 0}
    torch.cuda.synchronize()
    return {"peak_alloc": torch.cuda.max_memory_allocated(), "peak_reserved": torch.cuda.max_memory_reserved()}


def _reset(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def run_upstream(info, runtime: Runtime, frames: torch.Tensor, steps: int, mode: str, timed: int | None = None) -> dict:
    """Phases of the upstream workflow; returns per-phase seconds, step times and peaks. With
    `timed`, each loop stops after that many steps of its `steps`-step schedule."""
    from transformers import AutoTokenizer

    cuda = runtime.device.startswith("cuda")
    out: dict[str, dict] = {}
    _reset(cuda)
    t0 = time.perf_counter()
    resident = mode == "resident"
    parts = {}
    if resident:
        for name in ("vae", "text_encoder", "transformer"):
            parts[name] = load_component(name, info, runtime)
        parts["vae"].disable_tiling()
        parts["vae"].disable_slicing()
    out["load"] = {"seconds": time.perf_counter() - t0, **_peak(cuda)}

    def part(name):
        if resident:
            return parts[name]
        if name == "transformer" and mode == "sequential":
            from accelerate import cpu_offload

            module = load_component(name, info, Runtime("cpu", runtime.dtype))
            cpu_offload(module, execution_device=torch.device(runtime.device))
            return module
        module = load_component(name, info, runtime)
        if name == "vae" and mode == "resident":
            module.disable_tiling()
        return module

    # encode
    _reset(cuda)
    t0 = time.perf_counter()
    vae = part("vae")
    latents = encode_frames(vae, frames)
    if not resident:
        del vae
        free_memory()
    out["encode"] = {"seconds": time.perf_counter() - t0, **_peak(cuda)}

    # embed "" (upstream encodes the prompt and the negative prompt, both "")
    _reset(cuda)
    t0 = time.perf_counter()
    t5 = part("text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(info.path, subfolder="tokenizer")
    with torch.no_grad():
        ids = tokenize(tokenizer, "", info.text_length).to(runtime.device)
        empty = t5(ids)[0].to(runtime.dtype)
        edit_ids = tokenize(tokenizer, "a watercolor painting", info.text_length).to(runtime.device)
        prompt = t5(edit_ids)[0].to(runtime.dtype)
    if not resident:
        del t5
        free_memory()
    out["embed"] = {"seconds": time.perf_counter() - t0, **_peak(cuda)}

    # invert: CFG on two rows
    _reset(cuda)
    transformer = part("transformer")
    n_invert = 1 if mode == "sequential" else (timed or steps)
    marks, cb = _timed_steps(cuda)
    t0 = time.perf_counter()
    x = latents.to(runtime.device, runtime.dtype)
    trajectory = []

    def keep(state):
        trajectory.append(state["x"])
        cb(state)
        if len(trajectory) >= n_invert:
            raise StopIteration

    try:
        ddim_invert(transformer, x, empty, info.scheduler_config, steps, vae_scale_spatial=info.vae_scale_spatial, uncond=empty, guidance=6.0, callback=keep)
    except StopIteration:
        pass
    out["invert"] = {"seconds": time.perf_counter() - t0, "step_times": _steps(marks), "rows": 2, **_peak(cuda)}

    # reconstruct/edit: per-half reference rows (4 rows), from fresh noise as upstream
    _reset(cuda)
    ref = trajectory[-1]
    reference = Reference(replayed=lambda i: ref, reached=lambda i: ref, source_embeds=empty)
    marks, cb = _timed_steps(cuda)
    count = [0]

    def stop(state):
        cb(state)
        count[0] += 1
        if count[0] >= n_invert:
            raise StopIteration

    t0 = time.perf_counter()
    try:
        ddim_edit(
            transformer, torch.randn_like(x), prompt, info.scheduler_config, steps,
            vae_scale_spatial=info.vae_scale_spatial, uncond=empty, guidance=6.0, reference=reference,
            inject=InjectSettings(reference="per-half"), callback=stop,
        )
    except StopIteration:
        pass
    out["edit"] = {"seconds": time.perf_counter() - t0, "step_times": _steps(marks), "rows": 4, **_peak(cuda)}
    del transformer
    if not resident:
        free_memory()

    # decode (no tiling when resident, as published)
    if mode != "sequential":
        _reset(cuda)
        t0 = time.perf_counter()
        vae = part("vae")
        with torch.no_grad():
            z = ref.permute(0, 2, 1, 3, 4) / vae.config.scaling_factor
            vae.decode(z.to(vae.dtype))
        out["decode"] = {"seconds": time.perf_counter() - t0, **_peak(cuda)}
        del vae
    parts.clear()
    free_memory()
    return out
