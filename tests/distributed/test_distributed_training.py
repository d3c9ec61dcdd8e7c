"""Real multi-process training: `facekd train --nproc-per-node N` (torchrun, gloo, DeepSpeed ZeRO-1) on the
tiny shards; a rank killed mid-checkpoint and the job resumed; resume at another world size; a teacher trained
on 2 ranks distilling a student on 3."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from facekd.distributed.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint, verify_checkpoint
from facekd.network import head_rows, load_network

pytestmark = pytest.mark.slow

ZERO_1 = {"zero_optimization": {"stage": 1}}


def _spec(tiny_job, name, **sections):
    spec = tiny_job(name, **sections)
    spec["deepspeed"] = ZERO_1
    spec["train"]["batch_size"] = 4  # per rank
    return spec


def _write(spec, tmp_path):
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _command(job_file, ranks, *extra):
    return [sys.executable, "-m", "facekd", "train", str(job_file), "--nproc-per-node", str(ranks), *extra]


def _train(job_file, ranks, *extra):
    result = subprocess.run(_command(job_file, ranks, *extra), capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _weights(checkpoint):
    """Everything a checkpoint says about the trained weights: backbone, adapters, every classifier row."""
    state = load_checkpoint(checkpoint)
    rows = head_rows(checkpoint, state, 0, state["num_classes"])
    return {**{f"backbone.{k}": v for k, v in state["backbone"].items()},
            **{f"distiller.{k}": v for k, v in state["distiller"].items()}, "head": rows}


@pytest.fixture(scope="module")
def teacher_on_two_ranks(tiny_data, tmp_path_factory):
    """An IResNet teacher trained on 2 ranks (its head split over two files)."""
    out = tmp_path_factory.mktemp("sharded_teacher")
    spec = {
        "name": "teacher", "data": {"manifest": str(tiny_data / "shards"), "image_size": 32, "num_workers": 0,
                                    "shuffle_buffer": 16},
        "model": {"backbone": "iresnet18", "width": 0.125, "embedding_dim": 16}, "head": {"s": 16.0, "m2": 0.2},
        "train": {"output_dir": str(out / "teacher"), "steps": 6, "batch_size": 4, "checkpoint_every": 6,
                  "device": "cpu"},
        "deepspeed": ZERO_1,
    }
    _train(_write(spec, out), 2)
    return out / "teacher"


def test_a_sharded_checkpoint_consolidates_for_eval_and_for_another_world(teacher_on_two_ranks, tiny_data, tmp_path):
    checkpoint = checkpoint_path(teacher_on_two_ranks / "checkpoints", 6)
    verify_checkpoint(checkpoint)
    state = load_checkpoint(checkpoint)
    assert state["world_size"] == 2 and "head" not in state
    # 6 classes over 2 ranks: one file each, the rows in class order
    assert [(shard["class_offset"], shard["rows"]) for shard in state["classifier"]] == [(0, 3), (3, 3)]
    assert (checkpoint / "deepspeed").is_dir()
    network = load_network(teacher_on_two_ranks)
    files = [torch.load(checkpoint / shard["file"], weights_only=True)["weight"] for shard in state["classifier"]]
    torch.testing.assert_close(network.head.weight, torch.cat(files), rtol=0, atol=0)
    result = subprocess.run([sys.executable, "-m", "facekd", "eval", str(teacher_on_two_ranks), "--bin",
                             str(tiny_data / "data" / "val.bin"), "--out", str(tmp_path / "eval"), "--device", "cpu"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "eval" / "roc.png").stat().st_size > 0


def test_a_rank_killed_while_writing_a_checkpoint_resumes_to_the_same_weights(tiny_job, teacher_on_two_ranks,
                                                                               tmp_path):
    def student(name, steps):
        return _spec(tiny_job, name, model={"backbone": "mobilefacenet", "width": 0.25},
                     distill={"methods": {"gkd": 1.0}, "teacher": str(teacher_on_two_ranks)},
                     train={"steps": steps, "checkpoint_every": 1, "keep_checkpoints": 3})

    steps = 14
    _train(_write(student("whole", steps), tmp_path), 2)

    job_file = _write(student("killed", steps), tmp_path)
    checkpoints = tmp_path / "killed" / "checkpoints"
    launcher = subprocess.Popen(_command(job_file, 2), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    # SIGKILL rank 1 while a checkpoint after step 4 is being written (its partial folder exists)
    while True:
        assert launcher.poll() is None, "training ended before a rank could be killed"
        assert time.monotonic() < deadline, "no checkpoint was being written within 240 s"
        partial = [p for p in checkpoints.glob(".step_*.partial.*")] if checkpoints.is_dir() else []
        if partial and list_checkpoints(checkpoints) and list_checkpoints(checkpoints)[-1][0] >= 4:
            ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                     if p.environ().get("RANK") == "1" and "facekd" in " ".join(p.cmdline())]
            if ranks:
                ranks[0].send_signal(signal.SIGKILL)
                break
        time.sleep(0.01)
    assert launcher.wait(timeout=120) != 0
    os.killpg(launcher.pid, signal.SIGKILL) if psutil.pid_exists(launcher.pid) else None
    # the newest complete checkpoint is whole; the half-written one is not listed
    (newest_step, newest), *_ = reversed(list_checkpoints(checkpoints))
    assert newest_step < steps
    verify_checkpoint(newest)

    resumed = _train(job_file, 2, "--resume")
    assert f'"steps_run": {steps - newest_step}' in resumed.stdout
    assert not list(checkpoints.glob(".step_*.partial.*"))
    whole = _weights(checkpoint_path(tmp_path / "whole" / "checkpoints", steps))
    again = _weights(checkpoint_path(checkpoints, steps))
    assert whole.keys() == again.keys()
    for key in whole:
        torch.testing.assert_close(again[key], whole[key], rtol=0, atol=0, msg=lambda m: f"{key}: {m}")


def test_resume_on_three_ranks_from_two_reshards_the_classifier(tiny_job, teacher_on_two_ranks, tmp_path):
    spec = _spec(tiny_job, "regrown", model={"backbone": "mobilefacenet", "width": 0.25},
                 distill={"methods": {"kd": 1.0}, "teacher": str(teacher_on_two_ranks)},
                 train={"steps": 4, "checkpoint_every": 2})
    job_file = _write(spec, tmp_path)
    _train(job_file, 2)
    checkpoints = tmp_path / "regrown" / "checkpoints"
    before = _weights(checkpoint_path(checkpoints, 4))

    # 3 ranks: the teacher's 2 files and the student's 2 re-sharded into 2 + 2 + 2 rows
    result = _train(job_file, 3, "--resume", "--set", "train.steps=5")
    assert '"steps_run": 1' in result.stdout and '"world_size": 3' in result.stdout
    assert "optimiser state (momentum, ZeRO partitions) restarted" in result.stderr
    state = load_checkpoint(checkpoint_path(checkpoints, 5))
    assert state["world_size"] == 3
    assert [(shard["class_offset"], shard["rows"]) for shard in state["classifier"]] == [(0, 2), (2, 2), (4, 2)]
    after = _weights(checkpoint_path(checkpoints, 5))
    # one step from the restored weights, not from a fresh start: every tensor moved by one step at most
    for key in ("head", "backbone.conv1.weight" if "backbone.conv1.weight" in before else next(iter(before))):
        step = (after[key] - before[key]).abs().max()
        assert 0 < step < 0.5 * before[key].abs().max(), key


JOBS = Path(__file__).parents[2] / "jobs"
# the cluster specs, and the one MS1MV2 spec whose step has a second (unlabeled) stream
CLUSTER_SPECS = [*sorted((JOBS / "cluster").glob("*.yaml")), JOBS / "ms1mv2_mobilefacenet_srrl_unlabeled.yaml"]


@pytest.mark.parametrize("path", CLUSTER_SPECS, ids=[path.stem for path in CLUSTER_SPECS])
def test_cluster_specs_run_on_two_cpu_ranks(path, tiny_data, teacher_on_two_ranks, tmp_path):
    """Each cluster job spec as written (ZeRO-1, bf16 autocast, partial FC, sharded distillation), pointed at the
    tiny shards and shrunk to two CPU ranks."""
    overrides = [
        f"data.manifest={tiny_data / 'shards'}", "data.image_size=32", "data.num_workers=0", "data.shuffle_buffer=16",
        "model.width=0.25", "model.embedding_dim=16", "head.s=16.0", f"train.output_dir={tmp_path / 'run'}",
        "train.steps=2", "train.epochs=null", "train.batch_size=4", "train.device=cpu", "eval.bins=[]",
        "optim.warmup_epochs=0", f"distill.teacher={teacher_on_two_ranks}",
    ]
    if "teacher" in path.stem:
        overrides.remove(f"distill.teacher={teacher_on_two_ranks}")
    if "unlabeled" in path.stem:
        overrides += [f"data.unlabeled_manifest={tiny_data / 'shards'}", "model.init_from=null",
                      "deepspeed.zero_optimization.stage=1"]
    _train(path, 2, *[part for item in overrides for part in ("--set", item)])
    state = load_checkpoint(tmp_path / "run" / "checkpoints")
    assert state["step"] == 2 and state["world_size"] == 2


def test_an_error_on_a_rank_names_the_rank(tiny_job, tmp_path):
    spec = _spec(tiny_job, "no_teacher", model={"backbone": "mobilefacenet", "width": 0.25},
                 distill={"methods": {"kd": 1.0}, "teacher": str(tmp_path / "missing")})
    result = subprocess.run(_command(_write(spec, tmp_path), 2), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    for rank in (0, 1):
        assert f"facekd: error: rank {rank}: checkpoint {tmp_path / 'missing'} does not exist" in result.stderr
    assert "facekd: error: 2 ranks of" in result.stderr.splitlines()[-1]
