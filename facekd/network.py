"""A network as training leaves it: backbone, classifier head and job, built fresh or read from a checkpoint.

``load_network`` reads both checkpoint layouts ``facekd train`` writes (see :mod:`facekd.train`): one
process's ``state.pt`` holding backbone and head, and a distributed run's, whose head is split into one file
per rank (``classifier/rank_NNNNN.pt``). It consolidates what the caller needs: the whole head for one
process, or the rows of one rank's shard under another world size (so a teacher trained on 64 GPUs distils
a student on 8), or no head at all for evaluation.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from facekd.config import HeadConfig, JobConfig, ModelConfig, job_from_dict
from facekd.distributed.checkpoint import latest_checkpoint, load_checkpoint, read_file
from facekd.distributed.world import World
from facekd.errors import CheckpointError, ConfigError
from facekd.heads import MarginHead
from facekd.models import StagedBackbone, build_backbone

__all__ = ["CHECKPOINT_FORMAT", "Network", "autocast_for", "backbone_for", "build_network", "checkpoint_folder",
           "head_rows", "load_network", "resolve_device", "resolve_precision"]

CHECKPOINT_FORMAT = 1
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Network:
    """A backbone and its classifier head (None when not asked for), with the job that trained them."""

    backbone: StagedBackbone
    head: MarginHead | None
    job: JobConfig


def resolve_device(requested: str) -> torch.device:
    """``auto``: the GPU when there is one; ``cuda`` without one is an error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but torch sees no CUDA device")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def resolve_precision(requested: str, device: torch.device) -> torch.dtype:
    """Autocast dtype of the backbones: ``auto`` is bf16 on a GPU that has it, fp32 elsewhere."""
    if requested == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    if requested == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return _DTYPES[requested]


def autocast_for(device: torch.device, precision: str) -> tuple[Any, torch.dtype]:
    """The autocast context of the backbones for ``train.precision`` (a null context for fp32), and its dtype."""
    dtype = resolve_precision(precision, device)
    return (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()), dtype


def build_network(
    model: ModelConfig, head: HeadConfig, num_classes: int, image_size: int, *, world: World | None = None,
    seed: int = 0,
) -> tuple[StagedBackbone, MarginHead]:
    """A freshly initialised backbone and head (this rank's class shard of it under a distributed ``world``)."""
    return backbone_for(model, image_size), MarginHead(num_classes, model.embedding_dim, head, world=world, seed=seed)


def backbone_for(model: ModelConfig, image_size: int, *, stored: dict[str, torch.Tensor] | None = None
                 ) -> StagedBackbone:
    """The backbone ``model`` describes. A FAN-Face network's frozen FAN is read from ``model.fan.weights``; given
    the ``stored`` backbone state dict of a checkpoint, it is built in the shape of the FAN stored there instead
    (its weights come with that state dict: the file need not exist any more)."""
    if model.fan is None:
        return build_backbone(model.backbone, embedding_dim=model.embedding_dim, width=model.width,
                              image_size=image_size, dropout=model.dropout)
    from facekd.models.fan import FAN, fan_config, load_fan
    from facekd.models.fanface import FANFace

    if stored is None:
        fan = load_fan(model.fan.weights)
    else:
        fan = FAN(**fan_config({key.removeprefix("fan."): value for key, value in stored.items()
                                if key.startswith("fan.")}))
    config = model.fan
    try:
        return FANFace(int(model.backbone.removeprefix("iresnet")), fan=fan, heatmaps=config.heatmaps,
                       features=config.features, source=config.source, layer=config.layer,
                       heatmap_points=config.heatmap_points, stages=config.stages,
                       input_size=config.input_size, normalize=model.normalize, embedding_dim=model.embedding_dim,
                       width=model.width, image_size=image_size, dropout=model.dropout)
    except ValueError as error:
        raise ConfigError(f"model.fan ({config.weights}): {error}") from None


def checkpoint_folder(path: str | Path) -> Path:
    """The checkpoint ``path`` names: itself, or the newest of a run folder or of a ``checkpoints/`` folder."""
    folder = Path(path)
    if folder.is_dir() and (folder / "checkpoints").is_dir():
        folder = folder / "checkpoints"
    if folder.is_dir() and not (folder / "index.json").exists():
        folder = latest_checkpoint(folder) or folder
    return folder


def head_rows(folder: Path, state: dict[str, Any], start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of the head stored in the checkpoint ``folder`` whose ``state.pt`` is ``state``,
    read only from the files that hold them (memory-mapped)."""
    if "head" in state:
        return state["head"]["weight"][start:end]
    parts = []
    for shard in state["classifier"]:
        lo, hi = shard["class_offset"], shard["class_offset"] + shard["rows"]
        if hi <= start or lo >= end:
            continue
        weight = read_file(folder / shard["file"], mmap=True)["weight"]
        parts.append(weight[max(start, lo) - lo:min(end, hi) - lo].clone())
    rows = torch.cat(parts) if parts else torch.empty(0)
    if rows.shape[0] != end - start:
        raise CheckpointError(f"checkpoint {folder}: its classifier files do not cover classes [{start}, {end})")
    return rows


def load_network(path: str | Path, device: torch.device | str = "cpu", *, world: World | None = None,
                 with_head: bool = True) -> Network:
    """The backbone and head stored in a ``facekd train`` checkpoint (or a run folder's newest), in eval mode.

    ``world``: build the head as that world's class shard (rows read from whichever files hold them).
    ``with_head=False`` skips the head (evaluation needs only the backbone).
    """
    folder = checkpoint_folder(path)
    state = load_checkpoint(folder)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a facekd training checkpoint (format {state.get('format')!r})")
    job = job_from_dict(state["job"], source=f"job stored in {path}")
    model = job.model
    backbone = backbone_for(model, job.data.image_size, stored=state["backbone"])
    backbone.load_state_dict(state["backbone"])
    backbone.to(device).eval()
    if not with_head:
        return Network(backbone, None, job)
    if "head" not in state and "classifier" not in state:
        raise CheckpointError(
            f"{path} holds a backbone without a classifier (an imported model-zoo backbone): give it class centres "
            f"for your data with 'facekd centres {path} --data MANIFEST' before distilling from it"
        )
    head = MarginHead(state["num_classes"], model.embedding_dim, job.head, world=world)
    head.load_rows(head_rows(folder, state, head.class_offset, head.class_offset + head.num_local))
    head.to(device).eval()
    return Network(backbone, head, job)
