"""Context refinement's hyper-parameters: the recipe's ``method`` section when ``method.name: refine``
(docs/methods.md#context-refinement). Light: no torch (:mod:`mlsctl.registry`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

from mlsctl.config import MethodConfig, param


@dataclass
class RefineConfig(MethodConfig):
    # what a saved run recipe without the key was trained with (mlsctl.config.load_run_recipe)
    SAVED_DEFAULTS: ClassVar[dict] = {"input_scale": "sqrt_d"}

    name: str = param("refine", help="context refinement of the embeddings in the feature folder data.root")
    labels_file: Optional[str] = param(None, path=True, help="CSV/JSONL of path,label for the feature rows' files; "
                                                             "default: each image's own folder, however deep")
    blocks: int = param(8, help="T: cross-attention blocks", ge=1)
    neighbours: int = param(8, help="k: nearest neighbours each embedding attends to", ge=1)
    out_dim: int = param(0, help="d2 of the optional final linear layer d1 -> d2 (+ normalisation); 0 = none", ge=0)
    mlp_ratio: float = param(2.0, help="MLP width of a block, in multiples of d1", gt=0.0)
    zero_init: bool = param(True, help="W_o and W_2 start at zero: every block starts as the identity")
    input_scale: Literal["none", "sqrt_d"] = param(
        "none", help="none: each block works on the unit vectors themselves, as the supplement writes it; sqrt_d: on "
                     "sqrt(d1) x and sqrt(d1) n (unit variance per coordinate; ours, the default until 2026-12-06; "
                     "docs/methods.md#context-refinement)")
    positives_per_class: int = param(2, help="embeddings of each class in a batch", ge=2)
    alpha: float = param(2.0, help="Multi-Similarity alpha", gt=0.0)
    beta: float = param(40.0, help="Multi-Similarity beta", gt=0.0)
    base: float = param(0.5, help="Multi-Similarity lambda")
    epsilon: float = param(0.1, help="the miner's margin epsilon", ge=0.0)
