"""Wang & Lan (2017) hidden-layer L2 and triplet losses against float64 loop references.

The triplet reference normalises each embedding by hand, takes every squared distance as an
explicit ‖u − v‖², and mines the negative of each anchor-positive pair by FaceNet's rule as
written (Sec. 3.2): the closest negative with ‖a − p‖² < ‖a − n‖², else (TensorFlow's
``triplet_semihard_loss``) the farthest negative; or the closest negative for "hardest".
"""
import math

import pytest
import torch

from facekd.distill.wang_lan import batch_hard_triplet_loss, hidden_l2_loss

TOLERANCES = {  # dtype → (forward rtol, gradient rtol)
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (1e-5, 1e-2),
    torch.float16: (1e-5, 2e-3),
}
LABEL_SETS = [
    [0, 0, 1, 1, 1, 2, 3],  # B = 7, two singletons that serve only as negatives
    [0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 3, 3],  # P × K = 4 × 3, interleaved
]


def reference_triplet(embeddings, labels, margin=0.2, mining="semihard"):
    unit = [e / torch.sqrt((e * e).sum()) for e in embeddings.double()]
    labels = [int(y) for y in labels]
    batch_size = len(labels)

    def squared(i, j):
        return ((unit[i] - unit[j]) ** 2).sum()

    total, count = embeddings.new_zeros((), dtype=torch.float64), 0
    for a in range(batch_size):
        negatives = [n for n in range(batch_size) if labels[n] != labels[a]]
        for p in range(batch_size):
            if p == a or labels[p] != labels[a] or not negatives:
                continue
            d_ap = squared(a, p)
            distances = {n: float(squared(a, n).detach()) for n in negatives}
            semihard = [n for n in negatives if distances[n] > float(d_ap.detach())]
            if mining == "hardest":
                chosen = min(negatives, key=distances.get)
            elif semihard:
                chosen = min(semihard, key=distances.get)
            else:
                chosen = max(negatives, key=distances.get)
            total = total + torch.clamp(d_ap - squared(a, chosen) + margin, min=0.0)
            count += 1
    return total / max(count, 1)


def make_embeddings(batch_size, dim, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, dim, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()


@pytest.mark.parametrize("labels", LABEL_SETS)
@pytest.mark.parametrize("mining", ["semihard", "hardest"])
@pytest.mark.parametrize("margin, dim", [(0.2, 3), (0.5, 16)])
def test_triplet_matches_reference_forward_and_gradient(labels, mining, margin, dim):
    labels = torch.tensor(labels)
    embeddings = make_embeddings(len(labels), dim)
    loss = batch_hard_triplet_loss(embeddings, labels, margin=margin, mining=mining)
    expected = reference_triplet(embeddings, labels, margin, mining)
    assert float(expected.detach()) > 0.0
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    (grad,) = torch.autograd.grad(loss, embeddings, grad_outputs=torch.tensor(-1.5, dtype=torch.float64))
    (expected_grad,) = torch.autograd.grad(expected, embeddings)
    torch.testing.assert_close(grad, -1.5 * expected_grad, rtol=1e-10, atol=1e-13)


def test_semihard_and_hardest_mining_on_a_hand_worked_batch():
    # Unit vectors at 0° (a) and 60° (p) of identity 0, negatives at 30° and 90°; ‖u − v‖² = 2 − 2 cos.
    # Pair (a, p): d_ap = 1; the 90° negative (d = 2) is semi-hard, hinge [1 − 2 + 0.2]_+ = 0, while
    # "hardest" takes the 30° one (d = 2 − √3). Pair (p, a): both negatives are at 30° from p, none
    # semi-hard, so both rules give 1 − (2 − √3) + 0.2 = √3 − 0.8.
    angles = torch.tensor([0.0, 60.0, 30.0, 90.0], dtype=torch.float64) * math.pi / 180
    embeddings = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    labels = torch.tensor([0, 0, 1, 2])
    hard_hinge = math.sqrt(3) - 0.8
    semihard = batch_hard_triplet_loss(embeddings, labels, margin=0.2)
    hardest = batch_hard_triplet_loss(embeddings, labels, margin=0.2, mining="hardest")
    assert math.isclose(float(semihard), hard_hinge / 2, rel_tol=1e-12)
    assert math.isclose(float(hardest), hard_hinge, rel_tol=1e-12)


def test_embeddings_are_normalised_before_the_distances():
    labels = torch.tensor(LABEL_SETS[1])
    embeddings = make_embeddings(12, 5)
    scales = torch.linspace(0.1, 10.0, 12, dtype=torch.float64)[:, None]
    torch.testing.assert_close(
        batch_hard_triplet_loss(scales * embeddings, labels), batch_hard_triplet_loss(embeddings, labels)
    )


@pytest.mark.parametrize("labels", [[0, 1, 2, 3], [5, 5, 5]])
def test_batch_without_valid_triplets_gives_zero_and_zero_gradient(labels):
    embeddings = make_embeddings(len(labels), 4)
    loss = batch_hard_triplet_loss(embeddings, torch.tensor(labels))
    (grad,) = torch.autograd.grad(loss, embeddings)
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_triplet_half_inputs(dtype):
    labels = torch.tensor(LABEL_SETS[1])
    embeddings = make_embeddings(12, 16, dtype=dtype)
    forward_rtol, grad_rtol = TOLERANCES[dtype]
    loss = batch_hard_triplet_loss(embeddings, labels, margin=0.5)
    (grad,) = torch.autograd.grad(loss, embeddings)
    embeddings64 = embeddings.detach().double().requires_grad_()
    expected = reference_triplet(embeddings64, labels, margin=0.5)
    (expected_grad,) = torch.autograd.grad(expected, embeddings64)
    # distances as 2 − 2⟨u, v⟩ in float32: absolute error ~ε32 on values of order 1
    torch.testing.assert_close(loss.double(), expected, rtol=forward_rtol, atol=1e-6)
    scale = float(expected_grad.abs().max())
    torch.testing.assert_close(grad.double(), expected_grad, rtol=grad_rtol, atol=grad_rtol * scale)


def test_triplet_rejects_bad_inputs():
    embeddings = make_embeddings(4, 3)
    labels = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"shape \[4\], got torch.int64 of shape \[3\]"):
        batch_hard_triplet_loss(embeddings, labels[:3])
    with pytest.raises(ValueError, match="integer"):
        batch_hard_triplet_loss(embeddings, labels.double())
    with pytest.raises(ValueError, match=r"\[B, D\] matrix, got \[4\]"):
        batch_hard_triplet_loss(embeddings[:, 0], labels)
    with pytest.raises(ValueError, match="margin must be"):
        batch_hard_triplet_loss(embeddings, labels, margin=-0.1)
    with pytest.raises(ValueError, match="mining must be one of"):
        batch_hard_triplet_loss(embeddings, labels, mining="random")


@pytest.mark.parametrize("shape", [(1, 1), (7, 41), (4, 8, 3, 5)])
def test_hidden_l2_matches_per_sample_squared_distance_and_analytic_gradient(shape):
    generator = torch.Generator().manual_seed(6)
    student = torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(shape, generator=generator, dtype=torch.float64)
    loss = hidden_l2_loss(student, teacher)
    batch_size = shape[0]
    per_sample = [
        sum(float(s - t) ** 2 for s, t in zip(student[b].detach().flatten(), teacher[b].flatten()))
        for b in range(batch_size)
    ]
    assert math.isclose(float(loss.detach()), sum(per_sample) / batch_size, rel_tol=1e-12)
    (grad,) = torch.autograd.grad(loss, student, grad_outputs=torch.tensor(0.6, dtype=torch.float64))
    # d/dH_S mean_b ‖H_S − H_T‖² = 2 (H_S − H_T) / B, times the incoming 0.6
    torch.testing.assert_close(grad, 0.6 * 2.0 * (student.detach() - teacher) / batch_size, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_hidden_l2_half_inputs(dtype):
    generator = torch.Generator().manual_seed(7)
    student = torch.randn(7, 41, generator=generator).to(dtype).requires_grad_()
    teacher = torch.randn(7, 41, generator=generator).to(dtype)
    forward_rtol, grad_rtol = TOLERANCES[dtype]
    loss = hidden_l2_loss(student, teacher)
    assert loss.dtype == torch.float32
    difference = student.detach().double() - teacher.double()
    torch.testing.assert_close(loss.double(), difference.square().sum() / 7, rtol=forward_rtol, atol=0)
    (grad,) = torch.autograd.grad(loss, student)
    expected_grad = 2.0 * difference / 7
    scale = float(expected_grad.abs().max())
    torch.testing.assert_close(grad.double(), expected_grad, rtol=grad_rtol, atol=grad_rtol * scale)


def test_hidden_l2_detaches_teacher_and_rejects_bad_shapes():
    student = torch.randn(3, 4, requires_grad=True)
    teacher = torch.randn(3, 4, requires_grad=True)
    hidden_l2_loss(student, teacher).backward()
    assert teacher.grad is None and student.grad is not None
    with pytest.raises(ValueError, match=r"\[3, 4\] and \[3, 5\]"):
        hidden_l2_loss(student, torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"\[B, \.\.\.\]"):
        hidden_l2_loss(torch.zeros(3), torch.zeros(3))
