"""Prompt -> T5 embedding, cached per (model, prompt, dtype) so T5 loads only for new prompts."""

from __future__ import annotations

import logging

import torch

from cache.atomic import load_tensors, save_tensors
from cache.errors import CacheCorruptError, ReadOnlyCacheError
from cache.keys import stable_hash
from cache.layout import CacheLayout
from engine.models.components import Runtime, load_tokenizer, loaded
from engine.models.model_info import ModelInfo
from engine.stages.context import StageContext

log = logging.getLogger("cogedit")


def prompt_key(prompt: str, info: ModelInfo, runtime: Runtime) -> str:
    fields = {"prompt": prompt, "max_length": info.text_length, "dtype": str(runtime.dtype)}
    if runtime.plan.text_encoder_weights != "bf16":  # 8/4-bit T5 gives other embeddings
        fields["weights"] = runtime.plan.text_encoder_weights
    return stable_hash(fields)


def tokenize(tokenizer, prompt: str, length: int) -> torch.Tensor:
    ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
    # verbose=False: transformers' own overflow warning would follow ours and blame indexing.
    full = tokenizer(prompt, add_special_tokens=True, verbose=False).input_ids
    if len(full) > length:
        log.warning(
            "prompt is %d tokens; the model reads %d, so the last %d are dropped: %r…",
            len(full), length, len(full) - length, prompt[:60],
        )
    return ids


def embed_prompts(
    prompts: list[str], info: ModelInfo, runtime: Runtime, layout: CacheLayout, phase=None
) -> dict[str, torch.Tensor]:
    """Embeddings [1, tokens, dim] for each distinct prompt; T5 loads only on a cache miss."""
    wanted = list(dict.fromkeys(prompts))
    out: dict[str, torch.Tensor] = {}
    for p in wanted:
        path = layout.prompt_file(info.key, prompt_key(p, info, runtime))
        if path.exists():
            try:
                out[p] = load_tensors(path)["embeds"]
            except CacheCorruptError as exc:
                log.warning("%s; recomputing it", exc)
    missing = [p for p in wanted if p not in out]
    if phase is not None:
        phase.hit(not missing, f"{len(wanted) - len(missing)}/{len(wanted)} prompts cached")
        phase.total(len(wanted), len(wanted) - len(missing))
    if missing:
        tokenizer = load_tokenizer(info)
        with loaded("text_encoder", info, runtime) as t5:
            for p in missing:
                ids = tokenize(tokenizer, p, info.text_length).to(runtime.device)
                emb = t5(ids)[0].to(runtime.dtype).cpu()
                try:
                    save_tensors(layout.prompt_file(info.key, prompt_key(p, info, runtime)), {"embeds": emb}, {"prompt": p})
                except ReadOnlyCacheError as exc:  # a read-only cache still serves edits
                    log.warning("prompt embedding not cached: %s", exc)
                out[p] = emb
                if phase is not None:
                    phase.advance()
    return {p: out[p].to(runtime.device) for p in prompts}


def embed_stage(ctx: StageContext, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The embedding of each prompt, on the run's device; T5 loads only for prompts not cached."""
    with ctx.reporter.phase("embed", total=len(set(prompts))) as ph:
        return embed_prompts(prompts, ctx.info, ctx.runtime, ctx.layout, ph)
