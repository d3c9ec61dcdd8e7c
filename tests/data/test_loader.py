"""Streaming loader over real tar shards: rank split, determinism, resume, skips, errors, decoding, http/pipe;
the tar reader against webdataset's; batches bit-identical to decoding each image on its own."""

from __future__ import annotations

import functools
import http.server
import io
import json
import logging
import shutil
import tarfile
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import webdataset
from PIL import Image
from webdataset import tariterators

from facekd.data import loader as loader_module
from facekd.data.convert import convert_to_shards
from facekd.data.loader import Batch, ShardReadError, build_train_loader, decode_image, to_float
from facekd.errors import DataError

NUM_SAMPLES = 48
IMAGE = 8


def encode(seed: int, size: tuple[int, int] = (IMAGE, IMAGE), image_format: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 identities of one image each (so a label names its sample), 8 shards of 6 samples."""
    root = tmp_path_factory.mktemp("loader")
    for identity in range(NUM_SAMPLES):
        (root / "faces" / f"id{identity:03d}").mkdir(parents=True)
        (root / "faces" / f"id{identity:03d}" / "0.jpg").write_bytes(encode(identity))
    convert_to_shards(root / "faces", root / "shards", shard_size=6, show_progress=False)
    return root / "shards"


def take(loader: object, count: int) -> list[Batch]:
    iterator: Iterator[Batch] = iter(loader)  # type: ignore[call-overload]
    return [next(iterator) for _ in range(count)]


def assert_same_batches(left: list[Batch], right: list[Batch]) -> None:
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert a.index == b.index
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.images, b.images)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_get_disjoint_samples_covering_an_epoch(shards: Path, num_workers: int) -> None:
    seen = []
    for rank in range(2):
        loader = build_train_loader(
            shards, batch_size=3, image_size=IMAGE, rank=rank, world_size=2, num_workers=num_workers,
            shuffle_buffer=5, resampled=False,
        )
        assert loader.batches_per_epoch == 8 and loader.num_classes == NUM_SAMPLES
        batches = take(loader, loader.batches_per_epoch)
        assert [batch.index for batch in batches] == list(range(8))
        assert all(batch.images.shape == (3, 3, IMAGE, IMAGE) and batch.images.dtype == torch.float32
                   for batch in batches)
        seen.append({int(label) for batch in batches for label in batch.labels})
        assert sum(len(batch.labels) for batch in batches) == len(seen[-1])  # no repeats within the rank
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(NUM_SAMPLES))


def test_deterministic_and_seed_dependent(shards: Path) -> None:
    def labels(seed: int) -> list[list[int]]:
        loader = build_train_loader(shards, batch_size=4, image_size=IMAGE, num_workers=0, shuffle_buffer=10,
                                    seed=seed)
        return [batch.labels.tolist() for batch in take(loader, 6)]

    first = build_train_loader(shards, batch_size=4, image_size=IMAGE, num_workers=0, shuffle_buffer=10)
    second = build_train_loader(shards, batch_size=4, image_size=IMAGE, num_workers=0, shuffle_buffer=10)
    assert_same_batches(take(first, 6), take(second, 6))
    assert labels(0) != labels(1)


@pytest.mark.parametrize("resampled", [True, False])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_yields_the_tail_of_an_uninterrupted_stream(shards: Path, num_workers: int, resampled: bool) -> None:
    options = dict(batch_size=5, image_size=IMAGE, rank=1, world_size=2, num_workers=num_workers,
                   shuffle_buffer=7, seed=3, resampled=resampled)
    loader = build_train_loader(shards, **options)
    assert loader.batches_per_epoch == 4
    uninterrupted = take(loader, 11)  # crosses two epoch boundaries
    for start in (1, 4, 7):
        resumed = build_train_loader(shards, start_batch=start, **options)
        assert_same_batches(take(resumed, 11 - start), uninterrupted[start:])


@pytest.mark.parametrize("uint8_pixels", [False, True])
def test_zero_and_one_worker_give_the_same_stream(shards: Path, uint8_pixels: bool) -> None:
    options = dict(batch_size=4, image_size=IMAGE, shuffle_buffer=6, uint8_pixels=uint8_pixels)
    in_process = build_train_loader(shards, num_workers=0, **options)
    one_worker = build_train_loader(shards, num_workers=1, **options)
    assert_same_batches(take(in_process, 5), take(one_worker, 5))


def write_manifest(directory: Path, shard_counts: list[int], num_classes: int) -> None:
    manifest = {
        "format_version": 1,
        "num_classes": num_classes,
        "num_samples": sum(shard_counts),
        "shards": [{"name": f"shard-{i:06d}.tar", "num_samples": n} for i, n in enumerate(shard_counts)],
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_and_unlabelled_samples_are_skipped_and_counted(tmp_path: Path, num_workers: int) -> None:
    with webdataset.TarWriter(str(tmp_path / "shard-000000.tar")) as writer:
        writer.write({"__key__": "000000000", "jpg": encode(0), "cls": b"0"})
        writer.write({"__key__": "000000001", "jpg": encode(1)[:40], "cls": b"1"})  # truncated JPEG
        writer.write({"__key__": "000000002", "jpg": encode(2)})  # no class
        writer.write({"__key__": "000000003", "jpg": encode(3), "cls": b"3"})
    write_manifest(tmp_path, [4], num_classes=4)
    loader = build_train_loader(tmp_path, batch_size=4, image_size=IMAGE, num_workers=num_workers,
                                shuffle_buffer=0, resampled=False, flip=False)
    batch = take(loader, 1)[0]
    assert (batch.num_corrupt, batch.num_unlabelled) == (1, 1)
    assert batch.images.shape[0] == 4
    assert sorted(batch.labels.tolist()) == [0, 0, 3, 3]  # skipped slots refilled with the valid samples
    by_label = {int(label): image for label, image in zip(batch.labels, batch.images)}
    assert torch.equal(by_label[0], decode_image(encode(0), IMAGE))


def test_an_unlabeled_stream_reads_images_without_classes(tmp_path: Path) -> None:
    with webdataset.TarWriter(str(tmp_path / "shard-000000.tar")) as writer:
        writer.write({"__key__": "000000000", "jpg": encode(0), "cls": b"0"})
        writer.write({"__key__": "000000001", "jpg": encode(1)})  # no class: fine without labels
        writer.write({"__key__": "000000002", "jpg": encode(2)[:40]})  # truncated JPEG: still skipped
        writer.write({"__key__": "000000003", "jpg": encode(3), "cls": b"99"})  # out of range: ignored
    write_manifest(tmp_path, [4], num_classes=1)
    loader = build_train_loader(tmp_path, batch_size=4, image_size=IMAGE, num_workers=0, shuffle_buffer=0,
                                resampled=False, flip=False, use_labels=False)
    batch = take(loader, 1)[0]
    assert (batch.num_corrupt, batch.num_unlabelled) == (1, 0)
    assert batch.labels.tolist() == [-1, -1, -1, -1]
    decoded = {tuple(decode_image(encode(seed), IMAGE).flatten()[:8].tolist()) for seed in (0, 1, 3)}
    assert {tuple(image.flatten()[:8].tolist()) for image in batch.images} == decoded


def test_missing_shard_and_bad_manifest_errors(shards: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    (copy / "shard-000003.tar").unlink()
    with pytest.raises(DataError, match="shard .*shard-000003.tar listed in .*manifest.json does not exist"):
        build_train_loader(copy, batch_size=2)
    with pytest.raises(DataError, match="shard manifest .*nowhere does not exist"):
        build_train_loader(tmp_path / "nowhere", batch_size=2)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json: not valid JSON"):
        build_train_loader(copy, batch_size=2)
    (copy / "manifest.json").write_text(json.dumps({"format_version": 7}))
    with pytest.raises(DataError, match="format_version 7, expected 1"):
        build_train_loader(copy, batch_size=2)


def test_shard_vanishing_after_construction_is_a_clear_error(shards: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    loader = build_train_loader(copy, batch_size=2, image_size=IMAGE, num_workers=0, resampled=False)
    for tar in copy.glob("*.tar"):
        tar.unlink()
    with pytest.raises(ShardReadError, match="cannot read shard .*shard-0000"):
        take(loader, 1)


def test_normalisation_and_resizing() -> None:
    png = io.BytesIO()
    Image.new("RGB", (5, 4), (0, 128, 255)).save(png, format="PNG")
    image = decode_image(png.getvalue(), (4, 5))
    assert image.shape == (3, 4, 5) and image.dtype == torch.float32
    expected = torch.tensor([-127.5, 0.5, 127.5]) / 128
    assert torch.allclose(image, expected[:, None, None].expand(3, 4, 5))
    resized = decode_image(png.getvalue(), 16)
    assert resized.shape == (3, 16, 16)
    assert torch.allclose(resized, expected[:, None, None].expand(3, 16, 16), atol=1e-6)
    with pytest.raises(ValueError, match="cannot decode image of 3 bytes"):
        decode_image(b"abc")


def test_loader_resizes_and_flips(shards: Path) -> None:
    options = dict(batch_size=6, num_workers=0, shuffle_buffer=4)
    plain = take(build_train_loader(shards, image_size=(10, 12), flip=False, **options), 2)
    flipped = take(build_train_loader(shards, image_size=(10, 12), flip=True, **options), 2)
    assert plain[0].images.shape == (6, 3, 10, 12)
    decisions = []
    for a, b in zip(plain, flipped):
        assert torch.equal(a.labels, b.labels)
        for image, maybe_flipped in zip(a.images, b.images):
            same, mirrored = torch.equal(image, maybe_flipped), torch.equal(image.flip(-1), maybe_flipped)
            assert same or mirrored
            decisions.append(mirrored)
    assert any(decisions) and not all(decisions)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Keeps request lines out of the test output."""


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http:// shards through curl")
def test_shards_over_http_and_pipe(shards: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=shards))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        options = dict(batch_size=4, image_size=IMAGE, num_workers=0, shuffle_buffer=8)
        local = take(build_train_loader(shards, **options), 4)
        over_http = take(build_train_loader(shards, base_url=f"http://127.0.0.1:{server.server_port}", **options), 4)
        assert_same_batches(local, over_http)
        through_pipe = take(build_train_loader(shards, base_url=f"pipe:cat {shards}/{{name}}", **options), 4)
        assert_same_batches(local, through_pipe)
        missing = build_train_loader(shards, base_url=f"http://127.0.0.1:{server.server_port}/nothing", **options)
        with pytest.raises(ShardReadError, match="cannot read shard http://127.0.0.1:.*/nothing/shard-"):
            take(missing, 1)
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- damaged and inconsistent shards


def write_empty_shards(directory: Path, count: int, claimed: int) -> None:
    """``count`` valid tars without a member, under a manifest that says each holds ``claimed`` samples."""
    for index in range(count):
        with tarfile.open(directory / f"shard-{index:06d}.tar", "w"):
            pass
    write_manifest(directory, [claimed] * count, num_classes=4)


@pytest.mark.timeout(60)  # the stream used to read the empty shards forever: a hang fails here
@pytest.mark.parametrize("resampled", [True, False])
def test_shards_yielding_nothing_raise_instead_of_hanging(tmp_path: Path, resampled: bool) -> None:
    write_empty_shards(tmp_path, 3, claimed=16)
    loader = build_train_loader(tmp_path, batch_size=4, image_size=IMAGE, num_workers=0, shuffle_buffer=8,
                                resampled=resampled)
    with pytest.raises(DataError, match=r"shard reads in a row yielded no sample although the manifest lists "
                                        r"48 in them: .*shard-00000\d.tar") as barren:
        take(loader, 1)
    assert "\n" not in str(barren.value)


@pytest.mark.timeout(60)
def test_resampled_stream_of_unlabeled_empty_shards_raises_in_a_worker(tmp_path: Path) -> None:
    write_empty_shards(tmp_path, 2, claimed=16)
    loader = build_train_loader(tmp_path, batch_size=4, image_size=IMAGE, num_workers=1, use_labels=False)
    with pytest.raises(DataError, match="yielded no sample") as barren:
        take(loader, 1)
    assert "\n" not in str(barren.value)  # not DataLoader's "Caught DataError in DataLoader worker …" traceback


def test_sample_count_differing_from_the_manifest_is_logged_once_per_shard(
    shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["shards"][2]["size"], manifest["shards"][5]["size"]
    with tarfile.open(copy / "shard-000002.tar", "w"):
        pass  # emptied: 0 samples where the manifest says 6
    with webdataset.TarWriter(str(copy / "shard-000005.tar")) as writer:
        writer.write({"__key__": "extra", "jpg": encode(99), "cls": b"1"})  # 1 sample where it says 6
    (copy / "manifest.json").write_text(json.dumps(manifest))
    loader = build_train_loader(copy, batch_size=6, image_size=IMAGE, num_workers=0, shuffle_buffer=4)
    with caplog.at_level(logging.WARNING, logger="facekd.data.loader"):
        take(loader, 40)  # 240 samples: every shard read many times
    counts = sorted(record.getMessage() for record in caplog.records if "the manifest says" in record.getMessage())
    assert len(counts) == 2
    assert counts[0].endswith("shard-000002.tar yielded 0 samples, the manifest says 6")
    assert counts[1].endswith("shard-000005.tar yielded 1 samples, the manifest says 6")


@pytest.mark.parametrize("cls", [b"1_0", b" 7", b"7\n", b"+3", b"-1", b"", b"0x1", "٣".encode(), b"1e1"])
def test_class_ids_must_be_plain_decimals(tmp_path: Path, cls: bytes) -> None:
    with webdataset.TarWriter(str(tmp_path / "shard-000000.tar")) as writer:
        writer.write({"__key__": "000000000", "jpg": encode(0), "cls": cls})
        writer.write({"__key__": "000000001", "jpg": encode(1), "cls": b"007"})  # leading zeros are digits
    write_manifest(tmp_path, [2], num_classes=20)
    loader = build_train_loader(tmp_path, batch_size=2, image_size=IMAGE, num_workers=0, shuffle_buffer=0,
                                resampled=False)
    with pytest.raises(DataError, match=r"sample 000000000 of shard .*shard-000000.tar: \.cls should be a decimal "
                                        r"class id, got "):
        take(loader, 1)


def test_class_id_outside_the_manifest_names_sample_and_shard(tmp_path: Path) -> None:
    with webdataset.TarWriter(str(tmp_path / "shard-000000.tar")) as writer:
        writer.write({"__key__": "000000007", "jpg": encode(0), "cls": b"20"})
    write_manifest(tmp_path, [1], num_classes=20)
    loader = build_train_loader(tmp_path, batch_size=1, image_size=IMAGE, num_workers=0, resampled=False)
    with pytest.raises(DataError, match=r"sample 000000007 of shard .*shard-000000.tar: class 20 outside \[0, 20\)"):
        take(loader, 1)


@pytest.mark.parametrize(("cut", "num_workers"), [("inside a member", 0), ("between members", 0),
                                                 ("inside a header", 0), ("inside a member", 1)])
def test_truncated_shard_is_a_one_line_error_naming_it(tmp_path: Path, num_workers: int, cut: str) -> None:
    with webdataset.TarWriter(str(tmp_path / "shard-000000.tar")) as writer:
        for index in range(4):
            writer.write({"__key__": f"{index:09d}", "jpg": encode(index), "cls": b"0"})
    whole = (tmp_path / "shard-000000.tar").read_bytes()
    member_ends = [member.offset_data + member.size + -member.size % 512
                   for member in tarfile.open(tmp_path / "shard-000000.tar")]
    length = {"inside a member": member_ends[4] - 100, "between members": member_ends[5],
              "inside a header": member_ends[5] + 200}[cut]
    (tmp_path / "shard-000000.tar").write_bytes(whole[:length])
    write_manifest(tmp_path, [4], num_classes=1)
    loader = build_train_loader(tmp_path, batch_size=4, image_size=IMAGE, num_workers=num_workers, resampled=False)
    with pytest.raises(ShardReadError, match=r"cannot read shard .*shard-000000.tar: it ends at byte") as truncated:
        take(loader, 1)
    assert isinstance(truncated.value, DataError)
    assert "\n" not in str(truncated.value)


def test_damaged_tar_header_is_an_error(tmp_path: Path) -> None:
    with webdataset.TarWriter(str(tmp_path / "shard-000000.tar")) as writer:
        writer.write({"__key__": "000000000", "jpg": encode(0), "cls": b"0"})
    data = bytearray((tmp_path / "shard-000000.tar").read_bytes())
    data[600] ^= 0xFF
    first_size = tarfile.open(tmp_path / "shard-000000.tar").getmembers()[0].size
    second_header = 512 + first_size + -first_size % 512
    data[second_header + 10] ^= 0x01  # inside the second member's name: its checksum no longer matches
    (tmp_path / "shard-000000.tar").write_bytes(bytes(data))
    with pytest.raises(ShardReadError, match=rf"shard-000000.tar: damaged tar header at byte {second_header}"):
        list(loader_module._read_shard(str(tmp_path / "shard-000000.tar")))


# ---------------------------------------------------------------- the tar reader against webdataset's


def write_tar(path: Path, tar_format: int, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tar_format) as tar:
        directory = tarfile.TarInfo("some/dir")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1.5  # a float mtime makes PAX_FORMAT write a pax header per member
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=["ustar", "gnu", "pax"])
def test_tar_reader_yields_what_webdataset_yields(tmp_path: Path, tar_format: int) -> None:
    long_dir = "d" * 90 + "/" + "e" * 60  # needs the ustar prefix field, a GNU long name or a pax path
    members = [
        ("000000000.jpg", encode(0)), ("000000000.cls", b"3"),
        ("__meta__", b"skipped by webdataset"),
        ("000000001.JPG", encode(1)), ("000000001.cls", b"1"), ("000000001.seg.png", encode(2, image_format="PNG")),
        (f"{long_dir}/000000002.jpg", b"x" * 512), (f"{long_dir}/000000002.cls", b""),
        ("noextension", b"ignored"),
        ("000000003.cls", b"0"),
    ]
    if tar_format != tarfile.USTAR_FORMAT:
        members.append(("f" * 120 + ".jpg", b"long file name"))
    path = tmp_path / "shard.tar"
    write_tar(path, tar_format, members)
    ours = list(loader_module._read_shard(str(path)))
    theirs = list(tariterators.tarfile_samples([{"url": str(path)}]))
    assert ours == theirs and len(ours) == len({member[0].split(".")[0] for member in members}) - 2


# ---------------------------------------------------------------- bit-identical batches


def reference_image(data: bytes, height: int, width: int, flip: bool) -> torch.Tensor:
    """What the loader must produce for one image, computed the plain way: float64 arithmetic, per image."""
    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB")
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
    pixels = (np.asarray(rgb, dtype=np.float64) - 127.5) / 128.0
    planes = torch.from_numpy(pixels.transpose(2, 0, 1).astype(np.float32))
    return planes.flip(-1) if flip else planes


@pytest.mark.parametrize("image_size", [IMAGE, (7, 13), 16], ids=["stored-size", "odd-resize", "upscale"])
@pytest.mark.parametrize("flip", [False, True])
def test_batches_equal_a_per_image_reference_bit_for_bit(tmp_path: Path, image_size: object, flip: bool) -> None:
    gray = io.BytesIO()
    Image.fromarray(np.arange(IMAGE * IMAGE, dtype=np.uint8).reshape(IMAGE, IMAGE)).save(gray, format="JPEG")
    rgba = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (IMAGE, 9, 4), dtype=np.uint8)).save(rgba, "PNG")
    images = [encode(0), gray.getvalue(), encode(2)[:50], rgba.getvalue(), encode(4, (11, 5)), None, encode(6),
              encode(7, image_format="PNG"), encode(8), encode(9)]
    with webdataset.TarWriter(str(tmp_path / "shard-000000.tar")) as writer:
        for index, data in enumerate(images):
            sample = {"__key__": f"{index:09d}", "cls": str(index).encode()}
            if data is not None:
                sample["png" if data.startswith(b"\x89PNG") else "jpg"] = data
            writer.write(sample)
    write_manifest(tmp_path, [len(images)], num_classes=len(images))
    loader = build_train_loader(tmp_path, batch_size=len(images), image_size=image_size, num_workers=0,
                                shuffle_buffer=0, resampled=False, flip=flip, seed=3)
    batch = take(loader, 1)[0]

    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    flip_rng = loader_module._rng(3, loader_module._TAG_FLIP, 0, 0)  # the loader's flip draws for batch 0, rank 0
    flips = [flip and flip_rng.random() < 0.5 for _ in images]
    valid = [index for index, data in enumerate(images) if index not in (2, 5)]  # truncated JPEG; no image
    refill = iter(valid * 2)
    sources = [index if index in valid else next(refill) for index in range(len(images))]
    expected = torch.stack([reference_image(images[source], height, width, flips[position])
                            for position, source in enumerate(sources)])
    assert (batch.num_corrupt, batch.num_unlabelled) == (2, 0)
    assert batch.labels.tolist() == sources
    assert batch.images.dtype == torch.float32 and batch.images.is_contiguous()
    assert torch.equal(batch.images, expected)
    assert any(flips) == flip
    for position, source in enumerate(sources):
        assert torch.equal(decode_image(images[source], image_size), reference_image(images[source], height,
                                                                                      width, False))
    # the same batch as uint8 pixels, made float on the "device"
    pixels = take(build_train_loader(tmp_path, batch_size=len(images), image_size=image_size, num_workers=0,
                                     shuffle_buffer=0, resampled=False, flip=flip, seed=3, uint8_pixels=True), 1)[0]
    assert pixels.images.dtype == torch.uint8 and pixels.images.shape == (len(images), height, width, 3)
    assert torch.equal(pixels.labels, batch.labels)
    as_float = to_float(pixels.images)
    assert as_float.is_contiguous() and torch.equal(as_float, expected)


def test_to_float_refuses_what_is_not_a_pixel_batch() -> None:
    with pytest.raises(ValueError, match=r"expected uint8 pixels \[B, H, W, 3\], got torch.float32 \(2, 3, 4, 4\)"):
        to_float(torch.zeros(2, 3, 4, 4))


def test_arcface_torch_normalisation_is_insightface_s() -> None:
    # arcface_torch: ToTensor then Normalize(0.5, 0.5), i.e. (x/255 − 0.5)/0.5 = (x − 127.5)/127.5, in float64
    pixels = torch.arange(256, dtype=torch.uint8).repeat(6).reshape(2, 16, 16, 3)
    reference = (pixels.permute(0, 3, 1, 2).double() - 127.5) / 127.5
    images = to_float(pixels, "arcface_torch")
    assert images.dtype == torch.float32 and images.min() == -1 and images.max() == 1
    torch.testing.assert_close(images.double(), reference, rtol=0, atol=6e-8)  # within float32 rounding
    # the default stays the MXNet-era (x − 127.5)/128, exactly
    assert torch.equal(to_float(pixels), ((pixels.permute(0, 3, 1, 2).double() - 127.5) / 128).float())
    with pytest.raises(ValueError, match="normalize must be one of"):
        to_float(pixels, "imagenet")


def test_decode_image_normalises_as_to_float() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    batch = torch.from_numpy(pixels)[None]
    for normalize in ("mxnet", "arcface_torch"):
        assert torch.equal(decode_image(buffer.getvalue(), 12, normalize), to_float(batch, normalize)[0])
