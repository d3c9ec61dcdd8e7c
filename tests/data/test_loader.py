"""Streaming loader over real tar shards: rank split, determinism, resume, skips, errors, decoding, http/pipe."""

from __future__ import annotations

import functools
import http.server
import io
import json
import shutil
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import webdataset
from PIL import Image

from facekd.data.convert import convert_to_shards
from facekd.data.loader import Batch, ShardReadError, build_train_loader, decode_image

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


def test_zero_and_one_worker_give_the_same_stream(shards: Path) -> None:
    in_process = build_train_loader(shards, batch_size=4, image_size=IMAGE, num_workers=0, shuffle_buffer=6)
    one_worker = build_train_loader(shards, batch_size=4, image_size=IMAGE, num_workers=1, shuffle_buffer=6)
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
    with pytest.raises(FileNotFoundError, match="shard .*shard-000003.tar listed in .*manifest.json does not exist"):
        build_train_loader(copy, batch_size=2)
    with pytest.raises(FileNotFoundError, match="shard manifest .*nowhere does not exist"):
        build_train_loader(tmp_path / "nowhere", batch_size=2)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json: not valid JSON"):
        build_train_loader(copy, batch_size=2)
    (copy / "manifest.json").write_text(json.dumps({"format_version": 7}))
    with pytest.raises(ValueError, match="format_version 7, expected 1"):
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
