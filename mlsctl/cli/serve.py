from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from mlsctl.cli import app


@app.command("serve")
def serve(
    gallery: Path = typer.Argument(..., help="Gallery folder (mlsctl index build)."),
    run: Optional[Path] = typer.Option(None, "--run", help="Run whose teacher embeds photos [default: the gallery's run]."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port."),
    root: Optional[Path] = typer.Option(None, "--root", help="Folder whose files requests may name by path [default: none; uploads only]."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", min=0.01, help="Largest photo accepted, in MiB."),
) -> None:
    """Serve a gallery over HTTP: search with photos, fold photos into objects, as JSON.

    Example: mlsctl serve galleries/demo-products --run runs/mile_fmnist_quick
    then: curl -F photos=@a.png -F photos=@b.png http://127.0.0.1:8000/search
    """
    from mlsctl.serve import serve as run_server

    run_server(gallery, run, host, port, root, max_upload_mb, say=lambda line: print(line, file=sys.stderr, flush=True))
