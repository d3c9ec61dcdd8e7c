"""``facekd bench gpu-suite``: everything that needs a GPU, validated and measured in one short process.

A GPU is lent for minutes at a time, so the suite is one prepared command that checks its own clock.
Its items, in order of value (facekd/bench/GPU.md says how to run it on a lent machine):

1. ``correctness`` — every registered Triton kernel case (:mod:`facekd.kernels.checks`) against the
   float64 plain-torch reference at realistic shapes, in fp32, bf16 and fp16;
2. ``margin_ce`` — the fused margin-softmax CE at B = 1024, D = 512, bf16, C = 85,742 / 360,232 /
   2,059,906 against torch eager, torch.compile and a same-shape bf16 matmul; peak memory against
   inputs + weight + gradients; the largest C that fits on the device;
3. ``grouped_kd`` — fused grouped KD at C = 85,742, B = 512 against the sort-based torch version and
   against the fused margin CE of the same shape;
4. ``training_step`` — MobileFaceNet student with a frozen IResNet-50 teacher, 112 px, batch 512, bf16,
   synthetic data on the device: images/s without distillation, with KD, with GKD; the teacher's step;
5. ``data`` — JPEG decode + augmentation images/s per CPU core (:func:`facekd.bench.data.measure`),
   and the cores one GPU needs to feed each step of item 4;
6. ``partial_fc`` — one rank's sharded student and teacher classifiers at 2,059,906 and 3,625,000 identities
   per GPU (:mod:`facekd.bench.suite_partial_fc`): samples/s and peak memory beside the accounting.

Each item gets a share of ``--budget-s``; time an item leaves unused passes to the next. Before
each part an item compares its estimated cost with the time left and skips, with a note, what does
not fit. A failing item is recorded (message and traceback tail) and the suite goes on.
``summary.json`` and ``summary.md`` are rewritten after every item, so a run killed from outside
still leaves what it measured. ``--dry-run`` runs the same code on CPU at tiny sizes, the Triton
kernels in the interpreter: CI runs it, so the suite is known to work before a GPU is seen.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from facekd.bench.common import Device, environment, release_memory
from facekd.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_BUDGET_S = 420.0
RESERVE_S = 5.0  # kept back from the items for writing the summary
SUMMARY_FILES = ("summary.json", "summary.md", "suite.log")  # + the charts of the items (at most 8 in all)


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one run: the issue's on a GPU, tiny ones for ``--dry-run``."""

    tiny_kernel_shapes: bool  # the cases' tiny shapes instead of their realistic ones
    check_dtypes: tuple[str, ...]  # in order of value: the trainer's fp32 heads, then bf16, fp16
    margin_batch: int
    margin_dim: int
    margin_classes: tuple[int, ...]
    margin_dtype: str
    simulated_memory_bytes: int | None  # dry run: a device of this size (a CPU never runs out)
    gkd_batch: int
    gkd_classes: int
    gkd_dim: int
    gkd_dtype: str
    image_size: int
    train_batch: int
    train_classes: int
    embedding_dim: int
    student_width: float
    teacher_width: float
    precision: str  # autocast dtype of the backbones
    data_image_size: int
    data_num_images: int
    data_budget_s: float
    # first guesses of costs (s) before anything was measured; 0 in the dry run
    first_margin_config_s: float = 0.0
    first_compile_s: float = 0.0
    first_gkd_form_s: float = 0.0
    first_train_config_s: float = 0.0


GPU_SIZES = Sizes(
    tiny_kernel_shapes=False, check_dtypes=("fp32", "bf16", "fp16"),
    margin_batch=1024, margin_dim=512, margin_classes=(85_742, 360_232, 2_059_906), margin_dtype="bf16",
    simulated_memory_bytes=None,
    gkd_batch=512, gkd_classes=85_742, gkd_dim=512, gkd_dtype="bf16",
    image_size=112, train_batch=512, train_classes=85_742, embedding_dim=512, student_width=1.0,
    teacher_width=1.0, precision="bf16",
    data_image_size=112, data_num_images=2048, data_budget_s=60.0,
    first_margin_config_s=20.0, first_compile_s=60.0, first_gkd_form_s=15.0, first_train_config_s=15.0,
)
DRY_RUN_SIZES = Sizes(
    tiny_kernel_shapes=True, check_dtypes=("fp32", "bf16", "fp16"),
    margin_batch=8, margin_dim=32, margin_classes=(16, 32, 48), margin_dtype="fp32",
    simulated_memory_bytes=2**14,
    gkd_batch=8, gkd_classes=24, gkd_dim=32, gkd_dtype="fp32",
    image_size=32, train_batch=4, train_classes=20, embedding_dim=16, student_width=0.25, teacher_width=0.125,
    precision="fp32",
    data_image_size=32, data_num_images=64, data_budget_s=10.0,
)


@dataclass(frozen=True)
class Deadline:
    """When an item's share of the budget ends (``time.perf_counter`` seconds)."""

    end: float

    def left(self) -> float:
        return self.end - time.perf_counter()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


@dataclass
class Suite:
    """What every item is given: where it runs, at which sizes, and what earlier items found."""

    device: Device
    sizes: Sizes
    dry_run: bool
    out: Path
    results: dict[str, dict] = field(default_factory=dict)


@dataclass(frozen=True)
class Item:
    name: str
    title: str
    share: float  # of the budget
    min_s: float  # below this much time left on a GPU the item is not started
    run: Callable[[Suite, Deadline], dict]


def _items() -> tuple[Item, ...]:
    from facekd.bench import suite_kernels, suite_partial_fc, suite_training

    return (
        Item("correctness", "1. Triton kernels against the float64 torch reference", 0.30, 10.0,
             suite_kernels.correctness),
        Item("margin_ce", "2. Margin-softmax CE", 0.28, 20.0, suite_kernels.margin_ce),
        Item("grouped_kd", "3. Grouped KD", 0.10, 15.0, suite_kernels.grouped_kd),
        Item("training_step", "4. Training step", 0.18, 30.0, suite_training.training_step),
        Item("data", "5. Data loading", 0.14, 20.0, suite_training.data_feed),
        Item("partial_fc", "6. Partial FC at 2M and 3.6M identities per GPU", 0.10, 60.0,
             suite_partial_fc.partial_fc_item),
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``facekd bench gpu-suite``."""
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for summary.json, summary.md, suite.log and charts (at most 8 files)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds the items may take, from the first item to the written summary "
                             f"(default {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--dry-run", action="store_true",
                        help="the same code on CPU at tiny sizes, Triton kernels in the interpreter (what CI runs)")
    names = [item.name for item in _items()]
    parser.add_argument("--items", nargs="+", choices=names, default=names, metavar="ITEM",
                        help=f"run only these of {' '.join(names)} (default all; they run in that order and share "
                             "the budget in proportion to their default shares)")


def run(args: argparse.Namespace) -> dict[str, Path]:
    """Run every item inside the budget; returns the paths of summary.json and summary.md."""
    if args.budget_s <= 0:
        raise ConfigError(f"--budget-s must be > 0, got {args.budget_s}")
    _prepare_kernels(args.dry_run)
    device = Device.detect("cpu" if args.dry_run else "cuda")
    suite = Suite(device, DRY_RUN_SIZES if args.dry_run else GPU_SIZES, args.dry_run, Path(args.out))
    suite.out.mkdir(parents=True, exist_ok=True)
    log_handler = logging.FileHandler(suite.out / "suite.log", mode="w")
    log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root_logger = logging.getLogger("facekd")
    root_logger.addHandler(log_handler)
    threads = torch.get_num_threads()
    if args.dry_run:  # tiny ops on shared cores: OpenMP's spin-waits make several threads far slower than one
        torch.set_num_threads(1)
    try:
        return _run_items(suite, args.budget_s, args.items)
    finally:
        torch.set_num_threads(threads)
        root_logger.removeHandler(log_handler)
        log_handler.close()


def _prepare_kernels(dry_run: bool) -> None:
    """The dry run needs the Triton interpreter, which is chosen when facekd.kernels is first imported."""
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if dry_run and not interpreted:
        if "facekd.kernels" in sys.modules:
            raise ConfigError("--dry-run runs the Triton kernels in the interpreter: set TRITON_INTERPRET=1 "
                              "before facekd.kernels is imported")
        os.environ["TRITON_INTERPRET"] = "1"
    if not dry_run:
        if interpreted:
            raise ConfigError("TRITON_INTERPRET=1 would run the kernels in the CPU interpreter: unset it on a GPU")
        if not torch.cuda.is_available():
            raise ConfigError("the GPU suite needs a CUDA device (torch sees none); --dry-run runs it on CPU")


def _run_items(suite: Suite, budget_s: float, names: list[str]) -> dict[str, Path]:
    items = [item for item in _items() if item.name in names]
    total_share = sum(item.share for item in items)
    start = time.perf_counter()
    usable = max(budget_s - RESERVE_S, 0.0)
    header = {
        "suite": "gpu-suite", "dry_run": suite.dry_run, "budget_s": budget_s, **environment(suite.device),
        "cpu": cpu_name(), "cpu_cores": os.cpu_count(),
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }
    if suite.device.is_cuda:
        properties = torch.cuda.get_device_properties(suite.device.torch_device)
        header["device_memory_gib"] = properties.total_memory / 2**30
    shares, broken_by = 0.0, None
    for position, item in enumerate(items):
        shares += item.share / total_share
        deadline = Deadline(start + usable * shares)
        minimum = 0.0 if suite.dry_run else item.min_s
        begin = time.perf_counter()
        if broken_by:
            rest = " ".join(later.name for later in items[position:])
            result = {"status": "skipped",
                      "notes": [f"the CUDA context broke in {broken_by}; rerun with --items {rest}"]}
        elif not deadline.allows(minimum):
            result = {"status": "skipped",
                      "notes": [f"needs at least {minimum:.0f} s, {max(deadline.left(), 0):.0f} s were left"]}
        else:
            logger.info("gpu-suite: %s (%.0f s left of its share)", item.title, deadline.left())
            result = _run_one(item, suite, deadline)
            if device_healthy(suite.device):
                release_memory(suite.device)
            else:
                broken_by = item.name
        suite.results[item.name] = {"title": item.title, "seconds": time.perf_counter() - begin, **result}
        header["elapsed_s"] = time.perf_counter() - start
        paths = write_summary(suite, header)
    logger.info("gpu-suite: done in %.0f s; %s", header["elapsed_s"], paths["markdown"])
    return paths


def _run_one(item: Item, suite: Suite, deadline: Deadline) -> dict:
    """The item's result with a status, or its failure: the suite goes on after either."""
    try:
        return {"status": "ok", **item.run(suite, deadline)}
    except Exception as error:  # recorded in the summary, then the next item runs
        logger.exception("gpu-suite: %s failed", item.name)
        return {"status": "failed", "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc().splitlines()[-12:]}


def attempt(label: str, measure: Callable[[], list], notes: list[str]) -> list:
    """``measure()``, or [] with a note when it raises: one failed configuration does not end its item."""
    try:
        return measure()
    except Exception as error:  # recorded in the item's notes, then the next configuration runs
        logger.exception("%s failed", label)
        notes.append(f"{label} failed: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}")
        return []


def cpu_name() -> str:
    """The processor's model name (what the data loader's images/s per core were measured on)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_healthy(device: Device) -> bool:
    """Whether the device still runs work (an illegal memory access poisons the CUDA context)."""
    if not device.is_cuda:
        return True
    try:
        (torch.ones(1, device=device.torch_device) + 1).item()
        return True
    except RuntimeError:
        return False


def write_summary(suite: Suite, header: dict) -> dict[str, Path]:
    """summary.json (everything) and summary.md (the tables) in the output folder."""
    from facekd.bench.suite_report import render_markdown

    paths = {"json": suite.out / "summary.json", "markdown": suite.out / "summary.md"}
    summary = {**header, "items": suite.results}
    paths["json"].write_text(json.dumps(summary, indent=1, default=str) + "\n")
    paths["markdown"].write_text(render_markdown(summary))
    return paths
