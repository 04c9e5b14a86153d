from __future__ import annotations

import json
import re

from mlsctl import __version__

from conftest import REPO, cli, run_cli


def test_version_and_help():
    assert run_cli("--version", check=True).stdout.strip() == f"mlsctl {__version__}"
    top = run_cli("--help", check=True).stdout
    for command in ("pretrain", "recipes", "data", "embed", "eval", "viz"):
        assert command in top


def test_help_and_version_import_no_torch():
    """`mlsctl --help` answers at once: neither entry point (the console script, `python -m mlsctl`) imports
    torch before a command needs it (issue 24, item 6)."""
    import subprocess
    import sys

    from conftest import cli_env

    report = "import atexit, sys; atexit.register(lambda: print(sorted({'torch', 'timm', 'faiss'} & set(sys.modules))))\n"
    for start in ("from mlsctl.cli import main; sys.argv = ['mlsctl', '--help']; main()",
                  "import runpy; sys.argv = ['mlsctl', '--help']; runpy.run_module('mlsctl', run_name='__main__')"):
        result = subprocess.run([sys.executable, "-c", report + start], capture_output=True, text=True, env=cli_env())
        assert result.returncode == 0 and "search" in result.stdout, result.stderr
        assert result.stdout.strip().splitlines()[-1] == "[]", start


def test_a_method_and_its_banks_read_without_torchvision():
    """`bank inspect` needs a method's class and its banks, not the augmentation: torchvision (which imports
    torch._dynamo, seconds on a small CPU) is imported where crops are made."""
    import subprocess
    import sys

    from conftest import cli_env

    code = ("import sys, mlsctl.methods.dino, mlsctl.methods.mile, mlsctl.bank_inspect, mlsctl.bank_health\n"
            "print(sorted({'torchvision', 'timm', 'faiss'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env())
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def _leaf_commands() -> list[list[str]]:
    import typer

    from mlsctl.cli import app

    def walk(command, path):
        if getattr(command, "commands", None):
            for name, sub in command.commands.items():
                yield from walk(sub, path + [name])
        else:
            yield path

    return list(walk(typer.main.get_command(app), []))


def test_every_command_is_documented_with_an_example(capsys):
    readme = (REPO / "README.md").read_text()
    commands = _leaf_commands()
    assert ["embed"] in commands and ["eval", "knn-seg"] in commands and ["viz", "pca"] in commands
    assert "Example:" in run_cli("embed", "--help", check=True).stdout  # once through a real process
    for command in commands:
        code, out, _ = cli(*command, "--help", capsys=capsys)
        assert code == 0 and "Example:" in out, command
        assert f"`mlsctl {' '.join(command)}" in readme, f"README's command table lacks mlsctl {' '.join(command)}"


def test_recipes_lists_shipped_recipes_with_descriptions():
    table = run_cli("recipes", check=True).stdout
    assert "dino_fmnist_quick" in table and "dino_in1k" in table
    rows = json.loads(run_cli("recipes", "--json", check=True).stdout)
    assert {r["name"] for r in rows} >= {"dino_fmnist_quick", "dino_in1k"}
    assert all(r["description"] for r in rows)


def test_space_separated_values_become_repeated_options():
    from mlsctl.cli import expand_multi_values

    argv = ["eval", "knn-seg", "--fraction", "1/1", "1/8", "--k", "30", "--train", "t"]
    assert expand_multi_values(argv) == ["eval", "knn-seg", "--fraction", "1/1", "--fraction", "1/8", "--k", "30",
                                         "--train", "t"]
    assert expand_multi_values(["eval", "knn", "--k", "10", "20"]) == ["eval", "knn", "--k", "10", "--k", "20"]
    assert expand_multi_values(["embed", "dir", "--k", "1", "2"]) == ["embed", "dir", "--k", "1", "2"]


def test_unknown_command_is_a_usage_error():
    result = run_cli("pretrian")
    assert result.returncode == 2


def test_readme_opens_with_the_two_commands():
    text = (REPO / "README.md").read_text()
    first_block = re.search(r"```\n(.*?)```", text, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make demo", "make test"]


def test_readme_documents_every_recipe_key_and_recipe():
    from dataclasses import fields, is_dataclass

    from mlsctl import config, methods

    text = (REPO / "README.md").read_text()

    def paths(obj, prefix=""):
        for f in fields(obj):
            value = getattr(obj, f.name)
            if is_dataclass(value):
                yield from paths(value, f"{prefix}{f.name}.")
            else:
                yield prefix + f.name

    recipe = config.Recipe()
    missing = [p for p in paths(recipe) if f"`{p}`" not in text]
    for name in methods.names():
        missing += [p for p in paths(methods.config_class(name)(), "method.") if f"`{p}`" not in text]
    assert missing == []
    for path in (REPO / "recipes").glob("*.yaml"):
        assert f"recipes/{path.name}" in text
