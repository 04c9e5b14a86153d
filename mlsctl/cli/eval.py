from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal, Optional

import typer

from mlsctl.cli._format import pct, say, table
from mlsctl.console import counted
from mlsctl.cli._options import (MODEL_OPTION, RANDOM_INIT_OPTION, RUN_OPTION, WEIGHTS_OPTION, one_of, results_file,
                                 results_path)
from mlsctl.evaluate.results import results_writer

app = typer.Typer(rich_markup_mode=None, help="Evaluate features: dense k-NN and linear segmentation, image k-NN classification, linear probes, image-set retrieval, Recall@K.", no_args_is_help=True)


def _query_size(value: str) -> Optional[int]:
    """--query-size: a positive number of photos, or 'all' (None)."""
    from mlsctl.errors import UserError

    if value.strip().lower() == "all":
        return None
    if not value.strip().isdigit() or int(value) < 1:
        raise UserError(f"--query-size takes a number of photos (1 or more) or 'all', got {value!r}")
    return int(value)


# the values of the options that take one of a fixed set (tests/test_cli.py compares them with the library's)
SegDataset = Literal["folders", "voc", "ade20k", "cityscapes", "coco-stuff", "coco-things"]  # datasets.SEGMENTATION
ClsDataset = Literal["folders", "imagenet"]  # datasets.CLASSIFICATION
Split = Literal["train", "val", "trainval", "trainaug"]  # every dataset's SPLITS
Protocol = Literal["none", "hummingbird"]  # knn_seg.PROTOCOLS
SegIndex = Literal["flat", "ivf"]  # knn_seg.INDEXES
Search = Literal["auto", "torch", "faiss"]  # knn_seg.SEARCHES
Device = Literal["auto", "cpu", "cuda"]  # knn.DEVICES
PatchLabels = Literal["soft", "majority"]  # knn_seg.PATCH_LABELS
Resize = Literal["square", "center-crop"]  # features.RESIZE_MODES
RESIZE_OPTION = typer.Option(None, "--resize", parser=one_of("--resize", Resize),
                             help="How images this command embeds are fitted to the model's input: square (the whole image "
                                  "resized) or center-crop (DINO's protocol: resize to R·8/7, centre crop R) "
                                  "[default: square]; refused with feature folders on both sides.")
NOT_THIS_EVALUATION = "{option} {value} is not one this evaluation reads; choose one of {choices}"

ROOT_HELP = "The dataset's folder, or its .tar/.zip read in place (with --dataset)."
# the options every evaluation shares for reading a benchmark
SEG_DATASET_OPTION = typer.Option("folders", "--dataset", parser=one_of("--dataset", SegDataset, NOT_THIS_EVALUATION),
                                  help="Segmentation benchmark read from --root in its official layout; folders: "
                                       "the --train/--val paths as given.")
CLS_DATASET_OPTION = typer.Option("folders", "--dataset", parser=one_of("--dataset", ClsDataset, NOT_THIS_EVALUATION),
                                  help="Classification benchmark read from --root in its official layout (imagenet: the "
                                       "class is the folder under train/ and val/, or the split file's label); folders: "
                                       "the --train/--val paths as given, each image's own folder, however deep, its "
                                       "class.")
ROOT_OPTION = typer.Option(None, "--root", help=ROOT_HELP)
TRAIN_SPLIT_OPTION = typer.Option(None, "--train-split", parser=one_of("--train-split", Split),
                                  help="Training split of --dataset (trainval, trainaug: voc only) [default: the "
                                       "protocol's: voc trainaug, the others train].")
CLS_TRAIN_SPLIT_OPTION = typer.Option(None, "--train-split", parser=one_of("--train-split", Split),
                                      help="Training split of --dataset [default: train].")
VAL_SPLIT_OPTION = typer.Option(None, "--val-split", parser=one_of("--val-split", Split),
                                help="Validation split of --dataset [default: val].")
DEVICE_HELP = "Device of the {what}: auto (the GPU when there is one), cpu, cuda."
# the inputs of the dense evaluations without --dataset
DENSE_TRAIN_OPTION = typer.Option(None, "--train", help="Training features (a folder from mlsctl embed --dense) or "
                                                        "images (with --run).")
TRAIN_MASKS_OPTION = typer.Option(None, "--train-masks", help="Label masks of the training images (same relative "
                                                              "paths, .png).")
DENSE_VAL_OPTION = typer.Option(None, "--val", help="Validation features or images.")
GLOBAL_TRAIN_OPTION = typer.Option(None, "--train", help="Training features (a folder from mlsctl embed) or images "
                                   "(embedded with --run/--weights, cached).")
GLOBAL_VAL_OPTION = typer.Option(None, "--val", help="Validation features or images.")
VAL_MASKS_OPTION = typer.Option(None, "--val-masks", help="Label masks of the validation images.")


@app.command("knn-seg")
def knn_seg(
    train: Optional[Path] = DENSE_TRAIN_OPTION,
    train_masks: Optional[Path] = TRAIN_MASKS_OPTION,
    val: Optional[Path] = DENSE_VAL_OPTION,
    val_masks: Optional[Path] = VAL_MASKS_OPTION,
    dataset: SegDataset = SEG_DATASET_OPTION,
    root: Optional[Path] = ROOT_OPTION,
    train_split: Optional[Split] = TRAIN_SPLIT_OPTION,
    val_split: Optional[Split] = VAL_SPLIT_OPTION,
    protocol: Protocol = typer.Option("none", "--protocol", parser=one_of("--protocol", Protocol), help="hummingbird: Balazevic et al.'s settings (memory 10,240,000, k 30, T 0.02, 1 augmented pass, input 512 for ViT-S/16, fractions 1/128..1/1); explicit flags override it."),
    run: Optional[Path] = RUN_OPTION,
    weights: Optional[Path] = WEIGHTS_OPTION,
    model: Optional[str] = MODEL_OPTION,
    random_init: bool = RANDOM_INIT_OPTION,
    resolution: Optional[int] = typer.Option(None, "--resolution", min=1, help="Input side when images are embedded [default: the protocol's, else the model's]."),
    fraction: Optional[list[str]] = typer.Option(None, "--fraction", help="Fractions of training images, e.g. --fraction 1/1 1/8 [default: 1/1 1/8 1/64 1/128]."),
    k: Optional[int] = typer.Option(None, "--k", min=1, help="Neighbours per query patch [default: 30]."),
    temperature: Optional[float] = typer.Option(None, "--temperature", min=1e-6, help="Softmax temperature over neighbour cosines [default: 0.02]."),
    memory_size: Optional[int] = typer.Option(None, "--memory-size", min=1, help="Patches in the memory (sampled per image) [default: every labelled patch]."),
    aug_passes: Optional[int] = typer.Option(None, "--aug-passes", min=0, help="Extra augmented passes over the training images (needs a model) [default: 0]."),
    ignore_index: int = typer.Option(255, "--ignore-index", help="Mask value that is not scored (with --dataset: 255, after the protocol's mapping)."),
    runs: Optional[int] = typer.Option(None, "--runs", min=1, help="Seeded runs averaged for fractions below 1 [default: 5]."),
    seed: int = typer.Option(0, "--seed", help="Seed of the subsets and the memory sampling."),
    index: SegIndex = typer.Option("flat", "--index", parser=one_of("--index", SegIndex), help="flat: exact inner product; ivf: faiss IVF for large memories."),
    nlist: Optional[int] = typer.Option(None, "--nlist", min=1, help="IVF lists [default: 4 sqrt(memory)]."),
    nprobe: int = typer.Option(16, "--nprobe", min=1, max=2**31 - 1, help="IVF lists searched per query."),
    search: Search = typer.Option("auto", "--search", parser=one_of("--search", Search), help="auto: torch on a GPU, faiss on the CPU (torch without faiss); torch; faiss."),
    device: Device = typer.Option("auto", "--device", parser=one_of("--device", Device), help=DEVICE_HELP.format(what="torch search")),
    patch_labels: PatchLabels = typer.Option("soft", "--patch-labels", parser=one_of("--patch-labels", PatchLabels), help="A memory patch's label: soft (its class histogram, Hummingbird's) or majority (its most frequent class, CrIBo's Table 1; with --k 50)."),
    data: Path = typer.Option(Path("data/fmnist-scenes"), "--data", help="fmnist-scenes folder used when no --train/--val is given (built when missing)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", parser=results_path(), callback=results_file(), help="Results JSON [default: results/knn-seg-<time>-<pid>.json]."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON instead of tables."),
) -> None:
    """Dense k-NN segmentation (Hummingbird protocol): label val patches from their nearest train patches.

    Example: mlsctl eval knn-seg --dataset voc --root VOCtrainval_11-May-2012.tar --protocol hummingbird --run runs/x

    Feature and mask folders: mlsctl eval knn-seg --train features/train --train-masks data/fmnist-scenes/train/masks
             --val features/val --val-masks data/fmnist-scenes/val/masks --fraction 1/1 1/8

    With no arguments: the newest run under ./runs on the fmnist-scenes benchmark.
    """
    from mlsctl.evaluate import inputs as inputs_lib
    from mlsctl.evaluate import knn_seg as lib
    from mlsctl.restore import model_on_demand

    preset, chosen, overridden = inputs_lib.resolve_protocol(lib, protocol, {
        "k": k, "temperature": temperature, "memory_size": memory_size, "aug_passes": aug_passes, "runs": runs,
        "fractions": tuple(fraction) if fraction else None})
    inputs_lib.refuse_image_options((train, val), {"resolution": resolution})
    write = results_writer(out, "knn-seg", say, as_json)  # after the refusals, before the work
    get_model = model_on_demand(run=run, weights=weights, arch=model, random_init=random_init, seed=seed, say=say)

    def embed_options() -> dict:
        if resolution is None and preset.input_size is None:
            return {}
        if resolution is not None:
            return {"resolution": resolution}
        side = preset.resolution(get_model().backbone.patch_size)
        # (h/p)² tokens an image: 4,096 at 512 px for a patch of 8, the wait a new user could not explain
        say(f"images are embedded at {side} px, protocol {preset.name}'s input size "
            f"({(side // get_model().backbone.patch_size) ** 2:,} patches an image); --resolution sets another")
        return {"resolution": side}

    inputs = inputs_lib.segmentation_inputs(dataset, root, train_split, val_split,
                                            dict(train=train, train_masks=train_masks, val=val, val_masks=val_masks),
                                            ignore_index, get_model, embed_options, fmnist=data, say=say)
    train_features, val_features, record = inputs.train_features, inputs.val_features, inputs.record
    inputs_lib.check_protocol_resolution(preset, overridden, resolution, train_features)
    if inputs.benchmark:
        say(f"evaluating {get_model.chosen.description if get_model.chosen else train_features.model.get('path')} "
             f"on {inputs.benchmark}")
    train_source = lib.FeatureMasks(train_features, inputs.train_masks, "train features")
    val_source = lib.FeatureMasks(val_features, inputs.val_masks, "val features")
    augmented = lib.AugmentedPasses.of_model(train_source, _model_of_training(train_features, get_model, run, weights,
                                                                         random_init, say),
                                             chosen["aug_passes"], seed) if chosen["aug_passes"] else None
    fractions = lib.parse_fractions(chosen["fractions"], say)
    settings = lib.Settings(k=chosen["k"], temperature=chosen["temperature"], memory_size=chosen["memory_size"],
                            aug_passes=chosen["aug_passes"], ignore_index=inputs.ignore_index, runs=chosen["runs"], seed=seed,
                            index=index, nlist=nlist, nprobe=nprobe, search=search, device=device,
                            patch_labels=patch_labels)
    started = time.perf_counter()
    result = lib.knn_segmentation(train_source, val_source, fractions, settings, augmented=augmented,
                                  names=inputs.names, progress=None)
    payload = {
        "command": "eval knn-seg",
        "dataset": record,
        "protocol": {"name": preset.name, "preset": preset.to_dict(), "overridden": overridden,
                     "resolution": train_features.preprocessing.get("resolution")},
        **inputs_lib.split_records(train_features, val_features, inputs.train_masks, inputs.val_masks),
        "model": train_features.model,
        "settings": {**settings.to_dict(), "fractions": [r["fraction"] for r in result["results"]]},
        "seconds": round(time.perf_counter() - started, 3),
        **result,
        "note": "miou is the plain mean IoU over classes present in ground truth or predictions; miou_hungarian "
                "re-matches predicted to true classes first (an extra, for cluster-valued predictions)",
    }
    out = write(payload)
    if as_json:
        typer.echo(json.dumps(payload, indent=2))
        _echo_notes(_knn_seg_notes(payload, settings, len(train_features)), as_json)
        return
    _print_knn_seg(payload, settings, len(train_features), out)


def _print_knn_seg(payload: dict, settings, train_images: int, out: Path) -> None:
    """eval knn-seg's tables: IoU per class and fraction, the runs' mIoU, notes, the settings."""
    results, record = payload["results"], payload["dataset"]
    headers = ["class"] + [f"IoU {r['fraction']}" for r in results]
    rows = [[name] + [pct(r["iou_per_class"][c] if c < len(r["iou_per_class"]) else None) for r in results]
            for c, name in enumerate(payload["classes"])]
    typer.echo(table(headers, rows))
    typer.echo("")
    foreground = "foreground_iou" in results[0]  # where class 0 is a background (foreground_scores)
    summary = [[r["fraction"], r["train_images"], len(r["runs"]),
                f"{pct(r['miou'])}" + (f" ± {pct(r['miou_std'])}" if len(r["runs"]) > 1 else ""),
                *([pct(r["foreground_iou"])] if foreground else []),
                pct(r["miou_hungarian"]), f"{sum(x['seconds']['total'] for x in r['runs']):.1f}"] for r in results]
    chance = payload["chance"]  # what a segmentation must beat: every pixel the training patches' majority class
    summary.append([f"chance: every pixel {chance['majority_class']}", "", "", pct(chance["miou"]),
                    *([pct(chance.get("foreground_iou"))] if foreground else []), "", ""])
    typer.echo(table(["fraction", "train images", "runs", "mIoU %", *(["foreground IoU %"] if foreground else []),
                      "(Hungarian mIoU %)", "seconds"], summary))
    _echo_notes(_knn_seg_notes(payload, settings, train_images))
    memory = "all labelled patches" if settings.memory_size is None else settings.memory_size
    typer.echo(f"\n{record['name']} ({record.get('train_split', 'train')} -> {record.get('val_split', 'val')}), "
               f"protocol {payload['protocol']['name']}: k={settings.k} T={settings.temperature} memory={memory} "
               f"aug-passes={settings.aug_passes} index={settings.index}, search {results[0]['runs'][0]['search']}; "
               f"results written to {out}")


def _knn_seg_notes(payload: dict, settings, train_images: int) -> list[str]:
    """eval knn-seg's notes on its results (said with the tables, or on stderr under --json)."""
    results, notes = payload["results"], []
    for images in sorted({r["train_images"] for r in results}):
        same = [r["fraction"] for r in results if r["train_images"] == images]
        if len(same) > 1:
            notes.append(f"note: fractions {', '.join(same)} all use {images} training image"
                         f"{'s' if images != 1 else ''} (of {train_images}): too few training images to tell them apart")
    # only the runs whose memory held fewer than k: "(16, 30 patches)" listed a run that voted with k (a probe)
    voted = sorted({run["k"] for r in results for run in r["runs"] if run["k"] < settings.k})
    if voted:
        notes.append(f"note: --k {settings.k} is more than the memory of some runs holds; their patches voted with "
                     f"all of it ({', '.join(map(str, voted))} patches)")
    held = sorted({run["memory_patches"] for r in results for run in r["runs"]})
    if settings.memory_size is not None and held and held[-1] > settings.memory_size:
        notes.append(f"note: --memory-size {settings.memory_size} is less than one patch per training image; each "
                     f"image gave one ({', '.join(f'{n:,}' for n in held)} patches)")
    return notes + [_shared_note(payload["dataset"], payload["val"]["images"])]


def _echo_notes(notes: list, as_json: bool = False) -> None:
    """The notes on a result (None: no note): with its tables, or on stderr under --json, whose stdout is the
    JSON alone (a new user's probe, 2026-12-08: knn-seg's notes went nowhere under --json)."""
    for note in notes:
        if note:
            typer.echo(note, err=as_json)


def _model_of_training(train_features, get_model, run, weights, random_init: bool, say):
    """The model that re-embeds the training images for --aug-passes: the one given, or, with no
    --run/--weights, the one the training features' manifest names (not the newest run)."""
    from mlsctl.restore import model_that_made

    if run is not None or weights is not None or random_init or get_model.chosen is not None:
        return get_model()
    return model_that_made(train_features, get_model, "--aug-passes re-embeds the training images", say)


@app.command("knn")
def knn(
    train: Optional[Path] = GLOBAL_TRAIN_OPTION,
    val: Optional[Path] = GLOBAL_VAL_OPTION,
    dataset: ClsDataset = CLS_DATASET_OPTION,
    root: Optional[Path] = ROOT_OPTION,
    train_split: Optional[Split] = CLS_TRAIN_SPLIT_OPTION,
    val_split: Optional[Split] = VAL_SPLIT_OPTION,
    run: Optional[Path] = RUN_OPTION,
    weights: Optional[Path] = WEIGHTS_OPTION,
    model: Optional[str] = MODEL_OPTION,
    random_init: bool = RANDOM_INIT_OPTION,
    seed: int = typer.Option(0, "--seed", help="Seed of --random-init."),
    train_labels: Optional[Path] = typer.Option(None, "--train-labels", help="CSV/JSONL of path,label [default: each image's own folder, however deep]."),
    val_labels: Optional[Path] = typer.Option(None, "--val-labels", help="CSV/JSONL of path,label [default: each image's own folder, however deep]."),
    k: Optional[list[int]] = typer.Option(None, "--k", min=1, help="Neighbour counts, e.g. --k 10 20 100 200 [default]; a k above the training images votes with all of them."),
    temperature: float = typer.Option(0.07, "--temperature", min=1e-6, help="Vote weight exp(cos/T)."),
    device: Device = typer.Option("auto", "--device", parser=one_of("--device", Device), help=DEVICE_HELP.format(what="neighbour search")),
    resize: Optional[Resize] = RESIZE_OPTION,
    out: Optional[Path] = typer.Option(None, "--out", "-o", parser=results_path(), callback=results_file(), help="Results JSON [default: results/knn-<time>-<pid>.json]."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON instead of a table."),
) -> None:
    """Weighted k-NN classification on global features (DINO protocol): top-1/top-5 for several k.

    Example: mlsctl eval knn --train features/train --val features/val --k 10 20

    Image folders work too: mlsctl eval knn --train data/train --val data/val --run runs/x
    (their features are kept under features/ and reused).

    ImageNet-style (folder or archive): mlsctl eval knn --dataset imagenet --root imagenet.tar --run runs/x
    """
    from mlsctl.evaluate import knn as lib
    from mlsctl.evaluate.inputs import classification_inputs
    from mlsctl.restore import model_on_demand

    write = results_writer(out, "knn", say, as_json)  # after the refusals, before the work
    get_model = model_on_demand(run=run, weights=weights, arch=model, random_init=random_init, seed=seed, say=say)
    train_features, val_features, train_labels, val_labels, record = classification_inputs(
        dataset, root, train_split, val_split, train, val, train_labels, val_labels, get_model, say=say, resize=resize)
    started = time.perf_counter()
    result = lib.evaluate_knn(train_features, val_features, train_labels, val_labels, k or lib.DEFAULT_KS, temperature,
                              device=device)
    payload = {"command": "eval knn", "dataset": record, **result, "seconds": round(time.perf_counter() - started, 3)}
    results, unknown = result["results"], result["val_classes_unseen_in_train"]
    out = write(payload)
    notes = [_unseen_note(unknown, " (counted as errors)", result.get("val_classes_unseen_hint", "")) if unknown
             else None, _shared_note(record, result["val_images"])]
    if as_json:
        typer.echo(json.dumps(payload, indent=2))
        _echo_notes(notes, as_json)
        return
    typer.echo(table(*lib.score_table(result, lambda value: pct(value, 2))))
    _echo_notes(notes)
    if any(r["top5"] is None for r in results):
        typer.echo("no top-5 (-): fewer than 5 classes")
    typer.echo(f"\n{result['train_images']} train / {result['val_images']} val images, {result['classes']} classes, "
               f"T={temperature}; results written to {out}")


@app.command("linear")
def linear(
    train: Optional[Path] = GLOBAL_TRAIN_OPTION,
    val: Optional[Path] = GLOBAL_VAL_OPTION,
    dataset: ClsDataset = CLS_DATASET_OPTION,
    root: Optional[Path] = ROOT_OPTION,
    train_split: Optional[Split] = CLS_TRAIN_SPLIT_OPTION,
    val_split: Optional[Split] = VAL_SPLIT_OPTION,
    run: Optional[Path] = RUN_OPTION,
    weights: Optional[Path] = WEIGHTS_OPTION,
    model: Optional[str] = MODEL_OPTION,
    random_init: bool = RANDOM_INIT_OPTION,
    seed: int = typer.Option(0, "--seed", help="Seed of --random-init, the held-out split and the training."),
    train_labels: Optional[Path] = typer.Option(None, "--train-labels", help="Labels: CSV/JSONL of path,label [default: each image's own folder, however deep]; with --multi-label a JSONL/CSV of tag lists (fmnist-scenes' scenes.jsonl works)."),
    val_labels: Optional[Path] = typer.Option(None, "--val-labels", help="Labels of --val [default: each image's own folder, however deep; with --multi-label: the --train-labels file, which must then list the val images too (fmnist-scenes: give val/scenes.jsonl)]."),
    multi_label: bool = typer.Option(False, "--multi-label", help="Several tags per image: binary cross-entropy, scored by mAP."),
    lr: Optional[list[float]] = typer.Option(None, "--lr", help="Learning rates of the sweep [default: 0.001 0.01 0.1 1]."),
    wd: Optional[list[float]] = typer.Option(None, "--wd", help="Weight decays of the sweep [default: 0 1e-4]."),
    epochs: int = typer.Option(100, "--epochs", min=1, help="Epochs of every probe."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Mini-batch of the probe."),
    holdout: float = typer.Option(0.2, "--holdout", min=0.0, max=0.9, help="Share of the training images the sweep is scored on."),
    device: Device = typer.Option("auto", "--device", parser=one_of("--device", Device), help=DEVICE_HELP.format(what="probe's training")),
    resize: Optional[Resize] = RESIZE_OPTION,
    out: Optional[Path] = typer.Option(None, "--out", "-o", parser=results_path(), callback=results_file(), help="Results JSON [default: results/linear-<time>-<pid>.json]."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON instead of a table."),
) -> None:
    """Linear probe on frozen global features: top-1/top-5, or multi-label mAP; lr x wd swept on a held-out split.

    Example: mlsctl eval linear --train features/train --val features/val

    Multi-label (fmnist-scenes): mlsctl eval linear --train data/fmnist-scenes/train/images --val data/fmnist-scenes/val/images --run runs/x --multi-label --train-labels data/fmnist-scenes/train/scenes.jsonl --val-labels data/fmnist-scenes/val/scenes.jsonl
    """
    from mlsctl.errors import UserError
    from mlsctl.evaluate import linear as lib
    from mlsctl.evaluate.inputs import classification_inputs
    from mlsctl.evaluate.baselines import interval_text
    from mlsctl.evaluate.knn import search_device
    from mlsctl.restore import model_on_demand

    if multi_label and dataset != "folders":
        raise UserError(f"--multi-label reads tag lists from --train-labels; --dataset {dataset} has one class per image")
    lib.check_sweep(lr or [], wd or [])  # before the model loads
    write = results_writer(out, "linear", say, as_json)  # after the refusals, before the work
    get_model = model_on_demand(run=run, weights=weights, arch=model, random_init=random_init, seed=seed, say=say)
    train_features, val_features, train_labels, val_labels, record = classification_inputs(
        dataset, root, train_split, val_split, train, val, train_labels, val_labels, get_model, say=say, resize=resize)
    started = time.perf_counter()
    result = lib.evaluate_linear(train_features, val_features, labels=train_labels, val_labels=val_labels,
                                 multi_label=multi_label, lrs=lr or lib.DEFAULT_LRS, wds=wd or lib.DEFAULT_WDS,
                                 epochs=epochs, batch_size=batch_size, holdout=holdout, seed=seed,
                                 device=search_device(device))
    payload = {"command": "eval linear", "dataset": record, **result,
               "seconds": round(time.perf_counter() - started, 3)}
    out = write(payload)
    key = "mAP" if multi_label else "top1"
    unseen = result["val_classes_unseen_in_train"]
    notes = [lib.result_diverged_note(result),
             _unseen_note(unseen, hint=result.get("val_classes_unseen_hint", "")) if unseen else None,
             _shared_note(record, result["val_images"])]
    if as_json:
        typer.echo(json.dumps(payload, indent=2))
        _echo_notes([lib.tied_sweep_note(result), *notes], as_json)
        return
    if result["sweep"]:
        best = result["chosen"]
        typer.echo(table(["lr", "weight decay", f"held-out {'mAP' if multi_label else 'top-1'} %", "chosen"],
                         [[r["lr"], r["weight_decay"], pct(r[key], 2),
                           "yes" if (r["lr"], r["weight_decay"]) == (best["lr"], best["weight_decay"]) else ""]
                          for r in result["sweep"]]))
        tied = lib.tied_sweep_note(result)  # a new user's probe: --holdout 0.01 held out 1 image
        typer.echo(f"{tied}\n" if tied else "")
    scores = result["results"]
    if multi_label:
        typer.echo(table(["class", "AP %"], [[c, pct(a, 2)] for c, a in scores["ap_per_class"].items()]))
        typer.echo(f"\nmAP {pct(scores['mAP'], 2)}%", nl=False)
    else:
        top5 = f", top-5 {pct(scores['top5'], 2)}%" if scores["top5"] is not None else " (no top-5: fewer than 5 classes)"
        typer.echo(f"top-1 {pct(scores['top1'], 2)}% (95 % interval {interval_text(scores['top1_interval95'])}){top5}",
                   nl=False)
    typer.echo(f" on {result['val_images']} val images ({result['train_images']} train, {result['classes']} classes, "
               f"lr {result['chosen']['lr']:g}, wd {result['chosen']['weight_decay']:g}); results written to {out}")
    typer.echo(lib.chance_line(result))
    _echo_notes(notes)


@app.command("linear-seg")
def linear_seg(
    train: Optional[Path] = DENSE_TRAIN_OPTION,
    train_masks: Optional[Path] = TRAIN_MASKS_OPTION,
    val: Optional[Path] = DENSE_VAL_OPTION,
    val_masks: Optional[Path] = VAL_MASKS_OPTION,
    dataset: SegDataset = SEG_DATASET_OPTION,
    root: Optional[Path] = ROOT_OPTION,
    train_split: Optional[Split] = TRAIN_SPLIT_OPTION,
    val_split: Optional[Split] = VAL_SPLIT_OPTION,
    resolution: Optional[int] = typer.Option(None, "--resolution", min=1, help="Input side when images are embedded [default: the model's]."),
    run: Optional[Path] = RUN_OPTION,
    weights: Optional[Path] = WEIGHTS_OPTION,
    model: Optional[str] = MODEL_OPTION,
    random_init: bool = RANDOM_INIT_OPTION,
    epochs: int = typer.Option(10, "--epochs", min=1, help="Passes over the training images."),
    lr: float = typer.Option(0.1, "--lr", min=1e-9, help="Peak learning rate (SGD, momentum 0.9, cosine)."),
    wd: float = typer.Option(0.0, "--wd", min=0.0, help="Weight decay."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Training images per step (all their patches)."),
    ignore_index: int = typer.Option(255, "--ignore-index", help="Mask value that is not scored."),
    seed: int = typer.Option(0, "--seed", help="Seed of --random-init, the initialisation and the batch order."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", parser=results_path(), callback=results_file(), help="Results JSON [default: results/linear-seg-<time>-<pid>.json]."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON instead of tables."),
) -> None:
    """Linear segmentation: a linear layer on frozen patch features, trained on the training masks, scored by mIoU.

    Example: mlsctl eval linear-seg --dataset ade20k --root ADEChallengeData2016.zip --run runs/x

    Folders: mlsctl eval linear-seg --train data/fmnist-scenes/train/images --train-masks data/fmnist-scenes/train/masks
             --val data/fmnist-scenes/val/images --val-masks data/fmnist-scenes/val/masks --run runs/dino_fmnist_quick
    """
    from mlsctl.evaluate import knn_seg as knn_lib
    from mlsctl.evaluate import linear_seg as lib
    from mlsctl.evaluate.inputs import refuse_image_options, segmentation_inputs, split_records
    from mlsctl.evaluate.linear import result_diverged_note
    from mlsctl.evaluate.segmentation import constant_rule_text
    from mlsctl.restore import model_on_demand

    refuse_image_options((train, val), {"resolution": resolution})
    write = results_writer(out, "linear-seg", say, as_json)  # after the refusals, before the work
    get_model = model_on_demand(run=run, weights=weights, arch=model, random_init=random_init, seed=seed, say=say)
    inputs = segmentation_inputs(dataset, root, train_split, val_split,
                                 dict(train=train, train_masks=train_masks, val=val, val_masks=val_masks),
                                 ignore_index, get_model, lambda: {"resolution": resolution} if resolution else {},
                                 say=say)
    train_features, val_features = inputs.train_features, inputs.val_features
    train_source = knn_lib.FeatureMasks(train_features, inputs.train_masks, "train features")
    val_source = knn_lib.FeatureMasks(val_features, inputs.val_masks, "val features")
    result = lib.evaluate_linear_seg(train_source, val_source, epochs=epochs, lr=lr, weight_decay=wd,
                                     image_batch=batch_size, ignore_index=inputs.ignore_index, seed=seed,
                                     names=inputs.names, progress=None)
    payload = {"command": "eval linear-seg", "dataset": inputs.record,
               **split_records(train_features, val_features, inputs.train_masks, inputs.val_masks),
               "model": train_features.model, **result}
    out = write(payload)
    notes = [lib.one_class_note(result), result_diverged_note(result), _shared_note(inputs.record, len(val_features))]
    if as_json:
        typer.echo(json.dumps(payload, indent=2))
        _echo_notes(notes, as_json)
        return
    typer.echo(table(["class", "IoU %"], [[name, pct(result["iou_per_class"][c] if c < len(result["iou_per_class"]) else None)]
                                          for c, name in enumerate(result["classes"])]))
    foreground = f", foreground IoU {pct(result['foreground_iou'])}%" if "foreground_iou" in result else ""
    typer.echo(f"\nmIoU {pct(result['miou'])}%{foreground}, pixel accuracy "
               f"{pct(result['pixel_accuracy'])}% on {len(val_features)} val images ({counted(epochs, 'epoch')}, lr {lr:g}, "
               f"train loss {result['train_loss_per_epoch'][0]:.4g} -> {result['train_loss_per_epoch'][-1]:.4g}, "
               f"{result['seconds']['total']:.1f}s); results written to {out}")
    typer.echo(f"chance: {constant_rule_text(result['chance'])} (the training patches' most frequent class)")
    _echo_notes(notes)


def _unseen_note(classes: list[str], how: str = "", hint: str = "") -> str:
    """The note on val classes that no training image has (``how``: what the scores make of them; ``hint``: why
    they may be training classes under other folders, :func:`~mlsctl.data.labels.nested_split_hint`)."""
    verb = "occurs" if len(classes) == 1 else "occur"
    return (f"note: {counted(len(classes), 'val class', 'val classes')} never {verb} in train{how}: "
            f"{', '.join(classes[:5])}" + (f"; {hint}" if hint else ""))


def _shared_note(record: dict, val_images) -> Optional[str]:
    """How many val images are training images too (evaluate.inputs.record_shared_images), or None."""
    from mlsctl.evaluate.inputs import shared_images_note

    return shared_images_note(record, val_images)


@app.command("retrieval")
def retrieval(
    gallery: Optional[Path] = typer.Option(None, "--gallery", help="Gallery photos, one folder per object [default: data/fmnist-products/gallery; not with --index]."),
    query: Path = typer.Option(Path("data/fmnist-products/query"), "--query", help="Query photos of the same objects, one folder per object."),
    index: Optional[Path] = typer.Option(None, "--index", help="A gallery (mlsctl index build) to score instead of --gallery photos: the query sets are embedded by its own model and searched as mlsctl search searches it (its index and settings, after its adds and removals), and scored exactly too."),
    gallery_objects: Optional[Path] = typer.Option(None, "--gallery-objects", help="CSV/JSONL of object_id,path (paths relative to --gallery) naming the objects instead of its folders, as MILE's method.objects_file."),
    query_objects: Optional[Path] = typer.Option(None, "--query-objects", help="CSV/JSONL of object_id,path (paths relative to --query) naming the objects instead of its folders."),
    run: Optional[Path] = typer.Option(None, "--run", help="Run whose teacher embeds the photos: a MILE run scores its set encoder and the baselines, a run of any other method the baselines (max-pairwise, mean-cls) [default: the newest MILE run under ./runs; with --index, the gallery's run, --run giving its new place if it moved]."),
    query_size: str = typer.Option("4", "--query-size", help="Photos per query set, drawn at random (seeded) as the authors do, or 'all'."),
    noise: Optional[list[str]] = typer.Option(None, "--noise", help="Fractions of each query set replaced with random photos [default: 0 0.25 0.5]."),
    seed: int = typer.Option(0, "--seed", help="Seed of the query-photo draw and of the noise."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", min=0, help="Image-decoding worker processes [default: as mlsctl embed's]."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", parser=results_path(), callback=results_file(), help="Results JSON [default: results/retrieval-<time>-<pid>.json]."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON instead of a table."),
) -> None:
    """Image-set retrieval: R@1..R@10 and AR@10 of MILE set embeddings against single-image baselines.

    A run that is not MILE scores the baselines only: max-pairwise and mean-cls (what its galleries search with).

    Example: mlsctl eval retrieval --gallery data/fmnist-products/gallery --query data/fmnist-products/query --run runs/mile_fmnist_quick --noise 0 0.25 0.5

    A deployed gallery, with its own model, latents and search settings (index and exact search side by side):
    mlsctl eval retrieval --index galleries/products --query data/fmnist-products/query
    """
    from mlsctl.data.kinds import folder_kind
    from mlsctl.data.objects import check_objects_file
    from mlsctl.errors import UserError
    from mlsctl.evaluate.retrieval import evaluate_set_model, objects_note, paired_photos
    from mlsctl.gallery import check_photos, choose_set_model

    fractions = []
    for value in noise or ["0", "0.25", "0.5"]:
        try:
            fractions.append(float(value))
        except ValueError:
            raise UserError(f"--noise takes fractions between 0 and 1, got {value!r}") from None
        if not 0 <= fractions[-1] < 1:
            raise UserError(f"--noise takes fractions in [0, 1), got {value}")
    size = _query_size(query_size)
    if index is not None:
        _retrieval_of_index(index, query, gallery, gallery_objects, query_objects, run, size, fractions, seed, workers,
                            out, as_json)
        return
    gallery = gallery if gallery is not None else Path("data/fmnist-products/gallery")
    for option, folder in (("--gallery", gallery), ("--query", query)):
        if folder_kind(folder) == "a gallery":  # a new user's probe (2026-12-06): "contains no images"
            raise UserError(f"{option} {folder} is a gallery index (mlsctl index build); eval retrieval takes photos: "
                            f"a folder with one sub-folder of photos per object, such as the one the gallery was "
                            f"built from")
    check_objects_file(gallery_objects, "--gallery-objects")  # before the model loads, not after
    check_objects_file(query_objects, "--query-objects")
    # the objects files' rows and the pairing of the two sides too (a review, 2026-12-07: said after the model line)
    photos = paired_photos(gallery, query, gallery_objects, query_objects)
    check_photos(photos.paths)  # a 7x7 photo: by its header, before the model, by search's rule (as --index says it)
    write = results_writer(out, "retrieval", say, as_json)  # after the refusals, before the work
    model = choose_set_model(run, say=say)
    payload = {"command": "eval retrieval",
               **evaluate_set_model(model, photos, gallery, query, query_size=size, noise=fractions, seed=seed,
                                  workers=workers, say=say, gallery_objects=gallery_objects,
                                  query_objects=query_objects)}
    out = write(payload)
    if as_json:
        print(json.dumps(payload, indent=2))
        _echo_notes([objects_note(payload["objects"])], as_json)
        return
    sizes = payload["query_set_sizes"]
    shown = sizes["min"] if sizes["min"] == sizes["max"] else f"{sizes['min']} to {sizes['max']}"
    print(f"image-set retrieval, {payload['objects']} objects ({model.run} at step {model.step}), query sets of "
          f"{shown} photos; R@k in %; start = {payload['start']}:")
    print(_retrieval_table(payload, ("method", "backbone"), lambda r: (r["method"], r["backbone"])))
    note = objects_note(payload["objects"])
    if note is not None:
        print(note)
    say(f"wrote {out}")


def _retrieval_of_index(index: Path, query: Path, gallery: Optional[Path], gallery_objects: Optional[Path],
                        query_objects: Optional[Path], run: Optional[Path], size: Optional[int], fractions: list[float],
                        seed: int, workers: Optional[int], out: Optional[Path], as_json: bool) -> None:
    """``eval retrieval --index GALLERY``: the gallery's retrieval of the query objects, by its index and exactly
    (:func:`mlsctl.evaluate.retrieval.evaluate_gallery`); every refusal before the model loads."""
    from mlsctl.data.kinds import folder_kind
    from mlsctl.data.objects import check_objects_file
    from mlsctl.errors import UserError
    from mlsctl.evaluate.retrieval import (check_noise_for_queries, check_run_for_gallery, evaluate_gallery,
                                           gallery_queries, index_words)
    from mlsctl.gallery import Gallery, choose_set_model

    if gallery is not None or gallery_objects is not None:
        given = "--gallery" if gallery is not None else "--gallery-objects"
        raise UserError(f"{given} names gallery photos to embed, --index a gallery whose objects are stored: give one of "
                        f"them (--index {index} scores the gallery as it is, with its own model)")
    kind = folder_kind(index)
    if index.is_dir() and kind != "a gallery" and not (index / "gallery.json").exists():
        what = f"{kind}, not a gallery" if kind else "not a gallery (no gallery.json)"
        raise UserError(f"--index {index} is {what}: --index takes a gallery made by mlsctl index build; a folder of "
                        f"photos, one sub-folder per object, goes to --gallery")
    target = Gallery(index)  # missing, damaged: one sentence each
    if not query.exists():
        raise UserError(f"--query {query} does not exist; give a folder with one sub-folder of photos per object")
    if folder_kind(query) == "a gallery":
        raise UserError(f"--query {query} is a gallery index (mlsctl index build); --query takes photos: a folder with "
                        f"one sub-folder of photos per object, other photos of the gallery's objects")
    check_objects_file(query_objects, "--query-objects")
    queries = gallery_queries(target, query, query_objects)  # the objects, the photos and the latents, before the model
    check_noise_for_queries(queries, fractions)
    from_option = run is not None
    run = run or target.built_with_run()
    check_run_for_gallery(target, run, from_option)  # the gallery's own run trained on since: refused before the model loads
    write = results_writer(out, "retrieval", say, as_json)  # after the refusals, before the work
    say(f"gallery {index}: {len(target)} objects, index {index_words(target.settings)}; {len(queries.objects)} of "
        f"the {queries.query_objects} query objects of {query} in it")
    model = choose_set_model(run, say=say, gallery=target)  # as mlsctl search loads it
    target.check_model(model)
    payload = {"command": "eval retrieval",
               **evaluate_gallery(target, model, queries, query, query_size=size, noise=fractions, seed=seed,
                                  workers=workers, say=say, query_objects=query_objects)}
    out = write(payload)
    if as_json:
        from mlsctl.evaluate.retrieval import index_cost_note, left_out_note, objects_note, unchecked_note

        print(json.dumps(payload, indent=2))
        _echo_notes([index_cost_note(payload), left_out_note(queries), objects_note(payload["objects"]),
                     unchecked_note(queries, index)], as_json)
        return
    _print_index_result(payload, index, target, model, queries)
    say(f"wrote {out}")


def _retrieval_table(payload: dict, first: tuple[str, str], labels) -> str:
    """The R@k table of both forms of ``eval retrieval``: each result row under the two columns ``first``
    (``labels(row)``), then the chance row (a random ranking of as many objects)."""
    from mlsctl.evaluate.retrieval import replaced_text

    chance = payload["chance"]
    rows = [[*labels(r), replaced_text(r), pct(r["AR@10"]), *(pct(r[f"R@{k}"]) for k in (1, 2, 5, 10))]
            for r in payload["results"]]
    rows.append(["chance", "(a random ranking)", "", pct(chance["AR@10"]),
                 *(pct(chance[f"R@{k}"]) for k in (1, 2, 5, 10))])
    return table([*first, "noise", "AR@10", "R@1", "R@2", "R@5", "R@10"], rows,
                 right=[False, False, True, True, True, True, True, True])


def _print_index_result(payload: dict, index: Path, target, model, queries) -> None:
    """``eval retrieval --index``'s table (its index and exact rows) and its notes: what the index costs, the query
    objects left out, the k that take in every object, the query objects whose photos could not be compared."""
    from mlsctl.evaluate.retrieval import index_cost_note, index_words, left_out_note, objects_note, unchecked_note

    sizes = payload["query_set_sizes"]
    shown = sizes["min"] if sizes["min"] == sizes["max"] else f"{sizes['min']} to {sizes['max']}"
    print(f"gallery {index} ({payload['objects']} objects, {model.run} at step {model.step}), "
          f"{payload['queries']} query sets of {shown} photos; R@k in %:")
    searched = {"index": f"index: {index_words(target.settings)}", "exact": "exact (every stored latent)"}
    print(_retrieval_table(payload, ("search", "sets"), lambda r: (searched[r["search"]], r["method"])))
    print(index_cost_note(payload))
    for note in (left_out_note(queries), objects_note(payload["objects"]), unchecked_note(queries, index)):
        if note is not None:
            print(note)


@app.command("recall")
def recall(
    features: Path = typer.Argument(..., help="Feature folder (mlsctl embed, or mlsctl refine apply) of the evaluation set."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="CSV/JSONL of path,label [default: each image's own folder, however deep]."),
    k: Optional[list[int]] = typer.Option(None, "--k", min=1, help="K of Recall@K, e.g. --k 1 2 4 8 [default: 1 2 4 8, and 10 100 1000 above 10,000 embeddings]."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", parser=results_path(), callback=results_file(), help="Results JSON [default: results/recall-<time>-<pid>.json]."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON instead of a table."),
) -> None:
    """Recall@K, deep-metric-learning protocol: every embedding a query against all the others.

    Example: mlsctl eval recall features/ms-test

    After refinement: mlsctl eval recall features/ms-test-refined
    """
    from mlsctl.evaluate.recall import certain_note, evaluate_recall
    from mlsctl.features import Features, require_rows

    feats = require_rows(Features(features, "features"), "features")
    write = results_writer(out, "recall", say, as_json)  # after the refusals, before the work
    started = time.perf_counter()
    result = evaluate_recall(feats, labels, k)
    payload = {"command": "eval recall", **result, "seconds": round(time.perf_counter() - started, 3)}
    out = write(payload)
    notes = [certain_note(result["ks_certain"]),
             f"note: R@{', R@'.join(map(str, result['ks_too_large']))} left out: the set has {result['embeddings']} "
             f"embeddings" if result["ks_too_large"] else None,
             f"note: {result['lone_queries']} embeddings are the only ones of their class and are not queries"
             if result["lone_queries"] else None]
    if as_json:
        typer.echo(json.dumps(payload, indent=2))
        _echo_notes(notes, as_json)
        return
    recalls = result["recall"]
    typer.echo(table(["", *(f"R@{K}" for K in recalls), "MAP@R"],
                     [["scores", *(pct(v, 2) for v in recalls.values()), pct(result["map_at_r"], 2)],
                      ["chance (a random ranking)", *(pct(result["chance"][K], 2) for K in recalls),
                       pct(result["chance_map_at_r"], 2)]]))
    _echo_notes(notes)
    typer.echo(f"\n{result['embeddings']} embeddings of {result['classes']} classes, each a query against all the others "
               f"(%); results written to {out}")
