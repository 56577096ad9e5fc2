"""The staged workflow: invert a video once into the cache, then render edits from the cache.

    video -> frames -> latents -> trajectory (cache) -> edited latents -> mp4

Each phase loads only the component it needs and frees it before the next one loads:
encode (VAE) -> embed (T5) -> invert (transformer) and embed (T5) -> edit (transformer) ->
decode (VAE). A finished inversion is a cache hit that loads no model at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cache.atomic import FileRecord, load_tensors, load_tensors_pinned, remove_temp_files, save_tensors
from cache.errors import ReadOnlyCacheError
from cache.faults import maybe_die
from cache.keys import stable_hash
from cache.sizes import format_size
from cache.layout import CacheLayout, EntryPaths, cache_root, resolve_entry_id
from cache.lock import entry_lock
from cache.manifest import FORMAT_VERSION, file_record, new_manifest, read_manifest, record_file, touch, write_manifest
from engine.attention_store import MEMORY_STORES, STORE_LAYOUT, StoredAttention, StoreSettings, StoreWriter, block_path, budget_refusal, default_budget, kv_capture
from engine.components import ModelInfo, Runtime, inspect_model, loaded
from engine.decode import claim, decode_latents, safe_name, side_by_side, write_video
from engine.edit import Reference, ddim_edit, first_injected
from engine.embed import embed_prompts
from engine.encode import encode_frames
from engine.errors import CogeditError, ModelError, SettingsError
from engine.denoiser import predict, rotary_embeddings
from engine.invert import ddim_invert, inverse_scheduler
from engine.plans import Workload, choose_plan, predict_peaks, sequence_tokens
from engine.report import Reporter
from engine.settings import EditSettings, InjectSettings, InvertSettings, parse_layers, parse_window
from engine.video import FrameSettings, VideoInfo, probe_video, read_frames, select_frame_indices, to_model_input

Callback = Callable[[dict[str, Any]], None]
_DTYPES = {"torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16, "torch.float32": torch.float32}


@dataclass(frozen=True)
class Inversion:
    """A finished inversion in the cache: the handle edits start from."""

    id: str
    layout: CacheLayout
    manifest: dict[str, Any]

    @property
    def paths(self) -> EntryPaths:
        return self.layout.entry(self.id)

    @property
    def steps(self) -> int:
        return int(self.manifest["settings"]["invert"]["steps"])

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.manifest["settings"]["dtype"]]

    def _load(self, path: Path, name: str) -> torch.Tensor:
        rel = path.relative_to(self.paths.dir).as_posix()
        rec = self.manifest["files"].get(rel)
        return load_tensors(path, FileRecord(**rec) if rec else None)[name]

    def latents(self) -> torch.Tensor:
        return self._load(self.paths.latents, "latents")

    def frames(self) -> torch.Tensor:
        return self._load(self.paths.frames, "frames")

    def trajectory(self) -> list[torch.Tensor]:
        """The latent after every inversion step; the last one is the inverted noise."""
        return [self._load(self.paths.step_file(i), "latent") for i in range(self.steps)]

    def noise(self) -> torch.Tensor:
        """The inverted noise alone (the last step's latent), without reading the other steps."""
        return self._load(self.paths.step_file(self.steps - 1), "latent")

    def stores(self) -> dict[str, dict[str, Any]]:
        """Stored attention of this entry, by store key: on disk (manifest) and in this process."""
        found = {key: s for key, s in self.manifest.get("attention", {}).items() if s.get("layout") == STORE_LAYOUT}
        for (entry, key), steps in MEMORY_STORES.items():
            if entry == self.id and (whole := _whole_steps(steps)):
                found[key] = {"where": "cpu", "timesteps": whole, "layers": sorted(set().union(*steps.values()))}
        return found

    def store_files(self, key: str) -> list[Path]:
        """The files of disk store `key`, as the manifest records them (all its blocks of all its steps)."""
        prefix = self.paths.relative(self.paths.attention_dir / key) + "/"
        return [self.paths.dir / rel for rel in sorted(self.manifest.get("files", {})) if rel.startswith(prefix)]


def _whole_steps(steps: dict[int, dict[int, dict[str, torch.Tensor]]]) -> list[int]:
    """Timesteps of an in-memory store that hold every block (a capture may stop mid-step)."""
    blocks = set().union(*steps.values())
    return sorted(t for t, held in steps.items() if held.keys() == blocks)


@dataclass(frozen=True)
class EditResult:
    """What an edit wrote: one mp4 and one side-by-side per prompt, and the edited latents."""

    inversion_id: str
    prompts: tuple[str, ...]
    videos: tuple[Path, ...]
    side_by_side: tuple[Path, ...]
    latents: torch.Tensor  # [K, F', C, h, w] on the CPU
    frames: Any = None  # uint8 [K, F, H, W, 3] with output="frames"


def _layout(cache_dir: str | Path | None) -> CacheLayout:
    layout = CacheLayout(cache_root(cache_dir))
    try:
        layout.ensure()
    except ReadOnlyCacheError:
        if not layout.entries_dir.is_dir():
            raise
        # A read-only cache still serves its finished entries; writing to it fails with the same error.
    return layout


def inversion_key(video_sha: str, frames: FrameSettings, model: ModelInfo, runtime: Runtime, settings: InvertSettings) -> str:
    """Everything that changes the trajectory, and nothing else (offloading does not; 8/4-bit weights do)."""
    fields = {
        "format": FORMAT_VERSION,
        "video": video_sha,
        "frames": dataclasses.asdict(frames),
        "model": model.key,
        "dtype": str(runtime.dtype),
        "invert": settings.key_fields(),
        "scheduler": model.scheduler_config,
    }
    if runtime.plan.transformer_weights != "bf16":
        fields["weights"] = runtime.plan.transformer_weights
    if runtime.compile:  # fused kernels round differently
        fields["compiled"] = True
    if runtime.fp8:
        fields["fp8"] = True
    return stable_hash(fields)


def _with_plan(runtime: Runtime, plan: str | None, vram: str | int | None, info: ModelInfo, workload: Workload, reporter: Reporter) -> Runtime:
    """The runtime with the named plan, or the fastest plan predicted to fit `vram`."""
    if plan and vram:
        raise SettingsError("give --plan or --vram, not both (--vram picks a plan)")
    if vram is not None:
        from cache.sizes import parse_size

        try:
            budget = parse_size(vram) if isinstance(vram, str) else int(vram)
        except ValueError as exc:
            raise SettingsError(f"--vram: {exc}") from None
        chosen = choose_plan(budget, info, workload)
        with reporter.phase("plan") as ph:
            peak = max(predict_peaks(chosen, info, workload).values())
            ph.record.detail = f"--vram {format_size(budget)}: plan {chosen.name}, predicted peak {format_size(peak)}"
        plan = chosen.name
    return Runtime.default(runtime.device, runtime.dtype, plan, runtime.compile, runtime.fp8) if plan else runtime


def _output_fps(video: VideoInfo, idx: list[int]) -> float:
    """The frame rate that keeps the source's speed after frame selection."""
    if len(idx) < 2 or not video.fps:
        return video.fps or 8.0
    return round(video.fps * (len(idx) - 1) / (idx[-1] - idx[0]), 3)


def _save(paths: EntryPaths, manifest: dict, path: Path, tensors: dict[str, torch.Tensor], **meta: str) -> None:
    record = save_tensors(path, tensors, {k: str(v) for k, v in meta.items()})
    record_file(manifest, path.relative_to(paths.dir).as_posix(), record)


def invert(
    video: str | Path,
    model: str | Path,
    *,
    steps: int = 50,
    frames: int = 49,
    skip_start: int = 0,
    skip_end: int = 0,
    stride: int | None = None,
    height: int = 480,
    width: int = 720,
    fit: str = "stretch",
    source_prompt: str = "",
    negative_prompt: str = "",
    guidance: float = 6.0,
    attention_store: str = "none",
    attention_steps: str | tuple[float, float] = (0.0, 1.0),
    attention_layers: str | tuple[int, ...] | None = None,
    attention_dtype: str = "model",
    attention_budget: int | None = None,
    plan: str | None = None,
    vram: str | int | None = None,
    compile: bool = False,
    fp8: bool = False,
    cache_dir: str | Path | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    reporter: Reporter | None = None,
    callback: Callback | None = None,
) -> Inversion:
    """Invert `video` with `model` into the cache (or find it there) and return its handle.

    An interrupted inversion resumes from its last finished step. `callback` gets
    {"phase", "i", "t", "x"} after every inversion step. `attention_store` (cpu or disk)
    also captures the reference K/V of a window of steps and blocks for `--reference stored`;
    it is refused, before anything is written, when it would exceed `attention_budget` bytes.
    """
    frame_settings = FrameSettings(frames, skip_start, skip_end, stride, height, width, fit)
    settings = InvertSettings(steps, source_prompt, negative_prompt, guidance)
    runtime = Runtime.default(device, dtype, compile=compile, fp8=fp8)
    reporter = reporter or Reporter(device=runtime.device)
    layout = _layout(cache_dir)

    with reporter.phase("video") as ph:
        info_video = probe_video(video)
        selected = select_frame_indices(info_video.num_frames, frame_settings)  # fails early on too few frames
        fps = _output_fps(info_video, selected)
        ph.record.detail = f"{Path(video).name}: {info_video.num_frames} frames {info_video.width}x{info_video.height}"
    info = inspect_model(model)
    workload = Workload(len(selected), height, width, invert_rows=2 if settings.uses_cfg else 1)
    runtime = _with_plan(runtime, plan, vram, info, workload, reporter)
    store = _store_settings(attention_store, attention_steps, attention_layers, attention_dtype, info)
    if store.where != "none":
        _check_budget(store, steps, workload, info, runtime, attention_budget, layout, reporter)
    entry_id = inversion_key(info_video.sha256, frame_settings, info, runtime, settings)
    paths = layout.entry(entry_id)

    manifest = read_manifest(paths.manifest)
    if manifest and manifest.get("complete") and _has_store(Inversion(entry_id, layout, manifest), store, steps):
        touch(paths.manifest)  # fast path: no lock, so read-only caches work
        with reporter.phase("invert") as ph:
            ph.hit(True, f"{entry_id[:12]} cached")
        return Inversion(entry_id, layout, manifest)

    with entry_lock(paths):
        remove_temp_files(paths.dir)  # left by a process killed mid-write
        manifest = read_manifest(paths.manifest)
        if manifest and manifest.get("complete"):  # another process may have finished it meanwhile
            if not _has_store(Inversion(entry_id, layout, manifest), store, steps):
                _store_stage(Inversion(entry_id, layout, manifest), store, info, runtime, reporter)
            else:
                with reporter.phase("invert") as ph:
                    ph.hit(True, f"{entry_id[:12]} computed by another process")
            return Inversion(entry_id, layout, manifest)
        if manifest is None:
            manifest = new_manifest(
                entry_id,
                "inversion",
                settings={
                    "video": dataclasses.asdict(info_video),
                    "frames": dataclasses.asdict(frame_settings),
                    "model": {"source": info.source, "key": info.key},
                    "dtype": str(runtime.dtype),
                    "invert": dataclasses.asdict(settings),
                    "format": FORMAT_VERSION,
                },
                summary={"video": Path(video).name, "model": info.source, "steps": steps, "fps": fps},
            )
        paths.dir.mkdir(parents=True, exist_ok=True)
        write_manifest(paths.manifest, manifest)  # first: an interrupted entry reads as partial, never as broken
        latents = _encode_stage(video, frame_settings, info, runtime, paths, manifest, reporter)
        embeds = _embed_stage([source_prompt, negative_prompt] if settings.uses_cfg else [source_prompt], info, runtime, layout, reporter)
        _invert_stage(latents, embeds, settings, info, runtime, paths, manifest, reporter, callback, store)
        manifest["complete"] = True
        write_manifest(paths.manifest, manifest)
        inv = Inversion(entry_id, layout, manifest)
        if not _has_store(inv, store, steps):  # steps captured before an interruption are redone
            _store_stage(inv, store, info, runtime, reporter)
    return inv


def _encode_stage(video, frame_settings, info, runtime, paths, manifest, reporter) -> torch.Tensor:
    with reporter.phase("encode") as ph:
        if manifest["stages"].get("encode") == "done":
            ph.hit(True, "latents cached")
            return load_tensors(paths.latents, FileRecord(**manifest["files"]["latents.safetensors"]))["latents"]
        ph.hit(False)
        frames, _ = read_frames(video, frame_settings)
        _save(paths, manifest, paths.frames, {"frames": frames})
        with loaded("vae", info, runtime) as vae:
            latents = encode_frames(vae, to_model_input(frames)).cpu()
        maybe_die("encode")
        _save(paths, manifest, paths.latents, {"latents": latents})
        manifest["stages"]["encode"] = "done"
        manifest["summary"]["frames"] = int(frames.shape[0])
        manifest["summary"]["latent_shape"] = list(latents.shape)
        write_manifest(paths.manifest, manifest)
        ph.record.detail = f"{frames.shape[0]} frames -> latents {tuple(latents.shape[1:])}"
        return latents


def _embed_stage(prompts, info, runtime, layout, reporter) -> dict[str, torch.Tensor]:
    with reporter.phase("embed", total=len(set(prompts))) as ph:
        return embed_prompts(prompts, info, runtime, layout, ph)


def _invert_stage(latents, embeds, settings, info, runtime, paths, manifest, reporter, callback, store) -> None:
    progress = manifest["stages"].setdefault("invert", {"done": 0, "total": settings.steps})
    start = int(progress["done"])
    with reporter.phase("invert", total=settings.steps) as ph:
        ph.total(settings.steps, start)
        ph.hit(False, f"resumed at step {start}" if start else f"{2 if settings.uses_cfg else 1} row(s)")
        if start:  # resume from the last finished step's latent
            rec = FileRecord(**manifest["files"][paths.step_file(start - 1).relative_to(paths.dir).as_posix()])
            x = load_tensors(paths.step_file(start - 1), rec)["latent"]
        else:
            x = latents

        def on_step(state: dict[str, Any]) -> None:
            i = state["i"]
            _save(paths, manifest, paths.step_file(i), {"latent": state["x"]}, t=int(state["t"]))
            progress["done"] = i + 1
            write_manifest(paths.manifest, manifest)  # after the step file: a crash loses at most one step
            maybe_die("step")
            ph.advance()
            if callback is not None:
                callback({"phase": "invert", **state})

        cond = embeds[settings.source_prompt]
        uncond = embeds[settings.negative_prompt] if settings.uses_cfg else None
        with loaded("transformer", info, runtime) as transformer, _capturing(transformer, store, paths, manifest, settings.steps, info):
            ddim_invert(
                transformer,
                x.to(runtime.device, runtime.dtype),
                cond,
                info.scheduler_config,
                settings.steps,
                vae_scale_spatial=info.vae_scale_spatial,
                uncond=uncond,
                guidance=settings.guidance,
                start=start,
                callback=on_step,
            )


# ------------------------------------------------------------------------- stored attention


def _store_settings(where, steps, layers, dtype, info: ModelInfo) -> StoreSettings:
    window = parse_window(steps) if isinstance(steps, str) else tuple(steps)
    if isinstance(layers, str):
        layers = parse_layers(layers, info.transformer_config["num_layers"])
    return StoreSettings(where, window, layers, dtype)


def _store_timesteps(store: StoreSettings, info: ModelInfo, steps: int) -> set[int]:
    """Timesteps of the edit steps in the store's window (the inversion ran at the same ones)."""
    from engine.edit import edit_scheduler

    timesteps = edit_scheduler(info.scheduler_config, steps).timesteps
    return {int(timesteps[i]) for i in store.edit_steps(steps)}


def _check_budget(store, steps, workload: Workload, info, runtime, budget, layout, reporter) -> None:
    cfg = info.transformer_config
    tokens = sequence_tokens(info, workload.frames, workload.height, workload.width)
    width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    model_bytes = torch.finfo(runtime.dtype).bits // 8
    need = store.bytes_needed(steps, cfg["num_layers"], tokens, width, model_bytes)
    budget = default_budget(store, layout.root) if budget is None else budget
    with reporter.phase("plan") as ph:
        ph.record.detail = (
            f"stored attention ({store.where}, {store.dtype}): {len(store.edit_steps(steps))} steps x "
            f"{len(store.block_ids(cfg['num_layers']))} blocks = {format_size(need)} of {format_size(budget)} budget"
        )
    refusal = budget_refusal(store, steps, cfg["num_layers"], tokens, width, budget, model_bytes)
    if refusal:
        raise SettingsError(refusal)


def _present(inv: Inversion, store: StoreSettings) -> list[int]:
    """Timesteps the store's own tier holds whole (on disk: every block file recorded)."""
    if store.where == "cpu":
        return _whole_steps(MEMORY_STORES.get((inv.id, store.key), {}))
    found = inv.manifest.get("attention", {}).get(store.key, {})
    return found.get("timesteps", []) if found.get("layout") == STORE_LAYOUT else []


def _has_store(inv: Inversion, store: StoreSettings, steps: int) -> bool:
    return store.where == "none" or len(_present(inv, store)) == len(store.edit_steps(steps))


@contextlib.contextmanager
def _capturing(transformer, store: StoreSettings, paths: EntryPaths, manifest: dict, steps: int, info: ModelInfo):
    """Capture the store's K/V while the inversion runs, writing block files on background threads."""
    if store.where == "none":
        yield
        return
    directory = paths.attention_dir / store.key
    memory = MEMORY_STORES.setdefault((paths.id, store.key), {}) if store.where == "cpu" else None
    writer = StoreWriter(store.where, directory, memory)
    wanted = _store_timesteps(store, info, steps)
    blocks = store.block_ids(info.transformer_config["num_layers"])
    with kv_capture(transformer, blocks, wanted, writer, dtype=store.dtype):
        try:
            yield
        finally:
            records = writer.close()
    _record_store(paths, manifest, store, directory, records, wanted, blocks)


def _record_store(paths: EntryPaths, manifest: dict, store: StoreSettings, directory: Path, records: dict, wanted: set[int], blocks: tuple[int, ...]) -> None:
    if store.where != "disk":
        return
    for (t, block), rec in records.items():
        record_file(manifest, paths.relative(block_path(directory, t, block)), rec)
    prefix = paths.relative(directory) + "/"
    # One file per timestep, right in the store's folder: an older cogedit's layout, superseded now.
    old = [rel for rel in manifest["files"] if rel.startswith(prefix) and "/" not in rel[len(prefix) :]]
    for rel in old:
        del manifest["files"][rel]
    files = {t: [paths.relative(block_path(directory, t, b)) for b in blocks] for t in wanted}
    done = sorted(t for t, rels in files.items() if all(rel in manifest["files"] for rel in rels))
    manifest.setdefault("attention", {})[store.key] = {
        "where": "disk",
        "layout": STORE_LAYOUT,
        "settings": dataclasses.asdict(store),
        "timesteps": done,
        "layers": list(store.layers) if store.layers is not None else None,
        "complete": set(done) == wanted,
        "bytes": sum(manifest["files"][rel]["bytes"] for t in done for rel in files[t]),
    }
    write_manifest(paths.manifest, manifest)
    for rel in old:  # after the manifest stops listing them
        (paths.dir / rel).unlink(missing_ok=True)


def _store_stage(inv: Inversion, store: StoreSettings, info: ModelInfo, runtime: Runtime, reporter: Reporter) -> None:
    """Capture the missing steps of a store from the cached trajectory: one forward per step."""
    steps = inv.steps
    paths, manifest = inv.paths, inv.manifest
    have = set(_present(inv, store))
    scheduler = inverse_scheduler(info.scheduler_config, steps)
    missing = _store_timesteps(store, info, steps) - have
    todo = [(j, int(t)) for j, t in enumerate(scheduler.timesteps) if int(t) in missing]
    source_prompt = manifest["settings"]["invert"]["source_prompt"]
    cond = _embed_stage([source_prompt], info, runtime, inv.layout, reporter)[source_prompt]
    with reporter.phase("capture", total=len(todo)) as ph:
        ph.hit(False, f"{len(todo)} step(s) of stored attention from the cached trajectory")
        with loaded("transformer", info, runtime) as transformer, _capturing(transformer, store, paths, manifest, steps, info):
            clean = inv.latents()
            rotary = rotary_embeddings(transformer, clean.shape, info.vae_scale_spatial, runtime.device)
            for j, t in todo:
                x = clean if j == 0 else inv._load(paths.step_file(j - 1), "latent")
                predict(transformer, x.to(runtime.device, runtime.dtype), cond, torch.tensor(t), rotary)
                ph.advance()


def open_inversion(entry_id: str, cache_dir: str | Path | None = None) -> Inversion:
    """The finished inversion `entry_id` (or a unique prefix of it) from the cache."""
    layout = CacheLayout(cache_root(cache_dir))
    entry_id = resolve_entry_id(layout, entry_id)
    manifest = read_manifest(layout.entry(entry_id).manifest)
    if manifest is None:
        raise CogeditError(f"inversion {entry_id} has no readable manifest; remove it with `cogedit cache rm {entry_id}` and invert again")
    if not manifest.get("complete"):
        raise CogeditError(f"inversion {entry_id} is unfinished; run `cogedit invert` again with the same inputs to resume it")
    touch(layout.entry(entry_id).manifest)
    return Inversion(entry_id, layout, manifest)


def edit(
    inversion: Inversion | str,
    prompts: list[str] | tuple[str, ...] | str,
    *,
    negative_prompt: str = "",
    guidance: float = 6.0,
    init: str = "inverted",
    seed: int = 0,
    inject_steps: str | tuple[float, float] = (0.0, 1.0),
    inject_layers: str | tuple[int, ...] | None = None,
    inject_strength: float = 1.0,
    reference: str = "shared",
    batch: int = 4,
    fps: float | None = None,
    out_dir: str | Path = ".",
    force: bool = False,
    model: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: str | None = None,
    plan: str | None = None,
    vram: str | int | None = None,
    compile: bool = False,
    fp8: bool = False,
    reporter: Reporter | None = None,
    callback: Callback | None = None,
    output: str = "mp4",
) -> EditResult:
    """Render one edit per prompt from a cached inversion: no video is read, no VAE encoder runs.

    `output`: "mp4" writes an mp4 and a side-by-side per prompt into `out_dir`; "frames" decodes
    and returns the frames without writing; "latents" skips the decoder.
    """
    if output not in ("mp4", "frames", "latents"):
        raise SettingsError(f"output must be mp4, frames or latents, got {output!r}")
    if isinstance(inversion, str):
        inversion = open_inversion(inversion, cache_dir)
    prompts = (prompts,) if isinstance(prompts, str) else tuple(prompts)
    runtime = Runtime.default(device, inversion.dtype, compile=compile, fp8=fp8)
    reporter = reporter or Reporter(device=runtime.device)
    info = inspect_model(model or inversion.manifest["settings"]["model"]["source"])
    if info.key != inversion.manifest["settings"]["model"]["key"]:
        raise ModelError(
            f"inversion {inversion.id[:12]} was made with another model than {info.source}; "
            "pass the same --model, or invert again with this one"
        )
    window = parse_window(inject_steps) if isinstance(inject_steps, str) else tuple(inject_steps)
    layers = parse_layers(inject_layers, info.transformer_config["num_layers"]) if isinstance(inject_layers, str) else inject_layers
    frames = inversion.manifest["summary"].get("frames", 49)
    fs = inversion.manifest["settings"]["frames"]
    workload = Workload(frames, fs["height"], fs["width"], min(batch, len(prompts)), guidance > 1.0, reference=reference)
    runtime = _with_plan(runtime, plan, vram, info, workload, reporter)
    steps = inversion.steps
    inject = InjectSettings(window, layers, inject_strength, reference)
    settings = EditSettings(prompts, negative_prompt, guidance, init, seed, inject, batch)
    cfg = guidance > 1.0
    shared_ref = any(inject.is_active(i, steps) for i in range(steps)) and inject.reference == "shared"
    source_prompt = inversion.manifest["settings"]["invert"]["source_prompt"]
    wanted = list(prompts) + ([negative_prompt] if cfg else []) + ([source_prompt] if shared_ref else [])
    if output == "mp4":
        _outputs(inversion.id, prompts, Path(out_dir), force)  # refuse before the edit runs, not after
    embeds = _embed_stage(wanted, info, runtime, inversion.layout, reporter)
    store = _find_store(inversion, inject, info) if inject.reference == "stored" else None
    latents = _edit_stage(inversion, settings, embeds, source_prompt, info, runtime, reporter, callback, store)
    if output == "latents":
        return EditResult(inversion.id, prompts, (), (), latents)
    return _decode_stage(inversion, prompts, latents, fps, Path(out_dir), force, info, runtime, reporter, output == "mp4")


def _find_store(inv: Inversion, inject: InjectSettings, info: ModelInfo) -> tuple[str, dict[str, Any]]:
    """A store holding every timestep and block the edit injects at."""
    from engine.edit import edit_scheduler

    steps = inv.steps
    timesteps = edit_scheduler(info.scheduler_config, steps).timesteps
    need_t = {int(timesteps[i]) for i in range(steps) if inject.is_active(i, steps)}
    need_layers = set(range(info.transformer_config["num_layers"]) if inject.layers is None else inject.layers)
    for key, store in sorted(inv.stores().items(), key=lambda kv: kv[1]["where"] != "cpu"):
        layers = set(range(info.transformer_config["num_layers"]) if store.get("layers") is None else store["layers"])
        if need_t <= set(store["timesteps"]) and need_layers <= layers:
            return key, store
    raise SettingsError(
        f"inversion {inv.id[:12]} has no stored attention for these --inject-steps/--inject-layers; "
        "invert with --attention-store disk (and the same --attention-steps/--attention-layers), or use --reference shared"
    )


def _stored_attention(inv: Inversion, found: tuple[str, dict[str, Any]], inject: InjectSettings, shape, info, runtime) -> StoredAttention:
    key, store = found
    if store["where"] == "cpu":
        steps = MEMORY_STORES[(inv.id, key)]

        def load(t: int, block: int) -> dict[str, torch.Tensor]:
            return steps[t][block]
    else:
        directory = inv.paths.attention_dir / key
        pin = torch.device(runtime.device).type == "cuda"  # pinned: asynchronous copies to the GPU

        def load(t: int, block: int) -> dict[str, torch.Tensor]:
            path = block_path(directory, t, block)
            return load_tensors_pinned(path, file_record(inv.manifest, inv.paths.relative(path)), pin)

    layers = tuple(range(info.transformer_config["num_layers"])) if inject.layers is None else inject.layers
    rotary = rotary_embeddings(info.transformer_config, shape, info.vae_scale_spatial, runtime.device)
    return StoredAttention(layers, load, runtime.device, runtime.dtype, rotary, info.text_length)


def _edit_stage(inversion, settings: EditSettings, embeds, source_prompt, info, runtime, reporter, callback, store=None) -> torch.Tensor:
    steps = inversion.steps
    trajectory = inversion.trajectory()
    clean = inversion.latents()
    # Edit step i pairs with inversion step steps-1-i (same timestep); see engine.edit.Reference.
    replayed = lambda i: (trajectory[steps - 2 - i] if i < steps - 1 else clean).to(runtime.device)  # noqa: E731
    reached = lambda i: trajectory[steps - 1 - i].to(runtime.device)  # noqa: E731
    cfg = settings.guidance > 1.0
    chunks = [settings.prompts[i : i + settings.batch] for i in range(0, len(settings.prompts), settings.batch)]
    out = []
    with reporter.phase("edit", total=steps * len(chunks)) as ph:
        ph.hit(True, f"{len(settings.prompts)} prompt(s) in {len(chunks)} pass(es), reference {settings.inject.reference}")

        def on_step(state: dict[str, Any]) -> None:
            ph.advance()
            if callback is not None:
                callback({"phase": "edit", **state})

        stored = _stored_attention(inversion, store, settings.inject, clean.shape, info, runtime) if store else None
        try:
            if stored is not None and (first := first_injected(info.scheduler_config, steps, settings.inject)) is not None:
                # Read the first replayed step while the transformer loads (seconds), so that the
                # step does not start by waiting for its files.
                stored.prefetch(first)
            with loaded("transformer", info, runtime) as transformer:
                reference = Reference(replayed, reached, embeds.get(source_prompt, next(iter(embeds.values()))), stored)
                for chunk in chunks:
                    if settings.init == "inverted":
                        noise = trajectory[-1]
                    else:  # the same seeded noise for every prompt, so edits compare like for like
                        g = torch.Generator().manual_seed(settings.seed)
                        noise = torch.randn(trajectory[-1].shape, generator=g, dtype=torch.float32).to(inversion.dtype)
                    init = noise.to(runtime.device, runtime.dtype).expand(len(chunk), -1, -1, -1, -1).contiguous()
                    x = ddim_edit(
                        transformer,
                        init,
                        torch.cat([embeds[p] for p in chunk]),
                        info.scheduler_config,
                        steps,
                        vae_scale_spatial=info.vae_scale_spatial,
                        uncond=embeds[settings.negative_prompt] if cfg else None,
                        guidance=settings.guidance,
                        reference=reference,
                        inject=settings.inject,
                        row_group=runtime.plan.row_group,
                        callback=on_step,
                    )
                    out.append(x.cpu())
        finally:  # reader threads and pinned buffers go with a failed edit too
            if stored is not None:
                stored.close()
    return torch.cat(out)


def _outputs(inversion_id: str, prompts, out_dir: Path, force: bool) -> tuple[list[Path], list[Path]]:
    """The mp4 paths of an edit; refuses existing files (unless `force`) and unusable folders."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SettingsError(f"cannot create --out folder {out_dir}: {exc.strerror or exc} — pass --out to a writable folder") from None
    stem = inversion_id[:8]
    names = [safe_name(p, i) for i, p in enumerate(prompts)]
    videos = [claim(out_dir / f"{stem}-{n}.mp4", force) for n in names]
    pairs = [claim(out_dir / f"{stem}-{n}-side-by-side.mp4", force) for n in names]
    return videos, pairs


def _decode_stage(inversion, prompts, latents, fps, out_dir, force, info, runtime, reporter, write: bool) -> EditResult:
    videos, pairs = _outputs(inversion.id, prompts, out_dir, force) if write else ([], [])
    fps = fps or float(inversion.manifest["summary"].get("fps", 8.0))
    source = inversion.frames().numpy() if write else None
    decoded = []
    with reporter.phase("decode", total=len(prompts)) as ph:
        with loaded("vae", info, runtime) as vae:
            for k in range(len(prompts)):
                frames = decode_latents(vae, latents[k : k + 1])[0]
                if write:
                    write_video(frames, videos[k], fps)
                    write_video(side_by_side(source, frames), pairs[k], fps)
                else:
                    decoded.append(frames)
                ph.advance()
        ph.record.detail = f"{len(prompts)} mp4 + {len(prompts)} side-by-side in {out_dir}" if write else f"{len(prompts)} video(s) decoded"
    return EditResult(inversion.id, prompts, tuple(videos), tuple(pairs), latents, np.stack(decoded) if decoded else None)


def run(
    video: str | Path,
    model: str | Path,
    prompts: list[str] | tuple[str, ...] | str,
    *,
    invert_options: dict[str, Any] | None = None,
    reporter: Reporter | None = None,
    cache_dir: str | Path | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    **edit_options: Any,
) -> tuple[Inversion, EditResult]:
    """Invert when needed, then edit: the one-shot path."""
    runtime = Runtime.default(device, dtype)
    reporter = reporter or Reporter(device=runtime.device)
    plan = {k: edit_options[k] for k in ("plan", "vram", "compile", "fp8") if edit_options.get(k) is not None}
    inv = invert(video, model, cache_dir=cache_dir, device=device, dtype=dtype, reporter=reporter, **plan, **(invert_options or {}))
    return inv, edit(inv, prompts, model=model, cache_dir=cache_dir, device=device, reporter=reporter, **edit_options)
