"""Video in: probing and reading clips in a crash-proof child process (`reader`, `decord_worker`)
and the clips cogedit ships (`clips`).

May import: `engine.errors` and third-party libraries only.
"""
