"""The landmark trainer (facekd.landmarks): adaptive wing loss, augmentation, NME, overfitting, resume, job specs."""
import json
import math

import numpy as np
import pytest
import torch
import yaml

from facekd.cli import main
from facekd.config import LandmarkJobConfig, LandmarksConfig, job_from_dict, load_job
from facekd.data.synth_landmarks import read_landmark_split, synthesize_landmarks
from facekd.errors import CheckpointError, ConfigError
from facekd.landmarks import (
    LandmarkTrainer, _Samples, adaptive_wing_loss, augment, heatmap_loss, nme, predict_landmarks,
)
from facekd.models.fan import FAN, image_to_heatmap, load_fan, render_heatmaps


def awing_by_hand(y_hat: float, y: float, alpha=2.1, omega=14.0, epsilon=1.0, theta=0.5) -> float:
    """Wang et al. 2019 Eq. 6-7 for one pixel, in Python floats (double precision)."""
    delta = abs(y - y_hat)
    if delta < theta:
        return omega * math.log(1 + (delta / epsilon) ** (alpha - y))
    power = alpha - y
    a = omega * (1 / (1 + (theta / epsilon) ** power)) * power * (theta / epsilon) ** (power - 1) / epsilon
    c = theta * a - omega * math.log(1 + (theta / epsilon) ** (alpha - y))
    return a * delta - c


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (1, 5, 7, 3)])
def test_adaptive_wing_loss_matches_the_paper_forward_and_backward_in_both_branches(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    target = torch.rand(shape, generator=generator, dtype=torch.float64)
    prediction = (target + (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * 1.2)
    prediction.requires_grad_(True)
    error = (target - prediction).abs()
    assert (error < 0.5).any() and (error >= 0.5).any()  # both branches
    loss = adaptive_wing_loss(prediction, target)
    expected = np.mean([awing_by_hand(p, t) for p, t in zip(prediction.detach().flatten().tolist(),
                                                              target.flatten().tolist())])
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # backward with an incoming gradient that is not 1, against central differences of the by-hand loss
    (loss * 3.0).backward()
    step = 1e-6
    numeric = [3.0 * (awing_by_hand(p + step, t) - awing_by_hand(p - step, t)) / (2 * step) / target.numel()
               for p, t in zip(prediction.detach().flatten().tolist(), target.flatten().tolist())]
    np.testing.assert_allclose(prediction.grad.flatten().numpy(), numeric, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("y", [0.0, 0.3, 1.0])
def test_adaptive_wing_loss_is_continuous_in_value_and_slope_at_theta(y):
    # the division by ε (not ω) is what makes A and C join the branches: both sides of θ agree
    target = torch.full((2,), y, dtype=torch.float64)
    below = torch.tensor([y + 0.5 - 1e-9, y - 0.5 + 1e-9], dtype=torch.float64, requires_grad=True)
    above = torch.tensor([y + 0.5 + 1e-9, y - 0.5 - 1e-9], dtype=torch.float64, requires_grad=True)
    values = []
    for prediction in (below, above):
        loss = adaptive_wing_loss(prediction, target)
        loss.backward()
        values.append(loss.item())
    assert values[0] == pytest.approx(values[1], abs=1e-7)
    np.testing.assert_allclose(below.grad.numpy(), above.grad.numpy(), rtol=1e-6)
    assert (below.grad.abs() > 0).all()


def test_weighted_loss_map_multiplies_the_dilated_foreground_by_w_plus_one():
    target = torch.zeros(1, 1, 7, 7, dtype=torch.float64)
    target[0, 0, 3, 3] = 1.0
    target[0, 0, 3, 4] = 0.3
    prediction = torch.full_like(target, 0.1)
    plain = adaptive_wing_loss(prediction, target, theta=0.5)
    weighted = adaptive_wing_loss(prediction, target, theta=0.5, loss_map_weight=10.0)
    per_pixel = torch.tensor([[awing_by_hand(0.1, t) for t in row] for row in target[0, 0].tolist()],
                             dtype=torch.float64)
    mask = torch.zeros(7, 7, dtype=torch.float64)
    mask[2:5, 2:6] = 1.0  # the 3x3 dilation of the two pixels >= 0.2
    assert plain.item() == pytest.approx(per_pixel.mean().item(), rel=1e-12)
    assert weighted.item() == pytest.approx((per_pixel * (10 * mask + 1)).mean().item(), rel=1e-12)


def test_heatmap_loss_sums_the_stacks():
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 8, 8, generator=generator)
    stacks = [torch.rand(2, 3, 8, 8, generator=generator) for _ in range(3)]
    l2 = LandmarksConfig(manifest="m", image_size=64, loss="l2")
    assert heatmap_loss(stacks, target, l2).item() == pytest.approx(
        sum(((s - target) ** 2).mean().item() for s in stacks), rel=1e-6)
    awing = LandmarksConfig(manifest="m", image_size=64, loss="awing")
    assert heatmap_loss(stacks, target, awing).item() == pytest.approx(
        sum(adaptive_wing_loss(s, target).item() for s in stacks), rel=1e-6)


def test_augment_moves_points_with_the_pixels_and_renumbers_flipped_ones():
    # three landmarks, each a bright dot in its own channel; the flip table swaps points 0 and 1
    size, batch = 48, 24
    generator = torch.Generator().manual_seed(1)
    points = torch.stack([torch.rand(batch, 2, generator=generator) * 16 + offset
                          for offset in (8.0, 24.0, 16.0)], dim=1).round()
    images = torch.zeros(batch, 3, size, size)
    for b in range(batch):
        for k in range(3):
            x, y = int(points[b, k, 0]), int(points[b, k, 1])
            images[b, k, y - 1:y + 2, x - 1:x + 2] = 1.0
    moved_images, moved = augment(images, points, torch.tensor([1, 0, 2]), torch.Generator().manual_seed(3))
    assert not torch.allclose(moved, points)
    flipped = 0
    for b in range(batch):
        found = []
        grid = torch.arange(size, dtype=torch.float32)
        for channel in range(3):  # the centroid of the resampled dot
            plane = moved_images[b, channel]
            found.append(torch.stack([(plane.sum(0) * grid).sum(), (plane.sum(1) * grid).sum()]) / plane.sum())
        # unflipped: channel k's dot is at point k; flipped: channels 0 and 1 swap their numbers
        straight = all((found[k] - moved[b, k]).norm() <= 0.3 for k in range(3))
        swapped = all((found[c] - moved[b, k]).norm() <= 0.3 for k, c in ((0, 1), (1, 0), (2, 2)))
        assert straight != swapped, b
        flipped += swapped
    assert 0 < flipped < batch


def test_nme_by_hand():
    truth = np.zeros((1, 68, 2))
    truth[0, :, 0] = np.arange(68)  # x from 0 to 67; box 67 x 0
    truth[0, 36] = [10.0, 0.0]
    truth[0, 45] = [30.0, 0.0]  # outer eye corners 20 apart
    prediction = truth.copy()
    prediction[0, 5] += [3.0, 4.0]  # one point 5 off: mean error 5/68
    errors = nme(prediction, truth, truth)
    assert errors["inter_ocular"][0] == pytest.approx(5 / 68 / 20)
    assert errors["box_diagonal"][0] == pytest.approx(5 / 68 / 67)
    five = np.array([[[0.0, 0.0], [8.0, 6.0], [4.0, 9.0], [1.0, 12.0], [7.0, 12.0]]])
    assert nme(five + [0.0, 1.0], five, truth)["inter_ocular"][0] == pytest.approx(1 / 10)


@pytest.fixture(scope="module")
def landmark_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("landmarks")
    synthesize_landmarks(root, num_identities=4, images_per_identity=2, num_val_identities=2,
                         val_images_per_identity=2, image_size=64, seed=0, show_progress=False)
    return root


@pytest.mark.slow
def test_fan_overfits_a_handful_of_synthetic_faces(landmark_set, one_thread):
    # 4 faces, no augmentation: the FAN learns their 68 points to a small fraction of the eye distance (the mean
    # shape misses them by ~0.1-0.2); adaptive wing loss with its loss map, as the synthetic job trains
    torch.manual_seed(0)
    encoded, points, _ = read_landmark_split(landmark_set, "train", "dense")
    samples = _Samples(encoded[:4], points[:4], 64)
    images = torch.stack([samples[i][0] for i in range(4)])
    truth = torch.stack([samples[i][1] for i in range(4)])
    config = LandmarksConfig(manifest="m", image_size=64, width=16, sigma=1.5, loss="awing", awing_loss_map=10.0)
    target = render_heatmaps(image_to_heatmap(truth), 16, config.sigma)
    fan = FAN(landmarks=68, stacks=2, width=16)
    optimiser = torch.optim.Adam(fan.parameters(), lr=5e-3)
    for _ in range(200):
        loss = heatmap_loss(fan(images.float() / 255).heatmaps, target, config)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    fan.eval()
    predicted = predict_landmarks(fan, images).double().numpy()
    errors = nme(predicted, truth.double().numpy(), truth.double().numpy())["inter_ocular"]
    mean_shape = np.broadcast_to(truth.double().numpy().mean(axis=0), truth.shape)
    assert errors.mean() < 0.1, errors
    assert errors.mean() < 0.5 * nme(mean_shape, truth.double().numpy(), truth.double().numpy())["inter_ocular"].mean()


def _job(landmark_set, out, **landmarks):
    return {"name": "fan_tiny", "task": "landmarks",
            "landmarks": {"manifest": str(landmark_set), "image_size": 64, "stacks": 2, "width": 8, "sigma": 1.5,
                          "optimizer": "adam", "num_workers": 0, **landmarks},
            "optim": {"lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 1},
            "train": {"output_dir": str(out), "steps": 4, "batch_size": 4, "checkpoint_every": 2, "log_every": 1,
                      "device": "cpu"}}


@pytest.mark.slow
def test_landmark_trainer_resumes_from_its_last_checkpoint_as_if_never_stopped(landmark_set, tmp_path, one_thread):
    whole = LandmarkTrainer(job_from_dict(_job(landmark_set, tmp_path / "whole")), progress=False).fit()
    assert whole["step"] == 4 and math.isfinite(whole["nme_inter_ocular"]) and whole["num_val_images"] == 4
    results = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert results["nme_box_diagonal"] == whole["nme_box_diagonal"] and "outer eye corners" in results["normalisation"]
    sliced = job_from_dict(_job(landmark_set, tmp_path / "sliced"))
    first = LandmarkTrainer(sliced, progress=False).fit(stop_after=3)
    assert first["step"] == 3 and "nme_inter_ocular" not in first
    with pytest.raises(CheckpointError, match="pass --resume"):
        LandmarkTrainer(sliced, progress=False).fit()
    second = LandmarkTrainer(sliced, resume=True, progress=False).fit()
    assert second["steps_run"] == 1 and second["step"] == 4
    a, b = load_fan(tmp_path / "whole"), load_fan(tmp_path / "sliced")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert second["nme_inter_ocular"] == whole["nme_inter_ocular"]
    # a job that builds another FAN does not resume this one
    other = job_from_dict(_job(landmark_set, tmp_path / "sliced", width=16))
    with pytest.raises(CheckpointError, match="holds a FAN"):
        LandmarkTrainer(other, resume=True, progress=False).fit()


def test_landmark_job_specs_are_checked(tmp_path):
    job = job_from_dict(_job("m", tmp_path))
    assert isinstance(job, LandmarkJobConfig) and job.landmarks.width == 8
    spec = _job("m", tmp_path)
    spec["landmarks"]["heatmap"] = 1
    with pytest.raises(ConfigError, match="unknown key 'landmarks.heatmap'"):
        job_from_dict(spec)
    spec = _job("m", tmp_path)
    spec["model"] = {"backbone": "iresnet18"}
    with pytest.raises(ConfigError, match="'model' is a section of recognition jobs"):
        job_from_dict(spec)
    recognition = {"name": "r", "data": {"manifest": "m"}, "model": {"backbone": "iresnet18"},
                   "train": {"output_dir": "o", "steps": 1}, "landmarks": {"manifest": "m"}}
    with pytest.raises(ConfigError, match="'landmarks' is the section of a landmark job"):
        job_from_dict(recognition)
    del recognition["landmarks"]
    assert job_from_dict({**recognition, "task": "recognition"}).model.backbone == "iresnet18"
    with pytest.raises(ConfigError, match="'task' must be recognition or landmarks"):
        job_from_dict({**recognition, "task": "pose"})
    for key, value, message in (("image_size", 96, "multiple of 4·2\\^depth = 64"), ("width", 12, "multiple of 8"),
                                ("awing_loss_map", 10.0, "set loss: awing")):
        spec = _job("m", tmp_path, **{key: value})
        with pytest.raises(ConfigError, match=message):
            job_from_dict(spec)


def test_facekd_train_refuses_other_launchers_for_a_landmark_job(tmp_path, capsys):
    path = tmp_path / "fan.yaml"
    path.write_text(yaml.safe_dump(_job(tmp_path / "missing", tmp_path / "run")))
    assert isinstance(load_job(path), LandmarkJobConfig)
    for flags in (["--nproc-per-node", "2"], ["--ray"]):
        assert main(["train", str(path), *flags]) == 2
        error = capsys.readouterr().err
        assert "is a landmark job (task: landmarks), which trains in one process" in error and error.count("\n") == 1
    assert main(["submit", str(path)]) == 2
    assert "not on a Ray cluster" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["fan_synthetic", "fan_2dfan4"])
def test_shipped_landmark_job_specs_load(name):
    from pathlib import Path

    job = load_job(Path(__file__).parents[1] / "jobs" / "fanface" / f"{name}.yaml")
    assert isinstance(job, LandmarkJobConfig) and job.landmarks.stacks == 2
    if name == "fan_2dfan4":  # the released architecture: its first two stacks are 2DFAN4's, name for name
        config = job.landmarks
        assert (config.image_size, config.width, config.depth, config.sigma) == (256, 256, 4, 1.0)
        two = FAN(stacks=2, width=config.width, depth=config.depth).state_dict()
        four = FAN(stacks=4).state_dict()
        assert all(key in four and four[key].shape == value.shape for key, value in two.items())
