"""The training loop: a teacher on labels, or a student on labels plus distillation from a frozen teacher.

One process, one device for now; the parts are built in a fixed order so that the distributed layer
can wrap them (data split by rank, a sharded head, an engine around the backbone) without changing
the step. A run is resumable: a checkpoint holds the backbone, head, optimiser, scheduler and step,
and the data stream is a pure function of the step (see :mod:`facekd.data.loader`), so a resumed run
receives exactly the batches an uninterrupted one would have.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from facekd.config import HeadConfig, JobConfig, ModelConfig, OptimConfig, job_from_dict, job_to_dict
from facekd.data.convert import read_manifest
from facekd.data.loader import build_train_loader, epoch_length, to_float
from facekd.distill.distiller import Distiller, Outputs
from facekd.distill.srrl import mixup_labeled_unlabeled
from facekd.distributed.checkpoint import (
    clean_partial_checkpoints, latest_intact_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint,
)
from facekd.errors import CheckpointError, ConfigError, TrainingError
from facekd.heads import MarginHead
from facekd.models import StagedBackbone, build_backbone

__all__ = ["Network", "Schedule", "Trainer", "load_network", "lr_factor", "resolve_device", "resolve_precision"]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Network:
    """A backbone and its classifier head, with the job that trained them."""

    backbone: StagedBackbone
    head: MarginHead
    job: JobConfig


def resolve_device(requested: str) -> torch.device:
    """``auto``: the GPU when there is one; ``cuda`` without one is an error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but torch sees no CUDA device")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def resolve_precision(requested: str, device: torch.device) -> torch.dtype:
    """Autocast dtype of the backbones: ``auto`` is bf16 on a GPU that has it, fp32 elsewhere."""
    if requested == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    if requested == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return _DTYPES[requested]


def autocast_for(device: torch.device, precision: str) -> tuple[Any, torch.dtype]:
    """The autocast context of the backbones for ``train.precision`` (a null context for fp32), and its dtype."""
    dtype = resolve_precision(precision, device)
    return (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()), dtype


def build_optimizer(optim: OptimConfig, parameters: list[nn.Parameter], device: torch.device) -> torch.optim.SGD:
    """SGD over ``parameters`` with the job's momentum, Nesterov and weight decay (fused on CUDA)."""
    return torch.optim.SGD(
        parameters, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov,
        weight_decay=optim.weight_decay, **({"fused": True} if device.type == "cuda" else {}),
    )


@dataclass(frozen=True)
class Schedule:
    """The run's length, warm-up and milestones in steps: what the job spec gives in steps or in epochs."""

    total_steps: int
    warmup_steps: int
    milestones: tuple[int, ...]

    @classmethod
    def of(cls, job: JobConfig, batches_per_epoch: int) -> Schedule:
        """Resolve the job's lengths with ``batches_per_epoch`` steps per epoch (epochs round to whole steps)."""
        def steps(epochs: float) -> int:
            return round(epochs * batches_per_epoch)

        optim, train = job.optim, job.train
        total = train.steps if train.steps is not None else max(steps(train.epochs), 1)
        warmup = optim.warmup_steps or steps(optim.warmup_epochs)
        milestones = tuple(optim.milestones) or tuple(steps(epoch) for epoch in optim.milestone_epochs)
        return cls(total, warmup, milestones)


def lr_factor(step: int, job: JobConfig, schedule: Schedule) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up, then cosine or piecewise decay."""
    optim, warmup = job.optim, schedule.warmup_steps
    if step < warmup:
        if optim.warmup_start_lr is None:
            return (step + 1) / warmup
        start = optim.warmup_start_lr / optim.lr  # timm: warmup_lr_init + t·(lr − warmup_lr_init)/warmup_t
        return start + (1.0 - start) * step / warmup
    if optim.schedule == "cosine":
        origin = warmup if optim.cosine_from == "warmup_end" else 0
        progress = (step - origin) / max(schedule.total_steps - origin, 1)
        floor = optim.min_lr / optim.lr
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return optim.gamma ** sum(step >= milestone for milestone in schedule.milestones)


def batches_per_epoch(job: JobConfig, world_size: int = 1) -> int:
    """Steps in one epoch of the job's manifest: its samples over the batch of all ranks."""
    manifest, _ = read_manifest(job.data.manifest)
    return epoch_length(manifest["num_samples"], job.train.batch_size, world_size)


def build_network(
    model: ModelConfig, head: HeadConfig, num_classes: int, image_size: int
) -> tuple[StagedBackbone, MarginHead]:
    """A freshly initialised backbone and head."""
    backbone = build_backbone(
        model.backbone, embedding_dim=model.embedding_dim, width=model.width, image_size=image_size,
        dropout=model.dropout,
    )
    return backbone, MarginHead(num_classes, model.embedding_dim, head)


def load_network(path: str | Path, device: torch.device | str = "cpu") -> Network:
    """The backbone and head stored in a ``facekd train`` checkpoint (or a run folder's newest), in eval mode."""
    path = Path(path)
    if path.is_dir() and (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    state = load_checkpoint(path)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a facekd training checkpoint (format {state.get('format')!r})")
    job = job_from_dict(state["job"], source=f"job stored in {path}")
    backbone, head = build_network(job.model, job.head, state["num_classes"], job.data.image_size)
    backbone.load_state_dict(state["backbone"])
    head.load_state_dict(state["head"])
    backbone.to(device).eval()
    head.to(device).eval()
    return Network(backbone, head, job)


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite (one host synchronisation)."""
    return bool(torch.stack([tensor.detach().isfinite().all() for tensor in tensors]).all())


def _forward(backbone: StagedBackbone, images: torch.Tensor, with_stages: bool) -> Outputs:
    """The embedding of ``images``, and the four stage maps when a distillation method reads them."""
    if with_stages:
        embedding, stages = backbone(images, return_stages=True)
        return Outputs(embedding, stages)
    return Outputs(backbone(images), None)


class _LogWindow:
    """Loss sums over a logging window, kept on the device so that the step loop never waits for it."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(2, device=device)  # label loss, distillation loss
        self.steps = 0
        self.start = time.perf_counter()
        self.skipped = 0  # corrupt or unlabelled samples of the whole run (host counts from the loader)

    def add(self, label_loss: torch.Tensor, distill_loss: torch.Tensor, skipped: int) -> None:
        self.sums += torch.stack([label_loss.detach(), distill_loss.detach()])
        self.steps += 1
        self.skipped += skipped

    def all_finite(self) -> bool:
        """Whether every loss added since the last :meth:`read` was finite (a non-finite one poisons the sums)."""
        return bool(self.sums.isfinite().all())

    def read(self, batch_size: int) -> tuple[float, float, float]:
        """(mean label loss, mean distillation loss, images/s) of the window, which then starts again."""
        label_mean, distill_mean = (self.sums / self.steps).tolist()
        images_per_second = self.steps * batch_size / (time.perf_counter() - self.start)
        self.sums.zero_()
        self.steps, self.start = 0, time.perf_counter()
        return label_mean, distill_mean, images_per_second


@dataclass
class _Run:
    """The parts of one training run, built by :meth:`Trainer._build` in a fixed order."""

    device: torch.device
    autocast: Any  # torch.autocast, or a null context for fp32
    step: int
    loader: Any  # ShardLoader of the labeled shards
    unlabeled: Any  # iterator of unlabeled batches, or None
    backbone: StagedBackbone
    head: MarginHead
    teacher: StagedBackbone | None
    distiller: Distiller
    parameters: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler

    def state(self, job: JobConfig) -> dict[str, Any]:
        """What a checkpoint holds: enough to continue exactly where the run is."""
        return {
            "format": CHECKPOINT_FORMAT, "job": job_to_dict(job), "num_classes": self.loader.num_classes,
            "step": self.step, "backbone": self.backbone.state_dict(), "head": self.head.state_dict(),
            "distiller": self.distiller.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }


class Trainer:
    """Trains the network of one job spec; :meth:`fit` runs it to its last step (or resumes it)."""

    def __init__(self, job: JobConfig, *, resume: bool = False, progress: bool = True) -> None:
        self.job = job
        self.resume = resume
        self.progress = progress
        self.output_dir = Path(job.train.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.last_checkpoint: Path | None = None  # the newest checkpoint known to hold a good state

    def fit(self, *, stop_after: int | None = None) -> dict[str, Any]:
        """Train; returns a summary (steps, final loss, images/s, checkpoint, verification accuracies).

        ``stop_after`` ends this call after that many steps, as an interruption would (for tests and
        for time-sliced runs); a later ``resume=True`` run continues from the last checkpoint.
        """
        job, train = self.job, self.job.train
        self.schedule = Schedule.of(job, batches_per_epoch(job))
        total = self.schedule.total_steps
        state = self._resume_state()
        if state and state["step"] >= total:
            logger.info("%s already finished: checkpoint at step %d of %d", job.name, state["step"], total)
            return {"name": job.name, "step": state["step"], "steps_run": 0, "checkpoint": str(self.last_checkpoint)}
        run = self._build(state)
        last_step = total if stop_after is None else min(total, run.step + stop_after)
        summary = self._train(run, last_step)
        # evaluate the finished network on the job's verification sets
        if run.step == total and job.eval.bins:
            from facekd.eval import evaluate_checkpoints

            rows = evaluate_checkpoints([self.checkpoint_dir], job.eval.bins, out_dir=self.output_dir / "eval",
                                        device=train.device, batch_size=job.eval.batch_size, progress=self.progress)
            summary["verification"] = {row["dataset"]: row["accuracy"] for row in rows}
        return summary

    def _build(self, state: dict[str, Any] | None) -> _Run:
        job, train = self.job, self.job.train
        # pick the device and numerics
        device = resolve_device(train.device)
        autocast, autocast_dtype = autocast_for(device, train.precision)
        torch.manual_seed(train.seed)
        step = state["step"] if state else 0

        # build the data streams, positioned at the step (the unlabeled one only for SRRL's extension)
        loader = build_train_loader(
            job.data.manifest, batch_size=train.batch_size, image_size=job.data.image_size,
            num_workers=job.data.num_workers, shuffle_buffer=job.data.shuffle_buffer, seed=train.seed,
            start_batch=step, resampled=job.data.resampled, base_url=job.data.base_url,
            pin_memory=device.type == "cuda", uint8_pixels=True,
        )
        unlabeled = None
        if job.data.unlabeled_manifest is not None:
            unlabeled = iter(build_train_loader(
                job.data.unlabeled_manifest, batch_size=train.batch_size, image_size=job.data.image_size,
                num_workers=job.data.num_workers, shuffle_buffer=job.data.shuffle_buffer, seed=train.seed + 1,
                start_batch=step, resampled=True, pin_memory=device.type == "cuda", use_labels=False,
                uint8_pixels=True,
            ))

        # build the student (or teacher) backbone and head
        backbone, head = build_network(job.model, job.head, loader.num_classes, job.data.image_size)
        if job.model.init_from and not state:
            self._initialise(backbone, head)
        backbone.to(device).train()
        head.to(device).train()

        # build the frozen teacher and the distillation terms with their adapters
        teacher, distiller = self._build_distillation(backbone, head, loader.batches_per_epoch, device)

        # build the optimiser and schedule over every trained parameter
        parameters = [*backbone.parameters(), *head.parameters(), *distiller.parameters()]
        optimizer = build_optimizer(job.optim, parameters, device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, job, self.schedule))
        scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)

        # restore the checkpoint
        if state:
            if state["num_classes"] != loader.num_classes:
                raise CheckpointError(
                    f"{self.last_checkpoint} holds a head of {state['num_classes']} classes, but "
                    f"{job.data.manifest} now has {loader.num_classes}: resume only on the data the run started on"
                )
            backbone.load_state_dict(state["backbone"])
            head.load_state_dict(state["head"])
            distiller.load_state_dict(state["distiller"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["torch_rng"])
            logger.info("%s: resumed from step %d", job.name, step)
        return _Run(device, autocast, step, loader, unlabeled, backbone, head, teacher, distiller, parameters,
                    optimizer, scheduler, scaler)

    def _train(self, run: _Run, last_step: int) -> dict[str, Any]:
        """Steps until ``last_step`` with logging and checkpoints; returns the run's summary."""
        job, train = self.job, self.job.train
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "job.json").write_text(json.dumps(job_to_dict(job), indent=2) + "\n")
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=run.step)
        window = _LogWindow(run.device)
        start_step, run_start = run.step, time.perf_counter()
        images_per_second = final_loss = float("nan")
        bar = tqdm(total=self.schedule.total_steps, initial=run.step, desc=job.name, unit="step",
                   disable=not self.progress)
        batches = iter(run.loader)
        try:
            while run.step < last_step:
                batch = next(batches)
                label_loss, distill_loss = self._step(run, batch)
                run.step += 1
                window.add(label_loss, distill_loss, batch.num_corrupt + batch.num_unlabelled)

                # log (the only host synchronisation of the loop) and checkpoint
                if run.step % train.log_every == 0 or run.step == last_step:
                    steps = f"steps {run.step - window.steps + 1}-{run.step}" if window.steps > 1 else f"step {run.step}"
                    label_mean, distill_mean, images_per_second = window.read(train.batch_size)
                    final_loss = label_mean + distill_mean
                    if not math.isfinite(final_loss):
                        self._diverged(f"the loss became {final_loss} in {steps}")
                    lr = run.scheduler.get_last_lr()[0]
                    for tag, value in (("loss/label", label_mean), ("loss/distill", distill_mean), ("lr", lr),
                                       ("images_per_second", images_per_second)):
                        writer.add_scalar(tag, value, run.step)
                    postfix = {"loss": f"{label_mean:.3f}", "lr": f"{lr:.4f}", "img/s": f"{images_per_second:.0f}"}
                    if run.distiller.methods:
                        postfix["kd"] = f"{distill_mean:.3f}"
                    bar.set_postfix(postfix)
                if run.step % train.checkpoint_every == 0 or run.step == last_step:
                    # never let a diverged state replace (and rotate away) the good checkpoints
                    if not window.all_finite():
                        self._diverged(f"the loss became non-finite before step {run.step}")
                    if not _all_finite([tensor for module in (run.backbone, run.head, run.distiller)
                                        for tensor in module.state_dict().values() if tensor.is_floating_point()]):
                        self._diverged(f"the weights or normalisation statistics became non-finite by step {run.step}")
                    self.last_checkpoint = save_checkpoint(run.state(job), self.checkpoint_dir, run.step,
                                                           keep=train.keep_checkpoints)
                bar.update(1)
        finally:
            bar.close()
            writer.close()
        if window.skipped:
            logger.warning("%s: %d corrupt or unlabelled samples were skipped (their slots refilled)",
                           job.name, window.skipped)
        seconds = time.perf_counter() - run_start
        return {
            "name": job.name,
            "step": run.step,
            "steps_run": run.step - start_step,
            "loss": final_loss,
            "images_per_second": (run.step - start_step) * train.batch_size / seconds,
            "last_window_images_per_second": images_per_second,
            "seconds": seconds,
            "checkpoint": str(self.last_checkpoint),
        }

    def _step(self, run: _Run, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step on ``batch``; returns (label loss, distillation loss), on the device."""
        # batches arrive as uint8 pixels (a quarter of the copy) and are normalised on the device, bit for bit
        # as the loader would have (see facekd.data.loader.to_float)
        images = to_float(batch.images.to(run.device, non_blocking=True))
        labels = batch.labels.to(run.device, non_blocking=True)

        # forward: student backbone, margin loss (fp32 centres, outside autocast), distillation
        with run.autocast:
            student = _forward(run.backbone, images, run.distiller.needs_stages)
        label_loss = run.head(student.embedding, labels)
        with run.autocast:
            teacher_outputs = None
            if run.distiller.needs_teacher:
                with torch.no_grad():
                    teacher_outputs = _forward(run.teacher, images, run.distiller.needs_stages)
            distill_loss, _ = run.distiller(student, teacher_outputs, labels, run.step)
            if run.unlabeled is not None:
                distill_loss = distill_loss + self._unlabeled_loss(run, images, teacher_outputs, next(run.unlabeled))

        # backward, clip, step
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(label_loss + distill_loss).backward()
        if self.job.optim.clip_grad_norm > 0:
            run.scaler.unscale_(run.optimizer)
            nn.utils.clip_grad_norm_(run.parameters, self.job.optim.clip_grad_norm)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.scheduler.step()
        return label_loss.detach(), distill_loss.detach()

    def _resume_state(self) -> dict[str, Any] | None:
        """The checkpoint to continue from, or None for a fresh run (refusing to overwrite an old one).

        Checkpoint folders that a killed writer left half-written are removed first. A damaged newest
        checkpoint is reported and skipped: the run continues from the newest intact one.
        """
        clean_partial_checkpoints(self.checkpoint_dir)
        found = list_checkpoints(self.checkpoint_dir)
        if not found:
            return None
        if not self.resume:
            raise ConfigError(
                f"{self.checkpoint_dir} already holds checkpoints (newest {found[-1][1].name}): pass --resume to "
                "continue that run, or choose another train.output_dir"
            )
        newest = latest_intact_checkpoint(self.checkpoint_dir)
        if newest is None:
            raise CheckpointError(f"every checkpoint in {self.checkpoint_dir} is damaged; the run cannot resume")
        if newest != found[-1][1]:
            logger.warning("%s: resuming from %s, the newest intact checkpoint", self.job.name, newest.name)
        state = load_checkpoint(newest, verify=False)
        stored = job_from_dict(state["job"], source=str(newest))
        if job_to_dict(stored) | {"train": None} != job_to_dict(self.job) | {"train": None}:
            raise ConfigError(
                f"{newest} was written by a different job spec; resume only with the spec that started the run "
                "(only the train section may change, e.g. more steps)"
            )
        self.last_checkpoint = newest
        return state

    def _diverged(self, what: str) -> None:
        """Stop a run whose state is no longer finite, naming the checkpoint it can go back to."""
        last = self.last_checkpoint or "none yet"
        raise TrainingError(
            f"{self.job.name}: {what}; nothing was saved after the last good checkpoint ({last}). "
            "Lower optim.lr or check the data, then resume or restart"
        )

    def _unlabeled_loss(self, run: _Run, images: torch.Tensor, teacher_outputs: Outputs, batch: Any) -> torch.Tensor:
        """SRRL thesis Sec. 4.2.2: λ·L_KD(U) (Eq. 4.9) plus the mixup term (Eq. 4.11-4.12) for one step."""
        config = self.job.distill.unlabeled
        unlabeled_images = to_float(batch.images.to(run.device, non_blocking=True))
        student = _forward(run.backbone, unlabeled_images, run.distiller.needs_stages)
        with torch.no_grad():
            teacher_unlabeled = _forward(run.teacher, unlabeled_images, run.distiller.needs_stages)
        loss, _ = run.distiller(student, teacher_unlabeled, None, run.step)
        loss = config.weight * loss
        if config.mixup_weight > 0:
            # λ drawn from (seed, step): a resumed run mixes exactly as an uninterrupted one
            rng = np.random.default_rng([self.job.train.seed, run.step])
            mixed, lam = mixup_labeled_unlabeled(images, unlabeled_images, config.mixup_alpha, rng)
            mixup = run.distiller.mixup_loss(run.backbone(mixed), (teacher_outputs.embedding,
                                                                    teacher_unlabeled.embedding), lam)
            loss = loss + run.distiller.ramp(run.step) * config.mixup_weight * mixup
        return loss

    def _initialise(self, backbone: StagedBackbone, head: MarginHead) -> None:
        """Start from ``model.init_from``: its backbone, and its head when it has the same classes."""
        source = load_network(self.job.model.init_from)
        # the architecture must match; where each network itself started from does not matter
        if dataclasses.replace(source.job.model, init_from=None) != dataclasses.replace(self.job.model, init_from=None):
            raise ConfigError(
                f"model.init_from {self.job.model.init_from} holds a {source.job.model.backbone} "
                f"(width {source.job.model.width}, {source.job.model.embedding_dim}-d); this job builds a "
                f"{self.job.model.backbone} (width {self.job.model.width}, {self.job.model.embedding_dim}-d)"
            )
        backbone.load_state_dict(source.backbone.state_dict())
        if source.head.num_classes == head.num_classes:
            head.load_state_dict(source.head.state_dict())
        logger.info("%s: initialised from %s", self.job.name, self.job.model.init_from)

    def _build_distillation(
        self, backbone: StagedBackbone, head: MarginHead, batches_per_epoch: int, device: torch.device
    ) -> tuple[StagedBackbone | None, Distiller]:
        """The frozen teacher backbone (None when no method needs one) and the distillation terms."""
        config = self.job.distill
        teacher = None
        if config.teacher is not None and config.teacher_methods:
            teacher = load_network(config.teacher, device)
            if teacher.job.data.image_size != self.job.data.image_size:
                raise ConfigError(
                    f"teacher {config.teacher} takes {teacher.job.data.image_size}px images, this job "
                    f"{self.job.data.image_size}px"
                )
            for module in (teacher.backbone, teacher.head):
                module.requires_grad_(False)
        if teacher is None:
            return None, Distiller(config, student=backbone, student_head=head, teacher=None, teacher_head=None,
                                   batches_per_epoch=batches_per_epoch).to(device).train()
        try:
            distiller = Distiller(config, student=backbone, student_head=head, teacher=teacher.backbone,
                                  teacher_head=teacher.head, batches_per_epoch=batches_per_epoch)
        except ValueError as error:
            raise ConfigError(f"distill.teacher {config.teacher}: {error}") from None
        return teacher.backbone, distiller.to(device).train()
