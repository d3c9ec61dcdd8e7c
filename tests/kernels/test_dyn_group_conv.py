"""Dynamic group convolution (Triton in the interpreter, and the torch reference) against a float64 oracle.

The oracle mixes each sample's kernel with explicit loops over groups and experts and convolves one
sample at a time with F.conv2d (groups = m); it shares no code with the module, which folds the batch
into the groups of one convolution (reference) or never builds the mixed kernel (Triton).
"""
import os
import subprocess
import sys

# The Triton path runs in the CPU interpreter; it must be switched on before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import facekd.kernels.dyn_group_conv as dyn_group_conv  # noqa: E402
from facekd.kernels import checks, dyn_group_conv2d  # noqa: E402
from facekd.kernels.dyn_group_conv import TOLERANCES  # noqa: E402

# (B, Cin, Cout, m, n, H, W, k, stride, padding); none of the sizes is a multiple of a 16-wide block
SHAPES = {
    "grouped": (3, 6, 10, 2, 3, 7, 7, 3, 1, 1),
    "grouped-stride2": (3, 6, 10, 2, 3, 7, 7, 3, 2, 1),
    "grouped-stride2-pad0": (3, 6, 10, 2, 3, 7, 7, 3, 2, 0),
    "grouped-pad0": (3, 6, 10, 2, 3, 7, 7, 3, 1, 0),
    "dyconv-m1": (2, 5, 6, 1, 4, 7, 7, 3, 1, 1),
    "dyconv-m1-stride2": (2, 5, 6, 1, 4, 6, 6, 3, 2, 1),
    "m4-stride2": (2, 8, 12, 4, 2, 5, 5, 3, 2, 1),
    "k1": (3, 6, 10, 2, 3, 5, 5, 1, 1, 0),
    "k1-stride2": (3, 6, 10, 2, 3, 5, 5, 1, 2, 0),
    "k5-wide": (2, 4, 6, 2, 2, 5, 9, 5, 1, 2),
    "one-expert": (3, 6, 10, 2, 1, 7, 7, 3, 1, 1),
    "one-sample": (1, 6, 10, 2, 3, 7, 7, 3, 1, 1),
}


# ---------------------------------------------------------------------------------------------
# Independent float64 oracle
# ---------------------------------------------------------------------------------------------


def oracle(x, experts, routing, stride, padding):
    """Per-sample loop: W_bg = Σ_e routing[b, g, e]·experts[g, e], concatenated over g, one conv per sample."""
    groups, n_experts = experts.shape[:2]
    outputs = []
    for b in range(x.shape[0]):
        kernels = []
        for g in range(groups):
            mixed = torch.zeros_like(experts[g, 0])
            for e in range(n_experts):
                mixed = mixed + routing[b, g, e] * experts[g, e]
            kernels.append(mixed)
        outputs.append(F.conv2d(x[b:b + 1], torch.cat(kernels), stride=stride, padding=padding, groups=groups))
    return torch.cat(outputs)


def problem(shape, dtype=torch.float32, seed=0):
    """(x, experts, routing, grad_out) of a shape of SHAPES: softmax routing, a random incoming gradient."""
    batch, cin, cout, groups, n_experts, height, width, ksize, stride, padding = shape
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cin, height, width, generator=generator)
    experts = torch.randn(groups, n_experts, cout // groups, cin // groups, ksize, ksize, generator=generator)
    experts *= (2.0 / (cin // groups * ksize * ksize)) ** 0.5
    routing = torch.randn(batch, groups, n_experts, generator=generator).softmax(-1)
    out_h = (height + 2 * padding - ksize) // stride + 1
    out_w = (width + 2 * padding - ksize) // stride + 1
    grad_out = torch.randn(batch, cout, out_h, out_w, generator=generator)
    return x.to(dtype), experts.to(dtype), routing.to(dtype), grad_out.to(dtype)


def leaf(tensor):
    return tensor.detach().clone().requires_grad_(True)


def run(x, experts, routing, grad_out, stride, padding, function=dyn_group_conv2d):
    """(output, ∂x, ∂experts, ∂routing) as float64, with incoming gradient grad_out."""
    x, experts, routing = leaf(x), leaf(experts), leaf(routing)
    out = function(x, experts, routing, stride=stride, padding=padding)
    out.backward(grad_out.to(out.dtype))
    return tuple(t.detach().double() for t in (out, x.grad, experts.grad, routing.grad))


def run_oracle(x, experts, routing, grad_out, stride, padding):
    def function(x, experts, routing, *, stride, padding):
        return oracle(x, experts, routing, stride, padding)
    return run(x.double(), experts.double(), routing.double(), grad_out.double(), stride, padding, function)


def assert_matches(got, expected, tolerance):
    for name, a, b in zip(("output", "grad x", "grad experts", "grad routing"), got, expected):
        tolerance.assert_close(a, b, name=name)


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv("FACEKD_KERNEL_BACKEND", request.param)
    if request.param == "triton" and type(dyn_group_conv._forward_kernel).__name__ != "InterpretedFunction":
        pytest.fail("facekd.kernels was imported before TRITON_INTERPRET=1 was set (set it in tests/conftest.py)")
    return request.param


# ---------------------------------------------------------------------------------------------
# Forward and all three gradients against the oracle
# ---------------------------------------------------------------------------------------------


def test_reference_is_the_oracle_in_float64(monkeypatch):
    monkeypatch.setenv("FACEKD_KERNEL_BACKEND", "torch")
    shape = SHAPES["grouped-stride2"]
    x, experts, routing, grad_out = (t.double() for t in problem(shape))
    got = run(x, experts, routing, grad_out, *shape[-2:])
    expected = run_oracle(x, experts, routing, grad_out, *shape[-2:])
    assert_matches(got, expected, checks.Tolerance(rtol=1e-12, atol_of_max=1e-12))


@pytest.mark.parametrize("name", list(SHAPES))
def test_shapes_match_oracle(backend, name):
    shape = SHAPES[name]
    x, experts, routing, grad_out = problem(shape, seed=1)
    got = run(x, experts, routing, grad_out, *shape[-2:])
    expected = run_oracle(x, experts, routing, grad_out, *shape[-2:])
    assert got[0].shape == expected[0].shape
    assert_matches(got, expected, TOLERANCES[torch.float32])


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
def test_dtypes(backend, dtype):
    shape = SHAPES["grouped-stride2"]
    x, experts, routing, grad_out = problem(shape, dtype=dtype, seed=2)
    x16, experts16, routing16 = leaf(x), leaf(experts), leaf(routing)
    out = dyn_group_conv2d(x16, experts16, routing16, stride=2, padding=1)
    out.backward(grad_out)
    assert out.dtype == x16.grad.dtype == experts16.grad.dtype == routing16.grad.dtype == dtype
    got = tuple(t.detach().double() for t in (out, x16.grad, experts16.grad, routing16.grad))
    # the oracle sees the same rounded inputs and incoming gradient, widened exactly
    assert_matches(got, run_oracle(x, experts, routing, grad_out, 2, 1), TOLERANCES[dtype])


def test_many_tiles_and_batch_slices(monkeypatch):
    """16-wide blocks on a problem several tiles wide in every direction, and ∂weight programs that
    split the batch into slices: the partial sums over slices and weight tiles add up."""
    monkeypatch.setenv("FACEKD_KERNEL_BACKEND", "triton")
    small = dyn_group_conv._Launch(block_co=16, block_p=16, block_r=16, block_ci=16, programs=64, num_warps=4,
                                   dot_precision="tf32x3")
    monkeypatch.setattr(dyn_group_conv._Launch, "build", classmethod(lambda cls, x, geometry: small))
    shape = (3, 36, 34, 2, 2, 5, 5, 3, 1, 1)  # Ci = 18, Co = 17, R = 162, 25 pixels: 2, 2, 11, 2 tiles
    x, experts, routing, grad_out = problem(shape, seed=7)
    got = run(x, experts, routing, grad_out, 1, 1)
    assert_matches(got, run_oracle(x, experts, routing, grad_out, 1, 1), TOLERANCES[torch.float32])


def test_one_expert_holds_all_the_mass(backend):
    """A one-hot routing vector per group is a plain grouped conv with the chosen expert; the routing
    gradient of the other experts is still ⟨G, experts[g, e]⟩, not zero."""
    shape = SHAPES["grouped"]
    x, experts, _, grad_out = problem(shape, seed=3)
    chosen = torch.tensor([[2, 0], [1, 1], [0, 2]])  # [B, m]
    routing = F.one_hot(chosen, 3).float()
    got = run(x, experts, routing, grad_out, 1, 1)
    expected = run_oracle(x, experts, routing, grad_out, 1, 1)
    assert_matches(got, expected, TOLERANCES[torch.float32])
    plain = torch.cat([F.conv2d(x[b:b + 1], torch.cat([experts[g, chosen[b, g]] for g in range(2)]), padding=1,
                                groups=2) for b in range(3)])
    torch.testing.assert_close(got[0], plain.double(), rtol=1e-4, atol=1e-4)
    assert got[3][routing == 0].abs().min() > 0


def test_only_routing_needs_a_gradient(backend):
    """A frozen conv (x and experts without grad) still trains its router."""
    shape = SHAPES["grouped"]
    x, experts, routing, grad_out = problem(shape, seed=4)
    routing_leaf = leaf(routing)
    out = dyn_group_conv2d(x, experts, routing_leaf, stride=1, padding=1)
    out.backward(grad_out)
    expected = run_oracle(x, experts, routing, grad_out, 1, 1)
    TOLERANCES[torch.float32].assert_close(routing_leaf.grad.double(), expected[3], name="grad routing")


def test_non_contiguous_inputs(backend):
    shape = SHAPES["grouped"]
    x, experts, routing, grad_out = problem(shape, seed=5)
    x_channels_last = x.to(memory_format=torch.channels_last)
    routing_view = routing.transpose(1, 2).contiguous().transpose(1, 2)
    assert not x_channels_last.is_contiguous() and not routing_view.is_contiguous()
    got = run(x_channels_last, experts, routing_view, grad_out, 1, 1)
    assert_matches(got, run_oracle(x, experts, routing, grad_out, 1, 1), TOLERANCES[torch.float32])


def test_enclosing_autocast_changes_nothing(backend):
    """Forward inside a bf16 autocast (the trainer's; backward runs outside it, as torch advises) gives
    the output and gradients computed without it."""
    shape = SHAPES["grouped"]
    x, experts, routing, grad_out = problem(shape, seed=6)

    def under_autocast(x, experts, routing, *, stride, padding):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return dyn_group_conv2d(x, experts, routing, stride=stride, padding=padding)

    inside = run(x, experts, routing, grad_out, 1, 1, under_autocast)
    outside = run(x, experts, routing, grad_out, 1, 1)
    for got, expected in zip(inside, outside):
        torch.testing.assert_close(got, expected, rtol=0.0, atol=1e-6)


def test_cases_are_registered_for_the_gpu_suite():
    names = {case.name for case in checks.all_cases()}
    assert {"dyn_group_conv/grouped", "dyn_group_conv/dyconv_stride2"} <= names
    case = next(case for case in checks.all_cases() if case.name == "dyn_group_conv/grouped")
    outputs = checks.check_case(case, torch.float32, torch.device("cpu"), tiny=True)
    assert {output.name for output in outputs} == {"output", "grad_x", "grad_experts", "grad_routing"}
    assert all(output.passed for output in outputs)


# ---------------------------------------------------------------------------------------------
# Bad input: one ValueError naming it
# ---------------------------------------------------------------------------------------------


def _bad(**changes):
    x, experts, routing, _ = problem(SHAPES["grouped"])
    args = {"x": x, "experts": experts, "routing": routing, "stride": 1, "padding": 1, **changes}
    return args


BAD_INPUTS = {
    "x-dims": (lambda: _bad(x=torch.randn(6, 7, 7)), r"x must be \[B, Cin, H, W\]"),
    "experts-dims": (lambda: _bad(experts=torch.randn(2, 3, 5, 3, 3)), r"experts must be \[m, n, Cout/m"),
    "routing-dims": (lambda: _bad(routing=torch.rand(3, 6)), r"routing must be \[B, m, n\]"),
    "cin-not-divisible": (lambda: _bad(x=torch.randn(3, 7, 7, 7)), r"Cin = 7 is not divisible by m = 2"),
    "cin-mismatch": (lambda: _bad(x=torch.randn(3, 8, 7, 7)), r"Cin/m = 4"),
    "routing-shape": (lambda: _bad(routing=torch.rand(3, 2, 4)), r"routing must be \[B, m, n\] = \(3, 2, 3\)"),
    "routing-batch": (lambda: _bad(routing=torch.rand(2, 2, 3)), r"routing must be \[B, m, n\] = \(3, 2, 3\)"),
    "non-square": (lambda: _bad(experts=torch.randn(2, 3, 5, 3, 3, 1)), r"square k×k kernels, got 3×1"),
    "dtype": (lambda: _bad(experts=torch.randn(2, 3, 5, 3, 3, 3, dtype=torch.float64)),
              r"experts must have x's dtype torch.float32"),
    "int-x": (lambda: _bad(x=torch.ones(3, 6, 7, 7, dtype=torch.int64)), r"x must be float16"),
    "device": (lambda: _bad(routing=torch.rand(3, 2, 3, device="meta")), r"routing is on meta, x on cpu"),
    "empty-batch": (lambda: _bad(x=torch.randn(0, 6, 7, 7), routing=torch.rand(0, 2, 3)), r"need at least one sample"),
    "stride": (lambda: _bad(stride=0), r"stride must be an int ≥ 1, got 0"),
    "padding": (lambda: _bad(padding=-1), r"padding must be an int ≥ 0, got -1"),
    "kernel-too-large": (lambda: _bad(x=torch.randn(3, 6, 1, 1), padding=0), r"does not fit in the 1×1 input"),
    "not-a-tensor": (lambda: _bad(routing=[[0.5, 0.5]]), r"routing must be a torch.Tensor"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_are_named(name):
    make, message = BAD_INPUTS[name]
    args = make()
    with pytest.raises(ValueError, match=message):
        dyn_group_conv2d(args["x"], args["experts"], args["routing"], stride=args["stride"], padding=args["padding"])


def test_triton_path_refuses_float64(monkeypatch):
    monkeypatch.setenv("FACEKD_KERNEL_BACKEND", "triton")
    x, experts, routing, _ = (t.double() for t in problem(SHAPES["grouped"]))
    with pytest.raises(ValueError, match="float64; use FACEKD_KERNEL_BACKEND=torch"):
        dyn_group_conv2d(x, experts, routing)


# ---------------------------------------------------------------------------------------------
# The compiled path: the interpreter forgives what the compiler does not
# ---------------------------------------------------------------------------------------------

COMPILE_FOR_HOPPER = r"""
import torch, triton
from triton.backends.compiler import GPUTarget
import facekd.kernels.dyn_group_conv as dgc

FP32_OUT = ("grad_experts_ptr", "grad_routing_ptr")


def signature(fn, dtype, constexprs):
    return {name: "constexpr" if name in constexprs else
            ("*fp32" if name in FP32_OUT else "*" + dtype) if name.endswith("_ptr") else "i32"
            for name in fn.arg_names}


for torch_dtype, dtype in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
    # DGConv (m = 4, n = 4), DyConv (m = 1), and one expert with a 1x1 kernel, at IR-18's 28x28 stage
    for groups, n_experts, ksize in ((4, 4, 3), (1, 4, 3), (2, 1, 1)):
        geometry = dgc._Geometry(128, 128, 28, 28, groups, n_experts, 128 // groups, 128 // groups, ksize, 1, 1)
        launch = dgc._Launch.for_cuda(geometry, torch_dtype, sms=132)
        shared = dict(KSIZE=ksize, N_PAD=triton.next_power_of_2(n_experts), DOT_PRECISION=launch.dot_precision,
                      BLOCK_P=launch.block_p, BLOCK_R=launch.block_r)
        kernels = {dgc._forward_kernel: dict(shared, BLOCK_CO=launch.block_co),
                   dgc._grad_input_kernel: dict(shared, BLOCK_CI=launch.block_ci),
                   dgc._grad_weight_kernel: dict(shared, BLOCK_CO=launch.block_co)}
        for fn, constexprs in kernels.items():
            types = signature(fn, dtype, constexprs)
            aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                       if name.endswith("_ptr")}
            source = triton.compiler.ASTSource(fn=fn, signature=types, constexprs=constexprs, attrs=aligned)
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": launch.num_warps})
            print(fn.__name__, dtype, groups, n_experts, ksize, "shared memory", compiled.metadata.shared)
"""


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    """Every kernel compiles for sm_90 with the launcher's CUDA block sizes (no GPU needed)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("shared memory") == 18
