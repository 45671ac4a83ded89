"""The training loss and the dataset loss every stage reports: cross-entropy over learned
tokens only, with the output layer run only where a token is learned.

Small models' vocabularies are many times their width, and prompts are most of a chat row's
tokens, so the output layer at the learned positions alone is most of a step's saving on the
CPU (figures: bench/README.md, "logits at learned positions").

Where a batch learns many positions, their logits ([positions x vocabulary], and as much again
for their gradient) are a large share of a step's memory: over LOSS_CHUNK positions the
cross-entropy runs by chunks, one after another, each chunk's gradient taken beside its loss so
that no chunk's logits are kept for the backward pass (`chunked_cross_entropy`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from lorapipe import cpu_exp

# Learned positions whose logits may exist at once in the training loss (~200 MB of float32
# logits at SmolLM2's 49,152 words); a batch with more runs the cross-entropy by chunks.
LOSS_CHUNK = 1024

if TYPE_CHECKING:
    from lorapipe.batches import Batches


@contextmanager
def logits_at(model: Any, positions: Any) -> Iterator[None]:
    """Inside, `model(inputs)` returns logits [len(positions), vocab] for the flat positions of
    inputs [batch, length] only: the body's hidden states are gathered before the model's own
    head (tied or not, softcapped or not) runs. Swaps the body's class, so the module tree and
    its parameter names stay as they are. A model without a `model.model` body (mlx-lm's models
    all have one) is left alone: it returns all logits [batch, length, vocab]."""
    import mlx.nn as nn

    body = getattr(model, "model", None)
    if not isinstance(body, nn.Module):
        yield
        return
    original = type(body)

    class Gathered(original):  # type: ignore[misc, valid-type]
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            hidden = original.__call__(self, *args, **kwargs)
            return hidden.reshape(-1, hidden.shape[-1])[positions]

    body.__class__ = Gathered
    try:
        yield
    finally:
        body.__class__ = original


def output_layer(model: Any) -> Any:
    """The model's head as a function: hidden states [n, width] -> logits [n, vocabulary],
    whatever the model does after its body (tied or not, softcapped or not). It calls the model
    with its body swapped for one that returns the given states."""
    import mlx.core as mx

    body = model.model
    original = type(body)

    def head(hidden: Any) -> Any:
        class Given(original):  # type: ignore[misc, valid-type]
            def __call__(self, *args: Any, **kwargs: Any) -> Any:
                return hidden

        body.__class__ = Given
        try:
            return model(mx.zeros((1, 1), mx.int32))  # the body ignores it
        finally:
            body.__class__ = original

    return head


def chunked_cross_entropy(head: Any, hidden: Any, labels: Any, gradient: bool = True) -> Any:
    """cross_entropy(head(hidden), labels) at each of the n positions of hidden [n, width], by
    chunks of LOSS_CHUNK positions, one after another: the whole [n x vocabulary] logits and
    their gradient never exist at once. Each chunk's gradient with respect to its hidden states
    is computed beside its loss, while its logits exist (a position's loss depends on its own
    state only), so the backward pass only scales it and keeps no logits. (The head's own
    backward runs through mx.vjp, which recomputes the chunk's logits where the step is not
    compiled; compiled, they are shared.) The head's weights get no gradient (frozen in LoRA
    training; masked_loss checks). Computed by hand, the logits' gradient (softmax - one-hot)
    makes fewer [chunk x vocabulary] temporaries than autodiff's. Without `gradient` (a loss
    nothing differentiates), the chunks' losses only."""
    import mlx.core as mx

    count = hidden.shape[0]
    bounds = [(s, min(s + LOSS_CHUNK, count)) for s in range(0, count, LOSS_CHUNK)]

    if not gradient:
        losses: list[Any] = []
        for s, e in bounds:
            chunk = mx.depends(hidden[s:e], losses[-1:]) if losses else hidden[s:e]
            logits = head(chunk).astype(mx.float32)
            picked = mx.take_along_axis(logits, labels[s:e, None], axis=-1)[:, 0]
            losses.append(cpu_exp.logsumexp(logits) - picked)
        return mx.concatenate(losses)

    @mx.custom_function
    def cross_entropy(states: Any, targets: Any) -> Any:
        losses: list[Any] = []
        grads: list[Any] = []
        for s, e in bounds:
            chunk, ids = states[s:e], targets[s:e]
            if grads:  # after the previous chunk is done (else MLX may run them in any order)
                chunk = mx.depends(chunk, [losses[-1], grads[-1]])
            logits = head(chunk)
            lse = cpu_exp.logsumexp(logits.astype(mx.float32), keepdims=True)
            picked = mx.take_along_axis(logits, ids[:, None], axis=-1).astype(mx.float32)
            losses.append((lse - picked)[:, 0])
            hot = mx.arange(logits.shape[-1])[None, :] == ids[:, None]
            slope = (cpu_exp.exp(logits.astype(mx.float32) - lse) - hot).astype(logits.dtype)
            grads.append(mx.vjp(head, [chunk], [slope])[1][0])
        return mx.concatenate(losses), mx.stop_gradient(mx.concatenate(grads))

    @cross_entropy.vjp
    def scaled(primals: Any, cotangents: Any, outputs: Any) -> Any:
        return outputs[1] * cotangents[0][:, None].astype(outputs[1].dtype), mx.zeros_like(
            primals[1]
        )

    return cross_entropy(hidden, labels)[0]


def masked_loss(
    model: Any, tokens: Any, targets: Any, positions: Any = None, gradient: bool = True
) -> tuple[Any, Any]:
    """Mean cross-entropy over target tokens, and their count; a batch with none gives 0, never
    0/0. With `positions` (Batches.positions) the output layer runs on the learned positions
    only: the same loss without the logits nothing reads. Over LOSS_CHUNK such positions, by
    chunks (chunked_cross_entropy; `gradient=False` where nothing differentiates the loss)."""
    import mlx.core as mx

    inputs, labels, mask = tokens[:, :-1], tokens[:, 1:], targets[:, 1:]
    count = positions.size if positions is not None else labels.size
    if count > LOSS_CHUNK and _head_is_frozen(model):
        hidden = model.model(inputs)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        labels, mask = labels.reshape(-1), mask.reshape(-1)
        if positions is not None:
            hidden, labels, mask = hidden[positions], labels[positions], mask[positions]
        ce = chunked_cross_entropy(output_layer(model), hidden, labels, gradient) * mask
        total = mask.sum()
        return ce.sum() / mx.maximum(total, 1), total
    if positions is None:
        logits = model(inputs)
    else:
        with logits_at(model, positions):
            logits = model(inputs)
        if logits.ndim == 2:  # gathered (else a model logits_at does not know: all of them)
            labels, mask = labels.reshape(-1)[positions], mask.reshape(-1)[positions]
    ce = cpu_exp.cross_entropy(logits, labels) * mask
    count = mask.sum()
    return ce.astype(mx.float32).sum() / mx.maximum(count, 1), count


def _head_is_frozen(model: Any) -> bool:
    """Whether the model is an mlx-lm model (a `model` body) none of whose output-side weights
    train: chunked_cross_entropy gives its head no gradient."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    if not isinstance(getattr(model, "model", None), nn.Module):
        return False
    names = [name for name, _ in tree_flatten(model.trainable_parameters())]
    return not any(n.startswith(("lm_head", "model.embed_tokens")) for n in names)


def spread(count: int, wanted: int) -> list[int]:
    """`wanted` of `count` length-sorted batches, evenly spread (the middle of each of `wanted`
    equal strides; -1 or more than there are: all): a fixed sample of every length, not the
    shortest rows that the first batches of a length-sorted split hold."""
    if wanted == -1 or wanted >= count:
        return list(range(count))
    return [(2 * k + 1) * count // (2 * wanted) for k in range(wanted)]


def dataset_loss(
    model: Any, batches: Batches, max_batches: int = -1, group: Any = None, lanes: int = 1
) -> float:
    """Mean loss per target token over `batches` (`max_batches` of them spread over all
    lengths; -1: all). With a distributed `group` whose processes each hold a share of every
    batch, over all the shares. On `lanes` lanes (lorapipe.lanes, on the CPU; never more than a
    batch's rows), each batch's rows are shared out as a training step's are, each share's loss
    on a stream of its own with a one-thread BLAS: the same loss up to float rounding, sooner."""
    import mlx.core as mx

    from lorapipe.lanes import blas_threads, streams

    parts = max(1, min(lanes, min((len(rows) for rows in batches.tokens), default=1)))
    shares = batches.split(parts) if parts > 1 else [batches]
    total, count = mx.array(0.0), mx.array(0.0)
    # Every process picks the same batches (by the whole split's count) and scores its share.
    whole = max(batches.whole, len(batches))
    with blas_threads(1 if parts > 1 else None):
        for i in [i for i in spread(whole, max_batches) if i < len(batches)]:
            for share, stream in zip(shares, streams(parts), strict=True):
                with mx.stream(stream):
                    loss, n = masked_loss(model, *share.arrays(i), gradient=False)
                    total, count = total + loss * n, count + n
            mx.eval(total, count)
    if group is not None and group.size() > 1:
        total = mx.distributed.all_sum(total, group=group)
        count = mx.distributed.all_sum(count, group=group)
    return float((total / mx.maximum(count, 1)).item())
