from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mlsctl import config, registry
from mlsctl.config import ConfigError

from conftest import REPO, cli, in_process, make_images, tiny_recipe, write_recipe


def error_of(data, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        config.from_dict(data, source="r.yaml", overrides=config.parse_overrides(list(overrides)))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_key_in_file_suggests_the_right_one():
    message = error_of({"optim": {"lrr": 1.0}})
    assert message.startswith("r.yaml: unknown key 'optim.lrr'")
    assert "did you mean 'optim.lr'?" in message


def test_unknown_key_from_override_names_the_override():
    message = error_of({}, ["optim.lrr=1"])
    assert message.startswith("command-line override 'optim.lrr=1': unknown key 'optim.lrr'")
    assert message.endswith("did you mean 'optim.lr'?")


def test_an_override_is_named_for_an_item_of_its_list_and_for_a_check_across_keys():
    # both were blamed on the recipe file: "r.yaml: 'train.log_with[0]' must be one of ..." and
    # "r.yaml: 'optim.warmup_epochs' must not exceed optim.epochs (2)" after optim.epochs=2 on the command line
    message = error_of({}, ["train.log_with=[tensorbord]"])
    assert message.startswith("command-line override 'train.log_with=[tensorbord]': 'train.log_with[0]' must be one of")
    message = error_of({"optim": {"warmup_epochs": 3}}, ["optim.epochs=2"])
    assert message.startswith("r.yaml with the command-line override 'optim.epochs=2': 'optim.warmup_epochs' must not "
                              "exceed optim.epochs (2)"), message
    message = error_of({"optim": {"warmup_epochs": 3, "epochs": 2}}, ["optim.lr=0.1"])
    assert message.startswith("r.yaml: 'optim.warmup_epochs' must not exceed"), message  # an override it does not name


def test_misplaced_key_is_found_in_another_section():
    message = error_of({"lr": 0.1})
    assert "did you mean 'optim.lr'?" in message


def test_wrong_type_and_range_and_choice():
    assert "'optim.lr' must be a number, got 'fast'" in error_of({"optim": {"lr": "fast"}})
    assert "'optim.batch_size' must be an integer, got 2.5" in error_of({"optim": {"batch_size": 2.5}})
    assert "'optim.lr' must be > 0.0, got -1.0" in error_of({"optim": {"lr": -1}})
    assert "'data.global_crops.scale[1]' must be <= 1.0" in error_of({"data": {"global_crops": {"scale": [0.2, 1.5]}}})
    choice = error_of({"train": {"precision": "bf61"}})
    assert "must be one of auto, fp32, bf16, fp16, fp16_or_bf16, got 'bf61'; did you mean 'bf16'?" in choice
    assert "'model.pretrained' must be true or false" in error_of({"model": {"pretrained": "yes please"}})
    assert "must be a list of 2 numbers" in error_of({"optim": {"betas": [0.9]}})


def test_a_single_value_where_a_list_belongs_is_shown_in_brackets():
    message = error_of({}, ["train.log_with=tensorboard"])
    assert message.startswith("command-line override 'train.log_with=tensorboard': 'train.log_with' must be a list "
                              "of items from tensorboard, wandb, mlflow, aim, got 'tensorboard'; write a list in "
                              "brackets: [tensorboard]"), message
    assert error_of({"data": {"global_crops": {"scale": 0.3}}}).endswith(
        "got 0.3; write its 2 values in brackets: [0.3, ...]")
    assert "brackets" not in error_of({"optim": {"betas": [0.9]}})  # a list of the wrong length: no hint


def test_partial_nested_section_keeps_the_enclosing_defaults():
    recipe = config.from_dict({"data": {"local_crops": {"count": 4}}})
    assert recipe.data.local_crops == config.CropConfig(4, 96, (0.05, 0.25))
    assert recipe.data.global_crops == config.CropConfig(2, 224, (0.25, 1.0))


def test_method_name_suggestion():
    assert "did you mean 'dino'?" in error_of({"method": {"name": "dinno"}})


def test_cross_field_checks():
    assert "'optim.min_lr' must not exceed optim.lr" in error_of({"optim": {"lr": 1e-4, "min_lr": 1e-3}})
    assert "low <= high" in error_of({"data": {"local_crops": {"scale": [0.5, 0.1]}}})


def test_timm_kwargs_of_the_wrong_type_are_named_before_timm_sees_them():
    """A new user's probe (2026-12-06): model.timm_kwargs.depth=abc reached timm, whose TypeError ("unsupported
    operand type(s) for +") came with a list of arguments the user never set and a hint about num_heads."""
    for kwargs, words in (({"depth": "abc"}, "'model.timm_kwargs.depth' must be an integer, got 'abc'"),
                          ({"embed_dim": True}, "'model.timm_kwargs.embed_dim' must be an integer"),
                          ({"mlp_ratio": "4x"}, "'model.timm_kwargs.mlp_ratio' must be a number"),
                          ({"qkv_bias": 1}, "'model.timm_kwargs.qkv_bias' must be true or false"),
                          ({"act_layer": 3}, "'model.timm_kwargs.act_layer' must be a name")):
        assert words in error_of({"model": {"timm_kwargs": kwargs}}), kwargs
    recipe = config.from_dict({"model": {"timm_kwargs": {"depth": 2, "mlp_ratio": 4, "init_values": None,
                                                         "qkv_bias": False, "global_pool": "avg"}}})
    assert recipe.model.timm_kwargs["mlp_ratio"] == 4
    # YAML 1.1 reads 1e-5 as text (a review, 2026-12-06): a number argument so written is the number
    recipe = config.from_dict({"model": {"timm_kwargs": {"init_values": "1e-5"}}},
                              overrides=config.parse_overrides(["model.timm_kwargs.drop_rate=1e-1"]))
    assert recipe.model.timm_kwargs == {"init_values": 1e-5, "drop_rate": 0.1}


def test_yaml_float_forms_and_overrides():
    recipe = config.from_dict({"optim": {"lr": "1e-4"}}, overrides=config.parse_overrides(
        ["optim.min_lr=1e-6", "data.root=/x", "method.out_dim=128", "model.timm_kwargs.depth=2"]))
    assert recipe.optim.lr == pytest.approx(1e-4)
    assert recipe.optim.min_lr == pytest.approx(1e-6)
    assert recipe.data.root == "/x"
    assert recipe.method.out_dim == 128
    assert recipe.model.timm_kwargs == {"depth": 2}


def test_a_run_folder_given_as_the_recipe_names_its_config(tmp_path):
    """A new user's probe (2026-12-06): `pretrain runs/x --resume` said only "is a folder; give a recipe"."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(ConfigError, match="a run's recipe is its config.yaml: give .*run/config.yaml .*--resume"):
        config.resolve_recipe_path(str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="is a folder; give a recipe YAML file"):
        config.resolve_recipe_path(str(tmp_path))


def test_a_key_of_another_method_names_that_method():
    """A new user's probe (2026-12-06): method.queue_size on a dino recipe said only "remove it"."""
    message = error_of({"method": {"name": "dino", "queue_size": 10}})
    assert "'queue_size' is a key of mls: remove it, or start from a recipe of mls (mls_" in message, message
    assert "did you mean 'method.out_dim'" in error_of({"method": {"name": "dino", "out_dimm": 10}})


def test_a_bad_item_given_without_brackets_is_told_the_list_it_meant():
    # a new user's probe (2026-12-07): told to write [tensorboardd], itself refused
    assert error_of({}, ["train.log_with=tensorboardd"]).endswith("did you mean [tensorboard]?")
    assert error_of({}, ["train.log_with=tensorboard,wandb"]).endswith("write a list in brackets: [tensorboard,wandb]")


def test_malformed_override():
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        config.parse_overrides(["optim.lr"])


def test_a_mapping_key_glued_to_its_value_says_yaml_needs_a_space():
    # a new user's probe (2026-12-07): {embed_dim:64} is YAML for the key 'embed_dim:64', and was said as "not an
    # architecture argument ... did you mean 'embed_dim'?"
    with pytest.raises(ConfigError, match=r"override 'model.timm_kwargs=\{embed_dim:64\}' gives the key 'embed_dim:64': "
                                          r"YAML needs a space after the colon, as in \{embed_dim: 64\}"):
        config.parse_overrides(["model.timm_kwargs={embed_dim:64}"])
    with pytest.raises(ConfigError, match="gives the key 'count:2'"):
        config.parse_overrides(["data={global_crops: {count:2}}"])
    assert config.parse_overrides(["model.timm_kwargs={embed_dim: 64}", "data.root=C:x", "x.y=http://a"])


def test_a_mapping_override_merges_into_its_section_and_a_key_given_twice_is_refused():
    """A new user's probe (2026-12-07): data.global_crops={count: 2} replaced the section, so its size and scale
    fell back to 224 and (0.25, 1.0) without a word; optim.lr given twice took the last without a word."""
    raw = {"data": {"global_crops": {"count": 2, "size": 32, "scale": [0.4, 1.0]}},
           "model": {"timm_kwargs": {"embed_dim": 32, "depth": 2}}}
    overrides = config.parse_overrides(["data.global_crops={count: 2}", "model.timm_kwargs={depth: 1, num_heads: 2}"])
    recipe = config.from_dict(raw, overrides=overrides)
    assert (recipe.data.global_crops.size, list(recipe.data.global_crops.scale)) == (32, [0.4, 1.0])
    # a free-form mapping is replaced (a review, 2026-12-07: merged, {} could no longer clear it), and the method
    # section given another method's name too (method={name: dino} switches methods)
    assert recipe.model.timm_kwargs == {"depth": 1, "num_heads": 2}
    cleared = config.from_dict(raw, overrides=config.parse_overrides(["model.timm_kwargs={}"]))
    assert cleared.model.timm_kwargs == {}
    switched = config.from_dict({"method": {"name": "mls", "queue_size": 64}},
                                overrides=config.parse_overrides(["method={name: dino}"]))
    assert switched.method.name == "dino"
    assert config.apply_overrides({"a": {"b": {"c": 1, "d": 2}}}, {"a": "a={b: {c: 3}}"}) == {"a": {"b": {"c": 3, "d": 2}}}
    assert config.apply_overrides({"a": 1}, {"a": "a={b: 2}"}) == {"a": {"b": 2}}  # a value that was no mapping: set
    # a key given twice: the last one counts, as scripts composing overrides rely on (a profile's, then a cell's),
    # and the commands say so
    assert config.parse_overrides(["data.workers=4", "data.workers=0"]) == {"data.workers": "data.workers=0"}
    assert config.repeated_overrides(["optim.lr=1e-3", "seed=1", "optim.lr=2e-3"]) == [
        "note: optim.lr is given 2 times (optim.lr=1e-3, optim.lr=2e-3); the last one, optim.lr=2e-3, counts"]
    result = in_process("pretrain", "dino_fmnist_quick", "optim.lr=1e-3", "optim.lr=2e-3", "data.root=/nonexistent",
                        "--out", "unused")
    assert "note: optim.lr is given 2 times" in result.stderr, result.stderr


def test_a_key_set_directly_and_through_a_mapping_is_said_and_the_last_counts():
    """A review (2026-12-07): data.global_crops.count=2 data.global_crops={count: 3} set one key twice without a
    word, where optim.lr=1e-3 optim.lr=2e-3 is said; and count=4 given after both lost to the mapping's 3, which
    was applied where its key was first given. Never refused: scripts compose overrides."""
    raw = {"data": {"global_crops": {"count": 2, "size": 32, "scale": [0.4, 1.0]}}}
    items = ["data.global_crops.count=2", "data.global_crops={count: 3}"]
    assert config.repeated_overrides(items) == [
        "note: data.global_crops.count is given 2 times (data.global_crops.count=2, data.global_crops={count: 3}); "
        "the last one, data.global_crops={count: 3}, counts"]
    assert config.from_dict(raw, overrides=config.parse_overrides(items)).data.global_crops.count == 3
    items.append("data.global_crops.count=4")
    assert config.repeated_overrides(items)[0].endswith("the last one, data.global_crops.count=4, counts")
    assert config.from_dict(raw, overrides=config.parse_overrides(items)).data.global_crops.count == 4
    assert config.repeated_overrides(["data={global_crops: {size: 48}}", "data.global_crops.size=64"]) == [
        "note: data.global_crops.size is given 2 times (data={global_crops: {size: 48}}, data.global_crops.size=64); "
        "the last one, data.global_crops.size=64, counts"]
    # a key a later mapping replaces with its section (a free-form one is replaced, not merged) is lost: said
    assert config.repeated_overrides(["model.timm_kwargs.depth=2", "model.timm_kwargs={}"]) == [
        "note: model.timm_kwargs.depth is given 2 times (model.timm_kwargs.depth=2, model.timm_kwargs={}); "
        "the last one, model.timm_kwargs={}, counts"]
    # what composes without loss is not a repeat: other keys of one section, a key set after its section is cleared
    for quiet in (["data.global_crops={count: 3}", "data.global_crops.size=48"],
                  ["model.timm_kwargs={}", "model.timm_kwargs.depth=2"],
                  ["model.timm_kwargs={depth: 1}", "model.timm_kwargs.num_heads=2"]):
        assert config.repeated_overrides(quiet) == [], quiet
    # the method section: a mapping naming the recipe's own method merges (nothing lost, nothing said), one
    # naming another replaces the section (a review, 2026-12-07: both were said, the first wrongly)
    same = ["method.set_length=7", "method={name: mile}"]
    assert config.repeated_overrides(same, method_name="mile") == []
    assert config.repeated_overrides(same, method_name="dino") == [
        "note: method.set_length is given 2 times (method.set_length=7, method={name: mile}); "
        "the last one, method={name: mile}, counts"]
    # ... and the name the overrides have switched to by then
    notes = config.repeated_overrides(["method.name=mile", "method.set_length=7", "method={name: mile}"],
                                      method_name="dino")
    assert not any("set_length" in note for note in notes) and any("method.name is given 2 times" in n for n in notes)


def test_pretrain_and_refine_train_read_their_recipe_once(tmp_path, monkeypatch, capsys):
    """pretrain read its recipe file twice (its method for the repeated-override notes, then the recipe), refine
    train three times: one read now, passed along, with the same notes and the same recipe; a run's own
    config.yaml too, which keeps the values its run was trained with (SAVED_DEFAULTS), its file untouched."""
    from mlsctl import train

    from conftest import cli

    reads, started, real = [], [], config.read_yaml
    monkeypatch.setattr(config, "read_yaml", lambda path: reads.append(Path(path).name) or real(path))
    monkeypatch.setattr(train, "pretrain", lambda recipe, out, **options: started.append(recipe))
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(tmp_path / "images"))
    code, _, err = cli("pretrain", str(recipe), "seed=1", "seed=2", "--out", str(tmp_path / "run"), capsys=capsys)
    assert code == 0 and "note: seed is given 2 times (seed=1, seed=2); the last one, seed=2, counts" in err, err
    assert started[-1].seed == 2 and reads == ["tiny.yaml"], reads
    reads.clear()
    code, _, err = cli("refine", "train", str(tmp_path), "method.neighbours=2", "method.neighbours=3",
                       "--out", str(tmp_path / "refine"), capsys=capsys)
    assert code == 0 and "note: method.neighbours is given 2 times" in err, err
    assert started[-1].method.neighbours == 3 and reads == ["refine.yaml"], reads
    run = tmp_path / "old-run"  # a refine run's config.yaml that predates input_scale
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    saved = yaml.safe_load(config.dump_recipe(started[-1]))
    del saved["method"]["input_scale"]
    written = write_recipe(run / "config.yaml", saved).read_text()
    reads.clear()
    code, _, err = cli("pretrain", str(run / "config.yaml"), "--out", str(tmp_path / "again"), capsys=capsys)
    assert code == 0 and reads == ["config.yaml"] and (run / "config.yaml").read_text() == written, (err, reads)
    assert started[-1].method.input_scale == "sqrt_d"  # the value it was trained with, not today's default


def test_newer_format_is_refused():
    assert "newer than this mlsctl reads" in error_of({"format_version": 99})


def test_round_trip_is_exact(tmp_path: Path, images: Path):
    recipe = config.from_dict(tiny_recipe(images))
    config.save_recipe(recipe, tmp_path / "config.yaml")
    again = config.load_recipe(str(tmp_path / "config.yaml"))
    assert again == recipe
    assert config.differences(recipe, again) == []


def test_invalid_yaml_is_one_sentence(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML at line \d+"):
        config.load_recipe(str(path))


def test_missing_recipe_suggests_shipped_one():
    with pytest.raises(ConfigError, match="did you mean 'dino_fmnist_quick'"):
        config.resolve_recipe_path("dino_fmnist_quik")


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path: Path):
    recipe = config.load_recipe(str(path))
    assert recipe.description, "every recipe needs a one-line description"
    assert "\n" not in recipe.description


_READ_EVERY_RECIPE = """
import json, sys
from pathlib import Path
from mlsctl import config, registry
from mlsctl.runs import Run

root, run = sys.argv[1], Path(sys.argv[2])
for path in sorted(Path(sys.argv[3]).glob("*.yaml")):
    recipe = config.load_recipe(str(path), [f"data.root={root}"])
    run.mkdir(exist_ok=True)
    config.save_recipe(recipe, run / "config.yaml")
    assert Run(run).is_run(), path
for name in registry.names():
    registry.config_class(name)()
print(json.dumps(sorted(sys.modules)))
"""


def test_reading_a_recipe_imports_no_method_and_no_torch(tmp_path: Path):
    """Typing a recipe's method section (every shipped recipe, and a run's config.yaml through
    Run.is_run) loads its config class from mlsctl.registry, never the method's stack."""
    import json
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _READ_EVERY_RECIPE, str(tmp_path), str(tmp_path / "run"),
                             str(REPO / "recipes")], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert [m for m in loaded if m == "torch" or m.startswith("torch.")] == []
    heavy = [m for m in loaded if m.startswith("mlsctl.methods.") and not m.endswith((".config", "base_config"))
             and m.count(".") > 2]
    assert heavy == [] and "mlsctl.methods.base" not in loaded
    assert all(f"mlsctl.methods.{name}.config" in loaded for name in ("dino", "cribo", "mile", "sove", "mls", "ms", "refine"))


def test_cli_reports_unknown_key_with_exit_code_2(tmp_path: Path):
    result = in_process("pretrain", str(REPO / "recipes" / "dino_fmnist_quick.yaml"), "optim.lrr=1", "--out",
                        str(tmp_path / "x"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "did you mean 'optim.lr'?" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_cli_recipe_validation_error_names_file(tmp_path: Path, images: Path):
    recipe = tiny_recipe(images)
    recipe["optim"]["epochs"] = "many"
    path = write_recipe(tmp_path / "r.yaml", recipe)
    result = in_process("pretrain", str(path), "--out", str(tmp_path / "x"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {path}: 'optim.epochs' must be an integer, got 'many'"


def test_missing_data_root_is_a_clear_error(tmp_path: Path):
    data = yaml.safe_load((REPO / "recipes" / "dino_in1k.yaml").read_text())
    path = write_recipe(tmp_path / "r.yaml", data)
    result = in_process("pretrain", str(path), "--out", str(tmp_path / "x"))
    assert result.returncode == 2
    assert "data.root is not set; add data.root=" in result.stderr


def test_an_unknown_method_name_is_one_sentence_from_the_registry():
    """An API probe (2026-12-05): registry.config_class('dinoo') and method_class raised a bare KeyError."""
    from mlsctl.errors import UserError

    for lookup in (registry.config_class, registry.method_class):
        with pytest.raises(UserError, match=r"no method is named 'dinoo'; the methods are dino, cribo, .* \(did you mean "
                                            r"dino\?\)"):
            lookup("dinoo")


def test_a_key_given_twice_and_an_empty_path_are_refused(tmp_path):
    """A new-user probe (2026-12-05): a second `optim:` section silently replaced the first (its epochs: 1 lost),
    and `data.root=` (empty) trained on the current folder, the run inside it."""
    from mlsctl.config import ConfigError

    (tmp_path / "dup.yaml").write_text("optim: {epochs: 1}\nseed: 3\noptim: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"dup.yaml line 3: the key 'optim' is given again \(first at line 1\)"):
        config.load_recipe(str(tmp_path / "dup.yaml"))
    (tmp_path / "inner.yaml").write_text("optim:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match="line 3: the key 'lr' is given again"):
        config.load_recipe(str(tmp_path / "inner.yaml"))
    for override in ("data.root=", "data.root=  ", "model.weights="):
        with pytest.raises(ConfigError, match="is empty; give a path, or null to leave it unset"):
            config.load_recipe("dino_fmnist_quick", [override])
    assert config.load_recipe("dino_fmnist_quick", ["data.root=null"]).data.root is None


def test_a_short_list_refused_is_shown_as_written():
    """A new-user probe (2026-12-05): 'must be a list of 2 numbers, got a list'."""
    from mlsctl.config import ConfigError

    with pytest.raises(ConfigError, match=r"must be a list of 2 numbers, got \[0.4\]"):
        config.load_recipe("dino_fmnist_quick", ["data.global_crops.scale=[0.4]"])


def test_a_recipe_without_a_method_section_has_the_default_methods_keys(tmp_path):
    """A new-user probe (2026-12-05): recipes --show of a recipe without `method:` listed 66 keys, none of DINO's
    13, although it trains DINO with them."""
    from mlsctl.methods.dino.config import DINOConfig

    (tmp_path / "r.yaml").write_text("data: {root: /tmp}\n")
    recipe = config.load_recipe(str(tmp_path / "r.yaml"))
    assert recipe.method == DINOConfig()
    assert "method.out_dim" in {row["key"] for row in config.recipe_keys(recipe)}


def test_another_method_by_override_names_the_recipes_to_start_from():
    """A new user's run-through (2026-12-06): "unknown key 'method.monitor_bank_size' ...; remove it", a key of
    the shipped recipe that no override can remove."""
    with pytest.raises(config.ConfigError) as refused:
        config.load_recipe("dino_fmnist_quick", ["method.name=cribo"])
    message = str(refused.value)
    assert message.startswith("command-line override 'method.name=cribo'") and "cribo_fmnist_quick" in message
    assert "'method.monitor_bank_size' is not a key of cribo" in message and "remove it" not in message


@pytest.mark.parametrize("words", [["data.root", "=", "x"], ["data.root", "=x"], ["data.root=", "x"]])
def test_an_override_with_spaces_around_the_equals_sign_is_told_so(words):
    """A new user's run-through (2026-12-06): `data.root = x` was told to "look like key.sub=value"."""
    with pytest.raises(config.ConfigError, match="has spaces around '=': write it as one word, data.root=VALUE"):
        config.parse_overrides(["optim.lr=1e-4", *words])


def test_a_step_count_key_is_pointed_to_optim_epochs():
    with pytest.raises(config.ConfigError, match="unknown key 'train.steps'.*a run's length is optim.epochs"):
        config.load_recipe("dino_fmnist_quick", ["train.steps=20"])


def test_those_hints_stay_out_of_the_way_of_other_mistakes():
    """A review (2026-12-06): the step-count hint hid cribo's "did you mean method.cluster_iterations"; the
    other-method message answered a misspelt key when method.name named the recipe's own method; the spaces
    message quoted the next override too."""
    with pytest.raises(config.ConfigError, match="did you mean 'method.cluster_iterations'") as refused:
        config.load_recipe("cribo_fmnist_quick", ["method.iterations=3"])
    assert "optim.epochs" not in str(refused.value)
    with pytest.raises(config.ConfigError, match="unknown key 'method.bogus'.*remove it"):
        config.load_recipe("dino_fmnist_quick", ["method.name=dino", "method.bogus=1"])
    with pytest.raises(config.ConfigError, match=r"^override 'optim.lr= 5' has spaces"):
        config.parse_overrides(["optim.lr=", "5", "seed=1"])
    with pytest.raises(config.ConfigError, match="override '=' begins with '=' and follows no key of its own"):
        config.parse_overrides(["seed=1", "=", "optim.lr=1"])


def test_a_step_count_under_optim_is_not_taken_for_accumulation():
    """A second review (2026-12-06): optim.num_steps=5 was answered "did you mean 'optim.accumulate_steps'?"."""
    with pytest.raises(config.ConfigError, match="a run's length is optim.epochs") as refused:
        config.load_recipe("dino_fmnist_quick", ["optim.num_steps=5"])
    assert "accumulate_steps'?" not in str(refused.value)
    with pytest.raises(config.ConfigError, match="override 'data.root= = x' has spaces around '='"):
        config.parse_overrides(["data.root=", "=", "x"])


def test_a_run_is_told_one_way_from_its_folder_or_its_config_file(tmp_path):
    """Run.has_config (looks like a run), Run.is_run (its recipe reads) and runs.run_of_config (a path is a
    run's own recipe, beside its metrics) — one module says what a run is (a code-health review)."""
    from mlsctl.runs import Run, run_of_config

    recipe = config.load_recipe("dino_fmnist_quick", [f"data.root={tmp_path}"])
    run = tmp_path / "run"
    run.mkdir()
    assert not Run(run).has_config() and not Run(run).is_run()
    (run / "config.yaml").write_text("not: [a recipe\n")
    assert Run(run).has_config() and not Run(run).is_run()
    config.save_recipe(recipe, run / "config.yaml")
    assert Run(run).is_run() and run_of_config(run / "config.yaml") is None  # a user's config.yaml: a recipe
    assert not config.is_run_recipe(run / "config.yaml")
    (run / "metrics.jsonl").write_text("")
    assert run_of_config(run / "config.yaml").root == run and config.is_run_recipe(run / "config.yaml")
    assert run_of_config(run / "metrics.jsonl") is None


def test_pretrain_says_a_repeated_key_and_not_a_mapping_of_its_own_method(tmp_path, capsys):
    from conftest import REPO, cli

    recipe = str(REPO / "recipes" / "mile_fmnist_quick.yaml")
    code, _, err = cli("pretrain", recipe, "optim.lr=1e-3", "optim.lr=2e-3", "method.set_length=7",
                       "method={name: mile}", f"data.root={tmp_path / 'none'}", "--out", str(tmp_path / "run"),
                       capsys=capsys)
    assert code == 2 and "does not exist" in err  # the notes come first
    assert "note: optim.lr is given 2 times (optim.lr=1e-3, optim.lr=2e-3); the last one, optim.lr=2e-3, counts" in err
    assert "set_length" not in err  # the recipe's own method: merged, nothing lost


def test_a_relative_path_found_beside_the_recipe_but_not_here_names_both_folders(tmp_path, capsys):
    """A new user's probe (2026-12-07): ``data.root: inshop/img`` in a recipe beside inshop/, run from another
    folder, was "/tmp/inshop/img does not exist; check the path"."""
    make_images(tmp_path / "exp" / "imgs", 4)
    recipe = write_recipe(tmp_path / "exp" / "r.yaml", tiny_recipe(Path("imgs")))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code, _, err = cli("pretrain", str(recipe), "--out", str(tmp_path / "run"), cwd=elsewhere, capsys=capsys)
    assert code == 2 and (f"{recipe}: data.root imgs does not exist in the current folder {elsewhere}, which relative "
                          f"paths are read from; {tmp_path / 'exp' / 'imgs'} exists beside the recipe: run from "
                          f"{tmp_path / 'exp'} or give an absolute path") in err, err
    assert not (tmp_path / "run").exists()
    # typed on the command line, the path is the shell's: the folder's own sentence, with the rule
    code, _, err = cli("pretrain", str(recipe), "data.root=imgs", "--out", str(tmp_path / "run"), cwd=elsewhere,
                       capsys=capsys)
    assert code == 2 and (f"data.root {elsewhere / 'imgs'} does not exist; check the path (relative paths are read "
                          f"from the current folder, {elsewhere})") in err, err
    assert [key for key, _ in config.path_values(config.load_recipe(str(recipe)))] == ["data.root"]
    # a path of a mapping typed on the command line is the shell's too (a review: data={root: imgs} was blamed on
    # the recipe); a relative folder given to embed is said to be read from the current folder
    code, _, err = cli("pretrain", str(recipe), "data={root: imgs}", "--out", str(tmp_path / "run"), cwd=elsewhere,
                       capsys=capsys)
    assert code == 2 and f"data.root {elsewhere / 'imgs'} does not exist; check the path (relative" in err, err
    code, _, err = cli("embed", "imgs", "--random-init", "--out", str(tmp_path / "f"), cwd=elsewhere, capsys=capsys)
    assert code == 2 and f"(relative paths are read from the current folder, {elsewhere})" in err, err
