"""`lorapipe generate` and `lorapipe chat`: try the tuned model in one command.

The model is the first in `generate.prefer` that the pipeline has made, except a quantized model
that quantizing made measurably worse (its validation loss more than
`generate.quantized_max_loss_increase` above the fused model's): then the next, and it says
why. Prompts are shaped the
way training shaped them: `data.system_prompt` as the system turn, `data.prompt_template`
around the user's text, the model's chat template around both.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorapipe.artifacts import ARTIFACTS, MissingArtifact, chat_prompt, load_model
from lorapipe.params import Params


def pick(params: Params, wanted: str | None = None) -> tuple[str, list[str]]:
    """The name of the model to load (`wanted`, or the first of generate.prefer that exists and
    is good enough), and why models before it in generate.prefer were passed over."""
    order = [wanted] if wanted else list(params.generate.prefer)
    passed_over = []
    for name in order:
        if name not in ARTIFACTS:
            raise MissingArtifact(f"--model: {name!r} is not one of {', '.join(ARTIFACTS)}")
        artifact = ARTIFACTS[name]
        if not (artifact.path(params.paths) / artifact.marker).is_file():
            continue
        cost = quantization_cost(params) if name == "quantized" and not wanted else None
        limit = params.generate.quantized_max_loss_increase
        if cost is not None and cost > limit:
            passed_over.append(
                f"quantized passed over: its validation loss is {cost:.4f} above the fused "
                f"model's (metrics/quantize.json), more than generate.quantized_max_loss_increase "
                f"{limit}"
            )
            continue
        return name, passed_over
    made_by = ", ".join(
        f"{ARTIFACTS[n].path(params.paths)} (`dvc repro {ARTIFACTS[n].stage}`)" for n in order
    )
    raise MissingArtifact(f"no model to generate with: none of {made_by} exists yet")


def quantization_cost(params: Params) -> float | None:
    """How much the quantize stage said quantizing raised the validation loss, if it said."""
    path = Path(params.paths.metrics) / "quantize.json"
    if not path.is_file():
        return None
    return float(json.loads(path.read_text())["val_loss_increase"])


def choose(params: Params, wanted: str | None) -> str:
    """pick(), saying on stderr which model it chose and which it passed over."""
    name, passed_over = pick(params, wanted)
    for line in passed_over:
        print(f"[lorapipe] {line}", file=sys.stderr)
    shown = str(ARTIFACTS[name].path(params.paths))
    if name == "adapters":
        shown = f"{ARTIFACTS['base'].path(params.paths)} + {shown}"
    print(f"[lorapipe] model: {name} ({shown})", file=sys.stderr)
    return name


def load(params: Params, wanted: str | None) -> tuple[Any, Any]:
    return load_model(params.paths, choose(params, wanted))


def user_turn(params: Params, text: str) -> dict[str, str]:
    return {"role": "user", "content": params.data.prompt_template.replace("{prompt}", text)}


def first_messages(params: Params) -> list[dict[str, str]]:
    system = params.data.system_prompt
    return [{"role": "system", "content": system}] if system else []


def stream(
    model: Any, tokenizer: Any, messages: list[dict[str, str]], params: Params
) -> Iterator[str]:
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    g = params.generate
    sampler = make_sampler(temp=g.temperature, top_p=g.top_p)
    prompt = chat_prompt(tokenizer, messages)
    for response in stream_generate(
        model, tokenizer, prompt, max_tokens=g.max_tokens, sampler=sampler
    ):
        yield response.text


def generate_once(params: Params, text: str, wanted: str | None = None) -> str:
    model, tokenizer = load(params, wanted)
    parts = []
    for piece in stream(
        model, tokenizer, [*first_messages(params), user_turn(params, text)], params
    ):
        parts.append(piece)
        print(piece, end="", flush=True)
    print()
    return "".join(parts)


def chat(params: Params, wanted: str | None = None) -> None:
    model, tokenizer = load(params, wanted)
    messages = first_messages(params)
    print("[lorapipe] chat: an empty line or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            text = input("> ")
        except EOFError:
            break
        if not text.strip():
            break
        messages.append(user_turn(params, text))
        pieces = []
        for piece in stream(model, tokenizer, messages, params):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print()
        answer = "".join(pieces)
        messages.append({"role": "assistant", "content": answer})
