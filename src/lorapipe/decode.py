"""Batched greedy decoding for evaluation: many prompts, each with its own token budget.

Over mlx-lm's models and their batched KV cache (`BatchKVCache`), with the same steps as
`mlx_lm.generate.batch_generate` (prefill all but a prompt's last token, then one token per
step, argmax), arranged for throughput on the CPU, where the figures in bench/README.md
(`generate.py`) showed the time going:

- prompts are sorted by length before they are batched, so a batch pads little and its
  attention runs over a short KV cache (attention costs as much as the 30 blocks' matmuls at a
  400-token cache);
- prompts are prefilled in groups of about `PREFILL_TOKENS` padded tokens: large matmuls,
  bounded attention scores, and no logits over the prompt; the tokens all of a share's rows
  start with (a chat template's system prompt) go through the model once;
- finished rows leave the batch only when that saves more than the copy of the KV cache costs
  (mlx-lm copies the whole cache each time any row finishes: about one decoding step each);
- the next step is queued before this step's tokens are read, so Python's bookkeeping overlaps
  the model's work;
- with lanes (`lorapipe.lanes`, on the CPU: one per BLAS thread), each group's rows are shared
  out in consecutive shares, and each share's prefill, references and decoding run on a stream
  of its own with a KV cache of its own and a one-thread BLAS, so that the work between the
  matmuls runs on every core. Rows never meet in a forward pass (each attends to its own tokens
  only), so the count changes the speed, not the outputs (identical in the tests and benchmarks).

With `references` (eval's reference answers), the batch also scores them: after the prompts'
prefill, each reference is fed through the KV cache in one teacher-forced pass, which gives its
loss (the test loss, with no separate pass over the prompts) and the model's greedy choice at
every position. Where those choices spell out a reference up to its EOS, that reference *is* the
greedy answer (speculative decoding, with the reference as the draft), and the row needs no
decoding: a tuned model that answers most prompts right is scored in about one forward pass.
The cache is trimmed back to the prompts after each pass, and only the other rows decode.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

# Padded prompt tokens per prefill forward pass: enough rows for the BLAS to run near its peak,
# while the attention scores of a group (rows x heads x length^2 floats) stay ~100 MB or less.
PREFILL_TOKENS = 4096
# Finished rows are dropped from the batch once (finished / rows) x (steps left) exceeds this:
# dropping copies the KV cache, which costs about one decoding step, and rows that stop at EOS
# may end sooner than their budget, so the estimate of the saving is an upper bound.
DROP_WHEN_SAVING = 2.0
# A prefix every row of a prefill share starts with goes through the model once, for one row,
# where that spares at least this many token positions (shared tokens x other rows): a one-row
# forward pass reads every weight, and the cache is rolled once afterwards, so 2 rows sharing 13
# tokens took longer that way (0.59 s vs 0.50), 30-53 rows 5-7% less time (one-off timing).
SHARED_PREFIX_SAVING = 64
# Tokens per teacher-forced forward pass: its logits (tokens x vocabulary floats, ~200 MB at
# SmolLM2's 49,152 words) are the pass's largest array.
TEACHER_TOKENS = 1024


@dataclass(frozen=True)
class Generation:
    texts: list[str]  # in prompt order, EOS not included
    tokens: int  # tokens the rows produced, EOS included (as `batch_generate` counts them)
    # With references: for each prompt, each reference's summed cross-entropy and token count.
    losses: list[list[tuple[float, int]]]
    verified: int  # prompts whose greedy answer a reference's teacher-forced pass spelled out


def generate_batch(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    max_tokens: list[int],
    batch_size: int,
    references: list[list[list[int]]] | None = None,
    lanes: int = 1,
) -> Generation:
    """Greedy completions of `prompts` (token ids), each up to its `max_tokens` or an EOS token,
    at most `batch_size` at a time. `references`, if given, holds each prompt's reference
    continuations (token ids as the chat template renders them after the prompt, EOS and what
    follows it included): each is scored, and decoding is skipped where one is the greedy
    answer (the texts are the same either way)."""
    if len(max_tokens) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(max_tokens)} token budgets")
    if references is not None and len(references) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(references)} reference lists")
    if any(not p for p in prompts) or any(m < 1 for m in max_tokens):
        raise ValueError("every prompt needs at least one token and a budget of at least one")
    refs = references if references is not None else [[] for _ in prompts]
    if not prompts:
        return Generation([], 0, [], 0)
    eos = set(tokenizer.eos_token_ids)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    # Equal batches (300 prompts at 128: 100 + 100 + 100, not 128 + 128 + 44).
    size = math.ceil(len(order) / math.ceil(len(order) / batch_size))
    completions: list[list[int]] = [[] for _ in prompts]
    losses: list[list[tuple[float, int]]] = [[] for _ in prompts]
    tokens = verified = 0
    for start in range(0, len(order), size):
        rows = order[start : start + size]
        outputs, scored, confirmed = _decode(
            model,
            [prompts[i] for i in rows],
            [max_tokens[i] for i in rows],
            eos,
            [refs[i] for i in rows],
            lanes,
        )
        verified += confirmed
        for row, output, loss in zip(rows, outputs, scored, strict=True):
            tokens += len(output)
            completions[row] = output[:-1] if output[-1] in eos else output
            losses[row] = loss
    texts = [tokenizer.decode(completion) for completion in completions]
    return Generation(texts, tokens, losses, verified)


def _decode(
    model: Any,
    prompts: list[list[int]],
    budgets: list[int],
    eos: set[int],
    references: list[list[list[int]]],
    lanes: int,
) -> tuple[list[list[int]], list[list[tuple[float, int]]], int]:
    """Greedy decoding of one batch of length-sorted prompts: each row's tokens, up to its
    budget or an EOS token (kept as the last); each reference's loss; how many rows a reference
    answered. With lanes, the rows left to decode are shared out and each share decodes on its
    own stream (its own KV cache), all shares' steps queued together."""
    import mlx.core as mx

    from lorapipe.lanes import blas_threads

    cache, outputs, losses = _prefill(model, prompts, references, budgets, eos, lanes)
    rows = [r for r in range(len(prompts)) if not outputs[r]]  # batch position -> prompt index
    verified = len(prompts) - len(rows)
    if not rows:
        return outputs, losses, verified
    running = [
        _Lane(model, [rows[i] for i in share], _rows_of(cache, share, rows, len(prompts)), stream)
        for share, stream in _lanes(len(rows), lanes)
    ]
    del cache  # each lane holds its rows' copy (or, with one lane, the cache itself)

    def done(row: int) -> bool:
        return _done(outputs[row], budgets[row], eos)

    with blas_threads(1 if len(running) > 1 else None):
        for lane in running:
            lane.queue(mx.array([prompts[r][-1] for r in lane.rows]))
        mx.async_eval([lane.queued for lane in running])
        while running:
            current = [lane.queued for lane in running]
            left = [max(budgets[r] - len(outputs[r]) for r in lane.rows) - 1 for lane in running]
            ahead = []  # queue the next steps before reading these
            for lane, tokens, steps in zip(running, current, left, strict=True):
                if steps > 0:
                    lane.queue(tokens)
                    ahead.append(lane.queued)
            mx.async_eval(ahead)
            still = []
            for lane, tokens, steps in zip(running, current, left, strict=True):
                for row, token in zip(lane.rows, tokens.tolist(), strict=True):
                    if done(row):
                        continue  # finished earlier, still in the batch
                    outputs[row].append(token)
                    lane.finished += done(row)
                if lane.finished == len(lane.rows) or steps <= 0:
                    continue
                if lane.finished / len(lane.rows) * steps > DROP_WHEN_SAVING:
                    lane.keep([i for i, r in enumerate(lane.rows) if not done(r)])
                still.append(lane)
            running = still
    return outputs, losses, verified


class _Lane:
    """Rows decoding together on one stream: their prompt indices, their KV cache (one
    BatchKVCache a layer) and their next step's tokens, queued."""

    def __init__(self, model: Any, rows: list[int], cache: list[Any], stream: Any) -> None:
        self.model, self.rows, self.cache, self.stream = model, rows, cache, stream
        self.queued: Any = None
        self.finished = 0  # rows done but still in the batch

    def queue(self, tokens: Any) -> None:
        """The greedy next tokens after `tokens` (one a row)."""
        import mlx.core as mx

        with mx.stream(self.stream):
            logits = self.model(tokens[:, None], cache=self.cache)[:, -1, :]
            self.queued = mx.argmax(logits, axis=-1)

    def keep(self, positions: list[int]) -> None:
        """Only the rows at these positions (dropping finished rows copies the KV cache)."""
        import mlx.core as mx

        for layer in self.cache:
            layer.filter(positions)
        self.queued = self.queued[mx.array(positions)]
        self.rows = [self.rows[i] for i in positions]
        self.finished = 0


def _rows_of(cache: list[Any], share: Any, rows: list[int], size: int) -> list[Any]:
    """The KV cache of a lane's `share` of the rows left to decode (batch positions `rows` of
    `size`): the cache itself where that is all of it, else a copy of those rows' (filtering
    makes new arrays, and leaves the cache as it was)."""
    positions = [rows[i] for i in share]
    if positions == list(range(size)):
        return cache
    subset = [copy.copy(layer) for layer in cache]
    for layer in subset:
        layer.filter(positions)
    return subset


def _teacher_force(
    model: Any,
    shares: list[_Share],
    prompts: list[list[int]],
    references: list[list[list[int]]],
    budgets: list[int],
    eos: set[int],
) -> tuple[list[list[int]], list[list[tuple[float, int]]]]:
    """Each row's references through its prefilled cache (one pass per reference index, the
    cache trimmed back after each; each lane's share of the rows on its stream). Returns each
    row's greedy answer where a reference spells it out (else []), and each reference's summed
    cross-entropy and token count."""
    import mlx.core as mx
    import numpy as np

    from lorapipe import cpu_exp
    from lorapipe.loss import logits_at

    answers: list[list[int]] = [[] for _ in prompts]
    losses: list[list[tuple[float, int]]] = [[] for _ in prompts]
    for j in range(max((len(r) for r in references), default=0)):
        refs = [r[j] if j < len(r) else [] for r in references]
        width = max(len(r) for r in refs)
        # Row b reads its prompt's last token, then the reference but its last token, and
        # predicts the reference; rows are right-padded (causal attention never looks ahead),
        # and the output layer runs on the reference's positions only.
        inputs = np.zeros((len(refs), width), np.int32)
        labels = np.zeros((len(refs), width), np.int32)
        for b, ref in enumerate(refs):
            if ref:
                inputs[b, : len(ref)] = [prompts[b][-1], *ref[:-1]]
                labels[b, : len(ref)] = ref
        real = np.arange(width) < np.array([[len(r)] for r in refs])
        summed = np.zeros(len(refs))
        choices = np.zeros((len(refs), width), np.int64)
        step = max(1, TEACHER_TOKENS // len(refs))
        for start in range(0, width, step):
            passes = []
            for rows, cache, stream in shares:
                window = real[rows, start : start + step]
                where = np.flatnonzero(window)
                with mx.stream(stream), logits_at(model, mx.array(where.astype(np.int32))):
                    logits = model(mx.array(inputs[rows, start : start + step]), cache=cache)
                if logits.ndim == 3:  # a model logits_at does not know: all of them
                    logits = logits.reshape(-1, logits.shape[-1])[mx.array(where)]
                if not len(where):  # no reference token of this share here: the cache only
                    passes.append((rows, window, logits, logits))
                    continue
                with mx.stream(stream):
                    targets = mx.array(labels[rows, start : start + step].reshape(-1)[where])
                    ce = cpu_exp.cross_entropy(logits, targets).astype(mx.float32)
                    greedy = mx.argmax(logits, axis=-1)
                passes.append((rows, window, ce, greedy))
            mx.eval([(ce, greedy) for _, _, ce, greedy in passes])
            for rows, window, ce, greedy in passes:
                if not window.any():
                    continue
                positions, columns = np.nonzero(window)
                np.add.at(summed, rows[positions], np.array(ce))
                choices[rows[positions], start + columns] = np.array(greedy)
        for share in shares:
            for layer in share.cache:
                layer.trim(width)
        for b, ref in enumerate(refs):
            if not ref:
                continue
            losses[b].append((float(summed[b]), len(ref)))
            answer = _greedy_answer(ref, choices[b].tolist(), budgets[b], eos)
            if answer is not None and not answers[b]:
                answers[b] = answer
    return answers, losses


def _greedy_answer(
    reference: list[int], choices: list[int], budget: int, eos: set[int]
) -> list[int] | None:
    """The row's greedy output if the model's choice at every position of `reference` up to
    where decoding would stop (its first EOS, or the budget) is the reference's own token: then
    decoding would produce exactly that. None where the choices leave the reference first."""
    stop = next((i + 1 for i, token in enumerate(reference) if token in eos), None)
    if stop is None and budget > len(reference):
        return None  # the reference ends before decoding would stop: no verdict
    length = min(stop or budget, budget)
    return reference[:length] if choices[:length] == reference[:length] else None


def _done(tokens: list[int], budget: int, eos: set[int]) -> bool:
    return len(tokens) >= budget or (bool(tokens) and tokens[-1] in eos)


def _prefill(
    model: Any,
    prompts: list[list[int]],
    references: list[list[list[int]]],
    budgets: list[int],
    eos: set[int],
    lanes: int,
) -> tuple[list[Any], list[list[int]], list[list[tuple[float, int]]]]:
    """The batch's KV cache after all but the prompts' last tokens, left-padded (BatchKVCache
    masks the padding and starts each row's positions at 0), in groups of about PREFILL_TOKENS.
    Each group's references are scored on its own cache before the groups are joined (less
    padding, and few rows a pass): the rows' greedy answers that a reference gave, and the
    references' losses (_teacher_force)."""
    import mlx.core as mx

    from lorapipe.lanes import blas_threads

    cache: list[Any] | None = None
    answers: list[list[int]] = []
    losses: list[list[tuple[float, int]]] = []
    start = 0
    while start < len(prompts):
        end = start + 1  # prompts are sorted by length: the group's last is its longest
        while end < len(prompts) and (end + 1 - start) * (len(prompts[end]) - 1) <= PREFILL_TOKENS:
            end += 1
        group_lanes = _lanes(end - start, lanes)
        with blas_threads(1 if len(group_lanes) > 1 else None):
            shares = _prefill_group(model, [p[:-1] for p in prompts[start:end]], group_lanes)
            scored = _teacher_force(
                model, shares, prompts[start:end], references[start:end], budgets[start:end], eos
            )
        answers += scored[0]
        losses += scored[1]
        for _, part, _ in shares:  # the batch's cache, rows in order
            if cache is None:
                cache = part
            else:
                for whole, piece in zip(cache, part, strict=True):
                    whole.extend(piece)
        mx.clear_cache()
        start = end
    assert cache is not None
    return cache, answers, losses


def _prefill_group(
    model: Any, group: list[list[int]], lanes: list[tuple[Any, Any]]
) -> list[_Share]:
    """The KV cache of a group of length-sorted prompt prefixes, in the consecutive shares of its
    rows that `lanes` (`_lanes`) gives: each share's prefill on its lane's stream
    (lorapipe.lanes: on the CPU the work between the matmuls runs on one core a stream), padded
    only to its own longest row. The caller holds the BLAS to one thread where there are several
    lanes."""
    import mlx.core as mx

    shares = []
    for rows, stream in lanes:
        with mx.stream(stream):
            cache = _prefill_rows(model, [group[i] for i in rows])
        shares.append(_Share(rows, cache, stream))
    mx.eval([layer.state for share in shares for layer in share.cache if layer.keys is not None])
    return shares


def _prefill_rows(model: Any, prefixes: list[list[int]]) -> list[Any]:
    """The left-padded KV cache (one BatchKVCache a layer) of these rows after their `prefixes`.
    The tokens every row starts with (a chat template's system prompt: 13 of the demo's ~85
    tokens a prompt) go through the model once, for one row, and their keys and values are
    copied to every row; then the rows' own tokens, right-padded (causal attention never looks
    ahead), and the cache is turned left-padded as mlx-lm's batch_generate does
    (`prepare(right_padding=...)`, `finalize()`)."""
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache

    shared = _shared_length(prefixes)
    if shared * (len(prefixes) - 1) < SHARED_PREFIX_SAVING:
        width = max(len(p) for p in prefixes)
        padding = [width - len(p) for p in prefixes]
        cache = [BatchKVCache(padding) for _ in model.layers]
        if width:
            model(
                mx.array([[0] * pad + p for pad, p in zip(padding, prefixes, strict=True)]),
                cache=cache,
            )
        return cache
    head = [BatchKVCache([0]) for _ in model.layers]
    model(mx.array([prefixes[0][:shared]]), cache=head)
    rows, own = len(prefixes), [p[shared:] for p in prefixes]
    width = max(len(p) for p in own)
    padding = [width - len(p) for p in own]  # on the right
    cache = [BatchKVCache([0] * rows) for _ in model.layers]
    for layer, prefix in zip(cache, head, strict=True):
        keys, values = prefix.keys_and_values()
        layer.state = (
            mx.repeat(keys, rows, axis=0),
            mx.repeat(values, rows, axis=0),
            mx.full((rows,), shared),  # each row's next position
            mx.zeros((rows,), mx.int32),
            shared,
        )
        layer.prepare(right_padding=padding)
    if width:
        model(mx.array([p + [0] * pad for p, pad in zip(own, padding, strict=True)]), cache=cache)
    for layer in cache:
        layer.finalize()
    return cache


def _shared_length(rows: list[list[int]]) -> int:
    """How many tokens every row starts with."""
    shortest = min(len(r) for r in rows)
    first = rows[0]
    return next((i for i in range(shortest) if any(r[i] != first[i] for r in rows)), shortest)


class _Share(NamedTuple):
    """A lane's rows of a batch (their positions, consecutive), their KV cache (one BatchKVCache
    a layer), and the lane's stream."""

    rows: Any  # numpy array of row positions
    cache: list[Any]
    stream: Any


def _lanes(rows: int, lanes: int) -> list[tuple[Any, Any]]:
    """`rows` rows in near-equal consecutive shares, one a lane (never an empty one), each with
    its stream."""
    import numpy as np

    from lorapipe.lanes import streams

    shares = [s for s in np.array_split(np.arange(rows), lanes) if len(s)]
    return list(zip(shares, streams(len(shares)), strict=True))
