"""params.yaml -> frozen, typed dataclasses.

params.yaml is the single source of every default: each field here is required, so code and
params.yaml cannot drift apart. Loading rejects unknown or misspelled keys, wrong types and
out-of-range values with a message naming the key, the value and what is allowed.

YAML is parsed the way DVC parses it (ruamel.yaml, YAML 1.2 "safe"), so `lr: 1e-5` is the float
DVC sees in `dvc params diff`, not the string PyYAML would return.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, cast
from urllib.parse import urlsplit

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from lorapipe.errors import LorapipeError

PARAMS_FILE = Path("params.yaml")


class ParamsError(LorapipeError):
    """params.yaml does not describe a valid run."""


@dataclass(frozen=True)
class Range:
    """Numeric bounds for a field, written `Annotated[int, Range(ge=0)]` and checked on load."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    def check(self, value: float, key: str, source: str) -> None:
        if self.ge is not None and value < self.ge:
            raise ParamsError(f"{source}: {key}: {value} is out of range; must be >= {self.ge}")
        if self.gt is not None and value <= self.gt:
            raise ParamsError(f"{source}: {key}: {value} is out of range; must be > {self.gt}")
        if self.le is not None and value > self.le:
            raise ParamsError(f"{source}: {key}: {value} is out of range; must be <= {self.le}")


# --- sections -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PathsParams:
    """Where each stage writes; dvc.yaml interpolates these (`${paths.base}`)."""

    base: str
    raw: str
    preprocessed: str
    split: str
    sanitized: str
    metrics: str
    reports: str
    adapters: str
    checkpoints: str
    train_log: str
    fused: str
    quantized: str


DType = Literal["float32", "float16", "bfloat16"]


@dataclass(frozen=True)
class ModelParams:
    """The `base` stage: which model to import and how."""

    source: str
    revision: str | None
    dtype: DType | None
    quantize_bits: Literal[2, 3, 4, 5, 6, 8] | None
    quantize_group_size: Literal[32, 64, 128]
    trust_remote_code: bool


@dataclass(frozen=True)
class FieldMap:
    """Which column of the user's data holds each lorapipe field (null: not used)."""

    messages: str
    prompt: str
    completion: str
    text: str
    system: str | None


@dataclass(frozen=True)
class DataParams:
    """The `preprocess` stage's input: where the raw data is and how to read it."""

    source: str
    revision: str | None
    hf_config: str | None
    hf_split: str
    format: Literal["chat", "completions", "text"]
    fields: FieldMap
    prompt_template: str
    system_prompt: str | None
    keep_fields: tuple[str, ...]


@dataclass(frozen=True)
class RatioLimit:
    """Maximum output/input length ratio for the raw files whose name matches `files`."""

    files: str
    max_char_ratio: Annotated[float, Range(gt=0)] | None
    max_token_ratio: Annotated[float, Range(gt=0)] | None


@dataclass(frozen=True)
class PreprocessParams:
    on_error: Literal["quarantine", "raise"]
    strip_patterns: tuple[str, ...]
    ratio_limits: tuple[RatioLimit, ...]


@dataclass(frozen=True)
class SplitRatios:
    train: Annotated[float, Range(gt=0, le=1)]
    valid: Annotated[float, Range(ge=0, le=1)]
    test: Annotated[float, Range(ge=0, le=1)]


# The split names, in order: the fields of split.ratios.
SPLITS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SplitRatios))


@dataclass(frozen=True)
class SplitParams:
    seed: Annotated[int, Range(ge=0)]
    ratios: SplitRatios
    stratify: str | None
    duplicates: Literal["drop", "keep"]


@dataclass(frozen=True)
class SanitizeParams:
    max_tokens: Annotated[int, Range(ge=8)]
    overlength: Literal["drop", "truncate", "error"]
    pii_kinds: tuple[Literal["email", "phone", "api_key", "ip_address"], ...]
    pii_action: Literal["redact", "drop"]
    phone_region: str


@dataclass(frozen=True)
class LoraParams:
    """What is trained: the adapter's shape (mlx-lm's adapter_config.json)."""

    fine_tune_type: Literal["lora", "dora", "full"]
    rank: Annotated[int, Range(ge=1)]
    scale: Annotated[float, Range(gt=0)]
    dropout: Annotated[float, Range(ge=0, le=0.9)]
    num_layers: Annotated[int, Range(ge=-1)]
    keys: tuple[str, ...] | None


@dataclass(frozen=True)
class TrainParams:
    """How it is trained (`lorapipe train`)."""

    iters: Annotated[int, Range(ge=1)] | None
    epochs: Annotated[float, Range(gt=0)] | None
    batch_size: Annotated[int, Range(ge=1)]
    grad_accumulation_steps: Annotated[int, Range(ge=1)]
    max_seq_length: Annotated[int, Range(ge=8)]
    mask_prompt: bool
    grad_checkpoint: Annotated[int, Range(ge=-1)] | Literal["auto"]
    memory_limit_gb: Annotated[float, Range(gt=0)] | None
    optimizer: Literal["adamw", "adam", "sgd", "adafactor"]
    learning_rate: Annotated[float, Range(gt=0)]
    weight_decay: Annotated[float, Range(ge=0)]
    max_grad_norm: Annotated[float, Range(gt=0)] | None
    lr_schedule: Literal["constant", "cosine", "linear"]
    warmup_steps: Annotated[int, Range(ge=0)]
    min_lr_ratio: Annotated[float, Range(ge=0, le=1)]
    steps_per_report: Annotated[int, Range(ge=1)]
    steps_per_eval: Annotated[int, Range(ge=1)]
    val_batches: Annotated[int, Range(ge=-1)]
    save_every: Annotated[int, Range(ge=1)]
    keep: Literal["best", "last"]
    early_stopping_patience: Annotated[int, Range(ge=1)] | None
    early_stopping_min_delta: Annotated[float, Range(ge=0)]


@dataclass(frozen=True)
class FuseParams:
    check_prompts: Annotated[int, Range(ge=1)]
    check_tokens: Annotated[int, Range(ge=1)]
    logits_rtol: Annotated[float, Range(gt=0)]
    export_gguf: bool


@dataclass(frozen=True)
class QuantizeParams:
    bits: Literal[2, 3, 4, 5, 6, 8]
    group_size: Literal[32, 64, 128]
    mode: Literal["affine", "mxfp4", "nvfp4", "mxfp8"]
    loss_batches: Annotated[int, Range(ge=-1)]


Metric = Literal["exact_match", "field_f1", "token_f1", "chrf", "compression_ratio"]


@dataclass(frozen=True)
class EvalParams:
    # name -> model folder; dvc.yaml makes one `eval@<name>` stage of each.
    models: dict[str, str]
    metrics: tuple[Metric, ...]
    max_rows: Annotated[int, Range(ge=1)] | None
    batch_size: Annotated[int, Range(ge=1)]
    max_tokens_factor: Annotated[float, Range(gt=0)]
    max_tokens_extra: Annotated[int, Range(ge=0)]
    report_examples: Annotated[int, Range(ge=0)]


@dataclass(frozen=True)
class GenerateParams:
    """`lorapipe generate` and `lorapipe chat` (user commands, not stages)."""

    prefer: tuple[Literal["quantized", "fused", "adapters", "base"], ...]
    quantized_max_loss_increase: Annotated[float, Range(ge=0)]
    max_tokens: Annotated[int, Range(ge=1)]
    temperature: Annotated[float, Range(ge=0)]
    top_p: Annotated[float, Range(gt=0, le=1)]


@dataclass(frozen=True)
class TrackingParams:
    """MLflow tracking beside DVC (lorapipe.mlflow_sync); no stage reads it."""

    mlflow_uri: str | None
    experiment: str


@dataclass(frozen=True)
class Params:
    seed: Annotated[int, Range(ge=0)]
    paths: PathsParams
    model: ModelParams
    data: DataParams
    preprocess: PreprocessParams
    split: SplitParams
    sanitize: SanitizeParams
    lora: LoraParams
    train: TrainParams
    fuse: FuseParams
    quantize: QuantizeParams
    eval: EvalParams
    generate: GenerateParams
    tracking: TrackingParams


# --- what one stage may read ---------------------------------------------------------------

# Every stage may read `paths`: dvc.yaml names each stage's deps and outs through them.
SHARED = ("paths",)


def for_stage(params: Params, stage: str, reads: tuple[str, ...]) -> Params:
    """`params` as stage `stage` sees it: the sections and keys it declares (`reads`, the same
    list as its `params:` in dvc.yaml) and `paths`. Reading anything else raises ParamsError
    naming the stage and the key, so a stage cannot depend on a param DVC does not track for it
    (a change to it would leave the stage's outputs stale)."""
    return cast(Params, _Declared(params, stage, "", frozenset((*reads, *SHARED))))


class _Declared:
    """A read-only view of a params object (or section) that lets through declared keys only."""

    __slots__ = ("_allowed", "_prefix", "_stage", "_value")

    def __init__(self, value: Any, stage: str, prefix: str, allowed: frozenset[str]) -> None:
        self._value, self._stage, self._prefix, self._allowed = value, stage, prefix, allowed

    def __getattr__(self, name: str) -> Any:
        key = f"{self._prefix}{name}"
        value = getattr(self._value, name)
        if key in self._allowed:
            return value
        if dataclasses.is_dataclass(value):  # a section: the error names the key read in it
            return _Declared(value, self._stage, f"{key}.", self._allowed)
        raise ParamsError(
            f"stage '{self._stage}' reads {key}, which it does not declare; add '{key}' to PARAMS "
            f"in src/lorapipe/stages/{self._stage}.py and to the stage's params in dvc.yaml"
        )


# --- loading --------------------------------------------------------------------------------


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; raise ParamsError naming the file, key and fix."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(
            f"{path}: not found; run lorapipe from the project folder (the one with dvc.yaml), "
            "or pass --params PATH"
        )
    try:
        data = YAML(typ="safe").load(path.read_text(encoding="utf-8"))
    except (YAMLError, UnicodeDecodeError) as exc:
        detail = " ".join(str(exc).split())
        raise ParamsError(f"{path}: not valid YAML: {detail}") from exc
    return params_from_dict(data, source=str(path))


DEMO_MARK = re.compile(r"# demo\b[;:]? ?")


def edit_params_file(path: Path, updates: dict[str, Any], check: bool = True) -> list[str]:
    """Set dotted keys (`train.iters`) in a params file the way a person would: comments, quotes
    and layout kept, lists changed in place. Writes atomically and, with `check`, only a valid
    file; returns a line per changed value ("key: old -> new")."""
    import io

    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedSeq

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)  # params.yaml's own layout
    # null stays `null` (ruamel would write an empty value)
    yaml.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    data = yaml.load(path)
    said = []
    for dotted, value in updates.items():
        *parents, last = dotted.split(".")
        node = data
        for key in parents:
            node = node[key]
        old = node.get(last)
        if old == value:
            continue
        said.append(f"{dotted}: {_written(old)} -> {_written(value)}")
        if isinstance(old, list) and isinstance(value, list) and value:
            old[:] = value  # in place: the comments ruamel attached to the list stay
        elif isinstance(value, list):
            node[last] = CommentedSeq(value)  # written [a, b], as params.yaml writes lists
            node[last].fa.set_flow_style()
        else:
            node[last] = value
        # A value marked `# demo` that changes is no longer the demo's: drop the mark.
        comment = getattr(node, "ca", None) and node.ca.items.get(last)
        if comment and comment[2] is not None:
            comment[2].value = DEMO_MARK.sub("# ", comment[2].value, count=1)
    text = io.StringIO()
    yaml.dump(data, text)
    if check:
        params_from_dict(YAML(typ="safe").load(text.getvalue()), source=str(path))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text.getvalue(), encoding="utf-8")
    tmp.replace(path)
    return said


def _written(value: Any) -> str:
    """A value as a message shows it: null, 'text', [a, b] (ruamel's containers as plain)."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_written(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_written(v) for v in value) + "]"
    return repr(value)


def params_from_dict(data: Any, source: str = "params") -> Params:
    params: Params = _build(Params, data, prefix="", source=source)
    _check_together(params, source)
    return params


def _check_together(params: Params, source: str) -> None:
    """Rules that span several keys, or need more than a type to check."""
    ratios = params.split.ratios
    total = ratios.train + ratios.valid + ratios.test
    if abs(total - 1.0) > 1e-6:
        raise ParamsError(
            f"{source}: split.ratios: train + valid + test = {total:g}; they must add up to 1"
        )
    if (params.train.iters is None) == (params.train.epochs is None):
        raise ParamsError(
            f"{source}: train.iters and train.epochs: set exactly one of them (the other null)"
        )
    for i, pattern in enumerate(params.preprocess.strip_patterns):
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ParamsError(
                f"{source}: preprocess.strip_patterns[{i}]: {pattern!r} is not a valid regular "
                f"expression ({exc})"
            ) from exc
    stratify = params.split.stratify
    if stratify is not None and stratify not in params.data.keep_fields:
        raise ParamsError(
            f"{source}: split.stratify: {stratify!r} is not in data.keep_fields "
            f"{list(params.data.keep_fields)}, so no row carries it; add it there, or set "
            "split.stratify: null"
        )
    models = params.eval.models
    if not models:
        raise ParamsError(f"{source}: eval.models: name at least one model to evaluate")
    for name in models:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
            raise ParamsError(
                f"{source}: eval.models: {name!r} cannot name a stage (`eval@{name}`); use "
                "letters, digits, '-' and '_'"
            )
    uri = params.tracking.mlflow_uri
    if uri is not None and "@" in urlsplit(uri).netloc:
        # params.yaml is committed: a token written here would be in git and in `dvc exp show`.
        raise ParamsError(
            f"{source}: tracking.mlflow_uri: holds credentials (user:password@); keep the "
            "plain address here and set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment"
        )
    if params.data.format == "completions" and "{prompt}" not in params.data.prompt_template:
        raise ParamsError(
            f"{source}: data.prompt_template: {params.data.prompt_template!r} must contain "
            "{prompt}, where the prompt text goes"
        )


def _build(cls: type, data: Any, prefix: str, source: str) -> Any:
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: {where} must be a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ParamsError(
            f"{source}: unknown key '{key}'; {where} allows: {', '.join(fields)}"
            + _did_you_mean(str(unknown[0]), list(fields))
        )
    values = {}
    for name in fields:
        key = f"{prefix}{name}"
        if name not in data:
            raise ParamsError(f"{source}: missing key '{key}' (see the shipped params.yaml)")
        values[name] = _coerce(hints[name], data[name], key, source)
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Annotated:
        value = _coerce(args[0], value, key, source)
        for extra in hint.__metadata__:
            if isinstance(extra, Range) and value is not None:
                extra.check(value, key, source)
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1 and typing.get_origin(options[0]) is Literal and type(None) in args:
            # `Literal[...] | None`: list null among the allowed values in the message.
            hint = Literal[(*typing.get_args(options[0]), None)]
            return _coerce(hint, value, key, source)
        errors = []
        for option in options:
            try:
                return _coerce(option, value, key, source)
            except ParamsError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ParamsError(f"{source}: {key}: {_show(value)} is not allowed ({_describe(hint)})")
    if origin is Literal:
        # bool is an int in Python; `quantize_bits: true` must not pass as 1.
        if value in args and type(value) in {type(a) for a in args}:
            return value
        allowed = ", ".join(_show(a) for a in args)
        raise ParamsError(f"{source}: {key}: {_show(value)} is not one of {allowed}")
    if origin is tuple:
        if not isinstance(value, list):
            raise ParamsError(f"{source}: {key}: expected a list, got {_show(value)}")
        return tuple(_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{source}: {key}: expected a mapping, got {_show(value)}")
        return {
            _coerce(args[0], k, key, source): _coerce(args[1], v, f"{key}.{k}", source)
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(hint):
        return _build(typing.cast(type, hint), value, prefix=f"{key}.", source=source)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and type(value) is hint:
        return value
    raise ParamsError(f"{source}: {key}: expected {_describe(hint)}, got {_show(value)}")


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Annotated:
        return _describe(typing.get_args(hint)[0])
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(_show(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        hint, str(hint)
    )


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return str(value)


def _did_you_mean(word: str, options: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
