"""Grouped KD with the classes split over ranks (threads, facekd.kernels.checks.run_ranks), against the
float64 reference on the whole logits: the loss on every rank, each rank's shard gradients, and the
embedding gradient summed over ranks."""
import os

# The Triton path runs in the CPU interpreter; it must be switched on before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from facekd.kernels.checks import SimulatedGroup, Tolerance, class_bounds, run_ranks  # noqa: E402
from facekd.kernels.grouped_kd import (  # noqa: E402
    TOLERANCES,
    cosine_logits,
    grouped_kd_loss_from_embeddings,
    grouped_kd_loss_sharded,
    reference_grouped_kd_loss,
    reference_primary_mask,
)
from facekd.kernels.selection import sharded_primary_mask  # noqa: E402

FLOAT64 = Tolerance(rtol=1e-9, atol=1e-10)

SELECTIONS = [
    {},  # the paper: τ = 0.93, T = 1
    {"tau": 0.5, "temperature": 4.0, "w_secondary": 0.5},
    {"tau": 1.0, "w_secondary": 1.0},  # every class primary: an empty secondary group
    {"selection": "batch"},
    {"selection": "batch", "tau": 0.3, "temperature": 2.0},
    {"selection": "fixed", "k": 3},
    {"selection": "fixed", "k": 1000},  # k above C: every class
    {"selection": "fixed", "k": 4, "force_target": True},
    {"tau": 0.8, "force_target": True, "w_primary": 1.0, "w_binary": 3.0, "w_secondary": 2.0},
]


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("FACEKD_KERNEL_BACKEND", "torch")


def face_logits(batch, num_classes, seed, scale=16.0):
    """s·cos θ-like float64 logits of a teacher and a correlated student, and labels."""
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(batch, num_classes, generator=generator, dtype=torch.float64) * 0.2
    labels = torch.randint(num_classes, (batch,), generator=generator)
    teacher[torch.arange(batch), labels] += 0.5
    student = teacher + 0.1 * torch.randn(batch, num_classes, generator=generator, dtype=torch.float64)
    return scale * student, scale * teacher, labels


def with_labels(options, labels):
    options = dict(options)
    if options.get("force_target"):
        options["labels"] = labels
    return options


def sharded_logits_loss(student, teacher, bounds, options, grad_rows=None):
    """Each rank's loss [B] and its shard's gradient, ranks as threads; and the all-reduce count of
    each rank before and after backward."""
    group = SimulatedGroup(len(bounds))

    def rank_body(rank, all_reduce):
        a, b = bounds[rank]
        shard = student[:, a:b].clone().requires_grad_(True)
        rows = grouped_kd_loss_sharded([shard], [teacher[:, a:b]], class_offsets=[a],
                                       num_classes=student.shape[1], all_reduce=all_reduce,
                                       reduction="none", **options)
        calls = group.calls[rank]
        rows.backward(grad_rows if grad_rows is not None else torch.ones_like(rows))
        return rows.detach(), shard.grad, (calls, group.calls[rank])

    return run_ranks(len(bounds), rank_body, group)


def reference(student, teacher, options, grad_rows=None):
    student = student.clone().requires_grad_(True)
    rows = reference_grouped_kd_loss(student, teacher, reduction="none", **options)
    rows.backward(grad_rows if grad_rows is not None else torch.ones_like(rows))
    return rows.detach(), student.grad


def check_logits_ranks(student, teacher, bounds, options, tolerance=FLOAT64):
    grad_rows = torch.linspace(-1.0, 2.0, student.shape[0], dtype=student.dtype)
    expected_rows, expected_grad = reference(student, teacher, options, grad_rows)
    for rank, (rows, grad, (calls_forward, calls_total)) in enumerate(
        sharded_logits_loss(student, teacher, bounds, options, grad_rows)
    ):
        a, b = bounds[rank]
        assert rows.dtype == student.dtype
        tolerance.assert_close(rows, expected_rows, name=f"rank {rank} loss")
        tolerance.assert_close(grad, expected_grad[:, a:b], name=f"rank {rank} gradient")
        assert calls_total == calls_forward, "backward must not communicate"


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("options", SELECTIONS)
def test_logits_ranks_equal_the_reference(options, world):
    # C = 37 divides by neither 2 nor 3; labels on the shard borders, the first and the last class
    student, teacher, _ = face_logits(6, 37, seed=world)
    bounds = class_bounds(37, world)
    labels = torch.tensor([bounds[0][1] - 1, bounds[0][1], 0, 36, bounds[-1][0], bounds[-1][0] - 1])
    check_logits_ranks(student, teacher, bounds, with_labels(options, labels))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("options", SELECTIONS)
def test_one_class_per_shard(options, world):
    student, teacher, labels = face_logits(4, world, seed=10 + world)
    check_logits_ranks(student, teacher, class_bounds(world, world), with_labels(options, labels))


def test_uneven_shards_out_of_order_with_several_local_shards():
    # rank 0 holds classes [30, 37) and [0, 5), rank 1 [5, 30): local shards listed out of class order
    student, teacher, labels = face_logits(5, 37, seed=3)
    layout = [[(30, 37), (0, 5)], [(5, 30)]]
    options = {"selection": "fixed", "k": 6, "force_target": True, "labels": labels}
    expected_rows, expected_grad = reference(student, teacher, options)

    def rank_body(rank, all_reduce):
        shards = [student[:, a:b].clone().requires_grad_(True) for a, b in layout[rank]]
        rows = grouped_kd_loss_sharded(shards, [teacher[:, a:b] for a, b in layout[rank]],
                                       class_offsets=[a for a, _ in layout[rank]], num_classes=37,
                                       all_reduce=all_reduce, reduction="none", **options)
        return rows, torch.autograd.grad(rows.sum(), shards)

    for rank, (rows, grads) in enumerate(run_ranks(2, rank_body)):
        FLOAT64.assert_close(rows.detach(), expected_rows, name="loss")
        for (a, b), grad in zip(layout[rank], grads):
            FLOAT64.assert_close(grad, expected_grad[:, a:b], name="gradient")


TIED = torch.tensor([
    [2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 0.0, 0.0],  # equal logits on both sides of every border
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # a flat row: p̃ = 1/8 each, exact in binary
    [-0.0, 0.0, -0.0, 1.0, 1.0, -3.0, 1.0, 0.0],  # −0.0 and +0.0 are the same logit
    [3.0, 3.0, 3.0, 3.0, -1.0, -1.0, -1.0, -1.0],
], dtype=torch.float64)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("options", [
    {"tau": 0.5},  # the flat row reaches τ exactly at k = 4
    {"tau": 0.5625},  # the flat row: |cum_4 − τ| = |cum_5 − τ| exactly, the smaller k wins
    {"tau": 0.25},
    {"tau": 0.93},
    {"selection": "batch", "tau": 0.5},
    {"selection": "fixed", "k": 2},
    {"selection": "fixed", "k": 5, "force_target": True, "labels": torch.tensor([7, 3, 1, 4])},
    {"tau": 0.5, "force_target": True, "labels": torch.tensor([7, 3, 1, 4])},
])
def test_ties_rank_the_lower_global_class_first(options, world):
    bounds = class_bounds(8, world)
    option_names = ("tau", "selection", "k", "force_target", "labels")
    selection = {"tau": 0.93, "temperature": 1.0, "selection": "sample", "k": None, "force_target": False,
                 "labels": None, **{name: options[name] for name in option_names if name in options}}
    expected = reference_primary_mask(TIED, **selection)
    if options == {"tau": 0.5625}:
        assert expected[1].tolist() == [True] * 4 + [False] * 4

    def rank_body(rank, all_reduce):
        a, b = bounds[rank]
        return sharded_primary_mask(TIED[:, a:b], torch.arange(a, b), num_classes=8,
                                    all_reduce=all_reduce, **selection)

    assert torch.equal(torch.cat(run_ranks(world, rank_body), dim=1), expected)
    check_logits_ranks(TIED, TIED.flip(1), bounds, options)


@pytest.mark.parametrize("options", [{}, {"selection": "batch"}, {"selection": "fixed", "k": 2}])
def test_all_mass_in_one_class(options):
    # p̃ is one-hot up to exp(−1000) = 0: the first class alone reaches τ; its group is all the mass
    student, teacher, _ = face_logits(3, 11, seed=5)
    student[:, 7] = 1000.0
    teacher[:, 2] = 1000.0
    check_logits_ranks(student, teacher, class_bounds(11, 3), options)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("options", [
    {},
    {"tau": 0.5, "temperature": 4.0, "w_secondary": 0.5},
    {"selection": "batch"},
    {"selection": "fixed", "k": 3, "force_target": True},
    {"tau": 1.0, "w_secondary": 1.0},
])
def test_embedding_ranks_equal_the_reference(options, world):
    # student D = 16, teacher D = 24; 29 classes split unevenly; embedding shares summed over ranks
    generator = torch.Generator().manual_seed(20 + world)
    batch, num_classes = 7, 29
    labels = torch.randint(num_classes, (batch,), generator=generator)
    student_centres = torch.randn(num_classes, 16, generator=generator, dtype=torch.float64)
    teacher_centres = torch.randn(num_classes, 24, generator=generator, dtype=torch.float64)
    student = student_centres[labels] + 1.5 * torch.randn(batch, 16, generator=generator, dtype=torch.float64)
    teacher = teacher_centres[labels] + torch.randn(batch, 24, generator=generator, dtype=torch.float64)
    options = with_labels(options, labels)
    bounds = class_bounds(num_classes, world)

    reference_student = student.clone().requires_grad_(True)
    reference_centres = student_centres.clone().requires_grad_(True)
    expected = reference_grouped_kd_loss(cosine_logits(reference_student, reference_centres, s=16.0),
                                         cosine_logits(teacher, teacher_centres, s=16.0), **options)
    expected_grads = torch.autograd.grad(expected, (reference_student, reference_centres))

    def rank_body(rank, all_reduce):
        a, b = bounds[rank]
        embeddings = student.clone().requires_grad_(True)
        centres = student_centres[a:b].clone().requires_grad_(True)
        loss = grouped_kd_loss_from_embeddings(embeddings, centres, teacher, teacher_centres[a:b], s=16.0,
                                               class_offset=a, num_classes=num_classes,
                                               all_reduce=all_reduce, **options)
        return (loss.detach(), *torch.autograd.grad(loss, (embeddings, centres)))

    results = run_ranks(world, rank_body)
    for rank, (loss, _, centre_grad) in enumerate(results):
        a, b = bounds[rank]
        FLOAT64.assert_close(loss, expected, name=f"rank {rank} loss")
        FLOAT64.assert_close(centre_grad, expected_grads[1][a:b], name=f"rank {rank} centres")
    FLOAT64.assert_close(sum(result[1] for result in results), expected_grads[0], name="embeddings")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_compute_in_fp32_under_autocast(dtype):
    student, teacher, _ = face_logits(4, 23, seed=6)
    bounds = class_bounds(23, 2)

    def rank_body(rank, all_reduce):
        a, b = bounds[rank]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return grouped_kd_loss_sharded([student[:, a:b].to(dtype)], [teacher[:, a:b].to(dtype)],
                                           class_offsets=[a], num_classes=23, all_reduce=all_reduce,
                                           reduction="none")

    # the logits' own rounding to ``dtype`` is the only input error: the reference on rounded logits
    expected, _ = reference(student.to(dtype).double(), teacher.to(dtype).double(), {})
    for rows in run_ranks(2, rank_body):
        assert rows.dtype == dtype
        TOLERANCES[dtype].assert_close(rows.double(), expected, name="loss")


@pytest.mark.parametrize("options", [{}, {"selection": "batch", "temperature": 4.0},
                                     {"selection": "fixed", "k": 3, "force_target": True}])
def test_triton_path_agrees_with_the_torch_path(options, monkeypatch):
    # fp32 inputs: the Triton kernels (interpreted) against the new torch path, both across 2 ranks
    student, teacher, labels = face_logits(3, 19, seed=7)
    student, teacher = student.float(), teacher.float()
    options = with_labels(options, labels)
    bounds = class_bounds(19, 2)
    outputs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("FACEKD_KERNEL_BACKEND", backend)
        outputs[backend] = sharded_logits_loss(student, teacher, bounds, options)
    for (torch_rows, torch_grad, _), (triton_rows, triton_grad, _) in zip(outputs["torch"], outputs["triton"]):
        TOLERANCES[torch.float32].assert_close(triton_rows.double(), torch_rows.double(), name="loss")
        TOLERANCES[torch.float32].assert_close(triton_grad.double(), torch_grad.double(), name="gradient")
