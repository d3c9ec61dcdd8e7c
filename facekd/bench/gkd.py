"""``facekd bench gkd``: the fused grouped KD against the sort-based torch reference of shared/BENCH.md.

For every (B, C, dtype, form) of the grid, one process measures forward + backward (the student's
gradients) of:

* form ``logits`` — student and teacher logits [B, C] are given:
  ``facekd`` (:func:`facekd.kernels.grouped_kd_loss`: Triton on CUDA, the reference on CPU),
  ``torch_sort`` (:func:`~facekd.kernels.grouped_kd.reference_grouped_kd_loss`: the paper's rule
  with a full ``torch.sort`` of every row), and ``classic_kd`` (Hinton's KL over all classes, the
  floor any logit distillation pays);
* form ``embeddings`` — embeddings [B, D] and class centres [C, D] of both networks are given:
  ``facekd`` (:func:`facekd.kernels.grouped_kd.grouped_kd_loss_from_embeddings`, no B×C buffer)
  against ``torch_sort`` (normalise, two matmuls to fp32 logits, the same sort-based reference),
  with ``matmul_bf16`` (one [B, D] × [D, C] bf16 matmul) as the rate reference of the run.

On the Triton path ``facekd:forward`` times the loss alone. The embeddings form counts its useful
FLOPs as 8·B·C·D (two logit GEMMs, two gradient GEMMs), whatever the kernels recompute. Inputs
imitate a face head: each sample's embedding lies near its class centre (cos ≈ 0.3) among C
random centres, so k (the primary group's size) is what a partly trained student gives; the
JSON records the mean k where the reference can afford the mask. Peak memory is held against the
inputs + gradients lower bound.
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

BENCH = "gkd"
FORMS = ("logits", "embeddings")
METHODS = ("facekd", "torch_sort", "classic_kd", "matmul_bf16")
FORM_METHODS = {"logits": ("facekd", "torch_sort", "classic_kd"),
                "embeddings": ("facekd", "torch_sort", "matmul_bf16")}
SCALE = 64.0  # GKD "Implementation Details": ArcFace s = 64
MAX_MASK_ELEMENTS = 2**27  # mean k is measured through the reference's [B, C] mask up to this size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``facekd bench gkd`` (also part of ``facekd bench kernels``)."""
    add_grid_arguments(parser, dim_help="embedding dimension D of both networks")
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS),
                        help="logits given, or embeddings and class centres given")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="methods to measure (default all)")
    parser.add_argument("--tau", type=float, default=0.93, help="cumulative threshold τ (default 0.93, GKD Table 2)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature T (default 1)")


def _grid(args: argparse.Namespace, device: Device) -> tuple[list[int], list[int], list[str], int]:
    if not 0.0 < args.tau <= 1.0 or not args.temperature > 0.0:
        raise ValueError(f"--tau must be in (0, 1] and --temperature > 0, got {args.tau} and {args.temperature}")
    return grid(args, device)


# ---------------------------------------------------------------------------------------------
# Inputs and the functions measured: each returns the student's gradients
# ---------------------------------------------------------------------------------------------


def _embeddings(batch: int, n_classes: int, dim: int, dtype: torch.dtype, device: Device) -> tuple:
    """Student and teacher embeddings [B, D] near their label's centre, and centres [C, D]."""
    generator = torch.Generator(device=device.torch_device).manual_seed(0)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device.torch_device, dtype=dtype, generator=generator)

    labels = torch.randint(0, n_classes, (batch,), device=device.torch_device, generator=generator)
    student_centres, teacher_centres = draw(n_classes, dim), draw(n_classes, dim)
    # cos(e, w_y) ≈ 1/√(1 + σ²): 0.3 for the student, 0.6 for the teacher
    student = student_centres[labels] + 3.2 * draw(batch, dim)
    teacher = teacher_centres[labels] + 1.3 * draw(batch, dim)
    return student, student_centres, teacher, teacher_centres


def _cosine_logits(embeddings: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """s·cos θ [B, C] in the inputs' dtype: what a network's normalised head outputs."""
    return SCALE * F.linear(F.normalize(embeddings, dim=1), F.normalize(centres, dim=1))


def _classic_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    log_student = torch.log_softmax(student.float() / temperature, dim=1)
    log_teacher = torch.log_softmax(teacher.float() / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * temperature**2


def _gradients(loss_fn: Callable[[], torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> Callable[[], tuple]:
    return lambda: torch.autograd.grad(loss_fn(), inputs)


def _build(method: str, form: str, inputs: tuple, options: dict) -> Callable[[], object]:
    from facekd.kernels import grouped_kd_loss
    from facekd.kernels.grouped_kd import grouped_kd_loss_from_embeddings, reference_grouped_kd_loss

    if form == "logits":
        student, teacher = inputs
        if method == "facekd":
            return _gradients(lambda: grouped_kd_loss(student, teacher, **options), (student,))
        if method == "facekd:forward":
            return lambda: grouped_kd_loss(student.detach(), teacher, **options)
        if method == "torch_sort":
            return _gradients(lambda: reference_grouped_kd_loss(student, teacher, **options), (student,))
        return _gradients(lambda: _classic_kd(student, teacher, options["temperature"]), (student,))
    student, student_centres, teacher, teacher_centres = inputs
    if method == "facekd":
        return _gradients(lambda: grouped_kd_loss_from_embeddings(
            student, student_centres, teacher, teacher_centres, s=SCALE, **options), (student, student_centres))
    if method == "facekd:forward":
        return lambda: grouped_kd_loss_from_embeddings(
            student.detach(), student_centres.detach(), teacher, teacher_centres, s=SCALE, **options)
    if method == "torch_sort":
        return _gradients(lambda: reference_grouped_kd_loss(
            _cosine_logits(student, student_centres), _cosine_logits(teacher, teacher_centres), **options),
            (student, student_centres))
    a = student.detach().to(torch.bfloat16)
    b = student_centres.detach().to(torch.bfloat16).T
    return lambda: a @ b


def _inputs(form: str, batch: int, n_classes: int, dim: int, dtype: torch.dtype, device: Device) -> tuple:
    student, student_centres, teacher, teacher_centres = _embeddings(batch, n_classes, dim, dtype, device)
    if form == "logits":
        with torch.no_grad():
            logits = (_cosine_logits(student, student_centres), _cosine_logits(teacher, teacher_centres))
        del student, student_centres, teacher, teacher_centres
        return logits[0].requires_grad_(), logits[1]
    return student.requires_grad_(), student_centres.requires_grad_(), teacher, teacher_centres


def _mean_k(form: str, inputs: tuple, options: dict) -> float | None:
    """Mean size of the primary group under the reference's rule, where its mask is affordable."""
    from facekd.kernels.grouped_kd import reference_primary_mask

    student = inputs[0] if form == "logits" else _cosine_logits(inputs[0].detach(), inputs[1].detach())
    if student.numel() > MAX_MASK_ELEMENTS:
        return None
    mask = reference_primary_mask(student, tau=options["tau"], temperature=options["temperature"])
    return mask.sum(1).double().mean().item()


def _measure(fn: Callable[[], object], device: Device) -> dict:
    timing = time_ms(fn, device)
    release_memory(device)
    return {**timing, "peak_bytes": peak_memory_bytes(fn, device)}


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------


def _bench_config(form, batch, n_classes, dim, dtype_name, methods, options, device) -> list[dict]:
    from facekd.kernels.backend import use_triton

    dtype = DTYPES[dtype_name]
    base = {"form": form, "B": batch, "C": n_classes, "D": dim, "dtype": dtype_name,
            "tau": options["tau"], "T": options["temperature"]}
    element = torch.finfo(dtype).bits // 8
    if form == "logits":  # both logits and the student's gradient
        lower_bound = 3 * batch * n_classes * element
    else:  # both networks' embeddings and centres, the student's gradients
        lower_bound = 3 * (batch + n_classes) * dim * element
    try:
        inputs = _inputs(form, batch, n_classes, dim, dtype, device)
    except torch.cuda.OutOfMemoryError:
        release_memory(device)
        return [{**base, "method": m, "status": OOM} for m in methods]
    mean_k = guard_oom(lambda: {"mean_k": _mean_k(form, inputs, options)}, device).get("mean_k")
    chosen = [m for m in methods if m in FORM_METHODS[form]]
    if "facekd" in chosen and use_triton(*inputs):
        chosen.append("facekd:forward")
    results = {method: guard_oom(lambda: _measure(_build(method, form, inputs, options), device), device)
               for method in chosen}
    del inputs
    release_memory(device)
    return _rows({**base, "mean_k": mean_k}, results, lower_bound, device)


def _rows(base: dict, results: dict[str, dict], lower_bound: int, device: Device) -> list[dict]:
    """Rates, memory and the ratio to the sort-based reference of the same configuration."""
    bcd = base["B"] * base["C"] * base["D"]

    def ok_ms(method: str) -> float | None:
        result = results.get(method, {})
        return result.get("ms") if result.get("status") == "ok" else None

    sort_ms = ok_ms("torch_sort")
    peak = device.peak_tflops(base["dtype"])
    rows = []
    for method, result in results.items():
        row = {**base, "method": method, **result}
        ms = ok_ms(method)
        if ms and base["form"] == "embeddings" and method != "facekd:forward":
            tflops = (2 if method == "matmul_bf16" else 8) * bcd / (ms * 1e9)
            row["tflops"] = tflops
            row["peak_fraction"] = tflops / peak if peak else None
        if ms and sort_ms and method not in ("matmul_bf16", "facekd:forward"):
            row["vs_sort"] = ms / sort_ms
        if row.get("peak_bytes"):
            row["peak_gb"] = row["peak_bytes"] / 2**30
            row["memory_ratio"] = row["peak_bytes"] / lower_bound
        rows.append(row)
    return rows


COLUMNS = (
    Column("form", "form"), Column("B", "B"), Column("C", "C", "{:,}"), Column("dtype", "dtype"),
    Column("mean_k", "mean k", "{:.1f}"), Column("method", "method"), Column("status", "status"),
    Column("ms", "time ms", "{:.3f}"), Column("tflops", "TFLOP/s", "{:.1f}"),
    Column("peak_fraction", "× dense peak", "{:.2f}"), Column("peak_gb", "peak GiB", "{:.2f}"),
    Column("memory_ratio", "peak / (inputs+grads)", "{:.2f}"), Column("vs_sort", "time / torch_sort", "{:.2f}"),
)
CHART = Chart(x="C", y="ms", series="method", panel=("form", "dtype", "B"), x_label="classes C",
              y_label="forward + backward, ms (median)", title="grouped KD: fused vs sort-based torch")


def run(args: argparse.Namespace) -> dict[str, Path]:
    """Measure the grid, write results/<device>/gkd.{json,md,png}; returns their paths."""
    device = Device.detect(args.device)
    batches, classes, dtypes, dim = _grid(args, device)
    methods = list(args.methods or METHODS)
    options = {"tau": args.tau, "temperature": args.temperature}
    rows = []
    for form in args.forms:
        for dtype_name in dtypes:
            for batch in batches:
                for n_classes in classes:
                    rows += _bench_config(form, batch, n_classes, dim, dtype_name, methods, options, device)
    notes = {
        "inputs": "embeddings near their class centre (student cos ≈ 0.3, teacher ≈ 0.6), s = 64",
        "flops": "embeddings form: 8·B·C·D useful FLOPs per forward+backward, recomputation not counted",
        "peak": device.peak_note,
    }
    return write_results(args.out, BENCH, device, rows, notes=notes, columns=COLUMNS, chart=CHART,
                         key=("form", "B", "C", "D", "dtype", "tau", "T", "method"))
