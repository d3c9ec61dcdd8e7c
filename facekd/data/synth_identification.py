"""A small synthetic MegaFace-style identification split: ``probes/<identity>/``, ``gallery/<identity>/`` and
``distractors/<block>/`` of aligned JPEGs (what :func:`facekd.evaluation.identification.find_identification_sets`
reads). Every distractor is an identity of its own, disjoint from the probe identities and from any synthetic
training or validation set."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from facekd.data.synth import FaceRenderer, _check_count, encode_jpeg, face_params, identity_name
from facekd.errors import DataError

__all__ = ["synthesize_identification"]

_STREAM_IDENTIFICATION = 7
FIRST_PROBE_IDENTITY = 2_000_000
FIRST_DISTRACTOR_IDENTITY = 3_000_000
DISTRACTORS_PER_FOLDER = 1000


def synthesize_identification(
    root: str | os.PathLike[str],
    *,
    num_identities: int = 10,
    probes_per_identity: int = 2,
    gallery_per_identity: int = 1,
    num_distractors: int = 200,
    image_size: int = 112,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Writes the split under ``root`` and returns its summary; the same arguments give the same files. Existing
    ``probes``/``gallery``/``distractors`` folders are a DataError unless ``overwrite``."""
    _check_count("num_identities", num_identities, 1)
    _check_count("probes_per_identity", probes_per_identity, 1)
    _check_count("gallery_per_identity", gallery_per_identity, 1)
    _check_count("num_distractors", num_distractors, 0)
    _check_count("seed", seed, 0)
    renderer = FaceRenderer(image_size)
    root = Path(root)
    folders = {name: root / name for name in ("probes", "gallery", "distractors")}
    existing = [path for path in folders.values() if path.exists()]
    if existing and not overwrite:
        raise DataError(f"{root} already holds {', '.join(map(str, existing))}; use overwrite")
    for path in existing:
        shutil.rmtree(path)

    def write(path: Path, index: int, sample: int) -> None:
        face = face_params(seed, index)
        rng = np.random.default_rng([seed, _STREAM_IDENTIFICATION, index, sample])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_jpeg(renderer.render(face, renderer.canonical(face), rng)))

    for offset in range(num_identities):
        index = FIRST_PROBE_IDENTITY + offset
        for sample in range(gallery_per_identity + probes_per_identity):
            name = "gallery" if sample < gallery_per_identity else "probes"
            write(folders[name] / identity_name(index) / f"{sample}.jpg", index, sample)
    for offset in range(num_distractors):
        block = f"{offset // DISTRACTORS_PER_FOLDER:04d}"
        write(folders["distractors"] / block / f"{offset}.jpg", FIRST_DISTRACTOR_IDENTITY + offset, 0)
    folders["distractors"].mkdir(parents=True, exist_ok=True)
    return {"root": str(root), "num_identities": num_identities, "num_probes": num_identities * probes_per_identity,
            "num_gallery": num_identities * gallery_per_identity, "num_distractors": num_distractors,
            "image_size": image_size, "seed": seed,
            "note": "procedurally drawn synthetic faces: scores on them are not face-recognition results"}
