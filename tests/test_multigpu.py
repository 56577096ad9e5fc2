"""Beyond one GPU, on the CPU: `cogedit batch` in one process and in two torchrun workers (gloo),
a worker killed mid-run, and one run (inversion and edit) split over 2 and 4 processes: guidance's
halves, each splitting the tokens (engine.hooks.token_split).

Each launch of workers costs their imports (~10 s on 2 cores), so the workers' tests share
one jobs file and a tiny workload."""

from __future__ import annotations

import contextlib
import copy
import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import engine
from cli import cli
from engine.errors import DeviceError, SettingsError, WorkerError
from engine.hooks.token_exchange import TokenSplit
from engine.jobs.batch import Job, Unit, assign
from engine.stages.distributed import Mesh, shares, worker_device
from engine.workflow import _check_gpus
from tests.conftest import CLIPS
from tests.groups import in_threads

TINY = dict(frames=5, height=96, width=160, steps=3)


def _jobs(path: Path, broken: bool = False) -> Path:
    """Two jobs share one inversion (the wide clip), a third has its own; `broken` adds a job whose video is missing."""
    sizes = "\n".join(f"{k} = {v}" for k, v in TINY.items())
    tables = [
        ("wide", "bunny_wide.mp4", ["a red car", "snow at night"], ""),
        ("wide-again", "bunny_wide.mp4", ["a watercolor painting"], ""),
        ("small", "bunny_small.mp4", ["a charcoal sketch", "a red car"], "guidance = 4.0"),
    ]
    if broken:
        tables.insert(1, ("gone", "no-such-clip.mp4", ["a red car"], ""))
    text = ""
    for name, video, prompts, edit in tables:
        text += f'[[job]]\nname = "{name}"\nvideo = "{CLIPS / video}"\nprompts = {json.dumps(prompts)}\n[job.invert]\n{sizes}\n[job.edit]\n{edit}\n\n'
    path.write_text(text)
    return path


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every finished file under `folder` with its inode and mtime: a rewrite (atomic rename) changes
    both. An atomic write's hidden temp file is left out: the other worker, stopped when one dies,
    may be halfway through one, and it is not finished work (a rerun removes it)."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def one_process(tiny_model, tmp_path_factory):
    """The batch in this process (the reference), then the same command again."""
    root = tmp_path_factory.mktemp("one")
    jobs = _jobs(root / "jobs.toml", broken=True)
    first = engine.batch(jobs, tiny_model, out_dir=root / "out", cache_dir=root / "cache", device="cpu")
    before = _files(root / "out")
    again = engine.batch(jobs, tiny_model, out_dir=root / "out", cache_dir=root / "cache", device="cpu")
    return root, first, again, before


def test_batch_runs_every_job_and_a_rerun_rewrites_nothing(one_process):
    root, first, again, before = one_process
    status = {(r.job, r.prompt): r.status for r in first.rows}
    assert status[("wide", "")] == "done" and status[("small", "")] == "done"
    assert status[("wide-again", "")] == "shared with wide", "one inversion for the two jobs of the wide clip"
    assert status[("gone", "")].startswith("failed: ") and "does not exist" in status[("gone", "")]
    assert status[("gone", "a red car")].startswith("failed: "), "a failed job is reported ..."
    assert [s for (job, p), s in status.items() if job != "gone" and p] == ["done"] * 5, "... and the others go on"
    videos = sorted(p for p in before if p.endswith(".mp4") and "side-by-side" not in p)
    assert len(videos) == 5 and {p.split("/")[0] for p in videos} == {"wide", "wide-again", "small"}
    # Again: everything is found, nothing is rendered or rewritten; the failed job fails again.
    assert {(r.job, r.prompt): r.status for r in again.rows if r.job != "gone" and r.prompt} == {k: "cached" for k in status if k[0] != "gone" and k[1]}
    assert _files(root / "out") == before


def test_two_workers_killed_then_rerun_lose_nothing_and_match_one_process(one_process, tiny_model, tmp_path, monkeypatch):
    root, first, _, reference = one_process
    jobs = _jobs(tmp_path / "jobs.toml")
    run = dict(out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", device="cpu", nproc=2)
    # Worker 1 inverts the small clip (the split gives each worker one inversion) and dies after its 2nd step.
    monkeypatch.setenv("COGEDIT_TEST_KILL_AT", "step:2")
    monkeypatch.setenv("COGEDIT_TEST_KILL_RANK", "1")
    with pytest.raises(WorkerError, match="worker 1 was killed by SIGKILL; finished work is cached"):
        engine.batch(jobs, tiny_model, **run)
    steps_before = _files(tmp_path / "cache" / "inversions")
    outputs_before = _files(tmp_path / "out") if (tmp_path / "out").exists() else {}
    assert any(p.endswith("step_0001.safetensors") for p in steps_before), "the killed worker's finished steps are on disk"
    monkeypatch.delenv("COGEDIT_TEST_KILL_AT")
    result = engine.batch(jobs, tiny_model, **run)
    assert not result.failed and result.workers == 2
    status = {(r.job, r.prompt): r.status for r in result.rows}
    assert status[("small", "")] == "done", "the killed worker's inversion is finished (resumed, below)"
    assert status[("wide", "")] in ("done", "cached") and status[("wide-again", "")] == "shared with wide"
    assert all(s in ("done", "cached") for (_, p), s in status.items() if p)
    # Nothing finished in the killed run was computed again: the same files, not rewritten.
    after = _files(tmp_path / "cache" / "inversions")
    assert all(after[p] == v for p, v in steps_before.items() if "trajectory" in p)
    assert all(_files(tmp_path / "out")[p] == v for p, v in outputs_before.items())
    # And the outputs are one process's, byte for byte.
    ours = {p: (tmp_path / "out" / p).read_bytes() for p in _files(tmp_path / "out") if p.endswith(".mp4")}
    theirs = {p: (root / "out" / p).read_bytes() for p in reference if p.endswith(".mp4")}
    assert ours == theirs


def _trajectory(inv) -> torch.Tensor:
    return torch.stack([inv.entry.load(inv.entry.paths.step_file(i), "latent") for i in range(inv.steps)])


def _assert_split_run_is_one_process_run(tiny_model, clip, tmp_path, gpus: int, **options):
    """`run` over `gpus` workers, then the same in this process: the same trajectory and edits up to
    rounding (the same arithmetic; only how rows and heads are batched into calls differs)."""
    # 9 frames of 128x224 (one window of the tiny model): 336 image tokens after the 226 text ones,
    # so that every worker of a 2-way split holds image tokens (their rotary rows matter).
    common = dict(device="cpu", output="latents", guidance=5.0, **{**TINY, "frames": 9, "height": 128, "width": 224}, **options)
    prompts = ["a red car", "snow at night"]
    inv, split = engine.run(clip, tiny_model, prompts, gpus=gpus, cache_dir=tmp_path / "split", **common)
    assert inv.entry.complete
    one_inv, one = engine.run(clip, tiny_model, prompts, cache_dir=tmp_path / "one", **common)
    torch.testing.assert_close(_trajectory(inv), _trajectory(one_inv), rtol=1e-4, atol=1e-5)
    assert split.latents.shape == one.latents.shape
    torch.testing.assert_close(split.latents, one.latents, rtol=1e-4, atol=1e-5)
    return inv


def test_split_run_equals_one_process_run(tiny_model, wide_clip, tmp_path):
    """2 workers: the inversion (no guidance) splits its tokens 2 ways, the edit its guidance halves."""
    _assert_split_run_is_one_process_run(tiny_model, wide_clip, tmp_path, 2)


def test_four_workers_split_halves_and_tokens_and_equal_one_process(tiny_model, small_clip, tmp_path):
    """4 workers, inversion and edit with guidance: two halves, each splitting its tokens 2 ways (the
    tiny model's 2 heads, one per worker); injection at strength 0.5 (the bias over the joined keys)
    and the lean plan (row groups: the reference's K/V held across groups) run on the split tokens."""
    options = dict(source_prompt="a rabbit in a meadow", invert_guidance=3.0, inject_strength=0.5, plan="lean")
    _assert_split_run_is_one_process_run(tiny_model, small_clip, tmp_path, 4, **options)


def _block_model() -> torch.nn.Module:
    """A 4-head transformer of one block with cogedit's processor (seeded: every process builds the same)."""
    from engine.hooks.injection import CogVideoXAttnProcessor
    from engine.models.tiny import random_transformer

    torch.manual_seed(0)
    size = dict(num_attention_heads=4, attention_head_dim=16, time_embed_dim=16, text_embed_dim=32, num_layers=1, sample_width=20, sample_height=12, sample_frames=9)
    model = random_transformer("cpu", torch.float32, **size)
    model.set_attn_processor(CogVideoXAttnProcessor())
    return model


def _block_call(model: torch.nn.Module, split: TokenSplit | None) -> torch.Tensor:
    """One injected call (2 edit rows + their shared reference, strength 0.5) of `_block_model()`
    through row groups, one head per attention call (the caller sets injection.INJECT_HEADS = 1):
    tokens split over `split`'s group (None: all here)."""
    from engine.hooks.injection import InjectionState, KVInjectionConfig, apply_kv_injection
    from engine.hooks.row_groups import RowGroupConfig, apply_row_groups
    from engine.hooks.token_split import tokens_split
    from engine.models.denoiser import rotary_embeddings

    g = torch.Generator().manual_seed(1)
    # 3 latent frames of 9x13 patches: 351 image tokens, 577 with the text's, split 289 + 288 (or 145 + 144 x 3)
    x, text = torch.randn(3, 3, 16, 18, 26, generator=g), torch.randn(3, 226, 32, generator=g)
    state = InjectionState(active=True, n_edit=2, ref_of=torch.zeros(2, dtype=torch.long), strength=0.5)
    apply_row_groups(model, RowGroupConfig(1, state))
    apply_kv_injection(model, KVInjectionConfig(None, state))
    with tokens_split(model, split):
        return model(x, text, torch.tensor([500] * 3), image_rotary_emb=rotary_embeddings(model, x.shape, 8, "cpu"), return_dict=False)[0]


def _split_block_call() -> torch.Tensor:
    import torch.distributed as dist

    from engine.hooks import injection
    from engine.stages.distributed import process_group

    injection.INJECT_HEADS = 1  # each process's 2 heads in two calls: the projection's head shares
    with process_group("gloo"):
        return _block_call(_block_model(), TokenSplit(dist.group.WORLD, dist.get_rank(), 2))


def test_token_split_head_shares_row_groups_and_bias_equal_one_process(monkeypatch):
    """What the tiny model's 2 heads never reach: several heads per process projected a few at a
    time (on CogVideoX-5B 24 heads per process, 8 per call), the row groups' held reference K/V,
    and slices of unequal sizes; here in two worker processes (torchrun's launcher)."""
    from engine.hooks import injection
    from engine.stages.distributed import launch

    split = launch(_split_block_call, 2)
    monkeypatch.setattr(injection, "INJECT_HEADS", 1)
    torch.testing.assert_close(split[0], _block_call(_block_model(), None), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(split[1], split[0], rtol=0, atol=0)


@pytest.mark.parametrize("ways", [2, 4])
def test_a_token_split_call_equals_one_process_in_threads(monkeypatch, ways):
    """The same call split 2 and 4 ways over a group of threads (tests/groups.py): every rank ends
    with the whole call's output (4 ways: slices of 145 and 144 tokens, one head each)."""
    from engine.hooks import injection

    monkeypatch.setattr(injection, "INJECT_HEADS", 1)
    model = _block_model()
    models = [copy.deepcopy(model) for _ in range(ways)]  # one per rank, made before the threads start
    whole = _block_call(model, None)
    for out in in_threads(ways, lambda group, rank: _block_call(models[rank], TokenSplit(group, rank, ways))):
        torch.testing.assert_close(out, whole, rtol=1e-4, atol=1e-5)


def test_tokens_are_shared_out_as_evenly_as_they_go_in_rank_order():
    split = TokenSplit(None, 1, 3)
    split.share(8, 2)
    assert split.on and split.counts == (3, 3, 2) and split.text == 2 and split.total == 8
    assert [TokenSplit(None, r, 3, split.counts).start for r in range(3)] == [0, 3, 6]
    assert [TokenSplit(None, r, 3, split.counts).stop for r in range(3)] == [3, 6, 8]
    assert not TokenSplit().on


@pytest.mark.parametrize("ways", [2, 3])
def test_the_exchange_trades_tokens_for_heads_and_back(ways):
    """Over a group of threads (tests/groups.py), 8 tokens split unevenly: to_heads hands rank r
    head block r of every token in order, to_tokens undoes it, gather joins the slices."""
    heads, batch, dim = 2 * ways, 2, 3

    def exchange(group, rank):
        split = TokenSplit(group, rank, ways)
        split.share(8, 2)
        g = torch.Generator().manual_seed(rank)
        y = torch.randn(batch, heads, split.counts[rank], dim, generator=g)  # this rank's tokens, every head
        x = torch.randn(batch, split.counts[rank], 5, generator=g)
        mine = split.to_heads(y)
        return y, mine, split.to_tokens(mine.transpose(1, 2)), x, split.gather(x)

    out = in_threads(ways, exchange)
    every = torch.cat([o[0] for o in out], dim=2)  # [B, heads, 8, D]
    for rank, (y, mine, back, _, joined) in enumerate(out):
        assert torch.equal(mine, every[:, 2 * rank : 2 * rank + 2])
        assert torch.equal(back, y.transpose(1, 2))
        assert torch.equal(joined, torch.cat([o[3] for o in out], dim=1))


def test_guidance_halves_are_joined_unconditional_first_on_both():
    from engine.stages.distributed import GuidanceSplit

    v = [torch.full((2, 3), float(r)) for r in range(2)]
    for joined in in_threads(2, lambda group, rank: GuidanceSplit(rank, group).combine(v[rank].t())):
        assert torch.equal(joined, torch.cat([v[0].t(), v[1].t()]))


def test_the_launcher_returns_each_workers_result_and_its_first_error_in_one_line(monkeypatch, tmp_path):
    """`launch` through torchrun's launcher: results by rank, the arguments and multicast's switch
    handed to every worker, its own rendezvous port (torchrun's usual 29400 may be taken); a user's
    error comes back as itself, an unforeseen one as one line naming the worker, no worker is
    started again, and torchrun's own logs stay quiet (unless COGEDIT_DEBUG=1) and their levels as
    they were after."""
    import logging
    import socket

    from engine.stages.distributed import launch
    from tests.workers import refuse_on, where

    monkeypatch.delenv("COGEDIT_DEBUG", raising=False)
    monkeypatch.delenv("NCCL_NVLS_ENABLE", raising=False)
    with socket.socket() as busy:
        with contextlib.suppress(OSError):  # taken already: as good
            busy.bind(("localhost", 29400))
            busy.listen()
        assert launch(where, 2, "job", 7) == {0: (0, "job", 7, "0"), 1: (1, "job", 7, "0")}
    loggers = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.multiprocessing")]
    seen: list[str] = []
    keep = logging.Handler()
    keep.emit = lambda record: seen.append(f"{record.name}: {record.getMessage()}")
    for log, level in zip(loggers, (logging.INFO, logging.WARNING)):
        log.setLevel(level)
        log.addHandler(keep)
    tally = tmp_path / "starts"
    try:
        with pytest.raises(SettingsError, match="^worker 1's settings are bad$"):
            launch(refuse_on, 2, 1, True, str(tally))
        with pytest.raises(WorkerError, match="^worker 0 failed: ZeroDivisionError: worker 0 divided by zero; finished work is cached"):
            launch(refuse_on, 2, 0, False, str(tally))
        assert not seen, seen[:3]  # torchrun's records of the failures (and of each worker's start) stayed below the loggers' level
        monkeypatch.setenv("COGEDIT_DEBUG", "1")
        with pytest.raises(SettingsError):
            launch(refuse_on, 2, 1, True, str(tally))
        assert seen  # now they are shown
    finally:
        for log in loggers:
            log.removeHandler(keep)
    assert [log.level for log in loggers] == [logging.INFO, logging.WARNING]
    # no worker started twice in a launch: the failing one (1, 0, 1) starts each time; the other may be stopped before it starts
    starts = tally.read_text().split()
    assert starts.count("1") <= 3 and starts.count("0") <= 3, starts


def test_four_workers_make_the_mesh_docs_multi_gpu_describes():
    """--gpus 4 with guidance: workers 0-1 the unconditional half, 2-3 the conditional one, each
    half splitting its tokens 2 ways; worker r pairs with r +- 2 for guidance's halves. Without
    guidance all four split the tokens. Worker 0's word reaches every worker."""
    from engine.stages.distributed import launch
    from tests.workers import mesh_of

    got = launch(mesh_of, 4, 4, True, 4)
    halves = ["unconditional", "unconditional", "conditional", "conditional"]
    assert got == {r: (f"{halves[r]} rows here, tokens split 2 ways", [r % 2, r % 2 + 2], [r - r % 2, r - r % 2 + 1], r % 2, "from worker 0") for r in range(4)}
    assert launch(mesh_of, 4, 4, False, 4)[3] == ("tokens split 4 ways", None, [0, 1, 2, 3], 3, "from worker 0")


def test_a_worker_killed_mid_edit_ends_in_one_line_and_leaves_the_cache(tiny_model, wide_clip, tmp_path, monkeypatch):
    inv = engine.invert(wide_clip, tiny_model, cache_dir=tmp_path / "cache", device="cpu", **TINY)
    before = _files(tmp_path / "cache")
    monkeypatch.setenv("COGEDIT_TEST_KILL_AT", "edit:2")
    monkeypatch.setenv("COGEDIT_TEST_KILL_RANK", "1")
    with pytest.raises(WorkerError, match="^worker 1 was killed by SIGKILL; finished work is cached"):
        engine.edit(inv.id, ["a red car"], cache_dir=tmp_path / "cache", out_dir=tmp_path / "out", device="cpu", guidance=1.0, gpus=2)
    after = _files(tmp_path / "cache")
    # The inversion as it was (its manifest records the use), and only whole files added: the
    # prompt's embedding, written whole before the first edit step.
    assert {p: v for p, v in after.items() if p in before and not p.endswith("manifest.json")} == {p: v for p, v in before.items() if not p.endswith("manifest.json")}
    assert set(before) <= set(after) and all(p.startswith("prompts/") for p in set(after) - set(before))
    assert engine.open_inversion(inv.id, tmp_path / "cache").entry.complete
    assert not [p for p in (tmp_path / "cache").rglob(".*") if p.is_file()], "no half-written file"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), "no output of a failed edit"


def test_work_is_split_by_cost_inversions_first():
    def job(name: str, steps: int, prompts: int, video: str | None = None) -> Job:
        return Job(name, video or f"{name}.mp4", tuple(f"p{i}" for i in range(prompts)), "m", {"steps": steps})

    big, small, shared = job("big", 50, 4), job("small", 10, 1), job("again", 50, 1, video="big.mp4")
    units = [Unit("invert", (big, shared), 50.0), Unit("invert", (small,), 10.0), Unit("edit", (big,), 450.0), Unit("edit", (shared,), 150.0), Unit("edit", (small,), 30.0)]
    share = assign(units, 2)
    assert [[(u.kind, u.jobs[0].name) for u in s] for s in share] == [
        [("invert", "big"), ("edit", "big")],
        [("invert", "small"), ("edit", "again"), ("edit", "small")],
    ]


BAD_JOBS = {
    "missing file": (None, "cannot read jobs file"),
    "not toml": ("[[job]\nvideo = 1", "is not valid TOML"),
    "no jobs": ("title = 'x'", "unknown top-level key(s) title"),
    "empty": ("", "has no [[job]] tables"),
    "no video": ('[[job]]\nprompts = ["a"]', "has no video"),
    "prompts not a list": ('[[job]]\nvideo = "a.mp4"\nprompts = "a"', "prompts must be a list of non-empty strings"),
    "unknown key": ('[[job]]\nvideo = "a.mp4"\nprompts = ["a"]\nstep = 3', "unknown key(s) step"),
    "unknown option": ('[[job]]\nvideo = "a.mp4"\nprompts = ["a"]\n[job.invert]\nstep = 3', "got unknown option(s) step"),
    "batch's own option": ('[[job]]\nvideo = "a.mp4"\nprompts = ["a"]\n[job.edit]\nout_dir = "x"', "the batch sets out_dir for every job"),
}


@pytest.mark.parametrize("case", BAD_JOBS)
def test_bad_jobs_file_is_one_line(case, tmp_path):
    text, message = BAD_JOBS[case]
    path = tmp_path / "jobs.toml"
    if text is not None:
        path.write_text(text)
    result = CliRunner().invoke(cli, ["batch", str(path), "--model", str(tmp_path)])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_no_model_and_gpus_misuse_are_one_line(tmp_path):
    path = tmp_path / "jobs.toml"
    path.write_text('[[job]]\nvideo = "a.mp4"\nprompts = ["a"]')
    cases = [
        (["batch", str(path)], "names no model — pass --model"),
        (["edit", "abc", "--prompt", "a", "--gpus", "3"], "--gpus takes 1, 2, 4, 8, got 3"),
        (["edit", "abc", "--prompt", "a", "--gpus", "9"], "9 is not in the range 1<=x<=8"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(cli, args)
        assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output, result.output


def test_api_misuse_is_refused_before_any_work(tmp_path):
    jobs = _jobs(tmp_path / "jobs.toml")
    cases = [
        (lambda: engine.edit("abc", ["a"], skip_existing=True, force=True), "give skip_existing or force, not both"),
        (lambda: engine.edit("abc", ["a"], gpus=2, callback=print), "where a callback cannot reach"),
        (lambda: engine.batch(jobs, "m", steps=3), "batch() got unknown option(s) steps"),
        (lambda: engine.batch(jobs, "m", output="latents"), "batch output must be mp4 or frames"),
        (lambda: engine.batch(jobs, "m", nproc=2, device="cuda:1"), "--device cuda:1 with several workers"),
        (lambda: engine.edit("abc", ["a"], gpus=2, device="cuda:1"), "--device cuda:1 with several workers"),
    ]
    for call, message in cases:
        with pytest.raises(SettingsError, match=re.escape(message)):
            call()


def test_a_worker_killed_mid_inversion_keeps_worker_0s_finished_steps(tiny_model, wide_clip, tmp_path, monkeypatch):
    """Worker 1 computes its token share of worker 0's inversion and dies after its 2nd step: worker 0,
    which writes the cache, cannot finish the 3rd; the run ends in one line, the steps before stay."""
    monkeypatch.setenv("COGEDIT_TEST_KILL_AT", "step:2")
    monkeypatch.setenv("COGEDIT_TEST_KILL_RANK", "1")
    with pytest.raises(WorkerError, match="^worker 1 was killed by SIGKILL; finished work is cached"):
        engine.run(wide_clip, tiny_model, ["a red car"], cache_dir=tmp_path / "cache", out_dir=tmp_path / "out", device="cpu", guidance=1.0, gpus=2, **TINY)
    steps = sorted(p.name for p in (tmp_path / "cache").rglob("step_*.safetensors"))
    assert steps[:1] == ["step_0000.safetensors"] and "step_0002.safetensors" not in steps
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_what_gpus_cannot_share_out_is_refused_before_any_worker(tiny_model, wide_clip, tmp_path):
    cases = [
        # the tiny model has 2 heads: a call without guidance cannot split its tokens 4 ways
        (dict(gpus=4, guidance=1.0), "--gpus 4 splits the tokens 4 ways, which the model's 2 attention heads do not divide into: use --gpus 1 or 2"),
        (dict(gpus=4), "--gpus 4 splits the tokens 4 ways"),  # the edit has guidance, the inversion does not
        (dict(gpus=2, guidance=1.0, reference="stored"), "stored attention holds every token's keys in one process: use --reference shared"),
        (dict(gpus=2, attention_store="cpu"), "stored attention is captured in one process"),
    ]
    for options, message in cases:
        with pytest.raises(SettingsError, match=re.escape(message)):
            engine.run(wide_clip, tiny_model, ["a red car"], cache_dir=tmp_path / "cache", device="cpu", **TINY, **options)
    assert not (tmp_path / "cache").exists()


def test_how_gpus_share_a_call_as_docs_multi_gpu_says(monkeypatch):
    """(guidance halves, token split ways) for CogVideoX-5B's 48 heads: docs/multi-gpu.md's table."""
    table = {(2, True): (2, 1), (4, True): (2, 2), (8, True): (2, 4), (2, False): (1, 2), (4, False): (1, 4), (8, False): (1, 8)}
    assert {key: shares(*key, 48) for key in table} == table
    assert shares(1, True, 48) == (1, 1)
    monkeypatch.setenv("WORLD_SIZE", "4")  # a group started by hand with another size than --gpus
    with pytest.raises(SettingsError, match=re.escape("--gpus 2 needs 2 workers, this group has 4; start it with --nproc-per-node 2")):
        Mesh.make(2, True, 48)


def test_a_worker_hands_its_own_gpu_on_unrefused(monkeypatch):
    """On a GPU box `run --gpus 2` with no --device: each worker resolves None to its GPU and
    hands that on to `edit`, which checks and resolves it again (the H200 run was refused here)."""
    for name, value in {"LOCAL_RANK": "1", "RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    device = worker_device(None)
    assert device == "cuda:1"
    _check_gpus(2, None, device)  # what edit checks first
    assert worker_device(device) == device
    with pytest.raises(SettingsError, match=re.escape("--device cuda:0 with several workers")):
        worker_device("cuda:0")  # another worker's GPU is still refused
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert worker_device(None) == "cpu"
    with pytest.raises(DeviceError, match="torch sees no GPU"):
        worker_device("cuda")


def test_batch_command_prints_one_table_and_exits_1_on_a_failed_job(one_process, tiny_model):
    root, *_ = one_process
    args = ["batch", str(root / "jobs.toml"), "--model", str(tiny_model), "--out", str(root / "out"), "--cache-dir", str(root / "cache"), "--device", "cpu", "--json"]
    result = CliRunner().invoke(cli, args, env={"COLUMNS": "250"})
    assert result.exit_code == 1, result.output
    assert "cogedit batch into" in result.output and "(inversion)" in result.output
    assert "2 of 10 rows failed (job(s) gone)" in result.output and "Traceback" not in result.output
    rows = json.loads(next(line for line in result.output.splitlines() if line.startswith("[{")))
    assert {r["status"] for r in rows if r["prompt"] and r["job"] != "gone"} == {"cached"}
