"""Flows built on the public API (`engine.invert`, `engine.edit`, `engine.run`): the demo, the
gallery (the cache as `cogedit ui` shows it, and edits kept in the cache), and work that spans
many calls (batches of jobs, several processes or GPUs).

May import: the public surface (`engine.workflow`, `engine.options`, `engine.results`,
`engine.report`, `engine.errors`) and anything below it. Nothing in engine imports this folder
except `engine/__init__`'s lazy exports.
"""
