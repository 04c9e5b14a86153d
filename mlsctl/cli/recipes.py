from __future__ import annotations

import json

import typer

from mlsctl.cli import app


@app.command("recipes")
def list_recipes(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the shipped recipes with their one-line descriptions.

    Example: mlsctl recipes && mlsctl pretrain dino_fmnist_quick --out runs/quick
    """
    from mlsctl import config

    rows = []
    for name, path in config.shipped_recipes().items():
        data = config.read_yaml(path) or {}
        method = (data.get("method") or {}).get("name", "dino") if isinstance(data, dict) else "?"
        description = data.get("description", "") if isinstance(data, dict) else ""
        rows.append({"name": name, "method": method, "description": description, "path": str(path)})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no shipped recipes found")
        return
    width = max(len("recipe"), *(len(r["name"]) for r in rows))
    method_width = max(len("method"), *(len(r["method"]) for r in rows))
    typer.echo(f"{'recipe'.ljust(width)}  {'method'.ljust(method_width)}  description")
    for r in rows:
        typer.echo(f"{r['name'].ljust(width)}  {r['method'].ljust(method_width)}  {r['description']}")
