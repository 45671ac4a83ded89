"""The training loss and the dataset loss every stage reports: cross-entropy over learned
tokens only, with the output layer run only where a token is learned.

Small models' vocabularies are many times their width, and prompts are most of a chat row's
tokens, so the output layer at the learned positions alone is most of a step's saving on the
CPU (figures: bench/README.md, "logits at learned positions").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

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


def masked_loss(model: Any, tokens: Any, targets: Any, positions: Any = None) -> tuple[Any, Any]:
    """Mean cross-entropy over target tokens, and their count; a batch with none gives 0, never
    0/0. With `positions` (Batches.positions) the output layer runs on the learned positions
    only: the same loss without the logits nothing reads."""
    import mlx.core as mx
    import mlx.nn as nn

    inputs, labels, mask = tokens[:, :-1], tokens[:, 1:], targets[:, 1:]
    if positions is None:
        logits = model(inputs)
    else:
        with logits_at(model, positions):
            logits = model(inputs)
        if logits.ndim == 2:  # gathered (else a model logits_at does not know: all of them)
            labels, mask = labels.reshape(-1)[positions], mask.reshape(-1)[positions]
    ce = nn.losses.cross_entropy(logits, labels) * mask
    count = mask.sum()
    return ce.astype(mx.float32).sum() / mx.maximum(count, 1), count


def spread(count: int, wanted: int) -> list[int]:
    """`wanted` of `count` length-sorted batches, evenly spread (the middle of each of `wanted`
    equal strides; -1 or more than there are: all): a fixed sample of every length, not the
    shortest rows that the first batches of a length-sorted split hold."""
    if wanted == -1 or wanted >= count:
        return list(range(count))
    return [(2 * k + 1) * count // (2 * wanted) for k in range(wanted)]


def dataset_loss(model: Any, batches: Batches, max_batches: int = -1, group: Any = None) -> float:
    """Mean loss per target token over `batches` (`max_batches` of them spread over all
    lengths; -1: all). With a distributed `group` whose processes each hold a share of every
    batch, over all the shares."""
    import mlx.core as mx

    total, count = mx.array(0.0), mx.array(0.0)
    # Every process picks the same batches (by the whole split's count) and scores its share.
    whole = max(batches.whole, len(batches))
    for i in [i for i in spread(whole, max_batches) if i < len(batches)]:
        loss, n = masked_loss(model, *batches.arrays(i))
        total, count = total + loss * n, count + n
        mx.eval(total, count)
    if group is not None and group.size() > 1:
        total = mx.distributed.all_sum(total, group=group)
        count = mx.distributed.all_sum(count, group=group)
    return float((total / mx.maximum(count, 1)).item())
