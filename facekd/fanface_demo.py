"""FAN-Face on synthetic faces, end to end: ``python -m facekd.fanface_demo [--out fanface_out]``.

synthetic identities (the demo's data) → shards; synthetic landmark faces → a small FAN trained on their 68
landmarks (its NME on unseen faces reported) → the same IResNet trained twice for the same steps from the same
seed, plain and as FAN-Face(H2, 1-1, BL, h2l-2) with that FAN frozen inside → both verified 10-fold on pairs of
held-out identities (``val.bin``, ``val_hard.bin``). ``results.json`` and the printed table hold both accuracies
(± the 10-fold std), the training images/s of both and the wall time.

The two recognition jobs are ``jobs/fanface/fanface_synthetic_plain.yaml`` and
``jobs/fanface/fanface_synthetic_h2_11_bl_h2l2.yaml``: :func:`comparison_jobs` writes exactly those for the default
``out`` (a test holds them equal), so either can be rerun with ``facekd train`` once this has made the data and the
FAN. Like the demo, the numbers come from procedurally drawn faces: they show that the pipeline runs and how the two
networks compare on this toy problem, not what FAN-Face does on real faces (thesis Table 3.1).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import yaml

from facekd.config import job_from_dict
from facekd.demo import prepare_synthetic_shards
from facekd.eval import evaluate_checkpoints, format_table

__all__ = ["COMPARISON", "comparison_jobs", "run_comparison"]

COMPARISON: dict[str, Any] = dict(
    synth=dict(num_identities=200, images_per_identity=24, num_val_identities=100, num_pairs=600, image_size=112),
    landmarks=dict(num_identities=200, images_per_identity=10, num_val_identities=40, val_images_per_identity=5,
                   image_size=112),
    fan=dict(width=32, stacks=2, depth=4, image_size=64, steps=1000, batch_size=32, lr=3e-3),
    frn=dict(backbone="iresnet18", width=0.25, embedding_dim=128, image_size=56, steps=200, batch_size=64),
)
"""Sizes of the default run, chosen to fit about ten minutes of a 2-core CPU: the demo's 4,800 training faces of
200 identities and 2 × 600 pairs of 100 others, stored at 112 px and trained at 56 px; a width-32 FAN (the released
one: 256) at 64 px input, trained on 2,000 landmark faces as ``jobs/fanface/fan_synthetic.yaml`` trains it (adaptive
wing loss with its loss map, σ = 1.5, Adam at 3e-3, no augmentation, 1,000 steps of 32); IResNet-18 × 1/4
recognition networks."""

# as the demo: the margin is milder than ArcFace's (s = 64, m = 0.5), which does not converge in a few hundred steps
# from scratch on 200 identities
_HEAD = dict(s=32.0, m2=0.3)
_OPTIM = dict(lr=0.1, warmup_steps=20, schedule="cosine")
_SEED = 0


def comparison_jobs(out: str | Path = "fanface_out", sizes: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The landmark job (``fan``) and the two recognition jobs (``plain``, ``h2_11_bl_h2l2``) under ``out``."""
    sizes = sizes or COMPARISON
    out = Path(out)
    fan, frn = sizes["fan"], sizes["frn"]
    jobs: dict[str, dict[str, Any]] = {
        "fan": dict(
            name="fan_synthetic_comparison", task="landmarks",
            landmarks=dict(manifest=str(out / "landmarks" / "manifest.json"), points="dense",
                           image_size=fan["image_size"], stacks=fan["stacks"], width=fan["width"], depth=fan["depth"],
                           sigma=1.5, loss="awing", awing_loss_map=10.0, optimizer="adam", augment=False,
                           num_workers=1),
            optim=dict(lr=fan["lr"], schedule="cosine", warmup_steps=min(20, fan["steps"] - 1), weight_decay=0.0,
                       momentum=0.9),
            train=dict(output_dir=str(out / "runs" / "fan"), steps=fan["steps"], batch_size=fan["batch_size"],
                       seed=_SEED, checkpoint_every=fan["steps"], log_every=20),
        )
    }
    for variant, fan_section in (("plain", None), ("h2_11_bl_h2l2", dict(
            weights=str(out / "runs" / "fan"), input_size=fan["image_size"], heatmaps="h2", features="1-1",
            source="h2l-2", layer="bl"))):
        model = dict(backbone=frn["backbone"], width=frn["width"], embedding_dim=frn["embedding_dim"])
        if fan_section is not None:
            model["fan"] = fan_section
        jobs[variant] = dict(
            name=f"fanface_synthetic_{variant}",
            data=dict(manifest=str(out / "shards"), image_size=frn["image_size"], num_workers=1, shuffle_buffer=1000),
            model=model, head=_HEAD, optim=_OPTIM,
            train=dict(output_dir=str(out / "runs" / variant), steps=frn["steps"], batch_size=frn["batch_size"],
                       seed=_SEED, checkpoint_every=frn["steps"], log_every=10),
        )
    return jobs


def run_comparison(out: str | Path = "fanface_out", *, sizes: dict[str, Any] | None = None, device: str = "auto",
                   fresh: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run the comparison in ``out`` (finished stages are reused unless ``fresh``); returns and writes
    ``out/results.json``: the FAN's NME, per network the verification rows and training images/s, the wall time."""
    from facekd.data.synth_landmarks import synthesize_landmarks
    from facekd.landmarks import LandmarkTrainer
    from facekd.train import Trainer

    sizes = sizes or COMPARISON
    out = Path(out).resolve()
    start = time.perf_counter()

    # synthetic identities and their shards (the demo's data), and synthetic landmark faces
    prepare_synthetic_shards(out, sizes["synth"], seed=_SEED, fresh=fresh, progress=progress)
    data = out / "data"
    if not (out / "landmarks" / "manifest.json").is_file():
        synthesize_landmarks(out / "landmarks", **sizes["landmarks"], seed=_SEED, overwrite=True,
                             show_progress=progress)

    # the FAN, then the two recognition networks: same steps, same seed, same data order
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    summaries: dict[str, dict[str, Any]] = {}
    jobs = comparison_jobs(out, sizes)
    for stage, spec in jobs.items():
        spec["train"]["device"] = device
        path = out / "jobs" / f"{stage}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        job = job_from_dict(spec, source=str(path))
        trainer = LandmarkTrainer(job, resume=True, progress=progress) if stage == "fan" else Trainer(
            job, resume=True, progress=progress)
        summaries[stage] = trainer.fit()

    # 10-fold verification of both on held-out identities
    variants = ["plain", "h2_11_bl_h2l2"]
    rows = evaluate_checkpoints([out / "runs" / v for v in variants], [data / "val.bin", data / "val_hard.bin"],
                                out_dir=out / "eval", device=device, progress=progress)
    results = {
        "fan": {key: value for key, value in summaries["fan"].items() if isinstance(value, (int, float, str))},
        "networks": {
            variant: {
                "job": jobs[variant]["name"],
                "steps": summaries[variant]["step"],
                "train_images_per_second": summaries[variant].get("images_per_second"),
                "verification": {row["dataset"]: {"accuracy": row["accuracy"], "std": row["std"]}
                                 for row in rows if row["model"] == jobs[variant]["name"]},
            }
            for variant in variants
        },
        "seconds": time.perf_counter() - start,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if progress:
        print("\nFAN-Face on synthetic faces (not face-recognition results):")
        for variant, result in results["networks"].items():
            speed = result["train_images_per_second"]
            print(f"  {result['job']:<34} {result['steps']:>4} steps  "
                  + (f"{speed:.0f} img/s" if speed else "reused"))
        print(format_table([{key: value for key, value in row.items() if key != "roc"} for row in rows]))
        print(f"wall time {results['seconds']:.0f} s; {out / 'results.json'}")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m facekd.fanface_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="fanface_out", help="folder for data, runs and results (default fanface_out)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--fresh", action="store_true", help="start over instead of reusing finished stages")
    args = parser.parse_args(argv)
    run_comparison(args.out, device=args.device, fresh=args.fresh)


if __name__ == "__main__":
    main()
