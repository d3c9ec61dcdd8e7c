"""The Distiller: each method's term is its paper's loss on the right tensors, weighted, ramped, combinable."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from facekd.config import DISTILL_METHODS, TEACHERLESS_METHODS, DistillConfig, GKDConfig, HeadConfig
from facekd.distill.distiller import Distiller, Outputs
from facekd.heads import MarginHead
from facekd.kernels import grouped_kd_loss
from facekd.models import build_backbone

NUM_CLASSES, BATCH, SIZE, DIM = 11, 6, 32, 16


def _networks(teacher_dim=DIM):
    torch.manual_seed(0)
    student = build_backbone("mobilefacenet", width=0.25, image_size=SIZE, embedding_dim=DIM).double()
    teacher = build_backbone("iresnet18", width=0.125, image_size=SIZE, embedding_dim=teacher_dim).double().eval()
    student_head = MarginHead(NUM_CLASSES, DIM, HeadConfig(s=16.0)).double()
    teacher_head = MarginHead(NUM_CLASSES, teacher_dim, HeadConfig(s=16.0)).double()
    return student, student_head, teacher.requires_grad_(False), teacher_head.requires_grad_(False)


def _batch(student, teacher, dtype=torch.float64):
    images = torch.randn(BATCH, 3, SIZE, SIZE, dtype=dtype)
    labels = torch.tensor([0, 3, 3, 10, 7, 0])
    embedding, stages = student(images, return_stages=True)
    with torch.no_grad():
        teacher_embedding, teacher_stages = teacher(images, return_stages=True)
    return Outputs(embedding, stages), Outputs(teacher_embedding, teacher_stages), labels


def _distiller(config, student, student_head, teacher, teacher_head, batches_per_epoch=5):
    return Distiller(config, student=student, student_head=student_head, teacher=teacher, teacher_head=teacher_head,
                     batches_per_epoch=batches_per_epoch).double()


def _cos_logits(embedding, head):
    return head.config.s * F.normalize(embedding, dim=1) @ F.normalize(head.weight, dim=1).T


def _reference_kd(student_logits, teacher_logits, temperature):
    p_teacher = torch.softmax(teacher_logits / temperature, 1)
    log_ratio = torch.log_softmax(teacher_logits / temperature, 1) - torch.log_softmax(student_logits / temperature, 1)
    return (p_teacher * log_ratio).sum(1).mean() * temperature**2


@pytest.mark.parametrize("method", DISTILL_METHODS)
def test_every_method_gives_a_finite_loss_and_student_gradients(method):
    student, student_head, teacher, teacher_head = _networks()
    config = DistillConfig(methods={method: 0.5}, teacher="t")
    distiller = _distiller(config, student, student_head, teacher, teacher_head)
    assert distiller.needs_stages == (method in ("fitnet", "shrinkteanet", "srrl"))
    student_outputs, teacher_outputs, labels = _batch(student, teacher)
    if not distiller.needs_stages:
        student_outputs = Outputs(student_outputs.embedding, None)
    total, terms = distiller(student_outputs, teacher_outputs, labels, step=0)
    assert set(terms) == {method} and torch.isfinite(total) and total.item() > 0
    total.backward()
    assert student.stem[0].weight.grad is not None and student.stem[0].weight.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in teacher.parameters())
    assert teacher_head.weight.grad is None
    trainable = list(distiller.parameters())
    assert bool(trainable) == (method in ("fitnet", "shrinkteanet", "srrl"))
    assert all(parameter.grad is not None for parameter in trainable)
    # the teacher is never part of the distiller's state (checkpoints hold the adapters only)
    assert not any(key.startswith("teacher") for key in distiller.state_dict())


def _identity_adapters(distiller):
    """Make every adapter (1×1 conv → BN) the identity: unit conv weights, BN in eval mode with the running
    statistics that pass its input through (scale 1 and shift 0 from the initialisation)."""
    with torch.no_grad():
        for module in distiller.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.copy_(torch.eye(module.out_channels, module.in_channels)[:, :, None, None])
            elif isinstance(module, nn.BatchNorm2d):
                module.running_mean.zero_()
                module.running_var.fill_(1.0 - module.eps)
    return distiller.eval()


@pytest.mark.parametrize("method", [name for name in DISTILL_METHODS if name not in TEACHERLESS_METHODS])
def test_a_teacher_term_vanishes_when_the_student_is_the_teacher(method):
    """A method that compares the wrong tensors (the student with itself, a stage with another, logits of
    the wrong head) fails one of the two: positive for another student, 0 for a copy of the teacher whose
    adapters are identities."""
    student, student_head, teacher, teacher_head = _networks()
    config = DistillConfig(methods={method: 1.0}, teacher="t")
    other = _distiller(config, student, student_head, teacher, teacher_head)
    student_outputs, teacher_outputs, labels = _batch(student, teacher)
    different, _ = other(student_outputs, teacher_outputs, labels, step=0)

    twin, twin_head = copy.deepcopy(teacher).requires_grad_(True), copy.deepcopy(teacher_head).requires_grad_(True)
    same = _identity_adapters(_distiller(config, twin, twin_head, teacher, teacher_head))
    twin_outputs, teacher_outputs, labels = _batch(twin, teacher)
    vanishing, _ = same(twin_outputs, teacher_outputs, labels, step=0)
    assert different.item() > 1e-2
    assert abs(vanishing.item()) <= 1e-9 * different.item()


@pytest.mark.parametrize("method", DISTILL_METHODS)
def test_gradient_steps_on_a_term_alone_reduce_it(method):
    """Two steps along the negative gradient of the term (student, its head and the adapters), each sized
    for a first-order decrease of 5 %, reduce it both times: the gradient is the term's own."""
    student, student_head, teacher, teacher_head = _networks()
    distiller = _distiller(DistillConfig(methods={method: 1.0}, teacher="t"), student, student_head, teacher,
                           teacher_head)
    images, labels = torch.randn(BATCH, 3, SIZE, SIZE, dtype=torch.float64), torch.tensor([0, 3, 3, 10, 7, 0])
    with torch.no_grad():
        teacher_outputs = Outputs(*teacher(images, return_stages=True))
    parameters = [p for module in (student, student_head, distiller) for p in module.parameters()]
    losses = []
    for _ in range(3):
        loss, _ = distiller(Outputs(*student(images, return_stages=True)), teacher_outputs, labels, step=0)
        losses.append(loss.item())
        gradients = torch.autograd.grad(loss, parameters, allow_unused=True)
        squared_norm = sum(g.square().sum() for g in gradients if g is not None)
        step_size = 0.05 * loss.item() / squared_norm
        with torch.no_grad():
            for parameter, gradient in zip(parameters, gradients):
                if gradient is not None:
                    parameter -= step_size * gradient
    assert all(after < before for before, after in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.995 * losses[0], losses


def test_kd_term_is_the_weighted_hinton_loss_on_margin_free_logits():
    student, student_head, teacher, teacher_head = _networks()
    config = DistillConfig(methods={"kd": 2.0}, teacher="t")
    distiller = _distiller(config, student, student_head, teacher, teacher_head)
    student_outputs, teacher_outputs, labels = _batch(student, teacher)
    total, _ = distiller(student_outputs, teacher_outputs, labels, step=0)
    expected = 2.0 * _reference_kd(_cos_logits(student_outputs.embedding, student_head),
                                   _cos_logits(teacher_outputs.embedding, teacher_head), 4.0)
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=1e-9)


def test_gkd_term_is_the_grouped_kd_of_both_heads_logits():
    student, student_head, teacher, teacher_head = _networks()
    config = DistillConfig(methods={"gkd": 1.0}, teacher="t", gkd=GKDConfig(temperature=2.0))
    distiller = _distiller(config, student, student_head, teacher, teacher_head)
    student_outputs, teacher_outputs, labels = _batch(student, teacher)
    total, _ = distiller(student_outputs, teacher_outputs, labels, step=0)
    expected = grouped_kd_loss(_cos_logits(student_outputs.embedding, student_head),
                               _cos_logits(teacher_outputs.embedding, teacher_head), temperature=2.0)
    torch.testing.assert_close(total.double(), expected.double(), rtol=1e-5, atol=1e-7)


def test_official_gkd_compares_margined_logits_with_the_target_forced_in():
    student, student_head, teacher, teacher_head = _networks()
    cosface = HeadConfig(s=16.0, m2=0.0, m3=0.4)
    student_head.config = teacher_head.config = cosface
    gkd = GKDConfig(temperature=4.0, selection="batch", force_target=True, margined_logits=True, w_primary=4.0)
    distiller = _distiller(DistillConfig(methods={"gkd": 1.0}, teacher="t", gkd=gkd),
                           student, student_head, teacher, teacher_head)
    student_outputs, teacher_outputs, labels = _batch(student, teacher)
    total, _ = distiller(student_outputs, teacher_outputs, labels, step=0)

    def cosface_logits(embedding, head):
        logits = _cos_logits(embedding, head)
        return logits - 16.0 * 0.4 * F.one_hot(labels, NUM_CLASSES)

    expected = grouped_kd_loss(cosface_logits(student_outputs.embedding, student_head),
                               cosface_logits(teacher_outputs.embedding, teacher_head), temperature=4.0,
                               w_primary=4.0, selection="batch", force_target=True, labels=labels)
    torch.testing.assert_close(total.double(), expected.double(), rtol=1e-5, atol=1e-7)


def test_srrl_gram_term_equals_the_direct_form_through_the_teacher_head():
    student, student_head, teacher, teacher_head = _networks()
    distiller = _distiller(DistillConfig(methods={"srrl": 1.0}, teacher="t"), student, student_head, teacher,
                           teacher_head)
    student_outputs, teacher_outputs, labels = _batch(student, teacher)
    total, _ = distiller(student_outputs, teacher_outputs, labels, step=0)
    connected = distiller.srrl(student_outputs.stages[-1])
    feature_matching = (connected.mean((2, 3)) - teacher_outputs.stages[-1].mean((2, 3))).square().mean()
    through_teacher = teacher.head(connected)
    softmax_regression = (_cos_logits(through_teacher, teacher_head)
                          - _cos_logits(teacher_outputs.embedding, teacher_head)).square().mean()
    torch.testing.assert_close(total, feature_matching + softmax_regression, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("first_epoch, factors", [
    # the GKD authors' counting: the first epoch (steps 0-4) trains on labels alone
    (0, ((0, 0.0), (4, 0.0), (5, 0.25), (12, 0.5), (19, 0.75), (20, 1.0), (99, 1.0))),
    # mdistiller's DKD counting: the first epoch already has weight 1 / warmup_epochs
    (1, ((0, 0.25), (4, 0.25), (5, 0.5), (12, 0.75), (14, 0.75), (15, 1.0), (99, 1.0))),
])
def test_terms_combine_with_their_weights_and_ramp_over_warmup_epochs(first_epoch, factors):
    student, student_head, teacher, teacher_head = _networks()
    config = DistillConfig(methods={"kd": 1.0, "rkd": 0.5, "triplet": 0.25}, teacher="t", warmup_epochs=4,
                           warmup_first_epoch=first_epoch)
    distiller = _distiller(config, student, student_head, teacher, teacher_head, batches_per_epoch=5)
    student_outputs, teacher_outputs, labels = _batch(student, teacher)
    for step, factor in factors:
        assert distiller.ramp(step) == factor
        total, terms = distiller(student_outputs, teacher_outputs, labels, step=step)
        assert set(terms) == {"kd", "rkd", "triplet"}
        assert math.isclose(total.item(), factor * sum(term.item() for term in terms.values()), abs_tol=1e-12)


def test_methods_refuse_mismatched_networks():
    student, student_head, teacher, teacher_head = _networks(teacher_dim=24)
    with pytest.raises(ValueError, match="hidden_l2 compares embeddings directly"):
        _distiller(DistillConfig(methods={"hidden_l2": 1.0}, teacher="t"), student, student_head, teacher,
                   teacher_head)
    other_head = MarginHead(NUM_CLASSES + 1, 24, HeadConfig(s=16.0)).double()
    with pytest.raises(ValueError, match="same identities, got 11 and 12 classes"):
        _distiller(DistillConfig(methods={"kd": 1.0}, teacher="t"), student, student_head, teacher, other_head)
    with pytest.raises(ValueError, match="need a teacher"):
        _distiller(DistillConfig(methods={"kd": 1.0}, teacher="t"), student, student_head, None, None)


def test_an_unlabeled_batch_leaves_out_the_methods_that_need_labels():
    student, student_head, teacher, teacher_head = _networks()
    config = DistillConfig(methods={"kd": 1.0, "dkd": 1.0, "triplet": 1.0, "rkd": 1.0}, teacher="t")
    distiller = _distiller(config, student, student_head, teacher, teacher_head)
    student_outputs, teacher_outputs, labels = _batch(student, teacher)
    total, terms = distiller(student_outputs, teacher_outputs, None, step=0)
    assert set(terms) == {"kd", "rkd"}
    assert math.isclose(total.item(), terms["kd"].item() + terms["rkd"].item(), rel_tol=1e-12)
    forced = DistillConfig(methods={"gkd": 1.0}, teacher="t", gkd=GKDConfig(force_target=True))
    assert _distiller(forced, student, student_head, teacher, teacher_head).needs_labels("gkd")


def test_mixup_loss_is_kd_against_mixed_teacher_logits():
    """SRRL thesis Eq. 4.11-4.12: τ²·KL(softmax(y'/τ) ‖ softmax(z_S(x')/τ)), y' = λ' z_T,l + (1 − λ') z_T,u."""
    student, student_head, teacher, teacher_head = _networks()
    distiller = _distiller(DistillConfig(methods={"kd": 1.0}, teacher="t"), student, student_head, teacher,
                           teacher_head)
    generator = torch.Generator().manual_seed(3)
    mixed_student = torch.randn(BATCH, DIM, dtype=torch.float64, generator=generator, requires_grad=True)
    teacher_l, teacher_u = (torch.randn(BATCH, DIM, dtype=torch.float64, generator=generator) for _ in range(2))
    loss = distiller.mixup_loss(mixed_student, (teacher_l, teacher_u), 0.7)
    target = 0.7 * _cos_logits(teacher_l, teacher_head) + 0.3 * _cos_logits(teacher_u, teacher_head)
    expected = _reference_kd(_cos_logits(mixed_student, student_head), target, 4.0)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
    (grad,) = torch.autograd.grad(loss, mixed_student)
    (expected_grad,) = torch.autograd.grad(expected, mixed_student)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)


# every use of head logits: the methods that read them, and the SRRL mixup term
LOGIT_CASES = {
    "kd": DistillConfig(methods={"kd": 1.0}, teacher="t"),
    "dkd": DistillConfig(methods={"dkd": 1.0}, teacher="t"),
    "gkd": DistillConfig(methods={"gkd": 1.0}, teacher="t"),
    "gkd_official": DistillConfig(methods={"gkd": 1.0}, teacher="t", gkd=GKDConfig(
        temperature=4.0, selection="batch", force_target=True, margined_logits=True)),
    "srrl": DistillConfig(methods={"srrl": 1.0}, teacher="t"),
    "mixup": DistillConfig(methods={"kd": 1.0}, teacher="t"),
}


@pytest.mark.parametrize("case", LOGIT_CASES)
def test_logit_methods_compute_in_fp32_under_bf16_autocast(case):
    """The trainer calls the distiller inside its bf16 autocast. Then a logit method's loss may differ from
    fp32 only by the rounding of its inputs to bf16: it equals the fp32 loss of the bf16-rounded embeddings
    (and SRRL's bf16 network outputs). Logits formed in bf16 at s = 64 (steps of up to 0.25) would not."""
    student, student_head, teacher, teacher_head = (network.float() for network in _networks())
    student_head.config = teacher_head.config = HeadConfig(s=64.0)
    distiller = Distiller(LOGIT_CASES[case], student=student, student_head=student_head, teacher=teacher,
                          teacher_head=teacher_head, batches_per_epoch=5)
    student_outputs, teacher_outputs, labels = _batch(student, teacher, torch.float32)
    # what an autocast backbone hands over: bf16 embeddings and stage features
    student_bf16, teacher_bf16 = (Outputs(outputs.embedding.detach().bfloat16(),
                                          [stage.detach().bfloat16() for stage in outputs.stages])
                                  for outputs in (student_outputs, teacher_outputs))

    def loss(student_outputs, teacher_outputs):
        if case == "mixup":
            unlabeled = teacher_outputs.embedding.flip(0)
            return distiller.mixup_loss(student_outputs.embedding, (teacher_outputs.embedding, unlabeled), 0.7)
        return distiller(student_outputs, teacher_outputs, labels, step=0)[0]

    # SRRL's connector and the teacher's head are network layers and stay under autocast: the fp32 run
    # replays their bf16 outputs, so that only the loss's own arithmetic is compared
    network_outputs = {}
    modules = {"connector": distiller.srrl, "teacher_head": teacher.head} if case == "srrl" else {}
    hooks = [module.register_forward_hook(lambda module, args, output, name=name:
                                          network_outputs.__setitem__(name, output.detach()))
             for name, module in modules.items()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = loss(student_bf16, teacher_bf16)
    for hook in hooks:
        hook.remove()
    hooks = [module.register_forward_hook(lambda module, args, output, name=name: network_outputs[name].float())
             for name, module in modules.items()]
    widened = [Outputs(outputs.embedding.float(), [stage.float() for stage in outputs.stages])
               for outputs in (student_bf16, teacher_bf16)]
    expected = loss(*widened)
    for hook in hooks:
        hook.remove()
    assert under_autocast.dtype == torch.float32 and expected.item() > 0
    torch.testing.assert_close(under_autocast, expected, rtol=1e-5, atol=0)
