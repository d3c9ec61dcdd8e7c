"""FAN (facekd.models.fan): face-alignment's names and shapes, output shapes, heatmap rendering and arg-max."""
import pytest
import torch

from facekd.errors import CheckpointError
from facekd.models.fan import (
    FAN, FANOutput, fan_config, heatmap_argmax, heatmap_to_image, image_to_heatmap, load_fan, render_heatmaps,
)


def _conv_block(prefix: str, c_in: int, c_out: int) -> dict[str, tuple[int, ...]]:
    """face-alignment's ConvBlock(in_planes, out_planes) parameters and buffers, written from its models.py."""
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(name: str, c: int) -> None:
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}.{leaf}"] = (c,)

    bn("bn1", c_in)
    shapes[f"{prefix}.conv1.weight"] = (c_out // 2, c_in, 3, 3)
    bn("bn2", c_out // 2)
    shapes[f"{prefix}.conv2.weight"] = (c_out // 4, c_out // 2, 3, 3)
    bn("bn3", c_out // 4)
    shapes[f"{prefix}.conv3.weight"] = (c_out // 4, c_out // 4, 3, 3)
    if c_in != c_out:  # Sequential(BatchNorm2d, ReLU, Conv2d 1x1 without bias)
        bn("downsample.0", c_in)
        shapes[f"{prefix}.downsample.2.weight"] = (c_out, c_in, 1, 1)
    return shapes


def released_2dfan4_shapes() -> dict[str, tuple[int, ...]]:
    """Key → shape of face-alignment's FAN(num_modules=4) (the released 2DFAN4-11f355bf06.pth.tar), from the
    public code: stem, then per module HourGlass(1, 4, 256), top_m_, conv_last, l (68), bn_end, bl, al. The
    release predates BatchNorm's num_batches_tracked buffer (PyTorch 0.4.1), so it has none."""
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7), "conv1.bias": (64,)}
    for leaf in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"bn1.{leaf}"] = (64,)
    shapes |= _conv_block("conv2", 64, 128) | _conv_block("conv3", 128, 128) | _conv_block("conv4", 128, 256)
    for i in range(4):
        for level in (4, 3, 2, 1):
            for name in ("b1_", "b2_", "b3_") + (("b2_plus_",) if level == 1 else ()):
                shapes |= _conv_block(f"m{i}.{name}{level}", 256, 256)
        shapes |= _conv_block(f"top_m_{i}", 256, 256)
        shapes[f"conv_last{i}.weight"], shapes[f"conv_last{i}.bias"] = (256, 256, 1, 1), (256,)
        shapes[f"l{i}.weight"], shapes[f"l{i}.bias"] = (68, 256, 1, 1), (68,)
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"bn_end{i}.{leaf}"] = (256,)
        if i < 3:
            shapes[f"bl{i}.weight"], shapes[f"bl{i}.bias"] = (256, 256, 1, 1), (256,)
            shapes[f"al{i}.weight"], shapes[f"al{i}.bias"] = (256, 68, 1, 1), (256,)
    return shapes


def test_fan4_has_exactly_the_released_2dfan4_keys_and_shapes():
    expected = released_2dfan4_shapes()
    ours = {k: tuple(v.shape) for k, v in FAN(stacks=4).state_dict().items() if not k.endswith("num_batches_tracked")}
    assert ours == expected
    # 23,820,176 parameters, counted from the table (running statistics are buffers)
    params = sum(torch.Size(s).numel() for k, s in expected.items() if "running" not in k)
    assert params == sum(p.numel() for p in FAN(stacks=4).parameters()) == 23_820_176


@pytest.mark.parametrize("wrap", ["plain", "state_dict_module"])
def test_load_fan_reads_a_released_2dfan4_state_dict_strict_and_infers_the_architecture(tmp_path, wrap):
    generator = torch.Generator().manual_seed(0)
    released = {k: torch.randn(s, generator=generator) for k, s in released_2dfan4_shapes().items()}
    for key in released:
        if key.endswith("running_var"):
            released[key] = released[key].abs() + 0.5
    # the release is a plain state dict; face-alignment's training checkpoints hold {'state_dict': module.*}
    saved = released if wrap == "plain" else {"state_dict": {f"module.{k}": v for k, v in released.items()},
                                              "epoch": 50}
    path = tmp_path / "2DFAN4.pth.tar"
    torch.save(saved, path)
    fan = load_fan(path)
    assert (fan.landmarks, fan.stacks, fan.width, fan.depth) == (68, 4, 256, 4)
    assert not fan.training
    loaded = fan.state_dict()
    for key, value in released.items():
        assert torch.equal(loaded[key], value), key


def test_load_fan_refuses_what_is_not_a_fan(tmp_path):
    path = tmp_path / "backbone.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3)}, path)
    with pytest.raises(CheckpointError, match="not a FAN state dict: it has no l0.weight"):
        load_fan(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="neither a facekd FAN checkpoint nor"):
        load_fan(path)
    small = FAN(landmarks=5, stacks=2, width=32).state_dict()
    small["l0.bias"] = torch.zeros(7)
    torch.save(small, path)
    with pytest.raises(CheckpointError, match="does not fit FAN"):
        load_fan(path)
    with pytest.raises(CheckpointError, match="do not exist"):
        load_fan(tmp_path / "missing.pth")


def test_load_fan_reads_a_facekd_checkpoint_folder(tmp_path):
    from facekd.distributed.checkpoint import save_checkpoint

    fan = FAN(landmarks=5, stacks=3, width=16, depth=3)
    with torch.no_grad():
        for p in fan.parameters():
            p.normal_()
    config = {"landmarks": 5, "stacks": 3, "width": 16, "depth": 3}
    save_checkpoint({"fan": config, "model": fan.state_dict(), "step": 7}, tmp_path / "run" / "checkpoints", 7)
    run = tmp_path / "run"
    for where in (run, run / "checkpoints", run / "checkpoints" / "step_000000007"):
        loaded = load_fan(where)
        assert fan_config(loaded.state_dict()) == config
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), fan.state_dict().values()))


@pytest.mark.parametrize("size, width, stacks, run", [(64, 16, 2, None), (128, 32, 3, 2), (64, 8, 1, 1)])
def test_fan_output_shapes(size, width, stacks, run):
    fan = FAN(landmarks=7, stacks=stacks, width=width).eval()
    with torch.no_grad():
        out = fan(torch.rand(2, 3, size, size), stacks=run)
    assert isinstance(out, FANOutput)
    ran = stacks if run is None else run
    assert len(out.heatmaps) == len(out.h2l) == len(out.l2h) == ran
    for heatmaps, h2l, l2h in zip(out.heatmaps, out.h2l, out.l2h):
        assert heatmaps.shape == (2, 7, size // 4, size // 4)
        sides = [size // 4, size // 8, size // 16, size // 32]
        assert [tuple(t.shape) for t in h2l] == [(2, width, s, s) for s in sides]
        assert [tuple(t.shape) for t in l2h] == [(2, width, s, s) for s in sides]


def test_fan_h2l_and_l2h_are_the_hourglass_inputs_and_level_outputs():
    torch.manual_seed(0)
    fan = FAN(landmarks=3, stacks=2, width=16).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out = fan(x)
        stem = fan.conv4(fan.conv3(torch.nn.functional.max_pool2d(fan.conv2(torch.relu(fan.bn1(fan.conv1(x)))), 2)))
        hourglass = fan.m0
        assert torch.equal(out.h2l[0][0], stem)
        low1 = hourglass.b2_4(torch.nn.functional.max_pool2d(stem, 2))
        assert torch.equal(out.h2l[0][1], low1)
        assert torch.equal(out.h2l[0][2], hourglass.b2_3(torch.nn.functional.max_pool2d(low1, 2)))
        # the top level's output is the hourglass' output, which feeds top_m_0
        features = torch.relu(fan.bn_end0(fan.conv_last0(fan.top_m_0(out.l2h[0][0]))))
        assert torch.equal(out.heatmaps[0], fan.l0(features))
        # the stack-1 input is the stack-0 input plus bl0(features) + al0(heatmaps)
        assert torch.equal(out.h2l[1][0], stem + fan.bl0(features) + fan.al0(out.heatmaps[0]))
    # running one stack gives the first stack's outputs of running both
    with torch.no_grad():
        first = fan(x, stacks=1)
    assert torch.equal(first.heatmaps[0], out.heatmaps[0])


def test_fan_refuses_bad_inputs():
    fan = FAN(landmarks=3, stacks=2, width=16)
    with pytest.raises(ValueError, match="multiple of 64"):
        fan(torch.rand(1, 3, 96, 96))
    with pytest.raises(ValueError, match=r"stacks must be in \[1, 2\]"):
        fan(torch.rand(1, 3, 64, 64), stacks=3)
    with pytest.raises(ValueError, match="multiple of 8"):
        FAN(width=12)


@pytest.mark.parametrize("size, sigma", [(64, 1.0), (17, 1.5), (32, 2.0)])
def test_render_heatmaps_peaks_at_integer_landmarks_and_argmax_recovers_them(size, sigma):
    generator = torch.Generator().manual_seed(size)
    points = torch.randint(1, size - 1, (3, 5, 2), generator=generator).to(torch.float64)
    heatmaps = render_heatmaps(points, size, sigma)
    assert heatmaps.shape == (3, 5, size, size) and heatmaps.dtype == torch.float64
    flat = heatmaps.flatten(2).argmax(-1)
    assert torch.equal(torch.stack((flat % size, flat // size), -1).to(torch.float64), points)
    assert torch.allclose(heatmaps.flatten(2).amax(-1), torch.ones(3, 5, dtype=torch.float64))
    # the value one pixel away is exp(-1 / 2σ²), a Gaussian of that σ
    b, n = 1, 2
    x, y = int(points[b, n, 0]), int(points[b, n, 1])
    assert heatmaps[b, n, y, x + 1].item() == pytest.approx(torch.exp(torch.tensor(-0.5 / sigma**2)).item())
    # symmetric neighbours: no sub-pixel shift, the landmark exactly
    assert torch.equal(heatmap_argmax(heatmaps), points)


def test_render_heatmaps_and_argmax_at_sub_pixel_landmarks():
    # quarter-pixel shift toward the larger neighbour: within 0.25 + 0.25 of the landmark, on the right side
    points = torch.tensor([[[10.3, 20.8], [5.6, 5.1], [30.0, 12.45]]], dtype=torch.float64)
    heatmaps = render_heatmaps(points, 40, 1.0)
    nearest = points.round()
    flat = heatmaps.flatten(2).argmax(-1)
    assert torch.equal(torch.stack((flat % 40, flat // 40), -1).to(torch.float64), nearest)
    found = heatmap_argmax(heatmaps)
    expected = nearest + 0.25 * torch.sign(points - nearest)
    assert torch.equal(found, expected)
    assert (found - points).abs().max() <= 0.25


def test_heatmap_argmax_does_not_shift_on_the_border():
    heatmaps = render_heatmaps(torch.tensor([[[0.2, 7.0], [15.0, 15.3]]]), 16, 1.0)
    assert torch.equal(heatmap_argmax(heatmaps), torch.tensor([[[0.0, 7.0], [15.0, 15.0]]]))


def test_image_and_heatmap_coordinates_are_inverse_and_centre_aligned():
    points = torch.tensor([[[0.0, 255.0], [127.5, 1.5]]])
    assert torch.allclose(heatmap_to_image(image_to_heatmap(points)), points)
    # the 4x4 block of image pixels 0..3 is heatmap pixel 0: its centre 1.5 maps to 0
    assert image_to_heatmap(torch.tensor([1.5])).item() == 0.0
