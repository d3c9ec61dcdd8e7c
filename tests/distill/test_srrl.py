"""SRRL losses (thesis 000 ch. 4) against float64 references written element by element.

L_FM pools by explicit sums over the spatial positions; L_SR forms every logit Σ_d h_d W_cd (or
s·cos θ from explicit norms) and averages the squared differences over B × C. The Gram form is
checked against both, forward and gradient, including the normalised head.
"""
import math

import numpy as np
import pytest
import torch

from facekd.distill.srrl import (
    SRRLConnector,
    mixed_soft_targets,
    mixup_labeled_unlabeled,
    srrl_fm_loss,
    srrl_loss,
    srrl_sr_loss,
    srrl_sr_loss_gram,
    teacher_gram,
)

SR_SHAPES = [(1, 1, 1), (4, 10, 8), (7, 41, 13)]  # (B, C, D)
TOLERANCES = {  # dtype → (forward rtol, gradient rtol)
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (1e-5, 1e-2),
    torch.float16: (1e-5, 2e-3),
}


def reference_fm(connected, teacher):
    batch_size, channels = connected.shape[:2]
    total = connected.new_zeros((), dtype=torch.float64)
    for b in range(batch_size):
        for c in range(channels):
            student_mean = connected[b, c].double().sum() / connected[b, c].numel()
            teacher_mean = teacher[b, c].double().detach().sum() / teacher[b, c].numel()
            total = total + (student_mean - teacher_mean) ** 2
    return total / (batch_size * channels)


def reference_sr(h_student, h_teacher, centres, normalized=False, scale=1.0):
    """mean over (b, c) of (z_S[b, c] − z_T[b, c])², each logit s·Σ_d h_d W_cd (÷ the norms if normalised)."""
    centres = centres.double().detach()
    batch_size, num_classes = h_student.shape[0], centres.shape[0]

    def logit(h, c):
        value = scale * (h * centres[c]).sum()
        if normalized:
            value = value / (torch.sqrt((h * h).sum()) * torch.sqrt((centres[c] * centres[c]).sum()))
        return value

    total = h_student.new_zeros((), dtype=torch.float64)
    for b in range(batch_size):
        for c in range(num_classes):
            total = total + (logit(h_student[b].double(), c) - logit(h_teacher[b].double().detach(), c)) ** 2
    return total / (batch_size * num_classes)


def make_features(batch_size, num_classes, dim, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    h_student = torch.randn(batch_size, dim, generator=generator, dtype=torch.float64).to(dtype)
    h_teacher = torch.randn(batch_size, dim, generator=generator, dtype=torch.float64).to(dtype)
    centres = torch.randn(num_classes, dim, generator=generator, dtype=torch.float64).to(dtype)
    return h_student.requires_grad_(), h_teacher, centres


@pytest.mark.parametrize("shape", SR_SHAPES)
@pytest.mark.parametrize("normalized, scale", [(False, 1.0), (False, 3.0), (True, 64.0)])
def test_sr_direct_and_gram_forms_match_reference(shape, normalized, scale):
    h_student, h_teacher, centres = make_features(*shape)
    expected = reference_sr(h_student, h_teacher, centres, normalized, scale)
    (expected_grad,) = torch.autograd.grad(expected, h_student)
    gram = teacher_gram(centres, normalized=normalized)
    for loss in (
        srrl_sr_loss(h_student, h_teacher, centres, normalized=normalized, scale=scale),
        srrl_sr_loss_gram(h_student, h_teacher, gram, shape[1], normalized=normalized, scale=scale),
    ):
        torch.testing.assert_close(loss, expected, rtol=1e-11, atol=1e-12)
        (grad,) = torch.autograd.grad(loss, h_student, grad_outputs=torch.tensor(2.5, dtype=torch.float64))
        torch.testing.assert_close(grad, 2.5 * expected_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("normalized", [False, True])
def test_teacher_gram_is_the_sum_of_centre_outer_products(normalized):
    _, _, centres = make_features(1, 41, 13)
    expected = torch.zeros(13, 13, dtype=torch.float64)
    for row in centres:
        unit = row / torch.sqrt((row * row).sum()) if normalized else row
        expected += torch.outer(unit, unit)
    torch.testing.assert_close(teacher_gram(centres, normalized=normalized), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_sr_gram_form_with_half_inputs(dtype):
    h_student, h_teacher, centres = make_features(7, 41, 13, dtype=dtype)
    forward_rtol, grad_rtol = TOLERANCES[dtype]
    gram = teacher_gram(centres, normalized=True)
    loss = srrl_sr_loss_gram(h_student, h_teacher, gram, 41, normalized=True, scale=64.0)
    assert loss.dtype == torch.float32
    (grad,) = torch.autograd.grad(loss, h_student)
    student64 = h_student.detach().double().requires_grad_()
    expected = reference_sr(student64, h_teacher.double(), centres.double(), True, 64.0)
    (expected_grad,) = torch.autograd.grad(expected, student64)
    # δᵀGδ in float32 after a D-term Gram product: a few ε32 of relative error
    torch.testing.assert_close(loss.double(), expected, rtol=10 * forward_rtol, atol=0)
    scale = float(expected_grad.abs().max())
    torch.testing.assert_close(grad.double(), expected_grad, rtol=grad_rtol, atol=grad_rtol * scale)


@pytest.mark.parametrize("student_size, teacher_size", [(3, 3), (4, 2), (1, 5)])
def test_fm_loss_matches_reference(student_size, teacher_size):
    generator = torch.Generator().manual_seed(4)
    connected = torch.randn(7, 41, student_size, student_size, generator=generator, dtype=torch.float64)
    teacher = torch.randn(7, 41, teacher_size, teacher_size, generator=generator, dtype=torch.float64)
    connected.requires_grad_()
    loss = srrl_fm_loss(connected, teacher)
    expected = reference_fm(connected, teacher)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    (grad,) = torch.autograd.grad(loss, connected, grad_outputs=torch.tensor(0.4, dtype=torch.float64))
    (expected_grad,) = torch.autograd.grad(expected, connected)
    torch.testing.assert_close(grad, 0.4 * expected_grad, rtol=1e-10, atol=1e-15)


def test_srrl_loss_weights_both_terms():
    generator = torch.Generator().manual_seed(5)
    connected = torch.randn(4, 6, 2, 2, generator=generator, dtype=torch.float64)
    teacher_map = torch.randn(4, 6, 2, 2, generator=generator, dtype=torch.float64)
    h_student, h_teacher, centres = make_features(4, 9, 5)
    gram = teacher_gram(centres)
    loss = srrl_loss(connected, teacher_map, h_student, h_teacher, gram, 9, alpha=0.3, beta=2.0)
    expected = 0.3 * reference_fm(connected, teacher_map) + 2.0 * reference_sr(h_student, h_teacher, centres)
    torch.testing.assert_close(loss, expected, rtol=1e-11, atol=1e-13)
    default = srrl_loss(connected, teacher_map, h_student, h_teacher, gram, 9)
    expected = reference_fm(connected, teacher_map) + reference_sr(h_student, h_teacher, centres)
    torch.testing.assert_close(default, expected)


def test_teacher_side_receives_no_gradient():
    h_student, h_teacher, centres = make_features(3, 5, 4)
    h_teacher.requires_grad_()
    centres.requires_grad_()
    gram = centres.T @ centres
    srrl_sr_loss(h_student, h_teacher, centres).backward()
    srrl_sr_loss_gram(h_student, h_teacher, gram, 5).backward()
    assert h_teacher.grad is None and centres.grad is None and h_student.grad is not None


@pytest.mark.parametrize("relu", [True, False])
def test_connector_is_conv_bn_relu(relu):
    torch.manual_seed(0)
    connector = SRRLConnector(3, 5, relu=relu).double()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    out = torch.einsum("oi,bihw->bohw", connector[0].weight[:, :, 0, 0], x)
    mean = out.mean(dim=(0, 2, 3), keepdim=True)
    var = ((out - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    expected = (out - mean) / torch.sqrt(var + connector[1].eps)
    torch.testing.assert_close(connector(x), expected.clamp_min(0.0) if relu else expected, rtol=1e-12, atol=1e-12)
    assert len(connector) == (3 if relu else 2)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\], got \[4, 2, 2, 2\]"):
        connector(x[:, :2])
    with pytest.raises(ValueError, match="teacher_channels must be a positive int"):
        SRRLConnector(3, 0)


def test_mixup_draws_lambda_from_beta_and_keeps_the_labeled_image_dominant():
    x_l = torch.randn(7, 3, 4, 4, dtype=torch.float64)
    x_u = torch.randn(7, 3, 4, 4, dtype=torch.float64)
    draws = np.random.default_rng(11).beta(0.4, 0.4, size=20)
    generator = np.random.default_rng(11)
    for lam in draws:
        mixed, lam_prime = mixup_labeled_unlabeled(x_l, x_u, 0.4, generator)
        assert lam_prime == max(lam, 1.0 - lam) and lam_prime >= 0.5  # thesis Eq. 4.11
        torch.testing.assert_close(mixed, lam_prime * x_l + (1.0 - lam_prime) * x_u, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="alpha must be"):
        mixup_labeled_unlabeled(x_l, x_u, 0.0, generator)
    with pytest.raises(ValueError, match=r"\[7, 3, 4, 4\] and \[6, 3, 4, 4\]"):
        mixup_labeled_unlabeled(x_l, x_u[:6], 0.4, generator)


def test_mixed_soft_targets_mix_teacher_logits():
    logits_l = torch.randn(7, 41, dtype=torch.float64, requires_grad=True)
    logits_u = torch.randn(7, 41, dtype=torch.float64)
    mixed = mixed_soft_targets(logits_l, logits_u, 0.8)
    assert not mixed.requires_grad
    torch.testing.assert_close(mixed, 0.8 * logits_l.detach() + 0.2 * logits_u, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match=r"lam must be in \[0, 1\], got 1.5"):
        mixed_soft_targets(logits_l, logits_u, 1.5)
    with pytest.raises(ValueError, match=r"\[7, 41\] and \[7, 40\]"):
        mixed_soft_targets(logits_l, logits_u[:, :40], 0.8)


def test_rejects_bad_inputs():
    h_student, h_teacher, centres = make_features(4, 9, 5)
    gram = teacher_gram(centres)
    with pytest.raises(ValueError, match=r"\[4, 5\] and \[4, 6\]"):
        srrl_sr_loss(h_student, torch.zeros(4, 6, dtype=torch.float64), centres)
    with pytest.raises(ValueError, match=r"class_centres must be \[C, 5\]"):
        srrl_sr_loss(h_student, h_teacher, centres[:, :4])
    with pytest.raises(ValueError, match=r"gram must be \[5, 5\] for 5-d features, got \[4, 4\]"):
        srrl_sr_loss_gram(h_student, h_teacher, gram[:4, :4], 9)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        srrl_sr_loss_gram(h_student, h_teacher, gram, 0)
    with pytest.raises(ValueError, match="scale must be"):
        srrl_sr_loss_gram(h_student, h_teacher, gram, 9, scale=-1.0)
    with pytest.raises(ValueError, match="non-empty"):
        teacher_gram(torch.zeros(0, 5))
    with pytest.raises(ValueError, match=r"same B and C, got \[2, 3, 4, 4\] and \[2, 4, 4, 4\]"):
        srrl_fm_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match="beta must be"):
        srrl_loss(torch.zeros(2, 3, 1, 1), torch.zeros(2, 3, 1, 1), h_student, h_teacher, gram, 9, beta=math.nan)
