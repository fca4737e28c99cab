"""cross_entropy(linear(h, W, b), y) -> fused_linear_cross_entropy(h, W, y, b), chunked over tokens.

The training side of the ``fuse-cross-entropy`` pass (its ONNX twin is
:mod:`rewriter.passes.fuse_cross_entropy`). A language model's loss
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

:func:`rewrite_fx` finds ``F.cross_entropy``, ``nn.CrossEntropyLoss`` and
``nll_loss(log_softmax(x, 1))`` in a ``torch.fx.GraphModule`` and replaces them, fed by an
``nn.Linear`` / ``F.linear`` / ``matmul(h, W.t())`` head (optionally flattened with
``view(-1, V)``), by :func:`fused_linear_cross_entropy`, else by
:func:`fused_cross_entropy`, class weights included.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from rewriter.fx.pass_base import FxPass, FxPassResult
from rewriter.fx.registry import register_fx_pass
from rewriter.passes import fuse_cross_entropy as _onnx_pass

logger = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------------------
# The fx rewrite
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Loss:
    """A matched loss call: its logits, target and options."""

    logits: fx.Node
    target: Any
    ignore_index: int
    reduction: str
    label_smoothing: float
    consumer: fx.Node  # the node reading the logits: the loss, or its log-softmax
    class_weight: fx.Node | str | None = None  # a node, or the path of a module's buffer


@dataclasses.dataclass
class _Head:
    """A linear head feeding the loss: ``hidden @ weight.T + bias``, ``weight`` in [V, H]."""

    hidden: Any  # an fx.Node
    weight: Any
    bias: Any
    guarded: bool = False


_CE_PARAMS = (
    "input",
    "target",
    "weight",
    "size_average",
    "ignore_index",
    "reduce",
    "reduction",
    "label_smoothing",
)
_NLL_PARAMS = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction")
_LOG_SOFTMAX = {F.log_softmax, torch.log_softmax}


def _arguments(node: fx.Node, params: tuple[str, ...]) -> dict[str, Any]:
    return dict(zip(params, node.args, strict=False)) | dict(node.kwargs)


def _match_loss(gm: fx.GraphModule, node: fx.Node) -> _Loss | str | None:
    """The loss a node computes, why it cannot be fused (a string), or None when it is no loss."""
    if node.op == "call_module" and isinstance(
        gm.get_submodule(str(node.target)), nn.CrossEntropyLoss
    ):
        module = gm.get_submodule(str(node.target))
        arguments = _arguments(node, ("input", "target")) | {
            "weight": None if module.weight is None else f"{node.target}.weight",
            "ignore_index": module.ignore_index,
            "reduction": module.reduction,
            "label_smoothing": module.label_smoothing,
        }
    elif node.op == "call_function" and node.target is F.cross_entropy:
        arguments = _arguments(node, _CE_PARAMS)
    elif node.op == "call_function" and node.target is F.nll_loss:
        arguments = _arguments(node, _NLL_PARAMS)
        log_prob = arguments.get("input")
        dim = _log_softmax_dim(log_prob)
        if dim is None:
            return None  # an NLL of something other than a log-softmax
        if dim != 1:
            return f"log_softmax over dim {dim}, not the class dim 1"
        assert isinstance(log_prob, fx.Node)
        if len(log_prob.users) > 1:
            return "the log-softmax has other users"
        arguments["input"], arguments["log_softmax"] = log_prob.args[0], log_prob
    else:
        return None
    class_weight = arguments.get("weight")
    if class_weight is not None and not isinstance(class_weight, (fx.Node, str)):
        return "class weights are not a traced value"
    if arguments.get("size_average") is not None or arguments.get("reduce") is not None:
        return "legacy size_average/reduce arguments"
    logits, reduction = arguments.get("input"), arguments.get("reduction", "mean")
    ignore_index, smoothing = (
        arguments.get("ignore_index", -100),
        arguments.get("label_smoothing", 0.0),
    )
    if not isinstance(logits, fx.Node):
        return "the logits are not a traced value"
    if (
        reduction not in REDUCTIONS
        or not isinstance(ignore_index, int)
        or not isinstance(smoothing, (int, float))
    ):
        return "reduction, ignore_index or label_smoothing is computed at run time"
    consumer = arguments.pop("log_softmax", node)
    return _Loss(
        logits,
        arguments.get("target"),
        ignore_index,
        reduction,
        float(smoothing),
        consumer,
        class_weight,
    )


def _log_softmax_dim(node: Any) -> int | None:
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target in _LOG_SOFTMAX:
        dim = _arguments(node, ("input", "dim")).get("dim")
    elif node.op == "call_method" and node.target == "log_softmax":
        dim = _arguments(node, ("self", "dim")).get("dim")
    else:
        return None
    return dim if isinstance(dim, int) else -1000


def _match_head(gm: fx.GraphModule, logits: fx.Node, loss: fx.Node) -> _Head | None:
    """The linear head producing ``logits`` for ``loss`` (possibly through ``view(-1, V)``), or None."""
    source: Any = logits
    flattened = False
    if logits.op == "call_method" and logits.target in ("view", "reshape") and _flattens(logits):
        source, flattened = logits.args[0], True
    if not isinstance(source, fx.Node):
        return None
    # Other users would keep the logits alive; a size query feeding the view dies with it.
    consumer = logits if flattened else loss
    if any(user is not consumer and set(user.users) != {logits} for user in source.users):
        return None
    rank = _rank(source)
    if not flattened and rank is not None and rank != 2:
        return None  # (B, T, V) logits: class dim 1 is T, not the vocabulary
    head = _linear(gm, source)
    if head is not None:
        # Without the view and the rank unknown, the call checks the rank at run time.
        head.guarded = not flattened and rank is None
    return head


def _flattens(view: fx.Node) -> bool:
    """``x.view(-1, V)`` where V is ``x``'s last dimension (an int, ``x.size(-1)`` or ``x.shape[-1]``)."""
    shape = view.args[1:]
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    if len(shape) != 2 or shape[0] != -1:
        return False
    last, source = shape[1], view.args[0]
    if isinstance(last, int):
        meta = source.meta.get("tensor_meta") if isinstance(source, fx.Node) else None
        return meta is None or meta.shape[-1] == last
    if not isinstance(last, fx.Node):
        return False
    if last.op == "call_method" and last.target == "size":
        return last.args[0] is source and tuple(last.args[1:]) in ((-1,),)
    if last.op == "call_function" and last.target is operator.getitem and last.args[1] == -1:
        shape_node = last.args[0]
        return (
            isinstance(shape_node, fx.Node)
            and shape_node.op == "call_function"
            and shape_node.target is getattr
            and shape_node.args == (source, "shape")
        )
    return False


def _rank(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _linear(gm: fx.GraphModule, node: fx.Node) -> _Head | None:
    if node.op == "call_module" and type(gm.get_submodule(str(node.target))) is nn.Linear:
        with gm.graph.inserting_before(node):
            weight = gm.graph.get_attr(f"{node.target}.weight")
            bias = (
                gm.graph.get_attr(f"{node.target}.bias")
                if gm.get_submodule(str(node.target)).bias is not None
                else None
            )
        return _Head(node.args[0], weight, bias)
    if node.op == "call_function" and node.target in (F.linear, torch._C._nn.linear):
        arguments = _arguments(node, ("input", "weight", "bias"))
        return _Head(arguments["input"], arguments["weight"], arguments.get("bias"))
    if node.op == "call_function" and node.target in (torch.matmul, operator.matmul):
        h, w_t = node.args[:2]
        # matmul(h, W.t()) or h @ W.T: the weight is transposed back to [V, H].
        if isinstance(w_t, fx.Node) and w_t.op == "call_method" and w_t.target == "t":
            return _Head(h, w_t.args[0], None)
        if (
            isinstance(w_t, fx.Node)
            and w_t.op == "call_function"
            and w_t.target is getattr
            and w_t.args[1] == "T"
        ):
            return _Head(h, w_t.args[0], None)
    return None


def rewrite_fx(
    gm: fx.GraphModule,
    *,
    chunk_size: int | None = None,
    linear: bool = True,
    z_loss: float = 0.0,
    notes: list[str] | None = None,
) -> tuple[fx.GraphModule, dict[str, int]]:
    """Replace cross-entropy losses in ``gm`` by the fused, chunked ones (in place).

    Returns ``(gm, stats)`` with stats ``{"cross_entropy_fused": n,
    "linear_cross_entropy_fused": m, "skipped": k}``; why the ``k`` losses were left is
    appended to ``notes`` when given. ``linear=False`` fuses only the loss, never the
    head. ``z_loss`` adds the z-loss term (which changes the loss: 0 keeps it exact).
    Shape metadata (``ShapeProp``) lets the rewrite see 2-D logits; without it, a head
    not followed by ``view(-1, V)`` is fused behind a run-time rank check.

    >>> class Head(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.lm_head = nn.Linear(8, 32)
    ...     def forward(self, h, y):
    ...         return F.cross_entropy(self.lm_head(h), y)
    >>> gm, stats = rewrite_fx(torch.fx.symbolic_trace(Head()))
    >>> stats
    {'cross_entropy_fused': 0, 'linear_cross_entropy_fused': 1, 'skipped': 0}
    """
    stats = {"cross_entropy_fused": 0, "linear_cross_entropy_fused": 0}
    skipped: list[str] = []
    graph = gm.graph
    for node in list(graph.nodes):
        loss = _match_loss(gm, node)
        if loss is None:
            continue
        if isinstance(loss, str):
            skipped.append(f"loss {node.name!r} left as is: {loss}")
            continue
        options: dict[str, Any] = {
            "chunk_size": chunk_size,
            "ignore_index": loss.ignore_index,
            "reduction": loss.reduction,
            "label_smoothing": loss.label_smoothing,
            "z_loss": z_loss,
        }
        head = _match_head(gm, loss.logits, loss.consumer) if linear else None
        with graph.inserting_before(node):
            if isinstance(loss.class_weight, str):  # nn.CrossEntropyLoss's weight buffer
                options["class_weight"] = graph.get_attr(loss.class_weight)
            elif loss.class_weight is not None:
                options["class_weight"] = loss.class_weight
            if head is not None:
                function = (
                    _linear_cross_entropy_if_2d if head.guarded else fused_linear_cross_entropy
                )
                new = graph.call_function(
                    function, (head.hidden, head.weight, loss.target, head.bias), options
                )
                stats["linear_cross_entropy_fused"] += 1
            else:
                new = graph.call_function(fused_cross_entropy, (loss.logits, loss.target), options)
                stats["cross_entropy_fused"] += 1
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    _drop_unused_modules(gm)
    graph.lint()
    gm.recompile()
    stats["skipped"] = len(skipped)
    for note in skipped:
        logger.info("fuse-cross-entropy (fx): %s", note)
    if notes is not None:
        notes.extend(skipped)
    return gm, stats


def _linear_cross_entropy_if_2d(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    **options: Any,
) -> torch.Tensor:
    """The fused loss for 2-D hidden states; the original ``cross_entropy(linear)`` otherwise.

    Inserted where tracing could not tell the logits' rank: on (B, T, V) logits the class
    dimension 1 is not the vocabulary, so fusing would change the function.
    """
    if hidden.dim() == 2:
        return fused_linear_cross_entropy(hidden, weight, target, bias, **options)
    z_loss = options.pop("z_loss", 0.0)
    options.pop("chunk_size", None)
    if z_loss:
        raise ValueError("z_loss needs 2-D hidden states")
    class_weight = options.pop("class_weight", None)
    return F.cross_entropy(F.linear(hidden, weight, bias), target, weight=class_weight, **options)


def _drop_unused_modules(gm: fx.GraphModule) -> None:
    """Delete loss modules the rewrite replaced (parameters stay: the fused call reads them;
    a loss module whose class weights the fused call reads stays too)."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    used |= {str(n.target).rpartition(".")[0] for n in gm.graph.nodes if n.op == "get_attr"}
    for name, module in list(gm.named_children()):
        if isinstance(module, nn.CrossEntropyLoss) and name not in used:
            gm.delete_submodule(name)


# --------------------------------------------------------------------------------------
# The fx pass, by the ONNX pass's name and options
# --------------------------------------------------------------------------------------


@register_fx_pass
class FuseCrossEntropyFxPass(FxPass):
    """Losses (with their linear head) -> chunked :func:`fused_linear_cross_entropy`."""

    name = _onnx_pass.FuseCrossEntropyPass.name
    exact = _onnx_pass.FuseCrossEntropyPass.exact
    Options = _onnx_pass.FuseCrossEntropyOptions

    def call(self, gm: fx.GraphModule) -> FxPassResult:
        notes: list[str] = []
        gm, stats = rewrite_fx(
            gm, chunk_size=self.options.chunk_size or None, linear=self.options.linear, notes=notes
        )
        modified = stats["cross_entropy_fused"] + stats["linear_cross_entropy_fused"] > 0
        return FxPassResult(gm, modified, stats, notes)
