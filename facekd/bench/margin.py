"""``facekd bench margin``: the fused margin-softmax CE against the baselines of shared/BENCH.md.

For every (B, C, dtype, margin) of the grid, one process measures forward + backward (both
gradients) of:

* ``facekd`` — :func:`facekd.kernels.margin_softmax_ce` (Triton on CUDA, the reference on CPU);
* ``torch_eager`` — normalise, matmul, margin, ``F.cross_entropy``: B×C fp32 logits;
* ``torch_compile`` — ``torch.compile`` of the same function;
* with margin ``none`` (s·cos θ only), the fused linear-CE kernels users know, where importable:
  ``liger`` (Liger-Kernel), ``cce`` (Apple's cut-cross-entropy), ``torch_linear_ce`` (torch's own
  chunked ``F.linear_cross_entropy``). They get pre-normalised inputs, so their time leaves out
  the normalisation that the others include;
* ``matmul_bf16`` — one plain bf16 [B, D] × [D, C] matmul: the rate reference of the same run.

On the Triton path, ``facekd:forward``, ``facekd:grad_embeddings`` and ``facekd:grad_weight`` time
the three kernel phases alone (where the time goes). FLOPs are counted as 8·B·C·D for forward +
backward (logits, their recompute, two gradient GEMMs); the phases count 2, 4 and 4·B·C·D. Peak
memory is held against the inputs + weight + gradients lower bound. Results of several
invocations accumulate in one JSON per device (each configuration is measured whole in one).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from facekd.bench.common import (
    DTYPES,
    OOM,
    STANDARD_CLASSES,
    add_grid_arguments,
    grid,
    Chart,
    Column,
    Device,
    guard_oom,
    peak_memory_bytes,
    release_memory,
    time_ms,
    write_results,
)

BENCH = "margin"
MARGINS = {
    "arcface": dict(s=64.0, m1=1.0, m2=0.5, m3=0.0),
    "none": dict(s=64.0, m1=1.0, m2=0.0, m3=0.0),
}
METHODS = ("facekd", "torch_eager", "torch_compile", "liger", "cce", "torch_linear_ce", "matmul_bf16")
# only meaningful without a margin: plain linear cross-entropy kernels
MARGIN_FREE_METHODS = ("liger", "cce", "torch_linear_ce")
# C searched for the largest that fits: webface42m × 2^k
FIT_SCALES = (1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8, 16)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``facekd bench margin`` (also part of ``facekd bench kernels``)."""
    add_grid_arguments(parser, dim_help="embedding dimension D")
    parser.add_argument("--margins", nargs="+", choices=sorted(MARGINS), default=sorted(MARGINS),
                        help="arcface (m2 = 0.5) and/or none (s·cos θ: the fused linear-CE baselines run)")
    parser.add_argument("--methods", nargs="+", choices=METHODS,
                        help="methods to measure (default all; torch_compile only on CUDA)")
    parser.add_argument("--fit", action="store_true",
                        help="also find the largest C (webface42m × 2^k) whose forward+backward fits, per method")


def _methods(args: argparse.Namespace, device: Device) -> list[str]:
    if args.methods:
        return list(args.methods)
    # torch.compile on CPU needs a C++ toolchain and minutes of compiling: ask for it by name
    return [m for m in METHODS if device.is_cuda or m != "torch_compile"]


# ---------------------------------------------------------------------------------------------
# The functions measured: each returns the gradients of embeddings and weight
# ---------------------------------------------------------------------------------------------


def eager_margin_ce(x, w, labels, s, m1, m2, m3):
    """The textbook eager form: normalised copies, [B, C] fp32 logits, margin on the target column."""
    cos = F.linear(F.normalize(x, dim=1), F.normalize(w, dim=1)).float()
    target = cos.gather(1, labels[:, None])
    theta = torch.acos(target.clamp(-1.0 + 1e-7, 1.0 - 1e-7))
    theta_limit = (math.pi - m2) / m1
    margined = torch.cos(m1 * theta + m2)
    if theta_limit < math.pi:  # the fallback of facekd.kernels.margin_ce
        margined = torch.where(theta <= theta_limit, margined, target - math.cos(theta_limit) - 1.0)
    logits = cos.scatter(1, labels[:, None], margined - m3) * s
    return F.cross_entropy(logits, labels)


def _gradients(loss_fn: Callable[[], torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> Callable[[], tuple]:
    return lambda: torch.autograd.grad(loss_fn(), inputs)


def _margin_free_baseline(method: str, x, w, labels, s) -> Callable[[], tuple]:
    """A fused linear-CE kernel on pre-normalised leaves s·x̂ and ŵ (ImportError if not installed)."""
    scaled_x = (s * F.normalize(x.detach(), dim=1)).requires_grad_()
    unit_w = F.normalize(w.detach(), dim=1).requires_grad_()
    if method == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return _gradients(lambda: liger_fused_linear_cross_entropy(scaled_x, unit_w, labels), (scaled_x, unit_w))
    if method == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return _gradients(lambda: linear_cross_entropy(scaled_x, unit_w, labels), (scaled_x, unit_w))
    if not hasattr(F, "linear_cross_entropy"):
        raise ImportError(f"torch {torch.__version__} has no F.linear_cross_entropy")
    options = torch.nn.LinearCrossEntropyOptions()
    return _gradients(lambda: F.linear_cross_entropy(scaled_x, unit_w, labels, options=options), (scaled_x, unit_w))


def _measure(fn: Callable[[], object], device: Device) -> dict:
    timing = time_ms(fn, device)
    release_memory(device)
    return {**timing, "peak_bytes": peak_memory_bytes(fn, device)}


def _measure_baseline(build: Callable[[], Callable[[], object]], device: Device) -> dict:
    """Third-party or compiled baselines: a missing wheel or a failed compile is recorded, not raised."""
    try:
        fn = build()
    except ImportError as error:
        return {"status": f"unavailable: {error}"}
    try:
        return guard_oom(lambda: _measure(fn, device), device)
    except (RuntimeError, TypeError, ValueError, AssertionError) as error:
        release_memory(device)
        return {"status": f"error: {type(error).__name__}: {str(error).splitlines()[0][:160]}"}


def _phases(x, w, labels, margin: dict, device: Device) -> dict[str, dict]:
    """The Triton path's three phases timed alone: forward, ∂embeddings, ∂weight."""
    from facekd.kernels import margin_ce

    params = margin_ce._Margin.build(margin["s"], margin["m1"], margin["m2"], margin["m3"], "exact")
    x, w = x.detach(), w.detach()
    target_logit, slope, row_max, sum_exp, norms = margin_ce._triton_forward(x, w, labels, None, params)
    lse = row_max + torch.log(sum_exp)
    grad_rows = torch.full_like(lse, 1.0 / x.shape[0])

    def backward(need_x: bool, need_w: bool) -> Callable[[], tuple]:
        return lambda: margin_ce._triton_backward(x, w, labels, None, params, lse, target_logit, slope, grad_rows,
                                                  need_x=need_x, need_w=need_w, norms=norms)

    phases = {
        "facekd:forward": (lambda: margin_ce._triton_forward(x, w, labels, None, params), 2),
        "facekd:grad_embeddings": (backward(True, False), 4),
        "facekd:grad_weight": (backward(False, True), 4),
    }
    return {name: {**guard_oom(lambda fn=fn: time_ms(fn, device), device), "flop_factor": factor}
            for name, (fn, factor) in phases.items()}


def _largest_fit(method: str, batch: int, dim: int, dtype: torch.dtype, margin: dict, device: Device) -> int | None:
    """Largest C = webface42m × 2^k whose forward + backward runs without running out of memory."""
    largest = None
    for scale in FIT_SCALES:
        n_classes = int(STANDARD_CLASSES[-1] * scale)
        outcome = guard_oom(lambda: _fit_once(method, batch, n_classes, dim, dtype, margin, device), device)
        if outcome["status"] == OOM:
            break
        largest = n_classes
    return largest


def _fit_once(method, batch, n_classes, dim, dtype, margin, device) -> dict:
    fn, _ = _build(method, *_inputs(batch, n_classes, dim, dtype, device), margin)
    fn()
    device.synchronize()
    return {}


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------


def _inputs(batch: int, n_classes: int, dim: int, dtype: torch.dtype, device: Device):
    generator = torch.Generator(device=device.torch_device).manual_seed(0)
    x = torch.randn(batch, dim, device=device.torch_device, dtype=dtype, generator=generator).requires_grad_()
    w = torch.randn(n_classes, dim, device=device.torch_device, dtype=dtype, generator=generator).requires_grad_()
    labels = torch.randint(0, n_classes, (batch,), device=device.torch_device, generator=generator)
    return x, w, labels


def _build(method: str, x, w, labels, margin: dict) -> tuple[Callable[[], object], int]:
    """(function to time, FLOPs per call in units of B·C·D)."""
    from facekd.kernels.margin_ce import margin_softmax_ce

    if method == "facekd":
        return _gradients(lambda: margin_softmax_ce(x, w, labels, check_values=False, **margin), (x, w)), 8
    if method == "torch_eager":
        return _gradients(lambda: eager_margin_ce(x, w, labels, **margin), (x, w)), 8
    if method == "torch_compile":
        torch._dynamo.reset()
        compiled = torch.compile(eager_margin_ce, dynamic=False)
        return _gradients(lambda: compiled(x, w, labels, **margin), (x, w)), 8
    if method == "matmul_bf16":
        a = x.detach().to(torch.bfloat16)
        b = w.detach().to(torch.bfloat16).T
        return (lambda: a @ b), 2
    return _margin_free_baseline(method, x, w, labels, margin["s"]), 8


def _bench_config(batch, n_classes, dim, dtype_name, margin_name, methods, device) -> list[dict]:
    dtype = DTYPES[dtype_name]
    margin = MARGINS[margin_name]
    base = {"B": batch, "C": n_classes, "D": dim, "dtype": dtype_name, "margin": margin_name}
    element = torch.finfo(dtype).bits // 8
    # inputs + weight + both gradients (+ labels): what any implementation must hold
    lower_bound = 2 * (batch + n_classes) * dim * element + 8 * batch
    try:
        x, w, labels = _inputs(batch, n_classes, dim, dtype, device)
    except torch.cuda.OutOfMemoryError:
        release_memory(device)
        return [{**base, "method": m, "status": OOM} for m in methods]
    results: dict[str, dict] = {}
    for method in methods:
        if method in MARGIN_FREE_METHODS and margin_name != "none":
            continue
        if method == "facekd":
            results[method] = guard_oom(lambda: _measure(_build(method, x, w, labels, margin)[0], device), device)
        else:
            results[method] = _measure_baseline(lambda: _build(method, x, w, labels, margin)[0], device)
        results[method]["flop_factor"] = 8 if method != "matmul_bf16" else 2
    from facekd.kernels.backend import use_triton

    if "facekd" in methods and use_triton(x, w, labels) and results["facekd"]["status"] == "ok":
        results.update(_phases(x, w, labels, margin, device))
    del x, w, labels
    release_memory(device)
    return _rows(base, results, lower_bound, device)


def _rows(base: dict, results: dict[str, dict], lower_bound: int, device: Device) -> list[dict]:
    """Rates, memory and the ratios to the baselines of the same configuration."""
    bcd = base["B"] * base["C"] * base["D"]

    def ok_ms(method: str) -> float | None:
        result = results.get(method, {})
        return result.get("ms") if result.get("status") == "ok" else None

    matmul_ms, eager_ms, compile_ms = ok_ms("matmul_bf16"), ok_ms("torch_eager"), ok_ms("torch_compile")
    matmul_tflops = 2 * bcd / (matmul_ms * 1e9) if matmul_ms else None
    peak = device.peak_tflops(base["dtype"])
    rows = []
    for method, result in results.items():
        row = {**base, "method": method, **{k: v for k, v in result.items() if k != "flop_factor"}}
        ms = ok_ms(method)
        if ms:
            tflops = result["flop_factor"] * bcd / (ms * 1e9)
            row["tflops"] = tflops
            row["matmul_fraction"] = tflops / matmul_tflops if matmul_tflops else None
            row["peak_fraction"] = tflops / peak if peak else None
            is_whole_step = not method.startswith("facekd:") and method != "matmul_bf16"
            row["vs_eager"] = ms / eager_ms if eager_ms and is_whole_step else None
            row["vs_compile"] = ms / compile_ms if compile_ms and is_whole_step else None
        if row.get("peak_bytes"):
            row["peak_gb"] = row["peak_bytes"] / 2**30
            row["memory_ratio"] = row["peak_bytes"] / lower_bound
        rows.append(row)
    return rows


COLUMNS = (
    Column("B", "B"), Column("C", "C", "{:,}"), Column("dtype", "dtype"), Column("margin", "margin"),
    Column("method", "method"), Column("status", "status"), Column("ms", "time ms", "{:.3f}"),
    Column("tflops", "TFLOP/s", "{:.1f}"), Column("matmul_fraction", "× bf16 matmul rate", "{:.2f}"),
    Column("peak_fraction", "× dense peak", "{:.2f}"), Column("peak_gb", "peak GiB", "{:.2f}"),
    Column("memory_ratio", "peak / (inputs+grads)", "{:.2f}"), Column("vs_eager", "time / eager", "{:.2f}"),
    Column("vs_compile", "time / compile", "{:.2f}"),
)
CHART = Chart(x="C", y="ms", series="method", panel=("dtype", "B", "margin"), x_label="classes C",
              y_label="forward + backward, ms (median)", title="fused margin-softmax CE vs baselines")


def run(args: argparse.Namespace) -> dict[str, Path]:
    """Measure the grid, write results/<device>/margin.{json,md,png}; returns their paths."""
    device = Device.detect(args.device)
    batches, classes, dtypes, dim = grid(args, device)
    methods = _methods(args, device)
    rows = []
    for dtype_name in dtypes:
        for batch in batches:
            for n_classes in classes:
                for margin_name in args.margins:
                    rows += _bench_config(batch, n_classes, dim, dtype_name, margin_name, methods, device)
    notes = {
        "flops": ("8·B·C·D per forward+backward (logits, their recompute, two gradient GEMMs); "
                  "phases 2/4/4·B·C·D"),
        "peak": device.peak_note,
        "baselines": "liger, cce and torch_linear_ce get pre-normalised inputs (margin none only)",
    }
    if args.fit:
        if not device.is_cuda:
            raise ValueError("--fit searches C up to 33M classes: it needs a CUDA device")
        fit_dtype = DTYPES[dtypes[0]]
        notes["largest_classes_that_fit"] = {
            method: _largest_fit(method, max(batches), dim, fit_dtype, MARGINS["arcface"], device)
            for method in methods if method in ("facekd", "torch_eager", "torch_compile")
        }
    return write_results(args.out, BENCH, device, rows, notes=notes, columns=COLUMNS, chart=CHART,
                         key=("B", "C", "D", "dtype", "margin", "method"))
