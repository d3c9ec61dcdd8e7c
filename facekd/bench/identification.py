"""``facekd bench identification``: MegaFace-scale identification (probes against a gallery plus N distractors,
N up to 1M, D = 512) on this machine: wall seconds, distractor rows scored per second, and the memory it takes.

The distractors are random unit rows in a float32 ``.npy`` memory map in ``--workdir`` (2 GB at 1M × 512; kept
and reused by the next run), read ``--chunk`` rows at a time by :func:`facekd.evaluation.identification.identify`,
as ``facekd eval --megaface`` reads a cached embedding file. Probes and gallery are MegaFace's FaceScrub sizes by
default (3,530 probes of 80 identities). The scoring runs once after a warm-up on the first chunk: one call at
1M distractors is minutes of CPU, and its rate is what the figure is for. Memory is reported twice: the peak
resident set (``ru_maxrss``), which also counts the map's file pages the kernel keeps cached once read (so it grows
towards the map's size however little the scoring holds), and the peak of the process's anonymous memory
(``RssAnon`` of /proc/self/status, sampled every 10 ms during the scoring): the working memory the scoring
allocates itself — the chunk in the score dtype, its score block and the running top lists — which is what must
stay far below N × D.
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from facekd.bench.common import Chart, Column, Device, write_results
from facekd.evaluation.identification import identify

BENCH = "identification"
DTYPES = {"fp64": torch.float64, "fp32": torch.float32}
_FILL_ROWS = 1 << 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``facekd bench identification``."""
    parser.add_argument("--distractors", type=int, nargs="+", default=[1_000_000],
                        help="distractor counts N (default 1,000,000)")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension D (default 512)")
    parser.add_argument("--probes", type=int, default=3530, help="probes (default 3530, MegaFace's FaceScrub set)")
    parser.add_argument("--identities", type=int, default=80, help="probe identities, one gallery entry each")
    parser.add_argument("--chunk", type=int, default=65536, help="distractor rows read at a time (default 65536)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp64"],
                        help="score precision (default fp64, what facekd eval uses)")
    parser.add_argument("--workdir", type=Path, help="where the distractor memory maps are made and kept "
                                                     "(default: a temporary directory)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--out", type=Path, default=Path("results"), help="results root (default results/)")


def distractor_map(workdir: Path, count: int, dim: int) -> np.ndarray:
    """A read-only float32 [count, dim] memory map of random unit rows (seed 0), made once per (count, dim)."""
    path = workdir / f"distractors_{count}x{dim}.npy"
    if not path.is_file():
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        rows = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(count, dim))
        rng = np.random.default_rng(0)
        for start in range(0, count, _FILL_ROWS):
            block = rng.standard_normal((min(_FILL_ROWS, count - start), dim), dtype=np.float32)
            rows[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
        rows.flush()
        del rows
        os.replace(partial, path)
    return np.load(path, mmap_mode="r")


class AnonymousPeak:
    """The largest ``RssAnon`` (private resident memory, file pages excluded) of this process while the block runs,
    sampled every ``interval`` seconds by a thread; ``bytes`` is None where /proc/self/status has no RssAnon."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.bytes: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def read() -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024  # kB
        except OSError:
            return None
        return None

    def _sample(self) -> None:
        while True:
            now = self.read()
            if now is not None:
                self.bytes = max(self.bytes or 0, now)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> AnonymousPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()


def measure(*, num_distractors: int, dim: int, num_probes: int, num_identities: int, chunk: int, dtype: str,
            device: Device, workdir: Path) -> dict:
    """One identification at this size: seconds, rates, memory."""
    distractors = distractor_map(workdir, num_distractors, dim)
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((num_identities, dim)).astype(np.float32)
    probe_labels = rng.integers(0, num_identities, num_probes)
    probes = centres[probe_labels] + rng.standard_normal((num_probes, dim)).astype(np.float32)
    gallery_labels = np.arange(num_identities)

    def score(rows: np.ndarray):
        return identify(probes, probe_labels, centres, gallery_labels, rows, chunk=chunk,
                        device=device.torch_device, dtype=DTYPES[dtype])

    score(distractors[:min(chunk, num_distractors)])  # warm-up: BLAS threads, CUDA context, allocator
    if device.is_cuda:
        torch.cuda.reset_peak_memory_stats(device.torch_device)
    device.synchronize()
    baseline_anon = AnonymousPeak.read()
    with AnonymousPeak() as anon:
        start = time.perf_counter()
        result = score(distractors)
        device.synchronize()
        seconds = time.perf_counter() - start
    return {
        "distractors": num_distractors, "dim": dim, "probes": num_probes, "chunk": chunk, "dtype": dtype,
        "seconds": seconds, "distractors_per_s": num_distractors / seconds,
        "scores_per_s": num_distractors * num_probes / seconds,
        "map_bytes": int(distractors.nbytes),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux reports KiB
        "anon_before_bytes": baseline_anon,
        "peak_anon_bytes": anon.bytes,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated(device.torch_device) if device.is_cuda else None,
        "rank1": result.rank1, "tar_at_1e-6": result.tar_at_far[1e-6],
    }


COLUMNS = (
    Column("distractors", "N", "{:,}"), Column("dim", "D"), Column("probes", "probes", "{:,}"),
    Column("dtype", "scores"), Column("chunk", "chunk", "{:,}"), Column("seconds", "s", "{:.2f}"),
    Column("distractors_per_s", "distractors/s", "{:,.0f}"), Column("scores_per_s", "scores/s", "{:.3g}"),
    Column("map_bytes", "map bytes", "{:,}"), Column("peak_rss_bytes", "peak RSS bytes", "{:,}"),
    Column("anon_before_bytes", "private bytes before", "{:,}"), Column("peak_anon_bytes", "peak private bytes", "{:,}"),
    Column("cuda_peak_bytes", "GPU peak bytes", "{:,}"),
)
CHART = Chart(x="distractors", y="seconds", series="dtype", panel=("dim", "probes"), x_label="distractors N",
              y_label="seconds", title="identification: probes against gallery + N distractors")


def run(args: argparse.Namespace) -> dict[str, Path]:
    """Measure each (N, dtype), write results/<device>/identification.{json,md,png}; returns their paths."""
    device = Device.detect(args.device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="facekd-bench-identification-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        for count in args.distractors:
            for dtype in args.dtype:
                rows.append(measure(num_distractors=count, dim=args.dim, num_probes=args.probes,
                                    num_identities=args.identities, chunk=args.chunk, dtype=dtype, device=device,
                                    workdir=workdir))
    notes = {"timing": "one call after a warm-up chunk, wall clock", "cores": os.cpu_count(),
             "threads": torch.get_num_threads()}
    return write_results(args.out, BENCH, device, rows, notes=notes, columns=COLUMNS, chart=CHART,
                         key=("distractors", "dim", "probes", "chunk", "dtype"))
