"""Dense k-NN segmentation (the Hummingbird protocol, as in CrIBo's Table 1; docs/methods.md#eval-knn-seg).

* **Memory** (:func:`build_memory`): the L2-normalised patch features of training images, each
  with a *soft label*: the class histogram of the mask pixels its patch covers
  (:func:`patch_soft_labels`; ignored pixels do not count, fully ignored patches are dropped). With
  ``memory_size`` set, each image contributes ``memory_size // n_images`` patches, drawn without
  replacement with probability ∝ 1 / (patches of the same majority class in that image), so that
  classes rare in an image are kept (:func:`sample_patches`). Training fractions below 1 draw a
  seeded subset of images per run.
* **Queries**: every patch of every validation image, L2-normalised, searched exactly by inner
  product for its k nearest memory patches (:func:`build_search`): on a CUDA GPU with torch
  (matmul + top-k in chunks, :func:`mlsctl.evaluate.knn.exact_search`), on the CPU with faiss
  ``IndexFlatIP`` where faiss is installed (else the same torch search); both give the same
  neighbours. faiss ``IndexIVFFlat`` is an option for large memories (approximate, CPU).
* **Label transfer** (:func:`transfer_labels`): ``softmax(cos / T)`` over the k neighbours weighs
  their soft labels; the class-probability map is upsampled bilinearly to the mask size and its
  argmax is the prediction.
* **Metric**: a streaming confusion matrix (:mod:`mlsctl.evaluate.segmentation`); validation
  images are processed a batch at a time, so no per-pixel array of the split is ever held.

Sources of (dense features, mask) pairs are :class:`FeatureMasks` (a feature folder and a mask
folder matched by relative path) and :class:`AugmentedPasses` (training images re-embedded under
random resized crops 0.5–1 and colour jitter 0.1, mask cropped alike).
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mlsctl.errors import UserError
from mlsctl.evaluate.segmentation import (CONSTANT_RULE, confusion_update, constant_rule, foreground_scores,
                                          hungarian_mean_iou, iou_per_class, mean_iou, pixel_accuracy)

MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")


# ------------------------------------------------------------------------------------------ pure parts


def patch_soft_labels(mask: np.ndarray, grid: tuple[int, int], num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """Class histogram of the pixels under each patch: [h·w, C], each row summing to 1, or to 0
    where every pixel is ignored. Patch cells split the mask as adaptive average pooling does (cell
    ``i`` of ``h`` covers rows ``floor(i·H/h)`` to ``ceil((i+1)·H/h)``, so neighbouring cells may
    share a row or column); the histogram is the cell's pixel counts per class over its labelled
    pixels. Counted with one ``bincount`` per mask rather than a one-hot map, so the cost does not
    grow with the number of classes (ADE20K's 150)."""
    mask = np.asarray(mask, dtype=np.int64)
    height, width = mask.shape
    h, w = grid
    valid = mask != ignore_index
    if valid.any():
        labels = mask[valid]
        if labels.min() < 0 or labels.max() >= num_classes:
            bad = int(labels.max() if labels.max() >= num_classes else labels.min())
            raise ValueError(f"mask holds class {bad} but num_classes is {num_classes}")
    col_start, col_end = _cell_edges(width, w)
    cols = np.concatenate([np.arange(a, b) for a, b in zip(col_start, col_end)])
    col_cell = np.repeat(np.arange(w), col_end - col_start)
    sub, sub_valid = mask[:, cols], valid[:, cols]
    keys = (np.arange(height)[:, None] * w + col_cell[None, :]) * num_classes + np.where(sub_valid, sub, 0)
    per_row = np.bincount(keys[sub_valid], minlength=height * w * num_classes).reshape(height, w, num_classes)
    cumulative = np.concatenate([np.zeros((1, w, num_classes), dtype=np.int64), per_row.cumsum(0)])
    row_start, row_end = _cell_edges(height, h)
    counts = torch.from_numpy(cumulative[row_end] - cumulative[row_start]).reshape(-1, num_classes).double()
    total = counts.sum(1, keepdim=True)
    return torch.where(total > 0, counts / total.clamp_min(1), torch.zeros_like(counts)).float()


def _cell_edges(size: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """First and one-past-last pixel of each of ``cells`` cells over ``size`` pixels (adaptive pooling's)."""
    index = np.arange(cells)
    return (index * size) // cells, -((-(index + 1) * size) // cells)


def sample_patches(soft_labels: torch.Tensor, budget: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of at most ``budget`` labelled patches of one image, favouring its rare classes:
    without replacement, with probability ∝ 1 / count of the patch's majority class in the image."""
    labelled = torch.nonzero(soft_labels.sum(1) > 0).squeeze(1)
    if budget >= len(labelled):
        return labelled
    majority = soft_labels[labelled].argmax(1)
    counts = torch.bincount(majority)
    weights = 1.0 / counts[majority].double()
    chosen = torch.multinomial(weights, budget, replacement=False, generator=generator)
    return labelled[chosen.sort().values]


def transfer_labels(scores: torch.Tensor, neighbour_labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Class probabilities [q, C] from the cosine ``scores`` [q, k] of the k neighbours and their
    soft labels [q, k, C]: ``sum_j softmax(scores / T)_j · label_j``."""
    weights = torch.softmax(scores / temperature, dim=1)
    return torch.einsum("qk,qkc->qc", weights, neighbour_labels)


def predict_mask(probabilities: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a [h·w, C] class-probability map to ``size`` (H, W), then argmax."""
    h, w = grid
    maps = probabilities.T.reshape(1, -1, h, w)
    upsampled = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return upsampled[0].argmax(0).numpy()


def parse_fraction(text: str) -> Fraction:
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"--fraction {text!r} is not a fraction like 1/8 or 0.125") from None
    if not 0 < value <= 1:
        raise UserError(f"--fraction {text} must lie in (0, 1]")
    return value


def parse_fractions(texts: Sequence[str], say: Callable[[str], None]) -> list[Fraction]:
    """The fractions of ``--fraction``, each once: one equal to another given before it (``1/8 0.125``) is said
    and left out, not computed twice and then blamed on too few training images (a new user's probe, 2026-12-08)."""
    fractions: list[Fraction] = []
    for text in texts:
        value = parse_fraction(text)
        if value in fractions:
            say(f"note: --fraction {text} is {value}, given already; it is computed once")
            continue
        fractions.append(value)
    return fractions


# ---------------------------------------------------------------------------------------------- sources


def read_mask(path: Path) -> np.ndarray:
    from mlsctl.data.datasets import decode_label_image

    return decode_label_image(path, str(path))


def match_masks(files: Sequence[str], masks_dir: Path, what: str) -> list[Path]:
    """The mask of each image file: same relative path without extension, in ``masks_dir``."""
    if not masks_dir.is_dir():
        raise UserError(f"{what} {masks_dir} is not a folder of masks")
    index = {}
    for path in masks_dir.rglob("*"):
        if path.suffix.lower() in MASK_EXTENSIONS and path.is_file():
            index[path.relative_to(masks_dir).with_suffix("").as_posix()] = path
    matched, missing = [], []
    for relpath in files:
        key = Path(relpath).with_suffix("").as_posix()
        if key in index:
            matched.append(index[key])
        else:
            missing.append(relpath)
    if missing:
        raise UserError(f"{what} {masks_dir} has no mask for {len(missing)} of {len(files)} images (first: "
                        f"{missing[0]}); masks must have the image's relative path with a .png extension")
    return matched


def class_names(masks_dir: Path) -> Optional[list[str]]:
    """Class names from a ``meta.json`` next to the masks (fmnist-scenes writes one)."""
    for folder in (masks_dir, masks_dir.parent, masks_dir.parent.parent):
        meta = folder / "meta.json"
        if meta.is_file():
            try:
                names = json.loads(meta.read_text()).get("classes")
            except (OSError, ValueError, AttributeError) as exc:
                import logging

                logging.getLogger("mlsctl").warning(f"{meta} cannot be read ({type(exc).__name__}); classes are shown "
                                                    f"by number")
                return None
            if isinstance(names, list) and all(isinstance(n, str) for n in names):
                return names
    return None


class FeatureMasks:
    """Dense features of a feature folder with the mask of each row: from a folder of label PNGs
    matched by relative path, or from the split of a benchmark the features were embedded from
    (:class:`mlsctl.data.datasets.SegmentationSplit`, masks mapped by its protocol)."""

    def __init__(self, features, masks, what: str):
        from mlsctl.data.datasets import SegmentationSplit
        from mlsctl.features import Features

        self.features: Features = features
        if not features.has_dense:
            raise UserError(f"{what} {features.path} has no dense features; embed it with --dense")
        if features.preprocessing.get("resize") != "square":
            raise UserError(f"{what} {features.path} was embedded with --resize {features.preprocessing.get('resize')}; "
                            f"dense evaluation needs the whole image (--resize square)")
        if isinstance(masks, SegmentationSplit):
            self.split = masks
            for relpath in features.files:
                masks.mask_path(relpath)  # every row is an image of the split
            self.masks = None
        else:
            self.split = None
            self.masks = match_masks(features.files, Path(masks), f"{what.split()[0]} masks")
        self.grid = features.grid
        self.classes: Optional[int] = None  # with class names: every mask value must be one of them
        self.ignore_index = 255
        self._shapes_checked: set[int] = set()

    def __len__(self) -> int:
        return len(self.features)

    def limit_classes(self, num_classes: int, ignore_index: int) -> None:
        """Refuse a mask holding a class id beyond the ``num_classes`` the class names give (a value
        outside the list became a class of its own in the confusion matrix, and a training mask's
        an internal error of linear-seg: a probe, 2026-12-06)."""
        self.classes, self.ignore_index = num_classes, ignore_index

    def _check_shape(self, row: int, mask: np.ndarray) -> None:
        """Refuse a mask in the raw pixel order of an image shown turned by its EXIF orientation (5–8,
        a quarter turn): the image is embedded as shown and predictions are upsampled to the mask, so
        such a mask was scored transposed, silently (a review, 2026-12-06). Only that case: a mask of
        the shown aspect at any resolution, or resized to another aspect as the whole image is for the
        model (a square), lines up and is scored as it is. An image that cannot be opened (moved since
        it was embedded, or beyond Pillow's pixel limit) is not checked."""
        from PIL import Image

        from mlsctl.data.images import exif_orientation

        try:
            with Image.open(self.features.image_path(row)) as image:
                width, height = image.size  # of the raw pixels
                turned = exif_orientation(image) in (5, 6, 7, 8)
        except (OSError, ValueError, Image.DecompressionBombError):
            return
        if not turned:
            return
        mask_height, mask_width = mask.shape[:2]

        def same_aspect(w: int, h: int) -> bool:
            return abs(mask_width * h - mask_height * w) <= max(w, h, mask_width, mask_height)

        if same_aspect(width, height) and not same_aspect(height, width):
            raise UserError(f"mask {self.masks[row]} is {mask_width}x{mask_height} px, the raw pixel order of its image "
                            f"{self.features.image_path(row)}, which is shown (and embedded) turned by its EXIF "
                            f"orientation, as {height}x{width}: the predictions would be scored against the mask "
                            f"transposed; turn the mask as the image is shown (or drop the image's orientation tag)")

    def mask(self, row: int) -> np.ndarray:
        """The label mask of ``row`` (class ids; the ignore index where nothing is scored)."""
        if self.split is not None:
            return self.split.read_mask(self.features.files[row])
        mask = read_mask(self.masks[row])
        if row not in self._shapes_checked:
            self._check_shape(row, mask)
            self._shapes_checked.add(row)
        if self.classes is not None:
            valid = mask[mask != self.ignore_index]
            if valid.size and (int(valid.max()) >= self.classes or int(valid.min()) < 0):
                bad = int(valid.max()) if int(valid.max()) >= self.classes else int(valid.min())
                raise UserError(f"mask {self.masks[row]} holds class {bad}, but the class names (meta.json) give "
                                f"{self.classes} classes, 0 to {self.classes - 1}, and the ignore label is "
                                f"{self.ignore_index}; fix the mask, or the class list")
        return mask

    def pairs(self, rows: Optional[Sequence[int]] = None, batch: int = 32) -> Iterator[tuple[int, torch.Tensor, np.ndarray]]:
        for row_batch, dense in self.features.iter_dense(rows, batch=batch):
            for row, feature_map in zip(row_batch.tolist(), dense):
                yield row, feature_map, self.mask(row)


class AugmentedPasses:
    """Training images re-embedded under the protocol's augmentation (random resized crop of
    scale 0.5–1 applied to image and mask alike, colour jitter 0.1), ``passes`` times each."""

    @classmethod
    def of_model(cls, source: FeatureMasks, model, passes: int, seed: int) -> Optional["AugmentedPasses"]:
        """The passes of ``--aug-passes`` (None for 0), re-embedding with ``model`` (a
        :class:`~mlsctl.models.source.ModelChoice`), which must be the model of the training features."""
        if not passes:
            return None
        if model.fingerprint != source.features.model.get("fingerprint"):
            raise UserError("--aug-passes re-embeds the training images, and --run/--weights is not the model of "
                            f"{source.features.path}; pass the model that made those features")
        return cls(source, model.backbone, passes, seed)

    def __init__(self, source: FeatureMasks, backbone, passes: int, seed: int, batch: int = 32):
        from mlsctl.features import embedding_device

        # on the device embed uses: the model may still be on the CPU (both feature folders cached)
        self.device = embedding_device()
        self.source, self.features, self.backbone = source, source.features, backbone.to(self.device)
        self.passes, self.seed, self.batch = passes, seed, batch
        self.resolution = int(self.features.preprocessing["resolution"])

    def pairs(self, rows: Sequence[int]) -> Iterator[tuple[int, torch.Tensor, np.ndarray]]:
        from PIL import Image
        from torchvision.transforms import v2

        from mlsctl.features import Preprocessing

        to_input = Preprocessing(self.resolution, "square")
        jitter = v2.ColorJitter(0.1, 0.1, 0.1, 0.1)
        rows = list(rows)
        for p in range(self.passes):
            generator = torch.Generator().manual_seed(self.seed * 1000 + p)
            for start in range(0, len(rows), self.batch):
                chunk, inputs, crops = rows[start:start + self.batch], [], []
                for row in chunk:
                    image = self.features.load_image(row)
                    mask = self.source.mask(row)
                    if mask.shape != (image.size[1], image.size[0]):
                        mask = np.asarray(Image.fromarray(mask.astype(np.int32), mode="I")
                                          .resize(image.size, Image.NEAREST)).astype(np.int64)
                    top, left, height, width = _crop_box(image.size, generator)
                    image = image.crop((left, top, left + width, top + height))
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
                        image = jitter(image)
                    inputs.append(to_input(image))
                    crops.append(mask[top:top + height, left:left + width])
                with torch.inference_mode():
                    dense = self.backbone(torch.stack(inputs).to(self.device)).patches.float().cpu()
                for row, feature_map, crop in zip(chunk, dense, crops):
                    yield row, feature_map, crop


def _crop_box(size: tuple[int, int], generator: torch.Generator) -> tuple[int, int, int, int]:
    from mlsctl.data.multicrop import sample_crop

    params = sample_crop(size[0], size[1], (0.5, 1.0), generator=generator)
    return params.top, params.left, params.height, params.width


# ---------------------------------------------------------------------------------------------- memory


@dataclass
class Memory:
    features: torch.Tensor  # [M, D] float32, L2-normalised
    labels: torch.Tensor  # [M, C] soft labels
    class_mass: torch.Tensor  # [C] the soft labels of every labelled training patch summed, before any sampling

    def majority_class(self) -> int:
        """The class of most training patches' label mass (ties to the lower class): the constant rule's class
        (:func:`mlsctl.evaluate.segmentation.constant_rule`). From every labelled patch, not the memory's sample,
        which draws rare classes more often (:func:`sample_patches`)."""
        return int(torch.argmax(self.class_mass))


def build_memory(pairs: Iterator[tuple[int, torch.Tensor, np.ndarray]], num_classes: int, *, per_image: Optional[int],
                 ignore_index: int, generator: torch.Generator, majority: bool = False) -> Memory:
    """The memory of the training patches; each patch's label its class histogram, or with ``majority``
    the one-hot of its most frequent class (ties to the lower class)."""
    features, labels = _Rows(), _Rows()
    class_mass = torch.zeros(num_classes, dtype=torch.float64)
    for row, feature_map, mask in pairs:
        h, w, d = feature_map.shape
        try:
            soft = patch_soft_labels(mask, (h, w), num_classes, ignore_index)
        except ValueError as exc:
            raise UserError(f"the mask of training row {row} does not fit the class list ({exc}); fix the masks or "
                            f"the classes of their meta.json") from None
        class_mass += soft.sum(0, dtype=torch.float64)
        keep = sample_patches(soft, per_image, generator) if per_image is not None else \
            torch.nonzero(soft.sum(1) > 0).squeeze(1)
        features.append(F.normalize(feature_map.reshape(-1, d).float()[keep], dim=1))
        kept = soft[keep]
        labels.append(F.one_hot(kept.argmax(1), num_classes).float() if majority else kept)
    if len(features) == 0:
        raise UserError("the training masks label no patch (every pixel is ignored); check --train-masks and --ignore-index")
    return Memory(features.cat(), labels.cat(), class_mass)


class _Rows:
    """Rows appended a few at a time and concatenated once, at a resident peak of their size plus one
    block: ``torch.cat`` of a list of per-image pieces holds both the pieces and the result (over
    twice the memory: about 83 GiB for COCO's 23 M patches of ViT-S at 224 px, against 36). The
    result is allocated whole before the blocks are copied in and freed one by one, so its pages
    become resident as the blocks go (the address space still briefly holds both)."""

    BLOCK_ROWS = 1 << 20

    def __init__(self):
        self.blocks: list[torch.Tensor] = []
        self.pending: list[torch.Tensor] = []
        self.pending_rows = 0

    def __len__(self) -> int:
        return sum(len(b) for b in self.blocks) + self.pending_rows

    def append(self, rows: torch.Tensor) -> None:
        self.pending.append(rows)
        self.pending_rows += len(rows)
        if self.pending_rows >= self.BLOCK_ROWS:
            self._close_block()

    def _close_block(self) -> None:
        if self.pending:
            self.blocks.append(torch.cat(self.pending))
        self.pending, self.pending_rows = [], 0

    def cat(self) -> torch.Tensor:
        self._close_block()
        if len(self.blocks) == 1:
            return self.blocks.pop()
        out = torch.empty((len(self), *self.blocks[0].shape[1:]), dtype=self.blocks[0].dtype)
        start = 0
        while self.blocks:
            block = self.blocks.pop(0)
            out[start:start + len(block)] = block
            start += len(block)
        return out


def build_index(features: torch.Tensor, kind: str = "flat", nlist: Optional[int] = None, nprobe: int = 16):
    """A faiss index of the memory: ``flat`` (exact inner product) or ``ivf`` (inverted lists)."""
    faiss = _import_faiss(f"--index {kind}")

    array = np.ascontiguousarray(features.numpy(), dtype=np.float32)
    dim = array.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        # at most one list per memory patch: a small fraction's memory (1/128) is smaller than an --nlist chosen
        # for the whole one, and faiss cannot train more centroids than points (a new user's probe, 2026-12-06)
        nlist = min(nlist or max(1, min(int(4 * np.sqrt(len(array))), len(array) // 39)), len(array))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(array)
        index.nprobe = nprobe
    else:
        raise UserError(f"--index {kind} is not one of {', '.join(INDEXES)}")
    index.add(array)
    return index


def _import_faiss(what: str):
    from mlsctl import threads

    try:
        return threads.faiss()
    except ImportError:
        raise UserError(f"{what} searches with faiss, which is not installed; pip install faiss-cpu, or use the exact "
                        f"torch search (--index flat --search torch)") from None


def _faiss_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("faiss") is not None


class TorchSearch:
    """Exact inner-product search with torch on ``device`` (the memory is copied there once)."""

    def __init__(self, features: torch.Tensor, device: torch.device):
        self.memory = features.to(device, torch.float32).contiguous()
        self.description = f"exact, torch matmul + top-k on {device.type}"

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        from mlsctl.evaluate.knn import exact_search

        return exact_search(self.memory, queries, k)


class FaissSearch:
    """A faiss index on the CPU (:func:`build_index`)."""

    def __init__(self, features: torch.Tensor, kind: str, nlist: Optional[int], nprobe: int):
        self.index = build_index(features, kind, nlist, nprobe)
        self.description = "exact, faiss IndexFlatIP on cpu" if kind == "flat" else \
            f"approximate, faiss IndexIVFFlat on cpu (nlist {self.index.nlist}, nprobe {min(nprobe, self.index.nlist)})"

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        _import_faiss("the faiss search")  # faiss's threads in the calling thread
        scores, neighbours = self.index.search(np.ascontiguousarray(queries.numpy(), dtype=np.float32), k)
        return torch.from_numpy(scores), torch.from_numpy(neighbours)


SEARCHES = ("auto", "torch", "faiss")
INDEXES = ("flat", "ivf")
# a memory patch's label: its class histogram (soft, the Hummingbird reference's) or its majority class
# (one-hot, ties to the lower class: CrIBo's Table 1)
PATCH_LABELS = ("soft", "majority")


def build_search(features: torch.Tensor, settings: "Settings"):
    """The neighbour search of a memory, by ``settings.search``: ``torch`` (exact, on
    ``settings.device``), ``faiss`` (CPU; the only one of ``--index ivf``), or ``auto``: torch on a
    CUDA device, faiss on the CPU where it is installed, else torch."""
    from mlsctl.evaluate.knn import search_device

    if settings.search not in SEARCHES:
        raise UserError(f"--search {settings.search} is not one of {', '.join(SEARCHES)}")
    if settings.index not in INDEXES:
        raise UserError(f"--index {settings.index} is not one of {', '.join(INDEXES)}")
    device = search_device(settings.device)
    if settings.index == "ivf":
        if settings.search == "torch":
            raise UserError("--index ivf is a faiss index; use --search faiss or auto, or --index flat with --search torch")
        return FaissSearch(features, "ivf", settings.nlist, settings.nprobe)
    backend = settings.search
    if backend == "auto":
        backend = "torch" if device.type == "cuda" or not _faiss_available() else "faiss"
    if backend == "faiss":
        return FaissSearch(features, "flat", settings.nlist, settings.nprobe)
    return TorchSearch(features, device)


# ---------------------------------------------------------------------------------------------- running


@dataclass
class Settings:
    k: int = 30
    temperature: float = 0.02
    memory_size: Optional[int] = None
    aug_passes: int = 0
    ignore_index: int = 255
    runs: int = 5
    seed: int = 0
    index: str = "flat"
    nlist: Optional[int] = None
    nprobe: int = 16
    query_batch: int = 64  # validation images per search call
    search: str = "auto"  # auto | torch | faiss (build_search)
    device: str = "auto"  # auto | cpu | cuda, of the torch search
    patch_labels: str = "soft"  # soft | majority (PATCH_LABELS)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Protocol:
    """A named set of the settings a paper reports with, applied by ``--protocol``; a flag given
    explicitly overrides its value (and the result JSON lists it as overridden)."""

    name: str
    k: int
    temperature: float
    memory_size: Optional[int]
    aug_passes: int
    input_size: Optional[int]  # pixels of the input side for a patch-16 ViT; None: the model's own
    fractions: tuple[str, ...]
    runs: int
    source: str

    def resolution(self, patch_size: int) -> Optional[int]:
        """The input side for a model of ``patch_size``: the largest multiple of it up to
        ``input_size`` (512 for ViT-S/16 and /8, 504 for /14, as open-hummingbird-eval's README)."""
        if self.input_size is None:
            return None
        return max(patch_size, self.input_size // patch_size * patch_size)

    def to_dict(self) -> dict:
        return dict(self.__dict__, fractions=list(self.fractions))


PROTOCOLS = {
    "none": Protocol("none", k=30, temperature=0.02, memory_size=None, aug_passes=0, input_size=None,
                     fractions=("1/1", "1/8", "1/64", "1/128"), runs=5,
                     source="mlsctl's defaults: every labelled patch in the memory, no augmented passes, the "
                            "model's own input size"),
    "hummingbird": Protocol("hummingbird", k=30, temperature=0.02, memory_size=10_240_000, aug_passes=1,
                            input_size=512, fractions=("1/128", "1/64", "1/8", "1/1"), runs=5,
                            source="Balazevic et al. 2023 (memory 1024x10^4 patches, k=30, softmax temperature "
                                   "0.02) as open-hummingbird-eval runs it (n_neighbours=30, beta 0.02, "
                                   "augmentation_epoch=1, input 512 for ViT-S/16, file sets 1/128, 1/64, 1/8 and "
                                   "full, 5 seeds each)"),
}


def protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise UserError(f"--protocol {name} is not one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def no_labelled_pixels(val: FeatureMasks, ignore_index: int) -> str:
    """The sentence for val masks that score nothing (a probe, 2026-12-06: "mIoU -%", exit 0)."""
    return (f"no pixel of the val masks of {val.features.path} is labelled (every one is the ignore label "
            f"{ignore_index}), so there is nothing to score; check the masks or --ignore-index")


def num_classes_of(source: FeatureMasks, ignore_index: int) -> int:
    """The class count of a source without class names: the largest class id in its masks, plus one
    (at least 2: masks of one class scored 100 % mIoU, a probe of 2026-12-07)."""
    if source.split is not None:
        return source.split.num_classes
    top, labelled = 0, False
    for row in range(len(source)):
        mask = source.mask(row)
        valid = mask[mask != ignore_index]
        if valid.size:
            top, labelled = max(top, int(valid.max())), True
    if top == 0 and labelled:  # none labelled: said as such where the patches are read
        raise UserError(f"the training masks of {source.features.path} hold one class (0) and no class names: every "
                        f"pixel would be called it, so segmentation needs at least 2 (e.g. background and objects); "
                        f"check the masks or --ignore-index")
    return top + 1


def segmentation_classes(train: FeatureMasks, val: FeatureMasks, names, ignore_index: int) -> int:
    """The class count of a segmentation evaluation (knn-seg, linear-seg): class names (meta.json) fix
    it, and masks holding a class beyond them are refused; without them every training mask is scanned
    once (:func:`num_classes_of`). One class is refused: it scores 100 %."""
    if not names:
        return num_classes_of(train, ignore_index)
    if len(names) < 2:
        raise UserError(f"the class names of {train.features.path}'s masks name one class ({names[0]}): every pixel "
                        f"would be called it, so segmentation needs at least 2")
    for source in (train, val):
        source.limit_classes(len(names), ignore_index)
    return len(names)


def segment_batches(memory: Memory, index, batches: Iterable[tuple[torch.Tensor, list[np.ndarray]]], num_classes: int,
                    settings: Settings, progress: Optional[Callable[[int], None]] = None) -> tuple[np.ndarray, float]:
    """The Hummingbird step: every patch of each batch of validation feature maps ([b, h, w, d], with
    their masks) takes the temperature-weighted labels of its k nearest memory patches, and the map,
    upsampled bilinearly, is compared with the mask → (confusion matrix, seconds spent searching).
    ``eval knn-seg`` and the training monitor (:mod:`mlsctl.monitor`) both segment with it."""
    k = min(settings.k, len(memory.features))
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    search_s = 0.0
    for dense, masks in batches:
        b, h, w, d = dense.shape
        queries = F.normalize(dense.reshape(-1, d).float(), dim=1)
        t0 = time.perf_counter()
        scores, neighbours = index.search(queries, k)
        search_s += time.perf_counter() - t0
        neighbours = neighbours.clamp_min(0)  # an IVF search may come back short (-1)
        probabilities = transfer_labels(scores, memory.labels[neighbours], settings.temperature)
        if len({m.shape for m in masks}) == 1:  # one upsampling call for the whole batch
            maps = probabilities.reshape(b, h, w, -1).permute(0, 3, 1, 2)
            predictions = F.interpolate(maps, size=masks[0].shape, mode="bilinear", align_corners=False).argmax(1)
            confusion = confusion_update(confusion, np.stack(masks), predictions.numpy(), settings.ignore_index)
        else:
            for i, mask in enumerate(masks):
                prediction = predict_mask(probabilities[i * h * w:(i + 1) * h * w], (h, w), mask.shape)
                confusion = confusion_update(confusion, mask, prediction, settings.ignore_index)
        if progress is not None:
            progress(b)
    return confusion, search_s


def evaluate_once(train: FeatureMasks, val: FeatureMasks, rows: Sequence[int], settings: Settings, num_classes: int,
                  run_seed: int, augmented: Optional[AugmentedPasses] = None,
                  progress: Optional[Callable[[int], None]] = None) -> dict:
    """One memory (from training ``rows``), every validation patch as a query → metrics and timings."""
    t_start = time.perf_counter()
    generator = torch.Generator().manual_seed(run_seed)
    images_in_memory = len(rows) * (1 + (augmented.passes if augmented else 0))
    per_image = None if settings.memory_size is None else max(1, settings.memory_size // images_in_memory)

    def train_pairs():
        yield from train.pairs(rows)
        if augmented is not None:
            yield from augmented.pairs(rows)

    if settings.patch_labels not in PATCH_LABELS:
        raise UserError(f"--patch-labels {settings.patch_labels} is not one of {', '.join(PATCH_LABELS)}")
    memory = build_memory(train_pairs(), num_classes, per_image=per_image, ignore_index=settings.ignore_index,
                          generator=generator, majority=settings.patch_labels == "majority")
    index = build_search(memory.features, settings)
    t_memory = time.perf_counter()
    batches = ((dense, [val.mask(row) for row in row_batch.tolist()])
               for row_batch, dense in val.features.iter_dense(batch=settings.query_batch))
    confusion, search_s = segment_batches(memory, index, batches, num_classes, settings, progress)
    t_end = time.perf_counter()
    return {
        "seed": run_seed,
        "train_images": len(rows),
        "memory_patches": int(len(memory.features)),
        "k": min(settings.k, int(len(memory.features))),  # the neighbours each patch voted with
        "majority_class": memory.majority_class(),  # of the training patches: the constant rule's class
        "miou": mean_iou(confusion),
        "miou_hungarian": hungarian_mean_iou(confusion),
        "pixel_accuracy": pixel_accuracy(confusion),
        "iou_per_class": [None if np.isnan(v) else float(v) for v in iou_per_class(confusion)],
        "search": index.description,
        "seconds": {"memory": t_memory - t_start, "search": search_s, "total": t_end - t_start},
        "confusion": confusion,
    }


def training_rows(n: int, fraction: Fraction, run_seed: int) -> list[int]:
    """The training images of one run: all of them at 1/1, else a seeded subset of round(n·fraction)."""
    if fraction >= 1:
        return list(range(n))
    count = max(1, round(n * fraction))
    return sorted(np.random.default_rng(run_seed).choice(n, count, replace=False).tolist())


def fraction_result(fraction: Fraction, train_images: int, outcomes: list[dict],
                    names: Optional[list[str]]) -> dict:
    """One label fraction's row of the result from its runs' ``outcomes`` (:func:`evaluate_once`): the runs'
    mean mIoU (and its standard deviation over runs), Hungarian mIoU and per-class IoU, the foreground scores
    where class 0 is a background, and what the constant rule scores (its class an index, named later). Each
    outcome gets its foreground scores and its confusion matrix as a list, for the JSON."""
    mious = np.array([o["miou"] for o in outcomes])
    class_mean = _mean_iou_per_class(outcomes)
    # the constant rule with the majority class of the fraction's first run (runs of one fraction draw
    # training subsets of one size; their majority class is nearly always the same)
    chance = constant_rule(outcomes[0]["confusion"], outcomes[0]["majority_class"], names)
    for o in outcomes:
        o.update(foreground_scores(o["confusion"], names))  # where class 0 is a background
        o["confusion"] = o["confusion"].tolist()  # [true, predicted] pixel counts, for other summaries
    foreground = ({"foreground_iou": float(np.mean([o["foreground_iou"] for o in outcomes])),
                   "binary_miou": float(np.mean([o["binary_miou"] for o in outcomes]))}
                  if "foreground_iou" in outcomes[0] else {})
    return {
        "fraction": f"{fraction.numerator}/{fraction.denominator}",
        "train_images": train_images,
        "miou": float(mious.mean()),
        "miou_std": float(mious.std(ddof=1)) if len(mious) > 1 else 0.0,
        "miou_hungarian": float(np.mean([o["miou_hungarian"] for o in outcomes])),
        "iou_per_class": [None if np.isnan(v) else float(v) for v in class_mean],
        **foreground,
        "chance": {**chance, "majority_class": outcomes[0]["majority_class"]},
        "runs": outcomes,
    }


def _mean_iou_per_class(outcomes: list[dict]) -> np.ndarray:
    """Each class's IoU averaged over the runs that saw it (NaN where none did), over the widest confusion
    matrix of the runs."""
    confusion_classes = max(o["confusion"].shape[0] for o in outcomes)
    per_class = np.full((len(outcomes), confusion_classes), np.nan)
    for i, o in enumerate(outcomes):
        values = [np.nan if v is None else v for v in o["iou_per_class"]]
        per_class[i, :len(values)] = values
    with warnings.catch_warnings():  # a class absent from every run has no mean: NaN, reported as None
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(per_class, 0) if len(outcomes) else per_class[0]


def knn_segmentation(train: FeatureMasks, val: FeatureMasks, fractions: Sequence[Fraction], settings: Settings, *,
                     augmented: Optional[AugmentedPasses] = None, names: Optional[list[str]] = None,
                     progress: Optional[bool] = False) -> dict:
    """Every fraction (runs for fractions < 1, one run for 1/1) → a JSON-ready result. ``progress``: a
    bar (True), nothing (False), or as the CLI wants it (None: a bar on a terminal, a line every 30 s in
    a log)."""
    from mlsctl.console import progress_bar

    train.features.check_same_model(val.features)
    num_classes = segmentation_classes(train, val, names, settings.ignore_index)
    n = len(train)
    plan = [(fraction, list(range(settings.runs)) if fraction < 1 else [0]) for fraction in fractions]
    total = sum(len(r) for _, r in plan) * len(val)
    # each val image once per fraction and run: "320 of 8,000 val images" puzzled a new user with 500 of them
    unit = ("val images segmented" if total == len(val) else
            f"val image segmentations ({len(val):,} images x {total // len(val)} fractions and runs)")
    bar = progress_bar(total, "knn-seg", unit, progress)
    results = []
    for fraction, runs in plan:
        outcomes = []
        for run in runs:
            run_seed = settings.seed + run
            rows = training_rows(n, fraction, run_seed)
            outcomes.append(evaluate_once(train, val, rows, settings, num_classes, run_seed, augmented, bar.update))
            if not outcomes[-1]["confusion"].sum():
                raise UserError(no_labelled_pixels(val, settings.ignore_index))
        results.append(fraction_result(fraction, max(1, round(n * fraction)), outcomes, names))
    bar.close()
    classes = list(names or [])
    classes += [str(c) for c in range(len(classes), max(len(r["iou_per_class"]) for r in results))]
    for r in results:
        r["chance"].update(majority_class=classes[r["chance"]["majority_class"]])
    largest = max(results, key=lambda r: r["train_images"])  # the 1/1 fraction where there is one
    chance = {"rule": CONSTANT_RULE, **largest["chance"]}
    return {"classes": classes, "num_classes": num_classes, "results": results, "chance": chance}
