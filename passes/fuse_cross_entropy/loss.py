"""cross_entropy(linear(h, W, b), y) -> fused_linear_cross_entropy(h, W, y, b), chunked over tokens.

The training side of the ``fuse-cross-entropy`` pass (its ONNX pass is
:mod:`rewriter.passes.fuse_cross_entropy.onnx`, its fx rewrite
:mod:`rewriter.passes.fuse_cross_entropy.fx`). A language model's loss
``cross_entropy(h @ W.T + b, y)`` materializes ``[tokens x vocab]`` logits, their
log-softmax and their gradient; at 16k tokens and a 128k vocabulary that is 8 GiB each
in float32. Following Liger-Kernel (Hsu et al. 2024, arXiv 2410.10989, its fused linear
cross-entropy) and Cut Cross-Entropy (Wijmans et al. 2024, arXiv 2411.09009), the
loss walks the tokens in chunks: it computes a chunk's logits, turns them into the
softmax in place, keeps the per-token ``logsumexp`` and loss, and forms

    grad_z = softmax(z) - onehot(y)       (scaled by reduction, label smoothing, z-loss)
    grad_h = grad_z @ W,   grad_W += grad_z.T @ h,   grad_b += grad_z.sum(0)

Two schedules: for ``sum``/``mean`` (one scalar upstream gradient) the gradients are
formed in the forward pass and scaled in the backward pass (Liger-Kernel's; three
matmuls, as unfused); for ``none``, or with ``recompute=True``, the forward pass saves
only ``hidden``, ``weight``, ``target`` and the per-token ``logsumexp``, and the backward
pass recomputes each chunk's logits (Cut Cross-Entropy's; one more matmul). Nothing of
size ``tokens x vocab`` is ever held; the largest temporary is ``chunk x vocab``. Exact:
the loss and the gradients are the unfused ones up to float rounding (summation order),
1e-5 relative in float32 (the tests check it).

Per token ``i`` with logits ``z`` (``lse = logsumexp(z)``), the loss is the ONNX/torch
definition plus the optional z-loss of PaLM (Chowdhery et al. 2022) and de Brébisson &
Vincent (2016):

    loss_i = (1 - eps) (lse - z[y_i]) + eps (lse - mean_j z_j) + z_loss lse**2

zero where ``y_i == ignore_index``; reduced by ``none``/``sum``/``mean`` (mean: over the
tokens not ignored, as torch does). With class weights ``w`` (torch's ``weight=``) the
terms are torch's, ``(1 - eps) w[y_i] (lse - z[y_i]) + eps / V sum_j w_j (lse - z_j)``
(and ``z_loss w[y_i] lse**2``), and ``mean`` divides by ``sum_i w[y_i]`` over the tokens
not ignored; the gradient is ``p ((1 - eps) w[y] + eps / V sum_j w_j + 2 z_loss w[y] lse)
- (1 - eps) w[y] onehot(y) - eps w / V``. The weights get no gradient. ``fused_cross_entropy`` is the same function on
logits already computed (no weight): it saves the logits (which its caller holds anyway)
and the ``lse``, not the log-softmax that ``F.cross_entropy`` saves.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

REDUCTIONS = ("none", "sum", "mean")
# The auto chunk keeps one chunk's logits near this many elements (32 MiB in float32),
# small next to the unfused logits, but takes at least MIN_CHUNK rows: on CPU, matmuls
# thinner than ~256 rows run far below BLAS peak (at 128k vocab, 64-row chunks made
# forward+backward ~1.8x slower than 256-row ones; 256 and 1024 rows were equal).
CHUNK_ELEMENTS = 1 << 23
MIN_CHUNK = 256


def auto_chunk_size(tokens: int, vocab: int) -> int:
    """Rows per chunk so that a chunk's logits hold about ``CHUNK_ELEMENTS`` values.

    >>> auto_chunk_size(16384, 8192), auto_chunk_size(16384, 131072), auto_chunk_size(100, 131072)
    (1024, 256, 100)
    """
    rows = max(MIN_CHUNK, CHUNK_ELEMENTS // max(vocab, 1))
    return min(max(tokens, 1), 1 << (rows.bit_length() - 1))


def _chunk_logits(
    h: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """One chunk's logits in float32 (or float64): ``h @ W.T + b``, or ``h`` itself without W."""
    acc = torch.promote_types(h.dtype, torch.float32)
    if weight is None:  # a copy: the gradient is formed in place
        return h.to(acc, copy=True)
    return F.linear(h, weight, bias).to(acc)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """The chunked loss; ``weight=None`` means ``hidden`` already holds the logits.

    With ``grad_in_forward`` (Liger-Kernel's schedule; sum/mean reductions only, whose
    upstream gradient is one scalar) the forward pass also forms each chunk's
    ``grad_z`` and accumulates ``grad_h``, ``grad_W`` and ``grad_b``, and the backward
    pass scales them: three matmuls per chunk in all, as the unfused loss does. Without
    it (Cut Cross-Entropy's schedule, and always for ``reduction="none"``) the forward
    pass saves only ``hidden``, ``weight``, ``target``, ``bias`` and the per-token
    ``lse``, and the backward pass recomputes each chunk's logits (four matmuls).
    Neither saves anything of size ``tokens x vocab``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor | None,
        target: torch.Tensor,
        bias: torch.Tensor | None,
        class_weight: torch.Tensor | None,
        options: _Options,
    ) -> torch.Tensor:
        tokens = hidden.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)
        lse = torch.empty(tokens, dtype=acc, device=hidden.device)
        losses = torch.empty_like(lse)
        classes = _Classes.of(class_weight, target, options, acc)
        needs = tuple(t is not None and t.requires_grad for t in (hidden, weight, bias))
        grads = _Grads.zeros(hidden, weight, bias, acc, needs) if options.grad_in_forward else None
        # The upstream gradient of a sum/mean loss is a scalar g: grad = g * (this scale).
        scale = (1.0 / classes.total) if options.reduction == "mean" else torch.ones((), dtype=acc)
        for start in range(0, tokens, options.chunk_size):
            rows = slice(start, start + options.chunk_size)
            z = _chunk_logits(hidden[rows], weight, bias)
            # z is now softmax(z)
            lse[rows], losses[rows] = _chunk_loss(z, target[rows], options, classes.chunk(rows))
            if grads is not None:
                grad_z = _grad_logits(
                    z, lse[rows], target[rows], scale, options, classes.chunk(rows)
                )
                grads.accumulate(rows, grad_z, hidden, weight)
        ctx.options = options
        ctx.grads = grads
        ctx.classes = classes
        ctx.save_for_backward(*((hidden, weight, target, bias, lse) if grads is None else ()))
        if options.reduction == "none":
            return losses.to(hidden.dtype)
        total = losses.sum()
        return (total / classes.total if options.reduction == "mean" else total).to(hidden.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grads = _recompute(ctx, grad_output) if ctx.grads is None else ctx.grads.scaled(grad_output)
        return grads.h, grads.w, None, grads.b, None, None


@dataclasses.dataclass(frozen=True)
class _Options:
    chunk_size: int
    ignore_index: int
    reduction: str
    label_smoothing: float
    z_loss: float
    vocab: int
    grad_in_forward: bool


@dataclasses.dataclass(frozen=True)
class _Classes:
    """Class weights and what the loss needs of them: ``w`` (None: unweighted), each
    token's ``w[y]`` (0 where ignored, None unweighted), the divisor of ``mean`` (the
    tokens not ignored, or the sum of their ``w[y]``) and ``sum_j w_j``."""

    w: torch.Tensor | None
    token: torch.Tensor | None
    total: torch.Tensor
    w_sum: torch.Tensor | None

    @classmethod
    def of(
        cls, w: torch.Tensor | None, target: torch.Tensor, options: _Options, acc: torch.dtype
    ) -> _Classes:
        valid = target != options.ignore_index
        if w is None:
            return cls(None, None, valid.sum().to(acc), None)
        w = w.to(acc)
        token = torch.where(valid, w[torch.where(valid, target, 0)], 0.0)
        return cls(w, token, token.sum(), w.sum())

    def chunk(self, rows: slice) -> _Classes:
        return _Classes(
            self.w, None if self.token is None else self.token[rows], self.total, self.w_sum
        )


@dataclasses.dataclass
class _Grads:
    """Gradients of hidden, weight and bias (None where not needed), accumulated per chunk."""

    h: torch.Tensor | None
    w: torch.Tensor | None
    b: torch.Tensor | None
    dtypes: tuple[torch.dtype | None, ...]

    @classmethod
    def zeros(
        cls,
        hidden: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        acc: torch.dtype,
        needs: tuple[bool, ...],
    ) -> _Grads:
        return cls(
            torch.empty_like(hidden) if needs[0] else None,
            torch.zeros_like(weight, dtype=acc) if weight is not None and needs[1] else None,
            torch.zeros_like(bias, dtype=acc) if bias is not None and needs[2] else None,
            (
                hidden.dtype,
                None if weight is None else weight.dtype,
                None if bias is None else bias.dtype,
            ),
        )

    def accumulate(
        self, rows: slice, grad_z: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor | None
    ) -> None:
        if weight is None:  # hidden is the logits
            if self.h is not None:
                self.h[rows] = grad_z.to(self.h.dtype)
            return
        gz = grad_z.to(weight.dtype)
        if self.h is not None:
            torch.matmul(gz, weight, out=self.h[rows])
        if self.w is not None:
            self.w.addmm_(gz.T, hidden[rows])
        if self.b is not None:
            self.b += grad_z.sum(0)

    def scaled(self, grad_output: torch.Tensor | None = None) -> _Grads:
        """The gradients times the (scalar) upstream gradient, in the inputs' dtypes.

        New tensors: the saved ones stay valid for another backward (``retain_graph``).
        Without ``grad_output`` they are only cast (no copy where the dtype matches).
        """
        values = []
        for t, dtype in zip((self.h, self.w, self.b), self.dtypes, strict=True):
            if t is not None and grad_output is not None:
                t = t * grad_output.to(t.dtype)
            values.append(None if t is None else t.to(dtype))
        return _Grads(values[0], values[1], values[2], self.dtypes)


def _recompute(ctx: Any, grad_output: torch.Tensor) -> _Grads:
    """The backward pass that recomputes each chunk's logits from the saved ``lse``."""
    hidden, weight, target, bias, lse = ctx.saved_tensors
    options: _Options = ctx.options
    acc = lse.dtype
    need_h, need_w, _, need_b = ctx.needs_input_grad[:4]
    grads = _Grads.zeros(hidden, weight, bias, acc, (need_h, need_w, need_b))
    classes: _Classes = ctx.classes
    scale = grad_output.to(acc)
    if options.reduction == "mean":
        scale = scale / classes.total
    for start in range(0, hidden.shape[0], options.chunk_size):
        rows = slice(start, start + options.chunk_size)
        p = torch.exp_(_chunk_logits(hidden[rows], weight, bias).sub_(lse[rows, None]))
        row_scale = scale[rows] if options.reduction == "none" else scale
        grad_z = _grad_logits(p, lse[rows], target[rows], row_scale, options, classes.chunk(rows))
        grads.accumulate(rows, grad_z, hidden, weight)
    return grads.scaled()


def _grad_logits(
    p: torch.Tensor,
    lse: torch.Tensor,
    target: torch.Tensor,
    scale: torch.Tensor,
    options: _Options,
    classes: _Classes,
) -> torch.Tensor:
    """d loss / d z of one chunk from its softmax ``p``, overwritten:
    ``p (1 + 2 z_loss lse) - (1 - eps) onehot(y) - eps / V``, times ``scale``; with
    class weights ``p ((1 - eps) w[y] + eps/V sum w + 2 z_loss w[y] lse) - (1 - eps) w[y]
    onehot(y) - eps w / V``."""
    eps = options.label_smoothing
    valid = target != options.ignore_index
    picked = torch.where(valid, target, 0)[:, None]
    if classes.w is None or classes.token is None or classes.w_sum is None:
        if options.z_loss:
            p.mul_(1.0 + 2.0 * options.z_loss * lse[:, None])
        p.scatter_add_(1, picked, p.new_full(picked.shape, eps - 1.0))
        if eps:
            p.sub_(eps / options.vocab)
    else:
        token = classes.token
        p.mul_(
            (
                (1.0 - eps) * token
                + eps / options.vocab * classes.w_sum
                + 2.0 * options.z_loss * token * lse
            )[:, None]
        )
        p.scatter_add_(1, picked, ((eps - 1.0) * token)[:, None])
        if eps:
            p.sub_(classes.w * (eps / options.vocab))
    return p.mul_(torch.where(valid, scale, 0.0)[:, None])


def _chunk_loss(
    z: torch.Tensor, target: torch.Tensor, options: _Options, classes: _Classes
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse, per-token loss)`` of one chunk (loss 0 at ignored tokens); turns ``z`` into
    ``softmax(z)`` in place (max-shifted: ``lse = m + log sum exp(z - m)``)."""
    eps = options.label_smoothing
    valid = target != options.ignore_index
    picked = z.gather(1, torch.where(valid, target, 0)[:, None])[:, 0]
    # The smoothing term's sum over classes, eps/V sum_j w_j (lse - z_j), without lse.
    smoothing = None
    if eps:
        smoothing = z.mean(1) if classes.w is None else z @ classes.w / options.vocab
    row_max = z.amax(1)
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)  # all -inf rows: no shift
    total = torch.exp_(z.sub_(row_max[:, None])).sum(1)
    z.div_(total[:, None])
    lse = row_max + torch.log(total)
    token = 1.0 if classes.token is None else classes.token
    loss = (1.0 - eps) * token * (lse - picked)
    if smoothing is not None:
        w_mean = 1.0 if classes.w_sum is None else classes.w_sum / options.vocab
        loss = loss + eps * (w_mean * lse - smoothing)
    if options.z_loss:
        loss = loss + options.z_loss * token * lse * lse
    return lse, torch.where(valid, loss, 0.0)


def _options(
    tokens: int,
    vocab: int,
    chunk_size: int | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    recompute: bool,
    inputs: tuple[torch.Tensor | None, ...],
    class_weight: torch.Tensor | None,
) -> _Options:
    _check(reduction, label_smoothing, chunk_size)
    if class_weight is not None:
        if class_weight.shape != (vocab,):
            raise ValueError(
                f"class_weight must have shape ({vocab},), got {tuple(class_weight.shape)}"
            )
        if torch.is_grad_enabled() and class_weight.requires_grad:
            raise ValueError(
                "class_weight requires grad: the fused loss gives class weights no gradient"
            )
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    return _Options(
        chunk_size=chunk_size or auto_chunk_size(tokens, vocab),
        ignore_index=int(ignore_index),
        reduction=reduction,
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        vocab=vocab,
        grad_in_forward=wants_grad and reduction != "none" and not recompute,
    )


def _check(reduction: str, label_smoothing: float, chunk_size: int | None) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    class_weight: torch.Tensor | None = None,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    recompute: bool = False,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), target, weight=class_weight)`` without the full logits.

    ``hidden`` is ``[..., H]`` (flattened to ``[tokens, H]``), ``weight`` is ``[V, H]``
    (``nn.Linear``'s layout), ``target`` holds one class per token, ``class_weight``
    (optional, ``[V]``) weighs each class as torch's ``weight=`` does. ``chunk_size`` rows
    are processed at a time (default: :func:`auto_chunk_size`). ``z_loss`` adds
    ``z_loss * logsumexp(z)**2`` per token. ``reduction="none"`` returns ``target``'s shape.
    Gradients are formed during the forward pass (Liger-Kernel) for ``sum``/``mean``;
    ``recompute=True`` (always for ``none``) saves only the per-token logsumexp and
    recomputes the logits in the backward pass (Cut Cross-Entropy): less memory held
    between the passes (no ``grad_W``), one more matmul.

    >>> h, w, y = torch.randn(6, 4), torch.randn(10, 4), torch.tensor([1, 2, 3, 4, 5, -100])
    >>> loss = fused_linear_cross_entropy(h, w, y, chunk_size=4)
    >>> torch.allclose(loss, F.cross_entropy(h @ w.T, y))
    True
    """
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_t = target.reshape(-1)
    if flat_h.shape[0] != flat_t.shape[0]:
        raise ValueError(f"{flat_h.shape[0]} tokens of hidden states but {flat_t.shape[0]} targets")
    options = _options(
        flat_h.shape[0],
        weight.shape[0],
        chunk_size,
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        recompute,
        (flat_h, weight, bias),
        class_weight,
    )
    loss = _FusedLinearCrossEntropy.apply(flat_h, weight, flat_t, bias, class_weight, options)
    return loss.reshape(target.shape) if reduction == "none" else loss


def fused_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    class_weight: torch.Tensor | None = None,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    recompute: bool = False,
) -> torch.Tensor:
    """``F.cross_entropy(logits, target, weight=class_weight)`` (class axis 1) saving ``logsumexp`` instead of the log-softmax.

    >>> z, y = torch.randn(5, 7), torch.tensor([0, 1, 2, 3, 4])
    >>> torch.allclose(fused_cross_entropy(z, y, reduction="sum"), F.cross_entropy(z, y, reduction="sum"))
    True
    """
    if logits.dim() == 1:  # one sample, no batch axis
        return fused_cross_entropy(
            logits[None],
            target.reshape(1),
            class_weight=class_weight,
            chunk_size=chunk_size,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            recompute=recompute,
        ).reshape(target.shape)
    classes = logits.shape[1]
    flat = logits.movedim(1, -1).reshape(-1, classes)
    options = _options(
        flat.shape[0],
        classes,
        chunk_size,
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        recompute,
        (flat,),
        class_weight,
    )
    loss = _FusedLinearCrossEntropy.apply(
        flat, None, target.reshape(-1), None, class_weight, options
    )
    return loss.reshape(target.shape) if reduction == "none" else loss
