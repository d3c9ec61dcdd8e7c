"""Deterministic, resumable streaming of training batches from WebDataset shards.

The stream a rank sees is a pure function of (seed, rank, world_size, num_workers, batch_size) and the shard
files, so a trainer that checkpoints its step can resume with ``start_batch=step`` and receive exactly the
batches an uninterrupted run would have received.

How batches are made (per rank; N = max(num_workers, 1) logical workers):

- global batch ``g`` (counted over epochs) is batch ``i = g % batches_per_epoch`` of epoch
  ``e = g // batches_per_epoch`` and is made by logical worker ``g % N``. PyTorch's DataLoader takes batches
  from its workers in strict round robin, so DataLoader worker ``j`` plays logical worker
  ``(j + start_batch) % N``: after a resume the round robin still lines up with the uninterrupted run.
- in epoch ``e`` each logical worker reads its own sample stream: with ``resampled=True`` shards drawn with
  replacement from all shards (seeded by seed, e, rank, worker); otherwise the shard list permuted by (seed, e),
  dealt to ranks and then to workers (``shards[rank::world][worker::N]``), read in passes (a worker whose quota
  outlasts its shards starts another pass in a new order). Samples pass a shuffle buffer seeded by
  (seed, e, rank, worker); without resampling the buffer is drained at the end of every pass, so that an epoch
  whose quota equals the data reads every sample exactly once.
- the worker's k-th batch of the epoch is samples ``[k·B, (k+1)·B)`` of that stream. Resuming skips the earlier
  samples without decoding them.
- a sample whose image does not decode, or that lacks ``.cls``, is skipped: its slot is refilled by repeating a
  valid sample of the same batch, so every batch holds ``batch_size`` samples and the sample positions above do
  not depend on decoding. The batch reports how many slots were refilled.
- images are decoded (PIL), resized to ``image_size`` when stored at another size, flipped horizontally with
  probability 1/2 (flip bits seeded by seed, rank, g) and normalised to (x − 127.5) / 128, float32 CHW.
"""

from __future__ import annotations

import io
import itertools
import logging
import random
import tarfile
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import tariterators

from facekd.data.convert import read_manifest

__all__ = ["Batch", "ShardLoader", "ShardReadError", "ShardStream", "build_train_loader", "decode_image"]

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png")

# tags that keep the random streams of one (seed, epoch, rank, worker) independent
_TAG_SHARD_ORDER, _TAG_RESAMPLE, _TAG_BUFFER, _TAG_FLIP, _TAG_PASS_ORDER = range(5)


class ShardReadError(RuntimeError):
    """A shard could not be opened or read; the message names its URL."""


class Batch(NamedTuple):
    """One training batch.

    images: float32 [B, 3, H, W], normalised to (x − 127.5) / 128, RGB.
    labels: int64 [B], class ids in [0, num_classes); −1 everywhere for a stream read without labels.
    num_corrupt: samples of this batch whose image was missing or did not decode (slots refilled).
    num_unlabelled: samples of this batch without a ``.cls`` entry (slots refilled).
    index: the batch's global index (counted over epochs) on this rank.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_corrupt: int
    num_unlabelled: int
    index: int


def _image_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = tuple(int(side) for side in image_size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return size  # type: ignore[return-value]


def decode_image(data: bytes, image_size: int | Sequence[int] = 112) -> torch.Tensor:
    """Decodes an encoded image to a float32 [3, H, W] tensor normalised to (x − 127.5) / 128 (no flip).

    The image is converted to RGB and resized (bilinear) to ``image_size`` (int or (H, W)) when its size
    differs. Raises ValueError when the bytes do not decode.
    """
    height, width = _image_hw(image_size)
    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot decode image of {len(data)} bytes: {error}") from None
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(rgb, dtype=np.float32)  # [H, W, 3]
    return torch.from_numpy(((pixels - 127.5) / 128.0).transpose(2, 0, 1).copy())


def _rng(*entropy: int) -> random.Random:
    """A Python RNG seeded from a tuple of non-negative ints through numpy's SeedSequence (no hash() salt)."""
    state = np.random.SeedSequence(list(entropy)).generate_state(2, dtype=np.uint64)
    return random.Random(int(state[0]) << 64 | int(state[1]))


def _shard_url(base: str, name: str) -> str:
    """URL of shard ``name`` under ``base``: a directory, an http(s) URL, or a template holding ``{name}``."""
    if "{name}" in base:
        return base.replace("{name}", name)
    return f"{base.rstrip('/')}/{name}"


def _read_shard(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples ({"__key__", "jpg", "cls", ...} with bytes values) of one shard, opened through webdataset."""
    try:
        yield from tariterators.tarfile_samples([{"url": url}])
    except (OSError, tarfile.TarError, ValueError, EOFError) as error:
        raise ShardReadError(f"cannot read shard {url}: {error}") from error


def _shuffled(samples: Iterator[dict[str, Any]], buffer_size: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """Shuffle buffer: once ``buffer_size`` samples are held, each new sample replaces a random held one, which
    is emitted; what is held when ``samples`` ends is emitted in random order. Size 0 keeps the order."""
    if buffer_size == 0:
        yield from samples
        return
    buffer: list[dict[str, Any]] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        position = rng.randrange(buffer_size)
        yield buffer[position]
        buffer[position] = sample
    rng.shuffle(buffer)
    yield from buffer


class ShardStream(IterableDataset):
    """IterableDataset yielding :class:`Batch` es forever from global batch ``start_batch`` on (see module doc).

    Use it with ``DataLoader(stream, batch_size=None, num_workers=stream.num_workers)``: the stream assumes
    that many workers (0 or 1: one logical worker) and the DataLoader's round robin.
    """

    def __init__(
        self,
        shard_urls: Sequence[str],
        shard_sizes: Sequence[int],
        *,
        num_classes: int,
        batch_size: int,
        batches_per_epoch: int,
        image_size: int | Sequence[int] = 112,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 2000,
        seed: int = 0,
        start_batch: int = 0,
        resampled: bool = True,
        flip: bool = True,
        use_labels: bool = True,
    ) -> None:
        super().__init__()
        if len(shard_urls) != len(shard_sizes) or not shard_urls:
            raise ValueError(
                f"need one size per shard and at least one shard, got {len(shard_urls)} urls and "
                f"{len(shard_sizes)} sizes"
            )
        if sum(shard_sizes) == 0:
            raise ValueError("all shards are empty")
        for name, value, lowest in (
            ("num_classes", num_classes, 1),
            ("batch_size", batch_size, 1),
            ("batches_per_epoch", batches_per_epoch, 1),
            ("world_size", world_size, 1),
            ("num_workers", num_workers, 0),
            ("shuffle_buffer", shuffle_buffer, 0),
            ("seed", seed, 0),
            ("start_batch", start_batch, 0),
        ):
            if value < lowest:
                raise ValueError(f"{name} must be >= {lowest}, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.logical_workers = max(num_workers, 1)
        streams = world_size * self.logical_workers
        nonempty = sum(1 for size in shard_sizes if size > 0)
        if not resampled and nonempty < streams:
            raise ValueError(
                f"{nonempty} non-empty shards cannot be dealt to world_size x workers = {streams} streams without "
                "resampling; use resampled=True, fewer workers or more shards"
            )
        self.shard_urls = list(shard_urls)
        self.shard_sizes = list(shard_sizes)
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.image_size = _image_hw(image_size)
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.start_batch = start_batch
        self.resampled = resampled
        self.flip = flip
        self.use_labels = use_labels

    # sample streams

    def _epoch_shards(self, epoch: int, worker: int) -> Iterator[list[int]]:
        """Passes over shard indices for (epoch, rank, worker); resampled: one endless pass."""
        if self.resampled:
            rng = _rng(self.seed, _TAG_RESAMPLE, epoch, self.rank, worker)
            candidates = [index for index, size in enumerate(self.shard_sizes) if size > 0]
            yield (rng.choice(candidates) for _ in itertools.count())  # type: ignore[misc]
            return
        order = [index for index, size in enumerate(self.shard_sizes) if size > 0]
        _rng(self.seed, _TAG_SHARD_ORDER, epoch).shuffle(order)
        mine = order[self.rank :: self.world_size][worker :: self.logical_workers]
        yield list(mine)
        for pass_number in itertools.count(1):
            again = list(mine)
            _rng(self.seed, _TAG_PASS_ORDER, epoch, self.rank, worker, pass_number).shuffle(again)
            yield again

    def _epoch_samples(self, epoch: int, worker: int) -> Iterator[dict[str, Any]]:
        """The shuffled raw-sample stream of logical ``worker`` in ``epoch`` (endless)."""
        buffer_rng = _rng(self.seed, _TAG_BUFFER, epoch, self.rank, worker)
        for shard_pass in self._epoch_shards(epoch, worker):
            raw = (sample for index in shard_pass for sample in _read_shard(self.shard_urls[index]))
            yield from _shuffled(raw, self.shuffle_buffer, buffer_rng)

    # batches

    def _owned_before(self, epoch: int, batch_in_epoch: int, worker: int) -> int:
        """How many batches of ``epoch`` before ``batch_in_epoch`` logical ``worker`` makes."""
        first = (worker - epoch * self.batches_per_epoch) % self.logical_workers
        return len(range(first, batch_in_epoch, self.logical_workers))

    def _make_batch(self, samples: list[dict[str, Any]], index: int) -> Batch:
        images: list[torch.Tensor | None] = []
        labels: list[int] = []
        num_corrupt = num_unlabelled = 0
        for sample in samples:
            image, label = self._decode_sample(sample)
            if label is None:
                num_unlabelled += 1
            elif image is None:
                num_corrupt += 1
            images.append(image)
            labels.append(-1 if label is None else label)
        valid = [position for position, image in enumerate(images) if image is not None]
        if not valid:
            keys = [sample.get("__key__") for sample in samples[:3]]
            raise ShardReadError(
                f"batch {index} on rank {self.rank}: none of its {len(samples)} samples has a decodable image and "
                f"a class (first keys {keys} from {samples[0].get('__url__')})"
            )
        # refill skipped slots with the batch's valid samples in turn, so the batch keeps batch_size samples
        refill = itertools.cycle(valid)
        order = [position if images[position] is not None else next(refill) for position in range(len(samples))]
        stacked = torch.stack([images[position] for position in order])  # type: ignore[misc]
        if self.flip:
            flip_rng = _rng(self.seed, _TAG_FLIP, self.rank, index)
            flips = torch.tensor([flip_rng.random() < 0.5 for _ in order])
            stacked[flips] = stacked[flips].flip(-1)
        label_tensor = torch.tensor([labels[position] for position in order], dtype=torch.int64)
        return Batch(stacked, label_tensor, num_corrupt, num_unlabelled, index)

    def _label(self, sample: dict[str, Any], where: str) -> int | None:
        """The sample's class id, None when it has none; an id outside the manifest's classes is an error."""
        if "cls" not in sample:
            logger.warning("%s has no .cls; skipped", where)
            return None
        try:
            label = int(sample["cls"])
        except ValueError:
            raise ShardReadError(f"{where}: .cls should be a decimal class id, got {sample['cls'][:20]!r}") from None
        if not 0 <= label < self.num_classes:
            raise ShardReadError(f"{where}: class {label} outside [0, {self.num_classes}) of the manifest")
        return label

    def _decode_sample(self, sample: dict[str, Any]) -> tuple[torch.Tensor | None, int | None]:
        """(image or None if corrupt, label or None if missing) of a raw sample."""
        where = f"sample {sample.get('__key__')} of {sample.get('__url__')}"
        label = self._label(sample, where) if self.use_labels else -1
        if label is None:
            return None, None
        data = next((sample[key] for key in IMAGE_KEYS if key in sample), None)
        if data is None:
            logger.warning("%s has no %s image; skipped", where, "/".join(IMAGE_KEYS))
            return None, label
        try:
            return decode_image(data, self.image_size), label
        except ValueError as error:
            logger.warning("%s: %s; skipped", where, error)
            return None, label

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        if info is None:
            worker_id, loader_workers = 0, 1
        else:
            worker_id, loader_workers = info.id, info.num_workers
        if loader_workers != self.logical_workers:
            raise RuntimeError(
                f"ShardStream was built for {self.num_workers} DataLoader workers but runs under {loader_workers}"
            )
        # DataLoader worker j plays logical worker (j + start_batch) % N, see the module docstring
        worker = (worker_id + self.start_batch) % self.logical_workers
        index = self.start_batch + (worker - self.start_batch) % self.logical_workers
        stream_epoch, stream, consumed = -1, iter(()), 0
        while True:
            epoch, batch_in_epoch = divmod(index, self.batches_per_epoch)
            if epoch != stream_epoch:
                stream_epoch, stream, consumed = epoch, self._epoch_samples(epoch, worker), 0
            first_sample = self._owned_before(epoch, batch_in_epoch, worker) * self.batch_size
            for _ in range(first_sample - consumed):  # resume: skip without decoding
                next(stream)
            samples = [next(stream) for _ in range(self.batch_size)]
            consumed = first_sample + self.batch_size
            yield self._make_batch(samples, index)
            index += self.logical_workers


class ShardLoader:
    """Endless iterable of :class:`Batch` es for one rank; each ``iter()`` starts at ``start_batch``.

    Attributes:
        batches_per_epoch: batches per epoch on each rank.
        num_classes, num_samples: from the manifest.
        stream: the underlying :class:`ShardStream`.
    """

    def __init__(self, stream: ShardStream, num_samples: int, pin_memory: bool = False) -> None:
        self.stream = stream
        self.batches_per_epoch = stream.batches_per_epoch
        self.num_classes = stream.num_classes
        self.num_samples = num_samples
        self.pin_memory = pin_memory

    def __iter__(self) -> Iterator[Batch]:
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.stream.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )
        return iter(loader)


def build_train_loader(
    manifest_path: str | Path,
    *,
    batch_size: int,
    image_size: int | Sequence[int] = 112,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    shuffle_buffer: int = 2000,
    seed: int = 0,
    start_batch: int = 0,
    resampled: bool = True,
    batches_per_epoch: int | None = None,
    base_url: str | None = None,
    flip: bool = True,
    pin_memory: bool = False,
    use_labels: bool = True,
) -> ShardLoader:
    """Builds the training batch stream of one rank from a shard manifest written by ``convert_to_shards``.

    Args:
        manifest_path: ``manifest.json`` or the directory holding it.
        batch_size: samples per batch on this rank.
        image_size: output size, int or (H, W); images stored at another size are resized.
        rank, world_size: this process's place among the data-parallel ranks.
        num_workers: DataLoader worker processes (0: decode in this process).
        shuffle_buffer: samples held by each worker's shuffle buffer.
        seed: seed of every random choice (shard order, resampling, buffer, flips).
        start_batch: global index (over epochs) of the first batch to yield; a resumed trainer passes its step.
        resampled: draw shards with replacement (endless, the usual choice at scale) instead of dealing them.
        batches_per_epoch: batches per epoch per rank; default num_samples // (batch_size · world_size).
        base_url: where the shards are, instead of the manifest's directory: a directory, an ``http(s)://``
            URL prefix, or any webdataset URL template holding ``{name}`` (e.g. ``pipe:aws s3 cp s3://b/{name} -``).
        flip: random horizontal flips.
        pin_memory: pin batches (for host-to-GPU copies).
        use_labels: False reads images only (labels −1): an unlabeled stream, e.g. SRRL's extension to
            unlabeled data. Its samples need no ``.cls``.

    Raises FileNotFoundError / ValueError for a missing or invalid manifest and for missing local shards.
    """
    manifest, manifest_dir = read_manifest(manifest_path)
    base = str(manifest_dir) if base_url is None else base_url
    names = [shard["name"] for shard in manifest["shards"]]
    urls = [_shard_url(base, name) for name in names]
    if "://" not in base and not base.startswith("pipe:"):
        for shard, url in zip(manifest["shards"], urls):
            path = Path(url)
            if not path.is_file():
                raise FileNotFoundError(f"shard {path} listed in {manifest_dir / 'manifest.json'} does not exist")
            expected = shard.get("size")
            if expected is not None and path.stat().st_size != expected:
                raise ValueError(f"shard {path} is {path.stat().st_size} bytes, the manifest says {expected}")
    num_samples = manifest["num_samples"]
    if batches_per_epoch is None:
        batches_per_epoch = num_samples // (batch_size * world_size)
        if batches_per_epoch == 0:
            raise ValueError(
                f"{num_samples} samples make no batch of {batch_size} per rank on {world_size} ranks; "
                "lower batch_size or pass batches_per_epoch"
            )
    stream = ShardStream(
        urls,
        [shard["num_samples"] for shard in manifest["shards"]],
        num_classes=manifest["num_classes"],
        batch_size=batch_size,
        batches_per_epoch=batches_per_epoch,
        image_size=image_size,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        start_batch=start_batch,
        resampled=resampled,
        flip=flip,
        use_labels=use_labels,
    )
    return ShardLoader(stream, num_samples, pin_memory=pin_memory)
