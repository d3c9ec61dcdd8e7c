"""Smoke test of ``facekd bench data`` at tiny sizes: the figures' structure, and the files ``run`` writes.

Nothing here asserts a rate: benchmarks are programs, and timing never decides a test (BENCH.md).
"""
import argparse
import json
import math
import os

import pytest
import torch

from facekd.bench import data as data_bench
from facekd.errors import ConfigError


def test_measure_returns_positive_figures_for_every_stage(tmp_path):
    threads = torch.get_num_threads()
    figures = data_bench.measure(image_size=32, num_images=24, budget_s=1.0, workdir=tmp_path)
    assert torch.get_num_threads() == threads  # restored
    json.dumps(figures)  # serialisable as it is
    assert set(figures) >= {"decode_only_images_per_s", "loader_images_per_s", "ratio", "breakdown", "cores",
                            "image_size", "num_images"}
    assert (figures["image_size"], figures["num_images"], figures["cores"]) == (32, 24, os.cpu_count())
    assert figures["decode_only_images_per_s"] > 0 and figures["loader_images_per_s"] > 0
    assert figures["ratio"] == pytest.approx(figures["decode_only_images_per_s"] / figures["loader_images_per_s"])
    assert set(figures["breakdown"]) == {*data_bench.STAGES, "other"}
    assert all(math.isfinite(seconds) and seconds >= 0 for seconds in figures["breakdown"].values())
    assert figures["breakdown"]["decode"] > 0 and figures["breakdown"]["tar_read"] > 0
    assert figures["rounds"] >= data_bench.MIN_ROUNDS
    # the shards are kept in workdir and reused by the next call
    assert len(list(tmp_path.glob("shards_32px_24/shard-*.tar"))) == 4


def test_run_writes_json_table_and_chart(tmp_path):
    parser = argparse.ArgumentParser()
    data_bench.add_arguments(parser)
    args = parser.parse_args(["--image-size", "32", "--num-images", "16", "--budget", "1", "--device", "cpu",
                              "--out", str(tmp_path / "results"), "--workdir", str(tmp_path / "work")])
    paths = data_bench.run(args)
    assert paths["json"].parent.parent == tmp_path / "results"
    results = json.loads(paths["json"].read_text())
    assert results["run"]["bench"] == "data" and results["run"]["cores"] >= 1
    rows = {row["what"]: row for row in results["rows"]}
    assert {"decode_only", "loader", "stage:decode", "stage:normalise", "stage:other"} <= set(rows)
    assert rows["decode_only"]["vs_decode_only"] == pytest.approx(1.0)
    assert rows["loader"]["images_per_s"] > 0
    assert "| px | path / stage |" in paths["markdown"].read_text()
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sizes_too_small_for_the_synthetic_faces_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="image_size must be >= 32"):
        data_bench.measure(image_size=16, num_images=8, workdir=tmp_path)
    with pytest.raises(ConfigError, match="num_images must be >= 2"):
        data_bench.measure(image_size=32, num_images=1, workdir=tmp_path)
