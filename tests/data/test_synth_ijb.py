"""The synthetic IJB-style set: landmarks follow the drawn face through pose and loose crop; the file layout."""
from __future__ import annotations

import math

import numpy as np
import pytest

from facekd.data.synth import FaceRenderer, _perspective_coefficients, face_params
from facekd.data.synth_ijb import _loose_crop, synthesize_ijb
from facekd.errors import ConfigError, DataError


@pytest.mark.parametrize("size", [112, 49])
def test_landmarks_under_a_known_pose(size) -> None:
    """Without a pose the landmarks are the canonical points; under a pose that is a similarity (rotation, scale,
    shift of the canvas) they move by exactly that similarity."""
    renderer = FaceRenderer(size)
    face = face_params(3, 17)
    canonical = np.array([[0.5 - face.eye_spacing, face.eye_y], [0.5 + face.eye_spacing, face.eye_y],
                          [0.5, face.eye_y + face.nose_length], [0.5 - face.mouth_w, face.mouth_y],
                          [0.5 + face.mouth_w, face.mouth_y]])
    identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0)
    np.testing.assert_allclose(renderer.landmarks(face, identity), canonical * size - 0.5, atol=1e-9)
    # output = 1.1 R(0.3) (input - c) + c + shift, in canvas edge coordinates
    scale, angle, shift, centre = 1.1, 0.3, np.array([7.0, -4.0]), renderer.canvas / 2
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    corners = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]) * renderer.canvas
    posed_corners = (corners - centre) @ rotation.T + centre + shift
    pose = _perspective_coefficients(posed_corners, corners)
    expected = ((canonical * renderer.canvas - centre) @ rotation.T + centre + shift) / 2 - 0.5
    np.testing.assert_allclose(renderer.landmarks(face, pose), expected, atol=1e-9)


def test_render_with_landmarks_draws_what_render_draws() -> None:
    renderer = FaceRenderer(64)
    face = face_params(0, 2)
    canonical = renderer.canonical(face)
    pixels, landmarks = renderer.render_with_landmarks(face, canonical, np.random.default_rng(5))
    np.testing.assert_array_equal(pixels, renderer.render(face, canonical, np.random.default_rng(5)))
    assert landmarks.shape == (5, 2) and (landmarks > 0).all() and (landmarks < 64).all()
    assert landmarks[0, 0] < landmarks[2, 0] < landmarks[1, 0]  # image-left eye, nose, image-right eye
    assert landmarks[:2, 1].max() < landmarks[2, 1] < landmarks[3:, 1].min()  # eyes above nose above mouth


def test_loose_crop_moves_the_landmarks_with_the_pixels() -> None:
    """Gaussian dots at the landmarks of a blank sample: in the loose crop each dot's centre of mass lies on the
    moved landmark."""
    size, sigma = 96, 2.5
    landmarks = np.array([[30.0, 40.0], [66.0, 38.5], [48.0, 58.0], [35.0, 75.0], [62.0, 76.0]])
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    dots = sum(np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2)) for x, y in landmarks)
    sample = np.repeat((255 * dots).round().astype(np.uint8)[..., None], 3, axis=2)
    image, moved = _loose_crop(sample, landmarks, np.random.default_rng(4))
    channel = np.asarray(image, np.float64)[..., 0] - np.asarray(image, np.float64)[0, 0, 0]  # minus the fill
    ys, xs = np.mgrid[0:channel.shape[0], 0:channel.shape[1]]
    for point in moved:
        near = (xs - point[0]) ** 2 + (ys - point[1]) ** 2 < (4 * sigma) ** 2
        weight = np.clip(channel, 0, None) * near
        centre = np.array([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()
        np.testing.assert_allclose(centre, point, atol=0.15)


def test_synthesize_ijb_layout(tmp_path) -> None:
    summary = synthesize_ijb(tmp_path / "IJBB", name="IJBB", num_subjects=3, templates_per_subject=2,
                             image_size=40, seed=1)
    meta = tmp_path / "IJBB" / "meta"
    media_rows = [line.split() for line in (meta / "ijbb_face_tid_mid.txt").read_text().splitlines()]
    landmark_rows = [line.split() for line in (meta / "ijbb_name_5pts_score.txt").read_text().splitlines()]
    pair_text = (meta / "ijbb_template_pair_label.txt").read_text()
    pair_rows = [list(map(int, line.split())) for line in pair_text.splitlines()]
    assert len(media_rows) == len(landmark_rows) == summary["num_images"]
    assert [row[0] for row in media_rows] == [row[0] for row in landmark_rows]
    assert all(len(row) == 12 and 0.6 <= float(row[-1]) <= 1.0 for row in landmark_rows)
    assert all((tmp_path / "IJBB" / "loose_crop" / row[0]).is_file() for row in media_rows)
    templates = sorted({int(row[1]) for row in media_rows})
    assert templates == list(range(1, 7))
    # a media belongs to one template; every pair of templates once, same subject = templates 2k+1, 2k+2
    media_template = {}
    for _, template, media in media_rows:
        assert media_template.setdefault(media, template) == template
    assert [(a, b) for a, b, _ in pair_rows] == [(a, b) for a in range(1, 7) for b in range(a + 1, 7)]
    assert all(label == int((a - 1) // 2 == (b - 1) // 2) for a, b, label in pair_rows)
    assert summary["num_same_pairs"] == 3
    before = {path.name: path.read_bytes() for path in meta.iterdir()}
    with pytest.raises(DataError, match="already holds"):
        synthesize_ijb(tmp_path / "IJBB", name="IJBB", num_subjects=3, templates_per_subject=2, image_size=40, seed=1)
    synthesize_ijb(tmp_path / "IJBB", name="IJBB", num_subjects=3, templates_per_subject=2, image_size=40, seed=1,
                   overwrite=True)
    assert {path.name: path.read_bytes() for path in meta.iterdir()} == before
    with pytest.raises(ConfigError, match="IJBB or IJBC"):
        synthesize_ijb(tmp_path / "x", name="ijbc")
