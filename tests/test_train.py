"""The training loop: schedules, resume without lost or repeated steps, distillation from a teacher."""
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from facekd.config import DISTILL_METHODS, job_from_dict, load_job
from facekd.distributed.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint, save_checkpoint
from facekd.errors import CheckpointError, ConfigError, TrainingError
from facekd.network import load_network
from facekd.train import Schedule, Trainer, batches_per_epoch, lr_factor


def _weights(run_dir, step):
    state = load_checkpoint(checkpoint_path(run_dir / "checkpoints", step))
    return {**{f"backbone.{k}": v for k, v in state["backbone"].items()}, "head.weight": state["head"]["weight"]}


def _assert_same_weights(first, second):
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0, msg=f"{key} differs")


@pytest.mark.parametrize("schedule", ["cosine", "piecewise"])
def test_lr_factor_warmup_then_decay(schedule):
    job = job_from_dict({
        "name": "x", "data": {"manifest": "m"}, "model": {"backbone": "iresnet18"},
        "optim": {"warmup_steps": 4, "schedule": schedule, "gamma": 0.5,
                  **({"milestones": [6, 8]} if schedule == "piecewise" else {})},
        "train": {"output_dir": "o", "steps": 10},
    })
    factors = [lr_factor(step, job, Schedule.of(job, batches_per_epoch=3)) for step in range(10)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    if schedule == "cosine":
        expected = [0.5 * (1 + math.cos(math.pi * (step - 4) / 6)) for step in range(4, 10)]
        assert factors[4:] == pytest.approx(expected)
    else:
        assert factors[4:] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


def _timm_cosine_lr(t, *, base, t_initial, lr_min, warmup_t, warmup_lr_init):
    """timm's CosineLRScheduler._get_lr with cycle_limit 1, warmup_prefix False, k_decay 1 (written out)."""
    if t < warmup_t:
        return warmup_lr_init + t * (base - warmup_lr_init) / warmup_t
    if t >= t_initial:
        return lr_min
    return lr_min + 0.5 * (base - lr_min) * (1 + math.cos(math.pi * t / t_initial))


def test_the_official_gkd_schedule_is_timms_cosine_per_step():
    job = load_job(Path(__file__).parents[1] / "jobs" / "ms1mv2_mobilefacenet_gkd_official.yaml")
    per_epoch = 7  # any epoch length: train_gkd.py passes t_initial = 20 epochs and warmup_t = 4 epochs in steps
    schedule = Schedule.of(job, per_epoch)
    assert (schedule.total_steps, schedule.warmup_steps) == (20 * per_epoch, 4 * per_epoch)
    for step in range(schedule.total_steps + 3):
        expected = _timm_cosine_lr(step, base=0.1, t_initial=20 * per_epoch, lr_min=2.5e-7, warmup_t=4 * per_epoch,
                                   warmup_lr_init=2.5e-7)
        assert job.optim.lr * lr_factor(step, job, schedule) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def _insightface_poly_lr(t, *, base, max_steps, warmup_steps, power):
    """arcface_torch's PolyScheduler.get_lr (written out): linear warm-up from 0, then base·(1 − progress)^power."""
    if t < warmup_steps:
        return base * t / warmup_steps
    return base * (1 - (t - warmup_steps) / (max_steps - warmup_steps)) ** power


def test_the_webface42m_spec_has_insightfaces_poly_schedule():
    job = load_job(Path(__file__).parents[1] / "jobs" / "cluster" / "webface42m_iresnet50_teacher_32gpus.yaml")
    per_epoch = 11
    schedule = Schedule.of(job, per_epoch)
    assert (schedule.total_steps, schedule.warmup_steps) == (20 * per_epoch, 2 * per_epoch)
    for step in range(schedule.total_steps):
        expected = _insightface_poly_lr(step, base=0.4, max_steps=20 * per_epoch, warmup_steps=2 * per_epoch,
                                        power=2)
        assert job.optim.lr * lr_factor(step, job, schedule) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_lengths_in_epochs_resolve_with_the_epoch_length(tiny_job):
    job = job_from_dict(tiny_job(train={"steps": None, "epochs": 2.5},
                                 optim={"warmup_steps": 0, "warmup_epochs": 0.5, "schedule": "piecewise",
                                        "milestone_epochs": [1, 2]}))
    per_epoch = batches_per_epoch(job)
    assert per_epoch == 6  # 48 samples in batches of 8
    assert Schedule.of(job, per_epoch) == Schedule(total_steps=15, warmup_steps=3, milestones=(6, 12))
    summary = Trainer(job, progress=False).fit()
    assert summary["step"] == 15


def test_training_lowers_the_loss_and_writes_checkpoints_and_events(tiny_job, tmp_path):
    job = job_from_dict(tiny_job(train={"steps": 30, "checkpoint_every": 10, "keep_checkpoints": 2, "log_every": 5}))
    summary = Trainer(job, progress=False).fit()
    assert summary["step"] == 30 and summary["steps_run"] == 30
    assert [step for step, _ in list_checkpoints(tmp_path / "tiny" / "checkpoints")] == [20, 30]
    assert list((tmp_path / "tiny" / "tensorboard").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tiny" / "tensorboard"))
    events.Reload()
    losses = [event.value for event in events.Scalars("loss/label")]
    assert len(losses) == 6
    # 6 identities at chance give log(6)-ish plus the margin; training must go well below the start
    assert losses[-1] < 0.8 * losses[0]
    network = load_network(tmp_path / "tiny")
    assert network.head.num_classes == 6 and not network.backbone.training


def test_resume_after_interruption_continues_at_the_right_step(tiny_job, tmp_path):
    uninterrupted = job_from_dict(tiny_job("whole"))
    Trainer(uninterrupted, progress=False).fit()

    interrupted = job_from_dict(tiny_job("parts"))
    first = Trainer(interrupted, progress=False).fit(stop_after=3)
    assert first["step"] == 3
    # a kill after step 3 but before its checkpoint: the run must go on from step 2's checkpoint
    shutil.rmtree(checkpoint_path(tmp_path / "parts" / "checkpoints", 3))
    with pytest.raises(ConfigError, match="--resume"):
        Trainer(interrupted, progress=False).fit()
    second = Trainer(interrupted, resume=True, progress=False).fit()
    assert second["step"] == 6 and second["steps_run"] == 4
    _assert_same_weights(_weights(tmp_path / "whole", 6), _weights(tmp_path / "parts", 6))
    again = Trainer(interrupted, resume=True, progress=False).fit()
    assert again["steps_run"] == 0


def test_resume_refuses_a_different_job(tiny_job):
    Trainer(job_from_dict(tiny_job(train={"steps": 2})), progress=False).fit()
    changed = job_from_dict(tiny_job(train={"steps": 2}, optim={"lr": 0.01}))
    with pytest.raises(ValueError, match="different job spec"):
        Trainer(changed, resume=True, progress=False).fit()


@pytest.mark.parametrize("method", ["kd", "gkd"])
def test_distillation_from_a_trained_teacher(tiny_job, tiny_data, tmp_path, method):
    teacher = job_from_dict(tiny_job("teacher", model={"backbone": "iresnet50", "width": 0.125}))
    Trainer(teacher, progress=False).fit()
    student = job_from_dict(tiny_job(
        "student", model={"backbone": "mobilefacenet", "width": 0.25},
        distill={"methods": {method: 1.0}, "teacher": str(tmp_path / "teacher"), method: {"temperature": 2.0}},
        eval={"bins": [str(tiny_data / "data" / "val.bin")], "batch_size": 16},
    ))
    summary = Trainer(student, progress=False).fit()
    assert summary["step"] == 6 and math.isfinite(summary["loss"])
    # the trainer evaluated the FINAL student on the job's bins: the same figure as evaluating that checkpoint
    # afresh, and different from the teacher's on the same pairs
    from facekd.eval import evaluate_checkpoints

    final = checkpoint_path(tmp_path / "student" / "checkpoints", 6)
    val = [str(tiny_data / "data" / "val.bin")]
    (again,) = evaluate_checkpoints([final], val, out_dir=tmp_path / "again", device="cpu", progress=False)
    (teacher_row,) = evaluate_checkpoints([tmp_path / "teacher"], val, out_dir=tmp_path / "t", device="cpu",
                                          progress=False)
    assert summary["verification"]["val"] == again["accuracy"]
    assert again["threshold"] != teacher_row["threshold"]
    assert (tmp_path / "student" / "eval" / "roc.png").stat().st_size > 0
    # the teacher's checkpoint is untouched by distillation
    assert [step for step, _ in list_checkpoints(tmp_path / "teacher" / "checkpoints")][-1] == 6


@pytest.fixture(scope="module")
def trained_teacher(tiny_data, tmp_path_factory):
    """An IResNet teacher trained for 6 steps on the tiny shards, shared by the method tests."""
    output = tmp_path_factory.mktemp("teacher")
    spec = {
        "name": "teacher", "data": {"manifest": str(tiny_data / "shards"), "image_size": 32, "num_workers": 0,
                                    "shuffle_buffer": 16},
        "model": {"backbone": "iresnet50", "width": 0.125, "embedding_dim": 16}, "head": {"s": 16.0, "m2": 0.2},
        "train": {"output_dir": str(output), "steps": 6, "batch_size": 8, "checkpoint_every": 6, "device": "cpu"},
    }
    Trainer(job_from_dict(spec), progress=False).fit()
    return output


def _descend_distillation_term(job, checkpoint, batch, steps=5):
    """The job's distillation loss on ``batch``, before and after ``steps`` Adam steps on it alone, starting
    from the student (and adapters) stored in ``checkpoint``; the teacher's weights must not move."""
    from facekd.train import _forward

    from facekd.distributed.world import World

    trainer = Trainer(job, resume=True, progress=False, world=World.single(torch.device("cpu")))
    trainer.schedule = Schedule.of(job, batches_per_epoch(job))
    run = trainer._build(load_checkpoint(checkpoint), checkpoint)
    teacher_before = [tensor.clone() for tensor in run.teacher.state_dict().values()] if run.teacher else []
    optimizer = torch.optim.Adam([*run.backbone.parameters(), *run.distiller.parameters()], lr=1e-2)
    losses = []
    for _ in range(steps + 1):
        student = _forward(run.backbone, batch.images, run.distiller.needs_stages)
        with torch.no_grad():
            teacher = _forward(run.teacher, batch.images, run.distiller.needs_stages) if run.teacher else None
        total, _ = run.distiller(student, teacher, batch.labels, 0)
        losses.append(total.item())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    if run.teacher:
        assert all(torch.equal(a, b) for a, b in zip(teacher_before, run.teacher.state_dict().values()))
    return losses[0], losses[-1]


@pytest.mark.parametrize("method", DISTILL_METHODS)
def test_every_distillation_method_trains_a_student(tiny_job, trained_teacher, tmp_path, method):
    steps = 3
    student = job_from_dict(tiny_job(
        "student", model={"backbone": "mobilefacenet", "width": 0.25},
        distill={"methods": {method: 1.0}, "teacher": str(trained_teacher), "warmup_epochs": 1},
        train={"steps": steps, "checkpoint_every": steps},
    ))
    summary = Trainer(student, progress=False).fit()
    assert summary["step"] == steps and math.isfinite(summary["loss"])
    final = checkpoint_path(tmp_path / "student" / "checkpoints", steps)
    has_adapters = method in ("fitnet", "shrinkteanet", "srrl")
    assert bool(load_checkpoint(final)["distiller"]) == has_adapters
    # the term, as the trainer wires it (adapters, frozen teacher, stages), falls when the student descends
    # it alone on a fixed batch: a term without gradient, with its sign or its target wrong, would not
    from facekd.data.loader import build_train_loader

    batch = next(iter(build_train_loader(student.data.manifest, batch_size=16, image_size=32, num_workers=0,
                                         shuffle_buffer=0, seed=123)))
    before, after = _descend_distillation_term(
        job_from_dict(tiny_job("student", model={"backbone": "mobilefacenet", "width": 0.25},
                               distill={"methods": {method: 1.0}, "teacher": str(trained_teacher)})),
        final, batch)
    assert 0 < after < 0.9 * before, f"{method}: term {before} before, {after} after 5 steps on it alone"


JOBS = Path(__file__).parents[1] / "jobs"
STUDENT_SPECS = sorted(path for path in JOBS.glob("*.yaml") if "teacher" not in path.stem)


@pytest.mark.parametrize("path", STUDENT_SPECS, ids=[path.stem for path in STUDENT_SPECS])
def test_shipped_student_specs_run_on_synthetic_shards(path, tiny_data, trained_teacher, tmp_path):
    """Each shipped job spec as written, pointed at the tiny shards and shrunk to seconds on a CPU."""
    overrides = [
        f"data.manifest={tiny_data / 'shards'}", "data.image_size=32", "data.num_workers=0", "data.shuffle_buffer=16",
        "model.width=0.25", "model.embedding_dim=16", "model.init_from=null", "head.s=16.0",
        f"train.output_dir={tmp_path / 'run'}",
        "train.steps=2", "train.epochs=null", "train.batch_size=8", "train.device=cpu", "eval.bins=[]",
    ]
    spec = load_job(path)
    if spec.distill.methods:
        overrides.append(f"distill.teacher={trained_teacher}")
    if spec.data.unlabeled_manifest:
        overrides.append(f"data.unlabeled_manifest={tiny_data / 'shards'}")
    if spec.cluster.method == "kmeans":
        overrides.append("cluster.prototypes=4")  # k-means clusters the 48 images into at most 48
    summary = Trainer(load_job(path, overrides), progress=False).fit()
    assert summary["step"] == 2 and math.isfinite(summary["loss"])


@pytest.mark.parametrize("methods", [{"kd": 1.0, "dkd": 1.0}, {"srrl": 1.0}])
def test_unlabeled_extension_trains_and_resumes_exactly(tiny_job, tiny_data, trained_teacher, tmp_path, methods):
    """SRRL thesis Sec. 4.2.2: an unlabeled stream (here the same shards read without labels) and mixup."""

    def job(name):
        return job_from_dict(tiny_job(
            name, data={"unlabeled_manifest": str(tiny_data / "shards")},
            model={"backbone": "mobilefacenet", "width": 0.25},
            distill={"methods": methods, "teacher": str(trained_teacher), "unlabeled": {"mixup_weight": 0.5}},
            train={"steps": 4, "checkpoint_every": 2},
        ))

    whole = Trainer(job("whole"), progress=False).fit()
    assert whole["step"] == 4 and math.isfinite(whole["loss"])
    Trainer(job("parts"), progress=False).fit(stop_after=2)
    Trainer(job("parts"), resume=True, progress=False).fit()
    _assert_same_weights(_weights(tmp_path / "whole", 4), _weights(tmp_path / "parts", 4))


def test_init_from_starts_the_student_from_a_checkpoint(tiny_job, tmp_path):
    Trainer(job_from_dict(tiny_job("s0", train={"steps": 2})), progress=False).fit()
    s0 = _weights(tmp_path / "s0", 2)
    job = job_from_dict(tiny_job("s1", model={"init_from": str(tmp_path / "s0")}, optim={"lr": 1e-9},
                                 train={"steps": 1, "checkpoint_every": 1}))
    Trainer(job, progress=False).fit()
    s1 = _weights(tmp_path / "s1", 1)
    torch.testing.assert_close(s1["head.weight"], s0["head.weight"], rtol=1e-6, atol=1e-7)
    other = job_from_dict(tiny_job("s2", model={"init_from": str(tmp_path / "s0"), "backbone": "mobilefacenet"}))
    with pytest.raises(ValueError, match="holds a iresnet18"):
        Trainer(other, progress=False).fit()


def test_distillation_refuses_a_teacher_of_other_classes(tiny_job, tmp_path):
    teacher = job_from_dict(tiny_job("teacher", train={"steps": 1}))
    Trainer(teacher, progress=False).fit()
    state = load_checkpoint(checkpoint_path(tmp_path / "teacher" / "checkpoints", 1))
    state["head"]["weight"] = torch.zeros(7, 16)
    state["num_classes"] = 7
    save_checkpoint(state, tmp_path / "teacher" / "checkpoints", 1)
    student = job_from_dict(tiny_job("student", distill={"methods": {"kd": 1.0}, "teacher": str(tmp_path / "teacher")}))
    with pytest.raises(ValueError, match="same identities, got 6 and 7 classes"):
        Trainer(student, progress=False).fit()


@pytest.mark.slow
def test_killed_training_process_resumes_from_its_last_checkpoint(tiny_job, tmp_path):
    """A real SIGKILL in the middle of `facekd train`, then `facekd train --resume`."""
    spec = tiny_job("killed", train={"steps": 40, "checkpoint_every": 4, "keep_checkpoints": 3})
    job_file = tmp_path / "killed.yaml"
    job_file.write_text(yaml.safe_dump(spec))
    checkpoints = tmp_path / "killed" / "checkpoints"
    command = [sys.executable, "-m", "facekd", "train", str(job_file)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not any(step >= 8 for step, _ in list_checkpoints(checkpoints)):
        assert process.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint at step 8 within 120 s"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = list_checkpoints(checkpoints)[-1][0]
    assert killed_at < 40
    assert all(load_checkpoint(path)["step"] == step for step, path in list_checkpoints(checkpoints))

    result = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f'"steps_run": {40 - killed_at}' in result.stdout
    assert load_checkpoint(checkpoint_path(checkpoints, 40))["step"] == 40


def _damage_weights(path):
    """Overwrite bytes inside a checkpoint's tensor data with other finite values (the file keeps its size)."""
    state_file = path / "state.pt"
    data = bytearray(state_file.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)  # zero bytes: finite float32 values
    state_file.write_bytes(bytes(data))


def test_a_damaged_newest_checkpoint_is_skipped_by_resume_and_refused_by_eval(tiny_job, tmp_path, caplog):
    job = job_from_dict(tiny_job("run", train={"steps": 6, "checkpoint_every": 2, "keep_checkpoints": 3}))
    Trainer(job, progress=False).fit(stop_after=4)
    checkpoints = tmp_path / "run" / "checkpoints"
    _damage_weights(checkpoint_path(checkpoints, 4))
    with pytest.raises(CheckpointError, match="step_000000004: state.pt is damaged"):
        load_network(tmp_path / "run")
    with caplog.at_level(logging.WARNING):
        summary = Trainer(job, resume=True, progress=False).fit()
    assert "resuming from step_000000002, the newest intact checkpoint" in caplog.text
    assert summary["steps_run"] == 4 and summary["step"] == 6
    # the resumed run rewrote step 4 and reaches the weights of an uninterrupted run
    Trainer(job_from_dict(tiny_job("whole")), progress=False).fit()
    _assert_same_weights(_weights(tmp_path / "whole", 6), _weights(tmp_path / "run", 6))


def test_a_diverging_run_stops_before_saving_and_keeps_its_good_checkpoints(tiny_job, tmp_path):
    job = job_from_dict(tiny_job("run", train={"steps": 6, "checkpoint_every": 2, "keep_checkpoints": 2,
                                               "log_every": 100}))
    Trainer(job, progress=False).fit(stop_after=2)
    good = load_checkpoint(checkpoint_path(tmp_path / "run" / "checkpoints", 2))
    # a resumed run whose weights are poisoned: its next checkpoint would be non-finite
    poisoned = {**good, "backbone": {key: value.clone() for key, value in good["backbone"].items()}}
    first_conv = next(key for key, value in poisoned["backbone"].items() if value.dtype.is_floating_point)
    poisoned["backbone"][first_conv].fill_(float("nan"))
    save_checkpoint(poisoned, tmp_path / "run" / "checkpoints", 3)
    with pytest.raises(TrainingError, match=r"non-finite before step 4.*last good checkpoint \(.*step_000000003\)"):
        Trainer(job, resume=True, progress=False).fit()
    assert [step for step, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [2, 3]


def test_a_huge_learning_rate_stops_with_the_step_and_the_last_good_checkpoint(tiny_job, tmp_path):
    job = job_from_dict(tiny_job("run", optim={"lr": 1e6, "warmup_steps": 0, "clip_grad_norm": 0},
                                 train={"steps": 40, "checkpoint_every": 1, "keep_checkpoints": 2, "log_every": 1}))
    with pytest.raises(TrainingError, match=r"became (nan|inf|non-finite) .*step.*; nothing was saved after the last good"):
        Trainer(job, progress=False).fit()
    for step, path in list_checkpoints(tmp_path / "run" / "checkpoints"):
        state = load_checkpoint(path)
        assert all(tensor.isfinite().all() for tensor in state["backbone"].values() if tensor.is_floating_point())


def test_resume_removes_partial_folders_left_by_a_killed_writer(tiny_job, tmp_path):
    job = job_from_dict(tiny_job("run", train={"steps": 4, "checkpoint_every": 2}))
    Trainer(job, progress=False).fit(stop_after=2)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = os.uname().nodename.split(".")[0]
    orphan = tmp_path / "run" / "checkpoints" / f".step_000000004.partial.{host}.{int(dead.stdout)}"
    orphan.mkdir()
    (orphan / "state.pt").write_bytes(bytes(10_000))
    Trainer(job, resume=True, progress=False).fit()
    assert not orphan.exists()


def test_resume_refuses_data_with_another_number_of_classes(tiny_job, tmp_path):
    job = job_from_dict(tiny_job("run", train={"steps": 4, "checkpoint_every": 2}))
    Trainer(job, progress=False).fit(stop_after=2)
    path = checkpoint_path(tmp_path / "run" / "checkpoints", 2)
    state = load_checkpoint(path)
    state["num_classes"] = 9
    save_checkpoint(state, tmp_path / "run" / "checkpoints", 2)
    with pytest.raises(CheckpointError, match="holds a head of 9 classes, but .* now has 6"):
        Trainer(job, resume=True, progress=False).fit()


def test_partial_fc_sampling_trains_in_one_process(tiny_job):
    job = job_from_dict(tiny_job("sampled", head={"sample_rate": 0.5}, train={"steps": 4, "checkpoint_every": 4}))
    summary = Trainer(job, progress=False).fit()
    assert summary["step"] == 4 and math.isfinite(summary["loss"])
