"""insightface arcface_torch backbones as facekd networks: the parameter names of both, mapped explicitly.

insightface's model zoo ships ``backbone.pth``: the ``state_dict()`` of an arcface_torch backbone
(``backbones/iresnet.py``: ``iresnet18`` … ``iresnet200``; ``backbones/mobilefacenet.py``: ``get_mbf``), no
classifier, trained on images normalised as (x − 127.5)/127.5. facekd's modules hold the same tensors under
other names:

==========================================  ===========================================================
insightface IResNet                         facekd :class:`~facekd.models.IResNet`
==========================================  ===========================================================
``conv1`` / ``bn1`` / ``prelu``             ``stem.0`` / ``stem.1`` / ``stem.2``
``layer{i}.{j}.*`` (i = 1…4)                ``stages.{i-1}.{j}.*`` (same unit names: bn1, conv1, bn2,
                                            prelu, conv2, bn3, downsample.0/1)
``bn2`` / ``fc`` / ``features``             ``head.bn`` / ``head.fc`` / ``head.features``
==========================================  ===========================================================

========================================================  ==============================================
insightface MobileFaceNet (``mbf``)                       facekd ``mobilefacenet_arcface_torch``
========================================================  ==============================================
``layers.0.layers.{k}``                                   ``stem.{k}``
``layers.1.layers.{k}``                                   ``stages.0.0.{k}``
``layers.{2s}.layers.{p}.layers.{k}`` (s = 1…3)           ``stages.{s}.0.{expand|depthwise|project}.{k}``
``layers.{2s+1}.layers.{j}.layers.{p}.layers.{k}``        ``stages.{s}.{j+1}.{expand|depthwise|project}.{k}``
``conv_sep.layers.{k}``                                   ``head.conv.{k}``
``features.layers.0.layers.{k}`` / ``.2`` / ``.3``        ``head.gdconv.{k}`` / ``head.linear`` / ``head.features``
========================================================  ==============================================

(older arcface_torch MobileFaceNets keep ``layers`` in a ModuleList instead of a Sequential: same names.)
facekd's default ``mobilefacenet`` follows Chen et al.'s table, whose widths and groups differ from ``mbf``'s;
it has no insightface counterpart (``mobilefacenet_arcface_torch`` is ``mbf``, see
:mod:`facekd.models.mobilefacenet`). ``mbf_large`` and the ViTs are not mapped.

arcface_torch's ``fp16`` flag only runs the convolutions under autocast: its parameters, and the state dicts it
saves, are float32. A state dict stored in float16/bfloat16 is widened to float32 on import. Its ``fc_scale``
is fixed at 7·7, so its IResNets take 112×112 images only (``fc.weight`` is [D, 512·49]).
"""
from __future__ import annotations

import json
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from facekd.errors import CheckpointError
from facekd.models import StagedBackbone, build_backbone
from facekd.models.iresnet import IResNet
from facekd.models.mobilefacenet import MobileFaceNet

__all__ = ["ARCHS", "from_insightface", "import_insightface", "insightface_names", "to_insightface"]

ARCHS: dict[str, str] = {
    "r18": "iresnet18",
    "r34": "iresnet34",
    "r50": "iresnet50",
    "r100": "iresnet100",
    "r200": "iresnet200",
    "mbf": "mobilefacenet_arcface_torch",
}
"""arcface_torch's ``get_model`` names → facekd backbones."""

_IRESNET_PARTS = {"stem.0": "conv1", "stem.1": "bn1", "stem.2": "prelu", "head.bn": "bn2", "head.fc": "fc",
                  "head.features": "features"}
_MBF_UNIT_PARTS = {"expand": 0, "depthwise": 1, "project": 2}
_MBF_HEAD_PARTS = {"head.conv": "conv_sep.layers", "head.gdconv": "features.layers.0.layers",
                   "head.linear": "features.layers.2", "head.features": "features.layers.3"}
_LIST_SHOWN = 6


def _iresnet_name(key: str) -> str:
    if match := re.fullmatch(r"stages\.(\d)\.(.+)", key):
        return f"layer{int(match.group(1)) + 1}.{match.group(2)}"
    part, _, leaf = key.rpartition(".")
    return f"{_IRESNET_PARTS[part]}.{leaf}"


def _mbf_name(key: str) -> str:
    if match := re.fullmatch(r"stem\.(\d)\.(\w+)", key):
        return f"layers.0.layers.{match.group(1)}.{match.group(2)}"
    if match := re.fullmatch(r"stages\.0\.0\.(\d)\.(\w+)", key):
        return f"layers.1.layers.{match.group(1)}.{match.group(2)}"
    if match := re.fullmatch(r"stages\.([123])\.(\d+)\.(expand|depthwise|project)\.(\d)\.(\w+)", key):
        stage, unit, part, index, leaf = match.groups()
        position = f"{_MBF_UNIT_PARTS[part]}.layers.{index}.{leaf}"
        if unit == "0":  # the strided DepthWise that opens the stage
            return f"layers.{2 * int(stage)}.layers.{position}"
        return f"layers.{2 * int(stage) + 1}.layers.{int(unit) - 1}.layers.{position}"
    if match := re.fullmatch(r"(head\.conv|head\.gdconv)\.(\d)\.(\w+)", key):
        return f"{_MBF_HEAD_PARTS[match.group(1)]}.{match.group(2)}.{match.group(3)}"
    part, _, leaf = key.rpartition(".")
    return f"{_MBF_HEAD_PARTS[part]}.{leaf}"


def insightface_names(backbone: StagedBackbone) -> dict[str, str]:
    """facekd state-dict key → insightface arcface_torch key, for every entry of ``backbone.state_dict()``.

    Raises ValueError for a backbone without an arcface_torch counterpart (Chen et al.'s MobileFaceNet, an
    IResNet for another input size than 112).
    """
    if isinstance(backbone, MobileFaceNet):
        if backbone.layout != "arcface_torch":
            raise ValueError(
                "facekd's 'mobilefacenet' (Chen et al.'s widths, depthwise stage 0) has no insightface counterpart; "
                "insightface's mbf is 'mobilefacenet_arcface_torch'"
            )
        rename = _mbf_name
    elif isinstance(backbone, IResNet):
        if backbone.feature_sizes[-1] != 7:
            raise ValueError(f"insightface's IResNet has fc_scale 7·7 (112 px inputs); this one ends in a "
                             f"{backbone.feature_sizes[-1]}×{backbone.feature_sizes[-1]} map")
        rename = _iresnet_name
    else:
        raise ValueError(f"no insightface counterpart for {type(backbone).__name__}")
    return {key: rename(key) for key in backbone.state_dict()}


def to_insightface(backbone: StagedBackbone) -> dict[str, torch.Tensor]:
    """``backbone``'s state dict under insightface's names (what arcface_torch's ``backbone.pth`` holds)."""
    names = insightface_names(backbone)
    return {names[key]: value for key, value in backbone.state_dict().items()}


def _unwrap(state: Any, source: str) -> dict[str, torch.Tensor]:
    """The bare state dict of what people save: itself, ``{"state_dict": …}``, keys prefixed ``module.`` (DDP)."""
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source}: expected an arcface_torch backbone state dict (names → tensors), "
                              f"got {type(state).__name__}")
    if all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return dict(state)


def _listed(keys: list[str]) -> str:
    more = f" and {len(keys) - _LIST_SHOWN} more" if len(keys) > _LIST_SHOWN else ""
    return ", ".join(keys[:_LIST_SHOWN]) + more


def from_insightface(state: Any, backbone: StagedBackbone, *, source: str = "the state dict") -> StagedBackbone:
    """Load an arcface_torch state dict (any of the forms of :func:`_unwrap`) into ``backbone``, in place.

    Refuses, naming the keys, a state dict with missing, unexpected or mis-shaped entries. Half-precision
    tensors are widened to float32. A missing ``num_batches_tracked`` (no effect on the network) is tolerated.
    """
    theirs = _unwrap(state, source)
    names = insightface_names(backbone)
    ours = backbone.state_dict()
    wanted = {names[key]: key for key in ours}
    missing = sorted(name for name in wanted if name not in theirs and not name.endswith("num_batches_tracked"))
    unexpected = sorted(name for name in theirs if name not in wanted)
    misshaped = sorted(f"{name} {list(theirs[name].shape)} (expected {list(ours[key].shape)})"
                       for name, key in wanted.items() if name in theirs and theirs[name].shape != ours[key].shape)
    problems = [f"{what} ({len(keys)} keys) {_listed(keys)}" if len(keys) > 1 else f"{what} {keys[0]}"
                for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
    if problems:
        raise CheckpointError(f"{source} is not an insightface {type(backbone).__name__} of this shape: "
                              + "; ".join(problems))
    loaded = {}
    for name, key in wanted.items():
        value = theirs.get(name, ours[key])
        loaded[key] = value.float() if value.is_floating_point() and value.dtype != torch.float32 else value
    backbone.load_state_dict(loaded)
    return backbone


def _embedding_dim(state: dict[str, torch.Tensor], arch: str) -> int:
    key = "features.layers.2.weight" if arch == "mbf" else "fc.weight"
    if key not in state:
        raise CheckpointError(f"the state dict has no {key!r}, so it is not an arcface_torch {arch}")
    return int(state[key].shape[0])


def import_insightface(path: str | Path, arch: str, out: str | Path, *, name: str | None = None) -> Path:
    """Turn an arcface_torch ``backbone.pth`` into a facekd run folder ``out`` (no classifier); returns its
    checkpoint.

    The run's job has ``model.normalize: arcface_torch``, 112 px images and the embedding size of the file; its
    ``data.manifest`` is empty until ``facekd centres`` gives it a head for a manifest's classes. ``load_network``,
    ``facekd eval``, ``facekd export`` and ``model.init_from`` take it as it is; ``distill.teacher`` after
    ``facekd centres``.
    """
    from facekd.config import DataConfig, JobConfig, ModelConfig, TrainConfig, job_to_dict
    from facekd.distributed.checkpoint import list_checkpoints, save_checkpoint
    from facekd.network import CHECKPOINT_FORMAT

    if arch not in ARCHS:
        raise CheckpointError(f"--arch must be one of {sorted(ARCHS)}, got {arch!r}")
    path, out = Path(path), Path(out)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    if list_checkpoints(out / "checkpoints"):
        raise CheckpointError(f"{out} already holds a facekd run; import into a new folder")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)  # never runs code from the file
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:  # not tensors only, not torch
        raise CheckpointError(f"{path}: not a torch state dict that loads safely ({' '.join(str(error).split())[:200]})"
                              ) from None
    state = _unwrap(raw, str(path))
    model = ModelConfig(backbone=ARCHS[arch], embedding_dim=_embedding_dim(state, arch), normalize="arcface_torch")
    backbone = build_backbone(model.backbone, embedding_dim=model.embedding_dim, image_size=112)
    from_insightface(state, backbone, source=str(path))
    job = JobConfig(name=name or f"insightface-{arch}", data=DataConfig(manifest="", image_size=112), model=model,
                    train=TrainConfig(output_dir=str(out), steps=1))
    checkpoint = {"format": CHECKPOINT_FORMAT, "job": job_to_dict(job), "num_classes": 0, "step": 0,
                  "backbone": backbone.state_dict(), "imported": {"insightface": str(path.resolve()), "arch": arch}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "job.json").write_text(json.dumps(job_to_dict(job), indent=2) + "\n")
    return save_checkpoint(checkpoint, out / "checkpoints", 0)
