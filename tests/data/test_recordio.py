"""RecordIO reader/writer against byte layouts built independently from the format description."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from facekd.data.recordio import (
    RecordIOError,
    RecordIOReader,
    RecordIOWriter,
    read_property,
    write_insightface_rec,
)

MAGIC = struct.pack("<I", 0xCED7230A)


def part(cflag: int, data: bytes) -> bytes:
    """One record part: magic, lrec = cflag << 29 | length, data, zero padding to 4 bytes."""
    padding = b"\0" * ((4 - len(data) % 4) % 4)
    return MAGIC + struct.pack("<I", (cflag << 29) | len(data)) + data + padding


def payload(label: float | list[float], image: bytes, id_: int = 0, id2: int = 0) -> bytes:
    """IRHeader 'IfQQ' (+ float32 labels when flag > 0) + image."""
    if isinstance(label, list):
        return struct.pack("<IfQQ", len(label), 0.0, id_, id2) + struct.pack(f"<{len(label)}f", *label) + image
    return struct.pack("<IfQQ", 0, label, id_, id2) + image


def write_files(tmp_path: Path, records: list[bytes]) -> tuple[Path, Path]:
    """Concatenates pre-encoded records into train.rec and writes train.idx with keys 0..n-1."""
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    offset, lines = 0, []
    with open(rec, "wb") as f:
        for key, record in enumerate(records):
            lines.append(f"{key}\t{offset}\n")
            f.write(record)
            offset += len(record)
    idx.write_text("".join(lines))
    return rec, idx


# An image whose payload contains the magic at aligned offsets 24+0 (right after the IRHeader) and 24+8.
SPLIT_IMAGE = MAGIC + b"abcd" + MAGIC + b"tail!"  # 17 bytes: the last part needs 3 bytes of padding


def split_record(label: float) -> bytes:
    """dmlc writer output for payload(label, SPLIT_IMAGE): cut at each aligned magic, magic dropped."""
    raw = payload(label, SPLIT_IMAGE)
    head = raw[:24]
    return part(1, head) + part(2, b"abcd") + part(3, b"tail!")


@pytest.mark.parametrize("use_idx", [True, False])
def test_reads_shuffled_layout_with_split_record_and_label_array(tmp_path: Path, use_idx: bool) -> None:
    records = [
        part(0, payload(3.0, b"\xff\xd8jpeg-zero")),
        split_record(7.0),
        part(0, payload([5.0, 9.0, 1.5], b"\xff\xd8arr", id_=11, id2=12)),
        part(0, payload(2.0, b"x")),  # 25-byte payload: 3 bytes of padding
    ]
    # id2 = magic << 32 puts the magic at payload offset 20: the record is split inside its IRHeader
    records.append(part(1, payload(4.0, b"", id2=0xCED7230A << 32)[:20]) + part(3, b""))
    rec, idx = write_files(tmp_path, records)
    with RecordIOReader(rec, idx if use_idx else None) as reader:
        assert reader.layout == "shuffled"
        assert reader.keys == [0, 1, 2, 3, 4]
        assert reader.num_images == 5
        assert reader.read_raw(1) == payload(7.0, SPLIT_IMAGE)
        header, label, image = reader.read(2)
        assert header.flag == 3 and header.id == 11 and header.id2 == 12
        np.testing.assert_array_equal(label, np.array([5.0, 9.0, 1.5], np.float32))
        assert image == b"\xff\xd8arr"
        samples = list(reader.iter_samples())
        assert [reader.read_label(key) for key in reader.keys] == [3, 7, 5, 2, 4]
    assert samples == [(3, b"\xff\xd8jpeg-zero"), (7, SPLIT_IMAGE), (5, b"\xff\xd8arr"), (2, b"x"), (4, b"")]


def test_reads_insightface_header_layout(tmp_path: Path) -> None:
    images = [(0, b"img-a"), (0, b"img-b"), (1, b"img-c")]
    n, k = len(images), 2
    records = [part(0, payload([float(n + 1), float(n + k + 1)], b""))]
    records += [part(0, payload(float(label), image)) for label, image in images]
    records += [part(0, payload([1.0, 3.0], b"")), part(0, payload([3.0, 4.0], b""))]
    rec, idx = write_files(tmp_path, records)
    with RecordIOReader(rec, idx) as reader:
        assert reader.layout == "header"
        assert reader.image_keys == [1, 2, 3]
        assert reader.num_identities == 2
        assert list(reader.iter_samples()) == images


def test_writer_matches_independent_byte_layout(tmp_path: Path) -> None:
    rec, idx = tmp_path / "w.rec", tmp_path / "w.idx"
    with RecordIOWriter(rec, idx) as writer:
        writer.write(10, 3.0, b"\xff\xd8jpeg-zero")
        writer.write(11, 7.0, SPLIT_IMAGE)
        writer.write(12, [5.0, 9.0, 1.5], b"\xff\xd8arr", id=11, id2=12)
        writer.write_record(13, b"ab" + MAGIC + b"cd")  # unaligned magic: not split
    expected = [
        part(0, payload(3.0, b"\xff\xd8jpeg-zero")),
        split_record(7.0),
        part(0, payload([5.0, 9.0, 1.5], b"\xff\xd8arr", id_=11, id2=12)),
        part(0, b"ab" + MAGIC + b"cd"),
    ]
    assert rec.read_bytes() == b"".join(expected)
    offsets = np.cumsum([0] + [len(r) for r in expected])[:-1]
    assert idx.read_text() == "".join(f"{key}\t{off}\n" for key, off in zip(range(10, 14), offsets))


def test_insightface_rec_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    samples = []
    for label in (0, 2, 5):
        for _ in range(int(rng.integers(1, 4))):
            image = rng.integers(0, 256, int(rng.integers(1, 200)), dtype=np.uint8).tobytes()
            samples.append((label, MAGIC * 2 + image))  # the magic always present at an aligned offset
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    n = write_insightface_rec(rec, idx, iter(samples), num_classes=6)
    assert n == len(samples)
    assert read_property(tmp_path / "property") == (6, 112, 112)
    for index_path in (idx, None):
        with RecordIOReader(rec, index_path) as reader:
            assert reader.layout == "header"
            assert reader.num_images == n and reader.num_identities == 3
            assert list(reader.iter_samples()) == samples
            header, label, _ = reader.read(0)
            assert header.flag == 2 and label.tolist() == [n + 1, n + 4]
            starts = [reader.read(n + 1 + i)[1].tolist() for i in range(3)]
    labels = [label for label, _ in samples]
    expected_runs = [[label] * labels.count(label) for label in (0, 2, 5)]
    assert [labels[int(start) - 1 : int(end) - 1] for start, end in starts] == expected_runs


def test_insightface_writer_rejects_non_contiguous_identities(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="identity 0 reappears at sample 2"):
        write_insightface_rec(tmp_path / "a.rec", tmp_path / "a.idx", [(0, b"a"), (1, b"b"), (0, b"c")], 2)
    with pytest.raises(ValueError, match=r"label must be in \[0, 2\), got 2"):
        write_insightface_rec(tmp_path / "a.rec", tmp_path / "a.idx", [(2, b"a")], 2)


def test_truncated_file_is_reported(tmp_path: Path) -> None:
    records = [part(0, payload(1.0, b"first")), split_record(2.0)]
    rec, idx = write_files(tmp_path, records)
    full = rec.read_bytes()
    second = len(records[0])
    rec.write_bytes(full[: second + 24 + 8 + 10])  # ends inside the second part of the split record
    with pytest.raises(RecordIOError, match=rf"train.rec: record at offset {second} is truncated"):
        RecordIOReader(rec)
    with RecordIOReader(rec, idx) as reader:
        assert reader.read(0)[2] == b"first"
        with pytest.raises(RecordIOError, match=rf"record at offset {second} is truncated"):
            reader.read(1)
    rec.write_bytes(full[:5])
    with pytest.raises(RecordIOError, match="inside a record header"):
        RecordIOReader(rec)


def test_bad_magic_and_bad_continuation(tmp_path: Path) -> None:
    good = part(0, payload(1.0, b"first"))
    rec, _ = write_files(tmp_path, [good, b"\x01\x02\x03\x04" + good[4:]])
    with pytest.raises(RecordIOError, match=rf"offset {len(good)} has bad magic 0x04030201, expected 0xced7230a"):
        RecordIOReader(rec)
    rec, _ = write_files(tmp_path, [part(1, b"abcd") + part(0, b"efgh")])
    with pytest.raises(RecordIOError, match="continues at offset 12 with cflag 0, expected 2"):
        RecordIOReader(rec)
    rec, _ = write_files(tmp_path, [part(3, b"abcd")])
    with pytest.raises(RecordIOError, match="starts with cflag 3"):
        RecordIOReader(rec)


def test_missing_key_and_bad_idx(tmp_path: Path) -> None:
    rec, idx = write_files(tmp_path, [part(0, payload(1.0, b"a"))])
    with RecordIOReader(rec, idx) as reader:
        with pytest.raises(KeyError, match="no record with key 5"):
            reader.read(5)
    idx.write_text("0\t999\n")
    with pytest.raises(RecordIOError, match="offset 999 of key 0 lies outside"):
        RecordIOReader(rec, idx)
    idx.write_text("zero 0\n")
    with pytest.raises(RecordIOError, match="line 1 should be 'key<TAB>offset'"):
        RecordIOReader(rec, idx)
