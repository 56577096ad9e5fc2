"""The local web app (`cogedit ui`): invert a clip, render many edits from the cache and compare
them, browse and clean the cache, in a browser. Gradio, on the engine's Python API.

    webui/folders.py   the only two folders a request may touch: the cache and the uploads
    webui/jobs.py      one engine job at a time: progress, cancel, one-line errors
    webui/actions.py   what each button does: one engine or cache call
    webui/app.py       the page, tab by tab, and its wiring

May import: engine and cache. Nothing imports webui except cli.py's `ui` command. Needs the
`ui` extra (pip install -e ".[ui]" in the cogedit source folder).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from engine.errors import SettingsError
from webui.folders import Folders


def start(model: str | None = None, host: str = "127.0.0.1", port: int = 7860, cache_dir: str | Path | None = None, uploads_dir: str | Path | None = None, world: str = "shapes") -> Any:
    """Start serving in the background and return the running `gr.Blocks` (`.local_url`, `.close()`).

    With no `model`, the shipped proxy of `world` ("shapes" or "bunny"). Requests can read and write only the cache and the uploads folder (default `<cache>/uploads`):
    Gradio serves the cache (`allowed_paths`) and its own temp dir, which is made the uploads
    folder. There is never a public share link."""
    folders = Folders.make(cache_dir, uploads_dir)
    # Some of gradio's modules read these on import: set them before it is imported.
    os.environ["GRADIO_TEMP_DIR"] = str(folders.uploads)
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(folders.uploads / "examples")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from webui.actions import app_config
    from webui.app import build

    app = build(app_config(model, folders, world))
    app.queue()
    try:
        app.launch(
            server_name=host, server_port=port, share=False, allowed_paths=[str(folders.cache)], ssr_mode=False, footer_links=[], show_error=False, quiet=True, prevent_thread_lock=True
        )
    except OSError as exc:  # gradio says only that it found no empty port
        raise SettingsError(f"cannot serve on {host}:{port} (in use, or not an address of this machine) — pass another --port, or --host 127.0.0.1") from exc
    print(f"cogedit ui: {app.local_url} (cache {folders.cache}, uploads {folders.uploads}); Ctrl+C stops it", flush=True)
    return app


def serve(model: str | None = None, host: str = "127.0.0.1", port: int = 7860, cache_dir: str | Path | None = None, uploads_dir: str | Path | None = None, world: str = "shapes") -> None:
    """`start`, then serve until interrupted."""
    start(model, host, port, cache_dir, uploads_dir, world).block_thread()
