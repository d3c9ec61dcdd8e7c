"""DeepCluster's epoch step for CondFace's k-means clustering loss (thesis Sec. 5.2.2, AS5).

Before each epoch the trainer extracts the projected routing features of every training image with the
current network (no gradient, eval mode, no flip: DeepCluster's ``compute_features``), clusters them with
:func:`facekd.clustering.kmeans`, initialises the prototypes with the centroids and labels every image with its
cluster for the epoch. Images are matched to their labels by the shard sample key (``__key__``), which the
training batches carry, so an image's label is the epoch-start assignment whatever augmentation or order the
stream gives it.

Where this differs from DeepCluster (Caron et al. 2018):

- DeepCluster PCA-whitens its features to 256 dimensions before k-means; a routing vector has 24 or 96, so
  the L2-normalised projected features (the space the prototypes score in) are clustered as they are.
- DeepCluster re-initialises its top layer randomly each epoch; the thesis initialises it with the centroids.
- DeepCluster samples images uniformly over the pseudo-labels; the streaming loader cannot, so the epoch's
  images come in the stream's own order.
- the clustering runs at the start of every epoch, the first included (DeepCluster's order); the thesis' "after
  each epoch E_i ... the next epoch E_{i+1}" is the same for every epoch after the first.

Several ranks: each reads its part of the shards (``shards[rank::world]``), the features are all-gathered in
shard order and every rank runs the same seeded k-means on them, so all hold the same labels and centroids.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from facekd.clustering import ClusterHead, kmeans
from facekd.data.convert import read_manifest
from facekd.data.loader import _read_shard, _shard_url, decode_image
from facekd.errors import DataError, TrainingError

__all__ = ["EpochAssignments", "deepcluster_epoch", "routing_features", "shard_images"]

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png")


@dataclass
class EpochAssignments:
    """Each training image's cluster for one epoch: ``keys`` (shard sample keys) and ``labels`` [N] (int64)."""

    epoch: int
    keys: list[str]
    labels: Tensor

    def __post_init__(self) -> None:
        self._index = {key: position for position, key in enumerate(self.keys)}

    def labels_of(self, keys: tuple[str, ...] | list[str], device: torch.device) -> Tensor:
        """The pseudo-labels [B] of the samples ``keys`` of a batch."""
        try:
            positions = [self._index[key] for key in keys]
        except KeyError as error:
            raise TrainingError(
                f"sample {error.args[0]} has no k-means pseudo-label for epoch {self.epoch}: the shards changed "
                "since the clustering pass") from None
        return self.labels[torch.tensor(positions, dtype=torch.int64)].to(device)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "keys": list(self.keys), "labels": self.labels.cpu()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EpochAssignments:
        return cls(state["epoch"], list(state["keys"]), state["labels"])


def shard_images(manifest_path: str | Path, *, rank: int = 0, world_size: int = 1, base_url: str | None = None
                 ) -> Iterator[tuple[str, bytes]]:
    """(sample key, encoded image) of every sample of this rank's shards (``shards[rank::world_size]``), in
    manifest order; samples without an image are skipped."""
    manifest, folder = read_manifest(manifest_path)
    base = str(folder) if base_url is None else base_url
    for shard in manifest["shards"][rank::world_size]:
        for sample in _read_shard(_shard_url(base, shard["name"])):
            data = next((sample[ext] for ext in IMAGE_KEYS if ext in sample), None)
            if data is not None:
                yield sample["__key__"], data


def routing_features(backbone: nn.Module, images: Iterator[tuple[str, bytes]], *, image_size: int, normalize: str,
                     batch_size: int, device: torch.device, transform: Any = None, total: int | None = None,
                     progress: bool = False, desc: str = "routing") -> tuple[list[str], Tensor]:
    """(keys, features [N, D]) of the decodable ``images`` through a routed ``backbone`` in eval mode, no grad:
    its routing vectors β, or ``transform(β)`` (e.g. a :class:`ClusterHead`'s features). Modules are put back in
    the train/eval mode they were in."""
    modules = [backbone] + ([transform] if isinstance(transform, nn.Module) else [])
    modes = [module.training for module in modules]
    for module in modules:
        module.eval()
    keys: list[str] = []
    features: list[Tensor] = []
    pending_keys: list[str] = []
    pending: list[Tensor] = []

    def flush() -> None:
        backbone(torch.stack(pending).to(device))
        beta = backbone.routing_vector()
        features.append((beta if transform is None else transform(beta)).float().cpu())
        keys.extend(pending_keys)
        pending.clear()
        pending_keys.clear()

    try:
        with torch.no_grad(), tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
            for key, data in images:
                try:
                    pending.append(decode_image(data, image_size, normalize))
                except DataError:
                    continue  # the training stream skips it too: it never needs a label
                pending_keys.append(key)
                if len(pending) == batch_size:
                    flush()
                bar.update()
            if pending:
                flush()
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)
    if not features:
        raise DataError("no decodable image to extract routing vectors from")
    return keys, torch.cat(features)


def deepcluster_epoch(epoch: int, backbone: nn.Module, head: ClusterHead, manifest: str | Path, *, world: Any,
                      image_size: int, normalize: str, batch_size: int, iterations: int, init: str, seed: int,
                      base_url: str | None = None, progress: bool = False) -> tuple[EpochAssignments, float]:
    """DeepCluster's step before ``epoch``: features of all training images, k-means into the head's P
    prototypes (seed: ``seed`` + epoch), prototypes := centroids; returns the assignments and the inertia."""
    manifest_info, _ = read_manifest(manifest)
    device = next(head.parameters()).device
    keys, features = routing_features(
        backbone, shard_images(manifest, rank=world.rank, world_size=world.world_size, base_url=base_url),
        image_size=image_size, normalize=normalize, batch_size=batch_size, device=device, transform=head.features,
        total=None if world.world_size > 1 else manifest_info["num_samples"], progress=progress,
        desc=f"k-means features, epoch {epoch}")
    if world.world_size > 1:
        # rank r read shards[r::W]: gather every rank's part, then order the samples by key (unique in a manifest)
        parts = world.all_gather_objects((keys, features.numpy()))
        keys = [key for part_keys, _ in parts for key in part_keys]
        features = torch.from_numpy(np.concatenate([part for _, part in parts]))
        order = sorted(range(len(keys)), key=keys.__getitem__)
        keys = [keys[i] for i in order]
        features = features[torch.tensor(order)]
    prototypes = head.prototypes.weight.shape[0]
    if len(keys) < prototypes:
        raise TrainingError(f"k-means of {len(keys)} training images into cluster.prototypes = {prototypes} "
                            "clusters: lower cluster.prototypes")
    result = kmeans(features.to(device), prototypes, iterations=iterations, seed=seed + epoch, init=init)
    head.set_prototypes(result.centroids)
    if result.empty_splits:
        logger.info("k-means before epoch %d: %d empty clusters re-seeded", epoch, result.empty_splits)
    return EpochAssignments(epoch, keys, result.assignments.cpu()), result.inertia
