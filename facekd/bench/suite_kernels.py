"""Items 1-3 of the GPU suite: kernel correctness, the margin-softmax CE and the grouped KD.

The measurements reuse the benchmarks' own configurations (:func:`facekd.bench.margin._bench_config`,
:func:`facekd.bench.gkd._bench_config`): the same inputs, baselines, timing and ratios as
``facekd bench margin|gkd``, at the suite's sizes.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import math
import pkgutil
import statistics
import time
from typing import Callable

import torch

from facekd.bench.common import DTYPES, OOM, Device, draw_chart, guard_oom
from facekd.bench.gpu_suite import Deadline, Suite, attempt, device_healthy

logger = logging.getLogger(__name__)

# the GKD paper's selection (Table 2) at the paper's temperature (Eq. 1)
GKD_OPTIONS = {"tau": 0.93, "temperature": 1.0}
MARGIN_METHODS = ("facekd", "torch_eager", "matmul_bf16")
FIT_METHODS = ("facekd", "torch_eager")
FIT_PRECISION = 1.05  # the fit search stops when largest-fitting and smallest-failing C are this close
FIT_PROBE_S = 3.0  # first guess of one fit probe on a GPU


def _kernels_path(suite: Suite) -> contextlib.AbstractContextManager:
    """The Triton path for facekd's kernels: automatic on CUDA, the interpreter in the dry run."""
    from facekd.kernels.checks import kernel_backend

    return kernel_backend("triton") if suite.dry_run else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# 1. Correctness
# ---------------------------------------------------------------------------------------------


def import_kernel_modules() -> list[dict]:
    """Import every module of facekd.kernels, so that each registers its cases; import failures as rows."""
    import facekd.kernels as package

    failures = []
    for module in pkgutil.iter_modules(package.__path__):
        try:
            importlib.import_module(f"{package.__name__}.{module.name}")
        except Exception as error:  # a broken kernel module is reported like a failing kernel
            failures.append({"case": f"{module.name} (import)", "status": "error",
                             "error": f"{type(error).__name__}: {error}"})
    return failures


def correctness(suite: Suite, deadline: Deadline) -> dict:
    """Every registered case in every dtype its tolerance table covers, most valuable dtype first."""
    from facekd.kernels import checks

    rows = import_kernel_modules()
    durations: list[float] = []
    broken_by = None
    for dtype_name in suite.sizes.check_dtypes:
        dtype = DTYPES[dtype_name]
        for case in checks.all_cases():
            if dtype not in case.tolerances:
                continue
            shape = case.tiny if suite.sizes.tiny_kernel_shapes else case.realistic
            row = {"case": case.name, "dtype": dtype_name, "shape": " ".join(f"{k}={v}" for k, v in shape.items())}
            estimate = 1.5 * statistics.median(durations) if durations else 0.0
            if broken_by or not deadline.allows(estimate):
                why = (f"the CUDA context broke in {broken_by}" if broken_by else
                       f"~{estimate:.0f} s needed, {max(deadline.left(), 0):.0f} s left")
                rows.append({**row, "status": "skipped", "error": why})
                continue
            begin = time.perf_counter()
            rows.append({**row, **_check(case, dtype, suite.device, tiny=suite.sizes.tiny_kernel_shapes)})
            durations.append(time.perf_counter() - begin)
            rows[-1]["seconds"] = durations[-1]
            if rows[-1]["status"] == "error" and not device_healthy(suite.device):
                broken_by = f"{case.name} ({dtype_name})"  # every later case would fail for that alone
    counts = {status: sum(row["status"] == status for row in rows) for status in ("pass", "FAIL", "error", "skipped")}
    return {"status": "partial" if counts["skipped"] else "ok", "rows": rows, "counts": counts,
            "shapes": "tiny" if suite.sizes.tiny_kernel_shapes else "realistic"}


def _check(case, dtype: torch.dtype, device: Device, *, tiny: bool) -> dict:
    from facekd.kernels import checks

    try:
        outputs = checks.check_case(case, dtype, device.torch_device, tiny=tiny)
    except Exception as error:  # a kernel that raises is reported like one that is wrong, and the next runs
        logger.exception("kernel case %s (%s) raised", case.name, dtype)
        return {"status": "error", "error": f"{type(error).__name__}: {str(error)[:300]}"}
    worst = max(outputs, key=lambda output: output.worst)
    return {"status": "pass" if all(output.passed for output in outputs) else "FAIL",
            "worst": worst.worst, "worst_output": worst.name,
            "outputs": [output.__dict__ for output in outputs]}


# ---------------------------------------------------------------------------------------------
# 2. Margin-softmax CE
# ---------------------------------------------------------------------------------------------


def margin_ce(suite: Suite, deadline: Deadline) -> dict:
    """facekd against eager, matmul (all C), the largest C that fits, then torch.compile while time allows."""
    from facekd.bench import margin as margin_bench

    sizes, device = suite.sizes, suite.device
    batch, dim, dtype = sizes.margin_batch, sizes.margin_dim, sizes.margin_dtype
    rows, notes = [], []
    with _kernels_path(suite):
        # facekd, eager and the matmul at every C: cost grows with C
        previous = None  # (C, seconds)
        for n_classes in sizes.margin_classes:
            estimate = previous[1] * n_classes / previous[0] if previous else sizes.first_margin_config_s
            if not deadline.allows(estimate):
                notes.append(f"C = {n_classes:,} skipped: ~{estimate:.0f} s needed, {deadline.left():.0f} s left")
                continue
            begin = time.perf_counter()
            rows += attempt(f"C = {n_classes:,}", lambda: margin_bench._bench_config(
                batch, n_classes, dim, dtype, "arcface", list(MARGIN_METHODS), device), notes)
            previous = (n_classes, time.perf_counter() - begin)
        fits = {}
        for method in FIT_METHODS:
            try:
                fits[method] = _largest_fit(method, suite, deadline, notes)
            except RuntimeError as error:  # anything but running out of memory ends this method's search
                logger.exception("largest-C search of %s failed", method)
                fits[method] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
        # torch.compile last: each C compiles afresh, and that costs more than everything above
        compile_s = sizes.first_compile_s
        if not device.is_cuda:
            notes.append("torch_compile not measured on CPU (inductor needs a C++ toolchain and minutes)")
        else:
            for n_classes in sizes.margin_classes:
                if not deadline.allows(compile_s):
                    notes.append(f"torch_compile at C = {n_classes:,} skipped: ~{compile_s:.0f} s needed, "
                                 f"{deadline.left():.0f} s left")
                    continue
                begin = time.perf_counter()
                rows += attempt(f"torch_compile at C = {n_classes:,}", lambda: margin_bench._bench_config(
                    batch, n_classes, dim, dtype, "arcface", ["torch_compile"], device), notes)
                compile_s = 1.2 * (time.perf_counter() - begin)
    _ratios_to_compile(rows)
    chart = suite.out / "margin_ce.png"
    draw_chart(rows, margin_bench.CHART, chart)
    element = torch.finfo(DTYPES[dtype]).bits // 8
    incomplete = any(word in note for note in notes for word in ("skipped", "failed", "stopped"))
    return {"status": "partial" if incomplete else "ok", "rows": rows, "largest_fit": fits, "notes": notes,
            "shape": {"B": batch, "D": dim, "dtype": dtype, "margin": "arcface"},
            "bytes_per_class_lower_bound": 2 * dim * element, "chart": chart.name}


def _ratios_to_compile(rows: list[dict]) -> None:
    """time / torch.compile for the rows of each C (compile runs in a pass of its own)."""
    compiled = {row["C"]: row["ms"] for row in rows if row["method"] == "torch_compile" and row.get("status") == "ok"}
    for row in rows:
        if row.get("status") == "ok" and row["C"] in compiled and row["method"] in ("facekd", "torch_eager"):
            row["vs_compile"] = row["ms"] / compiled[row["C"]]


def _largest_fit(method: str, suite: Suite, deadline: Deadline, notes: list[str]) -> dict:
    """The largest C whose forward + backward of ``method`` runs without running out of memory."""
    from facekd.bench import margin as margin_bench

    sizes, device = suite.sizes, suite.device
    batch, dim, dtype = sizes.margin_batch, sizes.margin_dim, DTYPES[sizes.margin_dtype]
    element = torch.finfo(dtype).bits // 8
    if sizes.simulated_memory_bytes is not None:
        memory = sizes.simulated_memory_bytes
    else:
        memory = torch.cuda.get_device_properties(device.torch_device).total_memory

    def fits(n_classes: int) -> bool:
        def attempt() -> dict:
            # inputs + weight + both gradients: a simulated device runs out above its size
            if sizes.simulated_memory_bytes is not None and 2 * (batch + n_classes) * dim * element > memory:
                raise torch.cuda.OutOfMemoryError(f"simulated: {n_classes} classes exceed {memory} bytes")
            return margin_bench._fit_once(method, batch, n_classes, dim, dtype, margin_bench.MARGINS["arcface"],
                                          device)

        return guard_oom(attempt, device)["status"] != OOM

    # the weight and its gradient alone fill the memory above this C
    ceiling = memory // (2 * dim * element) + 1
    probe_s = 0.0 if suite.dry_run else FIT_PROBE_S
    result = largest_fitting(fits, sizes.margin_classes[-1], ceiling, deadline=deadline, probe_s=probe_s)
    if not result["settled"]:
        notes.append(f"{method}: fit search stopped by the clock between {result['largest_fitting']} and "
                     f"{result['smallest_failing']} classes")
    return result


def largest_fitting(fits: Callable[[int], bool], start: int, ceiling: int, *, deadline: Deadline,
                    probe_s: float, precision: float = FIT_PRECISION) -> dict:
    """Bisection in log space for the largest n ≤ ``ceiling`` with ``fits(n)``, starting from ``start``.

    ``fits`` must be monotone (true up to some n, false above). The ceiling is probed first: when it
    fits, so does everything below it and ``smallest_failing`` stays None. Stops once the bracket's
    ratio is below ``precision``, or when the deadline leaves less than ``probe_s``.
    """
    probes = 0

    def probe(n: int) -> bool:
        nonlocal probes
        probes += 1
        return fits(n)

    if probe(ceiling):
        return {"largest_fitting": ceiling, "smallest_failing": None, "settled": True, "probes": probes}
    low, high = start, ceiling
    while not probe(low):
        if low == 1:
            return {"largest_fitting": None, "smallest_failing": 1, "settled": True, "probes": probes}
        high, low = low, max(low // 16, 1)
    while high / low > precision and deadline.allows(probe_s):
        middle = int(math.sqrt(low * high))
        if middle in (low, high):
            break
        if probe(middle):
            low = middle
        else:
            high = middle
    settled = high / low <= precision or high - low <= 1
    return {"largest_fitting": low, "smallest_failing": high, "settled": settled, "probes": probes}


# ---------------------------------------------------------------------------------------------
# 3. Grouped KD
# ---------------------------------------------------------------------------------------------


def grouped_kd(suite: Suite, deadline: Deadline) -> dict:
    """Both forms of the fused grouped KD against the sort-based reference, and against the fused
    margin CE of the same shape (what distillation adds to the classifier's own loss)."""
    from facekd.bench import gkd as gkd_bench
    from facekd.bench import margin as margin_bench

    sizes, device = suite.sizes, suite.device
    batch, n_classes, dim, dtype = sizes.gkd_batch, sizes.gkd_classes, sizes.gkd_dim, sizes.gkd_dtype
    rows, notes = [], []
    with _kernels_path(suite):
        margin_rows = attempt("fused margin CE", lambda: margin_bench._bench_config(
            batch, n_classes, dim, dtype, "arcface", ["facekd"], device), notes)
        form_s = sizes.first_gkd_form_s
        for form in ("embeddings", "logits"):
            if not deadline.allows(form_s):
                notes.append(f"form {form} skipped: ~{form_s:.0f} s needed, {deadline.left():.0f} s left")
                continue
            begin = time.perf_counter()
            rows += attempt(f"form {form}", lambda: gkd_bench._bench_config(
                form, batch, n_classes, dim, dtype, list(gkd_bench.METHODS), GKD_OPTIONS, device), notes)
            form_s = 1.2 * (time.perf_counter() - begin)
    margin_ms = next((row["ms"] for row in margin_rows if row["method"] == "facekd" and row.get("status") == "ok"),
                     None)
    for row in rows:
        if margin_ms and row.get("status") == "ok" and row["method"] in ("facekd", "torch_sort", "classic_kd"):
            row["vs_margin_ce"] = row["ms"] / margin_ms
    return {"status": "partial" if notes else "ok", "rows": rows, "margin_ce_rows": margin_rows, "notes": notes,
            "shape": {"B": batch, "C": n_classes, "D": dim, "dtype": dtype, **GKD_OPTIONS}}
