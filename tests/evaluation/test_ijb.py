"""IJB 1:1 maths against known answers: similarity fits, alignment, template aggregation, chunked scores, TAR@FAR."""
from __future__ import annotations

import math

import numpy as np
import pytest

from facekd.errors import DataError
from facekd.evaluation import ijb


def similarity(scale: float, angle: float, shift: tuple[float, float]) -> np.ndarray:
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    return np.array([[c, -s, shift[0]], [s, c, shift[1]]])


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


@pytest.mark.parametrize("scale, angle, shift", [(1.0, 0.0, (0.0, 0.0)), (2.7, 0.4, (31.0, -5.5)),
                                                 (0.43, -2.9, (100.25, 77.0))])
def test_similarity_transform_recovers_a_known_one(scale, angle, shift) -> None:
    known = similarity(scale, angle, shift)
    landmarks = apply(known, ijb.ARCFACE_TEMPLATE)
    np.testing.assert_allclose(ijb.similarity_transform(ijb.ARCFACE_TEMPLATE, landmarks), known, atol=1e-10)
    inverse = np.linalg.inv(np.vstack([known, [0, 0, 1]]))[:2]
    np.testing.assert_allclose(ijb.similarity_transform(landmarks, ijb.ARCFACE_TEMPLATE), inverse, atol=1e-10)


def test_similarity_transform_is_the_least_squares_fit() -> None:
    """Noisy points: no other similarity (perturbed parameters) has a smaller squared error."""
    rng = np.random.default_rng(0)
    source = rng.uniform(0, 100, (5, 2))
    target = apply(similarity(1.3, 0.2, (4.0, 9.0)), source) + rng.normal(0, 2.0, (5, 2))
    fit = ijb.similarity_transform(source, target)
    assert abs(fit[0, 0] - fit[1, 1]) < 1e-12 and abs(fit[0, 1] + fit[1, 0]) < 1e-12  # a similarity
    error = ((apply(fit, source) - target) ** 2).sum()
    a, b, tx, ty = fit[0, 0], fit[1, 0], fit[0, 2], fit[1, 2]
    for delta in np.eye(4) * 1e-3:
        for sign in (1, -1):
            pa, pb, px, py = np.array([a, b, tx, ty]) + sign * delta
            other = np.array([[pa, -pb, px], [pb, pa, py]])
            assert ((apply(other, source) - target) ** 2).sum() > error


@pytest.mark.parametrize("size", [112, 64])
def test_align_face_puts_marked_landmarks_on_the_template(size) -> None:
    """An image with Gaussian dots (evaluated at pixel centres) at a known similarity transform of the template:
    after alignment each dot's centre of mass lies on the template point (within a tenth of a pixel)."""
    scale = 1.9
    known = similarity(scale, 0.35, (60.0, 20.0))
    landmarks = apply(known, ijb.ARCFACE_TEMPLATE)
    ys, xs = np.mgrid[0:260, 0:300].astype(np.float64)
    sigma = 4.0
    blobs = sum(np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2)) for x, y in landmarks)
    canvas = np.repeat((255 * blobs).round().astype(np.uint8)[..., None], 3, axis=2)
    aligned = ijb.align_face(canvas, landmarks, size).astype(np.float64)[..., 0]
    assert aligned.shape == (size, size)
    ys, xs = np.mgrid[0:size, 0:size]
    for point in ijb.ARCFACE_TEMPLATE * size / 112:
        near = (xs - point[0]) ** 2 + (ys - point[1]) ** 2 < (3 * sigma * size / 112 / scale) ** 2
        weight = aligned * near
        centre = np.array([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()
        np.testing.assert_allclose(centre, point, atol=0.1)


def test_align_face_refuses_bad_landmarks() -> None:
    with pytest.raises(DataError, match="need 5 finite"):
        ijb.align_face(np.zeros((20, 20, 3), np.uint8), np.full((5, 2), np.nan))


def test_template_features_by_hand() -> None:
    """Template 7: media 1 (two frames) and media 2 (one photo); template 3: one media of one image."""
    features = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    faceness = np.array([1.0, 0.5, 2.0, 0.9])
    templates = np.array([7, 7, 7, 3])
    medias = np.array([1, 1, 2, 9])
    ids, result = ijb.template_features(features, faceness, templates, medias)
    # media 1: mean of (1, 0)·1 and (3, 0)·0.5 = (1.25, 0); media 2: (0, 4); sum (1.25, 4)
    expected_7 = np.array([1.25, 4.0]) / math.hypot(1.25, 4.0)
    np.testing.assert_array_equal(ids, [3, 7])
    np.testing.assert_allclose(result, [[math.sqrt(0.5), math.sqrt(0.5)], expected_7], atol=1e-15)


def test_template_features_same_media_id_in_two_templates_stays_apart() -> None:
    ids, result = ijb.template_features(np.array([[1.0, 0.0], [0.0, 1.0]]), np.ones(2), np.array([1, 2]),
                                        np.array([5, 5]))
    np.testing.assert_allclose(result, np.eye(2))


def test_pair_scores_chunked_equal_unchunked_and_direct() -> None:
    rng = np.random.default_rng(3)
    ids = np.array([2, 5, 11, 40, 41])
    features = rng.standard_normal((5, 16))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    first, second = rng.choice(ids, 1001), rng.choice(ids, 1001)
    direct = np.array([features[list(ids).index(a)] @ features[list(ids).index(b)] for a, b in zip(first, second)])
    whole = ijb.pair_scores(ids, features, first, second, chunk=10**6)
    for chunk in (1, 7, 1000, 1001):
        np.testing.assert_array_equal(ijb.pair_scores(ids, features, first, second, chunk=chunk), whole)
    np.testing.assert_allclose(whole, direct, atol=1e-14)
    with pytest.raises(DataError, match="names template 3, which has no images"):
        ijb.pair_scores(ids, features, np.array([2, 3]), np.array([5, 5]))


def brute_force_tar(scores: np.ndarray, labels: np.ndarray, far: float) -> float:
    """Every threshold t (accept score >= t): the best TAR among those with FAR <= far."""
    best = 0.0
    for threshold in np.concatenate([[np.inf], np.unique(scores)]):
        accepted = scores >= threshold
        if accepted[~labels].mean() <= far:
            best = max(best, accepted[labels].mean())
    return best


@pytest.mark.parametrize("seed", [0, 1])
def test_tar_at_far_against_brute_force(seed) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(30_000) < 0.1
    scores = np.where(labels, rng.normal(0.6, 0.2, labels.size), rng.normal(0.0, 0.2, labels.size)).round(3)
    tar, fpr, tpr = ijb.tar_at_far_from_scores(scores, labels, (1e-4, 1e-3, 1e-2, 1e-1))
    for far, value in tar.items():
        assert value == pytest.approx(brute_force_tar(scores, labels, far), abs=1e-12), far
    assert set(ijb.tar_at_far_from_scores(scores, labels)[0]) == set(ijb.IJB_FAR_TARGETS)
    assert math.isnan(ijb.tar_at_far_from_scores(scores, labels)[0][1e-5])  # 27k impostors cannot measure 1e-5
