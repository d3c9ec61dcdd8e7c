"""IJB-B / IJB-C 1:1 template verification: the maths of insightface's ``ijb_11.py`` protocol.

Per face image: align to the 112×112 ArcFace template by the similarity transform of its 5 landmarks
(Umeyama's least squares), embed it and its flip and add them (F2), multiply by the detector's
faceness score without normalising first (N1, D1). Per template: average the images of one media
(video frames), sum the media, L2-normalise. Pairs are scored by dot product in chunks; TAR is read
at FAR 1e-6 … 1e-1.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from facekd.errors import DataError

__all__ = ["ARCFACE_TEMPLATE", "IJB_FAR_TARGETS", "align_face", "pair_scores", "similarity_transform",
           "tar_at_far_from_scores", "template_features"]

ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    np.float64,
)
"""Where insightface's ``norm_crop`` puts the left eye, right eye, nose tip, left and right mouth corner in a
112×112 crop (pixel-centre coordinates: pixel (0, 0) is centred on (0, 0))."""
IJB_FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
"""The FAR columns of insightface's IJB table."""


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """2×3 matrix [sR | t] of the similarity that best maps ``source`` points [K, 2] onto ``target`` [K, 2] in
    least squares (Umeyama 1991, Eq. 40–42; what skimage's ``SimilarityTransform.estimate`` computes)."""
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    if source.shape != target.shape or source.ndim != 2 or source.shape[1] != 2 or len(source) < 2:
        raise ValueError(f"need two [K, 2] point sets with K >= 2, got {source.shape} and {target.shape}")
    source_mean, target_mean = source.mean(0), target.mean(0)
    source_centred, target_centred = source - source_mean, target - target_mean
    covariance = target_centred.T @ source_centred / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # a reflection fits better: take the best rotation instead
        sign[-1] = -1.0
    rotation = u @ np.diag(sign) @ vt
    variance = (source_centred**2).sum() / len(source)
    if variance == 0:
        raise ValueError("the source points coincide: no similarity transform")
    scale = (singular * sign).sum() / variance
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = target_mean - scale * rotation @ source_mean
    return matrix


def align_face(image: Image.Image | np.ndarray, landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """uint8 [S, S, 3] crop of ``image`` whose 5 ``landmarks`` [5, 2] (pixel-centre coordinates, as detectors and
    insightface give them) land on :data:`ARCFACE_TEMPLATE` scaled to ``image_size``; bilinear, black outside
    the image (as ``cv2.warpAffine(..., borderValue=0)`` in insightface's ``norm_crop``)."""
    landmarks = np.asarray(landmarks, np.float64)
    if landmarks.shape != (5, 2) or not np.isfinite(landmarks).all():
        raise DataError(f"need 5 finite (x, y) landmarks, got {landmarks.shape} {landmarks.ravel()[:10].tolist()}")
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    forward = np.vstack([similarity_transform(landmarks, ARCFACE_TEMPLATE * image_size / 112), [0, 0, 1]])
    inverse = np.linalg.inv(forward)
    # PIL samples output pixel (i, j) at its centre (i + 0.5, j + 0.5) and reads input pixel k as centred on k + 0.5:
    # shift into pixel-centre coordinates, map back, shift out
    shift = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
    unshift = np.array([[1, 0, -0.5], [0, 1, -0.5], [0, 0, 1]])
    coefficients = (shift @ inverse @ unshift)[:2].ravel()
    aligned = image.convert("RGB").transform((image_size, image_size), Image.Transform.AFFINE,
                                             tuple(coefficients.tolist()), Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    return np.asarray(aligned)


def template_features(
    image_features: np.ndarray, faceness: np.ndarray, templates: np.ndarray, medias: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(template ids [T] sorted, unit template features [T, D]) of flip-summed image features [N, D].

    Each image feature is multiplied by its faceness score (not normalised first: its norm is a quality weight
    too); the images of one (template, media) are averaged; a template is the sum of its media, L2-normalised
    (insightface ``image2template_feature``).
    """
    image_features = np.asarray(image_features, np.float64)
    count = len(image_features)
    if not (len(faceness) == len(templates) == len(medias) == count):
        raise DataError(f"{count} image features but {len(faceness)} scores, {len(templates)} template and "
                        f"{len(medias)} media ids")
    weighted = image_features * np.asarray(faceness, np.float64)[:, None]
    pairs = np.stack([np.asarray(templates, np.int64), np.asarray(medias, np.int64)], axis=1)
    media_keys, media_of_image = np.unique(pairs, axis=0, return_inverse=True)
    media_of_image = media_of_image.ravel()
    media_sum = np.zeros((len(media_keys), weighted.shape[1]))
    np.add.at(media_sum, media_of_image, weighted)
    media_mean = media_sum / np.bincount(media_of_image, minlength=len(media_keys))[:, None]
    template_ids, template_of_media = np.unique(media_keys[:, 0], return_inverse=True)
    features = np.zeros((len(template_ids), weighted.shape[1]))
    np.add.at(features, template_of_media.ravel(), media_mean)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return template_ids, features / np.where(norms > 0, norms, 1.0)


def pair_scores(
    template_ids: np.ndarray, features: np.ndarray, first: np.ndarray, second: np.ndarray, *, chunk: int = 100_000,
) -> np.ndarray:
    """Cosine score [P] of template pairs (``first[i]``, ``second[i]``), ``chunk`` pairs at a time (a pair list of
    IJB-C's 15.6M pairs never holds two [P, D] matrices). A template id not in ``template_ids`` is a DataError."""
    first, second = np.asarray(first, np.int64), np.asarray(second, np.int64)
    rows = []
    for ids in (first, second):
        position = np.searchsorted(template_ids, ids).clip(0, len(template_ids) - 1)
        unknown = template_ids[position] != ids
        if unknown.any():
            raise DataError(f"pair list names template {int(ids[unknown][0])}, which has no images "
                            f"({int(unknown.sum())} such pair entries)")
        rows.append(position)
    scores = np.empty(len(first))
    for start in range(0, len(first), chunk):
        end = start + chunk
        scores[start:end] = np.einsum("pd,pd->p", features[rows[0][start:end]], features[rows[1][start:end]])
    return scores


def tar_at_far_from_scores(
    scores: np.ndarray, labels: np.ndarray, far_targets: Sequence[float] = IJB_FAR_TARGETS,
) -> tuple[dict[float, float], np.ndarray, np.ndarray]:
    """({FAR: TAR}, fpr, tpr) of pair scores: TAR is the best true accept rate of a threshold whose false accept rate
    does not exceed the target (NaN with fewer than 1/target impostor pairs), as :func:`facekd.eval.tar_at_far`."""
    from facekd.eval import _roc_from_pairs, _tar_from_roc

    labels = np.asarray(labels).astype(bool)
    fpr, tpr, _ = _roc_from_pairs(np.asarray(scores, np.float64), labels)
    return _tar_from_roc(fpr, tpr, int((~labels).sum()), far_targets), fpr, tpr
