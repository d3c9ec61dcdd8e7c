"""``facekd demo``: the whole pipeline on synthetic identities, sized for a 2-core CPU in under 10 minutes.

synthetic identities (RecordIO + image folder + .bin pairs) → WebDataset shards → an IResNet-50 teacher
trained with a margin head → MobileFaceNet students trained without distillation, with Hinton KD and with
GKD from that teacher → 10-fold verification of all four on held-out identities (the evaluation suite of
``facekd eval --bins``: one table, networks as rows, sets as columns) → ROC plots and ``report.html``
(:mod:`facekd.report`: job specs, training curves, evaluation, side by side).

The job specs are written to ``<out>/jobs/`` as YAML, so every stage can be rerun by hand with
``facekd train``. Re-running the demo reuses finished stages (data, shards, trained networks);
``fresh`` starts over. The numbers are measured on synthetic faces: they show that the pipeline
learns and how the methods compare on this toy problem, not face-recognition accuracy.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from facekd.config import job_from_dict
from facekd.data.convert import convert_to_shards
from facekd.data.synth import synthesize
from facekd.evaluation.suite import evaluate_suite, format_suite_table
from facekd.report import build_report
from facekd.train import Trainer

__all__ = ["DEMO_SYNTH", "demo_jobs", "run_demo"]

logger = logging.getLogger(__name__)

DEMO_SYNTH = dict(num_identities=200, images_per_identity=24, num_val_identities=100, num_pairs=600, image_size=112)
"""The synthetic data set: 4,800 training images of 200 identities, 2 × 600 pairs of 100 others."""

# Shared by every network of the demo. Images are stored at 112 px and trained at 56 px: a quarter of
# the pixels keeps the CPU run short. The margin is milder than ArcFace's (s = 64, m = 0.5), which
# does not converge in a few hundred steps from scratch on 200 identities.
_DATA = dict(image_size=56, num_workers=1, shuffle_buffer=1000)
_HEAD = dict(s=32.0, m2=0.3)
_OPTIM = dict(lr=0.1, warmup_steps=20, schedule="cosine")
_TEACHER_STEPS, _STUDENT_STEPS, _BATCH = 300, 200, 64
# KD and GKD both soften at T = 4, as the GKD authors' code does, so that the two compare at one
# temperature; GKD keeps the paper's τ = 0.93, λ1 = 8, λ2 = 1. At the paper's T = 1 the 8× Primary-KD
# of this weak 200-identity teacher overwhelms the labels (61% on val measured, below the student
# without distillation).
STUDENTS = {
    "student_none": {},
    "student_kd": dict(methods={"kd": 1.0}, kd=dict(temperature=4.0)),
    "student_gkd": dict(methods={"gkd": 1.0}, gkd=dict(temperature=4.0)),
}


def demo_jobs(out: Path) -> dict[str, dict[str, Any]]:
    """The demo's job specs (teacher first), as the nested dicts written to ``out/jobs/*.yaml``."""
    manifest = str(out / "shards")
    jobs = {
        "teacher": dict(
            name="teacher_iresnet50",
            data=dict(manifest=manifest, **_DATA),
            model=dict(backbone="iresnet50", width=0.25, embedding_dim=128),
            head=_HEAD, optim=_OPTIM,
            train=dict(output_dir=str(out / "runs" / "teacher"), steps=_TEACHER_STEPS, batch_size=_BATCH,
                       checkpoint_every=100, log_every=10),
        )
    }
    for name, distill in STUDENTS.items():
        if distill:
            distill = dict(distill, teacher=str(out / "runs" / "teacher"))
        jobs[name] = dict(
            name=f"mobilefacenet_{name.removeprefix('student_')}",
            data=dict(manifest=manifest, **_DATA),
            model=dict(backbone="mobilefacenet", width=0.5, embedding_dim=128),
            head=_HEAD, optim=_OPTIM, distill=distill,
            train=dict(output_dir=str(out / "runs" / name), steps=_STUDENT_STEPS, batch_size=_BATCH,
                       checkpoint_every=100, log_every=10),
        )
    return jobs


def prepare_synthetic_shards(out: Path, sizes: dict[str, Any], *, seed: int = 0, fresh: bool = False,
                             progress: bool = True) -> Path:
    """The working folder of a synthetic run (emptied first when ``fresh``): synthetic identities of ``sizes`` (the
    keywords of :func:`facekd.data.synth.synthesize`) in ``out/data``, in the formats users arrive with, and their
    WebDataset shards in ``out/shards``; finished stages are reused. Returns ``out/shards``."""
    if fresh and out.exists():
        shutil.rmtree(out)
    data = out / "data"
    if not (data / "synth.json").is_file():
        synthesize(data, **sizes, seed=seed, overwrite=True, show_progress=progress)
    # RecordIO → WebDataset shards (resumable: finished shards are kept)
    convert_to_shards(data / "rec", out / "shards", shard_size=1000, seed=seed, show_progress=progress)
    return out / "shards"


def run_demo(out: str | Path = "demo_out", *, device: str = "auto", fresh: bool = False) -> list[dict[str, Any]]:
    """Run the demo in ``out``; prints and returns the verification rows (see module docstring)."""
    out = Path(out).resolve()
    start = time.perf_counter()
    prepare_synthetic_shards(out, DEMO_SYNTH, fresh=fresh)
    data = out / "data"

    # job specs, written where a user can rerun them
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    training = []
    for stage, spec in demo_jobs(out).items():
        spec["train"]["device"] = device
        path = out / "jobs" / f"{stage}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        job = job_from_dict(spec, source=str(path))
        summary = Trainer(job, resume=True).fit()
        training.append(summary)

    # verification of every network on held-out identities, one table across the networks
    runs = [out / "runs" / stage for stage in demo_jobs(out)]
    rows = evaluate_suite(runs, [data / "val.bin", data / "val_hard.bin"], out_dir=out / "eval", device=device)

    # one page with every run's spec, curves and evaluation, side by side
    report = build_report(runs, out=out / "report.html", eval_dirs=[out / "eval"], title="facekd demo")
    seconds = time.perf_counter() - start

    print("\nTraining (synthetic identities; images/s of this run's steps):")
    for summary in training:
        speed = f"{summary['images_per_second']:.0f} img/s" if summary["steps_run"] else "reused"
        print(f"  {summary['name']:<24} {summary['step']:>4} steps  {speed}")
    print("\nVerification, 10-fold (synthetic identities, not face-recognition results):")
    print(format_suite_table(rows))
    raw = json.loads((data / "synth.json").read_text())["raw_pixel_baseline"]
    print("raw-pixel cosine baseline: " + ", ".join(
        f"{name} {100 * value['best_threshold_accuracy']:.2f}%" for name, value in raw.items()))
    print(f"ROC plots: {out / 'eval' / 'roc_val.png'}, roc_val_hard.png   results: {out / 'eval' / 'results.json'}")
    print(f"report: {report}")
    print(f"demo wall time: {seconds:.0f} s")
    return rows
