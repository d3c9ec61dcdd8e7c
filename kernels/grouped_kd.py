"""Grouped Knowledge Distillation (GKD, Zhao et al., AAAI 2023) over all C identities.

The student's softened prediction p̃ = softmax(z_S / T), ranked descending, splits the classes into
a primary group Φ (the top k, k = argmin_k |Σ_{i≤k} p̃_(i) − τ|, GKD Eq. 2–3) and a secondary
group Ψ (the rest). Classic KD then splits exactly into three parts (GKD Eq. 9):

    KL(p^T ‖ p^S) = p_Φ^T · KL(p̂^T ‖ p̂^S) + p_Ψ^T · KL(p̌^T ‖ p̌^S) + KL(p_b^T ‖ p_b^S)
                  =  p_Φ^T · Primary-KD  +  p_Ψ^T · Secondary-KD  +  Binary-KD

with p̂ / p̌ the distributions renormalised inside Φ / Ψ (GKD Eq. 5) and p_b = (p_Φ, p_Ψ) the
mass of each group (GKD Eq. 6). GKD keeps Primary-KD and Binary-KD (GKD Eq. 11):

    loss = (w_primary · Primary-KD + w_binary · Binary-KD + w_secondary · Secondary-KD) · T²

KL terms are summed over classes; the batch reduction is chosen by ``reduction``.

How this file reads the paper, where the text leaves room:

* Ties. The ranking is by the student's logit (softmax is monotone, so this is the ranking of p̃);
  equal logits rank the lower class index first. Among equally good k (equal |cum_k − τ|) the
  smallest k wins. k ≥ 1 always; k = C leaves Ψ empty and Secondary-KD is 0.
* τ = 1 selects every class: classic KD (GKD Table 2, "KD (τ = 1)"), whatever rounding does to
  the cumulative sum.
* Temperature. The paper's Eq. 1 has none; its released code divides both networks' logits by T
  (T = 4) and multiplies the loss by T² (Hinton). ``temperature=1.0`` is the paper.
* The teacher is a fixed target: its logits are detached and get no gradient. The selection of Φ
  is a piecewise-constant function of the student's logits and is not differentiated either.
* Per-sample weights: each ``w_*`` may be a float or a tensor [B] (held constant, not
  differentiated); ``w_primary = p_Φ^T, w_binary = 1, w_secondary = p_Ψ^T`` gives classic KD
  exactly (GKD Eq. 9; the paper's Table 3 row "λ1 = p_Φ^T").

Options that follow the authors' released code (github.com/WisonZ/GKD) rather than the paper:

* ``selection="batch"`` (``gkd_adaptive.py``): one k for the whole batch, the first k in
  1, 1 + 100, 1 + 200, … at which the descending batch-summed student probabilities at T = 1
  reach τ·B (C when none does below C).
* ``selection="fixed"`` with ``k=`` (``distillation/gkd.py`` uses k = 10,000): the same k for
  every sample, capped at C.
* ``force_target=True`` with ``labels``: the ground-truth class is put at the head of the
  student's ranking before the group is cut (their ``scatter(…, 999999)``), so it is always in Φ;
  the selection rule then runs over that ranking unchanged.

Entry points: :func:`grouped_kd_loss` (logits [B, C]), :func:`grouped_kd_loss_sharded` (logits
split by class, in one process or across ranks through ``all_reduce``),
:func:`grouped_kd_loss_from_embeddings` (s·cos θ computed tile by tile from embeddings and class
centres, no B×C matrix), and :func:`grouped_kd_terms` (the three KL terms and Φ, plain torch).
The Triton path finds Φ without sorting (see "Triton kernels" below) and computes in fp32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl

from facekd.kernels.backend import (check_nonempty, full_precision, reference_dtype, triton_interpreted,
                                    use_triton)
from facekd.kernels.common import (AllReduce, all_reduce_max, all_reduce_sum, check_reduction, dot, dot_precision,
                                   inverse_norm, reduce_rows)
from facekd.kernels.margin_ce import cosine_logits
from facekd.kernels.selection import (BATCH_K_STEP, NUM_PIVOTS, Evaluate, Interval, batch_k_from_first, search,
                                      search_passes, sharded_primary_mask, whole_range)

SELECTIONS = ("sample", "batch", "fixed")
# The embedding kernels hold one whole embedding (padded to a power of two) per tile row.
MAX_EMBEDDING_DIM = 1024


class GroupedKDTerms(NamedTuple):
    """Per-sample parts of classic KD (GKD Eq. 9–10), not yet weighted nor multiplied by T²."""

    primary: torch.Tensor  # [B] Primary-KD = KL(p̂^T ‖ p̂^S) inside Φ
    binary: torch.Tensor  # [B] Binary-KD = KL(p_b^T ‖ p_b^S)
    secondary: torch.Tensor  # [B] Secondary-KD = KL(p̌^T ‖ p̌^S) inside Ψ, 0 where Ψ is empty
    primary_mask: torch.Tensor  # [B, C] bool, True on Φ
    teacher_primary_mass: torch.Tensor  # [B] p_Φ^T; p_Ψ^T = 1 − p_Φ^T


# ---------------------------------------------------------------------------------------------
# Argument checks shared by every path
# ---------------------------------------------------------------------------------------------


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [B, C], got shape {tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            "teacher_logits must have the student's shape "
            f"{tuple(student_logits.shape)}, got {tuple(teacher_logits.shape)}"
        )
    check_nonempty("one sample and one class", student_logits=student_logits)
    if not student_logits.is_floating_point() or not teacher_logits.is_floating_point():
        raise TypeError(
            f"logits must be floating point, got {student_logits.dtype} and {teacher_logits.dtype}"
        )


def _check_options(
    *,
    batch_size: int,
    num_classes: int,
    tau: float,
    temperature: float,
    selection: str,
    k: int | None,
    force_target: bool,
    labels: torch.Tensor | None,
) -> None:
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if selection == "fixed":
        if k is None or int(k) != k or k < 1:
            raise ValueError(f"selection='fixed' needs an integer k >= 1, got k={k!r}")
    elif k is not None:
        raise ValueError(f"k is only used with selection='fixed', got k={k} with {selection!r}")
    if force_target:
        if labels is None:
            raise ValueError("force_target=True needs labels [B]")
        if labels.shape != (batch_size,) or labels.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"labels must be an integer tensor of shape ({batch_size},), "
                f"got {labels.dtype} of shape {tuple(labels.shape)}"
            )
        # the range check reads the labels back, so it runs only where that costs no GPU sync
        if not labels.is_cuda and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"labels must be in [0, {num_classes}), got min {int(labels.min())} "
                f"and max {int(labels.max())}"
            )
    elif labels is not None:
        raise ValueError("labels are only used with force_target=True")


def _weight_rows(weight: float | torch.Tensor, name: str, like: torch.Tensor) -> torch.Tensor:
    """A loss weight as a constant per-sample vector [B] in ``like``'s dtype and device."""
    batch_size = like.shape[0]
    if isinstance(weight, torch.Tensor):
        if weight.dim() == 0:
            weight = weight.reshape(1)
        if weight.shape not in ((1,), (batch_size,)):
            raise ValueError(f"{name} must be a float or a tensor [{batch_size}], got {tuple(weight.shape)}")
        return weight.detach().to(device=like.device, dtype=like.dtype).expand(batch_size)
    return torch.full((batch_size,), float(weight), device=like.device, dtype=like.dtype)


def _weight_matrix(
    w_primary: float | torch.Tensor,
    w_binary: float | torch.Tensor,
    w_secondary: float | torch.Tensor,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """The three loss weights as a [3, B] float64 matrix for the Triton path."""
    like = torch.empty(batch_size, dtype=torch.float64, device=device)
    return torch.stack([
        _weight_rows(w_primary, "w_primary", like),
        _weight_rows(w_binary, "w_binary", like),
        _weight_rows(w_secondary, "w_secondary", like),
    ])


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
#
# Selection of Φ without a sort. Each class gets a composite key, an int64 that orders the classes
# exactly as the ranking does:
#
#     key = ukey(z)·C + (C − 1 − class)
#
# where ukey maps the bits of the fp32 logit to an unsigned integer with the float order (−0.0 is
# made +0.0 first) and the class term ranks the lower index first among equal logits. The keys are
# distinct, so "the ranking" is simply "descending key". A forced target gets ukey = 2^32 − 1,
# above every finite or infinite logit. With G(t) = Σ_{key ≥ t} p̃ and N(t) = #{key ≥ t}, both
# sums over classes, per-(row, class-tile) partial sums add up across tiles and class shards.
#
# The search over these keys (:func:`facekd.kernels.selection.search`) evaluates N and G at
# NUM_PIVOTS pivots per pass with _pivot_kernel; ⌈log_{P+1}(2^32·C)⌉ passes always suffice, and
# rows already settled skip their tiles.
#
# Every kernel reads a network's logits through _logit_tile: from a [B, C] logits tensor, or
# (FROM_EMBEDDINGS) as s·cos θ computed on chip from the embeddings [B, D] and the class centres
# [C, D], both normalised on the fly, so that no B×C matrix is ever written. Each pass then
# recomputes its logits: a GEMM tile per pass instead of a B×C buffer.

_LOWEST = tl.constexpr(-1.0e30)  # running max of an empty set; exp(_LOWEST − m) = 0 for real m


@triton.jit
def _logit_tile(
    source_ptr,  # [B, C] logits, or [B, D] embeddings if FROM_EMBEDDINGS
    centres_ptr,  # [C, D] class centres (FROM_EMBEDDINGS only)
    stride_source,
    stride_centres,
    dim,  # D (FROM_EMBEDDINGS only)
    num_classes,  # C of this shard
    logit_scale,  # s of s·cos θ (FROM_EMBEDDINGS only)
    rows64,  # [BLOCK_B] int64
    row_ok,  # [BLOCK_B] bool
    cols,  # [BLOCK_C] int32, local class index
    FROM_EMBEDDINGS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """[BLOCK_B, BLOCK_C] fp32 logits of one network; 0 outside the shard and the batch.

    From embeddings: reads BLOCK_B·D + BLOCK_C·D numbers, one [BLOCK_B, D] × [D, BLOCK_C] dot,
    and scales by s/(‖e‖·‖w‖); the cosines stay on chip.
    """
    col_ok = cols < num_classes
    if FROM_EMBEDDINGS:
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < dim
        embeddings = tl.load(source_ptr + rows64[:, None] * stride_source + dims[None, :],
                             mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        centres = tl.load(centres_ptr + cols.to(tl.int64)[:, None] * stride_centres + dims[None, :],
                          mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        dots = dot(embeddings, tl.trans(centres), None, DOT_PRECISION)
        scale = logit_scale * inverse_norm(embeddings)
        return dots * scale[:, None] * inverse_norm(centres)[None, :]
    else:
        return tl.load(source_ptr + rows64[:, None] * stride_source + cols[None, :],
                       mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _composite_key(
    values,  # [BLOCK_B, BLOCK_C] fp32, the ranked quantity (student logit)
    classes,  # [BLOCK_C] int32, global class index
    labels,  # [BLOCK_B] int32, class forced to the head of the ranking (FORCE_TARGET only)
    num_classes_total,  # C over all shards
    FORCE_TARGET: tl.constexpr,
):
    """int64 keys [BLOCK_B, BLOCK_C] in ranking order: larger key = ranked higher."""
    values = tl.where(values == 0.0, 0.0, values)  # −0.0 and +0.0 are the same logit
    bits = values.to(tl.int32, bitcast=True)
    # negative floats: flip every bit; positive floats: flip the sign bit
    unsigned_key = (bits ^ tl.where(bits < 0, -1, -2147483648)).to(tl.int64) & 0xFFFFFFFF
    if FORCE_TARGET:
        unsigned_key = tl.where(classes[None, :] == labels[:, None], 0xFFFFFFFF, unsigned_key)
    return unsigned_key * num_classes_total + (num_classes_total - 1 - classes[None, :])


@triton.jit
def _load_labels(labels_ptr, rows, row_ok, FORCE_TARGET: tl.constexpr, BLOCK_B: tl.constexpr):
    """[BLOCK_B] int32 forced classes, or −1 (no class) without FORCE_TARGET."""
    if FORCE_TARGET:
        return tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    else:
        return tl.full([BLOCK_B], -1, tl.int32)


@triton.jit
def _online_logsumexp(
    running_max,  # [BLOCK_B] fp32
    running_sum,  # [BLOCK_B] fp32, Σ exp(x − running_max) so far
    values,  # [BLOCK_B, BLOCK_C] fp32
    include,  # [BLOCK_B, BLOCK_C] bool, which values belong to the set
):
    """One tile of an online log-sum-exp; returns the new max and sum, the factor that rescaled
    the old sum, and the tile's weights exp(x − new max) (0 outside the set)."""
    new_max = tl.maximum(running_max, tl.max(tl.where(include, values, _LOWEST), axis=1))
    rescale = tl.exp(running_max - new_max)
    weights = tl.exp(tl.where(include, values - new_max[:, None], _LOWEST))
    return new_max, running_sum * rescale + tl.sum(weights, axis=1), rescale, weights


@triton.jit
def _row_stats_kernel(
    student_ptr, student_centres_ptr, stride_student, stride_student_centres, student_dim,
    teacher_ptr, teacher_centres_ptr, stride_teacher, stride_teacher_centres, teacher_dim,
    stats_ptr,  # [chunks, B, 4] fp32 out: max and Σexp(· − max) of z_S/T, then of z_T/T
    batch_size,
    num_classes,
    logit_scale,
    inv_temperature,
    tiles_per_chunk,
    HAS_TEACHER: tl.constexpr,
    FROM_EMBEDDINGS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_DS: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Per-row log-partition of student and teacher over one chunk of classes.

    Program (i, j) covers rows [i·BLOCK_B, (i+1)·BLOCK_B) and class chunk j (tiles_per_chunk
    tiles of BLOCK_C), reading each logit once (see _logit_tile) and keeping only a running
    (max, sum) per row on chip; the host combines chunks, shards and ranks. Writes 4 floats per
    row and chunk.
    """
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < batch_size
    rows64 = rows.to(tl.int64)
    chunk = tl.program_id(1)
    first_tile = chunk * tiles_per_chunk
    last_tile = tl.minimum(first_tile + tiles_per_chunk, tl.cdiv(num_classes, BLOCK_C))
    student_max = tl.full([BLOCK_B], _LOWEST, tl.float32)
    student_sum = tl.zeros([BLOCK_B], tl.float32)
    teacher_max = tl.full([BLOCK_B], _LOWEST, tl.float32)
    teacher_sum = tl.zeros([BLOCK_B], tl.float32)
    for tile in range(first_tile, last_tile):
        cols = tile * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < num_classes)[None, :]
        student = _logit_tile(student_ptr, student_centres_ptr, stride_student,
                              stride_student_centres, student_dim, num_classes, logit_scale,
                              rows64, row_ok, cols, FROM_EMBEDDINGS, BLOCK_DS, DOT_PRECISION)
        student_max, student_sum, _, _ = _online_logsumexp(
            student_max, student_sum, student * inv_temperature, ok)
        if HAS_TEACHER:
            teacher = _logit_tile(teacher_ptr, teacher_centres_ptr, stride_teacher,
                                  stride_teacher_centres, teacher_dim, num_classes, logit_scale,
                                  rows64, row_ok, cols, FROM_EMBEDDINGS, BLOCK_DT, DOT_PRECISION)
            teacher_max, teacher_sum, _, _ = _online_logsumexp(
                teacher_max, teacher_sum, teacher * inv_temperature, ok)
    out = stats_ptr + (chunk * batch_size + rows64) * 4
    tl.store(out, student_max, mask=row_ok)
    tl.store(out + 1, student_sum, mask=row_ok)
    tl.store(out + 2, teacher_max, mask=row_ok)
    tl.store(out + 3, teacher_sum, mask=row_ok)


@triton.jit
def _class_mass_kernel(
    student_ptr, student_centres_ptr, stride_student, stride_student_centres, student_dim,
    log_partition_ptr,  # [B] fp32, log Σ_c exp(z_c) at T = 1 over all shards
    mass_ptr,  # [C] fp32 out: Σ_b softmax(z_b)_c
    batch_size,
    num_classes,
    logit_scale,
    FROM_EMBEDDINGS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_DS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Batch-summed student probabilities at T = 1 for one tile of classes (the authors'
    batch-wide k). Loops over all rows; keeps BLOCK_C sums on chip; writes C floats in total."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < num_classes
    total = tl.zeros([BLOCK_C], tl.float32)
    for first_row in range(0, batch_size, BLOCK_B):
        rows = first_row + tl.arange(0, BLOCK_B)
        row_ok = rows < batch_size
        student = _logit_tile(student_ptr, student_centres_ptr, stride_student,
                              stride_student_centres, student_dim, num_classes, logit_scale,
                              rows.to(tl.int64), row_ok, cols, FROM_EMBEDDINGS, BLOCK_DS,
                              DOT_PRECISION)
        log_partition = tl.load(log_partition_ptr + rows, mask=row_ok, other=0.0)
        ok = row_ok[:, None] & col_ok[None, :]
        total += tl.sum(tl.exp(tl.where(ok, student - log_partition[:, None], _LOWEST)), axis=0)
    tl.store(mass_ptr + cols, total, mask=col_ok)


@triton.jit
def _pivot_kernel(
    # ranked values of this shard: student logits (or embeddings and centres), or class masses
    values_ptr, values_centres_ptr, stride_values, stride_values_centres, values_dim,
    log_partition_ptr,  # [R] fp32, log Σ exp(z/T) over all shards (unused if VALUES_ARE_MASS)
    labels_ptr,  # [R] int32, global class forced first (read only if FORCE_TARGET)
    pivots_ptr,  # [R, NUM_PIVOTS] int64 composite keys
    active_ptr,  # [R] int8, rows whose search is not settled yet
    count_ptr,  # [chunks, R, NUM_PIVOTS] int32 out: N(pivot) = #{key ≥ pivot} in the chunk
    mass_ptr,  # [chunks, R, NUM_PIVOTS] fp32 out: G(pivot) = Σ_{key ≥ pivot} p̃ in the chunk
    num_rows,
    num_classes,
    class_offset,  # global index of this shard's first class
    num_classes_total,
    logit_scale,
    inv_temperature,
    mass_scale,  # p̃ = value · mass_scale when VALUES_ARE_MASS
    tiles_per_chunk,
    VALUES_ARE_MASS: tl.constexpr,
    FORCE_TARGET: tl.constexpr,
    FROM_EMBEDDINGS: tl.constexpr,
    NUM_PIVOTS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_DS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Count and probability mass of the classes ranked at or above each pivot (one search pass).

    Program (i, j) reads its rows' pivots once, then the values of class chunk j tile by tile; a
    [BLOCK_B, BLOCK_C, NUM_PIVOTS] comparison is reduced over classes at once, so only the
    [BLOCK_B, NUM_PIVOTS] counts and masses stay on chip. A row block whose rows are all settled
    reads nothing. Writes 2·NUM_PIVOTS numbers per row and chunk.
    """
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < num_rows
    rows64 = rows.to(tl.int64)
    chunk = tl.program_id(1)
    pivot_ids = tl.arange(0, NUM_PIVOTS)
    pivots = tl.load(pivots_ptr + rows64[:, None] * NUM_PIVOTS + pivot_ids[None, :],
                     mask=row_ok[:, None], other=0)
    active = tl.load(active_ptr + rows, mask=row_ok, other=0)
    log_partition = tl.load(log_partition_ptr + rows, mask=row_ok, other=0.0)
    labels = _load_labels(labels_ptr, rows, row_ok, FORCE_TARGET, BLOCK_B)
    count = tl.zeros([BLOCK_B, NUM_PIVOTS], tl.int32)
    mass = tl.zeros([BLOCK_B, NUM_PIVOTS], tl.float32)
    first_tile = chunk * tiles_per_chunk
    last_tile = tl.minimum(first_tile + tiles_per_chunk, tl.cdiv(num_classes, BLOCK_C))
    last_tile = tl.where(tl.max(active, axis=0) > 0, last_tile, first_tile)
    for tile in range(first_tile, last_tile):
        cols = tile * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < num_classes)[None, :]
        values = _logit_tile(values_ptr, values_centres_ptr, stride_values, stride_values_centres,
                             values_dim, num_classes, logit_scale, rows64, row_ok, cols,
                             FROM_EMBEDDINGS, BLOCK_DS, DOT_PRECISION)
        key = _composite_key(values, cols + class_offset, labels, num_classes_total, FORCE_TARGET)
        if VALUES_ARE_MASS:
            probability = values * mass_scale
        else:
            probability = tl.exp(values * inv_temperature - log_partition[:, None])
        above = (key[:, :, None] >= pivots[:, None, :]) & ok[:, :, None]
        count += tl.sum(above.to(tl.int32), axis=1)
        mass += tl.sum(tl.where(above, probability[:, :, None], 0.0), axis=1)
    out = (chunk * num_rows + rows64)[:, None] * NUM_PIVOTS + pivot_ids[None, :]
    tl.store(count_ptr + out, count, mask=row_ok[:, None])
    tl.store(mass_ptr + out, mass, mask=row_ok[:, None])


@triton.jit
def _group_update(
    student_max, student_sum, teacher_max, teacher_sum, cross, size,  # [BLOCK_B] running stats
    student,  # [BLOCK_B, BLOCK_C] fp32 z_S/T
    teacher,  # [BLOCK_B, BLOCK_C] fp32 z_T/T
    centred_gap,  # [BLOCK_B, BLOCK_C] fp32 (z_T/T − M_T) − (z_S/T − M_S)
    include,  # [BLOCK_B, BLOCK_C] bool, the group
):
    """One tile of a group's statistics: both log-partitions, the teacher-weighted logit gap
    Σ exp(z_T/T − teacher_max)·gap, and the group size."""
    student_max, student_sum, _, _ = _online_logsumexp(student_max, student_sum, student, include)
    teacher_max, teacher_sum, rescale, weights = _online_logsumexp(
        teacher_max, teacher_sum, teacher, include
    )
    cross = cross * rescale + tl.sum(weights * centred_gap, axis=1)
    size += tl.sum(include.to(tl.int32), axis=1)
    return student_max, student_sum, teacher_max, teacher_sum, cross, size


@triton.jit
def _group_stats_kernel(
    student_ptr, student_centres_ptr, stride_student, stride_student_centres, student_dim,
    teacher_ptr, teacher_centres_ptr, stride_teacher, stride_teacher_centres, teacher_dim,
    row_max_ptr,  # [B, 2] fp32, M_S and M_T: row maxima of z_S/T and z_T/T over all shards
    threshold_ptr,  # [B] int64, Φ = classes with key ≥ threshold
    labels_ptr,  # [B] int32, forced class (read only if FORCE_TARGET)
    stats_ptr,  # [chunks, B, 2, 5] fp32 out, per group (Φ, Ψ): see _group_update
    size_ptr,  # [chunks, B, 2] int32 out: |Φ|, |Ψ|
    batch_size,
    num_classes,
    class_offset,
    num_classes_total,
    logit_scale,
    inv_temperature,
    tiles_per_chunk,
    FORCE_TARGET: tl.constexpr,
    FROM_EMBEDDINGS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_DS: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Everything the loss needs from the classes, per group, in one read of both networks.

    Per row and group g ∈ {Φ, Ψ}: log Σ_g e^{z_S/T}, log Σ_g e^{z_T/T} (online, so neither
    overflows nor loses a group whose mass underflows at the row maximum), and
    Σ_g e^{z_T/T}·gap, from which KL(p̂^T ‖ p̂^S) = E_{p̂^T}[gap] − (LSE_T,g − M_T) + (LSE_S,g − M_S)
    (GKD Eq. 5, 10). Centring the gap by the row maxima keeps fp32 cancellation small. Twelve
    numbers per row stay on chip.
    """
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < batch_size
    rows64 = rows.to(tl.int64)
    chunk = tl.program_id(1)
    threshold = tl.load(threshold_ptr + rows, mask=row_ok, other=0)
    labels = _load_labels(labels_ptr, rows, row_ok, FORCE_TARGET, BLOCK_B)
    student_row_max = tl.load(row_max_ptr + rows64 * 2, mask=row_ok, other=0.0)
    teacher_row_max = tl.load(row_max_ptr + rows64 * 2 + 1, mask=row_ok, other=0.0)
    lowest = tl.full([BLOCK_B], _LOWEST, tl.float32)
    zero = tl.zeros([BLOCK_B], tl.float32)
    none = tl.zeros([BLOCK_B], tl.int32)
    p_student_max, p_student_sum, p_teacher_max, p_teacher_sum, p_cross, p_size = (
        lowest, zero, lowest, zero, zero, none)
    s_student_max, s_student_sum, s_teacher_max, s_teacher_sum, s_cross, s_size = (
        lowest, zero, lowest, zero, zero, none)
    first_tile = chunk * tiles_per_chunk
    last_tile = tl.minimum(first_tile + tiles_per_chunk, tl.cdiv(num_classes, BLOCK_C))
    for tile in range(first_tile, last_tile):
        cols = tile * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < num_classes)[None, :]
        student_logit = _logit_tile(student_ptr, student_centres_ptr, stride_student,
                                    stride_student_centres, student_dim, num_classes,
                                    logit_scale, rows64, row_ok, cols, FROM_EMBEDDINGS, BLOCK_DS,
                                    DOT_PRECISION)
        teacher_logit = _logit_tile(teacher_ptr, teacher_centres_ptr, stride_teacher,
                                    stride_teacher_centres, teacher_dim, num_classes,
                                    logit_scale, rows64, row_ok, cols, FROM_EMBEDDINGS, BLOCK_DT,
                                    DOT_PRECISION)
        key = _composite_key(student_logit, cols + class_offset, labels, num_classes_total,
                             FORCE_TARGET)
        primary = key >= threshold[:, None]
        student = student_logit * inv_temperature
        teacher = teacher_logit * inv_temperature
        gap = (teacher - teacher_row_max[:, None]) - (student - student_row_max[:, None])
        p_student_max, p_student_sum, p_teacher_max, p_teacher_sum, p_cross, p_size = _group_update(
            p_student_max, p_student_sum, p_teacher_max, p_teacher_sum, p_cross, p_size,
            student, teacher, gap, ok & primary)
        s_student_max, s_student_sum, s_teacher_max, s_teacher_sum, s_cross, s_size = _group_update(
            s_student_max, s_student_sum, s_teacher_max, s_teacher_sum, s_cross, s_size,
            student, teacher, gap, ok & ~primary)
    out = stats_ptr + (chunk * batch_size + rows64) * 10
    tl.store(out + 0, p_student_max, mask=row_ok)
    tl.store(out + 1, p_student_sum, mask=row_ok)
    tl.store(out + 2, p_teacher_max, mask=row_ok)
    tl.store(out + 3, p_teacher_sum, mask=row_ok)
    tl.store(out + 4, p_cross, mask=row_ok)
    tl.store(out + 5, s_student_max, mask=row_ok)
    tl.store(out + 6, s_student_sum, mask=row_ok)
    tl.store(out + 7, s_teacher_max, mask=row_ok)
    tl.store(out + 8, s_teacher_sum, mask=row_ok)
    tl.store(out + 9, s_cross, mask=row_ok)
    sizes = size_ptr + (chunk * batch_size + rows64) * 2
    tl.store(sizes, p_size, mask=row_ok)
    tl.store(sizes + 1, s_size, mask=row_ok)


@triton.jit
def _logit_grad(
    student_logit,  # [BLOCK_B, BLOCK_C] fp32 z_S
    teacher_logit,  # [BLOCK_B, BLOCK_C] fp32 z_T
    cols,  # [BLOCK_C] int32, global class index
    ok,  # [BLOCK_B, BLOCK_C] bool
    threshold,  # [BLOCK_B] int64
    labels,  # [BLOCK_B] int32
    coefficients,  # [BLOCK_B] pointers to each row's [2, 4] coefficients
    num_classes_total,
    inv_temperature,
    FORCE_TARGET: tl.constexpr,
):
    """∂loss/∂z_S of a tile, 0 outside it. For class j of group g (p̂ = renormalised in g,
    p_g = group mass, q = teacher, w_Φ = w_P, w_Ψ = w_S):

        ∂/∂z_j [w_P·KL(q̂‖p̂) + w_B·KL(q_b‖p_b) + w_S·KL(q̌‖p̌)]·T²
            = T · [(w_g + w_B·(p_g − q_g)) · p̂_j − w_g · q̂_j]

    The host folds T, the incoming gradient and the weights into a = T·g·(w_g + w_B(p_g − q_g))
    and b = T·g·w_g, so a class costs two exponentials.
    """
    key = _composite_key(student_logit, cols, labels, num_classes_total, FORCE_TARGET)
    pointers = coefficients[:, None] + tl.where(key >= threshold[:, None], 0, 4)  # Φ's or Ψ's
    a = tl.load(pointers, mask=ok, other=0.0)
    b = tl.load(pointers + 1, mask=ok, other=0.0)
    student_log_partition = tl.load(pointers + 2, mask=ok, other=0.0)
    teacher_log_partition = tl.load(pointers + 3, mask=ok, other=0.0)
    return (a * tl.exp(tl.where(ok, student_logit * inv_temperature - student_log_partition, 0.0))
            - b * tl.exp(tl.where(ok, teacher_logit * inv_temperature - teacher_log_partition, 0.0)))


@triton.jit
def _logits_backward_kernel(
    student_ptr,  # [B, C] student logits of this shard
    teacher_ptr,  # [B, C] teacher logits of this shard
    grad_ptr,  # [B, C] out: ∂loss/∂z_S, the student's dtype
    coefficients_ptr,  # [B, 2, 4] fp32, per group (Φ, Ψ): a, b, LSE_S,g, LSE_T,g
    threshold_ptr,  # [B] int64, Φ = classes with key ≥ threshold
    labels_ptr,  # [B] int32, forced class (read only if FORCE_TARGET)
    batch_size,
    num_classes,
    stride_student,
    stride_teacher,
    stride_grad,
    class_offset,
    num_classes_total,
    inv_temperature,
    FORCE_TARGET: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Closed-form gradient to the student logits (see _logit_grad), one tile per program.
    Reads both logits once; writes the gradient once."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < batch_size
    rows64 = rows.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = row_ok[:, None] & (cols < num_classes)[None, :]
    student_logit = tl.load(student_ptr + rows64[:, None] * stride_student + cols[None, :],
                            mask=ok, other=0.0).to(tl.float32)
    teacher_logit = tl.load(teacher_ptr + rows64[:, None] * stride_teacher + cols[None, :],
                            mask=ok, other=0.0).to(tl.float32)
    grad = _logit_grad(
        student_logit, teacher_logit, cols + class_offset, ok,
        tl.load(threshold_ptr + rows, mask=row_ok, other=0),
        _load_labels(labels_ptr, rows, row_ok, FORCE_TARGET, BLOCK_B),
        coefficients_ptr + rows64 * 8, num_classes_total, inv_temperature, FORCE_TARGET,
    )
    tl.store(grad_ptr + rows64[:, None] * stride_grad + cols[None, :],
             grad.to(grad_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _embedding_grad_kernel(
    student_ptr, student_centres_ptr, stride_student, stride_student_centres, student_dim,
    teacher_ptr, teacher_centres_ptr, stride_teacher, stride_teacher_centres, teacher_dim,
    coefficients_ptr,  # [B, 2, 4] fp32, see _logit_grad
    threshold_ptr,  # [B] int64
    labels_ptr,  # [B] int32 (read only if FORCE_TARGET)
    weighted_centres_ptr,  # [chunks, B, BLOCK_DS] fp32 out: Σ_c G_bc ŵ_c over the chunk
    weighted_cosines_ptr,  # [chunks, B] fp32 out: Σ_c G_bc cos_bc over the chunk
    batch_size,
    num_classes,
    class_offset,
    num_classes_total,
    logit_scale,
    inv_temperature,
    tiles_per_chunk,
    FORCE_TARGET: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_DS: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """The two sums of ∂loss/∂e_S over one class chunk, G = ∂loss/∂z_S recomputed tile by tile.

    z = s·cos θ = s·ê·ŵ gives ∂loss/∂e_b = (s/‖e_b‖)·(Σ_c G_bc ŵ_c − (Σ_c G_bc cos_bc)·ê_b); the
    host finishes it from these partial sums. Per tile: two logit dots (student, teacher) and one
    [BLOCK_B, BLOCK_C] × [BLOCK_C, D] dot; a [BLOCK_B, D] accumulator stays on chip.
    """
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < batch_size
    rows64 = rows.to(tl.int64)
    chunk = tl.program_id(1)
    dims = tl.arange(0, BLOCK_DS)
    dim_ok = dims < student_dim
    threshold = tl.load(threshold_ptr + rows, mask=row_ok, other=0)
    labels = _load_labels(labels_ptr, rows, row_ok, FORCE_TARGET, BLOCK_B)
    embeddings = tl.load(student_ptr + rows64[:, None] * stride_student + dims[None, :],
                         mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    embedding_scale = inverse_norm(embeddings)
    weighted_centres = tl.zeros([BLOCK_B, BLOCK_DS], tl.float32)
    weighted_cosines = tl.zeros([BLOCK_B], tl.float32)
    first_tile = chunk * tiles_per_chunk
    last_tile = tl.minimum(first_tile + tiles_per_chunk, tl.cdiv(num_classes, BLOCK_C))
    for tile in range(first_tile, last_tile):
        cols = tile * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < num_classes
        ok = row_ok[:, None] & col_ok[None, :]
        centres = tl.load(
            student_centres_ptr + cols.to(tl.int64)[:, None] * stride_student_centres + dims[None, :],
            mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        unit_centres = centres.to(tl.float32) * inverse_norm(centres)[:, None]
        cosines = dot(embeddings, tl.trans(centres), None, DOT_PRECISION)
        cosines = cosines * embedding_scale[:, None] * inverse_norm(centres)[None, :]
        teacher_logit = _logit_tile(teacher_ptr, teacher_centres_ptr, stride_teacher,
                                    stride_teacher_centres, teacher_dim, num_classes,
                                    logit_scale, rows64, row_ok, cols, True, BLOCK_DT,
                                    DOT_PRECISION)
        grad = _logit_grad(cosines * logit_scale, teacher_logit, cols + class_offset, ok,
                           threshold, labels, coefficients_ptr + rows64 * 8, num_classes_total,
                           inv_temperature, FORCE_TARGET)
        weighted_centres += dot(grad, unit_centres, None, DOT_PRECISION)
        weighted_cosines += tl.sum(grad * cosines, axis=1)
    out = (chunk * batch_size + rows64)
    tl.store(weighted_centres_ptr + out[:, None] * BLOCK_DS + dims[None, :], weighted_centres,
             mask=row_ok[:, None])
    tl.store(weighted_cosines_ptr + out, weighted_cosines, mask=row_ok)


@triton.jit
def _centre_grad_kernel(
    student_ptr, student_centres_ptr, stride_student, stride_student_centres, student_dim,
    teacher_ptr, teacher_centres_ptr, stride_teacher, stride_teacher_centres, teacher_dim,
    coefficients_ptr,  # [B, 2, 4] fp32, see _logit_grad
    threshold_ptr,  # [B] int64
    labels_ptr,  # [B] int32 (read only if FORCE_TARGET)
    grad_ptr,  # [C, D] out: ∂loss/∂w_S, the centres' dtype
    stride_grad,
    batch_size,
    num_classes,
    class_offset,
    num_classes_total,
    logit_scale,
    inv_temperature,
    FORCE_TARGET: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_DS: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """∂loss/∂w_c = (s/‖w_c‖)·(Σ_b G_bc ê_b − (Σ_b G_bc cos_bc)·ŵ_c) for one tile of classes.

    Loops over every row block, recomputing G = ∂loss/∂z_S; a [BLOCK_C, D] accumulator stays on
    chip and each centre's gradient is written once.
    """
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < num_classes
    dims = tl.arange(0, BLOCK_DS)
    dim_ok = dims < student_dim
    centres = tl.load(
        student_centres_ptr + cols.to(tl.int64)[:, None] * stride_student_centres + dims[None, :],
        mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
    centre_scale = inverse_norm(centres)
    weighted_embeddings = tl.zeros([BLOCK_C, BLOCK_DS], tl.float32)
    weighted_cosines = tl.zeros([BLOCK_C], tl.float32)
    for first_row in range(0, batch_size, BLOCK_B):
        rows = first_row + tl.arange(0, BLOCK_B)
        row_ok = rows < batch_size
        rows64 = rows.to(tl.int64)
        ok = row_ok[:, None] & col_ok[None, :]
        embeddings = tl.load(student_ptr + rows64[:, None] * stride_student + dims[None, :],
                             mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        embedding_scale = inverse_norm(embeddings)
        cosines = dot(embeddings, tl.trans(centres), None, DOT_PRECISION)
        cosines = cosines * embedding_scale[:, None] * centre_scale[None, :]
        teacher_logit = _logit_tile(teacher_ptr, teacher_centres_ptr, stride_teacher,
                                    stride_teacher_centres, teacher_dim, num_classes,
                                    logit_scale, rows64, row_ok, cols, True, BLOCK_DT,
                                    DOT_PRECISION)
        grad = _logit_grad(cosines * logit_scale, teacher_logit, cols + class_offset, ok,
                           tl.load(threshold_ptr + rows, mask=row_ok, other=0),
                           _load_labels(labels_ptr, rows, row_ok, FORCE_TARGET, BLOCK_B),
                           coefficients_ptr + rows64 * 8, num_classes_total, inv_temperature,
                           FORCE_TARGET)
        unit_embeddings = embeddings.to(tl.float32) * embedding_scale[:, None]
        weighted_embeddings += dot(tl.trans(grad), unit_embeddings, None, DOT_PRECISION)
        weighted_cosines += tl.sum(grad * cosines, axis=0)
    unit_centres = centres.to(tl.float32) * centre_scale[:, None]
    grad_centres = (logit_scale * centre_scale)[:, None] * (
        weighted_embeddings - weighted_cosines[:, None] * unit_centres)
    tl.store(grad_ptr + cols.to(tl.int64)[:, None] * stride_grad + dims[None, :],
             grad_centres.to(grad_ptr.dtype.element_ty), mask=col_ok[:, None] & dim_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Host launchers: grids, chunking, combination across chunks, shards and ranks
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Plan:
    """What one grouped KD evaluation needs besides tensors (checked by the public functions)."""

    tau: float
    temperature: float
    selection: str
    k: int | None
    force_target: bool
    class_offsets: tuple[int, ...]  # global index of each local shard's first class
    num_classes: int  # C over all shards and ranks
    all_reduce: AllReduce | None  # in-place (tensor, "sum" | "max") across ranks, or None
    logit_scale: float | None = None  # s of s·cos θ: the inputs are embeddings and centres


@dataclass(frozen=True)
class _Shard:
    """One class shard as the kernels read it: both networks' logits [B, C], or (with centres)
    their embeddings [B, D] and this shard's class centres [C, D]."""

    student: torch.Tensor
    teacher: torch.Tensor
    class_offset: int
    student_centres: torch.Tensor | None = None
    teacher_centres: torch.Tensor | None = None

    @property
    def from_embeddings(self) -> bool:
        return self.student_centres is not None

    @property
    def batch_size(self) -> int:
        return self.student.shape[0]

    @property
    def num_classes(self) -> int:
        return self.student_centres.shape[0] if self.from_embeddings else self.student.shape[1]

    def student_args(self) -> tuple:
        return _network_args(self.student, self.student_centres)

    def teacher_args(self) -> tuple:
        return _network_args(self.teacher, self.teacher_centres)

    def blocks(self) -> dict:
        """Tile sizes and dot precision for the kernels that read this shard."""
        if self.from_embeddings:
            return dict(
                BLOCK_B=16,  # tl.dot needs 16 rows at least
                BLOCK_C=32 if triton_interpreted() else 64,
                BLOCK_DS=max(16, triton.next_power_of_2(self.student.shape[1])),
                BLOCK_DT=max(16, triton.next_power_of_2(self.teacher.shape[1])),
                DOT_PRECISION=dot_precision(self.student.dtype),
            )
        block_b = 4 if triton_interpreted() else 8
        return dict(
            BLOCK_B=min(block_b, triton.next_power_of_2(self.batch_size)),
            BLOCK_C=min(128, triton.next_power_of_2(self.num_classes)),
            BLOCK_DS=16, BLOCK_DT=16, DOT_PRECISION="tf32",  # unused without embeddings
        )


def _network_args(source: torch.Tensor, centres: torch.Tensor | None) -> tuple:
    """(source, centres, source row stride, centres row stride, D) as the kernels take them."""
    if centres is None:
        return source, source, source.stride(0), 0, 0
    return source, centres, source.stride(0), centres.stride(0), centres.shape[1]


def _chunking(batch_size: int, num_classes: int, block_b: int, block_c: int) -> tuple[int, int]:
    """(number of class chunks, tiles per chunk) so that the grid fills the device."""
    tiles = triton.cdiv(num_classes, block_c)
    row_blocks = triton.cdiv(batch_size, block_b)
    # the interpreter runs programs one after another: few chunks, but more than one where it
    # can, so that the combination across chunks is exercised
    target_programs = 2 * row_blocks if triton_interpreted() else 1024
    chunks = max(1, min(tiles, target_programs // row_blocks))
    tiles_per_chunk = triton.cdiv(tiles, chunks)
    return triton.cdiv(tiles, tiles_per_chunk), tiles_per_chunk


def _reduce_across_ranks(tensor: torch.Tensor, op: str, plan: _Plan) -> torch.Tensor:
    if plan.all_reduce is not None:
        plan.all_reduce(tensor, op)
    return tensor


def _combine_log_partitions(
    maxima: torch.Tensor,  # [parts, ...] partial maxima
    sums: torch.Tensor,  # [parts, ...] partial Σ exp(x − partial max)
    plan: _Plan,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (max, Σ exp(x − max)) from partials over chunks, shards and ranks."""
    maximum = _reduce_across_ranks(maxima.amax(0), "max", plan)
    total = _reduce_across_ranks((sums * torch.exp(maxima - maximum)).sum(0), "sum", plan)
    return maximum, total


def _row_stats(
    shards: Sequence[_Shard], temperature: float, plan: _Plan, *, with_teacher: bool
) -> torch.Tensor:
    """[B, 4] float64: max and log Σ exp of z_S/T, then of z_T/T (−inf without the teacher)."""
    partials = []
    for shard in shards:
        blocks = shard.blocks()
        batch_size = shard.batch_size
        chunks, tiles_per_chunk = _chunking(batch_size, shard.num_classes, blocks["BLOCK_B"],
                                            blocks["BLOCK_C"])
        stats = torch.empty(chunks, batch_size, 4, device=shard.student.device, dtype=torch.float32)
        _row_stats_kernel[(triton.cdiv(batch_size, blocks["BLOCK_B"]), chunks)](
            *shard.student_args(), *shard.teacher_args(), stats, batch_size, shard.num_classes,
            plan.logit_scale or 1.0, 1.0 / temperature, tiles_per_chunk,
            HAS_TEACHER=with_teacher, FROM_EMBEDDINGS=shard.from_embeddings, **blocks,
        )
        partials.append(stats)
    stats = torch.cat(partials).double()
    student_max, student_sum = _combine_log_partitions(stats[..., 0], stats[..., 1], plan)
    teacher_max, teacher_sum = _combine_log_partitions(stats[..., 2], stats[..., 3], plan)
    return torch.stack(
        [student_max, student_max + student_sum.log(), teacher_max, teacher_max + teacher_sum.log()],
        dim=1,
    )


def _pivot_counts(
    shards: Sequence[_Shard],
    pivots: torch.Tensor,  # [R, NUM_PIVOTS] int64
    active: torch.Tensor,  # [R] bool
    plan: _Plan,
    *,
    log_partition: torch.Tensor | None = None,  # [B] log Σ exp(z_S/T): rank the student logits
    labels: torch.Tensor | None = None,  # [B] int32 forced classes
    class_masses: Sequence[torch.Tensor] | None = None,  # per shard [1, C]: rank these instead
) -> tuple[torch.Tensor, torch.Tensor]:
    """N(pivot) and G(pivot) [R, NUM_PIVOTS] (float64) over every class of every shard and rank.

    Ranks the student's logits with p̃ = softmax(z_S/T), or, given ``class_masses`` (one row),
    the batch-summed probabilities with p̃ = mass / B.
    """
    num_rows = pivots.shape[0]
    active_flags = active.to(torch.int8)
    partials = []
    for index, shard in enumerate(shards):
        blocks = shard.blocks()
        if class_masses is None:
            values_args, from_embeddings = shard.student_args(), shard.from_embeddings
            row_values = log_partition
            mass_scale = 0.0
        else:
            masses = class_masses[index]
            values_args, from_embeddings = _network_args(masses, None), False
            row_values = torch.zeros(1, device=masses.device)
            mass_scale = 1.0 / shard.batch_size
            blocks.update(BLOCK_B=1, BLOCK_C=min(128, triton.next_power_of_2(shard.num_classes)))
        chunks, tiles_per_chunk = _chunking(num_rows, shard.num_classes, blocks["BLOCK_B"],
                                            blocks["BLOCK_C"])
        device = pivots.device
        counts = torch.empty(chunks, num_rows, NUM_PIVOTS, device=device, dtype=torch.int32)
        masses_above = torch.empty(chunks, num_rows, NUM_PIVOTS, device=device, dtype=torch.float32)
        blocks.pop("BLOCK_DT")
        _pivot_kernel[(triton.cdiv(num_rows, blocks["BLOCK_B"]), chunks)](
            *values_args, row_values, active_flags if labels is None else labels, pivots,
            active_flags, counts, masses_above, num_rows, shard.num_classes, shard.class_offset,
            plan.num_classes, plan.logit_scale or 1.0, 1.0 / plan.temperature, mass_scale,
            tiles_per_chunk, VALUES_ARE_MASS=class_masses is not None,
            FORCE_TARGET=labels is not None, FROM_EMBEDDINGS=from_embeddings,
            NUM_PIVOTS=NUM_PIVOTS, **blocks,
        )
        partials.append(torch.stack([counts.double().sum(0), masses_above.double().sum(0)]))
    totals = _reduce_across_ranks(torch.stack(partials).sum(0), "sum", plan)
    return totals[0], totals[1]


def _batch_k_tensor(shards: Sequence[_Shard], plan: _Plan) -> torch.Tensor:
    """The authors' batch-wide k (see :func:`_batch_k`) as a device scalar, found by the search."""
    log_partition = _row_stats(shards, 1.0, plan, with_teacher=False)[:, 1].float()
    class_masses = []
    for shard in shards:
        blocks = shard.blocks()
        mass = torch.empty(1, shard.num_classes, device=shard.student.device, dtype=torch.float32)
        _class_mass_kernel[(triton.cdiv(shard.num_classes, blocks["BLOCK_C"]),)](
            *shard.student_args(), log_partition, mass, shard.batch_size, shard.num_classes,
            plan.logit_scale or 1.0, FROM_EMBEDDINGS=shard.from_embeddings,
            BLOCK_B=blocks["BLOCK_B"], BLOCK_C=blocks["BLOCK_C"], BLOCK_DS=blocks["BLOCK_DS"],
            DOT_PRECISION=blocks["DOT_PRECISION"],
        )
        class_masses.append(mass)

    def evaluate(pivots: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _pivot_counts(shards, pivots, active, plan, class_masses=class_masses)

    state = _search(evaluate, 1, plan, shards[0].student.device, tau=plan.tau)
    first = state.count_hi + 1  # 1-based position at which the batch mass reaches τ·B
    return batch_k_from_first(first, plan.num_classes)


def _search(evaluate: Evaluate, num_rows: int, plan: _Plan, device: torch.device, **target
            ) -> Interval:
    """:func:`~facekd.kernels.selection.search` over the composite keys [0, 2^32·C) of the kernels."""
    key_width = 2**32 * plan.num_classes
    start = whole_range(key_width, plan.num_classes, 1.0, num_rows, device)
    return search(evaluate, start, search_passes(key_width), **target)


def _primary_threshold(
    shards: Sequence[_Shard],
    log_partition: torch.Tensor,  # [B] log Σ exp(z_S/T)
    labels: torch.Tensor | None,  # [B] int32
    plan: _Plan,
) -> torch.Tensor:
    """[B] int64 composite key: Φ = the classes whose key is at least this (GKD Eq. 2–3)."""
    batch_size = shards[0].batch_size
    device = shards[0].student.device
    if (plan.selection == "sample" and plan.tau >= 1.0) or (
        plan.selection == "fixed" and plan.k >= plan.num_classes
    ):
        return torch.zeros(batch_size, dtype=torch.int64, device=device)  # every class

    def evaluate(pivots: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _pivot_counts(shards, pivots, active, plan, log_partition=log_partition,
                             labels=labels)

    if plan.selection == "sample":
        state = _search(evaluate, batch_size, plan, device, tau=plan.tau)
        # GKD Eq. 3: class m (first to reach τ) or the one before it, the smaller k on a tie
        take_before = (state.count_hi >= 1) & (plan.tau - state.mass_hi <= state.mass_lo - plan.tau)
        return torch.where(take_before, state.hi, state.lo)
    if plan.selection == "fixed":
        target = torch.full((batch_size,), float(plan.k), dtype=torch.float64, device=device)
    else:
        target = _batch_k_tensor(shards, plan).expand(batch_size)
    return _search(evaluate, batch_size, plan, device, target_count=target).lo


def _group_stats(
    shards: Sequence[_Shard],
    row_max: torch.Tensor,  # [B, 2] fp32
    threshold: torch.Tensor,  # [B] int64
    labels: torch.Tensor | None,
    plan: _Plan,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 2, 5] float64 combined group statistics and [B, 2] group sizes, groups (Φ, Ψ)."""
    stat_parts, size_parts = [], []
    for shard in shards:
        blocks = shard.blocks()
        batch_size = shard.batch_size
        chunks, tiles_per_chunk = _chunking(batch_size, shard.num_classes, blocks["BLOCK_B"],
                                            blocks["BLOCK_C"])
        device = shard.student.device
        stats = torch.empty(chunks, batch_size, 2, 5, device=device, dtype=torch.float32)
        sizes = torch.empty(chunks, batch_size, 2, device=device, dtype=torch.int32)
        _group_stats_kernel[(triton.cdiv(batch_size, blocks["BLOCK_B"]), chunks)](
            *shard.student_args(), *shard.teacher_args(), row_max, threshold,
            threshold if labels is None else labels, stats, sizes, batch_size, shard.num_classes,
            shard.class_offset, plan.num_classes, plan.logit_scale or 1.0,
            1.0 / plan.temperature, tiles_per_chunk, FORCE_TARGET=labels is not None,
            FROM_EMBEDDINGS=shard.from_embeddings, **blocks,
        )
        stat_parts.append(stats)
        size_parts.append(sizes)
    stats = torch.cat(stat_parts).double()
    student_max, student_sum = _combine_log_partitions(stats[..., 0], stats[..., 1], plan)
    teacher_max, teacher_sum = _combine_log_partitions(stats[..., 2], stats[..., 3], plan)
    cross = _reduce_across_ranks(
        (stats[..., 4] * torch.exp(stats[..., 2] - teacher_max)).sum(0), "sum", plan
    )
    sizes = _reduce_across_ranks(torch.cat(size_parts).double().sum(0), "sum", plan)
    combined = torch.stack([student_max, student_sum, teacher_max, teacher_sum, cross], dim=-1)
    return combined, sizes


class _Forward(NamedTuple):
    rows: torch.Tensor  # [B] float32 loss per sample
    coefficients: torch.Tensor  # [B, 2, 4] fp32 a/g, b/g, LSE_S,g, LSE_T,g per group (Φ, Ψ)
    threshold: torch.Tensor  # [B] int64


def _grouped_kd_forward(
    shards: Sequence[_Shard],
    weights: torch.Tensor,  # [3, B] float64: w_primary, w_binary, w_secondary
    labels: torch.Tensor | None,  # [B] int32
    plan: _Plan,
) -> _Forward:
    row_stats = _row_stats(shards, plan.temperature, plan, with_teacher=True)
    threshold = _primary_threshold(shards, row_stats[:, 1].float(), labels, plan)
    row_max = row_stats[:, [0, 2]].float().contiguous()
    stats, sizes = _group_stats(shards, row_max, threshold, labels, plan)
    student_max, student_sum, teacher_max, teacher_sum, cross = stats.unbind(-1)
    student_lse = student_max + student_sum.log()  # [B, 2]; −inf for an empty group
    teacher_lse = teacher_max + teacher_sum.log()
    present = sizes > 0
    # GKD Eq. 5, 10, within each group: E_q̂[gap] − (LSE_T,g − M_T) + (LSE_S,g − M_S)
    group_kl = (cross / teacher_sum - (teacher_lse - row_stats[:, 2:3])
                + (student_lse - row_stats[:, 0:1]))
    group_kl = torch.where(present, group_kl, 0.0)
    # GKD Eq. 6: group masses, then Binary-KD with 0·log 0 = 0
    student_log_mass = student_lse - torch.logaddexp(student_lse[:, 0], student_lse[:, 1])[:, None]
    teacher_log_mass = teacher_lse - torch.logaddexp(teacher_lse[:, 0], teacher_lse[:, 1])[:, None]
    teacher_mass = torch.where(present, teacher_log_mass.exp(), 0.0)
    binary = torch.where(
        teacher_mass > 0, teacher_mass * (teacher_log_mass - student_log_mass), 0.0
    ).sum(1)
    w_primary, w_binary, w_secondary = weights
    rows = (w_primary * group_kl[:, 0] + w_binary * binary + w_secondary * group_kl[:, 1])
    rows = rows * plan.temperature**2  # GKD Eq. 11 with Hinton's T²
    # gradient coefficients per unit incoming gradient (see _logit_grad)
    student_mass = torch.where(present, student_log_mass.exp(), 0.0)
    group_weight = torch.stack([w_primary, w_secondary], dim=1)
    a = plan.temperature * (group_weight + w_binary[:, None] * (student_mass - teacher_mass))
    b = plan.temperature * group_weight
    coefficients = torch.stack([a, b, student_lse, teacher_lse], dim=-1).float().contiguous()
    return _Forward(rows.float(), coefficients, threshold)


def _logits_backward(
    shard: _Shard,
    coefficients: torch.Tensor,  # [B, 2, 4], already times the incoming gradient
    threshold: torch.Tensor,
    labels: torch.Tensor | None,
    plan: _Plan,
) -> torch.Tensor:
    """∂loss/∂student logits of one shard [B, C]."""
    student, teacher = shard.student, shard.teacher
    batch_size, num_classes = student.shape
    grad = torch.empty_like(student)
    blocks = shard.blocks()
    grid = (triton.cdiv(batch_size, blocks["BLOCK_B"]), triton.cdiv(num_classes, blocks["BLOCK_C"]))
    _logits_backward_kernel[grid](
        student, teacher, grad, coefficients, threshold, threshold if labels is None else labels,
        batch_size, num_classes, student.stride(0), teacher.stride(0), grad.stride(0),
        shard.class_offset, plan.num_classes, 1.0 / plan.temperature,
        FORCE_TARGET=labels is not None, BLOCK_B=blocks["BLOCK_B"], BLOCK_C=blocks["BLOCK_C"],
    )
    return grad


def _embeddings_backward(
    shard: _Shard,
    coefficients: torch.Tensor,  # [B, 2, 4], already times the incoming gradient
    threshold: torch.Tensor,
    labels: torch.Tensor | None,
    plan: _Plan,
) -> tuple[torch.Tensor, torch.Tensor]:
    """∂loss/∂student embeddings [B, D] (this shard's classes only) and ∂loss/∂centres [C, D]."""
    blocks = shard.blocks()
    batch_size, num_classes = shard.batch_size, shard.num_classes
    embeddings = shard.student
    device = embeddings.device
    forced = threshold if labels is None else labels
    chunks, tiles_per_chunk = _chunking(batch_size, num_classes, blocks["BLOCK_B"],
                                        blocks["BLOCK_C"])
    weighted_centres = torch.empty(chunks, batch_size, blocks["BLOCK_DS"], device=device,
                                   dtype=torch.float32)
    weighted_cosines = torch.empty(chunks, batch_size, device=device, dtype=torch.float32)
    _embedding_grad_kernel[(triton.cdiv(batch_size, blocks["BLOCK_B"]), chunks)](
        *shard.student_args(), *shard.teacher_args(), coefficients, threshold, forced,
        weighted_centres, weighted_cosines, batch_size, num_classes, shard.class_offset,
        plan.num_classes, plan.logit_scale, 1.0 / plan.temperature, tiles_per_chunk,
        FORCE_TARGET=labels is not None, **blocks,
    )
    # ∂/∂e_b = (s/‖e_b‖)·(Σ_c G_bc ŵ_c − (Σ_c G_bc cos_bc)·ê_b); [B, D] work, no C in it
    inverse_norm = 1.0 / torch.linalg.vector_norm(embeddings, dim=1, dtype=torch.float32).clamp(
        min=1e-12)
    unit = embeddings.float() * inverse_norm[:, None]
    grad_embeddings = (plan.logit_scale * inverse_norm)[:, None] * (
        weighted_centres.sum(0)[:, :embeddings.shape[1]] - weighted_cosines.sum(0)[:, None] * unit)
    grad_centres = torch.empty_like(shard.student_centres)
    _centre_grad_kernel[(triton.cdiv(num_classes, blocks["BLOCK_C"]),)](
        *shard.student_args(), *shard.teacher_args(), coefficients, threshold, forced,
        grad_centres, grad_centres.stride(0), batch_size, num_classes, shard.class_offset,
        plan.num_classes, plan.logit_scale, 1.0 / plan.temperature,
        FORCE_TARGET=labels is not None, **blocks,
    )
    return grad_embeddings.to(embeddings.dtype), grad_centres


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------


def _shards(plan: _Plan, tensors: Sequence[torch.Tensor]) -> list[_Shard]:
    """The shards of a _GroupedKDFunction's tensor inputs: student logit shards then teacher
    logit shards, or (logit_scale set) student embeddings, student centres, teacher embeddings,
    teacher centres of one shard."""
    if plan.logit_scale is not None:
        student, student_centres, teacher, teacher_centres = tensors
        return [_Shard(student, teacher, plan.class_offsets[0], student_centres, teacher_centres)]
    count = len(tensors) // 2
    return [_Shard(student, teacher, offset)
            for student, teacher, offset in zip(tensors[:count], tensors[count:], plan.class_offsets)]


class _GroupedKDFunction(torch.autograd.Function):
    """Per-sample grouped KD [B] over class shards; gradient to the student's inputs only."""

    @staticmethod
    def forward(ctx, plan: _Plan, weights: torch.Tensor, labels: torch.Tensor | None,
                *tensors: torch.Tensor) -> torch.Tensor:
        result = _grouped_kd_forward(_shards(plan, tensors), weights, labels, plan)
        ctx.plan = plan
        ctx.save_for_backward(result.coefficients, result.threshold, labels, *tensors)
        return result.rows

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        coefficients, threshold, labels, *tensors = ctx.saved_tensors
        plan = ctx.plan
        scaled = coefficients.clone()
        scaled[..., :2] *= grad_rows.float()[:, None, None]
        shards = _shards(plan, tensors)
        if plan.logit_scale is not None:
            grad_embeddings, grad_centres = _embeddings_backward(shards[0], scaled, threshold,
                                                                 labels, plan)
            return None, None, None, grad_embeddings, grad_centres, None, None
        grads = [_logits_backward(shard, scaled, threshold, labels, plan)
                 if ctx.needs_input_grad[3 + index] else None for index, shard in enumerate(shards)]
        return (None, None, None, *grads, *([None] * len(shards)))


# ---------------------------------------------------------------------------------------------
# User-facing functions
# ---------------------------------------------------------------------------------------------


def grouped_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    tau: float = 0.93,  # GKD Table 2
    temperature: float = 1.0,  # GKD Eq. 1 has no temperature; the authors' code uses 4
    w_primary: float | torch.Tensor = 8.0,  # GKD λ1, "Implementation Details"
    w_binary: float | torch.Tensor = 1.0,  # GKD λ2, "Implementation Details"
    w_secondary: float | torch.Tensor = 0.0,  # GKD Eq. 11 drops Secondary-KD
    reduction: str = "mean",
    selection: str = "sample",
    k: int | None = None,
    force_target: bool = False,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grouped KD loss (GKD Eq. 11) between student and teacher logits [B, C].

    Logits are each network's own margin-free s·cos θ. Gradient flows to ``student_logits`` only.
    ``reduction``: "mean" over the batch, "sum", or "none" for a [B] vector. See the module
    docstring for ``selection``, ``k``, ``force_target`` and ``labels``. The Triton path
    (:func:`facekd.kernels.use_triton`) computes in fp32 and returns the student's dtype.
    """
    return grouped_kd_loss_sharded(
        [student_logits], [teacher_logits], class_offsets=[0], num_classes=student_logits.shape[-1],
        tau=tau, temperature=temperature, w_primary=w_primary, w_binary=w_binary,
        w_secondary=w_secondary, reduction=reduction, selection=selection, k=k,
        force_target=force_target, labels=labels,
    )


def grouped_kd_loss_sharded(
    student_shards: Sequence[torch.Tensor],
    teacher_shards: Sequence[torch.Tensor],
    *,
    class_offsets: Sequence[int],
    num_classes: int,
    all_reduce: AllReduce | None = None,
    tau: float = 0.93,  # GKD Table 2
    temperature: float = 1.0,  # GKD Eq. 1 has no temperature; the authors' code uses 4
    w_primary: float | torch.Tensor = 8.0,  # GKD λ1, "Implementation Details"
    w_binary: float | torch.Tensor = 1.0,  # GKD λ2, "Implementation Details"
    w_secondary: float | torch.Tensor = 0.0,  # GKD Eq. 11 drops Secondary-KD
    reduction: str = "mean",
    selection: str = "sample",
    k: int | None = None,
    force_target: bool = False,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`grouped_kd_loss` over logits split by class: shard i holds the classes
    [class_offsets[i], class_offsets[i] + C_i) of ``num_classes`` for every one of the B samples.

    Without ``all_reduce`` the shards are all the classes, held in this process. With
    ``all_reduce(tensor, op)`` (op "sum" or "max", in place, across ranks; e.g. a wrapper of
    ``torch.distributed.all_reduce`` on the model-parallel group) the shards are this rank's
    part, and the other ranks call the function at the same time with theirs. Every rank gets
    the same loss; the gradient reaches each rank's own student shards. Only per-sample
    statistics cross ranks: row maxima and sums, NUM_PIVOTS counts and masses per search pass,
    and the group sums. ``labels`` hold global class indices. The plain-torch path computes in
    fp32 (float64 for float64 inputs), also under an enclosing autocast; across ranks it holds
    this rank's [B, C_r] logits and finds Φ by the same kind of search (see
    :mod:`facekd.kernels.selection`); without ``all_reduce`` it is the reference on the
    concatenated shards.
    """
    if len(student_shards) == 0 or len(student_shards) != len(teacher_shards):
        raise ValueError(
            f"need as many teacher shards as student shards (at least one), got "
            f"{len(student_shards)} and {len(teacher_shards)}"
        )
    if len(class_offsets) != len(student_shards):
        raise ValueError(f"need one class offset per shard, got {len(class_offsets)} "
                         f"for {len(student_shards)} shards")
    for student, teacher in zip(student_shards, teacher_shards):
        _check_logits(student, teacher)
    batch_size = student_shards[0].shape[0]
    if any(student.shape[0] != batch_size for student in student_shards):
        raise ValueError(f"every shard must hold the same {batch_size} samples, got "
                         f"{[student.shape[0] for student in student_shards]}")
    spans = sorted((int(offset), int(offset) + student.shape[1])
                   for offset, student in zip(class_offsets, student_shards))
    if spans[0][0] < 0 or spans[-1][1] > num_classes or any(
        end > start for (_, end), (start, _) in zip(spans, spans[1:])
    ):
        raise ValueError(f"shards must be disjoint class ranges inside [0, {num_classes}), "
                         f"got {spans}")
    if all_reduce is None and (spans[0][0] != 0 or spans[-1][1] != num_classes or any(
        end != start for (_, end), (start, _) in zip(spans, spans[1:])
    )):
        raise ValueError(f"without all_reduce the shards must cover [0, {num_classes}) "
                         f"exactly, got {spans}")
    _check_options(
        batch_size=batch_size, num_classes=num_classes, tau=tau, temperature=temperature,
        selection=selection, k=k, force_target=force_target, labels=labels,
    )
    check_reduction(reduction)
    dtype = student_shards[0].dtype

    if use_triton(*student_shards, *teacher_shards):
        weights = _weight_matrix(w_primary, w_binary, w_secondary, batch_size,
                                 student_shards[0].device)
        plan = _Plan(
            tau=float(tau), temperature=float(temperature), selection=selection,
            k=None if k is None else int(k), force_target=force_target,
            class_offsets=tuple(int(offset) for offset in class_offsets),
            num_classes=int(num_classes), all_reduce=all_reduce,
        )
        shards = [shard if shard.stride(1) == 1 else shard.contiguous()
                  for shard in (*student_shards, *teacher_shards)]
        forced = labels.to(torch.int32).contiguous() if force_target else None
        rows = _GroupedKDFunction.apply(plan, weights, forced, *shards)
        return reduce_rows(rows.to(dtype), reduction)

    if all_reduce is not None:
        # the logits of this rank's classes only, in fp32 (float64 stays float64) like the kernels
        with full_precision(student_shards[0].device):
            rows = _sharded_rows(
                torch.cat(list(student_shards), dim=1), torch.cat(list(teacher_shards), dim=1),
                torch.cat([torch.arange(offset, offset + student.shape[1], device=student.device)
                           for offset, student in zip(class_offsets, student_shards)]),
                num_classes=int(num_classes), all_reduce=all_reduce, tau=tau, temperature=temperature,
                w_primary=w_primary, w_binary=w_binary, w_secondary=w_secondary, selection=selection,
                k=k, force_target=force_target, labels=labels,
            )
            return reduce_rows(rows.to(dtype), reduction)
    order = sorted(range(len(student_shards)), key=lambda index: class_offsets[index])
    return reference_grouped_kd_loss(
        torch.cat([student_shards[index] for index in order], dim=1),
        torch.cat([teacher_shards[index] for index in order], dim=1),
        tau=tau, temperature=temperature, w_primary=w_primary, w_binary=w_binary,
        w_secondary=w_secondary, reduction=reduction, selection=selection, k=k,
        force_target=force_target, labels=labels,
    )


def grouped_kd_loss_from_embeddings(
    student_embeddings: torch.Tensor,
    student_centres: torch.Tensor,
    teacher_embeddings: torch.Tensor,
    teacher_centres: torch.Tensor,
    *,
    s: float = 64.0,  # GKD "Implementation Details": ArcFace s = 64
    class_offset: int = 0,
    num_classes: int | None = None,
    all_reduce: AllReduce | None = None,
    tau: float = 0.93,  # GKD Table 2
    temperature: float = 1.0,  # GKD Eq. 1 has no temperature; the authors' code uses 4
    w_primary: float | torch.Tensor = 8.0,  # GKD λ1, "Implementation Details"
    w_binary: float | torch.Tensor = 1.0,  # GKD λ2, "Implementation Details"
    w_secondary: float | torch.Tensor = 0.0,  # GKD Eq. 11 drops Secondary-KD
    reduction: str = "mean",
    selection: str = "sample",
    k: int | None = None,
    force_target: bool = False,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`grouped_kd_loss` of the margin-free logits s·cos θ of both networks, computed from
    embeddings [B, D_S] / [B, D_T] and class centres [C, D_S] / [C, D_T] tile by tile.

    Embeddings and centres are normalised inside the kernels; neither B×C logits matrix is
    stored. The gradient reaches the student's embeddings and centres; the teacher gets none.
    ``class_offset``, ``num_classes`` and ``all_reduce`` shard the classes across ranks as in
    :func:`grouped_kd_loss_sharded` (the centres are this rank's [C_r, D] shard; the embedding
    gradient is this rank's part, to be summed over ranks like any model-parallel classifier's).
    The plain-torch path (CPU without the interpreter) materialises this rank's logits [B, C_r], in
    fp32 (float64 for float64 inputs) like the kernels, also inside an enclosing autocast; its
    backward is torch autograd's, so call backward outside the autocast block, as PyTorch advises.
    """
    tensors = {"student_embeddings": student_embeddings, "student_centres": student_centres,
               "teacher_embeddings": teacher_embeddings, "teacher_centres": teacher_centres}
    for name, tensor in tensors.items():
        if tensor.dim() != 2 or not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point matrix, got {tensor.dtype} of "
                             f"shape {tuple(tensor.shape)}")
    check_nonempty("one sample, one feature and one class", **tensors)
    for network in ("student", "teacher"):
        embeddings, centres = tensors[f"{network}_embeddings"], tensors[f"{network}_centres"]
        if embeddings.shape[1] != centres.shape[1] or embeddings.dtype != centres.dtype:
            raise ValueError(
                f"{network} embeddings and centres must share D and dtype, got "
                f"{embeddings.dtype} {tuple(embeddings.shape)} and {centres.dtype} "
                f"{tuple(centres.shape)}"
            )
    if teacher_embeddings.shape[0] != student_embeddings.shape[0]:
        raise ValueError(f"teacher_embeddings must hold the student's {student_embeddings.shape[0]} "
                         f"samples, got {teacher_embeddings.shape[0]}")
    if teacher_centres.shape[0] != student_centres.shape[0] or student_centres.shape[0] < 1:
        raise ValueError(f"both networks need the same classes (at least one), got "
                         f"{student_centres.shape[0]} and {teacher_centres.shape[0]} centres")
    if not s > 0:
        raise ValueError(f"s must be > 0, got {s}")
    shard_classes = student_centres.shape[0]
    num_classes = shard_classes if num_classes is None else int(num_classes)
    if not 0 <= class_offset <= num_classes - shard_classes:
        raise ValueError(f"classes [{class_offset}, {class_offset + shard_classes}) do not fit "
                         f"in [0, {num_classes})")
    if all_reduce is None and shard_classes != num_classes:
        raise ValueError(f"without all_reduce the centres must hold all {num_classes} classes, "
                         f"got {shard_classes}")
    batch_size = student_embeddings.shape[0]
    _check_options(
        batch_size=batch_size, num_classes=num_classes, tau=tau, temperature=temperature,
        selection=selection, k=k, force_target=force_target, labels=labels,
    )
    check_reduction(reduction)
    dtype = student_embeddings.dtype

    if use_triton(*tensors.values()):
        widest = max(student_embeddings.shape[1], teacher_embeddings.shape[1])
        if widest > MAX_EMBEDDING_DIM:
            raise ValueError(f"the Triton path holds a whole embedding on chip: D must be at "
                             f"most {MAX_EMBEDDING_DIM}, got {widest}")
        # the kernels compute in fp32 at most; float64 inputs (tests) are rounded once here
        inputs = [tensor.float() if tensor.dtype == torch.float64 else tensor
                  for tensor in tensors.values()]
        inputs = [tensor if tensor.stride(1) == 1 else tensor.contiguous() for tensor in inputs]
        plan = _Plan(
            tau=float(tau), temperature=float(temperature), selection=selection,
            k=None if k is None else int(k), force_target=force_target,
            class_offsets=(int(class_offset),), num_classes=num_classes, all_reduce=all_reduce,
            logit_scale=float(s),
        )
        rows = _GroupedKDFunction.apply(
            plan, _weight_matrix(w_primary, w_binary, w_secondary, batch_size, inputs[0].device),
            labels.to(torch.int32).contiguous() if force_target else None, *inputs,
        )
        return reduce_rows(rows.to(dtype), reduction)

    # s·cos θ in fp32 (float64 stays float64) like the kernels, also under an enclosing autocast
    compute_dtype = reference_dtype(dtype)
    options = dict(tau=tau, temperature=temperature, w_primary=w_primary, w_binary=w_binary,
                   w_secondary=w_secondary, selection=selection, k=k, force_target=force_target,
                   labels=labels)
    with full_precision(student_embeddings.device):
        student_logits = cosine_logits(student_embeddings.to(compute_dtype),
                                       student_centres.to(compute_dtype), s=s)
        teacher_logits = cosine_logits(teacher_embeddings.to(compute_dtype),
                                       teacher_centres.to(compute_dtype), s=s)
        if all_reduce is None:
            rows = reference_grouped_kd_loss(student_logits, teacher_logits, reduction="none", **options)
        else:
            classes = torch.arange(class_offset, class_offset + shard_classes, device=student_logits.device)
            rows = _sharded_rows(student_logits, teacher_logits, classes, num_classes=num_classes,
                                 all_reduce=all_reduce, **options)
        return reduce_rows(rows.to(dtype), reduction)


# ---------------------------------------------------------------------------------------------
# Plain-torch reference: the test oracle and the CPU path
# ---------------------------------------------------------------------------------------------


def _batch_k(student_logits: torch.Tensor, tau: float) -> int:
    """The batch-wide k of the authors' ``gkd_adaptive.py`` (T = 1, k ∈ {1, 101, 201, …})."""
    num_classes = student_logits.shape[1]
    summed = torch.softmax(student_logits, dim=1).sum(dim=0)
    cumulative = torch.sort(summed, descending=True).values.cumsum(0)
    # position (1-based) of the first class at which the batch mass reaches τ·B
    first = int((cumulative < tau * student_logits.shape[0]).sum()) + 1
    k = 1 + BATCH_K_STEP * math.ceil((first - 1) / BATCH_K_STEP)
    return k if k < num_classes else num_classes


def reference_primary_mask(
    student_logits: torch.Tensor,
    *,
    tau: float = 0.93,  # GKD Table 2
    temperature: float = 1.0,
    selection: str = "sample",
    k: int | None = None,
    force_target: bool = False,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The primary group Φ as a bool mask [B, C], by a full sort of the student's logits."""
    z = student_logits.detach().to(reference_dtype(student_logits.dtype))
    batch_size, num_classes = z.shape
    ranking_key = z.clone()
    if force_target:
        ranking_key.scatter_(1, labels.long()[:, None], math.inf)
    # a stable descending sort keeps the lower class index first among equal logits
    order = torch.sort(ranking_key, dim=1, descending=True, stable=True).indices
    if selection == "fixed":
        counts = torch.full((batch_size,), min(int(k), num_classes), device=z.device)
    elif selection == "batch":
        counts = torch.full((batch_size,), _batch_k(z, tau), device=z.device)
    elif tau >= 1.0:
        counts = torch.full((batch_size,), num_classes, device=z.device)
    else:
        # GKD Eq. 3: k = argmin_k |Σ_{i≤k} p̃_(i) − τ|. The cumulative sum never decreases, so the
        # argmin is the first position m where it reaches τ, or the one before it.
        cumulative = torch.softmax(z / temperature, dim=1).gather(1, order).cumsum(1)
        first = ((cumulative < tau).sum(1) + 1).clamp(max=num_classes)  # m, 1-based
        cum_first = cumulative.gather(1, (first - 1)[:, None]).squeeze(1)
        cum_before = torch.where(
            first > 1, cumulative.gather(1, (first - 2).clamp(min=0)[:, None]).squeeze(1), 0.0
        )
        take_before = (first > 1) & (tau - cum_before <= cum_first - tau)  # ties → smaller k
        counts = first - take_before.long()
    positions = torch.arange(num_classes, device=z.device).expand(batch_size, num_classes)
    mask = torch.zeros(batch_size, num_classes, dtype=torch.bool, device=z.device)
    return mask.scatter(1, order, positions < counts[:, None])


def _group_log_partition(logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log Σ_{i∈group} exp(logits_i) per row, 0 where the group is empty, and the emptiness flag.

    Masked entries are filled with the dtype's lowest finite value rather than −inf, so that an
    empty group's logsumexp stays finite and its (unused) backward does not produce NaN.
    """
    filled = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    nonempty = mask.any(dim=1)
    return torch.where(nonempty, torch.logsumexp(filled, dim=1), 0.0), nonempty


def _group_kl(
    student: torch.Tensor,  # [B, C] student logits / T
    teacher: torch.Tensor,  # [B, C] teacher logits / T
    mask: torch.Tensor,  # [B, C] bool, the group
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KL of the distributions renormalised inside the group (GKD Eq. 5, 10), 0 for an empty group.

    Returns the KL [B] and the group's log-partition of student and teacher [B] each.
    """
    student_log_z, nonempty = _group_log_partition(student, mask)
    teacher_log_z, _ = _group_log_partition(teacher, mask)
    log_teacher_hat = teacher - teacher_log_z[:, None]
    log_student_hat = student - student_log_z[:, None]
    teacher_hat = torch.where(mask, log_teacher_hat.exp(), 0.0)
    pointwise = torch.where(mask, teacher_hat * (log_teacher_hat - log_student_hat), 0.0)
    return torch.where(nonempty, pointwise.sum(1), 0.0), student_log_z, teacher_log_z


def grouped_kd_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    tau: float = 0.93,  # GKD Table 2
    temperature: float = 1.0,  # GKD Eq. 1 has no temperature
    selection: str = "sample",
    k: int | None = None,
    force_target: bool = False,
    labels: torch.Tensor | None = None,
) -> GroupedKDTerms:
    """Primary-, Binary- and Secondary-KD per sample (GKD Eq. 10), in plain torch.

    Differentiable with respect to ``student_logits``; the teacher is detached. Computed in
    float32 (float64 for float64 inputs). The terms are plain KL divergences: no weights, no T².
    """
    _check_logits(student_logits, teacher_logits)
    _check_options(
        batch_size=student_logits.shape[0], num_classes=student_logits.shape[1], tau=tau,
        temperature=temperature, selection=selection, k=k, force_target=force_target,
        labels=labels,
    )
    dtype = reference_dtype(student_logits.dtype)
    mask = reference_primary_mask(
        student_logits, tau=tau, temperature=temperature, selection=selection, k=k,
        force_target=force_target, labels=labels,
    )
    student = student_logits.to(dtype) / temperature
    teacher = teacher_logits.detach().to(dtype) / temperature
    primary, student_log_phi, teacher_log_phi = _group_kl(student, teacher, mask)
    secondary, student_log_psi, teacher_log_psi = _group_kl(student, teacher, ~mask)
    # GKD Eq. 6: group masses. log p_Φ = log Σ_Φ e^z − log Σ_U e^z, likewise for Ψ.
    student_log_all = torch.logsumexp(student, dim=1)
    teacher_log_all = torch.logsumexp(teacher, dim=1)
    has_secondary = (~mask).any(dim=1)
    teacher_log_mass = torch.stack([teacher_log_phi, teacher_log_psi], 1) - teacher_log_all[:, None]
    student_log_mass = torch.stack([student_log_phi, student_log_psi], 1) - student_log_all[:, None]
    present = torch.stack([torch.ones_like(has_secondary), has_secondary], 1)
    teacher_mass = torch.where(present, teacher_log_mass.exp(), 0.0)
    # Binary-KD = Σ_g q_g log(q_g / p_g) over g ∈ {Φ, Ψ}, with 0 · log 0 = 0
    binary = torch.where(
        teacher_mass > 0, teacher_mass * (teacher_log_mass - student_log_mass), 0.0
    ).sum(1)
    return GroupedKDTerms(primary, binary, secondary, mask, teacher_mass[:, 0])


def reference_grouped_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    tau: float = 0.93,  # GKD Table 2
    temperature: float = 1.0,  # GKD Eq. 1 has no temperature
    w_primary: float | torch.Tensor = 8.0,  # GKD λ1, "Implementation Details"
    w_binary: float | torch.Tensor = 1.0,  # GKD λ2, "Implementation Details"
    w_secondary: float | torch.Tensor = 0.0,  # GKD Eq. 11 drops Secondary-KD
    reduction: str = "mean",
    selection: str = "sample",
    k: int | None = None,
    force_target: bool = False,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`grouped_kd_loss` in plain torch (sort-based selection); same arguments."""
    check_reduction(reduction)
    terms = grouped_kd_terms(
        student_logits, teacher_logits, tau=tau, temperature=temperature, selection=selection,
        k=k, force_target=force_target, labels=labels,
    )
    rows = _weighted_rows(terms, w_primary, w_binary, w_secondary, temperature)
    return reduce_rows(rows.to(student_logits.dtype), reduction)


def _weighted_rows(
    terms: GroupedKDTerms,
    w_primary: float | torch.Tensor,
    w_binary: float | torch.Tensor,
    w_secondary: float | torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """The loss per sample [B] from its KL terms."""
    return (
        _weight_rows(w_primary, "w_primary", terms.primary) * terms.primary
        + _weight_rows(w_binary, "w_binary", terms.binary) * terms.binary
        + _weight_rows(w_secondary, "w_secondary", terms.secondary) * terms.secondary
    ) * temperature**2  # GKD Eq. 11, with Hinton's T² so gradients keep their scale


# ---------------------------------------------------------------------------------------------
# Plain torch across ranks: each rank holds the logits of its classes only
# ---------------------------------------------------------------------------------------------


def _sharded_terms(
    student_logits: torch.Tensor,  # [B, C_r] this rank's classes
    teacher_logits: torch.Tensor,  # [B, C_r]
    classes: torch.Tensor,  # [C_r] int64 global class of each column
    *,
    num_classes: int,
    all_reduce: AllReduce,
    tau: float,
    temperature: float,
    selection: str,
    k: int | None,
    force_target: bool,
    labels: torch.Tensor | None,
) -> GroupedKDTerms:
    """:func:`grouped_kd_terms` over the C classes of all ranks, from this rank's columns; the mask
    is this rank's columns of Φ. Computed in float32 (float64 for float64 inputs).

    Per row and group g ∈ (Φ, Ψ) the ranks add up Σ_g e^{z_S/T − M_S,g}, Σ_g e^{z_T/T − M_T,g} and
    Σ_g e^{z_T/T − M_T,g}·gap with gap = (z_T/T − M_T,g) − (z_S/T − M_S,g), M the group maxima over
    all ranks; then KL(p̂^T ‖ p̂^S) = E_{p̂^T}[gap] − log Σ_g e^{z_T/T − M_T,g} + log Σ_g e^{z_S/T − M_S,g}
    (GKD Eq. 5, 10): the maxima cancel, and centring by them keeps the cancellation small. The sums
    cross ranks through an all-reduce whose backward is the identity, so each rank's backward is
    the exact gradient of its columns (see :mod:`facekd.kernels.common`).
    """
    dtype = reference_dtype(student_logits.dtype)
    mask = sharded_primary_mask(
        student_logits.detach().to(dtype), classes, num_classes=num_classes, all_reduce=all_reduce,
        tau=tau, temperature=temperature, selection=selection, k=k, force_target=force_target,
        labels=labels,
    )
    groups = torch.stack([mask, ~mask])  # [2, B, C_r]: Φ, Ψ
    student = student_logits.to(dtype) / temperature
    teacher = teacher_logits.detach().to(dtype) / temperature
    maxima = torch.stack([student.detach().masked_fill(~groups, -math.inf).amax(2),
                          teacher.masked_fill(~groups, -math.inf).amax(2)])  # [2, 2, B]
    maxima = all_reduce_max(maxima, all_reduce)
    maxima = torch.where(torch.isfinite(maxima), maxima, 0.0)  # an empty group
    student_centred = student - maxima[0][..., None]  # [2, B, C_r]
    teacher_centred = teacher - maxima[1][..., None]
    student_weights = student_centred.masked_fill(~groups, -math.inf).exp()
    teacher_weights = teacher_centred.masked_fill(~groups, -math.inf).exp()
    gap = torch.where(groups, teacher_centred - student_centred, 0.0)
    local = torch.stack([student_weights.sum(2), teacher_weights.sum(2), (teacher_weights * gap).sum(2),
                         groups.sum(2).to(dtype)])  # [4, 2, B]
    student_sum, teacher_sum, cross, size = all_reduce_sum(local, all_reduce)
    present = size > 0
    # an empty group's sums are 0: give log a 1 there, so that no inf reaches the backward
    student_sum = torch.where(present, student_sum, 1.0)
    teacher_sum = torch.where(present, teacher_sum, 1.0)
    group_kl = torch.where(present, cross / teacher_sum - teacher_sum.log() + student_sum.log(), 0.0)
    # GKD Eq. 6: group masses, then Binary-KD with 0·log 0 = 0
    student_lse = torch.where(present, maxima[0] + student_sum.log(), -math.inf)  # [2, B]
    teacher_lse = torch.where(present, maxima[1] + teacher_sum.log(), -math.inf)
    student_log_mass = student_lse - torch.logaddexp(student_lse[0], student_lse[1])
    teacher_log_mass = teacher_lse - torch.logaddexp(teacher_lse[0], teacher_lse[1])
    teacher_mass = torch.where(present, teacher_log_mass.exp(), 0.0)
    binary = torch.where(teacher_mass > 0, teacher_mass * (teacher_log_mass - student_log_mass), 0.0).sum(0)
    return GroupedKDTerms(group_kl[0], binary, group_kl[1], mask, teacher_mass[0])


def _sharded_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    classes: torch.Tensor,
    *,
    w_primary: float | torch.Tensor,
    w_binary: float | torch.Tensor,
    w_secondary: float | torch.Tensor,
    **options,
) -> torch.Tensor:
    """The loss per sample [B] of :func:`_sharded_terms` (same ``options``), in its compute dtype."""
    terms = _sharded_terms(student_logits, teacher_logits, classes, **options)
    return _weighted_rows(terms, w_primary, w_binary, w_secondary, options["temperature"])


# ---------------------------------------------------------------------------------------------
# Correctness cases of the GPU suite (facekd.kernels.checks): the Triton path against the reference
# ---------------------------------------------------------------------------------------------

from facekd.kernels import checks as _checks  # noqa: E402  (after the functions the cases call)

# Loss and the student's gradients against float64; tests/kernels/test_grouped_kd.py reads this table too.
TOLERANCES = {
    torch.float32: _checks.Tolerance(rtol=1e-4, atol=2e-5),
    torch.float16: _checks.Tolerance(rtol=5e-3, atol=5e-3),
    torch.bfloat16: _checks.Tolerance(rtol=2e-2, atol=2e-2),
}
# ms1mv2 at the paper's batch of 512; k = 10,000 as the authors' distillation/gkd.py. Tiny: odd sizes.
_REALISTIC = {"B": 512, "C": 85_742, "D": 512, "D_teacher": 512, "k": 10_000}
_TINY = {"B": 5, "C": 37, "D": 24, "D_teacher": 40, "k": 3}
_SELECTIONS = {
    "paper": {},
    "batch": {"selection": "batch"},
    "fixed": {"selection": "fixed", "force_target": True},
}


def _case_inputs(shape, dtype: torch.dtype, device: torch.device) -> dict:
    """Both networks' embeddings near their label's centre (student cos ≈ 0.3, teacher ≈ 0.6), their
    centres, and the s·cos θ logits they give; labels, k and an incoming gradient."""
    rng = _checks.generator(device)
    student, student_centres, labels = _checks.near_centres(shape["B"], shape["C"], shape["D"], noise=3.2,
                                                            device=device, rng=rng)
    teacher_centres = torch.randn(shape["C"], shape["D_teacher"], device=device, generator=rng)
    teacher = teacher_centres[labels] + 1.3 * torch.randn(shape["B"], shape["D_teacher"], device=device,
                                                          generator=rng)
    tensors = {"student_embeddings": student, "student_centres": student_centres,
               "teacher_embeddings": teacher, "teacher_centres": teacher_centres,
               "student_logits": cosine_logits(student, student_centres, s=64.0),
               "teacher_logits": cosine_logits(teacher, teacher_centres, s=64.0)}
    return {**{name: tensor.to(dtype) for name, tensor in tensors.items()}, "labels": labels, "k": shape["k"],
            "grad_rows": _checks.incoming_gradient(shape["B"], device, rng)}


def _case_options(selection: str, inputs: dict) -> dict:
    options = dict(_SELECTIONS[selection], reduction="none")
    if selection == "fixed":
        options.update(k=inputs["k"], labels=inputs["labels"])
    return options


def _case_from_logits(selection: str):
    def compute(inputs: dict) -> dict:
        student = _checks.leaf(inputs["student_logits"])
        rows = grouped_kd_loss(student, inputs["teacher_logits"], **_case_options(selection, inputs))
        return _checks.loss_and_gradients(rows, inputs["grad_rows"], student_logits=student)
    return compute


def _case_from_embeddings(selection: str):
    def compute(inputs: dict) -> dict:
        student = _checks.leaf(inputs["student_embeddings"])
        centres = _checks.leaf(inputs["student_centres"])
        rows = grouped_kd_loss_from_embeddings(student, centres, inputs["teacher_embeddings"],
                                               inputs["teacher_centres"], s=64.0,
                                               **_case_options(selection, inputs))
        return _checks.loss_and_gradients(rows, inputs["grad_rows"], student_embeddings=student,
                                          student_centres=centres)
    return compute


_checks.register(*(
    _checks.KernelCase(f"grouped_kd/{form}/{selection}", _case_inputs, build(selection), TOLERANCES,
                       _REALISTIC, _TINY)
    for form, build in (("logits", _case_from_logits), ("embeddings", _case_from_embeddings))
    for selection in _SELECTIONS
))
