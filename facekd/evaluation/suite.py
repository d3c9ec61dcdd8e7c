"""``facekd eval RUN... --bins DIR``: every verification ``.bin`` of a folder, every network, one table.

The table has the papers' layout: networks as rows (teacher and students side by side), data sets as
columns, insightface 10-fold accuracy in percent. Each ``.bin`` is read and decoded once and embedded by
every network; embeddings are cached per checkpoint and file (:class:`facekd.evaluation.embed.EmbeddingCache`),
so a second run, or a new student beside an old teacher, embeds only what changed.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from facekd.errors import ConfigError, DataError
from facekd.evaluation.embed import (
    EmbeddingCache, checkpoint_digest, decode_pixels, embed_pixels, file_digest,
)

__all__ = ["BIN_NAMES", "evaluate_suite", "find_bins", "format_suite_table"]

logger = logging.getLogger(__name__)

BIN_NAMES = ("lfw", "cfp_ff", "cfp_fp", "agedb_30", "calfw", "cplfw", "vgg2_fp")
"""insightface's verification files, in the column order of the papers' tables; other ``.bin`` files follow."""


def find_bins(folder: str | Path) -> list[Path]:
    """Every ``*.bin`` in ``folder``: insightface's names in :data:`BIN_NAMES` order, then the rest by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--bins {folder}: not a folder")
    found = {path.stem: path for path in folder.glob("*.bin") if path.is_file()}
    if not found:
        raise DataError(f"--bins {folder}: no .bin files there (expected insightface's {', '.join(BIN_NAMES)})")
    known = [found[name] for name in BIN_NAMES if name in found]
    return known + sorted(path for stem, path in found.items() if stem not in BIN_NAMES)


@dataclass
class _Network:
    """A network to evaluate: its label, checkpoint digest, and the backbone once loaded."""

    label: str
    checkpoint: Path
    digest: str
    backbone: torch.nn.Module
    image_size: int
    normalize: str


def _load(checkpoints: Sequence[str | Path], names: Sequence[str] | None, device: torch.device) -> list[_Network]:
    from facekd.network import load_network

    networks = []
    for index, checkpoint in enumerate(checkpoints):
        folder, digest = checkpoint_digest(checkpoint)
        network = load_network(folder, device, with_head=False)
        label = network.job.name if names is None else names[index]
        networks.append(_Network(label, folder, digest, network.backbone, network.job.data.image_size,
                                 network.job.model.normalize))
    # two checkpoints of one run share a job name: tell them apart by their step, else by their folder
    job_names = [network.label for network in networks]
    for where in (lambda network: network.checkpoint.name, lambda network: str(network.checkpoint)):
        labels = [network.label for network in networks]
        if names is not None or len(set(labels)) == len(labels):
            break
        for network, label, job_name in zip(networks, labels, job_names):
            if labels.count(label) > 1:
                network.label = f"{job_name} ({where(network)})"
    return networks


def evaluate_suite(
    checkpoints: Sequence[str | Path],
    bins: Sequence[str | Path],
    *,
    out_dir: str | Path,
    cache_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 128,
    names: Sequence[str] | None = None,
    n_folds: int = 10,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Evaluate every network on every ``.bin``; one row per (network, file) as :func:`facekd.eval.evaluate_bin`
    returns it, plus ``cached`` (the embeddings came from the cache).

    Writes ``out_dir/results.json`` (rows without curves), ``out_dir/table.md`` (:func:`format_suite_table`) and
    ``out_dir/roc_<dataset>.png`` (every network's ROC on that set). Embeddings are cached under ``cache_dir``
    (default ``out_dir/embeddings``).
    """
    from facekd.data.verification import load_bin
    from facekd.eval import _roc_from_pairs, _similarities, _tar_from_roc, plot_roc, roc_auc, verification_accuracy
    from facekd.network import resolve_device

    if not checkpoints or not bins:
        raise ConfigError(f"need at least one checkpoint and one .bin, got {len(checkpoints)} and {len(bins)}")
    if names is not None and len(names) != len(checkpoints):
        raise ConfigError(f"need one name per checkpoint, got {len(names)} names for {len(checkpoints)}")
    torch_device = resolve_device(device)
    out = Path(out_dir)
    cache = EmbeddingCache(Path(cache_dir) if cache_dir is not None else out / "embeddings")
    networks = _load(checkpoints, names, torch_device)

    rows: list[dict[str, Any]] = []
    for bin_path in map(Path, bins):
        data_sha = file_digest(bin_path)
        images, issame = load_bin(bin_path)
        pixels: dict[int, np.ndarray] = {}  # decoded once per image size, shared by the networks
        for network in networks:
            variant = f"{network.image_size}px-{network.normalize}-flipsum"
            embeddings = cache.load(network.digest, data_sha, variant)
            cached = embeddings is not None
            start = time.perf_counter()
            if embeddings is None:
                if network.image_size not in pixels:
                    pixels[network.image_size] = decode_pixels(images, network.image_size, progress=progress,
                                                               desc=f"decoding {bin_path.stem}")
                decoded = pixels[network.image_size]
                batches = (decoded[i:i + batch_size] for i in range(0, len(decoded), batch_size))
                embeddings = embed_pixels(network.backbone, batches, total=len(decoded), device=torch_device,
                                          normalize=network.normalize, progress=progress,
                                          desc=f"{network.label} on {bin_path.stem}")
                cache.save(embeddings, network.digest, data_sha, variant, checkpoint=str(network.checkpoint),
                           data=str(bin_path))
            seconds = time.perf_counter() - start

            row = verification_accuracy(embeddings, issame, n_folds)
            similarity, flags = _similarities(embeddings, issame)
            fpr, tpr, roc_thresholds = _roc_from_pairs(similarity, flags)
            row.update(model=network.label, dataset=bin_path.stem, checkpoint=str(network.checkpoint), fpr=fpr,
                       tpr=tpr, roc_thresholds=roc_thresholds, auc=roc_auc(fpr, tpr), cached=cached,
                       tar_at_far=_tar_from_roc(fpr, tpr, int((~flags).sum()), (1e-3, 1e-4)))
            if not cached:
                row.update(embed_seconds=seconds, images_per_second=len(images) / max(seconds, 1e-9))
            rows.append(row)

    out.mkdir(parents=True, exist_ok=True)
    curve_keys = ("fpr", "tpr", "roc_thresholds", "fold_accuracy", "fold_threshold")
    summary = [{key: value for key, value in row.items() if key not in curve_keys} for row in rows]
    for row in summary:
        row["tar_at_far"] = {f"{target:g}": value for target, value in row["tar_at_far"].items()}
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    (out / "table.md").write_text(format_suite_table(rows) + "\n")
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        plot_roc([row for row in rows if row["dataset"] == dataset], out / f"roc_{dataset}.png",
                 title=f"{dataset} verification ROC")
    return rows


def format_suite_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table, networks as rows and data sets as columns, 10-fold accuracy in percent (``n/a`` where a
    network was not evaluated on a set), the papers' layout."""
    if not rows:
        raise ValueError("format_suite_table needs at least one row, got none")
    models = list(dict.fromkeys(str(row["model"]) for row in rows))
    datasets = list(dict.fromkeys(str(row["dataset"]) for row in rows))
    cells = {(str(row["model"]), str(row["dataset"])): row["accuracy"] for row in rows}
    lines = [["network"] + datasets]
    for model in models:
        values = [cells.get((model, dataset), math.nan) for dataset in datasets]
        lines.append([model] + ["n/a" if math.isnan(value) else f"{100 * value:.2f}" for value in values])
    widths = [max(len(line[column]) for line in lines) for column in range(len(lines[0]))]
    rendered = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(line, widths)) + " |" for line in lines]
    rendered.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(rendered)
