"""lorapipe.decode gives mlx-lm's greedy batch_generate outputs, faster: checked on the tiny model
with prompts of mixed lengths, budgets and an EOS that some rows reach."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from lorapipe.decode import generate_batch


def test_same_texts_as_batch_generate(tiny_model_dir: Path) -> None:
    import mlx.core as mx
    from mlx_lm.generate import batch_generate
    from mlx_lm.utils import load

    model, tokenizer = load(str(tiny_model_dir))[:2]
    text = "the quick brown fox jumps over the lazy dog what is the capital of France"
    words = text.split(" ")
    # Lengths 1 to 40 tokens, out of order, so batches, padding and prefill groups all vary.
    prompts = [
        tokenizer.encode(" ".join(words[: 1 + (7 * i) % 15]) * (1 + i % 3)) for i in range(11)
    ]
    prompts[3] = prompts[3][:1]
    budgets = [1, 12, 3, 12, 2, 9, 12, 1, 12, 5, 12]
    # Stop at the token the model emits most often, so that some rows end at EOS.
    probe = batch_generate(model, tokenizer, prompts, max_tokens=12, return_token_ids=True)
    assert probe.token_ids is not None
    tokenizer.eos_token_ids = {
        Counter(t for ids in probe.token_ids for t in ids[2:]).most_common(1)[0][0]
    }

    expected = batch_generate(model, tokenizer, prompts, max_tokens=budgets, return_token_ids=True)
    texts, steps = generate_batch(model, tokenizer, prompts, budgets, batch_size=4)

    assert texts == expected.texts
    assert steps == expected.stats.generation_tokens
    stopped = [
        len(ids) < budget for ids, budget in zip(expected.token_ids or [], budgets, strict=True)
    ]
    assert 0 < sum(stopped) < len(prompts)  # the test covers both ways of finishing
    mx.clear_cache()


def test_rejects_mismatched_budgets(tiny_model_dir: Path) -> None:
    from mlx_lm.utils import load

    model, tokenizer = load(str(tiny_model_dir))[:2]
    with pytest.raises(ValueError, match="2 prompts but 1 token budgets"):
        generate_batch(model, tokenizer, [[1], [2]], [3], batch_size=2)
    with pytest.raises(ValueError, match="at least one token"):
        generate_batch(model, tokenizer, [[]], [3], batch_size=2)
