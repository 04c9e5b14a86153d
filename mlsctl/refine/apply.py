"""``mlsctl refine apply``: refine a feature folder with a trained refiner and a context set.

The paper's protocol: the context (the knowledge base the neighbours come from) is the gallery;
in the deep-metric-learning protocol every test embedding is a query against all the others, so
the context is the test set itself. Each embedding of ``FEATS`` takes its k nearest neighbours in
the context (cosine, exact faiss search; k = the run's ``method.neighbours`` unless given) and goes
through the run's blocks (:class:`~mlsctl.methods.refine.model.Refiner`). A query never sees itself: when
the context holds the query's own image (the same file: input root + relative path), that row is
excluded by index (:func:`~mlsctl.methods.refine.neighbours.nearest_neighbours`).

The output is a feature folder in the shard format (:mod:`mlsctl.features`), so ``eval recall``,
``eval knn``, ``index build`` and ``search`` read it unchanged: the same ``files``, ``input_root``,
``preprocessing`` and ``skipped`` as ``FEATS``; ``global`` holds e^T (L2-normalised); ``model``
keeps the source model's record and adds ``refiner`` (run, step, fingerprint, k, context). Its
``fingerprint`` combines the source model's, the refiner's and the context's, so two folders
refined the same way compare as the same model and any other pairing is refused. The folder is
written next to ``--out`` and renamed into place once complete; an existing ``--out`` is replaced
only with ``--overwrite`` and only when it is a feature folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mlsctl import atomic
from mlsctl.console import to_stderr
from mlsctl.errors import UserError


@dataclass
class RefinerRun:
    refiner: "torch.nn.Module"
    cfg: object  # the run's RefineConfig
    run: Path
    step: int
    total_steps: Optional[int]
    fingerprint: str
    train_model: Optional[dict]  # the model record of the features the run trained on (None when moved)
    train_root: Optional[Path] = None  # the run's data.root: the features it trained on

    @property
    def dim(self) -> int:
        return self.refiner.dim


def load_refiner(run_dir: str | Path, step: Optional[int] = None) -> RefinerRun:
    """The refiner of a ``refine train`` run's latest checkpoint (or of its checkpoint at ``step``, when
    that one is kept), in eval mode."""
    from mlsctl.methods.refine.model import Refiner
    from mlsctl.models.source import fingerprint
    from mlsctl.restore import open_run, read_checkpoint_weights, recipe_of

    run = open_run(run_dir, hint="give the --out of mlsctl refine train")
    recipe = recipe_of(run)
    if recipe.method.name != "refine":
        raise UserError(f"{run_dir} is a run of method {recipe.method.name}, not a refinement; give the --out of mlsctl refine train")
    checkpoint = run.latest() if step is None else next((c for c in run.checkpoints() if c.step == step), None)
    if checkpoint is None and step is not None:
        raise UserError(f"run {run_dir} keeps no checkpoint at step {step}")
    if checkpoint is None:
        raise UserError(f"run {run_dir} has no checkpoint yet; wait for its first one (or finish it with mlsctl refine "
                        f"train ... --resume)")
    state = checkpoint.state()
    weights = read_checkpoint_weights(checkpoint.model_path)  # a damaged, missing or unreadable file: one sentence
    own = {k[len("refiner."):]: v for k, v in weights.items() if k.startswith("refiner.")}
    cfg = recipe.method
    if "blocks.0.q.weight" not in own:
        raise UserError(f"{checkpoint.model_path} holds no refiner blocks; is {run_dir} a refine run?")
    refiner = Refiner.of_config(own["blocks.0.q.weight"].shape[1], cfg)
    refiner.load_state_dict(own, strict=True)
    train_model = None
    manifest = Path(recipe.data.root or "") / "manifest.json"
    if recipe.data.root and manifest.is_file():
        try:
            train_model = json.loads(manifest.read_text()).get("model")
        except (OSError, ValueError):
            train_model = None
    # the weights; input_scale (not a weight) joins it when not sqrt_d, the computation of every run made before
    # input_scale existed (their fingerprints stay as they were)
    identity = fingerprint(refiner)
    if cfg.input_scale != "sqrt_d":
        identity = hashlib.sha256(f"{identity}|input_scale={cfg.input_scale}".encode()).hexdigest()
    return RefinerRun(refiner.eval(), cfg, run.root, checkpoint.step, state.get("total_steps"), identity, train_model,
                      Path(recipe.data.root) if recipe.data.root else None)


@torch.no_grad()
def refine(refiner, queries: torch.Tensor, context: torch.Tensor, k: int, exclude: Optional[torch.Tensor] = None,
           batch: int = 1024, trace: bool = False, progress: bool = False):
    """e^T of every query (its k neighbours searched in ``context``); with ``trace`` also the
    states e⁰..e^T [T+1, n, d1], the attention of every block [T, n, k] and the neighbour rows [n, k]."""
    from tqdm import tqdm

    from mlsctl.methods.refine.neighbours import nearest_neighbours

    rows, _ = nearest_neighbours(queries, context, k, exclude, progress=progress)
    context = torch.nn.functional.normalize(context.float(), dim=-1)
    outs, states, attentions = [], [], []
    for start in tqdm(range(0, len(queries), batch), desc="refine", unit="batch", disable=not progress):
        q, n = queries[start:start + batch], context[rows[start:start + batch]]
        if trace:
            out, s, a = refiner(q, n, trace=True)
            states.append(torch.stack(s))
            attentions.append(torch.stack(a) if a else torch.empty(0, len(q), k))
        else:
            out = refiner(q, n)
        outs.append(out)
    refined = torch.cat(outs) if outs else torch.empty(0, refiner.out_dim)
    if trace:
        return refined, torch.cat(states, dim=1), torch.cat(attentions, dim=1), rows
    return refined


def self_rows(queries, context) -> torch.Tensor:
    """For every row of ``queries`` the row of ``context`` holding the same image file, or -1."""
    where = {os.path.normpath(os.path.join(str(context.input_root), f)): i for i, f in enumerate(context.files)}
    return torch.tensor([where.get(os.path.normpath(os.path.join(str(queries.input_root), f)), -1)
                         for f in queries.files], dtype=torch.long)


def check_dims(loaded: RefinerRun, features, what: str) -> None:
    if features.dim != loaded.dim:
        raise UserError(f"{what} {features.path} holds {features.dim}-d features, but run {loaded.run} refines "
                        f"{loaded.dim}-d embeddings; give features of the model the run was trained on")


def open_inputs(run_dir, feats_dir, context_dir=None):
    """(refiner run, features, context features — the features themselves by default), widths checked."""
    from mlsctl.features import Features

    loaded = load_refiner(run_dir)
    features = Features(feats_dir, "features")
    context = Features(context_dir, "context features") if context_dir is not None else features
    for folder, role in ((features, "features"), (context, "context features")):
        check_dims(loaded, folder, role)
        refined = folder.model.get("refiner")
        if isinstance(refined, dict):  # a new user (2026-12-06): refined twice, with only a note on the model
            source = (folder.manifest.get("plan") or {}).get("refined_from")
            raise UserError(f"{role} {folder.path} are refined already (refine apply of run {refined.get('run')}); "
                            f"a refiner takes the unrefined features it was trained on"
                            + (f": give {source}" if source else ""))
    if context is not features:  # a new user's probe (2026-12-06): neighbours searched across two models' spaces
        features.check_same_model(context)
    return loaded, features, context


def _digest(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def apply_refinement(run_dir: str | Path, feats_dir: str | Path, out: str | Path, **options) -> dict:
    """Refine ``feats_dir`` with the run's refiner and ``context_dir`` (default: ``feats_dir``);
    write the refined feature folder ``out``. Returns a JSON-ready summary. Holds a lock beside
    ``out`` (it is swapped in whole: a lock inside would go with the old folder), so that two refines
    into one --out cannot share its temporary folder (a code-health review, 2026-12-07)."""
    from mlsctl.locks import FolderLock

    with FolderLock(atomic.followed(out), "feature folder", beside=True):
        return _apply_refinement(run_dir, feats_dir, out, **options)


def _apply_refinement(run_dir: str | Path, feats_dir: str | Path, out: str | Path, *,
                      context_dir: Optional[str | Path] = None, k: Optional[int] = None, overwrite: bool = False,
                      dtype: str = "fp32", progress: bool = False, say=to_stderr) -> dict:
    from mlsctl.data.shards import FEATURES_LAYOUT
    from mlsctl.features import DTYPES, check_feature_target, is_feature_folder
    from mlsctl.methods.refine.neighbours import check_reference_size

    loaded, features, context = open_inputs(run_dir, feats_dir, context_dir)
    k = k or loaded.cfg.neighbours
    exclude = self_rows(features, context)
    check_reference_size(len(context), k, bool((exclude >= 0).any()), f"context features {context.path}",
                         "give a larger context or a smaller --k")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    out = atomic.followed(out)  # the refined folder replaces the link's target, not the link (a review, 2026-12-06)
    atomic.recover_swap(out)  # a replacement cut short before the --out checks, not after hours of refining
    for name, source in (("the features folder", features.path), ("the context features folder", context.path),
                         (f"the folder of the features run {loaded.run} trained on (its data.root)", loaded.train_root)):
        if source is not None and out.resolve() == Path(source).resolve():
            raise UserError(f"--out {out} is {name}; write the refined features to another folder")
    context_id = _digest(str(context.model.get("fingerprint")), *context.files)
    refiner_record = {"run": str(loaded.run.resolve()), "step": loaded.step, "fingerprint": loaded.fingerprint,
                      "blocks": len(loaded.refiner.blocks), "k": k, "context": str(Path(context.path).resolve()),
                      "context_rows": len(context), "self_excluded": int((exclude >= 0).sum())}
    model = {**features.model, "refiner": refiner_record,
             "base_fingerprint": features.model.get("fingerprint"),
             "fingerprint": _digest(str(features.model.get("fingerprint")), loaded.fingerprint, str(k), context_id)}
    summary = {"out": str(out), "rows": len(features), "dim": loaded.dim, "k": k, "run": str(loaded.run),
               "step": loaded.step, "context": str(context.path), "context_rows": len(context),
               "self_excluded": refiner_record["self_excluded"], "reused": False}
    check_feature_target(out)  # a file, or a folder of anything but features (a run, a gallery): named, refused
    if is_feature_folder(out):
        if not overwrite and _holds(out, model["fingerprint"], features, dtype):  # as embed: run twice, once
            return {**summary, "reused": True}
        if _embedded(out):  # a new user's probe (2026-12-07): --overwrite replaced embed's features, which are not ours
            raise UserError(f"--out {out} holds features mlsctl embed wrote, not refined ones; refine apply replaces "
                            f"only its own (with --overwrite): choose another --out")
        if not overwrite:
            raise UserError(f"--out {out} already holds refined features; add --overwrite to replace them or choose "
                            f"another --out")
        atomic.refuse_others(out, FEATURES_LAYOUT, f"--out {out}", " besides the features")
    if loaded.total_steps and loaded.step < loaded.total_steps:
        say(f"note: run {loaded.run} is not finished (step {loaded.step} of {loaded.total_steps}); using that checkpoint")
    if loaded.train_model and loaded.train_model.get("fingerprint") != features.model.get("fingerprint"):
        say(f"note: {features.path} comes from another model than the features run {loaded.run} was trained on "
            f"(fingerprint {str(features.model.get('fingerprint'))[:12]} vs "
            f"{str(loaded.train_model.get('fingerprint'))[:12]})")

    embeddings = features.global_features()  # the context, when it is the features themselves: read once
    refined = refine(loaded.refiner, embeddings, embeddings if context is features else context.global_features(), k,
                     exclude, progress=progress)
    write_features(out, refined.to(DTYPES[dtype]), features, model, overwrite=overwrite,
                   normalization="L2-normalised: the refined embeddings e^T of mlsctl refine apply")
    return summary


def _embedded(out: Path) -> bool:
    """Whether ``out`` is a complete feature folder that mlsctl embed wrote (its model names no refiner)."""
    from mlsctl.features import Features

    try:
        return "refiner" not in Features(out, "--out").model
    except UserError:  # damaged or unfinished: whose it is cannot be read; replaced only with --overwrite, as before
        return False


def _holds(out: Path, fingerprint: str, features, dtype: str) -> bool:
    """Whether ``out`` is a complete feature folder of these refined features: the same source rows,
    refiner, k and context (the model fingerprint), stored in ``dtype``."""
    from mlsctl.features import Features

    try:
        existing = Features(out, "--out")
        return (existing.model.get("fingerprint") == fingerprint and list(existing.files) == list(features.files)
                and str(existing.input_root) == str(features.input_root)
                and existing.dtype == {"fp16": "float16", "fp32": "float32"}[dtype])
    except UserError:  # damaged or unfinished: replaced only with --overwrite, as before
        return False


def write_features(out: Path, global_: torch.Tensor, source, model: dict, *, overwrite: bool, normalization: str) -> None:
    """A feature folder with the rows of ``source`` (files, input root, preprocessing) and new
    global features, written next to ``out`` and renamed into place."""
    from mlsctl.data.shards import FEATURES_LAYOUT, MANIFEST, SHARD_BYTES, feature_manifest, shard_name, write_shard
    from mlsctl.locks import LOCK_NAME

    n = len(global_)
    bytes_per_row = max(1, global_.shape[1] * global_.element_size())
    per_shard = max(1, SHARD_BYTES // bytes_per_row)
    n_shards = max(1, -(-n // per_shard))
    tmp = out.parent / f".{out.name}.refine-tmp"
    if tmp.is_symlink():
        tmp.unlink()
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shards = []
        for s in range(n_shards):
            lo, hi = s * per_shard, min(n, (s + 1) * per_shard)
            name = shard_name(s, n_shards)
            shards.append({"file": name, "rows": write_shard(tmp / name, global_[lo:hi], lo)})
        manifest = feature_manifest(
            input_root=source.input_root, model=model, preprocessing=source.preprocessing,
            dtype={torch.float16: "float16", torch.float32: "float32"}[global_.dtype], normalization=normalization,
            dim=global_.shape[1], grid=None, files=source.files, skipped=source.skipped, shards=shards,
            plan={"refined_from": str(Path(source.path).resolve())})
        atomic.write_json(tmp / MANIFEST, manifest)
        if out.exists() and atomic.holds_anything(out, besides=(LOCK_NAME,)) and not overwrite:  # appeared meanwhile
            raise UserError(f"--out {out} appeared while refining; add --overwrite or choose another --out")
        if overwrite and out.is_dir():  # what was put there while refining goes no more than what was before
            atomic.refuse_others(out, FEATURES_LAYOUT, f"--out {out}", " besides the features")
        atomic.swap_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
