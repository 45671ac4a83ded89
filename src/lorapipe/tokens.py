"""The base model's tokenizer and chat template, for the data stages' token counts.

The data stages use the Rust `tokenizers` library directly and render the chat template with
jinja2 the way transformers renders it. Going through transformers gives the same numbers
(tests/test_tokens.py checks that) but importing it takes ~2 s and its per-row overhead doubled
the data stages' time on the 25k-row benchmark (bench/data.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from lorapipe.errors import LorapipeError

# The special tokens transformers hands to chat templates (its `special_tokens_map`).
_TEMPLATE_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


T = TypeVar("T")


def count_ahead(
    batches: Iterable[tuple[T, Sequence[str]]], count: Callable[[Sequence[str]], list[int]]
) -> Iterator[tuple[T, list[int]]]:
    """Each batch's item with the token counts of its texts, in order. A batch is counted on a
    thread while the caller prepares the next one and uses the last one's counts: the Rust
    tokenizer releases the GIL, so Python's share of the work runs beside it."""
    with ThreadPoolExecutor(1, thread_name_prefix="count") as pool:
        ahead: tuple[T, Future[list[int]]] | None = None
        for item, texts in batches:
            future = pool.submit(count, texts)
            if ahead is not None:
                yield ahead[0], ahead[1].result()
            ahead = (item, future)
        if ahead is not None:
            yield ahead[0], ahead[1].result()


class BaseTokenizer:
    """Token counts, encode/decode and chat rendering with an imported model's tokenizer."""

    def __init__(self, base_dir: str | Path) -> None:
        from tokenizers import Tokenizer

        path = Path(base_dir)
        config_file = path / "tokenizer_config.json"
        if not config_file.is_file():
            raise LorapipeError(
                f"{path}: no tokenizer there; run `dvc repro base` (the base stage makes {path})"
            )
        self.path = path
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if (path / "tokenizer.json").is_file():
            self.rust = Tokenizer.from_file(str(path / "tokenizer.json"))
        else:  # only a slow tokenizer (e.g. sentencepiece): transformers converts it once
            from transformers import AutoTokenizer

            self.rust = AutoTokenizer.from_pretrained(
                str(path), trust_remote_code=False
            ).backend_tokenizer
        self.special: dict[str, Any] = {
            k: _content(config[k]) for k in _TEMPLATE_TOKENS if config.get(k)
        }
        extra = config.get("additional_special_tokens")
        if extra:
            self.special["additional_special_tokens"] = [_content(t) for t in extra]
        self.template_source = _chat_template(path, config)
        self._template: Any = None

    def count(self, texts: Sequence[str]) -> list[int]:
        """Tokens in each text, without added BOS/EOS (batched: Rust uses every core)."""
        if not texts:
            return []
        return [len(e) for e in self.rust.encode_batch_fast(list(texts), add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        return list(self.rust.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.rust.decode(list(ids), skip_special_tokens=False))

    def render(self, messages: list[dict[str, str]]) -> str:
        """The conversation as training sees it: the chat template applied, no generation
        prompt (transformers' `apply_chat_template(messages, tokenize=False)`)."""
        if self._template is None:
            if self.template_source is None:
                raise LorapipeError(
                    f"{self.path}: the tokenizer has no chat template, so chat rows cannot be "
                    "rendered; use a chat model or data.format: text"
                )
            self._template = _compile(self.template_source)
        messages = [dict(m) for m in messages]  # the template must not change the caller's rows
        return str(
            self._template.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=False,
                **self.special,
            )
        )


def _content(token: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return str(token["content"] if isinstance(token, dict) else token)


def _chat_template(path: Path, config: dict[str, Any]) -> str | None:
    """The default chat template: chat_template.jinja (transformers >= 4.43), else the config's
    `chat_template` (a string, or a list of named templates)."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _compile(source: str) -> Any:
    """A chat template compiled as transformers compiles it: a sandbox (templates are untrusted
    code), trim_blocks and lstrip_blocks, loop controls, its tojson, raise_exception and
    strftime_now, and `{% generation %}` blocks rendered as their content."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}  # noqa: RUF012 - jinja reads the tag set from here

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(
                lineno
            )

        def _body(self, caller: Any) -> str:
            return str(caller())

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    class SafeNamespace(jinja2.utils.Namespace):
        """A namespace that refuses underscore names: a known way out of the sandbox."""

        def __init__(*args: Any, **kwargs: Any) -> None:  # jinja's own signature trick
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                SafeNamespace.check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            SafeNamespace.check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check(name: object) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} refused")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals.update(
        raise_exception=raise_exception,
        strftime_now=lambda fmt: datetime.now().strftime(fmt),
        namespace=SafeNamespace,
        dict=lambda *args, **kwargs: dict(*args, **kwargs),
    )
    return env.from_string(source)
