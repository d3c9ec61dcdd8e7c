"""IJB 1:N: TPIR at FPIR against a brute-force threshold search and a by-hand case; the protocol files."""
from __future__ import annotations

import math

import numpy as np
import pytest

from facekd.errors import DataError
from facekd.evaluation import ijb_1n


def brute_force_tpir(probes, probe_subjects, gallery, gallery_subjects, fpir: float) -> float:
    """Every threshold t (accept a search whose best score >= t): the best TPIR among those with FPIR <= fpir."""
    scores = probes @ gallery.T
    mate = probe_subjects[:, None] == gallery_subjects[None, :]
    mated = mate.any(axis=1)
    best = scores.max(axis=1)
    mate_score = np.where(mate, scores, -np.inf).max(axis=1)
    first = mate_score > np.where(mate, -np.inf, scores).max(axis=1)
    result = 0.0
    for threshold in np.concatenate([[np.inf], np.unique(scores)]):
        if (best[~mated] >= threshold).mean() <= fpir:
            result = max(result, (first & (mate_score >= threshold))[mated].mean())
    return result


@pytest.mark.parametrize("probes, subjects, enrolled, dim", [(300, 40, 25, 8), (211, 13, 6, 5)])
def test_tpir_at_fpir_against_brute_force(probes, subjects, enrolled, dim) -> None:
    rng = np.random.default_rng(probes)
    centres = rng.standard_normal((subjects, dim))
    gallery_subjects = np.arange(enrolled)
    gallery = centres[:enrolled] + 0.4 * rng.standard_normal((enrolled, dim))
    probe_subjects = rng.integers(0, subjects, probes)
    probe = centres[probe_subjects] + 0.7 * rng.standard_normal((probes, dim))
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    probe /= np.linalg.norm(probe, axis=1, keepdims=True)
    fprs = (0.01, 0.05, 0.1, 0.3)
    result = ijb_1n.tpir_at_fpir(probe, probe_subjects, gallery, gallery_subjects, fprs, chunk=17)
    for fpir in fprs:
        non_mated = (~np.isin(probe_subjects, gallery_subjects)).sum()
        if non_mated < 1 / fpir:
            assert math.isnan(result[fpir])
        else:
            assert result[fpir] == pytest.approx(brute_force_tpir(probe, probe_subjects, gallery, gallery_subjects,
                                                                  fpir), abs=1e-12), fpir


def test_tpir_at_fpir_by_hand() -> None:
    """Gallery: subjects 1, 2 at angles 0 and 90 degrees. Mated probes: subject 1 at cos 0.9 (first), subject 2
    at cos 0.6 but nearer subject 1 (not first), subject 1 at cos 0.5 (first). Ten non-mated probes with best
    scores 0.95, 0.7, 0.55, 0.4, ... FPIR 0.1: one false alarm allowed, accept above 0.7: TPIR 1/3. FPIR 0.2:
    above 0.55: still 1/3. FPIR 0.3: above 0.4: 2/3 (the 0.5 probe now counts; the second never does)."""
    gallery = np.array([[1.0, 0.0], [0.0, 1.0]])

    def at(cos_first: float, cos_second: float) -> list[float]:
        return [cos_first, cos_second]  # scores against gallery rows are the coordinates (not unit: fine here)

    mated = np.array([at(0.9, 0.1), at(0.65, 0.6), at(0.5, 0.2)])
    non_mated = np.array([at(0.95, 0.0), at(0.7, 0.0), at(0.55, 0.0), at(0.4, 0.0)] + [at(0.1, 0.0)] * 6)
    probes = np.concatenate([mated, non_mated])
    subjects = np.array([1, 2, 1] + [9] * 10)
    result = ijb_1n.tpir_at_fpir(probes, subjects, gallery, np.array([1, 2]), (0.1, 0.2, 0.3))
    assert result == pytest.approx({0.1: 1 / 3, 0.2: 1 / 3, 0.3: 2 / 3}, abs=1e-12)


def test_read_ijb_1n_files(tmp_path) -> None:
    meta = tmp_path / "meta"
    meta.mkdir()
    assert ijb_1n.read_ijb_1n(tmp_path, "IJBB") is None
    (meta / "ijbb_1N_gallery_S1.csv").write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n1,5,a.jpg\n1,5,b.jpg\n2,6,c.jpg\n")
    with pytest.raises(DataError, match="incomplete .* ijbb_1N_gallery_S2.csv, ijbb_1N_probe_mixed.csv missing"):
        ijb_1n.read_ijb_1n(tmp_path, "IJBB")
    (meta / "ijbb_1N_gallery_S2.csv").write_text("SUBJECT_ID,TEMPLATE_ID\n7,3\n")
    (meta / "ijbb_1N_probe_mixed.csv").write_text("TEMPLATE_ID,SUBJECT_ID\n4,5\n4,6\n")
    with pytest.raises(DataError, match=r"probe_mixed.csv:3: template 4 is listed for subjects 5 and 6"):
        ijb_1n.read_ijb_1n(tmp_path, "IJBB")
    (meta / "ijbb_1N_probe_mixed.csv").write_text("TEMPLATE_ID,SUBJECT_ID\n4,5\n")
    assert ijb_1n.read_ijb_1n(tmp_path, "IJBB") == {"S1": {1: 5, 2: 6}, "S2": {3: 7}, "probes": {4: 5}}
