"""``facekd bench data``: the training loader's images/s on one CPU core, against PIL's JPEG decode alone.

One process on one thread (torch's intra-op threads set to 1; numpy and PIL use one anyway). Synthetic faces
(:mod:`facekd.data.synth`) are encoded as JPEG, written as shards by :func:`facekd.data.convert.convert_to_shards`,
and measured in the same run, in interleaved rounds, in CPU seconds of this process (``time.process_time``), so
that other processes of a shared machine do not count; the best round of each is kept, as ``timeit`` does:

* ``decode_only`` — PIL decoding the shards' JPEG bytes, already in memory: the rate no loader can beat;
* ``loader`` — :class:`~facekd.data.loader.ShardStream` with ``num_workers=0``, as the trainer reads it: tar
  reading, shuffle buffer, labels, decode, flips, float conversion, batches of ``BATCH_SIZE``; timed once the
  shuffle buffer has filled;
* ``loader_uint8`` — the same with ``uint8_pixels=True``: batches of uint8 pixels, made float on the device;
* the breakdown — each stage of the loader timed alone on the same samples, in seconds per image; ``other`` is
  what the loader spends beyond their sum (per-sample bookkeeping, flip draws, label tensors).

The loader with N workers runs N such streams in N processes, so its images/s scale with the cores until memory
bandwidth or the GPU copy limit it; ``images/s ÷ rate per core`` is the number of cores a training step needs.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image, features

from facekd.bench.common import Chart, Column, Device, write_results
from facekd.data import loader
from facekd.data.convert import convert_to_shards, read_manifest
from facekd.data.synth import FaceRenderer, encode_jpeg, face_params
from facekd.errors import ConfigError

BENCH = "data"
BATCH_SIZE = 128
SHUFFLE_BUFFER = 2000  # the trainer's default (facekd.config DataConfig.shuffle_buffer)
DISTINCT_IMAGES = 256  # faces drawn; more images repeat them (decode time does not depend on which face)
MIN_ROUNDS, MAX_ROUNDS = 2, 7
STAGES = ("tar_read", "shuffle_buffer", "labels", "decode", "resize", "pixels", "normalise")


def _make_shards(workdir: Path, image_size: int, num_images: int) -> Path:
    """Shards of ``num_images`` synthetic faces at ``image_size`` px (reused when already in ``workdir``)."""
    shards = workdir / f"shards_{image_size}px_{num_images}"
    manifest = shards / "manifest.json"
    if manifest.is_file() and read_manifest(manifest)[0]["num_samples"] == num_images:
        return shards
    renderer = FaceRenderer(image_size)
    identities = max(1, min(64, num_images // 4))
    faces = [face_params(0, identity) for identity in range(identities)]
    canonicals = [renderer.canonical(face) for face in faces]
    folder = workdir / f"images_{image_size}px_{num_images}"
    jpegs = []
    for index in range(min(num_images, DISTINCT_IMAGES)):
        identity = index % identities
        rng = np.random.default_rng([0, identity, index])
        jpegs.append(encode_jpeg(renderer.render(faces[identity], canonicals[identity], rng)))
    for index in range(num_images):
        identity_dir = folder / f"id{index % identities:03d}"
        identity_dir.mkdir(parents=True, exist_ok=True)
        (identity_dir / f"{index:06d}.jpg").write_bytes(jpegs[index % len(jpegs)])
    convert_to_shards(folder, shards, shard_size=max(1, num_images // 4), show_progress=False)
    return shards


def _drain(items: Iterable[object]) -> None:
    for _ in items:
        pass


def _seconds(work: Callable[[], object]) -> float:
    """CPU seconds of ``work`` in this process: what other processes of a shared machine do is not counted."""
    start = time.process_time()
    work()
    return time.process_time() - start


class _Harness:
    """The data of one measurement and a timer for each path and stage (one call = one round)."""

    def __init__(self, shards: Path, image_size: int, num_images: int) -> None:
        manifest, directory = read_manifest(shards)
        self.urls = [str(directory / shard["name"]) for shard in manifest["shards"]]
        self.sizes = [shard["num_samples"] for shard in manifest["shards"]]
        self.num_classes = manifest["num_classes"]
        self.image_size = image_size
        self.batch_size = min(BATCH_SIZE, max(1, num_images // 2))
        self.shuffle_buffer = min(SHUFFLE_BUFFER, num_images // 2)
        self.num_batches = max(1, num_images // self.batch_size)
        self.samples = [sample for url in self.urls for sample in loader._read_shard(url)]
        self.jpegs = [sample["jpg"] for sample in self.samples]
        self.stream = self._stream()
        self.decoded = [loader._open_rgb(data) for data in self.jpegs]

    def _stream(self, uint8_pixels: bool = False) -> loader.ShardStream:
        return loader.ShardStream(
            self.urls, self.sizes, num_classes=self.num_classes, batch_size=self.batch_size,
            batches_per_epoch=10**9, image_size=self.image_size, num_workers=0,
            shuffle_buffer=self.shuffle_buffer, seed=0, resampled=True, flip=True, uint8_pixels=uint8_pixels,
        )

    # the paths, in seconds per image

    def decode_only(self) -> float:
        def decode_all() -> None:
            for data in self.jpegs:
                with Image.open(io.BytesIO(data)) as image:
                    image.load()

        return _seconds(decode_all) / len(self.jpegs)

    def loader(self, uint8_pixels: bool = False) -> float:
        batches = iter(self._stream(uint8_pixels))
        next(batches)  # fills the shuffle buffer

        def take() -> None:
            # one batch at a time, dropped as a training step drops it (holding them all would time page faults)
            for _ in range(self.num_batches):
                next(batches)

        return _seconds(take) / (self.num_batches * self.batch_size)

    # the stages, in seconds per image

    def stages(self) -> dict[str, float]:
        count = len(self.samples)
        height = width = self.image_size
        # each stage's results are dropped as they come, as the loader drops them
        times = {
            "tar_read": _seconds(lambda: _drain(sample for url in self.urls for sample in loader._read_shard(url))),
            "shuffle_buffer": _seconds(
                lambda: _drain(loader._shuffled(iter(self.samples), self.shuffle_buffer, random.Random(0)))
            ),
            "labels": _seconds(lambda: _drain(self.stream._label(sample) for sample in self.samples)),
            "decode": _seconds(lambda: _drain(loader._open_rgb(data) for data in self.jpegs)),
            "resize": _seconds(lambda: _drain(loader._resized(image, height, width) for image in self.decoded)),
            "pixels": _seconds(lambda: _drain(loader._pixels(image) for image in self.decoded)),
        }
        pixels = [loader._pixels(image) for image in self.decoded]

        def normalise_all() -> None:
            for start in range(0, count, self.batch_size):
                chunk = pixels[start : start + self.batch_size]
                out = loader._empty_batch((len(chunk), 3, height, width), torch.float32).numpy()
                for position, image_pixels in enumerate(chunk):
                    # half of the images mirrored, as the loader's random flips do
                    loader._normalise_into(image_pixels, out[position], flip=position % 2 == 1)

        times["normalise"] = _seconds(normalise_all)
        return {stage: seconds / count for stage, seconds in times.items()}


def measure(*, image_size: int = 112, num_images: int = 2048, budget_s: float = 60.0, workdir: Path) -> dict:
    """Decode-only and loader images/s on one core, and the loader's time per stage; see the module doc.

    Makes its synthetic shards in ``workdir`` (reused by a later call with the same sizes), then runs rounds of
    every measurement until ``budget_s`` is spent (at least two rounds, whatever the budget; at most seven).
    Returns JSON-serialisable figures: ``decode_only_images_per_s``, ``loader_images_per_s`` (float32 batches,
    the trainer's), ``ratio`` (decode-only ÷ loader images/s), ``loader_uint8_images_per_s`` and ``ratio_uint8``
    (batches of uint8 pixels, ``uint8_pixels=True``), ``breakdown`` ({stage: seconds per image} of the float32
    loader, with ``other``), ``cores`` (``os.cpu_count()``: every rate is per core, one process, not for the
    whole machine), ``image_size``, ``num_images``, ``batch_size``, ``shuffle_buffer``, ``rounds``, ``seconds``.
    """
    if image_size < 32:
        raise ConfigError(f"image_size must be >= 32 (the smallest synthetic face), got {image_size}")
    if num_images < 2:
        raise ConfigError(f"num_images must be >= 2, got {num_images}")
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        harness = _Harness(_make_shards(Path(workdir), image_size, num_images), image_size, num_images)
        best: dict[str, float] = {}
        rounds = 0
        while rounds < MIN_ROUNDS or (rounds < MAX_ROUNDS and time.perf_counter() - start < 0.6 * budget_s):
            figures = {"decode_only": harness.decode_only(), "loader": harness.loader(),
                       "loader_uint8": harness.loader(uint8_pixels=True), **harness.stages()}
            best = {name: min(seconds, best.get(name, seconds)) for name, seconds in figures.items()}
            rounds += 1
    finally:
        torch.set_num_threads(threads)
    breakdown = {stage: best[stage] for stage in STAGES}
    breakdown["other"] = max(0.0, best["loader"] - sum(breakdown.values()))
    return {
        "decode_only_images_per_s": 1.0 / best["decode_only"],
        "loader_images_per_s": 1.0 / best["loader"],
        "ratio": best["loader"] / best["decode_only"],
        "loader_uint8_images_per_s": 1.0 / best["loader_uint8"],
        "ratio_uint8": best["loader_uint8"] / best["decode_only"],
        "breakdown": breakdown,
        "cores": os.cpu_count(),
        "image_size": image_size,
        "num_images": num_images,
        "batch_size": harness.batch_size,
        "shuffle_buffer": harness.shuffle_buffer,
        "rounds": rounds,
        "seconds": time.perf_counter() - start,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``facekd bench data``."""
    parser.add_argument("--image-size", type=int, nargs="+", default=[112],
                        help="stored and loaded image side(s) in px (default 112)")
    parser.add_argument("--num-images", type=int, default=2048, help="images in the synthetic shards (default 2048)")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per image size (default 60)")
    parser.add_argument("--workdir", type=Path,
                        help="where the synthetic shards are made and kept (default: a temporary directory)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="names the results folder: the machine the CPU figures were measured on")
    parser.add_argument("--out", type=Path, default=Path("results"), help="results root (default results/)")


def _rows(figures: dict) -> list[dict]:
    """One row per path and per stage, in µs per image, against the decode-only rate of the same run."""
    decode_us = 1e6 / figures["decode_only_images_per_s"]
    base = {"image_size": figures["image_size"], "num_images": figures["num_images"], "cores": figures["cores"]}
    timings = {"decode_only": decode_us, "loader": 1e6 / figures["loader_images_per_s"],
               "loader_uint8": 1e6 / figures["loader_uint8_images_per_s"]}
    timings.update({f"stage:{stage}": 1e6 * seconds for stage, seconds in figures["breakdown"].items()})
    return [{**base, "what": what, "us_per_image": us, "images_per_s": 1e6 / us if us > 0 else None,
             "vs_decode_only": us / decode_us} for what, us in timings.items()]


COLUMNS = (
    Column("image_size", "px"), Column("what", "path / stage"), Column("us_per_image", "µs / image", "{:.1f}"),
    Column("images_per_s", "images/s (one core)", "{:,.0f}"), Column("vs_decode_only", "× decode only", "{:.2f}"),
)
CHART = Chart(x="image_size", y="us_per_image", series="what", panel=("cores",), x_label="image side, px",
              y_label="µs per image, one core", title="loader vs PIL decode alone, and the loader's stages")


def _draw_breakdown(rows: list[dict], path: Path) -> None:
    """Horizontal bars per image size: decode alone, the loader split into its stages, the uint8 loader."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({row["image_size"] for row in rows})
    figure, axes = plt.subplots(len(sizes), 1, figsize=(8, 0.6 + 2.2 * len(sizes)), squeeze=False)
    for axis, size in zip(axes[:, 0], sizes):
        us = {row["what"]: row["us_per_image"] for row in rows if row["image_size"] == size}
        axis.barh(2, us["decode_only"], color="0.4")
        left = 0.0
        for stage in (*STAGES, "other"):
            axis.barh(1, us[f"stage:{stage}"], left=left, label=stage)
            left += us[f"stage:{stage}"]
        axis.barh(0, us["loader_uint8"], color="0.7")
        axis.set_yticks([2, 1, 0], ["decode only", "loader (float32)", "loader (uint8)"])
        axis.set_xlabel("µs per image, one core")
        axis.set_title(f"{size} px", fontsize=9)
    figure.legend(*axes[0, 0].get_legend_handles_labels(), fontsize=7, ncol=8, loc="lower center")
    figure.suptitle("loader vs PIL decode alone, and where the loader's time goes", fontsize=10)
    figure.tight_layout(rect=(0, 0.12 / len(sizes), 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def run(args: argparse.Namespace) -> dict[str, Path]:
    """Measure each image size, write results/<device>/data.{json,md,png}; returns their paths."""
    device = Device.detect(args.device)
    rows, notes = [], {}
    with tempfile.TemporaryDirectory(prefix="facekd-bench-data-") as scratch:
        workdir = args.workdir or Path(scratch)
        for image_size in args.image_size:
            figures = measure(image_size=image_size, num_images=args.num_images, budget_s=args.budget,
                              workdir=workdir)
            rows += _rows(figures)
            notes[f"ratio_{image_size}px"] = round(figures["ratio"], 3)
            notes[f"ratio_uint8_{image_size}px"] = round(figures["ratio_uint8"], 3)
    notes.update(
        timing=(f"one process, one thread, CPU time; best of {figures['rounds']} interleaved rounds; loader batches "
                f"of {figures['batch_size']} with a {figures['shuffle_buffer']}-sample shuffle buffer, timed after "
                "it filled"),
        cpu=_cpu_name(),
        cores=os.cpu_count(),
        pillow=f"{Image.__version__} (libjpeg-turbo {features.version('libjpeg_turbo') or 'absent'})",
    )
    paths = write_results(args.out, BENCH, device, rows, notes=notes, columns=COLUMNS, chart=CHART,
                          key=("image_size", "num_images", "what"))
    # common's line chart needs several sizes to say something; bars split by stage read better at any count
    _draw_breakdown(json.loads(paths["json"].read_text())["rows"], paths["png"])
    return paths
