"""Features composed onto diffusers modules as named, removable hooks (diffusers' `HookRegistry`):
K/V injection (`injection`), row groups (`row_groups`), FF chunking (`ff_chunking`), K/V capture
(`kv_capture`) and replay (`kv_replay`); `registry` holds the registry calls they share and
`libraries` imports diffusers, transformers and torchao quietly for every layer above.

Each feature: a frozen config dataclass, `apply_x(module, config)`, `remove_x(module)`.
May import: `engine.errors` and third-party libraries only.
"""
