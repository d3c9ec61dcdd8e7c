"""Registry of kernel correctness cases: every Triton kernel against its plain-torch reference.

A kernel module registers its cases at import (a short section at the end of the file); whoever
imports every module of ``facekd.kernels`` then finds them all in :func:`all_cases`, so a new kernel
file that registers cases is checked without editing anything else. ``facekd bench gpu-suite`` runs
them on CUDA at realistic shapes, and on CPU in the Triton interpreter at tiny shapes (``--dry-run``).

One case is one function of the kernel, called twice on the same inputs:

* the kernel: ``compute(inputs)`` with ``FACEKD_KERNEL_BACKEND=triton``, inputs in the case's dtype;
* the reference: ``compute(inputs)`` with ``FACEKD_KERNEL_BACKEND=torch``, every floating-point
  input widened to float64 (the same rounded numbers, upcast exactly).

``compute`` returns named outputs (the loss per row and the gradients an incoming gradient that is
not 1 gives, say), and each output must agree with the reference's under the case's tolerance for
the input dtype: ``|got − expected| ≤ atol + atol_of_max·max|expected| + rtol·|expected|``,
elementwise, with the same non-finite entries. The tolerance tables live beside the kernels, next to
the accuracy their docstrings state; the unit tests of the kernels read the same numbers.

A new kernel file registers its cases at its end, e.g. for a kernel ``dynamic_group_conv``::

    from facekd.kernels import checks as _checks

    TOLERANCES = {torch.float32: _checks.Tolerance(rtol=1e-4, atol=1e-5), ...}  # what its tests use
    _checks.register(_checks.KernelCase(
        "dynamic_group_conv/forward_backward", make_inputs, compute, TOLERANCES,
        realistic={"B": 512, "C": 128, "H": 14, "experts": 4}, tiny={"B": 3, "C": 8, "H": 5, "experts": 2}))

with ``compute(inputs)`` calling the kernel's public function (which takes the path that
``FACEKD_KERNEL_BACKEND`` selects) and returning its outputs and gradients, typically through
:func:`loss_and_gradients`. ``facekd bench gpu-suite`` then checks it without further edits.

This module imports only torch (kernels ← distributed ← facekd).
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch

from facekd.kernels.backend import ENV_VAR

Inputs = dict[str, Any]  # tensors (floating-point ones are widened for the reference) and plain values
Shape = Mapping[str, int]


@dataclass(frozen=True)
class Tolerance:
    """Elementwise agreement of a kernel's output with the float64 reference's."""

    rtol: float  # relative to the reference entry
    atol: float = 0.0  # absolute
    atol_of_max: float = 0.0  # absolute, as a fraction of the largest |reference| entry of that output

    def allowed(self, expected: torch.Tensor) -> torch.Tensor:
        scale = expected.abs().max().item() if expected.numel() else 0.0
        return self.atol + self.atol_of_max * scale + self.rtol * expected.abs()

    def assert_close(self, got: torch.Tensor, expected: torch.Tensor, *, name: str = "") -> None:
        """``torch.testing.assert_close`` under this tolerance (what the kernels' unit tests call): the
        bound of :meth:`allowed`, with assert_close's checks of shape, dtype and non-finite entries."""
        scale = expected.abs().max().item() if expected.numel() else 0.0
        torch.testing.assert_close(got, expected, rtol=self.rtol, atol=self.atol + self.atol_of_max * scale,
                                   msg=(lambda message: f"{name}: {message}") if name else None)


@dataclass(frozen=True)
class KernelCase:
    """One function of one kernel, checked against its reference at two sizes and several dtypes."""

    name: str  # "<kernel>/<variant>", e.g. "margin_ce/exact"
    make_inputs: Callable[[Shape, torch.dtype, torch.device], Inputs]  # deterministic (fixed seed)
    compute: Callable[[Inputs], dict[str, torch.Tensor]]  # named outputs, on whichever backend is set
    tolerances: Mapping[torch.dtype, Tolerance]  # by input dtype; also the dtypes the case runs in
    realistic: Shape  # what a training run sees (GPU suite)
    tiny: Shape  # interpreter-sized, with odd sizes (dry run)


@dataclass(frozen=True)
class OutputCheck:
    """How one output of a case compared with the reference."""

    name: str
    passed: bool
    worst: float  # max over entries of |got − expected| / allowed (≤ 1 passes)
    max_abs_error: float
    max_abs_expected: float
    mismatched: int  # entries outside the tolerance (non-finite disagreements included)
    numel: int


_CASES: dict[str, KernelCase] = {}


def register(*cases: KernelCase) -> None:
    """Add cases to the registry (a kernel module calls this at import)."""
    for case in cases:
        known = _CASES.get(case.name)
        if known is not None and known.compute.__module__ != case.compute.__module__:
            raise ValueError(f"kernel case {case.name!r} is registered by {known.compute.__module__} already, "
                             f"and again by {case.compute.__module__}")
        if not case.tolerances:
            raise ValueError(f"kernel case {case.name!r} needs a tolerance for at least one dtype")
        _CASES[case.name] = case


def all_cases() -> list[KernelCase]:
    """Every registered case, in registration order."""
    return list(_CASES.values())


@contextlib.contextmanager
def kernel_backend(name: str) -> Iterator[None]:
    """Run the block with ``FACEKD_KERNEL_BACKEND=name`` (``triton``, ``torch`` or ``auto``)."""
    before = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = name
    try:
        yield
    finally:
        if before is None:
            del os.environ[ENV_VAR]
        else:
            os.environ[ENV_VAR] = before


def widen(inputs: Inputs, dtype: torch.dtype = torch.float64) -> Inputs:
    """``inputs`` with every floating-point tensor converted to ``dtype`` (other values kept)."""
    return {key: value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
            for key, value in inputs.items()}


def compare(name: str, got: torch.Tensor, expected: torch.Tensor, tolerance: Tolerance) -> OutputCheck:
    """``got`` against the reference's ``expected`` under ``tolerance`` (shapes must match)."""
    if got.shape != expected.shape:
        return OutputCheck(name, False, math.inf, math.inf, math.nan, got.numel(), expected.numel())
    got, expected = got.detach().double(), expected.detach().double()
    finite = torch.isfinite(expected)
    same_nonfinite = torch.where(finite, torch.isfinite(got), (got == expected) | (got.isnan() & expected.isnan()))
    error = torch.where(finite, (got - expected).abs(), 0.0)
    error = torch.where(torch.isfinite(error), error, math.inf)
    ratio = error / tolerance.allowed(torch.where(finite, expected, 0.0)).clamp_min(1e-300)
    bad = ~same_nonfinite | (ratio > 1.0)
    return OutputCheck(
        name=name,
        passed=not bool(bad.any()),
        worst=ratio.max().item() if ratio.numel() else 0.0,
        max_abs_error=error.max().item() if error.numel() else 0.0,
        max_abs_expected=expected[finite].abs().max().item() if bool(finite.any()) else math.nan,
        mismatched=int(bad.sum()),
        numel=got.numel(),
    )


def check_case(case: KernelCase, dtype: torch.dtype, device: torch.device, *, tiny: bool) -> list[OutputCheck]:
    """Run ``case`` on the Triton path and on the float64 reference; one check per output."""
    if dtype not in case.tolerances:
        raise ValueError(f"kernel case {case.name!r} has no tolerance for {dtype}; it has "
                         f"{sorted(map(str, case.tolerances))}")
    inputs = case.make_inputs(case.tiny if tiny else case.realistic, dtype, device)
    with kernel_backend("triton"):
        got = case.compute(inputs)
    with kernel_backend("torch"):
        expected = case.compute(widen(inputs))
    if set(got) != set(expected):
        raise ValueError(f"kernel case {case.name!r}: the kernel returned outputs {sorted(got)}, "
                         f"the reference {sorted(expected)}")
    return [compare(name, got[name], expected[name], case.tolerances[dtype]) for name in got]


# ---------------------------------------------------------------------------------------------
# Helpers the kernel modules build their cases from
# ---------------------------------------------------------------------------------------------


def generator(device: torch.device, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def incoming_gradient(batch: int, device: torch.device, rng: torch.Generator) -> torch.Tensor:
    """A per-row incoming gradient in [0.5, 1.5): not 1, so a backward that ignores it is caught."""
    return torch.rand(batch, device=device, generator=rng) + 0.5


def near_centres(batch: int, n_classes: int, dim: int, *, noise: float, device: torch.device,
                 rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(embeddings [B, D], centres [C, D], labels [B]) of a face head part-way through training:
    each embedding is its label's centre plus noise, cos ≈ 1/√(1 + noise²) to it (float32)."""
    labels = torch.randint(0, n_classes, (batch,), device=device, generator=rng)
    labels[0] = n_classes - 1  # the last class is a target: tiles that end mid-block are exercised
    centres = torch.randn(n_classes, dim, device=device, generator=rng)
    embeddings = centres[labels] + noise * torch.randn(batch, dim, device=device, generator=rng)
    return embeddings, centres, labels


def leaf(tensor: torch.Tensor) -> torch.Tensor:
    """A fresh copy of ``tensor`` that collects a gradient."""
    return tensor.detach().clone().requires_grad_(True)


def loss_and_gradients(rows: torch.Tensor, grad_rows: torch.Tensor, **leaves: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"loss": rows, "grad_<name>": ∂(Σ grad_rows·rows)/∂leaf} for each leaf."""
    gradients = torch.autograd.grad(rows, list(leaves.values()), grad_outputs=grad_rows.to(rows.dtype))
    return {"loss": rows.detach(), **{f"grad_{name}": g for name, g in zip(leaves, gradients)}}


# ---------------------------------------------------------------------------------------------
# Ranks simulated by threads of one process, for the all_reduce callbacks of the sharded kernels
# ---------------------------------------------------------------------------------------------
#
# ``run_ranks(world, body)`` runs ``body(rank, all_reduce)`` on ``world`` threads and returns their
# results by rank. ``all_reduce(tensor, op)`` ("sum" or "max", in place) meets the other ranks at a
# barrier and reduces their tensors in rank order, so every rank gets the same bits, as a real
# collective does. One rank computes at a time (a baton passed at each all-reduce): neither torch
# autograd nor the Triton interpreter has to be thread-safe.

_TIMEOUT_S = 300


class SimulatedGroup:
    """The state the ranks of one :func:`run_ranks` share."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=_TIMEOUT_S)
        self.baton = threading.Lock()
        self.slots: list[torch.Tensor | None] = [None] * world
        self.calls = [0] * world  # all-reduces each rank has made

    def all_reduce(self, rank: int) -> Callable[[torch.Tensor, str], None]:
        def all_reduce(tensor: torch.Tensor, op: str) -> None:
            if op not in ("sum", "max"):
                raise ValueError(f"op must be 'sum' or 'max', got {op!r}")
            self.calls[rank] += 1
            self.slots[rank] = tensor.detach().clone()
            self.baton.release()
            try:
                self.barrier.wait()
                shapes = {tuple(slot.shape) for slot in self.slots}
                if len(shapes) != 1:
                    raise ValueError(f"ranks all-reduced tensors of different shapes: {shapes}")
                result = self.slots[0].clone()
                for slot in self.slots[1:]:
                    result = result + slot if op == "sum" else torch.maximum(result, slot)
                self.barrier.wait()  # nobody overwrites a slot before every rank has read them
            finally:
                self.baton.acquire()
            with torch.no_grad():
                tensor.copy_(result)
        return all_reduce


def run_ranks(world: int, body: Callable[[int, Callable[[torch.Tensor, str], None]], object],
              group: SimulatedGroup | None = None) -> list:
    """``[body(rank, all_reduce) for rank in range(world)]``, the ranks running together.

    An exception on any rank breaks the barrier for the others and is raised here.
    """
    group = SimulatedGroup(world) if group is None else group
    results: list = [None] * world
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        group.baton.acquire()
        try:
            results[rank] = body(rank, group.all_reduce(rank))
        except BaseException as error:  # noqa: BLE001  (handed to the caller below)
            errors.append(error)
            group.barrier.abort()
        finally:
            group.baton.release()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(_TIMEOUT_S)
    if errors:
        # the first failure is the cause; the others are ranks left at a broken barrier
        causes = [error for error in errors if not isinstance(error, threading.BrokenBarrierError)]
        raise (causes or errors)[0]
    return results


def class_bounds(num_classes: int, world: int) -> list[tuple[int, int]]:
    """Contiguous class ranges of ``world`` ranks, the first ones a class larger when C does not
    divide (as torch.tensor_split)."""
    sizes = [len(part) for part in torch.arange(num_classes).tensor_split(world)]
    starts = [sum(sizes[:rank]) for rank in range(world)]
    return [(start, start + size) for start, size in zip(starts, sizes)]
