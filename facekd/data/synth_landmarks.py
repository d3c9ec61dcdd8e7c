"""Landmarks of the synthetic faces, and a landmark training set written from them (WebDataset shards).

The generator places every part it draws, so it knows where they are. :func:`dense_landmarks` gives 68 points in
the iBUG-300W order (Sagonas et al. 2013), read from the shapes :class:`~facekd.data.synth.FaceRenderer` draws and
moved by the same pose warp as the pixels (:meth:`FaceRenderer.posed_points`):

- 0-16 jaw: the face oval (its tapered superellipse) from eye height on the image-left side, round the chin (8),
  to eye height on the right, 17 points equally spaced along the curve;
- 17-21 / 22-26 brows (image-left, image-right; each listed left to right): 5 points along the drawn brow's
  centre line, outer to inner on the left brow and inner to outer on the right one;
- 27-30 nose bridge from the eye line down to the nose tip (30, the 5-point nose tip), 31-35 its base: the lower
  outer edge of the left wing, the left nostril, the bottom of the tip (33), the right nostril, the right wing;
- 36-41 / 42-47 eyes: the drawn eye polygon's left corner, two upper-lid points, right corner, two lower-lid
  points (clockwise in the image), this sample's blink included;
- 48-59 outer lips: left corner, five points of the upper lip's top edge, right corner, five of the lower lip's
  bottom edge; 60-67 inner lips: the lip line near the corners (60, 64), three points of the lip line (upper lip's
  inner edge) and three of the mouth opening's lower edge (they coincide with the lip line when closed), this
  sample's smile and opening included.

The 51 inner points (17-67) are the ones FAN-Face feeds to the recognition network (thesis Sec. 3.2.1: "the 51
internal landmarks, ignoring the ones on the face boundary"). Points are given whatever covers them (sunglasses,
a mask, a hand), as 300W annotates occluded points. The 5 points are :meth:`FaceRenderer.landmarks`' (eye centres,
nose tip, mouth corners), what the IJB files and an ArcFace alignment use.

Coordinates are pixels of the stored image with pixel centres at integers ((0, 0) is the centre of the top-left
pixel), as :mod:`facekd.models.fan` expects.

Shard layout written by :func:`synthesize_landmarks`::

    out/train/shard-000000.tar   "<key>.jpg" + "<key>.json": {"identity": int, "five": [[x, y] * 5],
    out/val/shard-000000.tar                                   "dense": [[x, y] * 68]}
    out/manifest.json            written last: splits (identity ranges, shards with size and sha256), point sets

``val`` holds identities the training split never shows (unseen faces, for the NME a trained FAN reaches).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from facekd.data.convert import _add_member, read_json, shard_name
from facekd.data.synth import (
    JPEG_QUALITY, FaceParams, FaceRenderer, _check_count, _superellipse, encode_jpeg, face_params,
)
from facekd.errors import ConfigError, DataError

__all__ = [
    "DENSE_FLIP", "FIVE_FLIP", "LANDMARK_MANIFEST_FORMAT", "LANDMARK_SETS", "canonical_dense_landmarks",
    "dense_landmarks", "read_landmark_manifest", "read_landmark_split", "render_with_dense_landmarks",
    "synthesize_landmarks",
]

LANDMARK_MANIFEST_FORMAT = "facekd-landmarks/1"
LANDMARK_SETS = {"five": 5, "dense": 68}
FIRST_LANDMARK_IDENTITY = 2_000_000
"""Landmark-set identities are drawn from here on: disjoint from the synthetic recognition and IJB sets (which
start at 0 and 1,000,000), so a FAN trained on them has never seen a face the recognition network is scored on."""

_STREAM_LANDMARK_SAMPLE = 20  # seed-sequence tag of the landmark samples (synth.py and synth_ijb.py use 0-6)

# Horizontal mirror of the iBUG-68 layout: point i of a flipped face is point DENSE_FLIP[i] of the original.
DENSE_FLIP: tuple[int, ...] = (
    *range(16, -1, -1),  # jaw
    *range(26, 16, -1),  # brows
    27, 28, 29, 30, 35, 34, 33, 32, 31,  # nose
    45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40,  # eyes
    54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55,  # outer lips
    64, 63, 62, 61, 60, 67, 66, 65,  # inner lips
)
FIVE_FLIP: tuple[int, ...] = (1, 0, 2, 4, 3)

# Where on its drawn outline each dense point sits (see the module docstring).
_EYE_ANGLES = (math.pi, 4 * math.pi / 3, 5 * math.pi / 3, 0.0, math.pi / 3, 2 * math.pi / 3)  # of the eye polygon
_BROW_ALONG = np.linspace(0.0, 1.0, 5)  # inner end 0 to outer end 1
_LIP_OUTER = (-2 / 3, -1 / 3, 0.0, 1 / 3, 2 / 3)  # mouth half widths of the lip edge points
_LIP_INNER = (-0.5, 0.0, 0.5)
_INNER_CORNER = 0.9  # the inner corners sit on the lip line this far out (the outer ones at 1)


def _along(polyline: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Points at ``fractions`` (0-1) of the arc length along ``polyline`` [M, 2]."""
    steps = np.linalg.norm(np.diff(polyline, axis=0), axis=1)
    distance = np.concatenate([[0.0], np.cumsum(steps)])
    at = fractions * distance[-1]
    return np.stack([np.interp(at, distance, polyline[:, 0]), np.interp(at, distance, polyline[:, 1])], axis=1)


def _on_closed(polygon: np.ndarray, angles: tuple[float, ...]) -> np.ndarray:
    """Points of a closed polygon sampled at equal angles from 0 (``_ellipse``, the eye), at parameter ``angles``."""
    count = len(polygon)
    closed = np.concatenate([polygon, polygon[:1]])
    index = np.array([(angle % (2 * math.pi)) / (2 * math.pi) * count for angle in angles])
    grid = np.arange(count + 1)
    return np.stack([np.interp(index, grid, closed[:, 0]), np.interp(index, grid, closed[:, 1])], axis=1)


def _jaw(face: FaceParams) -> np.ndarray:
    """17 points along the face oval ``canonical`` draws, from eye height left round the chin to eye height right."""
    # the oval's height is cy + h·sign(sin t)·|sin t|^(2/p): solve for the angle at the eye line on the left
    above = min(max((face.face_cy - face.eye_y) / face.face_h, 0.0), 1.0)
    start = math.pi + math.asin(above ** (face.face_power / 2))
    arc = _superellipse(0.5, face.face_cy, face.face_w, face.face_h, face.face_power, face.chin_taper,
                        arc=(start, math.pi - start))
    return _along(arc, np.linspace(0.0, 1.0, 17))


def _nose(face: FaceParams) -> np.ndarray:
    """Points 27-35 on the nose ``canonical`` draws (wings, nostrils and tip ellipses around the tip height)."""
    cx, tip_y, nose_w = 0.5, face.eye_y + face.nose_length, face.nose_w
    bridge = [[cx, face.eye_y + (tip_y - face.eye_y) * k / 3] for k in range(4)]
    diagonal = math.sqrt(0.5)  # the wing ellipse's lower outer point, 45 degrees down
    wing_x, wing_y = nose_w * (0.6 + 0.4 * diagonal), tip_y + nose_w * (-0.05 + 0.35 * diagonal)
    nostril_x, nostril_y = nose_w * 0.45, tip_y + nose_w * 0.1
    base = [[cx - wing_x, wing_y], [cx - nostril_x, nostril_y], [cx, tip_y + nose_w * 0.25],
            [cx + nostril_x, nostril_y], [cx + wing_x, wing_y]]
    return np.array(bridge + base)


def _mouth(mouth: dict[str, np.ndarray], width_x: np.ndarray) -> np.ndarray:
    """Points 48-67 on the lip curves ``_draw_expression`` drew, sampled at ``width_x`` (mouth half widths -1..1)."""
    x = mouth["x"]
    centre, half = (x[0] + x[-1]) / 2, (x[-1] - x[0]) / 2

    def on(curve: str, positions: tuple[float, ...]) -> list[list[float]]:
        at = centre + half * np.array(positions)
        return np.stack([at, np.interp(np.array(positions), width_x, mouth[curve])], axis=1).tolist()

    outer = (on("line", (-1.0,)) + on("upper", _LIP_OUTER) + on("line", (1.0,))
             + on("lower", tuple(reversed(_LIP_OUTER))))
    inner = (on("line", (-_INNER_CORNER,)) + on("line", _LIP_INNER) + on("line", (_INNER_CORNER,))
             + on("open", tuple(reversed(_LIP_INNER))))
    return np.array(outer + inner)


def canonical_dense_landmarks(face: FaceParams, shapes: dict[str, Any]) -> np.ndarray:
    """The 68 iBUG points [68, 2] of ``face`` with the expression ``shapes`` (:meth:`FaceRenderer.render_sample`), in
    canonical-canvas fractions (before the pose)."""
    brows = [_along(shapes["brows"][0], _BROW_ALONG[::-1]), _along(shapes["brows"][1], _BROW_ALONG)]
    eyes = [_on_closed(eye, _EYE_ANGLES) for eye in shapes["eyes"]]
    mouth = _mouth(shapes["mouth"], np.linspace(-1.0, 1.0, len(shapes["mouth"]["x"])))
    return np.concatenate([_jaw(face), *brows, _nose(face), *eyes, mouth])


def dense_landmarks(renderer: FaceRenderer, face: FaceParams, pose: tuple[float, ...],
                    shapes: dict[str, Any]) -> np.ndarray:
    """The 68 iBUG points [68, 2] of a sample, in output pixel-centre coordinates."""
    return renderer.posed_points(canonical_dense_landmarks(face, shapes), pose)


def render_with_dense_landmarks(
    renderer: FaceRenderer, face: FaceParams, canonical: Image.Image, rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One sample's pixels (:meth:`FaceRenderer.render`, same ``rng`` draws), its 5 points and its 68 points."""
    pixels, pose, shapes = renderer.render_sample(face, canonical, rng)
    return pixels, renderer.landmarks(face, pose), dense_landmarks(renderer, face, pose, shapes)


def _write_split(out: Path, split: str, renderer: FaceRenderer, seed: int, identities: range, images: int,
                 shard_size: int, progress: tqdm) -> dict[str, Any]:
    """Render one split into its shards; returns its manifest entry."""
    folder = out / split
    folder.mkdir(parents=True)
    shards, tar, buffer, index = [], None, None, 0

    def close() -> None:
        tar.close()
        data = buffer.getvalue()
        name = f"{split}/{shard_name(len(shards))}"
        (out / name).write_bytes(data)
        shards.append({"name": name, "num_samples": count, "size": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()})

    count = 0
    for identity in identities:
        face = face_params(seed, identity)
        canonical = renderer.canonical(face)
        for sample in range(images):
            if tar is None:
                buffer, count = io.BytesIO(), 0
                tar = tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT)
            rng = np.random.default_rng([seed, _STREAM_LANDMARK_SAMPLE, identity, sample])
            pixels, five, dense = render_with_dense_landmarks(renderer, face, canonical, rng)
            key = f"{index:09d}"
            record = {"identity": identity, "five": np.round(five, 4).tolist(), "dense": np.round(dense, 4).tolist()}
            _add_member(tar, f"{key}.jpg", encode_jpeg(pixels))
            _add_member(tar, f"{key}.json", json.dumps(record).encode())
            index += 1
            count += 1
            progress.update()
            if count == shard_size:
                close()
                tar = None
    if tar is not None:
        close()
    return {"identity_range": [identities.start, identities.stop], "num_samples": index, "shards": shards}


def synthesize_landmarks(
    out_dir: str | os.PathLike[str],
    *,
    num_identities: int = 200,
    images_per_identity: int = 10,
    num_val_identities: int = 40,
    val_images_per_identity: int = 5,
    image_size: int = 128,
    shard_size: int = 1000,
    seed: int = 0,
    show_progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Writes a synthetic landmark training set under ``out_dir`` (see the module docstring); returns its manifest.

    Training identities are ``FIRST_LANDMARK_IDENTITY + 0 … num_identities - 1``, held-out ones the next
    ``num_val_identities``. The same arguments give the same files (with the same NumPy, Pillow and libjpeg).
    Existing outputs are a DataError unless ``overwrite``, which deletes them first.
    """
    _check_count("num_identities", num_identities, 1)
    _check_count("images_per_identity", images_per_identity, 1)
    _check_count("num_val_identities", num_val_identities, 1)
    _check_count("val_images_per_identity", val_images_per_identity, 1)
    _check_count("shard_size", shard_size, 1)
    _check_count("seed", seed, 0)
    renderer = FaceRenderer(image_size)
    out = Path(out_dir)
    existing = [path for path in (out / "train", out / "val", out / "manifest.json") if path.exists()]
    if existing and not overwrite:
        raise DataError(f"{out} already holds a landmark set ({', '.join(map(str, existing))}); use overwrite")
    for path in existing:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    first_val = FIRST_LANDMARK_IDENTITY + num_identities
    total = num_identities * images_per_identity + num_val_identities * val_images_per_identity
    with tqdm(total=total, unit="img", desc="synth landmarks", disable=not show_progress) as progress:
        splits = {
            "train": _write_split(out, "train", renderer, seed, range(FIRST_LANDMARK_IDENTITY, first_val),
                                  images_per_identity, shard_size, progress),
            "val": _write_split(out, "val", renderer, seed, range(first_val, first_val + num_val_identities),
                                val_images_per_identity, shard_size, progress),
        }
    manifest = {
        "format": LANDMARK_MANIFEST_FORMAT,
        "generator": "facekd.data.synth_landmarks",
        "note": "procedurally drawn synthetic faces: landmark errors measured on them are not 300W results",
        "image_size": image_size,
        "jpeg_quality": JPEG_QUALITY,
        "seed": seed,
        "coordinates": "pixels of the stored image, pixel centres at integers",
        "landmark_sets": {
            "five": {"count": 5, "order": "left eye, right eye, nose tip, left mouth corner, right mouth corner",
                     "flip": list(FIVE_FLIP)},
            "dense": {"count": 68, "order": "iBUG-300W 68 points", "flip": list(DENSE_FLIP)},
        },
        "splits": splits,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_landmark_manifest(path: str | os.PathLike[str]) -> tuple[dict[str, Any], Path]:
    """A landmark manifest (the file or its folder) and its folder; DataError naming the file if it is not one."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    if not path.is_file():
        raise DataError(f"landmark manifest {path} does not exist")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != LANDMARK_MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{path} is not a landmark manifest (format {LANDMARK_MANIFEST_FORMAT!r}), got {found!r}")
    for split in ("train", "val"):
        if not isinstance(manifest.get("splits", {}).get(split), dict):
            raise DataError(f"{path}: no '{split}' split")
    return manifest, path.parent


def read_landmark_split(
    path: str | os.PathLike[str], split: str, points: str,
) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """All of a split's samples: (encoded images, their ``points`` set [N, K, 2], their dense points [N, 68, 2]).

    The dense points come along for the box-diagonal normalisation of the NME (a set without them gives the chosen
    points there). Every shard is checked against the manifest's size and sha256 first."""
    if points not in LANDMARK_SETS:
        raise ConfigError(f"points must be one of {sorted(LANDMARK_SETS)}, got {points!r}")
    manifest, folder = read_landmark_manifest(path)
    images: list[bytes] = []
    chosen: list[list[list[float]]] = []
    dense: list[list[list[float]]] = []
    for shard in manifest["splits"][split]["shards"]:
        file = folder / shard["name"]
        if not file.is_file():
            raise DataError(f"landmark shard {file} is missing")
        data = file.read_bytes()
        if len(data) != shard["size"] or hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise DataError(f"landmark shard {file} is damaged (its size or sha256 differs from the manifest)")
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                key, _, extension = member.name.rpartition(".")
                members.setdefault(key, {})[extension] = tar.extractfile(member).read()
        for key in sorted(members):
            sample = members[key]
            if "jpg" not in sample or "json" not in sample:
                raise DataError(f"{file}: sample {key} lacks its .jpg or .json")
            record = json.loads(sample["json"])
            if points not in record:
                raise DataError(f"{file}: sample {key} has no '{points}' landmarks (it has {sorted(record)})")
            images.append(sample["jpg"])
            chosen.append(record[points])
            dense.append(record.get("dense", record[points]))
    if len(images) != manifest["splits"][split]["num_samples"]:
        raise DataError(f"{folder}: split {split} has {len(images)} samples, the manifest says "
                        f"{manifest['splits'][split]['num_samples']}")
    return images, np.asarray(chosen, np.float64), np.asarray(dense, np.float64)
