"""Per-image attribute labels of the synthetic faces, for CondFace's cluster analysis (thesis Sec. 5.4.1-5.4.2).

The thesis annotates every face with five discrete attributes (age, gender, race, pitch and yaw bins) and
scores routing-vector clusters against them by purity and AMI. The synthetic generator knows its attributes:
:class:`AttributeRenderer` is a :class:`~facekd.data.synth.FaceRenderer` that notes the nuisances it draws
while drawing exactly what FaceRenderer draws (each draw is read as it passes, none is added, so the pixels and
every later draw are the same), and the identity traits come from the identity's :class:`FaceParams`.

Continuous values are cut into a few bins so that purity and AMI are meaningful:

========== ======================================= =================================================
attribute  bins                                    drawn as (facekd.data.synth)
========== ======================================= =================================================
yaw        left / frontal / right                  yaw ~ U(−1, 1); the far side of a turned head is drawn
                                                   shorter: yaw > 1/3 squashes the image-left side ("left",
                                                   the face turned towards image left), yaw < −1/3 "right"
pitch      down / level / up                       pitch ~ 0.6·U(−1, 1); cut at ±0.2 (thirds of its range)
roll       tilted / upright                        |in-plane angle| > 7° (one σ of its clipped normal)
light      dark / normal / bright                  gain ~ U(0.6, 1.3) cut in thirds (0.833, 1.067)
greyscale  yes / no                                8 % of the samples
blur       yes / no                                60 % of the samples
occluder   none / sunglasses / mask / rectangle /  worn (sunglasses 6 %, mask 4 %) or in front of the
           hand                                    posed face (rectangle 8 %, hand 6 %); worn first
occluded   yes / no                                any occluder
skin       light / medium / dark                   luminance of the skin colour > 185, < 115
hair       dark / brown / light                    luminance of the hair colour < 70, ≥ 130
hair_style bald / short / long / voluminous        FaceParams.hair_style
beard      none / stubble / full                   FaceParams.beard
glasses    none / round / rectangular              FaceParams.glasses
========== ======================================= =================================================

``attributes.csv`` has one row per image: ``image_sha1`` (SHA-1 of the JPEG bytes: ``facekd data convert``
never re-encodes, so it matches a training shard's sample, an image folder file and a verification .bin image
alike), ``split`` (train, val, val_hard), ``identity``, ``source`` (``images/<identity>/<n>.jpg``, or
``val.bin#<i>`` for image i of a .bin), then the attributes above. :func:`read_attributes` reads it back.
"""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from facekd.data.synth import FaceParams, FaceRenderer, encode_jpeg, identity_name, verification_pairs
from facekd.errors import DataError

__all__ = ["ATTRIBUTES", "NUISANCES", "AttributeRenderer", "read_attributes", "write_attributes"]

NUISANCES = ("yaw", "pitch", "roll", "light", "greyscale", "blur", "occluder", "occluded")
"""Per-sample attributes (drawn with each image)."""
TRAITS = ("skin", "hair", "hair_style", "beard", "glasses")
"""Per-identity attributes (the same for every image of an identity)."""
ATTRIBUTES = NUISANCES + TRAITS
COLUMNS = ("image_sha1", "split", "identity", "source") + ATTRIBUTES


class _Recorder:
    """Passes every call through to a numpy Generator and keeps (method, result) in order."""

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng
        self.draws: list[tuple[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._rng, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            self.draws.append((name, result))
            return result

        return call


def _bin3(value: float, low: float, high: float, names: tuple[str, str, str]) -> str:
    return names[0] if value < low else names[2] if value > high else names[1]


def _luminance(rgb: Sequence[int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def identity_traits(face: FaceParams) -> dict[str, str]:
    """The binned identity traits of ``face`` (see the module table)."""
    skin, hair = _luminance(face.skin), _luminance(face.hair)
    return {
        "skin": "light" if skin > 185 else "dark" if skin < 115 else "medium",
        "hair": "dark" if hair < 70 else "light" if hair >= 130 else "brown",
        "hair_style": ("bald", "short", "long", "voluminous")[face.hair_style],
        "beard": ("none", "stubble", "full")[face.beard],
        "glasses": ("none", "round", "rectangular")[face.glasses],
    }


class AttributeRenderer(FaceRenderer):
    """FaceRenderer whose samples are the same pixels, and which appends each sample's attributes (and the SHA-1
    of its JPEG encoding) to :attr:`records`, one dict per call of :meth:`render_with_landmarks`."""

    def __init__(self, image_size: int = 112) -> None:
        super().__init__(image_size)
        self.records: list[dict[str, str]] = []
        self._current: dict[str, Any] = {}

    def _draw_face_occluder(self, draw, face, rng) -> None:
        recorder = _Recorder(rng)
        super()._draw_face_occluder(draw, face, recorder)
        kind = recorder.draws[0][1]  # the first draw picks: < 0.06 sunglasses, < 0.1 mask
        self._current["worn"] = "sunglasses" if kind < 0.06 else "mask" if kind < 0.1 else None

    def _pose_coefficients(self, rng) -> tuple[float, ...]:
        recorder = _Recorder(rng)
        coefficients = super()._pose_coefficients(recorder)
        # draws in order: yaw U(−1, 1), pitch U(−1, 1) (× 0.6), shear, in-plane angle N(0, 7) (clipped), scale,
        # shift
        (_, yaw), (_, pitch), _, (_, angle) = recorder.draws[:4]
        self._current["pose"] = {"yaw": float(yaw), "pitch": 0.6 * float(pitch),
                                 "roll": float(np.clip(angle, -18.0, 18.0))}
        return coefficients

    def _draw_image_occluder(self, draw, rng) -> None:
        recorder = _Recorder(rng)
        super()._draw_image_occluder(draw, recorder)
        kind = recorder.draws[0][1]  # < 0.08 rectangle, < 0.14 hand
        self._current["in_front"] = "rectangle" if kind < 0.08 else "hand" if kind < 0.14 else None

    def _photometric(self, image: Image.Image, rng) -> np.ndarray:
        recorder = _Recorder(rng)
        pixels = super()._photometric(image, recorder)
        # draws in order: greyscale?, gamma, cast, contrast, gain, strength, light angle, blur?, ...
        names = [name for name, _ in recorder.draws]
        values = [value for _, value in recorder.draws]
        if names[:8] != ["random", "normal", "normal", "uniform", "uniform", "uniform", "uniform", "random"]:
            raise RuntimeError(f"FaceRenderer._photometric draws {names[:8]}: update facekd.data.synth_attributes")
        self._current["photometric"] = {"greyscale": values[0] < 0.08, "gain": float(values[4]),
                                        "blur": values[7] < 0.6}
        return pixels

    def render_with_landmarks(self, face: FaceParams, canonical: Image.Image, rng: np.random.Generator
                              ) -> tuple[np.ndarray, np.ndarray]:
        self._current = {}
        pixels, landmarks = super().render_with_landmarks(face, canonical, rng)
        pose, photometric = self._current["pose"], self._current["photometric"]
        occluder = self._current["worn"] or self._current["in_front"] or "none"
        self.records.append({
            "image_sha1": hashlib.sha1(encode_jpeg(pixels)).hexdigest(),
            "yaw": _bin3(pose["yaw"], -1 / 3, 1 / 3, ("right", "frontal", "left")),
            "pitch": _bin3(pose["pitch"], -0.2, 0.2, ("up", "level", "down")),
            "roll": "tilted" if abs(pose["roll"]) > 7.0 else "upright",
            "light": _bin3(photometric["gain"], 0.6 + 0.7 / 3, 0.6 + 1.4 / 3, ("dark", "normal", "bright")),
            "greyscale": "yes" if photometric["greyscale"] else "no",
            "blur": "yes" if photometric["blur"] else "no",
            "occluder": occluder,
            "occluded": "no" if occluder == "none" else "yes",
            **identity_traits(face),
        })
        return pixels, landmarks


def write_attributes(path: str | Path, records: list[dict[str, str]], *, seed: int, num_identities: int,
                     images_per_identity: int, num_val_identities: int, num_pairs: int,
                     pair_sets: dict[str, bool]) -> int:
    """Write ``attributes.csv`` from the :attr:`AttributeRenderer.records` of one ``synthesize`` call, whose
    order is synthesize's: the training images identity by identity, then each pair set's images pair by pair.
    Returns the number of rows."""
    rows = []
    train = num_identities * images_per_identity
    for position in range(train):
        label, sample = divmod(position, images_per_identity)
        rows.append({"split": "train", "identity": identity_name(label),
                     "source": f"images/{identity_name(label)}/{sample}.jpg"})
    for name, hard in pair_sets.items():
        pairs, _ = verification_pairs(seed, num_identities, num_val_identities, num_pairs, hard)
        for index, identity in enumerate(pairs.reshape(-1).tolist()):
            rows.append({"split": name, "identity": identity_name(identity), "source": f"{name}.bin#{index}"})
    if len(rows) != len(records):
        raise RuntimeError(f"{len(records)} attribute records for {len(rows)} images")
    path = Path(path)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row, record in zip(rows, records):
            writer.writerow({**row, **record})
    return len(rows)


def read_attributes(path: str | Path) -> dict[str, dict[str, str]]:
    """``attributes.csv`` (or any CSV with an ``image_sha1`` column) as {image_sha1: {column: value}}; a
    repeated hash with other attributes is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"attribute file {path} does not exist")
    table: dict[str, dict[str, str]] = {}
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        if reader.fieldnames is None or "image_sha1" not in reader.fieldnames:
            raise DataError(f"{path}: an attribute CSV needs an image_sha1 column, got {reader.fieldnames}")
        for row in reader:
            key = row.pop("image_sha1")
            attributes = {column: value for column, value in row.items() if column not in ("split", "source")}
            if key in table and table[key] != attributes:
                raise DataError(f"{path}: image {key} is listed twice with different attributes")
            table[key] = attributes
    return table
