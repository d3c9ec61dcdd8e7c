"""Deploy a trained backbone: ONNX in the layout of insightface's recognition models, TorchScript beside it.

The graph takes what insightface's ``ArcFaceONNX.get_feat`` feeds an MXNet-era model: float32 RGB pixels in
[0, 255], N×3×112×112 (``cv2.dnn.blobFromImages(..., swapRB=True)``), and returns the unnormalised N×512
embedding. The network's normalisation is INSIDE the graph, as its first two nodes, named ``Sub_normalize``
and ``Mul_normalize``: insightface looks for nodes named ``Sub*`` and ``Mul*`` among the first eight and, when it
finds both, feeds raw pixels (input_mean 0, input_std 1), so insightface's own loader uses the model as is.
The constants are the network's ``model.normalize`` (127.5 and 1/128 for facekd-trained networks, 1/127.5
for arcface_torch ones) and are also written to the model's metadata (``facekd.normalize``,
``facekd.input``) for other callers.

Before reporting success the file is run under onnxruntime (CPU) on random pixel batches and compared with
the torch model; a difference above ``atol`` is an error.
"""
from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from facekd.errors import CheckpointError
from facekd.network import checkpoint_folder, load_network

__all__ = ["NormalizedBackbone", "export_onnx", "export_torchscript"]

logger = logging.getLogger(__name__)

INPUT_NAME = "input.1"  # the name insightface's exported recognition models give their input
OUTPUT_NAME = "embedding"
_SCALES = {"mxnet": 1 / 128, "arcface_torch": 1 / 127.5}


class NormalizedBackbone(nn.Module):
    """``backbone((pixels − 127.5)·scale)``: float RGB pixels [N, 3, H, W] in [0, 255] to embeddings [N, D]."""

    def __init__(self, backbone: nn.Module, normalize: str) -> None:
        super().__init__()
        if normalize not in _SCALES:
            raise ValueError(f"normalize must be one of {sorted(_SCALES)}, got {normalize!r}")
        self.backbone = backbone
        self.normalize = normalize
        self.scale = _SCALES[normalize]

    def forward(self, pixels: Tensor) -> Tensor:
        return self.backbone((pixels - 127.5) * self.scale)


def _deployable(run: str | Path) -> tuple[NormalizedBackbone, Any, Path]:
    folder = checkpoint_folder(run)
    network = load_network(folder, "cpu", with_head=False)
    return NormalizedBackbone(network.backbone, network.job.model.normalize).eval(), network.job, folder


def _name_normalisation_nodes(model: Any) -> None:
    """Put the normalisation (the Sub on the input, the Mul on its result, and any Constant they read) first in
    the graph and name it so that insightface recognises it: it looks at the first 8 nodes only."""
    nodes = list(model.graph.node)
    sub = next((node for node in nodes if node.op_type == "Sub" and INPUT_NAME in node.input), None)
    mul = next((node for node in nodes if sub is not None and node.op_type == "Mul" and sub.output[0] in node.input),
               None)
    if sub is None or mul is None:
        raise RuntimeError(f"the exported graph does not start with the normalisation Sub → Mul: "
                           f"{[node.op_type for node in nodes[:8]]}")
    read = set(sub.input) | set(mul.input)
    constants = [node for node in nodes if node.op_type == "Constant" and set(node.output) & read]
    sub.name, mul.name = "Sub_normalize", "Mul_normalize"
    first = [*constants, sub, mul]
    rest = [node for node in nodes if all(node is not moved for moved in first)]
    del model.graph.node[:]
    model.graph.node.extend(first + rest)


def export_onnx(run: str | Path, out: str | Path, *, opset: int = 17, dynamic_batch: bool = False,
                check_batches: int = 3, atol: float = 1e-4, seed: int = 0) -> dict[str, Any]:
    """Write the backbone of ``run`` (a run folder or checkpoint) to ``out`` as ONNX and check it under
    onnxruntime against torch; returns {path, input, output, normalize, max_abs_diff}.

    Without ``dynamic_batch`` the graph takes batches of 1 (insightface's models fix N at 1 or leave it free).
    """
    import onnx
    import onnxruntime

    deployable, job, folder = _deployable(run)
    size = job.data.image_size
    batch = 4 if dynamic_batch else 1
    example = torch.rand(batch, 3, size, size) * 255
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # torch >= 2.9 prefers its torch.export-based exporter, which needs onnxscript; the TorchScript one
        # (deprecated, still shipped in 2.13) traces these convolutional networks exactly
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            deployable, (example,), buffer, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], do_constant_folding=True,
            dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}} if dynamic_batch else None,
        )
    model = onnx.load_from_string(buffer.getvalue())
    _name_normalisation_nodes(model)
    scale = "128" if deployable.normalize == "mxnet" else "127.5"
    metadata = {
        "facekd.normalize": deployable.normalize,
        "facekd.input": f"float32 RGB pixels in [0, 255], N×3×{size}×{size}; (x − 127.5)/{scale} is inside the graph",
        "facekd.output": f"N×{job.model.embedding_dim} embedding, not normalised",
        "facekd.backbone": job.model.backbone,
        "facekd.checkpoint": str(folder),
    }
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))

    # check: onnxruntime against torch on random pixels
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for _ in range(check_batches):
        pixels = torch.rand(batch, 3, size, size, generator=generator) * 255
        with torch.no_grad():
            expected = deployable(pixels).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: pixels.numpy()})[0]
        worst = max(worst, float(np.abs(got - expected).max()))
    if not worst <= atol:
        raise CheckpointError(f"{out}: onnxruntime's embeddings differ from torch's by up to {worst:.3g} "
                              f"(more than {atol}); the export is not faithful")
    logger.info("onnx export %s checked under onnxruntime: max abs difference %.3g", out, worst)
    return {"path": str(out), "input": f"{INPUT_NAME} [{'N' if dynamic_batch else 1}, 3, {size}, {size}]",
            "output": f"{OUTPUT_NAME} [{'N' if dynamic_batch else 1}, {job.model.embedding_dim}]",
            "normalize": deployable.normalize, "max_abs_diff": worst}


def export_torchscript(run: str | Path, out: str | Path, *, atol: float = 1e-4) -> dict[str, Any]:
    """Write the backbone of ``run`` with its normalisation as TorchScript (``torch.jit.trace``), checked against
    the eager model; the same input and output as the ONNX export."""
    deployable, job, folder = _deployable(run)
    size = job.data.image_size
    example = torch.rand(2, 3, size, size) * 255
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(deployable, example)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    extra = {"facekd.json": json.dumps({"normalize": deployable.normalize, "checkpoint": str(folder)})}
    torch.jit.save(traced, str(out), _extra_files=extra)
    pixels = torch.rand(3, 3, size, size) * 255
    with torch.no_grad():
        worst = float((torch.jit.load(str(out))(pixels) - deployable(pixels)).abs().max())
    if not worst <= atol:
        raise CheckpointError(f"{out}: the TorchScript module differs from the eager one by up to {worst:.3g}")
    return {"path": str(out), "normalize": deployable.normalize, "max_abs_diff": worst}
