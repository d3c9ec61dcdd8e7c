"""``facekd bench partial-fc``: a sharded classifier's step rate and per-rank memory, beside its accounting.

The parent launches ``--nproc`` real processes (``torch.distributed.run`` on 127.0.0.1, a free port; gloo on
CPU, NCCL on CUDA). Each rank holds

* a student :class:`~facekd.distributed.classifier.ShardedClassifier` shard [C_r, D] fp32, trained: ArcFace
  margin loss over the partial-FC sample (``--sample-rate``), SGD with momentum 0.9 and weight decay 5e-4
  (the trainer's classifier optimiser);
* with ``--teacher on``, a frozen bf16 teacher shard [C_r, D] and a grouped-KD term over all C classes
  (:func:`facekd.kernels.grouped_kd.grouped_kd_loss_from_embeddings`, sharded through the all-reduce).

Embeddings are random, B per rank (they stand for the backbone's output), gathered to every rank with
:func:`~facekd.distributed.collectives.all_gather_rows` as the trainer does. A step is timed by the wall clock
from its inputs to the end of the optimiser step (CUDA synchronised), after ``--warmup`` steps; a step of
the job lasts as long as its slowest rank, so the per-step maximum over ranks is what the median is taken
of. samples/s is the global batch W·B over that median.

Memory, per rank: the bytes of the tensors it holds after the last step (centres, gradient, momentum,
teacher) and the peak — ``ru_maxrss`` on CPU (the whole process: Python, torch, gloo, every temporary), with
the ``ru_maxrss`` before the shards were allocated as its start; ``torch.cuda.max_memory_allocated`` on CUDA
— each beside :func:`~facekd.distributed.classifier.classifier_memory`'s figure for the same rank.

Rank 0 writes ``<out>/<device>/partial_fc.json`` (rows of earlier configurations stay); the parent renders
``partial_fc.md`` and ``partial_fc.png`` from it. ``--table`` launches nothing: it writes the accounting of
C ∈ {2M, 10M, 30M} × W ∈ {8, 32, 64} to ``<out>/accounting/partial_fc_table.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from facekd.bench.common import DIM, Column, Device, environment, markdown_table, merge_rows
from facekd.distributed.classifier import classifier_memory

BENCH = "partial_fc"
ARCFACE = dict(s=64.0, m1=1.0, m2=0.5, m3=0.0)
SGD = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)  # the trainer's classifier optimiser (jobs/ defaults)
KEY = ("C", "W", "D", "B", "sample_rate", "teacher", "rank")
# --table: per-GPU bytes at these C and W, D = 512, fp32 centres and momentum, bf16 teacher
TABLE_CLASSES = (2_000_000, 10_000_000, 30_000_000)
TABLE_WORLDS = (8, 32, 64)
GIB = 2**30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``facekd bench partial-fc``."""
    parser.add_argument("--classes", type=int, default=1_000_000, help="identities C (default 1,000,000)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks W, processes on this machine (default 2)")
    parser.add_argument("--dim", type=int, default=DIM, help=f"embedding dimension D (default {DIM})")
    parser.add_argument("--batch", type=int, default=128, help="samples per rank B (default 128)")
    parser.add_argument("--sample-rate", type=float, default=0.1, help="partial FC's sample rate (default 0.1)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--teacher", choices=("on", "off"), default="on",
                        help="a frozen bf16 teacher shard and a grouped-KD term over all classes (default on)")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("results"), help="results root (default results/)")
    parser.add_argument("--table", action="store_true",
                        help="write the accounting table (C 2M/10M/30M × W 8/32/64) and launch nothing")


def _check(args: argparse.Namespace) -> None:
    for name in ("classes", "nproc", "dim", "batch", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if not 0.0 < args.sample_rate <= 1.0:
        raise ValueError(f"--sample-rate must be in (0, 1], got {args.sample_rate}")
    if args.classes < args.nproc:
        raise ValueError(f"--classes {args.classes} cannot be sharded over --nproc {args.nproc} ranks")


def run(args: argparse.Namespace, *, timeout_s: float | None = None) -> dict[str, Path]:
    """Launch the ranks, then render the table and chart from the JSON rank 0 wrote; returns the paths.
    ``timeout_s`` bounds the ranks' wall time (the GPU suite's budget)."""
    if args.table:
        return write_table(args.out)
    _check(args)
    device = Device.detect(args.device)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}", "--nnodes=1",
               "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "facekd.bench.partial_fc"]
    # no --nproc: torch.distributed.run would take it for its own --nproc-per-node (each rank reads W from it)
    command += ["--classes", str(args.classes), "--dim", str(args.dim),
                "--batch", str(args.batch), "--sample-rate", str(args.sample_rate), "--steps", str(args.steps),
                "--warmup", str(args.warmup), "--teacher", args.teacher, "--device", args.device,
                "--out", str(args.out)]
    returncode = subprocess.run(command, timeout=timeout_s).returncode
    if returncode != 0:
        raise RuntimeError(f"{args.nproc} ranks of the partial-FC benchmark ended with exit status {returncode} "
                           "(each rank's error is printed above)")
    return render(Path(args.out) / device.slug / f"{BENCH}.json")


# ---------------------------------------------------------------------------------------------
# One rank (under torch.distributed.run)
# ---------------------------------------------------------------------------------------------


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _rank_main(argv: list[str]) -> None:
    from tqdm import tqdm

    from facekd.distributed.classifier import ShardedClassifier
    from facekd.distributed.collectives import all_gather_labels, all_gather_rows
    from facekd.distributed.world import World
    from facekd.kernels.grouped_kd import grouped_kd_loss_from_embeddings

    parser = argparse.ArgumentParser(prog="python -m facekd.bench.partial_fc")
    add_arguments(parser)
    args = parser.parse_args(argv)
    _check(args)
    world = World.from_env(args.device)
    args.nproc = world.world_size
    device = world.device
    bench_device = Device.detect(args.device)
    start_rss = _max_rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # build the student shard, its optimiser, the frozen teacher shard
    student = ShardedClassifier(args.classes, args.dim, **ARCFACE, world=world, sample_rate=args.sample_rate,
                                seed=0).to(device)
    optimiser = torch.optim.SGD(student.parameters(), **SGD)
    teacher = None
    if args.teacher == "on":
        # random centres stand for a trained teacher: only their size and dtype matter here
        teacher = torch.empty(student.num_local, args.dim, dtype=torch.bfloat16, device=device).normal_(0.0, 0.01)

    def step(index: int) -> int:
        """One training step of the classifier(s); returns how many classes this rank sampled."""
        generator = torch.Generator(device=device).manual_seed(index * world.world_size + world.rank)
        embeddings = torch.randn(args.batch, args.dim, device=device, generator=generator, requires_grad=True)
        labels = torch.randint(0, args.classes, (args.batch,), device=device, generator=generator)
        # the global batch on every rank; the backbone's data-parallel mean needs W on its gradient
        gathered = all_gather_rows(embeddings, world, grad_scale=world.world_size)
        all_labels = all_gather_labels(labels, world)
        class_index = student.sample_classes(all_labels, index)
        loss = student(gathered, all_labels, class_index)
        if teacher is not None:
            teacher_embeddings = torch.randn(args.batch, args.dim, device=device, generator=generator)
            teacher_gathered = all_gather_rows(teacher_embeddings.to(torch.bfloat16), world)
            loss = loss + grouped_kd_loss_from_embeddings(
                gathered, student.weight, teacher_gathered, teacher, s=ARCFACE["s"],
                class_offset=student.class_offset, num_classes=args.classes, all_reduce=world.reducer)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        return student.num_local if class_index is None else class_index.numel()

    # warm up, then time each step to the end of its optimiser step
    times_ms = []
    for index in tqdm(range(args.warmup + args.steps), desc=f"partial FC, {args.classes:,} classes",
                      disable=not world.is_main):
        begin = time.perf_counter()
        sampled = step(index)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index >= args.warmup:
            times_ms.append((time.perf_counter() - begin) * 1e3)

    # what this rank holds now (the gradient lives until the next step's zero_grad), and its peak
    held = {
        "centres": student.weight.nbytes,
        "gradient": student.weight.grad.nbytes,
        "momentum": optimiser.state[student.weight]["momentum_buffer"].nbytes,
        "teacher": 0 if teacher is None else teacher.nbytes,
    }
    if device.type == "cuda":
        peak, start = torch.cuda.max_memory_allocated(device), 0
    else:
        peak, start = _max_rss_bytes(), start_rss
    accounting = classifier_memory(args.classes, world.world_size, args.dim, rank=world.rank,
                                   teacher_dtype=torch.bfloat16 if teacher is not None else None,
                                   batch_size=args.batch, sample_rate=args.sample_rate)
    mine = dict(rank=world.rank, times_ms=times_ms, held=held, peak=peak, start=start, sampled=sampled,
                accounting=accounting)
    every_rank = world.all_gather_objects(mine)
    if world.is_main:
        _write_json(args, bench_device, every_rank)
    world.barrier()
    world.close()


def _write_json(args: argparse.Namespace, device: Device, every_rank: list[dict]) -> Path:
    """Rank 0: one row per rank into ``<out>/<device>/partial_fc.json`` (rows of other configurations stay)."""
    # a step of the job ends when its slowest rank's does
    step_ms = [max(times) for times in zip(*(rank["times_ms"] for rank in every_rank))]
    median_ms = statistics.median(step_ms)
    quantiles = statistics.quantiles(step_ms, n=10, method="inclusive") if len(step_ms) > 1 else [median_ms] * 9
    global_batch = args.nproc * args.batch
    rows = []
    for rank in every_rank:
        accounting = rank["accounting"]
        step_terms = accounting["class_index"] + accounting["gathered_embeddings"] + accounting["kd_logits_unfused"]
        rows.append({
            "C": args.classes, "W": args.nproc, "D": args.dim, "B": args.batch, "global_batch": global_batch,
            "sample_rate": args.sample_rate, "teacher": args.teacher, "rank": rank["rank"],
            "classes": accounting["classes"], "sampled_classes": rank["sampled"], "steps": len(step_ms),
            "step_ms": median_ms, "step_ms_p20": quantiles[1], "step_ms_p80": quantiles[7],
            "samples_per_s": global_batch / (median_ms / 1e3),
            **{f"held_{name}": nbytes for name, nbytes in rank["held"].items()},
            "held_bytes": sum(rank["held"].values()),
            "accounted_state": accounting["state"], "accounted_step": accounting["state"] + step_terms,
            "accounting": accounting,
            "peak_bytes": rank["peak"], "start_bytes": rank["start"],
            "peak_kind": "cuda max_memory_allocated" if device.is_cuda else "ru_maxrss (whole process)",
        })
    notes = {
        "timing": (f"wall clock per step (slowest rank), median of {len(step_ms)} after {args.warmup} warm-up; "
                   f"samples/s = W·B / median"),
        "memory": ("held = nbytes of centres + gradient + momentum + teacher after the last step; accounted "
                   "state = classifier_memory's state; accounted step adds its per-step terms; peak = "
                   + ("torch.cuda.max_memory_allocated" if device.is_cuda else
                      "ru_maxrss of the rank's process, start = ru_maxrss before the shards existed")),
        "path": "fused Triton kernels" if device.is_cuda else "plain-torch kernels (CPU)",
    }
    folder = Path(args.out) / device.slug
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{BENCH}.json"
    run_info = {"bench": BENCH, **environment(device), "threads_per_rank": torch.get_num_threads(), **notes}
    rows = merge_rows(path, [{**row, "date": run_info["date"]} for row in rows], KEY)
    path.write_text(json.dumps({"run": run_info, "rows": rows}, indent=1) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# The parent: markdown and chart from the JSON; the accounting table
# ---------------------------------------------------------------------------------------------

COLUMNS = (
    Column("C", "C", "{:,}"), Column("W", "W"), Column("D", "D"), Column("B", "B / rank"),
    Column("sample_rate", "sample rate"), Column("teacher", "teacher"), Column("rank", "rank"),
    Column("classes", "C_r", "{:,}"), Column("sampled_classes", "K", "{:,}"),
    Column("step_ms", "step ms (median)", "{:.1f}"), Column("samples_per_s", "samples/s (global)", "{:.1f}"),
    Column("held_gib", "held tensors GiB", "{:.3f}"), Column("state_gib", "accounted state GiB", "{:.3f}"),
    Column("step_gib", "accounted + step GiB", "{:.3f}"), Column("peak_gib", "peak GiB", "{:.3f}"),
    Column("rise_gib", "peak − start GiB", "{:.3f}"), Column("peak_ratio", "(peak − start) / state", "{:.2f}"),
)


def _display(row: dict) -> dict:
    rise = row["peak_bytes"] - row["start_bytes"]
    return {**row, "held_gib": row["held_bytes"] / GIB, "state_gib": row["accounted_state"] / GIB,
            "step_gib": row["accounted_step"] / GIB, "peak_gib": row["peak_bytes"] / GIB, "rise_gib": rise / GIB,
            "peak_ratio": rise / row["accounted_state"]}


def render(path: Path) -> dict[str, Path]:
    """``partial_fc.md`` and ``partial_fc.png`` beside the JSON at ``path``."""
    results = json.loads(Path(path).read_text())
    run_info, rows = results["run"], [_display(row) for row in results["rows"]]
    paths = {"json": Path(path), "markdown": Path(path).with_suffix(".md"), "png": Path(path).with_suffix(".png")}
    header = (f"# partial FC on {run_info['device']}\n\nLatest run {run_info['date']}; torch {run_info['torch']}, "
              f"{run_info['threads_per_rank']} thread(s) per rank, {run_info['path']}. "
              f"Timing: {run_info['timing']}. Memory: {run_info['memory']}.\n\n")
    paths["markdown"].write_text(header + markdown_table(rows, COLUMNS))
    _draw(rows, paths["png"], run_info["device"])
    return paths


def _draw(rows: list[dict], path: Path, device_name: str) -> None:
    """Grouped bars per (configuration, rank): accounted state, held tensors, accounted + step, peak − start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = (("state_gib", "accounted state"), ("held_gib", "held tensors (measured)"),
            ("step_gib", "accounted + step terms"), ("rise_gib", "peak − start (measured)"))
    width = 0.8 / len(bars)
    figure, axis = plt.subplots(figsize=(max(5.0, 1.4 * len(rows) + 2), 3.8))
    for offset, (key, label) in enumerate(bars):
        axis.bar([i + offset * width for i in range(len(rows))], [row[key] for row in rows], width, label=label)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    axis.set_xticklabels([f"C={row['C']:,}\nW={row['W']} r{row['rank']}\nteacher {row['teacher']}" for row in rows],
                         fontsize=7)
    axis.set_ylabel("GiB per rank")
    axis.set_title(f"partial FC per-rank memory, {device_name}", fontsize=10)
    axis.grid(True, axis="y", alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


TABLE_COLUMNS = (
    Column("C", "identities C", "{:,}"), Column("W", "GPUs W"), Column("classes", "C_r (rank 0)", "{:,}"),
    Column("centres_gib", "centres fp32 GiB", "{:.2f}"), Column("momentum_gib", "momentum fp32 GiB", "{:.2f}"),
    Column("teacher_gib", "teacher bf16 GiB", "{:.2f}"), Column("sum_gib", "sum GiB", "{:.2f}"),
    Column("gradient_gib", "+ gradient fp32 GiB", "{:.2f}"), Column("state_gib", "state GiB", "{:.2f}"),
)


def accounting_rows(classes=TABLE_CLASSES, worlds=TABLE_WORLDS, dim: int = DIM) -> list[dict]:
    """classifier_memory of rank 0 (a largest shard) for every (C, W): fp32 centres and momentum, bf16 teacher."""
    rows = []
    for num_classes in classes:
        for world_size in worlds:
            memory = classifier_memory(num_classes, world_size, dim, rank=0)
            rows.append({"C": num_classes, "W": world_size, "D": dim, **memory,
                         "sum_gib": (memory["centres"] + memory["momentum"] + memory["teacher"]) / GIB,
                         **{f"{name}_gib": memory[name] / GIB
                            for name in ("centres", "momentum", "teacher", "gradient", "state")}})
    return rows


def write_table(out: Path) -> dict[str, Path]:
    """``<out>/accounting/partial_fc_table.{json,md}``: the accounting table, no process launched."""
    folder = Path(out) / "accounting"
    folder.mkdir(parents=True, exist_ok=True)
    rows = accounting_rows()
    paths = {"json": folder / f"{BENCH}_table.json", "markdown": folder / f"{BENCH}_table.md"}
    paths["json"].write_text(json.dumps({"bench": BENCH, "D": DIM, "rows": rows}, indent=1) + "\n")
    paths["markdown"].write_text(markdown_table(rows, TABLE_COLUMNS))
    print(paths["markdown"].read_text())
    return paths


if __name__ == "__main__":
    _rank_main(sys.argv[1:])
