"""The layers of mlsctl and the imports that go up them.

    python scripts/layers.py                 # the upward imports, one a line, and their count
    python scripts/layers.py --json          # the same as one JSON object (layers, upward, count)
    python scripts/layers.py --root DIR      # another checkout (DIR/mlsctl)

It lists as well the imports *across* method packages: a module of ``mlsctl/methods/<a>/`` that
imports ``mlsctl/methods/<b>/`` for another method ``b``. Methods share code through the modules
directly in ``mlsctl/methods/`` (``base``, ``base_config``, ``self_distillation``), never through
another method's package, so that one method can change without moving another.

Every module under ``mlsctl/`` belongs to one layer (:data:`LAYERS`, bottom first, by its first
name below ``mlsctl``: ``mlsctl/data/objects.py`` is ``data``). An import is *upward* when the
module it names sits in a higher layer than the importing one. Every import counts, those inside
a function included (the usual way a lower module reaches a higher one here); an import of the
same layer is never upward. ``mlsctl.__version__`` is a constant that ``mlsctl/__init__.py`` defines
before anything else, so importing it counts as layer 0, not as the package's top layer. A module
the map leaves out is an error (exit 1), so a new top-level module gets a layer when it is added.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

# bottom first; a name is the first component below mlsctl (a module or a package)
LAYERS: list[tuple[str, ...]] = [
    ("errors", "atomic", "locks", "registry", "config", "dist", "device", "schedules", "provenance", "runs", "threads",
     "launch", "console", "outputs", "__version__"),
    ("data", "models", "bank", "bank_health"),
    ("methods",),
    ("restore", "evaluate", "features", "gallery", "refine", "bank_inspect", "export", "report", "compare", "viz",
     "curves", "monitor"),
    ("train",),
    ("serve",),
    ("cli",),
    ("__init__", "__main__"),
]
LAYER_OF = {name: level for level, names in enumerate(LAYERS) for name in names}


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name → file, for every .py under ``root/mlsctl``."""
    out = {}
    for path in sorted((root / "mlsctl").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def group(module: str) -> str:
    """The name :data:`LAYERS` knows a module by: ``mlsctl.data.objects`` → ``data``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(node: ast.AST, module: str, is_package: bool, known: dict[str, Path]) -> list[str]:
    """The mlsctl modules an import statement names (``from mlsctl.x import y`` is ``mlsctl.x.y``
    when that is a module, else ``mlsctl.x``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name == "mlsctl" or a.name.startswith("mlsctl.")]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = package[:len(package) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if source != "mlsctl" and not source.startswith("mlsctl."):
        return []
    out = []
    for alias in node.names:
        if source == "mlsctl" and alias.name == "__version__":
            out.append("mlsctl.__version__")
        elif f"{source}.{alias.name}" in known:
            out.append(f"{source}.{alias.name}")
        else:
            out.append(source)
    return sorted(set(out), key=out.index)


def scopes(tree: ast.AST):
    """(statement, the function or class it sits in, "" at module level) for every import."""
    def walk(node, where):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, where
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else None
            yield from walk(child, f"{where}.{inner}" if where and inner else inner or where)
    yield from walk(tree, "")


def upward_imports(root: Path) -> tuple[list[dict], list[str], int]:
    """Every upward import under ``root/mlsctl``, the modules the layer map leaves out, and how
    many imports of mlsctl modules there are in all."""
    known = module_names(root)
    unmapped = sorted(m for m in known if group(m) not in LAYER_OF)
    upward, total = [], 0
    for module, path in known.items():
        source_layer = LAYER_OF.get(group(module))
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node, where in scopes(tree):
            for target in imported_modules(node, module, path.name == "__init__.py", known):
                total += 1
                target_layer = LAYER_OF.get(group(target))
                if source_layer is None or target_layer is None or target_layer <= source_layer:
                    continue
                upward.append({"file": path.relative_to(root).as_posix(), "line": node.lineno, "in": where or None,
                               "module": module, "imports": target, "from_layer": f"{source_layer} {group(module)}",
                               "to_layer": f"{target_layer} {group(target)}"})
    return upward, unmapped, total


def method_of(module: str, packages: set[str]) -> str | None:
    """The method package a module belongs to (``mlsctl.methods.cribo.ops`` → ``cribo``); None for
    the shared modules directly in ``mlsctl/methods/`` and for every other module."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["mlsctl", "methods"] and parts[2] in packages else None


def cross_method_imports(root: Path) -> list[dict]:
    """Every import, at module level or in a function, from one method package into another."""
    known = module_names(root)
    packages = {p.name for p in (root / "mlsctl" / "methods").iterdir() if (p / "__init__.py").is_file()}
    found = []
    for module, path in known.items():
        source = method_of(module, packages)
        if source is None:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node, where in scopes(tree):
            for target in imported_modules(node, module, path.name == "__init__.py", known):
                if method_of(target, packages) not in (None, source):
                    found.append({"file": path.relative_to(root).as_posix(), "line": node.lineno, "in": where or None,
                                  "module": module, "imports": target})
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the checkout whose mlsctl/ is read [default: this one]")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    args = parser.parse_args(argv)
    if not (args.root / "mlsctl").is_dir():
        print(f"{args.root} has no mlsctl/ folder; give --root a checkout of mlsctl", file=sys.stderr)
        return 2
    upward, unmapped, total = upward_imports(args.root)
    across = cross_method_imports(args.root)
    if args.json:
        print(json.dumps({"layers": [list(names) for names in LAYERS], "upward": upward, "count": len(upward),
                          "imports": total, "unmapped": unmapped, "across_methods": across}, indent=1))
    else:
        for u in upward:
            where = f" (in {u['in']})" if u["in"] else " (module level)"
            print(f"{u['file']}:{u['line']}{where}: {u['from_layer']} -> {u['to_layer']}: {u['imports']}")
        print(f"{len(upward)} upward imports (of {total} imports of mlsctl modules)")
        for u in across:
            where = f" (in {u['in']})" if u["in"] else " (module level)"
            print(f"{u['file']}:{u['line']}{where}: another method's package: {u['imports']}")
        print(f"{len(across)} imports across method packages")
    if unmapped:
        print(f"modules in no layer: {', '.join(unmapped)}; add their names to LAYERS in scripts/layers.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
