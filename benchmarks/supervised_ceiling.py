"""The supervised ceiling of dense k-NN segmentation: a recipe's backbone trained on the training masks.

    python benchmarks/supervised_ceiling.py RECIPE [KEY=VALUE ...] --masks DIR --out RUN

The fidelity suite's calibration (issue 22, item 7) asks how far a backbone of the benchmark's
architecture gets when it is *told* the answer: the recipe's ViT (``model``), a linear layer on its
patch tokens, trained with cross-entropy against each patch's class proportions (the mask pooled
over the patch grid; ignored pixels count for nothing, patches with no labelled pixel are left
out) on the images of ``data.root`` and their masks in ``--masks`` (the same relative path, .png).

What it shares with the recipe: the architecture, the number of steps (``optim.epochs`` x
images // ``optim.batch_size``), the crop (``data.global_crops``: random resized crop at its scale
and size, applied jointly to image and mask, and a horizontal flip), AdamW with ``optim.lr``
(cosine to ``optim.min_lr`` after ``optim.warmup_epochs``) and ``optim.weight_decay``, the seed;
bf16 autocast on CUDA (unless ``train.precision: fp32``). No photometric augmentation, no method: the ceiling, not a method.

It writes a run-like folder that every evaluation reads as it reads a pretrain run
(``mlsctl eval knn-seg --run RUN``): ``RUN/config.yaml`` (the resolved recipe),
``RUN/teacher.safetensors`` (the backbone in timm's key layout, as ``mlsctl pretrain`` exports its
teacher; the linear layer is not part of it) and, last, ``RUN/summary.json``. No checkpoints: a
stopped run starts again.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mlsctl import atomic, config  # noqa: E402
from mlsctl.data.multicrop import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from mlsctl.errors import UserError  # noqa: E402
from mlsctl.evaluate.knn_seg import class_names, match_masks, read_mask  # noqa: E402
from mlsctl.models.backbone import build_backbone  # noqa: E402
from mlsctl.runs import Run  # noqa: E402
from mlsctl.schedules import cosine  # noqa: E402

IGNORE_INDEX = 255
LOG_EVERY = 50


def load_pairs(images_dir: Path, masks_dir: Path) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every image of ``images_dir`` as uint8 [N, 3, H, W], its mask as int64 [N, H, W], and the number
    of classes (from the masks' meta.json, else the largest label + 1)."""
    from PIL import Image

    files = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg") and p.is_file())
    if not files:
        raise UserError(f"data.root {images_dir} holds no .png or .jpg image")
    masks = match_masks([p.relative_to(images_dir).as_posix() for p in files], masks_dir, "--masks")
    images = []
    for path in files:
        with Image.open(path) as image:
            images.append(np.asarray(image.convert("RGB")))
    labels = [read_mask(path) for path in masks]
    shapes = {i.shape[:2] for i in images} | {m.shape for m in labels}
    if len(shapes) != 1:
        raise UserError(f"the images of {images_dir} and their masks must all have one size, found {sorted(shapes)}")
    mask_tensor = torch.from_numpy(np.stack(labels))
    names = class_names(masks_dir)
    valid = mask_tensor[mask_tensor != IGNORE_INDEX]
    num_classes = len(names) if names else int(valid.max()) + 1
    if valid.numel() and int(valid.max()) >= num_classes:
        raise UserError(f"the masks of {masks_dir} hold class {int(valid.max())} but their meta.json names "
                        f"{num_classes} classes")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), mask_tensor, num_classes


def crop_boxes(n: int, scale: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """Per sample ``[flip, width, height, centre_x, centre_y]`` of a random resized crop (fractions of
    the side; area fraction in ``scale``, aspect ratio in [3/4, 4/3] log-uniform) and a flip (+-1)."""
    area = torch.empty(n).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    ratio = log_ratio.exp()
    width = (area * ratio).sqrt().clamp(max=1.0)
    height = (area / ratio).sqrt().clamp(max=1.0)
    centre_x = width / 2 + torch.rand(n, generator=generator) * (1 - width)
    centre_y = height / 2 + torch.rand(n, generator=generator) * (1 - height)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    return torch.stack([flip, width, height, centre_x, centre_y], dim=1)


def crop(images: torch.Tensor, masks: torch.Tensor, boxes: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The boxes of :func:`crop_boxes` cut from uint8 images (bilinear) and masks (nearest) at ``size``,
    one affine grid for both; images come back as float in [0, 1]."""
    flip, width, height, centre_x, centre_y = boxes.to(images.device).unbind(1)
    theta = torch.zeros(len(boxes), 2, 3, device=images.device)
    theta[:, 0, 0] = width * flip
    theta[:, 0, 2] = 2 * centre_x - 1
    theta[:, 1, 1] = height
    theta[:, 1, 2] = 2 * centre_y - 1
    grid = F.affine_grid(theta, [len(boxes), 1, size, size], align_corners=False)
    pixels = F.grid_sample(images.float() / 255, grid, mode="bilinear", padding_mode="border", align_corners=False)
    labels = F.grid_sample(masks[:, None].float(), grid, mode="nearest", padding_mode="border", align_corners=False)
    return pixels, labels[:, 0].round().long()


def patch_targets(masks: torch.Tensor, patch: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patch's class proportions [B, h, w, C] over its labelled pixels, and whether it has any [B, h, w]."""
    valid = masks != IGNORE_INDEX
    one_hot = F.one_hot(torch.where(valid, masks, 0), num_classes).float() * valid[..., None]
    counts = F.avg_pool2d(one_hot.permute(0, 3, 1, 2), patch).permute(0, 2, 3, 1)
    total = counts.sum(-1)
    return counts / total.clamp(min=1e-8)[..., None], total > 0


def train(recipe, masks_dir: Path, out: Path) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    images, masks, num_classes = load_pairs(Path(recipe.data.root), masks_dir)
    batch_size, size = recipe.optim.batch_size, recipe.data.global_crops.size
    steps_per_epoch = len(images) // batch_size
    if steps_per_epoch == 0:
        raise UserError(f"optim.batch_size {batch_size} is larger than the {len(images)} images of {recipe.data.root}")
    total_steps = steps_per_epoch * recipe.optim.epochs
    warmup_steps = steps_per_epoch * recipe.optim.warmup_epochs
    torch.manual_seed(recipe.seed)
    backbone = build_backbone(recipe.model).to(device)
    if size % backbone.patch_size:
        raise UserError(f"data.global_crops.size {size} is not a multiple of the patch size {backbone.patch_size}")
    head = torch.nn.Linear(backbone.width, num_classes).to(device)
    parameters = [*backbone.parameters(), *head.parameters()]
    decay = [p for p in parameters if p.ndim > 1]
    no_decay = [p for p in parameters if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.optim.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=recipe.optim.lr,
                                  fused=device.type == "cuda")
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    images, masks = images.to(device), masks.to(device)
    generator = torch.Generator().manual_seed(recipe.seed)  # on the CPU: the same draws on every device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=device.type == "cuda" and recipe.train.precision != "fp32")
    started = time.perf_counter()
    losses = []
    order = torch.randperm(len(images), generator=generator)
    for step in range(total_steps):
        position = step % steps_per_epoch
        if position == 0 and step:
            order = torch.randperm(len(images), generator=generator)
        rows = order[position * batch_size:(position + 1) * batch_size].to(device)
        boxes = crop_boxes(batch_size, tuple(recipe.data.global_crops.scale), generator)
        pixels, labels = crop(images[rows], masks[rows], boxes, size)
        target, labelled = patch_targets(labels, backbone.patch_size, num_classes)
        for group in optimizer.param_groups:
            group["lr"] = cosine(step, total_steps, recipe.optim.lr, recipe.optim.min_lr, warmup_steps)
        with autocast:
            logits = head(backbone((pixels - mean) / std).patches)
        per_patch = -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1)
        loss = per_patch[labelled].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % LOG_EVERY == 0 or step == total_steps - 1:
            losses.append((step, float(loss.detach())))
            print(f"step {step + 1}/{total_steps} loss {losses[-1][1]:.4f} lr "
                  f"{optimizer.param_groups[0]['lr']:.2e}", flush=True)
    if not math.isfinite(losses[-1][1]):
        raise UserError(f"the supervised loss is {losses[-1][1]} at the last step; lower optim.lr")
    seconds = time.perf_counter() - started
    export(backbone, recipe, out)
    summary = {"trainer": "supervised_ceiling", "steps": total_steps, "resumed_from": None, "seconds": round(seconds, 2),
               "images": len(images), "classes": num_classes, "device": str(device),
               "loss_first": losses[0][1], "loss_last": losses[-1][1]}
    atomic.write_json(Run(out).summary_path, summary)
    return summary


def export(backbone, recipe, out: Path) -> None:
    """RUN/config.yaml and RUN/teacher.safetensors, as ``mlsctl pretrain`` writes them."""
    from safetensors.torch import save_file

    run = Run(out)
    out.mkdir(parents=True, exist_ok=True)
    config.save_recipe(recipe, run.config_path)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}
    model = recipe.model
    spec = {"arch": model.arch, "img_size": model.img_size, "patch_size": model.patch_size,
            "timm_kwargs": dict(model.timm_kwargs or {})}
    metadata = {"arch": model.arch, "format": "timm", "model": json.dumps(spec, sort_keys=True)}
    atomic.write_with(run.teacher_weights_path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="a recipe file or shipped recipe name (its model, optim, crops and seed)")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE recipe overrides (data.root=... for the images)")
    parser.add_argument("--masks", type=Path, required=True, help="the masks of data.root's images (label PNGs)")
    parser.add_argument("--out", type=Path, required=True, help="the run folder to write")
    options = parser.parse_args(argv)
    try:
        recipe = config.load_recipe(options.recipe, options.overrides)
        if Run(options.out).summary_path.is_file():
            raise UserError(f"{options.out} already holds a finished run (summary.json); choose another --out")
        summary = train(recipe, options.masks, options.out)
    except UserError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    print(f"supervised ceiling: {summary['steps']} steps in {summary['seconds']:.0f}s, loss {summary['loss_first']:.3f} "
          f"-> {summary['loss_last']:.3f}; backbone in {Run(options.out).teacher_weights_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
