"""Tests for facekd.eval: every metric is checked on embeddings built to have a known answer."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facekd import eval as fkeval

GRID = fkeval.ACCURACY_THRESHOLDS


def grid_above(distance: float) -> float:
    """The first accuracy-grid threshold t with distance < t: the one argmax picks for a clean split."""
    return float(GRID[np.searchsorted(GRID, distance, side="right")])


def pairs_with_distances(
    distances: np.ndarray, dim: int = 8, seed: int = 0, scale: bool = True
) -> np.ndarray:
    """[2N, dim] embeddings whose pair i has squared distance distances[i] once normalised.

    Unit vectors a, b at angle θ have ||a - b||² = 2 - 2 cos θ. Rows are then multiplied by random
    positive scales, which the evaluation must normalise away.
    """
    rng = np.random.default_rng(seed)
    rows = np.zeros((2 * len(distances), dim))
    for i, distance in enumerate(distances):
        first = rng.standard_normal(dim)
        first /= np.linalg.norm(first)
        other = rng.standard_normal(dim)
        other -= (other @ first) * first
        other /= np.linalg.norm(other)
        cos = 1.0 - distance / 2.0
        rows[2 * i] = first
        rows[2 * i + 1] = cos * first + math.sqrt(max(0.0, 1.0 - cos * cos)) * other
    if scale:
        rows *= rng.uniform(0.1, 100.0, size=(len(rows), 1))
    return rows


def pairs_with_similarities(similarities: np.ndarray) -> np.ndarray:
    """2-D embeddings whose pair i has cosine similarity similarities[i]."""
    angles = np.arccos(np.clip(similarities, -1.0, 1.0))
    rows = np.zeros((2 * len(similarities), 2))
    rows[0::2, 0] = 1.0
    rows[1::2, 0] = np.cos(angles)
    rows[1::2, 1] = np.sin(angles)
    return rows


# ---------------------------------------------------------------- verification_accuracy


def test_clean_gap_is_perfect_with_threshold_above_every_same_distance() -> None:
    """Same pairs at distance <= 0.795, different pairs at >= 1.6055; each fold holds one pair at each bound.

    Every training split then has 0.795 as its largest same distance, so every fold picks the first grid
    threshold above it, 0.80, and classifies its test pairs without error. The VAL threshold (no false
    accept allowed among ~140 training pairs) is the last fine-grid value below 1.6055, accepting all
    same and no different test pairs.
    """
    rng = np.random.default_rng(1)
    issame = rng.random(300) < 0.5
    issame[::30], issame[15::30] = True, False
    distances = np.where(issame, rng.uniform(0.205, 0.79, 300), rng.uniform(1.61, 2.4, 300))
    distances[::30], distances[15::30] = 0.795, 1.6055
    result = fkeval.verification_accuracy(pairs_with_distances(distances), issame)

    assert result["accuracy"] == 1.0 and result["std"] == 0.0
    np.testing.assert_array_equal(result["fold_accuracy"], np.ones(10))
    np.testing.assert_allclose(result["fold_threshold"], np.full(10, 0.80))
    assert result["threshold"] == pytest.approx(0.80)
    assert grid_above(0.795) == pytest.approx(0.80)
    assert result["val"] == 1.0 and result["far"] == 0.0
    assert result["num_pairs"] == 300


def test_known_flips_per_fold_give_exact_accuracy() -> None:
    """Fold k holds flips[k] same pairs placed beyond every different pair: its accuracy is 1 - flips[k]/20.

    Accepting the flipped pairs would mean accepting all ~100 different pairs first, so every fold's
    threshold stays in the gap (0.80) and each test fold loses exactly its flipped pairs.
    """
    pairs_per_fold, flips = 20, np.array([0, 1, 2, 3, 0, 1, 2, 3, 2, 1])
    rng = np.random.default_rng(2)
    distances, issame = [], []
    for flip_count in flips:
        same = np.arange(pairs_per_fold) % 2 == 0
        fold_distances = np.where(same, rng.uniform(0.205, 0.79, pairs_per_fold), rng.uniform(1.6, 2.4, pairs_per_fold))
        fold_distances[0] = 0.795  # every training split's largest same distance: threshold 0.80 everywhere
        flipped = rng.choice(np.flatnonzero(same)[1:], size=flip_count, replace=False)
        fold_distances[flipped] = rng.uniform(3.0, 3.9, flip_count)
        distances.append(fold_distances)
        issame.append(same)
    result = fkeval.verification_accuracy(pairs_with_distances(np.concatenate(distances)), np.concatenate(issame))

    expected = 1.0 - flips / pairs_per_fold
    np.testing.assert_allclose(result["fold_threshold"], np.full(10, 0.80))
    np.testing.assert_allclose(result["fold_accuracy"], expected, atol=1e-12)
    assert result["accuracy"] == pytest.approx(expected.mean(), abs=1e-12)
    assert result["std"] == pytest.approx(expected.std(), abs=1e-12)


def test_two_fold_example_by_hand() -> None:
    """Pairs (distance, same): (0.305, T) (1.005, F) | (0.255, T) (0.405, F), two folds of two pairs.

    Fold 0 tests pairs 0-1 with the threshold learnt on pairs 2-3: first grid t > 0.255 is 0.26, which
    rejects same pair 0 (wrong) and different pair 1 (right): 1/2. Fold 1 learns on pairs 0-1: t = 0.31,
    which accepts pair 2 (0.255, right) and rejects pair 3 (0.405, right): 2/2.
    """
    distances = np.array([0.305, 1.005, 0.255, 0.405])
    angles = np.arccos(1.0 - distances / 2.0)
    embeddings = np.zeros((8, 2))
    embeddings[0::2] = [1.0, 0.0]
    embeddings[1::2] = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    result = fkeval.verification_accuracy(embeddings, [True, False, True, False], n_folds=2)

    np.testing.assert_allclose(result["fold_threshold"], [0.26, 0.31])
    np.testing.assert_allclose(result["fold_accuracy"], [0.5, 1.0])
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["std"] == pytest.approx(0.25)
    assert result["threshold"] == pytest.approx(0.285)


def test_a_distance_equal_to_the_threshold_is_rejected() -> None:
    """insightface predicts "same" for distance < threshold: identical same pairs (distance exactly 0) need 0.01."""
    rng = np.random.default_rng(10)
    first = rng.standard_normal((20, 4))
    issame = np.arange(20) % 2 == 0
    second = np.where(issame[:, None], first, -first)  # distances exactly 0 and exactly 4
    embeddings = np.stack([first, second], axis=1).reshape(40, 4)
    result = fkeval.verification_accuracy(embeddings, issame, n_folds=1)
    assert result["threshold"] == pytest.approx(0.01) and result["accuracy"] == 1.0


def test_normalised_inside_and_torch_matches_numpy() -> None:
    rng = np.random.default_rng(3)
    embeddings = rng.standard_normal((400, 16))
    issame = rng.random(200) < 0.5
    embeddings[1::2][issame] += 1.5 * embeddings[0::2][issame]  # same pairs lean together: accuracy between 0.5 and 1
    reference = fkeval.verification_accuracy(embeddings, issame)
    assert 0.6 < reference["accuracy"] < 1.0

    scaled = embeddings * rng.uniform(1e-3, 1e3, size=(400, 1))
    for variant in (scaled, torch.from_numpy(scaled).float(), torch.from_numpy(embeddings)):
        result = fkeval.verification_accuracy(variant, torch.from_numpy(issame))
        for key in ("accuracy", "std", "threshold", "val", "far"):
            assert result[key] == pytest.approx(reference[key], abs=1e-9), key


def test_matches_a_direct_loop_over_thresholds() -> None:
    """The searchsorted counting equals the insightface-style per-threshold loop on noisy data."""
    rng = np.random.default_rng(4)
    embeddings = rng.standard_normal((242, 5))  # 121 pairs: folds of 13 and 12
    issame = rng.random(121) < 0.4
    embeddings[1::2][issame] += embeddings[0::2][issame]
    result = fkeval.verification_accuracy(embeddings, issame)

    normalised = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    distance = ((normalised[0::2] - normalised[1::2]) ** 2).sum(1)
    fold_sizes = [13] * 1 + [12] * 9
    bounds = np.cumsum([0] + fold_sizes)
    for fold in range(10):
        test = np.arange(bounds[fold], bounds[fold + 1])
        train = np.setdiff1d(np.arange(121), test)
        train_accuracy = [((distance[train] < t) == issame[train]).mean() for t in GRID]
        best = GRID[int(np.argmax(train_accuracy))]
        assert result["fold_threshold"][fold] == best
        assert result["fold_accuracy"][fold] == pytest.approx(((distance[test] < best) == issame[test]).mean())


@pytest.mark.parametrize(
    ("embeddings", "issame", "n_folds", "message"),
    [
        (np.zeros((7, 4)), [True] * 3, 10, "even number of rows.*got 7"),
        (np.zeros(8), [True] * 4, 2, r"2-D \[2N, D\].*\(8,\)"),
        (np.ones((8, 4)), [True, False, True], 2, "one flag per pair: 4 pairs.*got 3"),
        (np.ones((12, 4)), [True, False] * 3, 10, "at least 10 pairs, got 6"),
        (np.ones((8, 4)), [True, False, 2, True], 2, "booleans or 0/1"),
        (np.ones((8, 4)), [True] * 4, 0, "positive integer, got 0"),
    ],
)
def test_bad_inputs_are_named(embeddings: np.ndarray, issame: list, n_folds: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fkeval.verification_accuracy(embeddings, issame, n_folds)


def test_non_finite_embeddings_are_refused() -> None:
    embeddings = np.ones((20, 4))
    embeddings[6, 1] = np.nan
    embeddings[9, 0] = np.inf
    with pytest.raises(ValueError, match="2 non-finite values in 2 rows.*first bad row 6"):
        fkeval.verification_accuracy(embeddings, [True, False] * 5)


# ---------------------------------------------------------------- ROC, AUC, TAR@FAR


def test_roc_perfect_separation() -> None:
    issame = np.arange(200) % 2 == 0
    embeddings = pairs_with_distances(np.where(issame, 0.3, 1.7))
    fpr, tpr, thresholds = fkeval.roc_curve(embeddings, issame)
    assert fkeval.roc_auc(fpr, tpr) == 1.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.all(np.diff(thresholds) < 0)  # cosine similarities, decreasing
    assert (fpr[0], fpr[-1], tpr[-1]) == (0.0, 1.0, 1.0)


def test_roc_auc_of_a_known_ordering() -> None:
    """Same pairs at cos 0.9, 0.5; different at 0.7, 0.1: 3 of 4 (same, different) orderings are right."""
    embeddings = pairs_with_similarities(np.array([0.9, 0.7, 0.5, 0.1]))
    fpr, tpr, _ = fkeval.roc_curve(embeddings, [True, False, True, False])
    assert fkeval.roc_auc(fpr, tpr) == pytest.approx(0.75)


def test_roc_of_random_embeddings_is_chance() -> None:
    rng = np.random.default_rng(5)
    fpr, tpr, _ = fkeval.roc_curve(rng.standard_normal((8000, 32)), rng.random(4000) < 0.5)
    assert fkeval.roc_auc(fpr, tpr) == pytest.approx(0.5, abs=0.03)


def test_tar_at_far_exact() -> None:
    """100 same pairs at cos 0.00 … 0.99; 10 000 different pairs: 1 at 0.955, 9 at 0.605, 5 at 0.305, rest -0.5.

    FAR <= 1e-4 allows one false accept: accept cos > 0.605, TAR = 39/100. FAR <= 1e-3 allows ten: accept
    cos > 0.305, TAR = 69/100. FAR 1e-5 needs 100 000 different pairs: NaN.
    """
    different = np.full(10_000, -0.5)
    different[:15] = [0.955] + [0.605] * 9 + [0.305] * 5
    similarities = np.concatenate([np.arange(100) / 100, different])
    issame = np.arange(similarities.size) < 100
    tar = fkeval.tar_at_far(pairs_with_similarities(similarities), issame, far_targets=(1e-3, 1e-4, 1e-5))
    assert tar[1e-3] == pytest.approx(0.69)
    assert tar[1e-4] == pytest.approx(0.39)
    assert math.isnan(tar[1e-5])


def test_roc_needs_both_kinds_of_pair() -> None:
    with pytest.raises(ValueError, match="both same and different pairs, got 4 same of 4"):
        fkeval.roc_curve(np.ones((8, 3)), [True] * 4)


# ---------------------------------------------------------------- embedding with the flip trick


class AsymmetricNet(torch.nn.Module):
    """A tiny embedding network that is not flip-invariant (a linear map of the flattened pixels), with dropout
    so that a forgotten eval() shows."""

    def __init__(self, image_size: int, dim: int = 6) -> None:
        super().__init__()
        self.pool = torch.nn.AvgPool2d(4)
        self.dropout = torch.nn.Dropout(0.5)
        self.linear = torch.nn.Linear(3 * (image_size // 4) ** 2, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(self.pool(images).flatten(1)))


def make_jpegs(count: int, size: int, seed: int) -> list[bytes]:
    """Smooth random colour images (left-right asymmetric gradients) encoded as JPEG."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, size)
    images = []
    for _ in range(count):
        low, high = rng.uniform(0, 255, (2, 3))
        pixels = low + (high - low) * ramp[None, :, None] * rng.uniform(0.5, 1.0, (size, 1, 1))
        buffer = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=95)
        images.append(buffer.getvalue())
    return images


def test_embed_images_sums_the_flip() -> None:
    loader = pytest.importorskip("facekd.data.loader", reason="facekd.data.loader.decode_image not written yet")
    torch.manual_seed(0)
    size = 16
    model = AsymmetricNet(size).train()
    images = make_jpegs(5, size, seed=6)

    embeddings = fkeval.embed_images(model, images, image_size=size, batch_size=2, device="cpu", progress=False)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        decoded = torch.stack([loader.decode_image(image, size) for image in images])
        plain, flipped = model(decoded), model(decoded.flip(-1))
    assert not torch.allclose(plain, flipped, atol=1e-3)  # the check below would not see a missing flip otherwise
    assert embeddings.dtype == np.float32 and embeddings.shape == (5, 6)
    np.testing.assert_allclose(embeddings, (plain + flipped).numpy(), rtol=1e-5, atol=1e-6)


def test_embed_images_refuses_a_non_embedding_output() -> None:
    pytest.importorskip("facekd.data.loader", reason="facekd.data.loader.decode_image not written yet")
    with pytest.raises(ValueError, match=r"\[2, D\] embedding tensor, got \(2, 3, 8, 8\)"):
        fkeval.embed_images(torch.nn.Identity(), make_jpegs(2, 8, 7), image_size=8, device="cpu", progress=False)


class RedAngleNet(torch.nn.Module):
    """Embeds an image as the unit vector at angle π·r, r its mean red value as the loader normalises it,
    (x − 127.5) / 128. Uniform images are left-right symmetric, so the flip trick only doubles each embedding."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        angle = math.pi * images[:, 0].mean(dim=(1, 2))
        return torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)


def uniform_png(red: int, size: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (red, 90, 200)).save(buffer, format="PNG")  # lossless: red stays exact
    return buffer.getvalue()


def test_evaluate_bin_reports_accuracy_roc_and_speed(tmp_path: Path) -> None:
    """20 pairs whose 10-fold accuracy, threshold and AUC are known by construction.

    Pair i's images differ by `step` red levels, an angle of π·step/128 between their embeddings. Same pairs
    (even i) are 18 levels apart (squared distance 0.192, cos 0.904), different pairs 76 (2.581, cos −0.290);
    but same pair 4 is 85 apart (2.986, cos −0.493) and different pair 13 only 13 (0.101, cos 0.950). Every
    training split (18 pairs) is best cut just above 0.192: the grid threshold 0.20. The test folds {4, 5} and
    {12, 13} then score 1/2 each, the other eight 1: accuracy 0.9, std 0.2. Of the 10 × 10 (same, different)
    cosine orderings, the 9 × 9 of the well-placed pairs are right and the 19 involving a misplaced pair wrong:
    AUC 0.81.
    """
    pytest.importorskip("facekd.data.loader", reason="facekd.data.loader.decode_image not written yet")
    from facekd.data.verification import write_bin

    size, pairs = 16, 20
    issame = [i % 2 == 0 for i in range(pairs)]
    steps = [18 if same else 76 for same in issame]
    steps[4], steps[13] = 85, 13
    images = []
    for pair, step in enumerate(steps):
        base = 20 + 3 * pair
        images += [uniform_png(base, size), uniform_png(base + step, size)]
    bin_path = tmp_path / "tiny_lfw.bin"
    write_bin(bin_path, images, issame)

    result = fkeval.evaluate_bin(RedAngleNet(), bin_path, image_size=size, batch_size=8, device="cpu",
                                 progress=False)
    expected_folds = [1.0] * 10
    expected_folds[2] = expected_folds[6] = 0.5
    np.testing.assert_allclose(result["fold_accuracy"], expected_folds)
    assert result["accuracy"] == pytest.approx(0.9) and result["std"] == pytest.approx(0.2)
    np.testing.assert_allclose(result["fold_threshold"], 0.2)
    assert result["threshold"] == pytest.approx(0.2)
    assert result["auc"] == pytest.approx(0.81)
    assert (result["model"], result["dataset"], result["num_pairs"]) == ("RedAngleNet", "tiny_lfw", pairs)
    assert result["images_per_second"] > 0
    assert result["fpr"].shape == result["tpr"].shape and result["fpr"][-1] == result["tpr"][-1] == 1.0
    # 10 different pairs cannot measure a false accept rate of 1e-3
    assert set(result["tar_at_far"]) == {1e-3, 1e-4} and all(map(math.isnan, result["tar_at_far"].values()))


# ---------------------------------------------------------------- reporting


def test_plot_roc_writes_a_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    issame = rng.random(500) < 0.5
    good = pairs_with_distances(np.where(issame, rng.uniform(0.2, 1.2, 500), rng.uniform(0.8, 2.0, 500)))
    fpr, tpr, _ = fkeval.roc_curve(good, issame)
    result = {"model": "student", "dataset": "lfw", "fpr": fpr, "tpr": tpr, "accuracy": 0.9}
    noise_fpr, noise_tpr, _ = fkeval.roc_curve(rng.standard_normal((1000, 8)), issame)

    from_results = fkeval.plot_roc([result], tmp_path / "plots" / "roc.png", title="LFW")
    from_curves = fkeval.plot_roc({"teacher": (fpr, tpr), "noise": (noise_fpr, noise_tpr)}, tmp_path / "two.png")
    for path in (from_results, from_curves):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    with pytest.raises(ValueError, match="result 0 for plot_roc lacks \\['tpr'\\]"):
        fkeval.plot_roc([{"fpr": fpr}], tmp_path / "bad.png")


def test_format_table_lines_up_results() -> None:
    rows = [
        {"model": "teacher", "dataset": "lfw", "accuracy": 0.99533, "std": 0.00312, "threshold": 1.4321,
         "tar_at_far": {1e-3: 0.981, 1e-4: float("nan")}, "images_per_second": 1234.56},
        {"model": "student", "accuracy": 0.9, "std": 0.01, "threshold": 1.2},
    ]
    table = fkeval.format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert "TAR@FAR=1e-03 (%)" in lines[0] and "TAR@FAR=1e-04 (%)" in lines[0] and "images/s" in lines[0]
    assert "99.53 ± 0.31" in lines[2] and "1.432" in lines[2] and "98.10" in lines[2] and "1234.6" in lines[2]
    assert lines[3].count("n/a") == 4  # dataset, both TARs, speed
    with pytest.raises(ValueError, match="row 0 lacks \\['threshold'\\]"):
        fkeval.format_table([{"model": "m", "accuracy": 0.5, "std": 0.0}])
