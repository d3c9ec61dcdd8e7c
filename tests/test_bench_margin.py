"""Smoke test of ``facekd bench margin`` on CPU: it writes JSON, a markdown table and a PNG chart.

Nothing here asserts a time: benchmarks are programs, and timing never decides a test (BENCH.md).
"""
import argparse
import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from facekd.bench import margin  # noqa: E402


def parse(*argv):
    parser = argparse.ArgumentParser()
    margin.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_quick_cpu_run_writes_json_table_and_chart(tmp_path, one_thread, monkeypatch):
    monkeypatch.setenv("FACEKD_KERNEL_BACKEND", "torch")
    paths = margin.run(parse("--quick", "--device", "cpu", "--classes", "48", "--out", str(tmp_path),
                             "--methods", "facekd", "torch_eager", "liger", "matmul_bf16"))
    assert paths["json"].parent.parent == tmp_path
    results = json.loads(paths["json"].read_text())
    assert results["run"]["bench"] == "margin" and results["run"]["device"].startswith("cpu")
    rows = {(row["margin"], row["method"]): row for row in results["rows"]}
    assert set(rows) == {("arcface", "facekd"), ("arcface", "torch_eager"), ("arcface", "matmul_bf16"),
                         ("none", "facekd"), ("none", "torch_eager"), ("none", "liger"), ("none", "matmul_bf16")}
    facekd_row = rows[("arcface", "facekd")]
    assert facekd_row["status"] == "ok" and facekd_row["reps"] >= 10
    assert (facekd_row["B"], facekd_row["C"], facekd_row["D"], facekd_row["dtype"]) == (8, 48, 32, "fp32")
    assert facekd_row["tflops"] > 0 and facekd_row["vs_eager"] > 0
    if rows[("none", "liger")]["status"] != "ok":
        assert rows[("none", "liger")]["status"].startswith("unavailable")

    table = paths["markdown"].read_text()
    assert "| B | C | dtype | margin | method |" in table and "| 8 | 48 | fp32 | arcface | facekd | ok |" in table
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a second run with another C adds its rows beside the first run's
    margin.run(parse("--quick", "--device", "cpu", "--classes", "80", "--margins", "arcface", "--out",
                     str(tmp_path), "--methods", "facekd"))
    rows = json.loads(paths["json"].read_text())["rows"]
    measured = {(row["C"], row["method"]) for row in rows if row["margin"] == "arcface"}
    assert measured >= {(48, "facekd"), (80, "facekd")}


def test_cpu_needs_quick_or_explicit_small_shapes(tmp_path):
    with pytest.raises(ValueError, match="on CPU give --quick"):
        margin.run(parse("--device", "cpu", "--out", str(tmp_path)))
