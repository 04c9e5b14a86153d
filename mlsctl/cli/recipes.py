from __future__ import annotations

import json
from typing import Optional

import typer

from mlsctl.cli import app


def _text(value, width: int = 48) -> str:
    """A key's value as a recipe writes it (YAML), cut to ``width`` characters (--json has it whole)."""
    text = _yaml(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _yaml(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, (list, dict)):
        import yaml

        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return str(value)


@app.command("recipes")
def list_recipes(
    show: Optional[str] = typer.Option(None, "--show", help="Print every key of this recipe (a shipped name or a YAML file) after defaults, with its value and what it does."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the shipped recipes with their one-line descriptions, or show one recipe's keys.

    Example: mlsctl recipes && mlsctl pretrain dino_fmnist_quick --out runs/quick

    Every key, its value and its help: mlsctl recipes --show dino_fmnist_quick
    (change one with an override: mlsctl pretrain dino_fmnist_quick optim.epochs=2)
    """
    from mlsctl import config

    if show is not None:
        path = config.resolve_recipe_path(show)
        given = config.read_yaml(path)
        rows = config.recipe_keys(config.from_dict(given, source=str(path)), given)
        if as_json:
            typer.echo(json.dumps({"recipe": str(path), "keys": rows}, indent=2))
            return
        from mlsctl.cli._format import table

        typer.echo(table(["key", "value", "set by", "help"],
                         [[r["key"], _text(r["value"]), r["set_by"], f"{r['help']}; {r['type']}"] for r in rows],
                         right=[False] * 4))
        own = sum(r["set_by"] == "recipe" for r in rows)
        typer.echo(f"\n{path}: {len(rows)} keys, {own} set by the recipe, the others at their defaults; change one "
                   f"with an override after the recipe (optim.lr=1e-4)")
        return
    rows = []
    for name, path in config.shipped_recipes().items():
        data = config.read_yaml(path) or {}
        method = (data.get("method") or {}).get("name", config.DEFAULT_METHOD) if isinstance(data, dict) else "?"
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
