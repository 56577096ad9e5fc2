"""`cogedit` command line: parse, call `engine`, print. Nothing here computes anything.

Errors the user can fix print as one line (exit 1); `--debug` or COGEDIT_DEBUG=1 shows the
traceback instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys

import click

DEBUG_ENV = "COGEDIT_DEBUG"


def _console():
    from rich.console import Console

    # Bars and tables go to stderr so stdout carries only results (ids, JSON, paths).
    return Console(stderr=True)


class CogeditGroup(click.Group):
    """Turns engine errors into one-line messages, in one place."""

    def invoke(self, ctx: click.Context):
        from engine.errors import USER_ERRORS

        debug = ctx.params.get("debug") or os.environ.get(DEBUG_ENV) == "1"
        try:
            return super().invoke(ctx)
        except USER_ERRORS as exc:
            if debug:
                raise
            raise click.ClickException(str(exc)) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:  # a bug or an unforeseen failure: still one line, and --debug shows where
            if debug:
                raise
            detail = " ".join(str(exc).split())
            raise click.ClickException(f"unexpected {type(exc).__name__}: {detail} — run again with --debug for the traceback, and report it") from None
        except KeyboardInterrupt:
            if debug:
                raise
            click.echo("interrupted: finished steps are cached; run the same command again to resume", err=True)
            sys.exit(130)


@click.group(cls=CogeditGroup)
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="cogedit")
def cli(debug: bool) -> None:
    """Edit existing videos with CogVideoX-5B: invert once, render many prompt edits from the cache.

    \b
    cogedit demo                                   # trained proxy, real clip, two edits
    cogedit ui                                     # the web app, on http://127.0.0.1:7860
    cogedit invert clip.mp4 --model THUDM/CogVideoX-5b
    cogedit edit 3fa2 --prompt "a watercolor painting" --prompt "a charcoal sketch"
    """
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[RichHandler(console=_console(), show_path=False)])


VRAM_HELP = "Your GPU's memory as sold (12GB, or just 12: a 12 GB card has 12 GiB); picks the fastest memory plan predicted to fit."


def _vram_bytes(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    from engine.models.plans import parse_vram

    try:
        return parse_vram(value) if value is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


# Shared options, as decorators (one definition each).
def cache_option(f):
    return click.option("--cache-dir", type=click.Path(file_okay=False), envvar="COGEDIT_CACHE", help="Cache folder (default: $COGEDIT_CACHE, else ~/.cache/cogedit).")(f)


def runtime_options(f):
    f = click.option(
        "--attention", type=click.Choice(["auto", "sdpa", "fa4", "sage"]), default="auto", show_default=True,
        help='Attention kernel: auto = FlashAttention-4 where installed (pip install -e ".[fast]") on Hopper/Blackwell, else torch SDPA; '
        'sage = SageAttention (pip install -e ".[sage]"): lossy, opt-in (docs/attention.md).',
    )(f)
    f = click.option("--fp8", is_flag=True, help='FP8 matmuls in the transformer blocks (torchao; RTX 40xx/L4/H100): faster, a small accuracy cost. pip install -e ".[fp8]" in cogedit\'s folder.')(f)
    f = click.option(
        "--compile/--no-compile", "compile_blocks", default=None,
        help="torch.compile each transformer block; on by default for the edit only (where it pays: README, Speed), on a CUDA GPU with Triton for staged and lean.",
    )(f)
    f = click.option("--vram", default=None, callback=_vram_bytes, help=VRAM_HELP)(f)
    f = click.option("--plan", default=None, help="Memory plan by name: staged, lean, int8, nf4, offload (see `cogedit plan`).")(f)
    f = click.option("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available).")(f)
    return f


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")(f)


def invert_options(cfg_prefix: str):
    """Inversion options; `run` names the inversion's CFG flags --invert-guidance and
    --invert-negative-prompt (`cfg_prefix` "--invert-"), beside the edit's --guidance and --negative-prompt."""

    def decorate(f):
        return _invert_options(f, cfg_prefix)

    return decorate


class FramesType(click.types.IntParamType):
    """--frames: a number, or "all"."""

    name = "frames"

    def convert(self, value, param, ctx):
        if value == "all":
            return value
        try:
            return int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither a number nor 'all'", param, ctx)


def _invert_options(f, cfg_prefix: str):
    for opt in reversed(
        [
            click.option("--model", required=True, help="CogVideoX-5b or CogVideoX1.5-5b folder or hub id (THUDM/CogVideoX-5b, THUDM/CogVideoX1.5-5b)."),
            click.option("--steps", default=50, show_default=True, help="DDIM steps (inversion and edit use the same)."),
            click.option(
                "--frames", default=None, type=FramesType(),
                help="Most frames to use, spread over the clip (kept to 4k+1; default: the model's, 49 for 5B, 81 for 1.5), "
                "or 'all': every frame (at --fps; run: --invert-fps), in overlapping windows when longer than the model's.",
            ),
            click.option(
                f"{cfg_prefix}fps", "invert_fps", default=None, type=float,
                help="Read the clip at this frame rate (default: the source's; with --frames all the model's: 8 for 5B, 16 for 1.5).",
            ),
            click.option("--window-overlap", default=None, type=int, help="Latent frames that neighbouring windows of a long clip share (default: 4 for CogVideoX-5B)."),
            click.option("--skip-start", default=0, show_default=True, help="Frames to drop at the start."),
            click.option("--skip-end", default=0, show_default=True, help="Frames to drop at the end."),
            click.option("--stride", default=None, type=int, help="Take every N-th frame (default: spread evenly)."),
            click.option("--height", default=None, type=int, help="Frame height (default: the model's, 480 for 5B, 768 for 1.5)."),
            click.option("--width", default=None, type=int, help="Frame width (default: the model's, 720 for 5B, 1360 for 1.5)."),
            click.option(
                "--fit", type=click.Choice(["stretch", "crop", "pad"]), default="stretch", show_default=True,
                help="A source of another shape: stretch it (upstream), crop it to fill the frame, or pad it with black bars.",
            ),
            click.option("--source-prompt", default="", help="Prompt describing the source (default: empty)."),
            click.option(f"{cfg_prefix}guidance", "invert_guidance", default=6.0, show_default=True, help="CFG scale of the inversion (no effect when source and negative prompts are equal)."),
            click.option(f"{cfg_prefix}negative-prompt", "invert_negative_prompt", default="", help="Negative prompt of the inversion's CFG (default: empty)."),
            click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None, help="Model precision (default: bf16 on GPU, fp32 on CPU)."),
            click.option(
                "--inversion", type=click.Choice(["ddim", "fixed-point"]), default="ddim", show_default=True,
                help="Plain DDIM inversion, or each step refined towards the exact inverse (sharper reconstructions, more forwards).",
            ),
            click.option("--inversion-iters", default=None, type=int, help="Fixed-point refinements per step (default 1: 3 transformer forwards per step)."),
            click.option("--verify", is_flag=True, help="Denoise the inverted noise back and report the round trip's latent error and PSNR."),
            click.option("--attention-store", type=click.Choice(["none", "cpu", "disk"]), default="none", show_default=True, help="Capture reference K/V while inverting, for --reference stored."),
            click.option("--attention-steps", default="0:1", show_default=True, help="START:END fraction of edit steps to store (like --inject-steps)."),
            click.option("--attention-layers", default="all", show_default=True, help="Blocks to store: all, or a list like 0-20,30."),
            click.option("--attention-dtype", type=click.Choice(["model", "bf16", "fp8"]), default="model", show_default=True, help="Stored precision; fp8 halves the size."),
            click.option("--attention-budget", default=None, help="Refuse a store larger than this (e.g. 50GB; default: 90% of free disk, or half of free RAM)."),
        ]
    ):
        f = opt(f)
    return f


def _no_at_file(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    for prompt in value:
        if prompt.startswith("@") and not prompt.split()[1:]:  # "@edits.txt": a file, not a prompt
            raise click.BadParameter(f"{prompt!r} looks like a file: read prompts from it with --prompts-file {prompt[1:]}", param_hint="--prompt")
    return value


def _all_prompts(prompts: tuple[str, ...], prompts_file: str | None) -> list[str]:
    """--prompt's prompts, then the file's: one a line, skipping blank lines and # comments."""
    if prompts_file is None:
        if not prompts:
            raise click.UsageError("Missing option '--prompt': give --prompt TEXT (repeat it for several edits) or --prompts-file FILE")
        return list(prompts)
    with open(prompts_file, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    read = [line for line in lines if line and not line.startswith("#")]
    if not read:
        raise click.BadParameter(f"{prompts_file} has no prompts (one a line; lines starting with # are comments)", param_hint="--prompts-file")
    return [*prompts, *read]


def edit_options(f):
    for opt in reversed(
        [
            click.option("--prompt", "prompts", multiple=True, callback=_no_at_file, help="Edit prompt; repeat for several edits."),
            click.option(
                "--prompts-file", type=click.Path(exists=True, dir_okay=False),
                help="A file of edit prompts, one a line (blank lines and lines starting with # are skipped); adds to --prompt.",
            ),
            click.option("--negative-prompt", default="", help="Negative prompt for CFG."),
            click.option(
                "--negative-from-source", is_flag=True,
                help="The inversion's source prompt as the negative prompt: negative-prompt inversion, with an inversion made at --guidance 1.",
            ),
            click.option("--guidance", default=6.0, show_default=True, help="CFG scale of the edit (1 = off)."),
            click.option("--init", type=click.Choice(["inverted", "random"]), default="inverted", show_default=True, help="Start from the inverted noise or seeded noise (upstream)."),
            click.option("--seed", default=0, show_default=True, help="Seed for --init random."),
            click.option("--inject-steps", default="0:1", show_default=True, help="START:END fraction of steps that inject reference attention."),
            click.option("--inject-layers", default="all", show_default=True, help="Blocks that inject: all, or a list like 0-20,30."),
            click.option("--inject-strength", default=1.0, show_default=True, help="0 = no injection, 1 = upstream."),
            click.option(
                "--reference", type=click.Choice(["shared", "per-half", "stored"]), default="shared", show_default=True,
                help="One shared reference row, one per CFG half (upstream), or replayed stored attention.",
            ),
            click.option("--batch", default=4, show_default=True, help="Prompts rendered per transformer pass."),
            click.option(
                "--mask", default=None, type=click.Path(),
                help="Local edit: an image (all frames) or a video (one mask per frame), white where the edit may change; the rest keeps the source.",
            ),
            click.option("--mask-box", default=None, help="Local edit inside a box X0,Y0,X1,Y1 in fractions of the frame, e.g. 0.25,0.2,0.75,0.8."),
            click.option("--mask-box-end", default=None, help="The box on the last frame: the box moves from --mask-box (first frame) to it, following a moving object."),
            click.option(
                "--mask-fit", type=click.Choice(["none", "object"]), default="none", show_default=True,
                help="object: shrink the mask, frame by frame, to what stands apart from its edge (the object in the box), so the box is not painted.",
            ),
            click.option(
                "--mask-paste", is_flag=True,
                help="Put the decoded edit into the source through the mask, frame by frame: outside the mask the output is the source exactly.",
            ),
            click.option("--fps", default=None, type=float, help="Output frame rate (default: the source's, adjusted for frame selection)."),
            click.option("--out", "out_dir", default=".", type=click.Path(file_okay=False), show_default=True, help="Folder for the mp4 files."),
            click.option("--force", is_flag=True, help="Overwrite existing output files."),
            click.option(
                "--gpus", default=1, show_default=True, type=click.IntRange(1, 8),
                help="2, 4 or 8 GPUs (processes through torchrun): guidance's two halves on two groups, each splitting the tokens.",
            ),
        ]
    ):
        f = opt(f)
    return f


def _invert_kwargs(p: dict, cfg_prefix: str = "") -> dict:
    """The inversion's keywords; `run` names its CFG settings `invert_guidance` and
    `invert_negative_prompt` (`cfg_prefix` "invert_"), beside the edit's."""
    from cache.sizes import parse_size

    budget = p["attention_budget"]
    try:
        budget = parse_size(budget) if budget is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--attention-budget") from None
    return dict(
        steps=p["steps"], frames=p["frames"], window_overlap=p["window_overlap"], **{f"{cfg_prefix}fps": p["invert_fps"]},
        skip_start=p["skip_start"], skip_end=p["skip_end"], stride=p["stride"],
        height=p["height"], width=p["width"], fit=p["fit"], source_prompt=p["source_prompt"],
        **{f"{cfg_prefix}guidance": p["invert_guidance"], f"{cfg_prefix}negative_prompt": p["invert_negative_prompt"]},
        attention_store=p["attention_store"], attention_steps=p["attention_steps"], attention_layers=p["attention_layers"],
        attention_dtype=p["attention_dtype"], attention_budget=budget,
        inversion=p["inversion"], inversion_iters=p["inversion_iters"], verify=p["verify"],
    )


def _edit_kwargs(p: dict) -> dict:
    return dict(
        negative_prompt=p["negative_prompt"], negative_from_source=p["negative_from_source"], guidance=p["guidance"], init=p["init"], seed=p["seed"],
        inject_steps=p["inject_steps"], inject_layers=p["inject_layers"], inject_strength=p["inject_strength"],
        reference=p["reference"], batch=p["batch"], fps=p["fps"], out_dir=p["out_dir"], force=p["force"], gpus=p["gpus"],
        mask=p["mask"], mask_box=p["mask_box"], mask_box_end=p["mask_box_end"], mask_fit=p["mask_fit"],
        mask_paste=p["mask_paste"],
    )


def _worker_zero() -> bool:
    """False in a torchrun worker other than the first: only worker 0 draws bars and tables."""
    return os.environ.get("RANK", "0") == "0"


def _reporter(device: str | None):
    from engine import Reporter, Runtime

    return Reporter(_console() if _worker_zero() else None, Runtime.default(device).device)


def _edit_json(result) -> dict:
    return {
        "id": result.inversion_id,
        "edits": [{"prompt": p, "video": str(v), "side_by_side": str(s)} for p, v, s in zip(result.prompts, result.videos, result.side_by_side)],
    }


@cli.command(name="tiny-model")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--random", "random_weights", is_flag=True, help="Write a tiny model with random weights instead of the trained proxy.")
@click.option("--seed", default=0, show_default=True, help="Seed of the --random weights.")
@click.option("--world", type=click.Choice(["bunny", "shapes"]), default="bunny", show_default=True,
              help="Which trained proxy: Big Buck Bunny footage, or the synthetic shapes world.")
@click.option("--arch", type=click.Choice(["1.0", "1.5"]), default="1.0", show_default=True,
              help="With --random: the CogVideoX-5B layout, or CogVideoX1.5-5B's (time patched by 2).")
def tiny_model_write(directory: str, random_weights: bool, seed: int, world: str, arch: str) -> None:
    """Write a small CogVideoX checkpoint in the CogVideoX-5b folder layout.

    By default the trained proxy (7M parameters, 14 MB, trained on Big Buck Bunny at
    17x96x144); --world shapes the one trained on moving circles, squares and triangles
    (captions like "a red circle moving left on a gray background"); --random writes the tiny
    random-weight model the tests use.

    \b
    cogedit tiny-model proxy/ && cogedit run clip.mp4 --model proxy/ --frames 17 --height 96 --width 144 --prompt "..."
    cogedit tiny-model shapes/ --world shapes
    cogedit tiny-model tiny/ --random --seed 1
    cogedit tiny-model tiny15/ --random --arch 1.5
    """
    from engine import SettingsError, build_tiny_model, write_proxy_model
    from engine.models.proxy import describe

    if random_weights and world != "bunny":
        raise SettingsError("--random writes the random tiny model, which belongs to no world: drop --random or --world")
    if arch != "1.0" and not random_weights:
        raise SettingsError("the trained proxies are CogVideoX-5B-shaped: --arch 1.5 needs --random")
    path = build_tiny_model(directory, seed=seed, arch=arch) if random_weights else write_proxy_model(directory, world)
    click.echo(describe(path, None if random_weights else world), err=True)
    click.echo(path)  # alone on stdout, for scripts


@cli.command(name="invert")
@click.argument("video", type=click.Path())
@invert_options("--")
@cache_option
@runtime_options
@json_option
def invert_cmd(video: str, cache_dir, device, plan, vram, compile_blocks: bool | None, fp8: bool, attention: str, as_json: bool, model: str, dtype, **params) -> None:
    """Invert VIDEO into the cache and print its id (a cache hit loads no model).

    \b
    cogedit invert clip.mp4 --model THUDM/CogVideoX-5b --steps 50
    """
    import engine

    reporter = _reporter(device)
    inv = engine.invert(
        video, model, cache_dir=cache_dir, device=device, dtype=dtype, plan=plan, vram=vram, compile=compile_blocks, fp8=fp8, attention=attention, reporter=reporter,
        **_invert_kwargs(params),
    )
    _console().print(reporter.table("invert"))
    click.echo(json.dumps(_inversion_json(inv, reporter)) if as_json else inv.id)


def _inversion_json(inv, reporter) -> dict:
    hit = next((r.cache_hit for r in reporter.records if r.name == "invert"), None)
    checked = {"verify": inv.verify} if inv.verify is not None else {}  # the round trip, when one ran
    return {"id": inv.id, **checked, "dir": str(inv.paths.dir), "cached": hit}


@cli.command(name="edit")
@click.argument("inversion_id")
@edit_options
@click.option("--model", default=None, help="Model folder, if it moved since the inversion.")
@cache_option
@runtime_options
@json_option
def edit_cmd(inversion_id: str, prompts, prompts_file, cache_dir, device, plan, vram, compile_blocks: bool | None, fp8: bool, attention: str, as_json: bool, model, **params) -> None:
    """Render one mp4 per --prompt from a cached inversion (no video is read, nothing is inverted).

    \b
    cogedit edit 3fa2 --prompt "a watercolor painting" --prompt "a charcoal sketch" --inject-steps 0:0.6
    cogedit edit 3fa2 --prompt "a blue circle moving left on a gray background" --mask-box 0.1,0.2,0.5,0.8

    Files are named ID-HASH-NN-PROMPT.mp4 (and ...-side-by-side.mp4): the inversion id's first 8
    characters, a 6-character hash of the settings that change the pixels (--guidance,
    --negative-prompt, --init/--seed, --inject-*, --reference, --mask/--mask-box, --compile, --fp8, --attention fa4/sage;
    one with no effect, such as --seed without --init random, is left out), the prompt's number and
    its first words.
    Edits with other settings never overwrite each other.
    """
    import engine

    reporter = _reporter(device)
    prompts = _all_prompts(prompts, prompts_file)
    result = engine.edit(
        inversion_id, prompts, model=model, cache_dir=cache_dir, device=device, plan=plan, vram=vram, compile=compile_blocks, fp8=fp8, attention=attention, reporter=reporter,
        **_edit_kwargs(params),
    )
    _print_edit(reporter, result, as_json)


def _print_edit(reporter, result, as_json: bool, title: str = "edit", inversion: dict | None = None) -> None:
    """The summary table, then the outputs; `inversion` (from `run`) puts the inversion's id first."""
    if not _worker_zero():  # the other half of a --gpus 2 edit started by hand with torchrun
        return
    _console().print(reporter.table(title))
    if as_json:
        click.echo(json.dumps({**_edit_json(result), **(inversion or {})}))
        return
    if inversion:
        click.echo(inversion["id"])
    for v, s in zip(result.videos, result.side_by_side):
        click.echo(f"{v}\n{s}")


@cli.command(name="run")
@click.argument("video", type=click.Path())
@invert_options("--invert-")
@edit_options
@cache_option
@runtime_options
@json_option
def run_cmd(video: str, prompts, prompts_file, model, cache_dir, device, plan, vram, compile_blocks: bool | None, fp8: bool, attention: str, dtype, as_json: bool, **params) -> None:
    """Invert VIDEO when needed, then edit it: the one-shot path.

    \b
    cogedit run clip.mp4 --model THUDM/CogVideoX-5b --prompt "a watercolor painting"
    """
    import engine

    reporter = _reporter(device)
    inv, result = engine.run(
        video, model, _all_prompts(prompts, prompts_file), **_invert_kwargs(params, "invert_"), reporter=reporter,
        cache_dir=cache_dir, device=device, dtype=dtype, plan=plan, vram=vram, compile=compile_blocks, fp8=fp8, attention=attention, **_edit_kwargs(params),
    )
    _print_edit(reporter, result, as_json, "run", _inversion_json(inv, reporter))


@cli.command(name="batch")
@click.argument("jobs_file", type=click.Path())
@click.option("--model", default=None, help="Model of the jobs that name none (folder or hub id).")
@click.option("--out", "out_dir", default="cogedit-batch", type=click.Path(file_okay=False), show_default=True, help="Folder for the mp4 files, one subfolder per job.")
@click.option("--nproc", default=1, show_default=True, type=click.IntRange(1), help="Workers to start through torchrun, one GPU each (the CPU where there is none).")
@cache_option
@runtime_options
@json_option
def batch_cmd(jobs_file: str, model, out_dir: str, nproc: int, cache_dir, device, plan, vram, compile_blocks: bool | None, fp8: bool, attention: str, as_json: bool) -> None:
    """Run every [[job]] of JOBS_FILE (TOML): each video inverted once, then its prompts edited.

    A re-run skips what is done; a failed job is a row of the table and the others go on (exit 1
    at the end). Several GPUs: --nproc N, or torchrun by hand (across machines too, with the
    cache on a shared filesystem):

    \b
    cogedit batch jobs.toml --model THUDM/CogVideoX-5b --nproc 2
    torchrun --nproc-per-node 8 --no-python cogedit batch jobs.toml --model THUDM/CogVideoX-5b
    """
    import engine

    reporter = _reporter(device)
    result = engine.batch(
        jobs_file, model, out_dir=out_dir, nproc=nproc, cache_dir=cache_dir, reporter=reporter,
        device=device, plan=plan, vram=vram, compile=compile_blocks, fp8=fp8, attention=attention,
    )
    if not _worker_zero():
        return
    _console().print(result.table())
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(r) for r in result.rows]))
    if result.failed:
        jobs = sorted({r.job for r in result.failed})
        raise click.ClickException(f"{len(result.failed)} of {len(result.rows)} rows failed (job(s) {', '.join(jobs)}); fix them and run the same command again: finished work is kept")


@cli.command(name="demo")
@click.option("--out", "out_dir", default="cogedit-demo", type=click.Path(file_okay=False), show_default=True)
@cache_option
def demo_cmd(out_dir: str, cache_dir) -> None:
    """The whole job on a CPU in about a minute, on the shipped proxies and clips they never saw:
    invert once, then edits from the cache.

    First a shapes clip (a yellow triangle, a pair the shapes proxy never saw) recolored red,
    everywhere and inside a mask around the triangle: one labelled mp4, source | edit | edit in a
    mask. Then a Big Buck Bunny clip: a reconstruction and an edit towards another caption the
    proxy was trained on (it knows no other words; its edits stay close to the reconstruction).
    A second run reuses the inversions and rewrites the demo's own files. The proxies are
    7M-parameter CogVideoX models, not CogVideoX-5B: `cogedit run clip.mp4 --model
    THUDM/CogVideoX-5b --prompt TEXT` is the same job with the real model.
    """
    import engine

    reporter = _reporter("cpu")
    shapes = engine.shapes_demo(out_dir, cache_dir=cache_dir, reporter=reporter)
    result = engine.demo(out_dir, cache_dir=cache_dir, reporter=reporter)
    _console().print(reporter.table("demo"))
    click.echo(f"{shapes.comparison}\n{result.side_by_side[0]}\n{result.side_by_side[1]}")
    click.echo(
        f"first {shapes.comparison.name}: source | edit | edit in a mask (the triangle turns red, the rest stays); then the rabbit's "
        "reconstruction and an edit towards another of the proxy's captions (a 7M-parameter model of one shot: both stay close to the source)",
        err=True,
    )


@cli.command(name="ui")
@click.option("--model", default=None, help="CogVideoX-5b folder or hub id (default: the shipped proxy, which runs on a CPU).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to serve on; another than 127.0.0.1 lets other machines in.")
@click.option("--port", default=7860, show_default=True, type=click.IntRange(0, 65535))
@cache_option
@click.option("--uploads-dir", type=click.Path(file_okay=False), default=None, help="Folder for uploaded clips (default: <cache>/uploads).")
@click.option("--world", type=click.Choice(["shapes", "bunny"]), default="shapes", show_default=True,
              help="Without --model: the shipped proxy of moving shapes (its color edits show), or of Big Buck Bunny's opening shot.")
def ui_cmd(model, host: str, port: int, cache_dir, uploads_dir, world: str) -> None:
    """Open the web app: invert a clip, render many edits from the cache, compare them side by side.

    Serves on 127.0.0.1 only, unless --host says otherwise; it never makes a public link.

    \b
    cogedit ui                                   # the shipped shapes proxy: an edit within a minute on a CPU
    cogedit ui --world bunny                     # the proxy trained on Big Buck Bunny
    cogedit ui --model THUDM/CogVideoX-5b --port 8080
    """
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise click.ClickException('the web app needs the ui extra: pip install -e ".[ui]" in the cogedit source folder') from None
    import webui

    webui.serve(model, host, port, cache_dir, uploads_dir, world)


@cli.command(name="plan")
@click.option("--vram", default=None, callback=_vram_bytes, help=VRAM_HELP)
@click.option(
    "--model", default=None,
    help="Model folder or hub id (default: the built-in CogVideoX-5B shape; THUDM/CogVideoX-5b and THUDM/CogVideoX1.5-5b need no download).",
)
@click.option("--frames", default=None, type=int, help="Frames (default: the model's, 49 for 5B, 81 for 1.5).")
@click.option("--height", default=None, type=int, help="Frame height (default: the model's).")
@click.option("--width", default=None, type=int, help="Frame width (default: the model's).")
@click.option("--prompts", default=1, show_default=True, help="Prompts rendered in one pass.")
def plan_cmd(vram, model, frames, height, width, prompts) -> None:
    """Print each memory plan's predicted peak per phase, without running anything.

    \b
    cogedit plan --vram 12GB
    cogedit plan --model THUDM/CogVideoX1.5-5b --frames 161 --vram 24GB
    """
    from rich.console import Console, Group
    from rich.table import Table

    from engine.models.model_info import plan_model
    from engine.models.plans import (
        CUDA_CONTEXT,
        PLANS,
        GiB,
        Workload,
        card_sizes,
        choose_plan,
        predict_peaks,
    )
    from engine.stages.windows import window_count

    info = plan_model(model)
    own = info.defaults
    frames, height, width = (own.frames if frames is None else frames), (own.height if height is None else height), (own.width if width is None else width)
    window = info.window_frames
    if frames > window:  # a long clip runs one window at a time: its peak is one window's
        count = window_count(info, frames)
        click.echo(f"{frames} frames: {count} overlapping windows of {window} frames, each step predicted {count}x one window's time; memory below is one window's")
        frames = window
    workload = Workload(frames, height, width, prompts)
    chosen = choose_plan(vram, info, workload).name if vram is not None else None
    phases = list(predict_peaks(PLANS["staged"], info, workload))
    # Numbers only (the unit is in the title) and the descriptions in a table of their own: both
    # stay readable at 80 columns.
    peaks = Table(title=f"predicted peak GPU memory in GiB: {info.source}, {frames} frames {height}x{width}", title_justify="left")
    summaries = Table(caption=f"A card sold as 12 GB has 12 GiB; --vram leaves {CUDA_CONTEXT / GiB:.1f} GiB of it to the CUDA context.", caption_justify="left")
    summaries.add_column("plan", no_wrap=True)
    summaries.add_column("cards (--vram)")
    summaries.add_column("what it does")
    cards = card_sizes(info, workload)
    peaks.add_column("plan", no_wrap=True)
    for phase in (*phases, "peak"):
        peaks.add_column(phase, justify="right")
    for name, plan in PLANS.items():
        predicted = predict_peaks(plan, info, workload)
        label = f"{name} <-" if name == chosen else name
        peaks.add_row(label, *(f"{predicted[p] / GiB:.1f}" for p in phases), f"{max(predicted.values()) / GiB:.1f}")
        summaries.add_row(label, cards[name], plan.summary)
    Console().print(Group(peaks, summaries))
    if chosen:
        click.echo(chosen)


@cli.group(name="cache")
def cache_group() -> None:
    """Inspect and clean the cache."""


@cache_group.command(name="path")
@cache_option
def cache_path(cache_dir) -> None:
    """Print the cache folder."""
    from cache.layout import cache_root

    click.echo(cache_root(cache_dir))


@cache_group.command(name="ls")
@cache_option
@json_option
def cache_ls(cache_dir, as_json: bool) -> None:
    """List cached inversions, one a line."""
    import shutil
    from pathlib import Path

    from cache.layout import CacheLayout
    from cache.sizes import format_size
    from cache.store import list_entries

    entries = list_entries(CacheLayout.from_dir(cache_dir))
    if as_json:
        click.echo(json.dumps([{"id": e.id, "complete": e.complete, "size": e.size_bytes, "summary": e.summary, "inversion": e.inversion, "last_used": e.last_used} for e in entries]))
        return
    # One line an entry: a 12-character id prefix (every command takes it; `cache show` gives the
    # whole id), the fixed columns, then what tells entries apart, cut to the terminal's width.
    shown = {"--model", "--steps", "--inversion", "--inversion-iters"}
    differ = [k for k in dict.fromkeys(k for e in entries for k in e.flags) if k not in shown and len({repr(e.flags.get(k)) for e in entries}) > 1]
    rows = [("id", "steps", "inversion", "size", "last used", "video · model · settings")]
    for e in entries:
        s = e.summary
        model = [Path(str(s["model"])).name] if s.get("model") else []
        rest = [*([] if e.complete else [e.state]), *([s["video"]] if s.get("video") else []), *model, *(f"{k} {_short(e.flags[k])}" for k in differ if k in e.flags)]
        rows.append((e.id[:12], str(s.get("steps", "")), e.inversion, format_size(e.size_bytes), _when(e.last_used)[5:], " · ".join(rest)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    width = shutil.get_terminal_size().columns
    click.echo(f"{len(entries)} cached inversion(s)")
    for r in rows:
        line = "  ".join([r[0].ljust(widths[0]), r[1].rjust(widths[1]), r[2].ljust(widths[2]), r[3].rjust(widths[3]), r[4].ljust(widths[4]), r[5]])
        click.echo(line if len(line) <= width else line[: width - 1] + "…")


def _when(timestamp: str | None) -> str:
    return (timestamp or "")[:16].replace("T", " ")


@cache_group.command(name="show")
@click.argument("entry_id")
@cache_option
@json_option
def cache_show(entry_id: str, cache_dir, as_json: bool) -> None:
    """Show one entry: settings, stage status, files (sizes, checksums) and stored attention."""
    from rich.console import Console

    from cache.layout import CacheLayout, resolve_entry_id
    from cache.store import entry_details

    layout = CacheLayout.from_dir(cache_dir)
    details = entry_details(layout, resolve_entry_id(layout, entry_id))
    if as_json:
        click.echo(json.dumps(details))
        return
    Console().print(_details_tree(details))


def _details_tree(d: dict):
    from rich.table import Table
    from rich.tree import Tree

    from cache.sizes import format_size

    tree = Tree(f"[bold]{d['id']}[/]  {d['state']}, {format_size(d['size'])}, last used {_when(d['last_used'])}")
    if d["problem"]:
        tree.add(f"[red]{d['problem']}")
    # Settings as the flags that made them, one value each (--json has the manifest whole).
    for title, values in (("summary", d["summary"]), ("settings", d["flags"]), ("stages", d["stages"]), ("stored attention", d["attention"])):
        node = tree.add(f"[bold]{title}")
        if values:
            _branch(node, values)
        else:
            node.add("none")
        if title == "settings":
            for note in d["notes"]:
                node.add(f"[dim]{note}")
    files = Table(box=None, pad_edge=False)
    files.add_column("file", overflow="fold")
    files.add_column("size", justify="right")
    files.add_column("sha256")
    stores: dict[str, list[dict]] = {}
    for f in d["files"]:
        if f["file"].startswith("attention/"):  # one file per timestep and block: a count per store
            stores.setdefault(f["file"].split("/")[1], []).append(f)
        else:
            files.add_row(f["file"], format_size(f["bytes"]), f["sha256"][:12])
    for key, group in stores.items():
        files.add_row(f"attention/{key}/ ({len(group)} files)", format_size(sum(f["bytes"] for f in group)), "")
    tree.add(f"[bold]files[/] ({len(d['files'])}, {format_size(sum(f['bytes'] for f in d['files']))})").add(files)
    return tree


def _branch(node, values: dict) -> None:
    from cache.sizes import format_size

    for key, value in values.items():
        if isinstance(value, dict) and value:
            _branch(node.add(str(key)), value)
        else:
            node.add(f"{key}: {format_size(value) if key == 'bytes' else _short(value)}")


def _short(value) -> str:
    """A leaf of the manifest on one line: checksums cut to 12 characters, long lists elided."""
    if isinstance(value, str) and len(value) >= 32 and all(c in "0123456789abcdef" for c in value):
        return value[:12]
    if isinstance(value, list) and len(value) > 8:
        return f"{', '.join(map(str, value[:3]))} … {value[-1]} ({len(value)})"
    return repr(value) if isinstance(value, str) else str(value)


@cache_group.command(name="rm")
@click.argument("entry_ids", nargs=-1, required=True)
@cache_option
def cache_rm(entry_ids, cache_dir) -> None:
    """Remove entries (ids or unique prefixes)."""
    from cache.layout import CacheLayout, resolve_entry_id
    from cache.sizes import format_size
    from cache.store import remove_entry

    layout = CacheLayout.from_dir(cache_dir)
    for prefix in entry_ids:
        entry_id = resolve_entry_id(layout, prefix)
        click.echo(f"removed {entry_id} ({format_size(remove_entry(layout, entry_id))})")


@cache_group.command(name="gc")
@click.option("--max-size", required=True, help="Shrink the cache to this size, least recently used first (e.g. 20GB).")
@click.option("--dry-run", is_flag=True)
@cache_option
def cache_gc(max_size: str, dry_run: bool, cache_dir) -> None:
    """Remove least-recently-used entries until the cache fits in --max-size."""
    from cache.layout import CacheLayout
    from cache.sizes import format_size, parse_size
    from cache.store import gc

    try:
        limit = parse_size(max_size)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--max-size") from None
    removed = gc(CacheLayout.from_dir(cache_dir), limit, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for e in removed:
        click.echo(f"{verb} {e.id} ({format_size(e.size_bytes)})")
    click.echo(f"{verb} {len(removed)} entr{'y' if len(removed) == 1 else 'ies'}, {format_size(sum(e.size_bytes for e in removed))}")


@cache_group.command(name="verify")
@cache_option
def cache_verify(cache_dir) -> None:
    """Check every cached file against its checksum; exit 1 if any fails."""
    from cache.layout import CacheLayout
    from cache.store import verify

    problems = verify(CacheLayout.from_dir(cache_dir))
    for p in problems:
        click.echo(f"{p.entry_id[:12]}  {p.file}: {p.reason}")
    if problems:
        raise click.ClickException(f"{len(problems)} problem(s) found; remove broken entries with `cogedit cache rm ID` and invert again")
    click.echo("all cached files verified")


def main() -> None:
    cli(prog_name="cogedit")


if __name__ == "__main__":
    main()
