"""The stages' arithmetic without a model: settings and their checks, windows, schedulers, the
round trip's verdict and advice, output names, stored attention's budget. Each test is a few
milliseconds (mutation testing reruns them per mutant: benchmarks/mutation.py)."""

from __future__ import annotations

import logging
import os
import re
from types import SimpleNamespace

import pytest
import torch

from engine.errors import OutputExistsError, PromptError, SettingsError
from engine.models.configs import SCHEDULER_5B
from engine.stages.settings import EditSettings, InjectSettings, InvertSettings, StoreSettings, inverted_spans, layers_of, parse_layers, parse_window, window_of, window_steps


def exactly(message: str) -> str:
    """pytest.raises' `match` for the whole message, word for word."""
    return "^" + re.escape(message) + "$"


def test_windows_of_edit_steps_round_to_the_nearest_step():
    assert window_steps((0.0, 0.6), 10) == range(0, 6) and window_steps((0.25, 0.75), 10) == range(2, 8)
    assert window_steps((0.0, 1.0), 7) == range(7) and window_steps((0.5, 0.5), 4) == range(2, 2)
    assert parse_window("0:0.6") == (0.0, 0.6) and parse_window(" 0.2 : 1 ") == (0.2, 1.0) and parse_window("0.3:0.3") == (0.3, 0.3)
    with pytest.raises(SettingsError, match=exactly("--inject-steps takes START:END fractions like 0:0.6, got '1'")):
        parse_window("1")
    for bad, why in (("0.6", "takes START:END"), ("a:b", "takes START:END"), ("0.7:0.6", "needs 0 <= START"), ("-0.1:0.5", "needs 0 <= START"), ("0:1.5", "needs 0 <= START")):
        with pytest.raises(SettingsError, match=f"--attention-steps {why}"):
            parse_window(bad, "--attention-steps")
    assert window_of("0:0.5", "--x") == (0.0, 0.5) and window_of((0.1, 0.2), "--x") == (0.1, 0.2)
    with pytest.raises(SettingsError, match=exactly("--attention-steps takes START:END fractions like 0:0.6, got '1'")):
        window_of("1", "--attention-steps")


def test_layers_are_all_or_ranges_inside_the_model():
    assert parse_layers("all") is None and parse_layers(" ALL ") is None
    assert parse_layers("3-5, 1,4") == (1, 3, 4, 5) and parse_layers("0-9,20", 42) == (*range(10), 20)
    assert parse_layers("41", 42) == (41,)
    with pytest.raises(SettingsError, match=r"--attention-layers '42' names a layer outside 0-41"):
        parse_layers("42", 42, "--attention-layers")
    with pytest.raises(SettingsError, match="--inject-layers takes 'all' or a list like 0-9,20, got 'x'"):
        parse_layers("x")
    assert layers_of("1-2", 4, "--x") == (1, 2) and layers_of((3,), 4, "--x") == (3,) and layers_of(None, 4, "--x") is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(steps=0), "--steps must be between 1 and 1000, got 0"),
        (dict(steps=1001), "--steps must be between 1 and 1000"),
        (dict(guidance=0.99), "--guidance must be >= 1"),
        (dict(method="euler"), "--inversion must be ddim or fixed-point, got 'euler'"),
        (dict(iters=2), "--inversion-iters refines fixed-point inversion"),
        (dict(method="fixed-point"), "--inversion-iters must be between 1 and 10 with --inversion fixed-point, got 0"),
        (dict(method="fixed-point", iters=11), "--inversion-iters must be between 1 and 10 with --inversion fixed-point, got 11"),
        (dict(window=3, overlap=3), "--window-overlap must be between 1 and 2"),
    ],
)
def test_inversion_settings_refuse_what_cannot_run(fields, message):
    with pytest.raises(SettingsError, match="^" + re.escape(message)):
        InvertSettings(**fields)


def test_inversion_settings_accept_their_limits_and_key_only_what_is_in_effect():
    for ok in (dict(steps=1), dict(steps=1000), dict(guidance=1.0), dict(method="fixed-point", iters=1), dict(method="fixed-point", iters=10)):
        InvertSettings(**ok)
    assert not InvertSettings(guidance=1.0, negative_prompt="x").uses_cfg and not InvertSettings(guidance=6, source_prompt="a", negative_prompt="a").uses_cfg
    assert InvertSettings(guidance=1.5, source_prompt="a").uses_cfg
    plain = InvertSettings(steps=8, source_prompt="a", negative_prompt="b", guidance=1.0).key_fields()
    assert plain == {"steps": 8, "source_prompt": "a", "negative_prompt": "a", "guidance": 1.0}
    guided = InvertSettings(source_prompt="a", negative_prompt="b", guidance=3.0, method="fixed-point", iters=2, window=3, overlap=1).key_fields()
    assert guided == {"steps": 50, "source_prompt": "a", "negative_prompt": "b", "guidance": 3.0, "method": "fixed-point", "iters": 2, "window": 3, "overlap": 1, "anchors": "single-frame"}
    assert InvertSettings().spans(5) == [(0, 5)] and InvertSettings(window=3, overlap=1).spans(5) == [(0, 3), (2, 5)]
    info = SimpleNamespace(vae_latent_frames=lambda frames: (frames - 1) // 4 + 1)  # 17 frames -> 5 latent frames

    def entry(invert: dict, state_frames: int) -> SimpleNamespace:
        return SimpleNamespace(id="0123456789abcdef", frames=17, manifest={"settings": {"invert": invert}, "summary": {"latent_shape": [1, state_frames, 16, 8, 8]}})

    assert inverted_spans(entry({"window": 3, "overlap": 1}, 6), info) == [(0, 3), (2, 5)] and inverted_spans(entry({}, 5), info) == [(0, 5)]
    refusal = "inversion 0123456789ab was made by an earlier cogedit, whose windows started without anchors: invert the clip again (`cogedit cache rm 0123456789ab` frees its space)"
    with pytest.raises(SettingsError, match="^" + re.escape(refusal) + "$"):
        inverted_spans(entry({"window": 3, "overlap": 1}, 5), info)  # the latents hold no anchor


def test_injection_is_active_in_its_window_at_a_positive_strength_on_some_layer():
    inject = InjectSettings(window=(0.0, 0.5))
    assert [inject.is_active(i, 4) for i in range(4)] == [True, True, False, False] and inject.active_steps(4) == range(2)
    assert not InjectSettings(strength=0.0).is_active(0, 4) and not InjectSettings(layers=()).is_active(0, 4)
    assert InjectSettings(layers=(1,)).is_active(3, 4)
    InjectSettings(strength=0.0, reference="per-half")
    with pytest.raises(SettingsError, match="--inject-strength must be >= 0, got -0.1"):
        InjectSettings(strength=-0.1)
    with pytest.raises(SettingsError, match="--reference must be shared, per-half or stored, got 'own'"):
        InjectSettings(reference="own")


def test_edit_settings_refuse_bad_input_and_chunk_the_prompts():
    with pytest.raises(PromptError, match=exactly("no prompt given: pass --prompt TEXT (repeat it for several edits)")):
        EditSettings(prompts=())
    with pytest.raises(PromptError, match=exactly("an edit prompt is empty: describe the edited video, e.g. --prompt 'a watercolor painting'")):
        EditSettings(prompts=("a", " "))
    for fields, message in ((dict(init="noise"), "--init must be inverted or random, got 'noise'"), (dict(guidance=0.5), "--guidance must be >= 1"), (dict(batch=0), "--batch must be >= 1, got 0")):
        with pytest.raises(SettingsError, match=message):
            EditSettings(prompts=("a",), **fields)
    EditSettings(prompts=("a",), guidance=1.0, batch=1, init="random")
    assert EditSettings(prompts=tuple("abcde"), batch=2).chunks() == [("a", "b"), ("c", "d"), ("e",)]
    assert EditSettings(prompts=("a",), guidance=1.5).uses_cfg and not EditSettings(prompts=("a",), guidance=1.0).uses_cfg


def test_edit_keys_hold_what_changes_pixels_and_the_mask_only_when_there_is_one():
    fields = EditSettings(prompts=("a",), negative_prompt="n", seed=3, init="random", mask="abc", inject=InjectSettings(strength=0.5, layers=(1,))).key_fields()
    assert fields == {
        "negative_prompt": "n", "guidance": 6.0, "init": "random", "seed": 3, "mask": "abc",
        "inject": {"window": (0.0, 1.0), "layers": (1,), "strength": 0.5, "reference": "shared"},
    }
    quiet = EditSettings(prompts=("a",), negative_prompt="n", guidance=1.0, seed=3, inject=InjectSettings(strength=0.0, layers=(1,), reference="stored")).key_fields()
    assert quiet == {"negative_prompt": "", "guidance": 1.0, "init": "inverted", "seed": 0, "inject": {"window": (0.0, 1.0), "layers": None, "strength": 0.0, "reference": "shared"}}


def test_a_store_is_keyed_by_what_it_holds_and_costs_its_blocks_times_steps():
    with pytest.raises(SettingsError, match="--attention-store must be none, cpu or disk, got 'gpu'"):
        StoreSettings(where="gpu")
    with pytest.raises(SettingsError, match="--attention-dtype must be model, bf16 or fp8, got 'fp16'"):
        StoreSettings(dtype="fp16")
    base = StoreSettings("disk")
    assert base.key == StoreSettings("cpu").key and len(base.key) == 16
    assert len({base.key, StoreSettings("disk", window=(0, 0.5)).key, StoreSettings("disk", layers=(1,)).key, StoreSettings("disk", dtype="fp8").key}) == 4
    assert StoreSettings(window=(0.0, 0.5)).edit_steps(10) == range(5)
    assert base.block_ids(3) == (0, 1, 2) and StoreSettings(layers=(2,)).block_ids(3) == (2,)
    # steps x blocks x (K and V) x tokens x width x bytes per number
    assert StoreSettings(window=(0.0, 0.5), layers=(0, 1, 2)).bytes_needed(10, 42, 100, 8) == 5 * 3 * 2 * 100 * 8 * 2
    assert StoreSettings(dtype="fp8").bytes_needed(2, 3, 10, 4) == 2 * 3 * 2 * 10 * 4 * 1
    assert StoreSettings(dtype="bf16").bytes_needed(2, 3, 10, 4, model_bytes=4) == 2 * 3 * 2 * 10 * 4 * 2
    assert StoreSettings().bytes_needed(2, 3, 10, 4, model_bytes=4) == 2 * 3 * 2 * 10 * 4 * 4


def test_a_store_over_budget_names_a_window_that_fits():
    from engine.stages.attention_store import budget_refusal

    store = StoreSettings("disk", window=(0.0, 0.5))  # 5 of 10 steps, 4 blocks: 20 block-steps of 2 * 10 * 8 * 2 = 320 bytes
    assert budget_refusal(store, 10, 4, 10, 8, 20 * 320) is None
    over = budget_refusal(store, 10, 4, 10, 8, 20 * 320 - 1)
    assert over.startswith("stored attention needs 6.2 KiB (5 steps x 4 blocks x 320 B) but the budget is")
    assert over.endswith("try --attention-steps 0:0.40 (first 4 steps, every block)")
    assert budget_refusal(store, 10, 4, 10, 8, 4 * 320).endswith("try --attention-steps 0:0.10 (first 1 steps, every block)")
    assert budget_refusal(store, 10, 4, 10, 8, 3 * 320).endswith("try --attention-layers 0-2 with one step (--attention-steps 0:0.10), or --attention-dtype fp8")
    assert budget_refusal(store, 10, 4, 10, 8, 320).endswith("--attention-layers 0-0 with one step (--attention-steps 0:0.10), or --attention-dtype fp8")
    assert budget_refusal(store, 10, 4, 10, 8, 319).endswith("try a larger --attention-budget, or --reference shared (recompute, no storage)")


def test_memory_stores_list_only_timesteps_that_hold_every_block():
    from engine.stages.attention_store import MemoryStores, store_settings

    memory = MemoryStores()
    steps = memory.steps("k")
    steps[999] = {0: {}, 1: {}}
    steps[749] = {0: {}}  # a capture stopped mid-step
    memory.steps("empty")
    assert memory.whole("k") == [999] and memory.whole("none") == [] and memory.whole("empty") == []
    assert memory.described() == {"k": {"where": "cpu", "timesteps": [999], "layers": [0, 1], "windows": 1}}
    memory.release()
    assert memory.described() == {} and memory.steps("k") == {}
    assert store_settings("cpu", "0:0.5", "1-2", "fp8", 4) == StoreSettings("cpu", (0.0, 0.5), (1, 2), "fp8")
    with pytest.raises(SettingsError, match="--attention-layers"):
        store_settings("cpu", "0:1", "7", "model", 4)


def test_edit_step_i_runs_at_the_timestep_inversion_step_steps_minus_1_minus_i_ran_at():
    from engine.stages.schedulers import edit_scheduler, edit_timesteps, inverse_scheduler

    edit, inverse = edit_scheduler(SCHEDULER_5B, 5).timesteps, inverse_scheduler(SCHEDULER_5B, 5).timesteps
    assert len(edit) == len(inverse) == 5 and edit.tolist() == inverse.flip(0).tolist() and edit[0] > edit[-1]
    assert edit_timesteps(SCHEDULER_5B, 5, range(2)) == {int(edit[0]), int(edit[1])} and edit_timesteps(SCHEDULER_5B, 5, [4]) == {int(edit[4])}


def test_windows_of_a_clip_and_the_shape_one_window_sees():
    from engine.models.model_info import builtin_5b
    from engine.stages.windows import Windowing, default_overlap, window_count, window_shape

    assert [default_overlap(n) for n in (1, 2, 3, 4, 5, 8, 13, 18, 20)] == [0, 1, 2, 3, 3, 3, 4, 5, 6]  # 30% rounded half up
    info = builtin_5b()  # 13 latent frames a window, 4 shared
    assert [window_count(info, frames) for frames in (49, 53, 85, 97)] == [1, 2, 2, 3]
    assert window_shape(torch.Size((2, 25, 16, 60, 90)), [(0, 13), (6, 19)]) == torch.Size((2, 13, 16, 60, 90))
    assert window_shape(torch.Size((1, 5, 16, 60, 90)), [(0, 5)]) == torch.Size((1, 5, 16, 60, 90))
    assert Windowing(2, 1).spans(3) == [(0, 2), (1, 3)]
    with pytest.raises(SettingsError, match="a window needs at least two latent frames, got 1"):
        Windowing(1, 0)
    for overlap in (0, 4):  # a later window leaves its first frame to its anchor: at least 1 shared
        with pytest.raises(SettingsError, match=f"--window-overlap must be between 1 and 3 latent frames \\(the window is 4\\), got {overlap}"):
            Windowing(4, overlap)


def test_a_windows_frames_are_the_tensor_itself_for_the_whole_clip_and_a_contiguous_copy_otherwise():
    from engine.stages.windows import frames_of

    x = torch.randn(2, 5, 3, 4)  # 5 frames, 3 rows
    assert frames_of(x, slice(0, 5)) is x, "a whole-clip window is the state itself, no copy"
    for frames in (slice(1, 5), slice(0, 3), [4, 1, 2]):
        part = frames_of(x, frames)
        assert part is not x and part.is_contiguous() and torch.equal(part, x[:, frames])


def test_window_weights_share_each_frame_equally_and_give_an_anchor_to_its_window_alone():
    from engine.stages.windows import blend_weights, window_calls

    spans = [(0, 4), (2, 6)]  # the second window calls its anchor (state frame 6), then 3..5; frame 2 is the first's
    assert window_calls(spans) == [[0, 1, 2, 3], [6, 3, 4, 5]]
    weights = blend_weights(spans)
    shares = torch.tensor([[1, 1, 1, 0.5, 0, 0, 0], [0, 0, 0, 0.5, 1, 1, 1]])
    torch.testing.assert_close(weights, shares, rtol=0, atol=0)
    assert weights.dtype == torch.float32
    with pytest.raises(ValueError, match=r"leave latent frames uncovered"):
        blend_weights([(0, 2), (4, 6)])


def test_round_trip_psnr_verdict_and_advice(caplog):
    from engine.stages.verify import _advise, _detail, psnr_db, with_verdict

    black = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    assert psnr_db(black, black) == float("inf") and psnr_db(black, black + 255) == 0.0
    assert psnr_db(black, black + 1) == pytest.approx(48.1308, abs=1e-4)
    assert with_verdict({"latent_rel_error": 0.2, "psnr_db": 30.0}) == {"latent_rel_error": 0.2, "psnr_db": 30.0, "verdict": "poor"}
    assert _detail({"latent_rel_error": 0.0412, "psnr_db": 31.26}) == "round trip: latent error 0.0412, PSNR 31.3 dB: good"
    with caplog.at_level(logging.WARNING, logger="cogedit"):
        _advise({"latent_rel_error": 0.1}, "ddim")
        assert not caplog.records
        _advise({"latent_rel_error": 0.2}, "ddim")
        _advise({"latent_rel_error": 0.7}, "fixed-point")
    poor, failed = (r.getMessage() for r in caplog.records)
    assert poor == "the round trip is poor (latent error 0.2 >= 0.15); invert again with --inversion fixed-point — see docs/verify.md"
    assert failed.startswith("the round trip is failed (latent error 0.7 >= 0.5: the inverted noise leads back to another picture); invert again with other --steps")


def test_output_names_are_bounded_ascii_words_and_never_overwrite(tmp_path):
    from engine.stages.decode import claim, output_paths, safe_name

    assert safe_name("Café au lait!", 3) == "03-cafe-au-lait" and safe_name("***", 12) == "12-edit"
    words = "a watercolor painting of a red fox running through deep snow at dusk"  # 69 characters
    assert safe_name(words, 0) == "00-a-watercolor-painting-of-a-red-fox-running-through-deep-snow"  # 60: cut after a word
    assert safe_name(words[:60], 1) == "01-a-watercolor-painting-of-a-red-fox-running-through-deep-snow"  # 60 fit whole
    assert safe_name("x" * 70, 0) == "00-" + "x" * 60 and safe_name("y" * 60, 0) == "00-" + "y" * 60
    videos, pairs = output_paths("abc-def", ("a fox", "snow"), tmp_path / "out", force=False)
    assert [p.name for p in videos] == ["abc-def-00-a-fox.mp4", "abc-def-01-snow.mp4"] and [p.name for p in pairs] == ["abc-def-00-a-fox-side-by-side.mp4", "abc-def-01-snow-side-by-side.mp4"]
    videos[1].write_bytes(b"")
    with pytest.raises(OutputExistsError, match="abc-def-01-snow.mp4 already exists; pass --force"):
        output_paths("abc-def", ("a fox", "snow"), tmp_path / "out", force=False)
    assert claim(videos[1], force=True) == videos[1]
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(SettingsError, match="cannot create --out folder"):
        output_paths("s", ("a",), tmp_path / "file" / "out", force=False)


def test_a_stage_context_tells_its_callback_the_phase():
    from engine.stages.context import StageContext

    seen = []
    StageContext(None, None, None, None, callback=seen.append).notify("edit", {"i": 2})
    StageContext(None, None, None, None).notify("edit", {"i": 3})
    assert seen == [{"phase": "edit", "i": 2}]


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_rows_embeddings_and_what_gpus_cannot_share_out():
    from engine.hooks.token_exchange import TokenSplit
    from engine.stages.distributed import GuidanceSplit, Mesh, check_gpu_count, guidance_embeds, shares

    cond, uncond = torch.arange(12.0).view(2, 3, 2), torch.full((1, 3, 2), -1.0)
    assert guidance_embeds(cond, None, None) is cond
    assert torch.equal(guidance_embeds(cond, uncond, None), torch.cat([uncond, uncond, cond]))  # [uncond x K, cond x K]
    assert torch.equal(guidance_embeds(cond, uncond, GuidanceSplit(0)), torch.cat([uncond, uncond]))
    assert guidance_embeds(cond, uncond, GuidanceSplit(1)) is cond
    with pytest.raises(SettingsError, match=r"^--gpus takes 1, 2, 4, 8, got 3$"):
        check_gpu_count(3)
    with pytest.raises(SettingsError, match=r"^--gpus 8 splits the tokens 8 ways, which the model's 12 attention heads do not divide into: use --gpus 1 or 2 or 4$"):
        shares(8, False, 12)
    with pytest.raises(SettingsError, match=r"^--gpus 4 splits the tokens 2 ways, which the model's 3 attention heads do not divide into: use --gpus 1 or 2$"):
        shares(4, True, 3)
    assert Mesh(GuidanceSplit(1), TokenSplit()).describe() == "conditional rows here"
    assert Mesh(None, TokenSplit(None, 0, 2)).describe() == "tokens split 2 ways"
    assert Mesh(GuidanceSplit(0), TokenSplit(None, 1, 4)).describe() == "unconditional rows here, tokens split 4 ways"


def test_a_worker_reads_its_place_from_torchruns_variables(no_torchrun):
    from engine.stages.distributed import GuidanceSplit, Mesh, backend_for, check_worker_device, rank, under_torchrun, worker_device, world_size

    assert not under_torchrun() and rank() == 0 and world_size() == 1
    with pytest.raises(SettingsError, match="--device cuda:1 with several workers"):
        check_worker_device("cuda:1")  # the launcher, before any worker starts: one GPU for all of them
    for name, value in {"LOCAL_RANK": "1", "WORLD_SIZE": "2"}.items():
        no_torchrun.setenv(name, value)
        assert not under_torchrun()  # torchrun sets all three
    no_torchrun.setenv("MASTER_ADDR", "localhost")
    no_torchrun.setenv("RANK", "1")
    assert under_torchrun() and rank() == 1 and world_size() == 2
    for device in (None, "cuda", "cpu", "cuda:1"):
        check_worker_device(device)
    with pytest.raises(SettingsError, match="--device cuda:0 with several workers: leave --device out"):
        check_worker_device("cuda:0")
    assert worker_device("cpu") == "cpu"
    uncond, cond = torch.zeros(1), torch.ones(1)
    assert GuidanceSplit(0).own(uncond, cond) is uncond and GuidanceSplit(1).own(uncond, cond) is cond
    no_torchrun.setenv("WORLD_SIZE", "3")
    with pytest.raises(SettingsError, match="--gpus 2 needs 2 workers, this group has 3; start it with --nproc-per-node 2"):
        Mesh.make(2, True, 48)
    assert backend_for("cuda") == backend_for("cuda:1") == "nccl" and backend_for("cpu") == "gloo"


def test_a_process_group_of_one_comes_and_goes_with_multicast_off(no_torchrun):
    import torch.distributed as dist

    from engine.stages.distributed import MULTICAST_OFF, process_group, rank, world_size
    from tests.conftest import free_port

    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1"}.items():
        no_torchrun.setenv(name, value)
    for name in MULTICAST_OFF:
        no_torchrun.delenv(name, raising=False)
    with process_group("gloo"):
        assert dist.is_initialized() and dist.get_backend() == "gloo" and world_size() == 1
        no_torchrun.setenv("RANK", "3")
        no_torchrun.setenv("WORLD_SIZE", "5")
        assert rank() == 0 and world_size() == 1, "the group's, not the variables'"
        assert {name: os.environ.get(name) for name in MULTICAST_OFF} == MULTICAST_OFF
        with process_group("gloo"):  # already up: its owner ends it
            pass
        assert dist.is_initialized()
    assert not dist.is_initialized()


def test_a_failed_worker_is_one_line_and_a_users_error_travels_back(tmp_path, no_torchrun):
    import pickle
    from types import SimpleNamespace

    from engine.stages.distributed import _entry, _failure_line

    def failure(code, message=None):
        return SimpleNamespace(exitcode=code, message=message)

    tail = "; finished work is cached — run the same command again to finish the rest (COGEDIT_DEBUG=1 shows the workers' logs)"
    assert _failure_line(SimpleNamespace(failures={1: failure(1), 0: failure(-9)})) == "worker 0 was killed by SIGKILL" + tail
    traceback = {"message": "Traceback (most recent call last):\n  ...\nValueError: boom\n\n"}
    assert _failure_line(SimpleNamespace(failures={2: failure(1, traceback)})) == "worker 2 failed: ValueError: boom" + tail
    assert _failure_line(SimpleNamespace(failures={0: failure(3, "RuntimeError: x" + "y" * 400)})) == "worker 0 failed: RuntimeError: x" + "y" * 285 + tail
    assert _failure_line(SimpleNamespace(failures={0: failure(2, {"message": " \n"})})) == "worker 0 exited with status 2" + tail
    assert _failure_line(SimpleNamespace(failures={3: failure(4, {"error": "x"})})) == "worker 3 exited with status 4" + tail
    assert _failure_line(SimpleNamespace(failures={3: failure(4)})) == "worker 3 exited with status 4" + tail
    assert _failure_line(SimpleNamespace(failures={0: failure(0)})) == "worker 0 exited with status 0" + tail
    assert _entry(lambda a, b: a + b, (1, 2), str(tmp_path)) == 3
    no_torchrun.setenv("RANK", "1")
    with pytest.raises(SettingsError, match="bad"):
        _entry(lambda: (_ for _ in ()).throw(SettingsError("bad")), (), str(tmp_path))
    with pytest.raises(ZeroDivisionError):
        _entry(lambda: 1 / 0, (), str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["1.pickle"] and str(pickle.loads((tmp_path / "1.pickle").read_bytes())) == "bad"


def test_the_v_loss_is_the_squared_error_of_the_velocity_at_each_rows_noise_level():
    """v = sqrt(a) noise - sqrt(1 - a) x0 at the noisy input sqrt(a) x0 + sqrt(1 - a) noise, one
    timestep per row (Salimans & Ho 2022), against a one-block CogVideoX transformer; weights make
    it a weighted mean."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXTransformer3DModel

    from benchmarks.train_proxy import TRANSFORMER_CONFIG
    from engine.models.denoiser import rotary_embeddings
    from engine.stages.vloss import v_prediction_loss

    torch.manual_seed(0)
    config = {**TRANSFORMER_CONFIG, "num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16, "time_embed_dim": 16, "text_embed_dim": 16}
    transformer = CogVideoXTransformer3DModel(**config).eval()
    alphas = CogVideoXDDIMScheduler(**SCHEDULER_5B).alphas_cumprod.double()  # float64: cast to the latents' dtype inside
    x0, noise = torch.randn(2, 2, 16, 12, 18), torch.randn(2, 2, 16, 12, 18)
    embeds, t = torch.randn(2, config["max_text_seq_length"], 16), torch.tensor([100, 900])
    weights = torch.rand(2, 2, 1, 12, 18)
    with torch.no_grad():
        plain, weighted = (v_prediction_loss(transformer, alphas, x0, embeds, t, noise, w) for w in (None, weights))
        a = alphas.float()[t].view(-1, 1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        v = transformer(hidden_states=noisy, encoder_hidden_states=embeds, timestep=t, image_rotary_emb=rotary_embeddings(transformer, x0.shape, 8, "cpu"), return_dict=False)[0]
    error = (v - (a.sqrt() * noise - (1 - a).sqrt() * x0)) ** 2
    assert plain.dtype == torch.float32
    torch.testing.assert_close(plain, error.mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(weighted, (weights * error).sum() / weights.expand_as(error).sum(), rtol=1e-5, atol=0)


def test_blended_windows_average_each_windows_own_prediction_per_frame():
    """A prediction that differs from window to window (each adds its window's index) blends to
    the mean over the windows that call a frame; a clip of one window is one call over all its frames."""
    from engine.stages.windows import blend_weights, blended

    spans = [(0, 4), (2, 6)]
    x, calls = torch.randn(2, 7, 3), []  # 6 latent frames and the second window's anchor

    def predict(w: int, frames) -> torch.Tensor:
        calls.append((w, frames))
        return x[:, frames] + w

    out = blended(predict, spans)
    offsets = (blend_weights(spans) * torch.tensor([[0.0], [1.0]])).sum(0)
    torch.testing.assert_close(out, x + offsets.view(1, 7, 1), rtol=0, atol=1e-6)
    assert calls == [(0, [0, 1, 2, 3]), (1, [6, 3, 4, 5])]
    calls.clear()
    assert blended(predict, [(0, 6)]).equal(x[:, :6]) and calls == [(0, slice(0, 6))]
    assert blended(lambda w, frames: x, [(0, 6)]) is x, "the call's own result, no copy"


def test_a_worker_takes_the_gpu_of_its_local_rank_and_refuses_one_it_has_not(no_torchrun):
    from engine.errors import DeviceError
    from engine.stages.distributed import worker_device

    chosen = []
    no_torchrun.setattr(torch.cuda, "is_available", lambda: True)
    no_torchrun.setattr(torch.cuda, "device_count", lambda: 2)
    no_torchrun.setattr(torch.cuda, "set_device", chosen.append)
    assert worker_device(None) == worker_device("cuda") == "cuda:0" and chosen == [0, 0]  # one process: GPU 0
    assert worker_device("cpu") == "cpu"
    for name, value in {"LOCAL_RANK": "1", "RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost"}.items():
        no_torchrun.setenv(name, value)
    assert worker_device(None) == "cuda:1" and chosen[-1] == 1
    with pytest.raises(SettingsError, match="--device cuda:0 with several workers"):
        worker_device("cuda:0")
    no_torchrun.setenv("LOCAL_RANK", "2")
    with pytest.raises(DeviceError, match=exactly("worker 2 of this machine has no GPU of its own (2 visible); start at most that many workers per machine")):
        worker_device(None)
    no_torchrun.setattr(torch.cuda, "is_available", lambda: False)
    assert worker_device(None) == "cpu"
    with pytest.raises(DeviceError, match=exactly("--device cuda: torch sees no GPU; check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES, or pass --device cpu")):
        worker_device("cuda")


def test_prompt_keys_stay_those_of_existing_caches_and_name_quantized_t5_weights():
    from engine.stages.embed import prompt_key

    # Literal keys: a cache written by an earlier version must keep hitting (a renamed field is a silent miss for every user).
    info = SimpleNamespace(text_length=226)
    runtime = lambda weights, dtype=torch.bfloat16: SimpleNamespace(dtype=dtype, plan=SimpleNamespace(text_encoder_weights=weights))  # noqa: E731
    assert prompt_key("a cat", info, runtime("bf16")) == "83d9ee25bf4f820a06b27ffd123671b1"
    assert prompt_key("a cat", info, runtime("int8")) == "ce766435d9afe6b4e9aaddc4e2d9e0e5"
    assert prompt_key("a cat", SimpleNamespace(text_length=224), runtime("bf16")) == "406d6522aaa6368cfde419ae90ff6c81"
    assert len({prompt_key("a cat", info, runtime("bf16", torch.float16)), prompt_key("a dog", info, runtime("bf16")), prompt_key("a cat", info, runtime("nf4"))}) == 3


def test_a_prompt_is_padded_or_cut_to_the_models_length_and_a_cut_is_told_once(tmp_path, caplog, capfd):
    from transformers import AutoTokenizer

    from engine.models.tiny import train_tokenizer
    from engine.stages.embed import tokenize

    train_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    full = tok("a cat").input_ids  # ends with T5's end-of-text token
    caplog.set_level(logging.WARNING, "cogedit")
    assert tokenize(tok, "a cat", 8).tolist() == [full + [tok.pad_token_id] * (8 - len(full))]
    assert tokenize(tok, "a cat", len(full)).tolist() == [full] and not caplog.records  # exactly the length: nothing dropped
    prompt = " ".join(["a red square moving left on a gray background, a blue circle moving right on a sky"] * 4)
    long = tok(prompt, verbose=False).input_ids
    assert len(long) > tok.model_max_length  # where transformers would warn too
    cut = tokenize(tok, prompt, 20)
    assert cut.tolist() == [long[:19] + [tok.eos_token_id]]
    assert [r.getMessage() for r in caplog.records] == [f"prompt is {len(long)} tokens; the model reads 20, so the last {len(long) - 20} are dropped: {prompt[:60]!r}…"]
    assert "Token indices sequence length" not in capfd.readouterr().err  # transformers' own warning would blame indexing


def test_side_by_side_is_the_source_cut_to_the_edits_frames_and_size_then_the_edit_labelled():
    import numpy as np

    from engine.stages.decode import side_by_side
    from engine.video.labels import labelled

    rng = np.random.default_rng(0)
    source, edited = rng.integers(0, 256, (12, 24, 32, 3), dtype=np.uint8), rng.integers(0, 256, (9, 24, 32, 3), dtype=np.uint8)
    source[:, 12:] = 0  # black stays black (the rounding's floor is 0, not 1)
    assert np.array_equal(side_by_side(source, edited, "a cat"), labelled([source[:9], edited], ["source", "edit"], "a cat"))
    # A source at twice the size comes down to the edit's, smoothed: stripes 2 px wide would stay pure black/white unsmoothed.
    stripes = np.zeros((12, 48, 64, 3), np.uint8)
    stripes[:, :, 2::4], stripes[:, :, 3::4] = 255, 255
    out = side_by_side(stripes, edited, "a cat")
    assert out.shape[:3] == labelled([edited, edited], ["source", "edit"], "a cat").shape[:3]
    inner = out[:, 16:24, 2:30].astype(int)  # below the label, above the caption's band, inside the source panel
    assert 30 < inner.min() and inner.max() < 225 and abs(inner.mean() - 127.5) < 8


def test_a_stores_default_budget_is_most_of_the_free_disk_or_half_the_available_memory(monkeypatch, tmp_path):
    import io
    from collections import namedtuple

    import engine.stages.attention_store as attention_store

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(10**12, 0, 10**9) if path == tmp_path else usage(0, 0, 0))
    assert attention_store.default_budget(StoreSettings("disk"), tmp_path) == 9 * 10**8  # 10 % of the free space stays free
    meminfo = "MemTotal:       16000000 kB\nMemFree:          100000 kB\nMemAvailable:    8000000 kB\n"
    opened = []
    monkeypatch.setattr(attention_store, "open", lambda path: opened.append(path) or io.StringIO(meminfo), raising=False)
    budget = attention_store.default_budget(StoreSettings("cpu"), tmp_path)
    assert (budget, type(budget), opened) == (8000000 * 1024 // 2, int, ["/proc/meminfo"])  # bytes: a whole number
    sysconf = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 1000}
    monkeypatch.setattr(os, "sysconf", sysconf.__getitem__)
    for failure in (OSError("no /proc here"), ValueError("not a number")):  # elsewhere: a quarter of the physical memory
        monkeypatch.setattr(attention_store, "open", lambda path, failure=failure: (_ for _ in ()).throw(failure), raising=False)
        budget = attention_store.default_budget(StoreSettings("cpu"), tmp_path)
        assert (budget, type(budget)) == (4096 * 1000 // 4, int)


def test_a_stores_plan_line_counts_every_window_and_a_store_over_budget_is_refused_before_work():
    from engine.models.model_info import builtin_5b
    from engine.models.plans import Workload
    from engine.report import Reporter
    from engine.stages.attention_store import check_budget
    from engine.stages.context import StageContext

    reporter = Reporter()
    ctx = StageContext(builtin_5b(), SimpleNamespace(dtype=torch.bfloat16), None, reporter)
    store, clip = StoreSettings("disk", window=(0.0, 0.5)), Workload(frames=49, height=480, width=720)
    # 5 of 10 steps x 42 blocks x K and V x 17,776 tokens x 3,072 channels x 2 bytes
    need = 5 * 42 * 2 * 17776 * 3072 * 2
    check_budget(ctx, store, 10, clip, need)
    check_budget(ctx, store, 10, clip, 2 * need, windows=2)
    with pytest.raises(SettingsError, match=r"^stored attention needs 42\.7 GiB \(5 steps x 42 blocks x 208\.3 MiB\) but the budget is"):
        check_budget(ctx, store, 10, clip, need - 1)
    assert [(r.name, r.detail) for r in reporter.records] == [
        ("plan", "stored attention (disk, model): 5 steps x 42 blocks = 42.7 GiB of 42.7 GiB budget"),
        ("plan", "stored attention (disk, model): 5 steps x 42 blocks x 2 windows = 85.4 GiB of 85.4 GiB budget"),
        ("plan", "stored attention (disk, model): 5 steps x 42 blocks = 42.7 GiB of 42.7 GiB budget"),
    ]
    check_budget(ctx, StoreSettings("disk", dtype="fp8", window=(0.0, 0.5)), 10, clip, need // 2)  # fp8: one byte a value
    with pytest.raises(SettingsError, match="needs 85.4 GiB"):  # a float32 model stores four bytes a value
        check_budget(StageContext(builtin_5b(), SimpleNamespace(dtype=torch.float32), None, reporter), store, 10, clip, 2 * need - 1)
    assert reporter.records[-1].detail == "stored attention (disk, model): 5 steps x 42 blocks = 85.4 GiB of 85.4 GiB budget"
