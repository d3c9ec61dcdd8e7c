"""Selection of GKD's primary group Φ without a global sort, for classes split over shards and ranks.

Every class gets an integer key that orders the classes exactly as the ranking does (larger key =
ranked higher; equal logits rank the lower class index first, so keys are distinct). With
G(t) = Σ_{key ≥ t} p̃ and N(t) = #{key ≥ t}, both sums over classes, each shard and rank adds its
part, so only NUM_PIVOTS numbers per row cross ranks per pass.

:func:`search` keeps an interval [lo, hi) of keys with G(lo) ≥ τ > G(hi) (N(lo) ≥ k > N(hi) for a
count k) and evaluates G and N at NUM_PIVOTS pivots per pass, which cut it into NUM_PIVOTS + 1
parts. Once one class is left in the interval (N(lo) − N(hi) = 1) it is the first class m of the
ranking at which the cumulative mass reaches τ: cum_m = G(lo), cum_{m−1} = G(hi), and GKD Eq. 3
picks k = m − 1 or m from these two numbers alone. The number of passes is fixed by the width of
the key range, so the search never reads a result back to the host.

The Triton kernels of :mod:`facekd.kernels.grouped_kd` key fp32 logits as ukey(z)·C + (C − 1 −
class) (< 2^32·C) and evaluate N and G on chip. :func:`sharded_primary_mask` is the plain-torch
path: it keys the float64 value of the logit, 64 bits, which with the class term does not fit an
int64, so it searches in two stages — first the upper 32 bits of the value's key alone, then, inside
the one bucket of upper bits where the answer lies, (lower 32 bits)·C + (C − 1 − class). Each rank
sorts its own shard once and evaluates N and G by binary search in it.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from facekd.kernels.common import AllReduce, all_reduce_max, all_reduce_sum

NUM_PIVOTS = 16  # pivots per search pass: each pass divides the key interval by 17
# gkd_adaptive.py of the authors' code tries k = 1, 101, 201, … for the batch-wide k.
BATCH_K_STEP = 100
_WORD = 2**32  # width of the key range of a 32-bit word

Evaluate = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Interval(NamedTuple):
    """Search state per row: keys in [lo, hi), with N and G at both ends."""

    lo: torch.Tensor  # [R] int64
    hi: torch.Tensor
    count_lo: torch.Tensor  # [R] float64, N(lo) ≥ target > N(hi) or G(lo) ≥ τ > G(hi)
    count_hi: torch.Tensor
    mass_lo: torch.Tensor
    mass_hi: torch.Tensor


def whole_range(key_width: int, num_classes: int, mass: torch.Tensor | float, num_rows: int,
                device: torch.device) -> Interval:
    """The start of a search over keys [0, key_width): every one of ``num_classes`` classes, of total
    mass ``mass`` ([R] or a number), at or above 0; none at key_width."""
    mass = torch.as_tensor(mass, dtype=torch.float64, device=device).expand(num_rows)
    return Interval(
        lo=torch.zeros(num_rows, dtype=torch.int64, device=device),
        hi=torch.full((num_rows,), key_width, dtype=torch.int64, device=device),
        count_lo=torch.full((num_rows,), float(num_classes), dtype=torch.float64, device=device),
        count_hi=torch.zeros(num_rows, dtype=torch.float64, device=device),
        mass_lo=mass.clone(),
        mass_hi=torch.zeros(num_rows, dtype=torch.float64, device=device),
    )


def search_passes(key_width: int) -> int:
    """Passes after which any key interval of width ``key_width`` is down to one key."""
    width, passes = key_width, 0
    while width > 1:
        width, passes = -(-width // (NUM_PIVOTS + 1)), passes + 1
    return passes


def search(
    evaluate: Evaluate,
    start: Interval,
    passes: int,
    *,
    tau: float | None = None,
    target_count: torch.Tensor | None = None,
    to_one_key: bool = False,
) -> Interval:
    """Narrow [lo, hi) to the one class at which G reaches τ (or N reaches target_count [R]).

    ``evaluate(pivots, active)`` returns N and G [R, NUM_PIVOTS] at the pivots [R, NUM_PIVOTS];
    rows not ``active`` are settled and may be skipped. A row settles when one class is left in its
    interval, or (``to_one_key``, for keys that classes share) when the interval is one key wide.
    """
    offsets = torch.arange(1, NUM_PIVOTS + 1, device=start.lo.device)
    state = start
    for _ in range(passes):
        if to_one_key:
            active = state.hi - state.lo > 1
        else:
            active = state.count_lo - state.count_hi > 1
        step = (state.hi - state.lo + NUM_PIVOTS) // (NUM_PIVOTS + 1)
        pivots = torch.minimum(state.lo[:, None] + step[:, None] * offsets, state.hi[:, None])
        count, mass = evaluate(pivots.contiguous(), active)
        reached = mass >= tau if target_count is None else count >= target_count[:, None]
        # pivots increase, so N and G decrease: count the leading pivots that still reach
        below = reached.long().cumprod(1).sum(1)
        new_lo = (below - 1).clamp(min=0)[:, None]
        new_hi = below.clamp(max=NUM_PIVOTS - 1)[:, None]
        move_lo = active & (below > 0)
        move_hi = active & (below < NUM_PIVOTS)
        state = Interval(
            lo=torch.where(move_lo, pivots.gather(1, new_lo).squeeze(1), state.lo),
            hi=torch.where(move_hi, pivots.gather(1, new_hi).squeeze(1), state.hi),
            count_lo=torch.where(move_lo, count.gather(1, new_lo).squeeze(1), state.count_lo),
            count_hi=torch.where(move_hi, count.gather(1, new_hi).squeeze(1), state.count_hi),
            mass_lo=torch.where(move_lo, mass.gather(1, new_lo).squeeze(1), state.mass_lo),
            mass_hi=torch.where(move_hi, mass.gather(1, new_hi).squeeze(1), state.mass_hi),
        )
    return state


def batch_k_from_first(first: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The authors' batch-wide k from the 1-based position ``first`` at which the descending
    batch-summed probabilities reach τ·B: the next of 1, 1 + 100, 1 + 200, …, capped at C."""
    k = 1 + BATCH_K_STEP * torch.ceil((first - 1) / BATCH_K_STEP)
    return torch.where(k < num_classes, k, float(num_classes))


# ---------------------------------------------------------------------------------------------
# Plain torch, classes split across ranks
# ---------------------------------------------------------------------------------------------


def _ordered_bits(values: torch.Tensor) -> torch.Tensor:
    """int64 in the order of the float64 values; −0.0 and +0.0 are one value."""
    bits = torch.where(values == 0, 0.0, values.double()).view(torch.int64)
    # negative floats: larger magnitude, smaller key; flipping the 63 magnitude bits does that
    return torch.where(bits < 0, bits ^ 0x7FFF_FFFF_FFFF_FFFF, bits)


def _bucket_keys(
    upper: torch.Tensor,  # [R, C_r] upper 32 bits of the value's key, in [0, 2^32)
    lower: torch.Tensor,  # [R, C_r] lower 32 bits
    classes: torch.Tensor,  # [C_r] or [R, C_r] global class index
    bucket: torch.Tensor,  # [R] the upper bits the second stage searches in
    num_classes: int,
) -> torch.Tensor:
    """Keys of the second stage: (lower bits)·C + (C − 1 − class) inside the bucket, −1 below it,
    2^32·C (the top of the range, above every pivot but the last) above it."""
    inside = lower * num_classes + (num_classes - 1 - classes)
    bucket = bucket[:, None]
    return torch.where(upper < bucket, -1, torch.where(upper > bucket, _WORD * num_classes, inside))


class _RankedShard:
    """One rank's classes of every row in ranking order (ascending keys), with suffix sums of p̃,
    so that N and G at a pivot are a binary search and a lookup."""

    def __init__(self, values: torch.Tensor, masses: torch.Tensor, classes: torch.Tensor,
                 num_classes: int, all_reduce: AllReduce | None):
        # values [R, C_r] ranked quantity; masses [R, C_r] p̃; classes [C_r] global index
        keys = _ordered_bits(values)
        # lower class first among equal values: columns by descending class, then a stable sort
        by_class = torch.argsort(classes, descending=True)
        keys, order = torch.sort(keys[:, by_class], dim=1, stable=True)
        columns = by_class[order]
        self.upper = (keys >> 32) + 2**31
        self.lower = keys & 0xFFFF_FFFF
        self.classes = classes[columns]
        ranked_masses = masses.gather(1, columns).double()
        # G at position j = Σ_{i ≥ j}, summed from the top of the ranking down
        suffix = ranked_masses.flip(1).cumsum(1).flip(1)
        self.suffix = torch.cat([suffix, suffix.new_zeros(suffix.shape[0], 1)], dim=1)
        self.num_classes = num_classes
        self.all_reduce = all_reduce

    def evaluate(self, keys: torch.Tensor) -> Evaluate:
        """N and G over all ranks at pivots, for these ascending keys [R, C_r] of the ranked classes."""
        def evaluate(pivots: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            first = torch.searchsorted(keys, pivots)
            local = torch.stack([(keys.shape[1] - first).double(), self.suffix.gather(1, first)])
            count, mass = all_reduce_sum(local, self.all_reduce)
            return count, mass
        return evaluate

    def locate(self, *, tau: float | None = None, target_count: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, Interval]:
        """The bucket of upper bits [R] and the second stage's final interval: the one class at
        which G reaches τ (or N reaches target_count)."""
        total = all_reduce_sum(self.suffix[:, 0].clone(), self.all_reduce)
        num_rows = self.upper.shape[0]
        device = self.upper.device
        start = whole_range(_WORD, self.num_classes, total, num_rows, device)
        bucket = search(self.evaluate(self.upper), start, search_passes(_WORD), tau=tau,
                        target_count=target_count, to_one_key=True)
        # the bucket holds the classes between its two ends; the second stage starts from them
        width = _WORD * self.num_classes
        start = bucket._replace(lo=torch.zeros_like(bucket.lo), hi=torch.full_like(bucket.hi, width))
        keys = _bucket_keys(self.upper, self.lower, self.classes, bucket.lo, self.num_classes)
        return bucket.lo, search(self.evaluate(keys), start, search_passes(width), tau=tau,
                                 target_count=target_count)


def _softmax(logits: torch.Tensor, all_reduce: AllReduce | None) -> torch.Tensor:
    """softmax over every class of every rank [R, C_r], by torch.softmax's formula
    exp(x − max) / Σ exp(x − max), so that equal logits give the same (often exact) numbers."""
    row_max = all_reduce_max(logits.amax(1), all_reduce)
    weights = torch.exp(logits - torch.where(torch.isfinite(row_max), row_max, 0.0)[:, None])
    return weights / all_reduce_sum(weights.sum(1), all_reduce)[:, None]


def sharded_primary_mask(
    student_logits: torch.Tensor,  # [B, C_r] this rank's student logits
    classes: torch.Tensor,  # [C_r] int64 global class of each column
    *,
    num_classes: int,
    all_reduce: AllReduce | None,
    tau: float,
    temperature: float,
    selection: str,
    k: int | None,
    force_target: bool,
    labels: torch.Tensor | None,  # [B] global classes forced first (force_target)
) -> torch.Tensor:
    """This rank's columns of the primary group Φ [B, C_r] bool, over the C classes of all ranks.

    The same Φ as :func:`facekd.kernels.grouped_kd.reference_primary_mask` on the whole logits (its
    ties included: equal logits rank the lower global class first; among equally good k the
    smallest wins; τ ≥ 1 selects every class), computed in the logits' dtype; across ranks only
    per-row numbers travel (2 per row, then 2·NUM_PIVOTS per row and pass).
    """
    z = student_logits.detach()
    batch_size = z.shape[0]
    everything = torch.ones_like(z, dtype=torch.bool)
    if (selection == "sample" and tau >= 1.0) or (selection == "fixed" and k >= num_classes):
        return everything
    ranking_value = z
    if force_target:
        ranking_value = z.masked_fill(labels.long()[:, None] == classes[None, :], math.inf)
    if selection == "fixed":
        target = torch.full((batch_size,), float(k), dtype=torch.float64, device=z.device)
    elif selection == "batch":
        # the authors' gkd_adaptive.py: batch-summed softmax at T = 1, a class's sum on its rank
        class_mass = _softmax(z, all_reduce).sum(0, keepdim=True)
        ranked = _RankedShard(class_mass, class_mass, classes, num_classes, all_reduce)
        _, interval = ranked.locate(tau=tau * batch_size)
        first = interval.count_hi + 1  # 1-based position at which the batch mass reaches τ·B
        target = batch_k_from_first(first, num_classes).expand(batch_size)
    if selection == "sample":
        probabilities = _softmax(z / temperature, all_reduce)
        ranked = _RankedShard(ranking_value, probabilities, classes, num_classes, all_reduce)
        bucket, interval = ranked.locate(tau=tau)
        # GKD Eq. 3: class m (first to reach τ) or the one before it, the smaller k on a tie
        take_before = (interval.count_hi >= 1) & (tau - interval.mass_hi <= interval.mass_lo - tau)
        threshold = torch.where(take_before, interval.hi, interval.lo)
    else:
        ranked = _RankedShard(ranking_value, torch.zeros_like(z), classes, num_classes, all_reduce)
        bucket, interval = ranked.locate(target_count=target)
        threshold = interval.lo
    keys = _ordered_bits(ranking_value)
    shard_keys = _bucket_keys((keys >> 32) + 2**31, keys & 0xFFFF_FFFF, classes[None, :], bucket,
                              num_classes)
    return shard_keys >= threshold[:, None]
