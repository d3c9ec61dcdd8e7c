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
                                     ["train"], ["eval"], ["demo"], ["bench", "margin", "--"], ["submit"], ["jobs"],
                                     ["jobs", "logs"]])
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


def _run_main(capsys, *args):
    from facekd.cli import main

    code = main([str(arg) for arg in args])
    return code, capsys.readouterr().err


def _one_line_error(code, err, *fragments):
    """Exit code 2 and one 'facekd: error:' line, after whatever progress bars printed; no traceback."""
    last = err.strip().splitlines()[-1]
    assert code == 2, err
    assert "Traceback" not in err and last.startswith("facekd: error: "), err
    assert sum("facekd: error" in line for line in err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in last, last


def test_user_errors_are_one_line_with_exit_code_2(tmp_path, tiny_job, tiny_data, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_job("run", train={"steps": 2, "checkpoint_every": 2})))
    # a YAML syntax error in --set
    _one_line_error(*_run_main(capsys, "train", path, "--set", "optim.milestones=[1, 2"),
                    "'optim.milestones=[1, 2': the value is not valid YAML")
    # a missing job spec
    _one_line_error(*_run_main(capsys, "train", tmp_path / "nope.yaml"), "nope.yaml does not exist")
    # a non-finite loss names the step and the last good checkpoint
    _one_line_error(*_run_main(capsys, "train", path, "--set", "optim.lr=1e12", "--set", "optim.clip_grad_norm=0",
                               "--set", "train.log_every=1"), "the loss became nan in step", "last good checkpoint")
    # a damaged checkpoint: eval refuses with the reason
    assert _run_main(capsys, "train", tmp_path / "job.yaml", "--set", f"train.output_dir={tmp_path / 'ok'}")[0] == 0
    state = tmp_path / "ok" / "checkpoints" / "step_000000002" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2:len(data) // 2 + 16] = bytes(16)
    state.write_bytes(bytes(data))
    _one_line_error(*_run_main(capsys, "eval", tmp_path / "ok", "--bin", tiny_data / "data" / "val.bin", "--out",
                               tmp_path / "eval"), "state.pt is damaged")
    # --debug shows the traceback instead
    from facekd.errors import CheckpointError

    with pytest.raises(CheckpointError):
        _run_main(capsys, "--debug", "eval", tmp_path / "ok", "--bin", tiny_data / "data" / "val.bin")
