from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from mlsctl import __version__

from conftest import REPO, cli, cli_ok, in_process, run_cli, write_feature_folder


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
    for start in ("from mlsctl.cli import run; sys.argv = ['mlsctl', '--help']; run()",
                  "import runpy; sys.argv = ['mlsctl', '--help']; runpy.run_module('mlsctl', run_name='__main__')"):
        result = subprocess.run([sys.executable, "-c", report + start], capture_output=True, text=True, env=cli_env())
        assert result.returncode == 0 and "search" in result.stdout, result.stderr
        assert result.stdout.strip().splitlines()[-1] == "[]", start


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_stop_while_a_finished_command_exits_keeps_its_exit_code(signum):
    """A new user's probe (2026-12-06): a Ctrl-C just after `pretrain` said `done:` gave exit 130 and no word
    (Python took 1.3 s to tear its modules down). The program now leaves at once after its atexit handlers,
    and a stop meanwhile ends it with the command's own code: 0 for work done, 2 for a usage error."""
    import subprocess
    import sys

    from conftest import cli_env

    stop = (f"import atexit, os, signal, sys, time\n"
            f"atexit.register(lambda: (os.kill(os.getpid(), signal.{signum}), time.sleep(2), print('never')))\n")
    for args, code in ((["recipes"], 0), (["recipes", "--show", "no-such-recipe"], 2)):
        start = f"from mlsctl.cli import run; sys.argv = ['mlsctl', *{args!r}]; run()"
        result = subprocess.run([sys.executable, "-c", stop + start], capture_output=True, text=True, env=cli_env(),
                                timeout=60)
        assert result.returncode == code, (args, result.stderr)
        assert "never" not in result.stdout and "Traceback" not in result.stderr and "Interrupt" not in result.stderr
        if code == 0:
            assert "dino_fmnist_quick" in result.stdout  # what the command printed came out


def test_a_command_started_with_stdout_or_stderr_closed_ends_well():
    """A review (2026-12-06): the exit's flush met sys.stdout = None (a daemon's `>&-`): a traceback, exit 1."""
    import os
    import subprocess
    import sys

    from conftest import cli_env

    for fd in (1, 2):
        result = subprocess.run([sys.executable, "-m", "mlsctl", "recipes"], env=cli_env(), timeout=60,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE if fd == 1 else subprocess.DEVNULL,
                                preexec_fn=lambda fd=fd: os.close(fd))
        assert result.returncode == 0, (fd, result.stderr)


def test_a_library_message_quoted_in_ours_ends_at_a_sentence_or_a_word():
    """A new user's probe and a review (2026-12-06): torch's message was cut mid-sentence ("... that your checkpoint
    file is"), then at an early "e.g. " ("Failed to load, e.g.")."""
    from mlsctl.errors import first_line

    torch_text = ("PytorchStreamReader failed reading zip archive: failed finding central directory. This is an internal "
                  "miniz error. If you are seeing this error, there is a high likelihood that your checkpoint file is "
                  "corrupted")
    assert first_line(RuntimeError(torch_text)) == ("PytorchStreamReader failed reading zip archive: failed finding "
                                                    "central directory. This is an internal miniz error.")
    cut = first_line(RuntimeError("Failed to load, e.g. the file " + "word " * 60), 200)
    assert cut.startswith("Failed to load, e.g. the file word") and cut.endswith("word…") and len(cut) <= 201
    assert first_line(RuntimeError("short. message")) == "short. message"


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
    reference = (REPO / "docs" / "commands.md").read_text()
    commands = _leaf_commands()
    assert ["embed"] in commands and ["eval", "knn-seg"] in commands and ["viz", "pca"] in commands
    assert "Example:" in run_cli("embed", "--help", check=True).stdout  # once through a real process
    for command in commands:
        code, out, _ = cli(*command, "--help", capsys=capsys)
        assert code == 0 and "Example:" in out, command
        assert f"`mlsctl {' '.join(command)}" in reference, f"docs/commands.md's table lacks mlsctl {' '.join(command)}"


def test_model_options_read_the_same_in_every_command_that_takes_a_model():
    import typer

    from mlsctl.cli import app
    from mlsctl.cli import _options

    def leaf(command, path):
        for name in path:
            command = command.commands[name]
        return command

    root = typer.main.get_command(app)
    shared = {"--run": _options.RUN_OPTION, "--weights": _options.WEIGHTS_OPTION, "--model": _options.MODEL_OPTION,
              "--random-init": _options.RANDOM_INIT_OPTION}
    taking = [path for path in _leaf_commands() if "--weights" in
              {o for p in leaf(root, path).params for o in getattr(p, "opts", [])}]
    assert sorted(taking) == [["embed"], ["eval", "knn"], ["eval", "knn-seg"], ["eval", "linear"], ["eval", "linear-seg"]]
    for path in taking:
        params = {p.opts[0]: p for p in leaf(root, path).params if p.opts[0] in _options.MODEL_OPTION_NAMES}
        assert set(params) == set(_options.MODEL_OPTION_NAMES), path
        for name, param in params.items():
            assert (param.opts, param.help, param.default) == ([name], shared[name].help, shared[name].default), (path, name)
    for path in (["export"], ["report"], ["bank", "inspect"]):
        run = next(p for p in leaf(root, path).params if p.name == "run")
        assert run.help == _options.RUN_ARGUMENT.help, path


def test_recipes_lists_shipped_recipes_with_descriptions():
    table = in_process("recipes", check=True).stdout
    assert "dino_fmnist_quick" in table and "dino_in1k" in table
    rows = json.loads(in_process("recipes", "--json", check=True).stdout)
    assert {r["name"] for r in rows} >= {"dino_fmnist_quick", "dino_in1k"}
    assert all(r["description"] for r in rows)


def test_space_separated_values_become_repeated_options():
    from mlsctl.cli import expand_multi_values

    argv = ["eval", "knn-seg", "--fraction", "1/1", "1/8", "--k", "30", "--train", "t"]
    assert expand_multi_values(argv) == ["eval", "knn-seg", "--fraction", "1/1", "--fraction", "1/8", "--k", "30",
                                         "--train", "t"]
    assert expand_multi_values(["eval", "knn", "--k", "10", "20"]) == ["eval", "knn", "--k", "10", "--k", "20"]
    assert expand_multi_values(["embed", "dir", "--k", "1", "2"]) == ["embed", "dir", "--k", "1", "2"]


def test_comma_separated_numbers_are_several_values_and_bad_numbers_are_said_plainly(capsys):
    # a probe (2026-12-07): --k=10,20 got pydantic's "Input should be a valid integer, unable to parse string ..."
    from mlsctl.cli import expand_multi_values

    assert expand_multi_values(["eval", "knn", "--k", "10,20", "100"]) == ["eval", "knn", "--k", "10", "--k", "20",
                                                                             "--k", "100"]
    assert expand_multi_values(["eval", "knn", "--k=10,20"]) == ["eval", "knn", "--k", "10", "--k", "20"]
    assert expand_multi_values(["eval", "linear", "--lr", "0.1,1e-2"]) == ["eval", "linear", "--lr", "0.1", "--lr",
                                                                           "1e-2"]
    # a comma in a value that is no list of numbers stays: a path, a fraction
    assert expand_multi_values(["eval", "knn-seg", "--fraction", "1/8,1/2"]) == ["eval", "knn-seg", "--fraction",
                                                                                 "1/8,1/2"]
    for bad, plain in (("--k=1,x", "'--k': not a whole number"), ("--k=1.5", "'--k': not a whole number")):
        code, _, err = cli("eval", "knn", "--train", "t", "--val", "v", bad, capsys=capsys)
        assert code == 2 and plain in err and "Input should" not in err, err
    code, _, err = cli("eval", "linear", "--train", "t", "--val", "v", "--lr", "fast", capsys=capsys)
    assert code == 2 and "'--lr': not a number" in err, err
    code, _, err = cli("eval", "knn-seg", "--runs", "runs/dino", capsys=capsys)  # --runs beside --run
    assert code == 2 and "--runs counts the seeded draws of each fraction, --run names a run folder" in err, err


def test_unknown_command_is_a_usage_error():
    result = in_process("pretrian")
    assert result.returncode == 2


def test_readme_opens_with_the_two_commands():
    text = (REPO / "README.md").read_text()
    first_block = re.search(r"```\n(.*?)```", text, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make demo", "make test"]


def test_docs_document_every_recipe_key_and_recipe():
    from dataclasses import fields, is_dataclass

    from mlsctl import config, methods

    text = (REPO / "docs" / "recipes.md").read_text()

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


# ----------------------------------------------------------------------------------- options of a fixed set


def _library_choices() -> dict[tuple[str, str], tuple[str, ...]]:
    """(command, option) → the values the library accepts: what --help must list."""
    from mlsctl import bank_inspect, features, gallery
    from mlsctl.data import datasets, fmnist_products
    from mlsctl.evaluate import knn, knn_seg
    from mlsctl.refine import plot as refine_plot

    splits = tuple(dict.fromkeys(s for name in datasets.DATASETS for s in datasets.reader(name).SPLITS))
    segmentation, classification = ("folders",) + datasets.SEGMENTATION, ("folders",) + datasets.CLASSIFICATION
    table = {("embed", "--dataset"): datasets.DATASETS, ("embed", "--split"): splits,
             ("embed", "--resize"): features.RESIZE_MODES, ("embed", "--dtype"): tuple(features.DTYPES),
             ("eval knn-seg", "--protocol"): tuple(knn_seg.PROTOCOLS), ("eval knn-seg", "--index"): knn_seg.INDEXES,
             ("eval knn-seg", "--search"): knn_seg.SEARCHES, ("eval knn-seg", "--device"): knn.DEVICES,
             ("eval knn-seg", "--patch-labels"): knn_seg.PATCH_LABELS,
             ("eval knn", "--device"): knn.DEVICES, ("eval linear", "--device"): knn.DEVICES, ("eval knn", "--resize"): features.RESIZE_MODES,
             ("eval linear", "--resize"): features.RESIZE_MODES,
             ("bank plot", "--projection"): bank_inspect.PROJECTIONS,  # --color-by also takes a labels file
             ("index build", "--index"): gallery.INDEX_KINDS, ("index build", "--dtype"): tuple(gallery.STORAGE_DTYPES),
             ("refine apply", "--dtype"): tuple(features.DTYPES), ("refine plot", "--projection"): refine_plot.PROJECTIONS,
             ("data fmnist-products", "--layout"): fmnist_products.LAYOUTS, ("export", "--format"): ("timm",)}
    for command, datasets_ in (("eval knn-seg", segmentation), ("eval linear-seg", segmentation),
                               ("eval knn", classification), ("eval linear", classification)):
        table.update({(command, "--dataset"): datasets_, (command, "--train-split"): splits,
                      (command, "--val-split"): splits})
    return table


def _options_in_help(help_text: str) -> dict[str, str]:
    """--option → its metavar in --help (``<square|center-crop>``, ``<path>``)."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^\s+(?:-\w, )?(--[\w-]+) <([^>]*)>", help_text, re.M)}


def _fixed_set_options_in_the_code() -> set[str]:
    """Options the library or the CLI refuses with "--NAME VALUE is not one of ..." (or "... must be
    A or B", "... is not a split of"): every command's option of that name takes a fixed set."""
    names = set()
    pattern = re.compile(r"--([a-z][a-z0-9-]*)(?: \{[^{}]+\} is not (?:one of|a split of)| must be \w+ or \w+)")
    # ... or names the option it was given, whose default is in the signature (datasets.open_split's option="--split")
    named = re.compile(r'option: str = "--([a-z][a-z0-9-]*)"(?s:.){0,800}?\{option\} \{[^{}]+\} is not (?:one of|a split of)')
    for path in (REPO / "mlsctl").rglob("*.py"):
        text = path.read_text()
        names |= set(pattern.findall(text)) | set(named.findall(text))
    return names


def test_every_option_of_a_fixed_set_lists_its_choices_in_help_and_refuses_others_in_one_sentence(capsys):
    from test_hardening import one_sentence

    expected = _library_choices()
    in_code = _fixed_set_options_in_the_code()
    assert in_code >= {"dataset", "split", "resize", "dtype", "protocol", "index", "search", "device", "layout",
                       "projection"}
    listed = {}
    for command in _leaf_commands():
        code, out, _ = cli(*command, "--help", capsys=capsys)
        assert code == 0, command
        for option, metavar in _options_in_help(out).items():
            name = " ".join(command)
            if (name, option) in expected or ("|" in metavar and not metavar.endswith("|FILE")):  # FILE: an open set
                listed[name, option] = metavar
            # an option the code checks against a fixed set, shown as free text, is what this test is for
            assert not (option[2:] in in_code and metavar == "str"), f"mlsctl {name} {option} <str> lists no choices"
    assert set(listed) == set(expected), "options with choices and the table above differ"
    for (name, option), values in expected.items():
        assert sorted(listed[name, option].split("|")) == sorted(values), (name, option, listed[name, option], values)
        code, _, err = cli(*name.split(), option, "no-such-value", capsys=capsys)
        sentence = one_sentence(err)
        assert code == 2 and f"{option} no-such-value" in sentence and all(v in sentence for v in values), sentence
    code, _, err = cli("embed", "x", "--resize", "centre-crop", capsys=capsys)
    assert one_sentence(err) == ("error: --resize centre-crop is not one of square, center-crop; did you mean "
                                 "center-crop?")


def test_commands_are_listed_in_workflow_order(capsys):
    from mlsctl.cli._options import COMMAND_ORDER

    code, out, _ = cli("--help", capsys=capsys)
    listed = re.findall(r"^  ([a-z][\w-]*)  ", out.split("Commands:")[1], re.M)
    assert listed == ["data", "recipes", "pretrain", "embed", "eval", "bank", "index", "search", "serve", "refine",
                      "export", "plot", "report", "compare", "viz"]
    assert sorted(listed) == sorted(COMMAND_ORDER) == sorted({c[0] for c in _leaf_commands()})  # none left out


def test_an_override_written_as_an_option_gets_the_spelling_that_works(capsys):
    from test_hardening import one_sentence

    from mlsctl.cli._options import dashed_override

    for args, fix in ((["pretrain", "dino_fmnist_quick", "--data.root=/x"], "write data.root=/x instead of --data.root=/x"),
                      (["pretrain", "dino_fmnist_quick", "--out", "runs/x", "--data.root", "/x"],
                       "write data.root=/x instead of --data.root /x"),
                      (["pretrain", "--optim.lr", "--out", "runs/x", "dino_fmnist_quick"],
                       "write optim.lr=VALUE instead of --optim.lr"),
                      (["pretrain", "dino_fmnist_quick", "--seed=3"], "write seed=3 instead of --seed=3"),
                      (["pretrain", "dino_fmnist_quick", "--description=a b"], "write 'description=a b' instead of"),
                      (["refine", "train", "features/x", "--method.blocks=2"], "write method.blocks=2 instead of")):
        code, _, err = cli(*args, capsys=capsys)
        assert code == 2 and one_sentence(err).startswith(f"error: overrides take no dashes: {fix}"), (args, err)
    code, _, err = cli("pretrain", "dino_fmnist_quick", "--overwirte", capsys=capsys)  # a mistyped option stays one
    assert code == 2 and "No such option: --overwirte" in err and "dashes" not in err
    # the command's own options, their values and what follows -- are not overrides
    assert dashed_override(["--seed", "3", "--out", "--x.y", "--", "--data.root=/x"], {"--seed", "--out"},
                           {"--seed", "--out"}) is None


def test_recipes_show_prints_every_resolved_key_with_its_help(capsys, tmp_path):
    from dataclasses import fields, is_dataclass

    from mlsctl import config

    from test_hardening import one_sentence

    def leaves(obj, prefix=""):
        for f in fields(obj):
            value = getattr(obj, f.name)
            yield from leaves(value, f"{prefix}{f.name}.") if is_dataclass(value) else [(prefix + f.name, value)]

    recipe = config.load_recipe("dino_fmnist_quick")
    out, _ = cli_ok(capsys, "recipes", "--show", "dino_fmnist_quick", "--json")
    shown = json.loads(out)
    assert shown["recipe"].endswith("recipes/dino_fmnist_quick.yaml")
    rows = {r["key"]: r for r in shown["keys"]}
    assert list(rows) == [key for key, _ in leaves(recipe)]  # every key, after defaults, method's included
    assert all(r["help"] and r["type"] for r in rows.values())
    assert rows["optim.lr"]["set_by"] == "recipe" and rows["data.augment"] == {
        "key": "data.augment", "value": "cpu", "set_by": "default", "type": "one of cpu, gpu",
        "help": config.DataConfig.__dataclass_fields__["augment"].metadata["help"]}
    assert rows["method.teacher_temp"]["value"] == recipe.method.teacher_temp
    assert rows["data.global_crops.scale"]["type"] == "a list of 2 numbers (> 0.0, <= 1.0)"
    table, _ = cli_ok(capsys, "recipes", "--show", "dino_fmnist_quick")
    line = next(line for line in table.splitlines() if line.startswith("optim.lr "))
    assert line.split()[1:3] == [str(recipe.optim.lr), "recipe"] and "peak learning rate" in line
    assert "keys, " in table.splitlines()[-1] and "set by the recipe" in table.splitlines()[-1]
    # a YAML file works too; every key of the schema is listed, those it leaves out as defaults
    path = tmp_path / "mine.yaml"
    path.write_text("method: {name: mile}\noptim: {epochs: 30}\n")
    rows = {r["key"]: r for r in json.loads(cli_ok(capsys, "recipes", "--show", str(path), "--json")[0])["keys"]}
    assert rows["optim.epochs"] == {**rows["optim.epochs"], "value": 30, "set_by": "recipe"}
    assert rows["method.set_length"]["set_by"] == "default" and rows["seed"]["set_by"] == "default"
    code, _, err = cli("recipes", "--show", "dino_fmnist_quik", capsys=capsys)
    assert code == 2 and "did you mean 'dino_fmnist_quick'" in one_sentence(err)


def test_ctrl_c_in_any_command_says_interrupted(tmp_path, capsys, monkeypatch):
    """A probe (2026-12-05): typer turns Ctrl-C into a silent exit 130, so every command without a handler of its
    own (index build, eval, ...) stopped without a word, while the docs promise `interrupted`."""
    import torch

    from conftest import cli, write_feature_folder
    from mlsctl.evaluate import knn

    names = [f"c{i}/{j}.png" for i in range(2) for j in range(3)]
    write_feature_folder(tmp_path / "f", names, torch.randn(6, 8))

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(knn, "evaluate_knn", stopped)
    code, out, err = cli("eval", "knn", "--train", str(tmp_path / "f"), "--val", str(tmp_path / "f"), capsys=capsys)
    assert code == 130 and err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err


def test_knn_says_when_val_images_are_training_images(capsys, tmp_path):
    """A new-user probe (2026-12-05): eval knn --train f --val f gave top-1 100 % without a word."""
    from conftest import cli, write_feature_folder

    names = [f"c{i}/{j}.png" for i in range(2) for j in range(3)]
    write_feature_folder(tmp_path / "f", names, torch.randn(6, 8))
    code, out, err = cli("eval", "knn", "--train", str(tmp_path / "f"), "--val", str(tmp_path / "f"), "--k", "1",
                         "--out", str(tmp_path / "r.json"), capsys=capsys)
    assert code == 0 and "note: 6 of the 6 val images are training images too" in out  # with the results
    assert json.loads((tmp_path / "r.json").read_text())["dataset"]["val_images_in_train"] == 6


def test_knn_and_linear_say_when_val_images_are_copies_of_training_images(capsys, tmp_path, monkeypatch):
    """The twentieth session left it: val images that are byte copies of training images under other paths (a split
    made by copying, two builds of one seed) were not counted by knn and linear, as they are by eval retrieval."""
    from conftest import cli, write_feature_folder

    from mlsctl.evaluate import inputs

    train = {f"c{k // 3}/{k % 3}.png": f"image {k}" for k in range(6)}
    # two copies under other names, one of a training image's name and size but other bytes, one gone since
    val = {"c0/copy-a.png": "image 1", "c1/copy-b.png": "image 5", "c0/0.png": "image 9", "c1/0.png": "other",
           "c1/1.png": "image 7", "c1/gone.png": None}
    for folder, files in (("train-images", train), ("val-images", val)):
        for name, text in files.items():
            if text is not None:
                (tmp_path / folder / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / folder / name).write_text(text)
    write_feature_folder(tmp_path / "ft", list(train), torch.randn(6, 8), input_root=tmp_path / "train-images")
    write_feature_folder(tmp_path / "fv", list(val), torch.randn(6, 8), input_root=tmp_path / "val-images")
    args = ["--train", str(tmp_path / "ft"), "--val", str(tmp_path / "fv")]
    for command, extra in (("knn", ["--k", "1"]), ("linear", ["--epochs", "1"])):
        code, out, err = cli("eval", command, *args, *extra, "--out", str(tmp_path / f"{command}.json"), capsys=capsys)
        assert code == 0, err
        assert ("note: 2 of the 6 val images are training images too (byte copies under other paths): the scores "
                "measure memory, not generalisation") in out, out
        dataset = json.loads((tmp_path / f"{command}.json").read_text())["dataset"]
        assert dataset["val_images_in_train"] == 2 and dataset["val_images_in_train_as_copies"] == 2
    # more to read than the check allows: compared by path only, and said
    monkeypatch.setattr(inputs, "COPY_CHECK_BYTES", 10)
    code, out, err = cli("eval", "knn", *args, "--k", "1", "--out", str(tmp_path / "big.json"), capsys=capsys)
    assert code == 0 and "training images too" not in out and (
        "note: the val images were compared with the training images by path only") in out, out
    assert json.loads((tmp_path / "big.json").read_text())["dataset"]["val_images_in_train"] == 0  # by path: recorded


def test_a_picture_is_written_only_under_a_png_name(capsys, tmp_path):
    """A probe (2026-12-05): `plot --out c.jpg` wrote PNG data under a .jpg name."""
    from conftest import cli

    for args in (["plot", str(tmp_path), "--out", "c.jpg"], ["bank", "plot", str(tmp_path), "--out", "b.txt"],
                 ["viz", "pca", str(tmp_path), "--out", "p.jpeg"], ["refine", "plot", str(tmp_path), "--out", "d.svg"]):
        code, _, err = cli(*args, capsys=capsys)
        assert code == 2 and "must end in .png" in err, (args, err)


def test_an_out_never_replaces_an_input_and_is_checked_before_the_work(capsys, tmp_path):
    """A probe (2026-12-06): `eval ... --out` wrote its JSON over a feature folder's manifest or shard, a run's
    weights, the labels file it read or an image, and the picture commands over input images, all with exit 0;
    a folder or an empty --out failed after the work, naming the temporary file."""
    from PIL import Image

    from conftest import cli, write_feature_folder
    from mlsctl.outputs import check_picture_target, check_results_target, save_image

    names = [f"c{i}/{j}.png" for i in range(2) for j in range(3)]
    feats = write_feature_folder(tmp_path / "f", names, torch.randn(6, 8))
    photo = tmp_path / "photo.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(photo)
    before = {p: p.read_bytes() for p in (feats / "manifest.json", photo)}
    for out, words in ((feats / "manifest.json", "is not a results file of mlsctl"),
                       (photo, "is not a results file of mlsctl"), (tmp_path, "is a folder"),
                       (photo / "r.json", f"{photo} is a file, not a folder"), (" ", "--out is empty")):
        code, _, err = cli("eval", "knn", "--train", str(feats), "--val", str(feats), "--k", "1", "--out", str(out),
                           capsys=capsys)
        assert code == 2 and words in err and "top-1" not in err and ".tmp" not in err, (out, err)
    assert all(p.read_bytes() == data for p, data in before.items())
    code, _, err = cli("eval", "knn", "--train", str(feats), "--val", str(feats), "--k", "1", "--out",
                       str(tmp_path / "r.json"), capsys=capsys)
    assert code == 0
    code, _, err = cli("eval", "knn", "--train", str(feats), "--val", str(feats), "--k", "1", "--out",
                       str(tmp_path / "r.json"), capsys=capsys)
    assert code == 0, err  # an earlier results file is replaced
    for args in (["plot", str(tmp_path), "--out", str(photo)], ["viz", "pca", str(feats), "--out", str(photo)],
                 ["bank", "plot", str(tmp_path), "--out", str(photo)],
                 ["refine", "plot", str(tmp_path), str(feats), "--out", str(photo)]):
        code, _, err = cli(*args, capsys=capsys)
        assert code == 2 and "is not a picture mlsctl drew" in err, (args, err)
    assert photo.read_bytes() == before[photo]
    drawn = tmp_path / "drawn.png"
    save_image(Image.new("RGB", (4, 4)), drawn)
    check_picture_target(drawn)  # a picture of ours is replaced
    check_results_target(tmp_path / "r.json")


def test_usage_errors_are_one_line_like_every_other_error(capsys):
    """click printed a usage error as four lines (usage, a hint, a blank line, 'Error: ...'); every other
    refusal is one 'error: ...' line: now these are too, with the help to read."""
    for args, said in ((["eval", "knn", "--kk", "3"], "error: No such option: --kk (Possible options: --k) "
                                                        "(see mlsctl eval knn -h)"),
                       (["eval", "knn", "--k", "abc"], "error: Invalid value for '--k'"),
                       (["evall"], "error: No such command 'evall'. Did you mean 'eval'? (see mlsctl -h)"),
                       (["pretrain"], "error: Missing argument 'recipe' (see mlsctl pretrain -h)"),
                       # a new-user probe (2026-12-06): an option without its value pointed at "mlsctl -h"
                       (["eval", "knn", "--k"], "error: Option '--k' requires an argument (see mlsctl eval knn -h)"),
                       (["search", "--set"], "error: Option '--set' requires an argument (see mlsctl search -h)")):
        code, out, err = cli(*args, capsys=capsys)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and err.startswith(said), (args, err)


def test_replacing_the_results_of_another_evaluation_is_said_before_the_work(capsys, tmp_path, monkeypatch):
    """A new user's probe (2026-12-07): eval knn --out over eval knn-seg's results file replaced it without a word;
    then it was said once they were gone (a review, 2026-12-07). It is said before the work, while a user can still
    stop it; replaced, not refused, as an earlier results file of mlsctl is (scripts rerun into one file)."""
    from conftest import cli, write_feature_folder

    from mlsctl.evaluate import linear

    names = [f"c{i}/{j}.png" for i in range(2) for j in range(4)]
    write_feature_folder(tmp_path / "a", names, torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))
    write_feature_folder(tmp_path / "b", names, torch.randn(8, 8, generator=torch.Generator().manual_seed(1)),
                         fingerprint="f" * 64)
    args = ["--train", str(tmp_path / "a"), "--val", str(tmp_path / "b"), "--out", str(tmp_path / "r.json")]
    code, _, err = cli("eval", "knn", *args, "--k", "1", capsys=capsys)
    assert code == 0 and "the results of" not in err, err
    code, _, err = cli("eval", "knn", *args, "--k", "2", capsys=capsys)  # the same evaluation again: no note
    assert code == 0 and "the results of" not in err, err
    said = (f"note: {tmp_path / 'r.json'} holds the results of eval knn; this eval linear replaces them when it is "
            f"done (give another --out to keep them)")

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    code, _, err = cli("eval", "linear", *args, "--lr", "-1", capsys=capsys)  # refused: nothing to say of r.json
    assert code == 2 and "the results of" not in err, err
    with monkeypatch.context() as patch:  # stopped in the work: said already, and the results are still there
        patch.setattr(linear, "evaluate_linear", stopped)
        code, _, err = cli("eval", "linear", *args, "--epochs", "1", capsys=capsys)
    assert code == 130 and said in err, err
    assert json.loads((tmp_path / "r.json").read_text())["command"] == "eval knn"
    code, _, err = cli("eval", "linear", *args, "--epochs", "1", "--lr", "0.1", "--wd", "0", capsys=capsys)
    assert code == 0 and said in err and "held the results" not in err, err  # said once
    assert json.loads((tmp_path / "r.json").read_text())["command"] == "eval linear"
    # a script writing through the library, which said nothing before: said once they are replaced, as before
    from mlsctl.evaluate.results import write_result

    notes = []
    write_result({"command": "eval recall"}, tmp_path / "r.json", "recall", say=notes.append)
    assert notes == [f"note: {tmp_path / 'r.json'} held the results of eval linear; replaced by these"]


def test_every_eval_writes_its_results_one_way(tmp_path):
    """The six eval commands each said the note and wrote the results by a pair of calls of their own; one function
    now: the note when it is made (before the work), none again when the results are written, the path returned.
    Seven writers: eval retrieval writes from its photo-folder form and from its --index form."""
    import inspect

    from mlsctl.cli import eval as eval_cli
    from mlsctl.evaluate.results import results_writer

    (tmp_path / "r.json").write_text(json.dumps({"command": "eval knn"}))
    notes = []
    write = results_writer(tmp_path / "r.json", "recall", say=notes.append)
    assert notes == [f"note: {tmp_path / 'r.json'} holds the results of eval knn; this eval recall replaces them when "
                     f"it is done (give another --out to keep them)"]
    assert write({"command": "eval recall", "recall": {}}) == tmp_path / "r.json" and len(notes) == 1
    assert json.loads((tmp_path / "r.json").read_text())["command"] == "eval recall"
    source = inspect.getsource(eval_cli)
    assert source.count("results_writer(out, ") == source.count("out = write(payload)") == 7
    assert "say_replacing" not in source and "write_result" not in source
    # with --json, stdout is the payload alone: where it went is said on stderr (a new user's probe, 2026-12-07)
    assert source.count("say, as_json)  # after the refusals") == 7
    write = results_writer(tmp_path / "s.json", "recall", say=notes.append, say_path=True)
    assert write({"command": "eval recall"}) == tmp_path / "s.json"
    assert notes[-1] == f"results written to {tmp_path / 's.json'}"


def test_eval_json_says_on_stderr_where_its_results_went(tmp_path, capsys):
    x = torch.eye(2, 4).repeat_interleave(3, 0)
    feats = write_feature_folder(tmp_path / "f", [f"c{i // 3}/{i}.png" for i in range(6)], x)
    code, out, err = cli("eval", "recall", str(feats), "--json", capsys=capsys)
    written = sorted(Path("results").glob("recall-*.json"))
    assert code == 0 and len(written) == 1 and json.loads(out)["recall"], err
    assert f"results written to {written[0]}" in err


def test_tables_line_up_wide_and_combining_characters():
    # a new user's probe (2026-12-07): search's table was out of line after an id in Japanese
    from mlsctl.cli._format import display_width, table

    assert display_width("日本") == 4 and display_width("e\u0301") == 1 and display_width("ev00007") == 7
    lines = table(["object", "cosine"], [["Ünïcode 日本", "0.9"], ["ev00007", "0.5"], ["e\u0301x", "0.1"]]).splitlines()
    assert {display_width(line) for line in lines} == {20}


def test_the_note_on_val_classes_unseen_in_training_counts_in_the_right_number():
    # a new user's probe (2026-12-07): "note: 1 val classes never occur in train"
    from mlsctl.cli.eval import _unseen_note

    assert _unseen_note(["Boots"], " (counted as errors)") == ("note: 1 val class never occurs in train (counted as "
                                                                "errors): Boots")
    assert _unseen_note(list("abcdef")) == "note: 6 val classes never occur in train: a, b, c, d, e"
