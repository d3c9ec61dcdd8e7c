"""``facekd bench gpu-suite --dry-run``: every item of the GPU suite runs at tiny sizes on CPU.

The suite is run once (through the command line, in this process) with two deliberately broken kernel
cases registered beside the real ones: one whose Triton path is wrong, one that raises. Both must be
reported, and every item after them must still run. Nothing here asserts a time (BENCH.md).
"""
import json
import re

import pytest
import torch

from facekd import cli
from facekd.bench.suite_kernels import largest_fitting
from facekd.kernels import checks
from facekd.kernels.backend import requested_backend

ITEMS = ("correctness", "margin_ce", "grouped_kd", "training_step", "data", "partial_fc")


def _injected_case(name, fault):
    """A one-line 'kernel' that is exact on the reference path and ``fault(x)`` on the Triton path."""
    def make_inputs(shape, dtype, device):
        return {"x": torch.linspace(1.0, 2.0, shape["n"], dtype=dtype, device=device)}

    def compute(inputs):
        x = inputs["x"]
        return {"y": fault(x) if requested_backend() == "triton" else x * 1.0}

    return checks.KernelCase(name, make_inputs, compute, {torch.float32: checks.Tolerance(rtol=1e-4)},
                             realistic={"n": 1000}, tiny={"n": 7})


def _off_by_one_percent(x):
    return x * 1.01


def _raises(x):
    raise RuntimeError("injected kernel failure")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    import facekd.kernels.grouped_kd  # noqa: F401  (the real cases register first)
    import facekd.kernels.margin_ce  # noqa: F401

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(checks._CASES, "injected/wrong", _injected_case("injected/wrong", _off_by_one_percent))
        patch.setitem(checks._CASES, "injected/raises", _injected_case("injected/raises", _raises))
        assert cli.main(["bench", "gpu-suite", "--out", str(out), "--dry-run", "--budget-s", "900"]) == 0
    return out, json.loads((out / "summary.json").read_text())


def test_every_item_runs(dry_run):
    _, summary = dry_run
    assert summary["dry_run"] is True and summary["device"].startswith("cpu")
    assert list(summary["items"]) == list(ITEMS)
    for name, result in summary["items"].items():
        assert result["status"] == "ok", (name, result.get("error"), result.get("notes"))


def test_every_kernel_case_is_checked_and_failures_are_reported(dry_run):
    _, summary = dry_run
    rows = summary["items"]["correctness"]["rows"]
    by_case = {(row["case"], row["dtype"]): row for row in rows}
    registered = [case.name for case in checks.all_cases()]
    assert {"margin_ce/exact", "margin_ce/straight_through", "margin_ce/class_index", "margin_ce/three_ranks",
            "grouped_kd/logits/paper", "grouped_kd/logits/batch", "grouped_kd/logits/fixed",
            "grouped_kd/embeddings/paper", "grouped_kd/embeddings/batch",
            "grouped_kd/embeddings/fixed"} <= set(registered)
    for name in registered:
        for dtype in ("fp32", "bf16", "fp16"):
            row = by_case[(name, dtype)]
            assert row["status"] == "pass" and row["worst"] <= 1.0, row
    wrong = by_case[("injected/wrong", "fp32")]
    assert wrong["status"] == "FAIL" and wrong["worst"] > 10 and wrong["outputs"][0]["mismatched"] == 7
    raised = by_case[("injected/raises", "fp32")]
    assert raised["status"] == "error" and "injected kernel failure" in raised["error"]
    assert summary["items"]["correctness"]["counts"] == {
        "pass": 3 * len(registered), "FAIL": 1, "error": 1, "skipped": 0}


def test_margin_ce_rows_ratios_and_largest_fit(dry_run):
    _, summary = dry_run
    result = summary["items"]["margin_ce"]
    rows = {(row["C"], row["method"]): row for row in result["rows"]}
    for n_classes in (16, 32, 48):
        for method in ("facekd", "torch_eager", "matmul_bf16", "facekd:forward", "facekd:grad_weight"):
            assert rows[(n_classes, method)]["status"] == "ok" and rows[(n_classes, method)]["ms"] > 0
        assert rows[(n_classes, "facekd")]["vs_eager"] > 0
    # the dry run's simulated device holds 2 (B + C) D fp32 values: C ≤ 2^14 / 256 − 8 = 56
    for method in ("facekd", "torch_eager"):
        fit = result["largest_fit"][method]
        assert fit["settled"] and fit["largest_fitting"] <= 56 < fit["smallest_failing"]
        assert fit["smallest_failing"] / fit["largest_fitting"] <= 1.05


def test_grouped_kd_against_sort_and_margin_ce(dry_run):
    _, summary = dry_run
    rows = {(row["form"], row["method"]): row for row in summary["items"]["grouped_kd"]["rows"]}
    for form in ("embeddings", "logits"):
        fused = rows[(form, "facekd")]
        assert fused["status"] == "ok" and fused["vs_sort"] > 0 and fused["vs_margin_ce"] > 0
        assert rows[(form, "torch_sort")]["vs_sort"] == 1.0


def test_training_step_and_data_feed(dry_run):
    _, summary = dry_run
    steps = {row["config"]: row for row in summary["items"]["training_step"]["rows"]}
    assert set(steps) == {"student", "student_kd", "student_gkd", "teacher"}
    assert all(row["images_per_s"] > 0 for row in steps.values())
    assert "overhead" in steps["student_gkd"] and "overhead" not in steps["student"]
    data = summary["items"]["data"]
    assert data["loader_images_per_s_per_core"] > 0
    assert {row["config"] for row in data["feeding"]} == set(steps)
    assert all(row["cores_needed"] > 0 for row in data["feeding"])


def test_partial_fc_runs_one_rank_with_its_teacher(dry_run):
    _, summary = dry_run
    (row,) = summary["items"]["partial_fc"]["rows"]
    assert row["config"] == "tiny" and row["W"] == 1 and row["teacher"] == "on" and row["samples_per_s"] > 0
    assert row["held_bytes"] == row["accounted_state"]


def test_outputs_fit_what_the_device_returns(dry_run):
    out, _ = dry_run
    files = sorted(path.name for path in out.rglob("*") if path.is_file())
    assert {"summary.json", "summary.md", "suite.log"} <= set(files) and len(files) <= 8
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in files)
    assert all(path.stat().st_size < 16 * 2**20 for path in out.iterdir())
    markdown = (out / "summary.md").read_text()
    for heading in ("## 1. Triton kernels", "## 2. Margin-softmax CE", "## 3. Grouped KD", "## 4. Training step",
                    "## 5. Data loading"):
        assert heading in markdown
    assert "| case | dtype | shape | result |" in markdown and "| injected/wrong | fp32 |" in markdown
    assert "| C | method | status | time ms (cpu-x86_64) |" in markdown
    assert "Distillation overhead with GKD" in markdown and "CPU cores needed per GPU" in markdown
    assert (out / "margin_ce.png").read_bytes()[:4] == b"\x89PNG"


def test_a_budget_that_fits_nothing_skips_every_item_with_a_note(tmp_path):
    assert cli.main(["bench", "gpu-suite", "--out", str(tmp_path), "--dry-run", "--budget-s", "1"]) == 0
    items = json.loads((tmp_path / "summary.json").read_text())["items"]
    assert [result["status"] for result in items.values()] == ["skipped"] * len(ITEMS)
    assert all("s were left" in result["notes"][0] for result in items.values())
    assert "Skipped:" in (tmp_path / "summary.md").read_text()


def test_without_a_gpu_the_real_suite_refuses(tmp_path, capsys):
    assert cli.main(["bench", "gpu-suite", "--out", str(tmp_path)]) == 2
    assert re.search("needs a CUDA device|unset it on a GPU", capsys.readouterr().err)


@pytest.mark.parametrize("limit", [1, 57, 1234, 10**6])
def test_largest_fitting_brackets_the_limit(limit):
    class Forever:
        def allows(self, seconds):
            return True

    result = largest_fitting(lambda n: n <= limit, 100, 10**6, deadline=Forever(), probe_s=0.0)
    if limit >= 10**6:
        assert result["largest_fitting"] == 10**6 and result["smallest_failing"] is None
    else:
        assert result["largest_fitting"] <= limit < result["smallest_failing"]
        assert result["smallest_failing"] <= max(1.05 * result["largest_fitting"], result["largest_fitting"] + 1)


def test_compare_counts_mismatches_and_disagreeing_non_finite_entries():
    expected = torch.tensor([1.0, 2.0, float("inf"), float("nan")])
    tolerance = checks.Tolerance(rtol=1e-3)
    assert checks.compare("y", expected.clone(), expected, tolerance).passed
    got = torch.tensor([1.0, 2.1, float("inf"), 0.0])
    check = checks.compare("y", got, expected, tolerance)
    assert not check.passed and check.mismatched == 2 and check.worst == pytest.approx(0.1 / 2e-3)
    assert not checks.compare("y", got[:3], expected, tolerance).passed


def test_items_run_in_the_order_of_value_whatever_the_order_given(tmp_path):
    assert cli.main(["bench", "gpu-suite", "--out", str(tmp_path), "--dry-run", "--budget-s", "1",
                     "--items", "data", "correctness"]) == 0
    assert list(json.loads((tmp_path / "summary.json").read_text())["items"]) == ["correctness", "data"]


def test_a_failing_item_is_recorded_and_a_broken_device_skips_the_rest(tmp_path, monkeypatch):
    from facekd.bench import gpu_suite

    def fails(suite, deadline):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    ran = []
    items = (gpu_suite.Item("first", "first", 0.5, 0.0, fails),
             gpu_suite.Item("second", "second", 0.3, 0.0, lambda suite, deadline: ran.append(1) or {}),
             gpu_suite.Item("third", "third", 0.2, 0.0, lambda suite, deadline: ran.append(1) or {}))
    monkeypatch.setattr(gpu_suite, "_items", lambda: items)
    monkeypatch.setattr(gpu_suite, "device_healthy", lambda device: False)
    assert cli.main(["bench", "gpu-suite", "--out", str(tmp_path), "--dry-run"]) == 0
    results = json.loads((tmp_path / "summary.json").read_text())["items"]
    assert results["first"]["status"] == "failed" and "illegal memory access" in results["first"]["error"]
    assert results["first"]["traceback"][-1].startswith("RuntimeError")
    assert ran == [] and [results[name]["status"] for name in ("second", "third")] == ["skipped", "skipped"]
    assert "the CUDA context broke in first; rerun with --items second third" in results["second"]["notes"][0]


def test_a_failed_configuration_is_a_note_not_the_end_of_its_item():
    from facekd.bench.gpu_suite import attempt

    notes = []

    def explode():
        raise RuntimeError("Triton Error [CUDA]: misaligned address\nmore detail")

    assert attempt("C = 360,232", explode, notes) == []
    assert attempt("C = 85,742", lambda: [{"ms": 1.0}], notes) == [{"ms": 1.0}]
    assert notes == ["C = 360,232 failed: RuntimeError: Triton Error [CUDA]: misaligned address"]
