"""A small synthetic IJB-B/C set in the public protocol's file layout (what insightface's ``ijb_11.py`` reads).

``ROOT/meta/<name>_face_tid_mid.txt``: ``image template media`` per image; ``ROOT/meta/<name>_name_5pts_score.txt``:
``image x1 y1 … x5 y5 score`` (left eye, right eye, nose tip, left and right mouth corner, in pixel-centre
coordinates of the image, and the detector's faceness score); ``ROOT/meta/<name>_template_pair_label.txt``:
``template template label``; ``ROOT/meta/<name>_1N_gallery_{G1,G2}.csv`` (IJB-B: ``S1``, ``S2``) and
``ROOT/meta/<name>_1N_probe_mixed.csv``: ``TEMPLATE_ID,SUBJECT_ID,FILENAME`` per image, each subject's first
template enrolled in one gallery and its others probing; ``ROOT/loose_crop/<n>.jpg``: the images, loose crops with
the face at some scale, rotation and place (so the 5-point alignment has work to do).

Each subject has several templates, each template one to three media (a photo, or a video's frames), each media
one to three images; the pair list holds every pair of templates, same-subject pairs labelled 1.
"""
from __future__ import annotations

import itertools
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from facekd.data.synth import FaceRenderer, _check_count, encode_jpeg, face_params
from facekd.errors import ConfigError, DataError

__all__ = ["synthesize_ijb"]

_STREAM_IJB_LAYOUT = 5
_STREAM_IJB_IMAGE = 6
FIRST_IJB_IDENTITY = 1_000_000
"""Subjects are drawn as identities from here on: disjoint from any synthetic training or validation set."""


def _loose_crop(sample: np.ndarray, landmarks: np.ndarray, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """``sample`` scaled, rotated and shifted by a random similarity onto a larger flat-coloured canvas, and its
    landmarks moved with it (pixel-centre coordinates)."""
    size = sample.shape[0]
    width, height = round(size * rng.uniform(1.4, 1.9)), round(size * rng.uniform(1.4, 1.9))
    scale, angle = rng.uniform(0.9, 1.3), math.radians(rng.uniform(-20.0, 20.0))
    centre = np.array([width, height]) / 2 + rng.uniform(-0.1, 0.1, 2) * size
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    # forward, in edge coordinates: loose = scale * R (sample - size / 2) + centre; PIL wants the inverse map
    inverse = rotation.T / scale
    offset = size / 2 - inverse @ centre
    coefficients = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
    fill = tuple(int(v) for v in rng.integers(20, 236, 3))
    image = Image.fromarray(sample).transform((width, height), Image.Transform.AFFINE, coefficients,
                                              Image.Resampling.BILINEAR, fillcolor=fill)
    moved = scale * (landmarks + 0.5 - size / 2) @ rotation.T + centre - 0.5
    return image, moved


def synthesize_ijb(
    root: str | os.PathLike[str],
    *,
    name: str = "IJBC",
    num_subjects: int = 8,
    templates_per_subject: int = 3,
    image_size: int = 112,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Writes a synthetic IJB-style set under ``root`` (see the module docstring) and returns its summary.

    ``name`` is IJBB or IJBC (the meta files' prefix, lower case); images are ``image_size``-pixel renders placed
    in larger loose crops. Template ids run from 1, media ids are unique across templates as in IJB. The same
    arguments give the same files. Existing ``meta``/``loose_crop`` folders are a DataError unless ``overwrite``.
    """
    if name not in ("IJBB", "IJBC"):
        raise ConfigError(f"name must be IJBB or IJBC, got {name!r}")
    _check_count("num_subjects", num_subjects, 2)
    _check_count("templates_per_subject", templates_per_subject, 2)
    _check_count("seed", seed, 0)
    renderer = FaceRenderer(image_size)
    root = Path(root)
    meta, crops = root / "meta", root / "loose_crop"
    existing = [path for path in (meta, crops) if path.exists()]
    if existing and not overwrite:
        raise DataError(f"{root} already holds {', '.join(map(str, existing))}; use overwrite")
    for path in existing:
        shutil.rmtree(path)
    meta.mkdir(parents=True)
    crops.mkdir()

    layout = np.random.default_rng([seed, _STREAM_IJB_LAYOUT])
    subject_of_template: list[int] = []
    image_rows, landmark_rows, images_of_template = [], [], {}
    media_id = 0
    for subject in range(num_subjects):
        face = face_params(seed, FIRST_IJB_IDENTITY + subject)
        canonical = renderer.canonical(face)
        for _ in range(templates_per_subject):
            subject_of_template.append(subject)
            template_id = len(subject_of_template)
            for _ in range(int(layout.integers(1, 4))):
                media_id += 1
                for _ in range(int(layout.integers(1, 4))):
                    index = len(image_rows) + 1
                    rng = np.random.default_rng([seed, _STREAM_IJB_IMAGE, index])
                    sample, landmarks = renderer.render_with_landmarks(face, canonical, rng)
                    image, landmarks = _loose_crop(sample, landmarks, rng)
                    image_name = f"{index}.jpg"
                    (crops / image_name).write_bytes(encode_jpeg(np.asarray(image)))
                    faceness = rng.uniform(0.6, 1.0)
                    image_rows.append(f"{image_name} {template_id} {media_id}")
                    images_of_template.setdefault(template_id, []).append(image_name)
                    points = " ".join(f"{value:.3f}" for value in landmarks.ravel())
                    landmark_rows.append(f"{image_name} {points} {faceness:.6f}")
    pair_rows = [f"{a + 1} {b + 1} {int(subject_of_template[a] == subject_of_template[b])}"
                 for a, b in itertools.combinations(range(len(subject_of_template)), 2)]
    prefix = name.lower()
    for suffix, rows in (("face_tid_mid", image_rows), ("name_5pts_score", landmark_rows),
                         ("template_pair_label", pair_rows)):
        (meta / f"{prefix}_{suffix}.txt").write_text("\n".join(rows) + "\n")
    # 1:N: each subject's first template enrolled, the first half of the subjects in gallery 1, the rest in 2
    galleries = ("G1", "G2") if name == "IJBC" else ("S1", "S2")
    one_n: dict[str, list[str]] = {galleries[0]: [], galleries[1]: [], "probe_mixed": []}
    for template_id, subject in enumerate(subject_of_template, 1):
        if (template_id - 1) % templates_per_subject:
            key = "probe_mixed"
        else:
            key = galleries[0] if subject < num_subjects // 2 else galleries[1]
        one_n[key] += [f"{template_id},{subject + 1},{image}" for image in images_of_template[template_id]]
    for key, rows in one_n.items():
        file = f"{prefix}_1N_{key}.csv" if key == "probe_mixed" else f"{prefix}_1N_gallery_{key}.csv"
        (meta / file).write_text("\n".join(["TEMPLATE_ID,SUBJECT_ID,FILENAME"] + rows) + "\n")
    num_same = sum(int(row[-1]) for row in pair_rows)
    return {"name": name, "root": str(root), "num_subjects": num_subjects, "num_templates": len(subject_of_template),
            "num_media": media_id, "num_images": len(image_rows), "num_pairs": len(pair_rows),
            "num_same_pairs": num_same, "image_size": image_size, "seed": seed,
            "note": "procedurally drawn synthetic faces: scores on them are not face-recognition results"}
