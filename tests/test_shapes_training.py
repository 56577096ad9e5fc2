"""The shapes proxy's training recipe (benchmarks/train_shapes.py) and the settings table's task
bookkeeping (benchmarks/shapes_quality.py): object-weighted loss, high timesteps, the VAE's early
stop, clips drawn by worker processes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks.shapes_quality import finished
from benchmarks.train_proxy import CHECK_EVERY, HIGH_T_FROM, TRANSFORMER_CONFIG, draw_timesteps, fit
from benchmarks.train_shapes import CHUNK, draw, drawing_pool, latent_cells, start_drawing, vae_good_enough
from engine.models.proxy import PROXY_DIR, SHAPES_DIR
from engine.stages.vloss import v_prediction_loss
from engine.video import shapes

SHAPES_VAE = SHAPES_DIR / "vae"


def test_latent_cells_cover_the_object_where_the_vae_puts_it():
    masks = np.zeros((1, shapes.FRAMES, shapes.HEIGHT, shapes.WIDTH), dtype=bool)
    masks[0, 4, 10:12, 20:30] = True  # frame 4: latent frame 1 (frames 1-4), rows 8-15, columns 16-31
    masks[0, 5, 90:96, 0:2] = True  # frame 5: latent frame 2 (frames 5-8), the bottom-left cell
    cells = latent_cells(masks)
    assert cells.shape == (5, 12, 18)
    assert set(zip(*np.nonzero(cells), strict=True)) == {(1, 1, 2), (1, 1, 3), (2, 11, 0)}


def test_latent_cells_of_a_drawn_clip_follow_its_object():
    spec = shapes.clip_spec(0, "train", objects=1)
    cells = latent_cells(shapes.render(spec)[1])
    for f, frame in enumerate((0, 4, 8, 12, 16)):
        x, y = spec.things[0].centroids()[frame]
        assert cells[f, int(y) // 8, int(x) // 8]
    assert cells.mean() < 0.2  # the object, not the frame


def test_draw_timesteps_sends_the_share_asked_to_the_noisiest_part():
    torch.manual_seed(0)
    uniform = draw_timesteps(4000, 1000, 0.0, "cpu")
    high = draw_timesteps(4000, 1000, 1.0, "cpu")
    half = draw_timesteps(4000, 1000, 0.5, "cpu")
    assert uniform.min() < 50 and 0.25 < (uniform >= HIGH_T_FROM * 1000).float().mean() < 0.35
    assert high.min() >= HIGH_T_FROM * 1000 and high.max() < 1000
    assert 0.6 < (half >= HIGH_T_FROM * 1000).float().mean() < 0.7  # half of them, and a third of the other half


def test_weighted_v_loss_counts_the_weighted_cells_more():
    from diffusers import CogVideoXDDIMScheduler, CogVideoXTransformer3DModel

    from engine.models.configs import SCHEDULER_5B

    torch.manual_seed(0)
    config = {**TRANSFORMER_CONFIG, "num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16, "time_embed_dim": 16, "text_embed_dim": 16}
    transformer = CogVideoXTransformer3DModel(**config).eval()
    alphas = CogVideoXDDIMScheduler(**SCHEDULER_5B).alphas_cumprod
    latents = torch.randn(2, 5, 16, 12, 18)
    latents[:, :, :, :2, :2] *= 20  # the model cannot predict these cells: their error is large
    args = (transformer, alphas, latents, torch.randn(2, config["max_text_seq_length"], 16), torch.tensor([500, 900]), torch.randn_like(latents))
    with torch.no_grad():
        plain = v_prediction_loss(*args)
        ones = v_prediction_loss(*args, torch.ones(2, 5, 1, 12, 18))
        cells = torch.zeros(2, 5, 1, 12, 18, dtype=torch.bool)
        cells[:, :, :, :2, :2] = True
        weighted = v_prediction_loss(*args, 1.0 + 4.0 * cells.float())
    assert torch.allclose(plain, ones)
    assert weighted > 2 * plain


def test_fit_stops_when_good_enough_says_so():
    module = torch.nn.Linear(2, 1)
    asked: list[int] = []

    def good_enough(step: int) -> bool:
        asked.append(step)
        return step >= 2 * CHECK_EVERY

    log: dict = {}
    fit("probe", module, lambda: module(torch.ones(1, 2)).pow(2).mean(), 1e-3, 0.0, 60.0, 10 * CHECK_EVERY, log, good_enough)
    assert asked == [CHECK_EVERY, 2 * CHECK_EVERY]
    assert log["probe"]["steps"] == 2 * CHECK_EVERY


def test_vae_check_passes_the_shapes_vae_and_fails_the_bunny_one():
    from diffusers import AutoencoderKLCogVideoX

    history: list[dict] = []
    check = vae_good_enough("cpu", history, clips=1)
    for path, passes in ((SHAPES_VAE, True), (PROXY_DIR / "vae", False)):
        vae = AutoencoderKLCogVideoX.from_pretrained(path, torch_dtype=torch.float32).eval()
        assert check(vae, 100) is passes
    shapes_vae, bunny = history
    assert shapes_vae["psnr_db"] > 30 and shapes_vae["object_color_right"] > 0.98
    assert bunny["psnr_db"] < 20 and bunny["object_color_right"] < 0.5


def test_clips_drawn_by_workers_are_the_serial_ones_in_order():
    seeds = list(range(CHUNK + 5))
    with drawing_pool(2) as pool:
        chunks = [c.result() for c in start_drawing(seeds, "train", pool)]
    frames, captions, cells = draw(seeds, "train")
    assert len(chunks) == 2
    assert np.array_equal(np.concatenate([c[0] for c in chunks]), frames)
    assert [c for chunk in chunks for c in chunk[1]] == captions
    assert np.array_equal(np.concatenate([c[2] for c in chunks]), cells)


@pytest.mark.parametrize("missing", [False, True])
def test_a_setting_is_finished_only_with_every_clip(missing):
    a = ([{"clip": "a", "kind": "color"}], {"a color (ddim)": np.zeros(1)})
    b = ([{"clip": "b", "kind": "color"}], {"b color (ddim)": np.ones(1)})
    outcome = finished([a, None if missing else b])
    if missing:
        assert outcome is None
    else:
        rows, frames = outcome
        assert [r["clip"] for r in rows] == ["a", "b"]
        assert list(frames) == ["a color (ddim)", "b color (ddim)"]



def _color_row(share: float, centroid: float) -> dict:
    """One clip's measures of a color edit, as benchmarks/shapes_quality.py's rows have them."""
    return {"kind": "color", "color_share": share, "centroid_error_px": centroid, "size_ratio": 1.0, "psnr_outside_db": 30.0,
            "psnr_outside_source_db": 30.0, "source_color_share": 0.0}

def test_a_lost_object_is_counted_apart_from_the_centroid_error():
    """A clip whose edited object vanishes on a frame has an infinite track error: the summary
    averages the clips tracked throughout and counts the others, and the centroid target fails."""
    from benchmarks.shapes_quality import summarize, verdicts

    kept = summarize("s", [_color_row(0.9, 1.0), _color_row(0.9, 2.0)])[0]
    assert kept["centroid_error_px"] == 1.5 and kept["lost"] == 0
    lost = summarize("s", [_color_row(0.9, 1.0), _color_row(0.9, float("inf"))])[0]
    assert lost["centroid_error_px"] == 1.0 and lost["lost"] == 1
    target = next(v for v in verdicts([lost], [], 50) if "centroid" in v["target"])
    assert not target["met"] and "lost on some frame in 1 of 2 clips" in target["measured"]
    assert next(v for v in verdicts([kept], [], 50) if "centroid" in v["target"])["met"]


def test_a_later_runs_settings_join_the_table_and_are_named(tmp_path):
    """`--report A --add B`: B's settings (an `--only` run, maybe on another device) join A's table,
    summarized like A's, and SHAPES.md says where they came from."""
    from benchmarks.shapes_quality import report

    def run(setting: str, device: str, share: float) -> dict:
        rows = [_color_row(share, 1.0)]
        return {"device": device, "torch": "t", "date": "2026-11-30", "command": f"shapes_quality.py --only {setting}", "steps": 50,
                "setup": "s", "proxy": {"what": "p", "params_total": 1, "heldout_v_loss": 0.1, "random_tiny_v_loss": 0.7},
                "rows": {setting: rows}, "summary": [], "round_trip": []}

    first, later = tmp_path / "shapes_quality.json", tmp_path / "later.json"
    first.write_text(json.dumps(run("default", "GPU", 0.1)))
    later.write_text(json.dumps(run("mask, no injection", "CPU", 0.9)))
    report(first, [later])
    merged = json.loads(first.read_text())
    assert [(r["setting"], r["adherence"]) for r in merged["summary"]] == [("default", 0.1), ("mask, no injection", 0.9)]
    text = (tmp_path / "SHAPES.md").read_text()
    assert "| color | mask, no injection | 0.900 | 100% |" in text and "Joined from another run on the same clips (CPU" in text


def test_a_confirmation_judges_the_settings_chosen_on_the_first_clips(tmp_path):
    """`--report A --confirm C`: C ran on other clips; the targets there are judged for the setting
    A's table chose, not for whichever setting happens to do best on C."""
    from benchmarks.shapes_quality import report

    def run(shares: dict[str, float], device: str) -> dict:
        return {"device": device, "torch": "t", "date": "2026-11-30", "command": "shapes_quality.py", "steps": 50, "setup": "s", "clips": [{"name": device}],
                "proxy": {"what": "p", "params_total": 1, "heldout_v_loss": 0.1, "random_tiny_v_loss": 0.7},
                "rows": {s: [_color_row(v, 1.0)] for s, v in shares.items()}, "summary": [], "round_trip": []}

    first, other = tmp_path / "shapes_quality.json", tmp_path / "other.json"
    first.write_text(json.dumps(run({"a": 0.9, "b": 0.5}, "GPU0")))
    other.write_text(json.dumps(run({"a": 0.5, "b": 0.9}, "GPU1")))
    report(first, [], [other])
    confirmed = json.loads(first.read_text())["confirmations"][0]
    color = next(v for v in confirmed["verdicts"] if v["target"].startswith("color: color_share"))
    assert color["setting"] == "a" and color["measured"] == "0%" and not color["met"]
    assert [(r["setting"], r["clips"], r["pass_rate"]) for r in confirmed["pooled"]] == [("a", 2, 0.5), ("b", 2, 0.5)]
    text = (tmp_path / "SHAPES.md").read_text()
    assert "## Confirmed on other held-out clips" in text and "(GPU1," in text


def test_fit_with_ema_returns_the_moving_average_of_the_weights():
    torch.manual_seed(0)
    module = torch.nn.Linear(2, 1)
    seen = [module.weight.detach().clone()]

    def loss() -> torch.Tensor:
        seen.append(module.weight.detach().clone())  # the weights after the previous step
        return module(torch.ones(1, 2)).pow(2).mean()

    averaged = fit("probe", module, loss, 1e-2, 0.0, 60.0, 20, {}, ema=0.9)
    seen.append(module.weight.detach().clone())
    expected = seen[2]  # the average starts as a copy of the weights after the first step
    for w in seen[3:]:
        expected = 0.9 * expected + 0.1 * w
    assert torch.allclose(averaged.weight, expected, atol=1e-6)
    assert not torch.allclose(averaged.weight, module.weight, atol=1e-4)


def test_a_masks_targets_compare_the_best_masked_setting_with_the_best_unmasked_one():
    from benchmarks.shapes_quality import summarize, verdicts

    def masked(share: float, psnr: float) -> dict:
        return _color_row(share, 1.0) | {"psnr_outside_mask_db": psnr}

    summary = [*summarize("plain", [_color_row(0.5, 1.0)]), *summarize("box", [masked(0.9, 28.0)]), *summarize("tight", [masked(0.2, 50.0)])]
    psnr, adherence = [v for v in verdicts(summary, [], 50) if "with a mask" in v["target"]]
    assert (psnr["setting"], psnr["measured"], psnr["met"]) == ("box", "28.0 dB", False)
    assert (adherence["setting"], adherence["measured"], adherence["met"]) == ("box", "0.900 vs 0.500", True)
    assert "(plain)" in adherence["target"]
