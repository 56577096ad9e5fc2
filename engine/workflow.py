"""The staged workflow: invert a video once into the cache, then render edits from the cache.

    video -> frames -> latents -> trajectory (cache) -> edited latents -> mp4

Each phase loads only the component it needs and frees it before the next one loads:
encode (VAE) -> embed (T5) -> invert (transformer) and embed (T5) -> edit (transformer) ->
decode (VAE). A finished inversion is a cache hit that loads no model at all. The stages
themselves live beside their kernels (`engine.stages.encode`, `engine.stages.embed`, `engine.stages.inversion`,
`engine.stages.editing`, `engine.stages.decode`, `engine.stages.attention_store`, `engine.stages.verify`); this module
turns options into settings, finds or makes the cache entry, and calls them in order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cache.atomic import ensure_free_space, remove_temp_files
from cache.entry import InversionEntry
from cache.errors import CacheCorruptError, ReadOnlyCacheError
from cache.keys import stable_hash
from cache.layout import CacheLayout, EntryPaths, cache_root
from cache.lock import entry_lock
from cache.manifest import FORMAT_VERSION
from cache.sizes import format_size
from engine.errors import ModelError, SettingsError, VideoError, WorkerError
from engine.models.components import Runtime
from engine.models.model_info import ModelInfo, inspect_model, is_hub_id
from engine.models.plans import Workload, choose_plan, parse_vram, predict_peaks
from engine.options import EditOptions, InvertOptions, RuntimeOptions, parse, split_run_options
from engine.report import Reporter
from engine.results import EditResult, Inversion, open_inversion
from engine.stages.attention_store import MemoryStores, capture_stage, check_budget, find_store, has_store, store_settings
from engine.stages.context import Callback, StageContext
from engine.stages.decode import decode_stage, output_paths
from engine.stages.distributed import Mesh, backend_for, check_gpu_count, check_worker_device, inversion_team, launch, process_group, rank, shares, team_size, tell_team, under_torchrun, worker_device
from engine.stages.editing import edit_stage
from engine.stages.embed import embed_stage
from engine.stages.encode import encode_stage
from engine.stages.inversion import follow_inversion, invert_stage
from engine.stages.settings import EditSettings, InjectSettings, InvertSettings, StoreSettings, layers_of, window_of
from engine.stages.verify import verify_stage
from engine.stages.windows import anchor_frames, default_overlap, state_frames, window_count
from engine.video.masks import Mask, fit_to_object, load_mask, mask_spec
from engine.video.reader import FrameSettings, VideoInfo, check_video_file, output_frames, probe_video, select_frame_indices

# Default refinements per step: with its check, 1 iteration is 3 transformer forwards per inversion
# step (benchmarks/results/inversion_cost.md), the cap.
FIXED_POINT_ITERS = 1

log = logging.getLogger("cogedit")


@dataclass(frozen=True)
class Source:
    """The probed video and the frames selection picks from it."""

    video: str | Path
    info: VideoInfo
    selected: list[int]

    @property
    def fps(self) -> float:
        """The frame rate that keeps the source's speed after frame selection."""
        idx = self.selected[: output_frames(self.selected)]  # without the repeats that pad to 4k+1
        if len(idx) < 2 or not self.info.fps:
            return self.info.fps or 8.0
        return round(self.info.fps * (len(idx) - 1) / (idx[-1] - idx[0]), 3)


def _layout(cache_dir: str | Path | None) -> CacheLayout:
    layout = CacheLayout(cache_root(cache_dir))
    try:
        layout.ensure()
    except ReadOnlyCacheError:
        if not layout.entries_dir.is_dir():
            raise
        # A read-only cache still serves its finished entries; writing to it fails with the same error.
    return layout


# Frame settings that only ask for a selection: the key holds the selected indices instead, so
# two requests that pick the same frames share one entry.
_SELECTION_REQUEST = ("max_frames", "skip_start", "skip_end", "stride", "fps")


def inversion_identity(video_sha: str, frames: FrameSettings, selected: list[int], model: ModelInfo, runtime: Runtime, settings: InvertSettings) -> dict[str, Any]:
    """Everything that changes the trajectory, and nothing else (offloading does not; 8/4-bit
    weights do). Its hash is the inversion's id; the manifest keeps it whole."""
    picked = {k: v for k, v in dataclasses.asdict(frames).items() if k not in _SELECTION_REQUEST}
    fields = {
        "format": FORMAT_VERSION,
        "video": video_sha,
        "frames": {**picked, "indices": list(selected)},
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
    fields.update(attention_fields(runtime))
    return fields


def attention_fields(runtime: Runtime) -> dict[str, str]:
    """The attention kernel, for ids and edit names: FA4 rounds differently (as compiled kernels do)
    and Sage is lossy, so each is a key field; SDPA adds nothing, so earlier ids and names stay."""
    return {} if runtime.attention == "sdpa" else {"attention": runtime.attention}


def _runtime(opts: RuntimeOptions, dtype: str | torch.dtype | None, phase: str) -> Runtime:
    """The runtime the options name, checked before any work; a --vram plan is picked later, by
    `_with_plan`, once the workload is known."""
    if opts.plan and opts.vram:
        raise SettingsError("give --plan or --vram, not both (--vram picks a plan)")
    _vram_bytes(opts)
    return Runtime.default(opts.device, dtype, opts.plan, opts.compile, opts.fp8, phase, opts.attention)


def _vram_bytes(opts: RuntimeOptions) -> int | None:
    try:
        return parse_vram(opts.vram) if isinstance(opts.vram, str) else opts.vram
    except ValueError as exc:
        raise SettingsError(f"--vram: {exc}") from None


def _with_plan(runtime: Runtime, opts: RuntimeOptions, info: ModelInfo, workload: Workload, reporter: Reporter, phase: str) -> Runtime:
    """The runtime with the fastest plan predicted to fit `vram`, when it is given."""
    budget = _vram_bytes(opts)
    if budget is None:
        return runtime
    chosen = choose_plan(budget, info, workload)
    with reporter.phase("plan") as ph:
        peak = max(predict_peaks(chosen, info, workload).values())
        ph.record.detail = f"--vram {format_size(budget)}: plan {chosen.name}, predicted peak {format_size(peak)}"
    return Runtime.default(runtime.device, runtime.dtype, chosen.name, opts.compile, runtime.fp8, phase, runtime.attention)


def _probe(video: str | Path, frames: FrameSettings, reporter: Reporter) -> Source:
    with reporter.phase("video") as ph:
        info = probe_video(video)
        selected = select_frame_indices(info.num_frames, frames, info.fps)  # fails early on too few frames
        ph.record.detail = f"{Path(video).name}: {info.num_frames} frames {info.width}x{info.height}"
    asked = (frames.max_frames - 1) // 4 * 4 + 1 if frames.max_frames is not None else 0
    if frames.max_frames is not None and frames.max_frames != asked and len(selected) == asked:
        log.warning("--frames %d: using %d, as the model takes 4k+1 frames (1, 5, 9, 13, 17, ...)", frames.max_frames, asked)
    if len(selected) < asked:
        skips = " after --skip-start/--skip-end" if frames.skip_start or frames.skip_end else ""
        stride = f", every {frames.stride}th" if frames.stride else ""
        log.warning(
            "%s: using %d frames, not the %d asked for: %d frames in the clip%s%s, and the model takes 4k+1",
            Path(video).name, len(selected), asked, info.num_frames, skips, stride,
        )
    return Source(video, info, selected)


def _clip_spans(settings: InvertSettings, info: ModelInfo, source: Source) -> list[tuple[int, int]]:
    """The inversion's windows over the clip's latent frames (one span for a clip of one window)."""
    return settings.spans(info.vae_latent_frames(len(source.selected)))


def _windowed(settings: InvertSettings, info: ModelInfo, source: Source, overlap: int | None) -> InvertSettings:
    """The inversion's windows over a clip longer than the model's window, said in one line
    before any work; a clip of one window keeps its settings (and its cache id) as they were."""
    n = info.vae_latent_frames(len(source.selected))
    if n <= info.latent_window:
        return settings
    windowed = dataclasses.replace(settings, window=info.latent_window, overlap=default_overlap(info.latent_window) if overlap is None else overlap)
    count = len(windowed.spans(n))
    shown = output_frames(source.selected)
    log.warning(
        "%s: %d frames at %.3g fps (%.1f s) in %d overlapping windows of %d frames (%d latent frames shared): predicted %dx the time of one window",
        Path(source.video).name, shown, source.fps, shown / source.fps, count, info.window_frames, windowed.overlap, count,
    )
    return windowed


def every_frame(video: VideoInfo, info: ModelInfo, frames: FrameSettings = FrameSettings()) -> tuple[int, int]:
    """(frames, windows) of `--frames all` on `video` at the model's rate: what a long clip costs
    before any work (the window count is the time in windows; (0, 0) when too short)."""
    try:
        every = select_frame_indices(video.num_frames, dataclasses.replace(frames, max_frames=None, stride=None, fps=info.defaults.fps), video.fps)
    except VideoError:
        return 0, 0
    return output_frames(every), window_count(info, len(every))


def _say_spread(source: Source, frames: FrameSettings, info: ModelInfo) -> None:
    """One line when the default frame count spreads a clip longer than one window at the model's
    rate over its length (the edit keeps its speed at a lower frame rate): what `--frames all` would do."""
    if frames.max_frames is None or frames.stride is not None or frames.fps is not None:
        return
    count, windows = every_frame(source.info, info, frames)
    if windows < 2 or count <= len(source.selected):
        return
    log.warning(
        "%s: %d frames spread over %.1f s (%.3g fps; the edit plays at normal speed); --frames all reads all %d frames at %g fps, in %d windows (predicted %dx the time)",
        Path(source.video).name, len(source.selected), count / info.defaults.fps, source.fps, count, info.defaults.fps, windows, windows,
    )


def _check_sizes(entry: InversionEntry) -> None:
    """A cache hit still checks that every recorded file is there at its size (cheap; the full
    checksums are read when a file is used)."""
    bad = entry.missing_files()
    if bad:
        raise CacheCorruptError(
            f"inversion {entry.id[:12]} is damaged ({bad[0]} is missing or has the wrong size"
            f"{f', and {len(bad) - 1} more' if len(bad) > 1 else ''}) — run `cogedit cache rm {entry.id[:12]}`, then invert again"
        )


def _invert_settings(opts: InvertOptions, info: ModelInfo | None = None) -> tuple[FrameSettings, InvertSettings]:
    """The frames and inversion settings; frames, height and width not given are the model's
    (`info.defaults`; with no `info` yet, FrameSettings' own, which only checks the given ones).
    frames="all" reads every frame at `fps`, by default the model's."""
    iters = opts.inversion_iters if opts.inversion_iters is not None else (FIXED_POINT_ITERS if opts.inversion == "fixed-point" else 0)
    every = opts.frames == "all"
    if isinstance(opts.frames, str) and not every:
        raise SettingsError(f"--frames takes a number or 'all', got {opts.frames!r}")
    own = {} if info is None else dict(max_frames=info.defaults.frames, height=info.defaults.height, width=info.defaults.width)
    given = {k: v for k, v in dict(max_frames=None if every else opts.frames, height=opts.height, width=opts.width).items() if v is not None}
    fps = opts.fps if opts.fps is not None or not every or info is None else info.defaults.fps
    frames = FrameSettings(skip_start=opts.skip_start, skip_end=opts.skip_end, stride=opts.stride, fit=opts.fit, fps=fps, **{**own, **given})
    frames = dataclasses.replace(frames, max_frames=None) if every else frames
    return frames, InvertSettings(opts.steps, opts.source_prompt, opts.negative_prompt, opts.guidance, opts.inversion, iters)


# A frame size this far (either way, in pixels) from the model's own is worth a warning: the
# model has seen few such grids, and a larger one costs memory and time as the square of it.
FAR_FROM_NATIVE = 2.0


def _warn_size(info: ModelInfo, frames: FrameSettings) -> None:
    native = info.defaults
    ratio = frames.height * frames.width / (native.height * native.width)
    if not 1 / FAR_FROM_NATIVE <= ratio <= FAR_FROM_NATIVE:
        log.warning(
            "%dx%d is %.3gx the pixels of %s's own %dx%d: expect poor edits%s; leave out --height/--width to use the model's size",
            frames.height, frames.width, ratio, info.source, native.height, native.width, " and a long, memory-hungry run" if ratio > 1 else "",
        )


def invert(video: str | Path, model: str | Path, *, cache_dir: str | Path | None = None, reporter: Reporter | None = None, callback: Callback | None = None, **options: Any) -> Inversion:
    """Invert `video` with `model` into the cache (or find it there) and return its handle.

    `options` are `engine.options.InvertOptions` (steps, frames, height, width, source_prompt,
    inversion, verify, attention_store, plan, device, ...). An interrupted inversion resumes
    from its last finished step. `callback` gets {"phase", "i", "t", "x"} after every step. A
    stored-attention request over its budget is refused before anything is written.
    """
    opts = parse(InvertOptions, options, "invert")
    _invert_settings(opts)  # the sizes given are checked before anything else
    runtime = _runtime(opts, opts.dtype, "invert")
    reporter = reporter or Reporter(device=runtime.device)
    # Every argument is checked before any work or output: a wrong --model is reported before
    # the video is read (or a frames warning printed) and before the cache folder is made.
    check_video_file(video)
    info = inspect_model(model)
    frames, settings = _invert_settings(opts, info)
    _warn_size(info, frames)
    store = store_settings(opts.attention_store, opts.attention_steps, opts.attention_layers, opts.attention_dtype, info.transformer_config["num_layers"])
    layout = _layout(cache_dir)
    source = _probe(video, frames, reporter)
    if opts.frames is None:  # by default; --frames N is the user's choice
        _say_spread(source, frames, info)
    settings = _windowed(settings, info, source, opts.window_overlap)
    workload = Workload(min(len(source.selected), info.window_frames), frames.height, frames.width, invert_rows=2 if settings.uses_cfg else 1)
    ctx = StageContext(info, _with_plan(runtime, opts, info, workload, reporter, "invert"), layout, reporter, callback=callback)
    if store.where != "none":
        check_budget(ctx, store, settings.steps, workload, opts.attention_budget, len(_clip_spans(settings, info, source)))
    identity = inversion_identity(source.info.sha256, frames, source.selected, info, ctx.runtime, settings)
    paths = layout.entry(stable_hash(identity))
    memory = MemoryStores()
    mesh = _team_mesh(team_size(), settings, store, info) if team_size() else None
    if mesh is not None and rank() != 0:
        return _follow(ctx, mesh, paths, memory)
    entry = InversionEntry.read(paths)
    if entry is not None and entry.complete and has_store(entry, memory, store):
        _check_sizes(entry)
        entry.touch()  # fast path: no lock, so read-only caches work
        with reporter.phase("invert") as ph:
            ph.hit(True, f"{paths.id[:12]} cached")
    else:
        # A clip too long for the disk is refused before any work, with the space it needs.
        ensure_free_space(layout.entries_dir, _entry_bytes(ctx, source, frames, settings, entry))
        entry = _make(ctx, paths, identity, source, frames, settings, store, memory, mesh)
    if mesh is not None:
        tell_team(None)  # the entry is complete: the others go on to the edit
    if opts.verify:
        verify_stage(dataclasses.replace(ctx, entry=entry))
    return Inversion(entry, layout, memory)


def _team_mesh(n: int, settings: InvertSettings, store: StoreSettings, info: ModelInfo) -> Mesh:
    if store.where != "none":  # run() refuses it before the workers start; here for a worker started by hand
        raise SettingsError(STORE_ALONE)
    return Mesh.make(n, settings.uses_cfg, info.transformer_config["num_attention_heads"])


STORE_ALONE = "stored attention is captured in one process: invert with --attention-store without --gpus (cogedit invert), then edit with --gpus"


def _follow(ctx: StageContext, mesh: Mesh, paths: EntryPaths, memory: MemoryStores) -> Inversion:
    """A worker other than 0 of `run --gpus N`: its shares of worker 0's inversion, then the entry worker 0 completed."""
    follow_inversion(ctx, mesh)
    entry = InversionEntry.read(paths)
    if entry is None or not entry.complete:
        raise WorkerError(f"worker 0 said inversion {paths.id[:12]} was done, and it is not complete in the cache")
    return Inversion(entry, ctx.layout, memory)


def _entry_bytes(ctx: StageContext, source: Source, frames: FrameSettings, settings: InvertSettings, entry: InversionEntry | None) -> int:
    """The bytes an inversion still writes: the frames and latents unless encoded, and a latent per step left."""
    scale, steps = ctx.info.vae_scale_spatial, settings.steps
    latent_frames = state_frames(_clip_spans(settings, ctx.info, source))  # the anchors too
    latent = latent_frames * ctx.info.transformer_config["in_channels"] * (frames.height // scale) * (frames.width // scale)
    latent *= torch.empty(0, dtype=ctx.runtime.dtype).element_size()
    encoded = entry is not None and entry.encoded
    pixels = 0 if encoded else len(source.selected) * frames.height * frames.width * 3 + latent
    return pixels + (steps - (entry.steps_done if entry is not None else 0)) * latent


def _make(
    ctx: StageContext, paths: EntryPaths, identity: dict, source: Source, frames: FrameSettings, settings: InvertSettings, store: StoreSettings, memory: MemoryStores, mesh: Mesh | None
) -> InversionEntry:
    """Make the entry, or finish it, under its lock: encode, embed, invert, capture what is missing."""
    with entry_lock(paths):
        remove_temp_files(paths.dir)  # left by a process killed mid-write
        entry = InversionEntry.read(paths)
        if entry is not None and entry.complete:  # another process may have finished it meanwhile
            ctx = dataclasses.replace(ctx, entry=entry)
            if not has_store(entry, memory, store):
                capture_stage(ctx, memory, store)
            else:
                with ctx.reporter.phase("invert") as ph:
                    ph.hit(True, f"{paths.id[:12]} computed by another process")
            return entry
        entry = entry or _new_entry(paths, identity, source, frames, settings, ctx)
        paths.dir.mkdir(parents=True, exist_ok=True)
        entry.write()  # first: an interrupted entry reads as partial, never as broken
        ctx = dataclasses.replace(ctx, entry=entry)
        latents = encode_stage(ctx, frames, source.video, anchor_frames(_clip_spans(settings, ctx.info, source), ctx.info.vae_scale_temporal))
        embeds = embed_stage(ctx, [settings.source_prompt, settings.negative_prompt] if settings.uses_cfg else [settings.source_prompt])
        invert_stage(ctx, settings, latents, embeds, store, memory, mesh)
        entry.mark_complete()
        if not has_store(entry, memory, store):  # steps captured before an interruption are redone
            capture_stage(ctx, memory, store)
    return entry


def _new_entry(paths: EntryPaths, identity: dict, source: Source, frames: FrameSettings, settings: InvertSettings, ctx: StageContext) -> InversionEntry:
    settings_record = {
        "video": dataclasses.asdict(source.info),
        "frames": dataclasses.asdict(frames),
        "model": {"source": ctx.info.stored_source, "key": ctx.info.key},
        "dtype": str(ctx.runtime.dtype),
        "invert": dataclasses.asdict(settings),
    }
    summary = {"video": Path(source.video).name, "model": ctx.info.stored_source, "steps": settings.steps, "fps": source.fps}
    if settings.window:  # a long clip: `cache show` lists its windows
        summary["windows"] = [list(span) for span in _clip_spans(settings, ctx.info, source)]
    if output_frames(source.selected) < len(source.selected):  # padded to 4k+1: the output drops the repeats
        summary["output_frames"] = output_frames(source.selected)
    return InversionEntry.new(paths, identity, settings_record, summary)


def _edit_settings(opts: EditOptions, prompts: tuple[str, ...], info: ModelInfo, source_prompt: str = "") -> EditSettings:
    """The edit's settings; `source_prompt` (the inversion's) is the negative prompt with `negative_from_source`."""
    if opts.negative_from_source and opts.negative_prompt:
        raise SettingsError("give --negative-prompt or --negative-from-source, not both (the second uses the inversion's source prompt)")
    num_layers = info.transformer_config["num_layers"]
    window = window_of(opts.inject_steps, "--inject-steps")
    inject = InjectSettings(window, layers_of(opts.inject_layers, num_layers, "--inject-layers"), opts.inject_strength, opts.reference)
    negative = source_prompt if opts.negative_from_source else opts.negative_prompt
    return EditSettings(prompts, negative, opts.guidance, opts.init, opts.seed, inject, opts.batch, paste=opts.mask_paste)


def _edit_mask(opts: EditOptions, inv: Inversion) -> Mask | None:
    """The local edit's mask at the inversion's frames and size, checked before any model loads."""
    spec = mask_spec(opts.mask, opts.mask_box, opts.mask_box_end, opts.mask_fit, opts.mask_paste)
    if spec is None:
        return None
    source_frames = int(inv.entry.manifest["settings"]["video"]["num_frames"])
    mask = load_mask(spec, FrameSettings(**inv.entry.frame_settings), source_frames, inv.entry.frames, inv.entry.output_frames)
    return fit_to_object(mask, inv.frames()) if opts.mask_fit == "object" else mask


def edit_stem(inversion_id: str, settings: EditSettings, runtime: Runtime) -> str:
    """The start of an edit's file names: the inversion and a short hash of every setting that
    changes the pixels, so edits with other settings never overwrite each other. 8/4-bit weights
    count as for the inversion's id; bf16 adds nothing, so earlier edits keep their names."""
    fields = {**settings.key_fields(), "compiled": runtime.compile, "fp8": runtime.fp8, **attention_fields(runtime)}
    if runtime.plan.transformer_weights != "bf16":
        fields["weights"] = runtime.plan.transformer_weights
    tag = stable_hash(fields, length=6)
    return f"{inversion_id[:8]}-{tag}"


def _stored_model(inv: Inversion) -> str:
    """The model the inversion recorded; a folder that is not there (moved, or recorded relative to
    another working directory by an older cogedit) is named with the fix."""
    stored = inv.entry.model_source
    if not is_hub_id(stored) and not Path(stored).expanduser().is_dir():
        raise ModelError(f"inversion {inv.id[:12]} was made with the model folder {stored}, which is not there from here: pass the model's folder with edit --model")
    return stored


def _edit_model(inv: Inversion, model: str | Path | None) -> ModelInfo:
    info = inspect_model(model or _stored_model(inv))
    if info.key != inv.entry.model_key:
        raise ModelError(
            f"inversion {inv.id[:12]} was made with another model than {info.source}; "
            "pass the same --model, or invert again with this one"
        )
    return info


def _edit_prompts(settings: EditSettings, source_prompt: str, steps: int) -> list[str]:
    """Every prompt the edit embeds: the edits, the negative (CFG), the source (shared reference)."""
    inject = settings.inject
    shared_ref = inject.reference == "shared" and any(inject.is_active(i, steps) for i in range(steps))
    return list(settings.prompts) + ([settings.negative_prompt] if settings.uses_cfg else []) + ([source_prompt] if shared_ref else [])


Prompts = list[str] | tuple[str, ...] | str


def edit(inversion: Inversion | str, prompts: Prompts, *, cache_dir: str | Path | None = None, reporter: Reporter | None = None, callback: Callback | None = None, **options: Any) -> EditResult:
    """Render one edit per prompt from a cached inversion: no video is read, no VAE encoder runs.

    `options` are `engine.options.EditOptions` (guidance, inject_steps, reference, batch, plan,
    out_dir, output, ...). `output`: "mp4" writes an mp4 and a side-by-side per prompt into
    `out_dir`; "frames" decodes and returns the frames without writing; "latents" skips the decoder.
    `skip_existing` renders only the prompts whose two mp4 files are not there yet. `gpus=N` (2, 4
    or 8) runs the edit in N processes, one per GPU, started here unless this one is already a
    torchrun worker: guidance's unconditional and conditional rows on two groups, each splitting
    the tokens of its transformer calls (`engine.stages.distributed.Mesh`).
    """
    opts = parse(EditOptions, options, "edit")
    if opts.output not in ("mp4", "frames", "latents"):
        raise SettingsError(f"output must be mp4, frames or latents, got {opts.output!r}")
    if opts.dtype is not None:
        raise SettingsError("an edit runs in its inversion's dtype: drop dtype, or invert again with it")
    if opts.skip_existing and opts.force:
        raise SettingsError("give skip_existing or force, not both (one keeps existing files, the other overwrites them)")
    _check_gpus(opts.gpus, callback, opts.device)
    inv = open_inversion(inversion, cache_dir) if isinstance(inversion, str) else inversion
    prompts = (prompts,) if isinstance(prompts, str) else tuple(prompts)
    if opts.gpus > 1 and under_torchrun():
        opts = dataclasses.replace(opts, device=worker_device(opts.device))
    runtime = _runtime(opts, inv.dtype, "edit")
    reporter = reporter or Reporter(device=runtime.device)
    info = _edit_model(inv, opts.model)
    mask = _edit_mask(opts, inv)
    settings = dataclasses.replace(_edit_settings(opts, prompts, info, inv.entry.source_prompt), mask=mask.digest if mask else None)
    _check_mesh(opts.gpus, settings, info)
    if opts.seed and settings.init == "inverted":
        log.warning("--seed %d has no effect: edits start from the inverted noise; add --init random to start from seeded noise", opts.seed)
    fs = inv.entry.frame_settings
    workload = Workload(min(inv.entry.frames, info.window_frames), fs["height"], fs["width"], min(settings.batch, len(prompts)), settings.uses_cfg, reference=settings.inject.reference)
    ctx = StageContext(info, _with_plan(runtime, opts, info, workload, reporter, "edit"), inv.layout, reporter, inv.entry, callback)
    outputs = None
    if opts.output == "mp4":  # refuse first
        outputs = output_paths(edit_stem(inv.id, settings, ctx.runtime), prompts, Path(opts.out_dir), opts.force or opts.skip_existing)
    # only mp4 outputs are files a rerun can find; frames and latents are always rendered
    done = [k for k in range(len(prompts)) if opts.skip_existing and outputs is not None and outputs[0][k].exists() and outputs[1][k].exists()]
    skipped = tuple(prompts[k] for k in done)
    if len(done) == len(prompts):
        return EditResult(inv.id, prompts, tuple(outputs[0]), tuple(outputs[1]), torch.empty(0), skipped=skipped)
    if opts.gpus > 1 and not under_torchrun():
        return on_workers(opts.gpus, reporter, edit, inv.id, prompts, cache_dir=cache_dir, **options)
    todo = [k for k in range(len(prompts)) if k not in done]
    settings = dataclasses.replace(settings, prompts=tuple(prompts[k] for k in todo))
    with process_group(backend_for(ctx.runtime.device)) if opts.gpus > 1 else contextlib.nullcontext():
        latents = _render(ctx, inv, settings, opts.gpus, mask)
    if latents is None or opts.output == "latents":  # None: the other half of a split edit
        return EditResult(inv.id, prompts, (), (), latents, skipped=skipped)
    mine = ([outputs[0][k] for k in todo], [outputs[1][k] for k in todo]) if outputs else None
    frames = decode_stage(ctx, latents, mine, opts.fps or inv.entry.fps, settings.prompts, mask if settings.paste else None)
    videos, pairs = outputs or ((), ())
    return EditResult(inv.id, prompts, tuple(videos), tuple(pairs), latents, frames, skipped)


def _check_gpus(gpus: int, callback: Callback | None, device: str | None) -> None:
    check_gpu_count(gpus)
    if gpus == 1:
        return
    if callback is not None and not under_torchrun():
        raise SettingsError(f"gpus={gpus} runs the edit in other processes, where a callback cannot reach: drop the callback, or start the workers with torchrun")
    check_worker_device(device)


def _check_mesh(gpus: int, settings: EditSettings, info: ModelInfo) -> None:
    """What --gpus N cannot share out, refused before any worker starts."""
    _, ways = shares(gpus, settings.uses_cfg, info.transformer_config["num_attention_heads"])
    if ways > 1 and settings.inject.reference == "stored":
        raise SettingsError(f"--gpus {gpus} splits the tokens, and stored attention holds every token's keys in one process: use --reference shared, or fewer --gpus")


def _render(ctx: StageContext, inv: Inversion, settings: EditSettings, gpus: int, mask: Mask | None) -> torch.Tensor | None:
    """The edited latents; with gpus > 1 (inside the process group) only rank 0 returns them."""
    embeds = embed_stage(ctx, _edit_prompts(settings, inv.entry.source_prompt, inv.steps))
    store = find_store(inv.entry, inv.memory, settings.inject, ctx.info) if settings.inject.reference == "stored" else None
    mesh = Mesh.make(gpus, settings.uses_cfg, ctx.info.transformer_config["num_attention_heads"]) if gpus > 1 else None
    latents = edit_stage(ctx, settings, embeds, inv.memory, store, mesh, mask)
    return None if mesh is not None and rank() != 0 else latents


def on_workers(nproc: int, reporter: Reporter, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, reporter=..., **kwargs)` in `nproc` torchrun workers: rank 0's result, with its
    phases added to `reporter` (whose bars rank 0 shows when `reporter` has a console)."""
    results = launch(_worker, nproc, fn, args, kwargs, reporter.console is not None)
    value, records = results[0]
    reporter.records.extend(records)
    return value


def _worker(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any], show: bool) -> tuple[Any, list]:
    from rich.console import Console

    reporter = Reporter(Console(stderr=True) if show and rank() == 0 else None, device=worker_device(kwargs.get("device")))
    return fn(*args, reporter=reporter, **kwargs), reporter.records


def run(
    video: str | Path, model: str | Path, prompts: Prompts, *, cache_dir: str | Path | None = None, reporter: Reporter | None = None, callback: Callback | None = None, **options: Any
) -> tuple[Inversion, EditResult]:
    """Invert when needed, then edit: the one-shot path. `options` are the invert and the edit
    options together (`invert_guidance`/`invert_negative_prompt` for the inversion's CFG); an
    unknown one is refused before any work."""
    inv_opts, edit_opts = split_run_options(options)
    prompts = (prompts,) if isinstance(prompts, str) else tuple(prompts)
    check_video_file(video)
    info = inspect_model(edit_opts.model or model)
    settings = _edit_settings(edit_opts, prompts, info)  # bad prompts or edit flags: refused before the inversion
    mask_spec(edit_opts.mask, edit_opts.mask_box, edit_opts.mask_box_end, edit_opts.mask_fit, edit_opts.mask_paste)
    reporter = reporter or Reporter(device=Runtime.default(inv_opts.device).device)
    if edit_opts.gpus == 1:
        return _run(video, model, prompts, cache_dir, reporter, callback, inv_opts, edit_opts)
    _check_gpus(edit_opts.gpus, callback, edit_opts.device)
    _check_mesh(edit_opts.gpus, settings, info)
    shares(edit_opts.gpus, _invert_settings(inv_opts)[1].uses_cfg, info.transformer_config["num_attention_heads"])  # the inversion's own split
    if inv_opts.attention_store != "none":
        raise SettingsError(STORE_ALONE)
    if not under_torchrun():
        inv_id, result = on_workers(edit_opts.gpus, reporter, _run_ids, video, model, prompts, cache_dir=cache_dir, **options)
        return open_inversion(inv_id, cache_dir), result
    device = worker_device(inv_opts.device)
    inv_opts, edit_opts = dataclasses.replace(inv_opts, device=device), dataclasses.replace(edit_opts, device=device)
    # Every worker computes its share of the inversion; worker 0 leads it and writes the cache.
    with process_group(backend_for(device)), inversion_team(edit_opts.gpus):
        return _run(video, model, prompts, cache_dir, reporter, callback, inv_opts, edit_opts)


def _run(video, model, prompts, cache_dir, reporter, callback, inv_opts: InvertOptions, edit_opts: EditOptions) -> tuple[Inversion, EditResult]:
    inv = invert(video, model, cache_dir=cache_dir, reporter=reporter, callback=callback, **dataclasses.asdict(inv_opts))
    edit_kw = {**dataclasses.asdict(edit_opts), "model": edit_opts.model or model, "dtype": None}
    return inv, edit(inv, prompts, cache_dir=cache_dir, reporter=reporter, callback=callback, **edit_kw)


def _run_ids(*args: Any, **kwargs: Any) -> tuple[str, EditResult]:
    """`run` in a worker, handing back what crosses processes: the inversion's id and the edit."""
    inv, result = run(*args, **kwargs)
    return inv.id, result

