"""Verification .bin loading: round trip, Python 2 pickles, refusal of malicious pickles, structure errors,
damaged files and images."""

from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facekd.data.verification import load_bin, write_bin
from facekd.errors import DataError


def encode(seed: int, image_format: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format)
    return buffer.getvalue()


def test_round_trip(tmp_path: Path) -> None:
    images = [encode(i, "PNG" if i == 3 else "JPEG") for i in range(6)]
    issame = [True, False, True]
    path = tmp_path / "sub" / "lfw.bin"
    write_bin(path, images, issame)
    loaded, flags = load_bin(path)
    assert loaded == images
    assert flags.dtype == np.bool_ and flags.tolist() == issame
    assert sorted(p.name for p in path.parent.iterdir()) == ["lfw.bin"]  # no temporary file left behind


def _py2_string(data: bytes) -> bytes:
    """Python 2 pickles a str as SHORT_BINSTRING 'U' (< 256 bytes) or BINSTRING 'T'."""
    if len(data) < 256:
        return b"U" + bytes([len(data)]) + data
    return b"T" + struct.pack("<i", len(data)) + data


def test_python2_protocol2_file_loads(tmp_path: Path) -> None:
    """A pickle as Python 2's cPickle.dump((list_of_str, list_of_bool), f, protocol=2) writes it."""
    images = [b"\xff\xd8short", b"\xff\xd8" + bytes(range(256)) * 2, b"\xff\xd8c", b"\xff\xd8d"]
    body = b"\x80\x02" + b"]q\x00(" + b"".join(_py2_string(image) for image in images) + b"e"
    body += b"]q\x01(\x88\x89e" + b"\x86q\x02."  # [True, False], TUPLE2, STOP
    path = tmp_path / "py2.bin"
    path.write_bytes(body)
    loaded, flags = load_bin(path, verify_images=False)  # the bytes are stand-ins, not images
    assert loaded == images and flags.tolist() == [True, False]


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_python3_pickles_with_numpy_items_load(tmp_path: Path, protocol: int) -> None:
    """Protocol 2 bytes go through _codecs.encode; numpy uint8 images and np.bool_ flags need numpy globals."""
    images = [b"\xff\xd8a", np.frombuffer(b"\xff\xd8b", np.uint8).copy()]
    path = tmp_path / "np.bin"
    for issame in ([np.bool_(True)], np.array([True]), [1]):
        path.write_bytes(pickle.dumps((images, issame), protocol=protocol))
        loaded, flags = load_bin(path, verify_images=False)
        assert loaded == [b"\xff\xd8a", b"\xff\xd8b"] and flags.tolist() == [True]


class _RunsCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


@pytest.mark.parametrize("protocol", [2, 5])
def test_malicious_pickle_is_refused_without_side_effect(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([_RunsCommand(f"touch {marker}"), b"x"], [True]), protocol=protocol))
    with pytest.raises(DataError, match=r"evil.bin: refused to load global (posix|os)\.system") as refused:
        load_bin(path)
    assert isinstance(refused.value, pickle.UnpicklingError)
    assert not marker.exists()


def test_codecs_encode_only_allows_latin1(tmp_path: Path) -> None:
    # _codecs.encode is allowed for protocol-2 bytes, but not with an arbitrary codec
    path = tmp_path / "codec.bin"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x06\x00\x00\x00rot_13\x86R.")
    with pytest.raises(pickle.UnpicklingError, match="only encode\\(str, 'latin1'\\)"):
        load_bin(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"images": []}, "expected a pickled pair \\(images, issame\\), got dict"),
        (([b"a"], [True], [1]), "got tuple of length 3"),
        (([b"a", b"b", b"c"], [True]), "3 images for 1 pairs, expected 2 x 1 = 2"),
        (([b"a", "b"], [True]), "image 1 should be encoded image bytes, got str"),
        (([b"a", b"b"], [2]), "issame should hold booleans"),
        (([b"a", b"b"], [0.5]), "issame should hold booleans"),
        ((b"ab", [True]), "images should be a list of encoded images, got bytes"),
    ],
)
def test_wrong_structure_errors(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(content, protocol=4))
    with pytest.raises(DataError, match=message):
        load_bin(path)


def test_not_a_pickle_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.bin"
    path.write_bytes(b"\x80\x04\x95")
    with pytest.raises(DataError, match="junk.bin: not a readable pickle"):
        load_bin(path)
    with pytest.raises(DataError, match="missing.bin does not exist"):
        load_bin(tmp_path / "missing.bin")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_truncated_file(tmp_path: Path, protocol: int) -> None:
    whole = pickle.dumps(([encode(0), encode(1)], [True]), protocol=protocol)
    path = tmp_path / "cut.bin"
    for length in (len(whole) // 3, len(whole) - 1):
        path.write_bytes(whole[:length])
        with pytest.raises(DataError, match="cut.bin: not a readable pickle") as cut:
            load_bin(path)
        assert "\n" not in str(cut.value)


def test_undecodable_image_names_file_and_index(tmp_path: Path) -> None:
    images = [encode(0), encode(1), encode(2), encode(3)[:40], encode(4), b"not an image at all"]
    path = tmp_path / "agedb.bin"
    write_bin(path, images, [True, False, True])
    with pytest.raises(DataError, match=r"agedb.bin: image 3 of 6 does not decode \(") as damaged:
        load_bin(path)
    assert "\n" not in str(damaged.value)
    images[3] = encode(3)
    write_bin(path, images, [True, False, True])
    with pytest.raises(DataError, match=r"agedb.bin: image 5 of 6 does not decode"):
        load_bin(path)
    assert len(load_bin(path, verify_images=False)[0]) == 6


def _bytes8(length: int) -> bytes:
    return b"\x8e" + struct.pack("<Q", length)  # BINBYTES8: a bytes object of an 8-byte length


@pytest.mark.parametrize(
    "body",
    [
        # protocol 4: ([bytes of a claimed 2**40 bytes ...
        b"\x80\x04]" + _bytes8(1 << 40) + b"abc",
        # a numpy array whose pickle asks _reconstruct for 10**11 elements before any data
        pickle.dumps(([np.zeros(3, np.uint8)] * 2, [True]), protocol=2).replace(
            b"K\x00\x85", b"\x8a\x05" + (10**11).to_bytes(5, "little") + b"\x85", 1
        ),
        # and one whose data (3 bytes) is far less than its header's shape
        pickle.dumps(([np.zeros(3, np.uint8)] * 2, [True]), protocol=2).replace(
            b"K\x01K\x03\x85", b"K\x01\x8a\x05" + (10**11).to_bytes(5, "little") + b"\x85", 1
        ),
    ],
    ids=["bytes8-length", "reconstruct-shape", "setstate-shape"],
)
def test_absurd_sizes_are_refused_before_allocation(tmp_path: Path, body: bytes) -> None:
    path = tmp_path / "huge.bin"
    path.write_bytes(body)
    with pytest.raises(DataError, match="huge.bin: not a readable pickle") as refused:
        load_bin(path, verify_images=False)
    assert "\n" not in str(refused.value)


def test_write_bin_checks_pair_count(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3 images for 2 pairs, expected 4"):
        write_bin(tmp_path / "x.bin", [b"a", b"b", b"c"], [True, False])
    assert not (tmp_path / "x.bin").exists()
