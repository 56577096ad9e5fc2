"""Fixed-point refinement of DDIM inversion steps: coefficients, convergence, the guard, a round trip."""

from __future__ import annotations

import pytest
import torch

from engine.models.configs import SCHEDULER_5B
from engine.stages.fixed_point import refine, step_coefficients


def _schedulers(steps: int):
    """The edit and inversion schedulers as the engine builds them (both from the 5B config)."""
    from diffusers import CogVideoXDDIMScheduler, DDIMInverseScheduler
    from diffusers.utils import logging

    logging.set_verbosity_error()  # the inverse scheduler has no use for `snr_shift_scale` (1.0)
    edit, inverse = CogVideoXDDIMScheduler.from_config(SCHEDULER_5B), DDIMInverseScheduler.from_config(SCHEDULER_5B)
    edit.set_timesteps(steps)
    inverse.set_timesteps(steps)
    return edit, inverse


@pytest.mark.parametrize("steps", [1, 4, 10, 50])
def test_coefficients_are_the_edit_step(steps):
    edit, _ = _schedulers(steps)
    x, v = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    for t in edit.timesteps:
        a, b = step_coefficients(edit, t)
        torch.testing.assert_close(edit.step(v, t, x, return_dict=False)[0], a * x + b * v)


def test_coefficients_are_read_off_in_float64():
    """a = a_t + b_t sqrt(alpha_t) and b = -b_t sqrt(1 - alpha_t) from the scheduler's own (float32)
    scalars, summed in float64: no float32 rounding for the refinement to inherit."""
    edit, _ = _schedulers(10)
    for t in edit.timesteps:
        alpha, prev = edit.alphas_cumprod[t], edit.alphas_cumprod[t - 100] if t >= 100 else edit.final_alpha_cumprod
        a_t = ((1 - prev) / (1 - alpha)) ** 0.5
        b_t = prev**0.5 - alpha**0.5 * a_t
        assert step_coefficients(edit, t) == (a_t.double().item() + b_t.double().item() * (alpha**0.5).double().item(), -b_t.double().item() * ((1 - alpha) ** 0.5).double().item())


@pytest.mark.parametrize("steps", [1, 4, 10, 50])
def test_inversion_step_j_undoes_edit_step_steps_minus_1_minus_j(steps):
    edit, inverse = _schedulers(steps)
    assert inverse.timesteps.tolist() == edit.timesteps.flip(0).tolist()
    for t in inverse.timesteps:
        # v-prediction DDIM rotates (x, v) by the angle between the two noise levels: the
        # inversion step at t turns back by the edit step's angle at t.
        a, b = step_coefficients(edit, t)
        a_inv, b_inv = step_coefficients(inverse, t)
        assert a_inv == pytest.approx(a, abs=1e-6) and b_inv == pytest.approx(-b, abs=1e-6)
        assert a >= 0 and (a > 0.01 or steps == 1)


def _linear_v(a: float, b: float, q: float):
    """v(x) = c * x + d with the fixed-point map's slope -b * c / a equal to q."""
    c = -q * a / b
    d = torch.randn(1, 3, 16, 12, 20)
    return (lambda x: c * x + d), c, d


@pytest.mark.parametrize("t", [999, 499, 99])
@pytest.mark.parametrize("q", [0.5, -0.7])
def test_converges_to_the_exact_inverse(t, q):
    edit, _ = _schedulers(10)
    a, b = step_coefficients(edit, t)
    v_at, c, d = _linear_v(a, b, q)
    x_s = torch.randn(1, 3, 16, 12, 20)
    exact = (x_s - b * d) / (a + b * c)
    start = exact + 0.1 * torch.randn_like(exact)
    x, forwards, residuals = refine(v_at, x_s, start, a, b, iters=100, tol=1e-7)
    assert forwards < 101 and residuals[-1] < 1e-6
    torch.testing.assert_close(x, exact)
    torch.testing.assert_close(edit.step(v_at(x), t, x, return_dict=False)[0], x_s)


@pytest.mark.parametrize("q", [1.5, -1.5, -3.0])
@pytest.mark.parametrize("iters", [1, 2, 5])
def test_guard_never_returns_worse_than_the_start(q, iters):
    edit, _ = _schedulers(10)
    t = 499
    a, b = step_coefficients(edit, t)
    v_at, c, d = _linear_v(a, b, q)
    x_s = torch.randn(1, 3, 16, 12, 20)
    exact = (x_s - b * d) / (a + b * c)
    start = exact + 0.1 * torch.randn_like(exact)
    x, forwards, residuals = refine(v_at, x_s, start, a, b, iters=iters, tol=0.0)
    # The first update moves away from the exact inverse; its check sees the residual grow.
    assert forwards == 2 and residuals[1] > residuals[0]
    assert torch.equal(x, start)


def test_iters_updates_cost_iters_plus_one_forwards_and_the_default_tolerance_stops_sooner():
    edit, _ = _schedulers(10)
    a, b = step_coefficients(edit, 499)
    v_at, c, d = _linear_v(a, b, 0.5)  # contracting: each update halves the residual
    x_s = torch.randn(1, 3, 16, 12, 20)
    start = (x_s - b * d) / (a + b * c) + 0.1 * torch.randn_like(x_s)
    x, forwards, residuals = refine(v_at, x_s, start, a, b, iters=3, tol=0.0)
    assert forwards == len(residuals) == 4 and residuals == sorted(residuals, reverse=True)
    x, forwards, residuals = refine(v_at, x_s, start, a, b, iters=50)  # tol 1e-4
    assert forwards == len(residuals) < 50 and residuals[-1] < 1e-4 <= residuals[-2]
    # The tolerance is a strict bound: a residual equal to it is refined further.
    assert refine(v_at, x_s, start, a, b, iters=3, tol=residuals[0])[1] > 1


def test_single_step_from_pure_noise_has_nothing_to_solve():
    edit, _ = _schedulers(1)
    a, b = step_coefficients(edit, edit.timesteps[0])
    assert a == 0.0 and b == pytest.approx(-1.0)
    start = torch.randn(2, 3)
    assert refine(lambda x: x, torch.randn(2, 3), start, a, b, iters=3) == (start, 0, [])


def test_rejects_negative_iters():
    with pytest.raises(ValueError, match="iters"):
        refine(lambda x: x, torch.zeros(1), torch.ones(1), 1.0, 0.5, iters=-1)


def _round_trip_error(transformer, x0, embeds, steps, iters):
    """Relative error of x0 -> (inversion, refined) -> noise -> plain DDIM sampling -> x0."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    edit, inverse = _schedulers(steps)
    _, f, _, h, w = x0.shape
    rotary = get_3d_rotary_pos_embed(16, ((0, 0), (h // 2, w // 2)), (h // 2, w // 2), f)

    def v(x, t):
        return transformer(x, embeds, t.expand(1), image_rotary_emb=rotary, return_dict=False)[0].float()

    x = x0
    for t in inverse.timesteps:
        plain = inverse.step(v(x, t), t, x, return_dict=False)[0]
        x, _, _ = refine(lambda y, t=t: v(y, t), x, plain, *step_coefficients(edit, t), iters=iters, tol=0.0)
    for t in edit.timesteps:
        x = edit.step(v(x, t), t, x, return_dict=False)[0]
    return ((x - x0).norm() / x0.norm()).item()


@torch.no_grad()
def test_refinement_sharpens_the_round_trip(tiny_model):
    from diffusers import CogVideoXTransformer3DModel

    transformer = CogVideoXTransformer3DModel.from_pretrained(tiny_model, subfolder="transformer").eval()
    torch.manual_seed(0)
    x0 = torch.randn(1, 3, 16, 12, 20)
    embeds = torch.randn(1, 226, 32)
    errors = {iters: _round_trip_error(transformer, x0, embeds, 10, iters) for iters in (0, 1, 2, 3)}
    print("round-trip relative error by iterations:", errors)
    assert errors[2] < errors[0]
