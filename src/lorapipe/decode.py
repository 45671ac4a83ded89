"""Batched greedy decoding for evaluation: many prompts, each with its own token budget.

Over mlx-lm's models and their batched KV cache (`BatchKVCache`), with the same steps as
`mlx_lm.generate.batch_generate` (prefill all but a prompt's last token, then one token per
step, argmax), arranged for throughput on the CPU, where the figures in bench/README.md
(`generate.py`) showed the time going:

- prompts are sorted by length before they are batched, so a batch pads little and its
  attention runs over a short KV cache (attention costs as much as the 30 blocks' matmuls at a
  400-token cache);
- prompts are prefilled in groups of about `PREFILL_TOKENS` padded tokens: large matmuls,
  bounded attention scores, and no logits over the prompt;
- finished rows leave the batch only when that saves more than the copy of the KV cache costs
  (mlx-lm copies the whole cache each time any row finishes: about one decoding step each);
- the next step is queued before this step's tokens are read, so Python's bookkeeping overlaps
  the model's work.
"""

from __future__ import annotations

import math
from typing import Any

# Padded prompt tokens per prefill forward pass: enough rows for the BLAS to run near its peak,
# while the attention scores of a group (rows x heads x length^2 floats) stay ~100 MB or less.
PREFILL_TOKENS = 4096
# Finished rows are dropped from the batch once (finished / rows) x (steps left) exceeds this:
# dropping copies the KV cache, which costs about one decoding step, and rows that stop at EOS
# may end sooner than their budget, so the estimate of the saving is an upper bound.
DROP_WHEN_SAVING = 2.0


def generate_batch(
    model: Any, tokenizer: Any, prompts: list[list[int]], max_tokens: list[int], batch_size: int
) -> tuple[list[str], int]:
    """Greedy completions of `prompts` (token ids), each up to its `max_tokens` or an EOS token,
    at most `batch_size` at a time. Returns the texts in prompt order (EOS not included) and the
    number of decoding steps the rows took (EOS included, as `batch_generate` counts them)."""
    if len(max_tokens) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(max_tokens)} token budgets")
    if any(not p for p in prompts) or any(m < 1 for m in max_tokens):
        raise ValueError("every prompt needs at least one token and a budget of at least one")
    if not prompts:
        return [], 0
    eos = set(tokenizer.eos_token_ids)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    # Equal batches (300 prompts at 128: 100 + 100 + 100, not 128 + 128 + 44).
    size = math.ceil(len(order) / math.ceil(len(order) / batch_size))
    completions: list[list[int]] = [[] for _ in prompts]
    steps = 0
    for start in range(0, len(order), size):
        rows = order[start : start + size]
        outputs = _decode(model, [prompts[i] for i in rows], [max_tokens[i] for i in rows], eos)
        for row, tokens in zip(rows, outputs, strict=True):
            steps += len(tokens)
            completions[row] = tokens[:-1] if tokens[-1] in eos else tokens
    return [tokenizer.decode(tokens) for tokens in completions], steps


def _decode(
    model: Any, prompts: list[list[int]], budgets: list[int], eos: set[int]
) -> list[list[int]]:
    """Greedy decoding of one batch of length-sorted prompts: each row's tokens, up to its
    budget or an EOS token (kept as the last)."""
    import mlx.core as mx

    cache = _prefill(model, [p[:-1] for p in prompts])
    rows = list(range(len(prompts)))  # batch position -> prompt index
    outputs: list[list[int]] = [[] for _ in prompts]

    def step(tokens: mx.array) -> mx.array:
        return mx.argmax(model(tokens[:, None], cache=cache)[:, -1, :], axis=-1)

    queued = step(mx.array([p[-1] for p in prompts]))
    mx.async_eval(queued)
    finished = 0
    while rows:
        current = queued
        left = max(budgets[r] - len(outputs[r]) for r in rows) - 1
        if left > 0:  # queue the next step before reading this one
            queued = step(current)
            mx.async_eval(queued)
        for row, token in zip(rows, current.tolist(), strict=True):
            if _done(outputs[row], budgets[row], eos):
                continue  # finished earlier, still in the batch
            outputs[row].append(token)
            finished += _done(outputs[row], budgets[row], eos)
        if finished == len(rows) or left <= 0:
            break
        if finished / len(rows) * left > DROP_WHEN_SAVING:
            keep = [i for i, r in enumerate(rows) if not _done(outputs[r], budgets[r], eos)]
            for layer in cache:
                layer.filter(keep)
            queued = queued[mx.array(keep)]
            rows = [rows[i] for i in keep]
            finished = 0
    return outputs


def _done(tokens: list[int], budget: int, eos: set[int]) -> bool:
    return len(tokens) >= budget or (bool(tokens) and tokens[-1] in eos)


def _prefill(model: Any, prefixes: list[list[int]]) -> list[Any]:
    """The batch's KV cache after the prompts' `prefixes`, left-padded (BatchKVCache masks the
    padding and starts each row's positions at 0), in groups of about PREFILL_TOKENS."""
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache

    cache: list[Any] | None = None
    start = 0
    while start < len(prefixes):
        end = start + 1  # prefixes are sorted by length: the group's last is its longest
        while end < len(prefixes) and (end + 1 - start) * len(prefixes[end]) <= PREFILL_TOKENS:
            end += 1
        group = prefixes[start:end]
        width = len(group[-1])
        padding = [width - len(p) for p in group]
        part = [BatchKVCache(padding) for _ in model.layers]
        if width:
            model(
                mx.array([[0] * pad + p for pad, p in zip(padding, group, strict=True)]), cache=part
            )
            mx.eval([c.state for c in part])
        if cache is None:
            cache = part
        else:
            for whole, piece in zip(cache, part, strict=True):
                whole.extend(piece)
        mx.clear_cache()
        start = end
    assert cache is not None
    return cache
