"""`lorapipe use-data SOURCE`: point the pipeline at your own dataset, right the first time.

Reads the first records of SOURCE, works out `data.format` and `data.fields` from its columns,
and writes them to params.yaml with every demo setting (the ones marked `# demo` there) set to
its generic value, printing each change. Comments in params.yaml are kept.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Any

from lorapipe.datasource import check_tracked, read_file, source_files
from lorapipe.errors import LorapipeError

# The demo's own settings and their values for any other dataset. Each is marked `# demo` in
# params.yaml; README's "Your own data" lists the same keys.
GENERIC: dict[str, Any] = {
    "data.system_prompt": None,  # the demo adds "Compress the text." to every row
    "data.prompt_template": "{prompt}",
    "data.keep_fields": [],  # the demo carries id and kind, for split.stratify
    "preprocess.ratio_limits": [],  # the demo keeps only outputs shorter than their inputs
    "split.stratify": None,  # the demo balances its `kind` column (natural language, code)
    "eval.metrics": ["exact_match", "token_f1", "chrf"],  # field_f1 scores the demo's records
    # The demo's 180 steps are a third of an epoch on its short rows; on real data one epoch is
    # the measured rule (README "On real data").
    "train.iters": None,
    "train.epochs": 1,
}
# Column pairs (prompt, completion) recognized without --prompt/--completion, most common first.
KNOWN_PAIRS = [
    ("prompt", "completion"),
    ("input", "output"),
    ("question", "answer"),
    ("instruction", "response"),
    ("instruction", "output"),
    ("source", "target"),
    ("document", "summary"),
    ("article", "summary"),
    ("article", "highlights"),
    ("dialogue", "summary"),
    ("text", "summary"),
    ("long", "short"),
]
SAMPLE = 200  # records read to see the columns


class UseDataError(LorapipeError):
    """The dataset's shape cannot be worked out, or it lives where DVC does not track it."""


def columns_of(source: str, raw_dir: str) -> dict[str, str]:
    """Each column in SOURCE's first records and its kind: "messages" (a list of role/content
    objects), "text" (a string) or "other"; in the order the columns first appear."""
    if not source_files(source):
        raise UseDataError(
            f"{source}: no such file, folder or glob; put your data under {raw_dir}/ first"
        )
    check_tracked(source, raw_dir)
    kinds: dict[str, str] = {}
    for path in source_files(source):
        for record in islice(read_file(path), SAMPLE):
            for name, value in (record.value or {}).items():
                kinds.setdefault(name, _kind(value))
    if not kinds:
        raise UseDataError(f"{source}: no readable record in its first {SAMPLE}; check the file")
    return kinds


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return "text"
    if (
        isinstance(value, list)
        and value
        and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in value)
    ):
        return "messages"
    return "other"


def infer(
    kinds: dict[str, str], prompt: str | None = None, completion: str | None = None
) -> dict[str, Any]:
    """data.format and data.fields for a dataset with these columns."""
    shown = ", ".join(f"{name} ({kind})" for name, kind in kinds.items())
    if prompt or completion:
        for name in (prompt, completion):
            if name not in kinds:
                raise UseDataError(f"column {name!r} is not in the data; it has: {shown}")
        if not (prompt and completion):
            raise UseDataError("give both --prompt and --completion")
        return {"data.format": "completions", "data.fields.prompt": prompt,
                "data.fields.completion": completion}  # fmt: skip
    chats = [name for name, kind in kinds.items() if kind == "messages"]
    if len(chats) == 1:
        return {"data.format": "chat", "data.fields.messages": chats[0]}
    texts = [name for name, kind in kinds.items() if kind == "text"]
    lowered = {name.lower(): name for name in texts}
    for first, second in KNOWN_PAIRS:
        if first in lowered and second in lowered:
            return {"data.format": "completions", "data.fields.prompt": lowered[first],
                    "data.fields.completion": lowered[second]}  # fmt: skip
    if texts == ["text"] or (len(texts) == 1 and not chats):
        return {"data.format": "text", "data.fields.text": texts[0]}
    raise UseDataError(
        f"cannot tell which columns hold the prompt and the answer (the data has: {shown}); "
        "run again with --prompt COLUMN --completion COLUMN"
    )


def changes(source: str, shape: dict[str, Any]) -> dict[str, Any]:
    """Every params.yaml key `use-data` sets, to its new value."""
    return {"data.source": source, **shape, **GENERIC}


def main(
    source: str, params_file: Path, prompt: str | None = None, completion: str | None = None
) -> None:
    from lorapipe.params import edit_params_file, load_params

    params = load_params(params_file)
    shape = infer(columns_of(source, params.paths.raw), prompt, completion)
    said = edit_params_file(params_file, changes(source, shape))
    for line in said or ["nothing to change"]:
        print(f"use-data: {line}")
    print(f"use-data: {params_file} now reads {source}; run `dvc repro` (or `dvc exp run`)")
