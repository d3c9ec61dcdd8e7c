"""The margin head goes through facekd.kernels.margin_softmax_ce and its backend switch."""
import math

import pytest
import torch

from facekd.config import HeadConfig
from facekd.heads import MarginHead


def _reference_arcface(embeddings, weight, labels, s, m2):
    """ArcFace from its definition, float64: s·cos(θ_y + m2) on the target, s·cos θ elsewhere."""
    cos = torch.nn.functional.normalize(embeddings, dim=1) @ torch.nn.functional.normalize(weight, dim=1).T
    theta = torch.acos(cos.gather(1, labels[:, None]).clamp(-1, 1))
    logits = (s * cos).scatter(1, labels[:, None], s * torch.cos(theta + m2))
    return torch.nn.functional.cross_entropy(logits, labels)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_head_loss_and_gradients_match_arcface(monkeypatch, backend):
    monkeypatch.setenv("FACEKD_KERNEL_BACKEND", backend)
    torch.manual_seed(0)
    head = MarginHead(13, 8, HeadConfig(s=32.0, m2=0.3))
    embeddings = torch.randn(5, 8, requires_grad=True)
    labels = torch.tensor([0, 12, 3, 3, 7])
    loss = head(embeddings, labels)
    grads = torch.autograd.grad(loss, [embeddings, head.weight])
    x64 = embeddings.detach().double().requires_grad_()
    w64 = head.weight.detach().double().requires_grad_()
    expected = _reference_arcface(x64, w64, labels, 32.0, 0.3)
    expected_grads = torch.autograd.grad(expected, [x64, w64])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-3, atol=1e-5)


def test_head_logits_are_margin_free():
    head = MarginHead(4, 3, HeadConfig(s=10.0))
    embeddings = torch.randn(2, 3)
    cos = torch.nn.functional.normalize(embeddings, dim=1) @ torch.nn.functional.normalize(head.weight, dim=1).T
    torch.testing.assert_close(head.logits(embeddings), 10.0 * cos)


def test_centres_start_from_insightface_normal():
    """N(0, 0.01²), as arcface_torch. With n draws the sample std has relative standard error
    1/√(2(n − 1)) and the mean standard error 0.01/√n: allow five of each."""
    torch.manual_seed(0)
    weight = MarginHead(1000, 64, HeadConfig()).weight.detach().double()
    n = weight.numel()
    assert math.isclose(weight.std().item(), 0.01, rel_tol=5 / math.sqrt(2 * (n - 1)))
    assert abs(weight.mean().item()) < 5 * 0.01 / math.sqrt(n)


def test_head_logits_stay_fp32_under_autocast():
    torch.manual_seed(0)
    head = MarginHead(7, 8, HeadConfig(s=64.0))
    embeddings = torch.randn(5, 8).bfloat16()
    labels = torch.tensor([0, 6, 3, 3, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, margined = head.logits(embeddings), head.margin_logits(embeddings, labels)
    assert logits.dtype == margined.dtype == torch.float32
    torch.testing.assert_close(logits, head.logits(embeddings.float()), rtol=0, atol=0)
    torch.testing.assert_close(margined, head.margin_logits(embeddings.float(), labels), rtol=0, atol=0)


def test_head_rejects_an_empty_classifier():
    with pytest.raises(ValueError, match="num_classes >= 1"):
        MarginHead(0, 8, HeadConfig())
