import pytest
import torch
from torch import nn

from facekd.models import BACKBONES, Bottleneck, IBasicBlock, IResNet, MobileFaceNet, build_backbone
from facekd.models.iresnet import scale_channels

# Small widths keep the tests fast on CPU.
TEST_WIDTH = {
    "iresnet18": 0.25,
    "iresnet34": 0.25,
    "iresnet50": 0.125,
    "iresnet100": 0.125,
    "iresnet200": 0.125,
    "mobilefacenet": 0.5,
    "mobilefacenet_arcface_torch": 0.5,
    "dc_iresnet18": 0.125,
    "dgconv_iresnet18": 0.125,
}


def num_params(model: nn.Module, *, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def dense_conv_params(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1)


@pytest.mark.parametrize(
    "name, expected",
    [
        # Worked out from the architecture; IResNet-50/100 match insightface's 43.59M / 65.16M,
        # MobileFaceNet with a 512-d embedding the thesis's "1.2M" (Table 4.12).
        ("iresnet18", 24_025_600),
        ("iresnet34", 34_139_328),
        ("iresnet50", 43_590_848),
        ("iresnet100", 65_156_160),
        ("mobilefacenet", 1_200_512),
    ],
)
def test_parameter_count_at_full_width(name: str, expected: int) -> None:
    with torch.device("meta"):
        model = build_backbone(name)
    assert num_params(model) == expected


def test_mobilefacenet_with_chen_128d_embedding_has_about_one_million_parameters() -> None:
    # Chen et al. 2018 report 0.99M for the 128-d MobileFaceNet.
    with torch.device("meta"):
        model = build_backbone("mobilefacenet", embedding_dim=128)
    assert num_params(model) == 1_003_136
    assert model.head.linear.weight.shape == (128, 512)


def test_iresnet_embedding_bn_scale_is_frozen_at_one() -> None:
    model = build_backbone("iresnet18", width=0.125)
    features = model.head.features
    assert not features.weight.requires_grad and features.bias.requires_grad
    assert torch.equal(features.weight, torch.ones(512))
    assert num_params(model) - num_params(model, trainable_only=True) == 512


def test_iresnet_layout_matches_insightface() -> None:
    with torch.device("meta"):
        model = IResNet(100)
    assert [len(stage) for stage in model.stages] == [3, 13, 30, 3]
    assert model.stem[0].stride == (1, 1) and model.stem[0].out_channels == 64
    for stage in model.stages:
        first, *rest = stage
        assert first.conv2.stride == (2, 2) and first.downsample is not None
        assert all(block.downsample is None and block.conv2.stride == (1, 1) for block in rest)
    assert model.head.fc.in_features == 512 * 7 * 7


def test_mobilefacenet_layout_matches_chen_table_1() -> None:
    model = MobileFaceNet()
    bottlenecks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(bottlenecks) == 5 + 1 + 6 + 1 + 2
    assert sum(b.residual for b in bottlenecks) == 4 + 6 + 2
    expansions = [b.expand[0].out_channels // b.expand[0].in_channels for b in bottlenecks]
    assert expansions == [2] * 5 + [4] + [2] * 6 + [4] + [2] * 2
    gdconv = model.head.gdconv[0]
    assert gdconv.kernel_size == (7, 7) and gdconv.groups == 512 and gdconv.padding == (0, 0)
    assert len(model.head.gdconv) == 2  # linear: conv + BN, no PReLU


FINAL_SIZE = {112: 7, 64: 4, 56: 4, 57: 4}
SHAPE_CASES = [(name, size) for name in BACKBONES for size in (112, 56)] + [
    (name, size) for name in ("iresnet18", "mobilefacenet") for size in (64, 57)
]


@pytest.mark.parametrize("name, image_size", SHAPE_CASES)
def test_embedding_shape(name: str, image_size: int) -> None:
    model = build_backbone(name, width=TEST_WIDTH[name], image_size=image_size, embedding_dim=77)
    model.eval()
    with torch.no_grad():
        embedding = model(torch.randn(2, 3, image_size, image_size))
    assert embedding.shape == (2, 77)
    assert torch.isfinite(embedding).all()
    assert model.feature_sizes[-1] == FINAL_SIZE[image_size]


@pytest.mark.parametrize("image_size", [112, 57])
@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet"])
def test_forward_features_shapes_and_strides(name: str, image_size: int) -> None:
    model = build_backbone(name, width=0.5, image_size=image_size)
    with torch.no_grad():
        embedding, features = model(torch.randn(2, 3, image_size, image_size), return_stages=True)
    assert model.feature_strides == [2, 4, 8, 16]
    expected_channels = [32, 64, 128, 256] if name == "iresnet18" else [32, 32, 64, 64]
    assert model.feature_channels == expected_channels
    for feature, channels, stride in zip(features, expected_channels, model.feature_strides):
        side = -(-image_size // stride)
        assert feature.shape == (2, channels, side, side)
    assert embedding.shape == (2, 512)


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet"])
def test_embed_from_stage_continues_the_forward_pass(name: str) -> None:
    torch.manual_seed(0)
    model = build_backbone(name, width=0.25, image_size=64)
    # Non-trivial BN statistics so that eval mode is not close to the identity.
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 64, 64))
    model.eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        embedding = model(images)
        features = model.forward_features(images)
        for stage_index, feature in enumerate(features):
            resumed = model.embed_from_stage(stage_index, feature)
            torch.testing.assert_close(resumed, embedding, rtol=0, atol=0)
    # A different feature map gives a different embedding: the stages are really run.
    with torch.no_grad():
        assert not torch.allclose(model.embed_from_stage(0, features[0] + 1.0), embedding)


@pytest.mark.parametrize("name", ["iresnet50", "mobilefacenet"])
def test_width_shrinks_stage_parameters_quadratically(name: str) -> None:
    with torch.device("meta"):
        full = build_backbone(name)
        students = {width: build_backbone(name, width=width).stages for width in (0.5, 0.25)}
    counts = {width: (num_params(stages), dense_conv_params(stages)) for width, stages in students.items()}
    full_count = num_params(full.stages)
    full_dense = dense_conv_params(full.stages)
    for width, (count, dense) in counts.items():
        # Dense convolutions scale by width²; depthwise convs, BN and PReLU only by width.
        assert dense == width**2 * full_dense
        assert width**2 < count / full_count < 1.25 * width**2


def test_width_matches_wang_and_lan_students() -> None:
    # ResNet-50/2, /4, /8: every layer's kernel count divided by 2, 4, 8.
    for width, channels in [(0.5, [32, 64, 128, 256]), (0.25, [16, 32, 64, 128]), (0.125, [8, 16, 32, 64])]:
        with torch.device("meta"):
            assert build_backbone("iresnet50", width=width).feature_channels == channels
    assert scale_channels(64, 0.05) == 8
    assert scale_channels(128, 0.3) == 40


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet"])
def test_gradients_reach_every_trainable_parameter(name: str) -> None:
    torch.manual_seed(0)
    model = build_backbone(name, width=0.25, image_size=56, dropout=0.1 if name == "iresnet18" else 0.0)
    model.train()
    embedding = model(torch.randn(4, 3, 56, 56))
    (embedding * torch.randn_like(embedding)).sum().backward()
    for param_name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, param_name
        else:
            assert param.grad is None, param_name


def test_zero_init_residual_makes_units_start_as_their_shortcut() -> None:
    model = build_backbone("iresnet18", width=0.25, image_size=56, zero_init_residual=True).eval()
    block = model.stages[1][1]
    assert isinstance(block, IBasicBlock) and block.downsample is None
    x = torch.randn(2, 32, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(block(x), x)
    mobile = build_backbone("mobilefacenet", width=0.25, image_size=56, zero_init_residual=True).eval()
    residual = mobile.stages[1][1]
    assert isinstance(residual, Bottleneck) and residual.residual
    x = torch.randn(2, 16, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(residual(x), x)
        # Non-residual units are left alone: zeroing them would cut the network.
        assert mobile(torch.randn(2, 3, 56, 56)).abs().sum() > 0


def test_unknown_backbone_lists_known_names() -> None:
    known = "known backbones: iresnet18, iresnet34, iresnet50, iresnet100, iresnet200, mobilefacenet, .*dgconv_iresnet18"
    with pytest.raises(ValueError, match=known):
        build_backbone("resnet50")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"width": 0.0}, "width must be a positive"),
        ({"image_size": 8}, "image_size must be an int >= 16"),
        ({"image_size": 112.0}, "image_size must be an int"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"embedding_dim": 0}, "embedding_dim must be positive"),
    ],
)
@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet"])
def test_bad_arguments_are_rejected(name: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_backbone(name, **kwargs)


def test_bad_inputs_are_rejected() -> None:
    model = build_backbone("mobilefacenet", width=0.25, image_size=56)
    with pytest.raises(ValueError, match=r"expects images of shape \[B, 3, 56, 56\].*got \[2, 3, 112, 112\]"):
        model(torch.randn(2, 3, 112, 112))
    with pytest.raises(ValueError, match=r"stage 1 features .* have shape \[B, 16, 14, 14\], got \[2, 32, 14, 14\]"):
        model.embed_from_stage(1, torch.randn(2, 32, 14, 14))
    with pytest.raises(ValueError, match=r"stage_index must be in \[0, 4\), got 4"):
        model.embed_from_stage(4, torch.randn(2, 16, 4, 4))
    with pytest.raises(ValueError, match="IResNet depth must be one of"):
        IResNet(152)
