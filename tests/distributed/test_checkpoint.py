"""Checkpoints: atomic folders, digests checked on load, rotation, partial-folder cleanup, safe loading."""
import hashlib
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from facekd.distributed.checkpoint import (
    checkpoint_path, clean_partial_checkpoints, latest_checkpoint, latest_intact_checkpoint, list_checkpoints,
    load_checkpoint, save_checkpoint, verify_checkpoint,
)
from facekd.errors import CheckpointError


def test_save_rotates_and_loads_back(tmp_path):
    for step in (2, 4, 6):
        save_checkpoint({"step": step, "w": torch.full((3,), float(step))}, tmp_path, step, keep=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 6]
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 6)
    state = load_checkpoint(tmp_path)
    assert state["step"] == 6 and torch.equal(state["w"], torch.full((3,), 6.0))
    assert sorted(os.listdir(tmp_path)) == ["step_000000004", "step_000000006"]
    index = json.loads((checkpoint_path(tmp_path, 6) / "index.json").read_text())
    assert index["step"] == 6 and set(index["files"]) == {"state.pt"}


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


def _damage(path, offset_from_end=200):
    """Overwrite bytes inside the tensor data of a checkpoint with other finite values (same size)."""
    state_file = path / "state.pt"
    data = bytearray(state_file.read_bytes())
    position = len(data) - offset_from_end
    data[position:position + 4] = torch.tensor([0.5]).numpy().tobytes()
    state_file.write_bytes(bytes(data))


def test_bytes_damaged_after_the_write_are_refused_with_the_reason(tmp_path):
    path = save_checkpoint({"w": torch.ones(4096)}, tmp_path, 3)
    _damage(path, offset_from_end=4096)
    # the damaged file still unpickles to finite weights: only the digest can tell
    raw = torch.load(path / "state.pt", weights_only=True)["w"]
    assert raw.isfinite().all() and not torch.equal(raw, torch.ones(4096))
    with pytest.raises(CheckpointError, match="state.pt is damaged"):
        verify_checkpoint(path)
    with pytest.raises(CheckpointError, match="state.pt is damaged"):
        load_checkpoint(tmp_path)


def test_the_newest_intact_checkpoint_is_found_past_a_damaged_one(tmp_path, caplog):
    for step in (1, 2):
        save_checkpoint({"w": torch.full((4096,), float(step))}, tmp_path, step)
    _damage(checkpoint_path(tmp_path, 2), offset_from_end=4096)
    assert latest_intact_checkpoint(tmp_path) == checkpoint_path(tmp_path, 1)
    assert "step_000000002: state.pt is damaged" in caplog.text
    # saving the damaged step again replaces it
    save_checkpoint({"w": torch.full((4096,), 2.0)}, tmp_path, 2)
    assert latest_intact_checkpoint(tmp_path) == checkpoint_path(tmp_path, 2)


def test_a_folder_without_its_index_is_incomplete_and_never_loaded(tmp_path):
    save_checkpoint({"step": 1}, tmp_path, 1)
    unfinished = checkpoint_path(tmp_path, 2)
    unfinished.mkdir()
    torch.save({"step": 2}, unfinished / "state.pt")
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 1)
    with pytest.raises(CheckpointError, match="is incomplete"):
        load_checkpoint(unfinished)


def test_partial_folders_of_dead_writers_are_cleaned_but_not_those_of_live_ones(tmp_path):
    host = os.uname().nodename.split(".")[0]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".step_000000005.partial.{host}.{dead_pid}"
    live = tmp_path / f".step_000000006.partial.{host}.{os.getpid()}"
    foreign = tmp_path / ".step_000000007.partial.otherhost.1"
    for folder in (stale, live, foreign):
        folder.mkdir()
        (folder / "state.pt").write_bytes(b"x" * 1000)
    assert clean_partial_checkpoints(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and foreign.exists()


class _Payload:
    def __init__(self, trace):
        self.trace = trace

    def __reduce__(self):
        return (os.system, (f"touch {self.trace}",))


def test_a_malicious_pickle_is_refused_without_running(tmp_path):
    trace = tmp_path / "payload_ran"
    # the payload works: plain pickle runs it
    pickle.loads(pickle.dumps(_Payload(trace)))
    assert trace.exists()
    trace.unlink()
    # a checkpoint whose state.pt carries it, with a valid index, is refused and the payload never runs
    path = save_checkpoint({"step": 3}, tmp_path, 3)
    (path / "state.pt").write_bytes(pickle.dumps({"step": 3, "x": _Payload(trace)}))
    index = json.loads((path / "index.json").read_text())
    index["files"]["state.pt"] = {"size": (path / "state.pt").stat().st_size,
                                  "sha256": hashlib.sha256((path / "state.pt").read_bytes()).hexdigest()}
    (path / "index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        load_checkpoint(path)
    assert not trace.exists()


def test_truncated_and_missing_checkpoints(tmp_path):
    path = save_checkpoint({"w": torch.zeros(1000)}, tmp_path, 5)
    (path / "state.pt").write_bytes((path / "state.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"state.pt is 100 bytes, its index says \d+"):
        load_checkpoint(path)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path / "empty_dir")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(ValueError, match="step must be >= 0"):
        checkpoint_path(tmp_path, -1)
