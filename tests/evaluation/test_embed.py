"""facekd.evaluation.embed against the one-file path of facekd.eval (the reference) and the cache's keys."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from facekd import eval as fkeval
from facekd.data.loader import decode_image, to_float
from facekd.errors import CheckpointError, DataError
from facekd.evaluation import embed


class AsymmetricNet(torch.nn.Module):
    """Not flip-invariant (a linear map of pooled pixels), with dropout so that a forgotten eval() shows."""

    def __init__(self, image_size: int, dim: int = 6) -> None:
        super().__init__()
        self.pool = torch.nn.AvgPool2d(4)
        self.dropout = torch.nn.Dropout(0.5)
        self.linear = torch.nn.Linear(3 * (image_size // 4) ** 2, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(self.pool(images).flatten(1)))


def jpegs(count: int, size: int, seed: int, mode: str = "RGB") -> list[bytes]:
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


@pytest.mark.parametrize("stored, size", [(16, 16), (21, 16), (12, 16)])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_decoded_pixels_normalise_to_the_loaders_images(stored: int, size: int, mode: str) -> None:
    images = jpegs(7, stored, seed=stored, mode=mode)
    pixels = embed.decode_pixels(images, size, workers=3, progress=False)
    assert pixels.dtype == np.uint8 and pixels.shape == (7, size, size, 3)
    for normalize in ("mxnet", "arcface_torch"):
        ours = to_float(torch.from_numpy(pixels), normalize)
        reference = torch.stack([decode_image(image, size, normalize) for image in images])
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)


@pytest.mark.parametrize("normalize", ["mxnet", "arcface_torch"])
@pytest.mark.parametrize("batch_size", [1, 3, 41])
def test_embed_pixels_equals_embed_images(batch_size: int, normalize: str) -> None:
    torch.manual_seed(0)
    size = 16
    model = AsymmetricNet(size).train()
    images = jpegs(11, size, seed=4)
    reference = fkeval.embed_images(model, images, image_size=size, batch_size=4, device="cpu", progress=False,
                                    normalize=normalize)
    batches = embed.decoded_batches(images, size, batch_size, workers=2)
    ours = embed.embed_pixels(model, batches, total=len(images), device="cpu", normalize=normalize,
                              progress=False)
    assert model.training  # mode restored
    assert ours.dtype == np.float32 and ours.shape == (11, 6)
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6)


def test_a_damaged_image_is_a_data_error() -> None:
    images = jpegs(2, 8, seed=1) + [b"not a jpeg"]
    with pytest.raises(DataError, match="cannot decode image of 10 bytes"):
        list(embed.decoded_batches(images, 8, 2))


def test_cache_round_trip_and_keys(tmp_path) -> None:
    cache = embed.EmbeddingCache(tmp_path)
    values = np.arange(12, dtype=np.float32).reshape(4, 3)
    checkpoint, data = "a" * 64, "b" * 64
    assert cache.load(checkpoint, data, "16px") is None
    path = cache.save(values, checkpoint, data, "16px", data="x.bin")
    np.testing.assert_array_equal(cache.load(checkpoint, data, "16px"), values)
    mapped = cache.load(checkpoint, data, "16px", mmap=True)
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, values)
    assert json.loads(path.with_suffix(".json").read_text())["data"] == "x.bin"
    # another checkpoint, data file or variant misses, even when the short prefix in the file name agrees
    assert cache.load("c" * 64, data, "16px") is None
    assert cache.load(checkpoint, data, "32px") is None
    assert cache.load(checkpoint, "b" * 16 + "c" * 48, "16px") is None
    assert not list(tmp_path.rglob("*.partial"))


def test_checkpoint_digest_follows_index_json(tmp_path) -> None:
    step = tmp_path / "run" / "checkpoints" / "step_000000004"
    step.mkdir(parents=True)
    (step / "index.json").write_text('{"step": 4}')
    older = tmp_path / "run" / "checkpoints" / "step_000000002"
    older.mkdir()
    (older / "index.json").write_text('{"step": 2}')
    folder, digest = embed.checkpoint_digest(tmp_path / "run")
    assert folder == step and digest == embed.file_digest(step / "index.json")
    assert embed.checkpoint_digest(older)[1] != digest
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        embed.checkpoint_digest(tmp_path / "nowhere")
