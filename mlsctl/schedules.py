"""Per-step schedules as pure functions of the step (so a resumed run needs no scheduler state).

These follow DINO's ``cosine_scheduler``: a linear warm-up from ``warmup_start`` reaching ``start``
at ``warmup_steps``, then a half cosine from ``start`` to ``end`` over the remaining steps. One
departure: DINO's warm-up is ``np.linspace(warmup_start, start, warmup_steps)``, which reaches
``start`` one step earlier (at ``warmup_steps - 1``); ours is theirs × (W − 1)/W during warm-up
(docs/methods.md#dino-departures).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def cosine(step: int, total_steps: int, start: float, end: float, warmup_steps: int = 0, warmup_start: float = 0.0) -> float:
    if step < warmup_steps:
        return warmup_start + (start - warmup_start) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def linear_warmup_epochs(epoch: int, warmup_epochs: int, start: float, end: float) -> float:
    """DINO's teacher temperature: ``linspace(start, end, warmup_epochs)[epoch]``, then ``end``."""
    if epoch >= warmup_epochs:
        return end
    if warmup_epochs <= 1:
        return start
    return start + (end - start) * epoch / (warmup_epochs - 1)


@dataclass(frozen=True)
class Schedule:
    """The run's clock: how steps map to epochs."""

    steps_per_epoch: int
    epochs: int

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def steps(self, epochs: float) -> int:
        return int(round(epochs * self.steps_per_epoch))
