"""Which backbone features come from: a run's teacher, a weights file, a random init, or DINOv2.

:func:`choose_model` resolves the model flags of ``embed`` (and of every command that embeds):

* ``run=RUN``: the run's exported teacher (``RUN/teacher.safetensors``); while a run has no export
  yet, the teacher of its latest checkpoint. ``random_init=True`` builds the same architecture
  with freshly initialised weights (seeded) — the baseline every learned model is compared with.
* ``weights=FILE``: a local weights file in any layout :mod:`mlsctl.models.weights` reads; the
  architecture comes from ``arch=`` or from the file's own metadata (``mlsctl`` exports record it).
* nothing: the newest run under ``./runs/``; failing that, timm's DINOv2 ViT-S/14 when it is in the
  Hugging Face cache or can be downloaded (said before it is tried); failing that, a
  :class:`~mlsctl.errors.UserError` saying how to choose a model.

Every choice carries a fingerprint: the sha256 of the backbone's tensors (names, dtypes, shapes and
bytes, in key order), so the same weights give the same fingerprint whichever file they came from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from mlsctl.errors import UserError
from mlsctl.models.backbone import Backbone, build_backbone
from mlsctl.runs import Run

DINOV2_ARCH = "vit_small_patch14_dinov2.lvd142m"
DINOV2_REPO = "timm/vit_small_patch14_dinov2.lvd142m"


@dataclass
class ModelChoice:
    backbone: Backbone
    description: str  # one line for the console: what was loaded, from where
    info: dict  # recorded in manifests: source, arch, img_size, patch_size, fingerprint, path
    projections: dict = field(default_factory=dict)  # name → teacher module a bank's query feature names

    @property
    def fingerprint(self) -> str:
        return self.info["fingerprint"]


def fingerprint(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def model_choice(backbone: Backbone, description: str, source: str, path: Optional[str], img_size: int) -> ModelChoice:
    """Wrap a built backbone (put in eval mode) with its description and manifest record."""
    from mlsctl.models import lora

    backbone.eval()
    path = os.path.abspath(path) if path else None  # manifests are read from any working directory
    info = {"source": source, "path": path, "arch": backbone.arch, "img_size": img_size,
            "patch_size": backbone.patch_size, "embed_dim": backbone.embed_dim,
            "fingerprint": fingerprint(lora.unwrap(backbone.model))}
    return ModelChoice(backbone, description, info)


def newest_run(root: str | Path = "runs") -> Optional[Run]:
    """The run under ``root`` whose teacher export or latest checkpoint is the most recent."""
    root = Path(root)
    if not root.is_dir():
        return None
    best, best_time = None, -1.0
    for path in root.iterdir():
        run = Run(path)
        if not run.config_path.is_file():
            continue
        stamps = [p.stat().st_mtime for p in (run.teacher_weights_path,) if p.is_file()]
        latest = run.latest()
        if latest is not None:
            stamps.append(latest.state_path.stat().st_mtime)
        if stamps and max(stamps) > best_time:
            best, best_time = run, max(stamps)
    return best


def from_run(run_dir: str | Path, *, random_init: bool = False, seed: int = 0) -> ModelChoice:
    from mlsctl import config as config_lib

    run = Run(run_dir)
    if not run.config_path.is_file():
        raise UserError(f"--run {run_dir} is not a run folder (no config.yaml); give a folder written by mlsctl pretrain")
    recipe = config_lib.load_recipe(str(run.config_path))
    model_cfg = recipe.model
    if random_init:
        torch.manual_seed(seed)
        plain = dataclasses.replace(model_cfg, lora=dataclasses.replace(model_cfg.lora, enabled=False))
        backbone = build_backbone(plain, drop_path_rate=0.0, load_weights=False)
        return model_choice(backbone, f"randomly initialised {model_cfg.arch} (architecture of run {run.root}, seed {seed})",
                       "random-init", str(run.root), model_cfg.img_size)
    if run.teacher_weights_path.is_file():
        plain = dataclasses.replace(model_cfg, weights=str(run.teacher_weights_path), pretrained=False,
                                    lora=dataclasses.replace(model_cfg.lora, enabled=False))
        backbone = build_backbone(plain, drop_path_rate=0.0, skip_init=True)
        return model_choice(backbone, f"teacher of run {run.root} ({run.teacher_weights_path.name})", "run",
                       str(run.teacher_weights_path), model_cfg.img_size)
    checkpoint = run.latest()
    if checkpoint is None:
        raise UserError(f"run {run.root} has neither teacher.safetensors nor a checkpoint yet; wait for its first "
                        f"checkpoint or choose another --run")
    choice = from_checkpoint(recipe, checkpoint, run)
    choice.description += " (no final export yet)"
    return choice


def load_method(recipe, model_path: str | Path):
    """The method of ``recipe`` with the weights of a checkpoint's ``model.safetensors`` (every
    tensor, strictly), built without the random initialisation they replace
    (:func:`mlsctl.models.weights.built_with`); ``recipe``'s own starting weights are not read."""
    from safetensors.torch import load_file

    from mlsctl import methods
    from mlsctl.models.weights import built_with
    from mlsctl.schedules import Schedule

    recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, weights=None, pretrained=False))
    method_class = methods.method_class(recipe.method.name)
    schedule = Schedule(steps_per_epoch=1, epochs=recipe.optim.epochs)
    return built_with(lambda: method_class(recipe, schedule), load_file(str(model_path)))


def from_checkpoint(recipe, checkpoint, run: Run) -> ModelChoice:
    """The teacher of a checkpoint, taken from the method itself (so any method's layout works)."""
    state = checkpoint.state()
    method = load_method(recipe, checkpoint.model_path)
    backbone = method.teacher_backbone()
    choice = model_choice(backbone, f"teacher of run {run.root} at step {state['step']}", "run-checkpoint",
                          str(checkpoint.path), recipe.model.img_size)
    for bank in method.banks().values():
        name = bank.query_feature.projection if bank.query_feature else None
        if name is not None and name not in choice.projections:
            choice.projections[name] = method.query_projection(name).eval()
    return choice


def from_run_start(run_dir: str | Path) -> ModelChoice:
    """The backbone a run started from, rebuilt exactly: the method built under the recipe's seed
    (what the training loop does before its first step: random init, or ``model.weights`` /
    ``model.pretrained``), then the run's ``--init-from`` (``RUN/start.json``). The baseline a
    method's training must improve on (MILE's single-image baselines use it, as its authors do)."""
    from mlsctl import config as config_lib
    from mlsctl import methods
    from mlsctl.schedules import Schedule
    from mlsctl.train import _load_initial_weights

    run = Run(run_dir)
    if not run.config_path.is_file():
        raise UserError(f"--run {run_dir} is not a run folder (no config.yaml); give a folder written by mlsctl pretrain")
    recipe = config_lib.load_recipe(str(run.config_path))
    torch.manual_seed(recipe.seed)
    method = methods.method_class(recipe.method.name)(recipe, Schedule(steps_per_epoch=1, epochs=recipe.optim.epochs))
    init_from = run.init_from()
    if init_from:
        _load_initial_weights(method, init_from)
    start = (f"--init-from {init_from}" if init_from else f"model.weights {recipe.model.weights}" if recipe.model.weights
             else "timm's pretrained weights" if recipe.model.pretrained else f"random init, seed {recipe.seed}")
    return model_choice(method.teacher_backbone(), f"backbone run {run.root} started from ({start})", "run-start",
                        str(run.root), recipe.model.img_size)


def from_weights(path: str | Path, arch: Optional[str] = None, *, img_size: Optional[int] = None,
                 patch_size: Optional[int] = None, random_init: bool = False, seed: int = 0) -> ModelChoice:
    """The backbone of a weights file; ``random_init``: its architecture (recorded in the file, or
    ``arch``), randomly initialised with ``seed`` — the comparison a pretrained backbone is measured
    against."""
    path = Path(path)
    recorded = _recorded_model(path)
    if arch is None and recorded is None:
        raise UserError(f"--weights {path} does not say which architecture it holds; add --model NAME "
                        f"(a timm ViT such as vit_small_patch16_224)")
    spec = dict(recorded or {})
    if arch is not None and arch != spec.get("arch"):
        spec = {"arch": arch}
    import timm

    if not timm.is_model(spec["arch"]):
        raise UserError(f"--model {spec['arch']} is not a timm model; see timm.list_models('vit*')")
    defaults = timm.models.get_pretrained_cfg(spec["arch"]) if "img_size" not in spec else None
    size = img_size or spec.get("img_size") or (defaults.input_size[-1] if defaults else 224)
    patch = patch_size or spec.get("patch_size") or _patch_size_of(spec["arch"])
    if random_init:
        torch.manual_seed(seed)
    backbone = Backbone(spec["arch"], img_size=size, patch_size=patch, weights=None if random_init else str(path),
                        timm_kwargs=spec.get("timm_kwargs"), embedding_dim=spec.get("embedding_dim", 0), skip_init=True)
    if random_init:
        return model_choice(backbone, f"randomly initialised {spec['arch']} (architecture of {path}, seed {seed})",
                            "random-init", str(path), size)
    return model_choice(backbone, f"{spec['arch']} with weights {path}", "weights", str(path), size)


def _patch_size_of(arch: str) -> int:
    import re

    found = re.search(r"patch(\d+)", arch)
    return int(found.group(1)) if found else 16


def _recorded_model(path: Path) -> Optional[dict]:
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except Exception:  # unreadable files are reported by the weights reader with their reason
        return None
    if "model" in metadata:
        from mlsctl.config import timm_kwargs_problem

        try:
            spec = json.loads(metadata["model"])
        except json.JSONDecodeError:
            return None
        if not isinstance(spec, dict) or not isinstance(spec.get("arch"), str):
            raise UserError(f"--weights {path} records a model description mlsctl did not write; add --model NAME")
        problem = timm_kwargs_problem(spec.get("timm_kwargs") or {})
        for key in ("img_size", "patch_size"):
            if key in spec and not (isinstance(spec[key], int) and 0 < spec[key] <= 65536):
                problem = problem or f"{key} must be a positive integer, got {spec[key]!r}"
        if problem:
            raise UserError(f"--weights {path} records timm_kwargs that mlsctl does not pass to timm ({problem}); "
                            f"it was not exported by mlsctl: add --model NAME")
        embedding = spec.get("embedding_dim", 0)
        if not (isinstance(embedding, int) and 0 <= embedding <= 65536):
            raise UserError(f"--weights {path} records an embedding_dim mlsctl did not write; add --model NAME")
        return {k: spec[k] for k in ("arch", "img_size", "patch_size", "timm_kwargs", "embedding_dim") if k in spec}
    return {"arch": metadata["arch"]} if "arch" in metadata else None


def dinov2_small() -> ModelChoice:
    """timm's DINOv2 ViT-S/14: from the Hugging Face cache, else downloaded when the hub answers
    within two seconds (said first), else the one-sentence "choose a model" error."""
    from mlsctl.models.hub import hub_file

    try:
        cached = hub_file(DINOV2_REPO, ["model.safetensors"], "no run under ./runs", "choose a model")
    except UserError:
        raise UserError(_HOW_TO_CHOOSE) from None
    backbone = Backbone(DINOV2_ARCH, img_size=518, patch_size=14, weights=cached, skip_init=True)
    return model_choice(backbone, f"timm's DINOv2 ViT-S/14 ({cached})", "dinov2", cached, 224)


_HOW_TO_CHOOSE = ("no model given, no run under ./runs and timm's DINOv2 ViT-S/14 is neither cached nor downloadable: "
                  "choose one with --run RUN or --weights FILE --model NAME")


def choose_model(*, run: Optional[str | Path] = None, weights: Optional[str | Path] = None, arch: Optional[str] = None,
                 random_init: bool = False, seed: int = 0, runs_root: str | Path = "runs") -> ModelChoice:
    if run is not None and weights is not None:
        raise UserError("give either --run or --weights, not both")
    if weights is not None:
        return from_weights(weights, arch, random_init=random_init, seed=seed)
    if arch is not None and run is None:
        raise UserError("--model names the architecture of a --weights file; add --weights FILE, or use --run RUN")
    if run is None:
        found = newest_run(runs_root)
        if found is None:
            if random_init:
                raise UserError(f"--random-init needs --run RUN (no run under {runs_root}/ to take the architecture from)")
            return dinov2_small()
        run = found.root
    return from_run(run, random_init=random_init, seed=seed)
