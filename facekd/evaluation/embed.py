"""Fast, cached embedding of image sets for evaluation.

Images are decoded to uint8 by a pool of threads (Pillow releases the GIL while it decodes), moved to the
device as uint8 (a quarter of float32's bytes; pinned and asynchronous on a GPU) and normalised there as
the network was trained. Each image is embedded with its horizontal flip and the two summed, as
:func:`facekd.eval.embed_images` does; the numbers are the same.

Embeddings are cached per (checkpoint, data file): the key is the sha256 of the checkpoint's
``index.json`` (which lists the sha256 of every checkpoint file, so it changes with any weight) and the
sha256 of the data file, plus the image size and normalisation. A changed checkpoint or file is therefore
re-embedded; an unchanged one never is.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from facekd.data.loader import to_float
from facekd.distributed.checkpoint import INDEX
from facekd.errors import CheckpointError, ConfigError, DataError

__all__ = ["EmbeddingCache", "checkpoint_digest", "decode_pixels", "decoded_batches", "embed_pixels", "file_digest"]

_HASH_BLOCK = 1 << 22


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_digest(path: str | os.PathLike[str]) -> tuple[Path, str]:
    """The checkpoint folder ``path`` names (:func:`facekd.network.checkpoint_folder`) and the sha256 of its
    ``index.json``."""
    from facekd.network import checkpoint_folder

    folder = checkpoint_folder(path)
    if not (folder / INDEX).is_file():
        raise CheckpointError(f"{path}: no checkpoint there (no {INDEX} in {folder} or a checkpoints/ folder below)")
    return folder, file_digest(folder / INDEX)


def _decode(data: bytes, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3] RGB pixels of encoded bytes, resized (bilinear) when stored at another size, as
    :func:`facekd.data.loader.decode_image` resizes."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot decode image of {len(data)} bytes: {' '.join(str(error).split())}") from None
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(image)


def _workers(workers: int | None) -> int:
    return max(1, min(8, os.cpu_count() or 1)) if workers is None else max(1, workers)


def decoded_batches(
    images: Sequence[bytes], image_size: int, batch_size: int, *, workers: int | None = None,
) -> Iterator[np.ndarray]:
    """uint8 [b, H, W, 3] batches of ``images`` in order, decoded by ``workers`` threads (default: the cores, at
    most 8) one batch ahead of the consumer."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, len(images), batch_size)
    with ThreadPoolExecutor(_workers(workers)) as pool:
        def submit(start: int):
            return [pool.submit(_decode, data, image_size, image_size) for data in images[start:start + batch_size]]

        pending = submit(starts[0]) if starts else None
        for index in range(len(starts)):
            ready = pending
            pending = submit(starts[index + 1]) if index + 1 < len(starts) else None
            yield np.stack([future.result() for future in ready])


def decode_pixels(images: Sequence[bytes], image_size: int, *, workers: int | None = None,
                  progress: bool = True, desc: str = "decoding") -> np.ndarray:
    """uint8 [N, H, W, 3] pixels of all ``images`` (decoded once, then embedded by as many networks as wanted)."""
    out = np.empty((len(images), image_size, image_size, 3), np.uint8)
    start = 0
    batches = decoded_batches(images, image_size, 256, workers=workers)
    for batch in tqdm(batches, total=-(-len(images) // 256), desc=desc, unit="batch", disable=not progress):
        out[start:start + len(batch)] = batch
        start += len(batch)
    return out


def embed_pixels(
    model: torch.nn.Module,
    batches: Iterable[np.ndarray],
    *,
    total: int,
    device: torch.device | str,
    normalize: str = "mxnet",
    out: np.ndarray | None = None,
    progress: bool = True,
    desc: str = "embedding",
) -> np.ndarray:
    """Flip-summed embeddings ``f(x) + f(flip(x))`` of ``total`` images given as uint8 [b, H, W, 3] batches,
    float32 [total, D], written into ``out`` when given (a memory map of a large set). ``normalize`` is the
    network's ``model.normalize`` (:func:`facekd.data.loader.to_float`), applied on the device.

    The model runs in eval mode under ``torch.no_grad()`` and is put back in its previous mode afterwards.
    """
    device = torch.device(device)
    pin = device.type == "cuda"
    was_training = model.training
    model.eval()
    start = 0
    try:
        with torch.no_grad(), tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
            for batch in batches:
                pixels = torch.from_numpy(np.ascontiguousarray(batch))
                if pin:
                    pixels = pixels.pin_memory()
                images = to_float(pixels.to(device, non_blocking=pin), normalize)
                embedding = model(images)
                if not isinstance(embedding, torch.Tensor) or embedding.ndim != 2 or embedding.shape[0] != len(batch):
                    shape = tuple(embedding.shape) if isinstance(embedding, torch.Tensor) else type(embedding).__name__
                    raise ValueError(f"model must return a [{len(batch)}, D] embedding tensor, got {shape}")
                embedding = (embedding + model(images.flip(-1))).float().cpu().numpy()
                if out is None:
                    out = np.empty((total, embedding.shape[1]), np.float32)
                if start + len(batch) > total or out.shape[1] != embedding.shape[1]:
                    raise ValueError(f"embeddings of {start + len(batch)}+ images ({embedding.shape[1]}-d) do not fit "
                                     f"the output {tuple(out.shape)}")
                out[start:start + len(batch)] = embedding
                start += len(batch)
                bar.update(len(batch))
    finally:
        model.train(was_training)
    if start != total:
        raise ValueError(f"got {start} images, expected {total}")
    if out is None:
        raise ValueError("no images to embed")
    return out


class EmbeddingCache:
    """Embeddings on disk under ``folder/<checkpoint digest>/<data digest>-<variant>.npy`` with a JSON beside
    each naming the full digests and the sources. Files are written under a temporary name and renamed, so a
    killed run leaves no half-written entry; :meth:`load` can memory-map (a million distractors need not fit
    in memory twice)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def path(self, checkpoint_sha: str, data_sha: str, variant: str) -> Path:
        return self.folder / checkpoint_sha[:16] / f"{data_sha[:16]}-{variant}.npy"

    def load(self, checkpoint_sha: str, data_sha: str, variant: str, *, mmap: bool = False) -> np.ndarray | None:
        """The cached embeddings, or None when there are none for exactly these digests."""
        path = self.path(checkpoint_sha, data_sha, variant)
        meta_path = path.with_suffix(".json")
        if not path.is_file() or not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text())
        if meta.get("checkpoint_sha256") != checkpoint_sha or meta.get("data_sha256") != data_sha:
            return None
        return np.load(path, mmap_mode="r" if mmap else None)

    def create(self, checkpoint_sha: str, data_sha: str, variant: str, shape: tuple[int, int]) -> np.memmap:
        """A float32 memory map to fill (under a temporary name until :meth:`commit`)."""
        path = self.path(checkpoint_sha, data_sha, variant)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        return np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=shape)

    def commit(self, array: np.memmap, checkpoint_sha: str, data_sha: str, variant: str, **sources: str) -> Path:
        """Flush a map from :meth:`create` and give it its final name (its JSON first, so the pair is whole)."""
        path = self.path(checkpoint_sha, data_sha, variant)
        array.flush()
        meta = {"checkpoint_sha256": checkpoint_sha, "data_sha256": data_sha, "variant": variant,
                "shape": list(array.shape), **sources}
        descriptor, temp = tempfile.mkstemp(dir=path.parent, suffix=".json.partial")
        with os.fdopen(descriptor, "w") as f:
            f.write(json.dumps(meta, indent=2) + "\n")
        os.replace(temp, path.with_suffix(".json"))
        os.replace(array.filename, path)
        return path

    def save(self, embeddings: np.ndarray, checkpoint_sha: str, data_sha: str, variant: str, **sources: str) -> Path:
        array = self.create(checkpoint_sha, data_sha, variant, embeddings.shape)
        array[...] = embeddings
        return self.commit(array, checkpoint_sha, data_sha, variant, **sources)
