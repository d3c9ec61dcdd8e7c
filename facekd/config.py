"""Typed job specs, loaded from the YAML files in ``jobs/``: the only thing a user edits.

Every section is a keyword-only dataclass; each field carries its meaning in the docstring below
it. Loading is strict: an unknown key, a missing required key or a value of the wrong type is a
:class:`ConfigError` naming the file and the dotted key.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from facekd.errors import ConfigError  # noqa: F401  (re-exported: callers import it from here)


@dataclass(kw_only=True)
class DataConfig:
    manifest: str
    """Path of the ``manifest.json`` that ``facekd data convert`` wrote beside the shards."""
    base_url: str | None = None
    """Read the shards from here instead of the manifest's folder (``http://…``, ``pipe:…``)."""
    image_size: int = 112
    """Side of the square input images; stored images of another size are resized."""
    shuffle_buffer: int = 2000
    """Samples held in each worker's shuffle buffer."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 decodes in the training process)."""
    resampled: bool = True
    """Draw shards with replacement each epoch (an infinite stream with a fixed epoch length)."""
    unlabeled_manifest: str | None = None
    """Shards read WITHOUT labels for the distillation terms on unlabeled data and the mixup of
    ``distill.unlabeled`` (SRRL thesis Sec. 4.2.2); any shards ``facekd data convert`` wrote will do."""

    def __post_init__(self) -> None:
        _check(self.image_size >= 16, "image_size", f"must be at least 16, got {self.image_size}")
        _check(self.shuffle_buffer >= 0, "shuffle_buffer", f"must be >= 0, got {self.shuffle_buffer}")
        _check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")


@dataclass(kw_only=True)
class FANFaceConfig:
    """FAN-Face (thesis ch. 3): a frozen face alignment network (FAN) whose heatmaps and features are integrated into
    an IResNet recognition network (see :mod:`facekd.models.fanface`). Defaults are the thesis' best variant,
    FAN-Face(H2, 1-1, BL, h2l-2) (Sec. 3.5, Table 3.1)."""

    weights: str
    """The FAN: a run folder or checkpoint of facekd's landmark trainer, or face-alignment's released FAN state dict
    (2DFAN4 ``.pth`` / ``.pth.tar``), read with :func:`facekd.models.fan.load_fan` when the network is first built.
    Nothing is downloaded. Checkpoints of a FAN-Face network hold the FAN's weights, so evaluating one or
    distilling from it never reads this file again."""
    input_size: int = 256
    """Side of the FAN's input: the FRN's faces up-sampled to it (thesis Sec. 3.4: 112 → 256); a multiple of
    4·2^depth of the FAN (64 for the released one)."""
    heatmaps: Literal["none", "h2", "h2plus"] = "h2"
    """``h2``: the second hourglass' heatmaps stacked with the image (Sec. 3.2.2); ``h2plus``: also before each of the
    FRN's four resolution drops (AS1); ``none``: no heatmaps."""
    features: Literal["none", "1-1", "1-many"] = "1-1"
    """Feature integration (Sec. 3.2.3): one integration layer at the end of each integrated stage (``1-1``), one
    after every residual unit of it with a learnable γ_k each (``1-many``), or ``none``."""
    source: Literal["h2l-1", "h2l-2", "l2h-1", "l2h-2"] = "h2l-2"
    """Where the integrated features come from: the high-to-low (``h2l``) or low-to-high (``l2h``) path of hourglass
    1 or 2 (AS2: h2l-2 is best)."""
    layer: Literal["bl", "sl", "al"] = "bl"
    """Integration layer (Sec. 3.2.4): basic (``bl``), simple (``sl``: added after AdaIN) or advanced (``al``: a
    1×1-3×3-1×1 bottleneck instead of BL's second 1×1 conv)."""
    heatmap_points: Literal["all", "inner"] = "all"
    """Which heatmaps are stacked: ``all`` the FAN's, or ``inner``, the 51 inner points (17-67) of a 68-point FAN, as
    the thesis does (Sec. 3.2.1: the jaw points "are noisy due to tight cropping")."""
    stages: list[int] = field(default_factory=lambda: [0, 1, 2])
    """FRN stages (0-3) whose outputs receive FAN features: the thesis' "end of each stage before down-sampling",
    stages 0-2 (Table 3.2's parameter counts fit only this; stage 3 adds 0.66M parameters for BL)."""

    def __post_init__(self) -> None:
        _check(self.input_size >= 64, "input_size", f"must be at least 64 (a multiple of the FAN's 4·2^depth), "
                                                    f"got {self.input_size}")
        _check(self.heatmaps != "none" or self.features != "none", "features",
               "and heatmaps are both 'none': nothing of the FAN would reach the recognition network (drop model.fan "
               "for a plain one)")
        _check(bool(self.stages) and len(set(self.stages)) == len(self.stages) and all(0 <= s <= 3 for s in self.stages),
               "stages", f"must be distinct stages in 0-3, got {self.stages}")


@dataclass(kw_only=True)
class ModelConfig:
    backbone: str
    """``iresnet18``, ``iresnet34``, ``iresnet50``, ``iresnet100``, ``iresnet200``, ``mobilefacenet`` (Chen et al.)
    or ``mobilefacenet_arcface_torch`` (insightface arcface_torch's ``mbf``, what ``facekd import insightface`` builds);
    ``dc_iresnet18`` or ``dgconv_iresnet18``: CondFace's routed IResNet-18s (thesis Sec. 5.4, DC and AS4)."""
    width: float = 1.0
    """Channel multiplier (Wang & Lan 2017's ResNet/2, /4, /8 students are 0.5, 0.25, 0.125)."""
    embedding_dim: int = 512
    """Size of the face embedding."""
    dropout: float = 0.0
    """Dropout before the embedding layer (insightface uses 0 for MS1M)."""
    normalize: Literal["mxnet", "arcface_torch"] = "mxnet"
    """How this network's uint8 RGB pixels x become its input, in training, as a teacher, in evaluation and in an
    export: ``mxnet`` (x − 127.5)/128, as the MXNet-era insightface models and every facekd-trained network;
    ``arcface_torch`` (x − 127.5)/127.5 = (x/255 − 0.5)/0.5, as insightface arcface_torch trains (its model-zoo
    backbones, which ``facekd import insightface`` sets to this). Stored with every checkpoint; a teacher is fed
    by its own setting."""
    init_from: str | None = None
    """Checkpoint or run folder whose backbone (and head, same classes) starts a fresh run: Wang & Lan's
    student initialisation (train S0 on labels, then distil into it)."""
    fan: FANFaceConfig | None = None
    """FAN-Face: a frozen FAN integrated into this IResNet (``iresnet18`` … ``iresnet200``); None: a plain backbone."""

    def __post_init__(self) -> None:
        from facekd.models import BACKBONES, FANFACE_BACKBONES

        _check(self.backbone in BACKBONES, "backbone", f"must be one of {BACKBONES}, got {self.backbone!r}")
        _check(self.fan is None or self.backbone in FANFACE_BACKBONES, "fan",
               f"integrates a FAN into an IResNet ({', '.join(FANFACE_BACKBONES)}), not into {self.backbone}")
        _check(0 < self.width <= 4, "width", f"must be in (0, 4], got {self.width}")
        _check(self.embedding_dim > 0, "embedding_dim", f"must be positive, got {self.embedding_dim}")
        _check(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass(kw_only=True)
class HeadConfig:
    """Combined margin ``s·(cos(m1·θ + m2) − m3)`` on the target class, ``s·cos θ`` elsewhere."""

    s: float = 64.0
    """Scale of the normalised logits (ArcFace, Deng et al. 2019)."""
    m1: float = 1.0
    """Multiplicative angular margin (SphereFace); 1 disables it."""
    m2: float = 0.5
    """Additive angular margin (ArcFace); 0 disables it."""
    m3: float = 0.0
    """Additive cosine margin (CosFace); 0 disables it."""
    margin_grad: Literal["exact", "straight_through"] = "exact"
    """``straight_through`` reproduces insightface's backward (margin applied under no_grad)."""
    sample_rate: float = 1.0
    """Partial FC (insightface v2): the fraction of each rank's classes the margin loss uses per step, every
    class of the global batch included; 1 uses all. Distillation terms always see all classes."""

    def __post_init__(self) -> None:
        _check(self.s > 0, "s", f"must be positive, got {self.s}")
        _check(0 < self.sample_rate <= 1, "sample_rate", f"must be in (0, 1], got {self.sample_rate}")
        _check(self.m1 >= 1, "m1", f"must be >= 1, got {self.m1}")
        _check(0 <= self.m2 < math.pi / 2, "m2", f"must be in [0, π/2) radians, got {self.m2}")
        _check(0 <= self.m3 < 1, "m3", f"must be in [0, 1), got {self.m3}")


DISTILL_METHODS = ("kd", "gkd", "dkd", "fitnet", "rkd", "shrinkteanet", "srrl", "hidden_l2", "triplet")
"""Distillation terms a job can combine (see :mod:`facekd.distill.distiller`)."""
TEACHERLESS_METHODS = ("triplet",)
"""Methods that learn from the labels alone, so need no teacher (Wang & Lan's triplet loss)."""


@dataclass(kw_only=True)
class KDConfig:
    """Hinton KD: KL(softmax(z_T/T) ‖ softmax(z_S/T))·T² on each network's s·cos θ."""

    temperature: float = 4.0
    """Softmax temperature T (the GKD and DKD authors' code use 4)."""

    def __post_init__(self) -> None:
        _check(self.temperature > 0, "temperature", f"must be positive, got {self.temperature}")


@dataclass(kw_only=True)
class GKDConfig:
    """Grouped KD (Zhao et al., AAAI 2023). Defaults are the paper's; see ``jobs/*gkd_official*`` for the code's."""

    tau: float = 0.93
    """Cumulative probability that closes the primary group (GKD Table 2)."""
    temperature: float = 1.0
    """Softmax temperature T; GKD Eq. 1 has none, the authors' code uses 4. The loss is scaled by T²."""
    w_primary: float = 8.0
    """λ1, weight of Primary-KD (GKD "Implementation Details"; the code's adaptive variant uses 4)."""
    w_binary: float = 1.0
    """λ2, weight of Binary-KD (GKD "Implementation Details")."""
    w_secondary: float = 0.0
    """Weight of Secondary-KD, dropped by the paper (GKD Eq. 11)."""
    selection: Literal["sample", "batch", "fixed"] = "sample"
    """``sample``: k per sample (the paper, Eq. 3); ``batch``: one k per batch (``gkd_adaptive.py``);
    ``fixed``: k classes for every sample (``distillation/gkd.py``)."""
    k: int | None = None
    """Group size for ``selection: fixed`` (the authors' code uses 10,000)."""
    force_target: bool = False
    """Put the ground-truth class into the primary group (the authors' code)."""
    margined_logits: bool = False
    """Compare the heads' MARGINED logits, as the authors' code does, instead of s·cos θ (the paper)."""

    def __post_init__(self) -> None:
        _check(0 < self.tau <= 1, "tau", f"must be in (0, 1], got {self.tau}")
        _check(self.temperature > 0, "temperature", f"must be positive, got {self.temperature}")
        _check((self.k is not None) == (self.selection == "fixed"), "k",
               f"is required with selection 'fixed' and only then, got k={self.k} with selection {self.selection!r}")
        _check(self.k is None or self.k >= 1, "k", f"must be >= 1, got {self.k}")
        _check_weights(self, "w_primary", "w_binary", "w_secondary")


@dataclass(kw_only=True)
class DKDConfig:
    """Decoupled KD (Zhao et al., CVPR 2022); defaults of the authors' mdistiller."""

    alpha: float = 1.0
    """Weight of target-class KD (TCKD)."""
    beta: float = 8.0
    """Weight of non-target-class KD (NCKD)."""
    temperature: float = 4.0
    """Softmax temperature T."""

    def __post_init__(self) -> None:
        _check(self.temperature > 0, "temperature", f"must be positive, got {self.temperature}")
        _check_weights(self, "alpha", "beta")


@dataclass(kw_only=True)
class FeatureConfig:
    """Where FitNet takes its hint."""

    stage: int = 3
    """Backbone stage (0-3) whose output the student matches through an adapter (FitNet: the middle; faces: last)."""

    def __post_init__(self) -> None:
        _check(0 <= self.stage <= 3, "stage", f"must be in [0, 3], got {self.stage}")


@dataclass(kw_only=True)
class RKDConfig:
    """Relational KD (Park et al., CVPR 2019) on the embeddings."""

    w_distance: float = 25.0
    """Weight of the distance-wise term (RKD paper; mdistiller)."""
    w_angle: float = 50.0
    """Weight of the angle-wise term (RKD paper; mdistiller)."""

    def __post_init__(self) -> None:
        _check_weights(self, "w_distance", "w_angle")


@dataclass(kw_only=True)
class SRRLConfig:
    """SRRL (thesis ch. 4): feature matching + softmax regression through the teacher's classifier."""

    alpha: float = 1.0
    """Weight of L_FM (official code KD_SRRL: 1)."""
    beta: float = 1.0
    """Weight of L_SR (official code KD_SRRL: 1)."""

    def __post_init__(self) -> None:
        _check_weights(self, "alpha", "beta")


@dataclass(kw_only=True)
class TripletConfig:
    """Wang & Lan's verification transfer: triplet loss with online negative mining (FaceNet)."""

    margin: float = 0.2
    """Triplet margin α on ℓ2-normalised embeddings (FaceNet Sec. 3.3; Wang & Lan give none)."""
    mining: Literal["semihard", "hardest"] = "semihard"
    """Negative of each anchor-positive pair: FaceNet's semi-hard, or the hardest in the batch."""

    def __post_init__(self) -> None:
        _check(self.margin >= 0, "margin", f"must be >= 0, got {self.margin}")


@dataclass(kw_only=True)
class UnlabeledConfig:
    """Distillation on unlabeled data (thesis Sec. 4.2.2, Eq. 4.9-4.12); active with ``data.unlabeled_manifest``.

    Each step also draws a batch of unlabeled images: the label-free distillation terms run on it with
    weight λ (Eq. 4.9), and labeled and unlabeled images are mixed, the student imitating the mixed
    teacher logits (Eq. 4.11-4.12).
    """

    weight: float = 1.0
    """λ of Eq. 4.9: weight of the distillation terms on the unlabeled batch."""
    mixup_weight: float = 1.0
    """Weight of L_mixup (Eq. 4.12); 0 disables the mixup."""
    mixup_alpha: float = 1.0
    """λ ~ Beta(α, α), then λ' = max(λ, 1 − λ) (Eq. 4.11); the thesis gives no α, mixup's CIFAR code uses 1."""
    mixup_temperature: float = 4.0
    """τ of Eq. 4.12 (the thesis's KD baseline uses T = 4, Sec. 4.4)."""

    def __post_init__(self) -> None:
        _check(self.weight >= 0, "weight", f"must be >= 0, got {self.weight}")
        _check(self.mixup_weight >= 0, "mixup_weight", f"must be >= 0, got {self.mixup_weight}")
        _check(self.mixup_alpha > 0, "mixup_alpha", f"must be positive, got {self.mixup_alpha}")
        _check(self.mixup_temperature > 0, "mixup_temperature", f"must be positive, got {self.mixup_temperature}")


@dataclass(kw_only=True)
class DistillConfig:
    methods: dict[str, float] = field(default_factory=dict)
    """Distillation terms and their weights, e.g. ``{gkd: 1.0}`` or ``{kd: 1.0, triplet: 0.5}``; empty:
    labels only (the student without distillation). Names: see :data:`DISTILL_METHODS`."""
    teacher: str | None = None
    """Teacher checkpoint or run folder (``facekd train`` output); required when ``methods`` is not empty."""
    warmup_epochs: float = 0.0
    """The distillation weight ramps as min(epoch / warmup_epochs, 1); 0 disables the ramp."""
    warmup_first_epoch: Literal[0, 1] = 0
    """Number of the first epoch in that ramp: 0 as the GKD authors' code counts (the first epoch trains on
    labels alone), 1 as mdistiller's DKD counts (its first epoch already has weight 1/warmup_epochs)."""
    kd: KDConfig = field(default_factory=KDConfig)
    gkd: GKDConfig = field(default_factory=GKDConfig)
    dkd: DKDConfig = field(default_factory=DKDConfig)
    fitnet: FeatureConfig = field(default_factory=FeatureConfig)
    rkd: RKDConfig = field(default_factory=RKDConfig)
    srrl: SRRLConfig = field(default_factory=SRRLConfig)
    triplet: TripletConfig = field(default_factory=TripletConfig)
    unlabeled: UnlabeledConfig = field(default_factory=UnlabeledConfig)

    @property
    def teacher_methods(self) -> list[str]:
        """The named methods that learn from the teacher's outputs."""
        return sorted(set(self.methods) - set(TEACHERLESS_METHODS))

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(DISTILL_METHODS))
        _check(not unknown, "methods",
               f"has unknown method {unknown[0] if unknown else ''!r}; known: {DISTILL_METHODS}")
        _check(all(weight >= 0 for weight in self.methods.values()), "methods",
               f"weights must be >= 0, got {self.methods}")
        if self.teacher_methods:
            _check(self.teacher is not None, "teacher", f"is required for {self.teacher_methods}")
        _check(self.warmup_epochs >= 0, "warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")


@dataclass(kw_only=True)
class OptimConfig:
    """SGD with a warm-up then a cosine, piecewise or polynomial decay. Lengths are given in steps or in epochs (an epoch
    is the manifest's samples over the batch of all ranks), never both."""

    lr: float = 0.1
    """Peak learning rate of SGD (insightface: 0.1 for batch 512)."""
    momentum: float = 0.9
    """SGD momentum, in [0, 1)."""
    nesterov: bool = False
    """Nesterov momentum (the GKD authors' train_gkd.py uses it); needs momentum > 0."""
    weight_decay: float = 5e-4
    """L2 weight decay on every parameter (>= 0)."""
    schedule: Literal["cosine", "piecewise", "poly"] = "cosine"
    """Decay after warm-up: cosine to ``min_lr``, ×gamma at each milestone, or insightface arcface_torch's
    polynomial decay lr·(1 − progress)^power from the end of the warm-up to the last step."""
    power: float = 2.0
    """Exponent of the ``poly`` schedule (insightface's PolyScheduler: 2)."""
    warmup_steps: int = 0
    """Linear warm-up over this many steps."""
    warmup_epochs: float = 0.0
    """Linear warm-up over this many epochs (instead of ``warmup_steps``)."""
    warmup_start_lr: float | None = None
    """None: step t < W of the warm-up runs at lr·(t + 1)/W. A value: timm's warm-up, which starts there and
    rises as warmup_start_lr + (lr − warmup_start_lr)·t/W (the GKD authors' code: 2.5e-7)."""
    min_lr: float = 0.0
    """Floor of the cosine: min_lr + (lr − min_lr)·½(1 + cos(π·progress)) (timm's ``lr_min``)."""
    cosine_from: Literal["warmup_end", "start"] = "warmup_end"
    """Where the cosine's progress counts from: the end of the warm-up, or step 0 as timm's CosineLRScheduler
    does by default (``warmup_prefix=False``), so that the warm-up replaces the cosine's first steps."""
    milestones: list[int] = field(default_factory=list)
    """Steps at which the piecewise schedule multiplies the learning rate by gamma."""
    milestone_epochs: list[float] = field(default_factory=list)
    """Epochs at which the piecewise schedule multiplies the learning rate by gamma (instead of ``milestones``)."""
    gamma: float = 0.1
    """Factor of each piecewise decay, in (0, 1]."""
    clip_grad_norm: float = 5.0
    """Clip the global gradient norm to this value (insightface: 5); 0 disables clipping."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        _check(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        _check(not self.nesterov or self.momentum > 0, "nesterov", "needs momentum > 0")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(0 < self.gamma <= 1, "gamma", f"must be in (0, 1], got {self.gamma}")
        _check(self.power > 0, "power", f"must be positive, got {self.power}")
        _check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(self.warmup_epochs >= 0, "warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        _check(not (self.warmup_steps and self.warmup_epochs), "warmup_epochs",
               f"and warmup_steps are alternatives, got both ({self.warmup_epochs}, {self.warmup_steps})")
        _check(self.warmup_start_lr is None or 0 <= self.warmup_start_lr <= self.lr, "warmup_start_lr",
               f"must be in [0, lr={self.lr}], got {self.warmup_start_lr}")
        _check(0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        _check(self.clip_grad_norm >= 0, "clip_grad_norm", f"must be >= 0, got {self.clip_grad_norm}")
        _check(not (self.milestones and self.milestone_epochs), "milestone_epochs",
               "and milestones are alternatives, got both")
        for key, values in (("milestones", self.milestones), ("milestone_epochs", self.milestone_epochs)):
            _check(all(a < b for a, b in zip(values, values[1:])) and all(v > 0 for v in values), key,
                   f"must be positive and increasing, got {values}")
        _check(self.schedule == "piecewise" or not (self.milestones or self.milestone_epochs), "milestones",
               f"are used only by schedule 'piecewise', got schedule {self.schedule!r}")


@dataclass(kw_only=True)
class TrainConfig:
    output_dir: str
    """Folder for checkpoints, TensorBoard events and evaluation results."""
    steps: int | None = None
    """Optimiser steps of the whole run; give this or ``epochs``."""
    epochs: float | None = None
    """Length of the whole run in epochs (the manifest's samples over the batch of all ranks), instead of
    ``steps``."""
    batch_size: int = 128
    """Images per step on each rank (the global batch is this times the number of ranks)."""
    seed: int = 0
    """Seed of the initial weights and of the data order."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` takes the GPU when there is one."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast dtype of the backbones; ``auto`` is bf16 on a GPU that has it, fp32 elsewhere."""
    checkpoint_every: int = 1000
    """Write a checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 2
    """Older checkpoints beyond this many are deleted."""
    log_every: int = 20
    """Steps between progress updates and TensorBoard scalars."""

    def __post_init__(self) -> None:
        given = "neither" if self.steps is None and self.epochs is None else "both"
        _check((self.steps is None) != (self.epochs is None), "steps",
               f"or 'train.epochs' gives the run's length: give exactly one, got {given}")
        _check(self.steps is None or self.steps > 0, "steps", f"must be positive, got {self.steps}")
        _check(self.epochs is None or self.epochs > 0, "epochs", f"must be positive, got {self.epochs}")
        _check(self.batch_size > 0, "batch_size", f"must be positive, got {self.batch_size}")
        _check(self.checkpoint_every > 0, "checkpoint_every", f"must be positive, got {self.checkpoint_every}")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        _check(self.log_every > 0, "log_every", f"must be positive, got {self.log_every}")


@dataclass(kw_only=True)
class EvalConfig:
    bins: list[str] = field(default_factory=list)
    """Verification ``.bin`` files evaluated at the end of training."""
    batch_size: int = 128
    """Images per forward pass during evaluation."""

    def __post_init__(self) -> None:
        _check(self.batch_size > 0, "batch_size", f"must be positive, got {self.batch_size}")


@dataclass(kw_only=True)
class RayConfig:
    """How ``facekd train --ray`` and ``facekd submit`` run the job on a Ray cluster (Ray Train's ``TorchTrainer``);
    command-line flags override these. Ignored by the other launchers."""

    workers: int = 1
    """Training processes (ranks), one per GPU on a GPU cluster."""
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves for each worker (its data-loader processes run on them too)."""
    gpus_per_worker: float = 0.0
    """GPUs Ray reserves for each worker; 0 trains on CPUs (gloo), more than 0 on GPUs (NCCL)."""
    storage_path: str | None = None
    """Where Ray Train keeps the run's checkpoints and reported metrics: a folder every node sees (a shared file
    system) or an object-store URI (``s3://…``, ``gs://…``). None: ``<train.output_dir>/ray``, enough on one
    machine."""
    name: str | None = None
    """Name of the run in the storage path; the same name and storage path resume it. None: the job's name."""
    max_failures: int = 3
    """Restarts of the worker group after a worker dies, each from the last checkpoint; -1: without limit."""
    num_to_keep: int | None = None
    """Checkpoints Ray keeps in the storage path; None: as many as ``train.keep_checkpoints``."""

    def __post_init__(self) -> None:
        _check(self.workers >= 1, "workers", f"must be >= 1, got {self.workers}")
        _check(self.cpus_per_worker > 0, "cpus_per_worker", f"must be positive, got {self.cpus_per_worker}")
        _check(self.gpus_per_worker >= 0, "gpus_per_worker", f"must be >= 0, got {self.gpus_per_worker}")
        _check(self.max_failures >= -1, "max_failures", f"must be >= -1, got {self.max_failures}")
        _check(self.num_to_keep is None or self.num_to_keep >= 1, "num_to_keep",
               f"must be >= 1, got {self.num_to_keep}")


CLUSTER_METHODS = ("none", "sinkhorn", "kmeans")
"""How CondFace's clustering loss finds pseudo-labels for the routing vectors (see :mod:`facekd.clustering`)."""


@dataclass(kw_only=True)
class ClusterConfig:
    """CondFace's clustering loss on the routing vector β of a routed backbone (thesis Sec. 5.2.2-5.2.3):
    L = L_fr + weight·L_cls. Defaults are the thesis' (AS1:P=300 with its MLP) and SwAV's, with their sources."""

    method: Literal["none", "sinkhorn", "kmeans"] = "none"
    """``sinkhorn``: soft codes by Sinkhorn-Knopp on each batch (SwAV; thesis AS1-AS4); ``kmeans``: each image's
    cluster from k-means over the whole training set before every epoch (DeepCluster; thesis AS5); ``none``: no
    clustering loss."""
    prototypes: int = 300
    """P, the number of prototypes (clusters): thesis Sec. 5.4.4, "the cluster (prototype) number is set as 300"."""
    temperature: float = 0.1
    """T of the prediction softmax(scores / T) over the prototypes: SwAV's 0.1 (the thesis' Table 5.2 'T' is the
    routing softmax's, see facekd.clustering)."""
    epsilon: float = 0.05
    """Sinkhorn's entropic regularisation ε: Q = exp(scores / ε) (SwAV)."""
    iterations: int = 3
    """Sinkhorn-Knopp iterations (SwAV)."""
    head: Literal["identity", "linear", "mlp"] = "mlp"
    """Projection head before the prototypes (thesis AS3): ``mlp`` is the thesis' default ("AS1:P=300 is trained
    with MLP by default"); ``identity`` scored best in its Table 5.1."""
    head_dim: int = 128
    """Output width of the ``linear`` and ``mlp`` heads (SwAV's output_dim); ``identity`` keeps β's length."""
    hidden_dim: int = 2048
    """Hidden width of the ``mlp`` head (SwAV's hidden_mlp)."""
    weight: float = 1.0
    """λ of L = L_fr + λ·L_cls: thesis Sec. 5.4.3, "the weight λ is set as 1.0"."""
    kmeans_iterations: int = 20
    """Lloyd iterations of each epoch's k-means (DeepCluster's faiss setting, niter = 20)."""
    kmeans_init: Literal["kmeans++", "random"] = "kmeans++"
    """Seeding of each epoch's k-means (seeded by train.seed + epoch): k-means++ or distinct random points (faiss)."""
    kmeans_batch_size: int = 256
    """Images per forward pass of the feature extraction before each epoch's k-means."""

    def __post_init__(self) -> None:
        _check(self.prototypes >= 2, "prototypes", f"must be >= 2, got {self.prototypes}")
        _check(self.temperature > 0, "temperature", f"must be positive, got {self.temperature}")
        _check(self.epsilon > 0, "epsilon", f"must be positive, got {self.epsilon}")
        _check(self.iterations >= 1, "iterations", f"must be >= 1, got {self.iterations}")
        _check(self.head_dim >= 1, "head_dim", f"must be >= 1, got {self.head_dim}")
        _check(self.hidden_dim >= 1, "hidden_dim", f"must be >= 1, got {self.hidden_dim}")
        _check(self.weight >= 0, "weight", f"must be >= 0, got {self.weight}")
        _check(self.kmeans_iterations >= 1, "kmeans_iterations", f"must be >= 1, got {self.kmeans_iterations}")
        _check(self.kmeans_batch_size >= 1, "kmeans_batch_size", f"must be >= 1, got {self.kmeans_batch_size}")


@dataclass(kw_only=True)
class JobConfig:
    name: str
    """Name of the run, used in logs and result tables."""
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    head: HeadConfig = field(default_factory=HeadConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """DeepSpeed's own configuration (``zero_optimization``, ``bf16``, ``communication_data_type``, ...), passed
    to ``deepspeed.initialize`` unchanged when the job runs on several ranks. Batch size, learning rate,
    optimiser and clipping come from the sections above; the same keys here must agree with them."""

    def __post_init__(self) -> None:
        if self.data.unlabeled_manifest is not None:
            _check(self.distill.teacher is not None and bool(self.distill.teacher_methods), "distill.methods",
                   "must name a distillation method with a teacher when data.unlabeled_manifest is set "
                   "(unlabeled images are learnt from the teacher's outputs)")
        if self.cluster.method != "none":
            from facekd.models import ROUTED_BACKBONES

            _check(self.model.backbone in ROUTED_BACKBONES, "cluster.method",
                   f"clusters routing vectors, which {self.model.backbone} has none of: use a routed backbone "
                   f"({', '.join(ROUTED_BACKBONES)}) or cluster.method: none")


LANDMARK_SECTIONS = ("name", "task", "landmarks", "train", "optim")
"""The sections of a landmark job (``task: landmarks``); the others belong to recognition jobs."""


@dataclass(kw_only=True)
class LandmarksConfig:
    """A FAN trained on landmark heatmaps (``task: landmarks``, see :mod:`facekd.landmarks`). The network is
    face-alignment's FAN (Bulat & Tzimiropoulos 2017, :mod:`facekd.models.fan`); its defaults are the released one's."""

    manifest: str
    """The ``manifest.json`` of a landmark set (``facekd data synth-landmarks`` writes one; its ``val`` split holds
    the unseen faces the NME is measured on)."""
    points: Literal["five", "dense"] = "dense"
    """Which landmarks the FAN regresses: the ``dense`` set (68 iBUG points) or the ``five`` ArcFace points."""
    image_size: int = 256
    """Side of the FAN's input (the released FAN: 256); stored images of another size are resized. A multiple of
    4·2^depth (64 for depth 4)."""
    stacks: int = 2
    """Stacked hourglasses (FAN-Face uses 2, the thesis Sec. 3.2.1; the released 2DFAN4 has 4)."""
    width: int = 256
    """Channels of the hourglasses (the released FAN: 256); a multiple of 8."""
    depth: int = 4
    """Levels of each hourglass (the released FAN: 4)."""
    sigma: float = 1.0
    """Standard deviation of the target Gaussians, in heatmap pixels (face-alignment: 1 at 64 px heatmaps)."""
    loss: Literal["l2", "awing"] = "l2"
    """Heatmap loss of every stack, summed over stacks (intermediate supervision): the mean squared error, as FAN
    trains, or the adaptive wing loss (Wang et al., ICCV 2019)."""
    awing_alpha: float = 2.1
    """α of the adaptive wing loss (Wang et al. 2019, Sec. 4.2)."""
    awing_omega: float = 14.0
    """ω of the adaptive wing loss (Wang et al. 2019)."""
    awing_epsilon: float = 1.0
    """ε of the adaptive wing loss (Wang et al. 2019)."""
    awing_theta: float = 0.5
    """θ, where the adaptive wing loss turns linear (Wang et al. 2019)."""
    awing_loss_map: float = 0.0
    """W of the adaptive wing loss' weighted loss map (Wang et al. 2019, Sec. 4.3: 10): pixels of the 3×3-dilated
    target above 0.2 weigh W + 1, the others 1; 0 leaves every pixel weight 1."""
    optimizer: Literal["rmsprop", "adam", "sgd"] = "rmsprop"
    """RMSprop as FAN trains; ``optim.lr``, ``optim.weight_decay`` and the schedule apply to any of them, and
    ``optim.momentum`` is RMSprop's momentum, Adam's β1 or SGD's momentum."""
    augment: bool = True
    """Random horizontal flips (points mirrored and renumbered), rotations within ±15°, scales within ±10% and
    shifts within ±5% of the side, drawn per image from the run's seed and step."""
    num_workers: int = 2
    """DataLoader processes that decode the training images (0 decodes in the training process)."""

    def __post_init__(self) -> None:
        _check(self.stacks >= 1, "stacks", f"must be >= 1, got {self.stacks}")
        _check(self.depth >= 1, "depth", f"must be >= 1, got {self.depth}")
        _check(self.width >= 8 and self.width % 8 == 0, "width", f"must be a positive multiple of 8, got {self.width}")
        multiple = 4 * 2**self.depth
        _check(self.image_size >= multiple and self.image_size % multiple == 0, "image_size",
               f"must be a multiple of 4·2^depth = {multiple}, got {self.image_size}")
        _check(self.sigma > 0, "sigma", f"must be positive, got {self.sigma}")
        _check(self.awing_alpha > 1, "awing_alpha", f"must be > 1 (α − y is the exponent, y in [0, 1]), "
                                                    f"got {self.awing_alpha}")
        for name in ("awing_omega", "awing_epsilon", "awing_theta"):
            _check(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        _check(self.awing_loss_map >= 0, "awing_loss_map", f"must be >= 0, got {self.awing_loss_map}")
        _check(self.awing_loss_map == 0 or self.loss == "awing", "awing_loss_map",
               f"weights the adaptive wing loss: set loss: awing or awing_loss_map: 0 (loss is {self.loss!r})")
        _check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")


@dataclass(kw_only=True)
class LandmarkJobConfig:
    """A job that trains a FAN on landmarks (``task: landmarks``) instead of a recognition network; single process."""

    name: str
    """Name of the run, used in logs and result tables."""
    task: Literal["landmarks"]
    """``landmarks``; a job spec without ``task`` (or with ``task: recognition``) is a recognition job."""
    landmarks: LandmarksConfig
    train: TrainConfig
    optim: OptimConfig = field(default_factory=OptimConfig)


class _FieldError(ValueError):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise _FieldError(key, message)


def _check_weights(section: Any, *names: str) -> None:
    """Loss weights are finite and >= 0."""
    for name in names:
        value = getattr(section, name)
        _check(math.isfinite(value) and value >= 0, name, f"must be a finite weight >= 0, got {value}")


_FLOAT_LITERAL = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _convert(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check ``value`` against the type ``hint``; returns it (ints widen to float)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key, source)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{source}: '{key}' must be one of {list(choices)}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        key_hint, value_hint = typing.get_args(hint)
        return {_convert(k, key_hint, f"{key} key", source): _convert(v, value_hint, f"{key}.{k}", source)
                for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        (item_hint,) = typing.get_args(hint)
        return [_convert(item, item_hint, f"{key}[{i}]", source) for i, item in enumerate(value)]
    if hint is float and isinstance(value, str) and _FLOAT_LITERAL.match(value):
        value = float(value)  # PyYAML reads 5e-4 (no dot in the mantissa) as a string
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{source}: '{key}' must be a finite number, got {value!r}")
        return float(value)
    if hint in (int, str, bool) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{source}: '{key}' must be {getattr(hint, '__name__', hint)}, got {value!r}")


def _build(cls: type, data: Any, source: str, prefix: str = "") -> Any:
    section = prefix.rstrip(".") or "the job spec"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{section}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}' (known keys of {section}: {sorted(fields)})"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, spec in fields.items():
        if name in data:
            values[name] = _convert(data[name], hints[name], f"{prefix}{name}", source)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key '{prefix}{name}'")
    try:
        return cls(**values)
    except _FieldError as error:
        raise ConfigError(f"{source}: '{prefix}{error.key}' {error}") from None


def job_from_dict(data: dict, source: str = "<dict>") -> JobConfig | LandmarkJobConfig:
    """Validate a job spec given as nested dicts; ``source`` names it in errors. ``task: landmarks`` makes it a
    :class:`LandmarkJobConfig`, no ``task`` (or ``task: recognition``) a :class:`JobConfig`."""
    if not isinstance(data, dict):
        return _build(JobConfig, data, source)  # refuses it, naming what came
    task = data.get("task", "recognition")
    if task == "landmarks":
        other = sorted(set(data) - set(LANDMARK_SECTIONS))
        if other:
            raise ConfigError(f"{source}: '{other[0]}' is a section of recognition jobs; a landmark job (task: "
                              f"landmarks) has {', '.join(LANDMARK_SECTIONS)}")
        return _build(LandmarkJobConfig, data, source)
    if task != "recognition":
        raise ConfigError(f"{source}: 'task' must be recognition or landmarks, got {task!r}")
    if "landmarks" in data:
        raise ConfigError(f"{source}: 'landmarks' is the section of a landmark job: add task: landmarks (and drop the "
                          f"recognition sections) or remove it")
    return _build(JobConfig, {key: value for key, value in data.items() if key != "task"}, source)


def apply_overrides(data: dict, overrides: list[str], source: str) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw job spec."""
    for override in overrides:
        dotted, sep, raw = override.partition("=")
        if not sep or not dotted:
            raise ConfigError(f"{source}: override {override!r} is not of the form section.key=value")
        node = data
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: override {override!r}: '{part}' is not a section")
        try:
            node[last] = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            reason = " ".join(str(error).split())
            raise ConfigError(f"{source}: override {override!r}: the value is not valid YAML ({reason})") from None
    return data


def load_job(path: str | Path, overrides: list[str] = ()) -> JobConfig | LandmarkJobConfig:
    """Load and validate the YAML job spec at ``path``, with ``section.key=value`` overrides."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"job spec {path} does not exist") from None
    except yaml.YAMLError as error:
        reason = " ".join(str(error).split())
        raise ConfigError(f"{path}: not valid YAML: {reason}") from None
    except OSError as error:
        raise ConfigError(f"job spec {path} cannot be read: {error.strerror}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: a job spec is a YAML mapping of sections, got {type(data).__name__}")
    return job_from_dict(apply_overrides(data or {}, list(overrides), str(path)), str(path))


def job_to_dict(job: JobConfig) -> dict:
    """Plain nested dicts of ``job`` (stored in checkpoints, written beside results)."""
    return dataclasses.asdict(job)
