"""Runs made before the restore/registry refactor still load (issue 26).

tests/data/runs-c1cc6ba/<method>/ holds one tiny run of every method, trained for 2 steps with the
code of commit c1cc6ba by tests/data/make_old_runs.py and pruned to what loading reads (config,
summary, teacher, the last checkpoint without optimizer.pt and rng.pt). With today's code:

* :func:`mlsctl.restore.method_from_checkpoint` builds the method and loads the checkpoint strictly,
  and the method's state dict holds exactly the checkpoint's tensors (a renamed or dropped key fails);
* with a backbone, the teacher read back three ways (``mlsctl.load_backbone`` of the run, the run's
  ``teacher.safetensors`` via :func:`mlsctl.restore.from_run`, the checkpoint's teacher via
  :func:`mlsctl.restore.from_checkpoint`) gives the old code's output on a fixed input
  (``expected.safetensors``);
* refine (no backbone): its refiner, read by ``mlsctl refine apply``'s
  :func:`mlsctl.refine.apply.load_refiner` and as the restored method's, gives the old output on fixed
  features (building the method reads the width off ``data.root``, as it did before: a stand-in
  feature folder is written for it);
* the checkpoint's banks load (:func:`mlsctl.bank.load_banks`) under the names the method declares.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlsctl import registry

RUNS = Path(__file__).resolve().parent / "data" / "runs-c1cc6ba"
METHODS = ["dino", "cribo", "mile", "sove", "mls", "ms", "refine"]


def fixed_input() -> torch.Tensor:  # as make_old_runs.fixed_input
    torch.manual_seed(0)
    return torch.randn(2, 3, 32, 32)


def test_every_method_of_the_refactor_has_an_old_run():
    """The seven methods that existed at c1cc6ba each have a run here; a method registered later has
    no run from before the refactor and needs none."""
    assert set(METHODS) <= set(registry.names())
    assert sorted(p.name for p in RUNS.iterdir() if p.is_dir()) == sorted(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_old_run_loads(name, tmp_path):
    from safetensors.torch import load_file

    import mlsctl
    from mlsctl import methods
    from mlsctl.bank import load_banks
    from mlsctl.models import lora
    from mlsctl.restore import from_checkpoint, from_run, method_from_checkpoint
    from mlsctl.runs import Run

    run = Run(RUNS / name)
    recipe = None
    if name == "refine":  # Refine reads its width off data.root when built (as before c1cc6ba): a stand-in folder
        import dataclasses

        from mlsctl.restore import recipe_of

        from conftest import write_feature_folder

        feats = write_feature_folder(tmp_path / "feats", [f"class0/{i}.png" for i in range(4)], torch.randn(4, 16))
        recipe = recipe_of(run)
        recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, root=str(feats)))
    recipe, method, checkpoint = method_from_checkpoint(run.root, recipe=recipe)
    assert recipe.method.name == name and checkpoint.step == 2
    saved = load_file(str(checkpoint.model_path))
    state = method.state_dict()
    assert sorted(state) == sorted(saved), "the method's state-dict keys are not those of the old checkpoint"
    different = [k for k in saved if not torch.equal(state[k], saved[k])]
    assert not different, different[:5]

    bank_names = set(method.banks())
    if checkpoint.banks_path.is_file():
        assert set(load_banks(checkpoint.banks_path)) == bank_names
    else:
        assert not bank_names

    has_backbone = methods.method_class(name).has_backbone
    expected = load_file(str(run.root / "expected.safetensors"))["output"]
    if not has_backbone:  # refine: its refiner as `mlsctl refine apply` reads it (no data needed)
        from mlsctl.refine.apply import load_refiner

        torch.manual_seed(0)  # as make_old_runs.refine_input
        x, neighbours = torch.randn(2, 16), torch.randn(2, 4, 16)
        with torch.no_grad():
            for how, refiner in {"load_refiner": load_refiner(run.root).refiner, "method": method.refiner.eval()}.items():
                torch.testing.assert_close(refiner(x, neighbours), expected, rtol=0, atol=1e-6, msg=how)
        return
    x = fixed_input()
    with torch.no_grad():
        outputs = {
            "load_backbone": mlsctl.load_backbone(run.root)(x),
            "from_run": lora.merged_vit(from_run(run.root).backbone.model).eval()(x),
            "from_checkpoint": lora.merged_vit(from_checkpoint(recipe, checkpoint, run).backbone.model).eval()(x),
        }
    for how, output in outputs.items():
        assert output.shape == expected.shape, how
        torch.testing.assert_close(output, expected, rtol=0, atol=1e-6, msg=how)
