"""The distillation term of a training step: the weighted sum of the methods a job spec names.

:class:`Distiller` is built once from the job's ``distill`` section, the student (backbone and head)
and the frozen teacher (backbone and head). It owns the trainable adapters some methods need
(FitNet's regressor, ShrinkTeaNet's per-stage adapters, SRRL's connector): the trainer optimises and
checkpoints them with the student. Each step it receives both networks' :class:`Outputs` and returns
the total distillation loss and its terms, each already multiplied by its weight.

| method | compares | paper |
| --- | --- | --- |
| ``kd`` | softened s·cos θ of both heads | Hinton et al. 2015 |
| ``gkd`` | primary group + binary masses of both heads' predictions | Zhao et al., AAAI 2023, Eq. 11 |
| ``dkd`` | target / non-target decoupled KD | Zhao et al., CVPR 2022 |
| ``fitnet`` | a stage's feature map through a 1×1 conv + BN regressor | Romero et al., ICLR 2015 |
| ``rkd`` | distances and angles within the batch of embeddings | Park et al., CVPR 2019 |
| ``shrinkteanet`` | angles of the embedding and of every adapted stage run through the teacher | Duong et al. 2019 |
| ``srrl`` | pooled connected feature + the teacher's classifier on it | Yang, thesis ch. 4 (ICLR 2021) |
| ``hidden_l2`` | squared L2 between the embeddings (top hidden layers) | Wang & Lan 2017, Eq. 6 |
| ``triplet`` | triplet loss with online negative mining on the student alone | Wang & Lan 2017, Eq. 9 |

How the face setting reads the methods written for classifiers: the logits of both networks are
their own margin heads' s·cos θ (margin-free, as the GKD paper states; ``gkd.margined_logits``
follows the authors' code instead). SRRL's "teacher classifier" is the teacher's embedding head
followed by its normalised class centres: the connected student feature goes through the teacher's
head, and L_SR compares s·cos θ logits through the D×D Gram matrix of the centres, so its cost does
not depend on C (DESIGN.md, point 4).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facekd.config import TEACHERLESS_METHODS, DistillConfig
from facekd.distill.dkd import dkd_loss
from facekd.distill.fitnet import FitNetAdapter, fitnet_loss
from facekd.distill.logit import kd_loss
from facekd.distill.relational import rkd_loss
from facekd.distill.shrinkteanet import IntermediateAngularDistiller
from facekd.distill.srrl import SRRLConnector, mixed_soft_targets, srrl_loss, teacher_gram
from facekd.distill.wang_lan import batch_hard_triplet_loss, hidden_l2_loss
from facekd.distributed.collectives import all_gather_labels, all_gather_rows
from facekd.heads import MarginHead, logit_dtype
from facekd.kernels import grouped_kd_loss
from facekd.kernels.backend import full_precision
from facekd.kernels.grouped_kd import grouped_kd_loss_from_embeddings, grouped_kd_loss_sharded
from facekd.models import StagedBackbone

__all__ = ["Distiller", "GlobalBatch", "Outputs", "gather_batch"]

# methods that read stage feature maps, not only embeddings
_STAGE_METHODS = ("fitnet", "shrinkteanet", "srrl")
# methods that compare classifier outputs, and so need both heads over the same identities
_LOGIT_METHODS = ("kd", "gkd", "dkd", "srrl")


class Outputs(NamedTuple):
    """What one network produced for a batch."""

    embedding: Tensor  # [B, D]
    stages: list[Tensor] | None  # the four stage feature maps, when a method needs them


class GlobalBatch(NamedTuple):
    """The embeddings and labels of every rank's batch, gathered (:mod:`facekd.distributed.collectives`)."""

    student: Tensor  # [W·B, D_S], differentiable back to this rank's rows
    teacher: Tensor | None  # [W·B, D_T]
    labels: Tensor | None  # [W·B]


def gather_batch(world, student: Tensor, teacher: Tensor | None, labels: Tensor | None) -> GlobalBatch:
    """The global batch of a sharded step. The student's gradient comes back scaled by the world size: the
    backbone's data-parallel engine averages over the ranks a loss that the classifier computes once."""
    return GlobalBatch(
        all_gather_rows(student, world, grad_scale=world.world_size),
        None if teacher is None else all_gather_rows(teacher.detach(), world),
        None if labels is None else all_gather_labels(labels, world),
    )


class Distiller(nn.Module):
    """All distillation terms of a job (see the module docstring); ``forward`` returns (total, terms)."""

    def __init__(
        self,
        config: DistillConfig,
        *,
        student: StagedBackbone,
        student_head: MarginHead,
        teacher: StagedBackbone | None,
        teacher_head: MarginHead | None,
        batches_per_epoch: int,
    ) -> None:
        super().__init__()
        self.config = config
        self.methods = {name: weight for name, weight in config.methods.items() if weight > 0}
        self.batches_per_epoch = batches_per_epoch
        self.needs_stages = any(name in _STAGE_METHODS for name in self.methods)
        self.needs_teacher = any(name not in TEACHERLESS_METHODS for name in self.methods)
        if self.needs_teacher and (teacher is None or teacher_head is None):
            raise ValueError(f"methods {sorted(self.methods)} need a teacher (distill.teacher)")
        compares_classes = any(name in _LOGIT_METHODS for name in self.methods)
        if compares_classes and student_head.num_classes != teacher_head.num_classes:
            raise ValueError(
                f"student and teacher must classify the same identities, got {student_head.num_classes} and "
                f"{teacher_head.num_classes} classes (train the teacher on the same shards)"
            )
        if "hidden_l2" in self.methods and student.embedding_dim != teacher.embedding_dim:
            raise ValueError(
                f"hidden_l2 compares embeddings directly: student embedding_dim {student.embedding_dim} must equal "
                f"the teacher's {teacher.embedding_dim}"
            )
        # held by reference: the teacher is frozen and not part of this module's parameters or state
        self.__dict__["student_head"] = student_head
        self.__dict__["teacher"] = teacher
        self.__dict__["teacher_head"] = teacher_head

        # the trainable adapters, built in a fixed order
        if "fitnet" in self.methods:
            stage = config.fitnet.stage
            self.fitnet = FitNetAdapter(student.feature_channels[stage], teacher.feature_channels[stage],
                                        teacher_size=teacher.feature_sizes[stage])
        if "shrinkteanet" in self.methods:
            self.shrinkteanet = IntermediateAngularDistiller(student, teacher)
        if "srrl" in self.methods:
            # no ReLU: IResNet and MobileFaceNet stage outputs are not rectified (the official connector
            # follows post-ReLU ResNet features), so a ReLU would keep the connector from matching them
            self.srrl = SRRLConnector(student.feature_channels[-1], teacher.feature_channels[-1], relu=False)
            # W_Tᵀ W_T of the frozen, normalised centres: computed once, D×D (DESIGN.md point 4)
            # (sharded: the sum of the shards' Grams, all-reduced once)
            gram = teacher_gram(teacher_head.weight, normalized=True)
            if teacher_head.sharded:
                teacher_head.world.all_reduce(gram, "sum")
            self.register_buffer("srrl_gram", gram, persistent=False)

    def ramp(self, step: int) -> float:
        """Warm-up factor of every term: min(epoch / warmup_epochs, 1), the first epoch numbered
        ``warmup_first_epoch`` (0: the GKD authors' code, whose first epoch trains on labels alone;
        1: mdistiller's DKD, whose first epoch already has weight 1 / warmup_epochs)."""
        if self.config.warmup_epochs == 0:
            return 1.0
        epoch = math.floor(step / self.batches_per_epoch) + self.config.warmup_first_epoch
        return min(epoch / self.config.warmup_epochs, 1.0)

    def needs_labels(self, name: str) -> bool:
        """Whether method ``name`` reads the labels (so cannot run on an unlabeled batch)."""
        return name in ("dkd", "triplet") or (name == "gkd" and self.config.gkd.force_target)

    @property
    def sharded(self) -> bool:
        """Whether the heads are class shards of a distributed run (the logit terms then read the global batch)."""
        return self.student_head.sharded

    def forward(
        self, student: Outputs, teacher: Outputs | None, labels: Tensor | None, step: int,
        gathered: GlobalBatch | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(ramped total, {method: weighted term}); ``labels`` None (an unlabeled batch) leaves out the
        methods that need labels.

        Sharded, the methods that compare classifier outputs (KD, DKD, GKD) run on the global batch
        ``gathered`` (gathered here when not given) and give the same value on every rank; the per-sample
        methods (FitNet, RKD, ShrinkTeaNet, SRRL, hidden L2, triplet) run on this rank's batch, and the
        data-parallel engine averages them over the ranks. RKD and the triplet mining therefore see the
        rank's batch, not the global one.
        """
        if self.sharded and gathered is None and any(name in ("kd", "dkd", "gkd") for name in self.methods):
            gathered = gather_batch(self.student_head.world, student.embedding,
                                    None if teacher is None else teacher.embedding, labels)
        terms = {name: weight * self._term(name, student, teacher, labels, gathered)
                 for name, weight in self.methods.items()
                 if labels is not None or not self.needs_labels(name)}
        total = self.ramp(step) * sum(terms.values(), torch.zeros((), device=student.embedding.device))
        return total, terms

    def mixup_loss(self, student_embedding: Tensor, teacher_embeddings: tuple[Tensor, Tensor], lam: float) -> Tensor:
        """SRRL thesis Eq. 4.12: τ²·KL of the student on x' = λ' x_l + (1 − λ') x_u against the mixed
        teacher logits y' = λ' z_T(x_l) + (1 − λ') z_T(x_u) (Eq. 4.11), both softened by τ."""
        if self.sharded:
            world = self.student_head.world
            student_embedding = all_gather_rows(student_embedding, world, grad_scale=world.world_size)
            teacher_embeddings = tuple(all_gather_rows(embedding.detach(), world) for embedding in teacher_embeddings)
        labeled, unlabeled = (self.teacher_head.logits(embedding.detach()) for embedding in teacher_embeddings)
        student_logits = self.student_head.logits(student_embedding)
        return self._kd(student_logits, mixed_soft_targets(labeled, unlabeled, lam),
                        temperature=self.config.unlabeled.mixup_temperature)

    def _kd(self, student_logits: Tensor, teacher_logits: Tensor, *, temperature: float) -> Tensor:
        """Hinton KD of the logits [B, C] of both heads (sharded: [B, C_r], as grouped KD with τ = 1, which
        selects every class into the primary group, whose KL is then the whole KL: GKD Eq. 9)."""
        if not self.sharded:
            return kd_loss(student_logits, teacher_logits, temperature=temperature)
        return self._grouped_shards(student_logits, teacher_logits, tau=1.0, temperature=temperature,
                                    w_primary=1.0, w_binary=0.0, w_secondary=0.0)

    def _grouped_shards(self, student_logits: Tensor, teacher_logits: Tensor, **options) -> Tensor:
        """A grouped-KD-family loss of this rank's logit shards [B, C_r], combined across the ranks."""
        head = self.student_head
        return grouped_kd_loss_sharded([student_logits], [teacher_logits.detach()], class_offsets=[head.class_offset],
                                       num_classes=head.num_classes, all_reduce=head.world.reducer, **options)

    def _term(self, name: str, student: Outputs, teacher: Outputs | None, labels: Tensor,
              gathered: GlobalBatch | None) -> Tensor:
        c = self.config
        if name == "triplet":
            return batch_hard_triplet_loss(student.embedding, labels, margin=c.triplet.margin, mining=c.triplet.mining)
        if name in _LOGIT_METHODS:
            if self.sharded and name != "srrl":
                student = Outputs(gathered.student, None)
                teacher = Outputs(gathered.teacher, None)
                labels = gathered.labels
            return self._logit_term(name, student, teacher, labels)
        teacher_embedding = teacher.embedding.detach().to(self.teacher_head.weight.dtype)
        student_embedding = student.embedding.to(self.student_head.weight.dtype)
        if name == "rkd":
            return rkd_loss(student_embedding, teacher_embedding, w_distance=c.rkd.w_distance, w_angle=c.rkd.w_angle)
        if name == "hidden_l2":
            return hidden_l2_loss(student_embedding, teacher_embedding)
        if name == "fitnet":
            stage = c.fitnet.stage
            return fitnet_loss(self.fitnet(student.stages[stage]), teacher.stages[stage].detach())
        if name == "shrinkteanet":
            return self.shrinkteanet(student.stages, teacher_embedding, student_embedding)
        raise ValueError(f"unknown distillation method {name!r}")

    def _logit_term(self, name: str, student: Outputs, teacher: Outputs, labels: Tensor) -> Tensor:
        """A method that reads head logits. Its network part (SRRL's connector and the teacher's head on
        the connected feature) runs under the trainer's autocast; the logits and the loss are computed in
        fp32 at least with autocast off, so a bf16 step only rounds the embeddings."""
        c = self.config
        if name == "srrl":
            connected, through_teacher = self._srrl_features(student.stages[-1])
        student_dtype, teacher_dtype = logit_dtype(self.student_head.weight), logit_dtype(self.teacher_head.weight)
        with full_precision(student.embedding.device):
            student_embedding = student.embedding.to(student_dtype)
            teacher_embedding = teacher.embedding.detach().to(teacher_dtype)
            if name == "gkd":
                return self._gkd(student_embedding, teacher_embedding, labels)
            if name == "srrl":
                return srrl_loss(
                    connected, teacher.stages[-1], through_teacher.to(teacher_dtype), teacher_embedding,
                    self.srrl_gram, self.teacher_head.num_classes, normalized=True,
                    scale=self.teacher_head.config.s, alpha=c.srrl.alpha, beta=c.srrl.beta,
                )
            student_logits = self.student_head.logits(student_embedding)
            teacher_logits = self.teacher_head.logits(teacher_embedding)
            if name == "kd":
                return self._kd(student_logits, teacher_logits, temperature=c.kd.temperature)
            if not self.sharded:
                return dkd_loss(student_logits, teacher_logits, labels, alpha=c.dkd.alpha, beta=c.dkd.beta,
                                temperature=c.dkd.temperature)
            # DKD as grouped KD whose primary group is the target alone: Binary-KD is then TCKD and
            # Secondary-KD is NCKD (DKD Eq. 2-3), each times T² and averaged over the batch (DKD Eq. 7)
            return self._grouped_shards(student_logits, teacher_logits, selection="fixed", k=1, force_target=True,
                                        labels=labels, temperature=c.dkd.temperature, w_primary=0.0,
                                        w_binary=c.dkd.alpha, w_secondary=c.dkd.beta)

    def _srrl_features(self, student_last_stage: Tensor) -> tuple[Tensor, Tensor]:
        """SRRL's connected student feature, and the teacher's head (its embedding layer) applied to it."""
        connected = self.srrl(student_last_stage)
        teacher_size = self.teacher.feature_sizes[-1]
        if connected.shape[-1] != teacher_size:
            connected = F.interpolate(connected, size=(teacher_size, teacher_size), mode="bilinear",
                                      align_corners=False)
        # the teacher's classifier on the student's connected feature: its head, then its centres
        return connected, self.teacher.head(connected)

    def _gkd(self, student_embedding: Tensor, teacher_embedding: Tensor, labels: Tensor) -> Tensor:
        g = self.config.gkd
        options = dict(tau=g.tau, temperature=g.temperature, w_primary=g.w_primary, w_binary=g.w_binary,
                       w_secondary=g.w_secondary, selection=g.selection, k=g.k, force_target=g.force_target,
                       labels=labels if g.force_target else None)
        if g.margined_logits:
            # the authors' code: KD on each head's margined logits (materialises both B×C matrices; B×C_r sharded)
            student_logits = self.student_head.margin_logits(student_embedding, labels)
            teacher_logits = self.teacher_head.margin_logits(teacher_embedding, labels).detach()
            if self.sharded:
                return self._grouped_shards(student_logits, teacher_logits, **options)
            return grouped_kd_loss(student_logits, teacher_logits, **options)
        if self.student_head.config.s != self.teacher_head.config.s:
            raise ValueError(
                f"GKD compares s·cos θ of both networks with one s; the student head has s = "
                f"{self.student_head.config.s}, the teacher's s = {self.teacher_head.config.s}"
            )
        # the fused form: neither B×C logits matrix is stored on the Triton path
        head = self.student_head
        shards = dict(class_offset=head.class_offset, num_classes=head.num_classes,
                      all_reduce=head.world.reducer) if self.sharded else {}
        return grouped_kd_loss_from_embeddings(
            student_embedding, head.weight.to(student_embedding.dtype), teacher_embedding,
            self.teacher_head.weight.detach().to(teacher_embedding.dtype),
            s=head.config.s, **shards, **options,
        )
