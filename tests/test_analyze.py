"""facekd analyze routing (facekd.analyze): purity and AMI on constructed labels, and the command end to end on a
short CondFace run with the clustering loss on the synthetic shards."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from facekd.analyze import purity, random_assignment, score_clusters
from facekd.cli import main


def reference_ami(u: list, v: list) -> float:
    """AMI with the arithmetic-mean normalisation (Vinh, Epps & Bailey 2010), float64, written out: the expected
    mutual information summed over the hypergeometric distribution of each cell."""
    n = len(u)
    a, b = Counter(u), Counter(v)
    cells = Counter(zip(u, v))
    mi = sum(c / n * math.log(n * c / (a[i] * b[j])) for (i, j), c in cells.items())
    entropy = lambda counts: -sum(c / n * math.log(c / n) for c in counts.values())
    emi = 0.0
    for ai in a.values():
        for bj in b.values():
            for nij in range(max(1, ai + bj - n), min(ai, bj) + 1):
                log_p = (math.lgamma(ai + 1) + math.lgamma(bj + 1) + math.lgamma(n - ai + 1) + math.lgamma(n - bj + 1)
                         - math.lgamma(n + 1) - math.lgamma(nij + 1) - math.lgamma(ai - nij + 1)
                         - math.lgamma(bj - nij + 1) - math.lgamma(n - ai - bj + nij + 1))
                emi += nij / n * math.log(n * nij / (ai * bj)) * math.exp(log_p)
    mean_entropy = (entropy(a) + entropy(b)) / 2
    return (mi - emi) / (mean_entropy - emi)


def test_purity_by_hand():
    clusters = np.array([0, 0, 0, 1, 1, 2])
    labels = np.array(["a", "a", "b", "b", "b", "c"])
    assert purity(clusters, labels) == pytest.approx(5 / 6)  # 2 + 2 + 1 of 6
    assert purity(np.zeros(6, int), labels) == pytest.approx(3 / 6)  # one cluster: the largest class
    assert purity(np.arange(6), labels) == 1.0  # singletons are pure
    with pytest.raises(ValueError):
        purity(clusters, labels[:5])


def test_perfect_clustering_scores_one_and_ami_matches_the_definition():
    labels = np.array(list("aaabbbbcc"))
    renamed = np.array([7, 7, 7, 2, 2, 2, 2, 5, 5])
    scores = score_clusters(renamed, {"x": labels})["x"]
    assert scores["purity"] == 1.0 and scores["ami"] == pytest.approx(1.0) and scores["classes"] == 3
    clusters = np.array([0, 0, 1, 1, 1, 2, 2, 0, 2])
    got = score_clusters(clusters, {"x": labels})["x"]["ami"]
    assert got == pytest.approx(reference_ami(list(labels), list(clusters)), abs=1e-10)
    assert got < 1.0


def test_random_assignment_keeps_cluster_sizes_and_scores_near_chance():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 3000)
    clusters = labels * 10 + rng.integers(0, 10, 3000)  # every cluster pure
    baseline = random_assignment(clusters, seed=1)
    assert sorted(Counter(baseline).values()) == sorted(Counter(clusters).values())
    scores = score_clusters(clusters, {"x": labels}, seed=1)["x"]
    assert scores["purity"] == 1.0 and scores["ami"] > 0.4
    assert abs(scores["random_ami"]) < 0.01 and scores["random_purity"] < 0.45


@pytest.mark.slow
def test_analyze_routing_end_to_end(tiny_job, tiny_data, tmp_path, capsys):
    """The shipped AS4 job spec (Sinkhorn clustering loss), shrunk to a few steps on the synthetic shards; the
    report, its scores for every attribute and the PNGs; the run's prototypes as clusters; a static network
    refused in one line."""
    from facekd.config import job_from_dict
    from facekd.train import Trainer

    shipped = yaml.safe_load((Path(__file__).parents[1] / "jobs" / "condface_dgconv_iresnet18_sinkhorn.yaml")
                             .read_text())
    tiny = tiny_job("routed", train={"steps": 3, "checkpoint_every": 3})
    spec = {**shipped, **{section: tiny[section] for section in ("name", "data", "head", "optim", "train")},
            "model": {**shipped["model"], "width": 0.125, "embedding_dim": 16, "init_from": None},
            "cluster": {**shipped["cluster"], "prototypes": 4, "hidden_dim": 32, "head_dim": 8}, "eval": {}}
    run = tmp_path / "routed"
    Trainer(job_from_dict(spec), progress=False).fit()
    out = tmp_path / "analysis"
    args = ["analyze", "routing", str(run), "--data", str(tiny_data / "shards"), "--attributes",
            str(tiny_data / "data" / "attributes.csv"), "--clusters", "6", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "routing.json").read_text())
    assert report["images"] == 48 and report["clusters"] == 6 and report["routing_dim"] == 6 * 16
    for name in ("yaw", "light", "occluded", "skin", "identity", "nuisances"):
        row = report["scores"][name]
        assert 0 < row["purity"] <= 1 and 0 < row["random_purity"] <= 1 and -1 <= row["ami"] <= 1
    assert (out / "routing.md").read_text().count("\n| ") >= len(report["scores"]) + 1
    for plot in report["plots"]:
        with Image.open(out / plot) as image:
            assert image.format == "PNG" and image.size[0] > 300
    assert "pca_cluster.png" in report["plots"] and "pca_yaw.png" in report["plots"]
    assert "purity / AMI" in capsys.readouterr().out

    assert main(args[:-2] + ["--out", str(tmp_path / "by_prototypes"), "--method", "prototypes",
                             "--max-images", "20", "--embed", "tsne"]) == 0
    report = json.loads((tmp_path / "by_prototypes" / "routing.json").read_text())
    assert report["images"] == 20 and report["clusters"] == 4 and report["method"] == "prototypes"
    assert "tsne_cluster.png" in report["plots"]

    static = tiny_job("static", train={"steps": 1, "checkpoint_every": 1})
    Trainer(job_from_dict(static), progress=False).fit()
    capsys.readouterr()
    assert main(["analyze", "routing", str(tmp_path / "static")] + args[3:]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "iresnet18, which has no routing vectors" in error
