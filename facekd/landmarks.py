"""Training a FAN on landmark heatmaps (``facekd train JOB`` with ``task: landmarks``), and its NME.

The trainer builds its parts in a fixed order (data → network → optimiser → checkpoint restore) and steps top to
bottom in :meth:`LandmarkTrainer._train`: images (augmented on the device) → every stack's heatmaps → the heatmap
loss of every stack summed (intermediate supervision, as FAN trains: Bulat & Tzimiropoulos 2017, after Newell et
al. 2016) → backward → clip → optimiser step. At the end it measures the normalised mean error on the held-out
split (faces of identities the training split never shows), writes ``results.json`` and returns the summary.

One process: a FAN is small enough that one GPU (or the CPU, for the synthetic set) trains it; ``facekd train``
refuses ``--nproc-per-node`` and ``--ray`` for a landmark job.

A run is resumable as a recognition run is: checkpoints (``checkpoints/step_N/``, written atomically by
:func:`facekd.distributed.checkpoint.write_checkpoint`) hold the FAN, its architecture, the optimiser state and the
step; the data order and the augmentation are functions of the seed and the step, so a resumed run takes the same
steps the uninterrupted one would have. :func:`facekd.models.fan.load_fan` reads a run folder or checkpoint back.
"""
from __future__ import annotations

import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from facekd.config import LandmarkJobConfig, LandmarksConfig, job_to_dict
from facekd.data.synth_landmarks import read_landmark_manifest, read_landmark_split
from facekd.distributed.checkpoint import (
    STATE, clean_partial_checkpoints, latest_intact_checkpoint, list_checkpoints, load_checkpoint, save_file,
    write_checkpoint,
)
from facekd.errors import CheckpointError, ConfigError, DataError, TrainingError
from facekd.models.fan import FAN, HEATMAP_STRIDE, heatmap_argmax, heatmap_to_image, image_to_heatmap, render_heatmaps
from facekd.train import Schedule, lr_factor

__all__ = ["LandmarkTrainer", "adaptive_wing_loss", "augment", "heatmap_loss", "nme", "predict_landmarks"]

logger = logging.getLogger(__name__)

MAX_ROTATION_DEGREES = 15.0
MAX_SCALE = 0.1
MAX_SHIFT = 0.05  # of the side
LOSS_MAP_THRESHOLD = 0.2  # Wang et al. 2019, Sec. 4.3: foreground of the weighted loss map


def adaptive_wing_loss(
    prediction: Tensor, target: Tensor, *, alpha: float = 2.1, omega: float = 14.0, epsilon: float = 1.0,
    theta: float = 0.5, loss_map_weight: float = 0.0,
) -> Tensor:
    """Mean adaptive wing loss of heatmaps ``prediction`` against ``target`` (both ``[B, N, H, W]``, target in [0, 1]).

    Wang, Bo & Fuxin, "Adaptive Wing Loss for Robust Face Alignment via Heatmap Regression", ICCV 2019, Eq. 6-7::

        AWing(y, ŷ) = ω·ln(1 + |(y − ŷ)/ε|^(α − y))    if |y − ŷ| < θ
                      A·|y − ŷ| − C                     otherwise
        A = ω · 1/(1 + (θ/ε)^(α − y)) · (α − y) · (θ/ε)^(α − y − 1) · 1/ε
        C = θ·A − ω·ln(1 + (θ/ε)^(α − y))

    with the paper's α = 2.1, ω = 14, ε = 1, θ = 0.5. The error is divided by ε, as in the paper: several
    re-implementations divide by ω instead, which breaks the continuity that A and C are built for (value and slope
    of both branches agree at |y − ŷ| = θ only with ε; the tests check both). ``loss_map_weight`` W > 0 applies the
    weighted loss map (Sec. 4.3): the loss of a pixel where the 3×3 grey dilation of the target reaches 0.2 is
    multiplied by W + 1 (the paper: W = 10).
    """
    error = (target - prediction).abs()
    power = alpha - target
    ratio = theta / epsilon
    a = omega / (1 + ratio**power) * power * ratio ** (power - 1) / epsilon
    c = theta * a - omega * torch.log1p(ratio**power)
    # the log branch's value where it is used; elsewhere a safe stand-in keeps its gradient finite
    small = error < theta
    near = torch.where(small, error, torch.zeros_like(error))
    loss = torch.where(small, omega * torch.log1p((near / epsilon) ** power), a * error - c)
    if loss_map_weight:
        dilated = F.max_pool2d(target, kernel_size=3, stride=1, padding=1)
        loss = loss * (loss_map_weight * (dilated >= LOSS_MAP_THRESHOLD).to(loss.dtype) + 1)
    return loss.mean()


def heatmap_loss(heatmaps: list[Tensor], target: Tensor, config: LandmarksConfig) -> Tensor:
    """The loss of every stack's heatmaps against ``target``, summed over the stacks (intermediate supervision)."""
    total = heatmaps[0].new_zeros((), dtype=torch.float32)
    for prediction in heatmaps:
        prediction = prediction.float()
        if config.loss == "l2":
            total = total + F.mse_loss(prediction, target)
        else:
            total = total + adaptive_wing_loss(
                prediction, target, alpha=config.awing_alpha, omega=config.awing_omega,
                epsilon=config.awing_epsilon, theta=config.awing_theta, loss_map_weight=config.awing_loss_map)
    return total


def augment(images: Tensor, points: Tensor, flip: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A random flip (half the images), rotation, scale and shift of ``images`` [B, 3, S, S] (float), with their
    ``points`` [B, K, 2] (pixel centres at integers) moved alike; ``flip`` [K] renumbers mirrored points.

    Parameters are drawn on the CPU from ``generator`` (so a run's augmentation is a function of its seed and step)
    and applied on the images' device: one bilinear resampling, zeros outside the image."""
    b, _, size, _ = images.shape
    flips = torch.rand(b, generator=generator) < 0.5
    angle = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(MAX_ROTATION_DEGREES)
    scale = 1 + (torch.rand(b, generator=generator) * 2 - 1) * MAX_SCALE
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * MAX_SHIFT * 2  # in normalised coordinates ([-1, 1])
    device, dtype = images.device, images.dtype
    flips = flips.to(device)
    images = torch.where(flips[:, None, None, None], images.flip(3), images)
    mirrored = torch.stack((size - 1 - points[..., 0], points[..., 1]), dim=-1)[:, flip.to(device)]
    points = torch.where(flips[:, None, None], mirrored, points)
    # the similarity M = s·R in normalised coordinates (the image centre is 0, the side 2): out = M·in + shift
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    matrix = torch.stack((torch.stack((cos, -sin), -1), torch.stack((sin, cos), -1)), -2).to(device, dtype)
    shift = shift.to(device, dtype)
    inverse = torch.linalg.inv(matrix)
    theta = torch.cat((inverse, -(inverse @ shift[..., None])), dim=2)  # output → input, as affine_grid wants
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    centre = (size - 1) / 2
    points = (points - centre) @ matrix.transpose(1, 2) + centre + shift[:, None, :] * size / 2
    return images, points


def nme(prediction: np.ndarray, truth: np.ndarray, dense_truth: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image normalised mean error: the mean point-to-point distance over the K points, divided by

    - ``inter_ocular``: the distance of the outer eye corners (iBUG points 36 and 45, 300W's "inter-ocular"
      normalisation) for the 68 points; of the two eye centres (inter-pupil) for the 5 points;
    - ``box_diagonal``: the diagonal of the tight box of the image's 68 ground-truth points (both sets).

    ``prediction``, ``truth``: [N, K, 2]; ``dense_truth``: [N, 68, 2] (the same pixels)."""
    error = np.linalg.norm(prediction - truth, axis=-1).mean(axis=1)
    eyes = (36, 45) if truth.shape[1] == 68 else (0, 1)
    ocular = np.linalg.norm(truth[:, eyes[0]] - truth[:, eyes[1]], axis=-1)
    extent = dense_truth.max(axis=1) - dense_truth.min(axis=1)
    return {"inter_ocular": error / ocular, "box_diagonal": error / np.linalg.norm(extent, axis=-1)}


@torch.no_grad()
def predict_landmarks(fan: FAN, images: Tensor) -> Tensor:
    """Landmarks [B, K, 2] (input pixels, pixel centres at integers) of uint8 images [B, 3, S, S]: the last stack's
    heatmaps, face-alignment's sub-pixel arg-max, scaled back by the heatmap stride."""
    heatmaps = fan(images.float() / 255).heatmaps[-1]
    return heatmap_to_image(heatmap_argmax(heatmaps.float()))


class _Samples(torch.utils.data.Dataset):
    """Encoded images and their points, decoded and resized to ``size`` on access (points moved alike)."""

    def __init__(self, images: list[bytes], points: np.ndarray, size: int) -> None:
        self.images, self.points, self.size = images, torch.from_numpy(points).float(), size

    def __len__(self) -> int:
        return len(self.images)

    def _scaled(self, points: Tensor, stored: tuple[int, int]) -> Tensor:
        # pixel-centre coordinates scale about the edges: (p + 0.5)·new/old − 0.5, per axis
        return (points + 0.5) * torch.tensor([self.size / stored[0], self.size / stored[1]]) - 0.5

    def points_at_size(self, index: int) -> Tensor:
        """Sample ``index``'s points in pixels of the resized image (reads only the image's header)."""
        return self._scaled(self.points[index], Image.open(io.BytesIO(self.images[index])).size)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = Image.open(io.BytesIO(self.images[index])).convert("RGB")
        points = self._scaled(self.points[index], image.size)
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1), points


class _Batches:
    """Index batches from ``start`` to ``stop`` (steps): each epoch a permutation seeded by (seed, epoch), the last
    partial batch dropped; step t always gets the same images, whatever step a run started from."""

    def __init__(self, count: int, batch_size: int, seed: int, start: int, stop: int) -> None:
        self.count, self.batch_size, self.seed, self.start, self.stop = count, batch_size, seed, start, stop
        self.per_epoch = count // batch_size

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            epoch, position = divmod(step, self.per_epoch)
            order = np.random.default_rng([self.seed, epoch]).permutation(self.count)
            yield order[position * self.batch_size:(position + 1) * self.batch_size].tolist()


def _device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no GPU is visible")
    return torch.device("cuda" if setting in ("cuda", "auto") and torch.cuda.is_available() else "cpu")


def _build_optimizer(job: LandmarkJobConfig, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    optim, kind = job.optim, job.landmarks.optimizer
    if kind == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    if kind == "adam":
        return torch.optim.Adam(parameters, lr=optim.lr, betas=(optim.momentum, 0.999), weight_decay=optim.weight_decay)
    return torch.optim.SGD(parameters, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov,
                           weight_decay=optim.weight_decay)


class LandmarkTrainer:
    """Trains the FAN of a landmark job (see the module docstring). ``resume``: continue from the newest intact
    checkpoint of ``train.output_dir`` (a fresh run refuses a folder that holds checkpoints)."""

    def __init__(self, job: LandmarkJobConfig, *, resume: bool = False, progress: bool = True) -> None:
        if job.train.precision == "fp16":
            raise ConfigError("train.precision fp16 is not offered for landmark jobs: use bf16, fp32 or auto")
        self.job, self.resume, self.progress = job, resume, progress
        self.output_dir = Path(job.train.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.last_checkpoint: Path | None = None

    def fit(self, *, stop_after: int | None = None) -> dict[str, Any]:
        """Train, then measure the NME on the held-out split; returns the summary also written to results.json.

        ``stop_after``: return after this many steps (with a checkpoint; time-sliced runs), without the NME unless
        the run is then finished; a later ``resume=True`` run continues from there."""
        job, config = self.job, self.job.landmarks
        torch.manual_seed(job.train.seed)
        device = _device(job.train.device)
        # data
        manifest, _ = read_landmark_manifest(config.manifest)
        images, points, _ = read_landmark_split(config.manifest, "train", config.points)
        if len(images) < job.train.batch_size:
            raise DataError(f"{config.manifest}: the train split has {len(images)} images, fewer than one batch "
                            f"(train.batch_size {job.train.batch_size})")
        flip = torch.tensor(manifest["landmark_sets"][config.points]["flip"])
        schedule = Schedule.of(job, len(images) // job.train.batch_size)
        # network
        fan = FAN(landmarks=points.shape[1], stacks=config.stacks, width=config.width, depth=config.depth).to(device)
        # optimiser
        optimiser = _build_optimizer(job, list(fan.parameters()))
        # checkpoint restore
        step = self._restore(fan, optimiser, device)
        summary: dict[str, Any] = {"name": job.name, "step": step, "steps_run": 0}
        stop = schedule.total_steps if stop_after is None else min(schedule.total_steps, step + stop_after)
        if step < stop:
            summary = self._train(fan, optimiser, device, _Samples(images, points, config.image_size), flip,
                                  schedule, step, stop)
        if summary["step"] < schedule.total_steps:
            return {**summary, "checkpoint": str(self.last_checkpoint)}
        summary.update(self.evaluate(fan, device))
        summary["checkpoint"] = str(self.last_checkpoint)
        (self.output_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def _fan_config(self) -> dict[str, int]:
        config = self.job.landmarks
        count = {"five": 5, "dense": 68}[config.points]
        return {"landmarks": count, "stacks": config.stacks, "width": config.width, "depth": config.depth}

    def _restore(self, fan: FAN, optimiser: torch.optim.Optimizer, device: torch.device) -> int:
        """The step to continue from: 0 for a fresh run, else the newest intact checkpoint's, loaded into both."""
        clean_partial_checkpoints(self.checkpoint_dir)
        found = list_checkpoints(self.checkpoint_dir)
        if not found:
            return 0
        if not self.resume:
            raise CheckpointError(f"{self.checkpoint_dir} already holds checkpoints (newest {found[-1][1].name}): pass "
                                  f"--resume to continue that run, or choose another train.output_dir")
        newest = latest_intact_checkpoint(self.checkpoint_dir)
        if newest is None:
            raise CheckpointError(f"every checkpoint in {self.checkpoint_dir} is damaged; the run cannot resume")
        state = load_checkpoint(newest, device, verify=False)
        if state.get("fan") != self._fan_config():
            raise CheckpointError(f"{newest} holds a FAN {state.get('fan')}, this job builds {self._fan_config()}: "
                                  f"resume with the job that wrote it")
        fan.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimizer"])
        self.last_checkpoint = newest
        logger.info("%s: resuming from %s", self.job.name, newest.name)
        return int(state["step"])

    def _save(self, fan: FAN, optimiser: torch.optim.Optimizer, step: int) -> Path:
        state = {"fan": self._fan_config(), "model": fan.state_dict(), "optimizer": optimiser.state_dict(),
                 "step": step, "job": job_to_dict(self.job)}
        return write_checkpoint(self.checkpoint_dir, step, lambda partial: save_file(state, partial / STATE),
                                keep=self.job.train.keep_checkpoints)

    def _train(self, fan: FAN, optimiser: torch.optim.Optimizer, device: torch.device, samples: _Samples,
               flip: Tensor, schedule: Schedule, start: int, stop: int) -> dict[str, Any]:
        job, config, train = self.job, self.job.landmarks, self.job.train
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "job.json").write_text(json.dumps(job_to_dict(job), indent=2) + "\n")
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=start)
        batches = _Batches(len(samples), train.batch_size, train.seed, start, stop)
        loader = torch.utils.data.DataLoader(samples, batch_sampler=batches, num_workers=config.num_workers,
                                             pin_memory=device.type == "cuda")
        bf16 = device.type == "cuda" and train.precision in ("auto", "bf16") and torch.cuda.is_bf16_supported()
        heatmap_size = config.image_size // HEATMAP_STRIDE
        step, window_loss, window_steps = start, torch.zeros((), device=device), 0
        window_start, run_start, final_loss = time.perf_counter(), time.perf_counter(), float("nan")
        fan.train()
        bar = tqdm(total=schedule.total_steps, initial=start, desc=job.name, unit="step", disable=not self.progress)
        try:
            for images, points in loader:
                images = images.to(device, non_blocking=True).float() / 255
                points = points.to(device, non_blocking=True)
                if config.augment:
                    generator = torch.Generator().manual_seed(train.seed * 1_000_003 + step)
                    images, points = augment(images, points, flip, generator)
                target = render_heatmaps(image_to_heatmap(points), heatmap_size, config.sigma)
                for group in optimiser.param_groups:
                    group["lr"] = job.optim.lr * lr_factor(step, job, schedule)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    outputs = fan(images)
                loss = heatmap_loss(outputs.heatmaps, target, config)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                if job.optim.clip_grad_norm:
                    torch.nn.utils.clip_grad_norm_(fan.parameters(), job.optim.clip_grad_norm)
                optimiser.step()
                step += 1
                window_loss += loss.detach()
                window_steps += 1
                bar.update()
                # log (the only host synchronisation of the loop) and checkpoint
                if step % train.log_every == 0 or step == stop:
                    final_loss = window_loss.item() / window_steps
                    if not math.isfinite(final_loss):
                        raise TrainingError(f"{job.name}: the loss became {final_loss} before step {step}; nothing "
                                            f"was saved after the last good checkpoint ({self.last_checkpoint})")
                    seconds = time.perf_counter() - window_start
                    images_per_second = window_steps * train.batch_size / max(seconds, 1e-9)
                    lr = optimiser.param_groups[0]["lr"]
                    for tag, value in (("loss/heatmap", final_loss), ("lr", lr), ("images_per_second",
                                                                                   images_per_second)):
                        writer.add_scalar(tag, value, step)
                    bar.set_postfix(loss=f"{final_loss:.5f}", lr=f"{lr:.2e}", img_s=f"{images_per_second:.0f}")
                    window_loss.zero_()
                    window_steps, window_start = 0, time.perf_counter()
                if step % train.checkpoint_every == 0 or step == stop:
                    self.last_checkpoint = self._save(fan, optimiser, step)
        finally:
            bar.close()
            writer.close()
        seconds = time.perf_counter() - run_start
        return {"name": job.name, "step": step, "steps_run": step - start, "final_loss": final_loss,
                "train_seconds": round(seconds, 1),
                "images_per_second": round((step - start) * train.batch_size / max(seconds, 1e-9), 1)}

    def evaluate(self, fan: FAN, device: torch.device) -> dict[str, Any]:
        """NME of ``fan`` on the held-out split (means over its images; see :func:`nme`), beside a baseline that
        predicts the training split's mean shape for every face."""
        config, batch_size = self.job.landmarks, self.job.train.batch_size
        images, truth, dense = read_landmark_split(config.manifest, "val", config.points)
        train_images, train_points, _ = read_landmark_split(config.manifest, "train", config.points)
        train_samples = _Samples(train_images, train_points, config.image_size)
        samples = _Samples(images, np.concatenate([truth, dense], axis=1), config.image_size)
        count = truth.shape[1]
        predictions, truths, denses = [], [], []
        fan.eval()
        for start in range(0, len(samples), batch_size):
            batch = [samples[index] for index in range(start, min(start + batch_size, len(samples)))]
            pixels = torch.stack([image for image, _ in batch]).to(device)
            predictions.append(predict_landmarks(fan, pixels).cpu().double().numpy())
            moved = torch.stack([points for _, points in batch]).double().numpy()
            truths.append(moved[:, :count])
            denses.append(moved[:, count:])
        prediction, truth, dense = (np.concatenate(parts) for parts in (predictions, truths, denses))
        errors = nme(prediction, truth, dense)
        mean_shape = torch.stack([train_samples.points_at_size(i) for i in range(len(train_samples))]).mean(0)
        mean_shape = mean_shape.double().numpy()
        baseline = nme(np.broadcast_to(mean_shape, truth.shape), truth, dense)
        results = {
            "points": config.points,
            "num_val_images": len(truth),
            "nme_inter_ocular": round(float(errors["inter_ocular"].mean()), 5),
            "nme_box_diagonal": round(float(errors["box_diagonal"].mean()), 5),
            "failure_rate_inter_ocular_0.1": round(float((errors["inter_ocular"] > 0.1).mean()), 5),
            "mean_shape_nme_inter_ocular": round(float(baseline["inter_ocular"].mean()), 5),
            "mean_shape_nme_box_diagonal": round(float(baseline["box_diagonal"].mean()), 5),
            "normalisation": ("inter_ocular: outer eye corners (iBUG 36-45)" if count == 68 else
                              "inter_ocular: eye centres") + "; box_diagonal: tight box of the 68 true points",
        }
        logger.info("%s: NME %.4f (inter-ocular), %.4f (box diagonal) on %d held-out faces", self.job.name,
                    results["nme_inter_ocular"], results["nme_box_diagonal"], len(truth))
        return results
