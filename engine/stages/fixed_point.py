"""Exact inversion of one DDIM edit step by fixed-point iteration (issue 11, item 3).

Plain DDIM inversion evaluates v at the less noisy x_s and uses it as if it came from x_t. With
eta 0 and v-prediction the edit step is affine: x_s = a * x_t + b * v(x_t, t). Its exact inverse
is the fixed point of F(x) = (x_s - b * v(x, t)) / a, iterated from the plain DDIM result.

Inversion step j runs at the same timestep t as edit step steps-1-j, between the same two noise
levels in the other direction; so the coefficients for inversion step j are
`step_coefficients(edit_scheduler, t)` with the inversion's own t.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


def step_coefficients(scheduler: Any, t: int | torch.Tensor) -> tuple[float, float]:
    """(a, b) such that `scheduler.step(v, t, x)` returns a * x + b * v (eta 0, no clipping).

    Read off the scheduler's own step on unit inputs, so they are exactly what the edit loop
    runs, zero terminal SNR and the final alpha included. For v-prediction a = cos(d) and
    b = sin(d), d being the step's angle between noise levels; a is 0 only for a single step
    from pure noise (that step ignores x_t).
    """
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    a = scheduler.step(zero, t, one, return_dict=False)[0]
    b = scheduler.step(one, t, zero, return_dict=False)[0]
    return a.item(), b.item()


def refine(
    v_at: Callable[[torch.Tensor], torch.Tensor],
    x_s: torch.Tensor,
    x_t: torch.Tensor,
    a: float,
    b: float,
    iters: int,
    tol: float = 1e-4,
) -> tuple[torch.Tensor, int, list[float]]:
    """Fixed-point DDIM inversion (Pan et al. 2023, AIDI; Garibi et al. 2024, ReNoise).

    Solves a * x + b * v_at(x) = x_s for x from the start `x_t`, with at most `iters` updates.
    Returns (x, forwards, residuals): residual k is ||F(x^k) - x^k|| / ||x^k||, which is the edit
    step's reconstruction error ||a x^k + b v(x^k) - x_s|| divided by |a| ||x^k||. Each forward
    measures the current iterate, so x is the iterate with the smallest measured residual and is
    never worse than `x_t`; `iters` updates cost at most `iters + 1` forwards. Works in float32;
    `v_at` casts to the model's dtype.
    """
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if iters == 0 or a == 0.0:
        # a == 0: the step maps every x_t to b * v(x_t), so there is no fixed point to find.
        return x_t, 0, []
    x_s = x_s.float()
    x = best = x_t.float()
    residuals: list[float] = []
    for k in range(iters + 1):
        # 1. F(x) = (x_s - b * v(x, t)) / a, from x_s = a * x + b * v(x, t).
        proposal = (x_s - b * v_at(x).float()) / a
        # 2. Residual of x: its relative distance to F(x), zero exactly at the inverse.
        residual = ((proposal - x).norm() / x.norm()).item()
        residuals.append(residual)
        if residual == min(residuals):
            best = x
        # 3. Stop when the map stopped contracting here (|b/a dv/dx| >= 1: keep the better iterate,
        # damping cannot fix a map that expands), when close enough, or after the last update's check.
        grew = k > 0 and residual >= residuals[-2]
        if grew or residual < tol or k == iters or not math.isfinite(residual):
            break
        x = proposal
    return best, len(residuals), residuals
