"""What an evaluation scores, from what its user named: feature folders, image folders (embedded
with the chosen model and cached), or the splits of a benchmark (``--dataset`` with ``--root``,
:mod:`mlsctl.data.datasets`), with their masks or labels and the result JSON's account of them.

``mlsctl eval knn-seg | linear-seg`` read :func:`segmentation_inputs`, ``mlsctl eval knn | linear``
:func:`classification_inputs`; the same calls serve a script::

    from mlsctl.evaluate.inputs import segmentation_inputs
    from mlsctl.restore import model_on_demand

    inputs = segmentation_inputs("voc", Path("VOCtrainval_11-May-2012.tar"), None, None,
                                 dict(train=None, train_masks=None, val=None, val_masks=None), 255,
                                 model_on_demand(run="runs/x"), dict)

A model is asked for (``get_model()``) only when images are to be embedded, so feature folders
never load one. Every refusal is one sentence naming the option to change.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from mlsctl.console import to_stderr
from mlsctl.errors import UserError

Say = Callable[[str], None]


def benchmark_splits(dataset: str, root: Optional[Path], train_split: Optional[str], val_split: Optional[str],
                     kinds: tuple[str, ...]):
    """The (train, val) splits of ``--dataset`` under ``--root``."""
    from mlsctl.data import datasets

    if dataset not in kinds:
        raise UserError(f"--dataset {dataset} is not one this evaluation reads; choose one of "
                        f"{', '.join(kinds + ('folders',))}")
    default_train, default_val = datasets.default_splits(dataset)
    return (datasets.open_split(dataset, root, train_split or default_train, "--train-split"),
            datasets.open_split(dataset, root, val_split or default_val, "--val-split"))


def split_features(split, given: Optional[Path], get_model, *, dense: bool, what: str, say: Say = to_stderr,
                   **embed_options):
    """``given`` (a feature folder from mlsctl embed --dataset) or the split embedded into the cache."""
    from mlsctl.features import Features, features_of_split, is_feature_folder, require_rows

    if given is None:
        return features_of_split(split, get_model, dense=dense, what=what, say=say, **embed_options)
    if not is_feature_folder(given):
        raise UserError(f"with --dataset, --{what.split()[0]} names a feature folder made by mlsctl embed --dataset; "
                        f"{given} is not one (leave it out and the split is embedded from --root)")
    return require_rows(Features(given, what), what)


def model_beside_features(sides: tuple[Optional[Path], Optional[Path]], get_model, say: Say = to_stderr,
                          embed_options: Callable[[], dict] = dict, options_taken: tuple[str, ...] = ()) -> Optional[dict]:
    """Where one side (--train, --val) is a feature folder and the other is to be embedded (images, or
    ``None``: a benchmark split), the features' model is the one to embed it with: a model given
    (--run, --weights, --model, --random-init) is checked against them before any image is embedded,
    and with none given, the model their manifest names is loaded again
    (:func:`~mlsctl.restore.model_that_made`), not the newest run (a new user's probe, 2026-12-06:
    the val images were embedded with another run's model, then refused). ``get_model`` keeps it.
    The images would be embedded as ``embed_options()`` says (resize, resolution): that too is checked
    against the features now (:func:`_check_preprocessing_beside`; ``options_taken``: those of the two
    the command has as options). Returns those options where one
    side is to be embedded beside features, else None (nothing was asked of ``embed_options``)."""
    from mlsctl.features import Features, is_feature_folder
    from mlsctl.restore import model_that_made

    given = [Features(path, f"--{side} features") for side, path in zip(("train", "val"), sides)
             if path is not None and is_feature_folder(path)]
    if given and len(given) == len(sides):
        if getattr(get_model, "given", False):
            _check_model_given_with_features(given, get_model)
        return None
    if not given:
        return None
    features = given[0]
    if not getattr(get_model, "given", False) or isinstance(features.model.get("refiner"), dict):
        model_that_made(features, get_model, f"the images beside {features.what} {features.path} are embedded "
                                              f"with the model that made them", say)
    else:
        model = get_model()
        if model.fingerprint != features.model.get("fingerprint"):
            raise UserError(f"{features.what} {features.path} come from another model ({features.model.get('path')}) "
                            f"than {model.description}, which would embed the images beside them; leave the model out "
                            f"to embed them with theirs, or give features of one model on both sides")
    options = embed_options()
    _check_preprocessing_beside(features, get_model(), options, options_taken)
    return options


def _check_model_given_with_features(given: list, get_model) -> None:
    """Feature folders on both sides are evaluated as they are: a model given beside them (--run, --weights, --model,
    --random-init) is used for nothing, so it is refused where it is not the model that made them. A new user's probe
    (2026-12-07): `eval knn --train DINO-FEATURES --val DINO-FEATURES --run runs/mls` printed DINO's scores as if
    they were MLS's, without a word."""
    model = get_model()
    for features in given:
        if model.fingerprint != features.model.get("fingerprint"):
            made_by = features.model.get("path") or "a model its manifest does not name"
            raise UserError(f"{features.what} {features.path} were made by {made_by}, not by {model.description}; "
                            f"feature folders are evaluated as they are, so the model given would not be used: leave "
                            f"it out, or give the image folders to embed them with it")


def _check_preprocessing_beside(features, model, options: dict, options_taken: tuple[str, ...]) -> None:
    """The images beside ``features`` are to be embedded with ``options``: refused before any image is,
    when that is not how the features were (a review, 2026-12-06: the refusal came after embedding them)."""
    from mlsctl.data.preprocessing import Preprocessing

    resolution = options.get("resolution") or model.info["img_size"]
    planned = Preprocessing(resolution, options.get("resize", "square")).to_dict()
    recorded = features.preprocessing
    differing = [key for key in ("resize", "resolution") if planned.get(key) != recorded.get(key)]
    if not differing:
        return  # other keys (a centre crop's rounding of an older mlsctl): the comparison after embedding says them
    shown = ", ".join(f"{key} {recorded.get(key)}" for key in differing)
    planned_shown = ", ".join(f"{key} {planned.get(key)}" for key in differing)
    if all(key in options_taken for key in differing):
        fix = "give " + " and ".join(f"--{key} {recorded.get(key)}" for key in differing) + " to embed them so"
    else:
        fix = (f"embed them so with mlsctl embed --resize {recorded.get('resize')} --resolution "
               f"{recorded.get('resolution')} and the features' model, and give that feature folder")
    raise UserError(f"{features.what} {features.path} were embedded with {shown}, and the images beside them would be "
                    f"embedded with {planned_shown}; {fix}, or give features embedded alike on both sides")


def check_labels_before_embedding(sides) -> None:
    """Every image of the folders of images to embed (``sides``: (train, its labels file), (val, its labels file))
    has a label (its class folder, or a row of the labels file): refused before a model loads and anything is
    embedded, in the words the evaluation would use after (:func:`~mlsctl.data.labels.check_labels`), once each
    side is known to be a folder of images (:func:`~mlsctl.features.check_images_folder`: a run folder given as
    one is said as such first). A new user's probe (2026-12-07) saw 500 images embedded, then refused. A feature
    folder's labels are checked where it is read."""
    from mlsctl.data.images import scan_images
    from mlsctl.data.labels import check_labels
    from mlsctl.features import check_images_folder, is_feature_folder

    folders = [(name, Path(folder), labels) for name, (folder, labels) in zip(("train", "val"), sides)
               if Path(folder).is_dir() and not is_feature_folder(folder)]
    for _, folder, _ in folders:
        check_images_folder(folder)
    for name, folder, labels in folders:
        files = [path.relative_to(folder).as_posix() for path in scan_images(folder, f"{name} images").files]
        check_labels(files, folder, labels, f"{name} images {folder}", f"--{name}-labels")


def refuse_image_options(sides: tuple[Optional[Path], Optional[Path]], given: dict) -> None:
    """Feature folders on both sides are evaluated as they are: an option that says how images are embedded
    (``given``: option name → value, None where not given) would be used for nothing, so it is refused, as a
    model given beside them is (a new user's probe, 2026-12-08: --resize and --resolution ran as if heard)."""
    from mlsctl.features import is_feature_folder

    if any(side is None or not is_feature_folder(side) for side in sides):
        return
    for name, value in given.items():
        if value is not None:
            raise UserError(f"--{name} {value} applies when images are embedded, and --train and --val are feature "
                            f"folders, embedded already; leave --{name} out, or give the image folders to embed "
                            f"them with it")


def is_feature_pair(train: Path, val: Path) -> bool:
    """Both ``train`` and ``val`` are feature folders (nothing to embed)."""
    from mlsctl.features import is_feature_folder

    return is_feature_folder(train) and is_feature_folder(val)


#: The most bytes of equal-sized images :func:`record_shared_images` reads to find val images that are copies
#: of training images (1 GiB: seconds); beyond it they are compared by path only, and that is said.
COPY_CHECK_BYTES = 1 << 30


def _image_paths(features) -> list[Path]:
    root = Path(features.input_root).resolve()
    return [root / name for name in features.files]


def shared_images(train_features, val_features) -> int:
    """How many of the val features' images are files the train features were embedded from too."""
    return len(set(map(str, _image_paths(train_features))) & set(map(str, _image_paths(val_features))))


def copied_images(train_features, val_features, max_bytes: Optional[int] = None) -> int:
    """How many of the val features' images are byte copies of a training image under another path
    (two builds of one seed, a split made by copying): sizes first, then SHA-256 of equal sizes only
    (:func:`mlsctl.evaluate.retrieval.identical_files`, as eval retrieval checks its query photos).
    Only images still on disk are compared: features embedded from an archive, or whose images were
    moved since, are scored from the features alone. Raises
    :class:`~mlsctl.evaluate.retrieval.TooMuchToCompare` where more than ``max_bytes`` (default
    :data:`COPY_CHECK_BYTES`) would be read."""
    from mlsctl.evaluate.retrieval import identical_files

    if not (Path(train_features.input_root).is_dir() and Path(val_features.input_root).is_dir()):
        return 0
    train = _image_paths(train_features)
    same = set(train)
    others = [p for p in _image_paths(val_features) if p not in same]  # one folder as both: nothing to read
    return len(identical_files(train, others, missing_ok=True,
                               max_bytes=COPY_CHECK_BYTES if max_bytes is None else max_bytes)) if others else 0


def record_shared_images(train_features, val_features, record: dict, copies: bool = False) -> None:
    """Record in the result JSON's dataset record (``val_images_in_train``) how many val images are
    training images too (the same files): the scores then measure memory, not generalisation. Every
    evaluation of a train and a val split records it and says it with its results
    (:func:`shared_images_note`; a new user's probe, 2026-12-07: knn-seg of one folder as both scored
    41.5 % mIoU, 6.7 % on its own val images, without a word). ``copies`` (knn, linear, knn-seg and
    linear-seg of folders): byte copies under other paths count too (:func:`copied_images`, also recorded as
    ``val_images_in_train_as_copies``); a benchmark's own splits are compared by path only (ImageNet's
    equal-sized JPEGs would be read whole at every evaluation)."""
    from mlsctl.evaluate.retrieval import TooMuchToCompare

    shared = shared_images(train_features, val_features)
    copied = 0
    if copies:
        try:
            copied = copied_images(train_features, val_features)
        except TooMuchToCompare as exc:
            record["val_images_compared"] = f"by path only ({exc.needed / 2**30:.1f} GiB of images of equal sizes)"
    if copied:
        record["val_images_in_train_as_copies"] = copied
    record["val_images_in_train"] = shared + copied  # 0 too: documented as always recorded (a new user's probe)
    record_skipped_images(train_features, val_features, record)


#: The most skipped files a result JSON names per split (their count is always recorded)
SKIPPED_NAMED = 20


def unreadable_images(features) -> list[list[str]]:
    """The ``[path, reason]`` of each image file ``features`` could not embed (not the other files of the folder)."""
    from mlsctl.data.images import NOT_AN_IMAGE

    skipped = features.manifest.get("skipped") if isinstance(features.manifest, dict) else None
    return [list(item) for item in skipped or [] if isinstance(item, (list, tuple)) and len(item) == 2
            and not str(item[1]).startswith(NOT_AN_IMAGE)]


def record_skipped_images(train_features, val_features, record: dict) -> None:
    """Record in the dataset record how many image files of each split were not scored, being unreadable
    (``train_images_skipped``, ``val_images_skipped``), and the first :data:`SKIPPED_NAMED` of them
    (``..._skipped_files``): an evaluation scored 8 of 10 val images without a word (a new user's probe)."""
    for split, features in (("train", train_features), ("val", val_features)):
        skipped = unreadable_images(features)
        record[f"{split}_images_skipped"] = len(skipped)
        if skipped:
            record[f"{split}_images_skipped_files"] = [path for path, _ in skipped[:SKIPPED_NAMED]]


def shared_images_note(record: dict, val_images: int) -> Optional[str]:
    """The note on val images that are training images too (:func:`record_shared_images`), or None."""
    shared, copied = record.get("val_images_in_train"), record.get("val_images_in_train_as_copies", 0)
    notes = []
    if shared:
        notes.append(f"note: {shared} of the {val_images} val images are training images too "
                     f"({_how_shared(shared - copied, copied)}): the scores measure memory, not generalisation")
    if record.get("val_images_compared"):
        notes.append(f"note: the val images were compared with the training images {record['val_images_compared']}: "
                     f"copies under other paths were not looked for")
    return "\n".join(notes) or None


def _how_shared(same: int, copied: int) -> str:
    """How val images are training images: ``same`` the same files, ``copied`` byte copies of them."""
    files = "the same file" + ("s" if same != 1 else "")
    if not copied:
        return files
    if not same:
        return "byte copies under other paths" if copied > 1 else "a byte copy under another path"
    return f"{same} {files}, {copied} byte cop{'ies' if copied != 1 else 'y'} under other paths"


def image_roots(train_features, val_features) -> dict:
    """The image folders the features of a folders evaluation were embedded from."""
    return {"train_root": str(train_features.input_root), "val_root": str(val_features.input_root)}


def dataset_record(train_split, val_split, described=None) -> dict:
    """The result JSON's account of a benchmark: name, root, splits, classes, ignore label, mapping, as
    ``described`` (default: the val split; classification: the train split, whose classes the probe
    and k-NN predict) describes them."""
    record = (val_split if described is None else described).describe()
    record.pop("split")
    record.pop("images")
    return {**record, "train_split": train_split.split, "val_split": val_split.split,
            "train_images": len(train_split), "val_images": len(val_split)}


def masks_text(masks) -> str:
    """A mask folder, or a benchmark split's masks, in words (the result JSON's ``masks``)."""
    # absolute, as the image roots beside them (a probe, 2026-12-07: the report and compare mixed the two)
    return os.path.abspath(masks) if isinstance(masks, (str, Path)) else \
        f"{masks.dataset} {masks.split} ({masks.tree.path})"


def split_records(train_features, val_features, train_masks, val_masks) -> dict:
    """The result JSON's ``train`` and ``val`` of a segmentation evaluation: features, masks, images."""
    return {split: {"features": str(features.path), "masks": masks_text(masks), "images": len(features)}
            for split, features, masks in (("train", train_features, train_masks), ("val", val_features, val_masks))}


# ------------------------------------------------------------------------------------------ segmentation


@dataclass
class SegmentationInputs:
    """What eval knn-seg and linear-seg score: dense features of both splits and their masks (folders,
    or a benchmark's splits), the result JSON's dataset record, class names and the label not scored."""
    train_features: object
    val_features: object
    train_masks: object
    val_masks: object
    record: dict
    names: list
    ignore_index: int
    benchmark: Optional[str] = None  # with no inputs given: the fmnist-scenes folder evaluated, in words


def segmentation_inputs(dataset: str, root: Optional[Path], train_split: Optional[str], val_split: Optional[str],
                        folders: dict, ignore_index: int, get_model, embed_options: Callable[[], dict],
                        fmnist: Optional[Path] = None, say: Say = to_stderr) -> SegmentationInputs:
    """The inputs of a segmentation evaluation: --dataset's splits (embedded from --root, or the feature
    folders given as --train/--val), or the four folders of ``folders`` (train, train_masks, val,
    val_masks; images are embedded, features used as they are). With none of them and ``fmnist`` given
    (knn-seg), the fmnist-scenes benchmark there, built when missing. ``embed_options()`` is called
    only when images are to be embedded."""
    from mlsctl.data.datasets import SEGMENTATION
    from mlsctl.evaluate.knn_seg import class_names
    from mlsctl.features import features_or_embed

    train, train_masks, val, val_masks = (folders[k] for k in ("train", "train_masks", "val", "val_masks"))
    if dataset != "folders":
        given = [name for name, value in (("train-masks", train_masks), ("val-masks", val_masks)) if value is not None]
        if given:
            raise UserError(f"--dataset {dataset} reads the masks from --root; drop --{given[0]}")
        train_data, val_data = benchmark_splits(dataset, root, train_split, val_split, SEGMENTATION)
        beside = model_beside_features((train, val), get_model, say, embed_options, ("resolution",))
        options = beside if beside is not None else embed_options() if train is None or val is None else {}
        train_features = split_features(train_data, train, get_model, dense=True, what="train features", say=say,
                                        **options)
        val_features = split_features(val_data, val, get_model, dense=True, what="val features", say=say, **options)
        record = dataset_record(train_data, val_data)
        record_shared_images(train_features, val_features, record)
        return SegmentationInputs(train_features, val_features, train_data, val_data, record, train_data.classes,
                                  train_data.ignore_index)
    benchmark = None
    if fmnist is not None and all(v is None for v in folders.values()):
        from mlsctl.data.fmnist import build_scenes

        if not (fmnist / "meta.json").is_file():
            get_model()  # the model first: with none to evaluate, nothing is built (a new user's run-through)
            say(f"fmnist-scenes not found in {fmnist}; building it (mlsctl data fmnist-scenes --out {fmnist})")
            build_scenes(fmnist, progress=sys.stderr.isatty())
        train, train_masks = fmnist / "train" / "images", fmnist / "train" / "masks"
        val, val_masks = fmnist / "val" / "images", fmnist / "val" / "masks"
        benchmark = f"the fmnist-scenes benchmark ({fmnist})"
    elif any(v is None for v in folders.values()):
        raise UserError("give all of --train, --train-masks, --val and --val-masks, "
                        + ("or none of them (to evaluate on fmnist-scenes), " if fmnist is not None else "")
                        + "or --dataset with --root")
    if benchmark is None:
        check_inputs_exist(("--train", train, "images"), ("--val", val, "images"), ("--train-masks", train_masks, "masks"),
                           ("--val-masks", val_masks, "masks"))
    beside = model_beside_features((train, val), get_model, say, embed_options, ("resolution",))
    options = beside if beside is not None else {} if is_feature_pair(train, val) else embed_options()
    train_features = features_or_embed(train, get_model, dense=True, what="train features", say=say, **options)
    val_features = features_or_embed(val, get_model, dense=True, what="val features", say=say, **options)
    record = {"name": "folders", **image_roots(train_features, val_features), "masks": masks_text(train_masks),
              # "masks" alone read as if one folder served both (a new user's probe)
              "val_masks": masks_text(val_masks),
              "ignore_index": ignore_index,
              "mapping": {"rule": "none: mask values are the class ids", "ignored_values": [ignore_index]}}
    record_shared_images(train_features, val_features, record, copies=True)
    names, val_names = class_names(train_masks), class_names(val_masks)
    if names is not None and val_names is not None and names != val_names:  # a probe, 2026-12-06: val's was ignored
        raise UserError(f"the class names of the training masks ({train_masks}) and of the val masks ({val_masks}) differ "
                        f"({', '.join(names[:4])}{', ...' if len(names) > 4 else ''} against "
                        f"{', '.join(val_names[:4])}{', ...' if len(val_names) > 4 else ''}): one class id would mean "
                        f"two classes; make their meta.json agree")
    return SegmentationInputs(train_features, val_features, train_masks, val_masks, record, names, ignore_index,
                              benchmark)


def check_inputs_exist(*given: tuple[str, Optional[Path], str]) -> None:
    """Every path an evaluation was given, ``(option, path, kind)`` with kind ``images`` (a feature
    folder, a folder of images or an archive), ``masks`` (a folder) or ``labels`` (a file), exists:
    said before a model loads and before the first folder is embedded (a review, 2026-12-06: a typo
    in --val or --val-masks was found after --train had been embedded)."""
    for option, path, kind in given:
        if path is None:
            continue
        path = Path(path)
        if kind == "images" and not path.exists():
            raise UserError(f"{option} {path} does not exist; give a feature folder (mlsctl embed) or a folder of images")
        if kind == "masks" and not path.is_dir():
            raise UserError(f"{option} {path} {'is not a folder' if path.exists() else 'does not exist'}; give the "
                            f"folder of masks (one PNG of class ids per image, the same relative names)")
        if kind == "labels" and path.exists() and not path.is_file() and not path.is_dir():  # <(...): a pipe
            raise UserError(f"{option} {path} is not a regular file (a pipe or a device, as <(...) gives); save it to "
                            f"a file and give that")
        if kind == "labels" and not path.is_file():
            raise UserError(f"{option} {path} {'is not a file' if path.exists() else 'does not exist'}; give a CSV "
                            f"(path,label) or JSONL labels file")


def resolve_protocol(lib, name: str, given: dict) -> tuple:
    """The preset ``name`` of ``lib.protocol`` with the explicitly given values (None: not given)
    laid over it: (preset, values, the names of those that differ from the preset)."""
    preset = lib.protocol(name)
    values = {key: (value if value is not None else getattr(preset, key)) for key, value in given.items()}
    overridden = sorted(key for key, value in given.items() if value is not None and name != "none"
                        and value != getattr(preset, key))
    return preset, values, overridden


def check_protocol_resolution(preset, overridden: list[str], resolution: Optional[int], features) -> None:
    """Features embedded at another input size than the preset's are not the preset's numbers."""
    grid, size = features.grid, features.preprocessing.get("resolution")
    if preset.input_size is None or resolution is not None or not grid or not size:
        return
    expected = preset.resolution(size // grid[0])
    if size != expected:
        raise UserError(f"--protocol {preset.name} embeds at {expected} px, and {features.path} was embedded at "
                        f"{size} px; embed the images again with --resolution {expected}, or pass --resolution "
                        f"{size} to evaluate them as they are")


# ------------------------------------------------------------------------------------------ classification


def classification_inputs(dataset: str, root: Optional[Path], train_split: Optional[str], val_split: Optional[str],
                          train: Optional[Path], val: Optional[Path], train_labels: Optional[Path],
                          val_labels: Optional[Path], get_model, say: Say = to_stderr,
                          resize: Optional[str] = None) -> tuple:
    """(train features, val features, train labels, val labels, dataset record) of eval knn and
    eval linear: the --train/--val folders with their labels, or the splits of --dataset imagenet
    (whose labels are the splits themselves). Images are embedded with ``resize`` (``center-crop``:
    DINO's k-NN and linear protocol; None: square, not given); feature folders are taken as they are,
    and a ``resize`` given with feature folders on both sides is refused."""
    from mlsctl.data.datasets import CLASSIFICATION
    from mlsctl.data.labels import FOLDER_LABELS
    from mlsctl.features import features_or_embed

    refuse_image_options((train, val), {"resize": resize})
    resize = resize or "square"

    if dataset == "folders":
        if train is None or val is None:
            raise UserError("give --train and --val (feature or image folders), or --dataset imagenet with --root")
        check_inputs_exist(("--train", train, "images"), ("--val", val, "images"), ("--train-labels", train_labels, "labels"),
                           ("--val-labels", val_labels, "labels"))
        check_labels_before_embedding(((train, train_labels), (val, val_labels)))
        model_beside_features((train, val), get_model, say, lambda: {"resize": resize}, ("resize",))
        train_features = features_or_embed(train, get_model, dense=False, what="train features", say=say, resize=resize)
        val_features = features_or_embed(val, get_model, dense=False, what="val features", say=say, resize=resize)
        record = {"name": "folders", **image_roots(train_features, val_features),
                  # the val labels were not recorded (a new user's probe, 2026-12-07)
                  # absolute, as the image roots beside them (a probe, 2026-12-07: the report mixed the two)
                  "labels": FOLDER_LABELS if train_labels is None else os.path.abspath(train_labels),
                  "val_labels": FOLDER_LABELS if val_labels is None else os.path.abspath(val_labels)}
        record_shared_images(train_features, val_features, record, copies=True)
        return train_features, val_features, train_labels, val_labels, record
    if train_labels is not None or val_labels is not None:
        raise UserError(f"--dataset {dataset} labels its images itself; drop --train-labels/--val-labels")
    train_data, val_data = benchmark_splits(dataset, root, train_split, val_split, CLASSIFICATION)
    model_beside_features((train, val), get_model, say, lambda: {"resize": resize}, ("resize",))
    train_features = split_features(train_data, train, get_model, dense=False, what="train features", say=say,
                                    resize=resize)
    val_features = split_features(val_data, val, get_model, dense=False, what="val features", say=say, resize=resize)
    record = dataset_record(train_data, val_data, train_data)
    record_shared_images(train_features, val_features, record)
    return train_features, val_features, train_data, val_data, record
