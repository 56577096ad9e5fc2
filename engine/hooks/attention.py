"""The attention kernels cogedit's processor can run, behind one function, and the choice among them.

    sdpa  torch's scaled_dot_product_attention (torch picks cuDNN, FA2, ... per GPU and shape)
    fa4   FlashAttention-4 (`flash_attn.cute`, the flash-attn-4 package): the same arithmetic,
          faster on Hopper and Blackwell, rounding differently (as any other fused kernel)
    sage  SageAttention 1 (`sageattention`): INT8 q.k and fp16 p.v, lossy, opt-in only

FA4 and Sage are called through torch custom ops (`cogedit::fa4`, `cogedit::sage`) with a fake
(shape-only) implementation, so that dynamo treats each call as one opaque op: tracing into
their Python would break regional compilation's one graph per block (tests/test_compile.py).

Neither takes an additive mask, which injection's strength bias needs on the joined keys. FA4
returns each query's log-sum-exp, so an injected call is two calls, over the row's own keys and
over the reference's, merged by their LSEs with the bias as a shift of the reference half's LSE
(`merge`): exact, and no joined copy of the keys. Sage 1 returns no LSE: it runs the joined keys
unbiased at strength 1, and hands the biased call to SDPA otherwise.
"""

from __future__ import annotations

import functools
import importlib
import math
import os

import torch
import torch.nn.functional as F

from engine.errors import SettingsError

KERNELS = ("sdpa", "fa4", "sage")
CHOICES = ("auto", *KERNELS)
# What each optional kernel imports, and the extra that installs it.
PACKAGES = {"fa4": ("flash_attn.cute", "fast"), "sage": ("sageattention", "sage")}
# Compute capabilities (major) where `auto` picks FA4: Hopper (9.x) and datacenter Blackwell (10.x,
# 11.x), where FA4 has kernels of its own. FA4 also runs on 8.x and 12.x (RTX 50) with an
# Ampere-style kernel, never measured against cuDNN there: `--attention fa4` only.
FA4_AUTO = (9, 10, 11)
FA4_RUNS = (8, 9, 10, 11, 12)
SAGE_RUNS = (8, 9, 10, 11, 12)  # Triton INT8 tensor cores: Ampere and later


def fa4_function():
    """flash_attn.cute.flash_attn_func: q, k, v [B, tokens, heads, dim] -> (out, lse [B, heads, tokens])."""
    from flash_attn.cute import flash_attn_func

    return flash_attn_func


def sage_function():
    """sageattention.sageattn."""
    from sageattention import sageattn

    return sageattn


@torch.library.custom_op("cogedit::fa4", mutates_args=())
def fa4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-4 over q, k, v [B, tokens, heads, dim]: out [B, tokens, heads, dim] and each
    query's log-sum-exp [B, heads, tokens] (float32, natural log, of the scaled logits)."""
    out, lse = fa4_function()(q, k, v, return_lse=True)
    return out, lse


@fa4.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, n, h, _ = q.shape
    return q.new_empty(b, n, h, v.shape[-1]), q.new_empty(b, h, n, dtype=torch.float32)


SAGE_HEAD_DIMS = (64, 96, 128)  # what sageattention 1 has kernels for


@torch.library.custom_op("cogedit::sage", mutates_args=())
def sage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SageAttention over q, k, v [B, tokens, heads, dim], as [B, tokens, heads, dim].

    Sage subtracts the keys' mean from k in place (softmax does not change, INT8 rounds better);
    the caller's k is read again (a row group's reference keys serve the edit rows after), so the
    mean is taken off here into a new tensor and Sage is told not to. A smaller head (the proxies'
    32) is zero-padded to Sage's next one: zeros add nothing to q.k, the scale stays the head's own."""
    dim = q.shape[-1]
    padded = next((d for d in SAGE_HEAD_DIMS if d >= dim), None)
    if padded is None:
        raise ValueError(f"sageattention has no kernel for heads of {dim}: use --attention sdpa")
    q, k, v = (F.pad(x, (0, padded - dim)) for x in (q, k - k.mean(dim=1, keepdim=True), v))
    out = sage_function()(q, k, v, tensor_layout="NHD", sm_scale=dim**-0.5, smooth_k=False)
    return out if padded == dim else out[..., :dim].contiguous()


@sage.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q.k / sqrt(dim) + mask) v for q, k, v [B, heads, tokens, dim], as [B, tokens, heads, dim]:
    every attention call of cogedit's processor. A mask only with sdpa."""
    if kernel == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    if mask is not None:
        raise ValueError(f"the {kernel} kernel takes no mask")
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # views: both kernels take strided inputs
    return torch.ops.cogedit.fa4(q, k, v)[0] if kernel == "fa4" else torch.ops.cogedit.sage(q, k, v)


def attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """As `attend` (no mask), with each query's log-sum-exp [B, heads, tokens] in float32: FA4's own."""
    if kernel != "fa4":
        raise ValueError(f"the {kernel} kernel returns no log-sum-exp")
    return torch.ops.cogedit.fa4(*(x.transpose(1, 2) for x in (q, k, v)))


def merge(own: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor], strength: float) -> torch.Tensor:
    """Attention over two key sets joined, from each set's (out [B, tokens, heads, dim], lse [B, heads, tokens]),
    the second set's logits raised by log(strength): each output weighs in with its share of the
    joined softmax's normalizer, exp(lse) over the sum, which for two is a sigmoid of the LSE difference."""
    (o1, l1), (o2, l2) = own, ref
    w = torch.sigmoid(l1 - l2 - math.log(strength)).transpose(1, 2).unsqueeze(-1)  # own share, [B, tokens, heads, 1]
    # o2 + w (o1 - o2) in the LSEs' float32, rounded once; in place, one float32 temporary when eager
    out = o1.to(w.dtype, copy=True)
    return out.sub_(o2).mul_(w).add_(o2).to(o1.dtype)


def merges(kernel: str) -> bool:
    """Whether injected calls run as two merged calls (the kernel returns LSEs)."""
    return kernel == "fa4"


# FA4 compiles its CuTe kernels at the first call of each process (seconds per shape) and keeps
# them on disk only when asked: cogedit asks, so that a user's next command starts at once. The
# cache is keyed by FA4's own source fingerprint, so an upgrade never loads a stale kernel; a user's
# own setting (0 turns it off, FLASH_ATTENTION_CUTE_DSL_CACHE_DIR moves it) wins.
FA4_DISK_CACHE = "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"


@functools.cache
def importable(kernel: str) -> bool:
    """Whether the package of `kernel` imports here (any failure counts: FA4 needs CUDA libraries too)."""
    if kernel == "fa4":
        os.environ.setdefault(FA4_DISK_CACHE, "1")  # read once, when flash_attn.cute is imported
    try:
        importlib.import_module(PACKAGES[kernel][0])
    except Exception:  # ImportError, or a broken CUDA install raising at import
        return False
    return True


def _problem(kernel: str, device: str, dtype: torch.dtype) -> str | None:
    """Why `kernel` cannot run on `device` in `dtype` here, as a one-line message with the fix; None if it can."""
    module, extra = PACKAGES[kernel]
    if not device.startswith("cuda"):
        return f"--attention {kernel} needs an NVIDIA GPU; on {device} use --attention sdpa (or auto)"
    if kernel == "fa4" and dtype not in (torch.bfloat16, torch.float16):
        return f"--attention {kernel} runs in bf16 or fp16, not {str(dtype).removeprefix('torch.')}: drop --dtype or use --attention sdpa"
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    if major not in (FA4_RUNS if kernel == "fa4" else SAGE_RUNS):
        return f"--attention {kernel} does not run on compute capability {major}.{minor} ({torch.cuda.get_device_name(torch.device(device))}): use --attention sdpa"
    if not importable(kernel):  # last: importing FA4 loads the CUTLASS DSL, seconds
        return f'--attention {kernel} needs {module}: pip install -e ".[{extra}]" in the cogedit source folder, or use --attention sdpa'
    return None


def choose_kernel(asked: str, device: str, dtype: torch.dtype) -> str:
    """The kernel `--attention asked` runs: auto = FA4 where it imports and the GPU is Hopper or
    datacenter Blackwell, else SDPA; an explicit kernel that cannot run here is a SettingsError."""
    if asked not in CHOICES:
        raise SettingsError(f"--attention must be one of {', '.join(CHOICES)}, got {asked!r}")
    if asked == "sdpa":
        return asked
    if asked == "auto":
        gpu = device.startswith("cuda")
        fits = gpu and _problem("fa4", device, dtype) is None and torch.cuda.get_device_capability(torch.device(device))[0] in FA4_AUTO
        return "fa4" if fits else "sdpa"
    problem = _problem(asked, device, dtype)
    if problem is not None:
        raise SettingsError(problem)
    return asked
