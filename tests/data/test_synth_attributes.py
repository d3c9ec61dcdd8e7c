"""Attribute labels of the synthetic faces (facekd.data.synth_attributes): same pixels and draws as FaceRenderer,
one CSV row per image matched by JPEG hash, attributes consistent with the images."""
from __future__ import annotations

import csv
import hashlib
import io
from collections import Counter

import numpy as np
from PIL import Image

from facekd.data.recordio import RecordIOReader
from facekd.data.synth import FaceRenderer, face_params, synthesize
from facekd.data.synth_attributes import ATTRIBUTES, AttributeRenderer, read_attributes
from facekd.data.verification import load_bin


def test_same_pixels_and_generator_state_as_face_renderer():
    plain, noting = FaceRenderer(40), AttributeRenderer(40)
    face = face_params(0, 3)
    canonical = plain.canonical(face)
    for sample in range(40):
        a, b = np.random.default_rng([7, sample]), np.random.default_rng([7, sample])
        pixels, landmarks = plain.render_with_landmarks(face, canonical, a)
        noted_pixels, noted_landmarks = noting.render_with_landmarks(face, canonical, b)
        assert np.array_equal(pixels, noted_pixels) and np.array_equal(landmarks, noted_landmarks)
        assert a.bit_generator.state == b.bit_generator.state  # nothing drawn in addition
    assert len(noting.records) == 40
    assert {key for key in noting.records[0]} == {"image_sha1", *ATTRIBUTES}


def test_attributes_follow_the_images():
    """Over many samples: the drawn rates of the generator's nuisances, and 'bright' images brighter than 'dark'."""
    renderer = AttributeRenderer(32)
    brightness: dict[str, list[float]] = {"dark": [], "bright": []}
    for identity in range(8):
        face = face_params(1, identity)
        canonical = renderer.canonical(face)
        for sample in range(40):
            pixels = renderer.render(face, canonical, np.random.default_rng([1, identity, sample]))
            light = renderer.records[-1]["light"]
            if light in brightness:
                brightness[light].append(float(pixels.mean()))
    counts = {name: Counter(record[name] for record in renderer.records) for name in ATTRIBUTES}
    n = len(renderer.records)
    assert 0.1 < counts["occluded"]["yes"] / n < 0.36  # 1 − 0.9·0.86 = 0.226
    assert 0.45 < counts["blur"]["yes"] / n < 0.75
    assert all(0.2 < counts["yaw"][side] / n < 0.47 for side in ("left", "frontal", "right"))
    assert np.mean(brightness["bright"]) > np.mean(brightness["dark"]) + 10
    # identity traits are constant within an identity
    for identity in range(8):
        rows = renderer.records[identity * 40:(identity + 1) * 40]
        assert len({(row["skin"], row["hair"], row["hair_style"], row["beard"], row["glasses"]) for row in rows}) == 1


def test_synthesize_writes_one_row_per_image_matched_by_hash(tmp_path):
    out = tmp_path / "set"
    synthesize(out, num_identities=3, images_per_identity=4, num_val_identities=3, num_pairs=4, image_size=32,
               seed=2, show_progress=False)
    with (out / "attributes.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 3 * 4 + 2 * 2 * 4
    by_source = {row["source"]: row for row in rows}
    for row in rows[:12]:  # training images: the image folder file and its RecordIO record
        data = (out / row["source"]).read_bytes()
        assert hashlib.sha1(data).hexdigest() == row["image_sha1"]
    with RecordIOReader(out / "rec" / "train.rec", out / "rec" / "train.idx") as reader:
        hashes = {hashlib.sha1(image).hexdigest() for _, image in reader.iter_samples()}
    assert hashes == {row["image_sha1"] for row in rows[:12]}
    images, _ = load_bin(out / "val.bin")
    for index, image in enumerate(images):
        assert hashlib.sha1(image).hexdigest() == by_source[f"val.bin#{index}"]["image_sha1"]
        Image.open(io.BytesIO(image)).verify()
    table = read_attributes(out / "attributes.csv")
    assert len(table) == len(rows) and set(next(iter(table.values()))) == {"identity", *ATTRIBUTES}
