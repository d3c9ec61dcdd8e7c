"""facekd export: ONNX in insightface's layout (normalisation inside, named as insightface looks for it), checked
under onnxruntime; TorchScript."""
import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from facekd.cli import main
from facekd.export import export_onnx
from facekd.models import build_backbone
from facekd.models.insightface import import_insightface, to_insightface
from facekd.network import load_network


@pytest.fixture(scope="module")
def zoo_run(tmp_path_factory):
    """An imported arcface_torch MobileFaceNet (112 px, 512-d, normalised by 127.5) with non-trivial BN statistics."""
    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    backbone = build_backbone("mobilefacenet_arcface_torch").train()
    with torch.no_grad():
        for _ in range(3):
            backbone(torch.randn(8, 3, 112, 112))
    torch.save(to_insightface(backbone), root / "backbone.pth")
    import_insightface(root / "backbone.pth", "mbf", root / "run")
    return root / "run"


def _insightface_reads_normalisation_inside(model) -> bool:
    """insightface ArcFaceONNX's test: nodes named Sub* and Mul* among the first 8 → it feeds raw pixels."""
    names = [node.name for node in model.graph.node[:8]]
    return any(name.startswith("Sub") for name in names) and any(name.startswith("Mul") for name in names)


@pytest.mark.parametrize("dynamic_batch", [False, True])
def test_onnx_matches_torch_under_onnxruntime(zoo_run, tmp_path, capsys, dynamic_batch) -> None:
    args = ["export", str(zoo_run), "--onnx", str(tmp_path / "student.onnx")] + (["--dynamic-batch"] if dynamic_batch else [])
    assert main(args) == 0
    assert "max abs difference" in capsys.readouterr().out
    model = onnx.load(str(tmp_path / "student.onnx"))
    assert _insightface_reads_normalisation_inside(model)
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    assert metadata["facekd.normalize"] == "arcface_torch"

    session = onnxruntime.InferenceSession(str(tmp_path / "student.onnx"), providers=["CPUExecutionProvider"])
    (given,), (returned,) = session.get_inputs(), session.get_outputs()
    assert given.name == "input.1" and given.shape[1:] == [3, 112, 112]
    batch = 5 if dynamic_batch else 1
    assert (given.shape[0] == "N") == dynamic_batch
    # what insightface feeds it: RGB pixels 0-255 as float32 NCHW
    pixels = np.random.default_rng(1).integers(0, 256, (batch, 3, 112, 112)).astype(np.float32)
    got = session.run(None, {"input.1": pixels})[0]
    backbone = load_network(zoo_run, with_head=False).backbone
    with torch.no_grad():
        expected = backbone((torch.from_numpy(pixels) - 127.5) / 127.5).numpy()
    assert got.shape == (batch, 512)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_facekd_trained_network_exports_its_mxnet_normalisation(tiny_job, tmp_path) -> None:
    from facekd.config import job_from_dict
    from facekd.train import Trainer

    job = tiny_job("tiny", train={"steps": 2})
    Trainer(job_from_dict(job), progress=False).fit()
    result = export_onnx(job["train"]["output_dir"], tmp_path / "tiny.onnx")
    assert result["normalize"] == "mxnet" and result["max_abs_diff"] <= 1e-4
    session = onnxruntime.InferenceSession(str(tmp_path / "tiny.onnx"), providers=["CPUExecutionProvider"])
    pixels = np.full((1, 3, 32, 32), 200, np.float32)
    backbone = load_network(job["train"]["output_dir"], with_head=False).backbone
    with torch.no_grad():
        expected = backbone(torch.full((1, 3, 32, 32), (200 - 127.5) / 128)).numpy()
    np.testing.assert_allclose(session.run(None, {"input.1": pixels})[0], expected, rtol=0, atol=1e-4)


def test_torchscript_export(zoo_run, tmp_path) -> None:
    assert main(["export", str(zoo_run), "--torchscript", str(tmp_path / "student.pt")]) == 0
    module = torch.jit.load(str(tmp_path / "student.pt"))
    pixels = torch.rand(2, 3, 112, 112) * 255
    backbone = load_network(zoo_run, with_head=False).backbone
    with torch.no_grad():
        torch.testing.assert_close(module(pixels), backbone((pixels - 127.5) / 127.5), rtol=0, atol=1e-4)


def test_export_needs_a_target(zoo_run, capsys) -> None:
    assert main(["export", str(zoo_run)]) == 2
    assert "--onnx" in capsys.readouterr().err
