"""IJB-B / IJB-C 1:N identification: probe templates searched in gallery templates.

Protocol files (insightface's ``ijb_1n.py`` layout, beside the 1:1 files): ``meta/ijbc_1N_gallery_G1.csv``,
``meta/ijbc_1N_gallery_G2.csv`` (IJB-B: ``ijbb_1N_gallery_S1.csv``, ``_S2.csv``) and ``meta/ijbc_1N_probe_mixed.csv``;
comma-separated with a header naming ``TEMPLATE_ID`` and ``SUBJECT_ID``, a row per image. Template features are
the 1:1 ones (:func:`facekd.evaluation.ijb.template_features`).

Closed set, as insightface reports it: the two galleries together, rank-1 and rank-5 of each probe template's
mate (ties count against the probe). Open set, as NIST defines it (Grother et al., NIST IR 8238): for each
gallery alone, a probe whose subject is not enrolled is non-mated; FPIR(t) is the share of non-mated probes whose
best score is at least t, TPIR(t) the share of mated probes whose mate ranks first with a score of at least t;
TPIR at FPIR f is the best TPIR of a threshold whose FPIR does not exceed f. (insightface's ``ijb_1n.py`` prints a
different figure under that name: a threshold at the ⌈f × probes⌉-th largest non-mate score of the union
gallery.)
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from facekd.errors import DataError

__all__ = ["IJB_FPIR_TARGETS", "gallery_names", "read_ijb_1n", "tpir_at_fpir"]

IJB_FPIR_TARGETS = (0.01, 0.1)
"""The FPIR columns insightface's ijb_1n.py reports."""


def gallery_names(name: str) -> tuple[str, str]:
    """The two galleries' names: G1, G2 for IJB-C, S1, S2 for IJB-B."""
    return ("G1", "G2") if name == "IJBC" else ("S1", "S2")


def _read_csv(path: Path) -> dict[int, int]:
    """{template id: subject id} of a 1:N file (a row per image; a template with two subjects is an error)."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = [field.strip().upper() for field in next(reader, [])]
        if "TEMPLATE_ID" not in header or "SUBJECT_ID" not in header:
            raise DataError(f"{path}: the header must name TEMPLATE_ID and SUBJECT_ID, got {header[:6]}")
        template_column, subject_column = header.index("TEMPLATE_ID"), header.index("SUBJECT_ID")
        subjects: dict[int, int] = {}
        for number, row in enumerate(reader, 2):
            if not row:
                continue
            try:
                template, subject = int(row[template_column]), int(row[subject_column])
            except (IndexError, ValueError):
                raise DataError(f"{path}:{number}: expected integer TEMPLATE_ID and SUBJECT_ID, "
                                f"got {row[:4]}") from None
            if subjects.setdefault(template, subject) != subject:
                raise DataError(f"{path}:{number}: template {template} is listed for subjects {subjects[template]} "
                                f"and {subject}")
    if not subjects:
        raise DataError(f"{path} lists no templates")
    return subjects


def read_ijb_1n(root: str | Path, name: str) -> dict[str, dict[int, int]] | None:
    """``{"G1"|"S1": {template: subject}, "G2"|"S2": …, "probes": …}``, or None when none of the three files is
    there (the 1:1 protocol alone); some but not all of them is an error."""
    prefix = name.lower()
    meta = Path(root) / "meta"
    paths = {gallery: meta / f"{prefix}_1N_gallery_{gallery}.csv" for gallery in gallery_names(name)}
    paths["probes"] = meta / f"{prefix}_1N_probe_mixed.csv"
    present = {key: path.is_file() for key, path in paths.items()}
    if not any(present.values()):
        return None
    if not all(present.values()):
        missing = ", ".join(path.name for key, path in paths.items() if not present[key])
        raise DataError(f"{name} 1:N protocol incomplete under {meta}: {missing} missing")
    return {key: _read_csv(path) for key, path in paths.items()}


def tpir_at_fpir(
    probes: np.ndarray, probe_subjects: np.ndarray, gallery: np.ndarray, gallery_subjects: np.ndarray,
    fpir_targets: Sequence[float] = IJB_FPIR_TARGETS, *, chunk: int = 4096,
) -> dict[float, float]:
    """{FPIR: TPIR} of unit probe features [P, D] against one gallery [G, D] (see the module docstring); NaN where
    fewer than 1/FPIR non-mated probes exist, or no probe is mated."""
    probe_subjects, gallery_subjects = np.asarray(probe_subjects), np.asarray(gallery_subjects)
    mated = np.isin(probe_subjects, gallery_subjects)
    best = np.empty(len(probes))  # best score over the gallery
    mate_first = np.zeros(len(probes), bool)  # the mate scores above every non-mate
    mate_score = np.full(len(probes), -np.inf)
    for start in range(0, len(probes), chunk):
        scores = np.asarray(probes[start:start + chunk], np.float64) @ np.asarray(gallery, np.float64).T
        is_mate = probe_subjects[start:start + chunk, None] == gallery_subjects[None, :]
        best[start:start + chunk] = scores.max(axis=1)
        mate = np.where(is_mate, scores, -np.inf).max(axis=1)
        mate_score[start:start + chunk] = mate
        mate_first[start:start + chunk] = mate > np.where(is_mate, -np.inf, scores).max(axis=1, initial=-np.inf)
    non_mated_best = np.sort(best[~mated])[::-1]
    result = {}
    for target in fpir_targets:
        if not 0.0 < target < 1.0:
            raise ValueError(f"FPIR targets must be in (0, 1), got {target}")
        if len(non_mated_best) < math.ceil(1.0 / target - 1e-9) or not mated.any():
            result[target] = math.nan
            continue
        allowed = math.floor(target * len(non_mated_best) + 1e-9)
        threshold = non_mated_best[allowed]  # accept only above the (allowed+1)-th best non-mated score
        result[target] = float((mate_first & (mate_score > threshold))[mated].mean())
    return result
