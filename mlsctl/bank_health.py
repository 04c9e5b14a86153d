"""Health indicators of a memory bank: is it full, stale, collapsed or full of duplicates?

Pure functions of a bank's written entries (:meth:`mlsctl.bank.MemoryBank.written_order`), shared by
``mlsctl bank inspect`` and by the trainer, which logs them to metrics.jsonl every
``train.bank_health_every`` steps. The pairwise indicators are computed on the L2-normalised
vectors (banks are compared by cosine):

* **mean pairwise cosine** over distinct pairs of a sample: near 0 for spread-out vectors,
  near 1 when every entry points the same way (complete collapse);
* **effective rank** (Roy & Vetterli, 2007): ``exp(H(p))`` with ``p = σ / Σσ`` the normalised
  singular values of the sample; ``n`` for ``n`` orthogonal vectors, 1 for identical ones. It
  also sees dimensional collapse, where vectors differ but span few directions;
* **uniformity** (Wang & Isola, 2020): ``log mean exp(-2‖x − y‖²)`` over distinct pairs; 0 for
  identical vectors, about -4 for vectors spread uniformly over a high-dimensional sphere;
* **near-duplicate rate**: the fraction of entries whose cosine with some *older* entry is at
  least ``duplicate_threshold`` (so ``c`` copies of one vector count ``c - 1``); a bank fed the
  same images over and over, or with too little augmentation, shows it.

Only entries written by training are measured: a prefilled bank's random start entries
(:attr:`mlsctl.bank.MemoryBank.written`) would make an untrained bank look healthy. ``fill`` is
the written share of the slots.

Status, in three levels (the thresholds, and why, in ``docs/bank-health.md``); with ``r =
min(sample, dim)`` the most directions the sampled entries can span:

* **collapsed** when the mean pairwise cosine reaches :data:`COLLAPSE_MEAN_COSINE` (0.95: two
  entries are on average 18° apart) or the effective rank falls below
  :data:`COLLAPSE_EFFECTIVE_RANK` (2: the entries span about one direction);
* **partial collapse** otherwise, when the near-duplicate rate reaches
  :data:`PARTIAL_DUPLICATE_RATE` (10 % of the examined entries copy an older one: a random bank
  has none, a bank of augmented crops of distinct images almost none) or the effective rank falls
  below :data:`PARTIAL_RANK_FRACTION` of ``r`` (10 %: isotropic random vectors reach 82-99 % of
  ``r``; the banks of this project's runs that work, from the first steps on, 18-65 % (DINO's
  ``cls`` 18-22 %, CrIBo's ``objects`` 26-65 %); SOVE's contracted ``E_C`` memory in the fidelity
  suite 3 %, 7.4 of 256);
* **healthy** otherwise; **unknown** below 2 written entries. The rank tests need ``r >= 3`` (two
  entries or two dimensions span at most two directions whatever they are), so the partial rank
  test only acts for ``r`` above ``COLLAPSE_EFFECTIVE_RANK / PARTIAL_RANK_FRACTION`` = 20.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from mlsctl.bank import LABEL_COLUMN, MemoryBank

COLLAPSE_MEAN_COSINE = 0.95
COLLAPSE_EFFECTIVE_RANK = 2.0
PARTIAL_DUPLICATE_RATE = 0.10
PARTIAL_RANK_FRACTION = 0.10
DUPLICATE_THRESHOLD = 0.999
HEALTHY, PARTIAL, COLLAPSED, UNKNOWN = "healthy", "partial collapse", "collapsed", "unknown"


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    return F.normalize(vectors.double(), dim=1)


def mean_pairwise_cosine(vectors: torch.Tensor) -> float:
    """Mean cosine over the n(n-1) ordered pairs of distinct rows (nan below 2 rows)."""
    n = vectors.shape[0]
    if n < 2:
        return float("nan")
    unit = _unit(vectors)
    total = unit.sum(0)
    # Σ_{i≠j} <u_i, u_j> = |Σ u_i|² - Σ |u_i|²  (zero rows have |u| = 0)
    pairs = total.dot(total) - (unit * unit).sum()
    return float(pairs / (n * (n - 1)))


def effective_rank(vectors: torch.Tensor) -> float:
    """exp of the entropy of the normalised singular values of the L2-normalised rows."""
    if vectors.shape[0] == 0:
        return float("nan")
    singular = torch.linalg.svdvals(_unit(vectors))
    total = singular.sum()
    if total <= 0:
        return 0.0
    p = singular / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def uniformity(vectors: torch.Tensor, t: float = 2.0) -> float:
    """``log mean exp(-t ‖u_i − u_j‖²)`` over distinct pairs of L2-normalised rows."""
    n = vectors.shape[0]
    if n < 2:
        return float("nan")
    unit = _unit(vectors)
    squared = (2 - 2 * unit @ unit.T).clamp_min(0)
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    values = -t * squared[off_diagonal]
    return float(torch.logsumexp(values, 0) - math.log(values.numel()))


@torch.no_grad()
def near_duplicates(vectors: torch.Tensor, threshold: float = DUPLICATE_THRESHOLD, block: int = 4096,
                    rows: Optional[torch.Tensor] = None) -> int:
    """Number of rows whose cosine with some earlier row is ``>= threshold`` (blockwise, exact):
    of every row, or of ``rows`` (sorted indices) only, each still compared with every earlier row
    of ``vectors``. Rows are normalised a block at a time (no normalised copy of the whole bank)."""
    rows = torch.arange(vectors.shape[0]) if rows is None else rows
    count = 0
    for start in range(0, len(rows), block):
        index = rows[start:start + block]
        queries = F.normalize(vectors[index].float(), dim=1)
        best = torch.full((len(index),), -2.0)
        for other in range(0, int(index[-1]) + 1, block):  # the blocks holding rows earlier than the last query
            keys = F.normalize(vectors[other:other + block].float(), dim=1)
            scores = queries @ keys.T  # [queries, block]
            columns = torch.arange(other, other + keys.shape[0])[None, :]
            scores = scores.masked_fill(columns >= index[:, None], -2.0)  # only strictly earlier rows
            best = torch.maximum(best, scores.max(1).values)
        count += int((best >= threshold).sum())
    return count


def sample_rows(n: int, size: Optional[int], seed: int = 0) -> torch.Tensor:
    """A fixed random subset (sorted) of ``range(n)``, or all of it when ``size`` is None or >= n."""
    if size is None or size >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:size].sort().values


@dataclass
class BankHealth:
    name: str
    size: int
    dim: int
    dtype: str
    filled: int  # valid entries (a prefilled bank's random start included)
    written: int  # slots written by training; the indicators below are over these
    fill: float  # written / size
    ptr: int
    n_written: int
    step: int
    age_min: Optional[int]
    age_median: Optional[float]
    age_max: Optional[int]
    norm_min: float
    norm_mean: float
    norm_max: float
    norm_std: float
    sample: int
    mean_cosine: float
    effective_rank: float
    uniformity: float
    duplicate_rows: int
    near_duplicates: int
    duplicate_threshold: float
    label_counts: Optional[dict[int, int]]

    @property
    def duplicate_rate(self) -> float:
        return self.near_duplicates / self.duplicate_rows if self.duplicate_rows else float("nan")

    @property
    def rank_directions(self) -> int:
        """``r``: the most directions the sampled entries can span, min(sample, dim)."""
        return min(self.sample, self.dim)

    def collapse_reasons(self) -> list[str]:
        """Why the bank looks collapsed (empty when it does not)."""
        reasons = []
        if self.mean_cosine >= COLLAPSE_MEAN_COSINE:
            reasons.append(f"mean pairwise cosine {self.mean_cosine:.3f} >= {COLLAPSE_MEAN_COSINE}")
        if self.rank_directions >= 3 and self.effective_rank < COLLAPSE_EFFECTIVE_RANK:
            reasons.append(f"effective rank {self.effective_rank:.2f} < {COLLAPSE_EFFECTIVE_RANK}")
        return reasons

    def partial_collapse_reasons(self) -> list[str]:
        """Why the bank looks partly collapsed (whether or not it is also collapsed)."""
        reasons = []
        if self.duplicate_rate >= PARTIAL_DUPLICATE_RATE:
            reasons.append(f"near-duplicates {100 * self.duplicate_rate:.1f}% >= {100 * PARTIAL_DUPLICATE_RATE:.0f}%")
        r = self.rank_directions
        floor = PARTIAL_RANK_FRACTION * r
        if r >= 3 and self.effective_rank < floor:
            reasons.append(f"effective rank {self.effective_rank:.1f} < {floor:.1f} "
                           f"({100 * PARTIAL_RANK_FRACTION:.0f}% of the {r} directions the sample could span)")
        return reasons

    @property
    def collapsed(self) -> bool:
        return bool(self.collapse_reasons())

    @property
    def status(self) -> str:
        """:data:`HEALTHY`, :data:`PARTIAL`, :data:`COLLAPSED` or :data:`UNKNOWN` (fewer than 2 written entries)."""
        if self.sample < 2:
            return UNKNOWN
        if self.collapsed:
            return COLLAPSED
        return PARTIAL if self.partial_collapse_reasons() else HEALTHY

    def status_reasons(self) -> list[str]:
        status = self.status
        if status == COLLAPSED:
            return self.collapse_reasons()
        if status == PARTIAL:
            return self.partial_collapse_reasons()
        if status == UNKNOWN:
            return [f"{self.written} entr{'y' if self.written == 1 else 'ies'} written by training; 2 are needed"]
        return []

    def status_line(self) -> str:
        """``healthy``, or the level in capitals with its reasons: ``PARTIAL COLLAPSE: ...``."""
        status, reasons = self.status, self.status_reasons()
        if status == HEALTHY:
            return HEALTHY
        return f"{status.upper() if status != UNKNOWN else status}: {'; '.join(reasons)}"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["duplicate_rate"] = self.duplicate_rate
        out["collapsed"] = self.collapsed
        out["collapse_reasons"] = self.collapse_reasons()
        out["status"] = self.status
        out["status_reasons"] = self.status_reasons()
        if self.label_counts is not None:
            out["label_counts"] = {str(k): v for k, v in self.label_counts.items()}
        return out

    def metrics(self) -> dict[str, float]:
        """The scalar indicators as ``bank/NAME/...`` entries of a metrics.jsonl record."""
        values = {"fill": self.fill, "age_median": self.age_median, "norm_mean": self.norm_mean,
                  "mean_cosine": self.mean_cosine, "effective_rank": self.effective_rank,
                  "uniformity": self.uniformity, "duplicate_rate": self.duplicate_rate}
        return {f"bank/{self.name}/{k}": (float(v) if v is not None else None) for k, v in values.items()}


EXACT_DUPLICATES_UP_TO = 16_384  # written entries whose near-duplicates are counted pair by pair (1.4 s at 384)
DUPLICATE_SAMPLE = 2048  # at least this many entries estimate the near-duplicate rate above that (whatever sample)


@torch.no_grad()
def bank_health(bank: MemoryBank, name: str, step: int, *, sample: Optional[int] = 2048,
                duplicates_on_sample: bool = False, duplicate_threshold: float = DUPLICATE_THRESHOLD,
                seed: int = 0, exact_duplicates_up_to: Optional[int] = EXACT_DUPLICATES_UP_TO) -> BankHealth:
    """Every indicator of one bank at training step ``step``.

    The pairwise indicators use a fixed random sample of ``sample`` entries written by training
    (None: all of them). Near-duplicates: every written entry is checked against every older one
    up to ``exact_duplicates_up_to`` written entries (None: always); above, the sampled entries (at
    least :data:`DUPLICATE_SAMPLE` of them) are, each against every older entry (an unbiased
    estimate of the rate, at sample × n instead of n² / 2 cosines: a 1.6 M-entry CrIBo bank took
    hours); with ``duplicates_on_sample`` (the trainer's cheap variant) the sample is checked
    against itself only. A prefilled bank's random start entries are left out of every indicator."""
    order = bank.written_order().cpu()
    vectors = bank.vectors.detach().cpu()[order]
    n = vectors.shape[0]
    rows = sample_rows(n, sample, seed)
    sampled = vectors[rows].float()
    ages = bank.ages(step).cpu()
    ages = ages[ages >= 0]
    norms = torch.cat([vectors[i:i + 65536].float().norm(dim=1) for i in range(0, n, 65536)]) if n else torch.zeros(1)
    if duplicates_on_sample:
        duplicate_vectors, duplicate_rows = sampled, None
    elif exact_duplicates_up_to is None or n <= exact_duplicates_up_to:
        duplicate_vectors, duplicate_rows = vectors, None
    else:  # a small --sample would make a noisy estimate: at least DUPLICATE_SAMPLE entries
        duplicate_vectors, duplicate_rows = vectors, sample_rows(n, max(len(rows), DUPLICATE_SAMPLE), seed)
    labels = None
    if LABEL_COLUMN in bank.payload:
        values, counts = bank.payload[LABEL_COLUMN].cpu()[order].unique(return_counts=True)
        labels = {int(v): int(c) for v, c in zip(values.reshape(-1), counts)}
    return BankHealth(
        name=name, size=bank.size, dim=bank.dim, dtype=str(bank.vectors.dtype).replace("torch.", ""),
        filled=bank.filled, written=n, fill=n / bank.size, ptr=bank.ptr, n_written=bank.n_written, step=step,
        age_min=int(ages.min()) if len(ages) else None,
        age_median=float(ages.double().quantile(0.5)) if len(ages) else None,
        age_max=int(ages.max()) if len(ages) else None,
        norm_min=float(norms.min()), norm_mean=float(norms.mean()), norm_max=float(norms.max()),
        norm_std=float(norms.std()) if n > 1 else 0.0,
        sample=len(rows), mean_cosine=mean_pairwise_cosine(sampled), effective_rank=effective_rank(sampled),
        uniformity=uniformity(sampled),
        duplicate_rows=len(duplicate_rows) if duplicate_rows is not None else len(duplicate_vectors),
        near_duplicates=near_duplicates(duplicate_vectors, duplicate_threshold, rows=duplicate_rows),
        duplicate_threshold=duplicate_threshold,
        label_counts=labels)
