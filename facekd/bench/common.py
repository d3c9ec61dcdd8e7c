"""What every kernel benchmark shares: the device and its peak, timing, peak memory, results files.

A benchmark module (``margin.py``, ``gkd.py``, …) builds a list of row dicts, one per measured
(shape, dtype, method), and hands them to :func:`write_results`, which writes
``<out>/<device-slug>/<bench>.json`` and renders ``<bench>.md`` (a table) and ``<bench>.png`` (a
chart) from that JSON. Timings follow shared/BENCH.md: the median of at least ``MIN_REPS``
repetitions after warm-up, every ratio taken against a baseline measured in the same process.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import platform
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

MIN_REPS = 10
# Timed repetitions aim at this much work in total (never fewer than MIN_REPS).
TARGET_TIMED_MS = 300.0
OOM = "OOM"

# Dense (no 2:4 sparsity) tensor-core peaks in TFLOP/s, from the vendors' data sheets. fp32 inputs
# run on TF32 tensor cores (facekd's kernels use three TF32 passes, torch uses TF32 only if allowed),
# so their peak is the TF32 one.
DENSE_PEAK_TFLOPS = {
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "fp32": 417.5},
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
}
# torch.cuda device names → the data-sheet names above
_DEVICE_ALIASES = (
    (r"H100.*(HBM3|SXM)", "H100 SXM"),
    (r"H100.*PCIe", "H100 PCIe"),
    (r"H100.*NVL", "H100 NVL"),
    (r"H200", "H200"),
    (r"A100", "A100"),
)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# The kernel grid of BENCH.md
DIM = 512
STANDARD_CLASSES = (85_742, 360_232, 2_059_906)  # ms1mv2, glint360k, webface42m
SHARD_WORLD = 8  # "shard-8": what one rank of 8 holds
STANDARD_BATCHES = (128, 512, 1024)
QUICK_GPU = dict(batch=[1024], classes=list(STANDARD_CLASSES), dtype=["bf16"])
QUICK_CPU = dict(batch=[8], classes=[100, 1000], dtype=["fp32"], dim=32)


def add_grid_arguments(parser: argparse.ArgumentParser, *, dim_help: str = "embedding dimension D") -> None:
    """The options every kernel benchmark shares: the grid (B, C, dtype, D), the device and the results root."""
    parser.add_argument("--quick", action="store_true",
                        help="a small grid: B=1024, the three standard C, bf16 on a GPU; tiny shapes on CPU")
    parser.add_argument("--batch", type=int, nargs="+", help=f"batch sizes B (default {STANDARD_BATCHES})")
    parser.add_argument("--classes", type=int, nargs="+",
                        help=f"class counts C (default {STANDARD_CLASSES} and their /{SHARD_WORLD} shards)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="input dtypes (default all)")
    parser.add_argument("--dim", type=int, help=f"{dim_help} (default {DIM})")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--out", type=Path, default=Path("results"), help="results root (default results/)")


def grid(args: argparse.Namespace, device: "Device") -> tuple[list[int], list[int], list[str], int]:
    """(batches, classes, dtypes, D) the options of :func:`add_grid_arguments` ask for on ``device``."""
    quick = (QUICK_GPU if device.is_cuda else QUICK_CPU) if args.quick else {}
    if not device.is_cuda and not args.quick and not (args.batch and args.classes and args.dim):
        raise ValueError("on CPU give --quick, or --batch, --classes and --dim small enough for the reference")
    shards = [math.ceil(c / SHARD_WORLD) for c in STANDARD_CLASSES]
    batches = args.batch or quick.get("batch") or list(STANDARD_BATCHES)
    classes = args.classes or quick.get("classes") or sorted(list(STANDARD_CLASSES) + shards)
    dtypes = args.dtype or quick.get("dtype") or list(DTYPES)
    dim = args.dim or quick.get("dim") or DIM
    for name, values in (("--batch", batches), ("--classes", classes), ("--dim", [dim])):
        if min(values) < 1:
            raise ValueError(f"{name} must be ≥ 1, got {values}")
    return batches, classes, dtypes, dim


@dataclass(frozen=True)
class Device:
    """Where a benchmark runs, and the dense peak it is held against."""

    torch_device: torch.device
    name: str  # as the driver reports it, or the CPU's
    peak_name: str | None  # the data-sheet entry of DENSE_PEAK_TFLOPS, None if unknown

    @classmethod
    def detect(cls, requested: str = "auto") -> "Device":
        if requested not in ("auto", "cuda", "cpu"):
            raise ValueError(f"device must be auto, cuda or cpu, got {requested!r}")
        if requested == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
        if requested == "cpu" or not torch.cuda.is_available():
            return cls(torch.device("cpu"), f"cpu-{platform.machine()}", None)
        device = torch.device("cuda", torch.cuda.current_device())
        name = torch.cuda.get_device_name(device)
        peak = next((entry for pattern, entry in _DEVICE_ALIASES if re.search(pattern, name)), None)
        return cls(device, name, peak)

    @property
    def is_cuda(self) -> bool:
        return self.torch_device.type == "cuda"

    @property
    def slug(self) -> str:
        """Folder name of this device's results: ``nvidia-h100-80gb-hbm3``, ``cpu-x86_64``."""
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")

    def peak_tflops(self, dtype: str) -> float | None:
        return DENSE_PEAK_TFLOPS[self.peak_name][dtype] if self.peak_name else None

    @property
    def peak_note(self) -> str:
        """What a table's × dense peak column is measured against, for its notes."""
        return (f"dense peak of {self.peak_name} (fp32 rows against TF32)" if self.peak_name
                else "no dense peak known for this device")

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.torch_device)


def time_ms(fn: Callable[[], object], device: Device, *, warmup: int = 3, min_reps: int = MIN_REPS) -> dict:
    """Median, 20th and 80th percentile (ms) of ``fn`` over at least ``min_reps`` timed calls.

    CUDA calls are timed by events around each call; CPU calls by the wall clock. The warm-up
    also compiles (Triton, torch.compile) and sizes the number of repetitions.
    """
    for _ in range(warmup):
        fn()
    device.synchronize()
    start = time.perf_counter()
    fn()
    device.synchronize()
    estimate_ms = (time.perf_counter() - start) * 1e3
    reps = max(min_reps, min(200, int(TARGET_TIMED_MS / max(estimate_ms, 1e-3))))
    times = []
    if device.is_cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for begin, end in events:
            begin.record()
            fn()
            end.record()
        device.synchronize()
        times = [begin.elapsed_time(end) for begin, end in events]
    else:
        for _ in range(reps):
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    quantiles = statistics.quantiles(times, n=10, method="inclusive")
    return {"ms": statistics.median(times), "ms_p20": quantiles[1], "ms_p80": quantiles[7], "reps": reps}


def peak_memory_bytes(fn: Callable[[], object], device: Device) -> int | None:
    """Peak bytes allocated while ``fn`` runs, counting what was already allocated (CUDA only)."""
    if not device.is_cuda:
        return None
    device.synchronize()
    torch.cuda.reset_peak_memory_stats(device.torch_device)
    fn()
    device.synchronize()
    return torch.cuda.max_memory_allocated(device.torch_device)


def release_memory(device: Device) -> None:
    """Drop what a finished or failed measurement left behind before the next one."""
    gc.collect()
    if device.is_cuda:
        torch.cuda.empty_cache()


def guard_oom(measure: Callable[[], dict], device: Device) -> dict:
    """``measure()``, or ``{"status": "OOM"}`` when the device runs out of memory."""
    try:
        return {"status": "ok", **measure()}
    except torch.cuda.OutOfMemoryError:
        return {"status": OOM}
    finally:
        release_memory(device)


def environment(device: Device) -> dict:
    """Versions and device of a run, stored beside its rows."""
    import triton

    return {
        "device": device.name,
        "peak_entry": device.peak_name,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------------------------------------
# Results files: JSON first, the table and the chart drawn from it
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One column of a markdown table: the row key, its header and how to print it."""

    key: str
    header: str
    fmt: str = "{}"

    def render(self, row: dict) -> str:
        value = row.get(self.key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "–"
        return self.fmt.format(value) if not isinstance(value, str) else value


def markdown_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    lines = ["| " + " | ".join(column.header for column in columns) + " |",
             "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(column.render(row) for column in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Chart:
    """Line chart of ``y`` against ``x`` (log axes), one line per ``series``, one panel per ``panel``."""

    x: str
    y: str
    series: str
    panel: Sequence[str]
    x_label: str
    y_label: str
    title: str


def draw_chart(rows: Sequence[dict], chart: Chart, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usable = [row for row in rows if isinstance(row.get(chart.y), (int, float)) and row.get(chart.y)]
    panels = sorted({tuple(row[key] for key in chart.panel) for row in usable}, key=str) or [()]
    columns = min(3, len(panels))
    lines = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(5 * columns, 3.6 * lines), squeeze=False)
    for axis, panel in zip(axes.flat, panels):
        in_panel = [row for row in usable if tuple(row[key] for key in chart.panel) == panel]
        for series in sorted({row[chart.series] for row in in_panel}):
            points = sorted((row[chart.x], row[chart.y]) for row in in_panel if row[chart.series] == series)
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=series)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel(chart.x_label)
        axis.set_ylabel(chart.y_label)
        axis.set_title(", ".join(f"{key}={value}" for key, value in zip(chart.panel, panel)), fontsize=9)
        axis.grid(True, which="both", alpha=0.3)
        if in_panel:
            axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    figure.suptitle(chart.title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def merge_rows(path: Path, rows: Sequence[dict], key: Sequence[str]) -> list[dict]:
    """Rows already in ``path`` whose ``key`` was not measured again, then ``rows``."""
    if not path.exists():
        return list(rows)
    fresh = {tuple(row.get(k) for k in key) for row in rows}
    kept = [row for row in json.loads(path.read_text())["rows"] if tuple(row.get(k) for k in key) not in fresh]
    return kept + list(rows)


def write_results(out: Path, bench: str, device: Device, rows: Sequence[dict], *, notes: dict,
                  columns: Sequence[Column], chart: Chart, key: Sequence[str]) -> dict[str, Path]:
    """Write ``<out>/<device-slug>/<bench>.json`` and render its ``.md`` table and ``.png`` chart.

    Rows of earlier runs on the same device stay unless this run measured the same ``key`` again;
    every row carries the date of the run that measured it.
    """
    folder = Path(out) / device.slug
    folder.mkdir(parents=True, exist_ok=True)
    run_info = {"bench": bench, **environment(device), **notes}
    paths = {"json": folder / f"{bench}.json", "markdown": folder / f"{bench}.md", "png": folder / f"{bench}.png"}
    rows = merge_rows(paths["json"], [{**row, "date": run_info["date"]} for row in rows], key)
    paths["json"].write_text(json.dumps({"run": run_info, "rows": rows}, indent=1) + "\n")
    remarks = " ".join(f"{name}: {value}." for name, value in notes.items())
    header = (f"# {bench} on {device.name}\n\nLatest run {run_info['date']}; torch {run_info['torch']}, "
              f"triton {run_info['triton']}. {remarks}\n\n")
    paths["markdown"].write_text(header + markdown_table(rows, columns))
    draw_chart(rows, chart, paths["png"])
    return paths
