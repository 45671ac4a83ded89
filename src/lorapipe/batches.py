"""Rows to training batches: tokens and learned-token targets, length-sorted padded batches,
where logits are needed, and the batch order (a pure function of seed and epoch).

Used by train (its data), quantize and eval (their losses); no stage logic lives here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorapipe.errors import LorapipeError
from lorapipe.io import read_jsonl

PAD_TO = 32  # pad batch lengths to a multiple of this, as mlx-lm does: fewer compiled shapes


class BatchError(LorapipeError):
    """A split cannot be turned into training examples."""


@dataclass(frozen=True)
class Example:
    tokens: list[int]
    targets: list[int]  # 1 where tokens[i] is learned (predicted from tokens[:i]), else 0


def encode(row: dict[str, Any], tokenizer: Any, mask_prompt: bool) -> Example:
    """Tokenize a row as training sees it. With `mask_prompt`, every assistant turn is learned
    (its content and end-of-turn token) and nothing else: not the system prompt, not the user."""
    if "text" in row:
        tokens = list(tokenizer.encode(row["text"]))
        if tokenizer.eos_token_id is not None and tokens[-1:] != [tokenizer.eos_token_id]:
            tokens.append(tokenizer.eos_token_id)
        return Example(tokens, [0] + [1] * (len(tokens) - 1))
    messages = row["messages"]

    def render(upto: int, generation_prompt: bool = False) -> list[int]:
        return list(
            tokenizer.apply_chat_template(
                messages[:upto],
                tokenize=True,
                add_generation_prompt=generation_prompt,
                return_dict=False,
            )
        )

    tokens = render(len(messages))
    if not mask_prompt:
        return Example(tokens, [0] + [1] * (len(tokens) - 1))
    targets = [0] * len(tokens)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = len(render(i, generation_prompt=True)), len(render(i + 1))
        if render(i + 1) != tokens[:end]:
            raise BatchError(
                "train.mask_prompt: the chat template does not render a conversation's turns "
                "as prefixes of the whole; set train.mask_prompt: false for this model"
            )
        targets[start:end] = [1] * (end - start)
    return Example(tokens, targets)


def load_split(path: Path, tokenizer: Any, mask_prompt: bool) -> list[Example]:
    """A sanitized split's rows, encoded."""
    if not path.is_file():
        raise BatchError(f"{path}: not found; run `dvc repro sanitize` (it makes this file)")
    return [
        encode(line.value, tokenizer, mask_prompt)
        for line in read_jsonl(path)
        if line.value is not None
    ]


@dataclass
class Batches:
    """Fixed, length-sorted batches (little padding) whose order is reshuffled every epoch."""

    tokens: list[np.ndarray]  # [batch, length] int32, 0-padded
    targets: list[np.ndarray]  # [batch, length] float32
    real: list[int]  # tokens in each batch that are not padding (what tokens/s counts)
    # Where logits are needed: the flat indices of tokens[:, :-1] whose next token is learned,
    # padded with an unlearned index to the same count for every batch of one width (so no more
    # compiled shapes than widths); None where every position is learned.
    positions: list[np.ndarray | None] = field(default_factory=list)
    # Batches of the whole split, the same in every process (a process's share of the last
    # partial batch can be empty, and then it holds one fewer).
    whole: int = 0

    @property
    def real_tokens(self) -> int:
        return sum(self.real)

    @property
    def padded_tokens(self) -> int:
        return sum(t.size for t in self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def padding_fraction(self) -> float:
        return 1 - self.real_tokens / max(self.padded_tokens, 1)

    def split(self, parts: int) -> list[Batches]:
        """Every batch's rows cut into `parts` consecutive groups of near-equal size, one
        Batches a group (a training step's lanes, `lorapipe.lanes`), each with its own learned
        positions. `real` and `whole` stay the whole batch's. Needs `parts` rows a batch."""
        if any(len(tokens) < parts for tokens in self.tokens):
            raise ValueError(f"a batch has fewer rows than the {parts} parts asked for")
        groups = [Batches([], [], [], whole=self.whole) for _ in range(parts)]
        for tokens, targets, real in zip(self.tokens, self.targets, self.real, strict=True):
            cuts = zip(np.array_split(tokens, parts), np.array_split(targets, parts), strict=True)
            for group, (rows, learned) in zip(groups, cuts, strict=True):
                group.tokens.append(rows)
                group.targets.append(learned)
                group.real.append(real)
        for group in groups:
            group.positions = learned_positions(group.targets)
        return groups

    def arrays(self, index: int) -> tuple[Any, Any, Any]:
        """Batch `index` as the MLX arrays masked_loss takes after the model."""
        import mlx.core as mx

        positions = self.positions[index] if self.positions else None
        return (
            mx.array(self.tokens[index]),
            mx.array(self.targets[index]),
            None if positions is None else mx.array(positions),
        )


def make_batches(
    examples: list[Example],
    batch_size: int,
    pad_to: int = PAD_TO,
    every_row: bool = False,
    rank: int = 0,
    ranks: int = 1,
) -> Batches:
    """Length-sorted batches of `batch_size` rows. Training leaves out the last partial batch
    (every step the same size); `every_row` keeps it, for losses that must cover a whole split.

    With several processes (data parallel), process `rank` of `ranks` gets its share of each
    batch: the same batches in the same order everywhere, each cut into `ranks` consecutive
    parts of its rows. `real` still counts the whole batch (what tokens/s counts); a part left
    empty (the last partial batch of `every_row`) is left out, which only ever ends the list.
    """
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].tokens), i))
    last = len(order) if every_row else len(order) - batch_size + 1
    groups = [order[i : i + batch_size] for i in range(0, last, batch_size)]
    batches = Batches([], [], [])
    for whole in groups:
        share = math.ceil(len(whole) / ranks)
        group = whole[rank * share : (rank + 1) * share]
        if not group:
            continue
        longest = max(len(examples[i].tokens) for i in group)
        # inputs are tokens[:, :-1]: make that a multiple of pad_to
        width = 1 + pad_to * math.ceil((longest - 1) / pad_to)
        tokens = np.zeros((len(group), width), np.int32)
        targets = np.zeros((len(group), width), np.float32)
        for row, i in enumerate(group):
            n = len(examples[i].tokens)
            tokens[row, :n] = examples[i].tokens
            targets[row, :n] = examples[i].targets
        batches.real.append(sum(len(examples[i].tokens) for i in whole))
        batches.tokens.append(tokens)
        batches.targets.append(targets)
    batches.positions = learned_positions(batches.targets)
    batches.whole = len(groups)
    return batches


def learned_positions(targets: list[np.ndarray]) -> list[np.ndarray | None]:
    """Each batch's learned input positions (Batches.positions)."""
    learned = [np.flatnonzero(t[:, 1:]).astype(np.int32) for t in targets]
    count: dict[tuple[int, ...], int] = {}
    for t, where in zip(targets, learned, strict=True):
        count[t.shape] = max(count.get(t.shape, 0), where.size)
    positions: list[np.ndarray | None] = []
    for t, where in zip(targets, learned, strict=True):
        size = t[:, 1:].size
        if count[t.shape] == size:
            positions.append(None)  # all learned: the full logits, no gather
            continue
        # Padding entries point at an unlearned position (one exists: fewer learned than
        # size), whose zero weight keeps them out of the loss and its gradient.
        unlearned = int(np.flatnonzero(t[:, 1:].reshape(-1) == 0)[0])
        pad = np.full(count[t.shape] - where.size, unlearned, np.int32)
        positions.append(np.concatenate([where, pad]))
    return positions


def batch_order(seed: int, epoch: int, count: int) -> np.ndarray:
    """The order of the batches in one epoch: a pure function of (seed, epoch), so a resumed
    run continues the same sequence without saving any generator state."""
    return np.random.default_rng([seed, epoch]).permutation(count)
