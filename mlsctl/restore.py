"""Reading a run back: the one place where a run folder, a checkpoint or ``--init-from`` becomes a
recipe, a method and weights, and where "is this a run" is decided.

* :func:`open_run` — a folder that must be a run (it has a ``config.yaml``), else the one
  "not a run folder" sentence, ended with what the command wants instead;
* :func:`recipe_of` — the run's resolved recipe;
* :func:`load_method` / :func:`method_from_checkpoint` — the run's method with a checkpoint's
  weights (every tensor, strictly; the recipe's own starting weights are not read);
* :func:`initial_weights` — ``--init-from`` (a run, a checkpoint folder or a weights file) loaded
  into a built method; the training loop and :func:`from_run_start` both use it;
* the model choices of a run that every embedding command resolves (:func:`choose_model`,
  :func:`from_run`, :func:`from_checkpoint` — a checkpoint's teacher —, :func:`from_run_start`);
  choices that need no method (a weights file, DINOv2) stay in :mod:`mlsctl.models.source`.

Layer: above :mod:`mlsctl.methods` (it builds methods), below the commands and the modules that
serve them (gallery, export, report, bank inspection, refinement, evaluation).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional, Union

import torch

from mlsctl.errors import UnreadableWeights, UserError
from mlsctl.models.source import ModelChoice, dinov2_small, from_weights, model_choice
from mlsctl.runs import RUNS_ROOT, Checkpoint, Run, open_run, run_of_model

def training_images(run: Run) -> Optional[Path]:
    """The folder of images ``run`` trains on (its recipe's data.root), None where its config cannot
    be read or names none: what a picture must not be drawn into
    (:func:`mlsctl.outputs.check_outside_images`)."""
    try:
        root = recipe_of(run).data.root
    except UserError:
        return None
    return Path(root) if root else None


def recipe_of(run: Run):
    """The run's resolved recipe (``RUN/config.yaml``)."""
    from mlsctl import config as config_lib

    return config_lib.load_run_recipe(run.config_path)


def build_method(recipe):
    """The method of ``recipe``, built as the training loop builds it (one step an epoch)."""
    from mlsctl import methods
    from mlsctl.schedules import Schedule

    return methods.method_class(recipe.method.name)(recipe, Schedule(steps_per_epoch=1, epochs=recipe.optim.epochs))


def load_method(recipe, model_path: Union[str, Path]):
    """The method of ``recipe`` with the weights of a checkpoint's ``model.safetensors`` (every
    tensor, strictly), built without the random initialisation they replace
    (:func:`mlsctl.models.weights.built_with`); ``recipe``'s own starting weights are not read."""
    from mlsctl.models.weights import built_with

    recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, weights=None, pretrained=False))
    return built_with(lambda: build_method(recipe), read_checkpoint_weights(model_path))


def read_checkpoint_weights(model_path: Union[str, Path]) -> dict:
    """A checkpoint's ``model.safetensors``; a missing or damaged file is one sentence that says to
    delete the checkpoint (the one before it is then used), an unreadable one (permissions, I/O) one
    that names the cause only."""
    from safetensors.torch import load_file

    from mlsctl.errors import describe_environment_error, first_line

    if Path(model_path).is_file() and not os.access(model_path, os.R_OK):  # safetensors calls this "no such file"
        raise UserError(f"cannot read {model_path}: permission denied (it belongs to {Path(model_path).owner()}, mode "
                        f"{Path(model_path).stat().st_mode & 0o777:o}); ask for read access", exit_code=1)
    try:
        return load_file(str(model_path))
    except FileNotFoundError as exc:
        problem = first_line(exc)
    except OSError as exc:  # the file is there but this process cannot read it: nothing to delete
        raise UserError(describe_environment_error(exc) or f"{model_path} cannot be read ({first_line(exc)})",
                        exit_code=1) from None
    except Exception as exc:  # truncated or foreign: safetensors' own error
        problem = first_line(exc)
    # the others first: --step reads one and deletes nothing (a probe, 2026-12-07: export --step 12 of a damaged
    # checkpoint was told only to delete it)
    folder = Path(model_path).parent
    others = (Run(folder.parent.parent).other_checkpoint_steps(folder, Path(model_path).name)
              if Checkpoint.is_folder_name(folder.name) else [])
    another = (f"read another checkpoint with --step ({', '.join(map(str, others[-3:]))}) where the command takes it, "
               f"or " if others else "")
    raise UserError(f"{model_path} cannot be read ({problem}); {another}delete {folder} to use the checkpoint before "
                    f"it", exit_code=1)


def method_from_checkpoint(source: Union[Run, Checkpoint, str, Path], step: Optional[int] = None, *, recipe=None):
    """``(recipe, method, checkpoint)`` of a run (its checkpoint at ``step``, default the latest) or
    of a checkpoint folder (its run's recipe, unless ``recipe`` is given)."""
    if isinstance(source, Checkpoint):
        checkpoint = source
        run = Run(checkpoint.path.parent.parent)
    else:
        run = source if isinstance(source, Run) else open_run(source)
        checkpoint = run.checkpoint(step)
    recipe = recipe if recipe is not None else recipe_of(run)
    return recipe, load_method(recipe, checkpoint.model_path), checkpoint


def initial_weights(method, source: str) -> str:
    """``--init-from``: a run, a checkpoint folder, or a weights file, loaded into ``method``.
    Returns what was loaded."""
    from mlsctl.models.weights import backbone_state, load_into_vit, read_state_dict

    path = Path(source)
    if not path.exists():  # "give a local .safetensors or .pth file" left out the folders it takes (a new user)
        raise UserError(f"--init-from {source} does not exist; give a run folder, a checkpoint folder "
                        f"(RUN/checkpoints/step-NNNNNNNN) or a .safetensors or .pth weights file")
    if path.is_dir():
        if (path / "checkpoints").is_dir() and Run(path).checkpoints():
            checkpoint = Run(path).checkpoint()
        elif Checkpoint.is_folder_name(path.name):
            checkpoint = Checkpoint(path)
        else:  # a run without checkpoints (its teacher remains), an export folder, anything else
            weights = [path / name for name in ("teacher.safetensors", "model.safetensors") if (path / name).is_file()]
            if not weights:
                raise UserError(f"--init-from {source} is neither a run with a checkpoint, a checkpoint folder "
                                f"(step-NNNNNNNN), nor a folder with teacher.safetensors or model.safetensors; give one "
                                f"of those or a weights file")
            return initial_weights(method, str(weights[0]))
        if not checkpoint.model_path.is_file():
            raise UserError(f"--init-from {source} holds no model.safetensors; give a run, a checkpoint folder or a weights file")
        saved = read_checkpoint_weights(checkpoint.model_path)
        own = method.state_dict()
        if set(saved) == set(own) and all(saved[k].shape == own[k].shape for k in own):
            method.load_state_dict(saved, strict=True)
            return f"all weights of {checkpoint.path}"
        if not method.backbones():  # a method on features: its own weights or nothing
            name, other = method.recipe.method.name, _checkpoint_recipe(checkpoint)
            if other is not None and other.method.name != name:  # a new user's probe, 2026-12-06: "another shape"
                raise UserError(f"--init-from {source} is a run of {other.method.name}; a {name} run starts from the "
                                f"weights of another {name} run")
            differ = sorted(set(saved) ^ set(own)) or [k for k in own if saved[k].shape != own[k].shape]
            raise UserError(f"--init-from {source} holds weights of another shape than this "
                            f"{name} run's ({', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''}); "
                            f"start from a run with the same settings")
        state = _teacher_backbone_state(checkpoint, saved)
    else:
        state = backbone_state(read_state_dict(path), keep_head=True)
        if not method.backbones():
            raise UserError(f"--init-from {source} is a weights file, but a {method.recipe.method.name} run has no "
                            f"backbone to load it into; give a run of the same method (or one of its checkpoints)")
    fresh_heads = False
    for backbone in method.backbones():
        wanted, fresh = _with_own_head(backbone.net, state)
        fresh_heads |= fresh
        load_into_vit(backbone.net, wanted, str(source))
    return f"every backbone from {source}" + (" (the embedding layer of model.embedding_dim freshly initialised: the "
                                                "source has none of its shape)" if fresh_heads else "")


def _teacher_backbone_state(checkpoint: Checkpoint, saved: dict) -> dict:
    """The teacher backbone of a checkpoint of another method or settings, in timm's layout: taken
    from that method itself, built from the recipe the checkpoint was trained with (each method keeps
    its teacher under names of its own: MLS's, the query encoder it releases, is ``query.backbone``; a
    LoRA run's adapters are merged, as in its export), or, where no recipe of it can be read, from the
    layout of its keys."""
    from mlsctl.models.weights import backbone_state, built_with

    recipe = _checkpoint_recipe(checkpoint)
    if recipe is None:
        return backbone_state(saved, keep_head=True)
    recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, weights=None, pretrained=False))
    try:
        method = built_with(lambda: build_method(recipe), saved)
    except RuntimeError:  # a recipe edited since the checkpoint was written: its keys' layout is all there is
        return backbone_state(saved, keep_head=True)
    from mlsctl.models import lora

    vit = lora.merged_vit(method.teacher_backbone().model)  # a LoRA run's adapters merged, as its export has them
    return {name: value.detach() for name, value in vit.state_dict().items()}


def _checkpoint_recipe(checkpoint: Checkpoint):
    """The recipe a checkpoint was trained with (its recipe.yaml, else its run's config.yaml), or None
    where neither can be read."""
    from mlsctl import config as config_lib

    recipe_file = checkpoint.recipe_path if checkpoint.recipe_path.is_file() else \
        Run(checkpoint.path.parent.parent).config_path
    try:
        return config_lib.load_run_recipe(recipe_file)
    except (UserError, OSError):
        return None


def _with_own_head(vit, state: dict) -> tuple[dict, bool]:
    """``state`` for ``vit`` as far as timm's embedding layer (``head``, model.embedding_dim) goes: the
    source's when it has one of the same shape, else ``vit``'s own, freshly initialised (a
    self-supervised backbone has none, an ``ms`` run's is of its width); a ViT without one takes
    none. Returns (state, whether the head stays fresh)."""
    heads = ("head.weight", "head.bias")
    own = {k: v for k, v in vit.state_dict().items() if k in heads}
    wanted = {k: v for k, v in state.items() if k not in heads}
    if not own:
        return wanted, False
    if all(k in state and state[k].shape == v.shape for k, v in own.items()):
        return {**wanted, **{k: state[k] for k in own}}, False
    return {**wanted, **own}, True


# ---------------------------------------------------------------------------- model choices of a run
def method_name_of(run: Run) -> Optional[str]:
    """``method.name`` of a run's config.yaml, read without building the recipe; None when unreadable."""
    from mlsctl.config import read_yaml

    try:
        name = read_yaml(run.config_path)["method"]["name"]
    except Exception:  # noqa: BLE001 - any unreadable recipe is "not a run of that method" here
        return None
    return name if isinstance(name, str) else None


def newest_run(root: Union[str, Path] = RUNS_ROOT, method: Optional[str] = None,
               with_backbone: bool = False) -> Optional[Run]:
    """The run under ``root`` whose teacher export or latest checkpoint is the most recent; with
    ``method``, among the runs of that method only (a gallery needs a MILE run); ``with_backbone``:
    among the runs of methods that train one (not refinement, which trains on features)."""
    from mlsctl import methods

    root = Path(root)
    if not root.is_dir():
        return None
    best, best_time = None, -1.0
    for path in root.iterdir():
        run = Run(path)
        if not run.has_config():
            continue
        name = method_name_of(run) if method is not None or with_backbone else None
        if method is not None and name != method:
            continue
        if with_backbone and (name not in methods.names() or not methods.method_class(name).has_backbone):
            continue
        stamps = [p.stat().st_mtime for p in (run.teacher_weights_path,) if p.is_file()]
        latest = run.latest()
        if latest is not None:
            stamps.append(latest.state_path.stat().st_mtime)
        if stamps and max(stamps) > best_time:
            best, best_time = run, max(stamps)
    return best


def from_run(run_dir: Union[str, Path], *, random_init: bool = False, seed: int = 0) -> ModelChoice:
    """``--run RUN``: the run's exported teacher; while it has none, its latest checkpoint's teacher;
    ``random_init``: the run's architecture, freshly initialised with ``seed``."""
    from mlsctl.models.backbone import build_backbone

    run = open_run(run_dir, flag="--run")
    recipe = recipe_of(run)
    model_cfg = recipe.model
    if random_init:
        torch.manual_seed(seed)
        plain = dataclasses.replace(model_cfg, lora=dataclasses.replace(model_cfg.lora, enabled=False))
        backbone = build_backbone(plain, drop_path_rate=0.0, load_weights=False)
        choice = model_choice(backbone, f"randomly initialised {backbone.name} (architecture of run {run.root}, seed {seed})",
                              "random-init", str(run.root), model_cfg.img_size)
        choice.info["seed"] = seed
        return choice
    if run.teacher_weights_path.is_file():
        plain = dataclasses.replace(model_cfg, weights=str(run.teacher_weights_path), pretrained=False,
                                    lora=dataclasses.replace(model_cfg.lora, enabled=False))
        try:
            backbone = build_backbone(plain, drop_path_rate=0.0, skip_init=True)
        except UnreadableWeights as exc:  # the checkpoint it was written from is the way round (a probe, 2026-12-07)
            if Path(exc.path) != run.teacher_weights_path or run.latest() is None:  # nothing to read instead
                raise
            raise UserError(f"cannot read weights from {exc.path} ({exc.reason}): {run.teacher_weights_path.name} is "
                            f"the final teacher, copied from the last checkpoint when training ended; move it out of "
                            f"the run and its latest checkpoint's teacher is read instead", exc.exit_code) from None
        return model_choice(backbone, f"teacher of run {run.root} ({run.teacher_weights_path.name})", "run",
                            str(run.teacher_weights_path), model_cfg.img_size)
    checkpoint = run.latest()
    if checkpoint is None:
        raise UserError(f"run {run.root} has neither teacher.safetensors nor a checkpoint: it has not written its "
                        f"first checkpoint yet, or it is no training run; wait for that checkpoint or give another run")
    choice = from_checkpoint(recipe, checkpoint, run)
    choice.description += " (no final export yet)"
    return choice


def from_checkpoint(recipe, checkpoint: Checkpoint, run: Run) -> ModelChoice:
    """The teacher of a checkpoint, taken from the method itself (so any method's layout works),
    with the query projections its banks name."""
    state = checkpoint.state()
    method = load_method(recipe, checkpoint.model_path)
    backbone = method.teacher_backbone()
    choice = model_choice(backbone, f"teacher of run {run.root} at step {state['step']}", "run-checkpoint",
                          str(checkpoint.path), recipe.model.img_size)
    choice.info["step"] = state["step"]
    for bank in method.banks().values():
        name = bank.query_feature.projection if bank.query_feature else None
        if name is not None and name not in choice.projections:
            choice.projections[name] = method.query_projection(name).eval()
    return choice


def from_run_start(run_dir: Union[str, Path]) -> ModelChoice:
    """The backbone a run started from, rebuilt exactly: the method built under the recipe's seed
    (what the training loop does before its first step: random init, or ``model.weights`` /
    ``model.pretrained``), then the run's ``--init-from`` (``RUN/start.json``). The baseline a
    method's training must improve on (MILE's single-image baselines use it, as its authors do)."""
    run = open_run(run_dir, flag="--run")
    recipe = recipe_of(run)
    torch.manual_seed(recipe.seed)
    method = build_method(recipe)
    init_from = run.init_from()
    if init_from:
        initial_weights(method, init_from)
    start = (f"--init-from {init_from}" if init_from else f"model.weights {recipe.model.weights}" if recipe.model.weights
             else "timm's pretrained weights" if recipe.model.pretrained else f"random init, seed {recipe.seed}")
    return model_choice(method.teacher_backbone(), f"backbone run {run.root} started from ({start})", "run-start",
                        str(run.root), recipe.model.img_size)


def model_of_features(record: dict) -> Optional[ModelChoice]:
    """The model a feature folder's manifest names (its ``model`` record), rebuilt from where it was
    loaded and checked by fingerprint; None when it cannot be rebuilt (its file moved or changed since,
    or a source such as timm's cache that is not kept)."""
    source, path = record.get("source"), record.get("path")
    if not isinstance(path, str) or not path:
        return None
    seed = record.get("seed", 0)
    try:
        if source == "dinov2":  # the default model of a folder embedded without --run or --weights
            choice = dinov2_small()
        elif source == "run":
            choice = from_run(run_of_model(source, path))
        elif source == "run-checkpoint":
            run = Run(run_of_model(source, path))
            choice = from_checkpoint(recipe_of(run), Checkpoint(Path(path)), run)
        elif source == "run-start":
            choice = from_run_start(path)
        elif source == "weights":
            choice = from_weights(path, record.get("arch"), img_size=record.get("img_size"),
                                  patch_size=record.get("patch_size"))
        elif source == "random-init" and isinstance(seed, int):
            choice = (from_run(path, random_init=True, seed=seed) if Path(path).is_dir()
                      else from_weights(path, record.get("arch"), img_size=record.get("img_size"),
                                        patch_size=record.get("patch_size"), random_init=True, seed=seed))
        else:
            return None
    except UserError:
        return None
    return choice if choice.fingerprint == record.get("fingerprint") else None


def model_on_demand(*, say=None, **choice):
    """A callable giving :func:`choose_model` of ``choice`` (``run``, ``weights``, ``arch``,
    ``random_init``, ``seed``), chosen — and said, with ``say`` — the first time it is called, then
    kept; its ``chosen`` is None until then. An evaluation calls it only when images are to be
    embedded, so feature folders never load a model (:mod:`mlsctl.evaluate.inputs`)."""
    def get_model():
        if get_model.chosen is None:
            get_model.chosen = choose_model(**choice)
            if say is not None:
                say(f"model: {get_model.chosen.description}")
        return get_model.chosen

    get_model.chosen = None
    get_model.given = any(choice.get(key) for key in ("run", "weights", "arch", "random_init"))
    return get_model


def model_that_made(features, get_model, need: str, say=None) -> ModelChoice:
    """The model that made a feature folder (``features``, a :class:`~mlsctl.data.shards.Features`),
    to embed images that go with them when the user named no model: the one their manifest names,
    loaded again and checked by fingerprint (:func:`model_of_features`), or ``get_model()``'s default
    where it is that model; ``get_model`` (:func:`model_on_demand`) keeps it, said with ``say``. Else
    one sentence: ``need`` (why a model is needed) and how to name it."""
    record = features.model
    if isinstance(record.get("refiner"), dict):  # a review (2026-12-06): "give --run", which can never match
        raise UserError(f"{need}, and {features.path} are refined features (refine apply): embed the other side too "
                        f"and refine it with the same run, or give the unrefined features")
    if not record.get("fingerprint"):
        raise UserError(f"{need}, and the manifest of {features.path} records no model to embed them with: give "
                        f"images on both sides, or features of one model")
    found = model_of_features(record)
    if found is None:  # what a command without --run would take (the newest run, DINOv2), if it made them
        try:
            default = get_model()
        except UserError:
            default = None
        if default is not None and default.fingerprint == features.model.get("fingerprint"):
            return default
        raise UserError(f"{need}, and the model that made {features.path} ({features.model.get('path')}) cannot be "
                        f"loaded again as it was; give it with --run RUN or --weights FILE")
    get_model.chosen = found
    if say is not None:
        say(f"model: {found.description} (the model of {features.path})")
    return found


def choose_model(*, run: Optional[Union[str, Path]] = None, weights: Optional[Union[str, Path]] = None,
                 arch: Optional[str] = None, random_init: bool = False, seed: int = 0,
                 runs_root: Union[str, Path] = RUNS_ROOT) -> ModelChoice:
    """The model flags of ``embed`` and of every command that embeds (see :mod:`mlsctl.models.source`)."""
    if run is not None and weights is not None:
        raise UserError("give either --run or --weights, not both")
    if weights is not None:
        return from_weights(weights, arch, random_init=random_init, seed=seed)
    if arch is not None and run is None:
        raise UserError("--model names the architecture of a --weights file; add --weights FILE, or use --run RUN")
    if run is None:
        found = newest_run(runs_root, with_backbone=True)
        if found is None:
            if random_init:
                raise UserError(f"--random-init needs --run RUN (no run under {runs_root}/ to take the architecture from)")
            return dinov2_small()
        choice = load_default_run(lambda root: from_run(root, random_init=random_init, seed=seed), found, runs_root,
                                  "--run or --weights")
        # said wherever the description is (a new user's probe, 2026-12-06: `embed` used it without a word)
        choice.description += f" (the newest run under {runs_root}/: no --run or --weights given)"
        return choice
    return from_run(run, random_init=random_init, seed=seed)


def load_default_run(load, found: Run, runs_root: Union[str, Path], flags: str, what: str = "run"):
    """``load(found.root)`` for the run :func:`newest_run` found because a command was given none of
    ``flags``: the one rule of every command that picks its model by default (``embed`` and the
    evaluations; the galleries, among MILE runs). A run that cannot be loaded is named as the one
    taken for the user; the caller adds to the model's description that it was taken by default."""
    try:
        return load(found.root)
    except UserError as exc:  # say that the run was chosen for the user, and which
        examples = " or ".join({"--run": "--run RUN", "--weights": "--weights FILE"}.get(f, f) for f in flags.split(" or "))
        raise UserError(f"no {flags} was given, so the newest {what} under {runs_root}/ was taken ({found.root}): "
                        f"{exc.message}; or give {examples}", exc.exit_code) from None
