"""Checkpoints written atomically and read back safely (imported as ``facekd.distributed.checkpoint``).

A checkpoint is one ``step_XXXXXXXXX.pt`` file in a run's ``checkpoints/`` folder. It is written to a
hidden temporary name in the same folder, flushed and fsynced, then renamed over its final name: a
reader (or a resumed job after a kill) sees either the whole previous checkpoint set or the whole new
file, never a truncated one. Loading uses ``torch.load(weights_only=True)``: a checkpoint holds
tensors and plain Python containers only, so a tampered file cannot run code.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["checkpoint_path", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "save_checkpoint"]

_NAME = re.compile(r"^step_(\d{9})\.pt$")


def checkpoint_path(folder: str | os.PathLike[str], step: int) -> Path:
    """Where the checkpoint of ``step`` lives in ``folder``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return Path(folder) / f"step_{step:09d}.pt"


def list_checkpoints(folder: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in ``folder``, oldest first; [] when there is none."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(folder: str | os.PathLike[str]) -> Path | None:
    """The newest checkpoint of ``folder``, or None."""
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def save_checkpoint(state: dict[str, Any], folder: str | os.PathLike[str], step: int, *, keep: int = 2) -> Path:
    """Write ``state`` as the checkpoint of ``step`` atomically, then delete all but the ``keep`` newest.

    ``state`` must hold only tensors, numbers, strings, and lists/tuples/dicts of them (what
    ``torch.load(weights_only=True)`` reads back).
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    final = checkpoint_path(folder, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_name, final)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)
    for _, old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint (or a folder's newest) with ``weights_only=True``; errors name the file."""
    path = Path(path)
    if path.is_dir():
        newest = latest_checkpoint(path)
        if newest is None:
            raise FileNotFoundError(f"no checkpoint step_*.pt in {path}")
        path = newest
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise ValueError(f"checkpoint {path} cannot be read safely: {error}") from error
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} should hold a dict, got {type(state).__name__}")
    return state


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX: the directory entry lives in the folder)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
