"""Smoke test of ``facekd bench identification`` at tiny sizes: the figures and the files ``run`` writes.

Nothing here asserts a rate: benchmarks are programs, and timing never decides a test (BENCH.md).
"""
import argparse
import json

import numpy as np

from facekd.bench import identification as bench


def test_distractor_map_is_made_once_and_unit(tmp_path) -> None:
    rows = bench.distractor_map(tmp_path, 70_001, 8)
    assert rows.shape == (70_001, 8) and rows.dtype == np.float32 and not rows.flags.writeable
    np.testing.assert_allclose(np.linalg.norm(rows[-5:], axis=1), 1.0, rtol=1e-6)
    before = (tmp_path / "distractors_70001x8.npy").stat().st_mtime_ns
    np.testing.assert_array_equal(bench.distractor_map(tmp_path, 70_001, 8)[:3], rows[:3])
    assert (tmp_path / "distractors_70001x8.npy").stat().st_mtime_ns == before


def test_run_writes_json_table_and_chart(tmp_path) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--distractors", "5000", "9000", "--dim", "16", "--probes", "30", "--identities", "6",
                              "--chunk", "4096", "--dtype", "fp64", "fp32", "--device", "cpu",
                              "--out", str(tmp_path / "results"), "--workdir", str(tmp_path / "work")])
    paths = bench.run(args)
    rows = json.loads(paths["json"].read_text())["rows"]
    assert [(row["distractors"], row["dtype"]) for row in rows] == [(5000, "fp64"), (5000, "fp32"), (9000, "fp64"),
                                                                      (9000, "fp32")]
    assert all(row["seconds"] > 0 and row["map_bytes"] == row["distractors"] * 16 * 4 for row in rows)
    assert all(0 <= row["rank1"] <= 1 for row in rows)
    assert "| N " in paths["markdown"].read_text() and paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_cli_runs_it(tmp_path) -> None:
    from facekd.cli import main

    assert main(["bench", "identification", "--distractors", "4100", "--dim", "8", "--probes", "10", "--identities",
                 "3", "--device", "cpu", "--out", str(tmp_path / "results"), "--workdir", str(tmp_path)]) == 0
    assert len(list((tmp_path / "results").glob("*/identification.json"))) == 1


def test_anonymous_peak_counts_private_memory_not_mapped_file_pages(tmp_path) -> None:
    if bench.AnonymousPeak.read() is None:
        import pytest

        pytest.skip("no RssAnon in /proc/self/status on this system")
    rows = bench.distractor_map(tmp_path, 65_536, 512)  # a 128 MiB file
    with bench.AnonymousPeak() as mapped:
        float(np.asarray(rows).sum(dtype=np.float64))  # touches every page of the map: file pages, not private
    with bench.AnonymousPeak() as private:
        block = np.ones(32 << 20)  # 256 MiB of private memory
        float(block.sum())
        del block
    assert private.bytes - mapped.bytes > 200 << 20
    assert mapped.bytes < bench.AnonymousPeak.read() + (64 << 20)
