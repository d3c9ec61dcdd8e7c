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
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

SELECTIONS = ("sample", "batch", "fixed")
REDUCTIONS = ("mean", "sum", "none")
# gkd_adaptive.py of the authors' code tries k = 1, 101, 201, … for the batch-wide k.
BATCH_K_STEP = 100


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
    if student_logits.shape[1] < 1:
        raise ValueError("logits need at least one class, got C = 0")
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


def _reduce(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


# ---------------------------------------------------------------------------------------------
# Plain-torch reference: the test oracle and the CPU path
# ---------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    z = student_logits.detach().to(_compute_dtype(student_logits.dtype))
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
    dtype = _compute_dtype(student_logits.dtype)
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
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    terms = grouped_kd_terms(
        student_logits, teacher_logits, tau=tau, temperature=temperature, selection=selection,
        k=k, force_target=force_target, labels=labels,
    )
    rows = (
        _weight_rows(w_primary, "w_primary", terms.primary) * terms.primary
        + _weight_rows(w_binary, "w_binary", terms.binary) * terms.binary
        + _weight_rows(w_secondary, "w_secondary", terms.secondary) * terms.secondary
    ) * temperature**2  # GKD Eq. 11, with Hinton's T² so gradients keep their scale
    return _reduce(rows.to(student_logits.dtype), reduction)


# ---------------------------------------------------------------------------------------------
# User-facing function
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
    docstring for ``selection``, ``k``, ``force_target`` and ``labels``.
    """
    return reference_grouped_kd_loss(
        student_logits, teacher_logits, tau=tau, temperature=temperature, w_primary=w_primary,
        w_binary=w_binary, w_secondary=w_secondary, reduction=reduction, selection=selection,
        k=k, force_target=force_target, labels=labels,
    )
