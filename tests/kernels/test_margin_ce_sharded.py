"""Margin-softmax CE with the class centres split over ranks (threads, facekd.kernels.checks.run_ranks),
against margin_softmax_ce on the whole weight: the loss on every rank, each rank's weight gradient, and
the embedding gradient summed over ranks; on the torch reference and on the Triton path (interpreted)."""
import contextlib
import os

# The Triton path runs in the CPU interpreter; it must be switched on before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import facekd.kernels.margin_ce as margin_ce  # noqa: E402
from facekd.kernels.checks import SimulatedGroup, Tolerance, class_bounds, kernel_backend, run_ranks  # noqa: E402
from facekd.kernels.margin_ce import TOLERANCES, margin_softmax_ce, margin_softmax_ce_sharded  # noqa: E402

FLOAT64 = Tolerance(rtol=1e-10, atol_of_max=1e-12)
MARGINS = {
    "arcface": dict(s=64.0, m1=1.0, m2=0.5, m3=0.0),
    "cosface": dict(s=64.0, m1=1.0, m2=0.0, m3=0.35),
    "combined": dict(s=48.0, m1=1.2, m2=0.3, m3=0.2),
}


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("FACEKD_KERNEL_BACKEND", request.param)
    return request.param


def tolerance(dtype, backend):
    """float64 runs only on the torch path, to float64 rounding; the Triton path computes in fp32."""
    return FLOAT64 if dtype == torch.float64 else TOLERANCES[dtype]


def problem(batch, num_classes, dim, seed, dtype=torch.float64):
    """Embeddings near their label's centre, the centres, labels and an incoming gradient not 1."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (batch,), generator=generator)
    w = torch.randn(num_classes, dim, generator=generator, dtype=torch.float64)
    x = w[labels] + 2.0 * torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    grad_rows = torch.rand(batch, generator=generator, dtype=torch.float64) + 0.5
    return x.to(dtype), w.to(dtype), labels, grad_rows


def border_labels(labels, bounds):
    """labels with the first entries on either side of every shard border, the first and the last class."""
    labels = labels.clone()
    edges = [0, bounds[-1][1] - 1] + [edge for a, _ in bounds[1:] for edge in (a - 1, a)]
    labels[:len(edges)] = torch.tensor(edges[:labels.shape[0]])
    return labels


def whole(x, w, labels, grad_rows, *, widen=True, **options):
    """(rows, ∂x, ∂w) of margin_softmax_ce over the whole weight; ``widen``: on the torch path in
    float64 (the same rounded inputs), else on the backend under test in the inputs' dtype."""
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    with kernel_backend("torch") if widen else contextlib.nullcontext():
        rows = margin_softmax_ce(x.double() if widen else x, w.double() if widen else w, labels,
                                 reduction="none", **options)
    rows.backward(grad_rows.to(rows.dtype))
    return rows.detach(), x.grad.double() if widen else x.grad, w.grad.double() if widen else w.grad


def sharded(x, w, labels, grad_rows, bounds, class_indices=None, **options):
    """Per rank (rows, ∂x share, ∂w_shard, all-reduces in forward, all-reduces in backward)."""
    group = SimulatedGroup(len(bounds))

    def rank_body(rank, all_reduce):
        a, b = bounds[rank]
        embeddings, shard = x.clone().requires_grad_(True), w[a:b].clone().requires_grad_(True)
        rows = margin_softmax_ce_sharded(
            embeddings, shard, labels, class_offset=a, num_classes=w.shape[0], all_reduce=all_reduce,
            class_index=None if class_indices is None else class_indices[rank], reduction="none", **options)
        forward_calls = group.calls[rank]
        rows.backward(grad_rows.to(rows.dtype))
        return rows.detach(), embeddings.grad, shard.grad, forward_calls, group.calls[rank] - forward_calls

    return run_ranks(len(bounds), rank_body, group)


def check_ranks(x, w, labels, grad_rows, bounds, tol, **options):
    expected_rows, expected_x, expected_w = whole(x, w, labels, grad_rows, **options)
    results = sharded(x, w, labels, grad_rows, bounds, **options)
    for rank, (rows, _, grad_w, forward_calls, backward_calls) in enumerate(results):
        a, b = bounds[rank]
        assert rows.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
        tol.assert_close(rows.double(), expected_rows.double(), name=f"rank {rank} loss")
        tol.assert_close(grad_w.double(), expected_w[a:b].double(), name=f"rank {rank} weight gradient")
        assert (forward_calls, backward_calls) == (2, 0), "one MAX and one SUM forward, nothing in backward"
    tol.assert_close(sum(result[1].double() for result in results), expected_x.double(), name="embeddings")


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", list(MARGINS))
@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
def test_float64_ranks_equal_the_whole_weight(world, name, margin_grad, monkeypatch):
    monkeypatch.setenv("FACEKD_KERNEL_BACKEND", "torch")
    # C = 37 divides by neither 2 nor 3; B = 11, D = 24
    x, w, labels, grad_rows = problem(11, 37, 24, seed=world)
    bounds = class_bounds(37, world)
    check_ranks(x, w, border_labels(labels, bounds), grad_rows, bounds, FLOAT64, margin_grad=margin_grad,
                **MARGINS[name])


@pytest.mark.parametrize("world", [2, 3])
def test_one_class_per_shard(world, backend):
    dtype = torch.float64 if backend == "torch" else torch.float32
    x, w, labels, grad_rows = problem(5, world, 16, seed=10 + world, dtype=dtype)
    check_ranks(x, w, labels, grad_rows, class_bounds(world, world), tolerance(dtype, backend), **MARGINS["arcface"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_low_precision_ranks(dtype, backend):
    # against float64 on the same rounded inputs, at the dtype's tolerance
    x, w, labels, grad_rows = problem(19, 37, 24, seed=4, dtype=dtype)
    bounds = class_bounds(37, 3)
    labels = border_labels(labels, bounds)
    expected_rows, expected_x, expected_w = whole(x, w, labels, grad_rows, **MARGINS["arcface"])
    results = sharded(x, w, labels, grad_rows, bounds, **MARGINS["arcface"])
    tol = TOLERANCES[dtype]
    for rank, (rows, _, grad_w, _, _) in enumerate(results):
        a, b = bounds[rank]
        assert rows.dtype == torch.float32 and grad_w.dtype == dtype
        tol.assert_close(rows.double(), expected_rows, name="loss")
        tol.assert_close(grad_w.double(), expected_w[a:b], name="weight gradient")
    tol.assert_close(sum(result[1].double() for result in results), expected_x, name="embeddings")


def sample_classes(labels, bounds, negatives, seed):
    """Each rank's class_index: its own positives plus ``negatives`` random others of its shard, shuffled."""
    generator = torch.Generator().manual_seed(seed)
    indices = []
    for a, b in bounds:
        priority = torch.rand(b - a, generator=generator)
        owned = labels[(labels >= a) & (labels < b)] - a
        priority[owned] += 1.0  # positives first
        count = min(b - a, int(owned.unique().numel()) + negatives)
        chosen = priority.argsort(descending=True)[:count]
        indices.append(chosen[torch.randperm(count, generator=generator)])
    return indices


@pytest.mark.parametrize("world", [2, 3])
def test_class_index_sampling_equals_the_union(world, backend):
    dtype = torch.float64 if backend == "torch" else torch.float32
    x, w, labels, grad_rows = problem(13, 41, 24, seed=20 + world, dtype=dtype)
    bounds = class_bounds(41, world)
    labels = border_labels(labels, bounds)
    class_indices = sample_classes(labels, bounds, negatives=3, seed=world)
    # margin_softmax_ce over the union of the sampled classes, labels as positions in the union
    union = torch.cat([index + a for index, (a, _) in zip(class_indices, bounds)])
    position = torch.full((41,), -1, dtype=torch.int64)
    position[union] = torch.arange(union.shape[0])
    expected_rows, expected_x, expected_w = whole(x, w, position[labels], grad_rows, class_index=union,
                                                  **MARGINS["combined"])
    results = sharded(x, w, labels, grad_rows, bounds, class_indices, **MARGINS["combined"])
    tol = tolerance(dtype, backend)
    for rank, (rows, _, grad_w, _, _) in enumerate(results):
        a, b = bounds[rank]
        tol.assert_close(rows.double(), expected_rows.double(), name="loss")
        tol.assert_close(grad_w.double(), expected_w[a:b].double(), name="weight gradient")
        unsampled = torch.ones(b - a, dtype=torch.bool)
        unsampled[class_indices[rank]] = False
        assert (grad_w[unsampled] == 0).all(), "classes a rank did not sample get exact zeros"
    tol.assert_close(sum(result[1].double() for result in results), expected_x.double(), name="embeddings")


@pytest.mark.parametrize("sampled", [False, True])
def test_one_shard_without_all_reduce_is_margin_softmax_ce(sampled, backend):
    x, w, labels, grad_rows = problem(19, 37, 24, seed=5, dtype=torch.float32)
    class_index = torch.randperm(37, generator=torch.Generator().manual_seed(0))[:29] if sampled else None
    if sampled:
        labels = class_index[labels % 29]
        position = torch.full((37,), -1, dtype=torch.int64)
        position[class_index] = torch.arange(29)
    expected = whole(x, w, position[labels] if sampled else labels, grad_rows, widen=False,
                     class_index=class_index)
    embeddings, weight = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    rows = margin_softmax_ce_sharded(embeddings, weight, labels, class_offset=0, num_classes=37,
                                     class_index=class_index, reduction="none")
    rows.backward(grad_rows.float())
    assert torch.equal(rows.detach(), expected[0])
    assert torch.equal(weight.grad, expected[2])
    # the Triton ∂x adds the class splits' shares with atomics: not bitwise reproducible
    TOLERANCES[torch.float32].assert_close(embeddings.grad, expected[1], name="embeddings")


def test_backward_does_not_recompute_the_forward(monkeypatch):
    monkeypatch.setenv("FACEKD_KERNEL_BACKEND", "torch")
    x, w, labels, grad_rows = problem(7, 23, 16, seed=6)
    calls = []
    forward = margin_ce._reference_forward
    monkeypatch.setattr(margin_ce, "_reference_forward", lambda *args: calls.append(1) or forward(*args))
    bounds = class_bounds(23, 2)
    results = sharded(x, w, labels, grad_rows, bounds, **MARGINS["arcface"])
    assert len(calls) == len(bounds)  # one forward per rank, none in backward
    assert all(result[4] == 0 for result in results)


@pytest.mark.parametrize("change, message", [
    ({"labels": torch.tensor([0, 1, 40])}, r"labels must be in \[0, 37\) \(global classes\), got min 0, max 40"),
    ({"class_offset": 30}, r"classes \[30, 50\) do not fit in \[0, 37\)"),
    ({"all_reduce": None}, "without all_reduce the shard must hold all 37 classes, got 20"),
    ({"class_index": torch.tensor([0, 2])}, r"class_index must hold every label .* class 1 \(row 1\) is missing"),
    ({"class_index": torch.tensor([0, 1, 1])}, "class_index must not repeat a class"),
    ({"class_index": torch.tensor([0, 1, 20])}, r"class_index must be in \[0, 20\)"),
])
def test_bad_arguments(change, message):
    x, w, _, _ = problem(3, 37, 8, seed=7, dtype=torch.float32)
    arguments = dict(embeddings=x, weight_shard=w[:20], labels=torch.tensor([0, 1, 30]), class_offset=0,
                     num_classes=37, all_reduce=lambda tensor, op: None)
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        margin_softmax_ce_sharded(**arguments)
