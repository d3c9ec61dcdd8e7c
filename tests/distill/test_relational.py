"""RKD against a float64 reference that loops over pairs and triplets (Park et al. 2019, Sec. 3.2).

The reference takes every distance as an explicit vector norm and every angle from explicit
unit difference vectors, skipping the degenerate triplets (their cosine is 0 for both networks),
and divides the Huber sums by B² and B³ as the authors' code does.
"""
import math

import pytest
import torch

from facekd.distill.relational import rkd_loss

# (B, D_S, D_T): student and teacher widths differ, since RKD compares relations only.
SHAPES = [(2, 3, 3), (5, 4, 7), (7, 11, 6)]
TOLERANCES = {  # dtype → (forward rtol, gradient rtol)
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (1e-5, 1e-2),
    torch.float16: (1e-5, 2e-3),
}


def huber(x):
    return 0.5 * x * x if abs(float(x.detach())) < 1.0 else abs(x) - 0.5


def reference_rkd(student, teacher, w_distance=25.0, w_angle=50.0):
    batch_size = student.shape[0]
    student, teacher = student.double(), teacher.double().detach()

    def distances(e):
        indices = [(i, j) for i in range(batch_size) for j in range(batch_size) if i != j]
        pairs = {(i, j): torch.linalg.vector_norm(e[i] - e[j]) for i, j in indices}
        mean = sum(pairs.values()) / len(pairs)
        return {key: value / mean for key, value in pairs.items()}

    def cosine(e, i, j, k):
        u = (e[i] - e[j]) / torch.linalg.vector_norm(e[i] - e[j])
        v = (e[k] - e[j]) / torch.linalg.vector_norm(e[k] - e[j])
        return (u * v).sum()

    d_s, d_t = distances(student), distances(teacher)
    distance_loss = sum(huber(d_s[key] - d_t[key]) for key in d_s) / batch_size**2
    angle_loss = student.new_zeros(())
    for i in range(batch_size):
        for j in range(batch_size):
            for k in range(batch_size):
                if i != j and k != j:
                    angle_loss = angle_loss + huber(cosine(student, i, j, k) - cosine(teacher, i, j, k))
    return w_distance * distance_loss + w_angle * angle_loss / batch_size**3


def make_inputs(batch_size, student_dim, teacher_dim, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch_size, student_dim, generator=generator, dtype=torch.float64).to(dtype)
    teacher = 3.0 * torch.randn(batch_size, teacher_dim, generator=generator, dtype=torch.float64).to(dtype)
    return student.requires_grad_(), teacher


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("w_distance, w_angle", [(25.0, 50.0), (1.0, 0.0), (0.0, 2.0)])
def test_matches_reference_forward_and_gradient(shape, w_distance, w_angle):
    student, teacher = make_inputs(*shape)
    loss = rkd_loss(student, teacher, w_distance=w_distance, w_angle=w_angle)
    expected = reference_rkd(student, teacher, w_distance, w_angle)
    torch.testing.assert_close(loss, expected, rtol=1e-11, atol=1e-13)
    (grad,) = torch.autograd.grad(loss, student)
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)


def test_large_differences_use_the_linear_branch_of_the_huber_loss():
    # Teacher distances far from the student's: some |ψ_S − ψ_T| > 1 reach the L1 branch.
    student, teacher = make_inputs(5, 3, 3)
    teacher = teacher.clone()
    teacher[0] += 100.0
    loss = rkd_loss(student, teacher)
    torch.testing.assert_close(loss, reference_rkd(student, teacher), rtol=1e-11, atol=1e-13)


def test_incoming_gradient_not_one_scales_gradient():
    student, teacher = make_inputs(7, 11, 6)
    loss = rkd_loss(student, teacher)
    (grad,) = torch.autograd.grad(loss, student, grad_outputs=torch.tensor(0.3, dtype=torch.float64))
    (expected,) = torch.autograd.grad(reference_rkd(student, teacher), student)
    torch.testing.assert_close(grad, 0.3 * expected, rtol=1e-9, atol=1e-12)


def test_similarity_transform_of_the_teacher_gives_zero_loss():
    # Distances normalised by their mean and angles are unchanged by rotation, scaling and shifts.
    generator = torch.Generator().manual_seed(3)
    teacher = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(5, 5, generator=generator, dtype=torch.float64))
    student = 0.2 * teacher @ rotation + torch.randn(5, generator=generator, dtype=torch.float64)
    assert float(rkd_loss(student, teacher)) < 1e-20


def test_coincident_embeddings_give_finite_gradient():
    student, teacher = make_inputs(5, 4, 4)
    student = student.detach().clone()
    student[1] = student[0]
    student.requires_grad_()
    (grad,) = torch.autograd.grad(rkd_loss(student, teacher), student)
    assert torch.isfinite(grad).all()


def test_teacher_receives_no_gradient():
    student, teacher = make_inputs(4, 3, 5)
    teacher.requires_grad_()
    rkd_loss(student, teacher).backward()
    assert teacher.grad is None and student.grad is not None


@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_half_inputs_against_float64_reference_of_rounded_inputs(dtype):
    student, teacher = make_inputs(7, 11, 6, dtype=dtype)
    forward_rtol, grad_rtol = TOLERANCES[dtype]
    loss = rkd_loss(student, teacher)
    (grad,) = torch.autograd.grad(loss, student)
    student64 = student.detach().double().requires_grad_()
    expected = reference_rkd(student64, teacher.double())
    (expected_grad,) = torch.autograd.grad(expected, student64)
    # the Gram-matrix distances lose ~D·ε32 relative to ‖e‖², hence 10× the rounding
    torch.testing.assert_close(loss.double(), expected, rtol=10 * forward_rtol, atol=0)
    assert grad.dtype == dtype
    scale = float(expected_grad.abs().max())
    torch.testing.assert_close(grad.double(), expected_grad, rtol=grad_rtol, atol=grad_rtol * scale)


def test_rejects_bad_inputs():
    student, teacher = make_inputs(4, 3, 5)
    with pytest.raises(ValueError, match=r"student \[4, 3\] and teacher \[5, 5\]"):
        rkd_loss(student, torch.zeros(5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[B, D\] matrices"):
        rkd_loss(student[0], teacher[0])
    with pytest.raises(ValueError, match="at least two samples"):
        rkd_loss(student[:1], teacher[:1])
    with pytest.raises(ValueError, match="w_angle must be"):
        rkd_loss(student, teacher, w_angle=-1.0)
    with pytest.raises(ValueError, match="w_distance must be"):
        rkd_loss(student, teacher, w_distance=math.inf)
