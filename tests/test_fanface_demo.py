"""The FAN-Face comparison on synthetic faces (facekd.fanface_demo): its job specs are the ones in jobs/fanface/,
and a tiny version of the whole pipeline (landmark faces → FAN → plain and FAN-Face networks → 10-fold
verification) runs and writes both results."""
import json
import math
from pathlib import Path

import pytest
import yaml

from facekd.config import job_from_dict
from facekd.fanface_demo import COMPARISON, comparison_jobs, run_comparison

JOBS = Path(__file__).resolve().parents[1] / "jobs" / "fanface"


def test_the_synthetic_job_specs_are_the_comparisons():
    jobs = comparison_jobs()
    for variant in ("plain", "h2_11_bl_h2l2"):
        path = JOBS / f"fanface_synthetic_{variant}.yaml"
        assert yaml.safe_load(path.read_text()) == jobs[variant]
        job = job_from_dict(jobs[variant], str(path))
        assert (job.model.fan is None) == (variant == "plain")
    plain, fanface = jobs["plain"], jobs["h2_11_bl_h2l2"]
    # the same run but for the FAN: data, steps, seed, head, optimiser and the network's own layers
    assert {k: v for k, v in plain.items() if k not in ("name", "model", "train")} == \
           {k: v for k, v in fanface.items() if k not in ("name", "model", "train")}
    assert {k: v for k, v in fanface["model"].items() if k != "fan"} == plain["model"]
    assert {k: v for k, v in fanface["train"].items() if k != "output_dir"} == \
           {k: v for k, v in plain["train"].items() if k != "output_dir"}
    assert fanface["model"]["fan"]["weights"] == jobs["fan"]["train"]["output_dir"]
    assert job_from_dict(jobs["fan"]).landmarks.image_size == fanface["model"]["fan"]["input_size"]


TINY = dict(
    synth=dict(num_identities=6, images_per_identity=8, num_val_identities=4, num_pairs=20, image_size=32),
    landmarks=dict(num_identities=4, images_per_identity=4, num_val_identities=2, val_images_per_identity=2,
                   image_size=64),
    fan=dict(width=8, stacks=2, depth=4, image_size=64, steps=3, batch_size=8, lr=COMPARISON["fan"]["lr"]),
    frn=dict(backbone="iresnet18", width=0.125, embedding_dim=16, image_size=32, steps=3, batch_size=8),
)


@pytest.mark.slow
def test_a_tiny_comparison_trains_the_fan_and_both_networks_and_verifies_both(tmp_path):
    results = run_comparison(tmp_path / "out", sizes=TINY, device="cpu", progress=False)
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["networks"].keys() == {"plain", "h2_11_bl_h2l2"}
    assert written["fan"]["step"] == 3
    for variant, result in written["networks"].items():
        assert result["steps"] == 3 and result["train_images_per_second"] > 0
        assert result["verification"].keys() == {"val", "val_hard"}
        for scores in result["verification"].values():
            assert 0 <= scores["accuracy"] <= 1 and math.isfinite(scores["std"])
    assert written == json.loads(json.dumps(results))
    # the FAN-Face network holds the FAN the landmark job trained
    from facekd.models.fan import load_fan
    from facekd.network import load_network

    fan = load_fan(tmp_path / "out" / "runs" / "fan")
    backbone = load_network(tmp_path / "out" / "runs" / "h2_11_bl_h2l2", with_head=False).backbone
    for key, value in fan.state_dict().items():
        assert backbone.fan.state_dict()[key].equal(value), key
