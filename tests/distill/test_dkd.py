"""Decoupled KD against a float64 reference written per sample from the DKD paper (Eq. 2–3, 7).

The reference builds the binary distribution from summed probabilities and the non-target
distribution by deleting the target class from the logit vector, so it shares neither the
log-sum-exp form nor the 1000-offset masking of the module.
"""
import pytest
import torch

from facekd.distill.dkd import dkd_loss

SHAPES = [(1, 2), (4, 10), (7, 41), (3, 1000)]
# dtype → (forward rtol, gradient rtol): half inputs are computed in float32, gradients come back
# rounded to the input dtype.
TOLERANCES = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (1e-5, 1e-2),
    torch.float16: (1e-5, 2e-3),
}


def reference_dkd(student, teacher, labels, alpha=1.0, beta=8.0, temperature=4.0):
    """T² · mean_b(α · KL(b_T ‖ b_S) + β · KL(p̂_T ‖ p̂_S)) in float64, one sample at a time."""
    total = student.new_zeros((), dtype=torch.float64)
    for row in range(student.shape[0]):
        s = student[row].double() / temperature
        t = teacher[row].double().detach() / temperature
        target = int(labels[row])
        others = [j for j in range(s.shape[0]) if j != target]
        p_s, p_t = torch.softmax(s, 0), torch.softmax(t, 0)
        binary_s = torch.stack([p_s[target], p_s[others].sum()])
        binary_t = torch.stack([p_t[target], p_t[others].sum()])
        tckd = (binary_t * (binary_t.log() - binary_s.log())).sum()
        nontarget_s, nontarget_t = torch.softmax(s[others], 0), torch.softmax(t[others], 0)
        nckd = (nontarget_t * (nontarget_t.log() - nontarget_s.log())).sum()
        total = total + alpha * tckd + beta * nckd
    return temperature**2 * total / student.shape[0]


def make_inputs(batch_size, num_classes, dtype=torch.float64, seed=0, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(batch_size, num_classes, generator=generator, dtype=torch.float64)).to(dtype)
    teacher = (scale * torch.randn(batch_size, num_classes, generator=generator, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
    return student.requires_grad_(), teacher, labels


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha, beta, temperature", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (0.0, 1.0, 2.5)])
def test_matches_reference_forward_and_gradient(shape, alpha, beta, temperature):
    student, teacher, labels = make_inputs(*shape)
    loss = dkd_loss(student, teacher, labels, alpha=alpha, beta=beta, temperature=temperature)
    expected = reference_dkd(student, teacher, labels, alpha, beta, temperature)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    (grad,) = torch.autograd.grad(loss, student)
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14)


def test_defaults_are_mdistillers():
    student, teacher, labels = make_inputs(5, 17)
    torch.testing.assert_close(
        dkd_loss(student, teacher, labels), reference_dkd(student, teacher, labels, 1.0, 8.0, 4.0), rtol=1e-12, atol=0
    )


def test_incoming_gradient_not_one_scales_gradient():
    student, teacher, labels = make_inputs(7, 41)
    loss = dkd_loss(student, teacher, labels)
    (grad,) = torch.autograd.grad(loss, student, grad_outputs=torch.tensor(-2.5, dtype=torch.float64))
    (expected,) = torch.autograd.grad(reference_dkd(student, teacher, labels), student)
    torch.testing.assert_close(grad, -2.5 * expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kd_decomposes_into_tckd_and_weighted_nckd(temperature, seed):
    # DKD Eq. 4: KD = TCKD + (1 − p_t^T) · NCKD, so α = 1, β = 1 − p_t^T gives T² · KL(p_T ‖ p_S).
    student, teacher, labels = make_inputs(1, 13, seed=seed)
    p_teacher = torch.softmax(teacher[0] / temperature, 0)
    p_student = torch.softmax(student[0].detach() / temperature, 0)
    kd = temperature**2 * (p_teacher * (p_teacher.log() - p_student.log())).sum()
    beta = 1.0 - float(p_teacher[labels[0]])
    loss = dkd_loss(student, teacher, labels, alpha=1.0, beta=beta, temperature=temperature)
    torch.testing.assert_close(loss.detach(), kd, rtol=1e-12, atol=1e-14)


def test_identical_logits_give_zero_loss():
    student, _, labels = make_inputs(6, 9)
    loss = dkd_loss(student, student.detach().clone(), labels)
    assert abs(float(loss.detach())) < 1e-13


def test_teacher_receives_no_gradient():
    student, teacher, labels = make_inputs(4, 10)
    teacher.requires_grad_()
    dkd_loss(student, teacher, labels).backward()
    assert teacher.grad is None and student.grad is not None


def test_confident_networks_stay_finite_in_float32():
    # A target logit 120 above the rest: the non-target probabilities underflow in float32, so
    # log(Σ non-target p) would be log 0; the log-sum-exp form keeps TCKD exact.
    student = torch.zeros(2, 41, dtype=torch.float64)
    teacher = torch.zeros(2, 41, dtype=torch.float64)
    labels = torch.tensor([3, 40])
    student[0, 3], student[1, 40] = 120.0, 100.0
    teacher[0, 3], teacher[1, 40] = 110.0, 130.0
    student32 = student.float().requires_grad_()
    loss = dkd_loss(student32, teacher.float(), labels, temperature=1.0)
    (grad,) = torch.autograd.grad(loss, student32)
    student64 = student.clone().requires_grad_()
    expected = reference_dkd(student64, teacher, labels, temperature=1.0)
    (expected_grad,) = torch.autograd.grad(expected, student64)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_dtypes_against_float64_reference_of_rounded_inputs(dtype):
    student, teacher, labels = make_inputs(7, 41, dtype=dtype)
    forward_rtol, grad_rtol = TOLERANCES[dtype]
    loss = dkd_loss(student, teacher, labels)
    assert loss.dtype == torch.promote_types(dtype, torch.float32)
    (grad,) = torch.autograd.grad(loss, student)
    student64 = student.detach().double().requires_grad_()
    expected = reference_dkd(student64, teacher.double(), labels)
    (expected_grad,) = torch.autograd.grad(expected, student64)
    torch.testing.assert_close(loss.double(), expected, rtol=forward_rtol, atol=0)
    assert grad.dtype == dtype
    scale = float(expected_grad.abs().max())
    torch.testing.assert_close(grad.double(), expected_grad, rtol=grad_rtol, atol=grad_rtol * scale)


def test_rejects_bad_inputs():
    student, teacher, labels = make_inputs(4, 10)
    with pytest.raises(ValueError, match=r"\[4, 10\] and \[4, 11\]"):
        dkd_loss(student, torch.zeros(4, 11, dtype=torch.float64), labels)
    with pytest.raises(ValueError, match="two classes"):
        dkd_loss(student[:, :1], teacher[:, :1], labels * 0)
    with pytest.raises(ValueError, match=r"shape \[4\]"):
        dkd_loss(student, teacher, labels[:3])
    with pytest.raises(ValueError, match="integer"):
        dkd_loss(student, teacher, labels.double())
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\), got min 0 and max 10"):
        dkd_loss(student, teacher, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="temperature must be"):
        dkd_loss(student, teacher, labels, temperature=0.0)
    with pytest.raises(ValueError, match="beta must be"):
        dkd_loss(student, teacher, labels, beta=-1.0)
    with pytest.raises(ValueError, match="alpha must be"):
        dkd_loss(student, teacher, labels, alpha=float("nan"))
