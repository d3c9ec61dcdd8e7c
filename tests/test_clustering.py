"""CondFace's clustering loss (facekd.clustering, facekd.deepcluster): Sinkhorn codes, the loss and k-means
against plain float64 references and by-hand cases; the config rules; short training runs with each method."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from facekd.clustering import ClusterHead, cluster_loss, kmeans, sinkhorn
from facekd.config import job_from_dict
from facekd.errors import ConfigError
from facekd.kernels.checks import run_ranks


def reference_sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SwAV's distributed_sinkhorn on one rank in float64, written out: (codes [B, P], Q before the final × B)."""
    q = torch.exp(scores.double() / epsilon).t()
    num_prototypes, batch = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / num_prototypes
        q = q / q.sum(dim=0, keepdim=True) / batch
    return (q * batch).t(), q.t()


def cosine_scores(batch: int, prototypes: int, dim: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(batch, dim, generator=g), dim=1)
    c = F.normalize(torch.randn(prototypes, dim, generator=g), dim=1)
    return z @ c.t()


@pytest.mark.parametrize("batch,prototypes", [(8, 4), (41, 13), (1, 3), (64, 300)])
def test_sinkhorn_matches_swav_in_float64(batch, prototypes):
    scores = cosine_scores(batch, prototypes)
    got = sinkhorn(scores, epsilon=0.05, iterations=3)
    expected, _ = reference_sinkhorn(scores, 0.05, 3)
    assert got.dtype == torch.float32 and got.shape == (batch, prototypes)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-4)
    # after the final scaling each sample's code is a distribution
    torch.testing.assert_close(got.sum(dim=1), torch.ones(batch), atol=1e-5, rtol=0)


def test_sinkhorn_marginals_converge_to_the_equipartition():
    batch, prototypes = 24, 5
    scores = cosine_scores(batch, prototypes, seed=3)
    # before the final scaling: each sample's row sums to 1/B exactly, each prototype's column to 1/P at the fixpoint
    _, before = reference_sinkhorn(scores, 0.05, 3)
    torch.testing.assert_close(before.sum(dim=1), torch.full((batch,), 1 / batch, dtype=torch.float64))
    assert not torch.allclose(before.sum(dim=0), torch.full((prototypes,), 1 / prototypes, dtype=torch.float64),
                              atol=1e-4)  # 3 iterations are not the fixpoint on these scores
    codes = sinkhorn(scores, epsilon=0.05, iterations=500)
    torch.testing.assert_close(codes.sum(dim=0) / batch, torch.full((prototypes,), 1 / prototypes), atol=1e-5, rtol=0)
    torch.testing.assert_close(codes.sum(dim=1) / batch, torch.full((batch,), 1 / batch), atol=1e-6, rtol=0)


def test_sinkhorn_under_bf16_autocast_is_fp32():
    scores = cosine_scores(16, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sinkhorn(scores.bfloat16(), epsilon=0.05, iterations=3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, sinkhorn(scores.bfloat16().float(), epsilon=0.05, iterations=3))


def test_sinkhorn_across_two_ranks_equals_the_concatenated_batch():
    scores = cosine_scores(12, 5, seed=1)
    parts = [scores[:5], scores[5:]]  # unequal batches
    codes = run_ranks(2, lambda rank, all_reduce: sinkhorn(parts[rank], epsilon=0.05, iterations=3,
                                                           all_reduce=all_reduce))
    torch.testing.assert_close(torch.cat(codes), sinkhorn(scores, epsilon=0.05, iterations=3), atol=1e-7, rtol=1e-5)
    with pytest.raises(AssertionError):  # the all-reduce matters: one rank alone gives other codes
        torch.testing.assert_close(sinkhorn(parts[0], epsilon=0.05, iterations=3), codes[0])


@pytest.mark.parametrize("head", ["identity", "linear", "mlp"])
@pytest.mark.parametrize("targets", ["codes", "labels"])
def test_loss_forward_and_backward_match_float64(head, targets):
    torch.manual_seed(0)
    batch, dim, prototypes, temperature = 9, 24, 7, 0.1
    module = ClusterHead(dim, prototypes, head=head, head_dim=5, hidden_dim=11)
    beta = torch.softmax(torch.randn(batch, dim), dim=1).requires_grad_()
    target = (sinkhorn(module(beta), epsilon=0.05, iterations=3) if targets == "codes"
              else torch.randint(prototypes, (batch,)))
    loss = cluster_loss(module(beta), target, temperature)
    (0.37 * loss).backward()

    # float64 reference: the same parameters, the maths written out (BN in training mode: batch statistics)
    params = {name: p.detach().double().requires_grad_() for name, p in module.named_parameters()}
    beta64 = beta.detach().double().requires_grad_()
    z = beta64
    if head == "linear":
        z = z @ params["projection.weight"].t() + params["projection.bias"]
    elif head == "mlp":
        h = z @ params["projection.0.weight"].t() + params["projection.0.bias"]
        h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)
        h = torch.relu(h * params["projection.1.weight"] + params["projection.1.bias"])
        z = h @ params["projection.3.weight"].t() + params["projection.3.bias"]
    w = params["prototypes.weight"]
    scores = (z / z.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).t()
    log_p = torch.log_softmax(scores / temperature, dim=1)
    one_hot = target.double() if targets == "codes" else F.one_hot(target, prototypes).double()
    expected = -(one_hot * log_p).sum(dim=1).mean()
    (0.37 * expected).backward()

    torch.testing.assert_close(loss.double(), expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(beta.grad.double(), beta64.grad, atol=1e-5, rtol=1e-4)
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.grad.double(), params[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_scores_use_normalised_prototypes():
    module = ClusterHead(4, 3, head="identity")
    with torch.no_grad():
        module.prototypes.weight.copy_(torch.tensor([[2.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 0, 0.5]]))
    scores = module(torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    torch.testing.assert_close(scores, torch.tensor([[2 ** -0.5, 2 ** -0.5, 0.0]]))
    module.set_prototypes(torch.tensor([[3.0, 4.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 2.0]]))
    torch.testing.assert_close(module.prototypes.weight.norm(dim=1), torch.ones(3))


def test_kmeans_by_hand():
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0]])
    result = kmeans(x, 2, iterations=3, init=torch.tensor([[0.0, 0.0], [10.0, 0.0]]))
    assert result.assignments.tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(result.centroids, torch.tensor([[0.0, 0.5], [10.0, 0.5]]))
    assert result.inertia == pytest.approx(1.0) and result.empty_splits == 0


def test_kmeans_reseeds_an_empty_cluster_as_faiss():
    x = torch.tensor([[0.0, 0.0], [0.0, 1.2], [0.0, 2.0], [10.0, 0.0]])
    init = torch.tensor([[0.0, 1.0], [10.0, 0.0], [100.0, 100.0]])  # the third centroid attracts nothing
    eps = 1 / 1024
    first = kmeans(x, 3, iterations=1, init=init)
    # cluster 2 copies cluster 0 (the only one with more than one point: p = (3 − 1)/(n − k) = 2), both pushed
    # apart: even coordinates × (1 ± ε), odd ones × (1 ∓ ε)
    mean = 3.2 / 3
    torch.testing.assert_close(first.centroids, torch.tensor([[0.0, mean * (1 + eps)], [10.0, 0.0],
                                                              [0.0, mean * (1 - eps)]]))
    assert first.empty_splits == 1
    second = kmeans(x, 3, iterations=2, init=init)
    assert second.assignments.tolist() == [2, 0, 0, 1]
    torch.testing.assert_close(second.centroids, torch.tensor([[0.0, 1.6], [10.0, 0.0], [0.0, 0.0]]))


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_kmeans_finds_separated_blobs_and_is_seeded(init):
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    truth = torch.arange(4).repeat_interleave(25)
    x = centres[truth] + 0.3 * torch.randn(100, 3, generator=g)
    result = kmeans(x, 4, iterations=10, seed=1, init=init)
    if init == "kmeans++":  # random seeding may put two seeds in one blob (a local optimum Lloyd keeps)
        # the same partition up to renaming: every blob is one cluster and the clusters differ
        mapping = {int(t): int(a) for t, a in zip(truth, result.assignments)}
        assert len(set(mapping.values())) == 4
        assert [mapping[int(t)] for t in truth] == result.assignments.tolist()
    again = kmeans(x, 4, iterations=10, seed=1, init=init)
    assert torch.equal(again.centroids, result.centroids)


def test_kmeans_rejects_more_clusters_than_points():
    with pytest.raises(ValueError, match="k = 5, N = 4"):
        kmeans(torch.zeros(4, 2), 5)


def _job(backbone: str, **cluster) -> dict:
    return {"name": "x", "data": {"manifest": "m"}, "model": {"backbone": backbone},
            "train": {"output_dir": "o", "steps": 1},
            "cluster": cluster}


def test_cluster_config_defaults_and_errors():
    job = job_from_dict(_job("dgconv_iresnet18", method="sinkhorn"))
    assert (job.cluster.prototypes, job.cluster.temperature, job.cluster.epsilon, job.cluster.iterations,
            job.cluster.head, job.cluster.weight) == (300, 0.1, 0.05, 3, "mlp", 1.0)
    assert job_from_dict(_job("iresnet18")).cluster.method == "none"
    with pytest.raises(ConfigError, match=r"cluster\.method.*iresnet18 has none"):
        job_from_dict(_job("iresnet18", method="kmeans"))
    with pytest.raises(ConfigError, match=r"cluster\.prototypes"):
        job_from_dict(_job("dc_iresnet18", method="sinkhorn", prototypes=1))
    with pytest.raises(ConfigError, match=r"cluster\.head"):
        job_from_dict(_job("dc_iresnet18", method="sinkhorn", head="deep"))
    with pytest.raises(ConfigError, match=r"cluster\.tau"):
        job_from_dict(_job("dc_iresnet18", method="sinkhorn", tau=0.1))


def _cluster_job(tiny_job, name: str, method: str, steps: int) -> dict:
    return tiny_job(name, model={"backbone": "dc_iresnet18"}, train={"steps": steps, "checkpoint_every": 3},
                    cluster={"method": method, "prototypes": 5, "hidden_dim": 32, "head_dim": 8, "weight": 0.5})


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sinkhorn", "kmeans"])
def test_a_routed_run_with_the_clustering_loss_resumes_exactly(tiny_job, method):
    """7 steps at 6 per epoch (k-means before epochs 0 and 1), straight and interrupted after 4: the same weights,
    prototypes and pseudo-labels; L_cls is logged."""
    from facekd.distributed.checkpoint import load_checkpoint
    from facekd.train import Trainer

    straight = Trainer(job_from_dict(_cluster_job(tiny_job, "straight", method, 7)), progress=False).fit()
    job = job_from_dict(_cluster_job(tiny_job, "resumed", method, 7))
    Trainer(job, progress=False).fit(stop_after=4)
    resumed = Trainer(job, resume=True, progress=False).fit()
    assert resumed["loss"] == straight["loss"]
    a, b = load_checkpoint(straight["checkpoint"]), load_checkpoint(resumed["checkpoint"])
    for name, tensor in a["cluster"]["head"].items():
        assert torch.equal(tensor, b["cluster"]["head"][name]), name
    for name, tensor in a["backbone"].items():
        assert torch.equal(tensor, b["backbone"][name]), name
    if method == "kmeans":
        assignments = a["cluster"]["assignments"]
        assert assignments["epoch"] == 1 and len(assignments["keys"]) == 48
        assert torch.equal(assignments["labels"], b["cluster"]["assignments"]["labels"])
        assert set(assignments["labels"].tolist()) <= set(range(5))
    else:
        assert a["cluster"]["assignments"] is None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(straight["checkpoint"]).split("/checkpoints")[0] + "/tensorboard")
    events.Reload()
    values = [event.value for event in events.Scalars("loss/cluster")]
    assert len(values) == 7 and all(value > 0 for value in values)
