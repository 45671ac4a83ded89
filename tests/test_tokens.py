"""The data stages' tokenizer gives transformers' numbers: token counts and rendered chats."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from lorapipe.errors import LorapipeError
from lorapipe.tokens import BaseTokenizer
from tests.helpers import REPO

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "line one\r\nline two\n\n\ttabbed",
    "Émile paid 12.50 EUR for café au lait; 東京 is Tokyo. 🚀",
    "a literal <|im_end|> inside the text, and <|im_start|>user too",
    "",
    "def add(a, b):\n    return a + b\n",
]


def conversations(system: str | None) -> list[list[dict[str, str]]]:
    head = [{"role": "system", "content": system}] if system is not None else []
    one_turn = [
        [
            *head,
            {"role": "user", "content": text or "x"},
            {"role": "assistant", "content": "ok " + text},
        ]
        for text in TEXTS
    ]
    turns = [("user", "first question"), ("assistant", "first answer")]
    turns += [("user", "second\nquestion"), ("assistant", "second answer")]
    return [*one_turn, [*head, *({"role": r, "content": c} for r, c in turns)]]


def with_template(model_dir: Path, out: Path, template: str) -> Path:
    shutil.copytree(model_dir, out)
    (out / "chat_template.jinja").write_text(template)
    return out


def assert_like_transformers(model_dir: Path, chats: list[list[dict[str, str]]]) -> None:
    from transformers import AutoTokenizer

    hf: Any = AutoTokenizer.from_pretrained(str(model_dir))
    ours = BaseTokenizer(model_dir)
    expected = [hf.apply_chat_template(chat, tokenize=False) for chat in chats]
    rendered = [ours.render(chat) for chat in chats]
    assert rendered == expected
    texts = TEXTS + rendered
    assert ours.count(texts) == [len(ids) for ids in hf(texts, add_special_tokens=False).input_ids]
    for text in texts:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == hf.decode(ids)


@pytest.mark.parametrize("system", [None, "Compress the text."])
def test_counts_and_chats_match_transformers(tiny_model_dir: Path, system: str | None) -> None:
    assert_like_transformers(tiny_model_dir, conversations(system))


def test_template_features_render_as_in_transformers(tiny_model_dir: Path, tmp_path: Path) -> None:
    # What real templates use: namespace, loop controls, tojson, special-token variables,
    # {% generation %} blocks (Hub templates that mark assistant tokens), trimmed blocks.
    template = """{%- set ns = namespace(turns=0) -%}
{{ bos_token }}
{%- for m in messages -%}
  {%- if m['role'] == 'system' -%}{%- continue -%}{%- endif -%}
  {%- set ns.turns = ns.turns + 1 -%}
  {% if m['role'] == 'assistant' %}
{% generation %}A{{ ns.turns }}: {{ m['content'] }}{{ eos_token }}{% endgeneration %}
  {% else %}
U{{ ns.turns }}: {{ m | tojson }}
  {% endif %}
{%- endfor -%}"""
    model = with_template(tiny_model_dir, tmp_path / "m", template)
    assert_like_transformers(model, conversations("sys"))


def test_embedded_smollm2_template_on_the_demo_data(tmp_path: Path) -> None:
    """The embedded model's template (a default system prompt when there is none) on every
    well-formed demo row, as the pipeline renders them."""
    from lorapipe.gguf_import import convert_gguf, embedded_gguf_path

    model = tmp_path / "smollm2"
    model.mkdir()
    convert_gguf(embedded_gguf_path(), model)
    chats = []
    for path in sorted((REPO / "data" / "raw").glob("*.jsonl")):
        for line in path.read_bytes().splitlines():
            try:
                row = json.loads(line.decode("utf-8-sig"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(row, dict) and isinstance(row.get("input"), str):
                chats.append(
                    [
                        {"role": "system", "content": "Compress the text."},
                        {"role": "user", "content": row["input"]},
                        {"role": "assistant", "content": str(row.get("output"))},
                    ]
                )
    assert len(chats) > 2500
    assert_like_transformers(model, chats + conversations(None))


def test_a_template_cannot_leave_the_sandbox(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = with_template(
        tiny_model_dir, tmp_path / "m", "{% set ns = namespace() %}{% set ns._x = 1 %}{{ ns._x }}"
    )
    with pytest.raises(Exception, match="_x"):
        BaseTokenizer(model).render([{"role": "user", "content": "hi"}])


def test_missing_tokenizer_or_template_is_a_one_line_error(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(LorapipeError, match="no tokenizer there; run `dvc repro base`"):
        BaseTokenizer(tmp_path)
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(LorapipeError, match="has no chat template.*data.format: text"):
        BaseTokenizer(model).render([{"role": "user", "content": "hi"}])
