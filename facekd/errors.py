"""The errors a user can cause: bad settings, data, files or environment.

Every layer raises one of these where it detects such a problem, with a one-line message that names
the key, file, shard, image or step at fault. The command line prints them as ``facekd: error: …``
and exits with status 2 (``--debug`` shows the traceback); any other exception is a bug and keeps
its traceback. They derive from ValueError / RuntimeError so that callers written against those
types keep working.

This module imports nothing, so ``facekd.distributed`` may raise these without depending on the
rest of ``facekd``. ``facekd.kernels`` stays torch/triton-only and raises ValueError / TypeError for
bad tensors; the layers above check user data before it reaches a kernel.
"""
from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "DataError", "FacekdError", "TrainingError"]


class FacekdError(Exception):
    """A problem with the user's input or environment (not a bug of facekd)."""


class ConfigError(FacekdError, ValueError):
    """A job spec, override or option that cannot be used as written."""


class DataError(FacekdError, ValueError):
    """Shards, manifests, images, labels or verification files that are missing, damaged or invalid."""


class CheckpointError(FacekdError, ValueError):
    """A checkpoint that is missing, damaged, unsafe, or written for another job."""


class TrainingError(FacekdError, RuntimeError):
    """Training cannot go on: a non-finite loss or weights (the message names the step and last good checkpoint)."""
