"""The training loop: a teacher on labels, or a student on labels plus distillation from a frozen teacher.

One process, one device for now; the parts are built in a fixed order so that the distributed layer
can wrap them (data split by rank, a sharded head, an engine around the backbone) without changing
the step. A run is resumable: a checkpoint holds the backbone, head, optimiser, scheduler and step,
and the data stream is a pure function of the step (see :mod:`facekd.data.loader`), so a resumed run
receives exactly the batches an uninterrupted one would have.
"""
from __future__ import annotations

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


def build_network(model: ModelConfig, head: HeadConfig, num_classes: int, image_size: int) -> tuple[StagedBackbone, MarginHead]:
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


class Trainer:
    """Trains the network of one job spec; :meth:`fit` runs it to ``train.steps`` (or resumes it)."""

    def __init__(self, job: JobConfig, *, resume: bool = False, progress: bool = True) -> None:
        self.job = job
        self.resume = resume
        self.progress = progress
        self.output_dir = Path(job.train.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"

    def fit(self, *, stop_after: int | None = None) -> dict[str, Any]:
        """Train; returns a summary (steps, final loss, images/s, checkpoint).

        ``stop_after`` ends this call after that many steps, as an interruption would (for tests and
        for time-sliced runs); a later ``resume=True`` run continues from the last checkpoint.
        """
        job, train = self.job, self.job.train
        # pick the device and numerics
        device = resolve_device(train.device)
        autocast_dtype = resolve_precision(train.precision, device)
        torch.manual_seed(train.seed)

        # find where we start
        state = self._resume_state()
        step = state["step"] if state else 0
        if step >= train.steps:
            logger.info("%s already finished: checkpoint at step %d of %d", job.name, step, train.steps)
            return {"name": job.name, "step": step, "steps_run": 0, "checkpoint": str(latest_checkpoint(self.checkpoint_dir))}

        # build the data stream, positioned at the step
        loader = build_train_loader(
            job.data.manifest, batch_size=train.batch_size, image_size=job.data.image_size,
            num_workers=job.data.num_workers, shuffle_buffer=job.data.shuffle_buffer, seed=train.seed,
            start_batch=step, resampled=job.data.resampled, base_url=job.data.base_url,
            pin_memory=device.type == "cuda",
        )

        # the unlabeled stream of SRRL's extension, in step with the labeled one
        unlabeled = None
        if job.data.unlabeled_manifest is not None:
            unlabeled = iter(build_train_loader(
                job.data.unlabeled_manifest, batch_size=train.batch_size, image_size=job.data.image_size,
                num_workers=job.data.num_workers, shuffle_buffer=job.data.shuffle_buffer, seed=train.seed + 1,
                start_batch=step, resampled=True, base_url=None, pin_memory=device.type == "cuda", use_labels=False,
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

        # log to TensorBoard and a progress bar
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=step)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "job.json").write_text(json.dumps(job_to_dict(job), indent=2) + "\n")

        def checkpoint(at_step: int) -> Path:
            return save_checkpoint(
                {
                    "format": CHECKPOINT_FORMAT, "job": job_to_dict(job), "num_classes": loader.num_classes,
                    "step": at_step, "backbone": backbone.state_dict(), "head": head.state_dict(),
                    "distiller": distiller.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state(),
                },
                self.checkpoint_dir, at_step, keep=train.keep_checkpoints,
            )

        last_step = train.steps if stop_after is None else min(train.steps, step + stop_after)
        autocast = (
            torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype != torch.float32 else nullcontext()
        )
        # running sums stay on the device; read at logging intervals only
        sums = torch.zeros(3, device=device)  # label loss, distillation loss, skipped samples
        window_steps, window_start = 0, time.perf_counter()
        start_step, run_start = step, time.perf_counter()
        images_per_second = final_loss = float("nan")
        bar = tqdm(total=train.steps, initial=step, desc=job.name, unit="step", disable=not self.progress)
        batches = iter(loader)
        try:
            while step < last_step:
                batch = next(batches)
                images = batch.images.to(device, non_blocking=True)
                labels = batch.labels.to(device, non_blocking=True)

                # forward: student backbone, margin loss (fp32 centres, outside autocast), distillation
                with autocast:
                    student = _forward(backbone, images, distiller.needs_stages)
                label_loss = head(student.embedding, labels)
                with autocast:
                    teacher_outputs = None
                    if distiller.needs_teacher:
                        with torch.no_grad():
                            teacher_outputs = _forward(teacher, images, distiller.needs_stages)
                    distill_loss, _ = distiller(student, teacher_outputs, labels, step)
                    if unlabeled is not None:
                        distill_loss = distill_loss + self._unlabeled_loss(
                            backbone, teacher, distiller, images, teacher_outputs, next(unlabeled), step, device)
                loss = label_loss + distill_loss

                # backward, clip, step
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if job.optim.clip_grad_norm > 0:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(parameters, job.optim.clip_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                window_steps += 1
                sums += torch.stack([label_loss.detach(), distill_loss.detach(),
                                     torch.tensor(float(batch.num_corrupt + batch.num_unlabelled), device=device)])

                if step % train.log_every == 0 or step == last_step:
                    label_mean, distill_mean, skipped = (sums / torch.tensor([window_steps, window_steps, 1],
                                                                             device=device)).tolist()
                    if not math.isfinite(label_mean + distill_mean):
                        raise FloatingPointError(f"{job.name}: loss became {label_mean + distill_mean} at step {step}")
                    elapsed = time.perf_counter() - window_start
                    images_per_second = window_steps * train.batch_size / elapsed
                    lr = scheduler.get_last_lr()[0]
                    for tag, value in (("loss/label", label_mean), ("loss/distill", distill_mean), ("lr", lr),
                                       ("images_per_second", images_per_second)):
                        writer.add_scalar(tag, value, step)
                    if skipped:
                        logger.warning("%s: %d corrupt or unlabelled samples skipped before step %d",
                                       job.name, int(skipped), step)
                    postfix = {"loss": f"{label_mean:.3f}", "lr": f"{lr:.4f}", "img/s": f"{images_per_second:.0f}"}
                    if distiller.methods:
                        postfix["kd"] = f"{distill_mean:.3f}"
                    bar.set_postfix(postfix)
                    sums.zero_()
                    window_steps, window_start = 0, time.perf_counter()
                    final_loss = label_mean + distill_mean
                if step % train.checkpoint_every == 0 or step == last_step:
                    checkpoint(step)
                bar.update(1)
        finally:
            bar.close()
            writer.close()
        run_seconds = time.perf_counter() - run_start
        summary = {
            "name": job.name,
            "step": step,
            "steps_run": step - start_step,
            "loss": final_loss,
            "images_per_second": (step - start_step) * train.batch_size / run_seconds,
            "last_window_images_per_second": images_per_second,
            "seconds": run_seconds,
            "checkpoint": str(latest_checkpoint(self.checkpoint_dir)),
        }
        # evaluate the finished network on the job's verification sets
        if step == train.steps and job.eval.bins:
            from facekd.eval import evaluate_checkpoints

            rows = evaluate_checkpoints([self.checkpoint_dir], job.eval.bins, out_dir=self.output_dir / "eval",
                                        device=train.device, batch_size=job.eval.batch_size, progress=self.progress)
            summary["verification"] = {row["dataset"]: row["accuracy"] for row in rows}
        return summary

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

    def _unlabeled_loss(
        self, backbone: StagedBackbone, teacher: StagedBackbone, distiller: Distiller, images: torch.Tensor,
        teacher_outputs: Outputs, batch: Any, step: int, device: torch.device,
    ) -> torch.Tensor:
        """SRRL thesis Sec. 4.2.2: λ·L_KD(U) (Eq. 4.9) plus the mixup term (Eq. 4.11-4.12) for one step."""
        config = self.job.distill.unlabeled
        unlabeled_images = batch.images.to(device, non_blocking=True)
        student = _forward(backbone, unlabeled_images, distiller.needs_stages)
        with torch.no_grad():
            teacher_unlabeled = _forward(teacher, unlabeled_images, distiller.needs_stages)
        loss, _ = distiller(student, teacher_unlabeled, None, step)
        loss = config.weight * loss
        if config.mixup_weight > 0:
            # λ drawn from (seed, step): a resumed run mixes exactly as an uninterrupted one
            rng = np.random.default_rng([self.job.train.seed, step])
            mixed, lam = mixup_labeled_unlabeled(images, unlabeled_images, config.mixup_alpha, rng)
            mixup = distiller.mixup_loss(backbone(mixed), (teacher_outputs.embedding, teacher_unlabeled.embedding), lam)
            loss = loss + distiller.ramp(step) * config.mixup_weight * mixup
        return loss

    def _initialise(self, backbone: StagedBackbone, head: MarginHead) -> None:
        """Start from ``model.init_from``: its backbone, and its head when it has the same classes."""
        source = load_network(self.job.model.init_from)
        if source.job.model != self.job.model.__class__(**{**vars(self.job.model), "init_from": None}):
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
        if config.teacher is not None and any(name != "triplet" for name in config.methods):
            teacher = load_network(config.teacher, device)
            if teacher.job.data.image_size != self.job.data.image_size:
                raise ValueError(
                    f"teacher {config.teacher} takes {teacher.job.data.image_size}px images, this job "
                    f"{self.job.data.image_size}px"
                )
            for module in (teacher.backbone, teacher.head):
                module.requires_grad_(False)
        try:
            distiller = Distiller(
                config, student=backbone, student_head=head,
                teacher=teacher.backbone if teacher else None, teacher_head=teacher.head if teacher else None,
                batches_per_epoch=batches_per_epoch,
            )
        except ValueError as error:
            raise ValueError(f"teacher {config.teacher}: {error}") from None
        return (teacher.backbone if teacher else None), distiller.to(device).train()
