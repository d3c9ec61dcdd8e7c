"""Margin-softmax cross-entropy over C identities (ArcFace / CosFace / combined margin).

Maths, for embeddings x [B, D], class centres w [C, D] and labels y [B]:

    cos_ij = x_i·w_j / (‖x_i‖·‖w_j‖)                  both normalised (norms floored at 1e-12)
    z_ij   = s·cos_ij                                  every class j ≠ y_i
    z_iy   = s·(ψ(cos_iy) − m3)                        the target column
    ψ(c)   = cos(m1·θ + m2),  θ = acos(c)              while m1·θ + m2 ≤ π
    ψ(c)   = c − cos θ* − 1,  θ* = (π − m2)/m1         beyond θ* (the fallback)
    loss_i = logsumexp_j z_ij − z_iy

m2 is ArcFace's additive angular margin, m3 CosFace's additive cosine margin, m1 SphereFace's
multiplicative angular margin; any combination is allowed (insightface's CombinedMarginLoss only
runs the pure ArcFace and pure CosFace branches).

Fallback. cos(m1·θ + m2) turns back up once m1·θ + m2 passes π, which would reward a target
centre for moving further away. Beyond θ* the target logit continues as the plain cosine shifted
down so that the two pieces meet: at θ = θ* both equal −1 (times s, minus m3). The target logit is
therefore continuous and strictly decreasing in θ over [0, π]. (The classic insightface fallback
``cos θ − m·sin m`` has a jump at θ*; ours does not.) With m1·π + m2 ≤ π there is no fallback.

Gradient. ``margin_grad="exact"`` differentiates ψ: dψ/dc = m1·sin(m1·θ + m2)/sin θ inside, 1 in
the fallback. That derivative is unbounded as θ → 0 when m2 > 0 (acos is not differentiable at 1),
so θ is floored at ``THETA_FLOOR`` (1e-4 rad, below the smallest non-zero θ an fp32 cosine can
represent) when evaluating it. ``margin_grad="straight_through"`` takes dψ/dc = 1 — what
insightface's arcface_torch computes, since it applies the margin in place under ``no_grad``.
The cosine is clamped to [−1, 1] before ψ, and that clamp is not differentiated.

Partial FC. ``class_index`` [K] selects the rows of ``weight`` one step uses (sampled positives and
negatives); labels then index ``class_index``. Only those rows are read, and only they get a
gradient (the others get exact zeros).

Sharded classes. :func:`margin_softmax_ce_sharded` takes this rank's shard of the class centres
(the global classes [class_offset, class_offset + C_r)) and global labels; the ranks combine per-row
statistics through ``all_reduce`` (see :mod:`facekd.kernels.common`): one MAX of the row maxima,
one SUM of the rescaled Σexp and of the target logit (held by one rank). No logits ever leave a
shard, and backward reuses the forward's log-sum-exp without communicating.

Numerics: accumulation and the returned loss are float32 (float64 for float64 inputs on the torch
path), whatever autocast encloses the call; the log-sum-exp keeps a running row maximum, so small
``s`` loses nothing to underflow.
The gradient GEMMs take ∂L/∂cos rounded to the input dtype, as flash-attention backwards do.
Against float64 (tests/kernels/test_margin_ce.py), loss and gradients agree to a relative 1e-4
for fp32 inputs, 5e-3 for fp16 and 3e-2 for bf16 (gradients relative to their largest entry).
The Triton path adds the class splits' shares of ∂embeddings with atomics, so that gradient is
not bitwise reproducible; ∂weight and the loss are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from facekd.kernels.backend import ENV_VAR, check_nonempty, full_precision, reference_dtype, use_triton
from facekd.kernels.common import NORM_EPS, AllReduce, check_reduction, dot, dot_precision, reduce_rows

MARGIN_GRADS = ("exact", "straight_through")
# The exact margin derivative m1·sin(m1·θ + m2)/sin θ is evaluated at θ clamped to
# [THETA_FLOOR, π − THETA_FLOOR]: finite at cos = ±1, unchanged for every other fp32 cosine.
THETA_FLOOR = 1e-4
# The reference works on [B, chunk] logit blocks of at most this many elements.
REFERENCE_CHUNK_ELEMENTS = 1 << 22
# The ∂x and ∂w kernels keep a [rows, next_pow2(D)] fp32 accumulator on chip.
TRITON_MAX_DIM = 2048
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class _Margin:
    """Validated margin parameters and the constants of the fallback."""

    s: float
    m1: float
    m2: float
    m3: float
    straight_through: bool

    @classmethod
    def build(cls, s: float, m1: float, m2: float, m3: float, margin_grad: str) -> "_Margin":
        for name, value in (("s", s), ("m1", m1), ("m2", m2), ("m3", m3)):
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if s <= 0:
            raise ValueError(f"s must be > 0, got {s}")
        if m1 <= 0:
            raise ValueError(f"m1 must be > 0, got {m1}")
        if not 0 <= m2 < math.pi:
            raise ValueError(f"m2 must be in [0, π), got {m2}")
        if margin_grad not in MARGIN_GRADS:
            raise ValueError(f"margin_grad must be one of {MARGIN_GRADS}, got {margin_grad!r}")
        return cls(float(s), float(m1), float(m2), float(m3), margin_grad == "straight_through")

    @property
    def angular(self) -> bool:
        """False when ψ(c) = c (m1 = 1, m2 = 0): no acos needed."""
        return self.m1 != 1.0 or self.m2 != 0.0

    @property
    def cos_theta_limit(self) -> float:
        """cos θ*, θ* = (π − m2)/m1; below it the fallback applies (−1 − ε: never)."""
        theta_limit = (math.pi - self.m2) / self.m1
        return math.cos(theta_limit) if theta_limit < math.pi else -1.0 - 1e-6

    @property
    def fallback_shift(self) -> float:
        """ψ(c) = c − fallback_shift beyond θ*: meets cos(π) = −1 at θ*."""
        return max(self.cos_theta_limit, -1.0) + 1.0


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _acos(c):
    """acos on [−1, 1] in fp32 (Abramowitz & Stegun 4.4.46, |error| ≤ 2e-8): tl has no acos."""
    a = tl.abs(c)
    poly = -0.0012624911
    poly = poly * a + 0.0066700901
    poly = poly * a - 0.0170881256
    poly = poly * a + 0.0308918810
    poly = poly * a - 0.0501743046
    poly = poly * a + 0.0889789874
    poly = poly * a - 0.2145988016
    poly = poly * a + 1.5707963050
    half = tl.sqrt(1.0 - a) * poly
    return tl.where(c >= 0, half, 3.141592653589793 - half)


@triton.jit
def _inv_norm_kernel(
    rows_ptr,  # [N_all, D] embeddings or class centres, row-major
    index_ptr,  # [N] int64, row of rows_ptr for each output (class_index); read only if HAS_INDEX
    inv_norm_ptr,  # [N] float32 out, 1 / max(‖row‖, eps)
    n_rows,
    dim,
    eps,
    HAS_INDEX: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Inverse L2 norms of BLOCK_N rows: normalisation scales dot products, never rewrites HBM.

    Reads BLOCK_N·D elements, writes BLOCK_N floats.
    """
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_rows
    if HAS_INDEX:
        rows = tl.load(index_ptr + offs_n, mask=mask_n, other=0)
    else:
        rows = offs_n.to(tl.int64)
    squares = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_n[:, None] & (offs_d[None, :] < dim)
        values = tl.load(rows_ptr + rows[:, None] * dim + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        squares += tl.sum(values * values, axis=1)
    tl.store(inv_norm_ptr + offs_n, 1.0 / tl.maximum(tl.sqrt(squares), eps), mask=mask_n)


@triton.jit
def _target_kernel(
    x_ptr,  # [B, D] embeddings
    w_ptr,  # [C, D] class centres
    labels_ptr,  # [B] int64, target position in 0..K, −1 where this shard does not hold it
    index_ptr,  # [K] int64 class_index; read only if HAS_INDEX
    inv_x_ptr,  # [B] float32, 1/‖x_i‖
    inv_w_ptr,  # [K] float32, 1/‖w‖ by position
    target_logit_ptr,  # [B] float32 out, s·(ψ(cos_iy) − m3), 0 where not held
    slope_ptr,  # [B] float32 out, dψ/dc at cos_iy (1 if straight-through), 0 where not held
    batch,
    dim,
    s,
    m1,
    m2,
    m3,
    cos_limit,  # cos θ*: the fallback applies below it
    fallback_shift,  # cos θ* + 1
    theta_floor,
    HAS_INDEX: tl.constexpr,
    ANGULAR: tl.constexpr,  # False when m1 = 1 and m2 = 0: ψ(c) = c
    STRAIGHT_THROUGH: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Target logit and margin slope of BLOCK_B rows (ψ, fallback and θ floor: module docstring).

    One program gathers its rows' target centres through labels (and class_index) and reduces the
    row dot products over D on chip. Reads 2·BLOCK_B·D elements, writes 2·BLOCK_B floats.
    """
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < batch
    labels = tl.load(labels_ptr + offs_b, mask=mask_b, other=-1)
    held = mask_b & (labels >= 0)
    position = tl.where(held, labels, 0)
    if HAS_INDEX:
        w_rows = tl.load(index_ptr + position, mask=held, other=0)
    else:
        w_rows = position
    dots = tl.zeros([BLOCK_B], dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = held[:, None] & (offs_d[None, :] < dim)
        x = tl.load(x_ptr + offs_b.to(tl.int64)[:, None] * dim + offs_d[None, :], mask=mask, other=0.0)
        w = tl.load(w_ptr + w_rows[:, None] * dim + offs_d[None, :], mask=mask, other=0.0)
        dots += tl.sum(x.to(tl.float32) * w.to(tl.float32), axis=1)
    inv_x = tl.load(inv_x_ptr + offs_b, mask=held, other=0.0)
    inv_w = tl.load(inv_w_ptr + position, mask=held, other=0.0)
    cos = tl.minimum(tl.maximum(dots * inv_x * inv_w, -1.0), 1.0)
    if ANGULAR:
        theta = _acos(cos)
        inside = cos >= cos_limit
        psi = tl.where(inside, tl.cos(m1 * theta + m2), cos - fallback_shift)
        theta_safe = tl.minimum(tl.maximum(theta, theta_floor), 3.141592653589793 - theta_floor)
        slope = tl.where(inside, m1 * tl.sin(m1 * theta_safe + m2) / tl.sin(theta_safe), 1.0)
    else:
        psi = cos
        slope = tl.full([BLOCK_B], 1.0, tl.float32)
    if STRAIGHT_THROUGH:
        slope = tl.full([BLOCK_B], 1.0, tl.float32)
    tl.store(target_logit_ptr + offs_b, tl.where(held, s * (psi - m3), 0.0), mask=mask_b)
    tl.store(slope_ptr + offs_b, tl.where(held, slope, 0.0), mask=mask_b)


@triton.jit
def _logit_tile(
    x_ptr,  # [B, D] embeddings
    w_ptr,  # [C, D] class centres
    offs_b,  # [BLOCK_B] int32 rows of x
    w_rows,  # [BLOCK_C] int64 rows of w
    offs_c,  # [BLOCK_C] int32 class positions
    mask_b,  # [BLOCK_B]
    mask_c,  # [BLOCK_C]
    dim,
    scale_b,  # [BLOCK_B] float32, s/‖x_i‖
    inv_w,  # [BLOCK_C] float32, 1/‖w_j‖
    labels,  # [BLOCK_B] int64 target positions
    target_logit,  # [BLOCK_B] float32
    DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """(logits, s·cos) of one [BLOCK_B, BLOCK_C] tile, by tensor-core dots over D chunks.

    In the logits the target column holds its margin logit and columns past K are −inf; s·cos is 0
    there. Reads (BLOCK_B + BLOCK_C)·D elements; the tile stays on chip.
    """
    acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    offs_x = offs_b.to(tl.int64)[:, None] * dim
    offs_w = w_rows[:, None] * dim
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < dim
        x = tl.load(x_ptr + offs_x + offs_d[None, :], mask=mask_b[:, None] & mask_d[None, :], other=0.0)
        w = tl.load(w_ptr + offs_w + offs_d[None, :], mask=mask_c[:, None] & mask_d[None, :], other=0.0)
        acc = dot(x, tl.trans(w), acc, DOT_PRECISION)
    scaled_cos = acc * scale_b[:, None] * inv_w[None, :]
    logits = tl.where(offs_c[None, :] == labels[:, None], target_logit[:, None], scaled_cos)
    logits = tl.where(mask_c[None, :], logits, float("-inf"))
    return logits, scaled_cos


@triton.jit
def _grad_cos_tile(
    logits,  # [BLOCK_B, BLOCK_C] float32 recomputed logits, −inf past K
    offs_c,  # [BLOCK_C] class positions
    labels,  # [BLOCK_B] target positions
    lse,  # [BLOCK_B] float32, log Σ_j exp(z_ij) over all classes (all shards)
    grad_scale,  # [BLOCK_B] float32, s·∂L/∂loss_i
    slope,  # [BLOCK_B] float32, dψ/dc at the target
):
    """∂L/∂cos_ij = s·g_i·(p_ij − [j = y_i])·(dψ/dc if j = y_i else 1), with p = exp(z − lse)."""
    grad = tl.exp(logits - lse[:, None]) * grad_scale[:, None]
    is_target = offs_c[None, :] == labels[:, None]
    return tl.where(is_target, (grad - grad_scale[:, None]) * slope[:, None], grad)


@triton.jit
def _lse_fwd_kernel(
    x_ptr,  # [B, D] embeddings
    w_ptr,  # [C, D] class centres
    labels_ptr,  # [B] int64 target positions, −1 where not held
    index_ptr,  # [K] int64 class_index; read only if HAS_INDEX
    inv_x_ptr,  # [B] float32
    inv_w_ptr,  # [K] float32
    target_logit_ptr,  # [B] float32
    row_max_ptr,  # [n_splits, B] float32 out
    sum_exp_ptr,  # [n_splits, B] float32 out, Σ exp(z − row_max) over the split
    batch,
    n_classes,  # K
    dim,
    classes_per_split,  # a multiple of BLOCK_C
    s,
    HAS_INDEX: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Online log-sum-exp of z_ij over one split of the classes, for BLOCK_B rows.

    Program (i, k) walks the class tiles of split k: a logit tile (cos by tl.dot, scaled by the
    inverse norms, target column replaced by its margin logit), then the running max and Σexp of
    each row. Only the two [BLOCK_B] statistics persist on chip; no logit reaches HBM. The launcher
    combines the splits. Reads BLOCK_B·D per tile plus classes_per_split·D; writes 2·BLOCK_B floats.
    """
    pid_b = tl.program_id(0)
    pid_split = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < batch
    labels = tl.load(labels_ptr + offs_b, mask=mask_b, other=-1)
    target_logit = tl.load(target_logit_ptr + offs_b, mask=mask_b, other=0.0)
    scale_b = s * tl.load(inv_x_ptr + offs_b, mask=mask_b, other=0.0)
    row_max = tl.full([BLOCK_B], float("-inf"), tl.float32)
    sum_exp = tl.zeros([BLOCK_B], dtype=tl.float32)
    c_start = pid_split * classes_per_split
    c_end = tl.minimum(c_start + classes_per_split, n_classes)
    for c0 in range(c_start, c_end, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < c_end
        if HAS_INDEX:
            w_rows = tl.load(index_ptr + offs_c, mask=mask_c, other=0)
        else:
            w_rows = offs_c.to(tl.int64)
        inv_w = tl.load(inv_w_ptr + offs_c, mask=mask_c, other=0.0)
        logits, _ = _logit_tile(x_ptr, w_ptr, offs_b, w_rows, offs_c, mask_b, mask_c, dim, scale_b, inv_w,
                                labels, target_logit, DOT_PRECISION, BLOCK_B, BLOCK_C, BLOCK_D)
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        sum_exp = sum_exp * tl.exp(row_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        row_max = new_max
    tl.store(row_max_ptr + pid_split * batch + offs_b, row_max, mask=mask_b)
    tl.store(sum_exp_ptr + pid_split * batch + offs_b, sum_exp, mask=mask_b)


@triton.jit
def _grad_embeddings_kernel(
    x_ptr,  # [B, D] embeddings
    w_ptr,  # [C, D] class centres
    labels_ptr,  # [B] int64 target positions, −1 where not held
    index_ptr,  # [K] int64 class_index; read only if HAS_INDEX
    inv_x_ptr,  # [B] float32
    inv_w_ptr,  # [K] float32
    target_logit_ptr,  # [B] float32
    slope_ptr,  # [B] float32
    lse_ptr,  # [B] float32
    grad_rows_ptr,  # [B] float32, ∂L/∂loss_i
    grad_x_ptr,  # [B, D] float32 out, zeroed by the launcher, summed atomically over splits
    batch,
    n_classes,
    dim,
    classes_per_split,
    s,
    HAS_INDEX: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_PAD: tl.constexpr,  # next power of two ≥ D
):
    """∂L/∂x of BLOCK_B rows, from one split of the classes.

    With G = ∂L/∂cos recomputed tile by tile as in the forward and a_i = Σ_j G_ij·cos_ij, the
    normalisation backward is ∂L/∂x_i = (1/‖x_i‖)·Σ_j (G_ij/‖w_j‖)·w_j − a_i·x_i/‖x_i‖². The
    [BLOCK_B, D_PAD] accumulator and a stay on chip across the split's tiles; each program adds
    its share into grad_x once (BLOCK_B·D atomics per split, so the split order is not fixed).
    Per tile: reads (BLOCK_B + 2·BLOCK_C)·D elements (the second read of the centres hits L2).
    """
    pid_b = tl.program_id(0)
    pid_split = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < batch
    labels = tl.load(labels_ptr + offs_b, mask=mask_b, other=-1)
    target_logit = tl.load(target_logit_ptr + offs_b, mask=mask_b, other=0.0)
    inv_x = tl.load(inv_x_ptr + offs_b, mask=mask_b, other=0.0)
    slope = tl.load(slope_ptr + offs_b, mask=mask_b, other=0.0)
    lse = tl.load(lse_ptr + offs_b, mask=mask_b, other=0.0)
    grad_scale = s * tl.load(grad_rows_ptr + offs_b, mask=mask_b, other=0.0)
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < dim
    acc = tl.zeros([BLOCK_B, D_PAD], dtype=tl.float32)
    grad_dot_scaled_cos = tl.zeros([BLOCK_B], dtype=tl.float32)
    c_start = pid_split * classes_per_split
    c_end = tl.minimum(c_start + classes_per_split, n_classes)
    for c0 in range(c_start, c_end, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < c_end
        if HAS_INDEX:
            w_rows = tl.load(index_ptr + offs_c, mask=mask_c, other=0)
        else:
            w_rows = offs_c.to(tl.int64)
        inv_w = tl.load(inv_w_ptr + offs_c, mask=mask_c, other=0.0)
        logits, scaled_cos = _logit_tile(
            x_ptr, w_ptr, offs_b, w_rows, offs_c, mask_b, mask_c, dim, s * inv_x, inv_w, labels, target_logit,
            DOT_PRECISION, BLOCK_B, BLOCK_C, BLOCK_D)
        grad_cos = _grad_cos_tile(logits, offs_c, labels, lse, grad_scale, slope)
        grad_dot_scaled_cos += tl.sum(grad_cos * scaled_cos, axis=1)
        w = tl.load(w_ptr + w_rows[:, None] * dim + offs_d[None, :], mask=mask_c[:, None] & mask_d[None, :],
                    other=0.0)
        acc = dot((grad_cos * inv_w[None, :]).to(w.dtype), w, acc, DOT_PRECISION)
    x = tl.load(x_ptr + offs_b.to(tl.int64)[:, None] * dim + offs_d[None, :],
                mask=mask_b[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    grad_x = inv_x[:, None] * acc - (grad_dot_scaled_cos * inv_x * inv_x / s)[:, None] * x
    tl.atomic_add(grad_x_ptr + offs_b.to(tl.int64)[:, None] * dim + offs_d[None, :], grad_x,
                  mask=mask_b[:, None] & mask_d[None, :])


@triton.jit
def _grad_weight_kernel(
    x_ptr,  # [B, D] embeddings
    w_ptr,  # [C, D] class centres
    labels_ptr,  # [B] int64 target positions, −1 where not held
    index_ptr,  # [K] int64 class_index; read only if HAS_INDEX
    inv_x_ptr,  # [B] float32
    inv_w_ptr,  # [K] float32
    target_logit_ptr,  # [B] float32
    slope_ptr,  # [B] float32
    lse_ptr,  # [B] float32
    grad_rows_ptr,  # [B] float32, ∂L/∂loss_i
    grad_w_ptr,  # [C, D] out in the weight's dtype; only the K used rows are written
    batch,
    n_classes,
    dim,
    s,
    HAS_INDEX: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_PAD: tl.constexpr,
):
    """∂L/∂w of BLOCK_C class centres, over every row of the batch.

    With b_j = Σ_i G_ij·cos_ij: ∂L/∂w_j = (1/‖w_j‖)·Σ_i (G_ij/‖x_i‖)·x_i − b_j·w_j/‖w_j‖².
    Class-tile-major so that one program owns its rows of grad_w: the [BLOCK_C, D_PAD] fp32
    accumulator stays on chip over all row blocks and is written once, no atomics and no fp32
    [C, D] buffer. Per row block: reads (2·BLOCK_B + BLOCK_C)·D elements; recomputes the tile.
    """
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < n_classes
    if HAS_INDEX:
        w_rows = tl.load(index_ptr + offs_c, mask=mask_c, other=0)
    else:
        w_rows = offs_c.to(tl.int64)
    inv_w = tl.load(inv_w_ptr + offs_c, mask=mask_c, other=0.0)
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < dim
    acc = tl.zeros([BLOCK_C, D_PAD], dtype=tl.float32)
    grad_dot_scaled_cos = tl.zeros([BLOCK_C], dtype=tl.float32)
    for b0 in range(0, batch, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < batch
        labels = tl.load(labels_ptr + offs_b, mask=mask_b, other=-1)
        target_logit = tl.load(target_logit_ptr + offs_b, mask=mask_b, other=0.0)
        inv_x = tl.load(inv_x_ptr + offs_b, mask=mask_b, other=0.0)
        slope = tl.load(slope_ptr + offs_b, mask=mask_b, other=0.0)
        lse = tl.load(lse_ptr + offs_b, mask=mask_b, other=0.0)
        grad_scale = s * tl.load(grad_rows_ptr + offs_b, mask=mask_b, other=0.0)
        logits, scaled_cos = _logit_tile(
            x_ptr, w_ptr, offs_b, w_rows, offs_c, mask_b, mask_c, dim, s * inv_x, inv_w, labels, target_logit,
            DOT_PRECISION, BLOCK_B, BLOCK_C, BLOCK_D)
        grad_cos = _grad_cos_tile(logits, offs_c, labels, lse, grad_scale, slope)
        grad_dot_scaled_cos += tl.sum(grad_cos * scaled_cos, axis=0)
        x = tl.load(x_ptr + offs_b.to(tl.int64)[:, None] * dim + offs_d[None, :],
                    mask=mask_b[:, None] & mask_d[None, :], other=0.0)
        acc = dot(tl.trans((grad_cos * inv_x[:, None]).to(x.dtype)), x, acc, DOT_PRECISION)
    w = tl.load(w_ptr + w_rows[:, None] * dim + offs_d[None, :], mask=mask_c[:, None] & mask_d[None, :],
                other=0.0).to(tl.float32)
    grad_w = inv_w[:, None] * acc - (grad_dot_scaled_cos * inv_w * inv_w / s)[:, None] * w
    tl.store(grad_w_ptr + w_rows[:, None] * dim + offs_d[None, :], grad_w.to(grad_w_ptr.dtype.element_ty),
             mask=mask_c[:, None] & mask_d[None, :])


# ---------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Launch:
    """Block sizes and grids of one call (untuned guesses for Hopper; tiny ones for the interpreter)."""

    block_b: int  # rows per forward program
    block_c: int  # classes per forward tile
    block_d: int  # D chunk of each tile's dot
    grad_x_block_b: int  # rows per ∂x program: its [rows, D_PAD] accumulator lives in registers
    grad_x_block_c: int  # classes per ∂x tile: a [classes, D_PAD] operand in shared memory
    grad_w_block_b: int  # rows per ∂w tile: a [rows, D_PAD] operand in shared memory
    grad_w_block_c: int  # classes per ∂w program: its [classes, D_PAD] accumulator lives in registers
    d_pad: int
    programs: int  # aim for this many programs on the split-over-classes kernels
    num_warps: int
    dot_precision: str  # see facekd.kernels.common.dot ("upcast": the interpreter's bf16 workaround)

    @classmethod
    def build(cls, embeddings: torch.Tensor) -> "_Launch":
        dim = embeddings.shape[1]
        if triton.next_power_of_2(dim) > TRITON_MAX_DIM:
            raise ValueError(
                f"the Triton margin CE holds a [rows, D] accumulator on chip and takes D ≤ {TRITON_MAX_DIM}, "
                f"got D = {dim}; use FACEKD_KERNEL_BACKEND=torch"
            )
        if not embeddings.is_cuda:
            return cls(16, 16, 16, 16, 16, 16, 16, max(16, triton.next_power_of_2(dim)), programs=4, num_warps=4,
                       dot_precision=dot_precision(embeddings.dtype))
        sms = torch.cuda.get_device_properties(embeddings.device).multi_processor_count
        return cls.for_cuda(dim, embeddings.dtype, sms)

    @classmethod
    def for_cuda(cls, dim: int, dtype: torch.dtype, sms: int) -> "_Launch":
        """Sizes for a CUDA device with ``sms`` multiprocessors.

        Compiled for sm_90 by triton 3.9 at D = 128…512, these stay within 255 registers per thread
        without spills: 16K fp32 accumulator elements (64 registers per thread at 8 warps) and
        32K-element operands for 16-bit inputs; half of each for fp32, whose tf32x3 dots split
        every operand in two. Not yet timed on a GPU.
        """
        d_pad = max(16, triton.next_power_of_2(dim))
        wide = dtype == torch.float32
        accumulator_rows = max(16, min(64, (8192 if wide else 16384) // d_pad))
        operand_rows = max(16, min(64, (16384 if wide else 32768) // d_pad))
        block_c, block_d = (64, 32) if wide else (128, 64)
        return cls(128, block_c, block_d, accumulator_rows, operand_rows, operand_rows, accumulator_rows, d_pad,
                   programs=4 * sms, num_warps=8, dot_precision="tf32x3" if wide else "tf32")

    def class_splits(self, batch: int, n_classes: int, block_b: int, block_c: int) -> tuple[int, int]:
        """(splits, classes per split): enough programs to fill the device when B is small."""
        tiles = triton.cdiv(n_classes, block_c)
        splits = max(1, min(tiles, triton.cdiv(self.programs, triton.cdiv(batch, block_b))))
        tiles_per_split = triton.cdiv(tiles, splits)
        return triton.cdiv(tiles, tiles_per_split), tiles_per_split * block_c


def _combine_splits(row_max: torch.Tensor, sum_exp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine [S, B] per-split (max, Σexp) into [B]: max of maxima, Σexp rescaled to it."""
    total_max = row_max.amax(0)
    return total_max, (sum_exp * torch.exp(row_max - total_max)).sum(0)


def _triton_forward(embeddings, weight, labels, class_index, margin):
    """(target_logit, slope, row_max, sum_exp, (inv_x, inv_w)) by the Triton kernels."""
    launch = _Launch.build(embeddings)
    batch, dim = embeddings.shape
    has_index = class_index is not None
    n_classes = class_index.shape[0] if has_index else weight.shape[0]
    index = class_index if has_index else labels  # never read without HAS_INDEX
    f32 = dict(dtype=torch.float32, device=embeddings.device)
    inv_x, inv_w = torch.empty(batch, **f32), torch.empty(n_classes, **f32)
    norm_blocks = dict(BLOCK_N=launch.block_b, BLOCK_D=launch.block_d, num_warps=launch.num_warps)
    _inv_norm_kernel[(triton.cdiv(batch, launch.block_b),)](
        embeddings, index, inv_x, batch, dim, NORM_EPS, HAS_INDEX=False, **norm_blocks)
    _inv_norm_kernel[(triton.cdiv(n_classes, launch.block_b),)](
        weight, index, inv_w, n_classes, dim, NORM_EPS, HAS_INDEX=has_index, **norm_blocks)

    target_logit, slope = torch.empty(batch, **f32), torch.empty(batch, **f32)
    _target_kernel[(triton.cdiv(batch, launch.block_b),)](
        embeddings, weight, labels, index, inv_x, inv_w, target_logit, slope, batch, dim,
        margin.s, margin.m1, margin.m2, margin.m3, margin.cos_theta_limit, margin.fallback_shift, THETA_FLOOR,
        HAS_INDEX=has_index, ANGULAR=margin.angular, STRAIGHT_THROUGH=margin.straight_through,
        BLOCK_B=launch.block_b, BLOCK_D=launch.block_d, num_warps=launch.num_warps)

    splits, classes_per_split = launch.class_splits(batch, n_classes, launch.block_b, launch.block_c)
    split_max, split_sum = torch.empty(splits, batch, **f32), torch.empty(splits, batch, **f32)
    _lse_fwd_kernel[(triton.cdiv(batch, launch.block_b), splits)](
        embeddings, weight, labels, index, inv_x, inv_w, target_logit, split_max, split_sum,
        batch, n_classes, dim, classes_per_split, margin.s,
        HAS_INDEX=has_index, DOT_PRECISION=launch.dot_precision,
        BLOCK_B=launch.block_b, BLOCK_C=launch.block_c, BLOCK_D=launch.block_d, num_warps=launch.num_warps)
    row_max, sum_exp = _combine_splits(split_max, split_sum)
    return target_logit, slope, row_max, sum_exp, (inv_x, inv_w)


def _triton_backward(embeddings, weight, labels, class_index, margin, lse, target_logit, slope, grad_rows,
                     need_x, need_w, norms):
    """(∂L/∂embeddings or None, ∂L/∂weight or None) by the Triton kernels."""
    launch = _Launch.build(embeddings)
    inv_x, inv_w = norms
    batch, dim = embeddings.shape
    has_index = class_index is not None
    n_classes = class_index.shape[0] if has_index else weight.shape[0]
    index = class_index if has_index else labels
    grad_rows = grad_rows.to(torch.float32).contiguous()
    per_row = (embeddings, weight, labels, index, inv_x, inv_w, target_logit, slope, lse, grad_rows)
    grad_x = grad_w = None
    if need_x:
        grad_x = torch.zeros(batch, dim, dtype=torch.float32, device=embeddings.device)
        splits, classes_per_split = launch.class_splits(
            batch, n_classes, launch.grad_x_block_b, launch.grad_x_block_c)
        _grad_embeddings_kernel[(triton.cdiv(batch, launch.grad_x_block_b), splits)](
            *per_row, grad_x, batch, n_classes, dim, classes_per_split, margin.s,
            HAS_INDEX=has_index, DOT_PRECISION=launch.dot_precision,
            BLOCK_B=launch.grad_x_block_b, BLOCK_C=launch.grad_x_block_c, BLOCK_D=launch.block_d,
            D_PAD=launch.d_pad, num_warps=launch.num_warps)
        grad_x = grad_x.to(embeddings.dtype)
    if need_w:
        grad_w = torch.zeros_like(weight)
        _grad_weight_kernel[(triton.cdiv(n_classes, launch.grad_w_block_c),)](
            *per_row, grad_w, batch, n_classes, dim, margin.s,
            HAS_INDEX=has_index, DOT_PRECISION=launch.dot_precision,
            BLOCK_B=launch.grad_w_block_b, BLOCK_C=launch.grad_w_block_c, BLOCK_D=launch.block_d,
            D_PAD=launch.d_pad, num_warps=launch.num_warps)
    return grad_x, grad_w


# ---------------------------------------------------------------------------------------------
# Plain-torch reference: the same maths, chunked over classes (the CPU path and the demo's)
# ---------------------------------------------------------------------------------------------


def reference_margin_target(cos: torch.Tensor, margin: _Margin) -> tuple[torch.Tensor, torch.Tensor]:
    """Target logit s·(ψ(c) − m3) and dψ/dc (1 when straight-through) for target cosines ``cos``."""
    c = cos.clamp(-1.0, 1.0)
    if not margin.angular:
        psi, slope = c, torch.ones_like(c)
    else:
        theta = torch.acos(c)
        angle = margin.m1 * theta + margin.m2
        inside = c >= margin.cos_theta_limit
        psi = torch.where(inside, torch.cos(angle), c - margin.fallback_shift)
        theta_safe = theta.clamp(THETA_FLOOR, math.pi - THETA_FLOOR)
        slope_inside = margin.m1 * torch.sin(margin.m1 * theta_safe + margin.m2) / torch.sin(theta_safe)
        slope = torch.where(inside, slope_inside, torch.ones_like(c))
    if margin.straight_through:
        slope = torch.ones_like(c)
    return margin.s * (psi - margin.m3), slope


def _inv_norm(rows: torch.Tensor) -> torch.Tensor:
    return 1.0 / rows.norm(dim=1).clamp_min(NORM_EPS)


def _class_rows(class_index: torch.Tensor | None, start: int, end: int) -> torch.Tensor | slice:
    return slice(start, end) if class_index is None else class_index[start:end]


def _reference_chunk(batch: int) -> int:
    return max(1, REFERENCE_CHUNK_ELEMENTS // max(batch, 1))


def _chunk_logits(
    x_norm: torch.Tensor,  # [B, D] normalised embeddings
    w_norm: torch.Tensor,  # [n, D] normalised class centres start..start+n
    labels: torch.Tensor,  # [B] local target positions, −1 where not in this shard
    target_logit: torch.Tensor,  # [B]
    start: int,
    s: float,
) -> torch.Tensor:
    logits = s * (x_norm @ w_norm.T)
    columns = torch.arange(start, start + w_norm.shape[0], device=labels.device)
    return torch.where(columns[None, :] == labels[:, None], target_logit[:, None], logits)


def _reference_forward(embeddings, weight, labels, class_index, margin):
    """(target_logit, slope, row_max, sum_exp, None) like the kernels; holds one chunk at a time."""
    with full_precision(embeddings.device):  # fp32 logits under an enclosing autocast too
        dtype = reference_dtype(embeddings.dtype)
        x_norm = embeddings.to(dtype) * _inv_norm(embeddings.to(dtype))[:, None]
        n_classes = weight.shape[0] if class_index is None else class_index.shape[0]
        owned = labels >= 0
        target_rows = labels.clamp_min(0)
        if class_index is not None:
            target_rows = class_index[target_rows]
        w_target = weight[target_rows].to(dtype)
        target_cos = (x_norm * w_target).sum(1) * _inv_norm(w_target)
        target_logit, slope = reference_margin_target(target_cos, margin)
        target_logit = torch.where(owned, target_logit, torch.zeros_like(target_logit))
        slope = torch.where(owned, slope, torch.zeros_like(slope))

        row_max = torch.full_like(target_logit, -math.inf)
        sum_exp = torch.zeros_like(target_logit)
        chunk = _reference_chunk(embeddings.shape[0])
        for start in range(0, n_classes, chunk):
            end = min(start + chunk, n_classes)
            w = weight[_class_rows(class_index, start, end)].to(dtype)
            logits = _chunk_logits(x_norm, w * _inv_norm(w)[:, None], labels, target_logit, start, margin.s)
            new_max = torch.maximum(row_max, logits.max(1).values)
            sum_exp = sum_exp * torch.exp(row_max - new_max) + torch.exp(logits - new_max[:, None]).sum(1)
            row_max = new_max
        return target_logit, slope, row_max, sum_exp, None


def _reference_backward(embeddings, weight, labels, class_index, margin, lse, target_logit, slope, grad_rows,
                        need_x, need_w, norms):
    """(grad_embeddings, grad_weight) of Σ_i grad_rows_i·loss_i, recomputing logits chunk by chunk."""
    with full_precision(embeddings.device):  # fp32 logits under an enclosing autocast too
        dtype = reference_dtype(embeddings.dtype)
        x = embeddings.to(dtype)
        inv_x = _inv_norm(x)
        x_norm = x * inv_x[:, None]
        grad_rows = grad_rows.to(dtype)
        n_classes = weight.shape[0] if class_index is None else class_index.shape[0]
        grad_x_norm = torch.zeros_like(x_norm)
        grad_weight = torch.zeros_like(weight) if need_w else None
        chunk = _reference_chunk(embeddings.shape[0])
        for start in range(0, n_classes, chunk):
            end = min(start + chunk, n_classes)
            rows = _class_rows(class_index, start, end)
            w = weight[rows].to(dtype)
            inv_w = _inv_norm(w)
            w_norm = w * inv_w[:, None]
            logits = _chunk_logits(x_norm, w_norm, labels, target_logit, start, margin.s)
            # d loss_i / d cos_ij = s·(p_ij − [j = y_i]·1)·(dψ/dc on the target column)
            grad_cos = torch.exp(logits - lse[:, None]) * (margin.s * grad_rows)[:, None]
            columns = torch.arange(start, end, device=labels.device)
            is_target = columns[None, :] == labels[:, None]
            grad_cos = torch.where(is_target, (grad_cos - margin.s * grad_rows[:, None]) * slope[:, None],
                                   grad_cos)
            grad_x_norm += grad_cos @ w_norm
            if need_w:
                grad_w_norm = grad_cos.T @ x_norm
                grad_w = inv_w[:, None] * (grad_w_norm - w_norm * (w_norm * grad_w_norm).sum(1, keepdim=True))
                grad_weight[rows] = grad_w.to(weight.dtype)
        grad_x = inv_x[:, None] * (grad_x_norm - x_norm * (x_norm * grad_x_norm).sum(1, keepdim=True))
        return (grad_x.to(embeddings.dtype) if need_x else None), grad_weight


# ---------------------------------------------------------------------------------------------
# autograd.Function over either path
# ---------------------------------------------------------------------------------------------


class _MarginSoftmaxCEFunction(torch.autograd.Function):
    """Per-row loss lse_i − z_iy; logits are recomputed tile by tile (chunk by chunk) in backward.

    With ``all_reduce``, ``weight`` is this rank's shard of the classes and ``labels`` hold the
    target's position in it (−1 where another rank holds it): lse and the target logit then come
    from all ranks, and the gradients are this rank's: exact for ``weight``, this rank's share for
    the embeddings. Backward reads the saved lse and does not communicate.
    """

    @staticmethod
    def forward(ctx, embeddings, weight, labels, class_index, all_reduce, margin, triton_path):
        forward = _triton_forward if triton_path else _reference_forward
        target_logit, slope, row_max, sum_exp, norms = forward(embeddings, weight, labels, class_index, margin)
        total_target = target_logit
        if all_reduce is not None:
            # one MAX of the row maxima, then one SUM of Σexp rescaled to it and of the target logit
            shard_max = row_max
            row_max = shard_max.clone()
            all_reduce(row_max, "max")
            sums = torch.stack([sum_exp * torch.exp(shard_max - row_max), target_logit])
            all_reduce(sums, "sum")
            sum_exp, total_target = sums
        lse = row_max + torch.log(sum_exp)
        ctx.margin, ctx.triton_path = margin, triton_path
        ctx.save_for_backward(embeddings, weight, labels, class_index, lse, target_logit, slope,
                              *(norms or (None, None)))
        return lse - total_target

    @staticmethod
    def backward(ctx, grad_rows):
        embeddings, weight, labels, class_index, lse, target_logit, slope, inv_x, inv_w = ctx.saved_tensors
        backward = _triton_backward if ctx.triton_path else _reference_backward
        grad_x, grad_w = backward(
            embeddings, weight, labels, class_index, ctx.margin, lse, target_logit, slope, grad_rows,
            need_x=ctx.needs_input_grad[0], need_w=ctx.needs_input_grad[1], norms=(inv_x, inv_w),
        )
        return grad_x, grad_w, None, None, None, None, None


def _triton_path(embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> bool:
    """The backend switch, with the Triton path's own limits named."""
    if not use_triton(embeddings, weight, labels):
        return False
    if embeddings.dtype == torch.float64:
        raise TypeError(
            f"the Triton margin CE takes float16, bfloat16 or float32, got float64; use {ENV_VAR}=torch"
        )
    return True


# ---------------------------------------------------------------------------------------------
# Argument checks: every bad value is named where it enters
# ---------------------------------------------------------------------------------------------


def _check_tensor(name: str, tensor, dims: int) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimension(s), got shape {tuple(tensor.shape)}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous (strides {tensor.stride()}); call .contiguous() first")


def _check_inputs(embeddings, weight, labels, class_index, *, allow_unowned: bool, check_values: bool) -> None:
    _check_tensor("embeddings", embeddings, 2)
    _check_tensor("weight", weight, 2)
    _check_tensor("labels", labels, 1)
    if embeddings.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"embeddings must be float16, bfloat16, float32 or float64, got {embeddings.dtype}")
    if weight.dtype != embeddings.dtype:
        raise TypeError(f"weight must have the embeddings' dtype {embeddings.dtype}, got {weight.dtype}")
    check_nonempty("one row, one feature and one class", embeddings=embeddings, weight=weight)
    batch, dim = embeddings.shape
    if weight.shape[1] != dim:
        raise ValueError(f"weight must be [C, {dim}] to match embeddings, got {tuple(weight.shape)}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64, got {labels.dtype}")
    if labels.shape[0] != batch:
        raise ValueError(f"labels must have B = {batch} entries, got {labels.shape[0]}")
    for name, tensor in (("weight", weight), ("labels", labels)):
        if tensor.device != embeddings.device:
            raise ValueError(f"{name} is on {tensor.device}, embeddings on {embeddings.device}")
    n_classes = weight.shape[0]
    if class_index is not None:
        _check_tensor("class_index", class_index, 1)
        if class_index.dtype != torch.int64:
            raise TypeError(f"class_index must be int64, got {class_index.dtype}")
        if class_index.device != embeddings.device:
            raise ValueError(f"class_index is on {class_index.device}, embeddings on {embeddings.device}")
        if class_index.shape[0] < 1:
            raise ValueError("class_index must select at least one class, got K = 0")
        n_classes = class_index.shape[0]
    if not check_values:
        return
    # Reading values costs one host synchronisation; check_values=False skips it in a trusted loop.
    if class_index is not None:
        _check_class_index_values(class_index, weight.shape[0])
    where = "positions in class_index" if class_index is not None else "classes of weight"
    _check_label_range(labels, low=-1 if allow_unowned else 0, high=n_classes, where=where)


def _check_class_index_values(class_index: torch.Tensor, n_rows: int) -> None:
    sorted_index = class_index.sort().values
    index_min, index_max = sorted_index[0].item(), sorted_index[-1].item()
    if index_min < 0 or index_max >= n_rows:
        raise ValueError(f"class_index must be in [0, {n_rows}), got min {index_min}, max {index_max}")
    repeats = (sorted_index[1:] == sorted_index[:-1]).nonzero()
    if repeats.numel():
        repeated = sorted_index[repeats[0, 0]].item()
        raise ValueError(f"class_index must not repeat a class, got class {repeated} more than once")


def _check_label_range(labels: torch.Tensor, *, low: int, high: int, where: str) -> None:
    label_min, label_max = labels.min().item(), labels.max().item()
    if label_min < low or label_max >= high:
        raise ValueError(f"labels must be in [{low}, {high}) ({where}), got min {label_min}, max {label_max}")


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def margin_softmax_ce(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    s: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.5,
    m3: float = 0.0,
    class_index: torch.Tensor | None = None,
    reduction: str = "mean",
    margin_grad: str = "exact",
    check_values: bool = True,
) -> torch.Tensor:
    """Margin-softmax cross-entropy of ``embeddings`` [B, D] against class centres ``weight`` [C, D].

    ``labels`` [B] int64 are in [0, C), or in [0, K) positions of ``class_index`` [K] (distinct
    rows of ``weight`` used this step). Defaults are ArcFace's (s = 64, m2 = 0.5); CosFace is
    ``m2=0, m3=0.35``. ``margin_grad`` is ``"exact"`` or ``"straight_through"`` (insightface).
    ``check_values=False`` skips the label-range and class_index-repeat checks, which read device
    values (one host synchronisation): for a step loop whose labels and class_index are known good
    (out-of-range labels or repeated classes then give wrong numbers, not errors). Returns float32
    (float64 for float64 inputs).
    """
    margin = _Margin.build(s, m1, m2, m3, margin_grad)
    check_reduction(reduction)
    _check_inputs(embeddings, weight, labels, class_index, allow_unowned=False, check_values=check_values)
    rows = _MarginSoftmaxCEFunction.apply(
        embeddings, weight, labels, class_index, None, margin, _triton_path(embeddings, weight, labels))
    return reduce_rows(rows, reduction)


def cosine_logits(
    embeddings: torch.Tensor, weight: torch.Tensor, *, s: float, class_index: torch.Tensor | None = None
) -> torch.Tensor:
    """Margin-free logits s·cos θ [B, C] (or [B, K] with ``class_index``), differentiable, plain torch."""
    _check_tensor("embeddings", embeddings, 2)
    _check_tensor("weight", weight, 2)
    if weight.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"weight must be [C, {embeddings.shape[1]}] to match embeddings, got {tuple(weight.shape)}")
    if class_index is not None:
        weight = weight[class_index]
    x_norm = torch.nn.functional.normalize(embeddings, dim=1, eps=NORM_EPS)
    w_norm = torch.nn.functional.normalize(weight, dim=1, eps=NORM_EPS)
    return s * (x_norm @ w_norm.T)


def margin_logits(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    s: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.5,
    m3: float = 0.0,
    class_offset: int | None = None,
) -> torch.Tensor:
    """The logits the margin loss sees, [B, C]: s·(ψ(cos θ_y) − m3) on the target column, s·cos θ elsewhere.

    Plain torch and differentiable (exact margin gradient; acos is not differentiable at cos = ±1,
    so a target exactly on its centre gets no gradient through the margin). It materialises the
    B×C logits: for methods that compare margined logits (the GKD authors' code), not for the loss.
    ``class_offset``: ``weight`` is a shard holding the global classes [class_offset, class_offset + C)
    and ``labels`` are global; a row whose label another shard holds gets no margin here.
    """
    margin = _Margin.build(s, m1, m2, m3, "exact")
    logits = cosine_logits(embeddings, weight, s=1.0)
    if labels.shape != (logits.shape[0],) or labels.dtype != torch.int64:
        raise ValueError(
            f"labels must be int64 of shape ({logits.shape[0]},), got {labels.dtype} {tuple(labels.shape)}")
    columns = labels if class_offset is None else (labels - class_offset).clamp(0, logits.shape[1] - 1)
    target, _ = reference_margin_target(logits.gather(1, columns[:, None]).clamp(-1 + 1e-7, 1 - 1e-7), margin)
    margined = (s * logits).scatter(1, columns[:, None], target)
    if class_offset is None:
        return margined
    owned = (labels >= class_offset) & (labels < class_offset + logits.shape[1])
    return torch.where(owned[:, None], margined, s * logits)


def margin_softmax_ce_sharded(
    embeddings: torch.Tensor,
    weight_shard: torch.Tensor,
    labels: torch.Tensor,
    *,
    class_offset: int,
    num_classes: int,
    all_reduce: AllReduce | None = None,
    class_index: torch.Tensor | None = None,
    s: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.5,
    m3: float = 0.0,
    reduction: str = "mean",
    margin_grad: str = "exact",
    check_values: bool = True,
) -> torch.Tensor:
    """:func:`margin_softmax_ce` over ``num_classes`` classes split by rank, from this rank's shard.

    ``weight_shard`` [C_r, D] holds the global classes [class_offset, class_offset + C_r);
    ``labels`` [B] are global, in [0, num_classes), and the same on every rank (as the embeddings
    [B, D], e.g. all-gathered). ``all_reduce(tensor, op)`` combines the ranks (two calls per
    forward, none in backward; see :mod:`facekd.kernels.common`); every rank returns the same loss,
    and its backward gives ``weight_shard`` its exact gradient and the embeddings this rank's share,
    to be summed over ranks. Without ``all_reduce`` the shard must hold every class
    (``class_offset=0, num_classes=C_r``), and this is :func:`margin_softmax_ce`.

    ``class_index`` [K] (int64, distinct rows of ``weight_shard``) restricts the classes this rank
    uses this step (partial FC): the loss is then over the union of the ranks' sampled classes, and
    the rank that owns a label's class must have sampled it (checked with ``check_values``, which
    reads device values: one host synchronisation). Other arguments as :func:`margin_softmax_ce`.
    """
    margin = _Margin.build(s, m1, m2, m3, margin_grad)
    check_reduction(reduction)
    _check_inputs(embeddings, weight_shard, labels, class_index, allow_unowned=False, check_values=False)
    shard_classes = weight_shard.shape[0]
    if not 0 <= class_offset <= num_classes - shard_classes:
        raise ValueError(f"the shard's classes [{class_offset}, {class_offset + shard_classes}) do not fit "
                         f"in [0, {num_classes})")
    if all_reduce is None and shard_classes != num_classes:
        raise ValueError(f"without all_reduce the shard must hold all {num_classes} classes, "
                         f"got {shard_classes}")
    if check_values:
        _check_label_range(labels, low=0, high=num_classes, where="global classes")
        if class_index is not None:
            _check_class_index_values(class_index, shard_classes)
    # the target's position in this shard (in class_index when sampled), −1 where another rank owns it
    shard_row = labels - class_offset
    owned = (shard_row >= 0) & (shard_row < shard_classes)
    shard_row = shard_row.clamp(0, shard_classes - 1)
    if class_index is not None:
        position = torch.full((shard_classes,), -1, dtype=torch.int64, device=labels.device)
        position[class_index] = torch.arange(class_index.shape[0], device=labels.device)
        shard_row = position[shard_row]
        if check_values and bool((owned & (shard_row < 0)).any()):
            missing = int(labels[owned & (shard_row < 0)][0])
            raise ValueError(f"class_index must hold every label of this shard's classes (the owner samples "
                             f"its positives), class {missing} (row {missing - class_offset}) is missing")
    local_labels = torch.where(owned, shard_row, -1)
    rows = _MarginSoftmaxCEFunction.apply(
        embeddings, weight_shard, local_labels, class_index, all_reduce, margin,
        _triton_path(embeddings, weight_shard, labels))
    return reduce_rows(rows, reduction)


# ---------------------------------------------------------------------------------------------
# Correctness cases of the GPU suite (facekd.kernels.checks): the Triton path against the reference
# ---------------------------------------------------------------------------------------------

from facekd.kernels import checks as _checks  # noqa: E402  (after the functions the cases call)

# Loss and gradients against float64, each relative to its largest entry (see the module docstring);
# tests/kernels/test_margin_ce.py reads this table too.
TOLERANCES = {
    torch.float32: _checks.Tolerance(rtol=1e-4, atol_of_max=1e-4),
    torch.float16: _checks.Tolerance(rtol=5e-3, atol_of_max=5e-3),
    torch.bfloat16: _checks.Tolerance(rtol=3e-2, atol_of_max=3e-2),
}
_ARCFACE = dict(s=64.0, m1=1.0, m2=0.5, m3=0.0)
# ms1mv2 at a global batch of 1024; partial FC sampling 10 % of the classes. Tiny: odd sizes.
_REALISTIC = {"B": 1024, "C": 85_742, "D": 512, "K": 8_574}
_TINY = {"B": 19, "C": 37, "D": 24, "K": 21}


def _case_inputs(shape, dtype: torch.dtype, device: torch.device, *, sampled: bool = False) -> dict:
    """Embeddings near their centre (cos ≈ 0.3), class centres, labels and an incoming gradient;
    ``sampled``: a partial-FC class_index [K] holding every label, labels re-indexed into it."""
    rng = _checks.generator(device)
    x, w, labels = _checks.near_centres(shape["B"], shape["C"], shape["D"], noise=3.2, device=device, rng=rng)
    class_index = None
    if sampled:
        priority = torch.rand(shape["C"], device=device, generator=rng)
        priority[labels] += 1.0  # positives first, then random negatives
        class_index = priority.argsort(descending=True)[: shape["K"]]
        class_index = class_index[torch.randperm(shape["K"], device=device, generator=rng)]
        position = torch.full((shape["C"],), -1, dtype=torch.int64, device=device)
        position[class_index] = torch.arange(shape["K"], device=device)
        labels = position[labels]
    return {"embeddings": x.to(dtype), "weight": w.to(dtype), "labels": labels, "class_index": class_index,
            "grad_rows": _checks.incoming_gradient(shape["B"], device, rng)}


def _case_loss(margin_grad: str):
    def compute(inputs: dict) -> dict:
        x, w = _checks.leaf(inputs["embeddings"]), _checks.leaf(inputs["weight"])
        rows = margin_softmax_ce(x, w, inputs["labels"], class_index=inputs["class_index"], reduction="none",
                                 margin_grad=margin_grad, **_ARCFACE)
        return _checks.loss_and_gradients(rows, inputs["grad_rows"], embeddings=x, weight=w)
    return compute


def _case_three_ranks(inputs: dict) -> dict:
    """Three uneven class shards on three simulated ranks; the ranks' embedding shares summed."""
    x, w, labels = inputs["embeddings"], inputs["weight"], inputs["labels"]
    bounds = _checks.class_bounds(w.shape[0], 3)

    def rank(index: int, all_reduce) -> dict:
        start, end = bounds[index]
        embeddings, shard = _checks.leaf(x), _checks.leaf(w[start:end])
        rows = margin_softmax_ce_sharded(embeddings, shard, labels, class_offset=start, num_classes=w.shape[0],
                                         all_reduce=all_reduce, reduction="none", **_ARCFACE)
        return _checks.loss_and_gradients(rows, inputs["grad_rows"], embeddings=embeddings, weight=shard)

    outputs = _checks.run_ranks(len(bounds), rank)
    return {"loss": outputs[0]["loss"], "grad_embeddings": sum(output["grad_embeddings"] for output in outputs),
            "grad_weight": torch.cat([output["grad_weight"] for output in outputs])}


_checks.register(*(
    _checks.KernelCase(name, make_inputs, compute, TOLERANCES, _REALISTIC, _TINY)
    for name, make_inputs, compute in (
        ("margin_ce/exact", _case_inputs, _case_loss("exact")),
        ("margin_ce/straight_through", _case_inputs, _case_loss("straight_through")),
        ("margin_ce/class_index", lambda *a: _case_inputs(*a, sampled=True), _case_loss("exact")),
        ("margin_ce/three_ranks", _case_inputs, _case_three_ranks),
    )
))
