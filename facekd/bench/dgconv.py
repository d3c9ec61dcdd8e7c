"""``facekd bench dgconv``: the dynamic group convolution against the aggregate-then-grouped-conv baseline.

For every (stage, m, B, dtype) of the grid, one process measures forward + backward (gradients to x,
experts and routing) of a 3×3, stride-1 dynamic group convolution with C input and C output
channels on an H×H map, n experts per group:

* ``facekd`` — :func:`facekd.kernels.dyn_group_conv2d` (Triton on CUDA, the reference on CPU);
* ``torch_grouped`` — :func:`~facekd.kernels.dyn_group_conv.reference_dyn_group_conv2d`: the B·m
  mixed kernels materialised, one F.conv2d with the batch folded into the groups (the usual
  CondConv / DyConv implementation, and the baseline of issue 14's target);
* ``static_conv`` — one F.conv2d with a single (grouped) kernel, no routing: the floor a dynamic
  convolution is held against.

Stages default to IR-18's at a 112×112 input (64×56, 128×28, 256×14, 512×7: channels × side).
Useful FLOPs are 2·B·C·(C/m)·9·H² per convolution, three convolutions per forward + backward; the
mixing is not counted. ``vs_torch`` is the baseline's time over this method's (> 1: faster).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from facekd.bench.common import (
    DTYPES,
    OOM,
    Chart,
    Column,
    Device,
    guard_oom,
    peak_memory_bytes,
    release_memory,
    time_ms,
    write_results,
)

BENCH = "dgconv"
METHODS = ("facekd", "torch_grouped", "static_conv")
IR18_STAGES = ("64x56", "128x28", "256x14", "512x7")  # channels × side at a 112×112 input
KSIZE = 3
QUICK_GPU = dict(batch=[128], stages=list(IR18_STAGES), dtype=["bf16"])
QUICK_CPU = dict(batch=[2], stages=["8x6"], dtype=["fp32"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``facekd bench dgconv``."""
    parser.add_argument("--quick", action="store_true",
                        help="B=128, IR-18's four stages, bf16 on a GPU; one tiny stage on CPU")
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes B (default 128)")
    parser.add_argument("--stages", nargs="+", metavar="CxH",
                        help=f"channels × side of each map (default IR-18's: {' '.join(IR18_STAGES)})")
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 4],
                        help="channel groups m (default 1: DyConv, and 4: the thesis' DGConv)")
    parser.add_argument("--experts", type=int, default=4, help="experts n per group (default 4)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="input dtypes (default all)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="methods to measure (default all)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--out", type=Path, default=Path("results"), help="results root (default results/)")


def _stage(text: str) -> tuple[int, int]:
    channels, _, side = text.partition("x")
    if not (channels.isdigit() and side.isdigit()) or int(channels) < 1 or int(side) < 1:
        raise ValueError(f"--stages takes CxH with positive integers (e.g. 128x28), got {text!r}")
    return int(channels), int(side)


def _grid(args: argparse.Namespace, device: Device) -> tuple[list[int], list[tuple[int, int]], list[str]]:
    quick = (QUICK_GPU if device.is_cuda else QUICK_CPU) if args.quick else {}
    if not device.is_cuda and not args.quick and not (args.batch and args.stages):
        raise ValueError("on CPU give --quick, or --batch and --stages small enough for the reference")
    batches = args.batch or quick.get("batch") or [128]
    stages = [_stage(text) for text in (args.stages or quick.get("stages") or IR18_STAGES)]
    if min(batches) < 1 or min(args.groups) < 1 or args.experts < 1:
        raise ValueError(f"--batch, --groups and --experts must be ≥ 1, got {batches}, {args.groups}, {args.experts}")
    for channels, _ in stages:
        for groups in args.groups:
            if channels % groups:
                raise ValueError(f"--groups {groups} does not divide the {channels} channels of a stage")
    return batches, stages, args.dtype or quick.get("dtype") or list(DTYPES)


def _inputs(batch: int, channels: int, side: int, groups: int, n_experts: int, dtype: torch.dtype,
            device: Device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, He-scaled experts and softmax routing, each collecting a gradient."""
    generator = torch.Generator(device=device.torch_device).manual_seed(0)
    on = dict(device=device.torch_device, generator=generator)
    in_group = channels // groups
    x = torch.randn(batch, channels, side, side, **on)
    experts = torch.randn(groups, n_experts, channels // groups, in_group, KSIZE, KSIZE, **on)
    experts *= (2.0 / (in_group * KSIZE * KSIZE)) ** 0.5
    routing = torch.randn(batch, groups, n_experts, **on).softmax(-1)
    return tuple(t.to(dtype).requires_grad_() for t in (x, experts, routing))


def _build(method: str, inputs: tuple) -> Callable[[], object]:
    """Forward + backward of ``method``: the gradients of Σ out·grad_out (grad_out = 1)."""
    from facekd.kernels import dyn_group_conv2d
    from facekd.kernels.dyn_group_conv import reference_dyn_group_conv2d

    x, experts, routing = inputs
    if method == "static_conv":
        weight = experts[:, 0].reshape(-1, *experts.shape[3:]).detach().requires_grad_()
        return lambda: torch.autograd.grad(F.conv2d(x, weight, padding=1, groups=experts.shape[0]).sum(), (x, weight))
    conv = dyn_group_conv2d if method == "facekd" else reference_dyn_group_conv2d
    return lambda: torch.autograd.grad(conv(x, experts, routing, stride=1, padding=1).sum(), inputs)


def _measure(fn: Callable[[], object], device: Device) -> dict:
    timing = time_ms(fn, device)
    release_memory(device)
    return {**timing, "peak_bytes": peak_memory_bytes(fn, device)}


def _bench_config(batch, channels, side, groups, n_experts, dtype_name, methods, device) -> list[dict]:
    base = {"stage": f"{channels}x{side}", "B": batch, "m": groups, "n": n_experts, "dtype": dtype_name}
    try:
        inputs = _inputs(batch, channels, side, groups, n_experts, DTYPES[dtype_name], device)
    except torch.cuda.OutOfMemoryError:
        release_memory(device)
        return [{**base, "method": method, "status": OOM} for method in methods]
    results = {method: guard_oom(lambda: _measure(_build(method, inputs), device), device) for method in methods}
    del inputs
    release_memory(device)
    flops = 3 * 2 * batch * channels * (channels // groups) * KSIZE * KSIZE * side * side
    baseline = results.get("torch_grouped", {})
    baseline_ms = baseline.get("ms") if baseline.get("status") == "ok" else None
    baseline_peak = baseline.get("peak_bytes")
    peak = device.peak_tflops(dtype_name)
    rows = []
    for method, result in results.items():
        row = {**base, "method": method, **result}
        if result.get("status") == "ok":
            row["tflops"] = flops / (result["ms"] * 1e9)
            row["peak_fraction"] = row["tflops"] / peak if peak else None
            if baseline_ms:
                row["vs_torch"] = baseline_ms / result["ms"]
            if result.get("peak_bytes"):
                row["peak_gb"] = result["peak_bytes"] / 2**30
                if baseline_peak:
                    row["memory_vs_torch"] = result["peak_bytes"] / baseline_peak
        rows.append(row)
    return rows


COLUMNS = (
    Column("stage", "C×H"), Column("m", "m"), Column("n", "n"), Column("B", "B"), Column("dtype", "dtype"),
    Column("method", "method"), Column("status", "status"), Column("ms", "time ms", "{:.3f}"),
    Column("tflops", "TFLOP/s", "{:.2f}"), Column("peak_fraction", "× dense peak", "{:.3f}"),
    Column("peak_gb", "peak GiB", "{:.2f}"), Column("vs_torch", "speed-up vs torch_grouped", "{:.2f}"),
    Column("memory_vs_torch", "peak / torch_grouped's", "{:.2f}"),
)
CHART = Chart(x="B", y="ms", series="method", panel=("stage", "m", "dtype"), x_label="batch B",
              y_label="forward + backward, ms (median)", title="dynamic group conv: facekd vs aggregate-then-conv")


def run(args: argparse.Namespace) -> dict[str, Path]:
    """Measure the grid, write results/<device>/dgconv.{json,md,png}; returns their paths."""
    device = Device.detect(args.device)
    batches, stages, dtypes = _grid(args, device)
    methods = list(args.methods or METHODS)
    rows = []
    for dtype_name in dtypes:
        for channels, side in stages:
            for groups in args.groups:
                for batch in batches:
                    rows += _bench_config(batch, channels, side, groups, args.experts, dtype_name, methods, device)
    notes = {
        "shapes": f"3×3 stride-1 convolutions, C→C channels on H×H maps, n = {args.experts} experts per group",
        "flops": "3·2·B·C·(C/m)·9·H² useful FLOPs per forward+backward, the mixing not counted",
        "peak": device.peak_note,
    }
    return write_results(args.out, BENCH, device, rows, notes=notes, columns=COLUMNS, chart=CHART,
                         key=("stage", "B", "m", "n", "dtype", "method"))
