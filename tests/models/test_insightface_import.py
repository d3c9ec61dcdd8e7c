"""insightface arcface_torch backbones ↔ facekd: names, shapes, the forms people save, and the import command."""
import pytest
import torch
from torch import nn

from facekd.cli import main
from facekd.errors import CheckpointError
from facekd.models import build_backbone
from facekd.models.insightface import from_insightface, import_insightface, insightface_names, to_insightface
from facekd.network import load_network

# Names and shapes read off insightface arcface_torch backbones/iresnet.py and backbones/mobilefacenet.py
# (get_mbf: scale 2): the layers whose widths or groups tell the architectures apart.
IRESNET50_KEYS = {
    "conv1.weight": [64, 3, 3, 3],
    "prelu.weight": [64],
    "layer1.0.downsample.0.weight": [64, 64, 1, 1],
    "layer3.13.conv2.weight": [256, 256, 3, 3],
    "layer4.0.downsample.1.running_var": [512],
    "bn2.weight": [512],
    "fc.weight": [512, 512 * 7 * 7],
    "features.running_mean": [512],
}
MBF_KEYS = {
    "layers.0.layers.0.weight": [128, 3, 3, 3],
    "layers.1.layers.0.weight": [128, 2, 3, 3],  # ConvBlock(128, 128, groups=64)
    "layers.2.layers.0.layers.0.weight": [128, 128, 1, 1],  # DepthWise(128, 128, groups=128)
    "layers.3.layers.3.layers.2.layers.0.weight": [128, 128, 1, 1],  # 4th of Residual(128, 4, groups=128)
    "layers.4.layers.0.layers.0.weight": [256, 128, 1, 1],  # DepthWise(128, 256, groups=256)
    "layers.5.layers.5.layers.1.layers.0.weight": [256, 1, 3, 3],  # 6th of Residual(256, 6, groups=256)
    "layers.6.layers.0.layers.0.weight": [512, 256, 1, 1],  # DepthWise(256, 256, groups=512)
    "layers.7.layers.1.layers.2.layers.1.running_mean": [256],  # 2nd of Residual(256, 2, groups=256)
    "conv_sep.layers.0.weight": [512, 256, 1, 1],
    "features.layers.0.layers.0.weight": [512, 1, 7, 7],  # GDC
    "features.layers.2.weight": [512, 512],
    "features.layers.3.running_var": [512],
}


def _randomised(backbone: nn.Module) -> nn.Module:
    """Every tensor of ``backbone`` (BN statistics included) moved to distinct random values, outputs finite."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, value in backbone.state_dict().items():
            if name.endswith("running_var"):
                value.copy_(torch.rand(value.shape, generator=generator) + 0.5)
            elif value.is_floating_point():
                value.add_(0.05 * torch.randn(value.shape, generator=generator))
            else:
                value.fill_(int(torch.randint(1, 1000, (), generator=generator)))
    return backbone


@pytest.mark.parametrize("name, expected, count", [
    ("iresnet50", IRESNET50_KEYS, 43_590_848),
    ("mobilefacenet_arcface_torch", MBF_KEYS, 2_059_520),  # counted from get_mbf's layers by hand
])
def test_names_and_shapes_are_insightface_s(name: str, expected: dict, count: int) -> None:
    with torch.device("meta"):
        backbone = build_backbone(name)
    theirs = to_insightface(backbone)
    assert {key: list(theirs[key].shape) for key in expected} == expected
    assert len(set(insightface_names(backbone).values())) == len(theirs)  # one-to-one
    assert sum(p.numel() for p in backbone.parameters()) == count


def test_iresnet200_has_insightface_s_units() -> None:
    with torch.device("meta"):
        backbone = build_backbone("iresnet200")
    assert [len(stage) for stage in backbone.stages] == [6, 26, 60, 6]


@pytest.mark.parametrize("name, arch", [("iresnet18", "r18"), ("mobilefacenet_arcface_torch", "mbf")])
@pytest.mark.parametrize("form", ["bare", "state_dict", "ddp"])
def test_insightface_state_dict_imports_back_bit_identically(tmp_path, name: str, arch: str, form: str) -> None:
    original = _randomised(build_backbone(name)).eval()
    theirs = to_insightface(original)
    saved = {"bare": theirs, "state_dict": {"state_dict": theirs, "epoch": 3},
             "ddp": {f"module.{key}": value for key, value in theirs.items()}}[form]
    torch.save(saved, tmp_path / "backbone.pth")

    assert main(["import", "insightface", str(tmp_path / "backbone.pth"), "--arch", arch,
                 "--out", str(tmp_path / "run")]) == 0
    network = load_network(tmp_path / "run", with_head=False)
    assert network.job.model.backbone == name and network.job.model.normalize == "arcface_torch"
    ours, imported = original.state_dict(), network.backbone.state_dict()
    assert list(ours) == list(imported)
    for key in ours:
        assert ours[key].dtype == imported[key].dtype and torch.equal(ours[key], imported[key]), key
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        embedding = original(images)
        assert embedding.isfinite().all() and torch.equal(embedding, network.backbone(images))


def test_half_precision_state_dict_is_widened() -> None:
    original = _randomised(build_backbone("iresnet18"))
    half = {key: value.half() if value.is_floating_point() else value for key, value in to_insightface(original).items()}
    imported = from_insightface(half, build_backbone("iresnet18"))
    for key, value in imported.state_dict().items():
        reference = original.state_dict()[key]
        expected = reference.half().float() if reference.is_floating_point() else reference
        assert value.dtype == reference.dtype and torch.equal(value, expected)


def _refusal(state: dict, name: str = "iresnet18") -> str:
    with pytest.raises(CheckpointError) as caught:
        from_insightface(state, build_backbone(name), source="backbone.pth")
    return str(caught.value)


def test_renamed_key_is_refused_naming_both_names() -> None:
    theirs = to_insightface(build_backbone("iresnet18"))
    theirs["layer2.1.conv_1.weight"] = theirs.pop("layer2.1.conv1.weight")
    message = _refusal(theirs)
    assert "missing layer2.1.conv1.weight" in message and "unexpected layer2.1.conv_1.weight" in message


def test_reshaped_key_is_refused_naming_it_and_both_shapes() -> None:
    theirs = to_insightface(build_backbone("mobilefacenet_arcface_torch"))
    theirs["layers.1.layers.0.weight"] = torch.zeros(128, 1, 3, 3)  # depthwise, as Chen et al.'s would be
    message = _refusal(theirs, "mobilefacenet_arcface_torch")
    assert "mis-shaped layers.1.layers.0.weight [128, 1, 3, 3] (expected [128, 2, 3, 3])" in message


def test_wrong_architecture_is_refused() -> None:
    message = _refusal(to_insightface(build_backbone("iresnet34")), "iresnet18")
    # IResNet-34 has 8 units more than IResNet-18, 18 tensors each
    assert "unexpected (144 keys) layer1.2.bn1.bias" in message and "missing" not in message


def test_chen_mobilefacenet_has_no_insightface_counterpart() -> None:
    with pytest.raises(ValueError, match="mobilefacenet_arcface_torch"):
        insightface_names(build_backbone("mobilefacenet", width=0.5))


def test_cli_refusal_is_one_line(tmp_path, capsys) -> None:
    theirs = to_insightface(build_backbone("iresnet18"))
    del theirs["fc.bias"]
    torch.save(theirs, tmp_path / "backbone.pth")
    assert main(["import", "insightface", str(tmp_path / "backbone.pth"), "--arch", "r18",
                 "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("facekd: error:") and "missing fc.bias" in error and "\n" not in error
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_imported_teacher_without_centres_is_refused_as_a_teacher(tmp_path) -> None:
    torch.save(to_insightface(build_backbone("iresnet18")), tmp_path / "backbone.pth")
    import_insightface(tmp_path / "backbone.pth", "r18", tmp_path / "run")
    with pytest.raises(CheckpointError, match="facekd centres"):
        load_network(tmp_path / "run")
