"""Checkpoints: atomic writes, rotation, newest-first resume, and safe loading of untrusted files."""
import os
import pickle

import pytest
import torch

from facekd.distributed.checkpoint import (
    checkpoint_path, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint,
)


def test_save_rotates_and_loads_back(tmp_path):
    for step in (2, 4, 6):
        save_checkpoint({"step": step, "w": torch.full((3,), float(step))}, tmp_path, step, keep=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 6]
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 6)
    state = load_checkpoint(tmp_path)
    assert state["step"] == 6 and torch.equal(state["w"], torch.full((3,), 6.0))
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".partial")]


def test_a_failed_write_leaves_the_previous_checkpoint_whole(tmp_path):
    save_checkpoint({"step": 1}, tmp_path, 1)

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"step": 2, "bad": Unsaveable()}, tmp_path, 2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [1]
    assert sorted(os.listdir(tmp_path)) == [checkpoint_path(tmp_path, 1).name]
    assert load_checkpoint(tmp_path)["step"] == 1


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_malicious_pickle_is_refused(tmp_path):
    path = checkpoint_path(tmp_path, 3)
    with open(path, "wb") as f:
        pickle.dump({"step": 3, "x": _Payload()}, f)
    with pytest.raises(ValueError, match="cannot be read safely"):
        load_checkpoint(path)


def test_truncated_and_missing_checkpoints(tmp_path):
    path = save_checkpoint({"w": torch.zeros(1000)}, tmp_path, 5)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=str(path)):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "empty_dir" if (tmp_path / "empty_dir").mkdir() is None else None)
    with pytest.raises(ValueError, match="step must be >= 0"):
        checkpoint_path(tmp_path, -1)
