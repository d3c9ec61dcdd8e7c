"""Checkpoints written atomically, guarded by digests, read back safely (``facekd.distributed.checkpoint``).

A checkpoint is one folder per step in a run's ``checkpoints/`` folder::

    checkpoints/step_000000100/state.pt     the training state (tensors and plain containers)
    checkpoints/step_000000100/index.json   written last: step, and the size and sha256 of every file

The folder is assembled under a hidden temporary name (``.step_000000100.partial.<host>.<pid>``), every
file fsynced, the index written last, then renamed to its final name: a reader, or a job resumed after a
kill, sees either a whole checkpoint or none. A ``step_*`` folder without its index is incomplete and is
never loaded. Loading re-hashes every file against the index, so bytes damaged after the write (disk,
copy, tampering) are reported instead of loaded; the state is read with ``torch.load(weights_only=True)``,
so a tampered file cannot run code. The distributed trainer adds its per-rank files to the same folder,
under the same index.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any, Callable

import torch

from facekd.errors import CheckpointError

__all__ = [
    "checkpoint_path", "clean_partial_checkpoints", "latest_checkpoint", "latest_intact_checkpoint",
    "list_checkpoints", "load_checkpoint", "read_file", "save_checkpoint", "save_file", "verify_checkpoint",
    "write_checkpoint",
]

logger = logging.getLogger(__name__)

INDEX = "index.json"
STATE = "state.pt"
INDEX_FORMAT = 1
_NAME = re.compile(r"^step_(\d{9})$")
_PARTIAL = re.compile(r"^\.step_\d{9}\.partial\.(?P<host>[^.]+)\.(?P<pid>\d+)$")
_HASH_BLOCK = 1 << 22


def checkpoint_path(folder: str | os.PathLike[str], step: int) -> Path:
    """Where the checkpoint of ``step`` lives in ``folder``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return Path(folder) / f"step_{step:09d}"


def list_checkpoints(folder: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint (a step folder with its index) in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match and (path / INDEX).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(folder: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint of ``folder`` (not yet verified), or None."""
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    """Make ``path`` (a file, or a folder's entries) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_file(value: Any, path: Path) -> None:
    """``torch.save`` of ``value`` to ``path``, flushed to disk: the writer of one file inside a ``write_checkpoint``
    folder (:func:`read_file` reads it back)."""
    with open(path, "wb") as f:
        torch.save(value, f)
        f.flush()
        os.fsync(f.fileno())


def _index(partial: Path, step: int) -> dict[str, Any]:
    """The index of every file under ``partial`` (relative paths), hashed from the bytes on disk."""
    files = sorted(path for path in partial.rglob("*") if path.is_file())
    return {"format": INDEX_FORMAT, "step": step,
            "files": {path.relative_to(partial).as_posix(): {"size": path.stat().st_size, "sha256": _sha256(path)}
                      for path in files}}


def write_checkpoint(
    folder: str | os.PathLike[str], step: int, write: Callable[[Path], None], *, world: Any = None, keep: int = 2,
) -> Path:
    """Write the checkpoint of ``step`` atomically: ``write(partial_folder)`` puts this process's files in it.

    With ``world`` (a :class:`facekd.distributed.world.World` of several ranks) every rank calls this at the
    same step and writes its own files into the same partial folder (a shared file system); after a barrier
    rank 0 writes the index of all of them, renames the folder and deletes all but the ``keep`` newest, and a
    second barrier lets no rank run ahead of a checkpoint that is not yet complete. A rank killed in between
    leaves only a partial folder, which is never loaded: the previous checkpoint stays the newest.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    main = world is None or world.is_main
    final = checkpoint_path(folder, step)
    partial = final.parent / f".{final.name}.partial.{socket.gethostname().split('.')[0]}.{os.getpid()}"
    if main:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    if world is not None:
        partial = Path(world.broadcast_object(str(partial)))
    try:
        write(partial)
        if world is not None:
            world.barrier()
        if main:
            index = _index(partial, step)
            with open(partial / INDEX, "w") as f:  # written last: its presence marks the checkpoint whole
                json.dump(index, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            _fsync(partial)
            if final.exists():  # a damaged checkpoint of this step, skipped by the resume: replace it
                shutil.rmtree(final)
            os.replace(partial, final)
            _fsync(final.parent)
            for _, old in list_checkpoints(folder)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if main:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if world is not None:
        world.barrier()
    return final


def save_checkpoint(state: dict[str, Any], folder: str | os.PathLike[str], step: int, *, keep: int = 2) -> Path:
    """Write ``state`` as the checkpoint of ``step`` of one process atomically (see :func:`write_checkpoint`).

    ``state`` must hold only tensors, numbers, strings, and lists/tuples/dicts of them (what
    ``torch.load(weights_only=True)`` reads back).
    """
    return write_checkpoint(folder, step, lambda partial: save_file(state, partial / STATE), keep=keep)


def read_file(path: str | os.PathLike[str], map_location: str | torch.device = "cpu", *, mmap: bool = False) -> Any:
    """A file of a (verified) checkpoint, read with ``weights_only=True``; errors name the file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises several types for truncated, foreign or unsafe files
        raise CheckpointError(f"checkpoint file {path} cannot be read safely: {error}") from error


def verify_checkpoint(path: str | os.PathLike[str]) -> None:
    """Check every file of the checkpoint folder ``path`` against its index; CheckpointError names the damage."""
    path = Path(path)
    index_path = path / INDEX
    if not index_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {INDEX}): it was never finished")
    try:
        index = json.loads(index_path.read_text())
        files = index["files"]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {path}: {INDEX} is damaged ({error})") from None
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        size = file.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(f"checkpoint {path}: {name} is {size} bytes, its index says {expected['size']}")
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} is damaged (its sha256 differs from the index)")


def latest_intact_checkpoint(folder: str | os.PathLike[str]) -> Path | None:
    """The newest checkpoint of ``folder`` that passes :func:`verify_checkpoint`; damaged newer ones are
    reported (warning) and skipped. None when there is no intact one."""
    for step, path in reversed(list_checkpoints(folder)):
        try:
            verify_checkpoint(path)
        except CheckpointError as error:
            logger.warning("%s; falling back to an older checkpoint", error)
            continue
        return path
    return None


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu", *, verify: bool = True
) -> dict[str, Any]:
    """Verify and read a checkpoint folder (or the newest of a ``checkpoints/`` folder); errors name the file.

    The newest of a folder is taken as it is: if it is damaged this refuses, with the reason, rather than
    silently reading an older one (``facekd train --resume`` falls back on purpose, see
    :func:`latest_intact_checkpoint`). ``verify=False`` skips re-hashing a checkpoint just verified.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir() and not _NAME.match(path.name):
        newest = latest_checkpoint(path)
        if newest is None:
            raise CheckpointError(f"no complete checkpoint (step_*/{INDEX}) in {path}")
        path = newest
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a facekd checkpoint (a step_* folder holding {INDEX} and {STATE})")
    if verify:
        verify_checkpoint(path)
    state = read_file(path / STATE, map_location)
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path / STATE} should hold a dict, got {type(state).__name__}")
    return state


def clean_partial_checkpoints(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary folders that killed writers left in ``folder``; returns what was deleted.

    A partial folder is deleted only when it was written on this host by a process that no longer runs, so a
    checkpoint being written by a live process is never touched; ones from other hosts are left (and named).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    host = socket.gethostname().split(".")[0]
    removed = []
    for path in folder.iterdir():
        match = _PARTIAL.match(path.name)
        if not match:
            continue
        if match["host"] != host:
            logger.info("leaving %s: written on host %s, whose processes this host cannot see", path, match["host"])
            continue
        if _alive(int(match["pid"])):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        logger.info("removed %s, left by a writer that was killed", path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
