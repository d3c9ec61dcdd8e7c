"""facekd eval --megaface on a synthetic probe / gallery / distractor split: equal to identify() on embeddings made
by hand, distractor embeddings memory-mapped in the cache and read back on a second run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from facekd.config import job_from_dict
from facekd.data.loader import to_float
from facekd.data.synth_identification import synthesize_identification
from facekd.errors import DataError
from facekd.evaluation import identification
from facekd.network import load_network


@pytest.fixture
def run(tiny_job):
    from facekd.train import Trainer

    job = job_from_dict(tiny_job("teacher", train={"steps": 4}))
    Trainer(job).fit()
    return job.train.output_dir


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("megaface")
    synthesize_identification(root, num_identities=6, probes_per_identity=2, gallery_per_identity=1,
                              num_distractors=1003, image_size=32, seed=3)
    return root


def embed_by_hand(backbone, paths) -> np.ndarray:
    with torch.no_grad():
        pixels = torch.from_numpy(np.stack([np.asarray(Image.open(path).convert("RGB")) for path in paths]))
        x = to_float(pixels, "mxnet")
        return (backbone(x) + backbone(torch.flip(x, dims=[3]))).numpy()


def test_synthetic_split_layout(split) -> None:
    sets = identification.find_identification_sets(split)
    assert [len(sets[name][0]) for name in identification.IDENTIFICATION_SETS] == [12, 6, 1003]
    assert sorted(set(sets["probes"][1])) == sorted(set(sets["gallery"][1])) and len(set(sets["gallery"][1])) == 6
    assert {path.parent.name for path in sets["distractors"][0]} == {"0000", "0001"}


def test_evaluate_identification_equals_identify_and_reuses_distractors(run, split, tmp_path) -> None:
    rows = identification.evaluate_identification([run], split, out_dir=tmp_path / "out", device="cpu",
                                                  names=["teacher"], far_targets=(1e-3,), progress=False)
    (row,) = rows
    assert row["cached"] == {"probes": False, "gallery": False, "distractors": False}
    network = load_network(run, "cpu", with_head=False)
    sets = identification.find_identification_sets(split)
    by_hand = {name: embed_by_hand(network.backbone, paths) for name, (paths, _) in sets.items()}
    reference = identification.identify(by_hand["probes"], np.array(sets["probes"][1]), by_hand["gallery"],
                                        np.array(sets["gallery"][1]), by_hand["distractors"], far_targets=(1e-3,))
    assert row["rank1"] == reference.rank1 and row["tar_at_far"] == reference.tar_at_far
    np.testing.assert_array_equal(row["cmc"], reference.cmc)
    # the distractors' cache entry is a .npy memory map; a second run reads every set from it
    cached = list((tmp_path / "out" / "embeddings").rglob("*.npy"))
    assert len(cached) == 3 and max(np.load(path, mmap_mode="r").shape[0] for path in cached) == 1003
    again = identification.evaluate_identification([run], split, out_dir=tmp_path / "out", device="cpu",
                                                   names=["teacher"], far_targets=(1e-3,), progress=False)
    assert again[0]["cached"] == {"probes": True, "gallery": True, "distractors": True}
    assert again[0]["rank1"] == row["rank1"]
    saved = json.loads((tmp_path / "out" / "identification.json").read_text())
    assert saved[0]["num_distractors"] == 1003 and saved[0]["tar_at_far"]["0.001"] == row["tar_at_far"][1e-3]
    assert (tmp_path / "out" / "cmc.png").stat().st_size > 1000


def test_cli_eval_megaface(run, split, tmp_path, capsys) -> None:
    from facekd.cli import main

    assert main(["eval", str(run), "--megaface", str(split), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "| network" in printed and "TAR@FAR=1e-06" in printed and "1,003" in printed
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no probes/ folder"):
        identification.find_identification_sets(tmp_path / "empty")
