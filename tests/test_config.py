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
    official = "cosface" in path.stem or "official" in path.stem
    # the GKD paper's ArcFace, or the CosFace of its authors' code
    assert (job.head.s, job.head.m2, job.head.m3) == ((64.0, 0.0, 0.4) if official else (64.0, 0.5, 0.0))
    if "gkd" in job.distill.methods:
        gkd = job.distill.gkd
        paper = (0.93, 8.0, 1.0, 1.0, "sample", False, False)
        code = (0.93, 4.0, 1.0, 4.0, "batch", True, True)
        assert (gkd.tau, gkd.w_primary, gkd.w_binary, gkd.temperature, gkd.selection, gkd.force_target,
                gkd.margined_logits) == (code if official else paper)


def test_defaults_fill_a_minimal_spec(tmp_path):
    job = load_job(_write(tmp_path, MINIMAL))
    assert job.data.image_size == 112 and job.optim.lr == 0.1 and job.distill.methods == {}
    assert job_to_dict(job)["train"]["steps"] == 10


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": {"backbone": "mobilefacenet", "depth": 3}}, "unknown key 'model.depth'"),
        ({"extra": 1}, "unknown key 'extra'"),
        ({"train": {"output_dir": "o"}}, "missing required key 'train.steps'"),
        ({"train": {"output_dir": "o", "steps": "ten"}}, "'train.steps' must be int, got 'ten'"),
        ({"train": {"output_dir": "o", "steps": 0}}, "'train.steps' must be positive, got 0"),
        ({"model": {"backbone": "resnet9"}}, "'model.backbone' must be one of"),
        ({"optim": {"schedule": "step"}}, "'optim.schedule' must be one of ['cosine', 'piecewise']"),
        ({"distill": {"methods": {"gkd": 1.0}}}, "'distill.teacher' is required for ['gkd']"),
        ({"distill": {"methods": {"gdk": 1.0}, "teacher": "t"}}, "'distill.methods' has unknown method 'gdk'"),
        ({"distill": {"methods": {"gkd": "x"}, "teacher": "t"}}, "'distill.methods.gkd' must be float, got 'x'"),
        ({"distill": {"gkd": {"tau": 1.5}}}, "'distill.gkd.tau' must be in (0, 1]"),
        ({"distill": {"gkd": {"selection": "fixed"}}}, "'distill.gkd.k' is required with selection 'fixed'"),
        ({"optim": {"milestones": [5, 3]}}, "'optim.milestones' must be increasing"),
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
    job = load_job(path, ["train.steps=25", "optim.milestones=[5, 9]", "head.m3=0.35"])
    assert (job.train.steps, job.optim.milestones, job.head.m3) == (25, [5, 9], 0.35)
    with pytest.raises(ConfigError, match="unknown key 'train.step'"):
        load_job(path, ["train.step=25"])
    with pytest.raises(ConfigError, match="not of the form section.key=value"):
        load_job(path, ["train.steps"])


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_job(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(broken)
