"""The arithmetic of pruning, shared by the ONNX passes and the fx front.

* Magnitude pruning: zero the ``round(a * N)`` weights of smallest magnitude.
* Layer-adaptive allocation (Xu et al., "Efficient Joint Optimization of
  Layer-Adaptive Weight Pruning in Deep Neural Networks", ICCV 2023,
  arXiv 2308.10438): given each layer's distortion curve ``D_l(a)`` on a grid of
  amounts, minimize ``sum_l D_l(a_l)`` subject to the kept parameters
  ``sum_l (1 - a_l) N_l <= (1 - s) sum_l N_l`` by an exact dynamic program over
  layers and the parameter budget (:func:`allocate_rd`), and the two baselines
  (:func:`allocate_uniform`, :func:`allocate_global_magnitude`).
* 2:4 semi-structured sparsity: in each group of 4 consecutive weights along the
  input dimension keep the 2 of largest magnitude (:func:`two_four_mask`).
* MAW width pruning of MLPs (arXiv 2512.22671): channel ``k`` scores
  ``sum_W max_i |W[i, k]|`` over the matrices that produce it (:func:`maw_scores`).

Everything here is numpy on plain arrays; the fronts only find the layers and
measure the curves.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from functools import reduce

import numpy as np

from rewriter.errors import InputError

# The DP budget is counted in units of the gcd of all kept-parameter counts (exact);
# when that needs more bins than this, in units of budget / MAX_BINS rounded up
# (costs rounded up, so the budget still holds; the optimum may lose < L units).
MAX_BINS = 1 << 15


def amount_grid(max_amount: float = 0.95, steps: int = 32) -> np.ndarray:
    """The pruning amounts ``0, 1/steps, ...`` up to ``max_amount``.

    >>> amount_grid(0.5, 4).tolist()
    [0.0, 0.25, 0.5]
    """
    if steps < 1 or not 0.0 <= max_amount < 1.0:
        raise InputError(
            f"pruning grid needs steps >= 1 and 0 <= max_amount < 1, got {steps}, {max_amount}"
        )
    count = math.floor(max_amount * steps + 1e-9)
    return np.arange(count + 1, dtype=np.float64) / steps


def pruned_count(params: int, amount: float) -> int:
    """How many of ``params`` weights pruning by ``amount`` zeroes."""
    return min(params, int(round(amount * params)))


def magnitude_order(weight: np.ndarray) -> np.ndarray:
    """Flat indices of ``weight`` from smallest to largest magnitude (stable)."""
    return np.argsort(np.abs(weight.astype(np.float32, copy=False)).ravel(), kind="stable")


def magnitude_prune(weight: np.ndarray, count: int) -> np.ndarray:
    """A copy of ``weight`` with its ``count`` smallest-magnitude entries zeroed.

    >>> magnitude_prune(np.array([3.0, -1.0, 2.0]), 2).tolist()
    [3.0, 0.0, 0.0]
    """
    pruned = np.array(weight, copy=True)
    if count > 0:
        pruned.reshape(-1)[magnitude_order(weight)[:count]] = 0
    return pruned


@dataclasses.dataclass(frozen=True)
class Allocation:
    """Per layer: the weights to zero (counts), and the DP's choice on the grid if any."""

    counts: list[int]
    amounts: list[float]
    distortion: list[float] | None = None


def monotone(curves: np.ndarray) -> np.ndarray:
    """Running maximum along the amounts: pruning more never measures as better.

    Measured curves wiggle by noise at small amounts; without this the DP could
    prune a layer beyond its budget share just to gain noise.
    """
    return np.maximum.accumulate(np.asarray(curves, dtype=np.float64), axis=-1)


def allocate_rd(
    curves: np.ndarray,
    params: Sequence[int],
    amounts: np.ndarray,
    sparsity: float,
    *,
    zeros: Sequence[int] | None = None,
    max_bins: int = MAX_BINS,
) -> Allocation:
    """The amounts minimizing total distortion under the global sparsity target (exact DP).

    ``curves[l, j]`` is layer ``l``'s distortion pruned by ``amounts[j]``; ``zeros``
    the weights each layer already has at zero (they stay zero, so a smaller amount
    keeps no more). ``dp[l][w] = min_j D_l(a_j) + dp[l-1][w - kept_l(a_j)]`` over the
    budget ``w`` in units, then a backtrack; among allocations of equal distortion
    the one keeping most parameters wins. Cost ``O(L * W * |A|)``.

    >>> allocate_rd(np.array([[0, 1, 9], [0, 1, 3]]), [4, 4], np.array([0, .5, 1]), 0.5).counts
    [2, 2]
    """
    curves = np.asarray(curves, dtype=np.float64)
    layers = len(params)
    if curves.shape != (layers, len(amounts)):
        raise ValueError(f"curves have shape {curves.shape}, expected {(layers, len(amounts))}")
    zeros = list(zeros) if zeros is not None else [0] * layers
    counts = np.array(
        [[max(pruned_count(n, a), z) for a in amounts] for n, z in zip(params, zeros, strict=True)],
        dtype=np.int64,
    ).reshape(layers, len(amounts))
    kept = np.asarray(params, dtype=np.int64)[:, None] - counts
    total = int(sum(params))
    budget = total - int(round(sparsity * total))
    unit = reduce(math.gcd, kept.ravel().tolist(), 0) or 1
    if budget // unit > max_bins:
        unit = -(-budget // max_bins)
    cost = -(-kept // unit)  # ceil: rounding never lets the budget overflow
    bins = budget // unit
    if int(cost.min(axis=1).sum()) > bins:
        most = 1 - int(kept.min(axis=1).sum()) / total if total else 0.0
        raise InputError(
            f"sparsity {sparsity:g} is not reachable: the grid prunes at most {amounts[-1]:g} "
            f"of a layer, {most:.4f} overall (raise max_amount)"
        )
    dp = np.zeros(bins + 1)  # dp[w]: least distortion using at most w units
    choices = np.zeros((layers, bins + 1), dtype=np.int32)
    for layer in range(layers):
        best = np.full(bins + 1, np.inf)
        pick = np.zeros(bins + 1, dtype=np.int32)
        for j in range(len(amounts)):
            c = int(cost[layer, j])
            if c > bins:
                continue
            candidate = np.full(bins + 1, np.inf)
            candidate[c:] = curves[layer, j] + dp[: bins + 1 - c]
            better = candidate < best
            best[better], pick[better] = candidate[better], j
        dp, choices[layer] = best, pick
    # dp is non-increasing in w ("at most w units"), so dp[bins] is the optimum;
    # take the smallest w reaching it, then backtrack. Equal-distortion choices are
    # resolved towards smaller amounts by the strict `<` above (j ascending).
    w = bins
    chosen = [0] * layers
    for layer in reversed(range(layers)):
        j = int(choices[layer, w])
        chosen[layer] = j
        w -= int(cost[layer, j])
    _fill_slack(chosen, curves, kept, budget)
    return Allocation(
        counts=[int(counts[layer, j]) for layer, j in enumerate(chosen)],
        amounts=[float(amounts[j]) for j in chosen],
        distortion=[float(curves[layer, j]) for layer, j in enumerate(chosen)],
    )


def _fill_slack(chosen: list[int], curves: np.ndarray, kept: np.ndarray, budget: int) -> None:
    """Step layers back to smaller amounts while the budget allows and distortion does not grow.

    The DP's unit rounding can leave budget unused. Undoing a pruning step that the
    curve says costs nothing (``D[j-1] <= D[j]``, true of monotone curves) keeps the
    optimum and leaves less than one grid step of any layer unused, so the sparsity
    reached is within one grid step of the target.
    """
    used = int(sum(kept[layer, j] for layer, j in enumerate(chosen)))
    changed = True
    while changed:
        changed = False
        for layer, j in enumerate(chosen):
            if j == 0 or curves[layer, j - 1] > curves[layer, j]:
                continue
            extra = int(kept[layer, j - 1] - kept[layer, j])
            if used + extra <= budget:
                chosen[layer], used, changed = j - 1, used + extra, True


def allocate_uniform(params: Sequence[int], sparsity: float) -> Allocation:
    """Every layer pruned by ``sparsity``.

    >>> allocate_uniform([10, 4], 0.5).counts
    [5, 2]
    """
    return Allocation(
        counts=[pruned_count(n, sparsity) for n in params], amounts=[sparsity] * len(params)
    )


def allocate_global_magnitude(weights: Sequence[np.ndarray], sparsity: float) -> Allocation:
    """One magnitude threshold over all layers: the ``s * N`` smallest weights anywhere.

    >>> allocate_global_magnitude([np.array([1.0, 5.0]), np.array([2.0, 3.0])], 0.5).counts
    [1, 1]
    """
    magnitudes = np.concatenate([np.abs(w.astype(np.float32, copy=False)).ravel() for w in weights])
    total = magnitudes.size
    count = int(round(sparsity * total))
    owner = np.repeat(np.arange(len(weights)), [w.size for w in weights])
    counts = np.zeros(len(weights), dtype=np.int64)
    if count > 0:
        # The count-th smallest magnitude by partition (linear time, not a full sort);
        # ties at the threshold go to the layers listed first.
        threshold = np.partition(magnitudes, count - 1)[count - 1]
        below = magnitudes < threshold
        counts = np.bincount(owner[below], minlength=len(weights))
        ties = np.flatnonzero(magnitudes == threshold)[: count - int(below.sum())]
        counts += np.bincount(owner[ties], minlength=len(weights))
    return Allocation(
        counts=[int(c) for c in counts],
        amounts=[int(c) / w.size for c, w in zip(counts, weights, strict=True)],
    )


def distortion_features(
    values: Sequence[np.ndarray], mask: np.ndarray | None, kind: str
) -> list[np.ndarray]:
    """What a distortion compares, per output: its real tokens (``mse``) or pooled vectors (``pooled``).

    With a ``[batch, seq]`` attention ``mask`` and an output ``[batch, seq, ...]``,
    ``mse`` keeps the positions the mask keeps (padding carries no meaning) and
    ``pooled`` takes the mask-weighted mean over positions (a sentence embedding).
    Other outputs are compared whole.
    """
    features = []
    for value in values:
        value = np.asarray(value, dtype=np.float64)
        if mask is not None and value.ndim >= 3 and value.shape[:2] == mask.shape:
            keep = np.asarray(mask) != 0
            if kind == "pooled":
                weights = keep.astype(np.float64).reshape(keep.shape + (1,) * (value.ndim - 2))
                value = (value * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1.0)
            else:
                value = value[keep]
        features.append(value)
    return features


def relative_error(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """Sum over outputs of ``mean((ref - cand)^2) / mean(ref^2)``: outputs of any scale add up.

    >>> relative_error([np.array([1.0, 1.0])], [np.array([1.0, 0.0])])
    0.5
    """
    total = 0.0
    for ref, cand in zip(reference, candidate, strict=True):
        total += float(np.mean((ref - cand) ** 2)) / max(float(np.mean(ref * ref)), 1e-30)
    return total


def two_four_mask(weight: np.ndarray, axis: int) -> np.ndarray:
    """Boolean mask keeping the 2 largest-magnitude weights of every 4 consecutive along ``axis``.

    ``weight.shape[axis]`` must be a multiple of 4. Ties keep the earlier weight.

    >>> two_four_mask(np.array([[1.0], [-4.0], [3.0], [0.5]]), 0).ravel().tolist()
    [False, True, True, False]
    """
    moved = np.moveaxis(np.abs(weight.astype(np.float32)), axis, -1)
    if moved.shape[-1] % 4:
        raise ValueError(f"axis {axis} has size {moved.shape[-1]}, not a multiple of 4")
    groups = moved.reshape(*moved.shape[:-1], -1, 4)
    # Rank within each group, larger first, ties by position: keep ranks 0 and 1.
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :2], True, axis=-1)
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


def maw_scores(matrices: Sequence[tuple[np.ndarray, int]]) -> np.ndarray:
    """MAW channel scores: ``sum over (W, axis) of max |W|`` along every axis but ``axis``.

    ``axis`` is the channel axis of each matrix (1 for a MatMul weight ``[in, hidden]``).

    >>> maw_scores([(np.array([[1.0, -3.0], [2.0, 0.0]]), 1)]).tolist()
    [2.0, 3.0]
    """
    scores: np.ndarray | None = None
    for weight, axis in matrices:
        moved = np.moveaxis(np.abs(weight.astype(np.float64)), axis, 0)
        score = moved.reshape(moved.shape[0], -1).max(axis=1)
        scores = score if scores is None else scores + score
    assert scores is not None
    return scores


def l2_scores(matrices: Sequence[tuple[np.ndarray, int]]) -> np.ndarray:
    """Norm channel scores (the usual peer of MAW): ``sum over (W, axis) of ||W||_2`` along every axis but ``axis``.

    >>> l2_scores([(np.array([[3.0, 0.0], [4.0, 1.0]]), 1)]).tolist()
    [5.0, 1.0]
    """
    scores: np.ndarray | None = None
    for weight, axis in matrices:
        moved = np.moveaxis(weight.astype(np.float64), axis, 0)
        score = np.linalg.norm(moved.reshape(moved.shape[0], -1), axis=1)
        scores = score if scores is None else scores + score
    assert scores is not None
    return scores


CHANNEL_CRITERIA = {"maw": maw_scores, "l2": l2_scores}


def channel_criterion(name: str) -> Callable[[Sequence[tuple[np.ndarray, int]]], np.ndarray]:
    """The channel score function called ``name``; an unknown name is an InputError."""
    if name not in CHANNEL_CRITERIA:
        raise InputError(f"prune-width: criterion must be one of {', '.join(CHANNEL_CRITERIA)}, got {name!r}")
    return CHANNEL_CRITERIA[name]


def allocation_stats(counts: Sequence[int], zeroed: int, total: int, seconds: float) -> dict[str, int]:
    """The statistics both fronts of ``prune`` report for an applied allocation."""
    return {
        "layers_pruned": sum(1 for count in counts if count > 0),
        "layers_dense": sum(1 for count in counts if count == 0),
        "params_total": total,
        "params_zeroed": zeroed,
        "sparsity_permille": round(1000 * zeroed / total),
        "allocation_ms": round(1000 * seconds),
    }


def channels_to_keep(scores: np.ndarray, ratio: float, *, multiple: int = 1) -> np.ndarray:
    """Sorted indices of the channels kept when the ``ratio`` lowest-scoring ones go.

    The kept count is rounded down to a ``multiple`` (at least ``multiple``, or 1).

    >>> channels_to_keep(np.array([3.0, 1.0, 2.0, 0.0]), 0.5).tolist()
    [0, 2]
    """
    size = scores.size
    keep = size - int(round(ratio * size))
    if multiple > 1:
        keep = max(multiple, keep // multiple * multiple)
    keep = max(1, min(size, keep))
    best = np.argsort(-scores, kind="stable")[:keep]
    return np.sort(best)
