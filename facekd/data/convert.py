"""Conversion of face training sets (insightface RecordIO or image folders) into WebDataset tar shards.

Output layout of ``convert_to_shards(source, out_dir)``::

    out_dir/shard-000000.tar        samples "<key>.jpg" (encoded image) + "<key>.cls" (decimal class id)
    out_dir/shard-000000.json       sidecar: the shard's sample count, size, sha256 and conversion settings
    out_dir/...
    out_dir/manifest.json           written last; see MANIFEST_FORMAT_VERSION

A sample's ``__key__`` is its position (``%09d``) in the conversion order, class ids are remapped to
``0..C-1`` (folders: sorted identity names; RecordIO: sorted distinct labels) and ``class_names[c]`` in the
manifest names class ``c`` (the folder name, or the source label in decimal). PNG inputs are stored under
``.png`` instead of ``.jpg``; images are never re-encoded.

The conversion is resumable: a shard is written under ``.shard-NNNNNN.tar.partial``, then renamed, then its
sidecar is renamed into place; a re-run keeps every shard whose sidecar matches the run's settings and whose
tar has the recorded size and sha256, and rewrites the others. Images that fail to decode are skipped, counted
per shard and in the manifest, and logged.

Problems of the user's data (missing or malformed sources, manifests, shards) raise
:class:`~facekd.errors.DataError` naming the file; bad options raise :class:`~facekd.errors.ConfigError`.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

from PIL import Image
from tqdm import tqdm

from facekd.data.recordio import RecordIOReader, read_property
from facekd.data.verification import load_bin
from facekd.errors import ConfigError, DataError

__all__ = ["MANIFEST_FORMAT_VERSION", "convert_to_shards", "inspect_dataset", "read_manifest", "shard_name"]

logger = logging.getLogger(__name__)

MANIFEST_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_TAR_MTIME = 0  # fixed member times keep shard bytes (and sha256) a function of the input alone
_REC_NAMES = ("train.rec", "train.idx")


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``shard-000003.tar``."""
    return f"shard-{index:06d}.tar"


@dataclass(frozen=True)
class _Source:
    """What a conversion reads: ``kind`` "rec" (rec_path, idx_path) or "folder" (root)."""

    kind: str
    path: Path
    idx_path: Path | None = None


@dataclass(frozen=True)
class _ShardTask:
    """One shard to write. ``refs``: (sample key, source reference, class id); reference = rec key or file path."""

    index: int
    source: _Source
    refs: tuple[tuple[int, int | str, int], ...]
    out_dir: Path
    settings: dict[str, Any]


def _detect_source(source: Path) -> _Source:
    if not source.exists():
        raise DataError(f"conversion source {source} does not exist")
    if source.is_file():
        if source.suffix != ".rec":
            raise DataError(f"conversion source {source} is a file but not a .rec; expected a .rec or a directory")
        idx_path = source.with_suffix(".idx")
        return _Source("rec", source, idx_path if idx_path.is_file() else None)
    if (source / "train.rec").is_file():
        idx_path = source / "train.idx"
        return _Source("rec", source / "train.rec", idx_path if idx_path.is_file() else None)
    if any(child.is_dir() for child in source.iterdir()):
        return _Source("folder", source)
    raise DataError(
        f"conversion source {source} holds neither train.rec nor identity sub-folders (root/<identity>/*.jpg)"
    )


def _list_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(relative image path, class id)]) of an image folder, both in sorted order."""
    class_names: list[str] = []
    samples: list[tuple[str, int]] = []
    for identity_dir in sorted(child for child in root.iterdir() if child.is_dir()):
        images = sorted(
            path for path in identity_dir.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not images:
            logger.warning("%s: identity folder has no %s images; it is not a class", identity_dir, IMAGE_EXTENSIONS)
            continue
        class_id = len(class_names)
        class_names.append(identity_dir.name)
        samples.extend((str(path.relative_to(root)), class_id) for path in images)
    if not samples:
        raise DataError(f"image folder {root} holds no {IMAGE_EXTENSIONS} images in identity sub-folders")
    return class_names, samples


def _list_rec(source: _Source, show_progress: bool) -> tuple[list[str], list[tuple[int, int]], dict[str, Any]]:
    """(class names, [(rec key, class id)], extra manifest fields) of a RecordIO file."""
    with RecordIOReader(source.path, source.idx_path) as reader:
        keys = reader.image_keys
        labels = [
            reader.read_label(key)
            for key in tqdm(keys, desc=f"labels of {source.path.name}", unit="img", disable=not show_progress)
        ]
        extra: dict[str, Any] = {"rec_layout": reader.layout}
    distinct = sorted(set(labels))
    class_of = {label: class_id for class_id, label in enumerate(distinct)}
    property_path = source.path.parent / "property"
    if property_path.is_file():
        num_classes, height, width = read_property(property_path)
        extra["image_size"] = [height, width]
        if num_classes < len(distinct):
            logger.warning(
                "%s says %d classes but %s holds %d distinct labels",
                property_path,
                num_classes,
                source.path,
                len(distinct),
            )
    return [str(label) for label in distinct], [(key, class_of[label]) for key, label in zip(keys, labels)], extra


def _image_format(data: bytes) -> tuple[str, tuple[int, int]]:
    """Decodes ``data`` fully; returns ("jpg" | "png", (height, width)). Raises ValueError when it cannot."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            image_format, (width, height) = image.format, image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot decode image: {error}") from None
    if image_format == "JPEG":
        return "jpg", (height, width)
    if image_format == "PNG":
        return "png", (height, width)
    raise ValueError(f"image format {image_format} is neither JPEG nor PNG")


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = _TAR_MTIME
    info.mode = 0o444
    info.uname = info.gname = "facekd"
    tar.addfile(info, io.BytesIO(data))


def _sidecar_path(out_dir: Path, index: int) -> Path:
    return out_dir / shard_name(index).replace(".tar", ".json")


def _read_sidecar(out_dir: Path, index: int) -> dict[str, Any] | None:
    path = _sidecar_path(out_dir, index)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def _completed_shard(task: _ShardTask) -> dict[str, Any] | None:
    """The sidecar of an already written shard of this conversion, or None if it must be (re)written."""
    sidecar = _read_sidecar(task.out_dir, task.index)
    tar_path = task.out_dir / shard_name(task.index)
    if sidecar is None or not tar_path.is_file():
        return None
    if sidecar.get("settings") != task.settings:
        previous = sidecar.get("settings") or {}
        differing = sorted(key for key in {**task.settings, **previous} if task.settings.get(key) != previous.get(key))
        raise DataError(
            f"{_sidecar_path(task.out_dir, task.index)} was written by a conversion with other settings "
            f"({', '.join(differing)} differ); use an empty output directory"
        )
    if tar_path.stat().st_size != sidecar.get("size"):
        return None
    # a shard damaged in place keeps its size: only its digest tells
    with open(tar_path, "rb") as f:
        if _sha256(f) != sidecar.get("sha256"):
            logger.warning("%s: sha256 differs from the one recorded when it was written; rewriting it", tar_path)
            return None
    return sidecar


def _read_source_image(task: _ShardTask, reader: RecordIOReader | None, ref: int | str) -> bytes:
    if reader is not None:
        return reader.read(int(ref))[2]
    return (task.source.path / str(ref)).read_bytes()


def _write_shard(task: _ShardTask) -> dict[str, Any]:
    """Writes one shard (tar under a temporary name, then renamed; sidecar last); returns its sidecar."""
    tar_path = task.out_dir / shard_name(task.index)
    partial_path = task.out_dir / f".{shard_name(task.index)}.partial"
    num_samples, corrupt, image_sizes = 0, [], set()
    reader = RecordIOReader(task.source.path, task.source.idx_path) if task.source.kind == "rec" else None
    try:
        with tarfile.open(partial_path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, ref, class_id in task.refs:
                data = _read_source_image(task, reader, ref)
                try:
                    extension, size = _image_format(data)
                except ValueError as error:
                    logger.warning("skipping corrupt image %s (%s): %s", ref, task.source.path, error)
                    corrupt.append(str(ref))
                    continue
                image_sizes.add(size)
                _add_member(tar, f"{key:09d}.{extension}", data)
                _add_member(tar, f"{key:09d}.cls", str(class_id).encode("ascii"))
                num_samples += 1
    finally:
        if reader is not None:
            reader.close()
    with open(partial_path, "rb") as f:
        digest = _sha256(f)
        os.fsync(f.fileno())
    sidecar = {
        "name": tar_path.name,
        "num_samples": num_samples,
        "num_corrupt": len(corrupt),
        "corrupt": corrupt,
        "size": partial_path.stat().st_size,
        "sha256": digest,
        "image_sizes": sorted([list(size) for size in image_sizes]),
        "settings": task.settings,
    }
    os.replace(partial_path, tar_path)
    _write_json_atomically(_sidecar_path(task.out_dir, task.index), sidecar)
    return sidecar


def _sha256(f: BinaryIO) -> str:
    """Hex sha256 of what remains of an open binary file."""
    digest = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def _write_json_atomically(path: Path, content: dict[str, Any]) -> None:
    temp_path = path.with_name(f".{path.name}.partial")
    with open(temp_path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp_path, path)


def convert_to_shards(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    shard_size: int = 10000,
    shuffle: bool = True,
    seed: int = 0,
    show_progress: bool = True,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Converts a RecordIO file or an image folder into WebDataset shards; returns the manifest.

    Args:
        source: a ``.rec`` (its ``.idx`` beside it is used when present), a directory holding ``train.rec``,
            or an image folder ``root/<identity>/<image>.jpg|.jpeg|.png``.
        out_dir: output directory (created); shards of an interrupted run of the same conversion are reused.
        shard_size: samples per shard before corrupt images are dropped (the last shard may hold fewer).
        shuffle: shuffle the sample order with ``seed`` before sharding, so that each shard mixes identities.
        seed: seed of that shuffle.
        show_progress: draw tqdm progress bars.
        num_workers: processes that write shards in parallel (0: write them in this process).

    Returns:
        The manifest also written to ``out_dir/manifest.json``: format_version, num_classes, num_samples,
        num_corrupt, shards [{name, num_samples, size, sha256}], class_names, image_size ([H, W] when all
        images share it, else None), source, source_type, shard_size, shuffle, seed, created.
    """
    if shard_size <= 0:
        raise ConfigError(f"shard_size must be positive, got {shard_size}")
    if num_workers < 0:
        raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
    detected = _detect_source(Path(source).resolve())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.partial"):
        stale.unlink()

    # list samples and classes in a fixed order, then shuffle with the seed
    extra: dict[str, Any] = {}
    refs: list[tuple[int | str, int]]
    if detected.kind == "rec":
        class_names, rec_refs, extra = _list_rec(detected, show_progress)
        refs = list(rec_refs)
    else:
        class_names, folder_refs = _list_folder(detected.path)
        refs = list(folder_refs)
    if shuffle:
        random.Random(seed).shuffle(refs)
    settings = {
        "source": str(detected.path),
        "source_type": detected.kind,
        "num_source_samples": len(refs),
        "num_classes": len(class_names),
        "shard_size": shard_size,
        "shuffle": shuffle,
        "seed": seed,
    }
    tasks = [
        _ShardTask(
            index=start // shard_size,
            source=detected,
            refs=tuple(
                (key, ref, class_id) for key, (ref, class_id) in enumerate(refs[start : start + shard_size], start)
            ),
            out_dir=out,
            settings=settings,
        )
        for start in range(0, len(refs), shard_size)
    ]

    # write the shards that an earlier run did not finish (hashing the finished ones shows a bar if it is slow)
    sidecars: dict[int, dict[str, Any]] = {}
    pending = []
    checking = tqdm(tasks, desc="checking written shards", unit="shard", delay=2.0, disable=not show_progress)
    for task in checking:
        done = _completed_shard(task)
        if done is None:
            pending.append(task)
        else:
            sidecars[task.index] = done
    if sidecars:
        logger.info("%s: %d of %d shards already complete", out, len(sidecars), len(tasks))
    progress = tqdm(total=len(tasks), initial=len(sidecars), desc="shards", unit="shard", disable=not show_progress)
    with progress:
        for task, sidecar in zip(pending, _run_tasks(pending, num_workers)):
            sidecars[task.index] = sidecar
            progress.update(1)

    # the manifest comes last, so its presence means every shard is complete
    image_sizes = {tuple(size) for sidecar in sidecars.values() for size in sidecar["image_sizes"]}
    num_corrupt = sum(sidecar["num_corrupt"] for sidecar in sidecars.values())
    if num_corrupt:
        logger.warning("%s: skipped %d corrupt images of %d", detected.path, num_corrupt, len(refs))
    manifest = {
        "format_version": MANIFEST_FORMAT_VERSION,
        "num_classes": len(class_names),
        "num_samples": sum(sidecar["num_samples"] for sidecar in sidecars.values()),
        "num_corrupt": num_corrupt,
        "image_size": list(image_sizes.pop()) if len(image_sizes) == 1 else extra.get("image_size"),
        "shards": [
            {key: sidecars[index][key] for key in ("name", "num_samples", "size", "sha256")}
            for index in range(len(tasks))
        ],
        "class_names": class_names,
        "source": str(detected.path),
        "source_type": detected.kind,
        **{key: value for key, value in extra.items() if key != "image_size"},
        "shard_size": shard_size,
        "shuffle": shuffle,
        "seed": seed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_json_atomically(out / MANIFEST_NAME, manifest)
    return manifest


def _run_tasks(tasks: Sequence[_ShardTask], num_workers: int) -> Iterator[dict[str, Any]]:
    """Sidecars of the written shards, in task order."""
    if num_workers == 0:
        yield from map(_write_shard, tasks)
        return
    # spawn: forking a process that may hold threads (torch, ray) can deadlock the children
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
        yield from pool.map(_write_shard, tasks)


def read_json(path: Path) -> Any:
    """The JSON value in the UTF-8 file ``path``; a DataError naming the file when it is not valid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error})") from None


def read_manifest(path: str | os.PathLike[str]) -> tuple[dict[str, Any], Path]:
    """Loads and validates a shard manifest (a ``manifest.json`` or the directory holding it).

    Returns (manifest, directory of the manifest). Raises DataError naming the file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"shard manifest {path} does not exist")
    manifest = read_json(path)
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format_version") != MANIFEST_FORMAT_VERSION:
        raise DataError(
            f"{path}: format_version {manifest.get('format_version')!r}, expected {MANIFEST_FORMAT_VERSION}"
        )
    for field, kind in (("num_classes", int), ("num_samples", int), ("shards", list)):
        if not isinstance(manifest.get(field), kind):
            raise DataError(f"{path}: field {field!r} should be {kind.__name__}, got {manifest.get(field)!r}")
    for position, shard in enumerate(manifest["shards"]):
        valid = (
            isinstance(shard, dict)
            and isinstance(shard.get("name"), str)
            and isinstance(shard.get("num_samples"), int)
            and shard["num_samples"] >= 0
        )
        if not valid:
            raise DataError(
                f"{path}: shards[{position}] should be {{name: str, num_samples: int >= 0}}, got {shard!r}"
            )
    if sum(shard["num_samples"] for shard in manifest["shards"]) != manifest["num_samples"]:
        raise DataError(f"{path}: shard sample counts do not add up to num_samples {manifest['num_samples']}")
    return manifest, path.parent


def _inspect_tar(path: Path) -> tuple[int, str | None]:
    """(samples found, problem or None) of a shard tar; a sample is a key with a ``.cls`` member."""
    file_size = path.stat().st_size
    keys: set[str] = set()
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                member_end = member.offset_data + member.size
                if member_end > file_size:
                    return len(keys), f"member {member.name} ends at byte {member_end}, beyond the file's {file_size}"
                if member.name.endswith(".cls"):
                    keys.add(member.name[: -len(".cls")])
    except tarfile.TarError as error:
        return len(keys), f"unreadable tar ({error})"
    return len(keys), None


def inspect_dataset(
    path: str | os.PathLike[str], *, verify_digests: bool = True, show_progress: bool = True
) -> dict[str, Any]:
    """Summarises a data set and checks it; ``path`` is a shard directory or manifest, a ``.rec`` (or a
    directory holding ``train.rec``), an image folder, or a verification ``.bin``.

    Every summary has ``type`` ("shards" | "rec" | "folder" | "verification"). Shards: num_classes,
    num_samples, num_shards, digests_verified, shards [{name, expected, found, status: ok | missing | truncated |
    count mismatch | digest mismatch, problem}], ok (every shard present, complete, with the manifest's sample
    count and — unless ``verify_digests`` is False — its size and sha256). rec: layout, num_images,
    num_records, num_classes (property file, else header K), image_size. folder: num_classes, num_images.
    verification: num_pairs, num_positive (every image is decoded). ``show_progress`` draws a tqdm bar while
    the shards are hashed, if that takes more than a moment.

    Raises DataError for a path that does not exist or cannot be read as any of these.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if path.name == MANIFEST_NAME or (path.is_dir() and (path / MANIFEST_NAME).is_file()):
        return _inspect_shards(path, verify_digests, show_progress)
    if path.suffix == ".bin":
        _, issame = load_bin(path)
        return {
            "type": "verification", "path": str(path), "num_pairs": len(issame), "num_positive": int(issame.sum())
        }
    source = _detect_source(path)
    if source.kind == "folder":
        class_names, samples = _list_folder(source.path)
        return {"type": "folder", "path": str(path), "num_classes": len(class_names), "num_images": len(samples)}
    with RecordIOReader(source.path, source.idx_path) as reader:
        summary: dict[str, Any] = {
            "type": "rec",
            "path": str(source.path),
            "layout": reader.layout,
            "num_images": reader.num_images,
            "num_records": len(reader.keys),
            "num_classes": reader.num_identities,
            "image_size": None,
        }
    property_path = source.path.parent / "property"
    if property_path.is_file():
        num_classes, height, width = read_property(property_path)
        summary.update(num_classes=num_classes, image_size=[height, width])
    return summary


def _inspect_shard(shard: dict[str, Any], shard_path: Path, verify_digest: bool) -> dict[str, Any]:
    """One shard's entry of ``inspect_dataset``: the first problem found, in the order of the statuses."""
    entry = {"name": shard["name"], "expected": shard["num_samples"], "found": 0, "status": "ok", "problem": None}
    if not shard_path.is_file():
        return {**entry, "status": "missing", "problem": f"{shard_path} does not exist"}
    found, problem = _inspect_tar(shard_path)
    entry["found"] = found
    size, expected_size = shard_path.stat().st_size, shard.get("size")
    if problem is None and expected_size is not None and size < expected_size:
        problem = f"{size} bytes, manifest says {expected_size}"
    if problem is not None:
        return {**entry, "status": "truncated", "problem": problem}
    if found != shard["num_samples"]:
        problem = f"{found} samples, manifest says {shard['num_samples']}"
        return {**entry, "status": "count mismatch", "problem": problem}
    if verify_digest and expected_size is not None and size != expected_size:
        return {**entry, "status": "digest mismatch", "problem": f"{size} bytes, manifest says {expected_size}"}
    if verify_digest and shard.get("sha256") is not None:
        with open(shard_path, "rb") as f:
            digest = _sha256(f)
        if digest != shard["sha256"]:
            problem = f"sha256 {digest}, manifest says {shard['sha256']}"
            return {**entry, "status": "digest mismatch", "problem": problem}
    return entry


def _inspect_shards(path: Path, verify_digests: bool, show_progress: bool) -> dict[str, Any]:
    manifest, directory = read_manifest(path)
    shards = [
        _inspect_shard(shard, directory / shard["name"], verify_digests)
        for shard in tqdm(manifest["shards"], desc="checking shards", unit="shard", delay=2.0,
                          disable=not show_progress)
    ]
    return {
        "type": "shards",
        "path": str(directory),
        "num_classes": manifest["num_classes"],
        "num_samples": manifest["num_samples"],
        "num_shards": len(shards),
        "num_corrupt_skipped": manifest.get("num_corrupt", 0),
        "digests_verified": verify_digests,
        "shards": shards,
        "ok": all(entry["status"] == "ok" for entry in shards),
    }
