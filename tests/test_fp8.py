"""--fp8: torchao's float8 matmuls in the transformer blocks, checked on the CPU.

torchao refuses CPUs when it quantizes (a hardware check), yet torch's `_scaled_mm` runs there;
the tests lift only those two checks (torchao's and ours), so the arithmetic is the one a GPU
runs: e4m3 weights with a scale per output row, activations scaled per token.
"""

from __future__ import annotations

import pytest
import torch

import engine
import engine.models.components as components
from engine.errors import SettingsError
from engine.models.model_info import inspect_model
from tests.conftest import SMALL

# fp8's error is stated against bf16's own: how far bf16 lands from float32 on the same run.
# Measured on the tiny model, 4 steps: noise fp8-bf16 0.015 vs bf16-f32 0.016 (ratio 0.96);
# edit latents with guidance 6 (which amplifies rounding) 0.104 vs 0.055 (ratio 1.9).
NOISE_RATIO, EDIT_RATIO = 1.5, 2.5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture
def fp8_on_cpu(monkeypatch):
    import torchao.quantization.quant_api as quant_api

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    monkeypatch.setattr(components, "float8_supported", lambda device: True)


def test_fp8_error_is_within_a_small_multiple_of_bf16s(tiny_model, wide_clip, tmp_path, fp8_on_cpu):
    runs = {
        name: engine.invert(wide_clip, tiny_model, device="cpu", cache_dir=tmp_path / name, **kw, **SMALL)
        for name, kw in (("f32", {}), ("bf16", dict(dtype="bf16")), ("fp8", dict(dtype="bf16", fp8=True)))
    }
    assert runs["fp8"].id != runs["bf16"].id  # other numerics: their own cache entry
    bf16_error = rel(runs["bf16"].noise(), runs["f32"].noise())
    assert 0 < rel(runs["fp8"].noise(), runs["bf16"].noise()) < NOISE_RATIO * bf16_error

    def edited(name: str, **kw) -> torch.Tensor:
        return engine.edit(runs[name], ["a watercolor painting"], device="cpu", output="latents", inject_steps="0:0.5", **kw).latents

    plain = edited("bf16")
    bf16_error = rel(plain, edited("f32"))
    assert 0 < rel(edited("bf16", fp8=True), plain) < EDIT_RATIO * bf16_error


def test_fp8_quantizes_the_blocks_attention_and_mlp_only(tiny_model, fp8_on_cpu):
    from torchao.quantization import Float8Tensor

    runtime = components.Runtime.default("cpu", "bf16", fp8=True)
    with components.loaded("transformer", inspect_model(tiny_model), runtime) as transformer:
        kinds = {name: isinstance(m.weight, Float8Tensor) for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert kinds["transformer_blocks.0.attn1.to_q"] and kinds["transformer_blocks.1.ff.net.2"]
    assert not kinds["transformer_blocks.0.norm1.linear"] and not kinds["proj_out"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(device="cpu", dtype="bf16"), "needs an NVIDIA GPU with FP8 matmuls"),
        (dict(device="cpu", plan="int8"), "needs a CUDA GPU"),
    ],
)
def test_fp8_refusals(kwargs, message):
    with pytest.raises(SettingsError, match=message):
        components.Runtime.default(fp8=True, **kwargs)


def test_fp8_refuses_other_plans_and_dtypes(fp8_on_cpu):
    with pytest.raises(SettingsError, match="use --plan staged or lean"):
        components._check_float8("cuda", components.PLANS["offload"])
    with pytest.raises(SettingsError, match="--dtype bf16"):
        components.Runtime.default("cpu", "fp32", fp8=True)
