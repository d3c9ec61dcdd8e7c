"""CondFace's clustering loss on routing vectors (thesis Sec. 5.2.2-5.2.3, 5.4.3-5.4.4).

The concatenated routing vector β = [α_1 … α_K] of a routed backbone goes through a projection head
(identity, linear or MLP: the thesis' AS3), is L2-normalised, and is scored against P normalised prototypes
(a linear classifier with normalised rows, SwAV's): scores = ẑ·ĉ_pᵀ ∈ [−1, 1], predictions
p(β) = softmax(scores / T). The clustering loss (thesis Eq. 5.5) is the cross-entropy between pseudo-labels
P*(β) and p(β), added to the recognition loss as L = L_fr + λ·L_cls (Eq. 5.6). Pseudo-labels come

- from Sinkhorn-Knopp on the batch (SwAV's ``distributed_sinkhorn``, Caron et al. 2020, the thesis' AS1-AS4):
  soft codes that split the batch equally over the prototypes, computed in fp32 without gradient, their
  marginals all-reduced over the ranks;
- or from k-means over the whole training set before each epoch (DeepCluster, Caron et al. 2018, the thesis'
  AS5): :func:`kmeans` on the projected features of every training image, the centroids initialise the
  prototypes ("the k-means centroids will serve as the weight of the classifier") and each image's cluster is
  its label for the epoch (see :class:`facekd.cluster_labels.EpochAssignments`).

How the thesis text was read:

- one view. SwAV predicts the code of one augmented view from another ("swapped prediction"); the thesis
  describes one input per sample ("the cross-entropy loss between current prediction from predictor and
  assigned label from Sinkhorn-Knopp", Sec. 5.2.2), so the code and the prediction come from the same β:
  L_cls = −(1/N) Σ_i Σ_p q_ip · log p_ip(β_i), the code q computed from the detached scores.
- temperatures. Table 5.2's "AS2: temperature in Softmax" (T = 0.1 hurts, T = 15 softens) is the ROUTING
  softmax: the thesis says a small value "will degrade into training with fewer routes" and a large one makes
  "the routing vector ... soften". The prediction temperature of the clustering loss is therefore SwAV's, 0.1
  (the code the thesis modified, facebookresearch/swav, footnote 3), and ε = 0.05 with 3 iterations likewise.
- projection head. "AS1:P=300 is trained with MLP by default"; AS3 tries identity (best in Table 5.1) and
  linear. AS4, the best purity, carries no ":I"/":L" suffix, so it is read as the default MLP. SwAV's MLP
  (Linear → BN → ReLU → Linear, 2048 hidden, 128 out) is taken as that MLP.
- prototypes. SwAV re-normalises the prototype rows in place before every step. Under ZeRO the engine's fp32
  partition is the master copy and overwrites in-place edits, so here the rows are normalised in the forward
  pass instead: the same scores, and a gradient that is SwAV's projected onto the sphere's tangent (divided
  by the row norm, which starts at 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ClusterHead", "HEADS", "KMeans", "cluster_loss", "kmeans", "sinkhorn"]

AllReduce = Callable[[Tensor, str], None]

HEADS = ("identity", "linear", "mlp")
"""Projection heads of the thesis' AS3: identity mapping, one linear layer, multi-layer perceptron."""


class ClusterHead(nn.Module):
    """Projection head and normalised prototypes: β [B, D] → cosine scores [B, P] (see module docstring).

    Args:
        in_dim: D, the routing vector's length.
        prototypes: P (thesis Sec. 5.4.4: 300).
        head: ``identity``, ``linear`` (D → head_dim) or ``mlp`` (D → hidden_dim → BN → ReLU → head_dim).
        head_dim, hidden_dim: output and hidden widths of the linear/MLP heads (SwAV: 128, 2048).
    """

    def __init__(self, in_dim: int, prototypes: int, *, head: Literal["identity", "linear", "mlp"] = "mlp",
                 head_dim: int = 128, hidden_dim: int = 2048) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if head == "identity":
            self.projection: nn.Module = nn.Identity()
            out_dim = in_dim
        elif head == "linear":
            self.projection = nn.Linear(in_dim, head_dim)
            out_dim = head_dim
        else:  # SwAV's projection_head: Linear, BatchNorm1d, ReLU, Linear
            self.projection = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                                            nn.ReLU(inplace=True), nn.Linear(hidden_dim, head_dim))
            out_dim = head_dim
        self.out_dim = out_dim
        self.prototypes = nn.Linear(out_dim, prototypes, bias=False)  # SwAV: nn.Linear(output_dim, nmb_prototypes)

    def features(self, beta: Tensor) -> Tensor:
        """ẑ [B, out_dim]: the projected, L2-normalised routing vectors, fp32 (the space k-means clusters)."""
        with torch.autocast(beta.device.type, enabled=False):
            return F.normalize(self.projection(beta.float()), dim=1)

    def forward(self, beta: Tensor) -> Tensor:
        """Cosine scores ẑ·ĉ_pᵀ [B, P] of ``beta`` [B, D] against the normalised prototypes, fp32."""
        with torch.autocast(beta.device.type, enabled=False):
            return self.features(beta) @ F.normalize(self.prototypes.weight.float(), dim=1).t()

    @torch.no_grad()
    def set_prototypes(self, centroids: Tensor) -> None:
        """Initialise the prototypes with k-means ``centroids`` [P, out_dim] (DeepCluster; thesis Sec. 5.2.2)."""
        self.prototypes.weight.copy_(F.normalize(centroids.to(self.prototypes.weight), dim=1))


@torch.no_grad()
def sinkhorn(scores: Tensor, *, epsilon: float = 0.05, iterations: int = 3, all_reduce: AllReduce | None = None
             ) -> Tensor:
    """SwAV's soft codes Q [B, P] of the cosine ``scores`` [B, P] (``distributed_sinkhorn``, swav/main_swav.py).

    Q = exp(scores/ε)ᵀ normalised to total mass 1, then ``iterations`` times: each prototype's row scaled to
    mass 1/P, each sample's column to 1/B (B the batch of all ranks); finally the columns × B, so each sample's
    code sums to 1. Computed in fp32 whatever the autocast dtype; ``all_reduce(tensor, "sum")`` combines the
    total mass and the prototype marginals over the ranks (each rank holds its own samples), so the codes of
    the ranks' batches are those of the concatenated batch.
    """
    with torch.autocast(scores.device.type, enabled=False):
        q = torch.exp(scores.detach().float() / epsilon).t()  # [P, B]; scores ∈ [−1, 1] keep exp < e^{1/ε}
        num_prototypes = q.shape[0]
        batch = torch.tensor(float(q.shape[1]), device=q.device)
        total = q.sum()
        if all_reduce is not None:
            all_reduce(batch, "sum")
            all_reduce(total, "sum")
        q /= total
        for _ in range(iterations):
            rows = q.sum(dim=1, keepdim=True)
            if all_reduce is not None:
                all_reduce(rows, "sum")
            q /= rows
            q /= num_prototypes
            q /= q.sum(dim=0, keepdim=True)
            q /= batch
        q *= batch
        return q.t()


def cluster_loss(scores: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """Thesis Eq. 5.5: −(1/B) Σ_i Σ_p P*_ip · log softmax(scores_i / T)_p, fp32.

    ``targets``: soft codes [B, P] (Sinkhorn) or cluster ids [B] (k-means, a one-hot P*)."""
    with torch.autocast(scores.device.type, enabled=False):
        log_p = torch.log_softmax(scores.float() / temperature, dim=1)
        if targets.dim() == 1:
            return F.nll_loss(log_p, targets)
        return -(targets.float() * log_p).sum(dim=1).mean()


# ---------------------------------------------------------------------------------------------
# k-means (DeepCluster's faiss.Clustering, in torch)
# ---------------------------------------------------------------------------------------------

# faiss Clustering.cpp: an empty cluster takes a copy of a split one, both perturbed by ±1/1024
_SPLIT_EPS = 1.0 / 1024.0
_CHUNK = 65536  # rows whose distances to all centroids are held at once


@dataclass
class KMeans:
    """Result of :func:`kmeans`: centroids [k, D], assignments [N] (int64), the final sum of squared distances,
    and how many empty clusters were re-seeded over all iterations."""

    centroids: Tensor
    assignments: Tensor
    inertia: float
    empty_splits: int


def _assign(x: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centroid of each row of ``x`` and the squared distance to it, in chunks of rows."""
    labels, distances = [], []
    c_norm = (centroids * centroids).sum(dim=1)
    for start in range(0, x.shape[0], _CHUNK):
        rows = x[start:start + _CHUNK]
        d = (rows * rows).sum(dim=1, keepdim=True) - 2.0 * rows @ centroids.t() + c_norm
        best, index = d.min(dim=1)
        labels.append(index)
        distances.append(best.clamp_min(0.0))
    return torch.cat(labels), torch.cat(distances)


def _kmeans_plus_plus(x: Tensor, k: int, rng: np.random.Generator) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each next centre drawn ∝ squared distance to the nearest."""
    first = int(rng.integers(x.shape[0]))
    centres = [x[first]]
    nearest = ((x - x[first]) ** 2).sum(dim=1)
    for _ in range(1, k):
        weights = nearest.double().cpu().numpy()
        total = weights.sum()
        index = int(rng.choice(x.shape[0], p=weights / total)) if total > 0 else int(rng.integers(x.shape[0]))
        centres.append(x[index])
        nearest = torch.minimum(nearest, ((x - x[index]) ** 2).sum(dim=1))
    return torch.stack(centres)


def _split_empty(centroids: Tensor, counts: np.ndarray, n: int, rng: np.random.Generator) -> int:
    """faiss ``split_clusters``: every empty cluster ci takes the centroid of a cluster cj chosen with probability
    (size − 1)/(n − k) by walking the clusters in turn, and the two are pushed apart (even coordinates × (1 ± ε),
    odd ones × (1 ∓ ε)); cj's count is split between them. In place; returns the number of splits."""
    k = centroids.shape[0]
    splits = 0
    sign = torch.ones(centroids.shape[1], dtype=centroids.dtype, device=centroids.device)
    sign[1::2] = -1.0
    for ci in range(k):
        if counts[ci] != 0:
            continue
        cj = 0
        while True:
            if rng.random() < (counts[cj] - 1.0) / (n - k):
                break
            cj = (cj + 1) % k
        centroids[ci] = centroids[cj] * (1.0 + sign * _SPLIT_EPS)
        centroids[cj] = centroids[cj] * (1.0 - sign * _SPLIT_EPS)
        counts[ci] = counts[cj] // 2
        counts[cj] -= counts[ci]
        splits += 1
    return splits


def kmeans(x: Tensor, k: int, *, iterations: int = 20, seed: int = 0,
           init: Literal["kmeans++", "random"] | Tensor = "kmeans++") -> KMeans:
    """Lloyd's k-means of the rows of ``x`` [N, D] into ``k`` clusters, in fp32 on ``x``'s device.

    ``iterations`` assignment/update rounds (DeepCluster: 20), seeded by ``seed``: the seeding (k-means++, or k
    distinct random rows as faiss, or the given centroids [k, D]) and the choice of the cluster an empty one
    splits (faiss's rule, :func:`_split_empty`). The returned assignments are those of the final centroids.
    """
    x = x.detach().float()
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= N points, got k = {k}, N = {n}")
    rng = np.random.default_rng(seed)
    if isinstance(init, Tensor):
        if init.shape != (k, x.shape[1]):
            raise ValueError(f"initial centroids must be [{k}, {x.shape[1]}], got {list(init.shape)}")
        centroids = init.detach().float().to(x.device).clone()
    elif init == "random":
        centroids = x[torch.from_numpy(rng.choice(n, size=k, replace=False)).to(x.device)].clone()
    elif init == "kmeans++":
        centroids = _kmeans_plus_plus(x, k, rng)
    else:
        raise ValueError(f"init must be 'kmeans++', 'random' or a tensor of centroids, got {init!r}")
    splits = 0
    for _ in range(iterations):
        labels, _ = _assign(x, centroids)
        counts_t = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        nonempty = counts_t > 0
        centroids[nonempty] = sums[nonempty] / counts_t[nonempty, None].to(x.dtype)
        counts = counts_t.cpu().numpy().astype(np.int64)
        if (counts == 0).any() and n > k:
            splits += _split_empty(centroids, counts, n, rng)
    labels, distances = _assign(x, centroids)
    return KMeans(centroids, labels, float(distances.sum()), splits)
