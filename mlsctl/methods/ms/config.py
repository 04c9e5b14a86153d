"""Multi-Similarity's hyper-parameters: the recipe's ``method`` section when ``method.name: ms``
(docs/methods.md#multi-similarity). Light: no torch (:mod:`mlsctl.registry`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mlsctl.config import MethodConfig, param


@dataclass
class MSConfig(MethodConfig):
    name: str = param("ms", help="Multi-Similarity baseline (supervised, labels from folders or a labels file)")
    labels_file: Optional[str] = param(None, path=True, help="CSV/JSONL of path,label (paths relative to data.root or "
                                                             "to the file's folder, or absolute); default: each "
                                                             "image's own folder, however deep")
    m_per_class: int = param(4, help="images of each class in a batch (optim.batch_size must be a multiple)", ge=1)
    alpha: float = param(2.0, help="alpha: weight of the positive pairs", gt=0.0)
    beta: float = param(40.0, help="beta: weight of the negative pairs", gt=0.0)
    base: float = param(0.5, help="lambda: the similarity the pairs are measured from")
    epsilon: float = param(0.1, help="the miner's margin epsilon", ge=0.0)
