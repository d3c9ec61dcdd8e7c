"""How a training step updates the weights (``facekd.distributed.engine``).

Two optimisers with one interface, chosen by the :class:`~facekd.distributed.world.World`:

* :class:`LocalOptimiser` — one process: one SGD over backbone, head and adapters, a GradScaler for fp16,
  clipping over all of them. What the single-process trainer always did, to the last bit (the golden-loss
  test guards it).
* :class:`DeepSpeedOptimiser` — several ranks: the student backbone and the distillation adapters run in a
  real ``deepspeed.initialize`` engine (data-parallel, ZeRO stage 0/1/2), the job's
  ``deepspeed:`` section passed through; the sharded classifier stays OUT of the engine (its start-up
  broadcast would copy rank 0's shard to every rank, its gradient all-reduce would mix different classes)
  and has its own SGD, its momentum sharded the same way. One learning rate drives both.
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch
from torch import nn

from facekd.errors import ConfigError

__all__ = ["DeepSpeedOptimiser", "LocalOptimiser", "deepspeed_config"]

logger = logging.getLogger(__name__)

# keys of the deepspeed section that the rest of the job spec owns: a value there must agree with it
_OWNED_ELSEWHERE = {"optimizer": "optim", "scheduler": "optim (its schedule)"}


def deepspeed_config(user: dict[str, Any], *, micro_batch: int, world_size: int, clip_grad_norm: float
                     ) -> dict[str, Any]:
    """The configuration handed to ``deepspeed.initialize``: the job's ``deepspeed:`` section, completed from
    the job (batch sizes, clipping), with every key that contradicts the job an error naming both."""
    config = copy.deepcopy(user)
    for key, owner in _OWNED_ELSEWHERE.items():
        if key in config:
            raise ConfigError(f"deepspeed.{key} is set, but the job's {owner} section drives it: remove deepspeed.{key}")
    accumulation = config.get("gradient_accumulation_steps", 1)
    if accumulation != 1:
        raise ConfigError(
            f"deepspeed.gradient_accumulation_steps is {accumulation}: the sharded classifier steps with every "
            "micro-batch, so only 1 is supported; raise train.batch_size or the number of ranks instead")
    expected = {
        "train_micro_batch_size_per_gpu": (micro_batch, "train.batch_size"),
        "train_batch_size": (micro_batch * world_size, f"train.batch_size x {world_size} ranks"),
        "gradient_accumulation_steps": (1, "the classifier's step"),
        "gradient_clipping": (clip_grad_norm, "optim.clip_grad_norm"),
    }
    for key, (value, source) in expected.items():
        if key in config and config[key] != value:
            raise ConfigError(f"deepspeed.{key} is {config[key]!r} but {source} gives {value!r}: set one of them")
        config[key] = value
    for half in ("fp16", "bf16"):
        if config.get(half, {}).get("enabled"):
            raise ConfigError(
                f"deepspeed.{half} casts the backbone's weights (BatchNorm included) to half precision and would "
                "need its loss scale in the classifier outside the engine; set train.precision: bf16 instead "
                "(autocast with fp32 master weights, as insightface's AMP)")
    # SGD is elementwise, so ZeRO's partitioning of its state is exact; DeepSpeed only lists Adam-likes as tested
    config.setdefault("zero_allow_untested_optimizer", True)
    config.setdefault("steps_per_print", 2**62)
    config.setdefault("wall_clock_breakdown", False)
    return config


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class LocalOptimiser:
    """One SGD over every trained parameter of one process, with fp16 loss scaling and clipping."""

    def __init__(self, optimizer: torch.optim.Optimizer, parameters: list[nn.Parameter], *, clip_grad_norm: float,
                 fp16: bool, device: torch.device) -> None:
        self.optimizer = optimizer
        self.parameters = parameters
        self.clip_grad_norm = clip_grad_norm
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16)

    def step(self, loss: torch.Tensor, lr: float) -> None:
        """Backward of ``loss``, clip, one optimiser step at learning rate ``lr``."""
        _set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.parameters, self.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])


class DeepSpeedOptimiser:
    """A DeepSpeed engine over the data-parallel modules, and an SGD over this rank's classifier shard."""

    def __init__(self, modules: nn.Module, classifier: nn.Module, *, build_sgd, config: dict[str, Any],
                 world: Any, clip_grad_norm: float) -> None:
        import deepspeed

        self.world = world
        self.classifier = classifier
        self.clip_grad_norm = clip_grad_norm
        parameters = [parameter for parameter in modules.parameters() if parameter.requires_grad]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=modules, model_parameters=parameters, optimizer=build_sgd(parameters), config=config,
            dist_init_required=False)
        self.classifier_optimizer = build_sgd(list(classifier.parameters()))

    def step(self, loss: torch.Tensor, lr: float) -> None:
        """Backward through the engine (which all-reduces the backbone's gradients), then both optimisers."""
        _set_lr(self.optimizer, lr)
        _set_lr(self.classifier_optimizer, lr)
        self.classifier_optimizer.zero_grad(set_to_none=True)
        self.engine.backward(loss)
        if self.clip_grad_norm > 0:
            self._clip_classifier()
        self.engine.step()
        self.classifier_optimizer.step()

    def _clip_classifier(self) -> None:
        """Clip the classifier's gradient by its norm over all shards (the engine clips its own parameters)."""
        grads = [p.grad for p in self.classifier.parameters() if p.grad is not None]
        square = torch.stack([grad.float().pow(2).sum() for grad in grads]).sum()
        self.world.all_reduce(square, "sum")
        scale = (self.clip_grad_norm / (square.sqrt() + 1e-6)).clamp(max=1.0)
        for grad in grads:
            grad.mul_(scale.to(grad.dtype))

    def save(self, folder: str | os.PathLike[str]) -> None:
        """DeepSpeed's own checkpoint of the engine (module and partitioned optimiser state) under ``folder``;
        every rank calls it."""
        self.engine.save_checkpoint(str(folder), tag="deepspeed", save_latest=False)

    def load(self, folder: str | os.PathLike[str], *, optimizer_states: bool) -> None:
        """Restore what :meth:`save` wrote; ``optimizer_states=False`` keeps only the module weights (a resume
        at another world size, whose ZeRO partitions differ, restarts the engine's optimiser state)."""
        self.engine.load_checkpoint(str(folder), tag="deepspeed", load_optimizer_states=optimizer_states,
                                    load_lr_scheduler_states=False, load_module_only=not optimizer_states)
