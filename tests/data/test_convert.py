"""Conversion of image folders and RecordIO files into WebDataset shards, resume after a kill or damage,
inspection."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facekd.data.convert import convert_to_shards, inspect_dataset
from facekd.data.recordio import RecordIOWriter, write_insightface_rec
from facekd.data.verification import write_bin
from facekd.errors import ConfigError, DataError


def encode(seed: int, image_format: str = "JPEG", size: tuple[int, int] = (12, 10)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format)
    return buffer.getvalue()


def read_shards(out_dir: Path) -> dict[str, tuple[bytes, int]]:
    """{key: (image bytes, class id)} over all shards of a conversion, checking each sample is complete."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out_dir.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, extension = member.name.split(".", 1)
                samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    assert all(len(sample) == 2 and "cls" in sample for sample in samples.values())
    return {
        key: (next(v for k, v in sample.items() if k != "cls"), int(sample["cls"])) for key, sample in samples.items()
    }


def make_folder(root: Path) -> dict[bytes, str]:
    """Three identities, one PNG among them, one corrupt (truncated) JPEG; returns {image bytes: identity}."""
    owner: dict[bytes, str] = {}
    for identity, count in (("zed", 3), ("amy", 4), ("bob", 2)):
        (root / identity).mkdir(parents=True)
        for i in range(count):
            data = encode(len(owner), "PNG" if (identity, i) == ("bob", 1) else "JPEG")
            name = f"{i}.png" if (identity, i) == ("bob", 1) else f"{i}.jpg"
            (root / identity / name).write_bytes(data)
            owner[data] = identity
    (root / "amy" / "broken.jpg").write_bytes(encode(99)[:60])
    (root / "amy" / "notes.txt").write_text("not an image")
    return owner


def test_folder_conversion(tmp_path: Path) -> None:
    owner = make_folder(tmp_path / "faces")
    manifest = convert_to_shards(tmp_path / "faces", tmp_path / "out", shard_size=4, show_progress=False)
    assert manifest["class_names"] == ["amy", "bob", "zed"]
    assert manifest["num_classes"] == 3
    assert manifest["num_samples"] == 9 and manifest["num_corrupt"] == 1
    assert [shard["num_samples"] for shard in manifest["shards"]] in ([4, 3, 2], [3, 4, 2], [4, 4, 1])
    assert manifest["image_size"] == [10, 12]
    samples = read_shards(tmp_path / "out")
    assert len(samples) == 9 and len(owner) == 9
    assert sum(image.startswith(b"\x89PNG") for image, _ in samples.values()) == 1  # stored as is, not re-encoded
    for image, class_id in samples.values():
        assert manifest["class_names"][class_id] == owner[image]
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        counts = sum(member.name.endswith(".cls") for member in tar)
    assert counts == manifest["shards"][0]["num_samples"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    assert not list((tmp_path / "out").glob("*.partial")) and not list((tmp_path / "out").glob(".*.partial"))


@pytest.mark.parametrize("layout", ["header", "shuffled"])
def test_rec_conversion_remaps_labels(tmp_path: Path, layout: str) -> None:
    labels = [3, 3, 7, 10, 10, 10]
    images = [encode(i) for i in range(len(labels))]
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    if layout == "header":
        write_insightface_rec(rec, idx, zip(labels, images), num_classes=11)
    else:
        with RecordIOWriter(rec, idx) as writer:
            for key, (label, image) in enumerate(zip(labels, images)):
                writer.write(key, [float(label), 0.0], image)  # label arrays: label[0] is the identity
    manifest = convert_to_shards(tmp_path, tmp_path / "out", shard_size=4, shuffle=False, show_progress=False)
    assert manifest["class_names"] == ["3", "7", "10"]
    assert manifest["num_samples"] == 6 and [s["num_samples"] for s in manifest["shards"]] == [4, 2]
    samples = read_shards(tmp_path / "out")
    assert sorted(samples) == [f"{i:09d}" for i in range(6)]  # unshuffled: keys follow the rec order
    assert [samples[f"{i:09d}"] for i in range(6)] == list(zip(images, [0, 0, 1, 2, 2, 2]))


_KILL_SCRIPT = """
import os, signal, sys
import facekd.data.convert as convert
original = convert._image_format
calls = [0]
def killing_image_format(data):
    calls[0] += 1
    if calls[0] == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
    return original(data)
convert._image_format = killing_image_format
convert.convert_to_shards(sys.argv[1], sys.argv[2], shard_size=3, show_progress=False)
"""


def test_resume_after_kill_matches_uninterrupted_run(tmp_path: Path) -> None:
    make_folder(tmp_path / "faces")
    reference = convert_to_shards(tmp_path / "faces", tmp_path / "reference", shard_size=3, show_progress=False)
    out = tmp_path / "out"
    # SIGKILL in the middle of the third shard (the 8th image decoded)
    result = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(tmp_path / "faces"), str(out), "8"], timeout=60)
    assert result.returncode == -9
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert (out / ".shard-000002.tar.partial").exists() and not (out / "manifest.json").exists()
    assert inspect_dataset(tmp_path / "reference")["ok"]
    first_shard_mtime = (out / "shard-000000.tar").stat().st_mtime_ns

    resumed = convert_to_shards(tmp_path / "faces", out, shard_size=3, show_progress=False)
    assert (out / "shard-000000.tar").stat().st_mtime_ns == first_shard_mtime  # reused, not rewritten
    assert {k: v for k, v in resumed.items() if k != "created"} == {
        k: v for k, v in reference.items() if k != "created"
    }
    for shard in reference["shards"]:
        assert (out / shard["name"]).read_bytes() == (tmp_path / "reference" / shard["name"]).read_bytes()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".partial")]


def test_settings_mismatch_and_missing_source(tmp_path: Path) -> None:
    make_folder(tmp_path / "faces")
    convert_to_shards(tmp_path / "faces", tmp_path / "out", shard_size=3, show_progress=False)
    with pytest.raises(DataError, match="shard-000000.json was written by a conversion with other settings"):
        convert_to_shards(tmp_path / "faces", tmp_path / "out", shard_size=3, seed=1, show_progress=False)
    with pytest.raises(DataError, match="conversion source .*nowhere does not exist"):
        convert_to_shards(tmp_path / "nowhere", tmp_path / "out2", show_progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds neither train.rec nor identity sub-folders"):
        convert_to_shards(tmp_path / "empty", tmp_path / "out2", show_progress=False)
    with pytest.raises(ConfigError, match="shard_size must be positive, got 0"):
        convert_to_shards(tmp_path / "faces", tmp_path / "out3", shard_size=0, show_progress=False)
    with pytest.raises(DataError, match="nowhere does not exist"):
        inspect_dataset(tmp_path / "nowhere")


def test_resume_rewrites_a_kept_shard_damaged_in_place(tmp_path: Path) -> None:
    make_folder(tmp_path / "faces")
    first = convert_to_shards(tmp_path / "faces", tmp_path / "out", shard_size=3, show_progress=False)
    shard = tmp_path / "out" / "shard-000001.tar"
    original = shard.read_bytes()
    damaged = bytearray(original)
    damaged[612] ^= 0xFF  # one flipped byte inside the first image: same size, other sha256
    shard.write_bytes(bytes(damaged))
    untouched_mtime = (tmp_path / "out" / "shard-000000.tar").stat().st_mtime_ns

    resumed = convert_to_shards(tmp_path / "faces", tmp_path / "out", shard_size=3, show_progress=False)
    assert shard.read_bytes() == original  # rewritten, not kept
    assert (tmp_path / "out" / "shard-000000.tar").stat().st_mtime_ns == untouched_mtime  # intact: kept
    assert [entry["sha256"] for entry in resumed["shards"]] == [entry["sha256"] for entry in first["shards"]]


def test_inspect_flags_truncated_and_missing_shards(tmp_path: Path) -> None:
    make_folder(tmp_path / "faces")
    convert_to_shards(tmp_path / "faces", tmp_path / "out", shard_size=3, show_progress=False)
    report = inspect_dataset(tmp_path / "out" / "manifest.json")
    assert report["ok"] and report["num_samples"] == 9 and report["num_shards"] == 4
    assert [entry["found"] for entry in report["shards"]] == [entry["expected"] for entry in report["shards"]]

    shard = tmp_path / "out" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:1200])  # cuts the tar inside its second member
    (tmp_path / "out" / "shard-000002.tar").unlink()
    with tarfile.open(tmp_path / "out" / "shard-000003.tar", "a") as tar:
        info = tarfile.TarInfo("999999999.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"0"))
    report = inspect_dataset(tmp_path / "out")
    assert not report["ok"]
    assert [entry["status"] for entry in report["shards"]] == ["ok", "truncated", "missing", "count mismatch"]


def test_inspect_checks_digests_unless_told_not_to(tmp_path: Path) -> None:
    make_folder(tmp_path / "faces")
    convert_to_shards(tmp_path / "faces", tmp_path / "out", shard_size=3, show_progress=False)
    shard = tmp_path / "out" / "shard-000002.tar"
    damaged = bytearray(shard.read_bytes())
    damaged[612] ^= 0xFF  # the tar still reads whole, with every sample: only the digest tells
    shard.write_bytes(bytes(damaged))

    report = inspect_dataset(tmp_path / "out", show_progress=False)
    assert not report["ok"] and report["digests_verified"]
    assert [entry["status"] for entry in report["shards"]] == ["ok", "ok", "digest mismatch", "ok"]
    assert report["shards"][2]["problem"].startswith("sha256 ")
    quick = inspect_dataset(tmp_path / "out", verify_digests=False)
    assert quick["ok"] and not quick["digests_verified"]


def test_inspect_flags_shards_emptied_behind_the_manifest(tmp_path: Path) -> None:
    make_folder(tmp_path / "faces")
    convert_to_shards(tmp_path / "faces", tmp_path / "out", shard_size=3, show_progress=False)
    for shard in (tmp_path / "out").glob("shard-*.tar"):
        with tarfile.open(shard, "w"):
            pass  # a valid tar without members
    report = inspect_dataset(tmp_path / "out", verify_digests=False)
    assert not report["ok"]
    assert {entry["status"] for entry in report["shards"]} == {"count mismatch"}
    assert report["shards"][0]["problem"] == f"0 samples, manifest says {report['shards'][0]['expected']}"


def test_inspect_other_sources(tmp_path: Path) -> None:
    make_folder(tmp_path / "faces")
    assert inspect_dataset(tmp_path / "faces") == {
        "type": "folder", "path": str(tmp_path / "faces"), "num_classes": 3, "num_images": 10
    }
    write_insightface_rec(tmp_path / "train.rec", tmp_path / "train.idx", [(0, b"a"), (1, b"b")], num_classes=2)
    report = inspect_dataset(tmp_path / "train.rec")
    assert (report["layout"], report["num_images"], report["num_classes"], report["image_size"]) == (
        "header", 2, 2, [112, 112]
    )
    write_bin(tmp_path / "lfw.bin", [encode(seed) for seed in range(4)], [True, False])
    assert inspect_dataset(tmp_path / "lfw.bin")["num_positive"] == 1
    write_bin(tmp_path / "bad.bin", [encode(0), encode(1), encode(2)[:50], encode(3)], [True, False])
    with pytest.raises(DataError, match="bad.bin: image 2 of 4 does not decode"):
        inspect_dataset(tmp_path / "bad.bin")


def test_worker_processes_write_identical_shards(tmp_path: Path) -> None:
    make_folder(tmp_path / "faces")
    serial = convert_to_shards(tmp_path / "faces", tmp_path / "serial", shard_size=2, show_progress=False)
    parallel = convert_to_shards(
        tmp_path / "faces", tmp_path / "parallel", shard_size=2, show_progress=False, num_workers=2
    )
    assert [shard["sha256"] for shard in parallel["shards"]] == [shard["sha256"] for shard in serial["shards"]]
    assert parallel["num_corrupt"] == 1
