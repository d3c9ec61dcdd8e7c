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

__all__ = ["IdentificationResult", "SCORE_BLOCK", "identify", "plot_cmc"]

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


def _unit(rows: torch.Tensor) -> torch.Tensor:
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
    probe_rows = _unit(torch.as_tensor(np.asarray(probes), dtype=dtype, device=device))
    gallery_scores = probe_rows @ _unit(torch.as_tensor(np.asarray(gallery), dtype=dtype, device=device)).T  # [P, G]
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
        rows = _unit(torch.as_tensor(np.asarray(distractors[start:start + chunk]), dtype=dtype, device=device))
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
