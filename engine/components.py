"""Finding, checking and loading the parts of a CogVideoX checkpoint, one at a time.

Each stage loads only the component it needs through `loaded(...)`, which frees it on exit, so
the peak memory of a run is that of its largest phase. `alive()` tells which components are
still referenced, which is how the tests prove the staging.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cache.keys import stable_hash
from engine.errors import DeviceError, ModelError, SettingsError
from engine.libraries import import_model_libraries, import_torchao
from engine.plans import PLANS, Plan, get_plan

PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
_CONFIG_FILES = {
    "transformer": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "scheduler": "scheduler_config.json",
}
_HASH_WINDOW = 1 << 20  # bytes hashed from each end of a weight file for the model identity

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

    @staticmethod
    def default(
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        plan: str | Plan | None = None,
        compile: bool | None = None,
        fp8: bool = False,
    ) -> Runtime:
        """`compile=None` compiles where it pays (`compile_by_default`)."""
        device = check_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        plan = get_plan(plan) if isinstance(plan, str) else (plan or PLANS["staged"])
        if plan.needs_cuda and not device.startswith("cuda"):
            raise SettingsError(f"--plan {plan.name} needs a CUDA GPU (it quantizes or offloads to one); on {device} use --plan staged")
        if plan.needs_bitsandbytes:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise SettingsError(f'--plan {plan.name} needs bitsandbytes: pip install "cogedit[quant]"') from None
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
        compile = compile_by_default(device, plan) if compile is None else compile
        return Runtime(device=device, dtype=dtype, plan=plan, compile=compile, fp8=fp8)


def compile_by_default(device: str, plan: Plan, triton: bool | None = None) -> bool:
    """Whether --compile is on unless asked otherwise: on a CUDA GPU with Triton, for the plans
    that keep bf16 weights on the GPU. There it pays within one phase once its kernels are cached:
    a full-size 5B forward takes 0.72 s compiled against 0.88 s eager, and the first compiled
    forward of a process 3.5 s more than a steady one (1.2 s eager) with cogedit's kernel cache,
    16 s with none (NVIDIA H200, benchmarks/results/WARMUP.md). Offloaded and 8/4-bit plans stay
    eager: their kernels were never measured compiled."""
    if triton is None:
        import importlib.util

        triton = importlib.util.find_spec("triton") is not None
    return device.startswith("cuda") and triton and plan.offload == "none" and plan.transformer_weights == "bf16"


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


@dataclass(frozen=True)
class ModelInfo:
    """A checked model folder and its identity (what goes into cache keys)."""

    source: str  # what the user passed: a folder or a hub id
    path: Path
    key: str
    transformer_config: dict[str, Any]
    vae_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    text_encoder_config: dict[str, Any]
    known_params: dict[str, int] | None = None  # parameter counts, when known without building the models

    @property
    def vae_scale_spatial(self) -> int:
        return 2 ** (len(self.vae_config.get("block_out_channels", [0] * 4)) - 1)

    @property
    def vae_scale_temporal(self) -> int:
        return int(self.vae_config.get("temporal_compression_ratio", 4))

    @property
    def text_length(self) -> int:
        return int(self.transformer_config.get("max_text_seq_length", 226))


def _resolve(model: str) -> Path:
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"--model {model} is a file; pass the checkpoint folder (the one with model_index.json)")
        return path
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise ModelError(f"model folder {model} does not exist: pass a CogVideoX-5b folder or a hub id like THUDM/CogVideoX-5b")
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "*/*.json", "*/*.safetensors", "tokenizer/*"]
    try:
        # Only safetensors weights: pickled .bin files are never fetched or loaded.
        return Path(snapshot_download(model, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, gated, …: all end in the same advice
        raise ModelError(
            f"cannot get {model} from the hub ({type(exc).__name__}); with no network, download it first "
            f"(`huggingface-cli download {model}`) or pass a local folder with --model"
        ) from exc


def _weights(part_dir: Path) -> list[Path]:
    return sorted(part_dir.glob("*.safetensors"))


def _weights_fingerprint(files: list[Path]) -> list[list[Any]]:
    # Hashing whole 10 GB files on every run is too slow; size plus both ends tells checkpoints apart.
    import hashlib

    out = []
    for f in files:
        size = f.stat().st_size
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            h.update(fh.read(_HASH_WINDOW))
            if size > _HASH_WINDOW:
                fh.seek(max(size - _HASH_WINDOW, _HASH_WINDOW))
                h.update(fh.read(_HASH_WINDOW))
        out.append([f.name, size, h.hexdigest()])
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} is unreadable ({exc}); re-download the model") from exc


def inspect_model(model: str | os.PathLike) -> ModelInfo:
    """Check a model folder (or hub id) without loading weights; refuse what the engine can't run."""
    source = str(model)
    path = _resolve(source)
    missing = []
    for part in PARTS:
        d = path / part
        if part == "tokenizer":
            ok = d.is_dir() and any(d.glob("tokenizer*")) or (d / "spiece.model").exists()
        else:
            ok = (d / _CONFIG_FILES[part]).exists() and (part == "scheduler" or bool(_weights(d)))
        if not ok:
            missing.append(part)
    pickled = [part for part in missing if any((path / part).glob("*.bin"))]
    if pickled:
        raise ModelError(
            f"model folder {path} has only pickled .bin weights for {', '.join(pickled)}, and cogedit loads "
            "safetensors only (loading a pickle can run code); download the .safetensors files of the repository"
        )
    if missing:
        hint = "safetensors weights and config" if set(missing) - {"tokenizer", "scheduler"} else "files"
        raise ModelError(
            f"model folder {path} is missing {', '.join(missing)} ({hint}); "
            "download the complete CogVideoX-5b repository (all five subfolders)"
        )
    tcfg = _read_json(path / "transformer" / "config.json")
    if not tcfg.get("use_rotary_positional_embeddings", False):
        raise ModelError(
            f"{source} looks like CogVideoX-2B (no rotary position embeddings, "
            f"{tcfg.get('num_layers')} layers); cogedit supports CogVideoX-5B: pass --model THUDM/CogVideoX-5b"
        )
    if tcfg.get("patch_size_t") or tcfg.get("ofs_embed_dim"):
        raise ModelError(f"{source} is a CogVideoX 1.5 or image-to-video model; cogedit supports CogVideoX-5B text-to-video")
    vcfg = _read_json(path / "vae" / "config.json")
    scfg = _read_json(path / "scheduler" / "scheduler_config.json")
    identity = {
        part: {"config": _read_json(path / part / _CONFIG_FILES[part]), "weights": _weights_fingerprint(_weights(path / part))}
        for part in ("transformer", "vae", "text_encoder", "scheduler")
    }
    identity["tokenizer"] = sorted(
        [f.name, f.stat().st_size] for f in (path / "tokenizer").iterdir() if f.is_file()
    )
    return ModelInfo(
        source=source,
        path=path,
        key=stable_hash(identity),
        transformer_config=tcfg,
        vae_config=vcfg,
        scheduler_config=scfg,
        text_encoder_config=identity["text_encoder"]["config"],
    )


def builtin_5b() -> ModelInfo:
    """The CogVideoX-5B shape with no files behind it: enough to plan memory without a download."""
    from engine.configs import PARAMS_5B, SCHEDULER_5B, T5_XXL, TRANSFORMER_5B, VAE_5B

    vae = {"block_out_channels": [128, 256, 256, 512], "temporal_compression_ratio": 4, **VAE_5B}
    return ModelInfo("CogVideoX-5B (built-in shape)", Path("."), "0" * 32, TRANSFORMER_5B, vae, SCHEDULER_5B, T5_XXL, PARAMS_5B)


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
        raise SettingsError('--fp8 needs torchao: pip install "cogedit[fp8]"') from None
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
    """Make a loaded component ready to run under `runtime`: cogedit's attention processor,
    FP8, regional compilation, FF chunking, offloading, and the device."""
    if name == "transformer":
        from engine.injection import CogVideoXAttnProcessor

        module.set_attn_processor(CogVideoXAttnProcessor())
    if name == "transformer" and runtime.fp8:
        module = module.to(runtime.device)  # quantized where it will run
        quantize_float8(module)
    if name == "transformer" and runtime.compile:
        # Regional compilation: the 42 blocks share one shape, so one compiled graph serves all
        # (benchmarks/results/speed.json: 1.2x per step on an H100 after a one-off compile).
        for block in module.transformer_blocks:
            block.compile()
    if name == "transformer" and runtime.plan.ff_chunk:
        from engine.ff_chunking import FFChunkingConfig, apply_ff_chunking

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
        from engine.compile_cache import artifacts_path, compile_artifacts

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
