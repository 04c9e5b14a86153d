"""Export a run's teacher backbone as a timm model folder, and load it back in one call.

:func:`export_timm` writes ``DIR/model.safetensors`` and ``DIR/config.json`` with timm's own
writer (``timm.models._hub.save_for_hf``: the architecture, the arguments that rebuild it —
img_size, patch_size, the recipe's ``timm_kwargs``, ``dynamic_img_size`` — and the preprocessing
``mlsctl embed`` uses: a bicubic resize of the whole image to img_size², ImageNet mean and std), so
``timm.create_model("local-dir:DIR", pretrained=True)`` rebuilds it with no mlsctl installed. LoRA
adapters are merged. Its ``pretrained_cfg`` is the run's own (:func:`run_pretrained_cfg`): no tag, licence
or source of the timm release the architecture is named after, a ``description`` saying what was
trained; ``config.json``'s ``mlsctl`` entry and ``DIR/mlsctl.json`` say where it came from (run, checkpoint
step, method, data root, fingerprint of the weights). The folder is written next to ``DIR`` and swapped into place in one
step (an atomic exchange of the two folders on Linux), so ``--overwrite`` never leaves ``DIR`` without an
export; ``DIR`` may not be a symbolic link.

:func:`load_backbone` takes a run folder (its final teacher, else its latest checkpoint's) or an
exported folder and returns the timm model in eval mode, with that same ``pretrained_cfg``: either way
``timm.data.create_transform(**timm.data.resolve_data_config({}, model=m))`` is ``mlsctl embed``'s
preprocessing (:func:`data_config`).
"""

from __future__ import annotations

import glob
import math
import os
import shutil
import socket
from pathlib import Path
from typing import Optional

import torch

from mlsctl import atomic
from mlsctl.errors import UserError, first_line
from mlsctl.locks import abandoned_temporary
from mlsctl.runs import Run


EXPORT_FILES = ("config.json", "model.safetensors", "mlsctl.json")


def _teacher(run_dir: Path, step: Optional[int]):
    from mlsctl.restore import from_checkpoint, from_run, open_run, recipe_of

    if not Path(run_dir).exists():
        raise UserError(f"{run_dir} does not exist; give a run folder written by mlsctl pretrain")
    run = open_run(run_dir)
    recipe = recipe_of(run)
    if step is None:
        choice = from_run(run_dir)
        checkpoint_step = run.final_teacher_step()
    else:
        checkpoint = run.checkpoint(step)
        choice = from_checkpoint(recipe, checkpoint, run)
        checkpoint_step = checkpoint.step
    return run, recipe, choice, checkpoint_step


def data_config(img_size: int) -> dict:
    """timm's data config of ``mlsctl embed``'s default preprocessing at ``img_size``
    (:class:`mlsctl.features.Preprocessing`, ``square``): the whole image resized (bicubic) to
    img_size², ImageNet mean and std. ``crop_pct`` 1 with ``crop_mode`` squash is how timm's
    ``create_transform`` says "resize both sides, crop nothing"."""
    from mlsctl.features import Preprocessing

    preprocessing = Preprocessing(img_size)
    assert preprocessing.resize == "square"
    return {"input_size": (3, img_size, img_size), "interpolation": "bicubic", "mean": tuple(preprocessing.mean),
            "std": tuple(preprocessing.std), "crop_pct": 1.0, "crop_mode": "squash"}


# what of timm's pretrained_cfg of the architecture describes the model rather than a release of weights
_ARCHITECTURE_CFG_KEYS = ("first_conv", "classifier")


def provenance(run: Run, recipe, step: Optional[int], fingerprint: Optional[str] = None) -> dict:
    """What a backbone of ``run`` is: run name and folder, method, data root, checkpoint step, and
    (for an export) the fingerprint of its weights."""
    from mlsctl import __version__

    record = {"run": run.root.name, "run_path": str(run.root.resolve()), "method": recipe.method.name,
              "data_root": recipe.data.root, "step": step, "mlsctl_version": __version__}
    return {**record, "fingerprint": fingerprint} if fingerprint is not None else record


def _side(value) -> str:
    """A size timm keeps as an int or a pair: ``8``, or ``8×16`` where the two differ."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}×{pair[1]}"


def model_shape(net: torch.nn.Module, arch: str) -> str:
    """What ``net`` is, read from the model itself: for a ViT its width, depth, patch and input size beside the timm
    architecture it is built from (a new user's probe, 2026-12-07: an export of a width-128, depth-4, patch-8, 96-px
    ViT said "vit_small_patch16_224 trained with mlsctl", the name of timm's template that ``model_args``
    override); any other model, the architecture's name."""
    patch_embed, blocks = getattr(net, "patch_embed", None), getattr(net, "blocks", None)
    width = getattr(net, "embed_dim", None)
    if patch_embed is None or blocks is None or not isinstance(width, int):
        return arch
    size = getattr(patch_embed, "img_size", None)
    return (f"ViT width {width}, depth {len(blocks)}, patch {_side(patch_embed.patch_size)}"
            + (f", {_side(size)} px" if size is not None else "") + f" (timm's {arch} with model_args)")


def run_pretrained_cfg(net: torch.nn.Module, recipe, record: dict) -> dict:
    """The ``pretrained_cfg`` of a run's backbone ``net`` (a timm model): the architecture's layout
    fields kept, the run's preprocessing (:func:`data_config`), and a description of what was
    trained instead of the tag, licence, source and papers of the timm release the architecture is
    named after (none of which applies to weights this run trained), naming the model's own shape
    (:func:`model_shape`). Only fields of timm's ``PretrainedCfg``, so timm reads it back."""
    step = f"step {record['step']}" if record.get("step") is not None else "its final teacher"
    return own_pretrained_cfg(net, recipe.model.arch, recipe.model.img_size,
                              f"{model_shape(net, recipe.model.arch)} trained with mlsctl {record['mlsctl_version']} "
                              f"({record['method']}, run {record['run']}, {step}, data.root {record['data_root']})")


def own_pretrained_cfg(net: torch.nn.Module, arch: str, img_size: int, what: str) -> dict:
    """The ``pretrained_cfg`` of weights that are not a timm release (``what`` says what they are):
    the architecture's layout fields, ``mlsctl embed``'s preprocessing at ``img_size``, no tag or
    licence."""
    from timm.models._input import get_model_input_config

    own = dict(getattr(net, "pretrained_cfg", None) or {})
    return {"architecture": arch, **{k: own.get(k) for k in _ARCHITECTURE_CFG_KEYS}, **data_config(img_size),
            "fixed_input_size": bool(get_model_input_config(net)["fixed_input_size"]), "pool_size": None,
            "num_classes": getattr(net, "num_classes", 0), "custom_load": False,
            "description": f"{what}; its own weights, not a timm release: no timm tag or licence applies"}


def _set_pretrained_cfg(net: torch.nn.Module, cfg: dict) -> None:
    net.pretrained_cfg = cfg
    net.default_cfg = cfg  # timm's older name of the same dict


def export_timm(run_dir: str | Path, out: str | Path, *, step: Optional[int] = None, overwrite: bool = False) -> dict:
    """Write the teacher of ``run_dir`` (final, or checkpoint ``step``) as a timm model folder."""
    from timm.models._hub import save_for_hf

    from mlsctl.models import lora
    from mlsctl.models.source import fingerprint

    out = Path(out)
    if out.is_symlink():
        raise UserError(f"--out {out} is a symbolic link (to {os.readlink(out)}); give the folder itself "
                        f"({out.resolve()}) or another path: an export replaces its folder, not a link's target")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose another --out")
    _recover(out)
    if out.exists() and atomic.holds_anything(out):
        if not (out / "mlsctl.json").is_file():
            raise UserError(f"--out {out} is not empty and not an mlsctl export (no mlsctl.json): choose a new or empty "
                            f"folder (--overwrite replaces exports only)")
        if not overwrite:
            raise UserError(f"--out {out} holds an earlier export; add --overwrite to replace it, or choose another")
        # every name but its three files and a file browser's litter (.DS_Store: atomic.is_litter_file), hidden ones
        # included, and a folder or link under one of their names (a new user's probe, 2026-12-07: a data
        # build's check looked at the top level only and skipped hidden names)
        foreign = sorted(p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in out.iterdir()
                         if not (p.is_file() and not p.is_symlink() and p.name in EXPORT_FILES)
                         and not atomic.is_litter_file(p))
        if foreign:
            raise UserError(f"--out {out} also holds {', '.join(foreign[:4])}, which export did not write; move "
                            f"{'them' if len(foreign) > 1 else 'it'} away or choose another --out")
    run, recipe, choice, checkpoint_step = _teacher(Path(run_dir), step)
    vit = lora.merged_vit(choice.backbone.model).eval()
    model = recipe.model
    if choice.backbone.kind == "cnn":  # timm's pooled feature is the CNN backbone's global feature
        model_args = {"num_classes": 0, "global_pool": "avg", **dict(model.timm_kwargs or {})}
    else:  # an embedding layer (model.embedding_dim) is timm's head
        model_args = {"img_size": model.img_size, "patch_size": model.patch_size, "dynamic_img_size": True,
                      "num_classes": model.embedding_dim, **dict(model.timm_kwargs or {})}
    origin = provenance(run, recipe, checkpoint_step, fingerprint(vit))
    _set_pretrained_cfg(vit, run_pretrained_cfg(vit, recipe, origin))
    tmp = out.parent / f".{out.name}.export-tmp-{socket.gethostname()}-{os.getpid()}"  # per process: never shared
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_for_hf(vit, str(tmp), model_config={"architecture": model.arch, "mlsctl": origin}, model_args=model_args,
                    safe_serialization=True, data_config=data_config(model.img_size))
        record = {"format": "timm", "architecture": model.arch, "run": str(run.root.resolve()), "step": checkpoint_step,
                  "method": recipe.method.name, "data_root": recipe.data.root, "fingerprint": origin["fingerprint"],
                  "model_args": model_args, "load": f"timm.create_model('local-dir:{out.resolve()}', pretrained=True)"}
        atomic.write_json(tmp / "mlsctl.json", record)
        for f in tmp.iterdir():  # readable by whoever the folder is given to, as the umask allows
            atomic.usual_permissions(f)
        atomic.fsync_dir(tmp)
        if not overwrite and out.exists() and atomic.holds_anything(out):  # another export finished there meanwhile
            raise UserError(f"--out {out} received another export while this one was written; add --overwrite to "
                            f"replace it, or choose another --out")
        atomic.swap_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _recover(out)
        raise
    return {**record, "out": str(out), "files": sorted(p.name for p in out.iterdir()),
            "model": model_shape(vit, model.arch)}  # what the `wrote` line says it is


def _recover(out: Path) -> None:
    """Undo what an interrupted export left: a swap cut short (:func:`mlsctl.atomic.recover_swap`) and
    the temporary folders of exports killed while writing."""
    atomic.recover_swap(out)
    prefix = f".{out.name}.export-tmp"
    for tmp in out.parent.glob(f"{glob.escape(prefix)}-*"):  # of an export killed while writing
        if abandoned_temporary(tmp.name, prefix) and tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)



# The largest value a model argument of config.json may have before anything is built (an edited
# config.json must not make timm build a million blocks or allocate 100 GB before failing).
_ARG_LIMITS = {"depth": 1024, "num_heads": 4096, "patch_size": 4096, "num_classes": 2**24}
_ARG_LIMIT = 2**16


def _load_export(path: Path) -> torch.nn.Module:
    """An exported folder's model, checked before it is built: config.json is a timm config of an
    architecture timm knows, its arguments are of sane size, and the model it describes (built on
    the meta device: no memory) has exactly the tensors of model.safetensors (read from its header)."""
    import json

    import timm
    from safetensors import safe_open

    config_path, weights = path / "config.json", path / "model.safetensors"
    fix = "export the run again with mlsctl export"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = "nested too deep" if isinstance(exc, RecursionError) else getattr(exc, "strerror", None) or first_line(exc)
        raise UserError(f"{config_path} is not readable JSON ({reason}); {fix}") from None
    if not (isinstance(config, dict) and isinstance(config.get("architecture"), str)
            and isinstance(config.get("model_args", {}), dict) and isinstance(config.get("pretrained_cfg", {}), dict)):
        raise UserError(f"{config_path} is not a timm model config (an object with 'architecture', 'model_args' and "
                        f"'pretrained_cfg'); {fix}")
    arch = config["architecture"]
    if not timm.is_model(arch):
        raise UserError(f"{config_path} names the architecture '{arch[:60]}', which timm {timm.__version__} does not "
                        f"know; {fix}")
    for key, value in config.get("model_args", {}).items():
        for number in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(number, (int, float)) and not isinstance(number, bool) and (
                    not math.isfinite(number) or abs(number) > _ARG_LIMITS.get(key, _ARG_LIMIT)):
                raise UserError(f"{config_path}: model_args.{key} is {value}, beyond any model mlsctl exports (at most "
                                f"{_ARG_LIMITS.get(key, _ARG_LIMIT):,}); {fix}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own errors for any damage
        raise UserError(f"{weights} is not a readable safetensors file ({first_line(exc)}); {fix}") from None
    try:
        with torch.device("meta"):
            skeleton = timm.create_model(f"local-dir:{path}", pretrained=False)
    except Exception as exc:  # timm's own errors for arguments its model refuses
        raise UserError(f"{config_path}: timm cannot build '{arch}' from its model_args ({first_line(exc)}); {fix}") from None
    wanted = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    for key in sorted(set(wanted) | set(stored)):
        if wanted.get(key) != stored.get(key):
            said = lambda shape: list(shape) if shape is not None else "absent"  # noqa: E731
            raise UserError(f"{config_path} does not describe {weights}: {key} is {said(wanted.get(key))} by the "
                            f"config and {said(stored.get(key))} in the weights (config.json edited?); {fix}")
    try:
        return timm.create_model(f"local-dir:{path}", pretrained=True).eval()
    except Exception as exc:
        from mlsctl.errors import describe_environment_error

        raise UserError(describe_environment_error(exc) or f"timm cannot load {path} ({first_line(exc)}); {fix}") from None


def load_backbone(path: str | Path, arch: Optional[str] = None) -> torch.nn.Module:
    """The timm model of an exported folder (``config.json`` + ``model.safetensors``), of a run (its
    teacher) or of a weights file (``.safetensors``/``.pth``, as ``--weights`` takes; ``arch``: its
    timm architecture when the file does not record it), in eval mode: ``model(x)`` gives the global
    feature ``mlsctl embed`` stores, ``[B, D]``; for a ViT, ``model.forward_features(x)[:, model.num_prefix_tokens:]``
    the patch tokens ``embed --dense`` stores, ``[B, h·w, D]``. Its ``pretrained_cfg`` holds the
    preprocessing those features were made with (``timm.data.resolve_data_config({}, model=model)``)."""

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; give an exported model folder (mlsctl export), a run folder or a "
                        f"weights file (.safetensors, .pth)")
    if path.is_file():
        return _load_weights_file(path, arch)
    if arch is not None:
        raise UserError(f"arch= applies to a weights file; {path} is a folder, whose architecture is recorded in it")
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return _load_export(path)
    if Run(path).has_config():
        from mlsctl.models import lora

        run, recipe, choice, step = _teacher(path, None)
        vit = lora.merged_vit(choice.backbone.model).eval()
        _set_pretrained_cfg(vit, run_pretrained_cfg(vit, recipe, provenance(run, recipe, step)))
        return vit
    raise UserError(f"{path} is neither an exported model folder (config.json + model.safetensors) nor a run folder "
                    f"(config.yaml); give one of them, or a weights file (.safetensors, .pth)")


def _load_weights_file(path: Path, arch: Optional[str]) -> torch.nn.Module:
    from mlsctl.models.source import from_weights, recorded_model
    from mlsctl.models.weights import check_weights_file

    if arch is None and recorded_model(check_weights_file(path)) is None:
        raise UserError(f"{path} does not say which architecture it holds: give load_backbone(..., arch=NAME) with its "
                        f"timm name (such as vit_small_patch16_224), or load the run or export folder it came from")
    choice = from_weights(path, arch)
    vit = choice.backbone.net.eval()
    _set_pretrained_cfg(vit, own_pretrained_cfg(vit, choice.info["arch"], choice.info["img_size"],
                                                f"{choice.info['arch']} with the weights of {path}"))
    return vit
