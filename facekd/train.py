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

from facekd.config import HeadConfig, JobConfig, ModelConfig, job_from_dict, job_to_dict
from facekd.data.loader import build_train_loader
from facekd.distill.distiller import Distiller, Outputs
from facekd.distill.srrl import mixup_labeled_unlabeled
from facekd.distributed.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from facekd.heads import MarginHead
from facekd.models import StagedBackbone, build_backbone

__all__ = ["Network", "Trainer", "load_network", "lr_factor", "resolve_device", "resolve_precision"]

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
        raise RuntimeError("train.device is 'cuda' but torch sees no CUDA device")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def resolve_precision(requested: str, device: torch.device) -> torch.dtype:
    """Autocast dtype of the backbones: ``auto`` is bf16 on a GPU that has it, fp32 elsewhere."""
    if requested == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    if requested == "fp16" and device.type != "cuda":
        raise ValueError("train.precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return _DTYPES[requested]


def lr_factor(step: int, job: JobConfig) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up, then cosine or piecewise decay."""
    optim, total = job.optim, job.train.steps
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "cosine":
        progress = (step - optim.warmup_steps) / max(total - optim.warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return optim.gamma ** sum(step >= milestone for milestone in optim.milestones)


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
        raise ValueError(f"{path}: not a facekd training checkpoint (format {state.get('format')!r})")
    job = job_from_dict(state["job"], source=f"job stored in {path}")
    backbone, head = build_network(job.model, job.head, state["num_classes"], job.data.image_size)
    backbone.load_state_dict(state["backbone"])
    head.load_state_dict(state["head"])
    backbone.to(device).eval()
    head.to(device).eval()
    return Network(backbone, head, job)


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
    """Trains the network of one job spec; :meth:`fit` runs it to ``train.steps`` (or resumes it)."""

    def __init__(self, job: JobConfig, *, resume: bool = False, progress: bool = True) -> None:
        self.job = job
        self.resume = resume
        self.progress = progress
        self.output_dir = Path(job.train.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"

    def fit(self, *, stop_after: int | None = None) -> dict[str, Any]:
        """Train; returns a summary (steps, final loss, images/s, checkpoint, verification accuracies).

        ``stop_after`` ends this call after that many steps, as an interruption would (for tests and
        for time-sliced runs); a later ``resume=True`` run continues from the last checkpoint.
        """
        job, train = self.job, self.job.train
        state = self._resume_state()
        if state and state["step"] >= train.steps:
            logger.info("%s already finished: checkpoint at step %d of %d", job.name, state["step"], train.steps)
            return {"name": job.name, "step": state["step"], "steps_run": 0,
                    "checkpoint": str(latest_checkpoint(self.checkpoint_dir))}
        run = self._build(state)
        last_step = train.steps if stop_after is None else min(train.steps, run.step + stop_after)
        summary = self._train(run, last_step)
        # evaluate the finished network on the job's verification sets
        if run.step == train.steps and job.eval.bins:
            from facekd.eval import evaluate_checkpoints

            rows = evaluate_checkpoints([self.checkpoint_dir], job.eval.bins, out_dir=self.output_dir / "eval",
                                        device=train.device, batch_size=job.eval.batch_size, progress=self.progress)
            summary["verification"] = {row["dataset"]: row["accuracy"] for row in rows}
        return summary

    def _build(self, state: dict[str, Any] | None) -> _Run:
        job, train = self.job, self.job.train
        # pick the device and numerics
        device = resolve_device(train.device)
        autocast_dtype = resolve_precision(train.precision, device)
        autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype != torch.float32
                    else nullcontext())
        torch.manual_seed(train.seed)
        step = state["step"] if state else 0

        # build the data streams, positioned at the step (the unlabeled one only for SRRL's extension)
        loader = build_train_loader(
            job.data.manifest, batch_size=train.batch_size, image_size=job.data.image_size,
            num_workers=job.data.num_workers, shuffle_buffer=job.data.shuffle_buffer, seed=train.seed,
            start_batch=step, resampled=job.data.resampled, base_url=job.data.base_url,
            pin_memory=device.type == "cuda",
        )
        unlabeled = None
        if job.data.unlabeled_manifest is not None:
            unlabeled = iter(build_train_loader(
                job.data.unlabeled_manifest, batch_size=train.batch_size, image_size=job.data.image_size,
                num_workers=job.data.num_workers, shuffle_buffer=job.data.shuffle_buffer, seed=train.seed + 1,
                start_batch=step, resampled=True, pin_memory=device.type == "cuda", use_labels=False,
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
        optimizer = torch.optim.SGD(
            parameters, lr=job.optim.lr, momentum=job.optim.momentum, weight_decay=job.optim.weight_decay,
            **({"fused": True} if device.type == "cuda" else {}),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, job))
        scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)

        # restore the checkpoint
        if state:
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
        bar = tqdm(total=train.steps, initial=run.step, desc=job.name, unit="step", disable=not self.progress)
        batches = iter(run.loader)
        try:
            while run.step < last_step:
                batch = next(batches)
                label_loss, distill_loss = self._step(run, batch)
                run.step += 1
                window.add(label_loss, distill_loss, batch.num_corrupt + batch.num_unlabelled)

                # log (the only host synchronisation of the loop) and checkpoint
                if run.step % train.log_every == 0 or run.step == last_step:
                    label_mean, distill_mean, images_per_second = window.read(train.batch_size)
                    final_loss = label_mean + distill_mean
                    if not math.isfinite(final_loss):
                        raise FloatingPointError(f"{job.name}: loss became {final_loss} at step {run.step}")
                    lr = run.scheduler.get_last_lr()[0]
                    for tag, value in (("loss/label", label_mean), ("loss/distill", distill_mean), ("lr", lr),
                                       ("images_per_second", images_per_second)):
                        writer.add_scalar(tag, value, run.step)
                    postfix = {"loss": f"{label_mean:.3f}", "lr": f"{lr:.4f}", "img/s": f"{images_per_second:.0f}"}
                    if run.distiller.methods:
                        postfix["kd"] = f"{distill_mean:.3f}"
                    bar.set_postfix(postfix)
                if run.step % train.checkpoint_every == 0 or run.step == last_step:
                    save_checkpoint(run.state(job), self.checkpoint_dir, run.step, keep=train.keep_checkpoints)
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
            "checkpoint": str(latest_checkpoint(self.checkpoint_dir)),
        }

    def _step(self, run: _Run, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step on ``batch``; returns (label loss, distillation loss), on the device."""
        images = batch.images.to(run.device, non_blocking=True)
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
        """The checkpoint to continue from, or None for a fresh run (refusing to overwrite an old one)."""
        newest = latest_checkpoint(self.checkpoint_dir)
        if newest is None:
            return None
        if not self.resume:
            raise FileExistsError(
                f"{self.checkpoint_dir} already holds checkpoints (newest {newest.name}): pass --resume to continue "
                "that run, or choose another train.output_dir"
            )
        state = load_checkpoint(newest)
        stored = job_from_dict(state["job"], source=str(newest))
        if job_to_dict(stored) | {"train": None} != job_to_dict(self.job) | {"train": None}:
            raise ValueError(
                f"{newest} was written by a different job spec; resume only with the spec that started the run "
                "(only the train section may change, e.g. more steps)"
            )
        return state

    def _unlabeled_loss(self, run: _Run, images: torch.Tensor, teacher_outputs: Outputs, batch: Any) -> torch.Tensor:
        """SRRL thesis Sec. 4.2.2: λ·L_KD(U) (Eq. 4.9) plus the mixup term (Eq. 4.11-4.12) for one step."""
        config = self.job.distill.unlabeled
        unlabeled_images = batch.images.to(run.device, non_blocking=True)
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
            raise ValueError(
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
                raise ValueError(
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
            raise ValueError(f"teacher {config.teacher}: {error}") from None
        return teacher.backbone, distiller.to(device).train()
