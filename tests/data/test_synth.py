"""Synthetic identities: determinism, agreement between the formats, disjoint validation identities, difficulty."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from facekd.data.recordio import RecordIOReader, read_property
from facekd.data.synth import (
    FaceRenderer,
    best_threshold_accuracy,
    face_params,
    identity_name,
    raw_pixel_scores,
    synthesize,
    verification_pairs,
)
from facekd.data.verification import load_bin
from facekd.errors import DataError

# an odd image size on purpose: nothing may assume 112 or an even size
SMALL: dict[str, Any] = dict(
    num_identities=5, images_per_identity=3, num_val_identities=6, num_pairs=8, image_size=61, seed=3
)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("synth") / "set"
    return out, synthesize(out, show_progress=False, **SMALL)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def decode(image: bytes) -> Image.Image:
    decoded = Image.open(io.BytesIO(image))
    decoded.load()
    return decoded


def test_same_seed_gives_byte_identical_files(small_set: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    out, summary = small_set
    again = synthesize(tmp_path / "again", show_progress=False, **SMALL)
    assert again == summary
    assert tree_bytes(tmp_path / "again") == tree_bytes(out)


def test_other_seed_gives_other_images(small_set: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    out, _ = small_set
    synthesize(tmp_path / "other", show_progress=False, **{**SMALL, "seed": 4})
    first, second = tree_bytes(out), tree_bytes(tmp_path / "other")
    assert first.keys() == second.keys()
    images = [name for name in first if name.endswith((".jpg", ".rec", ".bin"))]
    assert len(images) == 5 * 3 + 3
    assert all(first[name] != second[name] for name in images)


def test_counts_agree_across_formats(small_set: tuple[Path, dict[str, Any]]) -> None:
    out, summary = small_set
    num_identities, per_identity = SMALL["num_identities"], SMALL["images_per_identity"]
    with RecordIOReader(out / "rec" / "train.rec", out / "rec" / "train.idx") as reader:
        records = list(reader.iter_samples())
    folders = sorted(path for path in (out / "images").iterdir())
    assert [folder.name for folder in folders] == [identity_name(label) for label in range(num_identities)]
    folder_images = {(label, path.name): path.read_bytes() for label, folder in enumerate(folders)
                     for path in folder.glob("*.jpg")}
    assert len(records) == len(folder_images) == num_identities * per_identity == summary["num_train_images"]
    # the record stream and the folder hold the same JPEGs under the same labels
    expected = [(label, folder_images[label, f"{sample}.jpg"])
                for label in range(num_identities) for sample in range(per_identity)]
    assert records == expected
    assert read_property(out / "rec" / "property") == (num_identities, 61, 61)
    for name in ("val", "val_hard"):
        images, issame = load_bin(out / f"{name}.bin")
        assert len(images) == 2 * SMALL["num_pairs"] and len(issame) == SMALL["num_pairs"]
        assert issame.sum() == SMALL["num_pairs"] // 2
        _, planned = verification_pairs(SMALL["seed"], num_identities, SMALL["num_val_identities"],
                                        SMALL["num_pairs"], name == "val_hard")
        assert issame.tolist() == planned.tolist()
    assert json.loads((out / "synth.json").read_text()) == summary


def test_images_decode_at_image_size(small_set: tuple[Path, dict[str, Any]]) -> None:
    out, _ = small_set
    images = [path.read_bytes() for path in (out / "images").rglob("*.jpg")]
    images += load_bin(out / "val.bin")[0] + load_bin(out / "val_hard.bin")[0]
    for image in images:
        decoded = decode(image)
        assert (decoded.format, decoded.mode, decoded.size) == ("JPEG", "RGB", (61, 61))


@pytest.mark.parametrize("hard", [False, True])
def test_validation_identities_are_disjoint_from_training(hard: bool) -> None:
    num_identities, num_val, num_pairs = 30, 12, 40
    pairs, issame = verification_pairs(7, num_identities, num_val, num_pairs, hard)
    assert pairs.shape == (num_pairs, 2) and issame.sum() == num_pairs // 2
    assert pairs.min() >= num_identities and pairs.max() < num_identities + num_val
    assert ((pairs[:, 0] == pairs[:, 1]) == issame).all()


def test_hard_pairs_join_look_alikes() -> None:
    def latent_distance(pairs: np.ndarray, issame: np.ndarray) -> float:
        latents = {i: np.array(face_params(0, i).latent) for i in np.unique(pairs)}
        return float(np.mean([np.linalg.norm(latents[a] - latents[b]) for a, b in pairs[~issame]]))

    random_distance = latent_distance(*verification_pairs(0, 10, 40, 60, hard=False))
    hard_distance = latent_distance(*verification_pairs(0, 10, 40, 60, hard=True))
    assert hard_distance < 0.9 * random_distance


def test_identities_are_reproducible_and_distinct() -> None:
    assert face_params(0, 5) == face_params(0, 5)
    latents = np.array([face_params(0, index).latent for index in range(50)])
    distances = np.linalg.norm(latents[:, None] - latents[None], axis=-1)[np.triu_indices(50, 1)]
    assert distances.min() > 0.3
    assert face_params(1, 5).latent != face_params(0, 5).latent


def test_difficulty_is_neither_trivial_nor_impossible(tmp_path: Path) -> None:
    """Raw pixels must carry some identity signal (the task is learnable) but far from all of it (not trivial)."""
    synthesize(tmp_path, num_identities=1, images_per_identity=1, num_val_identities=40, num_pairs=200,
               seed=0, show_progress=False)
    for name in ("val", "val_hard"):
        images, issame = load_bin(tmp_path / f"{name}.bin")
        scores = raw_pixel_scores(np.stack([np.asarray(decode(image)) for image in images]))
        same, different = scores[issame], scores[~issame]
        # probability that a same pair outscores a different pair (area under the ROC curve)
        auc = float((same[:, None] > different[None, :]).mean())
        assert auc > 0.58, f"{name}: raw pixels tell nothing about identity (AUC {auc:.3f})"
        assert best_threshold_accuracy(scores, issame) < 0.85, f"{name}: raw-pixel verification is too easy"
        assert np.median(same) < 0.8, f"{name}: views of one identity are nearly identical"


def test_best_threshold_accuracy() -> None:
    assert best_threshold_accuracy(np.array([0.9, 0.8, 0.3, 0.1]), np.array([True, False, True, False])) == 0.75
    assert best_threshold_accuracy(np.array([0.2, 0.9, 0.1, 0.7]), np.array([False, True, False, True])) == 1.0
    # tied scores cannot be split by any threshold
    assert best_threshold_accuracy(np.array([0.5, 0.5]), np.array([True, False])) == 0.5
    with pytest.raises(ValueError, match="equal-length"):
        best_threshold_accuracy(np.array([0.5, 0.5]), np.array([True]))


def test_raw_pixel_scores() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    scores = raw_pixel_scores(np.stack([image, image, image, rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)]))
    assert scores[0] == pytest.approx(1.0)
    assert abs(scores[1]) < 0.2
    with pytest.raises(ValueError, match="even count"):
        raw_pixel_scores(np.stack([image] * 3))


def test_render_returns_uint8_image_of_the_requested_size() -> None:
    renderer = FaceRenderer(48)
    face = face_params(0, 0)
    pixels = renderer.render(face, renderer.canonical(face), np.random.default_rng(0))
    assert pixels.shape == (48, 48, 3) and pixels.dtype == np.uint8
    assert pixels.std() > 10  # a drawn face, not a flat image


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"num_pairs": 7}, "num_pairs must be even"),
        ({"num_val_identities": 1}, "num_val_identities must be an integer >= 2"),
        ({"num_identities": 0}, "num_identities must be an integer >= 1"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"image_size": 16}, "image_size must be an integer of at least 32"),
    ],
)
def test_bad_arguments_are_rejected(tmp_path: Path, arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        synthesize(tmp_path, show_progress=False, **{**SMALL, **arguments})


def test_existing_outputs_need_overwrite(tmp_path: Path) -> None:
    tiny: dict[str, Any] = dict(num_identities=2, images_per_identity=1, num_val_identities=2, num_pairs=2, seed=0)
    synthesize(tmp_path, show_progress=False, **tiny)
    with pytest.raises(DataError, match="overwrite"):
        synthesize(tmp_path, show_progress=False, **tiny)
    stale = tmp_path / "images" / identity_name(999)
    stale.mkdir()
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("kept")
    synthesize(tmp_path, show_progress=False, overwrite=True, **tiny)
    assert not stale.exists() and unrelated.read_text() == "kept"
    assert len(list((tmp_path / "images").rglob("*.jpg"))) == 2
