"""Smoke test of ``facekd bench dgconv`` on CPU: it writes JSON, a markdown table and a PNG chart.

Nothing here asserts a time: benchmarks are programs, and timing never decides a test (BENCH.md).
"""
import argparse
import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from facekd.bench import dgconv  # noqa: E402


def parse(*argv):
    parser = argparse.ArgumentParser()
    dgconv.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_quick_cpu_run_writes_json_table_and_chart(tmp_path, one_thread, monkeypatch):
    monkeypatch.setenv("FACEKD_KERNEL_BACKEND", "torch")
    paths = dgconv.run(parse("--quick", "--device", "cpu", "--out", str(tmp_path)))
    results = json.loads(paths["json"].read_text())
    assert results["run"]["bench"] == "dgconv" and results["run"]["device"].startswith("cpu")
    rows = {(row["m"], row["method"]): row for row in results["rows"]}
    assert set(rows) == {(m, method) for m in (1, 4) for method in dgconv.METHODS}
    for row in rows.values():
        assert row["status"] == "ok" and row["reps"] >= 10 and row["tflops"] > 0 and row["vs_torch"] > 0
        assert (row["stage"], row["B"], row["n"], row["dtype"]) == ("8x6", 2, 4, "fp32")
    assert "| C×H | m | n | B | dtype | method |" in paths["markdown"].read_text()
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (("--device", "cpu"), "on CPU give --quick"),
    (("--quick", "--device", "cpu", "--stages", "8by6"), "--stages takes CxH"),
    (("--quick", "--device", "cpu", "--stages", "6x6", "--groups", "4"), "--groups 4 does not divide"),
])
def test_bad_grids_are_named(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        dgconv.run(parse(*argv, "--out", str(tmp_path)))
