"""IJB-B / IJB-C 1:1 verification of trained networks, from the public protocol's files (insightface's layout).

``ROOT/meta/ijbX_face_tid_mid.txt`` (``image template media``), ``ROOT/meta/ijbX_name_5pts_score.txt`` (``image``,
10 landmark coordinates, faceness score), ``ROOT/meta/ijbX_template_pair_label.txt`` (``template template label``)
and the images under ``ROOT/loose_crop/``. An image without landmarks or without its file is an error naming its
template, unless ``skip_missing``: then it is dropped and counted, and so are the templates left without images
and the pairs naming them. The maths is :mod:`facekd.evaluation.ijb`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from facekd.errors import ConfigError, DataError
from facekd.evaluation.embed import EmbeddingCache, _workers, embed_pixels, file_digest
from facekd.evaluation.ijb import IJB_FAR_TARGETS, align_face, pair_scores, tar_at_far_from_scores, template_features
from facekd.evaluation.ijb_1n import IJB_FPIR_TARGETS, read_ijb_1n, tpir_at_fpir

__all__ = ["IJB_NAMES", "IjbProtocol", "aligned_batches", "evaluate_ijb", "format_ijb_1n_table", "format_ijb_table",
           "identify_1n", "read_ijb"]

logger = logging.getLogger(__name__)

IJB_NAMES = ("IJBB", "IJBC")


@dataclass(frozen=True)
class IjbProtocol:
    """One IJB benchmark as read from its files: per image [N] arrays, per pair [P] arrays, and what was skipped."""

    root: Path
    name: str  # IJBB or IJBC
    images: list[str]  # [N] file names under loose_crop/
    templates: np.ndarray  # [N] int64 template id of each image
    medias: np.ndarray  # [N] int64 media id of each image
    landmarks: np.ndarray  # [N, 5, 2] float64, pixel-centre (x, y): left eye, right eye, nose, mouth corners
    faceness: np.ndarray  # [N] float64 detector score
    first: np.ndarray  # [P] int64 template ids
    second: np.ndarray  # [P] int64
    labels: np.ndarray  # [P] bool, same subject
    meta_digest: str  # sha256 of the three meta files and the kept image list: the embedding cache key
    skipped: dict[str, int] = field(default_factory=dict)  # images, templates, pairs dropped by skip_missing
    one_n: dict[str, dict[int, int]] | None = None  # 1:N {gallery or "probes": {template: subject}}, if present


def _meta_path(root: Path, name: str, suffix: str) -> Path:
    path = root / "meta" / f"{name.lower()}_{suffix}.txt"
    if not path.is_file():
        raise DataError(f"{name} protocol file {path} is missing (expected insightface's IJB layout: "
                        f"meta/{name.lower()}_face_tid_mid.txt, _name_5pts_score.txt, _template_pair_label.txt, "
                        "loose_crop/)")
    return path


def _rows(path: Path, width: int) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each non-empty line, refusing a line without exactly ``width`` fields."""
    with open(path) as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != width:
                raise DataError(f"{path}:{number}: expected {width} space-separated fields, got {len(fields)}: "
                                f"{line.strip()[:120]!r}")
            yield number, fields


def _numbers(path: Path, number: int, fields: Sequence[str], kind: type) -> list:
    try:
        return [kind(value) for value in fields]
    except ValueError:
        raise DataError(f"{path}:{number}: expected {kind.__name__} values, got {' '.join(fields)[:120]!r}") from None


def read_ijb(root: str | Path, name: str, *, skip_missing: bool = False, check_images: bool = True) -> IjbProtocol:
    """The IJB-B or IJB-C protocol under ``root`` (see the module docstring); ``check_images``: look for each
    image file (470k ``stat`` calls on IJB-C)."""
    if name not in IJB_NAMES:
        raise ConfigError(f"IJB name must be one of {', '.join(IJB_NAMES)}, got {name!r}")
    root = Path(root)
    media_path = _meta_path(root, name, "face_tid_mid")
    landmark_path = _meta_path(root, name, "name_5pts_score")
    pair_path = _meta_path(root, name, "template_pair_label")

    images, ids = [], []
    for number, fields in _rows(media_path, 3):
        images.append(fields[0])
        ids.append(_numbers(media_path, number, fields[1:], int))
    if not images:
        raise DataError(f"{media_path} lists no images")
    if len(set(images)) != len(images):
        raise DataError(f"{media_path} lists an image twice ({len(images) - len(set(images))} repeats)")
    detected: dict[str, list[float]] = {}
    for number, fields in _rows(landmark_path, 12):
        detected[fields[0]] = _numbers(landmark_path, number, fields[1:], float)

    # missing: no landmark row, a non-finite value, or no image file
    values = np.array([detected.get(image, [math.nan] * 11) for image in images], np.float64)
    reasons = np.where(~np.isfinite(values).all(axis=1), "no landmarks", "")
    if check_images:
        absent = np.array([not (root / "loose_crop" / image).is_file() for image in images])
        reasons = np.where((reasons == "") & absent, "no image file", reasons)
    ids_array = np.array(ids, np.int64).reshape(-1, 2)
    missing = reasons != ""
    if missing.any() and not skip_missing:
        first_missing = int(np.flatnonzero(missing)[0])
        raise DataError(
            f"{name}: template {ids_array[first_missing, 0]}: image {images[first_missing]} has "
            f"{reasons[first_missing]} (in {landmark_path.name} / loose_crop/; {int(missing.sum())} such images in "
            f"{len(np.unique(ids_array[missing, 0]))} templates); --ijb-skip-missing drops and counts them")
    kept = ~missing

    pairs = [_numbers(pair_path, number, fields, int) for number, fields in _rows(pair_path, 3)]
    if not pairs:
        raise DataError(f"{pair_path} lists no pairs")
    first, second, labels = np.array(pairs, np.int64).T
    listed, usable = np.unique(ids_array[:, 0]), np.unique(ids_array[kept, 0])
    named = np.concatenate([first, second])
    unlisted = ~np.isin(named, listed)
    if unlisted.any():
        raise DataError(f"{pair_path}: pair names template {int(named[unlisted][0])}, which {media_path.name} does "
                        f"not list ({int(unlisted.sum())} such pair entries)")
    pair_kept = np.isin(first, usable) & np.isin(second, usable)
    if not pair_kept.any():
        raise DataError(f"{name}: no pair left after skipping {int(missing.sum())} images")

    one_n = read_ijb_1n(root, name)
    skipped_one_n = 0
    for key, subjects in (one_n or {}).items():
        templates = np.fromiter(subjects, np.int64)
        unlisted = templates[~np.isin(templates, listed)]
        if len(unlisted):
            raise DataError(f"{name} 1:N {key} names template {int(unlisted[0])}, which {media_path.name} does not "
                            f"list ({len(unlisted)} such templates)")
        unusable = templates[~np.isin(templates, usable)]
        skipped_one_n += len(unusable)
        for template in unusable.tolist():
            del subjects[template]

    digest = hashlib.sha256()
    for path in (media_path, landmark_path, pair_path):
        digest.update(file_digest(path).encode())
    digest.update("\n".join(image for image, keep in zip(images, kept) if keep).encode())
    skipped = {"images": int(missing.sum()), "templates": int(len(listed) - len(usable)),
               "pairs": int((~pair_kept).sum()), "1n_templates": skipped_one_n}
    if missing.any():
        logger.warning("%s: skipped %d images without landmarks or files, %d templates and %d pairs left "
                       "without images", name, skipped["images"], skipped["templates"], skipped["pairs"])
    return IjbProtocol(
        root=root, name=name, images=[image for image, keep in zip(images, kept) if keep],
        templates=ids_array[kept, 0], medias=ids_array[kept, 1], landmarks=values[kept, :10].reshape(-1, 5, 2),
        faceness=values[kept, 10], first=first[pair_kept], second=second[pair_kept],
        labels=labels[pair_kept].astype(bool), meta_digest=digest.hexdigest(), skipped=skipped, one_n=one_n)


def _load_aligned(path: Path, landmarks: np.ndarray, image_size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return align_face(image, landmarks, image_size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read {path}: {' '.join(str(error).split())}") from None


def aligned_batches(protocol: IjbProtocol, image_size: int, batch_size: int, *,
                    workers: int | None = None) -> Iterator[np.ndarray]:
    """uint8 [b, S, S, 3] batches of the protocol's images aligned by their landmarks, in order, decoded and
    aligned by threads one batch ahead of the consumer."""
    folder = protocol.root / "loose_crop"
    starts = range(0, len(protocol.images), batch_size)
    with ThreadPoolExecutor(_workers(workers)) as pool:
        def submit(start: int):
            return [pool.submit(_load_aligned, folder / protocol.images[index], protocol.landmarks[index], image_size)
                    for index in range(start, min(start + batch_size, len(protocol.images)))]

        pending = submit(starts[0])
        for index in range(len(starts)):
            ready = pending
            pending = submit(starts[index + 1]) if index + 1 < len(starts) else None
            yield np.stack([future.result() for future in ready])


def evaluate_ijb(
    checkpoints: Sequence[str | Path],
    root: str | Path,
    *,
    name: str,
    out_dir: str | Path,
    cache_dir: str | Path | None = None,
    skip_missing: bool = False,
    device: str = "auto",
    batch_size: int = 128,
    names: Sequence[str] | None = None,
    far_targets: Sequence[float] = IJB_FAR_TARGETS,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """IJB 1:1 verification of every network: one row per network with ``tar_at_far`` ({FAR: TAR}), ``auc``,
    ``fpr``/``tpr``, ``scores`` [P], counts and ``skipped``.

    Each image is aligned by its 5 landmarks, embedded with its flip (summed), weighted by its faceness score;
    templates and pair scores as :mod:`facekd.evaluation.ijb`. Image features are cached per checkpoint and
    protocol (the meta files' digests and the kept image names; the images themselves are not hashed) under
    ``cache_dir`` (default ``out_dir/embeddings``), memory-mapped while they are written. Writes
    ``out_dir/<name>.json``, ``out_dir/<name>.md`` (:func:`format_ijb_table`) and ``out_dir/roc_<name>.png``.
    """
    from facekd.eval import plot_roc, roc_auc
    from facekd.evaluation.suite import _load
    from facekd.network import resolve_device

    if not checkpoints:
        raise ConfigError("need at least one checkpoint, got none")
    if names is not None and len(names) != len(checkpoints):
        raise ConfigError(f"need one name per checkpoint, got {len(names)} names for {len(checkpoints)}")
    protocol = read_ijb(root, name, skip_missing=skip_missing)
    torch_device = resolve_device(device)
    out = Path(out_dir)
    cache = EmbeddingCache(Path(cache_dir) if cache_dir is not None else out / "embeddings")
    rows: list[dict[str, Any]] = []
    for network in _load(checkpoints, names, torch_device):
        variant = f"ijb-{network.image_size}px-{network.normalize}-flipsum"
        features = cache.load(network.digest, protocol.meta_digest, variant, mmap=True)
        cached = features is not None
        if features is None:
            with torch.no_grad():  # the width of the memory map: one blank image through the network
                blank = torch.zeros(1, 3, network.image_size, network.image_size, device=torch_device)
                embedding_dim = network.backbone.eval()(blank).shape[1]
            features = cache.create(network.digest, protocol.meta_digest, variant,
                                    (len(protocol.images), embedding_dim))
            embed_pixels(network.backbone, aligned_batches(protocol, network.image_size, batch_size),
                         total=len(protocol.images), device=torch_device, normalize=network.normalize, out=features,
                         progress=progress, desc=f"{network.label} on {name}")
            cache.commit(features, network.digest, protocol.meta_digest, variant, checkpoint=str(network.checkpoint),
                         data=str(protocol.root))
        template_ids, template_feats = template_features(features, protocol.faceness, protocol.templates,
                                                         protocol.medias)
        scores = pair_scores(template_ids, template_feats, protocol.first, protocol.second)
        tar, fpr, tpr = tar_at_far_from_scores(scores, protocol.labels, far_targets)
        rows.append({"model": network.label, "dataset": name, "checkpoint": str(network.checkpoint),
                     "tar_at_far": tar, "auc": roc_auc(fpr, tpr), "fpr": fpr, "tpr": tpr, "scores": scores,
                     "num_images": len(protocol.images), "num_templates": len(template_ids),
                     "num_pairs": len(scores), "num_same_pairs": int(protocol.labels.sum()),
                     "skipped": dict(protocol.skipped), "cached": cached})
        if protocol.one_n is not None:
            rows[-1]["identification"] = identify_1n(template_ids, template_feats, protocol.one_n)

    out.mkdir(parents=True, exist_ok=True)
    summary = [{key: ({f"{far:g}": tar for far, tar in value.items()} if key == "tar_at_far" else value)
                for key, value in row.items() if key not in ("fpr", "tpr", "scores")} for row in rows]
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    tables = [format_ijb_table(rows)] + ([format_ijb_1n_table(rows)] if protocol.one_n is not None else [])
    (out / f"{name}.md").write_text("\n\n".join(tables) + "\n")
    plot_roc({row["model"]: (row["fpr"], row["tpr"]) for row in rows}, out / f"roc_{name}.png",
             title=f"{name} 1:1 verification ROC")
    return rows


def format_ijb_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table in insightface's IJB layout: networks as rows, TAR (%) at each FAR as columns (``n/a`` where
    too few impostor pairs measure that FAR)."""
    if not rows:
        raise ValueError("format_ijb_table needs at least one row, got none")
    fars = list(rows[0]["tar_at_far"])
    lines = [[f"{rows[0]['dataset']} TAR@FAR"] + [f"{far:g}" for far in fars]]
    for row in rows:
        values = [row["tar_at_far"].get(far, math.nan) for far in fars]
        lines.append([str(row["model"])] + ["n/a" if math.isnan(value) else f"{100 * value:.2f}" for value in values])
    widths = [max(len(line[column]) for line in lines) for column in range(len(lines[0]))]
    rendered = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(line, widths)) + " |" for line in lines]
    rendered.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(rendered)


def identify_1n(template_ids: np.ndarray, features: np.ndarray, one_n: Mapping[str, Mapping[int, int]]) -> dict:
    """1:N figures of unit template features (:mod:`facekd.evaluation.ijb_1n`): closed-set ``rank1``/``rank5`` over
    both galleries, open-set ``tpir_at_fpir`` {gallery: {FPIR: TPIR}} for each gallery alone."""
    from facekd.evaluation.identification import identify

    def rows(subjects: Mapping[int, int]) -> tuple[np.ndarray, np.ndarray]:
        templates = np.fromiter(subjects, np.int64)
        return features[np.searchsorted(template_ids, templates)], np.fromiter(subjects.values(), np.int64)

    galleries = [key for key in one_n if key != "probes"]
    probe_features, probe_subjects = rows(one_n["probes"])
    union = {template: subject for key in galleries for template, subject in one_n[key].items()}
    gallery_features, gallery_subjects = rows(union)
    # closed set: a probe whose gallery template was skipped (--ijb-skip-missing) cannot be found: it counts as missed
    enrolled = np.isin(probe_subjects, gallery_subjects)
    closed = identify(probe_features[enrolled], probe_subjects[enrolled], gallery_features, gallery_subjects,
                      np.zeros((0, features.shape[1])), far_targets=(0.1,), max_rank=5)
    share = enrolled.mean()
    return {"rank1": closed.rank1 * share, "rank5": float(closed.cmc[4]) * share, "num_probes": len(probe_subjects),
            "num_probes_not_enrolled": int((~enrolled).sum()),
            "num_gallery": {key: len(one_n[key]) for key in galleries},
            "tpir_at_fpir": {key: tpir_at_fpir(probe_features, probe_subjects, *rows(one_n[key]), IJB_FPIR_TARGETS)
                             for key in galleries}}


def format_ijb_1n_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of the 1:N figures: rank-1, rank-5 (%) and TPIR (%) at each FPIR for each gallery."""
    first = rows[0]["identification"]
    columns = [(gallery, fpir) for gallery, tpirs in first["tpir_at_fpir"].items() for fpir in tpirs]
    lines = [[f"{rows[0]['dataset']} 1:N", "rank-1", "rank-5"]
             + [f"{gallery} TPIR@FPIR={fpir:g}" for gallery, fpir in columns]]
    for row in rows:
        figures = row["identification"]
        values = [figures["rank1"], figures["rank5"]] + [figures["tpir_at_fpir"][g][f] for g, f in columns]
        lines.append([str(row["model"])] + ["n/a" if math.isnan(value) else f"{100 * value:.2f}" for value in values])
    widths = [max(len(line[column]) for line in lines) for column in range(len(lines[0]))]
    rendered = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(line, widths)) + " |" for line in lines]
    rendered.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(rendered)
