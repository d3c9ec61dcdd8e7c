"""Ray Train as a launcher (``facekd.distributed.ray_launch``): who starts the ranks, not what they compute.

:func:`fit_on_ray` runs a training function on N Ray Train workers (``TorchTrainer``: Ray creates the process
group, NCCL with GPUs, gloo without, and sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, so
:meth:`~facekd.distributed.world.World.from_env` joins it as it joins torchrun's). Inside the function,
:func:`restored_checkpoint` is the checkpoint Ray restored (after a worker died, or when the same run name is
started again) and :func:`report_to_ray` hands each log step and checkpoint to ``ray.train.report``.

Ray Train V2 (the default of the Ray this project installs) has three rules this module keeps:

* every worker calls ``ray.train.report`` the same number of times (it is a barrier); only rank 0 passes the
  checkpoint folder, which holds every rank's part because the ranks write into one shared folder;
* Ray copies that folder (here: index last) into ``storage_path/name/<folder name>`` and restores the newest
  one it holds when the worker group restarts (``FailureConfig.max_failures``) or the run is started again
  under the same name: there is no other restore API;
* workers do not inherit the driver's environment: the variables they need (``DS_ACCELERATOR=cpu`` without
  GPUs, one OpenMP thread pool per reserved CPU) go in ``RunConfig.worker_runtime_env``, set before the
  worker imports anything.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from facekd.errors import ConfigError, TrainingError

__all__ = [
    "check_address", "fit_on_ray", "report_to_ray", "restored_checkpoint", "run_in_storage", "worker_environment",
]

logger = logging.getLogger(__name__)

# what a CPU or GPU worker needs from the environment of the command that started the run
FORWARDED_ENV = ("DS_ACCELERATOR", "TRITON_INTERPRET", "FACEKD_KERNELS", "NCCL_DEBUG", "NCCL_SOCKET_IFNAME",
                 "GLOO_SOCKET_IFNAME")


def worker_environment(use_gpu: bool) -> dict[str, str]:
    """The variables the workers get: those of :data:`FORWARDED_ENV` set here, and ``DS_ACCELERATOR=cpu``
    for CPU workers (DeepSpeed otherwise probes for CUDA and fails on a machine without it)."""
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    if not use_gpu:
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def run_in_storage(storage_path: str, name: str) -> bool:
    """Whether ``storage_path`` already holds a Ray Train run called ``name`` (so starting it resumes it)."""
    import pyarrow.fs

    filesystem, root = pyarrow.fs.FileSystem.from_uri(_uri(storage_path))
    info = filesystem.get_file_info(f"{root.rstrip('/')}/{name}")
    return info.type == pyarrow.fs.FileType.Directory


def _uri(storage_path: str) -> str:
    """``storage_path`` as pyarrow wants it: URIs as they are, local folders absolute."""
    return storage_path if "://" in storage_path else str(Path(storage_path).expanduser().resolve())


def fit_on_ray(
    train_loop: Callable[[dict[str, Any]], Any], loop_config: dict[str, Any], *, address: str | None, workers: int,
    cpus_per_worker: float, gpus_per_worker: float, storage_path: str, name: str, max_failures: int,
    num_to_keep: int, collective_timeout_s: int, env: dict[str, str],
) -> Any:
    """Run ``train_loop(loop_config)`` on ``workers`` Ray Train workers; returns Ray's ``Result``.

    ``address``: an existing cluster (``auto``, ``ray://HOST:10001``), None for a Ray instance started here.
    ``env``: the workers' variables (see :func:`worker_environment`). Raises TrainingError when the run failed
    after its ``max_failures`` restarts.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        # inside a Ray Job the driver joins its cluster, and the job's runtime_env reaches the workers
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    threads = {"OMP_NUM_THREADS": str(max(1, int(cpus_per_worker)))}  # one pool per reserved CPU, not per core
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    trainer = TorchTrainer(
        train_loop, train_loop_config=loop_config,
        torch_config=TorchConfig(timeout_s=collective_timeout_s),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=_uri(storage_path),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
                             worker_runtime_env={"env_vars": {**env, **threads}}),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        raise TrainingError(f"Ray Train run {name} failed (max_failures {max_failures}): {_cause(error)} "
                            "(the workers' tracebacks are above)") from None
    if result.error is not None:
        raise TrainingError(f"Ray Train run {name} failed: {_cause(result.error)}")
    return result


def _cause(error: BaseException) -> str:
    """The workers' own exception (``facekd.errors.CheckpointError: …``): the last exception line of the
    tracebacks Ray's error carries, else its first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b[^ ]*: ", line)]
    return raised[-1] if raised else (lines[0] if lines else type(error).__name__)


def restored_checkpoint(world: Any, shared_dir: Path) -> Path | None:
    """The checkpoint folder Ray restored for this worker group, readable by every rank; None for a fresh run.

    A checkpoint in a local or mounted storage path is read where it lies. One in an object store is
    downloaded once, by rank 0, into ``shared_dir`` (which every rank sees: the run's output folder), so that
    all ranks load the same bytes. ``world``: the :class:`~facekd.distributed.world.World` of the workers.
    """
    import pyarrow.fs
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return Path(checkpoint.path)
    target = Path(shared_dir) / "restored" / Path(checkpoint.path).name
    if world.is_main:
        shutil.rmtree(target, ignore_errors=True)  # a download a killed group left half done
        checkpoint.to_directory(str(target))
    world.barrier()
    return target


def report_to_ray(metrics: dict[str, float], checkpoint: Path | None) -> None:
    """The trainer's reporter under Ray Train: every rank reports (same count), rank 0 with the folder.

    The checkpoint keeps its folder name (``step_NNNNNNNNN``) in storage, so the storage path reads like the
    run's own ``checkpoints/``; rank 0's metrics are the ones Ray keeps with it.
    """
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    if checkpoint is None:
        ray.train.report(metrics)
        return
    handed = ray.train.Checkpoint.from_directory(str(checkpoint)) if rank == 0 else None
    ray.train.report(metrics, checkpoint=handed, checkpoint_dir_name=checkpoint.name,
                     checkpoint_upload_fn=_upload_index_last)
    if rank == 0:
        logger.info("checkpoint %s reported to Ray Train", checkpoint.name)


def _upload_index_last(checkpoint: Any, folder_name: str) -> Any:
    """Copy a checkpoint folder into the run's storage with its index last (Ray's own copy has no order).

    A worker killed mid-copy then leaves a folder without ``index.json``, which nothing loads (and which the
    next upload of that step replaces), as a killed writer does in ``checkpoints/``; Ray restores only
    checkpoints whose upload finished.
    """
    import pyarrow.fs
    import ray.train

    from facekd.distributed.checkpoint import INDEX

    storage = ray.train.get_context().get_storage()
    filesystem, target = storage.storage_filesystem, storage.build_checkpoint_path_from_name(folder_name)
    local = pyarrow.fs.LocalFileSystem()
    if filesystem.get_file_info(f"{target}/{INDEX}").type != pyarrow.fs.FileType.NotFound:
        filesystem.delete_file(f"{target}/{INDEX}")  # an earlier upload of this step: incomplete until rewritten
    source = Path(checkpoint.path)
    files = sorted(path for path in source.rglob("*") if path.is_file() and path != source / INDEX)
    for path in [*files, source / INDEX]:
        destination = f"{target}/{path.relative_to(source).as_posix()}"
        filesystem.create_dir(destination.rsplit("/", 1)[0], recursive=True)
        pyarrow.fs.copy_files(str(path), destination, source_filesystem=local, destination_filesystem=filesystem)
    return ray.train.Checkpoint(path=target, filesystem=filesystem)


def check_address(address: str | None) -> str | None:
    """``--address`` as Ray takes it, refusing the dashboard's http address (that one is for ``facekd submit``)."""
    if address is not None and address.startswith(("http://", "https://")):
        raise ConfigError(f"--address {address} is a dashboard (Job Submission) address: use it with "
                          "'facekd submit'; 'facekd train --ray' joins a cluster with auto or ray://HOST:10001")
    return address
