"""Items 4-5 of the GPU suite: the training step with and without distillation, and data loading.

The step timed is the trainer's own (:meth:`facekd.train.Trainer._step`: autocast backbones, fp32
margin head, frozen teacher under no_grad, the distillation terms, backward, clipping, SGD) on
synthetic images already on the device, so the figure is the GPU's, not the loader's. The networks
are freshly initialised: a step costs the same with trained weights. Item 5 then says how many CPU
cores the loader needs to keep up with each of these steps.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

from facekd.bench.common import peak_memory_bytes, release_memory, time_ms
from facekd.bench.gpu_suite import Deadline, Suite, attempt

logger = logging.getLogger(__name__)

# (name, backbone, distillation methods or None for the teacher's own step), in order of value
STEP_CONFIGS = (
    ("student", "mobilefacenet", {}),
    ("student_gkd", "mobilefacenet", {"gkd": 1.0}),
    ("student_kd", "mobilefacenet", {"kd": 1.0}),
    ("teacher", "iresnet50", None),
)
TEACHER_BACKBONE = "iresnet50"
TEACHER_STEP_FACTOR = 3.0  # first guess of the teacher's step time over the student's
GKD_PAPER_OVERHEAD = 0.37  # GKD paper, Table 6: training time of GKD over the student alone
OVERHEAD_TARGET = 0.15


class _SyntheticBatch(NamedTuple):
    """What Trainer._step reads of a loader batch."""

    images: torch.Tensor  # uint8 [B, S, S, 3] RGB pixels on the device, as the trainer's loader delivers them
    labels: torch.Tensor  # [B] int64


# ---------------------------------------------------------------------------------------------
# 4. Training step
# ---------------------------------------------------------------------------------------------


def training_step(suite: Suite, deadline: Deadline) -> dict:
    """images/s of the student without distillation, with GKD, with KD, and of the teacher's step."""
    sizes, device = suite.sizes, suite.device
    rows, notes = [], []
    generator = torch.Generator(device=device.torch_device).manual_seed(0)
    batch = _SyntheticBatch(
        torch.randint(0, 256, (sizes.train_batch, sizes.image_size, sizes.image_size, 3), dtype=torch.uint8,
                      device=device.torch_device, generator=generator),
        torch.randint(0, sizes.train_classes, (sizes.train_batch,), device=device.torch_device, generator=generator),
    )
    student_s = sizes.first_train_config_s
    for name, backbone, methods in STEP_CONFIGS:
        estimate = student_s * (TEACHER_STEP_FACTOR if methods is None else 1.0)
        if not deadline.allows(estimate):
            notes.append(f"{name} skipped: ~{estimate:.0f} s needed, {deadline.left():.0f} s left")
            continue
        begin = time.perf_counter()
        timed = attempt(name, lambda: [_time_step(suite, backbone, methods, batch)], notes)
        rows.append({"config": name, "backbone": backbone, "methods": methods,
                     **(timed[0] if timed else {"status": "failed"})})
        student_s = max(student_s, time.perf_counter() - begin) if name == "student" else student_s
        release_memory(device)
    reference = next((row["ms"] for row in rows if row["config"] == "student" and row.get("status") == "ok"), None)
    for row in rows:
        if row.get("status") == "ok":
            row["images_per_s"] = sizes.train_batch / (row["ms"] / 1e3)
            if reference and row["config"] != "student":
                row["vs_student"] = row["ms"] / reference
                row["overhead"] = row["ms"] / reference - 1.0
    return {"status": "partial" if notes else "ok", "rows": rows, "notes": notes,
            "setup": {"batch": sizes.train_batch, "image_size": sizes.image_size, "classes": sizes.train_classes,
                      "embedding_dim": sizes.embedding_dim, "precision": sizes.precision,
                      "student_width": sizes.student_width, "teacher": TEACHER_BACKBONE,
                      "teacher_width": sizes.teacher_width, "data": "synthetic, on the device",
                      "gkd_paper_overhead": GKD_PAPER_OVERHEAD, "overhead_target": OVERHEAD_TARGET}}


def _time_step(suite: Suite, backbone: str, methods: dict | None, batch: _SyntheticBatch) -> dict:
    """Build one run's parts as the trainer does, then time its step (and its peak memory)."""
    from facekd.kernels.checks import kernel_backend

    trainer, run = _build_run(suite, backbone, methods)

    def step() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return trainer._step(run, batch)

    # dry run: the Triton kernels in the interpreter, as a GPU runs them
    with kernel_backend("triton") if suite.dry_run else contextlib.nullcontext():
        timing = time_ms(step, suite.device)
        peak = peak_memory_bytes(step, suite.device)
    return {"status": "ok", **timing, "peak_gb": peak / 2**30 if peak else None}


def _build_run(suite: Suite, backbone: str, methods: dict | None):
    """A Trainer and its run state for ``backbone``; ``methods`` None: the teacher's own step (labels only)."""
    from facekd.config import ModelConfig, job_from_dict
    from facekd.distill.distiller import Distiller
    from facekd.distributed.engine import LocalOptimiser
    from facekd.distributed.world import World
    from facekd.network import autocast_for, build_network
    from facekd.train import Schedule, Trainer, _Run, build_optimizer

    sizes, device = suite.sizes, suite.device.torch_device
    teacher_step = methods is None
    width = sizes.teacher_width if teacher_step else sizes.student_width
    job = job_from_dict({
        "name": f"gpu-suite-{backbone}",
        "data": {"manifest": "synthetic", "image_size": sizes.image_size},
        "model": {"backbone": backbone, "width": width, "embedding_dim": sizes.embedding_dim},
        "distill": {"methods": methods or {}, **({"teacher": "in memory"} if methods else {})},
        "train": {"output_dir": str(suite.out / "unused"), "steps": 1000, "batch_size": sizes.train_batch,
                  "device": device.type, "precision": sizes.precision},
    }, source="gpu-suite")
    autocast, autocast_dtype = autocast_for(device, job.train.precision)

    # build the student (or teacher) backbone and head
    torch.manual_seed(job.train.seed)
    network, head = build_network(job.model, job.head, sizes.train_classes, sizes.image_size)
    network.to(device).train()
    head.to(device).train()

    # build the frozen, untrained teacher and the distillation terms
    teacher = teacher_head = None
    if methods:
        teacher_model = ModelConfig(backbone=TEACHER_BACKBONE, width=sizes.teacher_width,
                                    embedding_dim=sizes.embedding_dim)
        teacher, teacher_head = build_network(teacher_model, job.head, sizes.train_classes, sizes.image_size)
        for module in (teacher, teacher_head):
            module.to(device).eval().requires_grad_(False)
    distiller = Distiller(job.distill, student=network, student_head=head, teacher=teacher, teacher_head=teacher_head,
                          batches_per_epoch=1000).to(device).train()

    # build the optimiser over every trained parameter (a constant learning rate: the schedule costs nothing)
    parameters = [*network.parameters(), *head.parameters(), *distiller.parameters()]
    optimiser = LocalOptimiser(build_optimizer(job.optim, parameters, device), parameters,
                               clip_grad_norm=job.optim.clip_grad_norm, fp16=autocast_dtype == torch.float16,
                               device=device)
    world = World.single(device)
    run = _Run(world=world, autocast=autocast, step=0, loader=None, unlabeled=None, backbone=network, head=head,
               teacher=teacher, distiller=distiller, optimiser=optimiser)
    trainer = Trainer(job, progress=False, world=world)
    trainer.schedule = Schedule(total_steps=1000, warmup_steps=0, milestones=())
    return trainer, run


# ---------------------------------------------------------------------------------------------
# 5. Data loading
# ---------------------------------------------------------------------------------------------


def data_feed(suite: Suite, deadline: Deadline) -> dict:
    """Loader images/s per CPU core, and the cores one GPU needs for each step of item 4."""
    from facekd.bench import data as data_bench

    sizes = suite.sizes
    budget_s = min(sizes.data_budget_s, max(deadline.left() - 5.0, 1.0))
    with tempfile.TemporaryDirectory(prefix="facekd-gpu-suite-data-") as workdir:
        measured = data_bench.measure(image_size=sizes.data_image_size, num_images=sizes.data_num_images,
                                      budget_s=budget_s, workdir=Path(workdir))
    per_core = measured["loader_uint8_images_per_s"]  # the trainer's path; one loader process on one thread
    steps = suite.results.get("training_step", {}).get("rows", [])
    feeding = [{"config": row["config"], "images_per_s": row["images_per_s"],
                "cores_needed": row["images_per_s"] / per_core}
               for row in steps if row.get("images_per_s")]
    notes = [] if feeding else ["no training step was measured (item 4), so no cores-per-GPU figure"]
    return {"status": "ok" if feeding else "partial", "measured": measured, "loader_images_per_s_per_core": per_core,
            "feeding": feeding, "notes": notes, "budget_s": budget_s}
