"""Linear evaluation on frozen global features (the DINO / MoCo linear-probe protocol; MLS's
multi-label classification protocol; docs/methods.md#eval-linear).

* :func:`multi_labels_for`: tag lists per feature row, from JSONL (``{"path"|"image": ..., "labels"|
  "tags": [...]}``, or fmnist-scenes' ``scenes.jsonl`` with its ``items``) or CSV (``path,tag;tag``);
  paths are matched to feature rows by their resolved location (relative paths are taken from the
  labels file's folder), then by their path relative to the features' input folder;
* :func:`average_precision` / :func:`mean_average_precision`: AP as scikit-learn's
  ``average_precision_score`` (the mean of the precision at each positive, ties broken by order),
  mAP over the classes with at least one positive among the evaluated rows;
* :func:`train_linear`: one linear layer on standardised features (mean and std of the training
  rows), mini-batch SGD with momentum 0.9 and a cosine schedule, cross-entropy
  (single label) or binary cross-entropy with logits (multi-label);
* :func:`evaluate_linear`: the sweep of learning rate × weight decay, each trained on the training
  rows minus a held-out fraction and scored on it (top-1 or mAP), then the best retrained on every
  training row and scored once on the validation rows. Every draw is seeded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from mlsctl.console import counted, percent
from mlsctl.data.labels import ImagePaths, nested_split_hint, read_multi_labels
from mlsctl.device import full_float32
from mlsctl.errors import UserError
from mlsctl.evaluate.baselines import majority_class, random_ranking_map, wilson_interval

DEFAULT_LRS = (0.001, 0.01, 0.1, 1.0)
DEFAULT_WDS = (0.0, 1e-4)


# ------------------------------------------------------------------------------------------ labels


def multi_labels_for(features, labels_file: Path, what: str, hint: str = "") -> list[list[str]]:
    """The tag list of each row of a feature folder (``hint``: what to add to the sentence when some are missing);
    a refusal names the images folder (``what``: whose, such as ``train``), where the tags' paths are read from,
    as :func:`~mlsctl.evaluate.knn.labels_for` does."""
    from mlsctl.evaluate.knn import images_folder

    paths = ImagePaths(features.files, Path(features.input_root), Path(labels_file))
    found = paths.rows(read_multi_labels(labels_file))
    missing = [f for f in features.files if f not in found]
    if missing:
        raise UserError(f"labels file {labels_file} has no tags for {counted(len(missing), 'image')} of "
                        f"{images_folder(features, what)} (first: {missing[0]}); {paths.where()}{hint}")
    return [found[f] for f in features.files]


# ------------------------------------------------------------------------------------------ metrics


def average_precision(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """AP of one class, ``Σ_n (R_n − R_{n−1}) P_n`` over the distinct score thresholds n (NaN without
    positives): without ties, the mean over positives of the precision at their rank; tied scores
    count as one threshold, so the value does not depend on the rows' order (a model that gives
    every image the same score gets the positives' share, not an order-dependent 0 to 1).
    scikit-learn's ``average_precision_score`` is the same definition."""
    order = torch.argsort(scores, descending=True, stable=True)
    ranked, hits = scores[order].double(), positives[order].double()
    n_pos = float(hits.sum())
    if n_pos == 0:
        return float("nan")
    device = ranked.device
    last_of_tie = torch.cat([(ranked[1:] != ranked[:-1]).nonzero().flatten(),
                             torch.tensor([len(ranked) - 1], device=device)])
    true_positives = hits.cumsum(0)[last_of_tie]
    precision = true_positives / (last_of_tie + 1).double()
    recall_gain = torch.diff(true_positives, prepend=torch.zeros(1, dtype=torch.float64, device=device)) / n_pos
    return float((recall_gain * precision).sum())


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> tuple[float, list[float]]:
    """mAP over the classes (columns) with at least one positive, and the AP of every class."""
    aps = [average_precision(scores[:, c], targets[:, c] > 0) for c in range(targets.shape[1])]
    present = [a for a in aps if not math.isnan(a)]
    return (sum(present) / len(present) if present else float("nan")), aps


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> Optional[float]:
    """None when there are fewer than ``k`` classes (top-5 of 3 classes is 100 % by construction;
    DINO's ``eval_linear.py`` skips it too)."""
    if len(labels) == 0:
        return float("nan")
    if k > logits.shape[1]:
        return None
    return float((logits.topk(k, dim=1).indices == labels[:, None]).any(1).double().mean())


# ------------------------------------------------------------------------------------------ training


@dataclass
class ProbeSettings:
    lr: float
    weight_decay: float
    epochs: int = 100
    batch_size: int = 256


def train_linear(x: torch.Tensor, y: torch.Tensor, settings: ProbeSettings, multi_label: bool, seed: int = 0,
                 device: Optional[torch.device] = None, losses: Optional[list] = None
                 ) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    """A linear layer on standardised ``x`` [N, D]; ``y`` class indices [N] or 0/1 targets [N, C].
    Returns the layer (on the CPU) and the standardisation (mean, std) to apply to new rows. It
    trains on ``device`` (the CPU by default) in full fp32 (no TF32); the initialisation and the
    batch order are drawn on the CPU, so a GPU trains the same probe up to the order of its float
    sums, which 100 epochs of SGD may amplify. ``losses``: a list the training loss is appended to, at the start
    (the first batch's, before any step) and at the end (the mean of the last epoch's batches)."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    device = device or torch.device("cpu")
    z, y = ((x - mean) / std).to(device), y.to(device)
    n_classes = y.shape[1] if multi_label else int(y.max()) + 1
    layer = torch.nn.Linear(z.shape[1], n_classes)
    with torch.no_grad():
        layer.weight.normal_(0, 0.01, generator=generator)
        layer.bias.zero_()
    layer.to(device)
    with full_float32(torch.device(device).type):  # whatever the process set for training
        first, last = _sgd(layer, z, y, settings, multi_label, generator, device)
    if losses is not None:
        losses.extend([float(first), float(last)])  # one host sync, after training
    return layer.cpu(), mean, std


def _sgd(layer: torch.nn.Linear, z: torch.Tensor, y: torch.Tensor, settings: ProbeSettings, multi_label: bool,
         generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Train ``layer`` → the first batch's loss (before any step) and the mean loss of the last epoch, as tensors on
    ``device`` (no host sync while training)."""
    first, last, batches = None, None, 0
    optimizer = torch.optim.SGD(layer.parameters(), lr=settings.lr, momentum=0.9, weight_decay=settings.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(z) / settings.batch_size))
    total = settings.epochs * steps_per_epoch
    step = 0
    for _ in range(settings.epochs):
        order = torch.randperm(len(z), generator=generator)
        last, batches = torch.zeros((), device=device), 0
        for start in range(0, len(z), settings.batch_size):
            rows = order[start:start + settings.batch_size].to(device)
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            logits = layer(z[rows])
            loss = (F.binary_cross_entropy_with_logits(logits, y[rows].float()) if multi_label
                    else F.cross_entropy(logits, y[rows]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            first = loss.detach() if first is None else first
            last, batches = last + loss.detach(), batches + 1
    nothing = torch.full((), float("nan"))
    return (nothing, nothing) if first is None else (first, last / max(batches, 1))


DIVERGED_FACTOR = 1.5  # a final training loss above this many times the initial one: the probe diverged


def diverged(initial: float, final: float) -> bool:
    """Whether a probe's training diverged: its final loss non-finite, or above :data:`DIVERGED_FACTOR` times its
    initial loss (the first batch's, before any step; batch noise keeps a probe that learns nothing near it)."""
    return not math.isfinite(final) or (math.isfinite(initial) and final > DIVERGED_FACTOR * initial)


def finite_or_none(value: float) -> Optional[float]:
    """A loss as results JSON holds it: None where it is NaN or infinite (no JSON number)."""
    return value if math.isfinite(value) else None


def training_loss_record(initial: float, final: float) -> dict:
    """What eval linear's results say of the chosen probe's training: its ``train_loss`` (``initial``, ``final``) and
    whether it ``diverged``."""
    return {"train_loss": {"initial": finite_or_none(initial), "final": finite_or_none(final)},
            "diverged": diverged(initial, final)}


def result_diverged_note(result: dict) -> str:
    """The note on an eval linear or linear-seg result whose probe diverged, or ""."""
    if not result.get("diverged"):
        return ""
    if "train_loss" in result:  # eval linear
        return diverged_note(result["train_loss"]["initial"], result["train_loss"]["final"], result["chosen"]["lr"])
    return diverged_note(result["train_loss_initial"], result["train_loss_per_epoch"][-1], result["settings"]["lr"])


def diverged_note(initial: Optional[float], final: Optional[float], lr: float) -> str:
    """The note on a diverged probe (a new user's probe, 2026-12-08: eval linear-seg --lr 1e30 reported a train loss
    of 9.4e29 and an mIoU as any other); a loss of None is a non-finite one."""
    shown = lambda v: "non-finite" if v is None or not math.isfinite(v) else f"{v:.3g}"  # noqa: E731
    return (f"note: the probe diverged (training loss {shown(initial)} at the start, {shown(final)} at the end): its "
            f"scores say nothing of the features; give a smaller --lr than {lr:g}")


def predict(layer: torch.nn.Linear, mean: torch.Tensor, std: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return layer((x - mean) / std)


def score(logits: torch.Tensor, y: torch.Tensor, multi_label: bool) -> dict:
    if multi_label:
        value, aps = mean_average_precision(logits, y)
        return {"mAP": value, "ap_per_class": aps}
    return {"top1": top_k_accuracy(logits, y, 1), "top5": top_k_accuracy(logits, y, 5)}


def sweep(x: torch.Tensor, y: torch.Tensor, multi_label: bool, lrs: Sequence[float], wds: Sequence[float],
          epochs: int, batch_size: int, holdout: float, seed: int,
          device: Optional[torch.device] = None) -> tuple[ProbeSettings, list[dict]]:
    """Every (lr, wd) trained on the training rows minus a seeded ``holdout`` share, scored on it."""
    generator = torch.Generator().manual_seed(seed + 1)
    order = torch.randperm(len(x), generator=generator)
    n_hold = max(1, int(round(holdout * len(x))))
    held, kept = order[:n_hold], order[n_hold:]
    if len(kept) < 2:
        raise UserError(f"{len(x)} training images are too few to hold out {holdout:.0%} for the sweep; "
                        f"give more images or --holdout 0 with a single --lr and --wd")
    key = "mAP" if multi_label else "top1"
    rows = []
    for lr in lrs:
        for wd in wds:
            settings = ProbeSettings(lr, wd, epochs, batch_size)
            layer, mean, std = train_linear(x[kept], y[kept], settings, multi_label, seed, device)
            result = score(predict(layer, mean, std, x[held]), y[held], multi_label)
            rows.append({"lr": lr, "weight_decay": wd, key: result[key]})
    best = max(rows, key=lambda r: (r[key] if not math.isnan(r[key]) else -1.0))
    return ProbeSettings(best["lr"], best["weight_decay"], epochs, batch_size), rows


def check_sweep(lrs: Sequence[float], wds: Sequence[float]) -> None:
    """Every learning rate a finite number above 0, every weight decay one of 0 or more (a probe,
    2026-12-06: --lr -1 was torch's "Invalid learning rate", --lr nan ran); cheap, so ``eval linear``
    says it before a model loads."""
    for option, values, smallest in (("--lr", lrs, "above 0"), ("--wd", wds, "0 or more")):
        for value in values:
            if not math.isfinite(value) or value < 0 or (option == "--lr" and value == 0):
                raise UserError(f"{option} {value}: every value must be a finite number {smallest}")


def evaluate_linear(train_features, val_features, *, labels: Optional[Path] = None, val_labels: Optional[Path] = None,
                    multi_label: bool = False, lrs: Sequence[float] = DEFAULT_LRS, wds: Sequence[float] = DEFAULT_WDS,
                    epochs: int = 100, batch_size: int = 256, holdout: float = 0.2, seed: int = 0,
                    device: Optional[torch.device] = None) -> dict:
    """The linear probe of two feature folders → a JSON-ready dict (sweep, chosen settings, scores),
    trained on ``device`` (the CPU by default)."""
    from mlsctl.evaluate.knn import labels_for

    check_sweep(lrs, wds)
    train_features.check_same_model(val_features)
    x_train = train_features.finite_global_features().float()
    x_val = val_features.finite_global_features().float()
    if multi_label:
        if labels is None:
            raise UserError("--multi-label needs --train-labels (and --val-labels): JSONL or CSV of tag lists, e.g. "
                            "fmnist-scenes' scenes.jsonl")
        train_tags = multi_labels_for(train_features, labels, "train")
        val_tags = multi_labels_for(val_features, val_labels or labels, "val",
                                    "" if val_labels else "; give the val images' tags with --val-labels")
        classes = sorted({t for tags in train_tags for t in tags})
        lookup = {c: i for i, c in enumerate(classes)}
        y_train = torch.zeros(len(train_tags), len(classes))
        for row, tags in enumerate(train_tags):
            y_train[row, [lookup[t] for t in tags]] = 1
        y_val = torch.zeros(len(val_tags), len(classes))
        for row, tags in enumerate(val_tags):
            y_val[row, [lookup[t] for t in tags if t in lookup]] = 1
        unseen = sorted({t for tags in val_tags for t in tags} - set(classes))
        hint = ""  # tags are no folders
    else:
        train_names = labels_for(train_features, labels, "train", "--train-labels")
        val_names = labels_for(val_features, val_labels, "val", "--val-labels")
        classes = sorted(set(train_names))
        lookup = {c: i for i, c in enumerate(classes)}
        y_train = torch.tensor([lookup[c] for c in train_names])
        y_val = torch.tensor([lookup.get(c, -1) for c in val_names])
        unseen = sorted(set(val_names) - set(classes))
        hint = nested_split_hint(classes, val_names, "--train-labels and --val-labels")
    if len(classes) < 2:
        raise UserError(f"the training labels name {len(classes)} class; a linear probe needs at least 2")
    if holdout <= 0 and (len(lrs) > 1 or len(wds) > 1):
        raise UserError(f"--holdout 0 leaves no images to choose among {len(lrs)} learning rates and {len(wds)} weight "
                        f"decays; give one --lr and one --wd, or a --holdout above 0")
    if len(lrs) > 1 or len(wds) > 1:
        chosen, rows = sweep(x_train, y_train, multi_label, lrs, wds, epochs, batch_size, holdout, seed, device)
    else:
        chosen, rows = ProbeSettings(lrs[0], wds[0], epochs, batch_size), []
    losses: list[float] = []
    layer, mean, std = train_linear(x_train, y_train, chosen, multi_label, seed, device, losses)
    result = score(predict(layer, mean, std, x_val), y_val, multi_label)
    trained = training_loss_record(*losses)
    if multi_label:
        result["ap_per_class"] = dict(zip(classes, result["ap_per_class"]))
        chance = {"rule": "a random ranking of the val images for each class",
                  "mAP": random_ranking_map([int(p) for p in y_val.sum(0).tolist()], len(y_val))}
    else:
        result["top1_interval95"] = wilson_interval(result["top1"], len(y_val))
        chance = majority_class(train_names, val_names)
    return {"train": str(train_features.path), "val": str(val_features.path), "train_images": len(x_train),
            "val_images": len(x_val), "classes": len(classes), "multi_label": multi_label,
            "val_classes_unseen_in_train": unseen, "val_classes_unseen_hint": hint, "model": train_features.model,
            "protocol": {"features": "global, standardised with the training rows' mean and std",
                         "optimizer": "SGD momentum 0.9, cosine schedule", "epochs": epochs, "batch_size": batch_size,
                         "holdout": holdout, "holdout_images": max(1, int(round(holdout * len(x_train)))) if rows else 0,
                         "seed": seed, "device": str(device or torch.device("cpu"))},
            "sweep": rows, "chosen": {"lr": chosen.lr, "weight_decay": chosen.weight_decay}, "chance": chance,
            "results": result, **trained}  # the chosen probe's training loss, and whether it diverged


def tied_sweep_note(result: dict) -> Optional[str]:
    """Why every (lr, wd) of the sweep scored the same, and what can help, or None where they differ. The side with
    fewer images is blamed: the held-out images (raise --holdout, up to its 0.9), or the images each setting trained
    on (a new user's probe, 2026-12-08: --holdout 0.9 of 18 images trained on 2, and "raise --holdout" was the
    advice, at its maximum)."""
    key = "mAP" if result.get("multi_label") else "top1"
    if not result.get("sweep") or len({r[key] for r in result["sweep"]}) != 1:
        return None
    held = result["protocol"]["holdout_images"]
    holdout = result["protocol"]["holdout"]
    kept = result["train_images"] - held
    images = lambda n: f"{n} image{'s' if n != 1 else ''}"  # noqa: E731
    start = f"note: every setting scored the same on the {held} held-out image{'s' if held != 1 else ''}, so the " \
            f"first was chosen"
    if kept <= held:
        return (f"{start}; each was trained on only {images(kept)} (--holdout {holdout:g} of "
                f"{result['train_images']}): lower --holdout or give more training images to tell them apart")
    if holdout < HOLDOUT_MAX:
        return f"{start}; raise --holdout to tell them apart"
    return f"{start}; give more training images to tell them apart"


HOLDOUT_MAX = 0.9  # eval linear's --holdout at most


def chance_line(result: dict) -> str:
    """What an ``eval linear`` result's score is measured against, in one line: the majority-class rule's top-1
    and top-5, or a random ranking's mAP (multi-label), where the result records it (since 2026-12-07)."""
    chance = result.get("chance")
    if not isinstance(chance, dict):
        return ""
    if "mAP" in chance:
        return f"chance: a random ranking of the val images scores mAP {percent(chance['mAP'], 2)}%"
    top5 = f", top-5 {percent(chance['top5'], 2)}%" if chance.get("top5") is not None else ""
    return (f"chance: calling every val image the majority class ({chance.get('majority_class')}) scores top-1 "
            f"{percent(chance['top1'], 2)}%{top5}")

