"""Ray Jobs (``facekd.distributed.ray_jobs``): a command submitted to a cluster's Job Submission server, its
logs followed, its status read, the cluster's jobs listed and stopped — what ``ray job ...`` does, through the
Job Submission SDK, with the same address convention (``--address http://HEAD:8265``, else ``RAY_ADDRESS``).
"""
from __future__ import annotations

import asyncio
import datetime
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from facekd.errors import ConfigError

__all__ = ["connect", "dashboard_link", "describe", "follow", "list_jobs", "submit", "TERMINAL"]

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
"""Statuses a job never leaves."""


def connect(address: str | None) -> Any:
    """A ``JobSubmissionClient`` of the cluster at ``address`` (``http://HEAD:8265``), or of ``RAY_ADDRESS``."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("no Ray cluster given: pass --address http://HEAD:8265 (the head's dashboard) or set "
                          "RAY_ADDRESS")
    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        # Ray 2.60 protects the clusters it starts with a token; as `ray job`, a client sends one only when told
        raise ConfigError(f"the Ray cluster at {address} wants its authentication token: set RAY_AUTH_MODE=token "
                          "and RAY_AUTH_TOKEN (or the token file ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH)") from None
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ConfigError(f"cannot reach a Ray Job Submission server at {address}: "
                          f"{' '.join(str(error).split())}") from None


def submit(client: Any, entrypoint: str, *, working_dir: Path, env_vars: dict[str, str],
           metadata: dict[str, str]) -> str:
    """Submit ``entrypoint`` to run in a copy of ``working_dir`` on the cluster; returns the job's id."""
    runtime_env = {"working_dir": str(working_dir), "env_vars": env_vars}
    return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata)


def dashboard_link(client: Any, job_id: str) -> str:
    """Where the job's page is on the cluster's dashboard."""
    return f"{client.get_address().rstrip('/')}/#/jobs/{job_id}"


def follow(client: Any, job_id: str, out: TextIO = sys.stdout) -> str:
    """Print the job's logs as they come until it ends; returns its final status."""
    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())
    # the log stream closes when the job ends; its status may take a moment more to be written
    status = str(client.get_job_status(job_id))
    for _ in range(100):
        if _name(status) in TERMINAL:
            break
        time.sleep(0.2)
        status = str(client.get_job_status(job_id))
    return _name(status)


def describe(client: Any, job_id: str) -> dict[str, Any]:
    """Status, message, entrypoint and times of one job."""
    try:
        info = client.get_job_info(job_id)
    except RuntimeError as error:
        raise ConfigError(f"no job {job_id} on this cluster ({' '.join(str(error).split())})") from None
    return _row(info)


def list_jobs(client: Any) -> list[dict[str, Any]]:
    """Every job the cluster knows, oldest first."""
    return sorted((_row(info) for info in client.list_jobs()), key=lambda row: row["start_time"] or "")


def _row(info: Any) -> dict[str, Any]:
    def when(milliseconds: int | None) -> str | None:
        if not milliseconds:
            return None
        return datetime.datetime.fromtimestamp(milliseconds / 1000).isoformat(timespec="seconds")

    return {"id": info.submission_id or info.job_id, "status": _name(str(info.status)), "message": info.message,
            "entrypoint": info.entrypoint, "start_time": when(info.start_time), "end_time": when(info.end_time),
            "metadata": info.metadata or {}}


def _name(status: str) -> str:
    """``JobStatus.SUCCEEDED`` or ``SUCCEEDED`` → ``SUCCEEDED``."""
    return status.rsplit(".", 1)[-1]
