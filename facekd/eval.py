"""Face verification evaluation with the insightface protocol (LFW, CFP-FP, AgeDB-30 style ``.bin`` pairs).

Pairs are consecutive embedding rows: pair ``i`` is rows ``2i`` and ``2i + 1``, the order insightface's
``.bin`` files store their images in. Embeddings are L2-normalised here, so callers may pass raw network
outputs; each image is embedded together with its horizontal flip and the two embeddings summed
(insightface ``eval/verification.py``, "Accuracy-Flip").

Accuracy follows insightface/FaceNet: the squared Euclidean distance of the normalised embeddings is
thresholded on the grid ``0, 0.01, …, 3.99`` (a pair is predicted "same" when ``distance < threshold``);
the pairs are cut into ``n_folds`` contiguous folds (``KFold(shuffle=False)``); for each fold the
threshold with the best accuracy on the other folds is applied to it. The reported accuracy and
threshold are means over the folds, ``std`` the population standard deviation of the fold accuracies.

ROC curves, AUC and TAR@FAR use the cosine similarity of the normalised embeddings over all pairs at
once (no folds), the convention of IJB-B/C reports.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
from sklearn import metrics
from sklearn.model_selection import KFold
from tqdm import tqdm

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = [
    "ACCURACY_THRESHOLDS",
    "DEFAULT_FAR_TARGETS",
    "VAL_THRESHOLDS",
    "embed_images",
    "evaluate_bin",
    "evaluate_checkpoints",
    "format_table",
    "plot_roc",
    "roc_auc",
    "roc_curve",
    "tar_at_far",
    "verification_accuracy",
]

ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)
"""Squared-distance thresholds searched for the best accuracy (insightface ``evaluate``)."""
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
"""Finer squared-distance grid searched for the VAL@FAR threshold (insightface ``evaluate``)."""
DEFAULT_FAR_TARGETS = (1e-3, 1e-4)
"""False accept rates at which TAR is reported (the IJB-B/C columns)."""

ArrayLike = np.ndarray | torch.Tensor | Sequence[Any]


def _embeddings_array(embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
    """Check a pair-ordered embedding matrix and return it L2-normalised in float64, shape [2N, D].

    Rows of zero norm stay zero (as ``sklearn.preprocessing.normalize`` leaves them): a dead model
    should score badly rather than stop an evaluation run.
    """
    if isinstance(embeddings, torch.Tensor):
        array = embeddings.detach().to("cpu", torch.float64).numpy()
    else:
        array = np.asarray(embeddings, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"embeddings must be a 2-D [2N, D] matrix with D >= 1, got shape {tuple(array.shape)}")
    if array.shape[0] == 0 or array.shape[0] % 2 != 0:
        raise ValueError(
            "embeddings must have a positive, even number of rows (pair i is rows 2i and 2i+1), "
            f"got {array.shape[0]} rows"
        )
    finite = np.isfinite(array)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        raise ValueError(
            f"embeddings contain {int((~finite).sum())} non-finite values in {bad_rows.size} rows "
            f"(first bad row {int(bad_rows[0])})"
        )
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return array / np.where(norms > 0, norms, 1.0)


def _issame_array(issame: ArrayLike, num_pairs: int) -> np.ndarray:
    """Check the same-identity flags, one per pair, and return them as a bool vector."""
    if isinstance(issame, torch.Tensor):
        issame = issame.detach().cpu().numpy()
    flags = np.asarray(issame)
    if flags.ndim != 1:
        raise ValueError(f"issame must be a 1-D sequence of flags, got shape {flags.shape}")
    if flags.shape[0] != num_pairs:
        raise ValueError(
            f"issame must hold one flag per pair: {num_pairs} pairs from {2 * num_pairs} embedding rows, "
            f"got {flags.shape[0]} flags"
        )
    if flags.dtype != np.bool_:
        if flags.dtype.kind not in "iuf" or not np.isin(flags, (0, 1)).all():
            raise ValueError(f"issame must hold booleans or 0/1 values, got dtype {flags.dtype}")
        flags = flags.astype(bool)
    return flags


def _pairs(
    embeddings: np.ndarray | torch.Tensor, issame: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the checked pairs: first [N, D] and second [N, D] normalised embeddings, issame [N]."""
    normalised = _embeddings_array(embeddings)
    flags = _issame_array(issame, normalised.shape[0] // 2)
    return normalised[0::2], normalised[1::2], flags


def _similarities(
    embeddings: np.ndarray | torch.Tensor, issame: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """Return (cosine similarity [N], issame [N]) of the checked pairs."""
    first, second, flags = _pairs(embeddings, issame)
    return np.einsum("nd,nd->n", first, second), flags


def _accepted_counts(
    distance: np.ndarray, issame: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Per threshold: same pairs accepted, different pairs accepted (``distance < threshold``), and the totals.

    Sorting once and counting with ``searchsorted`` costs O((N + T) log N) instead of the O(N·T) loop of
    the reference implementation; ``side="left"`` counts the distances strictly below each threshold.
    """
    same_sorted = np.sort(distance[issame])
    diff_sorted = np.sort(distance[~issame])
    true_accepts = np.searchsorted(same_sorted, thresholds, side="left")
    false_accepts = np.searchsorted(diff_sorted, thresholds, side="left")
    return true_accepts, false_accepts, same_sorted.size, diff_sorted.size


def _accuracy(distance: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Accuracy of ``distance < threshold`` as the "same" prediction, for every threshold."""
    true_accepts, false_accepts, _, num_diff = _accepted_counts(distance, issame, thresholds)
    true_rejects = num_diff - false_accepts
    return (true_accepts + true_rejects) / distance.size


def _val_far(distance: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """VAL (true accept rate) and FAR for every threshold; a rate with no pairs to count is 0 (insightface)."""
    true_accepts, false_accepts, num_same, num_diff = _accepted_counts(distance, issame, thresholds)
    val = true_accepts / num_same if num_same else np.zeros(thresholds.size)
    far = false_accepts / num_diff if num_diff else np.zeros(thresholds.size)
    return val, far


def _folds(num_pairs: int, n_folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) pair indices; one fold trains and tests on all pairs (insightface ``LFold``)."""
    indices = np.arange(num_pairs)
    if n_folds == 1:
        return [(indices, indices)]
    return list(KFold(n_splits=n_folds, shuffle=False).split(indices))


def verification_accuracy(
    embeddings: np.ndarray | torch.Tensor,
    issame: ArrayLike,
    n_folds: int = 10,
    *,
    far_target: float = 1e-3,
) -> dict[str, Any]:
    """Insightface k-fold verification accuracy of pair-ordered embeddings.

    Args:
        embeddings: [2N, D] embeddings, numpy or torch, any scale (normalised here); pair ``i`` is rows
            ``2i`` and ``2i + 1``.
        issame: [N] flags, true where the pair shows one identity.
        n_folds: folds of contiguous pairs; 10 is the LFW/insightface protocol, 1 picks and scores the
            threshold on all pairs.
        far_target: FAR at which VAL is measured, per fold, on :data:`VAL_THRESHOLDS`.

    Returns:
        ``accuracy`` (mean over folds), ``std`` (population std over folds), ``threshold`` (mean of the
        folds' best squared-distance thresholds), ``fold_accuracy`` and ``fold_threshold`` ([n_folds]
        arrays), ``val``/``val_std``/``far`` (mean TAR, its std and the mean FAR reached on the test
        folds at the threshold whose training-fold FAR is ``far_target``), ``num_pairs``.

    Where insightface interpolates the VAL threshold with ``scipy.interpolate.interp1d`` over the
    training FAR curve (ill-defined where that curve is flat, and refused by current scipy, which rejects
    the repeated FAR values), this takes the largest grid threshold whose training FAR does not exceed
    ``far_target``.
    """
    if isinstance(n_folds, bool) or not isinstance(n_folds, int) or n_folds < 1:
        raise ValueError(f"n_folds must be a positive integer, got {n_folds!r}")
    if not 0.0 < far_target < 1.0:
        raise ValueError(f"far_target must be in (0, 1), got {far_target}")
    first, second, flags = _pairs(embeddings, issame)
    num_pairs = flags.size
    if num_pairs < n_folds:
        raise ValueError(f"{n_folds}-fold evaluation needs at least {n_folds} pairs, got {num_pairs}")
    # summed squares rather than 2 - 2·cos: identical embeddings are then exactly 0 apart, as in insightface
    distance = np.square(first - second).sum(axis=1)

    fold_accuracy = np.zeros(n_folds)
    fold_threshold = np.zeros(n_folds)
    fold_val = np.zeros(n_folds)
    fold_far = np.zeros(n_folds)
    for fold, (train, test) in enumerate(_folds(num_pairs, n_folds)):
        # np.argmax takes the first best threshold, as insightface does
        best = ACCURACY_THRESHOLDS[np.argmax(_accuracy(distance[train], flags[train], ACCURACY_THRESHOLDS))]
        fold_threshold[fold] = best
        fold_accuracy[fold] = _accuracy(distance[test], flags[test], np.array([best]))[0]

        _, train_far = _val_far(distance[train], flags[train], VAL_THRESHOLDS)
        # train_far never decreases with the threshold, and is 0 at threshold 0
        val_threshold = VAL_THRESHOLDS[np.searchsorted(train_far, far_target, side="right") - 1]
        test_val, test_far = _val_far(distance[test], flags[test], np.array([val_threshold]))
        fold_val[fold], fold_far[fold] = test_val[0], test_far[0]

    return {
        "accuracy": float(fold_accuracy.mean()),
        "std": float(fold_accuracy.std()),
        "threshold": float(fold_threshold.mean()),
        "fold_accuracy": fold_accuracy,
        "fold_threshold": fold_threshold,
        "val": float(fold_val.mean()),
        "val_std": float(fold_val.std()),
        "far": float(fold_far.mean()),
        "far_target": far_target,
        "num_pairs": num_pairs,
    }


def roc_curve(
    embeddings: np.ndarray | torch.Tensor, issame: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of the cosine similarity over all pairs: ``(fpr, tpr, thresholds)`` from ``sklearn.metrics.roc_curve``.

    Thresholds are cosine similarities in decreasing order (the first is ``inf``); a pair is accepted when
    its similarity is at least the threshold. Both same and different pairs must be present.
    """
    return _roc_from_pairs(*_similarities(embeddings, issame))


def _roc_from_pairs(similarity: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``sklearn.metrics.roc_curve`` of checked pairs, refusing a set without both kinds of pair."""
    num_same = int(issame.sum())
    if num_same == 0 or num_same == issame.size:
        raise ValueError(
            f"a ROC curve needs both same and different pairs, got {num_same} same of {issame.size} pairs"
        )
    fpr, tpr, thresholds = metrics.roc_curve(issame, similarity)
    return fpr, tpr, thresholds


def roc_auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under a ROC curve given as increasing ``fpr`` with its ``tpr`` (trapezoidal rule)."""
    return float(metrics.auc(fpr, tpr))


def _tar_from_roc(
    fpr: np.ndarray, tpr: np.ndarray, num_diff: int, far_targets: Sequence[float]
) -> dict[float, float]:
    """Best TAR with FAR <= target on a ROC curve; NaN where fewer than 1/target different pairs exist.

    With fewer than 1/target different pairs a single false accept already exceeds the target, so the
    number would only say how many same pairs beat every different pair.
    """
    tar: dict[float, float] = {}
    for target in far_targets:
        if not 0.0 < target < 1.0:
            raise ValueError(f"FAR targets must be in (0, 1), got {target}")
        if num_diff < math.ceil(1.0 / target - 1e-9):
            tar[target] = float("nan")
            continue
        # fpr is non-decreasing and starts at 0, so the prefix with fpr <= target is never empty
        reachable = np.searchsorted(fpr, target, side="right")
        tar[target] = float(tpr[:reachable].max())
    return tar


def tar_at_far(
    embeddings: np.ndarray | torch.Tensor,
    issame: ArrayLike,
    far_targets: Sequence[float] = DEFAULT_FAR_TARGETS,
) -> dict[float, float]:
    """True accept rate at each false accept rate in ``far_targets``, on cosine similarity over all pairs.

    TAR@FAR is the largest true accept rate of any threshold whose FAR does not exceed the target. A
    target needs at least ``1/target`` different pairs to be measurable; below that its value is NaN.
    """
    similarity, flags = _similarities(embeddings, issame)
    fpr, tpr, _ = _roc_from_pairs(similarity, flags)
    return _tar_from_roc(fpr, tpr, int((~flags).sum()), far_targets)


def embed_images(
    model: torch.nn.Module,
    images: Sequence[bytes],
    *,
    image_size: int,
    batch_size: int = 64,
    device: torch.device | str,
    progress: bool = True,
    normalize: str = "mxnet",
) -> np.ndarray:
    """Embed encoded images with the flip trick: ``f(x) + f(flip(x))`` per image, as float32 [N, D].

    The model runs in eval mode under ``torch.no_grad()`` and is put back in its previous mode afterwards.
    Images are decoded with :func:`facekd.data.loader.decode_image` (RGB, normalised as the network was
    trained: ``normalize`` is its ``model.normalize``, ``(x - 127.5) / 128`` by default), resized
    to ``image_size``. Each batch holds ``batch_size`` images and is run twice, once flipped, so memory
    stays that of one ``batch_size`` forward. The sum is not normalised: the metrics here normalise.
    """
    from facekd.data.loader import decode_image  # the loader pulls in the data pipeline; import on use

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(images) == 0:
        raise ValueError("images is empty: nothing to embed")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    chunks: list[np.ndarray] = []
    try:
        with torch.no_grad():
            starts = range(0, len(images), batch_size)
            for start in tqdm(starts, desc="embedding", unit="batch", disable=not progress):
                batch = torch.stack([decode_image(image, image_size, normalize) for image in images[start : start + batch_size]])
                batch = batch.to(device, non_blocking=True)
                embedding = model(batch)
                if not isinstance(embedding, torch.Tensor) or embedding.ndim != 2 or embedding.shape[0] != len(batch):
                    shape = tuple(embedding.shape) if isinstance(embedding, torch.Tensor) else type(embedding).__name__
                    raise ValueError(f"model must return a [{len(batch)}, D] embedding tensor, got {shape}")
                embedding = embedding + model(batch.flip(-1))
                chunks.append(embedding.float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(chunks)


def evaluate_bin(
    model: torch.nn.Module,
    bin_path: str | Path,
    *,
    image_size: int,
    batch_size: int = 64,
    device: torch.device | str,
    n_folds: int = 10,
    model_name: str | None = None,
    far_targets: Sequence[float] = DEFAULT_FAR_TARGETS,
    progress: bool = True,
    normalize: str = "mxnet",
) -> dict[str, Any]:
    """Evaluate ``model`` on an insightface verification ``.bin`` file (images normalised by ``normalize``, the
    network's ``model.normalize``).

    Returns :func:`verification_accuracy`'s keys plus ``model`` (``model_name`` or the model's class
    name), ``dataset`` (the file's stem), ``fpr``/``tpr``/``roc_thresholds`` (:func:`roc_curve`),
    ``auc``, ``tar_at_far`` ({target: TAR}), ``embed_seconds`` and ``images_per_second`` (decoding and
    both flips included, measured around :func:`embed_images`).
    """
    from facekd.data.verification import load_bin  # keeps eval importable without the data stack

    bin_path = Path(bin_path)
    images, issame = load_bin(bin_path)
    start = time.perf_counter()
    embeddings = embed_images(
        model, images, image_size=image_size, batch_size=batch_size, device=device, progress=progress,
        normalize=normalize,
    )
    embed_seconds = time.perf_counter() - start

    result = verification_accuracy(embeddings, issame, n_folds)
    similarity, flags = _similarities(embeddings, issame)
    fpr, tpr, roc_thresholds = _roc_from_pairs(similarity, flags)
    result.update(
        model=model_name if model_name is not None else type(model).__name__,
        dataset=bin_path.stem,
        fpr=fpr,
        tpr=tpr,
        roc_thresholds=roc_thresholds,
        auc=roc_auc(fpr, tpr),
        tar_at_far=_tar_from_roc(fpr, tpr, int((~flags).sum()), far_targets),
        embed_seconds=embed_seconds,
        images_per_second=len(images) / embed_seconds if embed_seconds > 0 else float("inf"),
    )
    return result


def _curve_label(row: Mapping[str, Any], index: int) -> str:
    """Legend/table name of a result: ``model`` and ``dataset`` when present."""
    parts = [str(row[key]) for key in ("model", "dataset") if key in row]
    return " / ".join(parts) if parts else f"curve {index}"


def plot_roc(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]] | Sequence[Mapping[str, Any]],
    path: str | Path,
    title: str = "ROC",
) -> Path:
    """Draw ROC curves on one PNG with a log-scale FAR axis; the legend gives AUC (and accuracy if known).

    Args:
        curves: ``{label: (fpr, tpr)}``, or result dicts with ``fpr`` and ``tpr`` (as :func:`evaluate_bin`
            returns; labelled by ``model``/``dataset``, with ``accuracy`` shown when present).
        path: PNG to write; its folder is created.
        title: the plot title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(curves, Mapping):
        entries = [(str(label), np.asarray(fpr), np.asarray(tpr), None) for label, (fpr, tpr) in curves.items()]
    else:
        entries = []
        for index, row in enumerate(curves):
            missing = [key for key in ("fpr", "tpr") if key not in row]
            if missing:
                raise ValueError(f"result {index} for plot_roc lacks {missing}; it has {sorted(row)}")
            fpr, tpr = np.asarray(row["fpr"]), np.asarray(row["tpr"])
            entries.append((_curve_label(row, index), fpr, tpr, row.get("accuracy")))
    if not entries:
        raise ValueError("plot_roc needs at least one curve, got none")

    # Agg canvas on a bare Figure: no pyplot, so no global backend switch and no figure registry
    figure = Figure(figsize=(9.6, 4.8), dpi=120)
    FigureCanvasAgg(figure)
    axes: Axes = figure.add_subplot()
    smallest_far = 1.0
    for label, fpr, tpr, accuracy in entries:
        if fpr.shape != tpr.shape or fpr.ndim != 1:
            raise ValueError(f"curve {label!r}: fpr and tpr must be 1-D of one length, got {fpr.shape} and {tpr.shape}")
        legend = f"{label} (AUC {roc_auc(fpr, tpr):.4f}"
        legend += f", acc {100 * accuracy:.2f}%)" if accuracy is not None else ")"
        axes.step(fpr, tpr, where="post", label=legend)
        positive = fpr[fpr > 0]
        if positive.size:
            smallest_far = min(smallest_far, float(positive.min()))
    axes.set_xscale("log")
    # below the smallest measurable FAR (one false accept) a curve says nothing
    axes.set_xlim(smallest_far / 2, 1.0)
    axes.set_ylim(0.0, 1.005)
    axes.set_xlabel("false accept rate")
    axes.set_ylabel("true accept rate")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    # outside the axes: with several curves an inner legend hides the low-FAR region
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", borderaxespad=0.0)
    figure.tight_layout()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def _format_rate(value: float | None) -> str:
    """A rate in percent with two decimals, ``n/a`` when unknown."""
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table of verification results: model, dataset, accuracy ± std, threshold, TAR@FAR, images/s.

    Each row needs ``model``, ``accuracy``, ``std`` and ``threshold`` (add ``model`` to a
    :func:`verification_accuracy` result); ``dataset``, ``tar_at_far`` and ``images_per_second`` become
    columns when any row has them, with ``n/a`` where a row lacks one. Rates are printed in percent.
    """
    if not rows:
        raise ValueError("format_table needs at least one row, got none")
    for index, row in enumerate(rows):
        missing = [key for key in ("model", "accuracy", "std", "threshold") if key not in row]
        if missing:
            raise ValueError(f"row {index} lacks {missing}; it has {sorted(row)}")
    with_dataset = any("dataset" in row for row in rows)
    far_targets = sorted({target for row in rows for target in row.get("tar_at_far", {})}, reverse=True)
    with_speed = any("images_per_second" in row for row in rows)

    header = ["model"] + (["dataset"] if with_dataset else []) + ["accuracy (%)", "threshold"]
    header += [f"TAR@FAR={target:.0e} (%)" for target in far_targets]
    header += ["images/s"] if with_speed else []
    lines = [header]
    for row in rows:
        cells = [str(row["model"])]
        cells += [str(row.get("dataset", "n/a"))] if with_dataset else []
        cells += [f"{100 * row['accuracy']:.2f} ± {100 * row['std']:.2f}", f"{row['threshold']:.3f}"]
        cells += [_format_rate(row.get("tar_at_far", {}).get(target, float("nan"))) for target in far_targets]
        if with_speed:
            speed = row.get("images_per_second")
            cells.append("n/a" if speed is None else f"{speed:.1f}")
        lines.append(cells)

    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    rendered = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(line, widths)) + " |" for line in lines]
    rendered.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(rendered)


def evaluate_checkpoints(
    checkpoints: Sequence[str | Path],
    bins: Sequence[str | Path],
    *,
    out_dir: str | Path,
    device: str = "auto",
    batch_size: int = 128,
    names: Sequence[str] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Evaluate trained networks (``facekd train`` checkpoints or run folders) on verification ``.bin`` files.

    Writes ``out_dir/results.json`` (one row per network and file, without the curves) and
    ``out_dir/roc.png``; returns the rows with their curves. ``names`` label the networks (default: the
    job name stored in each checkpoint).
    """
    from facekd.network import load_network, resolve_device

    if not checkpoints or not bins:
        raise ValueError(f"need at least one checkpoint and one .bin, got {len(checkpoints)} and {len(bins)}")
    if names is not None and len(names) != len(checkpoints):
        raise ValueError(f"need one name per checkpoint, got {len(names)} names for {len(checkpoints)}")
    torch_device = resolve_device(device)
    rows = []
    for index, checkpoint in enumerate(checkpoints):
        network = load_network(checkpoint, torch_device, with_head=False)
        name = network.job.name if names is None else names[index]
        for bin_path in bins:
            rows.append(evaluate_bin(
                network.backbone, bin_path, image_size=network.job.data.image_size, batch_size=batch_size,
                device=torch_device, model_name=name, progress=progress, normalize=network.job.model.normalize,
            ))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curve_keys = ("fpr", "tpr", "roc_thresholds", "fold_accuracy", "fold_threshold")
    summary = [{key: value for key, value in row.items() if key not in curve_keys} for row in rows]
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    plot_roc(rows, out / "roc.png", title="verification ROC")
    return rows
