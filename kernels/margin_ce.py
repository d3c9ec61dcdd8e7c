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

Sharded classes. :func:`margin_ce_shard_stats` returns per-row partial statistics for one shard of
the classes, :func:`combine_shard_stats` shows how shards combine (max, then rescaled sums: what the
distributed layer does with all-reduces), and :func:`margin_ce_shard_loss` finishes the loss from
the combined statistics and gives this shard's gradients. No logits ever leave a shard.

Numerics: accumulation and the returned loss are float32 (float64 for float64 inputs on the torch
path); the log-sum-exp keeps a running row maximum, so small ``s`` loses nothing to underflow.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

REDUCTIONS = ("mean", "sum", "none")
MARGIN_GRADS = ("exact", "straight_through")
# The exact margin derivative m1·sin(m1·θ + m2)/sin θ is evaluated at θ clamped to
# [THETA_FLOOR, π − THETA_FLOOR]: finite at cos = ±1, unchanged for every other fp32 cosine.
THETA_FLOOR = 1e-4
# F.normalize's floor on the norm: a zero row normalises to zero instead of NaN.
NORM_EPS = 1e-12
# The reference works on [B, chunk] logit blocks of at most this many elements.
REFERENCE_CHUNK_ELEMENTS = 1 << 22
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ShardStats(NamedTuple):
    """Per-row statistics of the logits of one class shard (or of all shards combined)."""

    row_max: torch.Tensor  # [B] float32, max_j z_ij over the shard's classes
    sum_exp: torch.Tensor  # [B] float32, Σ_j exp(z_ij − row_max)
    target_logit: torch.Tensor  # [B] float32, z_iy where the shard holds y_i, else 0


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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    """(target_logit, slope, row_max, sum_exp) of the reference; never holds more than one chunk."""
    dtype = _compute_dtype(embeddings.dtype)
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
    return target_logit, slope, row_max, sum_exp


def _reference_backward(embeddings, weight, labels, class_index, margin, lse, target_logit, slope, grad_rows,
                        need_weight_grad):
    """(grad_embeddings, grad_weight) of Σ_i grad_rows_i·loss_i, recomputing logits chunk by chunk."""
    dtype = _compute_dtype(embeddings.dtype)
    x = embeddings.to(dtype)
    inv_x = _inv_norm(x)
    x_norm = x * inv_x[:, None]
    grad_rows = grad_rows.to(dtype)
    n_classes = weight.shape[0] if class_index is None else class_index.shape[0]
    grad_x_norm = torch.zeros_like(x_norm)
    grad_weight = torch.zeros_like(weight) if need_weight_grad else None
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
        grad_cos = torch.where(is_target, (grad_cos - margin.s * grad_rows[:, None]) * slope[:, None], grad_cos)
        grad_x_norm += grad_cos @ w_norm
        if need_weight_grad:
            grad_w_norm = grad_cos.T @ x_norm
            grad_w = inv_w[:, None] * (grad_w_norm - w_norm * (w_norm * grad_w_norm).sum(1, keepdim=True))
            grad_weight[rows] = grad_w.to(weight.dtype)
    grad_x = inv_x[:, None] * (grad_x_norm - x_norm * (x_norm * grad_x_norm).sum(1, keepdim=True))
    return grad_x.to(embeddings.dtype), grad_weight


class _MarginSoftmaxCEFunction(torch.autograd.Function):
    """Per-row loss lse_i − z_iy; the logits are recomputed chunk by chunk (or tile by tile) in backward.

    With ``combined`` given (sharded classes), lse and the target logit come from all shards and the
    gradients are this shard's: exact for ``weight``, this shard's share of the sum for embeddings.
    """

    @staticmethod
    def forward(ctx, embeddings, weight, labels, class_index, combined, margin):
        target_logit, slope, row_max, sum_exp = _reference_forward(embeddings, weight, labels, class_index, margin)
        if combined is None:
            lse, total_target = row_max + torch.log(sum_exp), target_logit
        else:
            lse = combined.row_max + torch.log(combined.sum_exp)
            total_target = combined.target_logit
        ctx.margin = margin
        ctx.save_for_backward(embeddings, weight, labels, class_index, lse, target_logit, slope)
        return lse - total_target

    @staticmethod
    def backward(ctx, grad_rows):
        embeddings, weight, labels, class_index, lse, target_logit, slope = ctx.saved_tensors
        grad_x, grad_w = _reference_backward(
            embeddings, weight, labels, class_index, ctx.margin, lse, target_logit, slope, grad_rows,
            need_weight_grad=ctx.needs_input_grad[1],
        )
        return (grad_x if ctx.needs_input_grad[0] else None), grad_w, None, None, None, None


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
    batch, dim = embeddings.shape
    if batch < 1 or dim < 1 or weight.shape[0] < 1:
        raise ValueError(
            f"need at least one row, one feature and one class, got embeddings {tuple(embeddings.shape)} "
            f"and weight {tuple(weight.shape)}"
        )
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
    low = -1 if allow_unowned else 0
    where = "positions in class_index" if class_index is not None else "classes of weight"
    if class_index is not None:
        sorted_index = class_index.sort().values
        index_min, index_max = sorted_index[0].item(), sorted_index[-1].item()
        if index_min < 0 or index_max >= weight.shape[0]:
            raise ValueError(
                f"class_index must be in [0, {weight.shape[0]}), got min {index_min}, max {index_max}"
            )
        repeats = (sorted_index[1:] == sorted_index[:-1]).nonzero()
        if repeats.numel():
            raise ValueError(f"class_index must not repeat a class, got {sorted_index[repeats[0, 0]].item()} twice")
    label_min, label_max = labels.min().item(), labels.max().item()
    if label_min < low or label_max >= n_classes:
        raise ValueError(
            f"labels must be in [{low}, {n_classes}) ({where}), got min {label_min}, max {label_max}"
        )


def _reduce(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


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
    values (one host synchronisation). Returns float32 (float64 for float64 inputs).
    """
    margin = _Margin.build(s, m1, m2, m3, margin_grad)
    _check_reduction(reduction)
    _check_inputs(embeddings, weight, labels, class_index, allow_unowned=False, check_values=check_values)
    rows = _MarginSoftmaxCEFunction.apply(embeddings, weight, labels, class_index, None, margin)
    return _reduce(rows, reduction)


def cosine_logits(
    embeddings: torch.Tensor, weight: torch.Tensor, *, s: float, class_index: torch.Tensor | None = None
) -> torch.Tensor:
    """Margin-free logits s·cos θ [B, C] (or [B, K] with ``class_index``), differentiable, plain torch."""
    _check_tensor("embeddings", embeddings, 2)
    _check_tensor("weight", weight, 2)
    if weight.shape[1] != embeddings.shape[1]:
        raise ValueError(f"weight must be [C, {embeddings.shape[1]}] to match embeddings, got {tuple(weight.shape)}")
    if class_index is not None:
        weight = weight[class_index]
    x_norm = torch.nn.functional.normalize(embeddings, dim=1, eps=NORM_EPS)
    w_norm = torch.nn.functional.normalize(weight, dim=1, eps=NORM_EPS)
    return s * (x_norm @ w_norm.T)


def margin_ce_shard_stats(
    embeddings: torch.Tensor,
    weight_shard: torch.Tensor,
    labels: torch.Tensor,
    *,
    s: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.5,
    m3: float = 0.0,
    class_index: torch.Tensor | None = None,
    check_values: bool = True,
) -> ShardStats:
    """Partial statistics of one class shard (no gradient).

    ``labels`` [B] are shard-local: the target's row in ``weight_shard`` (or position in
    ``class_index``) where this shard holds it, −1 where another shard does. Combine the shards'
    stats as :func:`combine_shard_stats` does (all-reduce MAX of row_max, then SUM of the rescaled
    sum_exp and of target_logit), then call :func:`margin_ce_shard_loss`.
    """
    margin = _Margin.build(s, m1, m2, m3, "exact")
    _check_inputs(embeddings, weight_shard, labels, class_index, allow_unowned=True, check_values=check_values)
    with torch.no_grad():
        target_logit, _, row_max, sum_exp = _reference_forward(embeddings, weight_shard, labels, class_index, margin)
    return ShardStats(row_max, sum_exp, target_logit)


def combine_shard_stats(shards: Sequence[ShardStats]) -> ShardStats:
    """The statistics of all classes from those of disjoint shards (what the all-reduces compute)."""
    if not shards:
        raise ValueError("combine_shard_stats needs at least one shard, got none")
    row_max = torch.stack([shard.row_max for shard in shards]).amax(0)
    sum_exp = sum(shard.sum_exp * torch.exp(shard.row_max - row_max) for shard in shards)
    target_logit = sum(shard.target_logit for shard in shards)
    return ShardStats(row_max, sum_exp, target_logit)


def margin_ce_shard_loss(
    embeddings: torch.Tensor,
    weight_shard: torch.Tensor,
    labels: torch.Tensor,
    combined: ShardStats,
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
    """The full loss from ``combined`` statistics, differentiable with respect to this shard.

    The value equals :func:`margin_softmax_ce` over all classes. Backward gives ``weight_shard``
    its exact gradient and ``embeddings`` this shard's share: summed over shards (the distributed
    layer's all-reduce / reduce-scatter) it is the exact gradient. ``labels`` as in
    :func:`margin_ce_shard_stats`.
    """
    margin = _Margin.build(s, m1, m2, m3, margin_grad)
    _check_reduction(reduction)
    _check_inputs(embeddings, weight_shard, labels, class_index, allow_unowned=True, check_values=check_values)
    batch = embeddings.shape[0]
    for name, stat in zip(ShardStats._fields, combined):
        if not isinstance(stat, torch.Tensor) or stat.shape != (batch,):
            raise ValueError(f"combined.{name} must be a tensor of shape ({batch},), got {getattr(stat, 'shape', stat)}")
    combined = ShardStats(*(stat.detach() for stat in combined))
    rows = _MarginSoftmaxCEFunction.apply(embeddings, weight_shard, labels, class_index, combined, margin)
    return _reduce(rows, reduction)
