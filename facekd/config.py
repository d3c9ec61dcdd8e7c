"""Typed job specs, loaded from the YAML files in ``jobs/``: the only thing a user edits.

Every section is a keyword-only dataclass; each field carries its meaning in the docstring below
it. Loading is strict: an unknown key, a missing required key or a value of the wrong type is a
:class:`ConfigError` naming the file and the dotted key.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A job spec that cannot be used as written."""


@dataclass(kw_only=True)
class DataConfig:
    manifest: str
    """Path of the ``manifest.json`` that ``facekd data convert`` wrote beside the shards."""
    base_url: str | None = None
    """Read the shards from here instead of the manifest's folder (``http://…``, ``pipe:…``)."""
    image_size: int = 112
    """Side of the square input images; stored images of another size are resized."""
    shuffle_buffer: int = 2000
    """Samples held in each worker's shuffle buffer."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 decodes in the training process)."""
    resampled: bool = True
    """Draw shards with replacement each epoch (an infinite stream with a fixed epoch length)."""

    def __post_init__(self) -> None:
        _check(self.image_size >= 16, "image_size", f"must be at least 16, got {self.image_size}")
        _check(self.shuffle_buffer >= 0, "shuffle_buffer", f"must be >= 0, got {self.shuffle_buffer}")
        _check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")


@dataclass(kw_only=True)
class ModelConfig:
    backbone: str
    """``iresnet18``, ``iresnet34``, ``iresnet50``, ``iresnet100`` or ``mobilefacenet``."""
    width: float = 1.0
    """Channel multiplier (Wang & Lan 2017's ResNet/2, /4, /8 students are 0.5, 0.25, 0.125)."""
    embedding_dim: int = 512
    """Size of the face embedding."""
    dropout: float = 0.0
    """Dropout before the embedding layer (insightface uses 0 for MS1M)."""

    def __post_init__(self) -> None:
        from facekd.models import BACKBONES

        _check(self.backbone in BACKBONES, "backbone", f"must be one of {BACKBONES}, got {self.backbone!r}")
        _check(0 < self.width <= 4, "width", f"must be in (0, 4], got {self.width}")
        _check(self.embedding_dim > 0, "embedding_dim", f"must be positive, got {self.embedding_dim}")
        _check(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass(kw_only=True)
class HeadConfig:
    """Combined margin ``s·(cos(m1·θ + m2) − m3)`` on the target class, ``s·cos θ`` elsewhere."""

    s: float = 64.0
    """Scale of the normalised logits (ArcFace, Deng et al. 2019)."""
    m1: float = 1.0
    """Multiplicative angular margin (SphereFace); 1 disables it."""
    m2: float = 0.5
    """Additive angular margin (ArcFace); 0 disables it."""
    m3: float = 0.0
    """Additive cosine margin (CosFace); 0 disables it."""
    margin_grad: Literal["exact", "straight_through"] = "exact"
    """``straight_through`` reproduces insightface's backward (margin applied under no_grad)."""

    def __post_init__(self) -> None:
        _check(self.s > 0, "s", f"must be positive, got {self.s}")
        _check(self.m1 >= 1, "m1", f"must be >= 1, got {self.m1}")


@dataclass(kw_only=True)
class DistillConfig:
    method: Literal["none", "kd", "gkd"] = "none"
    """``none``: labels only; ``kd``: Hinton KD; ``gkd``: grouped KD (Zhao et al., AAAI'23)."""
    teacher: str | None = None
    """Teacher checkpoint (``facekd train`` output); its classifier gives the teacher logits."""
    weight: float = 1.0
    """Multiplier of the distillation loss added to the student's margin loss."""
    temperature: float = 1.0
    """Softmax temperature T; the KD loss is scaled by T² (Hinton et al. 2015)."""
    tau: float = 0.93
    """GKD: cumulative probability that closes the primary group (GKD paper, Table 2)."""
    w_primary: float = 8.0
    """GKD: λ1, weight of Primary-KD (GKD paper, Sec. 4.2)."""
    w_binary: float = 1.0
    """GKD: λ2, weight of Binary-KD (GKD paper, Sec. 4.2)."""
    w_secondary: float = 0.0
    """GKD: weight of Secondary-KD, dropped by the paper (Sec. 3.3)."""

    def __post_init__(self) -> None:
        if self.method != "none":
            _check(self.teacher is not None, "teacher", f"is required for method {self.method!r}")
        _check(self.temperature > 0, "temperature", f"must be positive, got {self.temperature}")
        _check(0 < self.tau <= 1, "tau", f"must be in (0, 1], got {self.tau}")


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 0.1
    """Peak learning rate of SGD (insightface: 0.1 for batch 512)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """L2 weight decay on every parameter."""
    schedule: Literal["cosine", "piecewise"] = "cosine"
    """Decay after warm-up: cosine to zero, or ×gamma at each milestone."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to lr over this many steps."""
    milestones: list[int] = field(default_factory=list)
    """Steps at which the piecewise schedule multiplies the learning rate by gamma."""
    gamma: float = 0.1
    """Factor of each piecewise decay."""
    clip_grad_norm: float = 5.0
    """Clip the global gradient norm to this value (insightface: 5); 0 disables clipping."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        _check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(self.clip_grad_norm >= 0, "clip_grad_norm", f"must be >= 0, got {self.clip_grad_norm}")
        _check(
            self.milestones == sorted(self.milestones), "milestones",
            f"must be increasing, got {self.milestones}",
        )


@dataclass(kw_only=True)
class TrainConfig:
    output_dir: str
    """Folder for checkpoints, TensorBoard events and evaluation results."""
    steps: int
    """Optimiser steps of the whole run."""
    batch_size: int = 128
    """Images per step on each rank."""
    seed: int = 0
    """Seed of the initial weights and of the data order."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` takes the GPU when there is one."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast dtype of the backbones; ``auto`` is bf16 on a GPU that has it, fp32 elsewhere."""
    checkpoint_every: int = 1000
    """Write a checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 2
    """Older checkpoints beyond this many are deleted."""
    log_every: int = 20
    """Steps between progress updates and TensorBoard scalars."""

    def __post_init__(self) -> None:
        _check(self.steps > 0, "steps", f"must be positive, got {self.steps}")
        _check(self.batch_size > 0, "batch_size", f"must be positive, got {self.batch_size}")
        _check(self.checkpoint_every > 0, "checkpoint_every", f"must be positive, got {self.checkpoint_every}")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        _check(self.log_every > 0, "log_every", f"must be positive, got {self.log_every}")


@dataclass(kw_only=True)
class EvalConfig:
    bins: list[str] = field(default_factory=list)
    """Verification ``.bin`` files evaluated at the end of training."""
    batch_size: int = 128
    """Images per forward pass during evaluation."""


@dataclass(kw_only=True)
class JobConfig:
    name: str
    """Name of the run, used in logs and result tables."""
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    head: HeadConfig = field(default_factory=HeadConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


class _FieldError(ValueError):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise _FieldError(key, message)


def _convert(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check ``value`` against the type ``hint``; returns it (ints widen to float)."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key, source)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{source}: '{key}' must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        (item_hint,) = typing.get_args(hint)
        return [_convert(item, item_hint, f"{key}[{i}]", source) for i, item in enumerate(value)]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{source}: '{key}' must be {getattr(hint, '__name__', hint)}, got {value!r}")


def _build(cls: type, data: Any, source: str, prefix: str = "") -> Any:
    section = prefix.rstrip(".") or "the job spec"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{section}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}' (known keys of {section}: {sorted(fields)})"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, spec in fields.items():
        if name in data:
            values[name] = _convert(data[name], hints[name], f"{prefix}{name}", source)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key '{prefix}{name}'")
    try:
        return cls(**values)
    except _FieldError as error:
        raise ConfigError(f"{source}: '{prefix}{error.key}' {error}") from None


def job_from_dict(data: dict, source: str = "<dict>") -> JobConfig:
    """Validate a job spec given as nested dicts; ``source`` names it in errors."""
    return _build(JobConfig, data, source)


def apply_overrides(data: dict, overrides: list[str], source: str) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw job spec."""
    for override in overrides:
        dotted, sep, raw = override.partition("=")
        if not sep or not dotted:
            raise ConfigError(f"{source}: override {override!r} is not of the form section.key=value")
        node = data
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: override {override!r}: '{part}' is not a section")
        node[last] = yaml.safe_load(raw)
    return data


def load_job(path: str | Path, overrides: list[str] = ()) -> JobConfig:
    """Load and validate the YAML job spec at ``path``, with ``section.key=value`` overrides."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"job spec {path} does not exist") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return job_from_dict(apply_overrides(data or {}, list(overrides), str(path)), str(path))


def job_to_dict(job: JobConfig) -> dict:
    """Plain nested dicts of ``job`` (stored in checkpoints, written beside results)."""
    return dataclasses.asdict(job)
