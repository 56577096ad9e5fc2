"""Stored reference attention: which stores an inversion has, capturing them, finding them for
an edit. The mechanism is in `engine.hooks.kv_capture` (hooks and writers) and `engine.hooks.kv_replay`.

Pairing is by timestep. Inversion step j runs the model at timestep t on the latent one step
less noisy (its input); edit step i runs at the same t, and the shared reference it would
otherwise compute is exactly that forward pass (see `engine.stages.editing.Reference`). So the K/V a
capture records at t are the ones a recomputed reference row would produce at t, and the edit
batch loses its reference row (2K rows instead of 2K+1).

On disk (`--attention-store disk`) a store is one safetensors file per timestep and block
(`EntryPaths.attention_block`), listed in the manifest; in memory (`cpu`) it belongs to the
`Inversion` handle that captured it (`MemoryStores`) and is freed by `Inversion.release()`.

A long clip's inversion runs each step as one forward per window (`engine.stages.windows`), and
each window's edit call injects its own reference: a store holds every timestep and block once
per window, captured from that window's forward and replayed in that window's call.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from cache.atomic import FileRecord, load_tensors_pinned
from cache.entry import InversionEntry
from cache.sizes import format_size
from engine.errors import SettingsError
from engine.hooks.kv_capture import KVCaptureConfig, StoreWriter, apply_kv_capture, remove_kv_capture
from engine.hooks.kv_replay import StoredAttention
from engine.models.components import loaded
from engine.models.plans import Workload, sequence_tokens
from engine.stages.context import StageContext
from engine.stages.schedulers import edit_timesteps, inverse_scheduler
from engine.stages.settings import InjectSettings, StoreSettings, layers_of, window_of

# The manifest marks per-block stores; a store without the mark (one file per timestep, from an
# older cogedit) reads as absent and is captured again.
STORE_LAYOUT = "per-block"

Steps = dict[int, dict[int, dict[str, torch.Tensor]]]  # timestep -> block -> tensors


class MemoryStores:
    """The in-memory (`cpu`) stores of one inversion handle, by store key and window, until `release()`."""

    def __init__(self) -> None:
        self._stores: dict[str, dict[int, Steps]] = {}

    def steps(self, key: str, window: int = 0) -> Steps:
        return self._stores.setdefault(key, {}).setdefault(window, {})

    def whole(self, key: str, windows: int = 1) -> list[int]:
        """Timesteps that hold every block in each of `windows` windows (a capture may stop mid-step)."""
        found: set[int] | None = None
        for w in range(windows):
            steps = self._stores.get(key, {}).get(w, {})
            blocks = set().union(*steps.values()) if steps else set()
            held = {t for t, got in steps.items() if got.keys() == blocks}
            found = held if found is None else found & held
        return sorted(found or ())

    def described(self, windows: int = 1) -> dict[str, dict[str, Any]]:
        return {
            key: {"where": "cpu", "timesteps": whole, "layers": sorted(set().union(*per[0].values())), "windows": windows}
            for key, per in self._stores.items()
            if (whole := self.whole(key, windows))
        }

    def release(self) -> None:
        self._stores.clear()


def store_settings(where: str, steps, layers, dtype: str, num_layers: int) -> StoreSettings:
    window = window_of(steps, "--attention-steps")
    return StoreSettings(where, window, layers_of(layers, num_layers, "--attention-layers"), dtype)


def budget_refusal(settings: StoreSettings, steps: int, num_layers: int, tokens: int, width: int, budget: int, model_bytes: int = 2) -> str | None:
    """None when the store fits `budget`; else a one-line refusal that names a window that fits."""
    need = settings.bytes_needed(steps, num_layers, tokens, width, model_bytes)
    if need <= budget:
        return None
    n_steps, n_layers = len(settings.edit_steps(steps)), len(settings.block_ids(num_layers))
    per_block_step = need // max(n_steps * n_layers, 1)
    fit = budget // max(per_block_step, 1)
    if fit >= n_layers:
        hint = f"--attention-steps 0:{(fit // n_layers) / steps:.2f} (first {fit // n_layers} steps, every block)"
    elif fit >= 1:
        hint = f"--attention-layers 0-{fit - 1} with one step (--attention-steps 0:{1 / steps:.2f}), or --attention-dtype fp8"
    else:
        hint = "a larger --attention-budget, or --reference shared (recompute, no storage)"
    return (
        f"stored attention needs {format_size(need)} ({n_steps} steps x {n_layers} blocks x "
        f"{format_size(per_block_step)}) but the budget is {format_size(budget)}: try {hint}"
    )


def default_budget(settings: StoreSettings, cache_dir: Path) -> int:
    """Disk: free space less 10 %; CPU: half the available memory."""
    if settings.where == "disk":
        import shutil

        return int(shutil.disk_usage(cache_dir).free * 0.9)
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def store_timesteps(store: StoreSettings, scheduler_config: dict[str, Any], steps: int) -> set[int]:
    """Timesteps of the edit steps in the store's window (the inversion ran at the same ones)."""
    return edit_timesteps(scheduler_config, steps, store.edit_steps(steps))


def check_budget(ctx: StageContext, store: StoreSettings, steps: int, workload: Workload, budget: int | None, windows: int = 1) -> None:
    """Say what the store will cost (every window's K/V: `windows` x one window's tokens), and
    refuse it before anything is written when over budget."""
    cfg = ctx.info.transformer_config
    tokens = sequence_tokens(ctx.info, workload.frames, workload.height, workload.width) * windows
    width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    model_bytes = torch.finfo(ctx.runtime.dtype).bits // 8
    need = store.bytes_needed(steps, cfg["num_layers"], tokens, width, model_bytes)
    budget = default_budget(store, ctx.layout.root) if budget is None else budget
    with ctx.reporter.phase("plan") as ph:
        ph.record.detail = (
            f"stored attention ({store.where}, {store.dtype}): {len(store.edit_steps(steps))} steps x "
            f"{len(store.block_ids(cfg['num_layers']))} blocks{f' x {windows} windows' if windows > 1 else ''} = {format_size(need)} of {format_size(budget)} budget"
        )
    refusal = budget_refusal(store, steps, cfg["num_layers"], tokens, width, budget, model_bytes)
    if refusal:
        raise SettingsError(refusal)


def windows_of(entry: InversionEntry) -> int:
    """The windows each step of `entry`'s inversion ran (one for a clip of one window)."""
    return len(entry.manifest["summary"].get("windows", [None]))


def present(entry: InversionEntry, memory: MemoryStores, store: StoreSettings) -> list[int]:
    """Timesteps the store's own tier holds whole (on disk: every block file recorded)."""
    if store.where == "cpu":
        return memory.whole(store.key, windows_of(entry))
    found = entry.stores().get(store.key, {})
    return found.get("timesteps", []) if found.get("layout") == STORE_LAYOUT else []


def has_store(entry: InversionEntry, memory: MemoryStores, store: StoreSettings) -> bool:
    return store.where == "none" or len(present(entry, memory, store)) == len(store.edit_steps(entry.steps))


@contextlib.contextmanager
def capturing(ctx: StageContext, transformer: torch.nn.Module, store: StoreSettings, memory: MemoryStores) -> Iterator[None]:
    """Capture the store's K/V while the transformer runs, writing block files on background threads."""
    if store.where == "none":
        yield
        return
    entry, steps, windows = ctx.entry, ctx.entry.steps, windows_of(ctx.entry)
    path_of = lambda t, window, block: entry.paths.attention_block(store.key, t, block, window)  # noqa: E731
    writer = StoreWriter(store.where, path_of, (lambda window: memory.steps(store.key, window)) if store.where == "cpu" else None)
    wanted = store_timesteps(store, ctx.info.scheduler_config, steps)
    blocks = store.block_ids(ctx.info.transformer_config["num_layers"])
    apply_kv_capture(transformer, KVCaptureConfig(blocks, frozenset(wanted), writer, dtype=store.dtype, windows=windows))
    try:
        yield
    finally:
        remove_kv_capture(transformer)
        records = writer.close()
    if store.where == "disk":
        record_store(entry, store, records, wanted, blocks, windows)


def record_store(entry: InversionEntry, store: StoreSettings, records: dict[tuple[int, int, int], FileRecord], wanted: set[int], blocks: tuple[int, ...], windows: int) -> None:
    """List a disk store's written files and whole timesteps in the manifest."""
    for (t, window, block), rec in records.items():
        entry.record(entry.paths.attention_block(store.key, t, block, window), rec)
    # One file per timestep, right in the store's folder: an older cogedit's layout, superseded now.
    directory = entry.paths.attention_store(store.key)
    old = [p for p in entry.files_under(directory) if p.parent == directory]
    for path in old:
        entry.forget(path)
    files = {t: [entry.paths.attention_block(store.key, t, b, w) for w in range(windows) for b in blocks] for t in wanted}
    done = sorted(t for t, paths in files.items() if all(entry.has_file(p) for p in paths))
    entry.set_store(store.key, {
        "where": "disk",
        "layout": STORE_LAYOUT,
        "settings": {"where": store.where, "window": list(store.window), "layers": store.layers, "dtype": store.dtype},
        "timesteps": done,
        "layers": list(store.layers) if store.layers is not None else None,
        "windows": windows,
        "complete": set(done) == wanted,
        "bytes": entry.size_of([p for t in done for p in files[t]]),
    })
    entry.write()
    for path in old:  # after the manifest stops listing them
        path.unlink(missing_ok=True)


def capture_stage(ctx: StageContext, memory: MemoryStores, store: StoreSettings) -> None:
    """Capture the missing steps of a store from the cached trajectory: one forward per step."""
    from engine.models.denoiser import predict, rotary_embeddings
    from engine.stages.embed import embed_stage
    from engine.stages.settings import inverted_spans
    from engine.stages.windows import frames_of, window_calls, window_shape

    entry, steps = ctx.entry, ctx.entry.steps
    missing = store_timesteps(store, ctx.info.scheduler_config, steps) - set(present(entry, memory, store))
    todo = [(j, int(t)) for j, t in enumerate(inverse_scheduler(ctx.info.scheduler_config, steps).timesteps) if int(t) in missing]
    cond = embed_stage(ctx, [entry.source_prompt])[entry.source_prompt]
    with ctx.reporter.phase("capture", total=len(todo)) as ph:
        ph.hit(False, f"{len(todo)} step(s) of stored attention from the cached trajectory")
        with loaded("transformer", ctx.info, ctx.runtime, ctx.layout.compile_dir) as transformer, capturing(ctx, transformer, store, memory):
            clean = entry.load(entry.paths.latents, "latents")
            spans = inverted_spans(entry, ctx.info)
            calls = [slice(*spans[0])] if len(spans) == 1 else window_calls(spans)
            rotary = rotary_embeddings(transformer, window_shape(clean.shape, spans), ctx.info.vae_scale_spatial, ctx.runtime.device)
            for j, t in todo:
                x = clean if j == 0 else entry.load(entry.paths.step_file(j - 1), "latent")
                for frames in calls:  # in order: the capture takes the first forward at t of each window
                    predict(transformer, frames_of(x, frames).to(ctx.runtime.device, ctx.runtime.dtype), cond, torch.tensor(t), rotary)
                ph.advance()


def available(entry: InversionEntry, memory: MemoryStores) -> dict[str, dict[str, Any]]:
    """Stored attention of an inversion, by store key: on disk (manifest) and in its handle's memory."""
    found = {key: s for key, s in entry.stores().items() if s.get("layout") == STORE_LAYOUT}
    return {**found, **memory.described(windows_of(entry))}


def find_store(entry: InversionEntry, memory: MemoryStores, inject: InjectSettings, info) -> str:
    """The key of a store holding every timestep and block the edit injects at (memory first)."""
    steps, num_layers = entry.steps, info.transformer_config["num_layers"]
    need_t = edit_timesteps(info.scheduler_config, steps, [i for i in range(steps) if inject.is_active(i, steps)])
    need_layers = set(range(num_layers) if inject.layers is None else inject.layers)
    for key, store in sorted(available(entry, memory).items(), key=lambda kv: kv[1]["where"] != "cpu"):
        layers = set(range(num_layers) if store.get("layers") is None else store["layers"])
        if need_t <= set(store["timesteps"]) and need_layers <= layers:
            return key
    raise SettingsError(
        f"inversion {entry.id[:12]} has no stored attention for these --inject-steps/--inject-layers; "
        "invert with --attention-store disk (and the same --attention-steps/--attention-layers), or use --reference shared"
    )


def open_stored(ctx: StageContext, memory: MemoryStores, key: str, inject: InjectSettings, shape: torch.Size) -> list[StoredAttention]:
    """A reader over store `key` per window (one for a clip of one window), for the layers the
    edit injects at; `shape` is one window's latent shape."""
    from engine.models.denoiser import rotary_embeddings

    entry, runtime, windows = ctx.entry, ctx.runtime, windows_of(ctx.entry)
    in_memory = key in memory.described(windows)
    pin = torch.device(runtime.device).type == "cuda"  # pinned: asynchronous copies to the GPU

    def loader(window: int) -> Callable[[int, int], dict[str, torch.Tensor]]:
        if in_memory:
            steps = memory.steps(key, window)
            return lambda t, block: steps[t][block]

        def load(t: int, block: int) -> dict[str, torch.Tensor]:
            path = entry.paths.attention_block(key, t, block, window)
            return load_tensors_pinned(path, entry.record_of(path), pin)

        return load

    cfg = ctx.info.transformer_config
    layers = tuple(range(cfg["num_layers"])) if inject.layers is None else inject.layers
    rotary = rotary_embeddings(cfg, shape, ctx.info.vae_scale_spatial, runtime.device)
    workers = max(1, min(8, os.cpu_count() or 1) // windows)  # the windows' readers share the cores
    return [StoredAttention(layers, loader(w), runtime.device, runtime.dtype, rotary, ctx.info.text_length, workers) for w in range(windows)]
