"""Golden losses: a short fixed-seed single-process run's per-step losses, recorded to the last bit on CPU.

The resume tests compare two runs of the same code; this one compares today's code with the numbers the
trainer produced before the distributed rewrite (recorded by ``python tests/test_golden.py --record``), so a
refactor of the step, the head, the distiller or the optimiser that changes any number is caught here.
Re-record only for a change that is meant to change the numbers, and say why in the commit.
"""
import json
import struct
import sys
from pathlib import Path

import pytest
import torch

from facekd.config import job_from_dict
from facekd.train import Trainer

GOLDEN = Path(__file__).parent / "golden" / "losses.json"
STEPS = 5


def _spec(data, out, name, **sections):
    job = {
        "name": name,
        "data": {"manifest": str(data / "shards"), "image_size": 32, "num_workers": 0, "shuffle_buffer": 16},
        "model": {"backbone": "iresnet50", "width": 0.125, "embedding_dim": 16},
        "head": {"s": 16.0, "m2": 0.2},
        "optim": {"lr": 0.05, "warmup_steps": 2},
        "train": {"output_dir": str(out / name), "steps": STEPS, "batch_size": 8, "checkpoint_every": STEPS,
                  "log_every": 1, "device": "cpu"},
    }
    for section, values in sections.items():
        job[section] = {**job.get(section, {}), **values}
    return job_from_dict(job)


def _student(data, out, name, methods, **distill):
    return _spec(data, out, name, model={"backbone": "mobilefacenet", "width": 0.25},
                 distill={"methods": methods, "teacher": str(out / "teacher"), **distill})


def _per_step(run_dir):
    """(label loss, distillation loss) of every step, as the bits of their float32 values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    def bits(tag):
        return [struct.pack(">f", event.value).hex() for event in events.Scalars(tag)]
    return {"label": bits("loss/label"), "distill": bits("loss/distill")}


RUNS = {
    "teacher": None,
    "kd_dkd": {"kd": 1.0, "dkd": 0.5},
    "gkd": {"gkd": 1.0},
    "gkd_official": {"gkd": 1.0},
    "srrl_fitnet": {"srrl": 1.0, "fitnet": 0.5},
}
OFFICIAL = {"gkd": {"selection": "fixed", "k": 3, "force_target": True, "margined_logits": True, "temperature": 4.0}}


def record(data, out):
    """Train every golden run; returns {run: per-step loss bits}."""
    losses = {}
    for name, methods in RUNS.items():
        if methods is None:
            job = _spec(data, out, "teacher")
        else:
            job = _student(data, out, name, methods, **(OFFICIAL if name == "gkd_official" else {}))
        Trainer(job, progress=False).fit()
        losses[name] = _per_step(Path(job.train.output_dir))
    return losses


@pytest.mark.slow
def test_single_process_losses_equal_the_recorded_ones(tiny_data, tmp_path):
    expected = json.loads(GOLDEN.read_text())
    got = record(tiny_data, tmp_path)
    for name in RUNS:
        assert len(got[name]["label"]) == STEPS
        assert got[name] == expected[name], f"{name}: per-step losses changed"


if __name__ == "__main__":  # python tests/test_golden.py --record
    import tempfile

    from facekd.data.convert import convert_to_shards
    from facekd.data.synth import synthesize

    assert sys.argv[1:] == ["--record"], "usage: python tests/test_golden.py --record"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # the tiny_data fixture of conftest.py
        synthesize(root / "data", num_identities=6, images_per_identity=8, num_val_identities=4, num_pairs=20,
                   image_size=32, seed=0, show_progress=False)
        convert_to_shards(root / "data" / "rec", root / "shards", shard_size=16, seed=0, show_progress=False)
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(record(root, root / "runs"), indent=1) + "\n")
    print(f"wrote {GOLDEN}")
