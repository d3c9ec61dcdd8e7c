"""Job specs: strict loading with errors that name the key and the file; every shipped spec loads."""
from pathlib import Path

import pytest
import yaml

from facekd.config import ConfigError, job_to_dict, load_job

JOBS = sorted((Path(__file__).parents[1] / "jobs").glob("*.yaml"))
MINIMAL = {
    "name": "run",
    "data": {"manifest": "shards/manifest.json"},
    "model": {"backbone": "mobilefacenet"},
    "train": {"output_dir": "runs/run", "steps": 10},
}


def _write(tmp_path, spec):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("path", JOBS, ids=[path.name for path in JOBS])
def test_shipped_job_specs_load(path):
    job = load_job(path)
    released_code = {"official": "train_gkd", "adaptive": "gkd_adaptive"}
    code = next((name for tag, name in released_code.items() if tag in path.stem), None)
    # the GKD paper's ArcFace, or the CosFace of its authors' code, or CondFace's (thesis Eq. 5.4)
    cosface = code is not None or "cosface" in path.stem or path.stem.startswith("condface")
    assert (job.head.s, job.head.m2, job.head.m3) == ((64.0, 0.0, 0.4) if cosface else (64.0, 0.5, 0.0))
    if "gkd" in job.distill.methods:
        gkd = job.distill.gkd
        expected = {
            None: (0.93, 8.0, 1.0, 1.0, "sample", None, False, False),  # the paper
            "train_gkd": (0.93, 8.0, 1.0, 4.0, "fixed", 10000, True, True),  # distillation/gkd.py
            "gkd_adaptive": (0.93, 4.0, 1.0, 4.0, "batch", None, True, True),
        }[code]
        assert (gkd.tau, gkd.w_primary, gkd.w_binary, gkd.temperature, gkd.selection, gkd.k, gkd.force_target,
                gkd.margined_logits) == expected
    if code is not None:  # train_gkd.py's recipe
        optim = job.optim
        assert (optim.lr, optim.momentum, optim.nesterov, optim.weight_decay, optim.clip_grad_norm) == (
            0.1, 0.9, True, 5e-4, 0.0)
        assert (optim.schedule, optim.warmup_epochs, optim.warmup_start_lr, optim.min_lr, optim.cosine_from) == (
            "cosine", 4.0, 2.5e-7, 2.5e-7, "start")
        assert (job.train.epochs, job.train.precision, job.distill.warmup_epochs,
                job.distill.warmup_first_epoch) == (20.0, "fp32", 10.0, 0)
    if "dkd" in job.distill.methods:  # mdistiller counts epochs from 1
        assert (job.distill.warmup_epochs, job.distill.warmup_first_epoch) == (20.0, 1)


def test_defaults_fill_a_minimal_spec(tmp_path):
    job = load_job(_write(tmp_path, MINIMAL))
    assert job.data.image_size == 112 and job.optim.lr == 0.1 and job.distill.methods == {}
    assert job_to_dict(job)["train"]["steps"] == 10


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": {"backbone": "mobilefacenet", "depth": 3}}, "unknown key 'model.depth'"),
        ({"extra": 1}, "unknown key 'extra'"),
        ({"train": {"output_dir": "o"}}, "'train.steps' or 'train.epochs' gives the run's length: give exactly one, got neither"),
        ({"train": {"output_dir": "o", "steps": "ten"}}, "'train.steps' must be int, got 'ten'"),
        ({"train": {"output_dir": "o", "steps": 0}}, "'train.steps' must be positive, got 0"),
        ({"model": {"backbone": "resnet9"}}, "'model.backbone' must be one of"),
        ({"optim": {"schedule": "step"}}, "'optim.schedule' must be one of ['cosine', 'piecewise', 'poly']"),
        ({"distill": {"methods": {"gkd": 1.0}}}, "'distill.teacher' is required for ['gkd']"),
        ({"distill": {"methods": {"gdk": 1.0}, "teacher": "t"}}, "'distill.methods' has unknown method 'gdk'"),
        ({"distill": {"methods": {"gkd": "x"}, "teacher": "t"}}, "'distill.methods.gkd' must be float, got 'x'"),
        ({"distill": {"gkd": {"tau": 1.5}}}, "'distill.gkd.tau' must be in (0, 1]"),
        ({"distill": {"gkd": {"selection": "fixed"}}}, "'distill.gkd.k' is required with selection 'fixed'"),
        ({"optim": {"schedule": "piecewise", "milestones": [5, 3]}}, "'optim.milestones' must be positive and increasing"),
        # values that loaded silently before and trained nonsense or failed later without naming the key
        ({"optim": {"gamma": -1}}, "'optim.gamma' must be in (0, 1], got -1.0"),
        ({"optim": {"weight_decay": -1e-4}}, "'optim.weight_decay' must be >= 0"),
        ({"optim": {"momentum": -0.5}}, "'optim.momentum' must be in [0, 1)"),
        ({"optim": {"momentum": 1.0}}, "'optim.momentum' must be in [0, 1)"),
        ({"optim": {"momentum": 0.0, "nesterov": True}}, "'optim.nesterov' needs momentum > 0"),
        ({"optim": {"lr": float("inf")}}, "'optim.lr' must be a finite number"),
        ({"optim": {"warmup_steps": 5, "warmup_epochs": 1}}, "'optim.warmup_epochs' and warmup_steps are alternatives"),
        ({"optim": {"min_lr": 0.5}}, "'optim.min_lr' must be in [0, lr=0.1]"),
        ({"optim": {"milestones": [5]}}, "'optim.milestones' are used only by schedule 'piecewise'"),
        ({"eval": {"batch_size": 0}}, "'eval.batch_size' must be positive, got 0"),
        ({"train": {"output_dir": "o", "steps": 5, "epochs": 2}}, "give exactly one, got both"),
        ({"head": {"m2": -0.1}}, "'head.m2' must be in [0, π/2)"),
        ({"head": {"m3": 1.5}}, "'head.m3' must be in [0, 1)"),
        ({"distill": {"gkd": {"w_primary": -1}}}, "'distill.gkd.w_primary' must be a finite weight >= 0"),
        ({"distill": {"dkd": {"beta": -8}}}, "'distill.dkd.beta' must be a finite weight >= 0"),
        ({"distill": {"rkd": {"w_angle": -1}}}, "'distill.rkd.w_angle' must be a finite weight >= 0"),
        ({"distill": {"srrl": {"alpha": -1}}}, "'distill.srrl.alpha' must be a finite weight >= 0"),
        ({"distill": {"warmup_first_epoch": 2}}, "'distill.warmup_first_epoch' must be one of [0, 1]"),
    ],
)
def test_bad_specs_name_the_key_and_the_file(tmp_path, change, message):
    path = _write(tmp_path, {**MINIMAL, **change})
    with pytest.raises(ConfigError) as error:
        load_job(path)
    assert message in str(error.value)
    assert str(path) in str(error.value)


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    path = _write(tmp_path, MINIMAL)
    job = load_job(path, ["train.steps=25", "optim.schedule=piecewise", "optim.milestones=[5, 9]", "head.m3=0.35"])
    assert (job.train.steps, job.optim.milestones, job.head.m3) == (25, [5, 9], 0.35)
    with pytest.raises(ConfigError, match="unknown key 'train.step'"):
        load_job(path, ["train.step=25"])
    with pytest.raises(ConfigError, match="not of the form section.key=value"):
        load_job(path, ["train.steps"])
    with pytest.raises(ConfigError, match=r"override 'optim.milestones=\[5, 9': the value is not valid YAML"):
        load_job(path, ["optim.milestones=[5, 9"])


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_job(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(broken)
