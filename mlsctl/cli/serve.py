from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mlsctl.cli import app
from mlsctl.cli._format import say


@app.command("serve")
def serve(
    gallery: Path = typer.Argument(..., help="Gallery folder (mlsctl index build)."),
    run: Optional[Path] = typer.Option(None, "--run", help="Run whose teacher embeds photos [default: the gallery's run]."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; beyond loopback (0.0.0.0: every interface) it needs --token-file."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port."),
    root: Optional[Path] = typer.Option(None, "--root", help="Folder whose files requests may name by path [default: none; uploads only]."),
    read_only: bool = typer.Option(False, "--read-only", help="Serve searches only: no request can change the gallery."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="File holding the bearer token every request but GET /health must send (mode 0600) [default: a token generated into GALLERY/.mlsctl.token, needed by writes]."),
    allow_host: Optional[list[str]] = typer.Option(None, "--allow-host", help="Another Host name clients may use (the server's DNS name, a proxy's), matched exactly (no patterns); repeatable [default: the bound address, localhost]."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="Largest photo file accepted, in MiB."),
    max_request_mb: float = typer.Option(64.0, "--max-request-mb", help="Largest request body, in MiB (JSON bodies: 1 MiB)."),
    decode_budget_mb: float = typer.Option(1024.0, "--decode-budget-mb", help="Memory all requests together may use to decode photos, in MiB; a photo that needs more is refused."),
    max_connections_per_client: int = typer.Option(32, "--max-connections-per-client", min=0, help="Connections one client may hold open (an IPv4 address, an IPv6 /64, loopback as one); beyond, 503 (0: no cap, behind a proxy, where every client has the proxy's address)."),
    docs: bool = typer.Option(False, "--docs", help="Serve the API's pages /docs, /redoc and /openapi.json (/docs loads scripts from a CDN)."),
) -> None:
    """Serve a gallery over HTTP: search with photos, fold photos into objects, remove objects, as JSON.

    Example: mlsctl serve galleries/demo-products   (the gallery's own run embeds the photos)
    then: curl -F photos=@a.png -F photos=@b.png http://127.0.0.1:8000/search
    Writes send the token of the file the server names at start (it never prints the token):
    curl -H "Authorization: Bearer $(cat galleries/demo-products/.mlsctl.token)" -F photos=@c.png
    http://127.0.0.1:8000/objects/ev00007/photos; curl -X DELETE with that header on
    http://127.0.0.1:8000/objects/ev00007 removes the object.
    What the service protects against: docs/service.md.

    Every request is one line on stderr (method, path, status, ms); Ctrl-C or SIGTERM stops the server,
    which says what the session saved (each add is written to disk before it is answered); exit code 0
    on SIGTERM (a service's ordinary stop), 130 on Ctrl-C.
    """
    from mlsctl.serve import serve as run_server

    run_server(gallery, run, host, port, root, max_upload_mb, say=say,
               max_request_mb=max_request_mb, decode_budget_mb=decode_budget_mb, read_only=read_only,
               token_file=token_file, allow_hosts=allow_host or [], docs=docs,
               max_connections_per_client=max_connections_per_client)
