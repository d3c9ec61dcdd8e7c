"""Backend switch, and the argument checks, shared by every kernel of ``facekd.kernels``.

``FACEKD_KERNEL_BACKEND`` chooses how a kernel runs:

* ``auto`` (default): the Triton kernel for CUDA tensors, the plain-torch reference otherwise;
* ``triton``: always the Triton kernel. With ``TRITON_INTERPRET=1`` it runs on CPU tensors, which
  is how CI tests the kernels without a GPU;
* ``torch``: always the plain-torch reference.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "FACEKD_KERNEL_BACKEND"


def requested_backend() -> str:
    """The backend named by ``FACEKD_KERNEL_BACKEND``, validated."""
    backend = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {backend!r}")
    return backend


def triton_interpreted() -> bool:
    """True when Triton kernels execute in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether a kernel called on ``tensors`` should take its Triton path.

    ``auto`` picks Triton only when every tensor lives on a CUDA device. ``triton`` insists on it:
    CPU tensors then need the interpreter, and asking for Triton on CPU without it is an error
    rather than a silent fall-back to the reference.
    """
    backend = requested_backend()
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return on_cuda
    if not on_cuda and not triton_interpreted():
        raise RuntimeError(
            f"{ENV_VAR}=triton with CPU tensors needs TRITON_INTERPRET=1 "
            "(Triton compiles for CUDA devices only)"
        )
    return True


def check_nonempty(what: str, **tensors: torch.Tensor) -> None:
    """Refuse tensors with an empty dimension, e.g. an empty batch: a mean over it is NaN and a kernel
    grid over it has no programs. ``what`` says what each needs ("one row and one class")."""
    if any(0 in tensor.shape for tensor in tensors.values()):
        shapes = " and ".join(f"{name} {tuple(tensor.shape)}" for name, tensor in tensors.items())
        raise ValueError(f"need at least {what}, got {shapes}")


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the plain-torch references compute in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Switch off any enclosing autocast on ``device``'s type for the block.

    The plain-torch references upcast to :func:`reference_dtype`; inside a bf16/fp16 autocast (the
    trainer's) their matrix products would still run in bf16/fp16, and at s = 64 bf16 logits above 32
    are rounded to steps of 0.25. The Triton kernels accumulate in fp32 whatever encloses them; this
    gives the references the same. Device types without autocast (meta) need nothing.
    """
    if not torch.amp.is_autocast_available(device.type):
        yield
        return
    with torch.autocast(device.type, enabled=False):
        yield
