"""The attention kernels (--attention): the LSE merge against the joined keys with the strength bias,
FA4 and Sage through the shared processor with CPU stand-ins behind the same custom ops, what
`auto` picks, and the one-line errors. The real kernels run on the GPU (benchmarks/attention_kernels.py)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

import engine
from cache.store import settings_flags
from engine.hooks import attention
from engine.hooks.attention import choose_kernel, merge
from engine.hooks.injection import CogVideoXAttnProcessor, InjectionState
from engine.models.components import Runtime
from tests.test_injection import _attention_module, _by_hand


def _exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written out, q, k, v [B, tokens, heads, dim] as FA4 lays them out: (out, lse [B, heads, tokens])."""
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * (scale or 1 / math.sqrt(q.shape[-1]))
    lse = logits.logsumexp(-1)
    return torch.einsum("bhqk,bkhd->bqhd", (logits - lse[..., None]).exp(), v), lse


class StandIn:
    """A CPU stand-in for a kernel's Python entry point, counting its calls. Like the real ones it
    is opaque to dynamo (a graph break here would split a compiled block, as FA4's CuTe DSL and
    Sage's Triton launches did), so only the custom-op wrapper keeps one graph per block."""

    def __init__(self) -> None:
        self.calls = 0
        self.ran: set[str] = set()  # which kernels were called

    def fa4(self, q, k, v, return_lse=False):
        torch._dynamo.graph_break()
        self.calls += 1
        self.ran.add("fa4")
        out, lse = _exact(q, k, v)
        return (out, lse) if return_lse else out

    def sage(self, q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, smooth_k=True):
        """sageattention 1.0.6's contract: heads of 64, 96 or 128; with smooth_k it subtracts the keys' mean IN PLACE."""
        torch._dynamo.graph_break()
        assert q.shape[-1] in (64, 96, 128), "headdim should be in [64, 96, 128]."
        self.calls += 1
        self.ran.add("sage")
        if smooth_k:
            k -= k.mean(dim=1 if tensor_layout == "NHD" else 2, keepdim=True)
        t = (lambda x: x) if tensor_layout == "NHD" else (lambda x: x.transpose(1, 2))
        return t(_exact(t(q), t(k), t(v), sm_scale)[0])


@pytest.mark.parametrize("strength", [0.05, 0.3, 1.0, 2.5])
@pytest.mark.parametrize("scale", [1.0, 40.0])  # 40: one half's logits far above the other's
def test_merge_equals_the_joined_keys_with_the_strength_bias(strength, scale):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 3, 8, generator=g, dtype=torch.float64) * scale  # [B, tokens, heads, dim]: every axis its own size
    k, v, rk, rv = (torch.randn(2, 7, 3, 8, generator=g, dtype=torch.float64) for _ in range(4))
    bias = torch.zeros(1, 14, dtype=torch.float64)  # over the queries, one per key
    bias[:, 7:] = math.log(strength)
    to_hnd = lambda x: x.transpose(1, 2)  # noqa: E731
    joined = F.scaled_dot_product_attention(to_hnd(q), to_hnd(torch.cat([k, rk], 1)), to_hnd(torch.cat([v, rv], 1)), attn_mask=bias)
    torch.testing.assert_close(merge(_exact(q, k, v), _exact(q, rk, rv), strength), to_hnd(joined), rtol=0, atol=1e-12)


def test_merge_rounds_once_to_the_outputs_dtype_and_writes_into_no_input():
    """FA4's outputs are bf16 and its LSEs float32: the merge computes in float32 and rounds once to
    bf16. An own output already in float32 is copied, not written over."""
    g = torch.Generator().manual_seed(1)
    o1, o2 = (torch.randn(2, 5, 3, 8, generator=g) for _ in range(2))
    l1, l2 = (torch.randn(2, 3, 5, generator=g) for _ in range(2))
    w = torch.sigmoid(l1 - l2 - math.log(0.5)).transpose(1, 2).unsqueeze(-1)
    b1, b2 = o1.bfloat16(), o2.bfloat16()
    got = merge((b1, l1), (b2, l2), 0.5)
    assert got.dtype == torch.bfloat16 and torch.equal(got, (b2.float() + w * (b1.float() - b2.float())).bfloat16())
    before = o1.clone()
    merge((o1, l1), (o2, l2), 0.5)
    assert torch.equal(o1, before)
    with pytest.raises(ValueError, match="^the sdpa kernel returns no log-sum-exp$"):
        attention.attend_lse(o1, o1, o1, "sdpa")
    with pytest.raises(ValueError, match="^the sage kernel takes no mask$"):
        attention.attend(o1, o1, o1, "sage", torch.zeros(1))
    with pytest.raises(engine.SettingsError, match=r"^--attention must be one of auto, sdpa, fa4, sage, got 'flash'$"):
        choose_kernel("flash", "cpu", torch.float32)


@pytest.mark.parametrize("strength", [0.3, 1.0, 2.0, 2.5])  # 0 never injects (InjectSettings.is_active)
@pytest.mark.parametrize("kernel", ["sdpa", "fa4", "sage"])
def test_each_kernel_injects_as_attention_written_out(kernel, strength, stand_in, monkeypatch):
    """The shared processor with each kernel, told by the state that this block injects (what a
    block's KVInjectionHook sets around it), two edit rows reading crossed reference rows, through
    the whole batch and through row groups (the lean plan: the reference group first, whose keys
    then serve the edit groups: a kernel that shifted them in place would show), against
    attention written out by hand."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    import engine.hooks.injection as injection

    merged = []  # FA4 runs the two key sets apart and merges them: no joined copy of the keys
    monkeypatch.setattr(injection, "merge", lambda *a: merged.append(a) or merge(*a))
    joined = set()  # kernels the calls over own + reference keys ran on: the named one, SDPA where a bias is needed
    monkeypatch.setattr(injection, "attend", lambda q, k, v, name, mask=None: (k.shape[2] > q.shape[2] and joined.add(name)) or attention.attend(q, k, v, name, mask))
    attn, text_len = _attention_module(), 4
    rotary = get_3d_rotary_pos_embed(16, ((0, 0), (2, 3)), (2, 3), 2)
    x = torch.randn(4, text_len + 12, 32, generator=torch.Generator().manual_seed(1))
    expected = _by_hand(attn, x, text_len, rotary, [1, 0], strength)
    state = InjectionState(active=True, n_edit=2, ref_of=torch.tensor([1, 0]), strength=strength, here=True)
    processor = CogVideoXAttnProcessor(kernel)
    processor.injection = state
    attn.set_processor(processor)
    image, text = attn(x[:, text_len:], encoder_hidden_states=x[:, :text_len], image_rotary_emb=rotary)
    torch.testing.assert_close(torch.cat([text, image], 1), expected, rtol=0, atol=1e-5)
    grouped = []
    for rows in (range(2, 4), range(0, 2)):
        state.rows = rows
        grouped.insert(0, processor.joined(attn, [x[rows.start : rows.stop]], text_len, rotary))
    torch.testing.assert_close(torch.cat(grouped), expected, rtol=0, atol=1e-5)
    assert stand_in.ran == {kernel} - {"sdpa"}  # the kernel named is the kernel that ran
    assert bool(merged) == (kernel == "fa4")
    assert joined == (set() if kernel == "fa4" else {kernel if strength == 1.0 else "sdpa"})


def _capability(monkeypatch, major: int, importable: bool = True) -> None:
    """A CUDA GPU of compute capability `major`.0 seen from this CPU, the kernel packages importable or not."""
    def named(answer):  # torch's default, None, is the current GPU: the one --device names is asked for
        return lambda device=None: answer if device is not None else pytest.fail("asked about the current GPU, not the one named")

    monkeypatch.setattr(torch.cuda, "get_device_capability", named((major, 0)))
    monkeypatch.setattr(torch.cuda, "get_device_name", named(f"a GPU of sm{major}0"))
    monkeypatch.setattr(attention, "importable", lambda kernel: {"fa4": importable, "sage": importable}[kernel])


@pytest.mark.parametrize(
    ("device", "major", "installed", "dtype", "expected"),
    [
        ("cuda", 9, True, torch.bfloat16, "fa4"),  # H100 / H200
        ("cuda", 10, True, torch.bfloat16, "fa4"),  # B200
        ("cuda", 9, False, torch.bfloat16, "sdpa"),  # not installed
        ("cuda", 8, True, torch.bfloat16, "sdpa"),  # A100 / RTX 40: FA4 runs, never measured faster
        ("cuda", 12, True, torch.bfloat16, "sdpa"),  # RTX 50: the same
        ("cuda", 9, True, torch.float32, "sdpa"),  # FA4 has no fp32
        ("cpu", 9, True, torch.float32, "sdpa"),
    ],
)
def test_auto_picks_fa4_only_where_it_is_installed_and_runs(monkeypatch, device, major, installed, dtype, expected):
    _capability(monkeypatch, major, installed)
    assert choose_kernel("auto", device, dtype) == expected


@pytest.mark.parametrize(("users", "expected"), [(None, "1"), ("0", "0")])
def test_fa4_keeps_its_compiled_kernels_on_disk_unless_the_user_said_no(monkeypatch, users, expected):
    """FA4 reads the switch once, at its import: it must be set before `importable` imports it."""
    imported = {}
    monkeypatch.delenv(attention.FA4_DISK_CACHE, raising=False)
    if users is not None:
        monkeypatch.setenv(attention.FA4_DISK_CACHE, users)
    monkeypatch.setattr(attention.importlib, "import_module", lambda name: imported.setdefault(name, os.environ.get(attention.FA4_DISK_CACHE)))
    attention.importable.cache_clear()
    try:
        assert attention.importable("fa4")
    finally:
        attention.importable.cache_clear()
    assert imported == {"flash_attn.cute": expected}


@pytest.mark.parametrize(
    ("kernel", "device", "major", "installed", "expected"),
    [
        ("fa4", "cuda", 9, False, 'needs flash_attn.cute: pip install -e ".[fast]"'),
        ("sage", "cuda", 9, False, 'needs sageattention: pip install -e ".[sage]"'),
        ("fa4", "cuda", 7, True, "does not run on compute capability 7.0 (a GPU of sm70)"),
        ("sage", "cpu", 9, True, "needs an NVIDIA GPU; on cpu use --attention sdpa"),
        ("fa4", "cuda", 9, True, "runs in bf16 or fp16, not float32"),
    ],
)
def test_a_kernel_that_cannot_run_is_one_line_with_the_fix(monkeypatch, kernel, device, major, installed, expected):
    _capability(monkeypatch, major, installed)
    with pytest.raises(engine.SettingsError, match="^--attention .*") as err:
        choose_kernel(kernel, device, torch.float32 if "fp16" in expected else torch.bfloat16)
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert choose_kernel("sdpa", device, torch.bfloat16) == "sdpa"


def test_the_cli_refuses_a_kernel_before_any_work(tiny_model, wide_clip, _isolated_cache):
    from tests.test_cli_errors import SMALL_ARGS, fails

    error = fails("invert", wide_clip, "--model", tiny_model, *SMALL_ARGS, "--attention", "fa4")
    assert error == "Error: --attention fa4 needs an NVIDIA GPU; on cpu use --attention sdpa (or auto)"
    assert not _isolated_cache.exists()


def test_the_kernel_is_keyed_and_sdpa_keeps_the_earlier_keys(tiny_model):
    from engine.models.model_info import inspect_model
    from engine.stages.settings import EditSettings, InvertSettings
    from engine.video.reader import FrameSettings
    from engine.workflow import edit_stem, inversion_identity

    info, frames = inspect_model(tiny_model), FrameSettings(9, 0, 0, None, 96, 160)

    def keys(kernel: str) -> tuple[dict, str]:
        runtime = Runtime("cpu", torch.float32, attention=kernel)
        return inversion_identity("a" * 64, frames, list(range(9)), info, runtime, InvertSettings(steps=4)), edit_stem("f" * 32, EditSettings(("a",)), runtime)

    (sdpa_id, sdpa_stem), *others = (keys(k) for k in attention.KERNELS)
    assert "attention" not in sdpa_id  # ids made before the kernel was a choice still match
    assert len({str(i) for i, _ in others} | {str(sdpa_id)}) == 3 and len({s for _, s in others} | {sdpa_stem}) == 3
    assert settings_flags({"identity": others[0][0]})[0]["--attention"] == "fa4" and "--attention" not in settings_flags({"identity": sdpa_id})[0]


def test_the_kernel_benchmark_runs_every_kernel_through_the_engine(stand_in):
    """benchmarks/attention_kernels.py at a small shape, FA4 and Sage as the CPU stand-ins: every
    kernel of the engine, the merged FA4 call included, lands on float32 attention."""
    from benchmarks.attention_kernels import measure

    rows = measure(1, tokens=64, heads=2, device="cpu")
    for name in ("self/fa4", "self/sage", "injected/fa4", "injected/sage", "injected/fa4-joined", "self/flash"):
        assert rows[name]["max_abs_err_vs_fp32"] < 2e-2, (name, rows[name])
    assert stand_in.calls > 0


def test_sage_takes_fp32(monkeypatch):
    """Sage quantizes q and k to INT8 and v to fp16 whatever comes in: the fp32 shapes proxy can measure it."""
    _capability(monkeypatch, 9)
    assert choose_kernel("sage", "cuda", torch.float32) == "sage"
