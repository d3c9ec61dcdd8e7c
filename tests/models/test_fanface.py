"""FAN-Face (facekd.models.fanface): AdaIN, the BL/SL/AL integration layers against a float64 reference, shapes,
Table 3.2's parameter counts, the frozen FAN, and a FAN-Face network through the trainer, load_network and
distillation."""
import math

import pytest
import torch
import torch.nn.functional as F

from facekd.config import job_from_dict
from facekd.data.loader import to_float
from facekd.distributed.checkpoint import checkpoint_path, load_checkpoint
from facekd.errors import CheckpointError, ConfigError
from facekd.models import IResNet
from facekd.models.fan import FAN
from facekd.models.fanface import ADAIN_EPS, FANFace, IntegrationLayer, adain, fan_input
from facekd.network import load_network
from facekd.train import Trainer

SHAPES = [(2, 3, 5, 5), (3, 8, 7, 7), (4, 5, 11, 9)]  # odd spatial sizes and channel counts included


def _stats(t):
    var, mean = torch.var_mean(t, dim=(2, 3), correction=0)
    return mean, var


@pytest.mark.parametrize("shape", SHAPES)
def test_adain_output_has_the_frn_features_mean_and_std(shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    y = torch.randn(shape[:2] + (shape[2] + 2, shape[3] + 1), dtype=torch.float64) * 0.5 - 2  # other spatial size
    out = adain(x, y, eps=0.0)
    assert out.shape == x.shape and out.dtype == torch.float64
    out_mean, out_var = _stats(out)
    y_mean, y_var = _stats(y)
    torch.testing.assert_close(out_mean, y_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(out_var.sqrt(), y_var.sqrt(), rtol=1e-12, atol=0)
    # with ε the std is σ_y·σ_x / sqrt(σ_x² + ε)·sqrt(1 + ε/σ_y²): exactly that, and y's to ~ε/σ²
    x_var = _stats(x)[1]
    with_eps = adain(x, y)
    expected = (y_var + ADAIN_EPS).sqrt() * (x_var / (x_var + ADAIN_EPS)).sqrt()
    torch.testing.assert_close(_stats(with_eps)[1].sqrt(), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(_stats(with_eps)[1].sqrt(), y_var.sqrt(), rtol=1e-4, atol=0)


def _bn(t, module):
    """Training-mode batch norm by hand: biased batch variance, eps of the module."""
    mean = t.mean(dim=(0, 2, 3), keepdim=True)
    var = ((t - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (t - mean) / torch.sqrt(var + module.eps) * module.weight.view(1, -1, 1, 1) + module.bias.view(1, -1, 1, 1)


def _prelu(t, module):
    a = module.weight.view(1, -1, 1, 1)
    return torch.clamp(t, min=0) + a * torch.clamp(t, max=0)


def _reference(layer, x, y):
    """ỹ = PReLU(y + γ·f(x, y)), written from thesis Sec. 3.2.4 / Fig. 3.6 without the module's code paths."""
    aligned = F.conv2d(_bn(x, layer.fan_bn), layer.align.weight)
    mu_a, mu_y = aligned.mean(dim=(2, 3), keepdim=True), y.mean(dim=(2, 3), keepdim=True)
    sd_a = torch.sqrt(((aligned - mu_a) ** 2).mean(dim=(2, 3), keepdim=True) + ADAIN_EPS)
    sd_y = torch.sqrt(((y - mu_y) ** 2).mean(dim=(2, 3), keepdim=True) + ADAIN_EPS)
    f = (aligned - mu_a) / sd_a * sd_y + mu_y
    if layer.kind != "sl":
        m = layer.mix
        z = torch.cat((f, y), dim=1)
        if layer.kind == "bl":
            f = _bn(F.conv2d(z, m[0].weight), m[1])
        else:  # 1×1 → BN → PReLU → 3×3 → BN → PReLU → 1×1 → BN
            z = _prelu(_bn(F.conv2d(z, m[0].weight), m[1]), m[2])
            z = _prelu(_bn(F.conv2d(z, m[3].weight, padding=1), m[4]), m[5])
            f = _bn(F.conv2d(z, m[6].weight), m[7])
    gamma = 1.0 if layer.gamma is None else layer.gamma
    return _prelu(y + gamma * f, layer.prelu)


@pytest.mark.parametrize("kind", ["bl", "sl", "al"])
@pytest.mark.parametrize("learn_gamma", [False, True])
def test_integration_layers_match_a_float64_reference(kind, learn_gamma):
    torch.manual_seed(0)
    layer = IntegrationLayer(6, 5, kind, learn_gamma=learn_gamma).double().train()
    with torch.no_grad():  # move every parameter off its initial value so that each one matters
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(3, 6, 7, 7, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 5, 7, 7, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(3, 5, 7, 7, dtype=torch.float64)  # an incoming gradient that is not 1
    out = layer(x, y)
    assert out.shape == y.shape
    expected = _reference(layer, x, y)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    params = [x, y, *layer.parameters()]
    got = torch.autograd.grad(out, params, upstream)
    want = torch.autograd.grad(expected, params, upstream)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
    assert (layer.gamma is not None) == learn_gamma
    if kind == "sl":
        assert layer.mix is None


@pytest.mark.parametrize("kind", ["bl", "sl", "al"])
@pytest.mark.parametrize("fan_channels, frn_channels, size", [(16, 8, 14), (32, 24, 7), (8, 40, 9)])
def test_integration_layer_output_has_the_frn_features_shape(kind, fan_channels, frn_channels, size):
    torch.manual_seed(0)
    layer = IntegrationLayer(fan_channels, frn_channels, kind)
    y = torch.randn(2, frn_channels, size, size)
    assert layer(torch.randn(2, fan_channels, size, size), y).shape == y.shape
    with pytest.raises(ValueError, match="must share batch and size"):
        layer(torch.randn(2, fan_channels, size + 1, size + 1), y)


def _count(module):
    return sum(p.numel() for name, p in module.named_parameters() if not name.startswith("fan."))


def test_added_parameters_on_iresnet34_are_in_line_with_table_3_2():
    """Thesis Table 3.2: ArcFace ResNet34 31.8M; (H2, 1-1, BL) 32.2M (+0.4M), (H2, 1-M, BL) 32.7M (+0.9M),
    (H2, 1-1, SL) 31.9M (+0.1M), (H2, 1-1, AL) 32.9M (+1.1M). FAN width 256, 68 landmarks, 112 px, stages 0-2.

    By hand, C = 64, 128, 256 (stages 0-2), FAN feature width 256:
      H2: the stem's 3×3 conv takes 68 more channels: 68·9·64 = 39,168.
      BL per stage: BN(256) 512 + 1×1 256·C + 1×1 2C·C + BN(C) 2C + PReLU C
          → 25,280 + 66,432 + 197,888 = 289,600;            (H2, 1-1, BL) = 328,768
      SL per stage: 512 + 256·C + C → 1,536 + 114,688 + 448 = 116,672;   (H2, 1-1, SL) = 155,840
      AL: BL's (2C·C + 2C) becomes 1×1 2C·C + BN 2C + PReLU C + 3×3 9C² + BN 2C + PReLU C + 1×1 C² + BN 2C
          = 12C² + 8C: +10C² + 6C = +862,848;                (H2, 1-1, AL) = 1,191,616
      1-M BL: a BL (+ γ_k) after each of the 3, 4, 6 units of stages 0-2:
          3·25,281 + 4·66,433 + 6·197,889 + 39,168 = 1,568,077
    Table 3.2 gives each total to 0.1M, so each difference is known to ±0.1M (two roundings of ±0.05M): BL, SL and
    AL land inside that band. 1-M does not (+1.57M against +0.9M): the thesis' ResNet-50 row (+1.4M, 8 more
    256-channel units than ResNet-34) implies ~62k per 1-M layer at 256 channels, a third of a BL as Sec. 3.2.4
    describes it (197,889), so its 1-M layers must have been lighter than its text says; we build what it says.
    """
    torch.manual_seed(0)
    fan = FAN(landmarks=68, stacks=2, width=256)
    plain = _count(IResNet(34))
    added = {variant: _count(FANFace(34, fan=fan, heatmaps="h2", features=features, layer=layer)) - plain
             for variant, (features, layer) in {"1-1 BL": ("1-1", "bl"), "1-1 SL": ("1-1", "sl"),
                                                "1-1 AL": ("1-1", "al"), "1-M BL": ("1-many", "bl")}.items()}
    assert added == {"1-1 BL": 328_768, "1-1 SL": 155_840, "1-1 AL": 1_191_616, "1-M BL": 1_568_077}
    # the thesis' 51 inner heatmaps: 17 stem input channels fewer, 17·9·64 = 9,792 parameters
    inner = _count(FANFace(34, fan=fan, heatmaps="h2", heatmap_points="inner")) - plain
    assert inner == 328_768 - 9_792
    table = {"1-1 BL": 32.2 - 31.8, "1-1 SL": 31.9 - 31.8, "1-1 AL": 32.9 - 31.8}
    for variant, thesis in table.items():
        assert abs(added[variant] / 1e6 - thesis) <= 0.1 + 1e-9, (variant, added[variant], thesis)
    # integrating stage 3 too (a 4-place reading) would add a 512-channel BL, out of line with +0.4M
    four = _count(FANFace(34, fan=fan, heatmaps="h2", stages=(0, 1, 2, 3))) - plain
    assert four - added["1-1 BL"] == 512 + 256 * 512 + 2 * 512 * 512 + 3 * 512
    assert four / 1e6 - 0.4 > 0.1


def _tiny_fan(landmarks=5, stacks=2):
    torch.manual_seed(1)
    fan = FAN(landmarks=landmarks, stacks=stacks, width=16)
    with torch.no_grad():  # non-trivial running statistics, so that a BN left in train mode would show
        for m in fan.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return fan.eval()


def _tiny_fanface(**options):
    args = dict(fan=_tiny_fan(), input_size=64, width=0.125, image_size=32, embedding_dim=16)
    return FANFace(18, **(args | options))


def test_heatmap_channels_enter_the_stem_and_every_resolution_drop():
    plain = _tiny_fanface(heatmaps="none")
    h2 = _tiny_fanface(heatmaps="h2", features="none")
    h2plus = _tiny_fanface(heatmaps="h2plus", features="none")
    assert plain.stem[0].in_channels == 3 and h2.stem[0].in_channels == h2plus.stem[0].in_channels == 3 + 5
    for stage_index in range(4):
        first = h2plus.stages[stage_index][0]
        c_in = h2.stages[stage_index][0].conv1.in_channels
        assert first.conv1.in_channels == first.bn1.num_features == first.downsample[0].in_channels == c_in + 5
        assert h2plus.stages[stage_index][1].conv1.in_channels == h2.stages[stage_index][1].conv1.in_channels
    # H2's input is the image with the second hourglass' heatmaps resampled to 32 px (Eq. 3.1)
    images = torch.randn(2, 3, 32, 32)
    heatmaps = h2.fan(fan_input(images, "mxnet", 64)).heatmaps[1]
    stacked = torch.cat((images, F.interpolate(heatmaps, size=(32, 32), mode="bilinear", align_corners=False)), 1)
    h2.eval()
    torch.testing.assert_close(h2.forward_features(images)[0], h2.stages[0](h2.stem(stacked)))


def test_inner_heatmap_points_are_the_51_without_the_jaw():
    fan = _tiny_fan(landmarks=68)
    model = FANFace(18, fan=fan, heatmaps="h2plus", features="none", heatmap_points="inner", input_size=64,
                    width=0.125, image_size=32, embedding_dim=16).eval()
    assert model.stem[0].in_channels == 3 + 51 and model.stages[2][0].conv1.in_channels == 16 + 51
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.fan_inputs(images).heatmaps, fan(fan_input(images, "mxnet", 64)).heatmaps[1][:, 17:])
    with pytest.raises(ValueError, match="points 17-67 of the 68-point .* this FAN has 5 landmarks"):
        FANFace(18, fan=_tiny_fan(), heatmap_points="inner", input_size=64)


@pytest.mark.parametrize("normalize", ["mxnet", "arcface_torch"])
def test_fan_input_inverts_the_frn_normalisation(normalize):
    pixels = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    rgb01 = pixels.permute(0, 3, 1, 2).double() / 255
    torch.testing.assert_close(fan_input(to_float(pixels, normalize), normalize, 32).double(), rgb01,
                               rtol=0, atol=1e-6)
    up = fan_input(to_float(pixels, normalize), normalize, 64)
    assert up.shape == (2, 3, 64, 64) and up.min() >= 0 and up.max() <= 1


@pytest.mark.parametrize("features", ["1-1", "1-many"])
def test_the_fan_stays_frozen_and_receives_no_gradient(features):
    model = _tiny_fanface(features=features, heatmaps="h2plus").train()
    before = {k: v.clone() for k, v in model.fan.state_dict().items()}
    assert not model.fan.training and model.training
    assert not any(p.requires_grad for p in model.fan.parameters())
    embedding = model(torch.randn(4, 3, 32, 32))
    embedding.square().sum().backward()
    assert all(p.grad is None for p in model.fan.parameters())
    assert all(p.grad is not None for name, p in model.named_parameters() if not name.startswith("fan.")
               and p.requires_grad)
    for key, value in model.fan.state_dict().items():  # running statistics included
        assert torch.equal(value, before[key]), key
    # 1-M learns one γ_k per residual unit of stages 0-2 (IR-18: 2 each), 1-1 none
    gammas = [name for name, _ in model.named_parameters() if name.endswith("gamma")]
    assert len(gammas) == (6 if features == "1-many" else 0)


def test_embed_from_stage_continues_with_the_fan_outputs_of_the_last_forward():
    model = _tiny_fanface(heatmaps="h2plus", features="1-many").eval()
    images = torch.randn(3, 3, 32, 32)
    with pytest.raises(RuntimeError, match="needs the FAN outputs"):
        model.embed_from_stage(0, torch.randn(3, 8, 16, 16))
    embedding, stages = model(images, return_stages=True)
    for stage_index, feature in enumerate(stages):
        torch.testing.assert_close(model.embed_from_stage(stage_index, feature), embedding)
    with pytest.raises(RuntimeError, match="same images"):
        model.embed_from_stage(1, torch.randn(5, 16, 8, 8))


def test_fanface_refuses_what_its_fan_cannot_give():
    with pytest.raises(ValueError, match="need 2 hourglasses; the FAN has 1"):
        FANFace(18, fan=_tiny_fan(stacks=1), heatmaps="h2", input_size=64)
    with pytest.raises(ValueError, match="input_size must be a multiple of 64"):
        FANFace(18, fan=_tiny_fan(), input_size=96)
    with pytest.raises(ValueError, match="both 'none'"):
        FANFace(18, fan=_tiny_fan(), heatmaps="none", features="none", input_size=64)


# --- through the trainer, load_network and distillation (real runs on the synthetic shards) ---


@pytest.fixture(scope="module")
def fan_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fan") / "fan.pt"
    torch.save(_tiny_fan().state_dict(), path)
    return path


def _fan_section(fan_file, **options):
    return {"fan": {"weights": str(fan_file), "input_size": 64, **options}}


@pytest.mark.slow
def test_training_leaves_the_fan_bit_unchanged_and_the_checkpoint_is_self_contained(tiny_job, fan_file, tmp_path):
    job = job_from_dict(tiny_job("fanface", model=_fan_section(fan_file, heatmaps="h2plus", layer="al"),
                                 train={"steps": 3, "checkpoint_every": 3}))
    summary = Trainer(job, progress=False).fit()
    assert summary["step"] == 3 and math.isfinite(summary["loss"])
    state = load_checkpoint(checkpoint_path(f"{job.train.output_dir}/checkpoints", 3))
    saved = torch.load(fan_file, weights_only=True)
    stored = {k.removeprefix("fan."): v for k, v in state["backbone"].items() if k.startswith("fan.")}
    assert stored.keys() == saved.keys()
    for key in saved:  # weights and running statistics, bit for bit
        assert torch.equal(stored[key], saved[key]), key
    # the optimiser never held the FAN: SGD kept momentum for the trained parameters only, in the trainer's order
    model = FANFace(18, fan=_tiny_fan(), heatmaps="h2plus", layer="al", input_size=64, width=0.125, image_size=32,
                    embedding_dim=16)
    names = [name for name, _ in model.named_parameters()]
    momentum = state["optimizer"]["state"]
    fan_indices = [i for i, name in enumerate(names) if name.startswith("fan.")]
    assert fan_indices and not any(i in momentum for i in fan_indices)
    assert all(i in momentum for i, (name, p) in enumerate(model.named_parameters())
               if not name.startswith("fan.") and p.requires_grad)
    # the integration layers did train
    initial = model.state_dict()
    assert not torch.equal(state["backbone"]["integrations.0.0.align.weight"], initial["integrations.0.0.align.weight"])

    # load_network rebuilds the whole network from the checkpoint alone, and it embeds as the trained one did
    fan_file.rename(tmp_path / "moved.pt")
    try:
        network = load_network(job.train.output_dir)
    finally:
        (tmp_path / "moved.pt").rename(fan_file)
    assert isinstance(network.backbone, FANFace) and not network.backbone.training
    images = torch.randn(4, 3, 32, 32)
    reference = FANFace(18, fan=_tiny_fan(), heatmaps="h2plus", layer="al", input_size=64, width=0.125,
                        image_size=32, embedding_dim=16)
    reference.load_state_dict(state["backbone"])
    with torch.no_grad():
        torch.testing.assert_close(network.backbone(images), reference.eval()(images))


@pytest.mark.slow
def test_a_fanface_network_teaches_and_learns_by_distillation(tiny_job, fan_file):
    teacher_job = job_from_dict(tiny_job("fanface_teacher", model=_fan_section(fan_file, features="1-many"),
                                         train={"steps": 2, "checkpoint_every": 2}))
    Trainer(teacher_job, progress=False).fit()
    # a plain student distils from the FAN-Face teacher through its stages (ShrinkTeaNet runs the teacher's
    # remaining stages, FAN integration included) and logits; a FAN-Face student learns from it too
    for name, model in (("plain_student", {}), ("fanface_student", _fan_section(fan_file, source="l2h-1"))):
        job = job_from_dict(tiny_job(name, model=model, train={"steps": 2, "checkpoint_every": 2},
                                     distill={"methods": {"shrinkteanet": 1.0, "kd": 1.0, "fitnet": 1.0},
                                              "teacher": teacher_job.train.output_dir}))
        summary = Trainer(job, progress=False).fit()
        assert summary["step"] == 2 and math.isfinite(summary["loss"])


def test_config_errors(tiny_job, fan_file, tmp_path):
    with pytest.raises(ConfigError, match=r"'model.fan' integrates a FAN into an IResNet .* not into mobilefacenet"):
        job_from_dict(tiny_job(model={"backbone": "mobilefacenet", **_fan_section(fan_file)}), "spec")
    with pytest.raises(ConfigError, match=r"'model.fan.features' and heatmaps are both 'none'"):
        job_from_dict(tiny_job(model=_fan_section(fan_file, heatmaps="none", features="none")), "spec")
    with pytest.raises(ConfigError, match=r"'model.fan.stages' must be distinct stages in 0-3, got \[1, 4\]"):
        job_from_dict(tiny_job(model=_fan_section(fan_file, stages=[1, 4])), "spec")
    with pytest.raises(ConfigError, match=r"'model.fan.layer' must be one of \['bl', 'sl', 'al'\], got 'xl'"):
        job_from_dict(tiny_job(model=_fan_section(fan_file, layer="xl")), "spec")
    with pytest.raises(ConfigError, match=r"missing required key 'model.fan.weights'"):
        job_from_dict(tiny_job(model={"fan": {"heatmaps": "h2"}}), "spec")
    from facekd.network import backbone_for

    job = job_from_dict(tiny_job(model=_fan_section(fan_file, input_size=96)), "spec")
    with pytest.raises(ConfigError, match=r"model.fan .*input_size must be a multiple of 64"):
        backbone_for(job.model, 32)
    job = job_from_dict(tiny_job(model=_fan_section(tmp_path / "nowhere.pt")), "spec")
    with pytest.raises(CheckpointError, match="nowhere.pt do not exist"):
        backbone_for(job.model, 32)


@pytest.mark.slow
def test_fanface_trains_on_two_ranks_in_the_deepspeed_engine_with_the_fan_frozen(tiny_job, fan_file, tmp_path):
    import os
    import subprocess
    import sys

    import yaml

    spec = tiny_job("fanface_ranks", model=_fan_section(fan_file, features="1-many", source="h2l-1"),
                    train={"steps": 2, "checkpoint_every": 2, "batch_size": 4})
    spec["deepspeed"] = {"zero_optimization": {"stage": 1}}
    path = tmp_path / "fanface_ranks.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = subprocess.run([sys.executable, "-m", "facekd", "train", str(path), "--nproc-per-node", "2"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    state = load_checkpoint(checkpoint_path(f"{spec['train']['output_dir']}/checkpoints", 2))
    assert state["world_size"] == 2
    saved = torch.load(fan_file, weights_only=True)
    for key, value in saved.items():
        assert torch.equal(state["backbone"][f"fan.{key}"], value), key
    assert not torch.equal(state["backbone"]["integrations.0.0.gamma"], torch.ones(1))  # γ_k learnt on 2 ranks


THESIS_SPECS = {  # jobs/fanface/<name>.yaml → (heatmaps, features, source, layer) of thesis Table 3.1; None: no FAN
    "arcface_iresnet34": None,
    "h2": ("h2", "none"),
    "h2plus": ("h2plus", "none"),
    "h2_11_bl_h2l2": ("h2", "1-1", "h2l-2", "bl"),
    "h2_11_sl": ("h2", "1-1", "h2l-2", "sl"),
    "h2_11_al": ("h2", "1-1", "h2l-2", "al"),
    "h2_1m_bl": ("h2", "1-many", "h2l-2", "bl"),
}


@pytest.mark.parametrize("name", THESIS_SPECS)
def test_thesis_job_specs_are_the_variants_of_table_3_1(name):
    from pathlib import Path

    from facekd.config import load_job

    job = load_job(Path(__file__).resolve().parents[2] / "jobs" / "fanface" / f"{name}.yaml")
    # Sec. 3.4-3.5: ResNet-34 FRN, ArcFace s = 64, m = 0.5, SGD momentum 0.9, weight decay 5e-4
    assert (job.model.backbone, job.head.s, job.head.m2, job.head.m3) == ("iresnet34", 64.0, 0.5, 0.0)
    assert (job.optim.momentum, job.optim.weight_decay, job.data.image_size) == (0.9, 5e-4, 112)
    expected = THESIS_SPECS[name]
    if expected is None:
        assert job.model.fan is None
        return
    fan = job.model.fan
    assert (fan.input_size, fan.heatmap_points) == (256, "inner")
    assert (fan.heatmaps, fan.features, fan.source, fan.layer)[:len(expected)] == expected
