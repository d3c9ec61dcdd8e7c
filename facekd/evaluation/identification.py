"""MegaFace-style identification: probes against a gallery plus N distractors (N up to 1M), in chunks.

A probe's mate score is its best score against gallery entries of its identity; its rank is 1 plus the number of
non-mates (other identities' gallery entries and every distractor) scoring at least as high (ties count against
the probe). CMC(k) is the share of probes of rank <= k; rank-1 is CMC(1). Verification with the same sets:
genuine pairs are (probe, mate), impostor pairs (probe, non-mate); TAR at a FAR is the share of genuine scores
above the (m+1)-th largest impostor score, m = floor(FAR × impostors) — the best threshold with at most m false
accepts, as :func:`facekd.eval.tar_at_far` reads it from a ROC.

Distractors are read ``chunk`` rows at a time (a memory map of 1M × 512 float32 is 2 GB) and scored in GEMMs of
exactly ``SCORE_BLOCK`` rows, the last zero-padded: every score comes from the same call whatever the chunk, so
the counts do not depend on it. Per chunk only the rank counts [probes] and the running top m+1 impostor scores
are kept; no probes × N matrix exists.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from facekd.errors import DataError

__all__ = ["IdentificationResult", "SCORE_BLOCK", "evaluate_identification", "find_identification_sets",
           "format_identification_table", "identify", "plot_cmc"]

SCORE_BLOCK = 4096
"""Distractor rows per score GEMM (probes × 4096 float64 scores: 116 MB for MegaFace's 3,530 FaceScrub probes)."""


@dataclass(frozen=True)
class IdentificationResult:
    ranks: np.ndarray  # [probes] int64, 1 = the mate scores above every non-mate
    cmc: np.ndarray  # [max_rank] float64, cmc[k - 1] = share of probes with rank <= k
    tar_at_far: dict[float, float]  # NaN where fewer than 1/FAR impostor pairs exist
    num_impostors: int  # impostor pairs: probes × (non-mate gallery entries + distractors)

    @property
    def rank1(self) -> float:
        return float(self.cmc[0])


def _unit_rows(rows: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """L2-normalised rows on ``device``; a read-only memory map is copied (torch cannot wrap it)."""
    rows = torch.as_tensor(np.require(rows, requirements="W"), dtype=dtype, device=device)
    norms = rows.norm(dim=1, keepdim=True)
    return rows / torch.where(norms > 0, norms, torch.ones_like(norms))


def identify(
    probes: np.ndarray,
    probe_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    distractors: np.ndarray,
    *,
    far_targets: Sequence[float] = (1e-6,),
    max_rank: int = 100,
    chunk: int = 65536,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
) -> IdentificationResult:
    """Identification of ``probes`` [P, D] against ``gallery`` [G, D] plus ``distractors`` [N, D] (cosine scores:
    rows are L2-normalised here). Every probe label must have a gallery entry."""
    probe_labels, gallery_labels = np.asarray(probe_labels), np.asarray(gallery_labels)
    dim = probes.shape[1]
    if gallery.shape[1] != dim or (len(distractors) and distractors.shape[1] != dim):
        raise DataError(f"embedding widths differ: probes {probes.shape}, gallery {gallery.shape}, "
                        f"distractors {distractors.shape}")
    if len(probe_labels) != len(probes) or len(gallery_labels) != len(gallery):
        raise DataError(f"{len(probes)} probes with {len(probe_labels)} labels, {len(gallery)} gallery entries with "
                        f"{len(gallery_labels)} labels")
    mate = probe_labels[:, None] == gallery_labels[None, :]  # [P, G]
    without = ~mate.any(axis=1)
    if without.any():
        raise DataError(f"probe identity {probe_labels[without][0].item()!r} has no gallery entry "
                        f"({int(without.sum())} probes without a mate)")
    device = torch.device(device)
    probe_rows = _unit_rows(probes, dtype, device)
    gallery_scores = probe_rows @ _unit_rows(gallery, dtype, device).T  # [P, G]
    mate_mask = torch.as_tensor(mate, device=device)
    mate_scores = gallery_scores.masked_fill(~mate_mask, -math.inf).max(dim=1).values  # [P]
    genuine = gallery_scores[mate_mask]
    gallery_impostors = gallery_scores[~mate_mask]
    # [P] non-mate gallery entries at or above the mate, then distractors added chunk by chunk
    above = (gallery_scores.masked_fill(mate_mask, -math.inf) >= mate_scores[:, None]).sum(dim=1)

    num_impostors = len(gallery_impostors) + len(probes) * len(distractors)
    allowed = {far: math.floor(far * num_impostors + 1e-9) for far in far_targets}
    keep = min(max(allowed.values()) + 1, num_impostors)
    top = torch.topk(gallery_impostors, min(keep, len(gallery_impostors))).values  # running top impostor scores
    chunk = max(SCORE_BLOCK, chunk // SCORE_BLOCK * SCORE_BLOCK)
    for start in range(0, len(distractors), chunk):
        rows = _unit_rows(distractors[start:start + chunk], dtype, device)
        for block_start in range(0, len(rows), SCORE_BLOCK):
            block = rows[block_start:block_start + SCORE_BLOCK]
            count = len(block)
            if count < SCORE_BLOCK:  # pad: the GEMM keeps its shape, so a score never depends on the chunking
                block = torch.cat([block, block.new_zeros(SCORE_BLOCK - count, dim)])
            scores = (probe_rows @ block.T)[:, :count]  # [P, count]
            above += (scores >= mate_scores[:, None]).sum(dim=1)
            candidates = torch.cat([top, scores.flatten()])
            top = torch.topk(candidates, min(keep, len(candidates))).values

    ranks = (above + 1).cpu().numpy().astype(np.int64)
    cmc = np.array([(ranks <= k).mean() for k in range(1, max_rank + 1)])
    tar_at_far = {}
    for far, count in allowed.items():
        if not 0.0 < far < 1.0:
            raise ValueError(f"FAR targets must be in (0, 1), got {far}")
        if num_impostors < math.ceil(1.0 / far - 1e-9):
            tar_at_far[far] = math.nan
        else:
            threshold = top[count]  # the (m+1)-th largest impostor score: accept only above it
            tar_at_far[far] = float((genuine > threshold).double().mean())
    return IdentificationResult(ranks, cmc, tar_at_far, num_impostors)


def plot_cmc(curves: Mapping[str, np.ndarray], path: str | Path, title: str = "CMC") -> Path:
    """CMC curves ``{label: cmc [K]}`` on one PNG, rank on a log axis; the legend gives rank-1."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not curves:
        raise ValueError("plot_cmc needs at least one curve, got none")
    figure = Figure(figsize=(7.2, 4.8), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, cmc in curves.items():
        cmc = np.asarray(cmc)
        axes.step(np.arange(1, len(cmc) + 1), 100 * cmc, where="post", label=f"{label} (rank-1 {100 * cmc[0]:.2f}%)")
    axes.set_xscale("log")
    axes.set_xlabel("rank")
    axes.set_ylabel("identification rate (%)")
    axes.set_title(title)
    axes.grid(True, which="both", linestyle="--", linewidth=0.5)
    axes.legend(loc="lower right")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


IDENTIFICATION_SETS = ("probes", "gallery", "distractors")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class _LazyFiles(Sequence[bytes]):
    """The bytes of image files, read when indexed (a million distractors are not held in memory)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [path.read_bytes() for path in self.paths[index]]
        return self.paths[index].read_bytes()


def find_identification_sets(root: str | Path) -> dict[str, tuple[list[Path], list[str]]]:
    """``{set: (image paths, labels)}`` of ``ROOT/probes/<identity>/*``, ``ROOT/gallery/<identity>/*`` and
    ``ROOT/distractors/**/*`` (labels of distractors are empty), images already aligned, in sorted order."""
    root = Path(root)
    found = {}
    for name in IDENTIFICATION_SETS:
        folder = root / name
        if not folder.is_dir():
            raise DataError(f"{root}: no {name}/ folder (expected probes/<identity>/, gallery/<identity>/ and "
                            "distractors/ of aligned images)")
        paths = sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
        if not paths and name != "distractors":
            raise DataError(f"{folder}: no images")
        labels = ["" if name == "distractors" else path.relative_to(folder).parts[0] for path in paths]
        found[name] = (paths, labels)
    return found


def _list_digest(root: Path, paths: Sequence[Path]) -> str:
    """sha256 of each file's relative path and size (a million images are not hashed byte by byte)."""
    import hashlib

    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path.relative_to(root)}\t{path.stat().st_size}\n".encode())
    return digest.hexdigest()


def evaluate_identification(
    checkpoints: Sequence[str | Path],
    root: str | Path,
    *,
    out_dir: str | Path,
    cache_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 128,
    chunk: int = 65536,
    names: Sequence[str] | None = None,
    far_targets: Sequence[float] = (1e-6,),
    progress: bool = True,
) -> list[dict[str, object]]:
    """MegaFace-style identification of every network on ``root`` (:func:`find_identification_sets`): one row per
    network with ``rank1``, ``cmc``, ``tar_at_far``, counts and ``cached`` (per set: embeddings from the cache).

    Each set is embedded (image + flip) into a float32 memory map cached per checkpoint and file list (paths and
    sizes) under ``cache_dir`` (default ``out_dir/embeddings``): scoring again, e.g. with another gallery, reads
    the million distractor embeddings from disk instead of re-embedding them. Writes ``out_dir/identification.json``,
    ``out_dir/identification.md`` and ``out_dir/cmc.png``.
    """
    import json

    from facekd.evaluation.embed import EmbeddingCache, decoded_batches, embed_pixels
    from facekd.evaluation.suite import _load
    from facekd.network import resolve_device

    if not checkpoints:
        raise DataError("need at least one checkpoint, got none")
    root, out = Path(root), Path(out_dir)
    sets = find_identification_sets(root)
    digests = {name: _list_digest(root, paths) for name, (paths, _) in sets.items()}
    torch_device = resolve_device(device)
    cache = EmbeddingCache(Path(cache_dir) if cache_dir is not None else out / "embeddings")
    rows: list[dict[str, object]] = []
    for network in _load(checkpoints, names, torch_device):
        variant = f"{network.image_size}px-{network.normalize}-flipsum"
        embeddings, cached = {}, {}
        for name, (paths, _) in sets.items():
            stored = cache.load(network.digest, digests[name], variant, mmap=True)
            cached[name] = stored is not None
            if stored is None and paths:
                with torch.no_grad():  # the width of the memory map: one blank image through the network
                    blank = torch.zeros(1, 3, network.image_size, network.image_size, device=torch_device)
                    embedding_dim = network.backbone.eval()(blank).shape[1]
                stored = cache.create(network.digest, digests[name], variant, (len(paths), embedding_dim))
                embed_pixels(network.backbone, decoded_batches(_LazyFiles(paths), network.image_size, batch_size),
                             total=len(paths), device=torch_device, normalize=network.normalize, out=stored,
                             progress=progress, desc=f"{network.label} on {name}")
                cache.commit(stored, network.digest, digests[name], variant, checkpoint=str(network.checkpoint),
                             data=str(root / name))
            embeddings[name] = stored
        if embeddings["distractors"] is None:
            embeddings["distractors"] = np.zeros((0, embeddings["probes"].shape[1]), np.float32)
        result = identify(embeddings["probes"], np.array(sets["probes"][1]), embeddings["gallery"],
                          np.array(sets["gallery"][1]), embeddings["distractors"], far_targets=far_targets,
                          chunk=chunk, device=torch_device)
        rows.append({"model": network.label, "checkpoint": str(network.checkpoint), "rank1": result.rank1,
                     "rank5": float(result.cmc[4]), "cmc": result.cmc, "tar_at_far": result.tar_at_far,
                     **{f"num_{name}": len(paths) for name, (paths, _) in sets.items()}, "cached": cached})

    out.mkdir(parents=True, exist_ok=True)
    summary = [{**{key: value for key, value in row.items() if key != "cmc"},
                "tar_at_far": {f"{far:g}": tar for far, tar in row["tar_at_far"].items()}} for row in rows]
    (out / "identification.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    (out / "identification.md").write_text(format_identification_table(rows) + "\n")
    plot_cmc({str(row["model"]): row["cmc"] for row in rows}, out / "cmc.png",
             title=f"identification with {rows[0]['num_distractors']:,} distractors")
    return rows


def format_identification_table(rows: Sequence[Mapping[str, object]]) -> str:
    """Markdown table: network, rank-1 and rank-5 (%), TAR (%) at each FAR, distractors."""
    if not rows:
        raise ValueError("format_identification_table needs at least one row, got none")
    fars = list(rows[0]["tar_at_far"])
    lines = [["network", "rank-1", "rank-5"] + [f"TAR@FAR={far:g}" for far in fars] + ["distractors"]]
    for row in rows:
        tars = [row["tar_at_far"][far] for far in fars]
        lines.append([str(row["model"]), f"{100 * row['rank1']:.2f}", f"{100 * row['rank5']:.2f}"]
                     + ["n/a" if math.isnan(tar) else f"{100 * tar:.2f}" for tar in tars]
                     + [f"{row['num_distractors']:,}"])
    widths = [max(len(line[column]) for line in lines) for column in range(len(lines[0]))]
    rendered = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(line, widths)) + " |" for line in lines]
    rendered.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(rendered)
