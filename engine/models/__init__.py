"""The models: loading CogVideoX's parts (`components`), what a model folder holds (`model_info`,
`configs`), the memory plans (`plans`), one transformer call (`denoiser`), compiled-kernel
caching (`compile_cache`), and the small models cogedit ships or builds (`proxy`, `tiny`).

May import: `engine.hooks` (components composes the features onto what it loads),
`engine.video` (the bundled clips), `engine.errors`, `cache`. Never a stage or the public surface.
"""
