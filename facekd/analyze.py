"""``facekd analyze routing``: do a routed network's routing vectors cluster by facial attributes? (thesis Sec. 5.4.2)

The routing vectors β of a run's network are extracted over a set of shards, clustered (k-means into K clusters,
as the thesis' BL and DC rows of Table 5.1, or by the run's own trained prototypes, as its AS1-AS5 rows) and
the clusters scored against every attribute column of an attribute CSV (``attributes.csv`` of ``facekd data
synth``, or any CSV with an ``image_sha1`` column: images are matched by the SHA-1 of their encoded bytes):

- purity = Σ_clusters max_class |cluster ∩ class| / N (Manning et al., "Introduction to Information Retrieval",
  Sec. 16.3), which rises with the number of clusters;
- AMI, adjusted mutual information (sklearn's ``adjusted_mutual_info_score``), 0 for independent labellings;

each beside the mean of the same scores over 10 random assignments with the same cluster sizes (permutations of
the cluster labels), the baseline a clustering must beat. ``nuisances`` is the joint label of the per-image nuisance
columns present (the thesis scores a joint label of its annotated attributes). Writes ``routing.json``,
``routing.md`` and a 2-D PCA or t-SNE embedding of β coloured by cluster and by each attribute (PNG).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from facekd.clustering import ClusterHead, kmeans
from facekd.data.synth_attributes import NUISANCES, read_attributes
from facekd.deepcluster import routing_features, shard_images
from facekd.errors import ConfigError, DataError

__all__ = ["analyze_routing", "purity", "random_assignment", "score_clusters"]

logger = logging.getLogger(__name__)

METHODS = ("kmeans", "prototypes")
EMBEDDINGS = ("pca", "tsne")


def purity(clusters: np.ndarray, labels: np.ndarray) -> float:
    """Σ over clusters of the count of its most frequent label, over N."""
    clusters, labels = np.asarray(clusters), np.asarray(labels)
    if clusters.shape != labels.shape or clusters.size == 0:
        raise ValueError(f"clusters and labels must be non-empty and of one length, got {clusters.shape}, "
                         f"{labels.shape}")
    _, label_ids = np.unique(labels, return_inverse=True)
    _, cluster_ids = np.unique(clusters, return_inverse=True)
    table = np.zeros((cluster_ids.max() + 1, label_ids.max() + 1), np.int64)
    np.add.at(table, (cluster_ids, label_ids), 1)
    return float(table.max(axis=1).sum() / clusters.size)


def random_assignment(clusters: np.ndarray, seed: int = 0) -> np.ndarray:
    """A random assignment with the same cluster sizes: the cluster labels permuted over the images."""
    return np.random.default_rng(seed).permutation(np.asarray(clusters))


RANDOM_REPEATS = 10
"""Random assignments whose scores are averaged into the baseline."""


def score_clusters(clusters: np.ndarray, attributes: dict[str, np.ndarray], seed: int = 0) -> dict[str, dict]:
    """Purity and AMI of ``clusters`` against each attribute array, and their means over
    :data:`RANDOM_REPEATS` :func:`random_assignment` s (seeds ``seed``, ``seed`` + 1, ...)."""
    from sklearn.metrics import adjusted_mutual_info_score

    baselines = [random_assignment(clusters, seed + repeat) for repeat in range(RANDOM_REPEATS)]
    scores = {}
    for name, labels in attributes.items():
        scores[name] = {
            "classes": len(np.unique(labels)),
            "purity": purity(clusters, labels),
            "ami": float(adjusted_mutual_info_score(labels, clusters)),
            "random_purity": float(np.mean([purity(baseline, labels) for baseline in baselines])),
            "random_ami": float(np.mean([adjusted_mutual_info_score(labels, baseline) for baseline in baselines])),
        }
    return scores


def _labelled_images(data: str | Path, table: dict[str, dict[str, str]], max_images: int | None
                     ) -> tuple[Iterator[tuple[str, bytes]], dict[str, int]]:
    """(image hash, bytes) of the shards' images that have an attribute row, at most ``max_images``; and counts
    of the images read and skipped, filled in as the iterator runs."""
    counts = {"read": 0, "without_attributes": 0}

    def images() -> Iterator[tuple[str, bytes]]:
        for _, data_bytes in shard_images(data):
            digest = hashlib.sha1(data_bytes).hexdigest()
            if digest not in table:
                counts["without_attributes"] += 1
                continue
            if max_images is not None and counts["read"] >= max_images:
                return
            counts["read"] += 1
            yield digest, data_bytes

    return images(), counts


def _embed(x: np.ndarray, method: str, seed: int) -> np.ndarray:
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x)
    from sklearn.manifold import TSNE

    return TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30.0, max(2.0, (len(x) - 1) / 3))
                ).fit_transform(x)


def _plot(points: np.ndarray, labels: np.ndarray, title: str, path: Path, legend: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, ids = np.unique(labels, return_inverse=True)
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20" if len(names) <= 20 else "hsv")
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    colours = cmap(ids / max(len(names) - 1, 1)) if len(names) > 20 else cmap(ids % cmap.N)
    ax.scatter(points[:, 0], points[:, 1], c=colours, s=6, linewidths=0)
    if legend and len(names) <= 12:
        for index, name in enumerate(names):
            ax.scatter([], [], color=cmap(index % cmap.N), label=str(name), s=20)
        ax.legend(loc="best", fontsize=8, markerscale=1.2, frameon=False)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Routing clusters of {report['run']}",
        "",
        f"{report['images']} images of {report['data']}, routing vectors of {report['routing_dim']} dimensions "
        f"({report['backbone']}), {report['clusters']} clusters by {report['method']}; random: mean of 10 "
        "assignments with the same cluster sizes, images permuted.",
        "",
        "| attribute | classes | purity | random purity | AMI | random AMI |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in report["scores"].items():
        lines.append(f"| {name} | {row['classes']} | {row['purity']:.4f} | {row['random_purity']:.4f} | "
                     f"{row['ami']:.4f} | {row['random_ami']:.4f} |")
    lines += ["", "Plots: " + ", ".join(f"`{name}`" for name in report["plots"]), ""]
    return "\n".join(lines)


def analyze_routing(run: str | Path, data: str | Path, attributes: str | Path, *, clusters: int = 300,
                    method: str = "kmeans", embed: str = "pca", out: str | Path | None = None,
                    max_images: int | None = None, device: str = "cpu", batch_size: int = 128, seed: int = 0,
                    progress: bool = True) -> dict[str, Any]:
    """Extract, cluster and score the routing vectors of ``run`` over the shards ``data`` (a manifest or its
    folder) against the CSV ``attributes``; writes the report and plots under ``out`` (default
    ``RUN/analysis/routing``) and returns the report."""
    from facekd.distributed.checkpoint import load_checkpoint
    from facekd.models import RoutedIResNet
    from facekd.network import checkpoint_folder, load_network

    if method not in METHODS:
        raise ConfigError(f"--method must be one of {METHODS}, got {method!r}")
    if embed not in EMBEDDINGS:
        raise ConfigError(f"--embed must be one of {EMBEDDINGS}, got {embed!r}")
    if clusters < 2:
        raise ConfigError(f"--clusters must be at least 2, got {clusters}")
    if max_images is not None and max_images < 2:
        raise ConfigError(f"--max-images must be at least 2, got {max_images}")
    network = load_network(run, device, with_head=False)
    backbone = network.backbone
    if not isinstance(backbone, RoutedIResNet):
        raise ConfigError(f"{run} holds a {network.job.model.backbone}, which has no routing vectors: analyse a "
                          "routed backbone (dc_iresnet18, dgconv_iresnet18)")
    head = None
    if method == "prototypes":
        state = load_checkpoint(checkpoint_folder(run))
        if "cluster" not in state:
            raise ConfigError(f"{run} was trained without a clustering loss: it has no prototypes; use --method kmeans")
        config = network.job.cluster
        head = ClusterHead(backbone.routing_dim, config.prototypes, head=config.head, head_dim=config.head_dim,
                           hidden_dim=config.hidden_dim)
        head.load_state_dict(state["cluster"]["head"])
        head.to(device).eval()
    table = read_attributes(attributes)

    # routing vectors of the labelled images
    images, counts = _labelled_images(data, table, max_images)
    keys, beta = routing_features(backbone, images, image_size=network.job.data.image_size,
                                  normalize=network.job.model.normalize, batch_size=batch_size,
                                  device=torch.device(device), progress=progress, desc="routing vectors")
    if len(keys) < 2:
        raise DataError(f"only {len(keys)} image of {data} has a row in {attributes}: nothing to cluster")
    if counts["without_attributes"]:
        logger.warning("%d images of %s have no row in %s; skipped", counts["without_attributes"], data, attributes)

    # clusters: k-means of β (K capped by the images) or the run's prototypes
    if head is None:
        k = min(clusters, len(keys))
        assignment = kmeans(beta, k, iterations=20, seed=seed).assignments.numpy()
    else:
        with torch.no_grad():
            assignment = head(beta.to(device)).argmax(dim=1).cpu().numpy()
        k = int(head.prototypes.weight.shape[0])

    # scores against each attribute (columns that vary), and the joint nuisance label
    columns = [name for name in table[keys[0]] if len({table[key][name] for key in keys}) > 1]
    labels = {name: np.array([table[key][name] for key in keys]) for name in columns}
    nuisances = [name for name in NUISANCES if name in labels]
    if len(nuisances) > 1:
        labels["nuisances"] = np.array(["/".join(table[key][name] for name in nuisances) for key in keys])
    scores = score_clusters(assignment, labels, seed)

    # report and plots
    out_dir = Path(out) if out is not None else Path(run) / "analysis" / "routing"
    out_dir.mkdir(parents=True, exist_ok=True)
    points = _embed(beta.numpy().astype(np.float64), embed, seed)
    plots = [f"{embed}_cluster.png"]
    _plot(points, assignment, f"{embed.upper()} of routing vectors, {k} clusters ({method})", out_dir / plots[0],
          legend=False)
    for name in columns:
        plots.append(f"{embed}_{name}.png")
        _plot(points, labels[name], f"{embed.upper()} of routing vectors by {name}", out_dir / plots[-1], legend=True)
    report = {
        "run": str(run), "data": str(data), "attributes": str(attributes), "backbone": network.job.model.backbone,
        "routing_dim": int(beta.shape[1]), "images": len(keys),
        "images_without_attributes": counts["without_attributes"],
        "method": method, "clusters": k, "clusters_used": int(len(np.unique(assignment))), "embedding": embed,
        "seed": seed, "scores": scores, "plots": plots,
    }
    (out_dir / "routing.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "routing.md").write_text(_markdown(report))
    return report
