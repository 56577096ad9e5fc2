"""cogedit's on-disk cache: layout, keys, manifests, atomic safetensors writes, locks, gc, verify.

Import the module you need (`cache.layout`, `cache.entry`, `cache.atomic`, ...): nothing is
imported here, so that reading a path or a size never pulls in torch.
"""
