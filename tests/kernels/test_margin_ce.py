"""Margin-softmax CE (Triton in the interpreter, and the torch reference) against float64 oracles.

The oracles below are written directly from the maths with torch autograd on the full [B, C]
logits: acos, cos of the shifted angle, F.cross_entropy. The straight-through oracle applies the
margin in place under no_grad, as insightface's arcface_torch does. They share no code with the
module.
"""
import math
import os
import subprocess
import sys

# The Triton path runs in the CPU interpreter; it must be switched on before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import facekd.kernels.margin_ce as margin_ce  # noqa: E402
from facekd.kernels.margin_ce import (  # noqa: E402
    TOLERANCES,
    cosine_logits,
    margin_softmax_ce,
)

ARCFACE = dict(s=64.0, m1=1.0, m2=0.5, m3=0.0)
MARGINS = {
    "arcface": ARCFACE,
    "cosface": dict(s=64.0, m1=1.0, m2=0.0, m3=0.35),
    "sphereface": dict(s=30.0, m1=1.35, m2=0.0, m3=0.0),
    "combined": dict(s=48.0, m1=1.2, m2=0.3, m3=0.2),
    "plain-small-s": dict(s=4.0, m1=1.0, m2=0.0, m3=0.0),
}
# TOLERANCES (the module's, which the GPU suite reads too): dtype → relative tolerance of the loss and
# of each gradient, plus the same fraction of that output's largest entry


# ---------------------------------------------------------------------------------------------
# Independent float64 oracles
# ---------------------------------------------------------------------------------------------


def oracle_psi(c, m1, m2):
    """cos(m1·θ + m2), continued beyond θ* = (π − m2)/m1 by c − cos θ* − 1 (the documented fallback)."""
    theta = torch.acos(c.clamp(-1.0, 1.0))
    theta_limit = (math.pi - m2) / m1
    if theta_limit >= math.pi:
        return torch.cos(m1 * theta + m2)
    return torch.where(theta <= theta_limit, torch.cos(m1 * theta + m2), c - math.cos(theta_limit) - 1.0)


def oracle_rows(x, w, labels, *, s, m1, m2, m3, class_index=None, straight_through=False):
    """Per-row loss on the full float64 logits; exact, or insightface's in-place no_grad margin."""
    if class_index is not None:
        w = w[class_index]
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    rows = torch.arange(x.shape[0])
    if straight_through:
        logits = cos.clamp(-1.0, 1.0)
        with torch.no_grad():
            logits[rows, labels] = oracle_psi(logits[rows, labels], m1, m2) - m3
    else:
        target = oracle_psi(cos[rows, labels], m1, m2) - m3
        logits = cos.scatter(1, labels[:, None], target[:, None])
    return F.cross_entropy(s * logits, labels, reduction="none")


def leaf(tensor):
    return tensor.detach().clone().requires_grad_(True)


def problem(batch, n_classes, dim, dtype=torch.float32, seed=0):
    """Random inputs with labels on the first and the last class."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=generator).to(dtype)
    w = torch.randn(n_classes, dim, generator=generator).to(dtype)
    labels = torch.randint(0, n_classes, (batch,), generator=generator)
    labels[0] = n_classes - 1
    if batch > 1:
        labels[-1] = 0
    grad_rows = torch.rand(batch, generator=generator, dtype=torch.float64) + 0.5
    return x, w, labels, grad_rows


def run(x, w, labels, grad_rows, **kwargs):
    """(loss rows, ∂x, ∂w) of margin_softmax_ce with incoming gradient grad_rows."""
    x, w = leaf(x), leaf(w)
    rows = margin_softmax_ce(x, w, labels, reduction="none", **kwargs)
    rows.backward(grad_rows.to(rows.dtype))
    return rows.detach().double(), x.grad.double(), w.grad.double()


def run_oracle(x, w, labels, grad_rows, **kwargs):
    x, w = leaf(x.double()), leaf(w.double())
    rows = oracle_rows(x, w, labels, **kwargs)
    rows.backward(grad_rows)
    return rows.detach(), x.grad, w.grad


def assert_matches(got, expected, tolerance):
    for name, a, b in zip(("loss", "grad embeddings", "grad weight"), got, expected):
        tolerance.assert_close(a, b, name=name)


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv("FACEKD_KERNEL_BACKEND", request.param)
    if request.param == "triton" and type(margin_ce._lse_fwd_kernel).__name__ != "InterpretedFunction":
        pytest.fail("facekd.kernels was imported before TRITON_INTERPRET=1 was set (set it in tests/conftest.py)")
    return request.param


# ---------------------------------------------------------------------------------------------
# Forward and both gradients against the oracle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MARGINS))
@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
def test_margins_match_oracle(backend, name, margin_grad):
    # B = 19 and C = 37 are not multiples of the interpreter's 16-wide blocks, D = 24 neither
    x, w, labels, grad_rows = problem(19, 37, 24)
    margin = MARGINS[name]
    got = run(x, w, labels, grad_rows, margin_grad=margin_grad, **margin)
    expected = run_oracle(x, w, labels, grad_rows, straight_through=margin_grad == "straight_through", **margin)
    assert_matches(got, expected, TOLERANCES[torch.float32])


def test_straight_through_differs_from_exact():
    x, w, labels, grad_rows = problem(6, 11, 16)
    exact = run(x, w, labels, grad_rows, margin_grad="exact", **ARCFACE)
    straight = run(x, w, labels, grad_rows, margin_grad="straight_through", **ARCFACE)
    torch.testing.assert_close(exact[0], straight[0])
    assert (exact[1] - straight[1]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "batch, n_classes, dim",
    [(1, 1, 16), (1, 37, 24), (5, 1, 8), (33, 17, 40)],
    ids=["one-row-one-class", "one-row", "one-class", "odd"],
)
def test_shapes(backend, batch, n_classes, dim):
    x, w, labels, grad_rows = problem(batch, n_classes, dim, seed=1)
    got = run(x, w, labels, grad_rows, **ARCFACE)
    expected = run_oracle(x, w, labels, grad_rows, **ARCFACE)
    assert_matches(got, expected, TOLERANCES[torch.float32])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions(backend, reduction):
    x, w, labels, _ = problem(7, 20, 16, seed=2)
    xs, ws = leaf(x), leaf(w)
    loss = margin_softmax_ce(xs, ws, labels, reduction=reduction, **ARCFACE)
    loss.backward()
    xo, wo = leaf(x.double()), leaf(w.double())
    rows = oracle_rows(xo, wo, labels, **ARCFACE)
    expected = rows.mean() if reduction == "mean" else rows.sum()
    expected.backward()
    assert loss.shape == ()
    assert_matches((loss.double(), xs.grad.double(), ws.grad.double()), (expected.detach(), xo.grad, wo.grad),
                   TOLERANCES[torch.float32])


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
def test_dtypes(backend, dtype):
    x, w, labels, grad_rows = problem(18, 35, 24, dtype=dtype, seed=3)
    rows, grad_x, grad_w = run(x, w, labels, grad_rows, **MARGINS["combined"])
    expected = run_oracle(x, w, labels, grad_rows, **MARGINS["combined"])
    assert rows.dtype == torch.float64  # run() widens; the function itself returns float32
    assert_matches((rows, grad_x, grad_w), expected, TOLERANCES[dtype])


def test_output_dtypes(backend):
    x, w, labels, _ = problem(4, 9, 16, dtype=torch.bfloat16)
    x, w = leaf(x), leaf(w)
    loss = margin_softmax_ce(x, w, labels)
    loss.backward()
    assert loss.dtype == torch.float32
    assert x.grad.dtype == w.grad.dtype == torch.bfloat16


def test_enclosing_autocast_changes_nothing(backend):
    """Inside a bf16 autocast (the trainer's), forward and backward still compute the logits in fp32:
    the loss and gradients are those computed outside it."""
    x, w, labels, grad_rows = problem(19, 37, 24, seed=13)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = run(x, w, labels, grad_rows, **ARCFACE)
    outside = run(x, w, labels, grad_rows, **ARCFACE)
    for name, got, expected in zip(("loss", "grad embeddings", "grad weight"), inside, outside):
        torch.testing.assert_close(got, expected, rtol=0.0, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_saturated_and_tied_rows(backend):
    """All the mass in one class (an embedding on its target's centre; one on a wrong class's centre),
    and tied logits (two identical centres), at s = 64."""
    x, w, labels, grad_rows = problem(6, 9, 16, seed=11)
    w[5] = w[3]  # tied centres: every row has two equal logits
    labels[2] = 5  # and in this row one of them is the target
    # near its target (θ ≈ 0.1; exactly on it, fp32's acos(1 − ε) ≈ √(2ε) would dominate): p_target ≈ 1
    direction = F.normalize(torch.randn(16, generator=torch.Generator().manual_seed(12)), dim=0)
    x[0], labels[0] = w[8] + 0.1 * w[8].norm() * direction, 8
    x[1], labels[1] = 2.0 * w[4], 2  # on a non-target centre: nearly all mass in the wrong class
    got = run(x, w, labels, grad_rows, **ARCFACE)
    expected = run_oracle(x, w, labels, grad_rows, **ARCFACE)
    assert expected[0][0] < 1e-6 and expected[0][1] > 50.0
    assert all(torch.isfinite(t).all() for t in got)
    assert_matches(got, expected, TOLERANCES[torch.float32])


def test_frozen_weight_gets_no_gradient(backend):
    x, w, labels, grad_rows = problem(9, 21, 16, seed=4)
    xs = leaf(x)
    margin_softmax_ce(xs, w, labels, reduction="none", **ARCFACE).backward(grad_rows.float())
    expected = run_oracle(x, w, labels, grad_rows, **ARCFACE)
    assert w.grad is None
    TOLERANCES[torch.float32].assert_close(xs.grad.double(), expected[1])


def test_reference_chunks_over_classes(monkeypatch):
    """The CPU path holds [B, chunk] logits; several chunks must give the one-chunk answer."""
    monkeypatch.setenv("FACEKD_KERNEL_BACKEND", "torch")
    monkeypatch.setattr(margin_ce, "REFERENCE_CHUNK_ELEMENTS", 7 * 6)  # chunks of 6 classes for B = 7
    x, w, labels, grad_rows = problem(7, 40, 16, seed=5)
    class_index = torch.randperm(40, generator=torch.Generator().manual_seed(5))[:23]
    labels = labels % 23
    got = run(x, w, labels, grad_rows, class_index=class_index, **ARCFACE)
    expected = run_oracle(x, w, labels, grad_rows, class_index=class_index, **ARCFACE)
    assert_matches(got, expected, TOLERANCES[torch.float32])


# ---------------------------------------------------------------------------------------------
# Partial FC: class_index
# ---------------------------------------------------------------------------------------------


def test_class_index_gathers_rows(backend):
    x, w, _, grad_rows = problem(13, 45, 24, seed=6)
    class_index = torch.randperm(45, generator=torch.Generator().manual_seed(6))[:21]  # unsorted
    labels = torch.randint(0, 21, (13,), generator=torch.Generator().manual_seed(7))
    labels[0], labels[1] = 0, 20
    got = run(x, w, labels, grad_rows, class_index=class_index, **ARCFACE)
    expected = run_oracle(x, w, labels, grad_rows, class_index=class_index, **ARCFACE)
    assert_matches(got, expected, TOLERANCES[torch.float32])
    unused = torch.ones(45, dtype=torch.bool)
    unused[class_index] = False
    assert torch.equal(got[2][unused], torch.zeros_like(got[2][unused]))


# ---------------------------------------------------------------------------------------------
# The fallback beyond θ* = π − m2 and the θ → 0 end
# ---------------------------------------------------------------------------------------------


def test_fallback_is_monotone_and_continuous(backend):
    s, m2 = 64.0, 0.5
    theta_limit = math.pi - m2
    angles = torch.cat([torch.linspace(0.0, math.pi, 33, dtype=torch.float64),
                        torch.tensor([theta_limit - 1e-3, theta_limit + 1e-3], dtype=torch.float64)])
    angles = angles.sort().values
    dim = 16
    x = torch.zeros(len(angles), dim, dtype=torch.float64)
    x[:, 0], x[:, 1] = torch.cos(angles), torch.sin(angles)
    w = torch.randn(3, dim, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    w[0] = 0.0
    w[0, 0] = 2.0  # class 0 along e1: θ of row i is angles[i]; θ = 0 exactly in row 0
    x, w = x.float(), w.float()
    labels = torch.zeros(len(angles), dtype=torch.int64)
    forward = margin_ce._triton_forward if backend == "triton" else margin_ce._reference_forward
    target = forward(x, w, labels, None, margin_ce._Margin.build(s, 1.0, m2, 0.0, "exact"))[0].double()

    expected = torch.where(angles <= theta_limit, torch.cos(angles + m2),
                           torch.cos(angles) - math.cos(theta_limit) - 1.0) * s
    torch.testing.assert_close(target, expected, rtol=0, atol=1e-3)
    assert (target.diff() < 0).all(), "the target logit must fall as θ grows"
    near = (angles - theta_limit).abs() < 2e-3
    assert target[near].diff().abs().max() < 0.2, "the two pieces must meet at θ*"

    xs, ws = leaf(x), leaf(w)
    margin_softmax_ce(xs, ws, labels, s=s, m2=m2).backward()
    assert torch.isfinite(xs.grad).all() and torch.isfinite(ws.grad).all()


# ---------------------------------------------------------------------------------------------
# The backend switch, cosine_logits and errors
# ---------------------------------------------------------------------------------------------


def test_auto_takes_the_reference_on_cpu(monkeypatch):
    x, w, labels, _ = problem(3, 5, 8, dtype=torch.float64)
    monkeypatch.setenv("FACEKD_KERNEL_BACKEND", "auto")
    assert torch.isfinite(margin_softmax_ce(x, w, labels))  # float64 runs only on the reference
    monkeypatch.setenv("FACEKD_KERNEL_BACKEND", "triton")
    with pytest.raises(TypeError, match="float64"):
        margin_softmax_ce(x, w, labels)


def test_cosine_logits():
    x, w, _, _ = problem(4, 9, 8, dtype=torch.float64)
    class_index = torch.tensor([8, 0, 3])
    logits = cosine_logits(x, w, s=10.0, class_index=class_index)
    expected = 10.0 * F.normalize(x, dim=1) @ F.normalize(w[class_index], dim=1).T
    torch.testing.assert_close(logits, expected)


def _bad_inputs():
    x, w, labels, _ = problem(4, 6, 8)
    return [
        ("embeddings must have 2", dict(embeddings=x[0])),
        ("weight must be \\[C, 8\\]", dict(weight=w[:, :5].contiguous())),
        ("labels must have B = 4", dict(labels=labels[:3])),
        ("labels must be int64", dict(labels=labels.int())),
        ("weight must have the embeddings' dtype", dict(weight=w.half())),
        ("embeddings must be float16, bfloat16, float32 or float64", dict(embeddings=x.int())),
        ("embeddings must be contiguous", dict(embeddings=torch.randn(8, 4).T)),
        ("weight must be contiguous", dict(weight=torch.randn(6, 16)[:, ::2])),
        ("labels is on meta", dict(labels=labels.to("meta"))),
        ("labels must be in \\[0, 6\\).*max 6", dict(labels=torch.tensor([0, 1, 6, 2]))),
        ("labels must be in \\[0, 6\\).*min -1", dict(labels=torch.tensor([0, -1, 5, 2]))),
        ("labels must be in \\[0, 3\\)", dict(labels=labels.clamp(max=3), class_index=torch.tensor([0, 2, 4]))),
        ("class_index must not repeat a class, got class 2", dict(class_index=torch.tensor([0, 2, 5, 2, 1, 3]))),
        ("class_index must be in \\[0, 6\\)", dict(class_index=torch.tensor([0, 2, 6, 1, 3, 4]))),
        ("class_index must be int64", dict(class_index=torch.arange(6, dtype=torch.int32))),
        ("s must be > 0", dict(s=0.0)),
        ("m1 must be > 0", dict(m1=-1.0)),
        ("m2 must be in", dict(m2=4.0)),
        ("reduction must be one of", dict(reduction="avg")),
        ("margin_grad must be one of", dict(margin_grad="insightface")),
        ("need at least one row", dict(embeddings=x[:0], labels=labels[:0])),
    ]


@pytest.mark.parametrize("message, override", _bad_inputs(), ids=lambda v: v if isinstance(v, str) else "")
def test_errors_name_the_bad_value(backend, message, override):
    x, w, labels, _ = problem(4, 6, 8)
    args = dict(embeddings=x, weight=w, labels=labels)
    options = {key: value for key, value in override.items() if key not in args}
    args.update({key: value for key, value in override.items() if key in args})
    with pytest.raises((ValueError, TypeError), match=message):
        margin_softmax_ce(args["embeddings"], args["weight"], args["labels"], **options)


# ---------------------------------------------------------------------------------------------
# The compiled path: the interpreter forgives what the compiler does not
# ---------------------------------------------------------------------------------------------

COMPILE_FOR_HOPPER = r"""
import torch, triton
from triton.backends.compiler import GPUTarget
import facekd.kernels.margin_ce as mc

def signature(fn, dtype, constexprs):
    types = {}
    for name in fn.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in ("x_ptr", "w_ptr", "rows_ptr", "grad_w_ptr"):
            types[name] = "*" + dtype
        elif name in ("labels_ptr", "index_ptr"):
            types[name] = "*i64"
        elif name.endswith("_ptr"):
            types[name] = "*fp32"
        elif name in ("batch", "n_classes", "dim", "classes_per_split", "n_rows"):
            types[name] = "i32"
        else:
            types[name] = "fp32"
    return types

for torch_dtype, dtype in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
    launch = mc._Launch.for_cuda(512, torch_dtype, sms=132)
    dots = dict(DOT_PRECISION=launch.dot_precision)
    for has_index in (False, True):
        kernels = {
            mc._inv_norm_kernel: dict(BLOCK_N=launch.block_b, BLOCK_D=launch.block_d),
            mc._target_kernel: dict(ANGULAR=True, STRAIGHT_THROUGH=False, BLOCK_B=launch.block_b,
                                    BLOCK_D=launch.block_d),
            mc._lse_fwd_kernel: dict(**dots, BLOCK_B=launch.block_b, BLOCK_C=launch.block_c, BLOCK_D=launch.block_d),
            mc._grad_embeddings_kernel: dict(**dots, BLOCK_B=launch.grad_x_block_b, BLOCK_C=launch.grad_x_block_c,
                                             BLOCK_D=launch.block_d, D_PAD=launch.d_pad),
            mc._grad_weight_kernel: dict(**dots, BLOCK_B=launch.grad_w_block_b, BLOCK_C=launch.grad_w_block_c,
                                         BLOCK_D=launch.block_d, D_PAD=launch.d_pad),
        }
        for fn, constexprs in kernels.items():
            constexprs = dict(constexprs, HAS_INDEX=has_index)
            types = signature(fn, dtype, constexprs)
            aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                       if types[name].startswith("*") or name == "dim"}
            source = triton.compiler.ASTSource(fn=fn, signature=types, constexprs=constexprs, attrs=aligned)
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": launch.num_warps})
            print(fn.__name__, dtype, has_index, "shared memory", compiled.metadata.shared)
"""


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    """Every kernel compiles for sm_90 at D = 512 with the launcher's CUDA block sizes (no GPU needed)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("shared memory") == 20


def test_margin_logits_of_class_shards_are_the_whole_matrix_split_by_column():
    """With ``class_offset`` each shard puts the margin only on the rows whose label it holds: the shards side by
    side equal the whole margined matrix, values and gradients (float64)."""
    from facekd.kernels.margin_ce import margin_logits

    generator = torch.Generator().manual_seed(3)
    embeddings = torch.randn(7, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    labels = torch.tensor([0, 3, 4, 7, 8, 10, 5])  # shard borders at 4 and 8
    upstream = torch.randn(7, 11, dtype=torch.float64, generator=generator)
    options = dict(s=16.0, m2=0.3, m3=0.1)
    whole = margin_logits(embeddings, weight, labels, **options)
    grads = torch.autograd.grad((whole * upstream).sum(), (embeddings, weight))
    shards = torch.cat([margin_logits(embeddings, weight[start:end], labels, class_offset=start, **options)
                        for start, end in ((0, 4), (4, 8), (8, 11))], dim=1)
    torch.testing.assert_close(shards, whole, rtol=0, atol=0)
    for got, expected in zip(torch.autograd.grad((shards * upstream).sum(), (embeddings, weight)), grads):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # a shard that holds none of the labels is the plain s·cos θ
    plain = 16.0 * torch.nn.functional.normalize(embeddings, dim=1) @ torch.nn.functional.normalize(weight[4:8], dim=1).T
    torch.testing.assert_close(margin_logits(embeddings, weight[4:8], torch.tensor([0, 1, 2, 3, 8, 9, 10]),
                                             class_offset=4, **options), plain, rtol=1e-12, atol=1e-12)
