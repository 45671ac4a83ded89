"""The base model's tokenizer, for the data stages' token counts (batched: Rust does the work)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorapipe.errors import LorapipeError


def load_base_tokenizer(base_dir: str | Path) -> Any:
    """The Hugging Face tokenizer of the imported base model (no remote code)."""
    path = Path(base_dir)
    if not (path / "tokenizer_config.json").is_file():
        raise LorapipeError(
            f"{path}: no tokenizer there; run `dvc repro base` (the base stage makes {path})"
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


def count_tokens(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    if not texts:
        return []
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [len(ids) for ids in encoded]


def render_chats(tokenizer: Any, conversations: Sequence[list[dict[str, str]]]) -> list[str]:
    """Each conversation as the model will see it in training: the chat template applied."""
    return [tokenizer.apply_chat_template(messages, tokenize=False) for messages in conversations]
