"""``facekd bench partial-fc`` on CPU: two real gloo ranks, a small C; it writes JSON, a markdown table and a
PNG chart, and each rank's held tensors are what classifier_memory accounts for.

Nothing here asserts a time: benchmarks are programs, and timing never decides a test (BENCH.md).
"""
import argparse
import json

import pytest

from facekd.bench import partial_fc
from facekd.distributed.classifier import classifier_memory


def parse(*argv):
    parser = argparse.ArgumentParser()
    partial_fc.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.slow
def test_two_ranks_write_results_whose_tensors_match_the_accounting(tmp_path):
    classes, dim, batch = 10_007, 24, 6  # C odd: rank 0 holds one class more
    paths = partial_fc.run(parse("--classes", str(classes), "--nproc", "2", "--dim", str(dim), "--batch", str(batch),
                                 "--steps", "2", "--warmup", "1", "--device", "cpu", "--out", str(tmp_path)))
    results = json.loads(paths["json"].read_text())
    assert results["run"]["bench"] == "partial_fc" and results["run"]["device"].startswith("cpu")
    rows = sorted(results["rows"], key=lambda row: row["rank"])
    assert [row["rank"] for row in rows] == [0, 1]
    for row in rows:
        memory = classifier_memory(classes, 2, dim, rank=row["rank"], batch_size=batch, sample_rate=0.1)
        assert (row["C"], row["W"], row["D"], row["B"], row["teacher"]) == (classes, 2, dim, batch, "on")
        assert row["classes"] == memory["classes"] == (5004 if row["rank"] == 0 else 5003)
        for name in ("centres", "gradient", "momentum", "teacher"):
            assert row[f"held_{name}"] == memory[name] == row["accounting"][name]
        assert row["held_bytes"] == row["accounted_state"] == memory["state"]
        # K: the drawn negatives, raised by the batch's labels this shard holds (at most 12 of them)
        assert memory["sampled_classes"] <= row["sampled_classes"] <= memory["sampled_classes"] + 2 * batch
        assert row["peak_bytes"] > row["start_bytes"] > 0 and row["steps"] == 2
        assert row["samples_per_s"] > 0 and row["step_ms_p20"] <= row["step_ms"] <= row["step_ms_p80"]
    table = paths["markdown"].read_text()
    assert "| 10,007 | 2 | 24 | 6 | 0.1 | on | 0 | 5,004 |" in table
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_is_the_accounting_of_each_c_and_w(tmp_path, capsys):
    paths = partial_fc.run(parse("--table", "--out", str(tmp_path)))
    rows = json.loads(paths["json"].read_text())["rows"]
    assert [(row["C"], row["W"]) for row in rows] == [(c, w) for c in (2_000_000, 10_000_000, 30_000_000)
                                                      for w in (8, 32, 64)]
    largest = next(row for row in rows if (row["C"], row["W"]) == (30_000_000, 8))
    assert largest["classes"] == 3_750_000 and largest["centres"] == 3_750_000 * 512 * 4
    assert largest["teacher"] == 3_750_000 * 512 * 2 and largest["momentum"] == largest["centres"]
    assert "| 30,000,000 | 8 | 3,750,000 | 7.15 | 7.15 | 3.58 | 17.88 |" in paths["markdown"].read_text()
    assert "identities C" in capsys.readouterr().out


@pytest.mark.parametrize("option,value,message", [
    ("--sample-rate", "0", "sample-rate must be in"),
    ("--classes", "1", "cannot be sharded"),
    ("--steps", "0", "steps must be >= 1"),
])
def test_bad_options_are_refused_before_any_rank_starts(tmp_path, option, value, message):
    with pytest.raises(ValueError, match=message):
        partial_fc.run(parse(option, value, "--out", str(tmp_path)))
