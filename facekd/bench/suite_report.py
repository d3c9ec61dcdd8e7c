"""summary.md of ``facekd bench gpu-suite``, rendered from the summary.json it writes.

Every figure is a ratio to a baseline measured in the same run, or an absolute figure whose column
names the device (the GPU, or the CPU for the data loader).
"""
from __future__ import annotations

from facekd.bench.common import Column, markdown_table

CORRECTNESS_COLUMNS = (
    Column("case", "case"), Column("dtype", "dtype"), Column("shape", "shape"), Column("status", "result"),
    Column("worst", "worst error / tolerance", "{:.3g}"), Column("worst_output", "worst output"),
    Column("error", "error"),
)
STATUS_COLUMNS = (Column("item", "item"), Column("status", "status"), Column("seconds", "seconds", "{:.0f}"),
                  Column("notes", "notes"))


def render_markdown(summary: dict) -> str:
    """The whole report: header, one status line per item, then each item's tables."""
    device = summary["device"]
    lines = [f"# facekd GPU suite on {device}", ""]
    lines.append(f"Started {summary['started']}; torch {summary['torch']}, triton {summary['triton']}, "
                 f"CUDA {summary['cuda']}, Python {summary['python']}; {summary['cpu_cores']} cores of {summary['cpu']}. "
                 f"Budget {summary['budget_s']:.0f} s, used {summary.get('elapsed_s', 0):.0f} s.")
    if summary["dry_run"]:
        lines += ["", "**Dry run**: tiny sizes on CPU, Triton kernels in the interpreter. It shows that the suite "
                      "works; its times and ratios say nothing about the kernels."]
    items = summary["items"]
    status_rows = [{"item": result["title"], "status": result["status"], "seconds": result["seconds"],
                    "notes": "; ".join(result.get("notes", [])) or result.get("error", "")}
                   for result in items.values()]
    lines += ["", markdown_table(status_rows, STATUS_COLUMNS)]
    sections = {"correctness": _correctness, "margin_ce": _margin_ce, "grouped_kd": _grouped_kd,
                "training_step": _training_step, "data": _data, "partial_fc": _partial_fc}
    for name, result in items.items():
        lines += [f"## {result['title']}", ""]
        if result["status"] == "failed":
            lines += [f"Failed: `{result['error']}`", "", "```", *result.get("traceback", []), "```", ""]
        elif result["status"] == "skipped":
            lines += [f"Skipped: {'; '.join(result.get('notes', []))}", ""]
        else:
            lines += [sections[name](result, summary), ""]
    return "\n".join(lines)


def _correctness(result: dict, summary: dict) -> str:
    device = summary["device"]
    counts = result["counts"]
    head = (f"{counts['pass']} passed, {counts['FAIL']} FAILED, {counts['error']} raised, {counts['skipped']} "
            f"skipped by the clock; {result['shapes']} shapes on {device}. Each case runs on the Triton path and "
            "on the plain-torch reference in float64, with the tolerances of the kernels' tests.\n\n")
    return head + markdown_table(result["rows"], CORRECTNESS_COLUMNS)


def _margin_ce(result: dict, summary: dict) -> str:
    device = summary["device"]
    shape = result["shape"]
    columns = (
        Column("C", "C", "{:,}"), Column("method", "method"), Column("status", "status"),
        Column("ms", f"time ms ({device})", "{:.3f}"), Column("vs_eager", "time / eager", "{:.2f}"),
        Column("vs_compile", "time / compile", "{:.2f}"),
        Column("matmul_fraction", "× bf16 matmul rate", "{:.2f}"), Column("peak_gb", f"peak GiB ({device})", "{:.2f}"),
        Column("memory_ratio", "peak / (inputs+weight+grads)", "{:.2f}"),
    )
    text = (f"Forward + backward at B = {shape['B']}, D = {shape['D']}, {shape['dtype']}, ArcFace margin. "
            "The bf16 matmul is one [B, D] × [D, C] product of the same run: its rate is the reference.\n\n")
    text += markdown_table(sorted(result["rows"], key=lambda row: (row["C"], row["method"])), columns)
    fit_lines = []
    for method, fit in result["largest_fit"].items():
        largest, failing = fit.get("largest_fitting"), fit.get("smallest_failing")
        if "error" in fit:
            fit_lines.append(f"- {method}: the search failed: `{fit['error']}`")
        elif largest is None:
            fit_lines.append(f"- {method}: not even {failing:,} classes fit")
        elif failing is None:
            fit_lines.append(f"- {method}: ≥ {largest:,} classes (the weight and its gradient alone fill the memory)")
        else:
            fit_lines.append(f"- {method}: {largest:,} classes fit, {failing:,} do not"
                             + ("" if fit["settled"] else " (search cut short by the clock)"))
    text += f"\nLargest C whose forward + backward fits on {device} (B = {shape['B']}, {shape['dtype']}):\n\n"
    return text + "\n".join(fit_lines) + "\n"


def _grouped_kd(result: dict, summary: dict) -> str:
    device = summary["device"]
    shape = result["shape"]
    margin_ms = next((row["ms"] for row in result["margin_ce_rows"] if row.get("status") == "ok"), None)
    columns = (
        Column("form", "form"), Column("method", "method"), Column("status", "status"),
        Column("ms", f"time ms ({device})", "{:.3f}"), Column("vs_sort", "time / torch_sort", "{:.2f}"),
        Column("vs_margin_ce", "time / fused margin CE", "{:.2f}"), Column("peak_gb", f"peak GiB ({device})", "{:.2f}"),
        Column("memory_ratio", "peak / (inputs+grads)", "{:.2f}"), Column("mean_k", "mean k", "{:.1f}"),
    )
    margin = f"{margin_ms:.3f} ms on {device}" if margin_ms else "not measured"
    text = (f"Forward + backward at B = {shape['B']}, C = {shape['C']:,}, D = {shape['D']}, {shape['dtype']}, "
            f"τ = {shape['tau']}, T = {shape['temperature']}. The fused margin CE of the same shape: {margin}.\n\n")
    return text + markdown_table(result["rows"], columns)


def _training_step(result: dict, summary: dict) -> str:
    device = summary["device"]
    setup = result["setup"]
    columns = (
        Column("config", "step"), Column("backbone", "backbone"), Column("status", "status"),
        Column("images_per_s", f"images/s ({device})", "{:,.0f}"), Column("ms", f"step ms ({device})", "{:.1f}"),
        Column("vs_student", "time / student alone", "{:.3f}"), Column("peak_gb", f"peak GiB ({device})", "{:.2f}"),
    )
    text = (f"One optimiser step of the trainer at batch {setup['batch']}, {setup['image_size']} px, "
            f"{setup['precision']}, {setup['classes']:,} classes, {setup['embedding_dim']}-d embeddings; student "
            f"MobileFaceNet ×{setup['student_width']}, frozen teacher {setup['teacher']} ×{setup['teacher_width']} "
            f"(untrained); data {setup['data']}.\n\n")
    text += markdown_table(result["rows"], columns)
    overheads = {row["config"]: row["overhead"] for row in result["rows"] if "overhead" in row}
    if "student_gkd" in overheads:
        text += (f"\nDistillation overhead with GKD: {overheads['student_gkd']:+.1%} over the student alone "
                 f"(GKD paper, Table 6: +{setup['gkd_paper_overhead']:.0%}; target under "
                 f"+{setup['overhead_target']:.0%})")
        if "student_kd" in overheads:
            text += f"; with KD: {overheads['student_kd']:+.1%}"
        text += ".\n"
    return text


def _data(result: dict, summary: dict) -> str:
    device = summary["device"]
    measured = result["measured"]
    per_core = result["loader_images_per_s_per_core"]
    slowest = max(measured["breakdown"], key=measured["breakdown"].get)
    text = (f"The training loader on one core of {summary['cpu']} ({measured['cores']} cores), "
            f"{measured['num_images']} synthetic JPEG faces at {measured['image_size']} px: {per_core:,.0f} images/s "
            f"per core through the trainer's loader path (tar, shuffle, decode, flips, uint8 batches; normalised on "
            f"the device), {measured['decode_only_images_per_s']:,.0f} images/s for the JPEG decode alone (the loader "
            f"takes {measured['ratio_uint8']:.2f}× the decode time, {measured['ratio']:.2f}× when it also makes float "
            f"batches; its largest stage: {slowest}). A step of item 4 needs "
            f"its images/s ÷ {per_core:,.0f} loader cores.\n\n")
    columns = (Column("config", "step of item 4"), Column("images_per_s", f"images/s ({device})", "{:,.0f}"),
               Column("cores_needed", "CPU cores needed per GPU", "{:.1f}"))
    return text + markdown_table(result["feeding"], columns)


def _partial_fc(result: dict, summary: dict) -> str:
    device = summary["device"]
    text = ("One GPU as one rank: its student shard (margin loss over a 10 % sample, SGD momentum) and frozen bf16 "
            "teacher shard (grouped KD over all its classes), a gathered batch of embeddings; no backbone, no "
            "collectives. insightface reports 1,855 samples/s for r50 at 29M identities on 8 × V100 with the "
            "backbone (theirs).\n\n")
    gib = 2**30
    rows = [{**row, "peak_gib": row["peak_bytes"] / gib, "state_gib": row["accounted_state"] / gib,
             "step_gib": row["accounted_step"] / gib} for row in result["rows"]]
    columns = (Column("config", "configuration"), Column("classes", "classes on the GPU", "{:,}"),
               Column("B", "batch"), Column("step_ms", f"step ms ({device})", "{:.1f}"),
               Column("samples_per_s", "samples/s", "{:,.0f}"), Column("state_gib", "accounted state GiB", "{:.2f}"),
               Column("step_gib", "accounted + step GiB", "{:.2f}"), Column("peak_gib", "peak GiB", "{:.2f}"))
    return text + markdown_table(rows, columns)
