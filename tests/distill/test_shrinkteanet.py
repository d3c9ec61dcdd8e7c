"""ShrinkTeaNet angular distillation against float64 references written from the paper.

Eq. 4 read as (1 − cos(F_T, F_S))² per sample, averaged over the batch (Eq. 7). The reference of
the intermediate loss (Eq. 6) applies each adapter as an explicit channel contraction plus the
batch-norm formula and runs the teacher's later stages and head one by one, with the stage
weights 1/16, 1/8, 1/4, 1/2 and 1 for the embedding written out (λ_i = λ_{i+1} / 2, Sec. 4).
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from facekd.distill.shrinkteanet import IntermediateAngularDistiller, angular_loss
from facekd.models import build_backbone

TOLERANCES = {  # dtype → (forward rtol, gradient rtol)
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-5, 1e-2),
    torch.float16: (1e-5, 2e-3),
}
STAGE_WEIGHTS = [1 / 16, 1 / 8, 1 / 4, 1 / 2]


# the small float64 backbones run on one thread (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def reference_angular(student, teacher):
    """mean_b (1 − Σ_d s_d t_d / (‖s‖ ‖t‖))², one sample at a time."""
    total = student.new_zeros((), dtype=torch.float64)
    for s, t in zip(student.double(), teacher.double().detach()):
        cosine = (s * t).sum() / (torch.sqrt((s * s).sum()) * torch.sqrt((t * t).sum()))
        total = total + (1.0 - cosine) ** 2
    return total / student.shape[0]


def make_pair(batch_size, dim, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch_size, dim, generator=generator, dtype=torch.float64).to(dtype)
    teacher = torch.randn(batch_size, dim, generator=generator, dtype=torch.float64).to(dtype)
    return student.requires_grad_(), teacher


@pytest.mark.parametrize("shape", [(1, 2), (4, 16), (7, 41)])
def test_angular_loss_matches_reference_forward_and_gradient(shape):
    student, teacher = make_pair(*shape)
    loss = angular_loss(student, teacher)
    expected = reference_angular(student, teacher)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-15)
    (grad,) = torch.autograd.grad(loss, student, grad_outputs=torch.tensor(-3.0, dtype=torch.float64))
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(grad, -3.0 * expected_grad, rtol=1e-10, atol=1e-14)


def test_angular_loss_values_at_known_angles():
    teacher = torch.tensor([[1.0, 0.0]] * 3, dtype=torch.float64)
    parallel, orthogonal, opposite = [5.0, 0.0], [0.0, 2.0], [-0.5, 0.0]
    for student, expected in ((parallel, 0.0), (orthogonal, 1.0), (opposite, 4.0)):
        assert float(angular_loss(torch.tensor([student], dtype=torch.float64), teacher[:1])) == expected
    # per-sample scales do not matter: only directions are distilled
    student, teacher = make_pair(5, 8)
    scales = torch.tensor([[0.1], [2.0], [7.0], [1.0], [30.0]], dtype=torch.float64)
    torch.testing.assert_close(angular_loss(scales * student, teacher), angular_loss(student, teacher))


@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_angular_loss_half_inputs(dtype):
    student, teacher = make_pair(7, 41, dtype=dtype)
    forward_rtol, grad_rtol = TOLERANCES[dtype]
    loss = angular_loss(student, teacher)
    (grad,) = torch.autograd.grad(loss, student)
    student64 = student.detach().double().requires_grad_()
    expected = reference_angular(student64, teacher)
    (expected_grad,) = torch.autograd.grad(expected, student64)
    torch.testing.assert_close(loss.double(), expected, rtol=forward_rtol, atol=0)
    scale = float(expected_grad.abs().max())
    torch.testing.assert_close(grad.double(), expected_grad, rtol=grad_rtol, atol=grad_rtol * scale)


def test_angular_loss_detaches_teacher_and_rejects_bad_shapes():
    student, teacher = make_pair(3, 4)
    teacher.requires_grad_()
    angular_loss(student, teacher).backward()
    assert teacher.grad is None
    with pytest.raises(ValueError, match=r"\[3, 4\] and \[3, 5\]"):
        angular_loss(student, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="at least one sample"):
        angular_loss(torch.zeros(0, 4), torch.zeros(0, 4))


# ---------------------------------------------------------------------------------------------
# Intermediate distillation through the teacher's later stages
# ---------------------------------------------------------------------------------------------

PAIRS = [
    # (student name, width, image size), (teacher name, width, image size)
    (("mobilefacenet", 0.25, 32), ("iresnet18", 0.125, 32)),
    (("iresnet18", 0.125, 32), ("iresnet18", 0.25, 32)),
    (("iresnet18", 0.125, 32), ("iresnet18", 0.125, 64)),  # teacher maps twice the student's size
]


def build(spec, seed):
    name, width, image_size = spec
    torch.manual_seed(seed)
    return build_backbone(name, width=width, image_size=image_size, embedding_dim=16).double()


def reference_adapter(adapter, x, size):
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    out = torch.einsum("oi,bihw->bohw", adapter.conv.weight[:, :, 0, 0], x)
    mean = out.mean(dim=(0, 2, 3), keepdim=True)
    var = ((out - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    bn = adapter.bn
    return (out - mean) / torch.sqrt(var + bn.eps) * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]


def reference_intermediate(distiller, teacher, student_stages, teacher_embedding, student_embedding):
    loss = reference_angular(student_embedding, teacher_embedding)
    for i, (adapter, weight) in enumerate(zip(distiller.adapters, STAGE_WEIGHTS)):
        x = reference_adapter(adapter, student_stages[i], teacher.feature_sizes[i])
        for stage in teacher.stages[i + 1 :]:
            x = stage(x)
        loss = loss + weight * reference_angular(teacher.head(x), teacher_embedding)
    return loss


@pytest.mark.parametrize("student_spec, teacher_spec", PAIRS)
def test_intermediate_loss_matches_reference_forward_and_gradient(student_spec, teacher_spec):
    student, teacher = build(student_spec, 0), build(teacher_spec, 1)
    distiller = IntermediateAngularDistiller(student, teacher).double()
    assert distiller.stage_weights == STAGE_WEIGHTS and distiller.embedding_weight == 1.0
    images = torch.randn(5, 3, student_spec[2], student_spec[2], dtype=torch.float64)
    with torch.no_grad():
        teacher_embedding = teacher(F.interpolate(images, size=teacher_spec[2]))
    student_embedding, stages = student(images, return_stages=True)
    loss = distiller(stages, teacher_embedding, student_embedding)
    expected = reference_intermediate(distiller, teacher, stages, teacher_embedding, student_embedding)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    inputs = [*stages, student_embedding, *(adapter.conv.weight for adapter in distiller.adapters)]
    grads = torch.autograd.grad(loss, inputs, grad_outputs=torch.tensor(0.7, dtype=torch.float64), retain_graph=True)
    expected_grads = torch.autograd.grad(expected, inputs)
    for grad, expected_grad in zip(grads, expected_grads):
        assert float(expected_grad.abs().max()) > 0.0
        torch.testing.assert_close(grad, 0.7 * expected_grad, rtol=1e-8, atol=1e-12)


def test_teacher_is_frozen_but_passes_gradient_to_student():
    student, teacher = build(("mobilefacenet", 0.25, 32), 0), build(("iresnet18", 0.125, 32), 1)
    teacher.train()
    distiller = IntermediateAngularDistiller(student, teacher).double()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert not any(key.startswith("teacher") for key in distiller.state_dict())
    assert sum(p.numel() for p in distiller.parameters()) == sum(
        p.numel() for adapter in distiller.adapters for p in adapter.parameters()
    )
    distiller.train()  # training the adapters leaves the teacher in eval mode
    assert not teacher.training
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    teacher_embedding = teacher(images)
    student_embedding, stages = student(images, return_stages=True)
    # with the final term off, the student's first stage only learns through the teacher
    distiller(stages, teacher_embedding, student_embedding.detach()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.stages[0].parameters() if p.requires_grad)


def test_identity_adapters_on_the_teachers_own_stages_give_zero_loss():
    teacher = build(("iresnet18", 0.125, 32), 1).eval()
    distiller = IntermediateAngularDistiller(copy.deepcopy(teacher), teacher).double().eval()
    with torch.no_grad():
        for adapter in distiller.adapters:
            channels = adapter.conv.weight.shape[0]
            adapter.conv.weight.copy_(torch.eye(channels, dtype=torch.float64)[:, :, None, None])
            adapter.bn.running_mean.zero_()
            adapter.bn.running_var.fill_(1.0 - adapter.bn.eps)
        images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
        embedding, stages = teacher(images, return_stages=True)
        assert float(distiller(stages, embedding, embedding)) < 1e-24


def test_rejects_bad_configuration_and_inputs():
    student, teacher = build(("iresnet18", 0.125, 32), 0), build(("iresnet18", 0.25, 32), 1)
    with pytest.raises(ValueError, match="student embedding_dim 16, teacher 8"):
        IntermediateAngularDistiller(student, build_backbone("iresnet18", width=0.25, image_size=32, embedding_dim=8))
    with pytest.raises(ValueError, match="embedding_weight must be > 0"):
        IntermediateAngularDistiller(student, teacher, embedding_weight=0.0)
    distiller = IntermediateAngularDistiller(student, teacher).double()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    embedding, stages = student(images, return_stages=True)
    with pytest.raises(ValueError, match="4 stage outputs, got 3"):
        distiller(stages[:3], embedding, embedding)
    with pytest.raises(ValueError, match=r"stage 1 features must be \[B, 16, H, W\], got \[2, 8, 16, 16\]"):
        distiller([stages[0], stages[0], stages[2], stages[3]], embedding, embedding)
    teacher.train()
    with pytest.raises(ValueError, match="eval mode"):
        distiller(stages, embedding, embedding)


def test_stage_weights_halve_from_the_embedding_weight():
    student, teacher = build(("iresnet18", 0.125, 32), 0), build(("iresnet18", 0.25, 32), 1)
    distiller = IntermediateAngularDistiller(student, teacher, embedding_weight=2.0)
    assert distiller.stage_weights == [2.0 * w for w in STAGE_WEIGHTS]
    assert math.isclose(sum(distiller.stage_weights), 2.0 * 15 / 16)
