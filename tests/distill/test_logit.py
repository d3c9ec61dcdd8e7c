"""Hinton KD against a float64 reference written from the formula."""
import pytest
import torch

from facekd.distill.logit import kd_loss

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _reference_kd(student, teacher, temperature):
    """KL(p_T ‖ p_S)·T² from probabilities (no log-softmax), summed over classes, mean over rows."""
    student, teacher = student.double(), teacher.double()
    p_student = torch.exp(student / temperature)
    p_student = p_student / p_student.sum(1, keepdim=True)
    p_teacher = torch.exp(teacher / temperature)
    p_teacher = p_teacher / p_teacher.sum(1, keepdim=True)
    rows = []
    for i in range(student.shape[0]):
        terms = [p_teacher[i, j] * torch.log(p_teacher[i, j] / p_student[i, j])
                 for j in range(student.shape[1]) if p_teacher[i, j] > 0]
        rows.append(torch.stack(terms).sum())
    loss = torch.stack(rows).mean() * temperature**2
    # closed-form gradient: T·(p_S − p_T)/B
    grad = temperature * (p_student - p_teacher) / student.shape[0]
    return loss, grad


@pytest.mark.parametrize("shape", [(1, 1), (4, 10), (7, 41)])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_kd_loss_matches_the_formula(shape, temperature, dtype):
    generator = torch.Generator().manual_seed(shape[1])
    student = (3 * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype).requires_grad_()
    teacher = (3 * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)
    loss = kd_loss(student, teacher, temperature=temperature)
    (grad,) = torch.autograd.grad(3.0 * loss, student)
    expected_loss, expected_grad = _reference_kd(student.detach(), teacher, temperature)
    tolerance = TOLERANCE[dtype]
    assert loss.item() == pytest.approx(expected_loss.item(), rel=tolerance, abs=tolerance)
    torch.testing.assert_close(grad.double(), 3.0 * expected_grad, rtol=tolerance, atol=tolerance)


def test_kd_loss_is_zero_for_equal_logits_and_keeps_the_teacher_fixed():
    logits = torch.randn(5, 9)
    teacher = logits.clone().requires_grad_()
    assert kd_loss(logits, teacher).abs().item() < 1e-6
    student = torch.randn(5, 9, requires_grad=True)
    kd_loss(student, teacher).backward()
    assert teacher.grad is None


def test_kd_loss_with_all_teacher_mass_in_one_class():
    teacher = torch.full((3, 6), -1e4, dtype=torch.float64)
    teacher[:, 2] = 0.0
    student = torch.randn(3, 6, dtype=torch.float64)
    expected = -torch.log_softmax(student, 1)[:, 2].mean()  # KL to a one-hot = cross-entropy
    assert kd_loss(student, teacher).item() == pytest.approx(expected.item(), rel=1e-12)


def test_kd_loss_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"both be \[B, C\], got \(2, 3\) and \(2, 4\)"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0.0)
