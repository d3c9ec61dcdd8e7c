"""Landmarks of the synthetic faces (facekd.data.synth_landmarks): where the drawn parts are, and the shard writer."""
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from facekd.cli import main
from facekd.data.synth import RENDER_SCALE, FaceRenderer, _superellipse, face_params
from facekd.data.synth_landmarks import (
    DENSE_FLIP, FIRST_LANDMARK_IDENTITY, FIVE_FLIP, canonical_dense_landmarks, read_landmark_manifest,
    read_landmark_split, render_with_dense_landmarks, synthesize_landmarks,
)
from facekd.errors import DataError


def _expression(renderer: FaceRenderer, face, seed: int):
    """The canonical face with one sample's expression drawn on it (no pose, occluders or photometry), and the
    shapes that expression returned."""
    image = Image.new("RGB", (renderer.canvas, renderer.canvas), (0, 0, 255))
    canonical = renderer.canonical(face)
    image.paste(canonical, (0, 0), canonical)
    shapes = renderer._draw_expression(ImageDraw.Draw(image), face, np.random.default_rng(seed))
    return np.asarray(image), shapes


def test_flip_tables_are_involutions():
    assert sorted(DENSE_FLIP) == list(range(68)) and all(DENSE_FLIP[DENSE_FLIP[i]] == i for i in range(68))
    assert all(FIVE_FLIP[FIVE_FLIP[i]] == i for i in range(5))


@pytest.mark.parametrize("identity", [0, 7, 31])
def test_dense_landmarks_of_a_face_are_mirror_symmetric(identity):
    # the renderer draws every part symmetric about x = 0.5 (tilt, brows, lips), so the mirrored points,
    # renumbered by DENSE_FLIP, are the points themselves
    renderer = FaceRenderer(112)
    face = face_params(0, identity)
    _, shapes = _expression(renderer, face, identity)
    points = canonical_dense_landmarks(face, shapes)
    mirrored = np.stack([1.0 - points[:, 0], points[:, 1]], axis=1)[list(DENSE_FLIP)]
    np.testing.assert_allclose(mirrored, points, atol=1e-9)
    # and they read left to right where iBUG says so: jaw, brows, eye corners, mouth corners
    assert np.all(np.diff(points[0:17, 0][:9]) > 0) and points[8, 1] == points[:17, 1].max()
    assert np.all(np.diff(points[17:27, 0]) > 0)
    assert points[36, 0] < points[39, 0] < points[42, 0] < points[45, 0]
    assert points[48, 0] < points[54, 0] and points[30, 1] > points[27, 1]


@pytest.mark.parametrize("identity", [1, 4, 12])
def test_dense_landmarks_lie_on_the_drawn_parts(identity):
    renderer = FaceRenderer(224)  # canvas 448: the thin parts are a few pixels wide
    face = face_params(0, identity)
    pixels, shapes = _expression(renderer, face, 100 + identity)
    points = canonical_dense_landmarks(face, shapes)
    at = np.clip(np.round(points * renderer.canvas - 0.5).astype(int), 0, renderer.canvas - 1)

    def colour(index):
        return tuple(int(v) for v in pixels[at[index, 1], at[index, 0]])

    brow = tuple(int(c * 0.75) for c in face.hair)
    for index in range(17, 27):  # the brow centre line is inside the drawn brow band
        assert np.abs(np.subtract(colour(index), brow)).max() <= 1, index
    nostril = tuple(int(c * 0.5) for c in face.skin)
    if face.nostril * face.nose_w * renderer.canvas > 3:  # nostrils wider than a few pixels
        for index in (32, 34):
            assert np.abs(np.subtract(colour(index), nostril)).max() <= 30, (index, colour(index), nostril)
    # the jaw lies on the face outline canonical() draws: within a canvas pixel of its 64-point polygon (the points
    # are on the curve that polygon's chords cut)
    outline = _superellipse(0.5, face.face_cy, face.face_w, face.face_h, face.face_power, face.chin_taper)
    segments = np.stack([outline, np.roll(outline, -1, axis=0)], axis=1)
    for point in points[:17]:
        a, b = segments[:, 0], segments[:, 1]
        t = np.clip(((point - a) * (b - a)).sum(1) / ((b - a) ** 2).sum(1), 0, 1)
        distance = np.linalg.norm(a + t[:, None] * (b - a) - point, axis=1).min()
        assert distance * renderer.canvas < 1.0
    # eye corners and lid points lie on the drawn eye polygon's boundary
    for eye, first in zip(shapes["eyes"], (36, 42)):
        for point in points[first:first + 6]:
            assert np.linalg.norm(eye - point, axis=1).min() * renderer.canvas < 0.25 * renderer.canvas * face.eye_w


def test_render_with_dense_landmarks_draws_what_render_draws_and_moves_points_with_the_pose():
    renderer = FaceRenderer(112)
    face = face_params(3, 5)
    canonical = renderer.canonical(face)
    pixels, five, dense = render_with_dense_landmarks(renderer, face, canonical, np.random.default_rng(9))
    reference, reference_five = renderer.render_with_landmarks(face, canonical, np.random.default_rng(9))
    assert np.array_equal(pixels, reference) and np.array_equal(five, reference_five)
    assert dense.shape == (68, 2)
    # the identity warp maps canonical fractions f to output pixel centres f * size - 0.5
    identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0)
    points = np.array([[0.25, 0.5], [0.5, 0.75]])
    np.testing.assert_allclose(renderer.posed_points(points, identity), points * renderer.canvas / RENDER_SCALE - 0.5)
    # a posed sample's eye centres (5 points) sit between its eye corners (68 points)
    for eye, (outer, inner) in zip(five[:2], ((36, 39), (42, 45))):
        corners = dense[[outer, inner]]
        assert np.linalg.norm(eye - corners.mean(axis=0)) < 0.2 * np.linalg.norm(corners[0] - corners[1])


def test_synthesize_landmarks_writes_shards_a_held_out_split_and_a_manifest(tmp_path):
    manifest = synthesize_landmarks(tmp_path / "lm", num_identities=3, images_per_identity=3, num_val_identities=2,
                                    val_images_per_identity=2, image_size=48, shard_size=4, seed=1,
                                    show_progress=False)
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert [s["num_samples"] for s in train["shards"]] == [4, 4, 1] and val["num_samples"] == 4
    assert train["identity_range"] == [FIRST_LANDMARK_IDENTITY, FIRST_LANDMARK_IDENTITY + 3]
    assert val["identity_range"] == [FIRST_LANDMARK_IDENTITY + 3, FIRST_LANDMARK_IDENTITY + 5]
    assert read_landmark_manifest(tmp_path / "lm")[0] == json.loads((tmp_path / "lm" / "manifest.json").read_text())
    images, dense, dense_again = read_landmark_split(tmp_path / "lm", "train", "dense")
    _, five, _ = read_landmark_split(tmp_path / "lm" / "manifest.json", "val", "five")
    assert len(images) == 9 and dense.shape == (9, 68, 2) and five.shape == (4, 5, 2)
    assert np.array_equal(dense, dense_again)
    # sample 4 is identity 1's second image: the stored points are that render's, the JPEG its pixels
    renderer = FaceRenderer(48)
    face = face_params(1, FIRST_LANDMARK_IDENTITY + 1)
    pixels, _, expected = render_with_dense_landmarks(renderer, face, renderer.canonical(face),
                                                      np.random.default_rng([1, 20, FIRST_LANDMARK_IDENTITY + 1, 1]))
    np.testing.assert_allclose(dense[4], expected, atol=1e-4)
    import io
    decoded = np.asarray(Image.open(io.BytesIO(images[4])).convert("RGB"), np.float64)
    assert np.abs(decoded - pixels).mean() < 4  # JPEG quality 90
    # the same arguments give the same bytes
    again = synthesize_landmarks(tmp_path / "again", num_identities=3, images_per_identity=3, num_val_identities=2,
                                 val_images_per_identity=2, image_size=48, shard_size=4, seed=1, show_progress=False)
    assert [s["sha256"] for s in again["splits"]["train"]["shards"]] == [s["sha256"] for s in train["shards"]]


def test_landmark_set_errors_name_the_problem(tmp_path):
    synthesize_landmarks(tmp_path / "lm", num_identities=1, images_per_identity=2, num_val_identities=1,
                         val_images_per_identity=1, image_size=32, show_progress=False)
    with pytest.raises(DataError, match="already holds a landmark set"):
        synthesize_landmarks(tmp_path / "lm", num_identities=1, show_progress=False)
    shard = tmp_path / "lm" / "train" / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(DataError, match="is damaged"):
        read_landmark_split(tmp_path / "lm", "train", "dense")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text(json.dumps({"format_version": 1, "shards": []}))
    with pytest.raises(DataError, match="is not a landmark manifest"):
        read_landmark_manifest(tmp_path / "other")


def test_cli_writes_a_landmark_set(tmp_path, capsys):
    assert main(["data", "synth-landmarks", "--out", str(tmp_path / "lm"), "--identities", "2",
                 "--images-per-identity", "2", "--val-identities", "1", "--val-images-per-identity", "1",
                 "--image-size", "32"]) == 0
    assert "4 training and 1 held-out faces" in capsys.readouterr().out
    assert read_landmark_manifest(tmp_path / "lm")[0]["splits"]["val"]["num_samples"] == 1
    assert main(["data", "synth-landmarks", "--out", str(tmp_path / "lm"), "--identities", "2"]) == 2
