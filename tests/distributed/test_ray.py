"""Real Ray on this machine: a local head (`ray start --head` on 127.0.0.1, 2 CPUs, dashboard and Job Submission
server), 2 CPU Ray Train workers with gloo and DeepSpeed ZeRO-1. `facekd submit` followed to its end; a worker
SIGKILLed mid-run and the group restarted from the last reported checkpoint; the driver killed and the same
command run again; `--ray` against torchrun, weight for weight."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest
import torch

from facekd.distributed.checkpoint import checkpoint_path, list_checkpoints, verify_checkpoint
from test_distributed_training import ZERO_1, _train, _weights, _write, teacher_on_two_ranks  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

STEPS = 16  # per run: 2 epochs of the tiny shards at 2 ranks x 4 images
# the head and every client share a token, as on a cluster with Ray 2.60's token authentication
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "token",
       "RAY_AUTH_TOKEN": uuid.uuid4().hex + uuid.uuid4().hex}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _head_processes(temp_dir: str) -> list[psutil.Process]:
    """The processes of the head started with ``temp_dir``, and every process they started (workers)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in process.info["cmdline"] or ()):
            found.append(process)
            try:
                found += process.children(recursive=True)
            except psutil.NoSuchProcess:
                pass
    return found


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head of this module alone: its own ports and temp folder; at teardown its processes (found by that
    folder, not by name: other Ray instances on the machine are left alone) are killed, pass or fail."""
    temp_dir = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray's socket paths live under it
    port, dashboard = _free_port(), _free_port()
    ray = Path(sys.executable).with_name("ray")  # the console script of the Ray this Python imports
    command = [str(ray if ray.is_file() else "ray"), "start", "--head", "--port", str(port), "--num-cpus", "2",
               "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
               "--include-dashboard", "true",
               "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
               "--temp-dir", temp_dir, "--disable-usage-stats"]
    try:
        started = subprocess.run(command, capture_output=True, text=True, timeout=180, env=ENV)
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard}", "temp_dir": temp_dir}
    finally:
        processes = _head_processes(temp_dir)
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(processes, timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def teacher(teacher_on_two_ranks):
    """The distributed training tests' teacher, trained on 2 torchrun ranks."""
    return teacher_on_two_ranks


def _student(tiny_job, teacher, name, **train):
    """A GKD student on 2 ranks x 4 images, reporting every 2 steps, checkpointing every 4."""
    spec = tiny_job(name, model={"backbone": "mobilefacenet", "width": 0.25}, head={"sample_rate": 1.0},
                    distill={"methods": {"gkd": 1.0}, "teacher": str(teacher)},
                    train={"steps": STEPS, "batch_size": 4, "checkpoint_every": 4, "log_every": 2,
                           "keep_checkpoints": 2, **train},
                    ray={"workers": 2, "max_failures": 2})
    spec["deepspeed"] = ZERO_1
    return spec


def _ray_command(job_file, ray_head, *extra):
    return [sys.executable, "-m", "facekd", "train", str(job_file), "--ray", "--address", ray_head["address"],
            *extra]


def _summary(output):
    """The JSON summary `facekd train --ray` prints (worker log lines may follow it)."""
    return json.JSONDecoder().raw_decode(output[output.index('{\n  "name"'):])[0]


def _storage(spec):
    return Path(spec["train"]["output_dir"]) / "ray" / spec["name"]


def _registered_steps(storage):
    """Steps of the checkpoints Ray Train has registered for the run (its snapshot in storage), oldest first."""
    try:
        snapshot = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or being rewritten
        return []
    return sorted(result["metrics"]["step"] for result in snapshot["checkpoint_results"])


def _assert_storage_whole(storage, final_step):
    """Every checkpoint folder Ray holds is complete, the newest is the final step, and Ray's record of the run
    (its checkpoint manager snapshot) ends there with the metrics the progress bar shows."""
    stored = list_checkpoints(storage)
    assert stored and stored[-1][0] == final_step, stored
    assert [path.name for path in storage.glob("step_*")] and all((path / "index.json").is_file()
                                                                  for path in storage.glob("step_*"))
    for _, path in stored:
        verify_checkpoint(path)
    import ray.train

    result = ray.train.Result.from_path(str(storage))
    assert result.metrics["step"] == final_step
    assert {"loss_label", "loss_distill", "lr", "images_per_second"} <= set(result.metrics)
    assert Path(result.checkpoint.path).name == f"step_{final_step:09d}"


def _train_workers(ray_head):
    """The Ray Train worker processes of this module's head."""
    workers = []
    for process in _head_processes(ray_head["temp_dir"]):
        try:
            if (process.cmdline() or [""])[0].startswith("ray::RayTrainWorker"):
                workers.append(process)
        except psutil.NoSuchProcess:
            pass
    return workers


def _kill_a_worker_after(storage, ray_head, step):
    """SIGKILL one Ray Train worker, by its pid, once Ray has registered a checkpoint of ``step`` or later;
    returns the newest registered step then."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        steps = _registered_steps(storage)
        workers = _train_workers(ray_head) if steps and steps[-1] >= step else []
        if len(workers) == 2:
            os.kill(workers[-1].pid, signal.SIGKILL)
            return steps[-1]
        time.sleep(0.05)
    raise AssertionError(f"Ray held no checkpoint of step {step} within 240 s")


def test_submit_follows_a_gkd_job_to_success_and_jobs_show_it(ray_head, teacher, tiny_job, tmp_path):
    spec = _student(tiny_job, teacher, "gkd_job")
    job_file = _write(spec, tmp_path)
    env = {**ENV, "RAY_ADDRESS": ray_head["dashboard"]}
    submitted = subprocess.run([sys.executable, "-m", "facekd", "submit", str(job_file), "--address",
                                ray_head["dashboard"], "--workers", "2", "--follow"],
                               capture_output=True, text=True, timeout=400, env=ENV)
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-4000:]
    first = submitted.stdout.splitlines()[0]
    job_id = first.rsplit(" ", 1)[-1]
    assert first == f"submitted gkd_job as Ray job {job_id}"
    assert f"dashboard: {ray_head['dashboard']}/#/jobs/{job_id}" in submitted.stdout
    assert f"gkd_job step {STEPS}: loss" in submitted.stdout  # rank 0's metrics, streamed from the job
    assert submitted.stdout.rstrip().endswith(f"job {job_id}: SUCCEEDED")
    _assert_storage_whole(_storage(spec), STEPS)

    # the jobs commands, with the address from RAY_ADDRESS
    def jobs(*args):
        result = subprocess.run([sys.executable, "-m", "facekd", "jobs", *args], capture_output=True, text=True,
                                timeout=120, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    listed = [line for line in jobs("list").splitlines() if line.startswith(job_id)]
    assert len(listed) == 1 and "SUCCEEDED" in listed[0] and f"train {job_file.name} --ray" in listed[0]
    assert jobs("status", job_id).startswith(f"{job_id}: SUCCEEDED")
    assert f"gkd_job step {STEPS}: loss" in jobs("logs", job_id)
    no_token = {name: value for name, value in env.items() if not name.startswith("RAY_AUTH")}
    refused = subprocess.run([sys.executable, "-m", "facekd", "jobs", "list"], capture_output=True, text=True,
                             timeout=120, env=no_token)
    assert refused.returncode == 2 and "wants its authentication token: set RAY_AUTH_MODE=token" in refused.stderr, \
        refused.stderr[-2000:]
    unknown = subprocess.run([sys.executable, "-m", "facekd", "jobs", "status", "raysubmit_none"],
                             capture_output=True, text=True, timeout=120, env=env)
    assert unknown.returncode == 2 and "facekd: error: no job raysubmit_none" in unknown.stderr


@pytest.fixture(scope="module")
def uninterrupted(ray_head, teacher, tiny_data, tmp_path_factory):
    """The student trained start to end with `--ray` (2 workers): the reference of the fault and torchrun tests."""
    out = tmp_path_factory.mktemp("ray_whole")
    spec = {
        "name": "whole", "data": {"manifest": str(tiny_data / "shards"), "image_size": 32, "num_workers": 0,
                                  "shuffle_buffer": 16},
        "model": {"backbone": "mobilefacenet", "width": 0.25, "embedding_dim": 16},
        "head": {"s": 16.0, "m2": 0.2, "sample_rate": 1.0}, "optim": {"lr": 0.05, "warmup_steps": 2},
        "distill": {"methods": {"gkd": 1.0}, "teacher": str(teacher)},
        "train": {"output_dir": str(out / "whole"), "steps": STEPS, "batch_size": 4, "checkpoint_every": 4,
                  "log_every": 2, "keep_checkpoints": 2, "device": "cpu"},
        "ray": {"workers": 2, "max_failures": 2}, "deepspeed": ZERO_1,
    }
    job_file = _write(spec, out)
    result = subprocess.run(_ray_command(job_file, ray_head), capture_output=True, text=True, timeout=400, env=ENV)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert _summary(result.stdout)["step"] == STEPS
    return spec


def _same_spec(spec, name, tmp_path):
    """``spec`` run again under another name and output folder (the same seeds, data and networks)."""
    again = json.loads(json.dumps(spec))
    again["name"], again["train"]["output_dir"] = name, str(tmp_path / name)
    return again


def test_ray_reaches_the_weights_torchrun_reaches(uninterrupted, tmp_path):
    spec = _same_spec(uninterrupted, "torchrun", tmp_path)
    _train(_write(spec, tmp_path), 2)
    by_ray = _weights(checkpoint_path(Path(uninterrupted["train"]["output_dir"]) / "checkpoints", STEPS))
    by_torchrun = _weights(checkpoint_path(tmp_path / "torchrun" / "checkpoints", STEPS))
    assert by_ray.keys() == by_torchrun.keys()
    for key in by_ray:
        torch.testing.assert_close(by_ray[key], by_torchrun[key], rtol=0, atol=0, msg=lambda m: f"{key}: {m}")
    # Ray's copy of the final checkpoint is the trainer's own, byte for byte
    stored = checkpoint_path(_storage(uninterrupted), STEPS)
    assert (stored / "index.json").read_bytes() == (
        checkpoint_path(Path(uninterrupted["train"]["output_dir"]) / "checkpoints", STEPS) / "index.json").read_bytes()


def test_a_killed_worker_restarts_the_group_from_the_last_checkpoint(ray_head, uninterrupted, tmp_path):
    spec = _same_spec(uninterrupted, "killed", tmp_path)
    job_file = _write(spec, tmp_path)
    storage = _storage(spec)
    driver = subprocess.Popen(_ray_command(job_file, ray_head), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=ENV, start_new_session=True)
    try:
        killed_after = _kill_a_worker_after(storage, ray_head, 4)
        output, _ = driver.communicate(timeout=400)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 0, output[-6000:]
    assert killed_after < STEPS, "the run had ended before the worker was killed"
    restored = [line for line in output.splitlines() if "Ray Train restored" in line]
    assert restored, output[-6000:]
    resumed = [int(line.rsplit(" ", 1)[1]) for line in output.splitlines() if "killed: resumed from step" in line]
    assert resumed and 4 <= resumed[0] <= killed_after + 4, output[-6000:]
    assert _summary(output)["step"] == STEPS
    _assert_storage_whole(storage, STEPS)
    assert not list((tmp_path / "killed" / "checkpoints").glob(".step_*.partial.*"))
    # resumed exactly: the weights of the run that was never interrupted
    whole = _weights(checkpoint_path(_storage(uninterrupted), STEPS))
    again = _weights(checkpoint_path(storage, STEPS))
    for key in whole:
        torch.testing.assert_close(again[key], whole[key], rtol=0, atol=0, msg=lambda m: f"{key}: {m}")


def test_a_stopped_driver_run_again_continues_the_run(ray_head, uninterrupted, tmp_path):
    spec = _same_spec(uninterrupted, "stopped", tmp_path)
    job_file = _write(spec, tmp_path)
    storage = _storage(spec)
    driver = subprocess.Popen(_ray_command(job_file, ray_head), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (_registered_steps(storage) and _registered_steps(storage)[-1] >= 4):
        assert driver.poll() is None and time.monotonic() < deadline, "no checkpoint reached Ray storage"
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=60)
    stopped_at = _registered_steps(storage)[-1]  # the run's state in storage once its driver is gone
    assert stopped_at < STEPS
    # the driver owned the run: its workers go with it
    deadline = time.monotonic() + 120
    while _train_workers(ray_head):
        assert time.monotonic() < deadline, "the workers of the killed driver are still running"
        time.sleep(0.5)

    again = subprocess.run(_ray_command(job_file, ray_head), capture_output=True, text=True, timeout=400, env=ENV)
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-6000:]
    restored = [line for line in output.splitlines() if "Ray Train restored" in line]
    assert restored and "step_" in restored[0], output[-6000:]
    resumed_from = int(restored[0].rsplit("step_", 1)[1][:9])
    assert resumed_from == stopped_at
    logged = [int(line.split(" step ")[1].split(":")[0]) for line in output.splitlines() if "stopped step " in line]
    assert logged and min(logged) > resumed_from  # no step before the checkpoint was trained again
    _assert_storage_whole(storage, STEPS)


def test_an_error_in_the_workers_is_one_line_naming_it(ray_head, tiny_job, tmp_path):
    spec = _student(tiny_job, tmp_path / "no_teacher", "orphan")
    result = subprocess.run(_ray_command(_write(spec, tmp_path), ray_head, "--set", "ray.max_failures=0"),
                            capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("facekd: error:")]
    assert errors == [f"facekd: error: Ray Train run orphan failed (max_failures 0): facekd.errors.CheckpointError: "
                      f"checkpoint {tmp_path / 'no_teacher'} does not exist (the workers' tracebacks are above)"]


def test_too_few_shards_for_the_ranks_is_refused_before_ray_starts(tiny_job, teacher, tmp_path):
    spec = _student(tiny_job, teacher, "few_shards")
    spec["data"].update({"resampled": False, "num_workers": 2})  # 3 shards for 2 ranks x 2 loader workers
    job_file = _write(spec, tmp_path)
    for launcher in (["--ray", "--workers", "2"], ["--nproc-per-node", "2"]):
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "facekd", "train", str(job_file), *launcher],
                                capture_output=True, text=True, timeout=120, env={**ENV, "RAY_ADDRESS": ""})
        assert result.returncode == 2, result.stderr[-3000:]
        assert "3 non-empty shards cannot be dealt to 2 ranks x 2 loader workers = 4 streams" in result.stderr
        assert result.stderr.count("\n") == 1 and time.monotonic() - started < 60
    assert not (tmp_path / "few_shards").exists()
    spec["data"]["resampled"], spec["train"]["device"] = True, "cuda"
    on_cpus = _write(spec, tmp_path)
    result = subprocess.run([sys.executable, "-m", "facekd", "train", str(on_cpus), "--ray"], capture_output=True,
                            text=True, timeout=120, env={**ENV, "RAY_ADDRESS": ""})
    assert result.returncode == 2 and "train.device is cuda but ray.gpus_per_worker is 0" in result.stderr


def test_ray_flags_override_the_spec_and_are_checked(tiny_job, teacher, tmp_path):
    from facekd.config import job_from_dict
    from facekd.errors import ConfigError
    from facekd.ray_train import ray_settings, storage_of

    job = job_from_dict(_student(tiny_job, teacher, "flags"))
    assert ray_settings(job, workers=3, cpus_per_worker=None).ray.workers == 3
    assert storage_of(job) == (str(tmp_path / "flags" / "ray"), "flags")
    with pytest.raises(ConfigError, match="'ray.gpus_per_worker' must be >= 0"):
        ray_settings(job, gpus_per_worker=-1.0)
    with pytest.raises(ConfigError, match="unknown key 'ray.nodes'"):
        job_from_dict({**_student(tiny_job, teacher, "flags"), "ray": {"nodes": 2}})
    relative = _write({**_student(tiny_job, teacher, "relative"), "train": {"output_dir": "runs/x", "steps": 2}},
                      tmp_path)
    result = subprocess.run([sys.executable, "-m", "facekd", "submit", str(relative), "--address",
                             "http://127.0.0.1:9"], capture_output=True, text=True, timeout=120, env=ENV)
    assert result.returncode == 2 and "train.output_dir is relative" in result.stderr, result.stderr[-2000:]


def test_the_ray_section_may_change_when_a_run_resumes(tiny_job):
    """More workers, other resources, another storage path: the run is the same one (as with the train section)."""
    from facekd.config import job_from_dict
    from facekd.train import Trainer

    spec = tiny_job("regrown", train={"steps": 2, "checkpoint_every": 2})
    Trainer(job_from_dict(spec), progress=False).fit()
    spec["ray"] = {"workers": 4, "cpus_per_worker": 2.0, "storage_path": "s3://bucket/runs"}
    spec["train"]["steps"] = 3
    assert Trainer(job_from_dict(spec), resume=True, progress=False).fit()["steps_run"] == 1


def test_jobs_stop_ends_a_submitted_run(ray_head, teacher, tiny_job, tmp_path):
    """Runs last: the stopped job's workers are gone before the module's head is."""
    job_file = _write(_student(tiny_job, teacher, "long", steps=400), tmp_path)
    env = {**ENV, "RAY_ADDRESS": ray_head["dashboard"]}

    def facekd(*args):
        return subprocess.run([sys.executable, "-m", "facekd", *args], capture_output=True, text=True, timeout=300,
                              env=env)

    submitted = facekd("submit", str(job_file))
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job_id = submitted.stdout.splitlines()[0].rsplit(" ", 1)[-1]
    assert f"follow it with: facekd jobs logs {job_id} --follow" in submitted.stdout
    deadline = time.monotonic() + 180
    while not _train_workers(ray_head):  # stop it while it trains
        assert time.monotonic() < deadline, facekd("jobs", "logs", job_id).stdout[-3000:]
        time.sleep(0.5)
    assert facekd("jobs", "stop", job_id).stdout.strip() == f"{job_id}: stop requested"
    followed = facekd("jobs", "logs", job_id, "--follow")
    assert followed.returncode == 2 and f"facekd: error: Ray job {job_id} ended STOPPED" in followed.stderr
    assert facekd("jobs", "status", job_id).stdout.startswith(f"{job_id}: STOPPED")
    deadline = time.monotonic() + 120
    while _train_workers(ray_head):
        assert time.monotonic() < deadline, "the stopped job's workers are still running"
        time.sleep(0.5)
