"""Grouped KD (GKD, AAAI 2023) against an independent float64 reference written from the paper.

The reference below ranks every sample with a full Python sort, evaluates GKD Eq. 3 literally
(argmin over all k of |Σ_{i≤k} p̃_(i) − τ|, smallest k on ties) and computes the KL terms from
explicitly renormalised distributions (GKD Eq. 5–6, 10). It shares no code with the module.
"""
import math
import os
import socket
import subprocess
import sys

# The Triton path runs in the CPU interpreter; it must be switched on before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from facekd.kernels.checks import Tolerance  # noqa: E402
from facekd.kernels.grouped_kd import (  # noqa: E402
    TOLERANCES,
    _Plan,
    _primary_threshold,
    _row_stats,
    _Shard,
    cosine_logits,
    grouped_kd_loss,
    grouped_kd_loss_from_embeddings,
    grouped_kd_loss_sharded,
    grouped_kd_terms,
    reference_primary_mask,
)

# ---------------------------------------------------------------------------------------------
# Independent float64 reference
# ---------------------------------------------------------------------------------------------


def paper_ranking(student_row, label=None):
    """Class indices by descending student logit, lower index first on ties; label forced first."""
    values = student_row.tolist()
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    if label is not None:
        order.remove(label)
        order.insert(0, label)
    return order


def paper_k(probabilities, order, tau):
    """GKD Eq. 3 evaluated literally over k = 1..C; τ = 1 means every class."""
    if tau >= 1.0:
        return len(order)
    best_k, best_gap, cumulative = None, math.inf, 0.0
    for position, cls in enumerate(order, start=1):
        cumulative += probabilities[cls]
        gap = abs(cumulative - tau)
        if gap < best_gap:
            best_k, best_gap = position, gap
    return best_k


def authors_batch_k(student, tau):
    """The loop of the authors' gkd_adaptive.py, C when it finds nothing."""
    summed = torch.softmax(student.double(), dim=1).sum(0)
    ranked = summed.sort(descending=True).values
    for idx in range(1, ranked.shape[0], 100):
        if ranked[:idx].sum() >= tau * student.shape[0]:
            return idx
    return ranked.shape[0]


def paper_groups(student, tau=0.93, temperature=1.0, selection="sample", k=None, labels=None):
    """Index lists of the primary group of each sample."""
    groups = []
    batch_k = authors_batch_k(student, tau) if selection == "batch" else None
    for b in range(student.shape[0]):
        order = paper_ranking(student[b], None if labels is None else int(labels[b]))
        if selection == "sample":
            probabilities = torch.softmax(student[b].double() / temperature, 0).tolist()
            size = paper_k(probabilities, order, tau)
        elif selection == "batch":
            size = batch_k
        else:
            size = min(k, len(order))
        groups.append(sorted(order[:size]))
    return groups


def kl(teacher_logits, student_logits):
    """KL(softmax(t) ‖ softmax(s)) over one group, from the renormalised distributions."""
    if teacher_logits.numel() == 0:
        return teacher_logits.new_zeros(())
    q = torch.softmax(teacher_logits, 0)
    return (q * (torch.log(q) - torch.log_softmax(student_logits, 0))).sum()


def binary_kl(teacher_mass, student_mass):
    total = teacher_mass.new_zeros(())
    for q, p in zip(teacher_mass, student_mass):
        if q > 0:
            total = total + q * (torch.log(q) - torch.log(p))
    return total


def paper_terms(student, teacher, groups, temperature=1.0):
    """Per-sample (primary, binary, secondary, teacher p_Φ) in float64, differentiable in student."""
    rows = []
    for b, group in enumerate(groups):
        s = student[b].double() / temperature
        t = teacher[b].detach().double() / temperature
        phi = torch.tensor(group, dtype=torch.long)
        psi = torch.tensor(sorted(set(range(s.shape[0])) - set(group)), dtype=torch.long)
        teacher_mass = torch.stack([torch.softmax(t, 0)[phi].sum(), torch.softmax(t, 0)[psi].sum()])
        student_mass = torch.stack([torch.softmax(s, 0)[phi].sum(), torch.softmax(s, 0)[psi].sum()])
        rows.append((
            kl(t[phi], s[phi]), binary_kl(teacher_mass, student_mass), kl(t[psi], s[psi]),
            teacher_mass[0],
        ))
    return [torch.stack(column) for column in zip(*rows)]


def paper_loss(student, teacher, groups, temperature=1.0, w_primary=8.0, w_binary=1.0,
               w_secondary=0.0, reduction="mean"):
    primary, binary, secondary, _ = paper_terms(student, teacher, groups, temperature)
    rows = (w_primary * primary + w_binary * binary + w_secondary * secondary) * temperature**2
    return {"mean": rows.mean(), "sum": rows.sum(), "none": rows}[reduction]


def masks_of(groups, num_classes):
    mask = torch.zeros(len(groups), num_classes, dtype=torch.bool)
    for b, group in enumerate(groups):
        mask[b, group] = True
    return mask


# ---------------------------------------------------------------------------------------------
# Inputs and comparison helpers
# ---------------------------------------------------------------------------------------------

# Forward value and student gradient against the float64 reference, by input dtype: the module's
# TOLERANCES (which the GPU suite reads too). Test-only: the plain-torch path on float64 inputs, held
# to float64 rounding. The module's table has no float64 row because the Triton path computes in fp32
# whatever the input; float64 gets fp32's row there.
TORCH_PATH_FLOAT64 = Tolerance(rtol=1e-9, atol=1e-10)


def tolerance(dtype, backend):
    if dtype == torch.float64:
        return TORCH_PATH_FLOAT64 if backend == "torch" else TOLERANCES[torch.float32]
    return TOLERANCES[dtype]


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Runs a test on the plain-torch reference and on the Triton kernels (interpreted on CPU)."""
    monkeypatch.setenv("FACEKD_KERNEL_BACKEND", request.param)
    return request.param


def composite_keys(student, labels=None):
    """The ranking of the Triton selection, rebuilt in torch: float bits in float order, then the
    lower class index first; a forced label above everything."""
    batch_size, num_classes = student.shape
    values = student.float()
    bits = torch.where(values == 0, 0.0, values).view(torch.int32).long()
    unsigned = torch.where(bits < 0, ~bits & 0xFFFFFFFF, bits + 2**31)
    if labels is not None:
        unsigned[torch.arange(batch_size), labels.long()] = 2**32 - 1
    return unsigned * num_classes + (num_classes - 1 - torch.arange(num_classes))


def primary_mask(student, backend, tau=0.93, temperature=1.0, selection="sample", k=None,
                 labels=None):
    """Φ as chosen by the backend under test: the reference's sort, or the Triton search."""
    options = dict(tau=tau, temperature=temperature, selection=selection, k=k,
                   force_target=labels is not None, labels=labels)
    if backend == "torch":
        return reference_primary_mask(student, **options)
    student = student.float().contiguous()
    plan = _Plan(tau=tau, temperature=temperature, selection=selection, k=k,
                 force_target=labels is not None, class_offsets=(0,),
                 num_classes=student.shape[1], all_reduce=None)
    shards = [_Shard(student, student, class_offset=0)]
    log_partition = _row_stats(shards, temperature, plan, with_teacher=False)[:, 1].float()
    forced = None if labels is None else labels.to(torch.int32)
    threshold = _primary_threshold(shards, log_partition, forced, plan)
    return composite_keys(student, labels) >= threshold[:, None]


def face_logits(batch, num_classes, seed, scale=64.0, spread=0.1, dtype=torch.float64):
    """Logits shaped like a normalised head's s·cos θ: a teacher and a correlated student."""
    generator = torch.Generator().manual_seed(seed)
    teacher_cos = (torch.randn(batch, num_classes, generator=generator, dtype=torch.float64) * spread)
    labels = torch.randint(num_classes, (batch,), generator=generator)
    teacher_cos[torch.arange(batch), labels] += 0.5
    student_cos = teacher_cos + 0.05 * torch.randn(batch, num_classes, generator=generator,
                                                   dtype=torch.float64)
    student = (scale * student_cos.clamp(-1, 1)).to(dtype)
    teacher = (scale * teacher_cos.clamp(-1, 1)).to(dtype)
    return student, teacher, labels


def check_against_paper(student, teacher, groups, *, backend, grad_rows=None, reduction="mean",
                        **options):
    """Forward and student gradient of grouped_kd_loss vs the paper reference, same inputs."""
    tol = tolerance(student.dtype, backend)
    weights = {key: options.pop(key) for key in ("w_primary", "w_binary", "w_secondary") if key in options}
    temperature = options.get("temperature", 1.0)
    student = student.clone().requires_grad_(True)
    loss = grouped_kd_loss(student, teacher, reduction=reduction, **weights, **options)
    reference_student = student.detach().double().requires_grad_(True)
    reference = paper_loss(reference_student, teacher.double(), groups, temperature=temperature,
                           reduction=reduction, **weights)
    assert loss.dtype == student.dtype
    tol.assert_close(loss.double(), reference, name="loss")
    upstream = torch.ones_like(reference) if grad_rows is None else grad_rows
    (gradient,) = torch.autograd.grad(loss, student, upstream.to(loss.dtype))
    (reference_gradient,) = torch.autograd.grad(reference, reference_student, upstream)
    assert torch.isfinite(gradient).all()
    tol.assert_close(gradient.double(), reference_gradient, name="student gradient")


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

SHAPES = [(4, 37), (3, 129), (2, 401)]
OPTION_SETS = [
    {},  # the paper: τ = 0.93, T = 1, λ1 = 8, λ2 = 1
    {"tau": 0.5, "temperature": 4.0, "w_secondary": 0.5},
    {"tau": 0.99, "temperature": 2.0, "w_primary": 1.0, "w_binary": 3.0, "w_secondary": 2.0},
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("options", OPTION_SETS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_paper_reference(shape, options, dtype, backend):
    student, teacher, _ = face_logits(*shape, seed=shape[1], dtype=dtype)
    groups = paper_groups(student, tau=options.get("tau", 0.93),
                          temperature=options.get("temperature", 1.0))
    check_against_paper(student, teacher, groups, backend=backend, **dict(options))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(dtype, backend):
    student, teacher, _ = face_logits(4, 129, seed=7, dtype=dtype)
    # the reference sees the same rounded logits, upcast exactly
    groups = paper_groups(student.double(), temperature=2.0)
    check_against_paper(student, teacher, groups, backend=backend, temperature=2.0)


def test_primary_group_is_the_paper_rule(backend):
    student, _, _ = face_logits(6, 129, seed=3, spread=0.05)
    for options in ({}, {"tau": 0.3, "temperature": 3.0}, {"tau": 0.999}):
        mask = primary_mask(student, backend, **options)
        expected = masks_of(paper_groups(student, **options), student.shape[1])
        assert torch.equal(mask, expected), options


def test_one_dominant_class_gives_k_1(backend):
    student, teacher, _ = face_logits(3, 37, seed=1)
    student[:, 5] = 64.0  # p̃ of class 5 ≈ 1 > τ
    assert torch.equal(primary_mask(student, backend), masks_of([[5]] * 3, 37))
    # a one-class group carries no Primary-KD: p̂ = 1 for both networks
    terms = grouped_kd_terms(student, teacher)
    torch.testing.assert_close(terms.primary, torch.zeros(3, dtype=torch.float64))
    check_against_paper(student, teacher, [[5]] * 3, backend=backend)


def test_tau_one_is_classic_kd(backend):
    student, teacher, _ = face_logits(3, 37, seed=2)
    terms = grouped_kd_terms(student, teacher, tau=1.0, temperature=2.0)
    assert terms.primary_mask.all()
    assert (terms.binary == 0).all() and (terms.secondary == 0).all()
    classic = torch.nn.functional.kl_div(
        torch.log_softmax(student / 2.0, 1), torch.log_softmax(teacher / 2.0, 1),
        log_target=True, reduction="none",
    ).sum(1)
    torch.testing.assert_close(terms.primary, classic)
    check_against_paper(student, teacher, [list(range(37))] * 3, backend=backend, tau=1.0,
                        temperature=2.0)


def test_flat_prediction_selects_every_class(backend):
    # five equal probabilities: cumulative 0.2, …, 1.0, and |1.0 − 0.93| is the smallest gap
    student = torch.zeros(2, 5, dtype=torch.float64)
    teacher = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert primary_mask(student, backend).all()
    assert (grouped_kd_terms(student, teacher).secondary == 0).all()
    check_against_paper(student, teacher, [list(range(5))] * 2, backend=backend, w_secondary=1.0)


@pytest.mark.parametrize("tau, expected", [(0.5, [0, 1]), (0.625, [0, 1]), (0.626, [0, 1, 2])])
def test_tau_reached_exactly_and_ties(tau, expected, backend):
    # four equal probabilities 0.25 (exact in binary): τ = 0.5 is reached exactly at k = 2;
    # τ = 0.625 lies halfway between k = 2 and k = 3 and the smaller k wins; the equal
    # probabilities are taken lower class index first.
    student = torch.zeros(3, 4, dtype=torch.float64)
    teacher = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(primary_mask(student, backend, tau=tau), masks_of([expected] * 3, 4))
    check_against_paper(student, teacher, [expected] * 3, backend=backend, tau=tau,
                        w_secondary=0.25)


def test_ties_across_the_group_boundary(backend):
    # [4, 2, 2, 2, 2, 0, …]: the cut falls inside the run of equal logits
    student = torch.zeros(2, 11, dtype=torch.float64)
    student[:, 0] = 4.0
    student[0, [3, 5, 7, 9]] = 2.0
    student[1, [1, 2, 8, 10]] = 2.0
    student[1, 4] = -0.0  # equal to +0.0: ranks by index among the zeros
    teacher = torch.randn(2, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    groups = paper_groups(student, tau=0.75)
    assert groups == [[0, 3, 5], [0, 1, 2]]
    assert torch.equal(primary_mask(student, backend, tau=0.75), masks_of(groups, 11))
    # and a cut inside the run of zeros
    deep = paper_groups(student, tau=0.955)
    assert deep == [[0, 1, 2, 3, 5, 7, 9], [0, 1, 2, 3, 4, 8, 10]]
    assert torch.equal(primary_mask(student, backend, tau=0.955), masks_of(deep, 11))
    check_against_paper(student, teacher, groups, backend=backend, tau=0.75, w_secondary=1.0)


def test_single_class(backend):
    student = torch.randn(3, 1, dtype=torch.float64)
    teacher = torch.randn(3, 1, dtype=torch.float64)
    student.requires_grad_(True)
    loss = grouped_kd_loss(student, teacher, w_secondary=1.0)
    (gradient,) = torch.autograd.grad(loss, student)
    assert loss.item() == 0.0
    assert torch.equal(gradient, torch.zeros_like(gradient))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_incoming_gradient(reduction, backend):
    student, teacher, _ = face_logits(5, 129, seed=4)
    groups = paper_groups(student, temperature=4.0)
    grad_rows = None
    if reduction == "none":
        grad_rows = torch.linspace(-2.0, 3.0, 5, dtype=torch.float64)
    check_against_paper(student, teacher, groups, backend=backend, temperature=4.0,
                        reduction=reduction, grad_rows=grad_rows)


@pytest.mark.parametrize("options", [{}, {"tau": 0.5, "temperature": 4.0},
                                     {"selection": "fixed", "k": 7}])
def test_eq9_identity_gives_classic_kd(options, backend):
    # GKD Eq. 9: p_Φ^T·Primary + Binary + p_Ψ^T·Secondary = KL(p^T ‖ p^S), forward and gradient
    student, teacher, _ = face_logits(4, 129, seed=5)
    temperature = options.get("temperature", 1.0)
    teacher_primary = grouped_kd_terms(student, teacher, **options).teacher_primary_mass
    student = student.clone().requires_grad_(True)
    loss = grouped_kd_loss(student, teacher, w_primary=teacher_primary, w_binary=1.0,
                           w_secondary=1.0 - teacher_primary, **options)
    classic = torch.nn.functional.kl_div(
        torch.log_softmax(student / temperature, 1), torch.log_softmax(teacher / temperature, 1),
        log_target=True, reduction="batchmean",
    ) * temperature**2
    # an identity, so the float64 torch path holds it to rounding
    tol = Tolerance(rtol=1e-10, atol=1e-12) if backend == "torch" else TOLERANCES[torch.float32]
    tol.assert_close(loss, classic, name="loss")
    gradient, classic_gradient = (torch.autograd.grad(x, student)[0] for x in (loss, classic))
    tol.assert_close(gradient, classic_gradient, name="student gradient")


def test_batch_selection_follows_authors_code(backend):
    # a flat-ish prediction over 401 classes needs a few hundred classes to reach τ
    student, teacher, _ = face_logits(3, 401, seed=6, scale=16.0)
    batch_k = authors_batch_k(student, 0.93)
    assert 1 < batch_k < 401
    groups = paper_groups(student, selection="batch")
    assert all(len(g) == batch_k for g in groups)
    assert torch.equal(primary_mask(student, backend, selection="batch"), masks_of(groups, 401))
    check_against_paper(student, teacher, groups, backend=backend, selection="batch",
                        temperature=4.0)


def test_batch_selection_falls_back_to_every_class(backend):
    student, _, _ = face_logits(2, 150, seed=6, scale=0.5)  # nearly uniform
    assert authors_batch_k(student, 0.93) == 150
    assert primary_mask(student, backend, selection="batch").all()


@pytest.mark.parametrize("k", [5, 1000])
def test_fixed_selection(k, backend):
    student, teacher, _ = face_logits(3, 37, seed=8)
    groups = paper_groups(student, selection="fixed", k=k)
    assert all(len(g) == min(k, 37) for g in groups)
    assert torch.equal(primary_mask(student, backend, selection="fixed", k=k), masks_of(groups, 37))
    check_against_paper(student, teacher, groups, backend=backend, selection="fixed", k=k,
                        w_secondary=1.0)


@pytest.mark.parametrize("selection, k", [("sample", None), ("fixed", 4), ("batch", None)])
def test_force_target(selection, k, backend):
    student, teacher, _ = face_logits(4, 129, seed=9)
    labels = torch.tensor([0, 17, 64, 128])  # mostly not the student's top class
    groups = paper_groups(student, selection=selection, k=k, labels=labels)
    assert all(int(y) in g for y, g in zip(labels, groups))
    mask = primary_mask(student, backend, selection=selection, k=k, labels=labels)
    assert torch.equal(mask, masks_of(groups, 129))
    check_against_paper(student, teacher, groups, backend=backend, selection=selection, k=k,
                        force_target=True, labels=labels)


def test_teacher_gets_no_gradient(backend):
    student, teacher, _ = face_logits(2, 37, seed=10)
    teacher.requires_grad_(True)
    student.requires_grad_(True)
    grouped_kd_loss(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None


SHARD_OPTIONS = [
    {},
    {"tau": 0.5, "temperature": 4.0, "w_secondary": 1.0},
    {"selection": "batch"},
    {"selection": "fixed", "k": 50},
]


@pytest.mark.parametrize("options", SHARD_OPTIONS)
def test_shards_in_one_process_equal_unsharded(options, backend):
    # 129 classes held as three shards, listed out of class order
    student, teacher, labels = face_logits(4, 129, seed=12, scale=16.0, dtype=torch.float32)
    bounds = [(50, 129), (0, 40), (40, 50)]
    student = student.requires_grad_(True)
    loss = grouped_kd_loss(student, teacher, **options)
    (gradient,) = torch.autograd.grad(loss, student)
    student_shards = [student.detach()[:, a:b].clone().requires_grad_(True) for a, b in bounds]
    sharded = grouped_kd_loss_sharded(
        student_shards, [teacher[:, a:b] for a, b in bounds],
        class_offsets=[a for a, _ in bounds], num_classes=129, **options,
    )
    shard_gradients = torch.autograd.grad(sharded, student_shards)
    # the same selection and sums in another order: equal to fp32 rounding of |logit| ≈ 16
    torch.testing.assert_close(sharded, loss, atol=1e-5, rtol=1e-5)
    for (a, b), shard_gradient in zip(bounds, shard_gradients):
        torch.testing.assert_close(shard_gradient, gradient[:, a:b], atol=1e-7, rtol=1e-5)


def test_forced_target_in_another_shard(backend):
    student, teacher, _ = face_logits(4, 129, seed=13, dtype=torch.float32)
    labels = torch.tensor([63, 64, 0, 128])  # either side of the shard border, the first and the last class
    bounds = [(0, 64), (64, 129)]
    sharded = grouped_kd_loss_sharded(
        [student[:, a:b] for a, b in bounds], [teacher[:, a:b] for a, b in bounds],
        class_offsets=[0, 64], num_classes=129, force_target=True, labels=labels,
        selection="fixed", k=3,
    )
    groups = paper_groups(student, selection="fixed", k=3, labels=labels)
    TOLERANCES[torch.float32].assert_close(sharded.double(), paper_loss(student.double(), teacher.double(),
                                                                        groups))


def _rank_process(rank, world, port, bounds, inputs, options, results):
    """One rank of a gloo group: its class shard only, combined through all_reduce. ``inputs``
    are (student, teacher) logits, or (student embeddings, student centres, teacher
    embeddings, teacher centres)."""
    import torch.distributed as dist

    os.environ["FACEKD_KERNEL_BACKEND"] = "triton"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    operations = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}

    def all_reduce(tensor, op):
        dist.all_reduce(tensor, op=operations[op])

    try:
        a, b = bounds[rank]
        if len(inputs) == 2:
            student, teacher = inputs
            shard = student[:, a:b].clone().requires_grad_(True)
            loss = grouped_kd_loss_sharded([shard], [teacher[:, a:b]], class_offsets=[a],
                                           num_classes=student.shape[1], all_reduce=all_reduce,
                                           **options)
            loss.backward()
            results.put((rank, loss.item(), [shard.grad.numpy()]))
        else:
            student, student_centres, teacher, teacher_centres = inputs
            student = student.clone().requires_grad_(True)
            centres = student_centres[a:b].clone().requires_grad_(True)
            loss = grouped_kd_loss_from_embeddings(
                student, centres, teacher, teacher_centres[a:b], s=16.0, class_offset=a,
                num_classes=student_centres.shape[0], all_reduce=all_reduce, **options,
            )
            loss.backward()
            results.put((rank, loss.item(), [student.grad.numpy(), centres.grad.numpy()]))
    finally:
        dist.destroy_process_group()


def run_ranks(bounds, inputs, options):
    """Runs one gloo process per shard; returns {rank: (loss, gradients)}. Results travel as
    numbers and numpy arrays: a tensor would be shared through a file descriptor that dies
    with its process."""
    multiprocessing = torch.multiprocessing.get_context("spawn")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = multiprocessing.Queue()
    ranks = [multiprocessing.Process(target=_rank_process, args=(
        rank, len(bounds), port, bounds, inputs, options, results)) for rank in range(len(bounds))]
    for process in ranks:
        process.start()
    outputs = {rank: (torch.tensor(loss), [torch.from_numpy(grad) for grad in grads])
               for rank, loss, grads in (results.get(timeout=300) for _ in ranks)}
    for process in ranks:
        process.join(timeout=60)
        assert process.exitcode == 0
    return outputs


RANK_OPTIONS = [{}, {"selection": "batch", "temperature": 4.0}]


@pytest.mark.slow
@pytest.mark.parametrize("options", RANK_OPTIONS)
def test_ranks_through_all_reduce_equal_unsharded(options):
    student, teacher, _ = face_logits(3, 101, seed=14, scale=16.0, dtype=torch.float32)
    bounds = [(0, 30), (30, 71), (71, 101)]
    outputs = run_ranks(bounds, (student, teacher), options)
    groups = paper_groups(student, **options)
    reference_student = student.double().requires_grad_(True)
    reference = paper_loss(reference_student, teacher.double(), groups,
                           temperature=options.get("temperature", 1.0))
    (reference_gradient,) = torch.autograd.grad(reference, reference_student)
    for rank, (a, b) in enumerate(bounds):
        loss, (grad,) = outputs[rank]
        TOLERANCES[torch.float32].assert_close(loss.double(), reference, name="loss")
        TOLERANCES[torch.float32].assert_close(grad.double(), reference_gradient[:, a:b], name="gradient")


@pytest.mark.slow
@pytest.mark.parametrize("options", RANK_OPTIONS)
def test_embedding_ranks_through_all_reduce(options):
    # class centres split over three ranks; the embedding gradients of the ranks add up
    student, student_centres, teacher, teacher_centres = face_embeddings(17, 67, 16, 24, seed=15)
    inputs = tuple(tensor.float() for tensor in (student, student_centres, teacher, teacher_centres))
    bounds = [(0, 20), (20, 50), (50, 67)]
    outputs = run_ranks(bounds, inputs, options)
    reference, reference_grads = embedding_reference(*inputs, options)
    for rank, (a, b) in enumerate(bounds):
        loss, (_, centre_grad) = outputs[rank]
        TOLERANCES[torch.float32].assert_close(loss.double(), reference, name="loss")
        TOLERANCES[torch.float32].assert_close(centre_grad.double(), reference_grads[1][a:b], name="centres")
    embedding_grad = sum(outputs[rank][1][0].double() for rank in outputs)
    TOLERANCES[torch.float32].assert_close(embedding_grad, reference_grads[0], name="embeddings")


def face_embeddings(batch, num_classes, student_dim, teacher_dim, seed, dtype=torch.float64):
    """Student and teacher embeddings and class centres, the student's near its label's centre."""
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    labels = torch.randint(num_classes, (batch,), generator=generator)
    student_centres, teacher_centres = draw(num_classes, student_dim), draw(num_classes, teacher_dim)
    student = student_centres[labels] + 1.5 * draw(batch, student_dim)
    teacher = teacher_centres[labels] + draw(batch, teacher_dim)
    return tuple(x.to(dtype) for x in (student, student_centres, teacher, teacher_centres))


def embedding_reference(student, student_centres, teacher, teacher_centres, options, s=16.0):
    """Loss and (embedding, centre) gradients in float64 through the paper reference."""
    student = student.double().requires_grad_(True)
    student_centres = student_centres.double().requires_grad_(True)
    student_logits = cosine_logits(student, student_centres, s=s)
    teacher_logits = cosine_logits(teacher.double(), teacher_centres.double(), s=s)
    selection = {key: options[key] for key in ("tau", "temperature", "selection", "k", "labels")
                 if key in options}
    groups = paper_groups(student_logits.detach(), **selection)
    weights = {key: options[key] for key in ("w_primary", "w_binary", "w_secondary")
               if key in options}
    loss = paper_loss(student_logits, teacher_logits, groups,
                      temperature=options.get("temperature", 1.0), **weights)
    return loss, torch.autograd.grad(loss, (student, student_centres))


EMBEDDING_OPTIONS = [
    {},
    {"tau": 0.5, "temperature": 4.0, "w_secondary": 0.5},
    {"selection": "batch"},
    {"selection": "fixed", "k": 3, "force_target": True, "labels": torch.tensor([0, 9, 36, 5, 1])},
    {"tau": 1.0, "w_secondary": 1.0},  # every class primary: an empty secondary group
]


@pytest.mark.parametrize("options", EMBEDDING_OPTIONS)
@pytest.mark.parametrize("shape", [(5, 37, 24, 40), (18, 67, 16, 32)])
def test_from_embeddings_matches_reference(shape, options, backend):
    batch = shape[0]
    options = dict(options)
    if "labels" in options:
        options["labels"] = options["labels"].repeat(4)[:batch] % shape[1]
    student, student_centres, teacher, teacher_centres = face_embeddings(*shape, seed=shape[1])
    reference, reference_grads = embedding_reference(student, student_centres, teacher,
                                                     teacher_centres, options)
    inputs = [student.clone().requires_grad_(True), student_centres.clone().requires_grad_(True)]
    loss = grouped_kd_loss_from_embeddings(inputs[0], inputs[1], teacher, teacher_centres, s=16.0,
                                           **options)
    grads = torch.autograd.grad(loss, inputs)
    tol = tolerance(torch.float64, backend)
    tol.assert_close(loss, reference, name="loss")
    for name, grad, reference_grad in zip(("embeddings", "centres"), grads, reference_grads):
        assert grad.dtype == torch.float64
        tol.assert_close(grad, reference_grad, name=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_from_embeddings_low_precision(dtype, backend):
    embeddings = face_embeddings(18, 37, 32, 16, seed=17, dtype=dtype)
    student, student_centres, teacher, teacher_centres = embeddings
    # the reference sees the same rounded numbers, upcast exactly
    reference, reference_grads = embedding_reference(*embeddings, {"temperature": 2.0})
    inputs = [student.clone().requires_grad_(True), student_centres.clone().requires_grad_(True)]
    loss = grouped_kd_loss_from_embeddings(inputs[0], inputs[1], teacher, teacher_centres, s=16.0,
                                           temperature=2.0)
    loss.backward()
    assert loss.dtype == dtype
    TOLERANCES[dtype].assert_close(loss.double(), reference, name="loss")
    for name, tensor, reference_grad in zip(("embeddings", "centres"), inputs, reference_grads):
        assert tensor.grad.dtype == dtype
        TOLERANCES[dtype].assert_close(tensor.grad.double(), reference_grad, name=name)


def test_from_embeddings_ignores_an_enclosing_autocast(backend):
    """Inside a bf16 autocast (the trainer's), s·cos θ and the softmaxes stay fp32: the loss and the
    gradients are those computed outside it. The forward runs under autocast, backward outside."""
    embeddings = face_embeddings(18, 67, 16, 32, seed=21, dtype=torch.float32)

    def loss_and_gradients(autocast):
        student, student_centres = (x.clone().requires_grad_(True) for x in embeddings[:2])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = grouped_kd_loss_from_embeddings(student, student_centres, *embeddings[2:], s=64.0,
                                                   temperature=2.0, w_secondary=1.0)
        return (loss, *torch.autograd.grad(loss, (student, student_centres)))

    inside, outside = loss_and_gradients(True), loss_and_gradients(False)
    for name, got, expected in zip(("loss", "embeddings", "centres"), inside, outside):
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got, expected, rtol=0.0, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_from_embeddings_teacher_gets_no_gradient(backend):
    student, student_centres, teacher, teacher_centres = (
        x.requires_grad_(True) for x in face_embeddings(3, 37, 16, 16, seed=18))
    grouped_kd_loss_from_embeddings(student, student_centres, teacher, teacher_centres).backward()
    assert teacher.grad is None and teacher_centres.grad is None
    assert student.grad is not None and student_centres.grad is not None


@pytest.mark.parametrize("change, message", [
    ({"student_centres": torch.zeros(37, 8)}, "student embeddings and centres must share D"),
    ({"teacher_centres": torch.zeros(36, 16, dtype=torch.float64)}, "same classes"),
    ({"teacher_embeddings": torch.zeros(4, 16, dtype=torch.float64)}, "must hold the student's"),
    ({"s": 0.0}, "s must be > 0"),
    ({"num_classes": 50}, "must hold all 50 classes"),
    ({"class_offset": 20, "num_classes": 50, "all_reduce": print}, r"do not fit in \[0, 50\)"),
])
def test_from_embeddings_bad_arguments(change, message):
    student, student_centres, teacher, teacher_centres = face_embeddings(3, 37, 16, 16, seed=19)
    arguments = dict(student_embeddings=student, student_centres=student_centres,
                     teacher_embeddings=teacher, teacher_centres=teacher_centres)
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        grouped_kd_loss_from_embeddings(**arguments)


@pytest.mark.parametrize("offsets, num_classes, message", [
    ([0, 15], 37, "must be disjoint class ranges"),
    ([0, 21], 37, "must be disjoint class ranges"),
    ([0, 21], 40, "must cover"),
    ([0], 37, "one class offset per shard"),
])
def test_bad_shards(offsets, num_classes, message):
    student, teacher, _ = face_logits(2, 37, seed=16)
    with pytest.raises(ValueError, match=message):
        grouped_kd_loss_sharded([student[:, :20], student[:, 20:]],
                                [teacher[:, :20], teacher[:, 20:]],
                                class_offsets=offsets, num_classes=num_classes)


@pytest.mark.parametrize("kwargs, message", [
    ({"tau": 0.0}, "tau must be in"),
    ({"tau": 1.5}, "tau must be in"),
    ({"temperature": 0.0}, "temperature must be"),
    ({"selection": "topk"}, "selection must be one of"),
    ({"selection": "fixed"}, "needs an integer k"),
    ({"k": 3}, "only used with selection='fixed'"),
    ({"force_target": True}, "needs labels"),
    ({"force_target": True, "labels": torch.tensor([0, 37])}, r"labels must be in \[0, 37\)"),
    ({"labels": torch.tensor([0, 1])}, "only used with force_target"),
    ({"reduction": "avg"}, "reduction must be one of"),
    ({"w_primary": torch.ones(3)}, "w_primary must be a float or a tensor"),
])
def test_bad_arguments(kwargs, message):
    student, teacher, _ = face_logits(2, 37, seed=11)
    with pytest.raises(ValueError, match=message):
        grouped_kd_loss(student, teacher, **kwargs)


def test_bad_shapes():
    with pytest.raises(ValueError, match="must be \\[B, C\\]"):
        grouped_kd_loss(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="teacher_logits must have the student's shape"):
        grouped_kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_empty_batch_or_classes_are_refused(backend):
    """An empty batch would give a NaN mean (torch) or an empty launch grid (Triton): refused by name."""
    for shape in ((0, 37), (3, 0)):
        with pytest.raises(ValueError, match=rf"need at least one sample and one class, got student_logits "
                                             rf"\({shape[0]}, {shape[1]}\)"):
            grouped_kd_loss(torch.zeros(shape), torch.zeros(shape))
    student, student_centres, teacher, teacher_centres = face_embeddings(3, 37, 16, 24, seed=20)
    with pytest.raises(ValueError, match=r"need at least one sample, one feature and one class, got "
                                         r"student_embeddings \(0, 16\)"):
        grouped_kd_loss_from_embeddings(student[:0], student_centres, teacher[:0], teacher_centres)


# ---------------------------------------------------------------------------------------------
# The compiled path: the interpreter forgives what the compiler does not
# ---------------------------------------------------------------------------------------------

COMPILE_FOR_HOPPER = r"""
import torch, triton
from triton.backends.compiler import GPUTarget
import facekd.kernels.grouped_kd as gkd

POINTER_TYPES = {"labels_ptr": "*i32", "pivots_ptr": "*i64", "threshold_ptr": "*i64",
                 "active_ptr": "*i8", "count_ptr": "*i32", "size_ptr": "*i32"}
INPUTS = ("student_ptr", "student_centres_ptr", "teacher_ptr", "teacher_centres_ptr", "grad_ptr",
          "values_ptr", "values_centres_ptr")

def signature(fn, dtype, constexprs):
    types = {}
    for name in fn.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in INPUTS:
            types[name] = "*" + dtype
        elif name.endswith("_ptr"):
            types[name] = POINTER_TYPES.get(name, "*fp32")
        elif name in ("logit_scale", "inv_temperature", "mass_scale"):
            types[name] = "fp32"
        else:
            types[name] = "i32"
    return types

compiled_count = 0
for torch_dtype, dtype in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
    embeddings = torch.empty(1024, 512, device="meta", dtype=torch_dtype)
    logits = torch.empty(1024, 85742, device="meta", dtype=torch_dtype)
    shards = {
        "logits": gkd._Shard(logits, logits, 0),
        "embeddings": gkd._Shard(embeddings, embeddings, 0, embeddings[:100], embeddings[:100]),
    }
    for layout, shard in shards.items():
        blocks = shard.blocks()
        from_embeddings = dict(FROM_EMBEDDINGS=shard.from_embeddings)
        no_teacher = {k: v for k, v in blocks.items() if k != "BLOCK_DT"}
        kernels = [
            (gkd._row_stats_kernel, dict(HAS_TEACHER=True, **from_embeddings, **blocks)),
            (gkd._class_mass_kernel, dict(**from_embeddings, **no_teacher)),
            (gkd._pivot_kernel, dict(VALUES_ARE_MASS=False, FORCE_TARGET=True, NUM_PIVOTS=gkd.NUM_PIVOTS,
                                     **from_embeddings, **no_teacher)),
            (gkd._group_stats_kernel, dict(FORCE_TARGET=True, **from_embeddings, **blocks)),
        ]
        if layout == "logits":
            kernels += [
                (gkd._pivot_kernel, dict(VALUES_ARE_MASS=True, FORCE_TARGET=False, NUM_PIVOTS=gkd.NUM_PIVOTS,
                                         FROM_EMBEDDINGS=False, **dict(no_teacher, BLOCK_B=1))),
                (gkd._logits_backward_kernel, dict(FORCE_TARGET=True, BLOCK_B=blocks["BLOCK_B"],
                                                   BLOCK_C=blocks["BLOCK_C"])),
            ]
        else:
            kernels += [(gkd._embedding_grad_kernel, dict(FORCE_TARGET=True, **blocks)),
                        (gkd._centre_grad_kernel, dict(FORCE_TARGET=True, **blocks))]
        for fn, constexprs in kernels:
            types = signature(fn, dtype, constexprs)
            aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                       if types[name].startswith("*")}
            source = triton.compiler.ASTSource(fn=fn, signature=types, constexprs=constexprs,
                                               attrs=aligned)
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": 4})
            print(fn.__name__, layout, dtype, "shared memory", compiled.metadata.shared)
"""


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    """Every kernel compiles for sm_90 with the launcher's CUDA block sizes (no GPU needed)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("shared memory") == 24
