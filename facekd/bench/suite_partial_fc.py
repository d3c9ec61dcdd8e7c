"""Item 6 of the GPU suite: the sharded classifier's step at million-identity scale (``facekd bench partial-fc``).

One GPU plays one rank: it holds its shard of the student's and the frozen teacher's centres, takes a gathered
batch of 1,024 embeddings (8 GPUs × 128, insightface's partial-FC setting), trains the student shard with the
margin loss over a 10 % sample and grouped KD over all of its classes, and steps SGD with momentum. Two
configurations: all of WebFace42M's 2,059,906 identities on the one GPU, and one rank's share of insightface's
stated ceiling (29M identities over 8 GPUs: 3,625,000 per GPU). The collectives of a real multi-GPU job move
per-row statistics (a few floats per sample) and are not in these figures; nor is the backbone.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from facekd.bench import partial_fc

# (label, classes on this GPU, gathered batch)
GPU_CONFIGS = (("WebFace42M on one GPU", 2_059_906, 1024), ("29M / 8 GPUs, one rank", 3_625_000, 1024))
DRY_RUN_CONFIGS = (("tiny", 2_003, 8),)
FIRST_CONFIG_S = 60.0  # start-up of the rank process and a few steps at 2M classes, before anything was measured


def partial_fc_item(suite, deadline) -> dict:
    """Samples/s and peak memory of each configuration, beside the accounting (rows of partial_fc.json)."""
    configs = DRY_RUN_CONFIGS if suite.dry_run else GPU_CONFIGS
    rows, notes = [], []
    # the benchmark's own files stay out of the suite's folder (what comes back from a lent GPU is counted)
    with tempfile.TemporaryDirectory(prefix="facekd-gpu-suite-pfc-") as out:
        for label, classes, batch in configs:
            rows += _measure(suite, deadline, label, classes, batch, Path(out), notes)
    return {"rows": rows, "notes": notes}


def _measure(suite, deadline, label: str, classes: int, batch: int, out: Path, notes: list[str]) -> list[dict]:
    """One configuration's rows, or none with a note when it does not fit the time left."""
    if not suite.dry_run and not deadline.allows(FIRST_CONFIG_S):
        notes.append(f"{label}: skipped, {deadline.left():.0f} s left of the item's share")
        return []
    parser = argparse.ArgumentParser()
    partial_fc.add_arguments(parser)
    args = parser.parse_args(["--device", suite.device.torch_device.type, "--nproc", "1", "--classes", str(classes),
                              "--batch", str(batch), "--sample-rate", "0.1", "--teacher", "on",
                              "--steps", "1" if suite.dry_run else "5", "--warmup", "1", "--out", str(out)])
    paths = partial_fc.run(args, timeout_s=600.0 if suite.dry_run else max(deadline.left(), 1.0))
    measured = json.loads(Path(paths["json"]).read_text())["rows"]
    return [{"config": label, **row} for row in measured if row["C"] == classes and row["B"] == batch]
