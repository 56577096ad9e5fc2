"""Finding, checking and loading the parts of a CogVideoX checkpoint, one at a time.

Each stage loads only the component it needs through `loaded(...)`, which frees it on exit, so
the peak memory of a run is that of its largest phase. `alive()` tells which components are
still referenced, which is how the tests prove the staging.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.errors import DeviceError, ModelError, SettingsError
from engine.hooks.attention import choose_kernel
from engine.hooks.libraries import import_model_libraries, import_torchao
from engine.models.model_info import ModelInfo
from engine.models.plans import PLANS, Plan, get_plan

# Components currently loaded, by name; weak so that freeing a component removes it.
_LIVE: weakref.WeakValueDictionary[str, torch.nn.Module] = weakref.WeakValueDictionary()
# (component, everything alive right after it loaded): the staging record the tests read.
LOAD_EVENTS: list[tuple[str, list[str]]] = []


@dataclass(frozen=True)
class Runtime:
    """Where and in which precision the models run."""

    device: str
    dtype: torch.dtype
    plan: Plan = PLANS["staged"]
    compile: bool = False  # torch.compile each transformer block (regional compilation)
    fp8: bool = False  # FP8 matmuls in the transformer blocks (torchao), an accuracy cost for speed
    attention: str = "sdpa"  # the attention kernel (engine.hooks.attention.KERNELS)

    @staticmethod
    def default(
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        plan: str | Plan | None = None,
        compile: bool | None = None,
        fp8: bool = False,
        phase: str = "edit",
        attention: str = "auto",
    ) -> Runtime:
        """`compile=None` compiles where it pays (`compile_by_default`) for `phase` (invert | edit);
        `attention="auto"` picks the kernel (`engine.hooks.attention.choose_kernel`)."""
        device = check_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        plan = get_plan(plan) if isinstance(plan, str) else (plan or PLANS["staged"])
        if plan.needs_cuda and not device.startswith("cuda"):
            raise SettingsError(f"--plan {plan.name} needs a CUDA GPU (it quantizes or offloads to one); on {device} use --plan staged")
        if plan.needs_bitsandbytes:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise SettingsError(f'--plan {plan.name} needs bitsandbytes: pip install -e ".[quant]" in the cogedit source folder') from None
        if fp8:
            _check_float8(device, plan)
        if isinstance(dtype, str):
            names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
            if dtype not in names:
                raise ModelError(f"unknown --dtype {dtype!r}: use one of {', '.join(names)}")
            dtype = names[dtype]
        # bf16 is what the 5B model was trained in; CPUs run fp32 faster and more exactly.
        dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        if fp8 and dtype != torch.bfloat16:
            raise SettingsError("--fp8 scales bf16 weights: use it with --dtype bf16 (the default on a GPU)")
        compile = compile_by_default(device, plan, phase=phase) if compile is None else compile
        kernel = choose_kernel(attention, device, dtype)
        return Runtime(device=device, dtype=dtype, plan=plan, compile=compile, fp8=fp8, attention=kernel)


# Whether each phase compiles when --compile is not given, where compiling can pay at all
# (`compile_by_default`): one line per phase, set from the end-to-end run (benchmarks/results/E2E.md,
# "Compile, per phase"). The inversion's compile costs 23 s cold / 8 s warm before its first step
# and saves 0.16 s a step (8 s over 50): it does not pay. The edit's costs 15 s cold / 4 s warm and
# saves 0.56 s a step (28 s over 50): it pays from 27 steps cold, 7 warm.
COMPILE_PHASES = {"invert": False, "edit": True}


def compile_by_default(device: str, plan: Plan, triton: bool | None = None, phase: str = "edit") -> bool:
    """Whether --compile is on unless asked otherwise: in the phases `COMPILE_PHASES` names, on a
    CUDA GPU with Triton, for the plans that keep bf16 weights on the GPU. Offloaded and 8/4-bit
    plans stay eager: their kernels were never measured compiled."""
    if triton is None:
        import importlib.util

        triton = importlib.util.find_spec("triton") is not None
    return COMPILE_PHASES[phase] and device.startswith("cuda") and triton and plan.offload == "none" and plan.transformer_weights == "bf16"


def check_device(device: str) -> str:
    """`device` if this torch can run on it, else DeviceError with the fix: checked before
    anything is read or written, not discovered seconds into a phase."""
    try:
        kind = torch.device(device)
    except (RuntimeError, ValueError):  # torch's own message lists a dozen device types
        raise DeviceError(f"--device {device} is not a device torch knows: pass --device cuda (cuda:N for another GPU) or --device cpu") from None
    if kind.type == "cpu":
        return device
    if kind.type != "cuda":
        raise DeviceError(f"--device {device}: cogedit runs on CUDA GPUs or the CPU; pass --device cuda or --device cpu")
    if torch.version.cuda is None and torch.version.hip is None:
        raise DeviceError(
            f"--device {device}: this torch has no CUDA (CPU build {torch.__version__}); "
            "install a CUDA build of torch (pytorch.org) or pass --device cpu"
        )
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {device}: torch sees no GPU; check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES, or pass --device cpu")
    if kind.index is not None and kind.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible; pass --device cuda:0")
    return device


def alive() -> list[str]:
    """Names of the components still in memory (after a garbage collection)."""
    gc.collect()
    return sorted(_LIVE.keys())


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _quantization(weights: str, library: str) -> Any:
    """A BitsAndBytesConfig for 8-bit or nf4 weights, from diffusers or transformers."""
    if weights == "bf16":
        return None
    if library == "diffusers":
        from diffusers import BitsAndBytesConfig
    else:
        from transformers import BitsAndBytesConfig
    if weights == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


def float8_supported(device: str) -> bool:
    """Whether `device` has FP8 matmuls that torchao's dynamic float8 quantization runs on."""
    return device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.get_device_capability(torch.device(device)) >= (8, 9)


def _check_float8(device: str, plan: Plan) -> None:
    if plan.needs_bitsandbytes or plan.offload != "none":
        raise SettingsError(f"--fp8 quantizes the transformer itself and can't be combined with --plan {plan.name}: use --plan staged or lean")
    try:
        import_torchao()
    except ImportError:
        raise SettingsError('--fp8 needs torchao: pip install -e ".[fp8]" in the cogedit source folder') from None
    if not float8_supported(device):
        raise SettingsError(f"--fp8 needs an NVIDIA GPU with FP8 matmuls (compute capability 8.9+: RTX 40xx, L4, H100); {device} has none: drop --fp8")


def quantize_float8(transformer: torch.nn.Module) -> None:
    """FP8 (e4m3) weights with a scale per output row and activations scaled per token at run
    time, through torchao, for the linear layers of attention and MLP in every block. The
    modulation linears (a few rows of timestep embedding) and everything outside the blocks stay
    in bf16: they are a sliver of the FLOPs."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    # set_inductor_config=False: torchao would otherwise switch on inductor's coordinate-descent
    # autotuning (compiling the blocks then took over 5 minutes on an H100) and lower float32
    # matmul precision for the whole process.
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    for block in transformer.transformer_blocks:
        quantize_(block, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn.startswith(("attn1.", "ff.")))


def place_component(module: torch.nn.Module, name: str, runtime: Runtime, quantized: bool = False) -> torch.nn.Module:
    """Make a loaded component ready to run under `runtime`: cogedit's attention processor (with
    the runtime's kernel), FP8, regional compilation, FF chunking, offloading, and the device."""
    if name == "transformer":
        from engine.hooks.injection import CogVideoXAttnProcessor

        module.set_attn_processor(CogVideoXAttnProcessor(runtime.attention))
    if name == "transformer" and runtime.fp8:
        module = module.to(runtime.device)  # quantized where it will run
        quantize_float8(module)
    if name == "transformer" and runtime.compile:
        compile_blocks(module)
    if name == "transformer" and runtime.plan.ff_chunk:
        from engine.hooks.ff_chunking import FFChunkingConfig, apply_ff_chunking

        apply_ff_chunking(module, FFChunkingConfig(runtime.plan.ff_chunk))
    if runtime.plan.offload == "block" and name != "vae":
        from diffusers.hooks import apply_group_offloading

        # Weights stay in CPU memory; each block is copied in on a side stream just before use.
        # T5's blocks sit one level down (encoder.block), where block-level grouping can't see
        # them, so it is offloaded leaf by leaf; it runs once per prompt.
        level = {"offload_type": "block_level", "num_blocks_per_group": 1} if name == "transformer" else {"offload_type": "leaf_level"}
        apply_group_offloading(module, onload_device=torch.device(runtime.device), use_stream=True, **level)
        return module
    return module if quantized else module.to(runtime.device)


def exact_tiling(vae: torch.nn.Module) -> bool:
    """Whether diffusers' tiled VAE encode and decode reassemble exactly the untiled latent grid.

    Tiles start every int(tile * (1 - overlap)) pixels and each keeps its first
    (tile - blend) latents; that only adds up when the stride is that many latents. It does for
    5B's 480x720 tiles; the proxy's 48x72 tiles step 57 pixels, and its 96x144 frames encoded to
    19 latent columns instead of 18 (so on a GPU the proxy failed in its first inversion step).
    """
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    for tile, overlap in ((vae.tile_sample_min_height, vae.tile_overlap_factor_height), (vae.tile_sample_min_width, vae.tile_overlap_factor_width)):
        stride, latent = int(tile * (1 - overlap)), int(tile / scale)
        if stride != scale * (latent - int(latent * overlap)):
            return False
    return True


def compile_blocks(transformer: torch.nn.Module) -> None:
    """Regional compilation: the blocks' own forward compiled once for all 42 of them.

    Not `block.compile()`, which compiles the block's call with its hook dispatch inside:
    diffusers' hook registry gives a hooked module's `forward` an object of its own, dynamo guards
    on it, and every block became a new graph until the recompile limit left the rest eager
    (issue 17). Here each block's `forward` calls one compiled function of the block class, and a
    hook registered on a block later wraps that from outside; features steer the compiled code
    only through objects every block shares (engine.hooks.injection). tests/test_compile.py
    counts the graphs.
    """
    blocks = transformer.transformer_blocks
    compiled = torch.compile(type(blocks[0]).forward)
    for block in blocks:
        block.forward = functools.partial(_contiguous_call, compiled, block)


def _contiguous_call(compiled: Any, block: torch.nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """The first block gets views into the transformer's joined embedding, the others whole
    tensors: dynamo guards strides (a batch of one too), so one layout (a copy of the first
    block's input) keeps one graph."""
    return compiled(block, _dense(hidden_states), _dense(encoder_hidden_states), *args, **kwargs)


def _dense(x: torch.Tensor) -> torch.Tensor:
    if x.is_contiguous() and x.stride(0) == x[0].numel():
        return x
    return x.clone(memory_format=torch.contiguous_format)


def load_component(name: str, info: ModelInfo, runtime: Runtime) -> Any:
    import_model_libraries()
    common = dict(subfolder=name, torch_dtype=runtime.dtype, use_safetensors=True)
    plan = runtime.plan
    quantized = False
    if name == "transformer":
        from diffusers import CogVideoXTransformer3DModel

        quant = _quantization(plan.transformer_weights, "diffusers")
        quantized = quant is not None
        module = CogVideoXTransformer3DModel.from_pretrained(
            info.path, quantization_config=quant, **({"device_map": runtime.device} if quantized else {}), **common
        )
    elif name == "vae":
        from diffusers import AutoencoderKLCogVideoX

        module = AutoencoderKLCogVideoX.from_pretrained(info.path, **common)
        # Activations, not weights, make the VAE heavy: decode in tiles and one video at a time.
        module.enable_slicing()
        if runtime.device != "cpu" and exact_tiling(module):
            module.enable_tiling()
    elif name == "text_encoder":
        from transformers import T5EncoderModel

        quant = _quantization(plan.text_encoder_weights, "transformers")
        quantized = quant is not None
        module = T5EncoderModel.from_pretrained(
            info.path, subfolder=name, dtype=runtime.dtype, use_safetensors=True, quantization_config=quant,
            **({"device_map": runtime.device} if quantized else {}),
        )
    else:
        raise ValueError(f"unknown component {name!r}")
    module.requires_grad_(False).eval()
    return place_component(module, name, runtime, quantized)


@contextlib.contextmanager
def loaded(name: str, info: ModelInfo, runtime: Runtime, compile_dir: Path | None = None) -> Iterator[Any]:
    """Load one component for the duration of a phase, then free it before the next loads.

    With `--compile`, a transformer's compiled kernels are read from and saved to `compile_dir`."""
    # Hooks leave reference cycles; collect the last phase's component before loading this one.
    free_memory()
    module = load_component(name, info, runtime)
    _LIVE[name] = module
    LOAD_EVENTS.append((name, alive()))
    kept = contextlib.nullcontext()
    if name == "transformer" and runtime.compile and compile_dir is not None:
        from engine.models.compile_cache import artifacts_path, compile_artifacts

        kept = compile_artifacts(artifacts_path(compile_dir, runtime, info.transformer_config))
    try:
        with kept:
            yield module
    finally:
        del module
        free_memory()


def load_tokenizer(info: ModelInfo) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(info.path, subfolder="tokenizer")
