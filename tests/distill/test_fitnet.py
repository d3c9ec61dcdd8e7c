"""FitNet adapter and hint loss against float64 references written out by hand.

The adapter reference applies the 1×1 convolution as an explicit channel sum and the batch norm
from its formula; the resize is checked against hand-derived bilinear weights (half-pixel
centres, ``align_corners=False``) rather than against ``F.interpolate``.
"""
import pytest
import torch

from facekd.distill.fitnet import FitNetAdapter, fitnet_loss

TOLERANCES = {  # dtype → (forward rtol, gradient rtol)
    torch.float32: (1e-6, 1e-6),
    torch.bfloat16: (1e-6, 1e-2),
    torch.float16: (1e-6, 2e-3),
}


def reference_adapter(adapter, x):
    """BN(W x) with W the 1×1 kernel; batch statistics (biased variance) in training, running ones in eval."""
    weight = adapter.conv.weight[:, :, 0, 0]  # [C_T, C_S]
    out = torch.zeros(x.shape[0], weight.shape[0], *x.shape[2:], dtype=x.dtype)
    for o in range(weight.shape[0]):
        for i in range(weight.shape[1]):
            out[:, o] = out[:, o] + weight[o, i] * x[:, i]
    bn = adapter.bn
    if adapter.training:
        mean = out.mean(dim=(0, 2, 3))
        var = ((out - mean[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))
    else:
        mean, var = bn.running_mean, bn.running_var
    normalised = (out - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + bn.eps)
    return normalised * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]


def make_adapter(student_channels, teacher_channels, teacher_size, seed=0):
    torch.manual_seed(seed)
    adapter = FitNetAdapter(student_channels, teacher_channels, teacher_size=teacher_size).double()
    with torch.no_grad():  # BN affine parameters away from their identity initialisation
        adapter.bn.weight.uniform_(0.5, 1.5)
        adapter.bn.bias.uniform_(-0.5, 0.5)
        adapter.bn.running_mean.uniform_(-0.5, 0.5)
        adapter.bn.running_var.uniform_(0.5, 2.0)
    return adapter


@pytest.mark.parametrize("student_channels, teacher_channels, size", [(3, 5, 4), (7, 41, 3), (8, 8, 1)])
@pytest.mark.parametrize("training", [True, False])
def test_adapter_same_size_matches_conv_bn_reference(student_channels, teacher_channels, size, training):
    adapter = make_adapter(student_channels, teacher_channels, size).train(training)
    x = torch.randn(5, student_channels, size, size, dtype=torch.float64, requires_grad=True)
    out = adapter(x)
    expected = reference_adapter(adapter, x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, adapter.conv.weight], upstream)
    expected_grads = torch.autograd.grad(expected, [x, adapter.conv.weight], upstream)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_adapter_halving_resize_is_a_two_by_two_average():
    # bilinear with half-pixel centres samples output pixel i at input position 2i + 0.5
    adapter = make_adapter(3, 4, teacher_size=3).eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    pooled = x.reshape(2, 3, 3, 2, 3, 2).mean(dim=(3, 5))
    torch.testing.assert_close(adapter(x), reference_adapter(adapter, pooled), rtol=1e-12, atol=1e-12)


def test_adapter_doubling_resize_uses_quarter_weights():
    # 2 → 4 px: sample positions −0.25, 0.25, 0.75, 1.25 clamp to the edge, so the rows are
    # x0, ¾x0 + ¼x1, ¼x0 + ¾x1, x1 along each axis.
    adapter = make_adapter(2, 3, teacher_size=4).eval()
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    weights = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]], dtype=torch.float64)
    upsampled = torch.einsum("yh,xw,bchw->bcyx", weights, weights, x)
    torch.testing.assert_close(adapter(x), reference_adapter(adapter, upsampled), rtol=1e-12, atol=1e-12)


def test_adapter_rejects_wrong_channels_and_bad_sizes():
    adapter = FitNetAdapter(3, 5, teacher_size=4)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\], got \[2, 4, 4, 4\]"):
        adapter(torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match="teacher_size must be a positive int"):
        FitNetAdapter(3, 5, teacher_size=0)
    with pytest.raises(ValueError, match="student_channels must be a positive int"):
        FitNetAdapter(2.5, 5, teacher_size=4)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (7, 41, 3, 5), (4, 8, 14, 14)])
def test_loss_matches_element_mean_and_analytic_gradient(shape):
    generator = torch.Generator().manual_seed(1)
    adapted = torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(shape, generator=generator, dtype=torch.float64)
    loss = fitnet_loss(adapted, teacher)
    count = adapted.numel()
    expected = sum(float(a - t) ** 2 for a, t in zip(adapted.detach().flatten(), teacher.flatten())) / count
    assert abs(float(loss.detach()) - expected) < 1e-12 * max(1.0, expected)
    (grad,) = torch.autograd.grad(loss, adapted, grad_outputs=torch.tensor(1.7, dtype=torch.float64))
    # d/da mean((a − t)²) = 2 (a − t) / N, times the incoming 1.7
    torch.testing.assert_close(grad, 1.7 * 2.0 * (adapted.detach() - teacher) / count, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_loss_half_inputs_computed_in_float32(dtype):
    generator = torch.Generator().manual_seed(2)
    adapted = torch.randn(7, 41, 3, 3, generator=generator).to(dtype).requires_grad_()
    teacher = torch.randn(7, 41, 3, 3, generator=generator).to(dtype)
    forward_rtol, grad_rtol = TOLERANCES[dtype]
    loss = fitnet_loss(adapted, teacher)
    assert loss.dtype == torch.float32
    difference = adapted.detach().double() - teacher.double()
    torch.testing.assert_close(loss.double(), difference.square().mean(), rtol=forward_rtol, atol=0)
    (grad,) = torch.autograd.grad(loss, adapted)
    expected_grad = 2.0 * difference / difference.numel()
    scale = float(expected_grad.abs().max())
    torch.testing.assert_close(grad.double(), expected_grad, rtol=grad_rtol, atol=grad_rtol * scale)


def test_loss_detaches_teacher_and_rejects_mismatched_shapes():
    adapted = torch.randn(2, 3, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 4, requires_grad=True)
    fitnet_loss(adapted, teacher).backward()
    assert teacher.grad is None and adapted.grad is not None
    with pytest.raises(ValueError, match=r"\[2, 3, 4, 4\] and teacher features \[2, 3, 5, 5\]"):
        fitnet_loss(adapted, torch.zeros(2, 3, 5, 5))
    with pytest.raises(ValueError, match="at least one element"):
        fitnet_loss(torch.zeros(0, 3), torch.zeros(0, 3))
