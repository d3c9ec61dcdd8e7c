"""Training on a Ray cluster: ``facekd train JOB --ray`` (the driver) and what each Ray Train worker runs.

Each worker is one rank of the same :class:`~facekd.train.Trainer` torchrun starts: Ray creates the process
group, :meth:`World.from_env <facekd.distributed.world.World.from_env>` joins it, and the trainer writes its
checkpoints into ``train.output_dir/checkpoints/`` as under any launcher. Ray Train adds two things: each
checkpoint is also reported to it (copied into ``ray.storage_path/ray.name``), and when a worker dies the
group restarts from the newest reported checkpoint (up to ``ray.max_failures`` times). Starting the same job
again (same name and storage path) continues the run the same way.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from facekd.config import JobConfig, job_from_dict, job_to_dict
from facekd.errors import ConfigError

__all__ = ["check_before_launch", "ray_settings", "storage_of", "submit_to_ray", "train_on_ray"]

logger = logging.getLogger(__name__)

# keys of a job spec naming local files: made absolute by the driver, since workers may start elsewhere
_PATHS = (("data", "manifest"), ("data", "base_url"), ("data", "unlabeled_manifest"), ("model", "init_from"),
          ("distill", "teacher"), ("train", "output_dir"))


def ray_settings(job: JobConfig, **flags: Any) -> JobConfig:
    """``job`` with its ray section overridden by the command line's flags (None: not given), checked as the
    spec's own keys are."""
    spec = job_to_dict(job)
    spec["ray"].update({key: value for key, value in flags.items() if value is not None})
    return job_from_dict(spec, source="the job spec with the command line's ray flags")


def storage_of(job: JobConfig) -> tuple[str, str]:
    """(storage path, run name) of the job's Ray Train run, defaults filled in (see :class:`RayConfig`)."""
    storage = job.ray.storage_path or str(Path(job.train.output_dir).expanduser().resolve() / "ray")
    return storage, job.ray.name or job.name


def check_before_launch(job: JobConfig, world_size: int, gpus_per_rank: float | None = None) -> None:
    """What would otherwise fail only once ``world_size`` ranks started: shards too few for their streams, and
    (``gpus_per_rank`` given: Ray reserves the devices) GPU training on ranks given no GPU."""
    from facekd.data.convert import read_manifest
    from facekd.data.loader import check_enough_shards

    if job.train.device == "cuda" and gpus_per_rank == 0:
        raise ConfigError("train.device is cuda but ray.gpus_per_worker is 0: Ray would give the workers no GPU; "
                          "pass --gpus-per-worker 1")

    manifest, folder = read_manifest(job.data.manifest)
    check_enough_shards([shard["num_samples"] for shard in manifest["shards"]], world_size=world_size,
                        num_workers=job.data.num_workers, resampled=job.data.resampled,
                        source=str(folder / "manifest.json"))


def train_on_ray(job: JobConfig, *, address: str | None = None, resume: bool = False) -> dict[str, Any]:
    """Run ``job`` on ``job.ray.workers`` Ray Train workers; returns a summary of the run.

    A run already in the storage path continues from its newest checkpoint. A run that is not, in a
    ``train.output_dir`` that holds checkpoints of another run, is refused unless ``resume`` (as
    ``facekd train`` refuses it without ``--resume``).
    """
    from facekd.distributed.checkpoint import list_checkpoints
    from facekd.distributed.ray_launch import fit_on_ray, run_in_storage, worker_environment
    from facekd.distributed.world import COLLECTIVE_TIMEOUT

    settings = job.ray
    check_before_launch(job, settings.workers, settings.gpus_per_worker)
    storage, name = storage_of(job)
    found = list_checkpoints(Path(job.train.output_dir) / "checkpoints")
    if found and not resume and not run_in_storage(storage, name):
        raise ConfigError(
            f"{job.train.output_dir}/checkpoints already holds checkpoints (newest {found[-1][1].name}) but Ray "
            f"storage {storage} has no run {name}: pass --resume to continue from them, or choose another "
            "train.output_dir"
        )
    result = fit_on_ray(
        _train_worker, {"job": _absolute_paths(job_to_dict(job))}, address=address, workers=settings.workers,
        cpus_per_worker=settings.cpus_per_worker, gpus_per_worker=settings.gpus_per_worker, storage_path=storage,
        name=name, max_failures=settings.max_failures,
        num_to_keep=settings.num_to_keep or job.train.keep_checkpoints,
        collective_timeout_s=int(COLLECTIVE_TIMEOUT.total_seconds()),
        env=worker_environment(settings.gpus_per_worker > 0),
    )
    metrics = dict(result.metrics or {})
    return {"name": job.name, "step": metrics.get("step"), "metrics": metrics, "workers": settings.workers,
            "checkpoint": result.checkpoint.path if result.checkpoint else None, "storage": result.path}


def submit_to_ray(job_file: Path, job: JobConfig, *, address: str | None, train_args: list[str]) -> tuple[Any, str]:
    """Submit ``facekd train JOB --ray --address auto TRAIN_ARGS`` as a Ray Job; returns (client, job id).

    The job spec and this copy of facekd travel in the job's ``runtime_env`` (its ``working_dir``), so the
    cluster needs facekd's dependencies but not facekd itself. The paths in the spec are read on the
    cluster: they must be absolute and the same on every node (a shared file system, or URLs).
    """
    import shlex
    import tempfile

    from facekd.distributed.ray_jobs import connect, submit

    spec = job_to_dict(job)
    relative = [f"{section}.{key}" for section, key in _PATHS
                if isinstance(spec[section].get(key), str) and _is_relative(spec[section][key])]
    relative += [f"eval.bins[{i}]" for i, path in enumerate(spec["eval"]["bins"]) if _is_relative(path)]
    if relative:
        raise ConfigError(f"{job_file}: {', '.join(relative)} {'is' if len(relative) == 1 else 'are'} relative, but a "
                          "submitted job runs in a copy of the project on the cluster: give absolute paths that every "
                          "node sees (a shared file system) or URLs")
    client = connect(address)
    with tempfile.TemporaryDirectory(prefix="facekd_submit_") as staging:
        working_dir = Path(staging)
        _copy_project(working_dir)
        (working_dir / job_file.name).write_bytes(job_file.read_bytes())
        command = ["python", "-m", "facekd", "train", job_file.name, "--ray", "--address", "auto", *train_args]
        env = {"DS_ACCELERATOR": "cpu"} if job.ray.gpus_per_worker == 0 else {}
        job_id = submit(client, shlex.join(command), working_dir=working_dir, env_vars=env,
                        metadata={"facekd_job": job.name})
    return client, job_id


def _is_relative(path: str) -> bool:
    return "://" not in path and not path.startswith("pipe:") and not Path(path).expanduser().is_absolute()


def _copy_project(folder: Path) -> None:
    """This facekd as one package under ``folder``: ``facekd/`` with ``kernels/`` and ``distributed/`` inside it,
    as setup.py maps them (what the cluster imports ahead of any facekd installed there)."""
    import importlib.util
    import shutil

    def source(name: str) -> Path:
        return Path(next(iter(importlib.util.find_spec(name).submodule_search_locations)))

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(source("facekd"), folder / "facekd", ignore=ignore)
    for part in ("kernels", "distributed"):
        target = folder / "facekd" / part
        if not target.exists():  # an installed (not editable) facekd already holds them
            shutil.copytree(source(f"facekd.{part}"), target, ignore=ignore)


def _absolute_paths(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with its local relative paths resolved against this (the driver's) working folder."""
    for section, key in _PATHS:
        value = spec[section].get(key)
        if isinstance(value, str) and _is_relative(value):
            spec[section][key] = str(Path(value).expanduser().resolve())
    spec["eval"]["bins"] = [str(Path(path).expanduser().resolve()) if _is_relative(path) else path
                            for path in spec["eval"]["bins"]]
    return spec


def _train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: a rank of the job, restored from the checkpoint Ray holds, reporting to Ray."""
    import ray.train
    import torch

    from facekd.distributed.checkpoint import clean_partial_checkpoints
    from facekd.distributed.ray_launch import report_to_ray, restored_checkpoint
    from facekd.distributed.world import World
    from facekd.train import Trainer

    main = ray.train.get_context().get_world_rank() == 0
    logging.basicConfig(level=logging.INFO if main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    job = job_from_dict(config["job"], source="the job spec sent to the Ray workers")
    # join the group Ray started; one torch thread pool per reserved CPU
    world = World.from_env(job.train.device)
    torch.set_num_threads(max(1, int(job.ray.cpus_per_worker)))
    # checkpoints a killed group left half-written are never loaded; remove them (their writers are gone)
    if world.is_main:
        clean_partial_checkpoints(Path(job.train.output_dir) / "checkpoints")
    folder = restored_checkpoint(world, Path(job.train.output_dir))
    if folder is not None and world.is_main:
        logger.info("%s: Ray Train restored %s", job.name, folder)

    def report(metrics: dict[str, float], checkpoint: Path | None) -> None:
        if main and "loss_label" in metrics:
            logger.info("%s step %d: loss %.4f, distill %.4f, lr %.5f, %.1f images/s", job.name, metrics["step"],
                        metrics["loss_label"], metrics["loss_distill"], metrics["lr"], metrics["images_per_second"])
        report_to_ray(metrics, checkpoint)

    # resume=True: a group restarted before its first report continues from the checkpoints it wrote
    Trainer(job, resume=True, world=world, resume_from=folder, reporter=report, progress=False).fit()

