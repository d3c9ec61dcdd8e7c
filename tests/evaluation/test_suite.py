"""facekd eval --bins: every .bin of a folder, one table across networks, embeddings cached per checkpoint."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from facekd import eval as fkeval
from facekd.config import job_from_dict
from facekd.data.verification import load_bin, write_bin
from facekd.errors import DataError
from facekd.evaluation import suite
from facekd.network import load_network


@pytest.fixture
def run(tiny_job):
    """A tiny trained run with checkpoints at steps 2 and 4."""
    from facekd.train import Trainer

    job = job_from_dict(tiny_job("teacher", train={"steps": 4}))
    Trainer(job).fit()
    return job.train.output_dir


@pytest.fixture
def bins(tiny_data, tmp_path):
    folder = tmp_path / "bins"
    folder.mkdir()
    for name, source in (("zz_extra", "val_hard"), ("cfp_fp", "val_hard"), ("lfw", "val")):
        shutil.copy(tiny_data / "data" / f"{source}.bin", folder / f"{name}.bin")
    return folder


def test_find_bins_orders_as_the_papers(bins, tmp_path) -> None:
    (bins / "agedb_30.bin").write_bytes((bins / "lfw.bin").read_bytes())
    assert [path.stem for path in suite.find_bins(bins)] == ["lfw", "cfp_fp", "agedb_30", "zz_extra"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .bin files there"):
        suite.find_bins(tmp_path / "empty")


def test_suite_equals_the_one_file_path_and_caches(run, bins, tmp_path, monkeypatch) -> None:
    steps = sorted((tmp_path / "teacher" / "checkpoints").iterdir())
    assert [path.name for path in steps] == ["step_000000002", "step_000000004"]
    files = suite.find_bins(bins)
    rows = suite.evaluate_suite([steps[0], run], files, out_dir=tmp_path / "out", device="cpu",
                                names=["early", "late"], progress=False)
    assert [(row["model"], row["dataset"], row["cached"]) for row in rows] == [
        ("early", "lfw", False), ("late", "lfw", False), ("early", "cfp_fp", False), ("late", "cfp_fp", False),
        ("early", "zz_extra", True), ("late", "zz_extra", True)]  # the same bytes as cfp_fp: embedded once
    # the reference: facekd.eval.evaluate_bin of each network on each file
    for row, (step, path) in zip(rows, [(s, f) for f in files for s in steps]):
        network = load_network(step, "cpu", with_head=False)
        reference = fkeval.evaluate_bin(network.backbone, path, image_size=32, device="cpu", progress=False)
        assert row["accuracy"] == reference["accuracy"] and row["threshold"] == reference["threshold"]
        assert row["auc"] == pytest.approx(reference["auc"], abs=1e-12)
    assert rows[0]["accuracy"] != rows[1]["accuracy"] or rows[0]["auc"] != rows[1]["auc"]  # two networks

    table = (tmp_path / "out" / "table.md").read_text().splitlines()
    assert [cell.strip() for cell in table[0].split("|")[1:-1]] == ["network", "lfw", "cfp_fp", "zz_extra"]
    assert table[2].startswith("| early ") and f"{100 * rows[0]['accuracy']:.2f}" in table[2]
    assert len({len(line) for line in table}) == 1
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved[0]["accuracy"] == rows[0]["accuracy"] and "fpr" not in saved[0]
    for name in ("lfw", "cfp_fp", "zz_extra"):
        assert (tmp_path / "out" / f"roc_{name}.png").read_bytes()[:4] == b"\x89PNG"

    # again: nothing is embedded, the numbers are the same
    def no_embedding(*args, **kwargs):
        raise AssertionError("embedded although cached")

    monkeypatch.setattr(suite, "embed_pixels", no_embedding)
    again = suite.evaluate_suite([steps[0], run], files, out_dir=tmp_path / "out", device="cpu",
                                 names=["early", "late"], progress=False)
    assert all(row["cached"] for row in again)
    assert [row["accuracy"] for row in again] == [row["accuracy"] for row in rows]
    monkeypatch.undo()

    # a changed file is embedded again, by every network; the others stay cached
    images, issame = load_bin(bins / "lfw.bin")
    write_bin(bins / "cfp_fp.bin", images[:20], issame[:10])
    changed = suite.evaluate_suite([steps[0], run], files, out_dir=tmp_path / "out", device="cpu",
                                   names=["early", "late"], progress=False)
    assert [row["cached"] for row in changed] == [True, True, False, False, True, True]
    assert changed[2]["num_pairs"] == 10


def test_checkpoints_of_one_run_get_distinct_labels(run, bins, tmp_path) -> None:
    steps = sorted((tmp_path / "teacher" / "checkpoints").iterdir())
    rows = suite.evaluate_suite(steps, [bins / "lfw.bin"], out_dir=tmp_path / "out", device="cpu", progress=False)
    assert [row["model"] for row in rows] == [f"teacher ({step.name})" for step in steps]


def test_table_marks_missing_cells() -> None:
    table = suite.format_suite_table([{"model": "t", "dataset": "lfw", "accuracy": 0.99567},
                                      {"model": "s", "dataset": "cplfw", "accuracy": 0.9}])
    lines = table.splitlines()
    assert lines[2] == "| t       | 99.57 | n/a   |" and lines[3] == "| s       | n/a   | 90.00 |"


def test_command_line(run, bins, tmp_path, capsys) -> None:
    from facekd.cli import main

    assert main(["eval", str(run), "--bins", str(bins), "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--cache", str(tmp_path / "cache")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split("|")[1].strip() == "network" and printed[2].startswith("| teacher ")
    assert list((tmp_path / "cache").rglob("*.npy"))
    assert main(["eval", str(run), "--bins", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"facekd: error: --bins {tmp_path / 'nowhere'}: not a folder\n"
