"""Recipes: YAML files validated against a typed schema of dataclasses.

A recipe is read into a :class:`Recipe`. Every mistake becomes one :class:`ConfigError` sentence
naming the key path, what was expected and, where one is close, a did-you-mean suggestion:

    recipes/dino_fmnist_quick.yaml: unknown key 'optim.lrr' (optim takes batch_size,
    accumulate_steps, epochs, lr, ... every key of the section); did you mean 'optim.lr'?

Dotted ``key=value`` overrides (``optim.lr=1e-4 data.root=/x``) are applied to the YAML before
validation; their values are parsed as YAML scalars. Numbers written as ``1e-4`` (which YAML 1.1
reads as text) are accepted wherever a number is expected.

The method section is typed by the method itself: ``method.name`` selects the method's own
config dataclass from :mod:`mlsctl.methods`.

The resolved recipe is written to ``RUN/config.yaml`` by :func:`save_recipe`; reading it back
gives an equal :class:`Recipe`, so a run started from it reproduces the run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import types
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union, get_args, get_origin, get_type_hints

import yaml

from mlsctl import atomic, registry
from mlsctl.errors import UserError

RECIPE_FORMAT_VERSION = 1


class ConfigError(UserError):
    """A recipe or override that does not fit the schema (exit code 2)."""


def param(default: Any = dataclasses.MISSING, *, help: str = "", ge=None, gt=None, le=None, lt=None, path: bool = False):
    """A schema field: default, one-line help and optional numeric bounds (applied per element).
    ``path=True`` marks a file or folder: a run's config.yaml stores it absolute
    (:func:`absolute_paths`), so the run can be read from any working directory."""
    metadata = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "path": path}
    if isinstance(default, (list, dict, tuple)) or is_dataclass(default):
        value = default
        return field(default_factory=lambda: _copy(value), metadata=metadata)
    return field(default=default, metadata=metadata)


def _copy(value: Any) -> Any:
    if is_dataclass(value):
        return dataclasses.replace(value)
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# The schema shared by every method.


@dataclass
class CropConfig:
    count: int = param(2, help="number of crops of this kind", ge=0)
    size: int = param(224, help="side of the square crop in pixels", ge=8)
    scale: tuple[float, float] = param((0.25, 1.0), help="area range of RandomResizedCrop", gt=0.0, le=1.0)

    def check(self) -> list[tuple[str, str]]:
        if self.scale[0] > self.scale[1]:
            return [("scale", f"must be [low, high] with low <= high, got {list(self.scale)}")]
        return []


@dataclass
class DataConfig:
    root: Optional[str] = param(None, help="folder of training images (searched recursively)", path=True)
    global_crops: CropConfig = param(CropConfig(2, 224, (0.25, 1.0)), help="large views")
    local_crops: CropConfig = param(CropConfig(10, 96, (0.05, 0.25)), help="small views")
    photometric: Literal["dino", "mocov2", "none"] = param("dino", help="DINO/BYOL colour pipeline, MoCo-v2's, or none")
    workers: int = param(4, help="data-loading processes per training process", ge=0)
    max_image_pixels: int = param(89_478_485, help="larger images are skipped as decompression bombs (Pillow's own "
                                                   "limit, about 9459 x 9459)", ge=1)
    augment: Literal["cpu", "gpu"] = param(
        "cpu", help="where multi-crop runs: cpu = in the loader workers (PIL); gpu = batched on the training device "
                    "(workers only decode and resize to data.decode_size); see docs/gpu.md")
    decode_size: int = param(0, help="with augment=gpu: the square side (px) workers resize every image to before "
                                     "cropping on the device; 0 = twice the global crop size", ge=0)
    cache: Literal["none", "memory"] = param(
        "none", help="with augment=gpu: memory = keep the decoded, resized images in shared RAM after their first "
                     "read (for data sets that fit; checked at start)")

    def check(self) -> list[tuple[str, str]]:
        if self.cache == "memory" and self.augment != "gpu":
            return [("cache", "memory needs data.augment=gpu (it caches the decoded images of that path); set "
                              "data.augment=gpu or data.cache=none")]
        return []

    @property
    def device_decode_size(self) -> int:
        """The side workers resize images to with ``augment: gpu``."""
        return self.decode_size or 2 * self.global_crops.size


@dataclass
class LoraConfig:
    enabled: bool = param(False, help="wrap the backbone with LoRA adapters (peft)")
    rank: int = param(8, help="LoRA rank r", ge=1)
    alpha: float = param(16.0, help="LoRA alpha", gt=0.0)
    dropout: float = param(0.0, help="dropout on the LoRA path", ge=0.0, lt=1.0)
    bias: Literal["none", "all", "lora_only"] = param("none", help="which biases train")
    targets: list[str] = param(["qkv"], help="module names that receive adapters")


@dataclass
class ModelConfig:
    arch: str = param("vit_small_patch16_224", help="timm model name: a ViT, or a CNN (resnet50, ...)")
    img_size: int = param(224, help="input size the position embedding is built for", ge=8)
    patch_size: int = param(16, help="patch side in pixels (a CNN: the stride of its last stage, 32 for a ResNet)", ge=1)
    drop_path_rate: float = param(0.1, help="stochastic depth of the student", ge=0.0, lt=1.0)
    weights: Optional[str] = param(None, help="local .safetensors/.pth to start the backbone from", path=True)
    pretrained: bool = param(False, help="timm's pretrained weights (needs them cached or online)")
    timm_kwargs: dict[str, Any] = param({}, help="architecture arguments of timm.create_model (embed_dim, depth, "
                                                  "num_heads, ...; see TIMM_ARCH_KEYS)")
    lora: LoraConfig = param(LoraConfig(), help="LoRA adapters")
    embedding_dim: int = param(0, help="a linear embedding layer width -> embedding_dim on the CLS token (timm's "
                                       "head; the global feature embed stores); 0 = none", ge=0)

    def __post_init__(self):
        # YAML 1.1 reads 1e-5 (no dot) as text: a number argument so written is taken as the number, as the
        # recipe's own float keys take it (a review, 2026-12-06: init_values: 1e-5, DINOv2's LayerScale)
        if isinstance(self.timm_kwargs, dict):
            for key in _TIMM_NUMBERS:
                value = self.timm_kwargs.get(key)
                if isinstance(value, str):
                    try:
                        self.timm_kwargs[key] = float(value)
                    except ValueError:
                        pass

    def check(self) -> list[tuple[str, str]]:
        if self.weights is not None and self.pretrained:
            return [("pretrained", "cannot be true together with model.weights; choose one")]
        issue = timm_kwargs_issue(self.timm_kwargs)
        if issue:
            key, problem = issue
            return [(f"timm_kwargs.{key}" if key else "timm_kwargs", problem)]
        return []


# The timm.create_model arguments a recipe (and the metadata of a weights file mlsctl exported) may
# pass: the shape of a Vision Transformer (and a CNN's output_stride), nothing that makes timm read
# files or download.
TIMM_ARCH_KEYS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "qk_norm", "init_values", "class_token",
                  "no_embed_class", "reg_tokens", "pre_norm", "final_norm", "fc_norm", "global_pool", "dynamic_img_pad",
                  "drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "act_layer",
                  "norm_layer", "proj_bias", "in_chans", "output_stride")


# what each of them takes (None, timm's own default, is taken by all): a wrong type was timm's TypeError
# ("unsupported operand type(s) for +: 'int' and 'str"; a new user's probe, 2026-12-06)
_TIMM_INTEGERS = ("embed_dim", "depth", "num_heads", "reg_tokens", "in_chans", "output_stride")
_TIMM_NUMBERS = ("mlp_ratio", "init_values", "drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate",
                 "attn_drop_rate")
_TIMM_SWITCHES = ("qkv_bias", "qk_norm", "class_token", "no_embed_class", "pre_norm", "final_norm", "fc_norm",
                  "dynamic_img_pad", "proj_bias")


def _timm_value_problem(key: str, value: Any) -> Optional[str]:
    if value is None:
        return None
    if key in _TIMM_INTEGERS and (isinstance(value, bool) or not isinstance(value, int)):
        return f"must be an integer, got {_show(value)}"
    if key in _TIMM_NUMBERS and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return f"must be a number, got {_show(value)}"
    if key in _TIMM_SWITCHES and not isinstance(value, bool):
        return f"must be true or false, got {_show(value)}"
    if key not in _TIMM_INTEGERS + _TIMM_NUMBERS + _TIMM_SWITCHES and not isinstance(value, str):
        return f"must be a name (text), got {_show(value)}"
    return None


def timm_kwargs_issue(kwargs: Any) -> Optional[tuple[Optional[str], str]]:
    """Why ``kwargs`` may not go to timm.create_model: (the key whose value is wrong, or None, and the
    sentence), or None."""
    if not isinstance(kwargs, dict):
        return None, f"must be a mapping of timm architecture arguments, got {_show(kwargs)}"
    for key, value in kwargs.items():
        if key not in TIMM_ARCH_KEYS:
            close = difflib.get_close_matches(str(key), TIMM_ARCH_KEYS, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            return None, (f"key '{key}' is not an architecture argument mlsctl passes to timm (it takes "
                          f"{', '.join(TIMM_ARCH_KEYS[:6])}, ...){hint}")
        problem = _timm_value_problem(str(key), value)
        if problem:
            return str(key), problem
    return None


def timm_kwargs_problem(kwargs: Any) -> Optional[str]:
    """Why ``kwargs`` may not go to timm.create_model, in one sentence, or None."""
    issue = timm_kwargs_issue(kwargs)
    if issue is None:
        return None
    key, problem = issue
    return f"'{key}' {problem}" if key else problem


@dataclass
class OptimConfig:
    batch_size: int = param(64, help="images per process and forward pass (one micro-batch when accumulate_steps > 1)",
                            ge=1)
    accumulate_steps: int = param(1, help="micro-batches whose gradients are averaged into one optimiser step: a step "
                                          "sees batch_size x accumulate_steps x processes images", ge=1)
    epochs: int = param(100, help="passes over the data", ge=1)
    lr: float = param(5e-4, help="peak learning rate (per 256 images when scale_lr)", gt=0.0)
    scale_lr: bool = param(True, help="multiply lr by the images of an optimiser step / 256 (DINO's rule)")
    min_lr: float = param(1e-6, help="final learning rate of the cosine", ge=0.0)
    warmup_epochs: float = param(10.0, help="linear learning-rate warm-up", ge=0.0)
    weight_decay: float = param(0.04, help="weight decay at the start", ge=0.0)
    weight_decay_end: float = param(0.4, help="weight decay at the end (cosine)", ge=0.0)
    clip_grad: float = param(3.0, help="gradient clipping threshold; 0 disables", ge=0.0)
    clip_grad_mode: Literal["per_param", "global"] = param("per_param", help="DINO clips each parameter's norm")
    freeze_last_layer_epochs: float = param(1.0, help="epochs the head's last layer stays frozen", ge=0.0)
    betas: tuple[float, float] = param((0.9, 0.999), help="AdamW/Adam betas", ge=0.0, lt=1.0)
    optimizer: Literal["adamw", "adam", "sgd"] = param(
        "adamw", help="adamw (DINO and its family), adam (L2 weight decay; metric learning), or sgd with "
                      "optim.momentum (MoCo, MLS)")
    momentum: float = param(0.9, help="SGD momentum (optim.optimizer=sgd only)", ge=0.0, lt=1.0)
    decay_biases_and_norms: bool = param(False, help="also apply weight decay to biases and normalisation "
                                                     "parameters (MoCo's SGD does; DINO's AdamW does not)")

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.min_lr > self.lr:
            problems.append(("min_lr", f"must not exceed optim.lr ({self.lr}), got {self.min_lr}"))
        if self.warmup_epochs > self.epochs:
            problems.append(("warmup_epochs", f"must not exceed optim.epochs ({self.epochs}), got {self.warmup_epochs}"))
        return problems


@dataclass
class MonitorConfig:
    every: int = param(0, help="steps between quality measurements of the teacher (k-NN, knn-seg); 0 = off", ge=0)
    train: Optional[str] = param(None, help="labelled images the k-NN memory is built from (a folder per class, or "
                                            "train_labels)", path=True)
    val: Optional[str] = param(None, help="labelled images that are classified (and segmented)", path=True)
    train_labels: Optional[str] = param(None, help="CSV/JSONL of path,label for train [default: each image's own folder, however deep]", path=True)
    val_labels: Optional[str] = param(None, help="CSV/JSONL of path,label for val [default: each image's own folder, however deep]", path=True)
    train_masks: Optional[str] = param(None, help="label masks of train: adds knn-seg mIoU", path=True)
    val_masks: Optional[str] = param(None, help="label masks of val", path=True)
    k: int = param(20, help="neighbours of the k-NN classifier", ge=1)
    seg_k: int = param(30, help="neighbours per patch of knn-seg", ge=1)
    ignore_index: int = param(255, help="mask value that is not scored")
    batch_size: int = param(64, help="images per forward pass of the monitor", ge=1)
    max_images: int = param(200, help="the first N images of each monitor folder (cost control); 0 = all", ge=0)

    def check(self) -> list[tuple[str, str]]:
        if self.every and (self.train is None or self.val is None):
            return [("train", "and train.monitor.val are needed when train.monitor.every is set")]
        return []


@dataclass
class TrainConfig:
    precision: Literal["auto", "fp32", "bf16", "fp16", "fp16_or_bf16"] = param(
        "auto", help="mixed precision: auto = bf16 autocast on CUDA, fp32 elsewhere; fp16 needs CUDA; fp16_or_bf16 "
                     "is fp16 on CUDA and bf16 elsewhere")
    compile: bool = param(False, help="torch.compile every backbone (in place: checkpoints keep their key names); "
                                      "the first steps are slower while it compiles")
    checkpoint_every: int = param(1000, help="steps between checkpoints (one is always written at the end)", ge=1)
    keep_checkpoints: int = param(2, help="newest checkpoints kept on disk", ge=1)
    log_every: int = param(10, help="steps between metrics.jsonl lines", ge=1)
    bank_health_every: int = param(100, help="steps between memory-bank health records in metrics.jsonl "
                                             "(see `mlsctl bank inspect`); 0 = never", ge=0)
    monitor: MonitorConfig = param(MonitorConfig(), help="quality of the teacher measured during training")
    log_with: list[Literal["tensorboard", "wandb", "mlflow", "aim"]] = param(
        [], help="experiment trackers that also receive every metrics.jsonl record (Accelerate's trackers; "
                 "pip install 'mlsctl[NAME]')")


DEFAULT_METHOD = "dino"  # the method of a recipe without method.name


@dataclass
class MethodConfig:
    """Base of every method's own config; ``name`` picks the method."""

    name: str = param(DEFAULT_METHOD, help="the method (see mlsctl.methods)")


@dataclass
class Recipe:
    format_version: int = param(RECIPE_FORMAT_VERSION, help="recipe schema version", ge=1)
    description: str = param("", help="one line shown by `mlsctl recipes`")
    seed: int = param(0, help="seeds data order, augmentation and initialisation", ge=0, le=2**32 - 1)
    data: DataConfig = param(DataConfig(), help="images and augmentation")
    model: ModelConfig = param(ModelConfig(), help="backbone")
    optim: OptimConfig = param(OptimConfig(), help="optimiser and schedules")
    train: TrainConfig = param(TrainConfig(), help="loop, precision, checkpoints, logging")
    method: MethodConfig = param(MethodConfig(), help="the method and its hyper-parameters")

    def check(self) -> list[tuple[str, str]]:
        if self.format_version > RECIPE_FORMAT_VERSION:
            return [("format_version", f"is {self.format_version}, newer than this mlsctl reads "
                     f"({RECIPE_FORMAT_VERSION}); upgrade mlsctl")]
        patch = self.model.patch_size
        if self.model.img_size % patch:
            return [("model.img_size", f"{self.model.img_size} is not a multiple of model.patch_size {patch}")]
        for name in ("global_crops", "local_crops"):
            crops = getattr(self.data, name)
            if crops.count and crops.size % patch:
                fix = max(patch, round(crops.size / patch) * patch)
                return [(f"data.{name}.size", f"{crops.size} is not a multiple of model.patch_size {patch}; try {fix}")]
        return []


# --------------------------------------------------------------------------------------------
# Validation.


class _Context:
    def __init__(self, source: str, overrides: dict[str, str]):
        self.source = source
        self.overrides = overrides

    def fail(self, path: str, message: str) -> ConfigError:
        for key, text in self.overrides.items():
            if path == key or path.startswith((key + ".", key + "[")) or key.startswith(path + "."):
                return ConfigError(f"command-line override '{text}': {message}")
        # a check across keys (optim.warmup_epochs against optim.epochs): the override it names
        named = [text for key, text in self.overrides.items() if re.search(rf"(?<![\w.]){re.escape(key)}(?![\w.])", message)]
        if named:
            return ConfigError(f"{self.source} with the command-line override '{named[0]}': {message}")
        return ConfigError(f"{self.source}: {message}")


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "text"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        return " or ".join(_describe(a) for a in inner) + " or null"
    if origin is tuple:
        args = get_args(tp)
        return f"a list of {len(args)} {_plural(_describe(args[0]))}"
    if origin is list:
        return f"a list of {_plural(_describe(get_args(tp)[0]))}"
    if origin is dict or is_dataclass(tp) or tp is dict:
        return "a mapping"
    return str(tp)


def _plural(description: str) -> str:
    if description.startswith("one of "):
        return "items from " + description[len("one of "):]
    return {"a number": "numbers", "an integer": "integers", "text": "strings"}.get(description, description)


def _show(value: Any) -> str:
    if isinstance(value, str):  # (a whole foreign file read as YAML is one string: the sentence quotes its start)
        return repr(value if len(value) <= 80 else value[:77] + "...")
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list) and len(value) <= 8 and all(isinstance(v, (int, float, str, bool)) or v is None
                                                         for v in value):
        return "[" + ", ".join(_show(v) for v in value) + "]"  # short lists as written: "got [0.4]"
    if isinstance(value, (dict, list)):
        return "a " + type(value).__name__.replace("dict", "mapping")
    return str(value)


def _bracket_hint(value: Any, length: int) -> str:
    """For a single value given where a list belongs: how to write the list (``[tensorboard]``)."""
    if isinstance(value, (list, tuple, dict)) or value is None:
        return ""
    shown = value if isinstance(value, str) else _show(value)
    if length == 1:
        return f"; write a list in brackets: [{shown}]"
    return f"; write its {length} values in brackets: [{shown}, ...]"


_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _bounds_error(value: float, meta: dict) -> Optional[str]:
    if meta.get("ge") is not None and value < meta["ge"]:
        return f"must be >= {meta['ge']}"
    if meta.get("gt") is not None and value <= meta["gt"]:
        return f"must be > {meta['gt']}"
    if meta.get("le") is not None and value > meta["le"]:
        return f"must be <= {meta['le']}"
    if meta.get("lt") is not None and value >= meta["lt"]:
        return f"must be < {meta['lt']}"
    return None


def _coerce(value: Any, tp: Any, path: str, meta: dict, ctx: _Context, default: Any = None) -> Any:
    """``value`` read from YAML or ``key=value`` at ``path``, as the schema's type ``tp`` (checked against the field's
    bounds in ``meta``), or the one sentence of :meth:`_Context.fail` naming the key and what it must be."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if is_dataclass(tp):
        return _build(tp, value, path, ctx, default)
    if origin in (Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, inner[0], path, meta, ctx)
    if origin is Literal:
        return _coerce_choice(value, tp, path, ctx)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ctx.fail(path, f"'{path}' must be true or false, got {_show(value)}")
    if tp in (int, float):
        return _coerce_number(value, tp, path, meta, ctx)
    if tp is str:
        return _coerce_text(value, path, meta, ctx)
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ctx.fail(path, f"'{path}' must be {_describe(tp)}, got {_show(value)}{_bracket_hint(value, len(args))}")
        return tuple(_coerce(v, a, f"{path}[{i}]", meta, ctx) for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        return _coerce_list(value, tp, path, meta, ctx)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ctx.fail(path, f"'{path}' must be a mapping, got {_show(value)}")
        args = get_args(tp) or (str, Any)
        return {str(k): _coerce(v, args[1], f"{path}.{k}", meta, ctx) for k, v in value.items()}
    raise TypeError(f"unsupported schema type {tp!r} at {path}")  # a bug in the schema, not user input


def _coerce_choice(value: Any, tp: Any, path: str, ctx: _Context) -> Any:
    """One of a ``Literal``'s choices, of the choices' type; else the sentence, with the closest choice."""
    choices = get_args(tp)
    if value in choices and type(value) is type(choices[0]):
        return value
    message = f"'{path}' must be {_describe(tp)}, got {_show(value)}"
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
    if close:
        message += f"; did you mean '{close[0]}'?"
    raise ctx.fail(path, message)


def _coerce_number(value: Any, tp: type, path: str, meta: dict, ctx: _Context) -> int | float:
    """An int or a float (text that reads as a number too: ``key=1e-3``), finite, an int only if whole, within the
    field's bounds; true and false are not numbers."""
    number: Any = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, (int, float)):
        number = value
    elif isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
        number = float(value)
    if tp is int and isinstance(number, float):
        number = int(number) if math.isfinite(number) and number.is_integer() else None
    if number is None or (isinstance(number, float) and not math.isfinite(number)):
        raise ctx.fail(path, f"'{path}' must be {_describe(tp)}, got {_show(value)}")
    number = float(number) if tp is float else number
    problem = _bounds_error(number, meta)
    if problem:
        raise ctx.fail(path, f"'{path}' {problem}, got {number}")
    return number


def _coerce_text(value: Any, path: str, meta: dict, ctx: _Context) -> str:
    """Text; a path field is never empty."""
    if isinstance(value, str) and meta.get("path") and not value.strip():
        # '' would be the current folder: data.root= trained on whatever folder the command ran in
        raise ctx.fail(path, f"'{path}' is empty; give a path, or null to leave it unset")
    if isinstance(value, str):
        return value
    raise ctx.fail(path, f"'{path}' must be text, got {_show(value)} (quote it in YAML)")


def _coerce_list(value: Any, tp: Any, path: str, meta: dict, ctx: _Context) -> list:
    """A list of the element type; a lone value gets the hint of brackets, or of the closest choice."""
    (arg,) = get_args(tp)
    if not isinstance(value, (list, tuple)):
        hint = _bracket_hint(value, 1)
        choices = [str(c) for c in get_args(arg)] if get_origin(arg) is Literal else None
        if choices and isinstance(value, str) and "," not in value and value not in choices:
            # the bracket hint alone advised [tensorboardd], itself refused (a new user's probe, 2026-12-07)
            close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
            hint = f"; did you mean [{close[0]}]?" if close else f"; write a list in brackets of {', '.join(choices)}"
        raise ctx.fail(path, f"'{path}' must be {_describe(tp)}, got {_show(value)}{hint}")
    return [_coerce(v, arg, f"{path}[{i}]", meta, ctx) for i, v in enumerate(value)]


def _all_paths(cls: type, prefix: str = "") -> list[str]:
    out = []
    for f in fields(cls):
        path = f"{prefix}{f.name}"
        out.append(path)
        tp = get_type_hints(cls)[f.name]
        if is_dataclass(tp) and tp is not MethodConfig:
            out.extend(_all_paths(tp, path + "."))
    return out


def _unknown_key(cls: type, key: str, path: str, ctx: _Context) -> ConfigError:
    names = [f.name for f in fields(cls)]
    where = path.rsplit(".", 1)[0] if "." in path else ""
    takes = f"{where or 'a recipe'} takes {', '.join(names)}"
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        suggestion = f"{where + '.' if where else ''}{close[0]}"
    else:
        candidates = _all_paths(Recipe)
        by_leaf = [p for p in candidates if p.rsplit(".", 1)[-1] == key]
        close_full = by_leaf or difflib.get_close_matches(path, candidates, n=1, cutoff=0.7)
        suggestion = close_full[0] if close_full else ""
    message = f"unknown key '{path}' ({takes})"
    # not under method: cribo's method.iterations is a typo of its cluster or Sinkhorn iterations
    step_counts = ("steps", "max_steps", "iterations", "max_iters", "num_steps", "epochs")
    if key in step_counts and not path.startswith("method."):
        # other trainers count steps; here a run's length is its epochs (a new user's run-through, 2026-12-06)
        return ctx.fail(path, message + "; a run's length is optim.epochs (its steps: epochs x images / "
                                        "optim.batch_size, printed when it starts)")
    owners = [name for name in registry.names() if path == f"method.{key}"
              and key in {f.name for f in fields(registry.config_class(name))}]
    if owners:  # another method's key on this one's recipe (a new user's probe, 2026-12-06)
        recipes = [stem for stem in shipped_recipes() if stem.startswith(owners[0] + "_")]
        return ctx.fail(path, message + f"; '{key}' is a key of {' and '.join(owners)}: remove it, or start from a "
                                        f"recipe of {owners[0]}" + (f" ({', '.join(recipes[:2])})" if recipes else ""))
    if suggestion:
        message += f"; did you mean '{suggestion}'?"
    else:
        message += "; remove it"
    return ctx.fail(path, message)


def _key_of_another_method(key: str, name: str) -> bool:
    return any(key in {f.name for f in fields(registry.config_class(other))} for other in registry.names()
               if other != name)


def _other_method_keys(name: str, key_path: str, override: str, ctx: _Context) -> ConfigError:
    """``method.name=cribo`` over a dino recipe: the recipe's method keys are dino's (a new user's
    run-through, 2026-12-06: "unknown key 'method.monitor_bank_size'; remove it", a key of the
    shipped recipe that no override can remove)."""
    ours = [stem for stem in shipped_recipes() if stem == name or stem.startswith(name + "_")]
    start = (f"start from a {name} recipe ({', '.join(ours[:3])}; mlsctl recipes lists them)" if ours
             else f"start from a recipe of {name}")
    return ConfigError(f"command-line override '{override}': {ctx.source} holds the method keys of its own method "
                       f"('{key_path}' is not a key of {name}), which an override cannot take away; {start}")


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _build(cls: type, data: Any, path: str, ctx: _Context, default: Any = None) -> Any:
    """Validate ``data`` into ``cls``; keys it leaves out keep the values of ``default`` (the
    enclosing field's default instance), so ``local_crops: {count: 4}`` keeps the local size."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ctx.fail(path, f"'{path or 'the recipe'}' must be a mapping of keys, got {_show(data)}")
    method_section = cls is MethodConfig
    if method_section:
        cls = _method_config_class(data, path, ctx)
        default = None
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            key_path = f"{path}.{key}" if path else str(key)
            if (method_section and f"{path}.name" in ctx.overrides and key_path not in ctx.overrides
                    and _key_of_another_method(str(key), data["name"])):
                raise _other_method_keys(data["name"], key_path, ctx.overrides[f"{path}.name"], ctx)
            raise _unknown_key(cls, str(key), key_path, ctx)
    values = {}
    for name, f in known.items():
        field_default = getattr(default, name) if default is not None else _field_default(f)
        if name in data:
            values[name] = _coerce(data[name], hints[name], f"{path}.{name}" if path else name, dict(f.metadata), ctx,
                                   field_default if is_dataclass(field_default) else None)
        elif hints[name] is MethodConfig:  # no method section: the default method's keys, at their defaults
            values[name] = _build(MethodConfig, {}, f"{path}.{name}" if path else name, ctx)
    obj = dataclasses.replace(default, **values) if default is not None else cls(**values)
    check = getattr(obj, "check", None)
    if check is not None:
        for key, message in check():
            key_path = f"{path}.{key}" if path else key
            raise ctx.fail(key_path, f"'{key_path}' {message}")
    return obj


def _method_config_class(data: dict, path: str, ctx: _Context) -> type:
    name = data.get("name", MethodConfig.name)
    available = registry.names()
    if not isinstance(name, str) or name not in available:
        message = f"'{path}.name' must be one of {', '.join(available)}, got {_show(name)}"
        close = difflib.get_close_matches(str(name), available, n=1, cutoff=0.5)
        if close:
            message += f"; did you mean '{close[0]}'?"
        raise ctx.fail(f"{path}.name", message)
    return registry.config_class(name)


# --------------------------------------------------------------------------------------------
# Loading, overrides, dumping.


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["optim.lr=1e-4"]`` → ``{"optim.lr": "optim.lr=1e-4"}`` (key → original text). A key given
    twice: the last one counts, as scripts composing a profile's overrides and a cell's rely on
    (:func:`repeated_overrides` names them, for the commands to say)."""
    out = {}
    for i, item in enumerate(items):
        key, sep, value = item.partition("=")
        key = key.strip()
        # `data.root = x` reaches us as three words, `data.root= x` as two (a new user's run-through, 2026-12-06)
        before = (not sep and i + 1 < len(items) and items[i + 1].startswith("=")) or (
            sep and not value and i + 1 < len(items) and "=" not in items[i + 1])
        if item.startswith("=") and (i == 0 or ("=" in items[i - 1] and not items[i - 1].endswith("="))):
            # not the value of the word before
            raise ConfigError(f"override '{item}' begins with '=' and follows no key of its own; write each override "
                              f"as one word, key=VALUE")
        if before or item.startswith("="):
            start = i - 1 if item.startswith("=") else i
            words = [items[start]]  # the key, then the words up to and including the value
            for word in items[start + 1:]:
                words.append(word)
                if word != "=":
                    break
            name = items[start].partition("=")[0].strip() or "key"
            raise ConfigError(f"override '{' '.join(words)}' has spaces around '=': write it as one word, "
                              f"{name}=VALUE")
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            raise ConfigError(f"override '{item}' must look like key.sub=value (for example optim.lr=1e-4)")
        glued = _glued_key(_parse_scalar(value))
        if glued is not None:  # {embed_dim:64} is YAML for the key "embed_dim:64" (a new user's probe, 2026-12-07)
            name, _, rest = glued.partition(":")
            raise ConfigError(f"override '{item}' gives the key '{glued}': YAML needs a space after the colon, as in "
                              f"{{{name}: {rest}}}")
        out.pop(key, None)  # applied where it was given last: after a mapping given since that sets it too
        out[key] = item
    return out


def _glued_key(value: Any) -> Optional[str]:
    """A mapping's key, at any depth, that YAML read from ``name:value`` without a space (its value
    None), or None."""
    if isinstance(value, dict):
        for key, inner in value.items():
            if inner is None and isinstance(key, str) and re.fullmatch(r"[A-Za-z_][\w.]*:\S.*", key):
                return key
            found = _glued_key(inner)
            if found is not None:
                return found
    elif isinstance(value, list):
        return next((found for found in map(_glued_key, value) if found is not None), None)
    return None


def _override_reach(item: str, method_name: Optional[str] = None) -> tuple[list[str], list[str]]:
    """What the override ``item`` sets, as :func:`apply_overrides` applies it: (the dotted keys it
    sets, a mapping's followed down to its leaves; the keys whose whole value it replaces, with all
    that was set below them). A mapping that merges into a section replaces nothing; one that
    does not (a free-form mapping, the method section switched from ``method_name``, the method the
    recipe names at that point) replaces its key, as a value does."""
    key, _, text = item.partition("=")
    key = key.strip()
    value = _parse_scalar(text)

    def leaves(path: str, node: Any) -> list[str]:
        if isinstance(node, dict) and node:
            return [leaf for sub, inner in node.items() for leaf in leaves(f"{path}.{sub}", inner)]
        return [path]

    if isinstance(value, dict) and _merges(key.split("."), {"name": method_name} if method_name else {}, value):
        return [leaf for sub, inner in value.items() for leaf in leaves(f"{key}.{sub}", inner)], []
    return leaves(key, value), [key]


def repeated_overrides(items: list[str], method_name: Optional[str] = None) -> list[str]:
    """A note for each key given more than once among ``items`` (the last one counts): the last one
    won without a word (a new user's probe, 2026-12-07). Not refused: scripts compose overrides so.
    A key set through a mapping counts too (``data.global_crops.count=2 data.global_crops={count: 3}``:
    a review, 2026-12-07), and so does one that a later override replaces with the section above it
    (``model.timm_kwargs.depth=2 model.timm_kwargs={}``, or ``method={name: dino}`` where the recipe's
    method is another: ``method_name``, the recipe's own, before the overrides); a mapping given twice
    for one key is said as that key, whose last mapping alone counts."""
    last = parse_overrides(items)
    reach = []
    for item in items:  # the method named as each override comes: a switch replaces the section, a repeat merges
        reach.append(_override_reach(item, method_name))
        key, _, text = item.partition("=")
        value = _parse_scalar(text)
        if key.strip() == "method.name" and isinstance(value, str):
            method_name = value
        elif key.strip() == "method" and isinstance(value, dict) and isinstance(value.get("name"), str):
            method_name = value["name"]
    touched: dict[str, list[str]] = {}  # a leaf → the overrides that set or replace it, from the first that sets it
    for i, (leaves, _) in enumerate(reach):
        for leaf in leaves:
            if leaf in touched:
                continue
            touched[leaf] = [item for item, (others, replaced) in zip(items[i:], reach[i:])
                             if leaf in others or any(leaf == r or leaf.startswith(r + ".") for r in replaced)]
    notes: dict[str, str] = {}
    seen: dict[str, list[str]] = {}
    for item in items:
        seen.setdefault(item.partition("=")[0].strip(), []).append(item)
    for key, given in seen.items():
        if len(given) > 1:
            notes[key] = f"note: {key} is given {len(given)} times ({', '.join(given)}); the last one, {last[key]}, counts"
    for leaf, given in touched.items():
        if len({item.partition("=")[0].strip() for item in given}) > 1:  # one key given twice: said as that key
            notes[leaf] = (f"note: {leaf} is given {len(given)} times ({', '.join(given)}); the last one, {given[-1]}, "
                           f"counts")
    return list(notes.values())


def _parse_scalar(text: str) -> Any:
    try:
        return bounded_yaml(text, "command-line override") if text.strip() else ""
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: dict[str, str]) -> dict:
    """The recipe ``data`` with ``overrides`` applied in order. A mapping given for a section of the
    schema merges into it, key by key: ``data.global_crops={count: 2}`` sets the count and keeps the
    recipe's size and scale, as ``data.global_crops.count=2`` does (it replaced the section, so the keys
    it did not name fell back to their defaults without a word: a new user's probe, 2026-12-07). A
    free-form mapping (``model.timm_kwargs``) is replaced, so ``{}`` clears it; so is the method
    section given another method's ``name`` (``method={name: dino}`` switches methods)."""
    data = _copy(data)
    for key, item in overrides.items():
        value = _parse_scalar(item.partition("=")[2])
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        current = node.get(parts[-1])
        if isinstance(value, dict) and isinstance(current, dict) and _merges(parts, current, value):
            node[parts[-1]] = _merged(current, value)
        else:
            node[parts[-1]] = value
    return data


def _merges(parts: list[str], current: dict, value: dict) -> bool:
    """Whether a mapping ``value`` given for the key ``parts`` merges into ``current``: where the
    schema makes that key a section (a dataclass), not a free-form mapping, and, for the method
    section, where ``value`` names no other method."""
    if parts == ["method"] and "name" in value and value["name"] != current.get("name"):
        return False
    cls: Any = Recipe
    for part in parts:
        if cls is MethodConfig or not is_dataclass(cls):  # a method's own keys: sections where they are mappings
            return True
        hints = get_type_hints(cls)
        if part not in hints:
            return True  # an unknown key: refused by name when the recipe is checked
        cls = hints[part]
        if get_origin(cls) in (Union, types.UnionType):
            cls = next((a for a in get_args(cls) if a is not type(None)), cls)
    return is_dataclass(cls)


def _merged(base: dict, update: dict) -> dict:
    """``base`` with ``update``'s keys set, mappings merged the same way, depth by depth."""
    out = dict(base)
    for key, value in update.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def from_dict(data: Any, source: str = "recipe", overrides: Optional[dict[str, str]] = None) -> Recipe:
    overrides = overrides or {}
    ctx = _Context(source, overrides)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a recipe must be a mapping of keys, got {_show(data)}")
    return _build(Recipe, apply_overrides(data, overrides), "", ctx)


def recipe_dirs() -> list[Path]:
    """Where shipped recipes live: the source tree (editable installs) or share/mlsctl/recipes."""
    candidates = [Path(__file__).resolve().parent.parent / "recipes", Path(sys.prefix) / "share" / "mlsctl" / "recipes"]
    return [p for p in candidates if p.is_dir()]


def shipped_recipes() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for directory in recipe_dirs():
        for path in sorted(directory.glob("*.yaml")):
            found.setdefault(path.stem, path)
    return found


def resolve_recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if not path.exists() and stem in shipped and len(path.parts) <= 2:
        return shipped[stem]
    if path.is_dir():
        if (path / "config.yaml").is_file():  # a run folder (a new user's probe, 2026-12-06: `pretrain runs/x --resume`)
            raise ConfigError(f"{name_or_path} is a folder; a run's recipe is its config.yaml: give "
                              f"{path / 'config.yaml'} (with --out {path} --resume to continue that run)")
        raise ConfigError(f"{name_or_path} is a folder; give a recipe YAML file (see `mlsctl recipes`)")
    close = difflib.get_close_matches(stem, list(shipped), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else "; `mlsctl recipes` lists the shipped ones"
    raise ConfigError(f"recipe {name_or_path} not found{hint}")


# A recipe is a page of YAML: these bounds refuse resource bombs (a "billion laughs" of nested
# aliases, a gigabyte file, nesting that overflows the parser) in one sentence.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000


def _expanded_values(root: yaml.Node, source: str) -> int:
    """Values the document holds once every alias is expanded (stops counting past the bound)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError(f"{source}: a YAML alias refers to a value that contains it; write the recipe "
                              f"without recursive aliases")
        active.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            for child in node.value:
                total += size(child)
                if total > MAX_YAML_VALUES:
                    break
        elif isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                total += size(k) + size(v)
                if total > MAX_YAML_VALUES:
                    break
        active.discard(key)
        sizes[key] = min(total, MAX_YAML_VALUES + 1)
        return sizes[key]

    return size(root)


def _refuse_duplicate_keys(root: yaml.Node, source: str) -> None:
    """A key twice in one mapping: PyYAML keeps the last, so the first's settings were lost without a
    word (a second ``optim:`` section replaced the first whole)."""
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:  # an alias: walked once
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                    if key.value in keys:
                        raise ConfigError(f"{source} line {key.start_mark.line + 1}: the key '{key.value}' is given "
                                          f"again (first at line {keys[key.value] + 1}), which would silently replace "
                                          f"it; keep one")
                    keys[key.value] = key.start_mark.line
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def bounded_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load(text)``, refusing documents whose aliases expand past
    :data:`MAX_YAML_VALUES` values (raises :class:`yaml.YAMLError` for bad syntax)."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise ConfigError(f"{source} nests its values too deeply to read; write it flatter") from None
        if node is None:
            return None
        _refuse_duplicate_keys(node, source)
        if _expanded_values(node, source) > MAX_YAML_VALUES:
            raise ConfigError(f"{source}: its YAML aliases expand to more than {MAX_YAML_VALUES:,} values (an alias "
                              f"bomb?); write the recipe without nested aliases")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: Path) -> Any:
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise ConfigError(f"{path} is {size:,} bytes, too large for a recipe (at most {MAX_YAML_BYTES:,}); "
                              f"point at the recipe YAML file")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; point at a recipe YAML file") from None
    try:
        data = bounded_yaml(text, str(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid syntax"
        raise ConfigError(f"{path} is not valid YAML{where} ({problem}); fix the syntax") from None
    if data is None:  # an empty file trained (or showed) every default, silently (a probe, 2026-12-06)
        raise ConfigError(f"{path} is empty (or holds only comments); a recipe is a YAML mapping of keys: start from "
                          f"a shipped one (mlsctl recipes)")
    return data


def load_recipe(name_or_path: str, overrides: Optional[list[str]] = None, data: Any = None) -> Recipe:
    """A recipe file with ``overrides``; ``data``: the file as :func:`read_yaml` read it, where the caller
    has read it already (it is not read again)."""
    path = resolve_recipe_path(name_or_path)
    return from_dict(read_yaml(path) if data is None else data, source=str(path),
                     overrides=parse_overrides(overrides or []))


def method_named(data: Any) -> Optional[str]:
    """The method a recipe's YAML (:func:`read_yaml`) names (``method.name``), before any override; None where
    it names none."""
    method = data.get("method") if isinstance(data, dict) else None
    name = method.get("name") if isinstance(method, dict) else None
    return name if isinstance(name, str) else None


def is_run_recipe(path: str | Path) -> bool:
    """Whether ``path`` is a run's own resolved recipe (:func:`mlsctl.runs.run_of_config`)."""
    from mlsctl.runs import run_of_config

    return run_of_config(path) is not None


def load_recipe_or_run(path: str | Path, overrides: Optional[list[str]] = None, data: Any = None) -> Recipe:
    """A recipe file, or a run's own recipe read as the run saved it (:func:`load_run_recipe`); ``data``: the
    file as :func:`read_yaml` read it, where the caller has read it already (for :func:`method_named`)."""
    return (load_run_recipe if is_run_recipe(path) else load_recipe)(str(path), overrides, data)


def load_run_recipe(path: str | Path, overrides: Optional[list[str]] = None, data: Any = None) -> Recipe:
    """A run's saved recipe (``RUN/config.yaml``, a checkpoint's ``recipe.yaml``), with ``overrides``.
    A run stores every key, so a key its file lacks did not exist when it was trained: it takes the
    value that run's code computed with, ``SAVED_DEFAULTS`` of the method's config class, where a
    default changed later (refine's ``input_scale``: ``sqrt_d`` before 2026-12-06, ``none`` since),
    else today's default. ``data``: the file as :func:`read_yaml` read it, where the caller has read it
    already (left as it is)."""
    path = Path(path)
    data = read_yaml(path) if data is None else data
    name = method_named(data)
    if name in registry.names():
        method = data["method"]
        saved = getattr(registry.config_class(name), "SAVED_DEFAULTS", {})
        data = {**data, "method": {**method, **{key: value for key, value in saved.items() if key not in method}}}
    return from_dict(data, source=str(path), overrides=parse_overrides(overrides or []))


def absolute_paths(obj: Any) -> Any:
    """A copy of a recipe (or any schema dataclass) whose path fields (``param(path=True)``) are
    absolute, resolved against the current directory; what a run stores in its config.yaml."""
    import os

    if not is_dataclass(obj):
        return obj
    changes = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            changes[f.name] = absolute_paths(value)
        elif f.metadata.get("path") and isinstance(value, str) and value:
            changes[f.name] = os.path.abspath(os.path.expanduser(value))
    return dataclasses.replace(obj, **changes)


def path_values(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, value) of every set path field (``param(path=True)``) of a recipe or schema dataclass."""
    found = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            found += path_values(value, f"{prefix}{f.name}.")
        elif f.metadata.get("path") and isinstance(value, str) and value:
            found.append((f"{prefix}{f.name}", value))
    return found


def check_paths_beside_recipe(recipe: Any, recipe_file: str | Path, overridden: Sequence[str] = ()) -> None:
    """Refuse a relative path of the recipe file that names nothing from the current folder, which relative
    paths are read from, but something beside the recipe: ``data.root: inshop/img`` in /tmp/probe22/my.yaml
    run from /tmp was "/tmp/inshop/img does not exist; check the path" (a new user's probe, 2026-12-07). A
    path given on the command line (``overridden``) is the shell's, read from the current folder as typed."""
    import os

    folder = Path(recipe_file).parent
    if not Path(recipe_file).is_file() or folder.resolve() == Path.cwd().resolve():
        return
    for key, value in path_values(recipe):
        path = os.path.expanduser(value)
        typed = any(key == given or key.startswith(given + ".") for given in overridden)  # data={root: x} too
        if typed or os.path.isabs(path) or os.path.exists(path) or not (folder / path).exists():
            continue
        raise UserError(f"{recipe_file}: {key} {value} does not exist in the current folder {Path.cwd()}, which "
                        f"relative paths are read from; {folder.resolve() / path} exists beside the recipe: run from "
                        f"{folder.resolve()} or give an absolute path")


def to_dict(recipe: Any) -> dict:
    def convert(value: Any) -> Any:
        if is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(recipe)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False, default_flow_style=None)


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    atomic.write_text(path, dump_recipe(recipe))


def recipe_keys(recipe: Recipe, given: Any = None) -> list[dict]:
    """Every key of a resolved recipe, in schema order, with what documents it: ``key`` (the dotted
    path an override names), ``value``, ``set_by`` ("recipe" when ``given``, the recipe's YAML as
    read, sets it; else "default"), ``type`` (what the key takes, as error messages word it) and
    ``help`` (the field's one line). What ``mlsctl recipes --show`` prints."""
    rows: list[dict] = []

    def sets(path: list[str]) -> bool:
        node = given
        for part in path:
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    def walk(obj: Any, path: list[str]) -> None:
        hints = get_type_hints(type(obj))
        for f in fields(obj):
            value = getattr(obj, f.name)
            if is_dataclass(value):
                walk(value, path + [f.name])
                continue
            rows.append({"key": ".".join(path + [f.name]), "value": to_dict(value) if isinstance(value, (list, tuple, dict))
                         else value, "set_by": "recipe" if sets(path + [f.name]) else "default",
                         "type": _describe(hints[f.name]) + _bounds_text(f.metadata), "help": f.metadata.get("help", "")})

    walk(recipe, [])
    return rows


def _bounds_text(meta: Any) -> str:
    bounds = [f"{sign} {meta[key]}" for key, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
              if meta.get(key) is not None]
    return f" ({', '.join(bounds)})" if bounds else ""


def differences(a: Recipe, b: Recipe, prefix: str = "") -> list[str]:
    """Key paths whose values differ between two recipes (for resume checks)."""
    da, db = to_dict(a), to_dict(b)
    out: list[str] = []

    def walk(x: Any, y: Any, path: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for key in list(x) + [k for k in y if k not in x]:
                walk(x.get(key), y.get(key), f"{path}.{key}" if path else key)
        elif x != y:
            out.append(path)

    walk(da, db, prefix)
    return out
