"""Sharded training equals one process: loss and gradients of one real trainer step on 2 and 3 gloo ranks
(DeepSpeed ZeRO-1 engine, classifiers sharded with C not divisible by W and labels on every shard border)
against the same step in one process with the whole classifiers (tests/distributed/equivalence.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from facekd.distributed.world import World

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import equivalence  # noqa: E402

CASES = list(equivalence.CASES)


@pytest.fixture(scope="module")
def reference():
    return {case: equivalence.step(World.single(torch.device("cpu")), case) for case in CASES}


def free_port():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch(world_size, out):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world_size}", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", str(HERE / "equivalence.py"), str(out), *CASES]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out / f"rank_{rank}.pt", weights_only=True) for rank in range(world_size)]


def _assert_close(got, expected, what):
    """fp32 agreement relative to the tensor's largest entry (sums over a batch split differently round
    differently; a wrong scale or a missing share is off by far more)."""
    assert got.shape == expected.shape, what
    error = (got - expected).abs().max().item()
    assert error <= 1e-4 * expected.abs().max().item() + 1e-9, f"{what}: max error {error}"


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_step_equals_the_single_process_step(world_size, reference, tmp_path):
    ranks = _launch(world_size, tmp_path)
    for case in CASES:
        expected = reference[case]
        # the margin loss and the logit terms are computed once for the global batch: the same on every rank;
        # per-sample terms (SRRL) are each rank's mean, whose average is the global mean
        for rank in ranks:
            assert rank[case]["label"] == pytest.approx(expected["label"], rel=1e-5), case
        distill = sum(rank[case]["distill"] for rank in ranks) / world_size
        assert distill == pytest.approx(expected["distill"], rel=1e-5, abs=1e-7), case
        # backbone and adapters: DeepSpeed's averaged gradient equals the whole batch's (the all-gather's
        # backward scales by W against that average)
        for name, change in expected["changes"].items():
            for rank in ranks:
                _assert_close(rank[case]["changes"][name], change, f"{case} {name}")
        # each rank's centres moved exactly as their rows of the whole classifier did
        rows = torch.cat([rank[case]["head_change"] for rank in ranks])
        assert [rank[case]["head_offset"] for rank in ranks] == sorted(rank[case]["head_offset"] for rank in ranks)
        _assert_close(rows, expected["head_change"], f"{case} centres")
        assert expected["head_change"].abs().max() > 0 and max(c.abs().max() for c in expected["changes"].values()) > 0
