"""`lorapipe serve` under load: requests/s and time to first token for 1 and 8 concurrent clients,
beside `lorapipe generate`'s generation of the same prompts.

    uv run python bench/serve.py                    # CPU: the model `lorapipe generate` loads
    python3 bench/serve.py --random-weights --out $OUT/serve-gpu.json    # on a GPU machine

generate    `lorapipe.generate.stream` (what `lorapipe generate` runs once its model is loaded)
            on each prompt in turn, in this process: one request at a time, no HTTP.
serve xN    `lorapipe serve --port 0` in a subprocess; N client threads, each with its own
            `openai` client, stream chat completions, each sending its next prompt as soon as
            its previous answer has ended. mlx-lm's server decodes concurrent requests together.
All modes send the first `--prompts` test-split prompts with the same token budget
(`--max-tokens`) and greedy decoding, and the same shaping (system prompt, template). Time to
first token (TTFT) runs from sending a request to its first text; requests/s and tokens/s count
a mode's whole set over its wall-clock time. The modes alternate `--repeats` times after a
warm-up; the table gives medians. `--random-weights` serves a model initialised from
`paths.base`'s config.json and tokenizer (so the weights need not travel to a GPU machine); a
random model rarely stops at EOS, so every answer is `--max-tokens` long.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from lorapipe import runtime

ROOT = Path(__file__).resolve().parents[1]

Result = dict[str, float | str]  # one request: ttft_s, seconds, tokens, text


def prompts(test_split: Path, count: int) -> list[str]:
    """The user turns of the first `count` chat rows of the test split."""
    rows = [json.loads(line) for line in test_split.read_text().splitlines() if line.strip()]
    turns = [m["content"] for r in rows if "messages" in r for m in r["messages"][-2:-1]]
    return turns[:count]


def random_model(source: Path, dest: Path) -> Path:
    """A model folder with `source`'s config and tokenizer and random weights."""
    import mlx.core as mx
    from mlx_lm.utils import _get_classes, save_model

    dest.mkdir(parents=True)
    config = json.loads((source / "config.json").read_text())
    model_class, args_class = _get_classes(config)
    mx.random.seed(0)
    model = model_class(args_class.from_dict(config))
    model.set_dtype(mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32)
    mx.eval(model.parameters())
    save_model(dest, model)
    for path in source.iterdir():
        if path.name == "config.json" or path.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(path, dest / path.name)
    return dest


def run_generate(params: Any, model: Any, tokenizer: Any, texts: list[str]) -> list[Result]:
    from lorapipe.generate import first_messages, stream, user_turn

    results: list[Result] = []
    for text in texts:
        tic, first, pieces = time.perf_counter(), None, []
        messages = [*first_messages(params), user_turn(params, text)]
        for piece in stream(model, tokenizer, messages, params):
            if piece and first is None:
                first = time.perf_counter()
            pieces.append(piece)
        # stream() yields once per generated token (text may be "" mid-character)
        results.append(_result(tic, first, time.perf_counter(), len(pieces), "".join(pieces)))
    return results


def _result(tic: float, first: float | None, done: float, tokens: int, text: str) -> Result:
    return {
        "ttft_s": (first or done) - tic,
        "seconds": done - tic,
        "tokens": tokens,
        "text": text,
    }


def run_serve(url: str, model: str, texts: list[str], clients: int, budget: int) -> list[Result]:
    """Each of `clients` threads takes the next prompt as soon as its previous answer ends."""
    import openai

    todo: queue.Queue[tuple[int, str]] = queue.Queue()
    for item in enumerate(texts):
        todo.put(item)
    results: dict[int, Result] = {}

    def client() -> None:
        api = openai.OpenAI(base_url=url, api_key="unused", timeout=600, max_retries=0)
        while True:
            try:
                index, text = todo.get_nowait()
            except queue.Empty:
                return
            tic, first, pieces, tokens = time.perf_counter(), None, [], 0
            chunks = api.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": text}],
                max_tokens=budget,
                temperature=0.0,
                stream=True,
                stream_options={"include_usage": True},
            )
            for chunk in chunks:
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    if choice.delta.content:
                        first = first or time.perf_counter()
                        pieces.append(choice.delta.content)
            results[index] = _result(tic, first, time.perf_counter(), tokens, "".join(pieces))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [results[i] for i in range(len(texts))]


@contextmanager
def server(params_path: Path, model: str) -> Iterator[str]:
    """`lorapipe serve` on a free loopback port until the block ends; yields its URL."""
    command = ["serve", "--port", "0", "--params", str(params_path), "--model", model]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorapipe.cli", *command],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            if match := re.search(r"serving \S+ at (\S+)", line):
                break
        else:
            raise SystemExit(f"lorapipe serve exited with {proc.wait()}")
        # Drain the access log so that a full pipe never stalls the server.
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        yield match[1]
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def summary(results: list[Result], seconds: float) -> dict[str, float]:
    tokens = sum(float(r["tokens"]) for r in results)
    return {
        "requests_per_s": len(results) / seconds,
        "ttft_median_s": statistics.median(float(r["ttft_s"]) for r in results),
        "ttft_max_s": max(float(r["ttft_s"]) for r in results),
        "tokens_per_s": tokens / seconds,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="quantized, fused, adapters or base (default: generate's)")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--test-split", default=str(ROOT / "data" / "sanitized" / "test.jsonl"))
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve-cpu.json"))
    args = parser.parse_args()
    os.chdir(ROOT)  # params.yaml's paths are relative to the repository, here and in the server
    runtime.setup()
    import mlx.core as mx

    from lorapipe.artifacts import load_model
    from lorapipe.generate import pick
    from lorapipe.params import edit_params_file, load_params

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    params_path = work / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params_path)
    edits: dict[str, object] = {"generate.max_tokens": args.max_tokens}
    shipped = load_params(ROOT / "params.yaml")
    name = args.model or pick(shipped)[0]
    if args.random_weights:
        edits["paths.base"] = str(random_model(Path(shipped.paths.base), work / "random"))
        name = "base"
    edit_params_file(params_path, edits)
    params = load_params(params_path)
    model, tokenizer = load_model(params.paths, name)
    texts = prompts(Path(args.test_split), args.prompts)

    modes = ["generate", *(f"serve x{n}" for n in args.clients)]
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    outputs: dict[str, list[str]] = {}
    with server(params_path, name) as url:
        run_generate(params, model, tokenizer, texts[:1])  # warm-up
        run_serve(url, name, texts[:2], 2, args.max_tokens)
        for _ in range(args.repeats):
            for mode in modes:
                tic = time.perf_counter()
                if mode == "generate":
                    results = run_generate(params, model, tokenizer, texts)
                else:
                    clients = int(mode.split("x")[1])
                    results = run_serve(url, name, texts, clients, args.max_tokens)
                row = summary(results, time.perf_counter() - tic)
                runs[mode].append(row)
                outputs[mode] = [str(r["text"]) for r in results]
                print(
                    f"{mode:<10} {row['requests_per_s']:6.2f} req/s  TTFT median "
                    f"{row['ttft_median_s']:6.2f} s  {row['tokens_per_s']:7.1f} tok/s"
                )
    shutil.rmtree(work)

    keys = ("requests_per_s", "ttft_median_s", "tokens_per_s")
    medians = {m: {k: statistics.median(r[k] for r in rs) for k in keys} for m, rs in runs.items()}
    same = {
        m: sum(a == b for a, b in zip(outputs["generate"], outputs[m], strict=True)) for m in modes
    }
    device = str(mx.default_device())
    print(f"\nserving {name}, {device}, {platform.machine()}, Python {sys.version.split()[0]}")
    print(f"{len(texts)} prompts, up to {args.max_tokens} tokens each, greedy")
    print(f"{'mode':<11}{'req/s':>8}{'TTFT (s)':>10}{'tok/s':>9}{'x generate':>12}{'same':>7}")
    base = medians["generate"]["requests_per_s"]
    for mode, m in medians.items():
        print(
            f"{mode:<11}{m['requests_per_s']:>8.2f}{m['ttft_median_s']:>10.2f}"
            f"{m['tokens_per_s']:>9.1f}{m['requests_per_s'] / base:>11.2f}x"
            f"{same[mode]:>4}/{len(texts)}"
        )
    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device,
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0]},
        "versions": {p: version(p) for p in ("mlx", "mlx-lm", "openai")},
        "model": name,
        "random_weights": args.random_weights,
        "prompts": len(texts),
        "max_tokens": args.max_tokens,
        "runs": runs,
        "medians": medians,
        "identical_to_generate": same,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
