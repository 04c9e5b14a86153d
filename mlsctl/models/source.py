"""Which backbone features come from: a run's teacher, a weights file, a random init, or DINOv2.

:func:`mlsctl.restore.choose_model` resolves the model flags of ``embed`` (and of every command that
embeds); the choices that read a run back (a run's teacher, a checkpoint's, a run's start) live in
:mod:`mlsctl.restore`, the others (a weights file, DINOv2) and what every choice carries live here:

* ``run=RUN``: the run's exported teacher (``RUN/teacher.safetensors``); while a run has no export
  yet, the teacher of its latest checkpoint. ``random_init=True`` builds the same architecture
  with freshly initialised weights (seeded) — the baseline every learned model is compared with.
* ``weights=FILE``: a local weights file in any layout :mod:`mlsctl.models.weights` reads; the
  architecture comes from ``arch=`` or from the file's own metadata (``mlsctl`` exports record it).
* nothing: the newest run under ``./runs/``; failing that, timm's DINOv2 ViT-S/14 when it is in the
  Hugging Face cache or can be downloaded (said before it is tried); failing that, a
  :class:`~mlsctl.errors.UserError` saying how to choose a model.

Every choice carries a fingerprint: the sha256 of the backbone's tensors (names, dtypes, shapes and
bytes, in key order), so the same weights give the same fingerprint whichever file they came from;
feature manifests and eval results record it with the ``source`` (``run``, ``run-checkpoint`` with
its ``step``, ``weights``, ``random-init`` with its ``seed``, ``run-start``, ``dinov2``), and
``mlsctl report`` matches evaluations to a run by it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from mlsctl.errors import UnreadableWeights, UserError, first_line
from mlsctl.models.backbone import Backbone

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


def from_weights(path: str | Path, arch: Optional[str] = None, *, img_size: Optional[int] = None,
                 patch_size: Optional[int] = None, random_init: bool = False, seed: int = 0) -> ModelChoice:
    """The backbone of a weights file; ``random_init``: its architecture (recorded in the file, or
    ``arch``), randomly initialised with ``seed`` — the comparison a pretrained backbone is measured
    against."""
    from mlsctl.models.weights import check_weights_file

    path = check_weights_file(path)
    recorded = recorded_model(path)
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
    try:
        backbone = Backbone(spec["arch"], img_size=size, patch_size=patch, weights=None if random_init else str(path),
                            timm_kwargs=spec.get("timm_kwargs"), embedding_dim=spec.get("embedding_dim", 0),
                            skip_init=True)
    except UserError as exc:
        if recorded is None or spec is recorded or spec.get("arch") == recorded.get("arch"):
            raise
        raise UserError(_not_the_recorded_model(str(exc), path, arch, recorded)) from None
    if random_init:
        choice = model_choice(backbone, f"randomly initialised {backbone.name} (architecture of {path}, seed {seed})",
                              "random-init", str(path), size)
        choice.info["seed"] = seed
        return choice
    return model_choice(backbone, f"{backbone.name} with weights {path}", "weights", str(path), size)


def _not_the_recorded_model(message: str, path: Path, arch: str, recorded: dict) -> str:
    """The refusal of ``--model arch`` for weights that do not fit it but record an architecture of their own: the
    command-line fix (leave --model out), not a recipe's (a new user's probe, 2026-12-08: embed was told to "set
    model.arch=... model.img_size=96", which it does not take)."""
    what = message.split("; the file records its architecture")[0].split("; check the architecture")[0]
    what = what.replace("do not fit model.arch", f"do not fit --model {arch}")
    shape = ", ".join(f"{key} {value}" for key, value in (("patch", recorded.get("patch_size")),
                                                           ("img_size", recorded.get("img_size")),
                                                           *(recorded.get("timm_kwargs") or {}).items())
                      if value is not None)
    return (f"{what}; the file records its own architecture ({recorded['arch']}{f', {shape}' if shape else ''}): leave "
            f"--model out to load it as recorded")


def _patch_size_of(arch: str) -> int:
    import re

    found = re.search(r"patch(\d+)", arch)
    return int(found.group(1)) if found else 16


def recorded_model(path: Path) -> Optional[dict]:
    """The architecture a .safetensors weights file records (``model``: arch, img_size, patch_size,
    timm_kwargs, embedding_dim), in its metadata (``teacher.safetensors``) or, for the
    ``model.safetensors`` of a ViT that ``mlsctl export`` wrote, in the ``mlsctl.json`` beside it;
    or None."""
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors' own error for a truncated or foreign file, OSError
        raise UnreadableWeights(path, first_line(exc, 200), ".safetensors") from None
    if "model" in metadata:
        try:
            spec = json.loads(metadata["model"])
        except json.JSONDecodeError:
            return None
    else:
        spec = _export_record(path)
        if spec is None:
            return {"arch": metadata["arch"]} if "arch" in metadata else None
    return _checked_spec(spec, path)


def _export_record(path: Path) -> Optional[dict]:
    """The architecture of an export's ``model.safetensors`` from its ``mlsctl.json`` (``model_args``
    of a ViT: the export's timm arguments, img_size, patch_size and the embedding layer's width as
    num_classes), or None (no such record, or a CNN's, which does not record its stride). A new user's
    probe (2026-12-06): ``--weights EXPORT/model.safetensors`` asked for ``--model``, which cannot name a
    reshaped ViT."""
    record_path = path.parent / "mlsctl.json"
    if path.name != "model.safetensors" or not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):  # hand-edited into a list or a number (a review, 2026-12-06)
        return None
    args = record.get("model_args")
    if not (record.get("format") == "timm" and isinstance(record.get("architecture"), str) and isinstance(args, dict)
            and "patch_size" in args):
        return None
    own = ("img_size", "patch_size", "dynamic_img_size", "num_classes")
    spec = {"arch": record["architecture"], "patch_size": args["patch_size"],
            "timm_kwargs": {k: v for k, v in args.items() if k not in own}, "embedding_dim": args.get("num_classes") or 0}
    if "img_size" in args:  # else timm's default for the architecture
        spec["img_size"] = args["img_size"]
    return spec


def _checked_spec(spec, path: Path) -> dict:
    from mlsctl.config import timm_kwargs_problem

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
