"""CondFace's routed IResNets: routing, temperature annealing, dynamic (group) convolution modules, backbones."""
import math

import pytest
import torch
import torch.nn.functional as F

from facekd.config import job_from_dict
from facekd.distributed.checkpoint import checkpoint_path, load_checkpoint
from facekd.models import ROUTED_BACKBONES, StagedBackbone, build_backbone, routing_temperature
from facekd.models.iresnet import IBasicBlock, IResNet
from facekd.models.condface import DynamicGroupConv2d, Routing, RoutedBasicBlock, set_routing_temperature
from facekd.network import load_network
from facekd.train import Trainer, batches_per_epoch


@pytest.mark.parametrize("groups, experts, channels", [(1, 4, 8), (4, 4, 16), (3, 5, 9)])
def test_routing_is_a_distribution_per_group(groups, experts, channels):
    torch.manual_seed(0)
    routing = Routing(channels, groups, experts)
    set_routing_temperature(routing, 1.0)
    alpha = routing(torch.randn(5, channels, 7, 7))
    assert alpha.shape == (5, groups, experts) and alpha.dtype == torch.float32
    assert (alpha >= 0).all()
    torch.testing.assert_close(alpha.sum(-1), torch.ones(5, groups))


def test_temperature_flattens_the_routing():
    torch.manual_seed(0)
    routing = Routing(16, 2, 4).eval()
    x = torch.randn(6, 16, 5, 5)
    set_routing_temperature(routing, 1.0)
    sharp = routing(x)
    set_routing_temperature(routing, 30.0)
    soft = routing(x)
    # τ divides the logits: τ = 30 keeps every expert near 1/n (DyConv's near-uniform start)
    assert (soft - 0.25).abs().max() < (sharp - 0.25).abs().max()
    logits = torch.log(sharp)  # softmax(z) → log gives z up to a per-group constant
    torch.testing.assert_close(soft, torch.softmax(logits / 30.0, dim=-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("steps_per_epoch", [1, 7, 100])
def test_temperature_schedule(steps_per_epoch):
    assert routing_temperature(0, steps_per_epoch) == 30.0
    # linear: half-way through the 10 annealing epochs τ is half-way between 30 and 1
    assert routing_temperature(5 * steps_per_epoch, steps_per_epoch) == pytest.approx(15.5)
    assert routing_temperature(steps_per_epoch, steps_per_epoch) == pytest.approx(30.0 - 2.9)
    for epoch in (10, 11, 50):
        assert routing_temperature(epoch * steps_per_epoch, steps_per_epoch) == 1.0
    values = [routing_temperature(step, steps_per_epoch) for step in range(12 * steps_per_epoch)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_temperature_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="steps_per_epoch must be positive"):
        routing_temperature(0, 0)
    with pytest.raises(ValueError, match="step must be >= 0"):
        routing_temperature(-1, 10)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("expert", [0, 3])
def test_one_hot_routing_is_the_static_conv_of_that_expert(stride, expert):
    torch.manual_seed(0)
    conv = DynamicGroupConv2d(6, 10, groups=1, experts=4, stride=stride).double()
    x = torch.randn(3, 6, 9, 9, dtype=torch.float64)
    routing = F.one_hot(torch.full((3, 1), expert), 4).double()
    static = F.conv2d(x, conv.experts_weight[0, expert], stride=stride, padding=1)
    torch.testing.assert_close(conv(x, routing), static)


def test_dynamic_group_conv_mixes_each_groups_experts():
    torch.manual_seed(0)
    conv = DynamicGroupConv2d(8, 6, groups=2, experts=3, stride=1, expansion=2).double()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    routing = torch.randn(2, 2, 3, dtype=torch.float64).softmax(-1)
    expected = []
    for b in range(2):  # thesis Eq. 5.3, one sample and one group at a time
        parts = [F.conv2d(x[b:b + 1, 4 * g:4 * (g + 1)],
                          torch.einsum("e,eoikl->oikl", routing[b, g], conv.experts_weight[g]), padding=1)
                 for g in range(2)]
        expected.append(conv.squeeze(torch.cat(parts, dim=1)))
    out = conv(x, routing)
    assert out.shape == (2, 6, 5, 5)
    torch.testing.assert_close(out, torch.cat(expected))


def test_dynamic_group_conv_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="must divide into 4 groups"):
        DynamicGroupConv2d(6, 8, groups=4, experts=4)


def test_gradients_reach_experts_and_routing():
    torch.manual_seed(0)
    block = RoutedBasicBlock(8, 16, 2, groups=4, experts=4, expansion=2)
    set_routing_temperature(block, 1.0)
    block(torch.randn(4, 8, 9, 9)).square().mean().backward()
    for name in ("conv1.experts_weight", "conv2.experts_weight", "routing.fc1.weight", "routing.fc2.weight",
                 "conv1.squeeze.weight"):
        grad = dict(block.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("name, routing_dim, routed_stages", [
    ("dc_iresnet18", 6 * 1 * 4, 3),  # thesis Sec. 5.4: 6 routing weights of 4, 24 dimensions
    ("dgconv_iresnet18", 6 * 4 * 4, 3),  # AS4: 96 dimensions
])
def test_routed_backbones_forward_backward(name, routing_dim, routed_stages):
    torch.manual_seed(0)
    backbone = build_backbone(name, width=0.125, image_size=32, embedding_dim=16)
    assert isinstance(backbone, StagedBackbone)
    assert name in ROUTED_BACKBONES
    assert backbone.routing_dim == routing_dim
    assert sum(any(isinstance(m, RoutedBasicBlock) for m in stage) for stage in backbone.stages) == routed_stages
    assert not any(isinstance(m, RoutedBasicBlock) for m in backbone.stages[0])
    with pytest.raises(RuntimeError, match="needs a forward pass first"):
        backbone.routing_vector()
    images = torch.randn(3, 3, 32, 32)
    embedding, stages = backbone(images, return_stages=True)
    assert embedding.shape == (3, 16)
    assert [tuple(s.shape[1:]) for s in stages] == [
        (c, size, size) for c, size in zip(backbone.feature_channels, backbone.feature_sizes)]
    beta = backbone.routing_vector()
    assert beta.shape == (3, routing_dim)
    groups = ROUTED_BACKBONES[name]["groups"]
    torch.testing.assert_close(beta.view(3, -1, 4).sum(-1), torch.ones(3, 6 * groups))
    # the clustering loss backpropagates through β as the recognition loss does through the embedding
    (embedding.square().mean() + beta.square().sum()).backward()
    routing_fc = [p for n, p in backbone.named_parameters() if "routing.fc1" in n]
    experts = [p for n, p in backbone.named_parameters() if "experts_weight" in n]
    assert len(experts) == 12
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in [*routing_fc, *experts])
    torch.testing.assert_close(backbone.embed_from_stage(1, stages[1].detach()), embedding.detach(),
                               rtol=1e-5, atol=1e-5)


def test_static_backbones_are_unchanged_by_the_unit_hook():
    torch.manual_seed(0)
    a = build_backbone("iresnet18", width=0.125, image_size=32, embedding_dim=16)
    torch.manual_seed(0)
    b = IResNet(18, width=0.125, image_size=32, embedding_dim=16,
                unit=lambda i, o, s, stage: IBasicBlock(i, o, s))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


@pytest.fixture(scope="module")
def static_teacher(tiny_data, tmp_path_factory):
    """An IResNet-18 teacher trained for 2 steps on the tiny shards."""
    output = tmp_path_factory.mktemp("condface_teacher")
    spec = {
        "name": "teacher", "data": {"manifest": str(tiny_data / "shards"), "image_size": 32, "num_workers": 0,
                                    "shuffle_buffer": 16},
        "model": {"backbone": "iresnet18", "width": 0.125, "embedding_dim": 16}, "head": {"s": 16.0, "m2": 0.2},
        "train": {"output_dir": str(output), "steps": 2, "batch_size": 8, "checkpoint_every": 2, "device": "cpu"},
    }
    Trainer(job_from_dict(spec), progress=False).fit()
    return output


@pytest.mark.parametrize("name", sorted(ROUTED_BACKBONES))
def test_routed_student_trains_and_distils(name, tiny_job, static_teacher, tmp_path):
    steps = 2
    job = job_from_dict(tiny_job(
        name, model={"backbone": name, "width": 0.125},
        distill={"methods": {"kd": 1.0, "shrinkteanet": 1.0}, "teacher": str(static_teacher)},
        train={"steps": steps, "checkpoint_every": steps},
    ))
    summary = Trainer(job, progress=False).fit()
    assert summary["step"] == steps and math.isfinite(summary["loss"])
    state = load_checkpoint(checkpoint_path(tmp_path / name / "checkpoints", steps))
    temperatures = [v for k, v in state["backbone"].items() if k.endswith("routing.temperature")]
    assert len(temperatures) == 6
    # the trainer annealed τ: the last step ran at step index 1 of DyConv's schedule
    expected = routing_temperature(steps - 1, batches_per_epoch(job))
    assert all(float(t) == pytest.approx(expected) for t in temperatures)
    assert expected < 30.0
    # the routed student is in turn a teacher: a checkpoint loads (τ with it) and distils into a student
    teacher = load_network(tmp_path / name, with_head=False).backbone
    assert all(float(m.temperature) == pytest.approx(expected) for m in teacher.modules() if isinstance(m, Routing))
    student = job_from_dict(tiny_job(
        f"{name}_student", model={"backbone": "iresnet18", "width": 0.125},
        distill={"methods": {"kd": 1.0}, "teacher": str(tmp_path / name)}, train={"steps": 1, "checkpoint_every": 1},
    ))
    assert math.isfinite(Trainer(student, progress=False).fit()["loss"])
