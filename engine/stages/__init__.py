"""The stages: plain functions `x_stage(ctx, settings, inputs)` that move data one way,
video -> latents (encode) -> text embeddings (embed) -> trajectory (inversion) -> edited latents
(editing) -> frames and mp4 (decode), with verify and the stored-attention bookkeeping beside them.

Also here: each stage's frozen settings (`settings`), the context every stage gets (`context`),
the step math they share (`schedulers`, `fixed_point`) and the v-loss the proxies are judged by.

May import: `engine.models`, `engine.hooks`, `engine.video`, `engine.errors`, `cache`.
Never the public surface (`engine.workflow`, `engine.results`, ...), which calls the stages.
"""
