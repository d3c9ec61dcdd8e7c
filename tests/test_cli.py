"""The command line as a user runs it: python -m facekd, in a subprocess, on tiny synthetic data."""
import json
import subprocess
import sys

import pytest
import yaml


def facekd(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "facekd", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


@pytest.mark.parametrize("command", [[], ["data"], ["data", "synth"], ["data", "convert"], ["data", "inspect"],
                                     ["train"], ["eval"], ["demo"], ["bench", "margin", "--"]])
def test_every_command_has_help(command):
    result = facekd(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: facekd" in result.stdout


def test_data_commands_make_convert_and_inspect(tmp_path):
    result = facekd("data", "synth", "--out", tmp_path / "synth", "--identities", 3, "--images-per-identity", 4,
                    "--val-identities", 2, "--pairs", 10, "--image-size", 32)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["num_train_images"] == 12
    result = facekd("data", "convert", tmp_path / "synth" / "images", tmp_path / "shards", "--shard-size", 5)
    assert result.returncode == 0, result.stderr
    assert "12 samples of 3 identities in 3 shards" in result.stdout
    result = facekd("data", "inspect", tmp_path / "shards")
    assert result.returncode == 0 and json.loads(result.stdout)["ok"] is True
    # a truncated shard is reported, and the command fails
    shard = sorted((tmp_path / "shards").glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:700])
    result = facekd("data", "inspect", tmp_path / "shards")
    assert result.returncode != 0 and "truncated" in result.stdout


def test_train_rejects_an_unknown_key_naming_key_and_file(tmp_path, tiny_job):
    spec = tiny_job()
    spec["train"]["stpes"] = 3
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = facekd("train", path)
    assert result.returncode == 2
    assert f"{path}: unknown key 'train.stpes'" in result.stderr


@pytest.mark.slow
def test_train_then_eval(tmp_path, tiny_job, tiny_data):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_job("cli")))
    result = facekd("train", path, "--set", "train.steps=4")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["step"] == 4
    result = facekd("eval", tmp_path / "cli", "--bin", tiny_data / "data" / "val.bin", "--out", tmp_path / "eval",
                    "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "| cli " in result.stdout and "accuracy (%)" in result.stdout
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert rows[0]["model"] == "cli" and rows[0]["num_pairs"] == 20
    assert (tmp_path / "eval" / "roc.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_bench_kernels_writes_both_benchmarks(tmp_path):
    result = facekd("bench", "kernels", "--quick", "--device", "cpu", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    (device_dir,) = tmp_path.iterdir()
    for bench in ("margin", "gkd"):
        rows = json.loads((device_dir / f"{bench}.json").read_text())["rows"]
        assert {row["method"] for row in rows} >= {"facekd"} and all(row["B"] == 8 for row in rows)
        assert (device_dir / f"{bench}.png").read_bytes()[:4] == b"\x89PNG"
        assert "|" in (device_dir / f"{bench}.md").read_text()
