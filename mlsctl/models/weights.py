"""Reading backbone weights from local files, whatever layout wrote them.

Accepted files: ``.safetensors`` and ``.pth``/``.pt``/``.bin`` (read with
``torch.load(weights_only=True)``: no code from the file runs). Accepted layouts:

* timm / plain DINO release files: ``cls_token``, ``blocks.0.attn.qkv.weight`` ...;
* DINO and CrIBo training checkpoints: ``{"teacher": {"backbone.xxx" | "module.backbone.xxx"}, ...}``
  (the teacher is taken, as those papers evaluate it);
* mlsctl run checkpoints: ``teacher.backbone.model.xxx``.

Wrappers are removed (``module.``, ``_orig_mod.``, ``backbone.``, ``model.``), heads dropped
(``head``, ``heads``, ``head_obj`` ...). Loading is strict: a mismatch raises a
:class:`~mlsctl.errors.UserError` listing the missing and unexpected keys. A position embedding
of another grid size is resampled (timm's ``resample_abs_pos_embed``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, TypeVar

import torch

from mlsctl.errors import UnreadableWeights, UserError, first_line

CONTAINER_KEYS = ("teacher", "state_dict", "model", "student", "module")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
T = TypeVar("T", bound=torch.nn.Module)
HEAD_PREFIXES = ("head.", "heads.", "head_", "projection_head.", "prototypes.", "predictor.", "dino_head.")


WEIGHTS_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def load_weights_only(path: str | Path):
    """``torch.load(path, weights_only=True)`` onto the CPU, without torch's warning about a pickle
    protocol it did not write ("please file an issue ..."), which is addressed to torch's developers:
    a file of pickle protocol 4 (``pickle.dumps``) either loads or is refused in the caller's sentence."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True)


def check_weights_file(path: str | Path) -> Path:
    """A weights file that exists and has a name this reader takes, else one sentence (checked first,
    before anything is read from it or built for it)."""
    path = Path(path)
    if path.is_dir() and (path / "mlsctl.json").is_file() and (path / "model.safetensors").is_file():
        return path / "model.safetensors"  # a folder of mlsctl export: its weights (their architecture beside them)
    if path.is_dir():
        inside = [name for name in ("teacher.safetensors", "model.safetensors") if (path / name).is_file()]
        hint = f"; did you mean {path / inside[0]}?" if inside else ""
        # a run folder goes elsewhere, by command (a probe, 2026-12-07: embed --weights RUN was sent to --init-from,
        # which only pretrain has)
        raise UserError(f"weights file {path} is a folder; give a .safetensors or .pth file{hint} (a run folder is "
                        f"what --run takes in embed, eval, index build and search; pretrain takes a run or checkpoint "
                        f"with --init-from)")
    if not path.is_file():
        # the shipped recipes name weights/ of the repository relative to the working folder (a new user's
        # run-through, 2026-12-06: run by name from elsewhere, they failed without saying where the file is)
        shipped = Path(__file__).resolve().parents[2] / "weights" / path.name
        if path.parent.name == "weights" and shipped.is_file() and shipped != path.resolve():
            raise UserError(f"weights file {path} does not exist; the repository's is {shipped}: run from the "
                            f"repository's folder, or set model.weights={shipped}")
        raise UserError(f"weights file {path} does not exist; give a local .safetensors or .pth file")
    if path.suffix not in WEIGHTS_SUFFIXES:
        raise UserError(f"weights file {path} must end in .safetensors or .pth")
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = check_weights_file(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = load_weights_only(path)
    except UserError:
        raise
    except Exception as exc:  # torch/safetensors raise many types for foreign or damaged files
        raise UnreadableWeights(path, first_line(exc, 200)) from None
    return _unwrap(state, path)


def _unwrap(state, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(state, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        for key in CONTAINER_KEYS:
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
        else:
            raise UserError(f"{path} holds no tensors under {', '.join(CONTAINER_KEYS)}; is it a model checkpoint?")
    if not isinstance(state, Mapping):
        raise UserError(f"{path} does not hold a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def backbone_state(state: Mapping[str, torch.Tensor], keep_head: bool = False) -> dict[str, torch.Tensor]:
    """Keys of any supported layout → timm ViT keys (heads dropped; with ``keep_head`` timm's own
    ``head.weight``/``head.bias`` stay, the embedding layer of ``model.embedding_dim``)."""
    keys = list(state)
    for prefix in ("teacher.backbone.model.", "teacher.backbone.", "backbone.model."):
        if any(k.startswith(prefix) for k in keys):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    out = {}
    for key, value in state.items():
        for wrapper in WRAPPER_PREFIXES:
            if key.startswith(wrapper):
                key = key[len(wrapper):]
        out[key] = value
    if any(k.startswith("backbone.") for k in out):
        out = {k[len("backbone."):]: v for k, v in out.items() if k.startswith("backbone.")}
    return {k: v for k, v in out.items()
            if not k.startswith(HEAD_PREFIXES) or (keep_head and k in ("head.weight", "head.bias"))}


def _summarise(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def fitted_state(vit: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Timm-layout ``state`` checked against a timm ViT's keys and shapes (a mismatch is a
    :class:`~mlsctl.errors.UserError`), its position embedding resampled to the ViT's grid. Reads
    only names and shapes of ``vit``, so a ViT built on the meta device will do."""
    state = dict(state)
    target = vit.state_dict()
    if "pos_embed" in state and "pos_embed" in target and state["pos_embed"].shape != target["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if getattr(vit, "no_embed_class", False) else getattr(vit, "num_prefix_tokens", 1)
        grid = vit.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=list(grid), num_prefix_tokens=prefix)
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    wrong = sorted(k for k in set(target) & set(state) if target[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys ({_summarise(missing)})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys ({_summarise(unexpected)})")
        if wrong:
            details = [f"{k} {list(state[k].shape)} vs {list(target[k].shape)}" for k in wrong]
            parts.append(f"{len(wrong)} keys of another shape ({_summarise(details)})")
        raise UserError(f"weights in {source} do not fit model.arch: " + "; ".join(parts) + "; "
                        + (_recorded_architecture(source) or "check the architecture: model.arch, model.patch_size and "
                                                             "model.timm_kwargs in a recipe, --model with --weights"))
    return state


def _recorded_architecture(source: str) -> str:
    """What to set for a weights file that records its architecture (mlsctl's exports and weights/ do):
    a new user's run-through (2026-12-06) got 600 characters of key lists and no architecture."""
    from mlsctl.models.source import recorded_model

    try:
        spec = recorded_model(Path(source))
    except UserError:
        return ""
    if not spec or "timm_kwargs" not in spec:
        return ""
    settings = [f"model.arch={spec['arch']}"] + [f"model.{key}={spec[key]}" for key in ("img_size", "patch_size")
                                                 if key in spec]
    settings += [f"model.timm_kwargs.{key}={value}" for key, value in (spec.get("timm_kwargs") or {}).items()]
    return f"the file records its architecture: set {' '.join(settings)}"


def load_into_vit(vit: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strictly load timm-layout ``state`` into a timm ViT, resampling the position embedding."""
    vit.load_state_dict(fitted_state(vit, state, source), strict=True)


# ---------------------------------------------------------------------------------------- loading without initialising
def on_meta(build: Callable[[], T]) -> T:
    """``build()`` with every tensor it creates on the meta device: shapes and dtypes, no memory,
    and no initialisation (random initialisers do nothing there and leave the global random
    generator where it was). Tensors created with an explicit device (memory banks) are real.
    Give the result to :func:`materialise`."""
    with torch.device("meta"):
        return build()


def materialise(module: T, state: Mapping[str, torch.Tensor], build: Callable[[], T]) -> T:
    """``module`` (from :func:`on_meta`) with ``state`` loaded strictly, on the CPU.

    When every parameter and buffer of ``module`` is in its state dict, its tensors are allocated
    uninitialised and strict loading overwrites every one of them: the result equals ``build()``
    followed by ``load_state_dict(state, strict=True)``, without the random initialisation that
    loading would overwrite at once (for a ViT the larger part of building it). (The tensors of
    ``state`` are copied, not assigned: those of a memory-mapped safetensors file are not aligned
    as the allocator aligns its own, and some kernels then round differently.) A module holding
    tensors outside its state dict — non-persistent buffers its constructor computes, such as
    EVA's rotary tables or BEiT's relative position index — is built again by ``build()`` (on the
    CPU, with the global random generator restored afterwards, so that both ways leave it alike)
    and ``state`` loaded into it. A mismatch between ``state`` and the module raises as
    ``load_state_dict(strict=True)`` does."""
    in_state = set(module.state_dict(keep_vars=True))
    tensors = [name for name, _ in module.named_parameters(remove_duplicate=False)]
    tensors += [name for name, _ in module.named_buffers(remove_duplicate=False)]
    if all(name in in_state for name in tensors):
        module.to_empty(device="cpu")
    else:
        with torch.random.fork_rng(devices=[]):
            module = build()
    module.load_state_dict(state, strict=True)
    return module


def built_with(build: Callable[[], T], state: Mapping[str, torch.Tensor]) -> T:
    """``build()`` with ``state`` loaded strictly, without initialising what ``state`` replaces
    (:func:`on_meta`, then :func:`materialise`); for inference: unlike ``build()``, it leaves the
    global random generator where it was."""
    return materialise(on_meta(build), state, build)
