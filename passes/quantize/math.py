"""The math of layer-wise quantization, shared by the ONNX pass and the fx front.

Weights are quantized symmetrically: ``q = clip(round(w / s), -2**(b-1), 2**(b-1) - 1)``
with ``s = max|w| / (2**(b-1) - 1)`` over one output channel (per channel) or over a
group of ``group_size`` consecutive weights of one output channel along the reduction
axis (per group). Dequantization is ``w' = q * s``, so ``|w - w'| <= s / 2``.

Layer importance and allocation follow Dumitru et al., "Layer-Wise Quantization"
(2024, arXiv 2406.17415):

* LIM (layer input modification): ``-cos(h_in, h_out)`` of a layer's input and output
  hidden states, averaged over tokens. A layer that changes its input more matters more.
* ZD (z-score distribution): the share of a layer's weights with ``|w - mean| / std > 1``.
  The paper ranks by it with "smaller is better"; we read that as *a smaller share
  means a more important layer*: a heavy-tailed weight distribution (outliers inflate
  ``std``, so fewer weights lie beyond one ``std``) is the one whose quantization step,
  set by ``max|w|``, is coarsest for the bulk of its weights. So ``zd_importance``
  returns ``-share`` and, as for every score here, higher means more important.
* Allocation: rank the layers, then move the least important ones to the low width
  until the average bits per weight is at most the target. The bits are those the file
  stores (:func:`storage_bits`): the integer width plus the weight's share of its
  float32 scale, so the target is a size: ``avg_bits=5`` is as large as uniform int4
  with a scale per 32 weights, and a mix has to beat that to be worth it.

>>> q, s = quantize_weight(np.array([[0.5, -1.0], [1.0, 0.25]]), bits=8, axis=1)
>>> q.tolist(), [round(float(x), 5) for x in s]
([[64, -127], [127, 32]], [0.00787, 0.00787])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

SUPPORTED_BITS = (4, 8)
IMPORTANCE = ("lim", "zd", "random")


def qrange(bits: int) -> tuple[int, int]:
    """The signed integer range of ``bits``: (-2**(bits-1), 2**(bits-1) - 1)."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def quantize_weight(
    weight: np.ndarray,
    *,
    bits: int,
    axis: int,
    group_size: int = 0,
    group_axis: int | None = None,
    clip: str = "none",
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantization of ``weight``: integer values (int8 array) and float32 scales.

    ``axis`` is the output-channel axis. Without ``group_size`` the scales have one
    entry per output channel (shape ``[weight.shape[axis]]``, as DequantizeLinear's
    per-axis form). With ``group_size`` the scales have ``weight``'s shape with
    ``group_axis`` (the reduction axis) divided by ``group_size`` (DequantizeLinear's
    blocked form, ``axis=group_axis, block_size=group_size``).

    ``clip="mse"`` picks, per channel or group, the range ``r * max|w|`` with ``r`` in
    :data:`CLIP_RATIOS` that minimizes the squared error (weights beyond it saturate);
    ``"none"`` uses ``max|w|``, so every weight is within half a step.

    >>> q, s = quantize_weight(np.ones((4, 2)), bits=4, axis=1, group_size=2, group_axis=0)
    >>> q.shape, s.shape
    ((4, 2), (2, 2))
    """
    low, high = qrange(bits)
    w = np.asarray(weight, dtype=np.float64)
    if group_size:
        assert group_axis is not None and w.shape[group_axis] % group_size == 0
        moved = np.moveaxis(w, group_axis, 0)
        view = moved.reshape(moved.shape[0] // group_size, group_size, *moved.shape[1:])
        reduce: tuple[int, ...] = (1,)
    else:
        view = w
        reduce = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    peak = np.abs(view).max(axis=reduce, keepdims=True)
    scale = _best_scale(view, peak, low, high, reduce, clip)
    q = np.clip(np.round(view / scale), low, high)
    if group_size:
        assert group_axis is not None
        q = np.moveaxis(q.reshape(moved.shape), 0, group_axis)
        scale = np.moveaxis(scale.squeeze(1), 0, group_axis)
    else:
        scale = scale.reshape(-1)
    return q.astype(np.int8), scale.astype(np.float32)


def activation_range(
    arrays: Sequence[np.ndarray], calibrate: str, percentile: float = 99.99
) -> tuple[float, float]:
    """The calibrated ``(low, high)`` of an activation seen as ``arrays``, widened to include 0.

    ``calibrate="minmax"``: the extremes; ``"percentile"``: the ``100 - percentile`` and
    ``percentile`` percentiles of all values together (each tail clipped).

    >>> activation_range([np.array([0.5, 2.0]), np.array([1.0])], "minmax")
    (0.0, 2.0)
    """
    if calibrate == "minmax":
        low, high = min(float(a.min()) for a in arrays), max(float(a.max()) for a in arrays)
    else:
        flat = np.concatenate([np.asarray(a, dtype=np.float32).ravel() for a in arrays])
        low, high = (float(v) for v in np.percentile(flat, [100.0 - percentile, percentile]))
    return min(low, 0.0), max(high, 0.0)


def activation_qparams(low: float, high: float, bits: int = 8) -> tuple[float, int]:
    """Asymmetric ``(scale, zero_point)`` mapping ``[low, high]`` (containing 0) onto the
    signed ``bits`` range: ``q = clip(round(x / scale) + zero_point)``.

    >>> activation_qparams(-1.0, 3.0)
    (0.01568627450980392, -64)
    """
    low_q, high_q = qrange(bits)
    scale = (high - low) / (high_q - low_q) or 1.0
    zero = int(np.clip(round(low_q - low / scale), low_q, high_q))
    return scale, zero


# The clipping ratios ``clip="mse"`` tries (1.0 is the unclipped range).
CLIP_RATIOS = tuple(float(r) for r in np.linspace(0.5, 1.0, 11))
CLIPS = ("none", "mse")


def _best_scale(
    view: np.ndarray, peak: np.ndarray, low: int, high: int, reduce: tuple[int, ...], clip: str
) -> np.ndarray:
    """float32 scales (broadcastable to ``view``): max|w| / high, or the MSE-best clipped one."""
    best = _scale(peak, high).astype(np.float32)
    if clip == "none":
        return best
    best_error = _error(view, best, low, high, reduce)
    for ratio in CLIP_RATIOS[:-1]:
        candidate = _scale(peak * ratio, high).astype(np.float32)
        error = _error(view, candidate, low, high, reduce)
        better = error < best_error
        best, best_error = np.where(better, candidate, best), np.where(better, error, best_error)
    return best


def _error(view: np.ndarray, scale: np.ndarray, low: int, high: int, reduce: tuple[int, ...]) -> np.ndarray:
    restored = np.clip(np.round(view / scale), low, high) * scale
    return ((restored - view) ** 2).sum(axis=reduce, keepdims=True)


def dequantize_weight(
    q: np.ndarray, scale: np.ndarray, *, axis: int, group_size: int = 0, group_axis: int | None = None
) -> np.ndarray:
    """``q * scale`` with the scales broadcast as :func:`quantize_weight` made them (float32).

    >>> dequantize_weight(np.array([[2, -1]]), np.array([0.5, 0.25]), axis=1).tolist()
    [[1.0, -0.25]]
    """
    scale = np.asarray(scale, dtype=np.float32)
    if group_size:
        assert group_axis is not None
        full = np.repeat(scale, group_size, axis=group_axis)
    else:
        full = _expand(scale, axis, q.ndim)
    return (np.asarray(q, dtype=np.float32) * full).astype(np.float32)


def _scale(peak: np.ndarray, high: int) -> np.ndarray:
    # An all-zero channel gets scale 1 (its values quantize to 0 either way).
    return np.where(peak > 0, peak / high, 1.0)


def _expand(scale: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return scale.reshape(shape)


def zd_share(weight: np.ndarray) -> float:
    """The share of weights with ``|z| > 1``, ``z = (w - mean) / std`` (0 for constant weights).

    >>> round(zd_share(np.array([0.0, 0.0, 0.0, 10.0])), 2)
    0.25
    """
    w = np.asarray(weight, dtype=np.float64).ravel()
    std = w.std()
    if std == 0:
        return 0.0
    return float(np.mean(np.abs((w - w.mean()) / std) > 1.0))


def zd_importance(weights: Sequence[np.ndarray]) -> float:
    """ZD importance of a layer made of ``weights``: minus the size-weighted ``zd_share``.

    Higher is more important (see the module docstring for the direction).
    """
    sizes = np.array([w.size for w in weights], dtype=np.float64)
    shares = np.array([zd_share(w) for w in weights])
    return -float((sizes * shares).sum() / sizes.sum())


def lim_importance(entry: np.ndarray, exit_: np.ndarray, mask: np.ndarray | None = None) -> float:
    """LIM importance: minus the mean cosine, over tokens, between a layer's input and output.

    ``entry`` and ``exit_`` are hidden states of the same shape, features on the last
    axis; with ``mask`` (the leading axes of the hidden states, nonzero = keep) only the
    kept tokens count.

    >>> round(lim_importance(np.ones((2, 3)), -np.ones((2, 3))), 6)
    1.0
    """
    a = np.asarray(entry, dtype=np.float64).reshape(-1, entry.shape[-1])
    b = np.asarray(exit_, dtype=np.float64).reshape(-1, exit_.shape[-1])
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cosine = np.where(norms > 0, (a * b).sum(axis=1) / np.where(norms > 0, norms, 1.0), 1.0)
    if mask is not None:
        keep = np.asarray(mask).reshape(-1) != 0
        if keep.size == cosine.size and keep.any():
            cosine = cosine[keep]
    return -float(cosine.mean())


def storage_bits(bits: int, weights_per_scale: int) -> float:
    """Bits of storage per weight: the integer and its share of one float32 scale.

    ``weights_per_scale`` is the group size, or for per-channel scales the weights of
    one output channel. This is what the file pays: int4 with a scale per 32 weights
    costs 5 bits per weight, as much as int4 per channel mixed 3:1 with int8.

    >>> storage_bits(4, 32), storage_bits(4, 128)
    (5.0, 4.25)
    """
    return bits + SCALE_BITS / weights_per_scale


SCALE_BITS = 32  # scales are float32


@dataclasses.dataclass(frozen=True)
class Unit:
    """What allocation moves as one: a block's weight layers (or one layer), its size and score.

    ``high_bits`` and ``low_bits`` are the unit's storage bits per weight at the high and
    the low width (:func:`storage_bits`, averaged over its layers).
    """

    name: str
    params: int
    importance: float
    high_bits: float = 8.0
    low_bits: float = 4.0


def allocate(units: Sequence[Unit], *, avg_bits: float, high: int, low: int) -> dict[str, int]:
    """Bits per unit: all at ``high``, then the least important moved to ``low`` in order
    until the storage bits per weight (scales included) are at most ``avg_bits``.

    Ties in importance keep the units' order. Units with a NaN score (not measurable)
    are never moved.

    >>> units = [Unit("a", 10, 0.9), Unit("b", 10, 0.1), Unit("c", 20, 0.5)]
    >>> allocate(units, avg_bits=6.0, high=8, low=4)
    {'a': 8, 'b': 4, 'c': 4}
    """
    bits = {unit.name: high for unit in units}
    total = sum(unit.params for unit in units)
    if total == 0:
        return bits
    stored = sum(unit.high_bits * unit.params for unit in units)
    ranked = sorted(
        (unit for unit in units if not np.isnan(unit.importance)), key=lambda unit: unit.importance
    )
    for unit in ranked:
        if stored <= avg_bits * total:
            break
        bits[unit.name] = low
        stored -= (unit.high_bits - unit.low_bits) * unit.params
    return bits


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the per-layer report; ``stored`` is the storage bits per weight."""

    layer: str
    unit: str
    params: int
    importance: float
    bits: int
    group: int = 0
    stored: float = float("nan")

    def to_json(self) -> dict[str, object]:
        return {
            "layer": self.layer,
            "block": self.unit,
            "params": self.params,
            "importance": None if np.isnan(self.importance) else round(self.importance, 6),
            "bits": self.bits,
            "group": self.group,
            "bits_per_weight": None if np.isnan(self.stored) else round(self.stored, 4),
        }


def format_table(rows: Sequence[Row]) -> list[str]:
    """The per-layer report as text lines: layer, block, params, importance, bits, and
    the storage bits per weight (scales included).

    ``block`` is ``-`` when the layer is its own unit; ``bits`` reads ``4/g32`` with
    per-group scales.

    >>> format_table([Row("fc", "fc", 64, 0.5, 8, 0, 8.5)])[1].split()
    ['fc', '-', '64', '0.5000', '8', '8.50']
    """
    width = max([len("layer")] + [len(row.layer) for row in rows])
    lines = [f"{'layer':<{width}}  {'block':<7} {'params':>9} {'importance':>10} {'bits':>7} {'bits/w':>6}"]
    for row in rows:
        importance = "-" if np.isnan(row.importance) else f"{row.importance:.4f}"
        bits = f"{row.bits}/g{row.group}" if row.group else str(row.bits)
        unit = row.unit if row.unit != row.layer else "-"
        stored = "-" if np.isnan(row.stored) else f"{row.stored:.2f}"
        lines.append(f"{row.layer:<{width}}  {unit:<7} {row.params:>9} {importance:>10} {bits:>7} {stored:>6}")
    return lines


def average_bits(params: Sequence[int], bits: Sequence[float]) -> float:
    """The parameter-weighted average of ``bits`` (widths, or storage bits per weight).

    >>> average_bits([10, 30], [8, 4])
    5.0
    """
    total = sum(params)
    return sum(p * b for p, b in zip(params, bits, strict=True)) / total if total else 0.0
