"""Stored attention: capture during inversion, replay during edits (tiny model, CPU)."""

from __future__ import annotations

import pytest
import torch

import engine
from engine.errors import SettingsError
from tests.conftest import SMALL

PROMPT = ["a watercolor painting"]


def _store(where, **kw):
    return dict(attention_store=where, attention_steps="0:0.5", **kw)


@pytest.mark.parametrize("where", ["disk", "cpu"])
def test_stored_replay_equals_recomputed_reference(tiny_model, wide_clip, where):
    inv = engine.invert(wide_clip, tiny_model, device="cpu", **SMALL, **_store(where))
    recompute = engine.edit(inv, PROMPT, inject_steps="0:0.5", device="cpu", output="latents")
    stored = engine.edit(inv, PROMPT, inject_steps="0:0.5", reference="stored", device="cpu", output="latents")
    # Same forward pass at the same timestep; only the batch it ran in differs.
    torch.testing.assert_close(stored.latents, recompute.latents, rtol=0, atol=1e-5)
    inv.release()


def test_capture_does_not_change_the_trajectory(tiny_model, wide_clip, tmp_path):
    plain = engine.invert(wide_clip, tiny_model, device="cpu", cache_dir=tmp_path / "a", **SMALL)
    captured = engine.invert(wide_clip, tiny_model, device="cpu", cache_dir=tmp_path / "b", **SMALL, **_store("disk"))
    for a, b in zip(plain.trajectory(), captured.trajectory(), strict=True):
        assert torch.equal(a, b)
    assert captured.manifest["attention"], "the store is recorded in the manifest"


def _shards(inv):
    from cache.atomic import load_tensors

    root = inv.paths.attention_dir
    return {p.relative_to(root).as_posix().split("/", 1)[1]: load_tensors(p) for p in sorted(root.rglob("*.safetensors"))}


def test_store_added_later_is_captured_from_the_cached_trajectory(tiny_model, wide_clip, tmp_path):
    first = engine.invert(wide_clip, tiny_model, device="cpu", **SMALL)
    reporter = engine.Reporter()
    later = engine.invert(wide_clip, tiny_model, device="cpu", reporter=reporter, **SMALL, **_store("disk"))
    assert later.id == first.id
    assert [(r.name, r.cache_hit) for r in reporter.records if r.name == "capture"] == [("capture", False)]
    assert "invert" not in [r.name for r in reporter.records], "the trajectory is not recomputed"
    during = engine.invert(wide_clip, tiny_model, device="cpu", cache_dir=tmp_path / "b", **SMALL, **_store("disk"))
    a, b = _shards(later), _shards(during)
    assert list(a) == list(b) == [f"t_{t:04d}/b_{i:02d}.safetensors" for t in (749, 999) for i in (0, 1)]
    for name in a:
        for key in a[name]:
            torch.testing.assert_close(a[name][key], b[name][key], rtol=0, atol=1e-6)


# Measured on the tiny model: bf16 5e-5, fp8 1.9e-3 relative error of the edited latents.
@pytest.mark.parametrize(("dtype", "tol"), [("bf16", 1e-3), ("fp8", 1e-2)])
def test_low_precision_stores_stay_close(tiny_model, wide_clip, dtype, tol):
    inv = engine.invert(wide_clip, tiny_model, device="cpu", **SMALL, **_store("disk", attention_dtype=dtype))
    exact = engine.edit(inv, PROMPT, inject_steps="0:0.5", device="cpu", output="latents").latents
    lossy = engine.edit(inv, PROMPT, inject_steps="0:0.5", reference="stored", device="cpu", output="latents").latents
    rel = ((lossy - exact).norm() / exact.norm()).item()
    print(f"{dtype} store: relative latent error {rel:.2e}")
    assert rel < tol


def test_store_over_budget_is_refused_before_writing(tiny_model, wide_clip, _isolated_cache):
    with pytest.raises(SettingsError, match="budget") as info:
        # One block-step is 101.5 KiB here (fp32 on the CPU): 240 kB holds two, one step of both blocks.
        engine.invert(wide_clip, tiny_model, device="cpu", attention_budget=240_000, **SMALL, **_store("disk"))
    assert "try --attention-steps 0:0.25" in str(info.value)
    assert not list((_isolated_cache / "inversions").glob("*")), "nothing was written"


def test_a_store_of_some_blocks_serves_edits_at_those_and_memory_is_read_before_disk(tiny_model, wide_clip, tmp_path):
    """A store of block 1 serves an edit that injects at block 1 only (the same as recomputing the
    reference) and refuses one at block 0; with a store in memory that serves it too, the edit reads
    memory (the disk store, a block file gone, would be refused)."""
    store = _store("disk", attention_layers="1")
    inv = engine.invert(wide_clip, tiny_model, device="cpu", cache_dir=tmp_path, **SMALL, **store)
    recompute = engine.edit(inv, PROMPT, inject_steps="0:0.5", inject_layers="1", device="cpu", output="latents").latents
    with pytest.raises(SettingsError, match="no stored attention"):
        engine.edit(inv, PROMPT, inject_steps="0:0.5", inject_layers="0", reference="stored", device="cpu", output="latents")
    in_memory = engine.invert(wide_clip, tiny_model, device="cpu", cache_dir=tmp_path, **SMALL, **_store("cpu"))  # every block: another store
    next(inv.paths.attention_dir.rglob("b_01.safetensors")).unlink()
    stored = engine.edit(in_memory, PROMPT, inject_steps="0:0.5", inject_layers="1", reference="stored", device="cpu", output="latents").latents
    torch.testing.assert_close(stored, recompute, rtol=0, atol=1e-5)
    in_memory.release()


def test_replay_outside_the_stored_window_is_refused(tiny_model, wide_clip):
    inv = engine.invert(wide_clip, tiny_model, device="cpu", **SMALL, **_store("disk"))
    with pytest.raises(SettingsError, match="no stored attention"):
        engine.edit(inv, PROMPT, inject_steps="0:1", reference="stored", device="cpu", output="latents")


def test_lean_plan_replays_the_store_row_by_row(tiny_model, wide_clip):
    """Row groups over replayed K/V: each block's stored K/V serve every row group of that block."""
    inv = engine.invert(wide_clip, tiny_model, device="cpu", **SMALL, **_store("disk"))
    prompts = ["a watercolor painting", "a charcoal sketch"]
    staged = engine.edit(inv, prompts, inject_steps="0:0.5", reference="stored", device="cpu", output="latents")
    lean = engine.edit(inv, prompts, inject_steps="0:0.5", reference="stored", plan="lean", device="cpu", output="latents")
    torch.testing.assert_close(lean.latents, staged.latents, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------- disk tier, per block


def _block(i: int) -> dict[str, torch.Tensor]:
    return {f"{i:02d}.k": torch.full((2, 3, 4), float(i)), f"{i:02d}.v": torch.full((2, 3, 4), -float(i))}


def test_blocks_are_read_in_parallel_and_each_waited_for_alone():
    import threading

    from engine.hooks.kv_replay import StoredAttention

    together = threading.Barrier(4, timeout=10)  # breaks (and fails the reads) unless 4 run at once
    last_may_finish = threading.Event()
    threads = set()

    def load(t, i):
        threads.add(threading.current_thread().name)
        if i < 4:
            together.wait()
        if i == 7:
            assert last_may_finish.wait(10)
        return _block(i)

    stored = StoredAttention(tuple(range(8)), load, "cpu", torch.float32, None, 0, workers=4)
    # Daemons: an edit that dies without closing the store must not keep the process alive.
    assert all(thread.daemon for thread in stored._reader._threads)
    try:
        step = stored.at(999)
        for i in range(7):  # block 7 is still being read: the others do not wait for it
            k, v = step[i]
            assert k.shape == (1, 2, 3, 4) and torch.equal(k, torch.full_like(k, i)) and torch.equal(v, -k)
        last_may_finish.set()
        assert torch.equal(step[7][0], torch.full((1, 2, 3, 4), 7.0))
        assert step[7][0] is step[7][0], "a block asked for again (row groups) is not copied again"
    finally:
        stored.close()
    assert len(threads) == 4 and all(name.startswith("cogedit-attention-reader-") for name in threads)  # named in a stack dump


def test_the_step_being_replayed_is_read_before_the_read_ahead():
    import threading

    from engine.hooks.kv_replay import StoredAttention

    order, go = [], threading.Event()

    def load(t, i):
        assert go.wait(10)
        order.append((t, i))
        return _block(i)

    stored = StoredAttention((0, 1, 2), load, "cpu", torch.float32, None, 0, workers=1)
    try:
        stored.prefetch(749)  # the edit loop's first step asks for the next step first
        step = stored.at(999)
        go.set()
        [step[i] for i in (0, 1, 2)]
        first = order.index((999, 0))
        assert first <= 1 and order[first : first + 3] == [(999, 0), (999, 1), (999, 2)], order
        stored.prefetch(499)  # the next step's read-ahead, before its own step (749) is taken
        stored.prefetch(249)  # two steps beyond 749: refused
        [stored.at(749)[i] for i in (0, 1, 2)]
    finally:
        stored.close()
    assert not any(t == 249 for t, _ in order)


def test_read_ahead_reads_each_block_once_and_one_timestep_ahead_only():
    import threading
    import time

    from engine.hooks.kv_replay import StoredAttention

    reads, lock = [], threading.Lock()

    def load(t, i):
        with lock:
            reads.append((t, i))
        return _block(i)

    stored = StoredAttention((0, 1), load, "cpu", torch.float32, None, 0, workers=2)
    try:
        for t in (999, 999, 749):  # the step about to be replayed (asked twice), and the next
            stored.prefetch(t)
        deadline = time.monotonic() + 10
        while len(reads) < 4 and time.monotonic() < deadline:  # read on the threads, before `at` asks
            time.sleep(0.005)
        assert sorted(reads) == [(749, 0), (749, 1), (999, 0), (999, 1)], reads
        stored.prefetch(499)  # a third timestep: beyond the read-ahead
        for t in (999, 749):
            step = stored.at(t)
            assert set(step._inflight) == {0}, "a step's first block, read already, starts its copy as the step is made"
            [step[i] for i in (0, 1)]
    finally:
        stored.close()
    assert sorted(reads) == [(749, 0), (749, 1), (999, 0), (999, 1)], reads


def test_replay_gives_the_model_dtype_and_moves_the_next_block_in_while_one_computes():
    """fp8 blocks are scaled back, other precisions cast, to the model's dtype; block i + 1's copy
    is under way (and no other) when block i is handed out; a block asked for again is the same."""
    import time

    from engine.hooks.kv_replay import StoredAttention

    reads = []

    def load(t, i):
        reads.append((t, i))
        k = torch.full((2, 3, 4), float(i + 1))
        if i == 0:  # fp8 with its scale, as an fp8 store keeps it
            return {"00.k": (k / 4).to(torch.float8_e4m3fn), "00.k.scale": torch.tensor(4.0), "00.v": (-k / 4).to(torch.float8_e4m3fn), "00.v.scale": torch.tensor(4.0)}
        return {f"{i:02d}.k": k, f"{i:02d}.v": -k}  # float32 here, replayed in bf16

    stored = StoredAttention((0, 1, 2), load, "cpu", torch.bfloat16, None, 0, workers=3)
    try:
        step = stored.at(999)
        for i in (0, 1, 2):
            for _ in range(100):  # every read done, so only the issuing decides what is under way
                if all(f.done() for f in step._blocks.values()):
                    break
                time.sleep(0.01)
            k, v = step[i]
            assert k.dtype == v.dtype == torch.bfloat16 and torch.equal(k, torch.full((1, 2, 3, 4), float(i + 1), dtype=torch.bfloat16)) and torch.equal(v, -k)
            assert set(step._inflight) == ({i + 1} if i < 2 else set()), (i, set(step._inflight))
            again = step[i]
            assert len(again) == 2 and again[0] is k and again[1] is v
        k, v = step[0]  # a second pass over the blocks (a long clip's next window) reads block 0 again
        assert torch.equal(k, torch.full((1, 2, 3, 4), 1.0, dtype=torch.bfloat16)) and torch.equal(v, -k) and reads.count((999, 0)) == 2
    finally:
        stored.close()


def test_edit_reads_ahead_while_loading_and_while_each_step_computes(tiny_model, wide_clip, monkeypatch):
    import engine.stages.editing as editing
    from engine.hooks.kv_replay import StepKV, StoredAttention

    inv = engine.invert(wide_clip, tiny_model, device="cpu", **SMALL, **_store("disk"))
    events = []
    for cls, name in ((StoredAttention, "prefetch"), (StoredAttention, "at"), (StepKV, "__getitem__")):
        def logged(self, x, original=getattr(cls, name), name=name):
            events.append((name, x))
            return original(self, x)

        monkeypatch.setattr(cls, name, logged)
    loaded = editing.loaded
    monkeypatch.setattr(editing, "loaded", lambda name, *a: events.append(("load", name)) or loaded(name, *a))
    engine.edit(inv, PROMPT, inject_steps="0:0.5", reference="stored", device="cpu", output="latents")
    steps = [e for e in events if e[0] in ("prefetch", "at", "load") and e[1] != "text_encoder"]
    # The first step is read while the transformer loads; each step asks for the next one first.
    assert steps == [("prefetch", 999), ("load", "transformer"), ("prefetch", 749), ("at", 999), ("at", 749)], steps
    assert events.index(("prefetch", 749)) < events.index(("at", 999)) < events.index(("__getitem__", 0))


def test_a_missing_or_damaged_block_file_is_refused_and_reported(tiny_model, wide_clip):
    from cache.errors import CacheCorruptError
    from cache.store import verify

    inv = engine.invert(wide_clip, tiny_model, device="cpu", **SMALL, **_store("disk"))
    (key, record), = inv.stores().items()
    files = inv.store_files(key)
    missing, damaged = files[1:3]
    assert len(files) == 4  # 2 steps x 2 blocks
    # The manifest's account of the store (the format other cogedit versions read): whole timesteps, every byte listed.
    size = sum(f.stat().st_size for f in files)
    assert record == {"where": "disk", "layout": "per-block", "settings": {"where": "disk", "window": [0.0, 0.5], "layers": None, "dtype": "model"},
                      "timesteps": [749, 999], "layers": None, "windows": 1, "complete": True, "bytes": size}, record
    missing.unlink()
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0x01
    damaged.write_bytes(bytes(data))
    problems = {p.file: p.reason for p in verify(inv.layout, [inv.id])}
    assert set(problems) == {inv.paths.relative(missing), inv.paths.relative(damaged)}
    assert "missing" in problems[inv.paths.relative(missing)] and "checksum" in problems[inv.paths.relative(damaged)]
    with pytest.raises(CacheCorruptError, match="is missing|fails its checksum"):
        engine.edit(inv, PROMPT, inject_steps="0:0.5", reference="stored", device="cpu", output="latents")


def test_a_store_of_one_file_per_timestep_reads_as_absent_and_is_replaced(tiny_model, wide_clip):
    from cache.atomic import save_tensors
    from cache.manifest import record_file, write_manifest
    from cache.store import verify

    inv = engine.invert(wide_clip, tiny_model, device="cpu", **SMALL, **_store("disk"))
    key = next(iter(inv.stores()))
    manifest = inv.manifest
    del manifest["attention"][key]["layout"]  # as an older cogedit recorded it, with its file
    old = inv.paths.attention_dir / key / "t_0999.safetensors"
    record_file(manifest, inv.paths.relative(old), save_tensors(old, {"00.k": torch.ones(1)}))
    write_manifest(inv.paths.manifest, manifest)
    older = engine.open_inversion(inv.id)
    assert older.stores() == {}
    with pytest.raises(SettingsError, match="no stored attention"):
        engine.edit(older, PROMPT, inject_steps="0:0.5", reference="stored", device="cpu", output="latents")
    reporter = engine.Reporter()
    again = engine.invert(wide_clip, tiny_model, device="cpu", reporter=reporter, **SMALL, **_store("disk"))
    assert "capture" in [r.name for r in reporter.records]
    assert key in again.stores() and not old.exists() and inv.paths.relative(old) not in again.manifest["files"]
    assert verify(again.layout, [again.id]) == []


@pytest.mark.parametrize("change", [{"window": (0.0, 0.5)}, {"window": (0.5, 1.0)}, {"layers": (0,)}, {"dtype": "bf16"}, {"dtype": "fp8"}], ids=str)
def test_every_store_setting_that_changes_what_is_stored_changes_its_key(change):
    from engine.stages.settings import StoreSettings

    assert StoreSettings("disk", **change).key != StoreSettings("disk").key


def test_stores_in_two_precisions_are_two_stores(tiny_model, wide_clip):
    """An fp8 store asked for after a bf16 one is captured, not served by the bf16 one."""
    from cache.atomic import load_tensors

    bf16 = engine.invert(wide_clip, tiny_model, device="cpu", **SMALL, **_store("disk", attention_dtype="bf16"))
    reporter = engine.Reporter()
    fp8 = engine.invert(wide_clip, tiny_model, device="cpu", reporter=reporter, **SMALL, **_store("disk", attention_dtype="fp8"))
    assert fp8.id == bf16.id and [r.name for r in reporter.records].count("capture") == 1
    dtypes = [frozenset(t.dtype for f in fp8.store_files(key) for t in load_tensors(f).values()) for key in fp8.stores()]
    assert sorted(dtypes, key=str) == sorted([{torch.bfloat16}, {torch.float32, torch.float8_e4m3fn}], key=str)  # fp8 has its scales


def test_a_store_writer_names_each_file_and_reports_the_first_failed_write(tmp_path):
    from safetensors import safe_open

    from engine.hooks.kv_capture import StoreWriter

    writer = StoreWriter("disk", lambda t, window, block: tmp_path / f"{t}-{window}-{block}.safetensors", None, workers=2)
    for t, window, block in ((999, 0, 0), (999, 0, 1), (749, 0, 0), (749, 1, 0)):
        writer(t, window, block, {f"{block:02d}.k": torch.ones(2, 3)}, None)
    records = writer.close()
    assert sorted(records) == [(749, 0, 0), (749, 1, 0), (999, 0, 0), (999, 0, 1)]
    with safe_open(tmp_path / "749-1-0.safetensors", "pt") as f:
        assert {k: f.metadata()[k] for k in ("timestep", "window", "block")} == {"timestep": "749", "window": "1", "block": "0"}
    (tmp_path / "blocked").write_text("")  # a file where a folder should be: every write fails
    writer = StoreWriter("disk", lambda t, window, block: tmp_path / "blocked" / f"{t}-{window}-{block}.safetensors", None, workers=1)
    with pytest.raises(FileExistsError, match="blocked"):  # said by the next block, or by close
        writer(999, 0, 0, {"00.k": torch.ones(2)}, None)
        writer(999, 0, 1, {"01.k": torch.ones(2)}, None)
        writer.close()


def test_fp8_keeps_small_keys_to_its_precision():
    """One scale per tensor maps its largest value to fp8's largest (448): values of 1e-5 to 1e-4
    keep fp8's 3-bit mantissa (within 1/16), not the subnormals' few steps."""
    from engine.hooks.kv_capture import _quantize

    x = torch.tensor([1e-4, -5e-5, 2e-5, 1e-5])
    q = _quantize(x, "fp8")
    back = q[""].float() * q[".scale"]
    assert q[""].dtype == torch.float8_e4m3fn and ((back - x).abs() <= x.abs() / 16).all(), (back, x)


def test_a_captured_row_is_copied_out_of_the_batch():
    """The processor hands over one row of a batch-sized projection: the capture keeps a copy of
    that row only, not a view that would hold the whole batch in memory for the store's life."""
    from engine.hooks.kv_capture import _HostCopies

    batch = torch.randn(4, 2, 5, 3)
    kept = _HostCopies().copy(batch[1])
    assert torch.equal(kept, batch[1]) and kept.untyped_storage().nbytes() == 2 * 5 * 3 * 4


def test_capture_takes_each_stored_timesteps_first_forward_only_and_switches_off_after_each_block():
    """A fixed-point step runs the model at t again on other latents: only the first forward at a
    stored t is recorded, the gate closes after each forward, and a block leaves recording off."""
    from engine.hooks.injection import CaptureSlot
    from engine.hooks.kv_capture import CaptureGateHook, KVCaptureHook, _TimestepGate

    def forwards(windows: int, timesteps: tuple[int, ...]) -> tuple[list, dict]:
        sunk: list = []
        gate = _TimestepGate({500}, lambda t, window, block, tensors, ready: sunk.append((t, window, block)), "model", windows=windows)
        slot = CaptureSlot(row=0)
        model_hook, block_hook = CaptureGateHook(gate), KVCaptureHook(gate, 3, slot)
        for t in timesteps:
            model_hook.pre_forward(None, timestep=torch.tensor([t]))
            block_hook.pre_forward(None)
            if slot.on:  # what the shared processor records while on
                slot.k, slot.v = torch.ones(2, 3, 4), torch.zeros(2, 3, 4)
            block_hook.post_forward(None, None)
            assert not slot.on and slot.k is None and slot.v is None
            model_hook.post_forward(None, None)
            assert gate.t is None
        return sunk, gate.seen

    assert forwards(1, (500, 500, 400)) == ([(500, 0, 3)], {500: 1})
    # with windows, a step's first forward of each window (they run in order before any refinement)
    assert forwards(2, (500, 500, 500, 400)) == ([(500, 0, 3), (500, 1, 3)], {500: 2})


def test_a_disk_store_already_written_is_not_captured_again(tiny_model, wide_clip, tmp_path):
    engine.invert(wide_clip, tiny_model, device="cpu", cache_dir=tmp_path, **SMALL)  # no store: a later one is captured from the trajectory
    runs = [engine.Reporter(), engine.Reporter()]
    for reporter in runs:
        engine.invert(wide_clip, tiny_model, device="cpu", cache_dir=tmp_path, reporter=reporter, **SMALL, **_store("disk"))
    assert [["capture" in [r.name for r in reporter.records]] for reporter in runs] == [[True], [False]]
