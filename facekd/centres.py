"""Class centres of a backbone-only teacher on the user's data: ``facekd centres``.

Logit distillation (KD, DKD, GKD, SRRL's L_SR) reads the teacher's classifier, which model-zoo backbones do
not ship and whose identities would not be the user's anyway. The centre of class c is the normalised mean
of the teacher's L2-normalised flip-summed embeddings of c's images:

    w_c = normalize( Σ_{i: y_i = c} normalize(f(x_i) + f(flip(x_i))) )

(the mean and the sum have the same direction). The rows become the run's head for the manifest's classes,
so the teacher's logits are s·cos(embedding, centre) as for a head it trained itself.

Every sample is read once: each rank reads the shards the loader deals it (``resampled=False``, no shuffle
buffer, no random flip) in ``ceil(samples / batch_size)`` batches, the last one cut to the remainder. Sums
are float64 and added batch by batch in stream order, so the result does not depend on where a run was
interrupted. Every ``save_every`` batches each rank replaces its progress file (``centres/rank_RRRRR.pt`` in
the output run folder: the sums, counts and the number of batches done) atomically; a rerun with the same
settings continues from it, the loader skipping the samples already counted without decoding them. At the
end the ranks sum their partial sums (one all-reduce) and rank 0 writes the checkpoint.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from tqdm import tqdm

from facekd.config import job_from_dict, job_to_dict
from facekd.data.convert import read_manifest
from facekd.data.loader import build_train_loader, to_float
from facekd.distributed.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from facekd.distributed.world import World, launched_by_a_launcher
from facekd.errors import ConfigError, DataError
from facekd.network import checkpoint_folder, load_network, resolve_device

__all__ = ["compute_centres"]

logger = logging.getLogger(__name__)

PROGRESS_FORMAT = 1


def _progress_path(out: Path, rank: int) -> Path:
    return out / "centres" / f"rank_{rank:05d}.pt"


def _save_progress(progress: dict[str, Any], path: Path) -> None:
    """Replace ``path`` atomically: a kill leaves the previous progress file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(partial, "wb") as f:
        torch.save(progress, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def _load_progress(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The progress saved at ``path`` by a run with the same ``settings``; None when there is none."""
    if not path.is_file():
        return None
    progress = torch.load(path, map_location="cpu", weights_only=True)
    if progress.get("settings") != settings:
        raise ConfigError(
            f"{path} holds the progress of a centres run with other settings ({progress.get('settings')}); rerun "
            f"with those, or delete {path.parent} to start again with {settings}"
        )
    return progress


def compute_centres(
    run: str | Path,
    manifest: str | Path,
    *,
    out: str | Path | None = None,
    batch_size: int = 64,
    num_workers: int = 1,
    save_every: int = 100,
    device: str = "auto",
    world: World | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> Path | None:
    """The class centres of the network in ``run`` (a run folder or checkpoint) on the classes of ``manifest``,
    written as the head of a checkpoint in ``out`` (default: ``run`` itself, replacing its newest checkpoint's
    step); returns that checkpoint (None on ranks other than 0, and when ``stop_after`` ended the call early).

    ``num_workers``: 0 decodes in this process, 1 in one loader process beside it (the forward dominates).
    ``stop_after``: end after that many batches of this call, as an interruption would (tests).
    Launched on several ranks (torchrun), each rank reads its share of the shards.
    """
    if num_workers not in (0, 1):
        raise ConfigError(f"centres reads each rank's shards in order with 0 or 1 loader workers, got {num_workers}")
    if batch_size < 1 or save_every < 1:
        raise ConfigError(f"batch_size and save_every must be >= 1, got {batch_size} and {save_every}")
    if world is None:
        world = World.from_env(device) if launched_by_a_launcher() else World.single(resolve_device(device))
    source = checkpoint_folder(run)
    out = Path(run if out is None else out)
    manifest_path = Path(manifest).resolve()
    network = load_network(source, world.device, with_head=False)
    backbone, model, image_size = network.backbone, network.job.model, network.job.data.image_size
    num_classes = read_manifest(manifest_path)[0]["num_classes"]

    # this rank's share of the samples: the shards the loader deals it, each sample once
    def loader(batches: int, start: int):
        return build_train_loader(
            manifest_path, batch_size=batch_size, image_size=image_size, rank=world.rank, world_size=world.world_size,
            num_workers=num_workers, shuffle_buffer=0, seed=0, start_batch=start, resampled=False,
            batches_per_epoch=batches, flip=False, uint8_pixels=True)

    stream = loader(1, 0).stream
    my_shards = next(stream._epoch_shards(0, 0))
    num_samples = sum(stream.shard_sizes[index] for index in my_shards)
    num_batches = max(math.ceil(num_samples / batch_size), 1)

    # resume this rank's progress, if a run with the same settings left one
    settings = {"format": PROGRESS_FORMAT, "source": str(source.resolve()), "manifest": str(manifest_path),
                "batch_size": batch_size, "rank": world.rank, "world_size": world.world_size,
                "num_samples": num_samples}
    progress_path = _progress_path(out, world.rank)
    state = _load_progress(progress_path, settings)
    if state is None:
        state = {"settings": settings, "batches": 0,
                 "sums": torch.zeros(num_classes, model.embedding_dim, dtype=torch.float64),
                 "counts": torch.zeros(num_classes, dtype=torch.int64)}
    elif state["batches"]:
        logger.info("centres: rank %d resumes after %d of %d batches", world.rank, state["batches"], num_batches)
    sums, counts = state["sums"].to(world.device), state["counts"].to(world.device)

    # embed: flip-summed, normalised, added to the class sums in stream order
    done, refilled = state["batches"], 0
    last = num_batches if stop_after is None else min(num_batches, done + stop_after)
    bar = tqdm(total=num_batches, initial=done, desc="centres", unit="batch", disable=not (progress and world.is_main))
    batches = iter(loader(num_batches, done)) if done < last else iter(())
    with torch.no_grad():
        while done < last:
            batch = next(batches)
            rows = min(batch_size, num_samples - done * batch_size)  # the last batch: only what is left
            pixels = batch.images[:rows].to(world.device)
            labels = batch.labels[:rows].to(world.device)
            refilled += batch.num_corrupt + batch.num_unlabelled
            images = to_float(pixels, model.normalize)
            embedding = backbone(images) + backbone(images.flip(-1))
            sums.index_add_(0, labels, F.normalize(embedding.double(), dim=1))
            counts += torch.bincount(labels, minlength=num_classes)
            done += 1
            bar.update(1)
            if done % save_every == 0 or done == last:
                _save_progress({"settings": settings, "batches": done, "sums": sums.cpu(), "counts": counts.cpu()},
                               progress_path)
    bar.close()
    if refilled:
        logger.warning("centres: %d corrupt or unlabelled samples on rank %d were replaced by repeats of others "
                       "in their batch", refilled, world.rank)
    if done < num_batches:
        return None

    # combine the ranks' sums; rank 0 writes the head
    world.all_reduce(sums, "sum")
    world.all_reduce(counts, "sum")
    result = None
    if world.is_main:
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            raise DataError(f"{len(empty)} classes of {manifest_path} have no sample (e.g. {empty[:5]}): no centre")
        result = _write(source, out, network.job, sums, counts, manifest_path)
        logger.info("centres: %d classes from %d samples written to %s", num_classes, int(counts.sum()), result)
    world.barrier()
    progress_path.unlink(missing_ok=True)
    world.barrier()
    if world.is_main and not any(progress_path.parent.iterdir()):
        progress_path.parent.rmdir()
    return result


def _write(source: Path, out: Path, job: Any, sums: torch.Tensor, counts: torch.Tensor, manifest: Path) -> Path:
    """A checkpoint in ``out`` holding the source's backbone and the centres as its head."""
    state = load_checkpoint(source)
    stored = job_to_dict(job_from_dict(state["job"], source=str(source)))
    stored["data"]["manifest"] = str(manifest)  # the head's classes are this manifest's
    stored["train"]["output_dir"] = str(out)
    centres = F.normalize(sums, dim=1).float().cpu()
    checkpoint = {"format": state["format"], "job": stored, "num_classes": centres.shape[0], "step": state["step"],
                  "backbone": state["backbone"], "head": {"weight": centres},
                  "centres": {"source": str(source.resolve()), "manifest": str(manifest),
                              "samples": int(counts.sum()), "counts": counts.cpu()}}
    folder = out / "checkpoints"
    return save_checkpoint(checkpoint, folder, state["step"], keep=len(list_checkpoints(folder)) + 1)
