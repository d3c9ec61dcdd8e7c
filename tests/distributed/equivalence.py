"""One training step of the real trainer on W ranks, for the 1-rank-vs-W-rank equivalence tests.

``python -m torch.distributed.run --nproc-per-node W tests/distributed/equivalence.py OUT CASE...`` runs every
case on W gloo ranks (DeepSpeed ZeRO-1 engine, sharded classifiers) and writes each rank's results to
``OUT/rank_R.pt``; the tests call :func:`step` in their own process with one rank for the reference.

The step is :meth:`facekd.train.Trainer._step` itself. Backbones and adapters are in eval mode, so BatchNorm uses its
running statistics and a rank's half of the batch gives the same features as the whole batch does; SGD
without momentum or weight decay at learning rate 1 makes each parameter's change its gradient.
"""
from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

from facekd.config import HeadConfig, job_from_dict
from facekd.distill.distiller import Distiller
from facekd.distributed.engine import DeepSpeedOptimiser, LocalOptimiser
from facekd.distributed.world import World
from facekd.heads import MarginHead
from facekd.models import build_backbone
from facekd.train import Schedule, Trainer, _Run, build_optimizer

BATCH = 12  # global: 6 per rank on 2 ranks, 4 on 3
CLASSES = 11  # not divisible by 2 or 3: shards [0, 6) [6, 11) and [0, 4) [4, 8) [8, 11)
# every shard border of both layouts is a label, some twice
LABELS = [0, 5, 6, 10, 3, 4, 7, 8, 5, 6, 0, 2]
HEAD = {"s": 16.0, "m2": 0.2}

CASES = {
    "margin": {},
    "kd": {"methods": {"kd": 1.0}, "kd": {"temperature": 2.0}},
    "dkd": {"methods": {"dkd": 1.0}},
    "gkd": {"methods": {"gkd": 1.0}, "gkd": {"tau": 0.6}},
    "gkd_official": {"methods": {"gkd": 1.0}, "gkd": {"selection": "fixed", "k": 3, "force_target": True,
                                                      "margined_logits": True, "temperature": 4.0}},
    "srrl": {"methods": {"srrl": 1.0}},
    "kd_margin_sampled": {"methods": {"kd": 1.0}},  # sample_rate 1 through sample_classes
}


def _job(case: str):
    return job_from_dict({
        "name": case, "data": {"manifest": "unused", "image_size": 32},
        "model": {"backbone": "iresnet18", "width": 0.125, "embedding_dim": 16}, "head": HEAD,
        "distill": {**CASES[case], **({"teacher": "in memory"} if CASES[case] else {})},
        "optim": {"lr": 1.0, "momentum": 0.0, "weight_decay": 0.0, "warmup_steps": 0, "schedule": "cosine"},
        "train": {"output_dir": "unused", "steps": 10, "batch_size": BATCH, "device": "cpu", "precision": "fp32"},
        "deepspeed": {"zero_optimization": {"stage": 1}},
    })


def step(world: World, case: str) -> dict:
    """One trainer step of ``case`` on this rank's part of the fixed global batch: losses and parameter changes."""
    job = _job(case)
    per_rank = BATCH // world.world_size
    rows = slice(world.rank * per_rank, (world.rank + 1) * per_rank)
    generator = torch.Generator().manual_seed(7)
    images = (torch.rand(BATCH, 32, 32, 3, generator=generator) * 255).to(torch.uint8)
    student_centres = torch.randn(CLASSES, 16, generator=generator)
    teacher_centres = torch.randn(CLASSES, 24, generator=generator)
    labels = torch.tensor(LABELS)

    torch.manual_seed(0)
    backbone = build_backbone("iresnet18", embedding_dim=16, width=0.125, image_size=32).eval()
    torch.manual_seed(1)
    teacher = build_backbone("iresnet18", embedding_dim=24, width=0.25, image_size=32).eval().requires_grad_(False)
    sharded = world if world.world_size > 1 else None
    head = MarginHead(CLASSES, 16, job.head, world=sharded)
    head.load_rows(student_centres[head.class_offset:head.class_offset + head.num_local])
    teacher_head = MarginHead(CLASSES, 24, HeadConfig(**HEAD), world=sharded).requires_grad_(False)
    teacher_head.load_rows(teacher_centres[teacher_head.class_offset:teacher_head.class_offset + teacher_head.num_local])
    torch.manual_seed(3)  # the adapters' initial weights (a one-rank head draws from the global generator)
    distiller = Distiller(job.distill, student=backbone, student_head=head, teacher=teacher,
                          teacher_head=teacher_head if job.distill.methods else None, batches_per_epoch=1).eval()
    if world.distributed:
        from facekd.distributed.engine import deepspeed_config

        config = deepspeed_config(job.deepspeed, micro_batch=per_rank, world_size=world.world_size,
                                  clip_grad_norm=0.0)
        optimiser = DeepSpeedOptimiser(torch.nn.ModuleDict({"backbone": backbone, "distiller": distiller}), head,
                                       build_sgd=lambda p: build_optimizer(job.optim, p, world.device),
                                       config=config, world=world, clip_grad_norm=0.0)
    else:
        parameters = [*backbone.parameters(), *head.parameters(), *distiller.parameters()]
        optimiser = LocalOptimiser(build_optimizer(job.optim, parameters, world.device), parameters,
                                   clip_grad_norm=0.0, fp16=False, device=world.device)
    run = _Run(world, nullcontext(), 0, None, None, backbone, head, teacher, distiller, optimiser)
    trainer = Trainer(job, progress=False, world=world)
    trainer.schedule = Schedule(total_steps=10, warmup_steps=0, milestones=())

    trained = {**{f"backbone.{k}": v for k, v in backbone.named_parameters()},
               **{f"distiller.{k}": v for k, v in distiller.named_parameters()}}
    before = {name: value.detach().clone() for name, value in trained.items()}
    head_before = head.weight.detach().clone()
    label_loss, distill_loss, _ = trainer._step(run, SimpleNamespace(images=images[rows], labels=labels[rows]))
    return {
        "label": label_loss.item(), "distill": distill_loss.item(),
        "changes": {name: before[name] - value.detach() for name, value in trained.items()},
        "head_offset": head.class_offset, "head_change": head_before - head.weight.detach(),
    }


if __name__ == "__main__":
    out, cases = Path(sys.argv[1]), sys.argv[2:]
    world = World.from_env("cpu")
    results = {case: step(world, case) for case in cases}
    torch.save(results, out / f"rank_{world.rank}.pt")
    world.close()
