"""One facekd eval command scores every benchmark: --bins, --ijb (two folders) and --megaface together."""
from __future__ import annotations

import shutil

import pytest

from facekd.cli import main
from facekd.config import job_from_dict
from facekd.data.synth_identification import synthesize_identification
from facekd.data.synth_ijb import synthesize_ijb


@pytest.fixture
def run(tiny_job):
    from facekd.train import Trainer

    job = job_from_dict(tiny_job("teacher", train={"steps": 2}))
    Trainer(job).fit()
    return job.train.output_dir


def test_every_benchmark_in_one_command(run, tiny_data, tmp_path, capsys) -> None:
    bins = tmp_path / "bins"
    bins.mkdir()
    shutil.copy(tiny_data / "data" / "val.bin", bins / "lfw.bin")
    synthesize_ijb(tmp_path / "IJBB", name="IJBB", num_subjects=3, templates_per_subject=2, image_size=32)
    synthesize_ijb(tmp_path / "IJBC", num_subjects=3, templates_per_subject=2, image_size=32)
    synthesize_identification(tmp_path / "mega", num_identities=3, num_distractors=20, image_size=32)
    out = tmp_path / "out"
    assert main(["eval", str(run), "--bins", str(bins), "--ijb", str(tmp_path / "IJBB"), str(tmp_path / "IJBC"),
                 "--megaface", str(tmp_path / "mega"), "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    for header in ("| network | lfw", "| IJBB TAR@FAR |", "| IJBB 1:N |", "| IJBC TAR@FAR |", "| IJBC 1:N |",
                   "| network | rank-1 | rank-5 | TAR@FAR=1e-06 | distractors |"):
        assert header in printed
    for name in ("results.json", "table.md", "roc_lfw.png", "IJBB.json", "IJBC.md", "roc_IJBC.png",
                 "identification.json", "cmc.png"):
        assert (out / name).is_file(), name


@pytest.mark.parametrize("options, message", [
    ([], "give --bin FILE..., or any of --bins DIR, --ijb ROOT..., --megaface ROOT"),
    (["--bin", "a.bin", "--megaface", "m"], "--bin scores single files on its own"),
    (["--ijb", "a", "b", "--ijb-name", "IJBC"], "--ijb-name names one benchmark, but --ijb gives 2 folders"),
])
def test_refusals(options, message, tmp_path, capsys) -> None:
    assert main(["eval", str(tmp_path), *options]) == 2
    assert message in capsys.readouterr().err
