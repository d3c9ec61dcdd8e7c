"""The training loop: a teacher on labels, or a student on labels plus distillation from a frozen teacher.

One loop serves one process and many. The parts are built in a fixed order (world → data → networks →
teacher and distillation → optimiser after the engine → checkpoint restore), and the step reads top to
bottom: forward, gather the global batch when the classifier is sharded, margin loss, distillation,
update. Under a launcher (torchrun, DeepSpeed's, Ray Train) every rank reads its part of the shards, holds
its class shard of each classifier, and runs the backbone and adapters in a DeepSpeed engine (see
:mod:`facekd.distributed.engine`); logs, TensorBoard, the progress bar and evaluation come from rank 0.

A run is resumable: a checkpoint holds the networks, the optimiser state, the step and the RNG states, and
the data stream is a pure function of the step (see :mod:`facekd.data.loader`), so a resumed run receives
exactly the batches an uninterrupted one would have. Checkpoint layouts:

* one process: ``step_N/state.pt`` (job, step, backbone, head, adapters, optimiser, RNG);
* several ranks: ``step_N/state.pt`` from rank 0 (job, step, world size, backbone, adapters, where each
  classifier shard is), ``step_N/classifier/rank_RRRRR.pt`` from every rank (its centres, their momentum,
  its RNG state), ``step_N/deepspeed/`` (DeepSpeed's own checkpoint of the engine and its ZeRO state),
  and the index over all of them, written last by rank 0 after a barrier.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from facekd.clustering import ClusterHead, cluster_loss, sinkhorn
from facekd.config import JobConfig, OptimConfig, job_from_dict, job_to_dict
from facekd.data.convert import read_manifest
from facekd.data.loader import build_train_loader, epoch_length, to_float
from facekd.distill.distiller import Distiller, Outputs, gather_batch
from facekd.distill.srrl import mixup_labeled_unlabeled
from facekd.distributed.checkpoint import (
    STATE, clean_partial_checkpoints, latest_intact_checkpoint, list_checkpoints, load_checkpoint, read_file,
    save_file, verify_checkpoint, write_checkpoint,
)
from facekd.distributed.engine import DeepSpeedOptimiser, LocalOptimiser, deepspeed_config
from facekd.distributed.world import World, launched_by_a_launcher
from facekd.errors import CheckpointError, ConfigError, FacekdError, TrainingError
from facekd.heads import MarginHead
from facekd.models import StagedBackbone, routing_temperature, set_routing_temperature
from facekd.network import (
    CHECKPOINT_FORMAT, Network, autocast_for, build_network, head_rows, load_network, resolve_device, resolve_precision,
)

__all__ = ["Reporter", "Schedule", "Trainer", "batches_per_epoch", "build_optimizer", "lr_factor"]

logger = logging.getLogger(__name__)


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
    """Multiplier of the peak learning rate at ``step``: linear warm-up, then cosine, piecewise or poly decay."""
    optim, warmup = job.optim, schedule.warmup_steps
    if step < warmup:
        if optim.warmup_start_lr is None:
            return (step + 1) / warmup
        start = optim.warmup_start_lr / optim.lr  # timm: warmup_lr_init + t·(lr − warmup_lr_init)/warmup_t
        return start + (1.0 - start) * step / warmup
    if optim.schedule == "poly":  # insightface arcface_torch PolyScheduler
        progress = (step - warmup) / max(schedule.total_steps - warmup, 1)
        return max(1.0 - progress, 0.0) ** optim.power
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
        self.sums = torch.zeros(3, device=device)  # label loss, distillation loss, clustering loss (unweighted)
        self.steps = 0
        self.start = time.perf_counter()
        self.skipped = 0  # corrupt or unlabelled samples of the whole run (host counts from the loader)

    def add(self, label_loss: torch.Tensor, distill_loss: torch.Tensor, cluster_loss: torch.Tensor, skipped: int
            ) -> None:
        self.sums += torch.stack([label_loss.detach(), distill_loss.detach(), cluster_loss.detach()])
        self.steps += 1
        self.skipped += skipped

    def all_finite(self, world: World) -> bool:
        """Whether every loss added on every rank since the last :meth:`read` was finite (a non-finite one
        poisons the sums); all ranks get the same answer, so all stop together."""
        return _agree(world, bool(self.sums.isfinite().all()))

    def read(self, batch_size: int, world: World) -> tuple[float, float, float, float]:
        """(mean label loss, mean distillation loss, mean clustering loss, images/s) of the window over all
        ranks; it then starts again. The label loss is the same on every rank; the distillation and clustering
        losses average the ranks' per-sample terms, as the data-parallel engine averages their gradients."""
        sums = self.sums.clone()
        world.all_reduce(sums, "sum")
        label_mean, distill_mean, cluster_mean = (sums / (self.steps * world.world_size)).tolist()
        images_per_second = self.steps * batch_size * world.world_size / (time.perf_counter() - self.start)
        self.sums.zero_()
        self.steps, self.start = 0, time.perf_counter()
        return label_mean, distill_mean, cluster_mean, images_per_second


def _agree(world: World, ok: bool) -> bool:
    """``ok`` on every rank (one tiny all-reduce), so that a decision to stop is taken by all ranks at once."""
    if world.world_size == 1:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=world.device)
    world.all_reduce(flag, "max")
    return flag.item() == 0.0


@dataclass
class _Run:
    """The parts of one training run, built by :meth:`Trainer._build` in a fixed order."""

    world: World
    autocast: Any  # torch.autocast, or a null context for fp32
    step: int
    loader: Any  # ShardLoader of the labeled shards (this rank's part)
    unlabeled: Any  # iterator of unlabeled batches, or None
    backbone: StagedBackbone
    head: MarginHead  # this rank's class shard under a distributed world
    teacher: StagedBackbone | None
    distiller: Distiller
    optimiser: LocalOptimiser | DeepSpeedOptimiser
    lr: float = 0.0  # the learning rate of the last step
    teacher_normalize: str = "mxnet"  # the teacher's own model.normalize (the input it was trained on)
    steps_per_epoch: int = 1  # this rank's batches per epoch: the clock of epoch-based annealing
    cluster: ClusterHead | None = None  # CondFace's projection head and prototypes on the routing vector
    assignments: Any = None  # the k-means pseudo-labels of the current epoch (facekd.deepcluster.EpochAssignments)

    @property
    def device(self) -> torch.device:
        return self.world.device


def _classifier_file(rank: int) -> str:
    return f"classifier/rank_{rank:05d}.pt"


Reporter = Callable[[dict[str, float], "Path | None"], None]
"""Called on every rank, at every logging step and every checkpoint, with the metrics the progress bar shows
(the same on every rank) and the checkpoint just written (None at a step without one): how a scheduler
(Ray Train) hears of the run. Every rank calls it the same number of times."""


class Trainer:
    """Trains the network of one job spec; :meth:`fit` runs it to its last step (or resumes it).

    ``world``: the ranks to train on; by default one process, or the job a launcher describes in the
    environment (``RANK``, ``WORLD_SIZE``, ...). ``resume_from``: a checkpoint folder to continue from
    (e.g. one a scheduler restored) instead of the newest of the run's own. ``reporter``: see
    :data:`Reporter`.
    """

    def __init__(self, job: JobConfig, *, resume: bool = False, progress: bool = True,
                 world: World | None = None, resume_from: Path | None = None, reporter: Reporter | None = None
                 ) -> None:
        self.job = job
        self.resume = resume or resume_from is not None
        self.progress = progress
        self.world = world
        self.resume_from = None if resume_from is None else Path(resume_from)
        self.reporter = reporter
        self.output_dir = Path(job.train.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.last_checkpoint: Path | None = None  # the newest checkpoint known to hold a good state

    def fit(self, *, stop_after: int | None = None) -> dict[str, Any]:
        """Train; returns a summary (steps, final loss, images/s, checkpoint, verification accuracies).

        ``stop_after`` ends this call after that many steps, as an interruption would (for tests and
        for time-sliced runs); a later ``resume=True`` run continues from the last checkpoint.
        """
        job, train = self.job, self.job.train
        # join the ranks (a launcher's environment) or run as one process
        if self.world is None:
            launched = launched_by_a_launcher()
            self.world = World.from_env(train.device) if launched else World.single(resolve_device(train.device))
        world = self.world
        self.schedule = Schedule.of(job, batches_per_epoch(job, world.world_size))
        total = self.schedule.total_steps
        state, folder = self._resume_state()
        if state and state["step"] >= total:
            logger.info("%s already finished: checkpoint at step %d of %d", job.name, state["step"], total)
            return {"name": job.name, "step": state["step"], "steps_run": 0, "checkpoint": str(self.last_checkpoint)}
        run = self._build(state, folder)
        last_step = total if stop_after is None else min(total, run.step + stop_after)
        summary = self._train(run, last_step)
        # evaluate the finished network on the job's verification sets (rank 0)
        if run.step == total and job.eval.bins and world.is_main:
            from facekd.eval import evaluate_checkpoints

            rows = evaluate_checkpoints([self.checkpoint_dir], job.eval.bins, out_dir=self.output_dir / "eval",
                                        device=str(world.device.type), batch_size=job.eval.batch_size,
                                        progress=self.progress)
            summary["verification"] = {row["dataset"]: row["accuracy"] for row in rows}
        return summary

    def _build(self, state: dict[str, Any] | None, folder: Path | None) -> _Run:
        job, train, world = self.job, self.job.train, self.world
        # pick the numerics; every rank draws the same backbone (the classifier shards draw their own rows)
        device = world.device
        autocast, autocast_dtype = autocast_for(device, train.precision)
        torch.manual_seed(train.seed)
        step = state["step"] if state else 0

        # build this rank's data streams, positioned at the step (the unlabeled one only for SRRL's extension)
        loader = build_train_loader(
            job.data.manifest, batch_size=train.batch_size, image_size=job.data.image_size, rank=world.rank,
            world_size=world.world_size, num_workers=job.data.num_workers, shuffle_buffer=job.data.shuffle_buffer,
            seed=train.seed, start_batch=step, resampled=job.data.resampled, base_url=job.data.base_url,
            pin_memory=device.type == "cuda", uint8_pixels=True,
        )
        unlabeled = None
        if job.data.unlabeled_manifest is not None:
            unlabeled = iter(build_train_loader(
                job.data.unlabeled_manifest, batch_size=train.batch_size, image_size=job.data.image_size,
                rank=world.rank, world_size=world.world_size, num_workers=job.data.num_workers,
                shuffle_buffer=job.data.shuffle_buffer, seed=train.seed + 1, start_batch=step, resampled=True,
                pin_memory=device.type == "cuda", use_labels=False, uint8_pixels=True,
            ))

        # build the student (or teacher) backbone and this rank's shard of its head
        backbone, head = build_network(job.model, job.head, loader.num_classes, job.data.image_size,
                                       world=world if world.distributed else None, seed=train.seed)
        if job.model.init_from and not state:
            self._initialise(backbone, head)
        backbone.to(device).train()
        head.to(device).train()

        # build the frozen teacher and the distillation terms with their adapters
        teacher, distiller = self._build_distillation(backbone, head, loader.batches_per_epoch, device)
        teacher_backbone = None if teacher is None else teacher.backbone
        teacher_normalize = job.model.normalize if teacher is None else teacher.job.model.normalize

        # build the clustering loss's projection head and prototypes on the routing vector (CondFace)
        cluster = None
        if job.cluster.method != "none":
            config = job.cluster
            cluster = ClusterHead(backbone.routing_dim, config.prototypes, head=config.head, head_dim=config.head_dim,
                                  hidden_dim=config.hidden_dim).to(device).train()
            if (config.method == "kmeans" and world.distributed
                    and job.deepspeed.get("zero_optimization", {}).get("stage", 0) > 0):
                raise ConfigError("cluster.method kmeans writes each epoch's centroids into the prototypes, which "
                                  "ZeRO's fp32 master partitions would overwrite: set "
                                  "deepspeed.zero_optimization.stage to 0")

        # build the optimisers: the engine over backbone and adapters, the classifier shard beside it
        optim = job.optim
        if world.distributed:
            config = deepspeed_config(job.deepspeed, micro_batch=train.batch_size, world_size=world.world_size,
                                      clip_grad_norm=optim.clip_grad_norm)
            engine_modules = {"backbone": backbone, "distiller": distiller}
            if cluster is not None:
                engine_modules["cluster"] = cluster
            optimiser = DeepSpeedOptimiser(
                nn.ModuleDict(engine_modules), head,
                build_sgd=lambda parameters: build_optimizer(optim, parameters, device), config=config, world=world,
                clip_grad_norm=optim.clip_grad_norm)
        else:
            parameters = [*backbone.parameters(), *head.parameters(), *distiller.parameters(),
                          *(cluster.parameters() if cluster is not None else ())]
            optimiser = LocalOptimiser(build_optimizer(optim, parameters, device), parameters,
                                       clip_grad_norm=optim.clip_grad_norm, fp16=autocast_dtype == torch.float16,
                                       device=device)
        run = _Run(world, autocast, step, loader, unlabeled, backbone, head, teacher_backbone, distiller, optimiser,
                   teacher_normalize=teacher_normalize, steps_per_epoch=loader.batches_per_epoch, cluster=cluster)

        # every rank drew the same initial weights; from here each draws its own random numbers (dropout)
        if world.distributed:
            torch.manual_seed(train.seed + 1_000_003 * (world.rank + 1))

        # restore the checkpoint
        if state:
            self._restore(run, state, folder)
        return run

    def _restore(self, run: _Run, state: dict[str, Any], folder: Path) -> None:
        """Load a checkpoint into ``run``: exactly, when it was written by as many ranks; otherwise the weights
        (the classifier re-sharded) with the optimiser state restarted."""
        world = run.world
        if state["num_classes"] != run.loader.num_classes:
            raise CheckpointError(
                f"{folder} holds a head of {state['num_classes']} classes, but {self.job.data.manifest} now has "
                f"{run.loader.num_classes}: resume only on the data the run started on"
            )
        run.backbone.load_state_dict(state["backbone"])
        run.distiller.load_state_dict(state["distiller"])
        if run.cluster is not None:
            from facekd.deepcluster import EpochAssignments

            run.cluster.load_state_dict(state["cluster"]["head"])
            stored = state["cluster"]["assignments"]
            run.assignments = None if stored is None else EpochAssignments.from_state(stored)
        head = run.head
        head.load_rows(head_rows(folder, state, head.class_offset, head.class_offset + head.num_local))
        written_by = state.get("world_size", 1) if "classifier" in state else None  # None: one process's
        if not world.distributed and written_by is None:
            run.optimiser.load_state_dict(state)
            torch.set_rng_state(state["torch_rng"])
        elif world.distributed and written_by == world.world_size:
            run.optimiser.load(folder, optimizer_states=True)
            mine = read_file(folder / _classifier_file(world.rank))
            run.optimiser.classifier_optimizer.load_state_dict(mine["optimizer"])
            torch.set_rng_state(mine["torch_rng"])
        else:
            logger.warning(
                "%s: the checkpoint was written by %s, this run has %d: weights restored (classifier re-sharded), "
                "optimiser state (momentum, ZeRO partitions) restarted", self.job.name,
                "one process" if written_by is None else f"{written_by} ranks", world.world_size)
        logger.info("%s: resumed from step %d", self.job.name, state["step"])

    def _save(self, run: _Run) -> Path:
        """Write the checkpoint of ``run.step`` (every rank its part, see the module docstring)."""
        job, world = self.job, run.world
        common = {"format": CHECKPOINT_FORMAT, "job": job_to_dict(job), "num_classes": run.loader.num_classes,
                  "step": run.step, "backbone": run.backbone.state_dict(), "distiller": run.distiller.state_dict()}
        if run.cluster is not None:
            common["cluster"] = {"head": run.cluster.state_dict(), "assignments":
                                 None if run.assignments is None else run.assignments.state_dict()}
        if not world.distributed:
            state = {**common, "head": run.head.state_dict(), **run.optimiser.state_dict(),
                     "torch_rng": torch.get_rng_state()}
            return write_checkpoint(self.checkpoint_dir, run.step, lambda partial: save_file(state, partial / STATE),
                                    keep=job.train.keep_checkpoints)
        from facekd.distributed.classifier import shard_range

        def write(partial: Path) -> None:
            if world.is_main:
                shards = []
                for rank in range(world.world_size):
                    start, end = shard_range(run.head.num_classes, world.world_size, rank)
                    shards.append({"file": _classifier_file(rank), "class_offset": start, "rows": end - start})
                save_file({**common, "world_size": world.world_size, "classifier": shards}, partial / STATE)
            (partial / "classifier").mkdir(exist_ok=True)
            save_file({"class_offset": run.head.class_offset, "weight": run.head.weight.detach(),
                        "optimizer": run.optimiser.classifier_optimizer.state_dict(),
                        "torch_rng": torch.get_rng_state()}, partial / _classifier_file(world.rank))
            run.optimiser.save(partial)

        return write_checkpoint(self.checkpoint_dir, run.step, write, world=world, keep=job.train.keep_checkpoints)

    def _train(self, run: _Run, last_step: int) -> dict[str, Any]:
        """Steps until ``last_step`` with logging and checkpoints; returns the run's summary."""
        job, train, world = self.job, self.job.train, run.world
        main = world.is_main
        writer = None
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "job.json").write_text(json.dumps(job_to_dict(job), indent=2) + "\n")
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=run.step)
        window = _LogWindow(run.device)
        start_step, run_start = run.step, time.perf_counter()
        images_per_second = final_loss = float("nan")
        bar = tqdm(total=self.schedule.total_steps, initial=run.step, desc=job.name, unit="step",
                   disable=not (self.progress and main))
        batches = iter(run.loader)
        try:
            while run.step < last_step:
                if job.cluster.method == "kmeans":
                    self._deepcluster(run)
                batch = next(batches)
                label_loss, distill_loss, cluster_term = self._step(run, batch)
                run.step += 1
                window.add(label_loss, distill_loss, cluster_term, batch.num_corrupt + batch.num_unlabelled)
                metrics, written = None, None

                # log (the only host synchronisation of the loop) and checkpoint
                if run.step % train.log_every == 0 or run.step == last_step:
                    first = run.step - window.steps + 1
                    steps = f"steps {first}-{run.step}" if window.steps > 1 else f"step {run.step}"
                    label_mean, distill_mean, cluster_mean, images_per_second = window.read(train.batch_size, world)
                    final_loss = label_mean + distill_mean + job.cluster.weight * cluster_mean
                    if not math.isfinite(final_loss):
                        self._diverged(f"the loss became {final_loss} in {steps}")
                    if writer is not None:
                        for tag, value in (("loss/label", label_mean), ("loss/distill", distill_mean),
                                           ("lr", run.lr), ("images_per_second", images_per_second)):
                            writer.add_scalar(tag, value, run.step)
                        if run.cluster is not None:
                            writer.add_scalar("loss/cluster", cluster_mean, run.step)
                    postfix = {"loss": f"{label_mean:.3f}", "lr": f"{run.lr:.4f}", "img/s": f"{images_per_second:.0f}"}
                    if run.distiller.methods:
                        postfix["kd"] = f"{distill_mean:.3f}"
                    if run.cluster is not None:
                        postfix["cls"] = f"{cluster_mean:.3f}"
                    bar.set_postfix(postfix)
                    metrics = {"step": run.step, "loss_label": label_mean, "loss_distill": distill_mean,
                               "lr": run.lr, "images_per_second": images_per_second}
                    if run.cluster is not None:
                        metrics["loss_cluster"] = cluster_mean
                if run.step % train.checkpoint_every == 0 or run.step == last_step:
                    # never let a diverged state replace (and rotate away) the good checkpoints
                    if not window.all_finite(world):
                        self._diverged(f"the loss became non-finite before step {run.step}")
                    modules = (run.backbone, run.head, run.distiller,
                               *([run.cluster] if run.cluster is not None else []))
                    if not _agree(world, _all_finite([tensor for module in modules
                                                      for tensor in module.state_dict().values()
                                                      if tensor.is_floating_point()])):
                        self._diverged(f"the weights or normalisation statistics became non-finite by step {run.step}")
                    self.last_checkpoint = written = self._save(run)
                if self.reporter is not None and (metrics is not None or written is not None):
                    self.reporter(metrics or {"step": run.step}, written)
                bar.update(1)
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        if window.skipped:
            logger.warning("%s: %d corrupt or unlabelled samples were skipped on rank %d (their slots refilled)",
                           job.name, window.skipped, world.rank)
        seconds = time.perf_counter() - run_start
        return {
            "name": job.name,
            "step": run.step,
            "steps_run": run.step - start_step,
            "loss": final_loss,
            "images_per_second": (run.step - start_step) * train.batch_size * world.world_size / seconds,
            "last_window_images_per_second": images_per_second,
            "seconds": seconds,
            "world_size": world.world_size,
            "checkpoint": str(self.last_checkpoint),
        }

    def _step(self, run: _Run, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimiser step on ``batch``; returns (label loss, distillation loss, clustering loss L_cls before
        its weight λ), on the device."""
        # batches arrive as uint8 pixels (a quarter of the copy) and are normalised on the device, bit for bit
        # as the loader would have (see facekd.data.loader.to_float), for each network as it was trained
        pixels = batch.images.to(run.device, non_blocking=True)
        images = to_float(pixels, self.job.model.normalize)
        labels = batch.labels.to(run.device, non_blocking=True)

        # forward: student backbone (its routing softmax, if routed, at DyConv's annealed temperature), frozen teacher
        set_routing_temperature(run.backbone, routing_temperature(run.step, run.steps_per_epoch))
        with run.autocast:
            student = _forward(run.backbone, images, run.distiller.needs_stages)
            teacher_outputs = None
            if run.distiller.needs_teacher:
                with torch.no_grad():
                    teacher_outputs = _forward(run.teacher, self._teacher_images(run, pixels, images),
                                               run.distiller.needs_stages)

        # a sharded classifier sees the global batch: every rank's embeddings and labels
        gathered = None
        if run.head.sharded:
            gathered = gather_batch(run.world, student.embedding,
                                    teacher_outputs.embedding if teacher_outputs is not None else None, labels)
        embeddings, all_labels = (gathered.student, gathered.labels) if gathered else (student.embedding, labels)

        # margin loss (fp32 centres, outside autocast) over all classes or partial FC's sample, distillation
        label_loss = run.head(embeddings, all_labels, run.head.sample_classes(all_labels, run.step))
        with run.autocast:
            distill_loss, _ = run.distiller(student, teacher_outputs, labels, run.step, gathered)
            if run.unlabeled is not None:
                distill_loss = distill_loss + self._unlabeled_loss(run, images, teacher_outputs, next(run.unlabeled))

        # CondFace's clustering loss on the routing vector (thesis Eq. 5.5-5.6): L = L_fr + λ·L_cls
        total = label_loss + distill_loss
        cluster_term = torch.zeros((), device=run.device)
        if run.cluster is not None:
            cluster_term = self._cluster_loss(run, batch)
            total = total + self.job.cluster.weight * cluster_term

        # backward, clip, step
        run.lr = self.job.optim.lr * lr_factor(run.step, self.job, self.schedule)
        run.optimiser.step(total, run.lr)
        return label_loss.detach(), distill_loss.detach(), cluster_term.detach()

    def _cluster_loss(self, run: _Run, batch: Any) -> torch.Tensor:
        """L_cls of this step's routing vectors: against Sinkhorn codes of the batch (all ranks' marginals), or
        against the images' k-means clusters of this epoch."""
        config = self.job.cluster
        scores = run.cluster(run.backbone.routing_vector())
        if config.method == "sinkhorn":
            targets = sinkhorn(scores, epsilon=config.epsilon, iterations=config.iterations,
                               all_reduce=run.world.reducer)
        else:
            targets = run.assignments.labels_of(batch.keys, run.device)
        return cluster_loss(scores, targets, config.temperature)

    def _deepcluster(self, run: _Run) -> None:
        """DeepCluster before each epoch (see :mod:`facekd.deepcluster`); a resumed run keeps its stored one."""
        from facekd.deepcluster import deepcluster_epoch

        epoch = run.step // run.steps_per_epoch
        if run.assignments is not None and run.assignments.epoch == epoch:
            return
        config, job = self.job.cluster, self.job
        run.assignments, inertia = deepcluster_epoch(
            epoch, run.backbone, run.cluster, job.data.manifest, world=run.world, image_size=job.data.image_size,
            normalize=job.model.normalize, batch_size=config.kmeans_batch_size, iterations=config.kmeans_iterations,
            init=config.kmeans_init, seed=job.train.seed, base_url=job.data.base_url,
            progress=self.progress and run.world.is_main)
        logger.info("%s: k-means of the routing vectors before epoch %d, inertia %.4f", job.name, epoch, inertia)

    def _resume_state(self) -> tuple[dict[str, Any] | None, Path | None]:
        """The checkpoint to continue from and its folder, or (None, None) for a fresh run (refusing to
        overwrite an old one). Rank 0 decides and tells the others, so that all ranks load the same one.

        Checkpoint folders that a killed writer left half-written are removed first. A damaged newest
        checkpoint is reported and skipped: the run continues from the newest intact one.
        """
        world = self.world
        decision: tuple[str, ...] = ("fresh",)
        if world.is_main:
            try:
                newest = self._pick_checkpoint()
                decision = ("fresh",) if newest is None else ("resume", str(newest))
            except FacekdError as error:
                decision = ("error", type(error).__name__, str(error))
        decision = world.broadcast_object(decision)
        if decision[0] == "error":
            raise {"ConfigError": ConfigError, "CheckpointError": CheckpointError}.get(decision[1], TrainingError)(
                decision[2])
        if decision[0] == "fresh":
            return None, None
        newest = Path(decision[1])
        state = load_checkpoint(newest, verify=False)
        stored = job_from_dict(state["job"], source=str(newest))
        if job_to_dict(stored) | {"train": None, "ray": None} != job_to_dict(self.job) | {"train": None, "ray": None}:
            raise ConfigError(
                f"{newest} was written by a different job spec; resume only with the spec that started the run "
                "(only the train section may change, e.g. more steps)"
            )
        self.last_checkpoint = newest
        return state, newest

    def _pick_checkpoint(self) -> Path | None:
        """Rank 0's choice of the checkpoint to resume from (verified), None for a fresh run."""
        if self.resume_from is not None:
            verify_checkpoint(self.resume_from)
            return self.resume_from
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
        return newest

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
        unlabeled_pixels = batch.images.to(run.device, non_blocking=True)
        unlabeled_images = to_float(unlabeled_pixels, self.job.model.normalize)
        student = _forward(run.backbone, unlabeled_images, run.distiller.needs_stages)
        with torch.no_grad():
            teacher_unlabeled = _forward(run.teacher, self._teacher_images(run, unlabeled_pixels, unlabeled_images),
                                         run.distiller.needs_stages)
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

    def _teacher_images(self, run: _Run, pixels: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """The teacher's input: the student's ``images`` when both networks were trained on the same
        normalisation, else the uint8 ``pixels`` normalised as the teacher was (an imported insightface model)."""
        return images if run.teacher_normalize == self.job.model.normalize else to_float(pixels, run.teacher_normalize)

    def _initialise(self, backbone: StagedBackbone, head: MarginHead) -> None:
        """Start from ``model.init_from``: its backbone, and its head when it has the same classes."""
        world = self.world if self.world.distributed else None
        source = load_network(self.job.model.init_from, world=world)
        # the architecture must match; where each network itself started from does not matter
        if dataclasses.replace(source.job.model, init_from=None) != dataclasses.replace(self.job.model, init_from=None):
            raise ConfigError(
                f"model.init_from {self.job.model.init_from} holds a {source.job.model.backbone} "
                f"(width {source.job.model.width}, {source.job.model.embedding_dim}-d, dropout "
                f"{source.job.model.dropout}, normalize {source.job.model.normalize}); this job builds a "
                f"{self.job.model.backbone} (width {self.job.model.width}, {self.job.model.embedding_dim}-d, dropout "
                f"{self.job.model.dropout}, normalize {self.job.model.normalize})"
            )
        backbone.load_state_dict(source.backbone.state_dict())
        if source.head.num_classes == head.num_classes:
            head.load_rows(source.head.weight.detach())
        logger.info("%s: initialised from %s", self.job.name, self.job.model.init_from)

    def _build_distillation(
        self, backbone: StagedBackbone, head: MarginHead, batches_per_epoch: int, device: torch.device
    ) -> tuple[Network | None, Distiller]:
        """The frozen teacher (None when no method needs one) and the distillation terms."""
        config = self.job.distill
        teacher = None
        if config.teacher is not None and config.teacher_methods:
            # the teacher's head sharded like the student's; on a GPU its frozen backbone is stored in bf16
            teacher = load_network(config.teacher, device, world=self.world if self.world.distributed else None)
            if device.type == "cuda" and resolve_precision(self.job.train.precision, device) == torch.bfloat16:
                teacher.backbone.to(torch.bfloat16)
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
        return teacher, distiller.to(device).train()
