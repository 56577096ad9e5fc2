"""`cogedit batch JOBS.toml`: many videos and prompts, in one process or in many (torchrun).

    [[job]]
    video = "clips/street.mp4"            # relative to the jobs file
    prompts = ["a watercolor painting", "a charcoal sketch at night"]
    # name = "street"                     # the output folder (default: the video's name)
    # model = "THUDM/CogVideoX-5b"        # default: --model
    [job.invert]                          # engine.invert's options
    steps = 50
    [job.edit]                            # engine.edit's options
    inject_steps = "0:0.6"

The work is a list of units: one inversion per distinct (video, model, invert options), however
many jobs share it, then one edit per job. With several workers each takes its share, split by
expected cost (inversions first, then edits, each longest first to the worker where it would end
soonest); an edit whose inversion another worker is computing waits
on that entry's lock and then reads it from the cache, so nothing is inverted twice. Everything
lands in the cache or in `<out>/<job>/` as it is finished, so a re-run skips what is done and
rewrites nothing, and a worker killed mid-run loses only the step it was in.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from engine.errors import USER_ERRORS, SettingsError
from engine.models.components import Runtime
from engine.models.model_info import ModelDefaults, inspect_model
from engine.options import EditOptions, InvertOptions, RuntimeOptions, names, parse
from engine.report import Reporter, progress_view
from engine.stages.distributed import check_worker_device, process_group, rank, under_torchrun, worker_device, world_size
from engine.workflow import edit, invert, on_workers

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

JOB_KEYS = {"video", "prompts", "name", "model", "invert", "edit"}
# Options the batch sets for every job: where each worker runs and where files go.
BATCH_OWNED = {"device", "out_dir", "force", "skip_existing", "output", "gpus"}
# A gather at the end waits for the slowest worker; a large batch can keep it waiting for hours.
GATHER_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class Job:
    """One `[[job]]` table: a video, its prompts, and its own invert / edit options."""

    name: str
    video: str
    prompts: tuple[str, ...]
    model: str
    invert: dict[str, Any] = field(default_factory=dict)
    edit: dict[str, Any] = field(default_factory=dict)

    @property
    def inversion_key(self) -> str:
        """Jobs with equal keys share one inversion (the cache's id is only known after probing):
        the same video, model and invert options, a default typed out or left out alike."""
        options = dataclasses.asdict(InvertOptions(**self.invert))
        return json.dumps([str(Path(self.video).resolve()), self.model, options], sort_keys=True, default=str)


@dataclass(frozen=True)
class Row:
    """One line of the closing table: an inversion (prompt "") or one prompt's edit."""

    job: str
    prompt: str
    output: str
    seconds: float
    status: str  # done | cached | failed: <why>
    worker: int = 0

    @property
    def failed(self) -> bool:
        return self.status.startswith("failed")


@dataclass(frozen=True)
class BatchResult:
    """Every row of the batch (on worker 0; a worker other than 0 holds only its own)."""

    rows: tuple[Row, ...]
    out_dir: Path  # outputs are relative to it
    workers: int = 1

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.failed]

    def table(self, title: str = "cogedit batch") -> Any:
        from rich.table import Table

        table = Table(title=f"{title} into {self.out_dir}: {len(self.rows)} rows, {len(self.failed)} failed" + (f", {self.workers} workers" if self.workers > 1 else ""), title_justify="left")
        for col in ("job", "prompt", "output", "seconds", "status"):
            table.add_column(col, justify="right" if col == "seconds" else "left", overflow="fold")
        for r in self.rows:
            status = f"[red]{r.status}" if r.failed else r.status
            table.add_row(r.job, r.prompt or "[dim](inversion)", r.output, f"{r.seconds:.1f}", status)
        return table


@dataclass(frozen=True)
class Unit:
    kind: str  # invert | edit
    jobs: tuple[Job, ...]  # an inversion's jobs (all that share it), or the one job of an edit
    cost: float


# ---------------------------------------------------------------------------- the jobs file


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"cannot read jobs file {path}: {exc.strerror or exc} — pass the path of a TOML file with one [[job]] table per video") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{path} is not valid TOML: {exc} — fix it (https://toml.io)") from None


def _options(raw: Any, cls: type, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise SettingsError(f"{where} must be a table of options, e.g. steps = 50")
    owned = sorted(set(raw) & BATCH_OWNED)
    if owned:
        raise SettingsError(f"{where}: the batch sets {', '.join(owned)} for every job; remove it (--out names the output folder)")
    parse(cls, raw, where)  # unknown names, refused before any work
    return dict(raw)


def read_jobs(path: str | Path, model: str | Path | None = None) -> list[Job]:
    """The jobs of a jobs file, checked before any work; paths are relative to the file."""
    path = Path(path)
    data = _load_toml(path)
    extra = sorted(set(data) - {"job"})
    if extra:
        raise SettingsError(f"{path}: unknown top-level key(s) {', '.join(extra)}; a jobs file holds [[job]] tables only")
    tables = data.get("job")
    if not isinstance(tables, list) or not tables:
        raise SettingsError(f'{path} has no [[job]] tables — add one per video: [[job]] video = "clip.mp4" prompts = ["a watercolor painting"]')
    jobs = []
    for n, raw in enumerate(tables, 1):
        where = f"{path}, job {n}"
        unknown = sorted(set(raw) - JOB_KEYS)
        if unknown:
            raise SettingsError(f"{where}: unknown key(s) {', '.join(unknown)}; a job takes {', '.join(sorted(JOB_KEYS))}")
        video = raw.get("video")
        if not isinstance(video, str) or not video:
            raise SettingsError(f'{where} has no video — add video = "clip.mp4"')
        prompts = raw.get("prompts")
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise SettingsError(f'{where}: prompts must be a list of non-empty strings, e.g. prompts = ["a watercolor painting"]')
        job_model = raw.get("model", model)
        if not job_model:
            raise SettingsError(f'{where} names no model — pass --model, or add model = "THUDM/CogVideoX-5b" to the job')
        video_path = (path.parent / video) if not Path(video).is_absolute() else Path(video)
        name = raw.get("name", Path(video).stem)
        if not isinstance(name, str) or not name or Path(name).name != name:
            raise SettingsError(f'{where}: name must be a plain folder name, e.g. name = "street"')
        invert_opts = _options(raw.get("invert", {}), InvertOptions, f"{where} [job.invert]")
        edit_opts = _options(raw.get("edit", {}), EditOptions, f"{where} [job.edit]")
        jobs.append(Job(name, str(video_path), tuple(prompts), str(job_model), invert_opts, edit_opts))
    return jobs


# ---------------------------------------------------------------------------- the split


@functools.lru_cache(maxsize=16)
def _model_defaults(model: str) -> ModelDefaults:
    return inspect_model(model).defaults


def _costs(job: Job) -> tuple[float, float]:
    """Expected (inversion, edit) cost in transformer row-steps x pixels: a row's forward grows
    with its tokens, and the steps and rows multiply it."""
    inv, ed = InvertOptions(**job.invert), EditOptions(**job.edit)
    sizes = (inv.frames, inv.height, inv.width)
    if None in sizes:  # left to the model
        own = _model_defaults(job.model)
        sizes = (inv.frames or own.frames, inv.height or own.height, inv.width or own.width)
    pixels = sizes[0] * sizes[1] * sizes[2]
    inv_rows = 2 if inv.source_prompt != inv.negative_prompt and inv.guidance != 1.0 else 1
    forwards = 3 if inv.inversion == "fixed-point" else 1
    k = len(job.prompts)
    edit_rows = (2 * k if ed.guidance != 1.0 else k) + 1  # + the shared reference row
    return inv.steps * pixels * inv_rows * forwards, inv.steps * pixels * edit_rows


def plan_units(jobs: list[Job]) -> list[Unit]:
    """Inversions (each once, with every job that needs it), then one edit per job."""
    shared: dict[str, list[Job]] = {}
    for job in jobs:
        shared.setdefault(job.inversion_key, []).append(job)
    inversions = [Unit("invert", tuple(group), _costs(group[0])[0]) for group in shared.values()]
    return inversions + [Unit("edit", (job,), _costs(job)[1]) for job in jobs]


def assign(units: list[Unit], workers: int) -> list[list[Unit]]:
    """Each worker's units: inversions, then edits, each longest first to the worker where it
    would end soonest; an edit cannot start before its inversion ends, wherever that runs, and on
    a tie it goes where its inversion is. The same on every worker, so no messages are needed."""
    load = [0.0] * workers
    share: list[list[Unit]] = [[] for _ in range(workers)]
    ready: dict[str, tuple[float, int]] = {}  # inversion key -> (when it ends, its worker)
    for kind in ("invert", "edit"):
        for u in sorted((u for u in units if u.kind == kind), key=lambda u: -u.cost):  # stable: file order on ties
            after, home = ready.get(u.jobs[0].inversion_key, (0.0, 0))
            w = min(range(workers), key=lambda w: (max(load[w], after) + u.cost, w != home, w))
            load[w] = max(load[w], after) + u.cost
            share[w].append(u)
            if kind == "invert":
                ready[u.jobs[0].inversion_key] = (load[w], w)
    return share


# ---------------------------------------------------------------------------- running


def _failure(exc: Exception) -> str:
    if isinstance(exc, USER_ERRORS):
        return f"failed: {exc}"
    return f"failed: unexpected {type(exc).__name__}: {' '.join(str(exc).split())}"


def _hit(reporter: Reporter) -> bool:
    return any(r.name == "invert" and r.cache_hit for r in reporter.records)


def _run_unit(unit: Unit, common: dict[str, Any], cache_dir: str | Path | None, out_dir: Path, output: str, reporter: Reporter) -> list[Row]:
    job, me = unit.jobs[0], rank()
    start = time.perf_counter()
    try:
        inv = invert(job.video, job.model, cache_dir=cache_dir, reporter=reporter, **{**common, **job.invert})
    except Exception as exc:  # a failed job is reported, and the others go on
        return [Row(j.name, p, "", 0.0, _failure(exc), me) for j in unit.jobs for p in ([""] if unit.kind == "invert" else j.prompts)]
    if unit.kind == "invert":
        first = Row(job.name, "", inv.id[:12], time.perf_counter() - start, "cached" if _hit(reporter) else "done", me)
        return [first] + [Row(j.name, "", inv.id[:12], 0.0, f"shared with {job.name}", me) for j in unit.jobs[1:]]
    start = time.perf_counter()
    opts = {k: v for k, v in common.items() if k != "dtype"}
    try:
        result = edit(inv, list(job.prompts), cache_dir=cache_dir, reporter=reporter, out_dir=str(out_dir / job.name), output=output,
                      skip_existing=True, **{**opts, **job.edit})
    except Exception as exc:
        return [Row(job.name, p, "", 0.0, _failure(exc), me) for p in job.prompts]
    each = (time.perf_counter() - start) / max(1, len(job.prompts) - len(result.skipped))
    outputs = [str(Path(v).relative_to(out_dir)) for v in result.videos] or [f"({output})"] * len(job.prompts)
    return [Row(job.name, p, v, 0.0 if p in result.skipped else each, "cached" if p in result.skipped else "done", me) for p, v in zip(result.prompts, outputs)]


def _run_share(units: list[Unit], common: dict[str, Any], cache_dir, out_dir: Path, output: str, reporter: Reporter) -> list[Row]:
    """This worker's units in order, under one progress view; every phase lands in `reporter`."""
    rows: list[Row] = []
    console = reporter.console
    progress = progress_view(console) if console is not None else None
    if progress is not None:
        progress.start()
        overall = progress.add_task(f"batch (worker {rank()} of {world_size()})" if world_size() > 1 else "batch", total=len(units))
    try:
        for unit in units:
            mine = Reporter(device=reporter.device, progress=progress)
            rows += _run_unit(unit, common, cache_dir, out_dir, output, mine)
            reporter.records += mine.records
            if progress is not None:
                progress.advance(overall)
    finally:
        if progress is not None:
            progress.stop()
    return rows


def _in_file_order(rows: list[Row], jobs: list[Job]) -> tuple[Row, ...]:
    order = {j.name: n for n, j in enumerate(jobs)}
    prompt_order = {(j.name, p): n for j in jobs for n, p in enumerate(("",) + j.prompts)}
    return tuple(sorted(rows, key=lambda r: (order.get(r.job, 0), prompt_order.get((r.job, r.prompt), 0))))


def batch(
    jobs: str | Path,
    model: str | Path | None = None,
    *,
    out_dir: str | Path = "cogedit-batch",
    nproc: int = 1,
    output: str = "mp4",
    cache_dir: str | Path | None = None,
    reporter: Reporter | None = None,
    **options: Any,
) -> BatchResult:
    """Run every job of the jobs file `jobs`: inversions first, then edits, into `out_dir/<job>/`.

    `options` are runtime options for every job (plan, vram, compile, fp8, attention, device, dtype); a
    job's own [job.invert] / [job.edit] tables win. `nproc` > 1 starts that many workers through
    torchrun (one GPU each, LOCAL_RANK; the CPU where there is none); a process that torchrun
    started (by hand, across machines) is one worker of the batch whatever `nproc` says. Returns
    every row on worker 0; a failed job is a row, not an exception. `output="frames"` decodes
    every edit and keeps nothing (a re-run does it all again): timing on a machine without ffmpeg.
    """
    plan = read_jobs(jobs, model)  # refuse a bad file before anything starts
    bad = sorted(set(options) - names(RuntimeOptions))
    if bad:
        raise SettingsError(f"batch() got unknown option(s) {', '.join(bad)}; it takes plan, vram, compile, fp8, attention, device, dtype (the rest go in the jobs file)")
    if output not in ("mp4", "frames"):
        raise SettingsError(f"batch output must be mp4 or frames, got {output!r}")
    if nproc > 1:
        check_worker_device(options.get("device"))
    common = {**options, "device": worker_device(options.get("device")) if under_torchrun() else options.get("device")}
    reporter = reporter or Reporter(device=Runtime.default(common["device"]).device)
    if nproc > 1 and not under_torchrun():
        return on_workers(nproc, reporter, batch, jobs, model, out_dir=out_dir, output=output, cache_dir=cache_dir, **options)
    units = plan_units(plan)
    if not under_torchrun():
        return BatchResult(_in_file_order(_run_share(units, common, cache_dir, Path(out_dir), output, reporter), plan), Path(out_dir))
    # Objects only cross workers here, so gloo suffices whatever the device, and waits long.
    with process_group("gloo", timeout=GATHER_TIMEOUT):
        import torch.distributed as dist

        mine = _run_share(assign(units, world_size())[rank()], common, cache_dir, Path(out_dir), output, reporter)
        everyone: list[list[Row]] | None = [[] for _ in range(world_size())] if rank() == 0 else None
        dist.gather_object(mine, everyone, dst=0)
    rows = [r for part in everyone for r in part] if everyone is not None else mine
    return BatchResult(_in_file_order(rows, plan), Path(out_dir), world_size())
