"""MegaFace-style identification against a brute-force reference: ranks, CMC, TAR@FAR; chunking changes nothing."""
from __future__ import annotations

import numpy as np
import pytest

from facekd.errors import DataError
from facekd.evaluation import identification
from facekd.evaluation.ijb import tar_at_far_from_scores


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def make_sets(seed: int, probes: int, identities: int, distractors: int, dim: int):
    """Identities with centres; gallery: one or two noisy entries per identity; probes: noisier entries."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((identities, dim))
    gallery_labels = np.concatenate([np.arange(identities), rng.choice(identities, identities // 2, replace=False)])
    gallery = centres[gallery_labels] + 0.6 * rng.standard_normal((len(gallery_labels), dim))
    probe_labels = rng.integers(0, identities, probes)
    probe = centres[probe_labels] + 0.9 * rng.standard_normal((probes, dim))
    return (probe.astype(np.float32), probe_labels, gallery.astype(np.float32), gallery_labels,
            rng.standard_normal((distractors, dim)).astype(np.float32))


def brute_force(probe, probe_labels, gallery, gallery_labels, distractors):
    """The whole [P, G + N] score matrix in float64: rank by counting, TAR from the ROC of all pairs."""
    everything = unit(np.concatenate([gallery, distractors]).astype(np.float64))
    scores = unit(probe.astype(np.float64)) @ everything.T
    labels = np.concatenate([gallery_labels, np.full(len(distractors), -1)])
    mate = probe_labels[:, None] == labels[None, :]
    best_mate = np.where(mate, scores, -np.inf).max(axis=1)
    ranks = 1 + (np.where(mate, -np.inf, scores) >= best_mate[:, None]).sum(axis=1)
    return ranks, scores[mate], scores[~mate]


@pytest.mark.parametrize("probes, identities, distractors, dim", [(37, 20, 9001, 16), (5, 3, 0, 8),
                                                                  (64, 50, 4096, 33)])
def test_identify_equals_brute_force(probes, identities, distractors, dim) -> None:
    sets = make_sets(probes + dim, probes, identities, distractors, dim)
    result = identification.identify(*sets, far_targets=(1e-4, 1e-3, 1e-2), max_rank=10, chunk=4096)
    ranks, genuine, impostor = brute_force(*sets)
    np.testing.assert_array_equal(result.ranks, ranks)
    np.testing.assert_allclose(result.cmc, [(ranks <= k).mean() for k in range(1, 11)], atol=0)
    assert result.num_impostors == len(impostor)
    labels = np.concatenate([np.ones(len(genuine), bool), np.zeros(len(impostor), bool)])
    reference, _, _ = tar_at_far_from_scores(np.concatenate([genuine, impostor]), labels, (1e-4, 1e-3, 1e-2))
    for far, tar in reference.items():
        if np.isnan(tar):
            assert np.isnan(result.tar_at_far[far])
        else:
            assert result.tar_at_far[far] == pytest.approx(tar, abs=1e-12), far
    assert 0 < result.rank1 < 1 or distractors == 0


def test_chunking_changes_nothing_exactly() -> None:
    sets = make_sets(7, 23, 15, 3 * identification.SCORE_BLOCK + 17, 12)
    whole = identification.identify(*sets, far_targets=(1e-4,), chunk=10**9)
    for chunk in (1, identification.SCORE_BLOCK, 2 * identification.SCORE_BLOCK + 5):
        chunked = identification.identify(*sets, far_targets=(1e-4,), chunk=chunk)
        np.testing.assert_array_equal(chunked.ranks, whole.ranks)
        assert chunked.tar_at_far == whole.tar_at_far


def test_ties_count_against_the_probe_and_distractors_lower_rank1() -> None:
    probe = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    gallery = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    distractors = np.array([[2.0, 0.0], [0.0, -1.0], [1.0, 1.0]], np.float32)  # the first ties probe 0's mate
    result = identification.identify(probe, np.array([0, 1]), gallery, np.array([0, 1]), distractors, max_rank=3)
    np.testing.assert_array_equal(result.ranks, [2, 1])
    np.testing.assert_array_equal(result.cmc, [0.5, 1.0, 1.0])
    assert np.isnan(result.tar_at_far[1e-6])  # 8 impostor pairs


def test_probe_without_mate_is_refused() -> None:
    with pytest.raises(DataError, match="probe identity 7 has no gallery entry"):
        identification.identify(np.ones((2, 4)), np.array([0, 7]), np.ones((1, 4)), np.array([0]), np.ones((3, 4)))


def test_plot_cmc_writes_a_png(tmp_path) -> None:
    path = identification.plot_cmc({"a": np.linspace(0.5, 1.0, 100)}, tmp_path / "cmc.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def at_cosines(cosines) -> np.ndarray:
    """Unit 2-D rows whose score against the probe (1, 0) is each cosine."""
    cosines = np.asarray(cosines, np.float64)
    return np.stack([cosines, np.sqrt(1 - cosines**2)], axis=1).astype(np.float32)


def test_tar_at_far_by_hand() -> None:
    """100 impostors at 0.9, 0.8, 0.7, 0.6 and 96 × 0; genuine 0.95, 0.85, 0.75, 0.65. FAR 2 %: at most 2 false
    accepts, so accept above the third impostor (0.7): TAR 3/4. FAR 1 %: above 0.8: 2/4. FAR 4 %: above 0 (the
    fifth): 4/4."""
    gallery = at_cosines([0.95, 0.85, 0.75, 0.65])
    distractors = at_cosines([0.9, 0.8, 0.7, 0.6] + [0.0] * 96)
    result = identification.identify(at_cosines([1.0]), np.array([0]), gallery, np.zeros(4, int), distractors,
                                     far_targets=(0.01, 0.02, 0.04), max_rank=2)
    assert result.num_impostors == 100
    assert result.tar_at_far == pytest.approx({0.01: 0.5, 0.02: 0.75, 0.04: 1.0}, abs=1e-12)
    np.testing.assert_array_equal(result.ranks, [1])
