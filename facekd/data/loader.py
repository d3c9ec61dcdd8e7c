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

Where the time goes (``facekd bench data`` measures it, per core): the JPEG decode dominates. Each image is
written to its batch slot as soon as it is decoded, while its pixels are in cache: one numpy pass converts the
uint8 pixels to float while reading them channel-planar (backwards for a flip), two in-place passes in cache
normalise — exact, so batches are bit-identical to decoding each image to float on its own
(:func:`decode_image`). Shards are read by a small tar parser (:func:`_tar_members`), five times faster
than webdataset's reader through :mod:`tarfile`. With ``uint8_pixels=True`` batches stay uint8 and
:func:`to_float` converts them on the device, which saves the float conversion on the CPU and three quarters of
the host-to-device traffic.

Damaged data fails loudly with :class:`~facekd.errors.DataError` naming the shard or sample: a tar that ends
early or holds a damaged header, a bad ``.cls``, or shards that yield no sample at all (the stream would wait
forever). A shard that yields another number of samples than the manifest says is logged once.
"""

from __future__ import annotations

import io
import itertools
import logging
import random
import re
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, NamedTuple, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen

from facekd.data.convert import read_manifest
from facekd.errors import ConfigError, DataError, FacekdError

__all__ = [
    "Batch", "ShardLoader", "ShardReadError", "ShardStream", "build_train_loader", "check_enough_shards", "decode_image",
    "epoch_length", "NORMALIZATIONS", "check_normalize", "to_float",
]

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png")

# tags that keep the random streams of one (seed, epoch, rank, worker) independent
_TAG_SHARD_ORDER, _TAG_RESAMPLE, _TAG_BUFFER, _TAG_FLIP, _TAG_PASS_ORDER = range(5)

# Resampled shard draws in a row that may yield nothing before the stream gives up. Also at least the number of
# non-empty shards; with half of 2 shards really empty a run of 64 empty draws has probability 2**-64.
_MIN_BARREN_DRAWS = 64


class ShardReadError(DataError):
    """A shard could not be opened or read, or its samples are unusable; the message names its URL."""


class Batch(NamedTuple):
    """One training batch.

    images: float32 [B, 3, H, W], normalised to (x − 127.5) / 128, RGB; read with ``uint8_pixels``: uint8
        [B, H, W, 3] RGB pixels, which :func:`to_float` normalises on the device.
    labels: int64 [B], class ids in [0, num_classes); −1 everywhere for a stream read without labels.
    num_corrupt: samples of this batch whose image was missing or did not decode (slots refilled).
    num_unlabelled: samples of this batch without a ``.cls`` entry (slots refilled).
    index: the batch's global index (counted over epochs) on this rank.
    keys: each slot's webdataset ``__key__`` (a refilled slot: the key of the sample it repeats), so that a
        per-image value kept elsewhere (CondFace's k-means pseudo-labels) can be looked up.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_corrupt: int
    num_unlabelled: int
    index: int
    keys: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# Reading shards: tar members → webdataset samples
# ---------------------------------------------------------------------------------------------

_BLOCK = 512
_END_OF_ARCHIVE = bytes(_BLOCK)
_READ_BUFFER = 1 << 20
_REGULAR_TYPES = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
_GNU_LONG_NAME, _PAX_HEADER, _PAX_GLOBAL_HEADER = b"L", b"x", b"g"
# webdataset's grouping rules (tariterators.base_plus_ext, skip_meta): key = path up to the first dot of the
# file name, extension = the rest, lower-cased; members named __*__ are metadata and skipped
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META_MEMBER = re.compile(r"__[^/]*__($|/)")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _tar_number(field: bytes) -> int:
    """A numeric header field: NUL/space-terminated octal, or GNU base-256 (top bit set). ValueError if neither."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _pax_records(content: bytes) -> dict[str, str]:
    """The ``length key=value\\n`` records of a pax extended header."""
    records: dict[str, str] = {}
    position = 0
    while position < len(content) and content[position] != 0:
        length = int(content[position : content.index(b" ", position)])
        key, _, value = content[content.index(b" ", position) + 1 : position + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        position += length
    if int(records.get("size", 0)) < 0:
        raise ValueError(f"negative size {records['size']}")
    return records


def _tar_members(stream: BinaryIO, url: str) -> Iterator[tuple[str, bytes]]:
    """(name, content) of each regular file of an uncompressed tar stream, in order.

    Reads what Python's tarfile, GNU tar and webdataset's TarWriter write: POSIX ustar and GNU headers, GNU long
    names and pax ``path`` / ``size`` records; verifies each header's checksum. A stream that ends before the
    end-of-archive block — inside a member, inside a header, or between two members — is truncated: the error
    says where. Raises ShardReadError naming ``url``.
    """
    offset = 0
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = stream.read(_BLOCK)
        if len(header) < _BLOCK:
            raise ShardReadError(
                f"cannot read shard {url}: it ends at byte {offset + len(header)} without the tar end-of-archive "
                "block (truncated?)"
            )
        if header == _END_OF_ARCHIVE:
            return
        try:
            checksum = _tar_number(header[148:156])
            size = _tar_number(header[124:136])
        except ValueError:
            checksum = size = -1
        if checksum != 256 + sum(header[:148]) + sum(header[156:]):
            hint = " (a gzip-compressed tar: facekd reads plain .tar shards)" if header[:2] == b"\x1f\x8b" else ""
            raise ShardReadError(f"cannot read shard {url}: damaged tar header at byte {offset}{hint}")
        kind = header[156:157]
        if kind not in (_GNU_LONG_NAME, _PAX_HEADER, _PAX_GLOBAL_HEADER):
            name = pax.pop("path", None) or long_name
            if name is None:
                name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                prefix = header[345:500].split(b"\0", 1)[0] if header[257:263] == b"ustar\0" else b""
                if prefix:
                    name = f"{prefix.decode('utf-8', 'surrogateescape')}/{name}"
            size = int(pax.pop("size", size))
            long_name, pax = None, {}
        padded = size + -size % _BLOCK
        content = stream.read(padded)
        if len(content) < padded:
            raise ShardReadError(
                f"cannot read shard {url}: it ends at byte {offset + _BLOCK + len(content)}, inside a member that "
                f"needs {size} bytes from byte {offset + _BLOCK} (truncated)"
            )
        offset += _BLOCK + padded
        if kind == _GNU_LONG_NAME:
            long_name = content[:size].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif kind == _PAX_HEADER:
            try:
                pax = _pax_records(content[:size])
            except (ValueError, UnicodeDecodeError):
                header_offset = offset - padded - _BLOCK
                raise ShardReadError(f"cannot read shard {url}: damaged pax header at byte {header_offset}") from None
        elif kind in _REGULAR_TYPES:
            yield name, content[:size] if padded != size else content


def _group_samples(members: Iterable[tuple[str, bytes]], url: str) -> Iterator[dict[str, Any]]:
    """webdataset samples ({"__key__", "__url__", extension: bytes, ...}) of consecutive members sharing a key."""
    sample: dict[str, Any] | None = None
    for name, content in members:
        if ("/" not in name and name.startswith("__") and name.endswith("__")) or _META_MEMBER.match(name):
            continue
        match = _KEY_AND_EXTENSION.match(name)
        if match is None:
            continue
        key, extension = match.group(1), match.group(2).lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        if extension in sample:
            raise ShardReadError(f"cannot read shard {url}: member {name} appears twice")
        sample[extension] = content
    if sample is not None:
        yield sample


def _read_shard(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples ({"__key__", "jpg", "cls", ...} with bytes values) of one shard: a path, http(s):// or pipe: URL."""
    try:
        # webdataset opens local files with the default 8 KB buffer: one read call per member
        local = urlparse(url).scheme == ""
        stream = open(url, "rb", buffering=_READ_BUFFER) if local else gopen(url, "rb", bufsize=_READ_BUFFER)
    except (OSError, ValueError) as error:
        raise ShardReadError(f"cannot read shard {url}: {_one_line(error)}") from error
    try:
        with stream:
            yield from _group_samples(_tar_members(stream, url), url)
    except OSError as error:  # a failed read, or the command of a pipe: or http:// URL exiting with an error
        raise ShardReadError(f"cannot read shard {url}: {_one_line(error)}") from error


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


# ---------------------------------------------------------------------------------------------
# Images: decode → uint8 batch → float
# ---------------------------------------------------------------------------------------------


def _image_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = tuple(int(side) for side in image_size)
    if len(size) != 2 or min(size) <= 0:
        raise ConfigError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return size  # type: ignore[return-value]


def _open_rgb(data: bytes) -> Image.Image:
    """The decoded RGB image of encoded bytes. Raises DataError when they do not decode."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            # convert() of an RGB image would only copy it
            return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot decode image of {len(data)} bytes: {_one_line(error)}") from None


def _resized(image: Image.Image, height: int, width: int) -> Image.Image:
    """``image`` at (height, width), bilinear, when stored at another size."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.BILINEAR)


# (x − 127.5) / 128 = x · 2**-7 − 255 / 256: both steps exact in float32 for x in 0..255
_SCALE, _OFFSET = np.float32(1 / 128), np.float32(127.5 / 128)
_NUMPY_DTYPES = {torch.float32: np.float32, torch.uint8: np.uint8}


def _empty_batch(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor for a batch of images.

    In a DataLoader worker it lies in shared memory, so that the batch reaches the main process without the copy
    that sending a private tensor costs (torch's default_collate does the same). Elsewhere numpy allocates it:
    for large arrays numpy asks the kernel for huge pages, so a batch whose memory is fresh (not a freed batch's,
    reused by malloc) faults in 2 MB pages instead of 4 KB ones, several times faster at 128 × 3 × 112² floats.
    """
    if get_worker_info() is None:
        return torch.from_numpy(np.empty(shape, _NUMPY_DTYPES[dtype]))
    storage = torch.UntypedStorage._new_shared(dtype.itemsize * int(np.prod(shape)))
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def _pixels(image: Image.Image) -> np.ndarray:
    """uint8 [H, W, 4] view of an RGB image's pixels as PIL stores them, RGB + one padding byte.

    Copying PIL's 4-byte pixels out is a plain copy; ``np.asarray`` would first pack them to 3 bytes.
    """
    width, height = image.size
    return np.frombuffer(image.tobytes("raw", "RGBX"), np.uint8).reshape(height, width, 4)


def _normalise_into(pixels: np.ndarray, out: np.ndarray, flip: bool = False) -> None:
    """out float32 [3, H, W] = (x − 127.5) / 128 of uint8 RGB(X) pixels [H, W, ≥3], mirrored left-right if ``flip``.

    Exact in float32, so the result does not depend on how the steps are split. The assignment converts while it
    reads the pixels channel-planar — and backwards along W for a flip, which costs nothing more (4·H·W bytes
    read, 12·H·W written); the two in-place steps then find those 12·H·W bytes in cache. numpy, not torch: torch
    would spread the work over all cores, which a DataLoader worker must not assume.
    """
    columns = slice(None, None, -1) if flip else slice(None)
    out[...] = pixels[:, columns, :3].transpose(2, 0, 1)
    out *= _SCALE
    out -= _OFFSET


def _rgb_into(image: Image.Image, out: np.ndarray, flip: bool = False) -> None:
    """out uint8 [H, W, 3] = the RGB pixels of ``image``, mirrored left-right if ``flip`` (a PIL transpose)."""
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out[...] = np.frombuffer(image.tobytes(), np.uint8).reshape(out.shape)


def to_float(pixels: torch.Tensor, normalize: str = "mxnet") -> torch.Tensor:
    """float32 [B, 3, H, W] network input of uint8 RGB pixels [B, H, W, 3], on their device.

    ``normalize`` (a network's ``model.normalize``): ``mxnet`` gives (x − 127.5) / 128 — for batches read with
    ``uint8_pixels=True``, after the host-to-device copy, bit for bit the images the loader would have made (both
    steps are exact in float32 on any device); ``arcface_torch`` gives (x − 127.5) / 127.5, insightface
    arcface_torch's (x/255 − 0.5)/0.5 (the subtraction is exact, the division correctly rounded).
    """
    if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"expected uint8 pixels [B, H, W, 3], got {pixels.dtype} {tuple(pixels.shape)}")
    check_normalize(normalize)
    images = pixels.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    if normalize == "arcface_torch":
        return images.sub_(127.5).div_(127.5)
    return images.mul_(1 / 128).sub_(127.5 / 128)


NORMALIZATIONS = ("mxnet", "arcface_torch")
"""The input normalisations a network can be trained with (``model.normalize``), see :func:`to_float`."""


def check_normalize(normalize: str) -> None:
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")


def decode_image(data: bytes, image_size: int | Sequence[int] = 112, normalize: str = "mxnet") -> torch.Tensor:
    """Decodes an encoded image to a float32 [3, H, W] tensor normalised as :func:`to_float` does (no flip):
    (x − 127.5) / 128 by default, (x − 127.5) / 127.5 with ``normalize="arcface_torch"``.

    The image is converted to RGB and resized (bilinear) to ``image_size`` (int or (H, W)) when its size
    differs. Raises DataError (a ValueError) when the bytes do not decode.
    """
    check_normalize(normalize)
    height, width = _image_hw(image_size)
    pixels = _pixels(_resized(_open_rgb(data), height, width))
    if normalize == "arcface_torch":
        return to_float(torch.from_numpy(np.ascontiguousarray(pixels[None, :, :, :3])), normalize)[0]
    image = torch.from_numpy(np.empty((3, height, width), np.float32))
    _normalise_into(pixels, image.numpy())
    return image


# ---------------------------------------------------------------------------------------------
# The stream
# ---------------------------------------------------------------------------------------------


def _rng(*entropy: int) -> random.Random:
    """A Python RNG seeded from a tuple of non-negative ints through numpy's SeedSequence (no hash() salt)."""
    state = np.random.SeedSequence(list(entropy)).generate_state(2, dtype=np.uint64)
    return random.Random(int(state[0]) << 64 | int(state[1]))


def _shard_url(base: str, name: str) -> str:
    """URL of shard ``name`` under ``base``: a directory, an http(s) URL, or a template holding ``{name}``."""
    if "{name}" in base:
        return base.replace("{name}", name)
    return f"{base.rstrip('/')}/{name}"


def _where(sample: dict[str, Any]) -> str:
    return f"sample {sample.get('__key__')} of shard {sample.get('__url__')}"


def check_enough_shards(shard_sizes: Sequence[int], *, world_size: int, num_workers: int, resampled: bool,
                        source: str = "") -> None:
    """Without resampling every stream (a loader worker of a rank) is dealt shards of its own: fewer non-empty
    shards than ``world_size`` x workers would leave a stream with nothing to read and its rank waiting forever.
    Raises ConfigError then; launchers call it before they start any rank."""
    streams = world_size * max(num_workers, 1)
    nonempty = sum(1 for size in shard_sizes if size > 0)
    if not resampled and nonempty < streams:
        raise ConfigError(
            f"{source + ': ' if source else ''}{nonempty} non-empty shards cannot be dealt to {world_size} ranks x "
            f"{max(num_workers, 1)} loader workers = {streams} streams without resampling; set data.resampled: true, "
            "fewer data.num_workers or ranks, or write more shards (facekd data convert --shard-size)"
        )


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
        uint8_pixels: bool = False,
    ) -> None:
        super().__init__()
        if len(shard_urls) != len(shard_sizes) or not shard_urls:
            raise DataError(
                f"need one size per shard and at least one shard, got {len(shard_urls)} urls and "
                f"{len(shard_sizes)} sizes"
            )
        if sum(shard_sizes) == 0:
            raise DataError(f"all {len(shard_urls)} shards are empty, e.g. {shard_urls[0]}")
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
                raise ConfigError(f"{name} must be >= {lowest}, got {value}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, {world_size}), got {rank}")
        self.logical_workers = max(num_workers, 1)
        check_enough_shards(shard_sizes, world_size=world_size, num_workers=num_workers, resampled=resampled)
        nonempty = sum(1 for size in shard_sizes if size > 0)
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
        self.uint8_pixels = uint8_pixels
        self.max_barren_draws = max(nonempty, _MIN_BARREN_DRAWS)
        self._miscounted: set[int] = set()  # shards whose sample count was already reported

    # sample streams

    def _epoch_shards(self, epoch: int, worker: int) -> Iterator[Iterable[int]]:
        """Passes over shard indices for (epoch, rank, worker); resampled: one endless pass."""
        if self.resampled:
            rng = _rng(self.seed, _TAG_RESAMPLE, epoch, self.rank, worker)
            candidates = [index for index, size in enumerate(self.shard_sizes) if size > 0]
            yield (rng.choice(candidates) for _ in itertools.count())
            return
        order = [index for index, size in enumerate(self.shard_sizes) if size > 0]
        _rng(self.seed, _TAG_SHARD_ORDER, epoch).shuffle(order)
        mine = order[self.rank :: self.world_size][worker :: self.logical_workers]
        yield list(mine)
        for pass_number in itertools.count(1):
            again = list(mine)
            _rng(self.seed, _TAG_PASS_ORDER, epoch, self.rank, worker, pass_number).shuffle(again)
            yield again

    def _shard_samples(self, shard_pass: Iterable[int], max_barren: int) -> Iterator[dict[str, Any]]:
        """Raw samples of the shards of ``shard_pass`` in turn.

        Without this check a stream whose shards yield nothing (empty tars the manifest calls full) would read
        them forever: ``max_barren`` shard reads in a row without a sample raise DataError naming them.
        """
        barren: list[int] = []
        for index in shard_pass:
            count = 0
            for sample in _read_shard(self.shard_urls[index]):
                count += 1
                yield sample
            if count != self.shard_sizes[index] and index not in self._miscounted:
                self._miscounted.add(index)
                logger.warning(
                    "shard %s yielded %d samples, the manifest says %d", self.shard_urls[index], count,
                    self.shard_sizes[index],
                )
            if count:
                barren.clear()
                continue
            barren.append(index)
            if len(barren) >= max_barren:
                names = list(dict.fromkeys(self.shard_urls[position] for position in barren))
                listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
                raise DataError(
                    f"{len(barren)} shard reads in a row yielded no sample although the manifest lists "
                    f"{sum(self.shard_sizes[position] for position in set(barren))} in them: {listed}; check the "
                    "shards with 'facekd data inspect'"
                )

    def _epoch_samples(self, epoch: int, worker: int) -> Iterator[dict[str, Any]]:
        """The shuffled raw-sample stream of logical ``worker`` in ``epoch`` (endless)."""
        buffer_rng = _rng(self.seed, _TAG_BUFFER, epoch, self.rank, worker)
        for shard_pass in self._epoch_shards(epoch, worker):
            max_barren = len(shard_pass) if isinstance(shard_pass, list) else self.max_barren_draws
            yield from _shuffled(self._shard_samples(shard_pass, max_barren), self.shuffle_buffer, buffer_rng)

    # batches

    def _owned_before(self, epoch: int, batch_in_epoch: int, worker: int) -> int:
        """How many batches of ``epoch`` before ``batch_in_epoch`` logical ``worker`` makes."""
        first = (worker - epoch * self.batches_per_epoch) % self.logical_workers
        return len(range(first, batch_in_epoch, self.logical_workers))

    def _make_batch(self, samples: list[dict[str, Any]], index: int) -> Batch:
        if self.flip:
            flip_rng = _rng(self.seed, _TAG_FLIP, self.rank, index)
            flips = [flip_rng.random() < 0.5 for _ in samples]
        else:
            flips = [False] * len(samples)
        # each image goes to its slot as soon as it is decoded, while its pixels are still in cache
        if self.uint8_pixels:
            images = _empty_batch((len(samples), *self.image_size, 3), torch.uint8)
        else:
            images = _empty_batch((len(samples), 3, *self.image_size), torch.float32)
        out = images.numpy()
        width_axis = 1 if self.uint8_pixels else 2
        labels: list[int] = []
        valid: list[int] = []
        num_corrupt = num_unlabelled = 0
        for position, sample in enumerate(samples):
            label = self._label(sample) if self.use_labels else -1
            labels.append(-1 if label is None else label)
            if label is None:
                num_unlabelled += 1
                continue
            image = self._decode(sample)
            if image is None:
                num_corrupt += 1
                continue
            if self.uint8_pixels:
                _rgb_into(image, out[position], flips[position])
            else:
                _normalise_into(_pixels(image), out[position], flips[position])
            valid.append(position)
        if not valid:
            keys = [sample.get("__key__") for sample in samples[:3]]
            raise ShardReadError(
                f"batch {index} on rank {self.rank}: none of its {len(samples)} samples has a decodable image and "
                f"a class (first keys {keys} from {samples[0].get('__url__')})"
            )
        # refill skipped slots with the batch's valid samples in turn, so the batch keeps batch_size samples
        order = list(range(len(samples)))
        if len(valid) < len(samples):
            refill = itertools.cycle(valid)
            for position in sorted(set(order) - set(valid)):
                source = order[position] = next(refill)
                out[position] = np.flip(out[source], width_axis) if flips[position] != flips[source] else out[source]
        label_tensor = torch.tensor([labels[position] for position in order], dtype=torch.int64)
        keys = tuple(str(samples[position].get("__key__")) for position in order)
        return Batch(images, label_tensor, num_corrupt, num_unlabelled, index, keys)

    def _label(self, sample: dict[str, Any]) -> int | None:
        """The sample's class id, None when it has none; an id that is not a plain decimal in the manifest's range
        is an error."""
        raw = sample.get("cls")
        if raw is None:
            logger.warning("%s has no .cls; skipped", _where(sample))
            return None
        # exactly what the converter writes: ASCII digits (int() would also take "1_0", " 7", "+3", "٣")
        if not (isinstance(raw, bytes) and raw.isdigit()):
            raise DataError(f"{_where(sample)}: .cls should be a decimal class id, got {raw[:20]!r}")
        label = int(raw)
        if label >= self.num_classes:
            raise DataError(f"{_where(sample)}: class {label} outside [0, {self.num_classes}) of the manifest")
        return label

    def _decode(self, sample: dict[str, Any]) -> Image.Image | None:
        """The sample's RGB image at image_size, None (logged) when it has none or it does not decode."""
        for key in IMAGE_KEYS:
            if key in sample:
                break
        else:
            logger.warning("%s has no %s image; skipped", _where(sample), "/".join(IMAGE_KEYS))
            return None
        try:
            return _resized(_open_rgb(sample[key]), *self.image_size)
        except DataError as error:
            logger.warning("%s: %s; skipped", _where(sample), error)
            return None

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


def _worker_message(error: FacekdError) -> str | None:
    """The one-line message a DataLoader worker's error had in the worker; None for an error not from a worker.

    DataLoader re-raises a worker's exception as ``type(error)("Caught DataError in DataLoader worker process 0.
    Original Traceback …")``, whose last line is ``module.Class: message``; the command line prints errors whole.
    """
    text = str(error)
    if "\nOriginal Traceback" not in text:
        return None
    last = text.rstrip().splitlines()[-1]
    prefix = f"{type(error).__module__}.{type(error).__qualname__}: "
    return last[len(prefix) :] if last.startswith(prefix) else last


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
        try:
            yield from loader
        except FacekdError as error:
            message = _worker_message(error)
            if message is not None:
                raise type(error)(message) from error
            raise error


def epoch_length(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    """Batches per epoch on each rank: ``num_samples`` over the batch of all ranks (at least one, or ConfigError)."""
    batches = num_samples // (batch_size * world_size)
    if batches == 0:
        raise ConfigError(
            f"{num_samples} samples make no batch of {batch_size} per rank on {world_size} ranks; lower the batch size"
        )
    return batches


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
    uint8_pixels: bool = False,
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
        uint8_pixels: batches hold uint8 RGB pixels [B, H, W, 3] (flipped, resized) instead of float images;
            :func:`to_float` on the device then gives exactly the float images. A quarter of the host memory and
            host-to-device traffic, and no float conversion on the CPU (see ``facekd bench data``).

    Raises DataError for a missing or invalid manifest and for missing or resized local shards, ConfigError for
    options the data cannot serve.
    """
    manifest, manifest_dir = read_manifest(manifest_path)
    base = str(manifest_dir) if base_url is None else base_url
    names = [shard["name"] for shard in manifest["shards"]]
    urls = [_shard_url(base, name) for name in names]
    if "://" not in base and not base.startswith("pipe:"):
        for shard, url in zip(manifest["shards"], urls):
            path = Path(url)
            if not path.is_file():
                raise DataError(f"shard {path} listed in {manifest_dir / 'manifest.json'} does not exist")
            expected = shard.get("size")
            if expected is not None and path.stat().st_size != expected:
                raise DataError(f"shard {path} is {path.stat().st_size} bytes, the manifest says {expected}")
    num_samples = manifest["num_samples"]
    if batches_per_epoch is None:
        batches_per_epoch = epoch_length(num_samples, batch_size, world_size)
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
        uint8_pixels=uint8_pixels,
    )
    return ShardLoader(stream, num_samples, pin_memory=pin_memory)
