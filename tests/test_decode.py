"""lorapipe.decode gives mlx-lm's greedy batch_generate outputs, faster: checked on the tiny model
with prompts of mixed lengths, budgets and an EOS that some rows reach."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from lorapipe.decode import generate_batch


@pytest.mark.parametrize("lanes", [1, 2, 3])
def test_same_texts_as_batch_generate(tiny_model_dir: Path, lanes: int) -> None:
    """On any number of lanes (the rows shared over MLX streams: lorapipe.lanes)."""
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
    generation = generate_batch(model, tokenizer, prompts, budgets, batch_size=4, lanes=lanes)

    assert generation.texts == expected.texts
    assert generation.tokens == expected.stats.generation_tokens
    assert generation.verified == 0 and generation.losses == [[] for _ in prompts]
    stopped = [
        len(ids) < budget for ids, budget in zip(expected.token_ids or [], budgets, strict=True)
    ]
    assert 0 < sum(stopped) < len(prompts)  # the test covers both ways of finishing
    mx.clear_cache()


@pytest.mark.parametrize("lanes", [1, 2])
def test_a_prefix_all_prompts_share_is_prefilled_once(
    tiny_model_dir: Path, lanes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompts that start alike (a chat template's system prompt): the shared tokens go through
    the model once, and the texts are still batch_generate's, a prompt that is the shared
    prefix and one token (nothing of its own to prefill) included."""
    import mlx.core as mx
    from mlx_lm.generate import batch_generate
    from mlx_lm.utils import load

    from lorapipe import decode

    model, tokenizer = load(str(tiny_model_dir))[:2]
    system = tokenizer.encode("you are a helpful assistant who answers in one short line")
    question = tokenizer.encode("what is the capital of France and why is the sky blue at noon")
    prompts = [system + question[: 1 + (5 * i) % len(question)] for i in range(7)]
    prompts.append(system + tokenizer.encode("hi")[:1])
    budgets = [8, 3, 8, 5, 8, 1, 8, 6]
    monkeypatch.setattr(decode, "SHARED_PREFIX_SAVING", 8)  # the tiny case's shares are small
    shares = []  # each prefill share: its prefixes and the shapes of the model's inputs
    original = decode._prefill_rows

    def recording(model: Any, prefixes: list[list[int]]) -> list[object]:
        inputs: list[tuple[int, ...]] = []

        class Watched:  # the model, noting what each forward pass is given
            layers = model.layers

            def __call__(self, tokens: Any, cache: Any) -> Any:
                inputs.append(tuple(tokens.shape))
                return model(tokens, cache=cache)

        shares.append((prefixes, inputs))
        return original(Watched(), prefixes)

    monkeypatch.setattr(decode, "_prefill_rows", recording)
    generation = generate_batch(model, tokenizer, prompts, budgets, batch_size=8, lanes=lanes)
    expected = batch_generate(model, tokenizer, prompts, max_tokens=budgets)

    assert generation.texts == expected.texts
    assert generation.tokens == expected.stats.generation_tokens
    # each share sent the tokens its rows start with (the whole system prompt at least) through
    # the model once, for one row, then only each row's own tokens
    assert shares
    for prefixes, inputs in shares:
        shared = decode._shared_length(prefixes)
        own = max(len(p) for p in prefixes) - shared
        assert shared >= len(system)
        assert inputs == [(1, shared)] + ([(len(prefixes), own)] if own else [])
    mx.clear_cache()


@pytest.mark.parametrize("lanes", [1, 2])
def test_references_are_scored_and_confirm_greedy_answers(tiny_model_dir: Path, lanes: int) -> None:
    """Eval's path: each reference's loss through the prompt's KV cache equals the plain
    forward pass's, and a reference that is the greedy answer spares decoding it, with the
    same texts as decoding every row (on one lane or two)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.generate import batch_generate
    from mlx_lm.utils import load

    model, tokenizer = load(str(tiny_model_dir))[:2]
    prompts = [
        tokenizer.encode("the quick brown fox " * (1 + i % 4))[: 3 + 5 * i] for i in range(9)
    ]
    budgets = [6] * len(prompts)
    tokenizer.eos_token_ids = {-1}  # nothing stops: the full greedy answers
    probe = batch_generate(model, tokenizer, prompts, max_tokens=budgets, return_token_ids=True)
    greedy = probe.token_ids
    assert greedy is not None and all(len(g) == 6 for g in greedy)
    tokenizer.eos_token_ids = {greedy[0][4]}  # row 0 stops there; others may too
    expected = generate_batch(model, tokenizer, prompts, budgets, batch_size=4)
    eos = next(iter(tokenizer.eos_token_ids))
    right = [g[: g.index(eos) + 1] if eos in g else g for g in greedy]
    wrong = [[(t + 1) % 50 for t in g] for g in greedy]
    # Rows 0-2: a wrong reference and then the right one; rows 3-8: the right one, or a wrong one.
    references = [
        [wrong[i], right[i]] if i < 3 else [right[i] if i % 2 else wrong[i]] for i in range(9)
    ]

    got = generate_batch(
        model, tokenizer, prompts, budgets, batch_size=4, references=references, lanes=lanes
    )

    assert got.texts == expected.texts and got.tokens == expected.tokens
    # Confirmed: rows 0-2 (by their second reference) and the odd rows with the right one,
    # where the right reference ends at EOS or runs the whole budget.
    assert got.verified == 3 + sum(1 for i in range(3, 9) if i % 2)
    for prompt, refs, scored in zip(prompts, references, got.losses, strict=True):
        assert [count for _, count in scored] == [len(r) for r in refs]
        for ref, (total, _) in zip(refs, scored, strict=True):
            logits = model(mx.array([prompt + ref[:-1]]))[0, len(prompt) - 1 :]
            want = nn.losses.cross_entropy(logits, mx.array(ref)).sum().item()
            assert total == pytest.approx(want, rel=1e-4)
    mx.clear_cache()


def test_rejects_mismatched_budgets(tiny_model_dir: Path) -> None:
    from mlx_lm.utils import load

    model, tokenizer = load(str(tiny_model_dir))[:2]
    with pytest.raises(ValueError, match="2 prompts but 1 token budgets"):
        generate_batch(model, tokenizer, [[1], [2]], [3], batch_size=2)
    with pytest.raises(ValueError, match="at least one token"):
        generate_batch(model, tokenizer, [[]], [3], batch_size=2)
