"""Mutation testing of the modules where a wrong line is a wrong result a user sees: the cache, the
web app's folder check, masks, hooks and stages. Long (hours for all of them on 2 cores): not in CI.

    python benchmarks/mutation.py                 # every module, then benchmarks/results/MUTATION.md
    python benchmarks/mutation.py cache folders   # some modules (the others keep their last results)
    python benchmarks/mutation.py --report        # MUTATION.md from the results on disk

Each module runs mutmut 3 (configured in pyproject.toml's [tool.mutmut]) in a scratch copy of the
working tree, `.mutation/<module>/`, mutating that module only and running only the tests that
exercise it (below; mutmut then runs, per mutant, those of them that call the mutated function).
Results land in benchmarks/results/mutation/<module>.json: every mutant's status and each
survivor's diff. A survivor is either killed by a new test or listed in EQUIVALENT with the reason
it cannot change behaviour; MUTATION.md counts both.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCRATCH = ROOT / ".mutation"

# module -> (the files mutated, as only_mutate globs; the tests that exercise them)
MODULES: dict[str, tuple[list[str], list[str]]] = {
    "folders": (["webui/folders.py"], ["tests/test_settings_pinned.py", "tests/test_webui.py::test_only_the_cache_and_the_uploads_folder_are_reachable"]),
    # The two tests of another process are left out: a child importing the mutated code fails in mutmut's trampoline.
    "cache": (["cache/*"], ["tests/test_cache.py", "tests/test_settings_pinned.py", "-k", "not read_only_cache_dir_chmod and not two_processes_contend"]),
    "masks": (["engine/video/masks.py"], ["tests/test_masks.py"]),
    # hooks in three runs (a family: one row in the report), each rerun alone after its tests change.
    "hooks-injection": (
        ["engine/hooks/injection.py"],
        ["tests/test_injection.py", "tests/test_attention.py", "tests/test_row_groups.py", "tests/test_attention_store.py", "tests/test_structure.py::test_features_come_off_cleanly"],
    ),
    "hooks-kv": (["engine/hooks/kv_capture.py", "engine/hooks/kv_replay.py"], ["tests/test_attention_store.py", "tests/test_structure.py"]),
    # the token split's exchanges run over a group of threads here (tests/groups.py), where mutmut sees them
    "hooks-split": (
        ["engine/hooks/token_split.py", "engine/hooks/token_exchange.py"],
        [
            "tests/test_multigpu.py::test_tokens_are_shared_out_as_evenly_as_they_go_in_rank_order", "tests/test_multigpu.py::test_the_exchange_trades_tokens_for_heads_and_back",
            "tests/test_multigpu.py::test_a_token_split_call_equals_one_process_in_threads",
        ],
    ),
    "hooks-rest": (
        ["engine/hooks/attention.py", "engine/hooks/ff_chunking.py", "engine/hooks/libraries.py", "engine/hooks/registry.py", "engine/hooks/row_groups.py"],
        [
            "tests/test_attention.py", "tests/test_row_groups.py", "tests/test_plans.py::test_ff_chunking_leaves_the_output_unchanged",
            "tests/test_plans.py::test_a_chunked_feed_forward_hands_every_argument_to_each_slice",
            "tests/test_structure.py::test_features_come_off_cleanly", "tests/test_structure.py::test_the_model_libraries_load_with_their_noisy_loggers_quiet",
        ],
    ),
    # stages in two runs: the arithmetic against fast unit tests, the model stages against the
    # fastest tests that run them (the slow clip-length and CLI tests would cost a minute a mutant).
    "stages-pure": (
        ["engine/stages/settings.py", "engine/stages/windows.py", "engine/stages/schedulers.py", "engine/stages/fixed_point.py", "engine/stages/context.py"],
        [
            "tests/test_stage_units.py", "tests/test_fixed_point.py", "tests/test_settings_pinned.py",
            "tests/test_windows.py::test_windows_cover_every_frame_and_share_it_alike", "tests/test_windows.py::test_each_anchor_is_masked_by_its_own_frames_mask",
            "tests/test_windows.py::test_windows_of_the_5b_and_the_overlap_check",
            "tests/test_windows.py::test_blended_prediction_of_a_linear_model_is_the_model_on_the_whole_clip",
        ],
    ),
    "stages-model": (
        [f"engine/stages/{name}.py" for name in ("attention_store", "decode", "editing", "embed", "encode", "inversion", "verify", "vloss")],
        [
            "tests/test_stage_units.py", "tests/test_reference.py", "tests/test_inversion.py", "tests/test_injection.py", "tests/test_attention_store.py",
            "tests/test_fixed_point.py::test_refinement_sharpens_the_round_trip", "tests/test_verify.py::test_verify_is_stored_with_the_entry",
            "tests/test_verify.py::test_fixed_point_inverts_more_exactly_than_ddim", "tests/test_verify.py::test_verdict_limits_are_the_documented_ones",
            "tests/test_multigpu.py::test_a_worker_hands_its_own_gpu_on_unrefused",
            "tests/test_engine.py::test_second_inversion_is_a_cache_hit_that_loads_nothing", "tests/test_engine.py::test_edit_from_cache_equals_one_shot_run_bit_for_bit",
            "tests/test_proxy.py::test_shapes_proxy_beats_random_weights_on_a_held_out_pair",
            # the mp4 outputs, the paste, the windows' stores and masks, the run table: added after the runs of 2026-12-07 and -08, whose survivors lay outside the tests above
            "tests/test_cli.py::test_invert_then_edit_from_the_cache", "tests/test_engine.py::test_a_first_inversion_reports_each_phase_as_work_done_and_counts_its_steps",
            "tests/test_masks.py::test_a_pasted_edit_is_the_source_outside_the_mask_and_the_edit_inside",
            "tests/test_windows.py::test_stored_attention_of_a_long_clip_replays_each_windows_own_reference",
            "tests/test_windows.py::test_a_long_clips_store_captured_later_from_the_cache_is_the_one_captured_while_inverting",
            "tests/test_engine.py::test_an_edit_reports_its_passes_and_steps_and_hands_the_callback_every_step",
            "tests/test_engine.py::test_resumed_inversion_equals_uninterrupted_bit_for_bit",
            "tests/test_windows.py::test_each_anchor_is_masked_by_its_own_frames_mask",
        ],
    ),
    # the workers: their groups of threads (tests/groups.py) and the launcher's worker processes (they run
    # the mutant too: mutmut's switch is an environment variable they inherit)
    "stages-workers": (
        ["engine/stages/distributed.py"],
        [
            "tests/test_stage_units.py", "tests/test_multigpu.py::test_guidance_halves_are_joined_unconditional_first_on_both",
            "tests/test_multigpu.py::test_the_launcher_returns_each_workers_result_and_its_first_error_in_one_line",
            "tests/test_multigpu.py::test_four_workers_make_the_mesh_docs_multi_gpu_describes",
            "tests/test_multigpu.py::test_how_gpus_share_a_call_as_docs_multi_gpu_says", "tests/test_multigpu.py::test_a_worker_hands_its_own_gpu_on_unrefused",
        ],
    ),
}

# A test failed, ran past mutmut's time limit (an endless loop is caught so too), or the tests'
# process ended otherwise than passing (segfault: SIGSEGV or SIGKILL; suspicious: any other status,
# e.g. an abort inside gloo).
KILLED = ("killed", "timeout", "segfault", "suspicious")

# Survivors that cannot change behaviour: mutant name -> why. Checked against each run: an entry
# whose mutant no longer survives is reported as stale.
EQUIVALENT: dict[str, str] = {
    **dict.fromkeys(
        ("cache.keys.x__dumps__mutmut_5", "cache.keys.x__dumps__mutmut_10", "cache.keys.x__dumps__mutmut_15"),
        "allow_nan changed: _canonical turns NaN and infinities into strings first, so json.dumps never meets one",
    ),
    **dict.fromkeys(
        (f"engine.video.masks.x_latent_mask__mutmut_{n}" for n in (60, 61, 63, 69)),
        "the clamp loosened: cells average 0-1 pixels and the blur's kernel sums to 1, so both terms of the maximum already lie in 0-1",
    ),
    **dict.fromkeys(
        (f"engine.stages.windows.x_blend_weights__mutmut_{n}" for n in (4, 7)),
        "the tent weights in float32 instead of float64: its counts and their sums are small integers, exact in both, and one division "
        "rounded from float64 to float32 equals the float32 division (double rounding is innocuous when 53 >= 2 x 24 + 2, Figueroa 1995)",
    ),
    "engine.stages.windows.x_blend_weights__mutmut_12": "every covering window's raw weight 2 instead of 1: the shares are normalised per frame, so any one positive weight gives the same shares",
    "engine.stages.windows.x_blended__mutmut_29": "the weights' view without its leading 1: broadcasting against [B, n, ...] prepends it",
    "engine.stages.windows.x_window_shape__mutmut_5": "stop + start for stop - start of the first window: window_spans' first window always starts at frame 0",
    **dict.fromkeys(
        ("engine.stages.fixed_point.x_refine__mutmut_16", "engine.stages.fixed_point.x_refine__mutmut_36"),
        "the loop's end: it leaves at k == iters either way (range(iters + 1) ends there), and the update after the last check is never measured nor returned",
    ),
    **dict.fromkeys(
        (f"engine.stages.fixed_point.x_step_coefficients__mutmut_{n}" for n in (16, 20, 21, 27, 31, 32)),
        "return_dict=True/None/left out: diffusers' scheduler output indexes like its tuple, so [0] is prev_sample either way",
    ),
    **dict.fromkeys(
        (f"engine.stages.fixed_point.x_step_coefficients__mutmut_{n}" for n in (8, 10)),
        "the zero input in float32: every term it enters is an exact 0, and the float64 one keeps the step in float64",
    ),
    "engine.stages.distributed.x__failure_line__mutmut_24": "next()'s default None for '': both are false, and the line is used only when true",
    **dict.fromkeys(
        ("engine.hooks.token_exchange.xǁTokenSplitǁto_heads__mutmut_29", "engine.hooks.token_exchange.xǁTokenSplitǁto_heads__mutmut_34",
         "engine.hooks.token_exchange.xǁTokenSplitǁto_tokens__mutmut_18"),
        "equal splits, all_to_all_single's default: every process sends each the same b*h*n*d (to_heads) or gets the same from each (to_tokens)",
    ),
    **dict.fromkeys(
        (f"engine.hooks.token_split.xǁTokenSplitHookǁnew_forward__mutmut_{n}" for n in (47, 52)),
        "attention_kwargs None or left out: cogedit never passes the transformer attention_kwargs, so every block gets None",
    ),
    "engine.stages.distributed.x_shares__mutmut_15": "g / d for g // d: d (1, or 2 for g >= 2) divides every g in GPUS, so both are the same whole number",
    **dict.fromkeys(
        (f"engine.stages.distributed.x_launch__mutmut_{n}" for n in (10, 18)),
        "start_method None or left out: torch's LaunchConfig starts workers by spawn by default too",
    ),
    **dict.fromkeys(
        (f"engine.stages.distributed.x_launch__mutmut_{n}" for n in (6, 14)),
        "run_id None or left out: the id names the rendezvous inside its own store (a fresh port per launch), so any id meets alike",
    ),
    "engine.stages.distributed.xǁMeshǁmake__mutmut_16": "token groups of one worker when nothing is split (ways 1): a TokenSplit of size 1 is idle, as the default one",
    **dict.fromkeys(
        (f"engine.stages.distributed.x_tell_team__mutmut_{n}" for n in (3, 5)),
        "src None or left out: broadcast_object_list's source is rank 0 then too",
    ),
    "engine.stages.distributed.x_launch__mutmut_24": "LOCALHOST for localhost: host names are case-insensitive",
    **dict.fromkeys(
        (f"engine.stages.distributed.x_launch__mutmut_{n}" for n in (56, 58)),
        "the kept errors sorted by file name rather than by rank number: at most 8 workers (--gpus 1-8), whose one-digit ranks sort alike either way",
    ),
    "engine.hooks.kv_replay.xǁStepKVǁ__getitem____mutmut_23": "wait=None is as false as wait=False",
    "engine.hooks.kv_replay.xǁStepKVǁ__init____mutmut_7": "wait=None is as false as wait=False",
    "engine.hooks.kv_capture.xǁ_TimestepGateǁ__init____mutmut_2": "'' for None before the first forward: CaptureGateHook.pre_forward sets t before any block reads it",
    "engine.hooks.kv_replay.xǁ_Readerǁ__init____mutmut_3": "'' for None as the timestep to hurry: neither is a timestep in the queue",
    "engine.hooks.kv_replay.xǁ_Readerǁ__init____mutmut_4": "None for False as the closed flag: as false",
    "engine.hooks.kv_replay.xǁStepKVǁ__getitem____mutmut_6": "'' for None while the block is fetched: overwritten before the method returns; "
    "if the read raises, the error ends the edit and the store is closed, so the step is never asked again",
    "engine.hooks.kv_replay.xǁStepKVǁclose__mutmut_1": "'' for None on close: the last block is let go either way, and a closed step is never asked "
    "again (StoredAttention.at makes a new one, close ends the replay)",
    "engine.hooks.ff_chunking.xǁChunkedFeedForwardǁforward__mutmut_2": "< for <= at exactly `chunk` tokens: one slice of all of them is the unsliced call",
    "engine.hooks.registry.x_remove__mutmut_4": "recurse=True is diffusers' HookRegistry.remove_hook default",
    **dict.fromkeys(
        (f"engine.hooks.attention.x__problem__mutmut_{n}" for n in (20, 21, 22, 23, 24)),
        "which list of compute capabilities: FA4_RUNS and SAGE_RUNS are the same (8-12)",
    ),
    "engine.hooks.injection.x__injected__mutmut_75": "<= for < when every row is an edit row (replayed K/V): the reference rows' call runs on zero rows and writes nothing",
    **dict.fromkeys(
        (f"engine.hooks.injection.x__strength_mask__mutmut_{n}" for n in (10, 11, 12)),
        "the bias as [1, 1, keys] instead of [1, 1, 1, keys]: broadcasting against [B, heads, queries, keys] prepends the 1",
    ),
    "engine.hooks.injection.x__head_slices__mutmut_15": "head slices at every head instead of every 8th: each head is computed again with the same values (only slower)",
    **dict.fromkeys(
        ("engine.hooks.injection.x__reference_group__mutmut_19", "engine.hooks.injection.x__reference_group__mutmut_20",
         "engine.hooks.injection.xǁCogVideoXAttnProcessorǁjoined__mutmut_40", "engine.hooks.injection.xǁCogVideoXAttnProcessorǁjoined__mutmut_41"),
        "v's text length or rotary table: _projected applies RoPE (the only user of both) to q and k, never to v",
    ),
    "engine.hooks.injection.xǁCogVideoXAttnProcessorǁjoined__mutmut_20": "the captured k's text length, projected without RoPE: RoPE is its only user",
}
# Survivors that are not equivalent but that no test on this machine can kill: name -> why (they count as survived).
NOT_KILLED: dict[str, str] = {
    **dict.fromkeys(
        (f"engine.stages.windows.x_blended__mutmut_{n}" for n in (32, 34)),
        "GPU only: the window weights must move to the prediction's device; on the CPU they are there already",
    ),
    **dict.fromkeys(
        (f"engine.stages.windows.x_blended__mutmut_{n}" for n in (33, 35)),
        "rounding only: the weights stay float32 against a bf16/fp16 prediction (one rounding less); no test pins half-precision bits",
    ),
    **dict.fromkeys(
        ("engine.hooks.injection.x__inject__mutmut_30", "engine.hooks.injection.x__injected__mutmut_36", "engine.hooks.injection.x__injected__mutmut_39",
         "engine.hooks.injection.x__strength_mask__mutmut_9", "engine.hooks.injection.x__strength_mask__mutmut_15"),
        "GPU only: a tensor made on the default device (the CPU) instead of the rows' device; on the CPU they are the same",
    ),
    **dict.fromkeys(
        ("engine.hooks.injection.x__inject__mutmut_29", "engine.hooks.injection.x__strength_mask__mutmut_8", "engine.hooks.injection.x__strength_mask__mutmut_14"),
        "rounding only: the strength bias in float32 instead of the rows' bf16/fp16 (SDPA takes a float32 mask too)",
    ),
    **dict.fromkeys(
        (
            *(f"engine.hooks.kv_replay.xǁStepKVǁ__getitem____mutmut_{n}" for n in (15, 16)),
            *(f"engine.hooks.kv_replay.xǁStepKVǁ_issue__mutmut_{n}" for n in range(11, 21)),
            *(f"engine.hooks.kv_replay.xǁStoredAttentionǁ__init____mutmut_{n}" for n in (3, 4, 6, 9, 10)),
            *(f"engine.hooks.kv_replay.xǁStoredAttentionǁat__mutmut_{n}" for n in (16, 20)),
            *(f"engine.hooks.kv_capture.xǁ_HostCopiesǁcopy__mutmut_{n}" for n in (2, 3, 4, 6, *range(11, 31))),
            *(f"engine.hooks.kv_capture.xǁ_HostCopiesǁready__mutmut_{n}" for n in (2, 3, 4, 5)),
            "engine.hooks.kv_capture.xǁ_TimestepGateǁadd__mutmut_15",
            *(f"engine.hooks.kv_capture.xǁStoreWriterǁ__call____mutmut_{n}" for n in (7, 8, 14)),
        ),
        "GPU only: the side stream, its events and the copies to a CUDA device; on the CPU blocks are handed over as they are",
    ),
    **dict.fromkeys(
        (
            *(f"engine.hooks.kv_replay.xǁStoredAttentionǁ__init____mutmut_{n}" for n in (21, 22, 23)),
            *(f"engine.hooks.kv_capture.xǁStoreWriterǁ__init____mutmut_{n}" for n in (1, 2, 9, 11)),
        ),
        "speed only: how many reader or writer threads there are, how many blocks may wait",
    ),
    **dict.fromkeys(
        (f"engine.hooks.kv_capture.xǁStoreWriterǁ__init____mutmut_{n}" for n in (10, 12, 13, 14)),
        "the writer threads' names only (what a stack dump shows)",
    ),
    **dict.fromkeys(
        (f"engine.stages.distributed.x_launch__mutmut_{n}" for n in (41, 42, 43)),
        "the name of the launcher's temporary folder only (it is removed on the way out)",
    ),
    "engine.stages.distributed.x_launch__mutmut_63": "the order of the failed workers' errors: torchrun stops the others as soon as one fails, "
    "so one error is kept; two at once is a race a test cannot hold",
}
# Functions that run only in worker processes, where mutmut records no test that reaches them: their
# surviving mutants are run again here, each against the tests that start such workers (the workers
# run the mutant: they inherit MUTANT_UNDER_TEST from the test's process).
IN_WORKERS: dict[str, tuple[tuple[str, ...], list[str]]] = {
    "stages-workers": (("xǁMeshǁmake", "x_tell_team"), ["tests/test_multigpu.py::test_four_workers_make_the_mesh_docs_multi_gpu_describes"]),
}
# The same by the line a mutant writes: (regular expression, why).
EQUIVALENT_LINES = [
    (r'(read_text|encode)\(.*"UTF-8"', "codec names are case-insensitive: 'UTF-8' is 'utf-8'"),
    (r"fromtimestamp\([^,()]+, (None)?\)", "None is fromtimestamp's default time zone"),
    (r'getattr\(os, "(XXO_BINARYXX|o_binary)", 0\)', "POSIX has no O_BINARY: getattr gives its default, 0, for this name too"),
    (r"f\.read\(None\)", "reads the file in one piece: the same digest, more memory"),
    (r"ensure_ascii=None", "None is as false as False: json escapes nothing either way"),
]


def equivalent(name: str, diff: str) -> str | None:
    """Why a surviving mutant cannot change behaviour, or None."""
    added = "\n".join(line for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++"))
    return EQUIVALENT.get(name) or next((why for pattern, why in EQUIVALENT_LINES if re.search(pattern, added)), None)


def _why(name: str, diff: str, status: str) -> str:
    """A survivor's line in MUTATION.md: why it is equivalent, or its status and why no test here kills it."""
    return equivalent(name, diff) or (f"{status}; {NOT_KILLED[name]}" if name in NOT_KILLED else status)


def _tree_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


def _scratch(module: str) -> Path:
    """A copy of the working tree whose pyproject mutates `module` only, with its tests."""
    where = SCRATCH / module
    shutil.rmtree(where, ignore_errors=True)
    for f in _tree_files():
        (where / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, where / f)
    globs, tests = MODULES[module]
    text = (where / "pyproject.toml").read_text()
    own = "\n".join([f"only_mutate = {json.dumps(globs)}", f"pytest_add_cli_args_test_selection = {json.dumps(tests)}"])
    (where / "pyproject.toml").write_text(re.sub(r"^only_mutate = .*$\n^pytest_add_cli_args_test_selection = .*$", lambda _: own, text, flags=re.M))
    if own not in (where / "pyproject.toml").read_text():
        raise SystemExit("pyproject.toml's [tool.mutmut] must keep only_mutate and pytest_add_cli_args_test_selection on one line each, in that order")
    return where


def _mutmut(where: Path, *args: str, check: bool = True, minutes: float | None = None) -> str:
    # Fewer examples per property (tests/test_settings_pinned.py): each mutant reruns them.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "COGEDIT_PROPERTY_SCALE": "0.25"}
    try:
        done = subprocess.run(["nice", "-n", "10", sys.executable, "-m", "mutmut", *args], cwd=where, env=env, capture_output=True, text=True, timeout=minutes and minutes * 60)
    except subprocess.TimeoutExpired:  # what was checked so far is saved; the rest reads "not checked"
        return ""
    if check and done.returncode != 0:
        raise SystemExit(f"mutmut {' '.join(args)} failed in {where}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout if check else done.stdout + done.stderr


# Each survivor's diff, in one process (`mutmut show` per mutant starts mutmut hundreds of times).
_SHOW = """
import json, sys
from mutmut.mutation.diff_apply import get_diff_for_mutant
print(json.dumps({name: get_diff_for_mutant(name) for name in json.load(sys.stdin)}))
"""


def _in_workers(module: str, where: Path, statuses: dict[str, str]) -> dict[str, str]:
    """`statuses` with the survivors of IN_WORKERS' functions run against their worker tests:
    killed where a test fails (pytest's exit status 1)."""
    functions, tests = IN_WORKERS.get(module, ((), []))
    todo = [n for n, s in statuses.items() if s not in (*KILLED, "not checked") and any(f".{f}__mutmut_" in n for f in functions)]
    if not todo:
        return statuses

    def fails(mutant: str) -> bool:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MUTANT_UNDER_TEST": mutant}
        try:
            done = subprocess.run(["nice", "-n", "10", sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-n", "0", *tests],
                                  cwd=where / "mutants", env=env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:  # a hang counts as mutmut counts it: killed by the time limit
            return True
        if done.returncode not in (0, 1):
            raise SystemExit(f"{module}: the worker tests did not run under mutant {mutant or '(none)'}:\n{done.stdout[-2000:]}")
        return done.returncode == 1

    if fails(""):
        raise SystemExit(f"{module}: the worker tests {tests} fail without a mutant")
    return {**statuses, **{n: "killed" for n in todo if fails(n)}}


def _diffs(where: Path, names: list[str]) -> dict[str, str]:
    done = subprocess.run([sys.executable, "-c", _SHOW], cwd=where, input=json.dumps(names), capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def _source_digest(module: str) -> str:
    """The mutated files' content: a rerun of some mutants is only valid on the same code."""
    h = hashlib.sha256()
    for f in sorted(f for f in _tree_files() if any(fnmatch.fnmatch(f, g) for g in MODULES[module][0])):
        h.update(f.encode() + b"\0" + (ROOT / f).read_bytes())
    return h.hexdigest()[:16]


def run_module(module: str, children: int, minutes: float | None, again: bool = False, resume: bool = False) -> dict:
    """Run mutmut on `module`; with `again`, only the mutants the last run did not kill and that are
    not explained (after new tests), keeping the last run's verdicts on the others (tests are only ever added); with
    `resume`, in the scratch copy of a stopped run, where mutmut checks only what it had not."""
    out = RESULTS / "mutation" / f"{module}.json"
    last = json.loads(out.read_text()) if again and out.exists() else None
    if again and (last is None or last.get("source") != _source_digest(module)):
        raise SystemExit(f"{module}: no full run on this code to rerun the survivors of; run it without --again")
    # Survivors already explained (equivalent, or GPU-only) keep their verdict: no test here can kill them.
    explained = {name for name, diff in last["survivors"].items() if equivalent(name, diff) or name in NOT_KILLED} if last else set()
    # Survivors and the mutants a stopped run did not reach: both have no verdict from these tests yet.
    rerun = [name for name, status in last["statuses"].items() if status not in KILLED and name not in explained] if last else []
    where = SCRATCH / module
    if not (resume and (where / "mutants").is_dir()):
        where = _scratch(module)
    start = time.perf_counter()
    (where / "run.log").write_text(_mutmut(where, "run", "--max-children", str(children), *rerun, check=False, minutes=minutes))
    before = last or (json.loads(out.read_text()) if resume and out.exists() else None)  # the time already spent on these mutants
    seconds = time.perf_counter() - start + (before["seconds"] if before else 0)
    statuses = dict(re.findall(r"^\s+(\S+): (.+)$", _mutmut(where, "results", "--all", "true"), flags=re.M))
    if last:
        if rerun and all(statuses.get(name, "not checked") == "not checked" for name in rerun):
            raise SystemExit(f"mutmut checked none of {module}'s survivors again ({where / 'run.log'} says why)")
        # a rerun stopped by --minutes leaves the mutants it did not reach with their last verdict
        statuses = {name: statuses[name] if statuses.get(name, "not checked") != "not checked" else status for name, status in last["statuses"].items()}
    if not statuses or all(s == "not checked" for s in statuses.values()):
        raise SystemExit(f"mutmut checked no mutant of {module} ({where / 'run.log'} says why; a selected test failing without a mutant stops it)")
    statuses = _in_workers(module, where, statuses)
    survivors = _diffs(where, [name for name, status in statuses.items() if status not in (*KILLED, "not checked")])
    result = {
        "module": module, "date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "files": MODULES[module][0],
        "tests": json.loads(re.search(r"^pytest_add_cli_args_test_selection = (.*)$", (where / "pyproject.toml").read_text(), re.M)[1]),  # as run (--resume: as then)
        "source": _source_digest(module), "seconds": round(seconds), "statuses": statuses, "survivors": survivors,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _families() -> dict[str, list[str]]:
    """Module family (the name before a dash: "hooks" for "hooks-kv") -> its modules, in MODULES' order."""
    families: dict[str, list[str]] = {}
    for module in MODULES:
        families.setdefault(module.split("-")[0], []).append(module)
    return families


def _mutates(module: str, mutant: str) -> bool:
    """Whether `mutant` (engine.stages.editing.x_f__mutmut_3) is in one of `module`'s files now: a
    file moved to another module since a run counts there only."""
    path = mutant[: mutant.index(".x")].replace(".", "/") + ".py"
    return any(fnmatch.fnmatch(path, g) for g in MODULES[module][0])


def _versions() -> str:
    import hypothesis
    import mutmut
    import pytest

    return f"mutmut {mutmut.__version__}, pytest {pytest.__version__}, hypothesis {hypothesis.__version__}, Python {platform.python_version()}"


def _counts(statuses: dict[str, str], survivors: dict[str, str]) -> tuple[int, int, int, int, int]:
    """(mutants, not checked, killed, survived, equivalent)."""
    n = len(statuses)
    unchecked = sum(s == "not checked" for s in statuses.values())
    killed = sum(s in KILLED for s in statuses.values())
    return n, unchecked, killed, n - unchecked - killed, sum(equivalent(m, d) is not None for m, d in survivors.items())


def _row(label: str, files: str, counts: tuple[int, ...], minutes: str = "") -> str:
    n, unchecked, killed, survived, equivalent = counts
    share = f"{(killed + equivalent) / (n - unchecked):.1%}" if n > unchecked else ""
    return f"| {label} | {files} | {n} | {unchecked} | {killed} | {survived} | {equivalent} | {share} | {minutes} |"


def _changed_lines(diff: str) -> str:
    return " / ".join(" ".join(line.split()) for line in diff.splitlines() if line[:1] in "-+" and line[:3] not in ("---", "+++"))


def report() -> str:
    """MUTATION.md from every module's results on disk: a row per module and per file, and every survivor."""
    lines = [
        "# Mutation testing",
        "",
        f"`python benchmarks/mutation.py` (mutmut, [tool.mutmut] in pyproject.toml), {datetime.now(timezone.utc):%Y-%m-%d}; {_versions()};",
        f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores (shared), `nice -n 10`. Killed: a selected test failed, timed out, or the tests'",
        "process ended otherwise than passing (a signal); survived includes mutants no selected test reaches (mutmut's 'no tests'). Functions that run only in worker",
        "processes (IN_WORKERS in the script) have their survivors run again against the tests that start those workers.",
        "",
        "| module | files | mutants | not checked (time) | killed | survived | equivalent | killed or equivalent, of those checked | minutes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    details, totals, unfinished = [], [0] * 5, []
    for family, modules in _families().items():
        runs = {m: json.loads(path.read_text()) for m in modules if (path := RESULTS / "mutation" / f"{m}.json").exists()}
        files = ", ".join(f for m in modules for f in MODULES[m][0])
        if not runs:
            lines.append(f"| {family} | {files} | not run | | | | | | |")
            continue
        statuses = {k: v for m, r in runs.items() for k, v in r["statuses"].items() if _mutates(m, k)}
        survivors = {k: v for m, r in runs.items() for k, v in r["survivors"].items() if _mutates(m, k)}
        counts = _counts(statuses, survivors)
        totals = [a + b for a, b in zip(totals, counts)]
        missing = [m for m in modules if m not in runs]
        unfinished += [f"{m} ({n} of {len(r['statuses'])} not checked)" for m, r in runs.items() if (n := sum(v == "not checked" for v in r["statuses"].values()))]
        dates = sorted({r.get("date") or f"{datetime.fromtimestamp((RESULTS / 'mutation' / f'{m}.json').stat().st_mtime, timezone.utc):%Y-%m-%d %H:%M} UTC" for m, r in runs.items()})
        when = f"{sum(r['seconds'] for r in runs.values()) / 60:.0f} ({', '.join(dates)})"
        lines.append(_row(f"**{family}**", files + "".join(f" ({m} not run)" for m in missing), counts, when))
        by_file: dict[str, list[str]] = {}
        for name in statuses:
            by_file.setdefault(name[: name.index(".x")], []).append(name)
        for file, names in sorted(by_file.items()):
            lines.append(_row("", file.replace(".", "/") + ".py", _counts({m: statuses[m] for m in names}, {m: survivors[m] for m in names if m in survivors})))
        details += [f"- `{name}` ({_why(name, diff, statuses[name])}): `{_changed_lines(diff)}`" for name, diff in survivors.items()]
    if totals[0]:
        lines.append(_row("all", "", tuple(totals)))
    if unfinished:
        lines += ["", f"Not run to the end (time): {', '.join(unfinished)}. The share above is of the mutants checked; "
                  "`python benchmarks/mutation.py MODULE --resume` goes on right after a stopped run (in its scratch copy); after an --again, run the module whole."]
    stale = sorted(set(EQUIVALENT) - {m for module in MODULES if (p := RESULTS / "mutation" / f"{module}.json").exists() for m in json.loads(p.read_text())["survivors"]})
    if stale:
        lines += ["", f"Stale EQUIVALENT entries (their mutants no longer survive): {', '.join(stale)}"]
    return "\n".join(lines + ["", "## Survivors", "", "Each with its status, or why it is equivalent, and the changed line.", "", *details]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="*", help=f"modules to run: {', '.join(MODULES)}, or a family (hooks: every hooks-*) (default: all)")
    parser.add_argument("--report", action="store_true", help="only write MUTATION.md from the results on disk")
    parser.add_argument("--children", type=int, default=2, help="mutants tested at once")
    parser.add_argument("--again", action="store_true", help="rerun only the mutants the last run left alive (after adding tests); the others keep their verdicts")
    parser.add_argument("--resume", action="store_true", help="go on with a stopped run in its scratch copy (.mutation/<module>/, its tests as they were then)")
    parser.add_argument("--minutes", type=float, default=None, help="stop each module after this long (the rest is reported as not checked)")
    args = parser.parse_args()
    families = _families()
    unknown = sorted(set(args.modules) - set(MODULES) - set(families))
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}; the modules are {', '.join(MODULES)}, or a family: {', '.join(families)}")
    if not args.report:
        for module in [m for name in args.modules for m in families.get(name, [name])] or MODULES:
            r = run_module(module, args.children, args.minutes, args.again, args.resume)
            print(f"{module}: {len(r['statuses'])} mutants, {len(r['survivors'])} not killed, {r['seconds']} s", flush=True)
    (RESULTS / "MUTATION.md").write_text(report())
    print(RESULTS / "MUTATION.md")


if __name__ == "__main__":
    main()
