"""Pure-Python reader and writer for insightface's MXNet RecordIO files (``train.rec`` + ``train.idx``).

mxnet cannot be installed on current Python, so the byte format of dmlc-core's ``RecordIOWriter`` /
``RecordIOReader`` (``src/recordio.cc``) and of mxnet's ``recordio.pack`` / ``unpack`` is implemented here.

File format (all integers little endian)::

    record   := magic:uint32 (0xced7230a) | lrec:uint32 | part bytes | zero padding to a multiple of 4
    lrec     := cflag << 29 | length        (length: low 29 bits, cflag: top 3 bits)

A payload is written as one record part (cflag 0) unless the magic value occurs inside it at a 4-byte aligned
offset. The writer then cuts the payload at every such occurrence and drops the 4 magic bytes: the parts are
written with cflag 1 (first), 2 (middle), 3 (last), and the reader re-inserts the magic between them. Parts
before a cut are multiples of 4 bytes long, so only the last one carries padding.

A payload is mxnet's packed image record::

    IRHeader  := flag:uint32 | label:float32 | id:uint64 | id2:uint64           (struct "<IfQQ", 24 bytes)
    labels    := flag x float32                                             (only when flag > 0)
    image     := the encoded image (JPEG) up to the end of the payload

When ``flag > 0`` the scalar ``label`` field is meaningless and the label is the float32 array.

The ``.idx`` file has one text line ``key<TAB>offset`` per record; ``offset`` is the byte offset of the
record's first part. The ``property`` file next to the ``.rec`` holds ``num_classes,height,width``.

insightface lays a training set out in one of two ways:

- header layout: key 0 holds an IRHeader with ``flag == 2`` and label ``(N + 1, N + K + 1)``; keys ``1..N`` are
  images (scalar label = identity); keys ``N+1..N+K`` are identity records whose label ``(start, end)`` is the
  key range of that identity's images. Only the images are samples.
- shuffled layout: no header; every key is an image, its identity the scalar label or ``label[0]``.

A file is read in the header layout when key 0 exists, its IRHeader has ``flag > 0`` (arcface_torch's rule) and
it carries no image bytes (the header record never does; this keeps a shuffled file whose first image has a label
array from being misread).
"""

from __future__ import annotations

import math
import os
import struct
from collections import namedtuple
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Iterable, Iterator, Sequence

import numpy as np

from facekd.errors import DataError

__all__ = [
    "IRHeader",
    "RECORDIO_MAGIC",
    "RecordIOError",
    "RecordIOReader",
    "RecordIOWriter",
    "pack_image_record",
    "read_property",
    "unpack_image_record",
    "write_insightface_rec",
    "write_property",
]

RECORDIO_MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", RECORDIO_MAGIC)
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
_MAX_RECORD_BYTES = 1 << 29  # length field width; dmlc additionally caps a whole record below 2**30
_PART_HEADER = struct.Struct("<II")  # magic, lrec

_CFLAG_WHOLE, _CFLAG_START, _CFLAG_MIDDLE, _CFLAG_END = 0, 1, 2, 3

_IR_HEADER = struct.Struct("<IfQQ")  # mxnet recordio._IR_FORMAT "IfQQ": flag, label, id, id2 (24 bytes)

IRHeader = namedtuple("IRHeader", ["flag", "label", "id", "id2"])
IRHeader.__doc__ = """mxnet's image record header.

flag: number of float32 labels that follow the header (0: the scalar ``label`` field is the label).
label: float, or a float32 array of length ``flag`` once unpacked.
id, id2: uint64 user fields (insightface leaves them 0).
"""


class RecordIOError(DataError):
    """A RecordIO, ``.idx`` or ``property`` file is malformed; the message names the file and the offset."""


def _encode_lrec(cflag: int, length: int) -> int:
    return (cflag << _LENGTH_BITS) | length


def _decode_lrec(lrec: int) -> tuple[int, int]:
    """Returns (cflag, length) of a part header's lrec word."""
    return (lrec >> _LENGTH_BITS) & 7, lrec & _LENGTH_MASK


def _pad4(length: int) -> int:
    return (length + 3) & ~3


def pack_image_record(label: float | Sequence[float], image: bytes, id: int = 0, id2: int = 0) -> bytes:
    """Packs an image record payload as mxnet ``recordio.pack`` does.

    A scalar ``label`` goes into the IRHeader with ``flag = 0``; a sequence of labels sets ``flag = len(label)``
    and follows the header as float32 values. ``image`` is the encoded image, appended unchanged.
    """
    if isinstance(label, (int, float, np.integer, np.floating)):
        header = _IR_HEADER.pack(0, float(label), id, id2)
        return header + bytes(image)
    labels = np.asarray(label, dtype="<f4").reshape(-1)
    if labels.size == 0:
        raise ValueError("an image record label array must hold at least one value, got an empty sequence")
    header = _IR_HEADER.pack(labels.size, 0.0, id, id2)
    return header + labels.tobytes() + bytes(image)


def unpack_image_record(payload: bytes) -> tuple[IRHeader, float | np.ndarray, bytes]:
    """Splits a payload into (IRHeader, label, image bytes) as mxnet ``recordio.unpack`` does.

    The returned header's ``label`` and the returned label are the float scalar when ``flag == 0``, else the
    float32 array of ``flag`` labels. Raises ValueError when the payload is shorter than its header says.
    """
    if len(payload) < _IR_HEADER.size:
        raise ValueError(f"image record of {len(payload)} bytes is shorter than the {_IR_HEADER.size}-byte IRHeader")
    flag, scalar_label, id_, id2 = _IR_HEADER.unpack_from(payload, 0)
    body_start = _IR_HEADER.size
    if flag == 0:
        return IRHeader(flag, scalar_label, id_, id2), scalar_label, payload[body_start:]
    labels_end = body_start + 4 * flag
    if labels_end > len(payload):
        raise ValueError(
            f"image record of {len(payload)} bytes announces flag={flag} float32 labels, "
            f"which need {labels_end} bytes"
        )
    labels = np.frombuffer(payload, dtype="<f4", count=flag, offset=body_start).astype(np.float32)
    return IRHeader(flag, labels, id_, id2), labels, payload[labels_end:]


class RecordIOWriter:
    """Writes records to a ``.rec`` file and, if ``idx_path`` is given, their offsets to a ``.idx`` file.

    Use as a context manager; both files are created (truncated) on construction.
    """

    def __init__(self, rec_path: str | os.PathLike[str], idx_path: str | os.PathLike[str] | None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else None
        self._rec: BinaryIO = open(self.rec_path, "wb")
        self._idx = open(self.idx_path, "w", encoding="ascii") if self.idx_path is not None else None
        self._keys: set[int] = set()

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Flushes and closes the files; calling it twice is harmless."""
        self._rec.close()
        if self._idx is not None:
            self._idx.close()

    def tell(self) -> int:
        """Byte offset at which the next record starts."""
        return self._rec.tell()

    def write_record(self, key: int, raw: bytes) -> int:
        """Writes one raw payload under ``key``, splitting it at aligned magic values; returns its offset."""
        if key in self._keys:
            raise ValueError(f"{self.rec_path}: key {key} was already written")
        if len(raw) >= _MAX_RECORD_BYTES:
            raise ValueError(
                f"{self.rec_path}: record for key {key} is {len(raw)} bytes, RecordIO allows < {_MAX_RECORD_BYTES}"
            )
        offset = self._rec.tell()
        self._rec.write(_encode_record(raw))
        if self._idx is not None:
            self._idx.write(f"{key}\t{offset}\n")
        self._keys.add(key)
        return offset

    def write(
        self, key: int, label: float | Sequence[float], payload_image: bytes, id: int = 0, id2: int = 0
    ) -> int:
        """Packs (label, image) as an mxnet image record and writes it under ``key``; returns its offset."""
        return self.write_record(key, pack_image_record(label, payload_image, id, id2))


def _encode_record(raw: bytes) -> bytes:
    """The bytes dmlc's RecordIOWriter::WriteRecord emits for one payload (all parts and padding)."""
    out = bytearray()
    part_start = 0
    # dmlc only looks for the magic at 4-byte aligned offsets inside the payload
    aligned_end = len(raw) & ~3
    position = raw.find(_MAGIC_BYTES, 0, aligned_end)
    while position != -1:
        if position % 4 == 0:
            cflag = _CFLAG_START if part_start == 0 else _CFLAG_MIDDLE
            out += _PART_HEADER.pack(RECORDIO_MAGIC, _encode_lrec(cflag, position - part_start))
            out += raw[part_start:position]
            part_start = position + 4
            position = raw.find(_MAGIC_BYTES, part_start, aligned_end)
        else:
            position = raw.find(_MAGIC_BYTES, position + 1, aligned_end)
    cflag = _CFLAG_END if part_start != 0 else _CFLAG_WHOLE
    out += _PART_HEADER.pack(RECORDIO_MAGIC, _encode_lrec(cflag, len(raw) - part_start))
    out += raw[part_start:]
    out += b"\0" * (_pad4(len(raw)) - len(raw))
    return bytes(out)


def write_property(path: str | os.PathLike[str], num_classes: int, image_size: tuple[int, int]) -> None:
    """Writes insightface's ``property`` file: ``num_classes,height,width``."""
    Path(path).write_text(f"{num_classes},{image_size[0]},{image_size[1]}\n", encoding="ascii")


def read_property(path: str | os.PathLike[str]) -> tuple[int, int, int]:
    """Reads a ``property`` file; returns (num_classes, height, width)."""
    text = Path(path).read_text(encoding="ascii").strip()
    fields = text.split(",")
    try:
        values = tuple(int(field) for field in fields)
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) <= 0:
        raise RecordIOError(f"{path}: expected 'num_classes,height,width' with positive integers, got {text!r}")
    return values  # type: ignore[return-value]


def write_insightface_rec(
    rec_path: str | os.PathLike[str],
    idx_path: str | os.PathLike[str],
    samples: Iterable[tuple[int, bytes]],
    num_classes: int,
    image_size: tuple[int, int] = (112, 112),
) -> int:
    """Writes (identity label, JPEG bytes) samples in insightface's header layout; returns the image count N.

    Keys: 0 header (flag 2, label (N+1, N+K+1)), 1..N images in input order, N+1..N+K one identity record per
    identity with label (first key, last key + 1) of its images, in order of first appearance. Each identity's
    samples must be contiguous in ``samples`` (insightface stores ranges). Labels must lie in
    [0, num_classes). Also writes ``property`` (num_classes, height, width) next to ``rec_path``.
    The samples are streamed: record 0 is written as a fixed-size placeholder and rewritten at the end.
    """
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    rec_path = Path(rec_path)
    ranges: dict[int, list[int]] = {}
    order: list[int] = []
    previous_label: int | None = None
    num_images = 0
    with RecordIOWriter(rec_path, idx_path) as writer:
        header_offset = writer.write(0, (0.0, 0.0), b"")
        header_end = writer.tell()
        for label, image in samples:
            if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
                raise TypeError(f"{rec_path}: sample {num_images} label must be an int, got {label!r}")
            label = int(label)
            if not 0 <= label < num_classes:
                raise ValueError(f"{rec_path}: sample {num_images} label must be in [0, {num_classes}), got {label}")
            key = num_images + 1
            if label != previous_label:
                if label in ranges:
                    raise ValueError(
                        f"{rec_path}: identity {label} reappears at sample {num_images} after other identities; "
                        "the header layout needs each identity's samples to be contiguous"
                    )
                ranges[label] = [key, key]
                order.append(label)
                previous_label = label
            ranges[label][1] = key + 1
            writer.write(key, float(label), image)
            num_images += 1
        for position, label in enumerate(order):
            start, end = ranges[label]
            writer.write(num_images + 1 + position, (float(start), float(end)), b"")
        # The header's size does not depend on its values (positive float32 labels never equal the magic), so it
        # can be rewritten in place now that N and K are known.
        header_label = (float(num_images + 1), float(num_images + 1 + len(order)))
        header_bytes = _encode_record(pack_image_record(header_label, b""))
        if len(header_bytes) != header_end - header_offset:
            raise RuntimeError(
                f"{rec_path}: header record changed size from {header_end - header_offset} to {len(header_bytes)}"
            )
        writer._rec.seek(header_offset)
        writer._rec.write(header_bytes)
        writer._rec.seek(0, os.SEEK_END)
    write_property(rec_path.parent / "property", num_classes, image_size)
    return num_images


class RecordIOReader:
    """Random and sequential access to a ``.rec`` file.

    With ``idx_path`` the keys and offsets come from the ``.idx`` file; without it the file is scanned once and
    the records are keyed 0, 1, 2, ... in file order (which is what insightface's writer produces).

    Attributes:
        keys: all record keys, in ascending order.
        layout: ``"header"`` (insightface header record at key 0) or ``"shuffled"``.
        image_keys: the keys that hold images, in ascending order.
        num_images: ``len(image_keys)``.
        num_identities: K from the header record (header layout), else None.
    """

    def __init__(self, rec_path: str | os.PathLike[str], idx_path: str | os.PathLike[str] | None = None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else None
        if not self.rec_path.is_file():
            raise RecordIOError(f"RecordIO file {self.rec_path} does not exist")
        self._file_size = self.rec_path.stat().st_size
        self._rec: BinaryIO = open(self.rec_path, "rb")
        if self.idx_path is not None:
            self._offsets = self._read_idx(self.idx_path)
        else:
            self._offsets = self._scan_offsets()
        self.keys: list[int] = sorted(self._offsets)
        self.num_identities: int | None = None
        self.layout, self.image_keys = self._detect_layout()
        self.num_images = len(self.image_keys)

    def __enter__(self) -> RecordIOReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._rec.close()

    def __len__(self) -> int:
        return len(self.keys)

    def _read_idx(self, idx_path: Path) -> dict[int, int]:
        if not idx_path.is_file():
            raise RecordIOError(f"RecordIO index {idx_path} does not exist")
        offsets: dict[int, int] = {}
        with open(idx_path, encoding="ascii") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                fields = line.strip().split("\t")
                try:
                    key, offset = int(fields[0]), int(fields[1])
                except (ValueError, IndexError):
                    raise RecordIOError(
                        f"{idx_path}: line {line_number} should be 'key<TAB>offset', got {line.rstrip()!r}"
                    ) from None
                if len(fields) != 2:
                    raise RecordIOError(
                        f"{idx_path}: line {line_number} should be 'key<TAB>offset', got {line.rstrip()!r}"
                    )
                if not 0 <= offset < self._file_size:
                    raise RecordIOError(
                        f"{idx_path}: line {line_number}: offset {offset} of key {key} lies outside "
                        f"{self.rec_path} ({self._file_size} bytes)"
                    )
                if key in offsets:
                    raise RecordIOError(f"{idx_path}: line {line_number}: key {key} appears twice")
                offsets[key] = offset
        return offsets

    def _scan_offsets(self) -> dict[int, int]:
        offsets: dict[int, int] = {}
        offset = 0
        while offset < self._file_size:
            offsets[len(offsets)] = offset
            _, offset = self._read_at(offset)
        return offsets

    def _read_at(self, offset: int) -> tuple[bytes, int]:
        """Reassembles the record starting at ``offset``; returns (payload, offset of the next record)."""
        parts: list[bytes] = []
        position = offset
        expect_continuation = False
        while True:
            self._rec.seek(position)
            head = self._rec.read(_PART_HEADER.size)
            if len(head) < _PART_HEADER.size:
                where = "inside a split record" if expect_continuation else "inside a record header"
                raise RecordIOError(
                    f"{self.rec_path}: record at offset {offset} is truncated: file ends at byte "
                    f"{position + len(head)} {where}"
                )
            magic, lrec = _PART_HEADER.unpack(head)
            if magic != RECORDIO_MAGIC:
                raise RecordIOError(
                    f"{self.rec_path}: record at offset {position} has bad magic 0x{magic:08x}, "
                    f"expected 0x{RECORDIO_MAGIC:08x}"
                )
            cflag, length = _decode_lrec(lrec)
            if cflag > _CFLAG_END:
                raise RecordIOError(f"{self.rec_path}: record part at offset {position} has invalid cflag {cflag}")
            if expect_continuation and cflag not in (_CFLAG_MIDDLE, _CFLAG_END):
                raise RecordIOError(
                    f"{self.rec_path}: split record starting at offset {offset} continues at offset {position} "
                    f"with cflag {cflag}, expected 2 (middle) or 3 (end)"
                )
            if not expect_continuation and cflag not in (_CFLAG_WHOLE, _CFLAG_START):
                raise RecordIOError(
                    f"{self.rec_path}: record at offset {position} starts with cflag {cflag}, "
                    "expected 0 (whole) or 1 (start)"
                )
            data = self._rec.read(_pad4(length))
            if len(data) < _pad4(length):
                raise RecordIOError(
                    f"{self.rec_path}: record at offset {offset} is truncated: part at offset {position} "
                    f"announces {length} bytes but the file ends at byte {position + _PART_HEADER.size + len(data)}"
                )
            parts.append(data[:length])
            position += _PART_HEADER.size + _pad4(length)
            if cflag in (_CFLAG_WHOLE, _CFLAG_END):
                return _MAGIC_BYTES.join(parts), position
            expect_continuation = True

    def _detect_layout(self) -> tuple[str, list[int]]:
        if 0 in self._offsets:
            header, label, image = self.read(0)
            # insightface's header record is packed with an empty image; a shuffled rec's key 0 is a real image
            # even when its label is an array
            if header.flag > 0 and not image:
                labels = np.asarray(label)
                if labels.size < 2:
                    raise RecordIOError(
                        f"{self.rec_path}: header record (key 0) has flag {header.flag}, "
                        "expected a label array (N + 1, N + K + 1)"
                    )
                first_identity_key, end_key = int(labels[0]), int(labels[1])
                if not 1 <= first_identity_key <= end_key:
                    raise RecordIOError(
                        f"{self.rec_path}: header record (key 0) has label {labels.tolist()}, "
                        "expected (N + 1, N + K + 1) with N >= 0, K >= 0"
                    )
                image_keys = list(range(1, first_identity_key))
                missing = [key for key in image_keys if key not in self._offsets]
                if missing:
                    raise RecordIOError(
                        f"{self.rec_path}: header record says images are keys 1..{first_identity_key - 1} "
                        f"but {len(missing)} are missing, first {missing[0]}"
                    )
                self.num_identities = end_key - first_identity_key
                return "header", image_keys
        return "shuffled", list(self.keys)

    def read_raw(self, key: int) -> bytes:
        """The reassembled payload stored under ``key``."""
        if key not in self._offsets:
            raise KeyError(f"{self.rec_path}: no record with key {key}")
        return self._read_at(self._offsets[key])[0]

    def read(self, key: int) -> tuple[IRHeader, float | np.ndarray, bytes]:
        """(IRHeader, label, image bytes) of the image record under ``key``; see :func:`unpack_image_record`."""
        payload = self.read_raw(key)
        try:
            return unpack_image_record(payload)
        except ValueError as error:
            raise RecordIOError(f"{self.rec_path}: key {key} at offset {self._offsets[key]}: {error}") from None

    def sample_label(self, key: int, label: float | np.ndarray) -> int:
        """The integer identity of an image record's label (``label[0]`` of an array)."""
        value = float(np.asarray(label).reshape(-1)[0])
        if not math.isfinite(value) or value != int(value) or value < 0:
            raise RecordIOError(
                f"{self.rec_path}: image key {key} has label {value}, expected a non-negative integer identity"
            )
        return int(value)

    def read_label(self, key: int) -> int:
        """The integer identity of the image under ``key``, reading only the record's first bytes when possible."""
        if key not in self._offsets:
            raise KeyError(f"{self.rec_path}: no record with key {key}")
        # part header + IRHeader + the first float32 of a label array
        wanted = _PART_HEADER.size + _IR_HEADER.size + 4
        self._rec.seek(self._offsets[key])
        head = self._rec.read(wanted)
        if len(head) == wanted:
            magic, lrec = _PART_HEADER.unpack_from(head, 0)
            cflag, length = _decode_lrec(lrec)
            first_part_holds_label = cflag in (_CFLAG_WHOLE, _CFLAG_START) and length >= wanted - _PART_HEADER.size
            if magic == RECORDIO_MAGIC and first_part_holds_label:
                flag, scalar_label, _, _ = _IR_HEADER.unpack_from(head, _PART_HEADER.size)
                if flag == 0:
                    return self.sample_label(key, scalar_label)
                first_label = struct.unpack_from("<f", head, _PART_HEADER.size + _IR_HEADER.size)[0]
                return self.sample_label(key, first_label)
        # short, early-split or malformed records take the full path, which also reports errors precisely
        _, label, _ = self.read(key)
        return self.sample_label(key, label)

    def iter_samples(self) -> Iterator[tuple[int, bytes]]:
        """Yields (identity label, image bytes) for every image, in ascending key order."""
        for key in self.image_keys:
            _, label, image = self.read(key)
            yield self.sample_label(key, label), image
